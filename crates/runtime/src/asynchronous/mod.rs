//! Asynchronous invocation: the runtime's side of `<prefix>.async.<name>`.
//!
//! JetStream does the queueing: the stream [`ASYNC_STREAM`] stores what callers submit (the
//! PubAck is their acceptance, `Nats-Msg-Id` de-duplicates), one durable pull consumer per
//! function is shared by every runtime, and a retriable failure is a NAK with the function's
//! backoff as delay, so the server redelivers it when the wait is over (to whichever runtime
//! pulls first). A runtime that dies mid-call never acks; the server redelivers after the ack
//! wait. What cannot succeed is published to [`DLQ_STREAM`] and then acked.
//!
//! Here: the settings ([`AsyncConfig`]), the streams, and one pull loop per function that the
//! runtime knows (built-ins and deployed), started and stopped as the registry changes.
//! `dispatch` runs one stored invocation.

mod dispatch;

pub(crate) use dispatch::{Dispatcher, Origin};

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use mycelium_core::{
    asynchronous::{consumer_name, AsyncQueueStats, ASYNC_STREAM, DLQ_STREAM},
    FunctionName,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

/// How a runtime takes part in asynchronous invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncConfig {
    /// Create the streams and run stored invocations (on by default; needs JetStream).
    pub enabled: bool,
    /// Replicas of the streams when they are created (3 on a 3-node cluster).
    pub replicas: usize,
    /// How long a `Nats-Msg-Id` is remembered: a second submission with the same key inside
    /// it is acknowledged as a duplicate and does not run again.
    pub duplicate_window: Duration,
    /// Invocations the stream holds at most; beyond it submissions are refused, never dropped.
    pub max_messages: i64,
    /// Bytes the stream holds at most; beyond it submissions are refused.
    pub max_bytes: i64,
    /// How long a pulled invocation stays this runtime's before the server gives it to
    /// another (a runtime that died); running calls renew it every third of it.
    pub ack_wait: Duration,
    /// Subjects (NATS patterns) results may be published to; empty: any subject that is not
    /// a system (`$...`) or platform subject.
    pub result_subjects: Vec<String>,
    /// How long dead letters are kept (zero: until purged).
    pub dead_letter_max_age: Duration,
    /// How long invocations of a function no runtime knows wait before they are
    /// dead-lettered (`function_not_found`): a deploy may still be on its way.
    pub unknown_function_grace: Duration,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            ack_wait: Duration::from_secs(30),
            result_subjects: Vec::new(),
            dead_letter_max_age: Duration::ZERO,
            unknown_function_grace: Duration::from_secs(30),
        }
    }
}

