//! Calls to a plugin in Mycelium's frame protocol (`crate::frames`): the gRPC channel's calls
//! and messages without HTTP/2, over a connection the callers drive the same way.
//!
//! A call appends its request frame to the connection's outgoing bytes and waits for the
//! answer with its id; whoever polls the connection writes what is queued and hands each
//! answer read to its call.

use std::{
    collections::HashMap,
    future::poll_fn,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use bytes::{Bytes, BytesMut};
use tokio::{io::AsyncRead, sync::mpsc};
use tonic::{Code, Status};

use super::{
    broken,
    driver::{BusyPoll, Driver},
    wire::{self, Connection, Wire},
    Io,
};
use crate::frames::{self, Frame, Kind};

/// How many stdio chunks may wait for the relay before more are dropped.
const STREAM_BACKLOG: usize = 1024;

/// A connection to one plugin process; cheap to share between concurrent calls.
#[derive(Clone)]
pub(crate) struct FrameChannel {
    shared: Arc<Shared>,
    driver: Arc<Driver>,
}

impl std::fmt::Debug for FrameChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameChannel").finish_non_exhaustive()
    }
}

/// What the callers and the connection share.
#[derive(Default)]
struct Shared(Mutex<State>);

#[derive(Default)]
struct State {
    /// Frames queued for the next write.
    out: BytesMut,
    calls: HashMap<u32, Call>,
    next_id: u32,
    /// Why the connection ended, once it has.
    closed: Option<String>,
    /// The connection's waker: told when frames are queued.
    connection: Option<Waker>,
}

enum Call {
    /// A unary call, and its answer once it came.
    Unary {
        answer: Option<Result<Bytes, Status>>,
        waker: Option<Waker>,
    },
    /// A stream's messages go to its reader.
    Stream {
        items: mpsc::Sender<Bytes>,
        dropped: usize,
    },
}

impl Call {
    /// Gives a unary call its answer and wakes it; `false` for a stream.
    fn answer(&mut self, result: Result<Bytes, Status>) -> bool {
        let Self::Unary { answer, waker } = self else {
            return false;
        };
        *answer = Some(result);
        if let Some(waker) = waker.take() {
            waker.wake();
        }
        true
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request and registers its call; the connection is asked to write it.
    fn start<M: prost::Message>(&self, kind: Kind, message: &M, call: Call) -> Result<u32, Status> {
        let (id, connection) = {
            let mut state = self.lock();
            if let Some(why) = &state.closed {
                return Err(broken(why));
            }
            // Ids wrap after 2^32 calls; one still in use (the stdio stream's) is skipped.
            let mut id = state.next_id;
            while state.calls.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            state.next_id = id.wrapping_add(1);
            frames::put_message(&mut state.out, kind, id, message);
            state.calls.insert(id, call);
            (id, state.connection.clone())
        };
        if let Some(connection) = connection {
            connection.wake();
        }
        Ok(id)
    }

    fn poll_answer(&self, id: u32, cx: &mut Context<'_>) -> Poll<Result<Bytes, Status>> {
        let mut state = self.lock();
        let closed = state.closed.clone();
        let Some(Call::Unary { answer, waker }) = state.calls.get_mut(&id) else {
            return Poll::Ready(Err(Status::internal("the call was forgotten")));
        };
        if let Some(answer) = answer.take() {
            state.calls.remove(&id);
            return Poll::Ready(answer);
        }
        if let Some(why) = closed {
            state.calls.remove(&id);
            return Poll::Ready(Err(broken(&why)));
        }
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Hands a frame from the plugin to its call.
    fn hand_on(state: &mut State, frame: Frame) {
        let Some(call) = state.calls.get_mut(&frame.id) else {
            // A call the host gave up on (its deadline passed).
            return;
        };
        match (frame.kind, call) {
            (Some(Kind::Reply), call @ Call::Unary { .. }) => {
                call.answer(Ok(frame.body));
            }
            (Some(Kind::Status), call @ Call::Unary { .. }) => {
                let (code, message) = frames::status(frame.body);
                call.answer(Err(Status::new(Code::from_i32(code), message)));
            }
            (Some(Kind::Item), Call::Stream { items, dropped }) => {
                match items.try_send(frame.body) {
                    Ok(()) if *dropped > 0 => {
                        tracing::warn!(
                            chunks = *dropped,
                            "a plugin's output came faster than it was logged; chunks were dropped"
                        );
                        *dropped = 0;
                    }
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => *dropped += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        state.calls.remove(&frame.id);
                    }
                }
            }
            (Some(Kind::Status), Call::Stream { .. }) => {
                // The stream ended; its reader sees the end when the sender drops.
                state.calls.remove(&frame.id);
            }
            (kind, _) => {
                tracing::debug!(
                    ?kind,
                    id = frame.id,
                    "a plugin sent a frame that fits no call"
                );
            }
        }
    }

    /// Fails the call of a frame too large to take (its bytes are skipped).
    fn refuse(state: &mut State, oversized: &frames::Oversized) {
        let refused = Status::resource_exhausted(format!("the plugin's answer: {oversized}"));
        let answered = state
            .calls
            .get_mut(&oversized.id)
            .is_some_and(|call| call.answer(Err(refused)));
        if !answered {
            tracing::warn!(%oversized, "a plugin sent a stream message too large to take; skipped");
        }
    }
}

/// Forgets a call whose caller stopped waiting, and tells the plugin to drop its work on it;
/// its answer, if it comes anyway, is dropped.
struct Forget<'a>(&'a Shared, u32);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let connection = {
            let mut state = self.0.lock();
            let unanswered = matches!(
                state.calls.remove(&self.1),
                Some(Call::Unary { answer: None, .. })
            );
            if !unanswered || state.closed.is_some() {
                return;
            }
            frames::put_cancel(&mut state.out, self.1);
            state.connection.clone()
        };
        if let Some(connection) = connection {
            connection.wake();
        }
    }
}

