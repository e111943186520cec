//! WebAssembly functions for Mycelium: WASI preview 1 modules run on
//! [wasmtime](https://wasmtime.dev), a fresh sandboxed instance per invocation.
//!
//! The guest ABI ([docs/wasm.md](https://github.com/mycelium-fn/mycelium/blob/main/docs/wasm.md))
//! is a WASI command: the invocation's CloudEvent (structured JSON) on stdin, the reply on
//! stdout (`{"events": [...]}`, a list of events, one event, or `{"error": {...}}`), stderr
//! to the function's logs, configuration in the environment. Any language with a
//! `wasm32-wasi` target can write one.
//!
//! - [`WasmExecutor`] runs the functions of kind `wasm`: it fetches a version's module
//!   through the shared [`ArtifactCache`](mycelium_registry::ArtifactCache), compiles it once
//!   per digest (kept on disk beside the binary, so a restarted runtime maps it instead of
//!   compiling), and answers each call with a new instance from an `InstancePre` and the
//!   pooling allocator.
//! - Limits: memory per instance (`--memory-mb`, a `ResourceLimiter`), the deadline (epoch
//!   interruption: a guest that never returns yields to the runtime every tick and ends as
//!   `timeout`), output size; no filesystem, no network, no inherited environment.
//!
//! The crate knows nothing of NATS: the runtime sees its functions as [`mycelium_core::Function`]s.

mod abi;
mod compiled;
mod engine;
mod executor;
mod function;

pub use executor::{WasmExecutor, WasmSettings};
pub use function::{WasmFunction, WithSecrets};
