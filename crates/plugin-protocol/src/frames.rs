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
//! Calls are answered in any order. When the host gives up on a call (its deadline passed) it
//! sends [`Kind::Cancel`] with the call's id, and the plugin drops its work on it; an answer
//! already on its way is dropped by the host.

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
    /// Host to plugin: the host stopped waiting for the call with this id (its deadline
    /// passed); the plugin drops its work on it. Empty body, never answered.
    Cancel,
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
            Self::Cancel => 5,
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
            5 => Self::Cancel,
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

/// A frame whose body is over [`MAX_MESSAGE_BYTES`]: its bytes are skipped as they arrive,
/// and the call it belongs to is answered with this instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Its kind, as sent.
    pub kind: Option<Kind>,
    /// The call it belongs to.
    pub id: u32,
    /// Its body's length.
    pub length: usize,
}

impl std::fmt::Display for Oversized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the message is {} bytes, more than the {MAX_MESSAGE_BYTES} accepted",
            self.length
        )
    }
}

impl std::error::Error for Oversized {}

/// What one side has read and not yet taken as frames.
#[derive(Debug, Default)]
pub struct Reader {
    buffer: BytesMut,
    /// Bytes of an oversized frame's body still to be thrown away.
    skipping: usize,
}

impl Reader {
    /// Reads what `io` has (at least 16 KiB of room); `Ready(Ok(0))` is the end of the
    /// connection.
    pub fn poll_fill<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.buffer.reserve(16 * 1024);
        tokio_util::io::poll_read_buf(std::pin::Pin::new(io), cx, &mut self.buffer)
    }

    /// The next whole frame read, removed; `None` until one is complete.
    pub fn frame(&mut self) -> Option<Result<Frame, Oversized>> {
        if self.skipping > 0 {
            let skipped = self.skipping.min(self.buffer.len());
            self.buffer.advance(skipped);
            self.skipping -= skipped;
            if self.skipping > 0 {
                return None;
            }
        }
        if self.buffer.len() < HEADER_BYTES {
            return None;
        }
        let length = u32::from_be_bytes([
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ]) as usize;
        let kind = Kind::from_byte(self.buffer[4]);
        let id = u32::from_be_bytes([
            self.buffer[5],
            self.buffer[6],
            self.buffer[7],
            self.buffer[8],
        ]);
        if length > MAX_MESSAGE_BYTES {
            self.buffer.advance(HEADER_BYTES);
            self.skipping = length;
            return Some(Err(Oversized { kind, id, length }));
        }
        if self.buffer.len() < HEADER_BYTES + length {
            // Room for the rest, so that it is read in as few reads as it arrives in.
            self.buffer
                .reserve(HEADER_BYTES + length - self.buffer.len());
            return None;
        }
        self.buffer.advance(HEADER_BYTES);
        Some(Ok(Frame {
            kind,
            id,
            body: self.buffer.split_to(length).freeze(),
        }))
    }
}

/// Appends a frame carrying `message` to `out`.
pub fn put_message<M: prost::Message>(out: &mut BytesMut, kind: Kind, id: u32, message: &M) {
    let length = message.encoded_len();
    out.reserve(HEADER_BYTES + length);
    put_header(out, kind, id, length);
    // Cannot fail: the buffer has room for the message.
    let _ = message.encode(out);
}

/// Appends a [`Kind::Cancel`] frame for the call `id`.
pub fn put_cancel(out: &mut BytesMut, id: u32) {
    put_header(out, Kind::Cancel, id, 0);
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

/// Writes `out` until it is empty (`Ready(Ok)`) or the socket is full (`Pending`, woken when
/// there is room); what is written leaves `out`.
pub fn poll_write_out<W: tokio::io::AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut std::task::Context<'_>,
    out: &mut BytesMut,
) -> std::task::Poll<std::io::Result<()>> {
    use std::task::Poll;
    while !out.is_empty() {
        match std::pin::Pin::new(&mut *io).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            Poll::Ready(Ok(written)) => out.advance(written),
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(()))
}

/// Whether `offer` (the value of [`OFFER_ENV`]) includes this protocol.
pub fn offered(offer: &str) -> bool {
    offer.split(',').any(|p| p.trim() == PROTOCOL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::go_plugin::StdioData;

    fn reader(bytes: &[u8]) -> Reader {
        Reader {
            buffer: BytesMut::from(bytes),
            skipping: 0,
        }
    }

    #[test]
    fn frames_are_taken_whole_and_in_order() {
        let message = StdioData {
            channel: 1,
            data: b"hello".to_vec(),
        };
        let mut wire = BytesMut::new();
        put_message(&mut wire, Kind::Execute, 7, &message);
        put_status(&mut wire, 8, 5, "no such thing");
        let mut partial = reader(&wire[..HEADER_BYTES + 3]);
        assert_eq!(partial.frame(), None);
        assert_eq!(
            partial.buffer.len(),
            HEADER_BYTES + 3,
            "nothing is consumed early"
        );

        let mut whole = reader(&wire);
        let first = whole.frame().unwrap().unwrap();
        assert_eq!((first.kind, first.id), (Some(Kind::Execute), 7));
        assert_eq!(
            <StdioData as prost::Message>::decode(first.body).unwrap(),
            message
        );
        let second = whole.frame().unwrap().unwrap();
        assert_eq!((second.kind, second.id), (Some(Kind::Status), 8));
        assert_eq!(status(second.body), (5, "no such thing".into()));
        assert_eq!(whole.frame(), None);
        assert!(whole.buffer.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_reported_once_and_skipped() {
        let length = MAX_MESSAGE_BYTES + 1;
        let mut wire = BytesMut::new();
        put_header(&mut wire, Kind::Reply, 3, length);
        wire.extend_from_slice(&vec![7; 1000]);
        let mut oversized = reader(&wire);
        assert_eq!(
            oversized.frame(),
            Some(Err(Oversized {
                kind: Some(Kind::Reply),
                id: 3,
                length
            }))
        );
        assert_eq!(oversized.frame(), None);
        // The rest of its body arrives, then the next frame.
        oversized.buffer.extend_from_slice(&vec![7; length - 1000]);
        put_status(&mut oversized.buffer, 4, 0, "");
        let next = oversized.frame().unwrap().unwrap();
        assert_eq!((next.kind, next.id), (Some(Kind::Status), 4));
        assert_eq!(oversized.frame(), None);

        let mut unknown = reader(b"\0\0\0\0\x42\0\0\0\x03");
        let frame = unknown.frame().unwrap().unwrap();
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
        assert_eq!(Kind::from_byte(Kind::Cancel.byte()), Some(Kind::Cancel));
        let mut cancel = BytesMut::new();
        put_cancel(&mut cancel, 9);
        let frame = reader(&cancel).frame().unwrap().unwrap();
        assert_eq!(
            (frame.kind, frame.id, frame.body.len()),
            (Some(Kind::Cancel), 9, 0)
        );
        assert!(offered("grpc, mycelium-frames"));
        assert!(!offered("mycelium-frames2"));
    }
}