/// Makes (or updates) the dead-letter stream, which durable triggers use too (also on a runtime
/// that runs no asynchronous invocations).
pub(crate) async fn ensure_dead_letters(
    jetstream: &jetstream::Context,
    prefix: &str,
    config: &AsyncConfig,
) -> Result<(), String> {
    jetstream
        .create_or_update_stream(stream::Config {
            name: DLQ_STREAM.into(),
            subjects: vec![format!("{prefix}.dlq.>")],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            max_age: config.dead_letter_max_age,
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|e| format!("creating the stream {DLQ_STREAM}: {e}"))
}

/// Makes (or updates) the two streams and returns the invocations' one. Their limits follow
/// the settings of the runtime that last started; submissions beyond them are refused
/// (`discard: new`), never dropped.
pub(crate) async fn ensure_streams(
    jetstream: &jetstream::Context,
    prefix: &str,
    config: &AsyncConfig,
) -> Result<stream::Stream, String> {
    jetstream
        .create_or_update_stream(stream::Config {
            name: ASYNC_STREAM.into(),
            subjects: vec![format!("{prefix}.async.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            max_messages: config.max_messages,
            max_bytes: config.max_bytes,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating the stream {ASYNC_STREAM}: {e}"))?;
    ensure_dead_letters(jetstream, prefix, config).await?;
    jetstream
        .get_stream(ASYNC_STREAM)
        .await
        .map_err(|e| format!("opening the stream {ASYNC_STREAM}: {e}"))
}

/// How often a runtime looks for invocations of functions it does not know (deleted, or
/// never deployed): nothing else would ever take them out of the work queue.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Functions not known whose invocations are swept at once, at most: the names are the
/// callers', so their number must not decide how many tasks a runtime runs.
const MAX_SWEEPS: usize = 16;

/// A running pull loop.
struct PullLoop {
    /// The version it serves; `None` for a sweep of a function this runtime does not know.
    version: Option<u64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Runs stored invocations until the runtime stops: one pull loop per function it knows,
/// started, restarted (a new version may set another concurrency) and stopped as the
/// registry changes; and, every [`SWEEP_EVERY`], a draining loop for functions it does not
/// know that have invocations waiting, which dead-letters them (`function_not_found`) once
/// they are older than the grace (`AsyncConfig::unknown_function_grace`).
pub(crate) fn start(shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let shared = shared.clone();
    tokio::spawn(async move {
        let jetstream = jetstream::new(shared.client.clone());
        let config = &shared.config.asynchronous;
        // JetStream may not be ready yet (a cluster electing its meta leader) or not be there
        // at all: keep trying, quietly after the first warning.
        let mut failures = 0u32;
        let stream = loop {
            match ensure_streams(&jetstream, &shared.config.subject_prefix, config).await {
                Ok(stream) => break stream,
                Err(error) => {
                    failures += 1;
                    if failures == 3 {
                        tracing::warn!(%error, "asynchronous invocation waits for JetStream (it needs JetStream enabled on the NATS server); still trying");
                    } else {
                        tracing::debug!(%error, "the asynchronous invocation streams are not ready; retrying");
                    }
                    let pause = Duration::from_millis(250 * u64::from(failures.min(8)));
                    tokio::select! {
                        () = shared.stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        };
        if failures >= 3 {
            tracing::info!("asynchronous invocation is on");
        }
        let dispatcher = Arc::new(dispatch::Dispatcher::new(shared.clone(), jetstream));
        let mut changes = shared.invoker.registry.changes();
        let mut loops: HashMap<FunctionName, PullLoop> = HashMap::new();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let spawn = |name: FunctionName, version: Option<u64>| {
            let stop = shared.stop.child_token();
            let task = tokio::spawn(pull_loop(
                dispatcher.clone(),
                stream.clone(),
                name,
                stop.clone(),
                version.is_none(),
            ));
            PullLoop {
                version,
                stop,
                task,
            }
        };
        loop {
            let functions = shared.invoker.list();
            loops.retain(|name, pull| {
                let current = functions.iter().find(|f| &f.name == name);
                let keep = match (pull.version, current) {
                    (Some(version), Some(current)) => current.version == version,
                    (None, None) => !pull.task.is_finished(),
                    _ => false,
                };
                if !keep {
                    pull.stop.cancel();
                }
                keep
            });
            for function in functions {
                loops
                    .entry(function.name.clone())
                    .or_insert_with(|| spawn(function.name, Some(function.version)));
            }
            tokio::select! {
                () = shared.stop.cancelled() => return,
                still = crate::registry_changed(&mut changes) => if !still { return },
                _ = sweep.tick() => {
                    sample_queues(&stream, &shared, &loops).await;
                    let sweeping = loops.values().filter(|l| l.version.is_none()).count();
                    for name in unknown_with_work(&stream, &shared, &loops, MAX_SWEEPS.saturating_sub(sweeping)).await {
                        let pull = spawn(name.clone(), None);
                        loops.insert(name, pull);
                    }
                }
            }
        }
    })
}

/// Hands the queues of the functions this runtime knows, as JetStream counts them, to the
/// metrics collector (Prometheus gauges).
async fn sample_queues(
    stream: &stream::Stream,
    shared: &Shared,
    loops: &HashMap<FunctionName, PullLoop>,
) {
    let prefix = format!("{}.dlq.", shared.config.subject_prefix);
    let mut dead_letters = HashMap::new();
    let jetstream = jetstream::new(shared.client.clone());
    if let Ok(dlq) = jetstream.get_stream(DLQ_STREAM).await {
        if let Ok(mut subjects) = dlq.info_with_subjects(format!("{prefix}>")).await {
            while let Some(Ok((subject, count))) = subjects.next().await {
                if let Some(name) = subject.strip_prefix(&prefix) {
                    dead_letters.insert(name.to_owned(), count as u64);
                }
            }
        }
    }
    let known = loops.iter().filter(|(_, l)| l.version.is_some());
    for (function, _) in known {
        let Ok(info) = stream.consumer_info(consumer_name(function)).await else {
            continue;
        };
        shared.invoker.metrics.async_queue(&AsyncQueueStats {
            function: function.clone(),
            pending: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
            dead_lettered: dead_letters.get(function.as_str()).copied().unwrap_or(0),
        });
    }
}

/// Functions with invocations waiting that this runtime neither knows nor sweeps, at most
/// `room` of them.
async fn unknown_with_work(
    stream: &stream::Stream,
    shared: &Shared,
    loops: &HashMap<FunctionName, PullLoop>,
    room: usize,
) -> Vec<FunctionName> {
    let mut found = Vec::new();
    if room == 0 {
        return found;
    }
    let prefix = format!("{}.async.", shared.config.subject_prefix);
    let Ok(mut subjects) = stream.info_with_subjects(format!("{prefix}>")).await else {
        return found;
    };
    while let Some(Ok((subject, _count))) = subjects.next().await {
        let Some(name) = subject
            .strip_prefix(&prefix)
            .and_then(|name| FunctionName::new(name).ok())
        else {
            continue;
        };
        if loops.contains_key(&name) || shared.invoker.describe(&name, None).is_ok() {
            continue;
        }
        found.push(name);
        if found.len() == room {
            break;
        }
    }
    found
}

/// Pulls `function`'s invocations while it is known (or, with `drain`, until none is left),
/// as many at a time as it may run here.
async fn pull_loop(
    dispatcher: Arc<dispatch::Dispatcher>,
    stream: stream::Stream,
    function: FunctionName,
    stop: CancellationToken,
    drain: bool,
) {
    let consumer = async_consumer(dispatcher.shared(), &function);
    pull(
        dispatcher,
        stream,
        consumer,
        function,
        Origin::Submission,
        None,
        stop,
        drain,
    )
    .await;
}

/// The durable consumer of a function's asynchronous invocations.
fn async_consumer(shared: &Shared, function: &FunctionName) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(function)),
        filter_subject: format!("{}.async.{function}", shared.config.subject_prefix),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: shared.config.asynchronous.ack_wait,
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Pulls through `consumer` (made if missing) for `function` until stopped (or, with
/// `drain`, until nothing is left), as many at a time as the function may run here (or
/// `concurrency`); each message is dispatched as coming from `origin`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn pull(
    dispatcher: Arc<dispatch::Dispatcher>,
    stream: stream::Stream,
    consumer: pull::Config,
    function: FunctionName,
    origin: Origin,
    concurrency: Option<usize>,
    stop: CancellationToken,
    drain: bool,
) {
    let shared = dispatcher.shared();
    let limit = concurrency
        .unwrap_or_else(|| shared.invoker.concurrency_of(&function))
        .max(1);
    let slots = Arc::new(Semaphore::new(limit));
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let batches = Batches {
            dispatcher: &dispatcher,
            stream: &stream,
            consumer: &consumer,
            function: &function,
            origin: &origin,
            slots: &slots,
            stop: &stop,
        };
        match batches.pull(drain).await {
            Ok(()) => return,
            Err(error) => {
                failures += 1;
                if failures >= 3 {
                    tracing::warn!(%function, %error, failures, "pulling asynchronous invocations keeps failing");
                } else {
                    tracing::debug!(%function, %error, "pulling asynchronous invocations failed; retrying");
                }
                let pause = Duration::from_millis(250 * u64::from(failures.min(8)));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Takes batches from the function's consumer (made if missing) until told to stop.
/// What one pull loop works with.
struct Batches<'a> {
    dispatcher: &'a Arc<dispatch::Dispatcher>,
    stream: &'a stream::Stream,
    consumer: &'a pull::Config,
    function: &'a FunctionName,
    origin: &'a Origin,
    slots: &'a Arc<Semaphore>,
    stop: &'a CancellationToken,
}

impl Batches<'_> {
    /// Takes batches from the consumer (made if missing) until told to stop.
    async fn pull(&self, drain: bool) -> Result<(), String> {
        let Self {
            dispatcher,
            stream,
            consumer,
            function,
            origin,
            slots,
            stop,
        } = *self;
        let shared = dispatcher.shared();
        let name = consumer.durable_name.clone().unwrap_or_default();
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(consumer.clone())
            .await
            .map_err(|e| format!("creating the consumer {name}: {e}"))?;
        loop {
            // One free slot at least before asking, and never more messages than free slots: a
            // pulled invocation's ack wait is running, so none should wait here for a slot.
            let first = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                permit = slots.clone().acquire_owned() => permit.map_err(|e| e.to_string())?,
            };
            let wanted = 1 + slots.available_permits();
            let mut batch = consumer
                .batch()
                .max_messages(wanted)
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| format!("pulling: {e}"))?;
            let mut permit = Some(first);
            let mut pulled = 0usize;
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    message = batch.next() => message,
                };
                let Some(message) = message else { break };
                let message = message.map_err(|e| format!("pulling: {e}"))?;
                pulled += 1;
                let slot = match permit.take() {
                    Some(slot) => slot,
                    None => slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| e.to_string())?,
                };
                let dispatcher = dispatcher.clone();
                let function = function.clone();
                let origin = origin.clone();
                shared.tracker.spawn(async move {
                    dispatcher.run(&function, &origin, message).await;
                    drop(slot);
                });
            }
            if drain && pulled == 0 {
                return Ok(());
            }
        }
    }
}
