//! The host's connection to one plugin process, in the protocol the plugin chose in its
//! handshake: gRPC over HTTP/2 ([`http2`], what every go-plugin plugin speaks) or Mycelium's
//! frame protocol ([`frames`], what the Rust SDK speaks when this host offers it). Both are
//! driven by the calls waiting on them ([`driver`]).

mod driver;
mod frames;
mod http2;
mod pong;
mod wire;

use std::{marker::PhantomData, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tokio::{
    net::{TcpStream, UnixStream},
    sync::mpsc,
};
use tokio_util::either::Either;
use tonic::Status;

use self::driver::BusyPoll;
pub use self::driver::BusyPoller;
use crate::{
    handshake::{Handshake, Network, Protocol},
    socket::UnixConnection,
};

/// The status of a call on a connection that ended.
fn broken(why: &dyn std::fmt::Display) -> Status {
    Status::unavailable(format!("the connection to the plugin broke: {why}"))
}

/// The socket under either protocol.
type Io = Either<UnixConnection, TcpStream>;

/// A connection to one plugin process; cheap to share between concurrent calls.
#[derive(Clone, Debug)]
pub(crate) enum PluginChannel {
    Grpc(http2::Http2Channel),
    Frames(frames::FrameChannel),
}

impl PluginChannel {
    /// Connects to the address of `handshake` and speaks the protocol it names; its calls
    /// busy-poll with `busy_poll` (over Unix sockets).
    pub(crate) async fn connect(
        handshake: &Handshake,
        busy_poll: Option<&Arc<BusyPoller>>,
    ) -> Result<Self, std::io::Error> {
        let (io, busy_poll) = match handshake.network {
            Network::Unix => {
                let connection =
                    UnixConnection::new(UnixStream::connect(&handshake.address).await?)?;
                let busy_poll = busy_poll.map(|poller| BusyPoll {
                    poller: poller.clone(),
                    eager_reads: connection.eager_reads(),
                });
                (Either::Left(connection), busy_poll)
            }
            Network::Tcp => {
                let stream = TcpStream::connect(&handshake.address).await?;
                stream.set_nodelay(true)?;
                (Either::Right(stream), None)
            }
        };
        Ok(match handshake.protocol {
            Protocol::Grpc => {
                let authority = match handshake.network {
                    Network::Tcp => handshake.address.as_str(),
                    Network::Unix => "localhost",
                };
                Self::Grpc(http2::Http2Channel::connect(io, busy_poll, authority))
            }
            Protocol::Frames => Self::Frames(frames::FrameChannel::connect(io, busy_poll)),
        })
    }

    /// Calls `path` (`/package.Service/Method`) with `message`. Over gRPC, `timeout` goes to
    /// the plugin as `grpc-timeout` and `metadata` as headers; the frame protocol carries
    /// neither (the request itself holds the deadline and the trace context). The caller
    /// enforces its own deadline by dropping the future.
    pub(crate) async fn unary<Q, R>(
        &self,
        path: &'static str,
        message: &Q,
        timeout: Duration,
        metadata: &[(HeaderName, HeaderValue)],
    ) -> Result<R, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        match self {
            Self::Grpc(channel) => channel.unary(path, message, timeout, metadata).await,
            Self::Frames(channel) => channel.unary(path, message).await,
        }
    }

    /// Calls `path` expecting a stream of messages (server streaming).
    pub(crate) async fn server_stream<Q, R>(
        &self,
        path: &'static str,
        message: &Q,
    ) -> Result<Messages<R>, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let items = match self {
            Self::Grpc(channel) => channel.server_stream(path, message).await?,
            Self::Frames(channel) => channel.server_stream(path, message)?,
        };
        Ok(Messages(items, PhantomData))
    }

    /// Whether the plugin speaks gRPC (or the frame protocol).
    pub(crate) fn protocol(&self) -> Protocol {
        match self {
            Self::Grpc(_) => Protocol::Grpc,
            Self::Frames(_) => Protocol::Frames,
        }
    }
}

/// The messages of a server-streaming answer, as the connection hands them on.
pub(crate) struct Messages<R>(mpsc::Receiver<Bytes>, PhantomData<fn() -> R>);

impl<R: prost::Message + Default> Messages<R> {
    /// The next message; `None` at the end of the stream.
    pub(crate) async fn message(&mut self) -> Result<Option<R>, Status> {
        match self.0.recv().await {
            Some(body) => R::decode(body).map(Some).map_err(|e| {
                Status::internal(format!("the plugin's message does not decode: {e}"))
            }),
            None => Ok(None),
        }
    }
}
