#![no_main]
//! The go-plugin handshake line a plugin prints.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mycelium_plugin::handshake::Handshake::parse(&String::from_utf8_lossy(data));
});
