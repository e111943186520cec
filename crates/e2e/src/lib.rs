//! End-to-end tests of plugin functions; the binaries in `src/bin` are the plugins and hosts
//! the tests run as real processes.
