//! Mycelium's frame protocol: the same calls and messages as the gRPC protocol, without
//! HTTP/2 under them, for plugins built with Mycelium's SDK.
//!
//! HTTP/2 and its header maps were about a fifth of the runtime's CPU per plugin call
//! (BENCHMARKS.md, issue 15), for features a local socket between two known programs does not
//! use. A host that speaks this protocol offers it in [`OFFER_ENV`]; a plugin that speaks it
//! too answers with [`PROTOCOL`] in its handshake line, and anything else (go-plugin's own
//! host, a Go plugin) keeps gRPC, so go-plugin compatibility is untouched.
//!
//! Each frame is a nine-byte header (the body's length as a big-endian `u32`, a [`Kind`]
//! byte, the call's id as a big-endian `u32`) and the body. A call is one request frame whose
//! kind names the method and whose body is the method's protobuf request, as in gRPC; the
//! plugin answers with one [`Kind::Reply`] (the protobuf answer) or one [`Kind::Status`] (a
//! gRPC status code and message), or, for the stdio stream, any number of [`Kind::Item`].
//! Calls are answered in any order; a call the host gave up on is answered into the void.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::framing::{path, MAX_MESSAGE_BYTES};

/// The handshake's protocol field of a plugin speaking this protocol.
pub const PROTOCOL: &str = "mycelium-frames";

/// Environment variable in which a host offers protocols beside gRPC, comma-separated; a
/// plugin that finds [`PROTOCOL`] there may answer with it.
pub const OFFER_ENV: &str = "MYCELIUM_PLUGIN_PROTOCOLS";

/// Length of a frame's header.
pub const HEADER_BYTES: usize = 9;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Host to plugin: `Function/Execute`.
    Execute,
    /// Host to plugin: the health check.
    HealthCheck,
    /// Host to plugin: go-plugin's controller shutdown.
    Shutdown,
    /// Host to plugin: the stdio stream (answered with items).
    StreamStdio,
    /// Plugin to host: a call's answer, which ends it.
    Reply,
    /// Plugin to host: one message of a stream.
    Item,
    /// Plugin to host: a call failed, with a gRPC status code and message; ends it.
    Status,
}

impl Kind {
    /// The frame kind that calls the gRPC method at `path`, if this protocol has it.
    pub fn of_method(method: &str) -> Option<Self> {
        Some(match method {
            path::EXECUTE => Self::Execute,
            path::HEALTH_CHECK => Self::HealthCheck,
            path::SHUTDOWN => Self::Shutdown,
            path::STREAM_STDIO => Self::StreamStdio,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        match self {
            Self::Execute => 1,
            Self::HealthCheck => 2,
            Self::Shutdown => 3,
            Self::StreamStdio => 4,
            Self::Reply => 0x80,
            Self::Item => 0x81,
            Self::Status => 0x82,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Execute,
            2 => Self::HealthCheck,
            3 => Self::Shutdown,
            4 => Self::StreamStdio,
            0x80 => Self::Reply,
            0x81 => Self::Item,
            0x82 => Self::Status,
            _ => return None,
        })
    }
}

/// One frame as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is; `None` for a kind this side does not know (answer it, or skip it).
    pub kind: Option<Kind>,
    /// The call it belongs to.
    pub id: u32,
    /// The protobuf message, or for [`Kind::Status`] the status.
    pub body: Bytes,
}

/// Why the bytes read are not frames; the connection cannot go on after one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge(pub usize);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a frame of {} bytes is more than the {MAX_MESSAGE_BYTES} accepted",
            self.0
        )
    }
}

impl std::error::Error for TooLarge {}

/// Appends a frame carrying `message` to `out`.
pub fn put_message<M: prost::Message>(out: &mut BytesMut, kind: Kind, id: u32, message: &M) {
    let length = message.encoded_len();
    out.reserve(HEADER_BYTES + length);
    put_header(out, kind, id, length);
    // Cannot fail: the buffer has room for the message.
    let _ = message.encode(out);
}

/// Appends a [`Kind::Status`] frame: `code` (a gRPC status code) and `message`.
pub fn put_status(out: &mut BytesMut, id: u32, code: i32, message: &str) {
    out.reserve(HEADER_BYTES + 4 + message.len());
    put_header(out, Kind::Status, id, 4 + message.len());
    out.put_i32(code);
    out.put_slice(message.as_bytes());
}

