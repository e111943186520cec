//! Unary gRPC calls to a plugin over one HTTP/2 connection that the callers drive themselves.
//!
//! tonic's `Channel` hands each call to a `Buffer` task, hyper sends the request body from a
//! task of its own, and the connection lives in a third task: a plugin call crossed threads
//! three or four times before the plugin saw a byte, at ~20 µs per wake-up on a small VM
//! (BENCHMARKS.md, issue 15). Here a caller queues its HEADERS and DATA frames and polls the
//! connection itself, so both frames leave in one write from the caller's thread, and the
//! socket wakes a waiting caller directly when the answer arrives. A background task only
//! keeps the connection polled while no call is waiting (pings, GOAWAY, the plugin's exit).
//!
//! The wire is plain gRPC over HTTP/2, so any go-plugin server answers it unchanged.

use std::{future::poll_fn, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use h2::{client::SendRequest, RecvStream};
use http::{
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, HeaderName, HeaderValue, Method, Request, Uri,
};
use tonic::{Code, Status};

use super::{
    driver::{BusyPoll, Driver},
    pong::HeldPong,
    Io,
};
use crate::{
    framing::{self, FrameError},
    handshake::{Handshake, Network},
};

/// A connection to one plugin process; cheap to share between concurrent calls.
#[derive(Clone)]
pub(crate) struct GrpcChannel {
    send: SendRequest<Bytes>,
    driver: Arc<Driver>,
    /// Parsed once: every request's URI is this and a static path.
    authority: Authority,
}

impl std::fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl GrpcChannel {
    /// Speaks HTTP/2 over `io`, connected to the address of `handshake`, and starts the
    /// background driver.
    pub(crate) async fn connect(
        io: Io,
        busy_poll: Option<BusyPoll>,
        handshake: &Handshake,
    ) -> Result<Self, std::io::Error> {
        let (send, connection) = h2::client::Builder::new()
            // Replies up to the limit arrive without waiting for window updates.
            .initial_window_size(framing::MAX_MESSAGE_BYTES as u32)
            .initial_connection_window_size(4 * framing::MAX_MESSAGE_BYTES as u32)
            .handshake::<_, Bytes>(HeldPong::new(io))
            .await
            .map_err(std::io::Error::other)?;
        let driver = Driver::start(connection, busy_poll);
        Ok(Self {
            send,
            driver,
            authority: match handshake.network {
                Network::Tcp => handshake.address.parse().map_err(std::io::Error::other)?,
                Network::Unix => Authority::from_static("localhost"),
            },
        })
    }

    /// Calls `path` (`/package.Service/Method`) with `message`. `timeout` goes to the plugin as
    /// `grpc-timeout`; the caller enforces its own deadline by dropping the future, which
    /// resets the stream.
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
        self.driver
            .driven(async {
                let (head, mut body) = self.open(path, message, Some(timeout), metadata).await?;
                let mut reply = BytesMut::new();
                while let Some(chunk) = poll_fn(|cx| body.poll_data(cx)).await {
                    let chunk = chunk.map_err(|e| lost(&e))?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    if reply.len() + chunk.len() > framing::MAX_MESSAGE_BYTES + 5 {
                        return Err(Status::resource_exhausted(format!(
                            "the plugin's reply is larger than {} bytes",
                            framing::MAX_MESSAGE_BYTES
                        )));
                    }
                    reply.extend_from_slice(&chunk);
                }
                let trailers = poll_fn(|cx| body.poll_trailers(cx))
                    .await
                    .map_err(|e| lost(&e))?
                    .unwrap_or_default();
                check_trailers(&head, &trailers)?;
                let Some(message) = take_message(&mut reply)? else {
                    return Err(Status::internal("the plugin's answer carried no message"));
                };
                if !reply.is_empty() {
                    return Err(Status::internal(
                        "the plugin answered a unary call with more than one message",
                    ));
                }
                Ok(message)
            })
            .await
    }

    /// Calls `path` expecting a stream of messages (server streaming). The stream does not
    /// drive the connection: the calls and the background task do.
    pub(crate) async fn server_stream<Q, R>(
        &self,
        path: &'static str,
        message: &Q,
    ) -> Result<Messages<R>, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let (_, body) = self
            .driver
            .driven(self.open(path, message, None, &[]))
            .await?;
        Ok(Messages {
            body,
            buffer: BytesMut::new(),
            ended: false,
            message: std::marker::PhantomData,
        })
    }

    /// Sends the request and waits for the answer's head.
    async fn open<Q: prost::Message>(
        &self,
        path: &'static str,
        message: &Q,
        timeout: Option<Duration>,
        metadata: &[(HeaderName, HeaderValue)],
    ) -> Result<(http::response::Parts, RecvStream), Status> {
        let mut send = self.send.clone();
        poll_fn(|cx| send.poll_ready(cx))
            .await
            .map_err(|e| lost(&e))?;
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::from_static(path))
            .build()
            .map_err(|e| Status::internal(format!("building the request: {e}")))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, framing::CONTENT_TYPE)
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|e| Status::internal(format!("building the request: {e}")))?;
        let headers = request.headers_mut();
        if let Some(timeout) = timeout {
            if let Ok(value) = HeaderValue::from_str(&framing::timeout_header(timeout)) {
                headers.insert("grpc-timeout", value);
            }
        }
        for (name, value) in metadata {
            headers.insert(name.clone(), value.clone());
        }
        // Both frames are queued before the connection is polled: they leave in one write.
        let (response, mut stream) = send.send_request(request, false).map_err(|e| lost(&e))?;
        stream
            .send_data(framing::encode(message), true)
            .map_err(|e| lost(&e))?;
        let (head, body) = response.await.map_err(|e| lost(&e))?.into_parts();
        // A "trailers-only" answer carries the status in its headers and has no body.
        if let Some(status) = Status::from_header_map(&head.headers) {
            if status.code() != Code::Ok {
                return Err(status);
            }
        }
        if head.status != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "the plugin answered HTTP status {}",
                head.status
            )));
        }
        Ok((head, body))
    }
}