impl FrameChannel {
    /// Speaks the frame protocol over `io`, and starts the background driver.
    pub(crate) fn connect(io: Io, busy_poll: Option<BusyPoll>) -> Self {
        let shared = Arc::new(Shared::default());
        let connection = Connection {
            io,
            wire: shared.clone(),
            reader: frames::Reader::default(),
            writing: BytesMut::new(),
        };
        let driver = Driver::start(connection, busy_poll);
        Self { shared, driver }
    }

    /// Calls the method at `path` (gRPC's path names it) with `message`. The deadline travels
    /// inside the request; the caller enforces its own by dropping the future.
    pub(crate) async fn unary<Q, R>(&self, path: &'static str, message: &Q) -> Result<R, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let kind = kind(path)?;
        self.driver
            .driven(async {
                let unary = Call::Unary {
                    answer: None,
                    waker: None,
                };
                let id = self.shared.start(kind, message, unary)?;
                let _forget = Forget(&self.shared, id);
                let body = poll_fn(|cx| self.shared.poll_answer(id, cx)).await?;
                R::decode(body).map_err(|e| {
                    Status::internal(format!("the plugin's answer does not decode: {e}"))
                })
            })
            .await
    }

    /// Calls the method at `path` expecting a stream of messages, read from the receiver. The
    /// background task drives the connection while no call does.
    pub(crate) fn server_stream<Q: prost::Message>(
        &self,
        path: &'static str,
        message: &Q,
    ) -> Result<mpsc::Receiver<Bytes>, Status> {
        let (items, receiver) = mpsc::channel(STREAM_BACKLOG);
        self.shared
            .start(kind(path)?, message, Call::Stream { items, dropped: 0 })?;
        Ok(receiver)
    }
}

fn kind(path: &str) -> Result<Kind, Status> {
    Kind::of_method(path)
        .ok_or_else(|| Status::unimplemented(format!("the frame protocol has no method {path}")))
}

impl Wire for Shared {
    type Reader = frames::Reader;

