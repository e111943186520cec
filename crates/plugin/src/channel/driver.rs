//! Connections that the calls waiting on them drive themselves.
//!
//! A call polls the connection it waits on (writing what it queued, reading what came back)
//! instead of leaving that to a connection task on another thread: its request leaves from
//! the caller's thread in one write, and the socket wakes a waiting call directly when the
//! answer arrives (BENCHMARKS.md, issue 15). A background task polls the connection only
//! while no call waits (pings, the plugin's stdio stream, its exit). Both the gRPC channel's
//! HTTP/2 connection and the frame protocol's connection are driven this way.

use std::{
    fmt::Display,
    future::{poll_fn, Future},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

/// A call waiting on the connection.
struct Waiter {
    id: u64,
    waker: Waker,
    /// Woken for the connection since it last polled it: a call that ends in this state
    /// hands the wake-up on, or the connection would stall until the next call.
    woken: bool,
}

/// The waiting calls, newest last, and the next call's id.
#[derive(Default)]
struct Waiters {
    list: Vec<Waiter>,
    next_id: u64,
}

/// A connection, as a future that ends with it.
type Connection = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A connection and who is waiting on it.
pub(crate) struct Driver {
    connection: Mutex<Option<Connection>>,
    /// Set by every caller that wants the connection polled; whoever holds the connection
    /// polls again while it is set, so a caller that finds it busy loses no wake-up.
    poke: AtomicBool,
    /// Calls waiting on an answer: the socket wakes one of them, which then polls the
    /// connection for everybody (the connection wakes each call's own task when its answer
    /// arrives).
    waiters: Mutex<Waiters>,
    /// The background task, woken when no call waits.
    background: Mutex<Option<Waker>>,
    closed: AtomicBool,
    /// Busy polling for answers, where the socket allows it.
    busy_poll: Option<BusyPoll>,
    /// How long recent answers took (nanoseconds, a moving average): a call spins only on a
    /// connection that answers within the busy-poll budget.
    answer_ns: AtomicU64,
}

impl Wake for Driver {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waker = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let Some(waiter) = waiters.list.last_mut() else {
                drop(waiters);
                return self.wake_background();
            };
            if DRIVING_NEXT.get() == (Arc::as_ptr(self) as usize, waiter.id) {
                // The call being polled on this thread, which polls the connection next:
                // waking it would only reschedule it (and wake another worker to steal it).
                return;
            }
            waiter.woken = true;
            waiter.waker.clone()
        };
        waker.wake();
    }
}

impl Driver {
    /// Takes over `connection` and starts the task that polls it while no call waits.
    pub(crate) fn start<E: Display>(
        connection: impl Future<Output = Result<(), E>> + Send + 'static,
        busy_poll: Option<BusyPoll>,
    ) -> Arc<Self> {
        let connection = async move { connection.await.map_err(|e| e.to_string()) };
        let driver = Arc::new(Self::new(Some(Box::pin(connection)), busy_poll));
        tokio::spawn(background(driver.clone()));
        driver
    }

    fn new(connection: Option<Connection>, busy_poll: Option<BusyPoll>) -> Self {
        Self {
            connection: Mutex::new(connection),
            poke: AtomicBool::new(false),
            waiters: Mutex::default(),
            background: Mutex::new(None),
            closed: AtomicBool::new(false),
            busy_poll,
            answer_ns: AtomicU64::new(0),
        }
    }

    /// Runs `future`, polling the connection around it (see [`Driven`]).
    pub(crate) async fn driven<F: Future>(self: &Arc<Self>, future: F) -> F::Output {
        Driven {
            driver: self,
            future: std::pin::pin!(future),
            waiter: None,
            started: None,
        }
        .await
    }

    /// How a call still without all of its answer may spin for the rest, if at all: only
    /// the runtime's one waiting call may, since with others in flight its thread has their
    /// work to do, and only on a connection whose answers come within the budget.
    fn may_spin(&self) -> Option<&BusyPoll> {
        let busy_poll = self.busy_poll.as_ref()?;
        let poller = &busy_poll.poller;
        let typical = Duration::from_nanos(self.answer_ns.load(Ordering::Relaxed));
        (poller.waiting.load(Ordering::Relaxed) == 1 && typical <= poller.budget)
            .then_some(busy_poll)
    }