/// The status at the end of an answer: in its trailers, or in its head for trailers-only.
fn check_trailers(head: &http::response::Parts, trailers: &HeaderMap) -> Result<(), Status> {
    match Status::from_header_map(trailers) {
        Some(status) if status.code() != Code::Ok => Err(status),
        Some(_) => Ok(()),
        None if head.headers.contains_key("grpc-status") => Ok(()),
        None => Err(Status::internal(
            "the plugin's answer ended without a gRPC status",
        )),
    }
}

/// The first whole message in `buffer`, as a gRPC status when it cannot be taken.
fn take_message<R: prost::Message + Default>(buffer: &mut BytesMut) -> Result<Option<R>, Status> {
    framing::take(buffer).map_err(|e| match e {
        FrameError::Compressed => Status::unimplemented(format!("the plugin's answer: {e}")),
        FrameError::TooLarge(_) => Status::resource_exhausted(format!("the plugin's answer: {e}")),
        FrameError::Decode(_) => Status::internal(format!("the plugin's answer: {e}")),
    })
}

/// The messages of a server-streaming answer.
pub(crate) struct Messages<R> {
    body: RecvStream,
    buffer: BytesMut,
    ended: bool,
    message: std::marker::PhantomData<fn() -> R>,
}

impl<R: prost::Message + Default> Messages<R> {
    /// The next message; `None` at the end of the stream.
    pub(crate) async fn message(&mut self) -> Result<Option<R>, Status> {
        loop {
            if let Some(message) = take_message(&mut self.buffer)? {
                return Ok(Some(message));
            }
            if self.ended {
                return Ok(None);
            }
            match poll_fn(|cx| self.body.poll_data(cx)).await {
                Some(chunk) => {
                    let chunk = chunk.map_err(|e| lost(&e))?;
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.buffer.extend_from_slice(&chunk);
                }
                None => self.ended = true,
            }
        }
    }
}

/// The gRPC `Status` of a broken connection or stream.
fn lost(error: &h2::Error) -> Status {
    if error.is_reset() && error.reason() == Some(h2::Reason::CANCEL) {
        Status::cancelled(format!("the plugin cancelled the call: {error}"))
    } else {
        super::broken(error)
    }
}