    fn poll_fill<T: AsyncRead + Unpin>(
        reader: &mut frames::Reader,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        reader.poll_fill(io, cx)
    }

    fn take_queued(&self, waker: &Waker, writing: &mut BytesMut) {
        let state = &mut *self.lock();
        wire::take_queued(&mut state.connection, &mut state.out, waker, writing);
    }

    fn deliver(&self, reader: &mut frames::Reader) -> Result<(), String> {
        let mut state = self.lock();
        while let Some(frame) = reader.frame() {
            match frame {
                Ok(frame) => Self::hand_on(&mut state, frame),
                Err(oversized) => Self::refuse(&mut state, &oversized),
            }
        }
        Ok(())
    }

    fn close(&self, why: String) {
        let mut state = self.lock();
        state.closed = Some(why);
        for call in state.calls.values_mut() {
            if let Call::Unary {
                waker: Some(waker), ..
            } = call
            {
                waker.wake_by_ref();
            }
        }
        state
            .calls
            .retain(|_, call| matches!(call, Call::Unary { .. }));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    use tokio::io::AsyncWriteExt;
    use tokio_util::either::Either;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::*;
    use crate::{framing::path, socket::UnixConnection};

    fn health(service: &str) -> HealthCheckRequest {
        HealthCheckRequest {
            service: service.into(),
        }
    }

    /// The plugin's end of the connection, played by the test.
    struct Peer {
        socket: tokio::net::UnixStream,
        reader: frames::Reader,
    }

    impl Peer {
        /// The next `count` frames from the host: kind, id, and a health check's service.
        async fn read(&mut self, count: usize) -> Vec<(Kind, u32, String)> {
            let mut read = Vec::new();
            while read.len() < count {
                if let Some(frame) = self.reader.frame() {
                    let frame = frame.unwrap();
                    let kind = frame.kind.unwrap();
                    let service = match kind {
                        Kind::HealthCheck => {
                            <HealthCheckRequest as prost::Message>::decode(frame.body)
                                .unwrap()
                                .service
                        }
                        _ => String::new(),
                    };
                    read.push((kind, frame.id, service));
                    continue;
                }
                let got = poll_fn(|cx| self.reader.poll_fill(&mut self.socket, cx))
                    .await
                    .unwrap();
                assert!(got > 0, "the host closed the connection");
            }
            read
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_find_their_calls_in_any_order_and_late_ones_are_dropped() {
        let (host, socket) = tokio::net::UnixStream::pair().unwrap();
        let mut peer = Peer {
            socket,
            reader: frames::Reader::default(),
        };
        let channel = FrameChannel::connect(Either::Left(UnixConnection::new(host).unwrap()), None);
        let call = |service: &'static str| {
            let channel = channel.clone();
            tokio::spawn(async move {
                channel
                    .unary::<_, HealthCheckResponse>(path::HEALTH_CHECK, &health(service))
                    .await
            })
        };
        let (first, second) = (call("first"), call("second"));
        let mut requests = peer.read(2).await;
        // A call the host gives up on is cancelled.
        let given_up_request = health("given-up");
        let given_up = tokio::time::timeout(
            Duration::from_millis(1),
            channel.unary::<_, HealthCheckResponse>(path::HEALTH_CHECK, &given_up_request),
        );
        assert!(given_up.await.is_err(), "nobody answered it");
        let [(Kind::HealthCheck, given_up_id, _), (Kind::Cancel, cancelled, _)] =
            peer.read(2).await[..]
        else {
            panic!("expected the given-up call and its cancellation");
        };
        assert_eq!(cancelled, given_up_id);
        requests.push((Kind::HealthCheck, given_up_id, "given-up".into()));
        let mut answers = BytesMut::new();
        // Answered last first, the given-up call included: its answer goes nowhere.
        for (_, id, service) in requests.iter().rev() {
            let status = match service.as_str() {
                "first" => 1,
                "second" => 2,
                _ => 3,
            };
            frames::put_message(
                &mut answers,
                Kind::Reply,
                *id,
                &HealthCheckResponse { status },
            );
        }
        peer.socket.write_all(&answers).await.unwrap();
        assert_eq!(first.await.unwrap().unwrap().status, 1);
        assert_eq!(second.await.unwrap().unwrap().status, 2);

        // A failed call's status arrives as one; an answered call is not cancelled.
        let failing = call("failing");
        let [(Kind::HealthCheck, id, _)] = peer.read(1).await[..] else {
            panic!("expected one health check");
        };
        let mut status = BytesMut::new();
        frames::put_status(&mut status, id, Code::NotFound as i32, "no such service");
        peer.socket.write_all(&status).await.unwrap();
        let refused = failing.await.unwrap().unwrap_err();
        assert_eq!(
            (refused.code(), refused.message()),
            (Code::NotFound, "no such service")
        );

        // The plugin goes away: the waiting call and every later one fail at once.
        let waiting = call("waiting");
        assert_eq!(
            peer.read(1).await[0].0,
            Kind::HealthCheck,
            "no cancel came first"
        );
        drop(peer);
        let broken = waiting.await.unwrap().unwrap_err();
        assert_eq!(broken.code(), Code::Unavailable, "{broken}");
        let later = call("later").await.unwrap().unwrap_err();
        assert_eq!(later.code(), Code::Unavailable, "{later}");
    }

    /// Makes one call on a connection whose host busy-polls, the plugin's end answering in
    /// two writes: the second once `then` returns, run on a thread of its own with the host's
    /// eager-reads switch. Gives back the answer's status.
    async fn answered_in_two_writes(
        budget: Duration,
        then: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> i32 {
        let (host, socket) = tokio::net::UnixStream::pair().unwrap();
        let host = UnixConnection::new(host).unwrap();
        let eager_reads = host.eager_reads();
        let busy_poll = BusyPoll {
            poller: super::super::BusyPoller::new(budget).unwrap(),
            eager_reads: eager_reads.clone(),
        };
        let channel = FrameChannel::connect(Either::Left(host), Some(busy_poll));
        let mut peer = Peer {
            socket,
            reader: frames::Reader::default(),
        };
        let plugin = tokio::spawn(async move {
            let [(Kind::HealthCheck, id, _)] = peer.read(1).await[..] else {
                panic!("expected one health check");
            };
            let mut answer = BytesMut::new();
            let status = HealthCheckResponse { status: 1 };
            frames::put_message(&mut answer, Kind::Reply, id, &status);
            peer.socket.write_all(&answer[..4]).await.unwrap();
            // A thread of its own, not a blocking task: the runtime does not wait for it at
            // the end of a failed test.
            let (done, waited) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                then(&eager_reads);
                let _ = done.send(());
            });
            waited.await.unwrap();
            peer.socket.write_all(&answer[4..]).await.unwrap();
            // Open until the call is done.
            peer
        });
        // Polled here, off the runtime's workers, which the plugin's end keeps.
        let answer = tokio::time::timeout(
            Duration::from_secs(60),
            channel.unary::<_, HealthCheckResponse>(path::HEALTH_CHECK, &health("")),
        )
        .await
        .expect("the call is answered");
        drop(plugin.await.unwrap());
        answer.unwrap().status
    }

    fn wait_for(flag: &AtomicBool, value: bool) {
        while flag.load(Ordering::Relaxed) != value {
            std::thread::yield_now();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_woken_with_part_of_its_answer_reads_the_rest_while_it_spins() {
        // The rest comes only while the host reads without waiting for the reactor: without
        // the spin the call would wait for ever.
        let status =
            answered_in_two_writes(Duration::from_secs(30), |eager| wait_for(eager, true)).await;
        assert_eq!(status, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_whose_answer_comes_after_its_spin_is_woken_for_it() {
        let status = answered_in_two_writes(Duration::from_millis(200), |eager| {
            wait_for(eager, true);
            wait_for(eager, false);
        })
        .await;
        assert_eq!(status, 1);
    }
}
