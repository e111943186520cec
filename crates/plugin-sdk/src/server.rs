//! The plugin's server: go-plugin's services and Mycelium's `Function` over gRPC (HTTP/2), or
//! over Mycelium's frame protocol ([`crate::frame_server`]) when the host chose it.
//!
//! Each connection is one task that reads requests and runs each call right there; only a
//! call that has to wait (a timer, I/O) moves to a task of its own. A call that answers at
//! once costs no task spawn and no wake-up of another thread, and its answer leaves in the
//! same write as the others ready with it (BENCHMARKS.md, issue 15). The wire is plain gRPC,
//! as go-plugin's host speaks it.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    task::{Context, Wake, Waker},
};

use bytes::{Bytes, BytesMut};
use h2::{server::SendResponse, RecvStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use mycelium_plugin_protocol::{
    framing::{
        self,
        path::{EXECUTE, HEALTH_CHECK, SHUTDOWN, STREAM_STDIO},
        FrameError,
    },
    handshake::Protocol,
    proto::{
        function::ExecuteRequest,
        go_plugin::{Empty, StdioData},
    },
    socket::UnixConnection,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

use crate::{Service, Stdio};

/// What the server answers with.
pub(crate) struct Services {
    pub(crate) function: Service,
    pub(crate) shutdown: CancellationToken,
    pub(crate) stdio: Stdio,
}

/// Serves the connections `listener` accepts, in `protocol`, until shutdown is asked for.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    services: Arc<Services>,
    protocol: Protocol,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((io, _)) => {
                    match UnixConnection::new(io) {
                        Ok(io) => match protocol {
                            Protocol::Grpc => {
                                tokio::spawn(connection(io, services.clone()));
                            }
                            Protocol::Frames => {
                                tokio::spawn(crate::frame_server::connection(io, services.clone()));
                            }
                        },
                        Err(error) => {
                            tracing::warn!(%error, "registering a connection from the host failed");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection from the host failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            () = services.shutdown.cancelled() => return,
        }
    }
}

async fn connection(io: UnixConnection, services: Arc<Services>) {
    let handshake = h2::server::Builder::new()
        // Requests up to the message limit arrive without waiting for window updates.
        .initial_window_size(framing::MAX_MESSAGE_BYTES as u32)
        .initial_connection_window_size(4 * framing::MAX_MESSAGE_BYTES as u32)
        .handshake::<_, Bytes>(io)
        .await;
    let mut connection = match handshake {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "a connection from the host failed its HTTP/2 handshake");
            return;
        }
    };
    // The connection is polled with a waker of its own, so that the wake-ups h2 sends it
    // while a call runs inline here (its answer queued) can be dropped: the next turn of the
    // loop writes that answer anyway, and waking this running task would only reschedule it
    // and wake another worker thread to steal it.
    let task = Arc::new(ConnectionWaker::default());
    let waker = Waker::from(task.clone());
    // Each turn of `accept` also writes what the calls run here queued.
    while let Some(accepted) = std::future::poll_fn(|cx| {
        task.register(cx.waker());
        connection.poll_accept(&mut Context::from_waker(&waker))
    })
    .await
    {
        match accepted {
            Ok((request, respond)) => {
                RUNNING_INLINE.set(Arc::as_ptr(&task) as usize);
                let _ = run_inline_or_spawn(handle(services.clone(), request, respond), drop);
                RUNNING_INLINE.set(0);
            }
            Err(error) => {
                tracing::debug!(%error, "the connection from the host ended");
                return;
            }
        }
    }
}

thread_local! {
    /// The connection whose call runs inline on this thread right now.
    static RUNNING_INLINE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The connection task's waker, as h2 sees it.
#[derive(Default)]
struct ConnectionWaker(Mutex<Option<Waker>>);

impl ConnectionWaker {
    fn register(&self, waker: &Waker) {
        let mut task = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }
}

impl Wake for ConnectionWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if RUNNING_INLINE.get() == Arc::as_ptr(self) as usize {
            return;
        }
        if let Some(task) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Polls `work` once here and gives back its output; only if it has to wait does it get a
/// task of its own, which hands the output to `later` (and whose handle comes back instead).
pub(crate) fn run_inline_or_spawn<F>(
    work: F,
    later: impl FnOnce(F::Output) + Send + 'static,
) -> Result<F::Output, tokio::task::AbortHandle>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let mut work = Box::pin(work);
    let waker = std::task::Waker::noop();
    match work
        .as_mut()
        .poll(&mut std::task::Context::from_waker(waker))
    {
        std::task::Poll::Ready(output) => Ok(output),
        // The spawned task polls again, with its own waker, before it waits.
        std::task::Poll::Pending => {
            Err(tokio::spawn(async move { later(work.await) }).abort_handle())
        }
    }
}

