//! gRPC's framing over HTTP/2, as the host's client and the SDK's server both write it: each
//! message is a compressed flag, a four-byte big-endian length and the protobuf bytes; the
//! deadline travels as `grpc-timeout`.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest message accepted, gRPC's default receive limit.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// `application/grpc`, the content type of every request and answer.
pub const CONTENT_TYPE: &str = "application/grpc";

/// The methods' paths (`/package.Service/Method`) the host calls and plugins serve.
pub mod path {
    /// Mycelium's function call.
    pub const EXECUTE: &str = "/mycelium.function.v1.Function/Execute";
    /// gRPC's health check, asked about go-plugin's service "plugin".
    pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    /// go-plugin's graceful shutdown.
    pub const SHUTDOWN: &str = "/plugin.GRPCController/Shutdown";
    /// go-plugin's (>= 1.2) stream of the plugin's stdout and stderr.
    pub const STREAM_STDIO: &str = "/plugin.GRPCStdio/StreamStdio";
}

/// Why a framed message could not be taken.
#[derive(Debug)]
pub enum FrameError {
    /// The peer compressed it, which was never offered.
    Compressed,
    /// Its length is over [`MAX_MESSAGE_BYTES`].
    TooLarge(usize),
    /// The bytes are not the expected message.
    Decode(prost::DecodeError),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Compressed => f.write_str("the message is compressed, which was not offered"),
            Self::TooLarge(length) => write!(
                f,
                "the message is {length} bytes, more than the {MAX_MESSAGE_BYTES} accepted"
            ),
            Self::Decode(error) => write!(f, "the message does not decode: {error}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Decode(error) => Some(error),
            _ => None,
        }
    }
}

/// `message` framed, ready to send as DATA.
pub fn encode<M: prost::Message>(message: &M) -> Bytes {
    let length = message.encoded_len();
    let mut framed = BytesMut::with_capacity(5 + length);
    framed.put_u8(0);
    framed.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    // Cannot fail: the buffer was sized for the message.
    let _ = message.encode(&mut framed);
    framed.freeze()
}

/// The first whole message in `buffer`, removed from it; `None` until one is complete.
pub fn take<M: prost::Message + Default>(buffer: &mut BytesMut) -> Result<Option<M>, FrameError> {
    take_raw(buffer)?
        .map(|message| M::decode(message).map_err(FrameError::Decode))
        .transpose()
}

/// The first whole message's bytes in `buffer`, removed from it; `None` until one is complete.
pub fn take_raw(buffer: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer[0] != 0 {
        return Err(FrameError::Compressed);
    }
    if length > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge(length));
    }
    if buffer.len() < 5 + length {
        return Ok(None);
    }
    buffer.advance(5);
    Ok(Some(buffer.split_to(length).freeze()))
}

/// `grpc-timeout` for `timeout`: at most eight digits and a unit.
pub fn timeout_header(timeout: Duration) -> String {
    let millis = timeout.as_millis().max(1);
    if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::go_plugin::StdioData;

    #[test]
    fn messages_are_taken_whole() {
        let message = StdioData {
            channel: 2,
            data: b"hello".to_vec(),
        };
        let whole = BytesMut::from(&encode(&message)[..]);
        let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(take::<StdioData>(&mut partial).unwrap(), None);
        assert_eq!(partial.len(), whole.len() - 1, "nothing is consumed early");
        let mut two = whole.clone();
        two.extend_from_slice(&whole);
        assert_eq!(take(&mut two).unwrap(), Some(message.clone()));
        assert_eq!(take(&mut two).unwrap(), Some(message));
        assert!(two.is_empty());
    }

    #[test]
    fn what_cannot_be_taken_says_why() {
        let mut compressed = BytesMut::from(&b"\x01\0\0\0\0"[..]);
        assert!(matches!(
            take::<StdioData>(&mut compressed),
            Err(FrameError::Compressed)
        ));
        let mut huge = BytesMut::from(&b"\0\xff\xff\xff\xff"[..]);
        assert!(matches!(
            take::<StdioData>(&mut huge),
            Err(FrameError::TooLarge(4_294_967_295))
        ));
        let mut garbage = BytesMut::from(&b"\0\0\0\0\x02\xff\xff"[..]);
        assert!(matches!(
            take::<StdioData>(&mut garbage),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn timeouts_fit_grpc_syntax() {
        assert_eq!(timeout_header(Duration::from_millis(1500)), "1500m");
        assert_eq!(timeout_header(Duration::ZERO), "1m");
        assert_eq!(timeout_header(Duration::from_secs(200_000)), "200000S");
    }
}