    /// Counts a call in or out of the runtime's waiting calls.
    fn count_waiting(&self, waiting: bool) {
        if let Some(busy_poll) = &self.busy_poll {
            if waiting {
                busy_poll.poller.waiting.fetch_add(1, Ordering::Relaxed);
            } else {
                busy_poll.poller.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Folds one answer's time into the moving average (not one atomic step: an update lost
    /// to a concurrent one only delays the average by a call).
    fn answered(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let average = self.answer_ns.load(Ordering::Relaxed);
        let average = if average == 0 {
            took
        } else {
            average - average / 8 + took / 8
        };
        self.answer_ns.store(average, Ordering::Relaxed);
    }

    /// Polls the connection and `future` in a loop, reading the socket directly, until the
    /// answer is in or the budget is spent. One thread of the runtime spins at a time, so
    /// the others (and the plugins) keep their cores.
    fn spin<F: Future + Unpin>(
        self: &Arc<Self>,
        id: u64,
        busy_poll: &BusyPoll,
        future: &mut F,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        /// Ends the spin however the loop is left.
        struct Spinning<'a>(&'a BusyPoll);
        impl Drop for Spinning<'_> {
            fn drop(&mut self) {
                self.0.eager_reads.store(false, Ordering::Relaxed);
                self.0.poller.spinning.store(false, Ordering::Release);
            }
        }
        if busy_poll.poller.spinning.swap(true, Ordering::Acquire) {
            return Poll::Pending;
        }
        busy_poll.eager_reads.store(true, Ordering::Relaxed);
        let _spinning = Spinning(busy_poll);
        let until = Instant::now() + busy_poll.poller.budget;
        while Instant::now() < until {
            std::hint::spin_loop();
            self.drive_for(id);
            let output = Pin::new(&mut *future).poll(cx);
            if output.is_ready() {
                return output;
            }
        }
        Poll::Pending
    }

    fn wake_background(&self) {
        let background = self.background.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waker) = background.as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Polls the connection unless another thread is doing it right now (that one then
    /// polls again for us).
    fn drive(self: &Arc<Self>) {
        self.poke.store(true, Ordering::SeqCst);
        loop {
            let Ok(mut connection) = self.connection.try_lock() else {
                return;
            };
            let waker = Waker::from(self.clone());
            let mut cx = Context::from_waker(&waker);
            while self.poke.swap(false, Ordering::SeqCst) {
                let Some(open) = connection.as_mut() else {
                    break;
                };
                if let Poll::Ready(result) = open.as_mut().poll(&mut cx) {
                    if let Err(error) = result {
                        tracing::debug!(%error, "the connection to a plugin ended");
                    }
                    *connection = None;
                    self.closed.store(true, Ordering::Release);
                    // Every stream has been told; the background task may end.
                    self.wake_background();
                }
            }
            drop(connection);
            if !self.poke.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Registers (or refreshes) a waiting call; also says whether others wait.
    fn add_waiter(&self, id: Option<u64>, waker: &Waker) -> (u64, bool) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let Waiters { list, next_id } = &mut *waiters;
        if let Some(waiter) = id.and_then(|id| list.iter_mut().find(|w| w.id == id)) {
            if !waiter.waker.will_wake(waker) {
                waiter.waker = waker.clone();
            }
            return (waiter.id, list.len() > 1);
        }
        let id = *next_id;
        *next_id += 1;
        self.count_waiting(true);
        list.push(Waiter {
            id,
            waker: waker.clone(),
            woken: false,
        });
        (id, list.len() > 1)
    }

    /// Polls the connection on behalf of the waiting call `id`.
    fn drive_for(self: &Arc<Self>, id: u64) {
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(waiter) = waiters.list.iter_mut().find(|w| w.id == id) {
                waiter.woken = false;
            }
        }
        self.drive();
    }

    /// Unregisters a call that has its answer. A connection may ask to be polled as a call
    /// ends (to write what its end queued), which wakes this call as it completes: poll the
    /// connection right here instead of handing that wake-up on to the
    /// background task, whose scheduling beside the answer's publication would wake another
    /// worker thread, once per call.
    fn finish(self: &Arc<Self>, id: u64) {
        let woken = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters
                .list
                .iter_mut()
                .find(|w| w.id == id)
                .is_some_and(|w| std::mem::take(&mut w.woken))
        };
        if woken {
            self.drive();
        }
        self.remove_waiter(id);
    }

    /// Unregisters a call, handing on a wake-up it received and did not act on.
    fn remove_waiter(self: &Arc<Self>, id: u64) {
        let woken = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let list = &mut waiters.list;
            // In order: the newest waiter is the one woken, and stays the newest.
            list.iter().position(|w| w.id == id).is_some_and(|at| {
                self.count_waiting(false);
                list.remove(at).woken
            })
        };
        if woken {
            self.wake_by_ref();
        }
    }
}