fn put_header(out: &mut BytesMut, kind: Kind, id: u32, length: usize) {
    out.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    out.put_u8(kind.byte());
    out.put_u32(id);
}

/// The first whole frame in `buffer`, removed from it; `None` until one is complete.
pub fn take(buffer: &mut BytesMut) -> Result<Option<Frame>, TooLarge> {
    if buffer.len() < HEADER_BYTES {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
    if length > MAX_MESSAGE_BYTES {
        return Err(TooLarge(length));
    }
    if buffer.len() < HEADER_BYTES + length {
        // Room for the rest, so that it is read in as few reads as it arrives in.
        buffer.reserve(HEADER_BYTES + length - buffer.len());
        return Ok(None);
    }
    let kind = Kind::from_byte(buffer[4]);
    let id = u32::from_be_bytes([buffer[5], buffer[6], buffer[7], buffer[8]]);
    buffer.advance(HEADER_BYTES);
    Ok(Some(Frame {
        kind,
        id,
        body: buffer.split_to(length).freeze(),
    }))
}

/// The code and message of a [`Kind::Status`] frame's body.
pub fn status(mut body: Bytes) -> (i32, String) {
    if body.len() < 4 {
        return (
            13, // INTERNAL
            "the plugin sent a status frame without a code".into(),
        );
    }
    let code = body.get_i32();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Reads what the socket has into `buffer` (at least 16 KiB of room); `Ready(Ok(0))` is the
/// end of the connection.
pub fn poll_fill<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut std::task::Context<'_>,
    buffer: &mut BytesMut,
) -> std::task::Poll<std::io::Result<usize>> {
    buffer.reserve(16 * 1024);
    tokio_util::io::poll_read_buf(std::pin::Pin::new(io), cx, buffer)
}

/// Whether `offer` (the value of [`OFFER_ENV`]) includes this protocol.
pub fn offered(offer: &str) -> bool {
    offer.split(',').any(|p| p.trim() == PROTOCOL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::go_plugin::StdioData;

    #[test]
    fn frames_are_taken_whole_and_in_order() {
        let message = StdioData {
            channel: 1,
            data: b"hello".to_vec(),
        };
        let mut wire = BytesMut::new();
        put_message(&mut wire, Kind::Execute, 7, &message);
        put_status(&mut wire, 8, 5, "no such thing");
        let whole = wire.clone();
        let mut partial = BytesMut::from(&whole[..HEADER_BYTES + 3]);
        assert_eq!(take(&mut partial), Ok(None));
        assert_eq!(partial.len(), HEADER_BYTES + 3, "nothing is consumed early");

        let first = take(&mut wire).unwrap().unwrap();
        assert_eq!((first.kind, first.id), (Some(Kind::Execute), 7));
        assert_eq!(
            <StdioData as prost::Message>::decode(first.body).unwrap(),
            message
        );
        let second = take(&mut wire).unwrap().unwrap();
        assert_eq!((second.kind, second.id), (Some(Kind::Status), 8));
        assert_eq!(status(second.body), (5, "no such thing".into()));
        assert!(wire.is_empty());
        assert_eq!(take(&mut wire), Ok(None));
    }

    #[test]
    fn what_is_not_a_frame_says_why() {
        let mut huge = BytesMut::from(&b"\xff\xff\xff\xff\x80\0\0\0\x01"[..]);
        assert_eq!(take(&mut huge), Err(TooLarge(4_294_967_295)));
        let mut unknown = BytesMut::from(&b"\0\0\0\0\x42\0\0\0\x03"[..]);
        let frame = take(&mut unknown).unwrap().unwrap();
        assert_eq!((frame.kind, frame.id), (None, 3));
        assert_eq!(status(Bytes::from_static(b"\0")).0, 13);
    }

    #[test]
    fn every_method_has_a_kind_and_offers_are_lists() {
        for method in [
            path::EXECUTE,
            path::HEALTH_CHECK,
            path::SHUTDOWN,
            path::STREAM_STDIO,
        ] {
            let kind = Kind::of_method(method).unwrap();
            assert_eq!(Kind::from_byte(kind.byte()), Some(kind));
        }
        assert_eq!(Kind::of_method("/x.Y/Z"), None);
        assert!(offered("grpc, mycelium-frames"));
        assert!(!offered("mycelium-frames2"));
    }
}
