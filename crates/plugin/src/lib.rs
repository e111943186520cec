//! Mycelium plugins over HashiCorp go-plugin's gRPC protocol: the generated code, the
//! CloudEvent conversion, the handshake, and the host side that runs plugin processes.
//! The only crate (with the SDK) that knows protobuf.

pub mod cgroup;
mod channel;
pub mod host;
mod output;
pub mod pool;
mod spawn;

pub use mycelium_plugin_protocol::{convert, frames, framing, handshake, proto, socket};
