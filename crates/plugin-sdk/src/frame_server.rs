//! The plugin's server for Mycelium's frame protocol (`mycelium_plugin_protocol::frames`):
//! the same services as the gRPC server, without HTTP/2.
//!
//! One task per connection reads every frame the socket has, runs each call right there, and
//! writes the answers of all of them in one write. A call that has to wait gets a task of its
//! own, which queues its answer and wakes the connection's task to write it.

use std::{
    future::poll_fn,
    sync::{Arc, Mutex},
    task::{Poll, Waker},
};

use bytes::{Bytes, BytesMut};
use mycelium_plugin_protocol::{
    frames::{self, Frame, Kind},
    proto::{
        function::{ExecuteRequest, ExecuteResponse},
        go_plugin::{Empty, StdioData},
    },
    socket::UnixConnection,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;

use crate::server::{health, run_inline_or_spawn, Services};

/// Answers queued for the connection's next write, and who writes them.
#[derive(Default)]
struct Outbox {
    frames: Mutex<(BytesMut, Option<Waker>)>,
}

impl Outbox {
    /// Queues frames from a call that ran elsewhere, and wakes the connection's task.
    fn send(&self, frames: &[u8]) {
        let waker = {
            let mut outbox = self.frames.lock().unwrap_or_else(|e| e.into_inner());
            outbox.0.extend_from_slice(frames);
            outbox.1.clone()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The calls of a connection that run on tasks of their own, by id, so that the host can cancel
/// them. Only this connection's task touches it; finished ones are swept as it grows.
#[derive(Default)]
struct Running {
    tasks: std::collections::HashMap<u32, tokio::task::AbortHandle>,
    /// Size after the last sweep: the next sweep comes when it has doubled.
    swept: usize,
}

impl Running {
    fn insert(&mut self, id: u32, task: tokio::task::AbortHandle) {
        if self.tasks.len() >= (2 * self.swept).max(64) {
            self.tasks.retain(|_, task| !task.is_finished());
            self.swept = self.tasks.len();
        }
        self.tasks.insert(id, task);
    }

    fn remove(&mut self, id: u32) -> Option<tokio::task::AbortHandle> {
        self.tasks.remove(&id)
    }
}

/// Serves one connection from the host until it closes.
pub(crate) async fn connection(mut io: UnixConnection, services: Arc<Services>) {
    let outbox = Arc::new(Outbox::default());
    let mut read = frames::Reader::default();
    let mut running = Running::default();
    // What is being written; refilled from the outbox when empty.
    let mut writing = BytesMut::new();
    let ended = poll_fn(|cx| loop {
        {
            let mut queued = outbox.frames.lock().unwrap_or_else(|e| e.into_inner());
            if !queued.1.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                queued.1 = Some(cx.waker().clone());
            }
            if writing.is_empty() {
                std::mem::swap(&mut writing, &mut queued.0);
            }
        }
        let mut progressed = false;
        match read.poll_fill(&mut io, cx) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(_)) => {
                progressed = true;
                while let Some(frame) = read.frame() {
                    match frame {
                        Ok(frame) => {
                            call(frame, &services, &outbox, &mut writing, &mut running);
                        }
                        Err(oversized) => frames::put_status(
                            &mut writing,
                            oversized.id,
                            Code::ResourceExhausted as i32,
                            &format!("the request: {oversized}"),
                        ),
                    }
                }
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error.to_string())),
            Poll::Pending => {}
        }
        if let Poll::Ready(Err(error)) = frames::poll_write_out(&mut io, cx, &mut writing) {
            return Poll::Ready(Err(error.to_string()));
        }
        if !progressed {
            return Poll::Pending;
        }
    })
    .await;
    if let Err(error) = ended {
        tracing::debug!(%error, "the connection from the host ended");
    }
}

/// Runs one call: inline, its answer going out with this turn's write, or on a task of its own
/// if it has to wait.
fn call(
    frame: Frame,
    services: &Arc<Services>,
    outbox: &Arc<Outbox>,
    writing: &mut BytesMut,
    running: &mut Running,
) {
    let Frame { kind, id, body } = frame;
    match kind {
        Some(Kind::Execute) => {
            let outbox = outbox.clone();
            let later = move |answer| {
                let mut frame = BytesMut::new();
                put_answer(&mut frame, id, &answer);
                outbox.send(&frame);
            };
            match run_inline_or_spawn(execute(services.clone(), body), later) {
                Ok(answer) => put_answer(writing, id, &answer),
                Err(task) => running.insert(id, task),
            }
        }
        Some(Kind::Cancel) => {
            // Dropping the call's future cancels its context's token too. A call that has
            // answered already (or ran inline) is not there, or its task is finished.
            if let Some(task) = running.remove(id) {
                task.abort();
            }
        }
        Some(Kind::HealthCheck) => match decode::<HealthCheckRequest>(body) {
            Ok(request) => frames::put_message(writing, Kind::Reply, id, &health(&request)),
            Err(message) => frames::put_status(writing, id, Code::InvalidArgument as i32, &message),
        },
        Some(Kind::Shutdown) => {
            services.shutdown.cancel();
            frames::put_message(writing, Kind::Reply, id, &Empty {});
        }
        Some(Kind::StreamStdio) => match services.stdio.take() {
            Some(mut chunks) => {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    let mut frame = BytesMut::new();
                    while let Some(chunk) = chunks.recv().await {
                        frame.clear();
                        frames::put_message::<StdioData>(&mut frame, Kind::Item, id, &chunk);
                        outbox.send(&frame);
                    }
                });
            }
            None => frames::put_status(
                writing,
                id,
                Code::FailedPrecondition as i32,
                "the stdio stream was already taken",
            ),
        },
        Some(Kind::Reply | Kind::Item | Kind::Status) | None => frames::put_status(
            writing,
            id,
            Code::Unimplemented as i32,
            "this plugin does not know that kind of frame",
        ),
    }
}

async fn execute(services: Arc<Services>, body: Bytes) -> Result<ExecuteResponse, String> {
    let request = decode::<ExecuteRequest>(body)?;
    Ok(services
        .function
        .execute(request, &http::HeaderMap::new())
        .await)
}

fn put_answer(out: &mut BytesMut, id: u32, answer: &Result<ExecuteResponse, String>) {
    match answer {
        Ok(response) => frames::put_message(out, Kind::Reply, id, response),
        Err(message) => frames::put_status(out, id, Code::InvalidArgument as i32, message),
    }
}

fn decode<M: prost::Message + Default>(body: Bytes) -> Result<M, String> {
    M::decode(body).map_err(|e| format!("the request does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_calls_are_swept_as_the_table_grows() {
        let mut running = Running::default();
        for id in 0..64 {
            let task = tokio::spawn(async {});
            let handle = task.abort_handle();
            task.await.unwrap();
            running.insert(id, handle);
        }
        assert_eq!(running.tasks.len(), 64, "no sweep below 64");
        let waiting = tokio::spawn(std::future::pending::<()>());
        running.insert(64, waiting.abort_handle());
        assert_eq!(running.tasks.len(), 1, "the 64 finished ones went");
        running.remove(64).unwrap().abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
    }
}