/// Busy polling, shared by the plugin connections of one runtime: a call still waiting for
/// its answer may spin for it instead of parking its thread (see
/// [`crate::pool::PoolSettings::busy_poll`]).
#[derive(Debug)]
pub struct BusyPoller {
    /// The longest spin; also the longest typical answer time that still spins.
    budget: Duration,
    /// Whether a call is spinning: one at a time, so the other threads (and the plugins)
    /// keep their cores.
    spinning: AtomicBool,
    /// Calls waiting on these connections.
    waiting: AtomicUsize,
}

impl BusyPoller {
    /// Spins for at most `budget`; `None` (never spin) for zero.
    pub fn new(budget: Duration) -> Option<Arc<Self>> {
        (!budget.is_zero()).then(|| {
            Arc::new(Self {
                budget,
                spinning: AtomicBool::new(false),
                waiting: AtomicUsize::new(0),
            })
        })
    }
}

/// A connection's part in busy polling.
#[derive(Clone, Debug)]
pub(crate) struct BusyPoll {
    pub(crate) poller: Arc<BusyPoller>,
    /// The socket's switch for reads that do not wait for the reactor.
    pub(crate) eager_reads: Arc<AtomicBool>,
}

thread_local! {
    /// The driver and waiting call being polled on this thread that will poll the connection
    /// right after: wake-ups the connection addresses to it meanwhile are dropped.
    static DRIVING_NEXT: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A future polled together with the connection.
struct Driven<'a, F> {
    driver: &'a Arc<Driver>,
    future: F,
    waiter: Option<u64>,
    started: Option<Instant>,
}

impl<F: Future + Unpin> Future for Driven<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered first: a wake-up from the socket, or the connection asking for the frames this call
        // queues to be written, comes to this task (no other thread is woken for it).
        let (id, crowded) = this.driver.add_waiter(this.waiter, cx.waker());
        let first = this.waiter.is_none();
        this.waiter = Some(id);
        if first && this.driver.busy_poll.is_some() {
            this.started = Some(Instant::now());
        }
        // A new call among others leaves its frames queued: the connection asks for them to be written by
        // waking a waiting call, which runs after the calls ready now on this thread, so
        // their frames leave together in one write instead of one each. Otherwise the call
        // writes them itself right after, and that wake-up is not needed.
        let drives = !(first && crowded);
        if drives {
            DRIVING_NEXT.set((Arc::as_ptr(this.driver) as usize, id));
        }
        let mut output = Pin::new(&mut this.future).poll(cx);
        DRIVING_NEXT.set((0, 0));
        if output.is_pending() && drives {
            // Write what the call just queued, read what came back, and look again.
            this.driver.drive_for(id);
            output = Pin::new(&mut this.future).poll(cx);
            // Polled again, and the answer is not all in: the plugin is at work on it (the
            // runtime's invocation task polls a call right after its first poll wrote the
            // request, and a go-plugin server's ping wakes it with part of an answer).
            // Waiting in a spin saves parking the thread and a wake-up by the reactor, which
            // on a virtual machine costs tens of microseconds. The first poll never spins:
            // in the runtime it runs on the endpoint's loop.
            if output.is_pending() && !first {
                if let Some(busy_poll) = this.driver.may_spin() {
                    output = this.driver.spin(id, busy_poll, &mut this.future, cx);
                }
            }
        }
        if output.is_ready() {
            this.waiter = None;
            if let Some(started) = this.started.take() {
                this.driver.answered(started.elapsed());
            }
            this.driver.finish(id);
        }
        output
    }
}

impl<F> Drop for Driven<'_, F> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter.take() {
            self.driver.remove_waiter(id);
        }
    }
}