async fn handle(
    services: Arc<Services>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (head, mut body) = request.into_parts();
    let path = head.uri.path();
    if path == STREAM_STDIO {
        stream_stdio(&services.stdio, respond).await;
        return;
    }
    let mut received = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else {
            // The host reset the call (its deadline passed): nobody waits for an answer.
            return;
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        if received.len() + chunk.len() > framing::MAX_MESSAGE_BYTES + 5 {
            return answer(
                respond,
                Err(Status::resource_exhausted("the request is too large")),
            );
        }
        received.extend_from_slice(&chunk);
    }
    let reply = match path {
        EXECUTE => match request_message::<ExecuteRequest>(&mut received) {
            Ok(request) => {
                // The host resets the stream when it stops waiting (the deadline passed):
                // the call's work is dropped then, which cancels its context's token too.
                let execute = services.function.execute(request, &head.headers);
                tokio::select! {
                    biased;
                    response = execute => Ok(framing::encode(&response)),
                    _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
                }
            }
            Err(status) => Err(status),
        },
        HEALTH_CHECK => request_message::<HealthCheckRequest>(&mut received)
            .map(|request| framing::encode(&health(&request))),
        SHUTDOWN => {
            services.shutdown.cancel();
            Ok(framing::encode(&Empty {}))
        }
        _ => Err(Status::unimplemented(format!(
            "this plugin offers no method {path}"
        ))),
    };
    answer(respond, reply);
}

/// The answer to a health check.
pub(crate) fn health(request: &HealthCheckRequest) -> HealthCheckResponse {
    // go-plugin's host asks about the service "plugin"; "" is the server as a whole.
    let status = if request.service.is_empty()
        || request.service == mycelium_plugin_protocol::handshake::HEALTH_SERVICE
    {
        ServingStatus::Serving
    } else {
        ServingStatus::ServiceUnknown
    };
    HealthCheckResponse {
        status: status as i32,
    }
}

/// The one message of a unary request.
fn request_message<M: prost::Message + Default>(received: &mut BytesMut) -> Result<M, Status> {
    match framing::take(received) {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(Status::invalid_argument(
            "the request carries no whole message",
        )),
        Err(error @ FrameError::Compressed) => Err(Status::unimplemented(error.to_string())),
        Err(error) => Err(Status::invalid_argument(error.to_string())),
    }
}

/// Sends a unary answer: the message then `grpc-status: 0`, or the status alone.
fn answer(mut respond: SendResponse<Bytes>, reply: Result<Bytes, Status>) {
    let message = match reply {
        Ok(message) => message,
        Err(status) => {
            let _ = respond.send_response(status.into_http(), true);
            return;
        }
    };
    let Ok(mut stream) = respond.send_response(grpc_response(), false) else {
        return;
    };
    if stream.send_data(message, false).is_ok() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let _ = stream.send_trailers(trailers);
    }
}

fn grpc_response() -> Response<()> {
    let mut response = Response::new(());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(framing::CONTENT_TYPE),
    );
    response
}

/// go-plugin's stdio stream: the captured output, chunk by chunk, for as long as the host
/// listens. Only the first request gets it.
async fn stream_stdio(stdio: &Stdio, mut respond: SendResponse<Bytes>) {
    let Some(mut chunks) = stdio.take() else {
        let status = Status::new(
            Code::FailedPrecondition,
            "the stdio stream was already taken",
        );
        let _ = respond.send_response(status.into_http(), true);
        return;
    };
    let Ok(mut stream) = respond.send_response(grpc_response(), false) else {
        return;
    };
    while let Some(chunk) = chunks.recv().await {
        if stream
            .send_data(framing::encode::<StdioData>(&chunk), false)
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_a_whole_message_is_refused() {
        let mut partial = BytesMut::from(&b"\0\0\0"[..]);
        let status = request_message::<Empty>(&mut partial).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let mut compressed = BytesMut::from(&b"\x01\0\0\0\0"[..]);
        let status = request_message::<Empty>(&mut compressed).unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
    }

    #[test]
    fn the_connection_is_not_woken_by_the_call_it_runs_inline() {
        #[derive(Default)]
        struct Counted(std::sync::atomic::AtomicUsize);
        impl Wake for Counted {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let counted = Arc::new(Counted::default());
        let connection = Arc::new(ConnectionWaker::default());
        connection.register(&Waker::from(counted.clone()));
        let waker = Waker::from(connection.clone());
        RUNNING_INLINE.set(Arc::as_ptr(&connection) as usize);
        waker.wake_by_ref();
        RUNNING_INLINE.set(0);
        assert_eq!(counted.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        waker.wake_by_ref();
        assert_eq!(counted.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn work_that_answers_at_once_is_not_spawned() {
        // No runtime here: spawning would panic, so this passes only if the work ran inline.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let ran_inline = run_inline_or_spawn(
            async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) },
            drop,
        );
        assert!(ran_inline.is_ok());
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
