//! Mycelium's plugin protocol: HashiCorp go-plugin's gRPC protocol with Mycelium's
//! `Function` service. What a host and a plugin both need, and nothing else: the generated
//! code, CloudEvent conversion, gRPC's message framing, the handshake (with its environment
//! variables), the Unix socket both sides talk over, and Mycelium's own frame protocol that
//! SDK plugins speak to Mycelium's host instead of HTTP/2.
//! The only crate that knows protobuf; plugins link it without the host.

pub mod convert;
pub mod frames;
pub mod framing;
pub mod handshake;
pub mod proto;
pub mod socket;