/// Keeps the connection polled while no call is waiting, and ends with it.
async fn background(driver: Arc<Driver>) {
    poll_fn(|cx| {
        {
            let mut background = driver.background.lock().unwrap_or_else(|e| e.into_inner());
            if !background.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *background = Some(cx.waker().clone());
            }
        }
        driver.drive();
        if driver.closed.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counted() -> (Arc<Counted>, Waker) {
        let counter = Arc::new(Counted::default());
        (counter.clone(), Waker::from(counter))
    }

    fn idle_driver() -> Arc<Driver> {
        Arc::new(Driver::new(None, None))
    }

    #[test]
    fn a_wake_up_for_a_call_that_ends_without_acting_on_it_is_handed_on() {
        let driver = idle_driver();
        let (first, first_waker) = counted();
        let (second, second_waker) = counted();
        let (first_id, crowded) = driver.add_waiter(None, &first_waker);
        assert!(!crowded);
        let (second_id, crowded) = driver.add_waiter(None, &second_waker);
        assert!(crowded);
        // The socket wakes the connection: the newest waiting call is told.
        Waker::from(driver.clone()).wake_by_ref();
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        // It ends before polling the connection: the wake-up goes on to the other call.
        driver.remove_waiter(second_id);
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        // A call that polled the connection after its wake-up hands nothing on.
        Waker::from(driver.clone()).wake_by_ref();
        assert_eq!(first.0.load(Ordering::SeqCst), 2);
        driver.drive_for(first_id);
        driver.remove_waiter(first_id);
        assert_eq!(first.0.load(Ordering::SeqCst), 2);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_call_about_to_poll_the_connection_is_not_woken_for_it() {
        let driver = idle_driver();
        let (call, call_waker) = counted();
        let (id, _) = driver.add_waiter(None, &call_waker);
        DRIVING_NEXT.set((Arc::as_ptr(&driver) as usize, id));
        Waker::from(driver.clone()).wake_by_ref();
        DRIVING_NEXT.set((0, 0));
        assert_eq!(call.0.load(Ordering::SeqCst), 0);
        // Nor is the wake-up handed on when it ends: it polled the connection.
        driver.remove_waiter(id);
        assert_eq!(call.0.load(Ordering::SeqCst), 0);
        let (other, other_waker) = counted();
        driver.add_waiter(None, &other_waker);
        Waker::from(driver.clone()).wake_by_ref();
        assert_eq!(other.0.load(Ordering::SeqCst), 1, "others are still woken");
    }

    #[test]
    fn a_call_woken_as_it_completes_polls_the_connection_itself() {
        let driver = idle_driver();
        let (background, background_waker) = counted();
        *driver.background.lock().unwrap() = Some(background_waker);
        let (call, call_waker) = counted();
        let (id, _) = driver.add_waiter(None, &call_waker);
        // The connection asks to be polled as the call ends.
        Waker::from(driver.clone()).wake_by_ref();
        assert_eq!(call.0.load(Ordering::SeqCst), 1);
        driver.finish(id);
        assert_eq!(
            background.0.load(Ordering::SeqCst),
            0,
            "not handed on: the call polled the connection"
        );
        assert!(driver.waiters.lock().unwrap().list.is_empty());
        // Without a pending wake-up, finishing hands nothing on either.
        let (id, _) = driver.add_waiter(None, &call_waker);
        driver.finish(id);
        assert_eq!(background.0.load(Ordering::SeqCst), 0);
        assert_eq!(call.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn with_no_call_waiting_the_background_task_is_woken() {
        let driver = idle_driver();
        let (background, background_waker) = counted();
        *driver.background.lock().unwrap() = Some(background_waker);
        Waker::from(driver.clone()).wake_by_ref();
        assert_eq!(background.0.load(Ordering::SeqCst), 1);
        let (call, call_waker) = counted();
        let (id, _) = driver.add_waiter(None, &call_waker);
        Waker::from(driver.clone()).wake_by_ref();
        assert_eq!(call.0.load(Ordering::SeqCst), 1);
        assert_eq!(background.0.load(Ordering::SeqCst), 1);
        driver.remove_waiter(id);
        assert_eq!(
            background.0.load(Ordering::SeqCst),
            2,
            "handed on to the background"
        );
    }

    #[test]
    fn only_the_one_waiting_call_on_a_prompt_connection_may_spin() {
        let poller = BusyPoller::new(Duration::from_micros(300)).unwrap();
        let busy = |poller: &Arc<BusyPoller>| {
            let busy_poll = BusyPoll {
                poller: poller.clone(),
                eager_reads: Arc::default(),
            };
            Arc::new(Driver::new(None, Some(busy_poll)))
        };
        let (one, other) = (busy(&poller), busy(&poller));
        let (_, waker) = counted();
        assert!(one.may_spin().is_none(), "no call waits");
        let (first, _) = one.add_waiter(None, &waker);
        assert!(one.may_spin().is_some());
        // Another call of the runtime waits, on another connection: nobody spins.
        let (second, _) = other.add_waiter(None, &waker);
        assert!(one.may_spin().is_none());
        assert!(other.may_spin().is_none());
        other.remove_waiter(second);
        assert!(one.may_spin().is_some());
        // Answers that take longer than the budget: this connection stops spinning.
        for _ in 0..16 {
            one.answered(Duration::from_millis(5));
        }
        assert!(one.may_spin().is_none());
        one.finish(first);
        assert_eq!(poller.waiting.load(Ordering::Relaxed), 0);
        assert!(
            BusyPoller::new(Duration::ZERO).is_none(),
            "zero never spins"
        );
    }
}
