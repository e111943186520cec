//! Event triggers: the runtime's second event source. Every runtime runs every trigger in
//! the registry that is not paused, started and stopped as the registry changes:
//! - `subject`: a queue subscription shared by the runtimes, each message run once, at most
//!   once ([`subject`]);
//! - `stream`, `kv`, `schedule`: a durable pull consumer shared by the runtimes, at least once,
//!   through the asynchronous invocation's dispatcher (retries, backoff, dead letters). KV
//!   buckets are streams (`KV_<bucket>`), and schedules are ticks the NATS server publishes
//!   into `MYCELIUM_SCHEDULES`, so all three are one kind of source here.
//!
//! A message that is a CloudEvent (binding headers or the structured format) is passed as is;
//! anything else is wrapped in one that says where it came from ([`event_of`]).

mod subject;

use std::{collections::HashMap, sync::Arc};

use async_nats::{
    jetstream::{self, consumer::pull, message::Info},
    HeaderMap, Message,
};
use bytes::Bytes;
use mycelium_core::{
    cloudevents::{EventBuilder, EventBuilderV10},
    envelope::INVOCATION_ID_HEADER,
    event::STRUCTURED_CONTENT_TYPE,
    trigger::{Deliver, Trigger, TriggerName, TriggerSource, SCHEDULE_STREAM, TRIGGER_HEADER},
    ErrorCode, Event, ProtocolError, TriggerEvent,
};
use tokio_util::sync::CancellationToken;

use crate::{
    asynchronous::{Dispatcher, Origin},
    server::{self, Shared},
};

/// The durable consumer a stream, KV or schedule trigger reads through.
pub(crate) fn consumer_name(name: &TriggerName) -> String {
    format!("trigger-{name}")
}

/// The stream a stream, KV or schedule trigger's durable consumer reads; `None` for a subject.
fn durable_stream(source: &TriggerSource) -> Option<String> {
    match source {
        TriggerSource::Stream { stream, .. } => Some(stream.clone()),
        TriggerSource::Kv { bucket, .. } => Some(format!("KV_{bucket}")),
        TriggerSource::Schedule { .. } => Some(SCHEDULE_STREAM.to_owned()),
        TriggerSource::Subject { .. } => None,
    }
}

/// A trigger running here: what it is, how to stop it, and its task.
struct Running {
    trigger: Arc<Trigger>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Once a deleted trigger's loop here has ended, deletes its durable consumer. `mycelium trigger
/// delete` deletes it too, but a loop that saw the consumer vanish before this runtime saw the
/// trigger go would have made it again (it retries): without this, such a consumer would stay
/// on the stream for good. Every runtime does it; all but the first find nothing to delete.
fn forget_consumer(jetstream: &jetstream::Context, running: Running) {
    let Some(stream) = durable_stream(&running.trigger.source) else {
        return;
    };
    let jetstream = jetstream.clone();
    tokio::spawn(async move {
        let _ = running.task.await;
        let consumer = consumer_name(&running.trigger.name);
        if let Ok(stream) = jetstream.get_stream(&stream).await {
            if stream.delete_consumer(&consumer).await.is_ok() {
                tracing::debug!(trigger = %running.trigger.name, %consumer, "deleted the consumer of a deleted trigger");
            }
        }
    });
}

/// Runs the registry's triggers until the runtime stops.
pub(crate) fn start(shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let shared = shared.clone();
    tokio::spawn(async move {
        let jetstream = jetstream::new(shared.client.clone());
        let dispatcher = Arc::new(Dispatcher::new(shared.clone(), jetstream.clone()));
        let mut changes = shared.invoker.registry.changes();
        let mut running: HashMap<TriggerName, Running> = HashMap::new();
        let mut lag = tokio::time::interval(LAG_EVERY);
        lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let triggers = shared.invoker.registry.triggers();
            let (kept, stopped): (HashMap<_, _>, HashMap<_, _>) =
                running.drain().partition(|(name, run)| {
                    triggers
                        .iter()
                        .any(|t| t.name == *name && !t.paused && **t == *run.trigger)
                });
            running = kept;
            for (name, run) in stopped {
                run.stop.cancel();
                if !triggers.iter().any(|t| t.name == name) {
                    shared.invoker.metrics.trigger_removed(&name);
                    forget_consumer(&jetstream, run);
                }
            }
            for trigger in triggers {
                if trigger.paused || running.contains_key(&trigger.name) {
                    continue;
                }
                let stop = shared.stop.child_token();
                let task = match &trigger.source {
                    TriggerSource::Subject { .. } => {
                        tokio::spawn(subject::run(shared.clone(), trigger.clone(), stop.clone()))
                    }
                    _ => tokio::spawn(durable(
                        dispatcher.clone(),
                        jetstream.clone(),
                        trigger.clone(),
                        stop.clone(),
                    )),
                };
                running.insert(
                    trigger.name.clone(),
                    Running {
                        trigger,
                        stop,
                        task,
                    },
                );
            }
            tokio::select! {
                () = shared.stop.cancelled() => return,
                still = crate::registry_changed(&mut changes) => if !still { return },
                _ = lag.tick() => sample_lag(&shared, &jetstream, &running).await,
            }
        }
    })
}

/// How often the lag of stream and KV triggers is sampled.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The messages waiting for each running stream or KV trigger, from its consumer.
async fn sample_lag(
    shared: &Shared,
    jetstream: &jetstream::Context,
    running: &HashMap<TriggerName, Running>,
) {
    for (name, run) in running {
        if matches!(run.trigger.source, TriggerSource::Schedule { .. }) {
            continue;
        }
        let Some(stream) = durable_stream(&run.trigger.source) else {
            continue;
        };
        let Ok(stream) = jetstream.get_stream(&stream).await else {
            continue;
        };
        if let Ok(info) = stream.consumer_info(consumer_name(name)).await {
            shared
                .invoker
                .metrics
                .trigger_event(name, TriggerEvent::Lag(info.num_pending));
        }
    }
}

/// A stream, KV or schedule trigger: its durable consumer, through the dispatcher.
async fn durable(
    dispatcher: Arc<Dispatcher>,
    jetstream: jetstream::Context,
    trigger: Arc<Trigger>,
    stop: CancellationToken,
) {
    let shared = dispatcher.shared().clone();
    let prefix = &shared.config.subject_prefix;
    let Some(stream_name) = durable_stream(&trigger.source) else {
        return;
    };
    let (filter, deliver) = match &trigger.source {
        TriggerSource::Stream {
            filter, deliver, ..
        } => (filter.clone().unwrap_or_default(), *deliver),
        TriggerSource::Kv { bucket, key } => (
            format!("$KV.{bucket}.{}", key.as_deref().unwrap_or(">")),
            Deliver::New,
        ),
        TriggerSource::Schedule { .. } => {
            (format!("{prefix}.ticks.{}", trigger.name), Deliver::New)
        }
        TriggerSource::Subject { .. } => return,
    };
    let ordered = matches!(trigger.source, TriggerSource::Kv { .. });
    // The stream may be made after the trigger (a schedule's, by the first `trigger add`);
    // what cannot run goes to the dead letters, whose stream this runtime may not have made.
    let mut failures = 0u32;
    let stream = loop {
        let dead_letters = crate::asynchronous::ensure_dead_letters(
            &jetstream,
            prefix,
            &shared.config.asynchronous,
        );
        let found = match dead_letters.await {
            Ok(()) => jetstream
                .get_stream(&stream_name)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error),
        };
        match found {
            Ok(stream) => break stream,
            Err(error) => {
                failures += 1;
                if failures == 3 {
                    tracing::warn!(trigger = %trigger.name, stream = %stream_name, %error, "the trigger's stream is not there; waiting for it");
                }
                let pause = std::time::Duration::from_millis(250 * u64::from(failures.min(8)));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    };
    let consumer = pull::Config {
        durable_name: Some(consumer_name(&trigger.name)),
        filter_subject: filter,
        deliver_policy: match deliver {
            Deliver::New => jetstream::consumer::DeliverPolicy::New,
            Deliver::All => jetstream::consumer::DeliverPolicy::All,
        },
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: shared.config.asynchronous.ack_wait,
        max_deliver: -1,
        // A bucket's changes run one at a time across the runtimes: in order, per key and
        // overall (a put then a delete must not arrive the other way round).
        max_ack_pending: if ordered { 1 } else { 10_000 },
        ..Default::default()
    };
    let function = trigger.function.clone();
    crate::asynchronous::pull(
        dispatcher,
        stream,
        consumer,
        function,
        Origin::Trigger(trigger),
        ordered.then_some(1),
        stop,
        false,
    )
    .await;
}

/// The event a trigger's message becomes: itself when it is a CloudEvent, else a new one
/// whose attributes say where it came from and whose data is the payload. `durable` is the
/// JetStream delivery (and the subject prefix) for stream, KV and schedule sources.
pub(crate) fn event_of(
    message: &Message,
    trigger: &Trigger,
    durable: Option<(&Info<'_>, &str)>,
) -> Result<Event, ProtocolError> {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let content_type = header("Content-Type");
    let is_event = content_type.is_some_and(|ct| ct.starts_with(STRUCTURED_CONTENT_TYPE))
        || header("ce-id").is_some()
        || header("Ce-Id").is_some();
    if is_event {
        return server::decode_binding(message, trigger.function.as_str()).map(|r| r.event);
    }
    let subject = message.subject.as_str();
    let (id, time) = match durable {
        Some((info, _)) => (
            format!("{}-{}", trigger.name, info.stream_sequence),
            info.published,
        ),
        None => (
            format!("{}-{}", trigger.name, nuid::next()),
            chrono::Utc::now(),
        ),
    };
    let mut builder = EventBuilderV10::new()
        .id(id)
        .source(format!("/mycelium/triggers/{}", trigger.name))
        .time(time);
    let mut with_data = true;
    builder = match &trigger.source {
        TriggerSource::Subject { .. } => builder.ty("io.mycelium.subject.message").subject(subject),
        TriggerSource::Stream { stream, .. } => builder
            .ty("io.mycelium.stream.message")
            .subject(subject)
            .extension("stream", stream.as_str())
            .extension(
                "streamsequence",
                durable.map_or(0, |(info, _)| info.stream_sequence) as i64,
            ),
        TriggerSource::Kv { bucket, .. } => {
            let key = subject
                .strip_prefix(&format!("$KV.{bucket}."))
                .unwrap_or(subject);
            let operation = match header("KV-Operation") {
                Some("DEL") => "delete",
                Some("PURGE") => "purge",
                _ => "put",
            };
            with_data = operation == "put";
            builder
                .ty(format!("io.mycelium.kv.{operation}"))
                .subject(key)
                .extension("kvbucket", bucket.as_str())
                .extension("kvkey", key)
                .extension("kvoperation", operation)
        }
        TriggerSource::Schedule { .. } => {
            with_data = false;
            builder.ty("io.mycelium.schedule.tick").extension(
                "schedule",
                trigger.source.schedule_spec().unwrap_or_default().as_str(),
            )
        }
    };
    if with_data && !message.payload.is_empty() {
        builder = with_payload(builder, content_type, &message.payload);
    }
    builder.build().map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidEvent,
            format!("the message could not become a CloudEvent: {e}"),
        )
    })
}

/// The payload as the event's data, with its content type: the message's `Content-Type`
/// when it has one, else JSON when it parses as JSON, text when it is UTF-8, bytes otherwise.
fn with_payload(
    builder: EventBuilderV10,
    content_type: Option<&str>,
    payload: &Bytes,
) -> EventBuilderV10 {
    let json = || serde_json::from_slice::<serde_json::Value>(payload).ok();
    match content_type {
        Some(ct) if ct.contains("json") => match json() {
            Some(value) => builder.data(ct, value),
            None => builder.data(ct, payload.to_vec()),
        },
        Some(ct) if ct.starts_with("text/") => {
            builder.data(ct, String::from_utf8_lossy(payload).into_owned())
        }
        Some(ct) => builder.data(ct, payload.to_vec()),
        None => match (json(), std::str::from_utf8(payload)) {
            (Some(value), _) => builder.data("application/json", value),
            (None, Ok(text)) => builder.data("text/plain", text.to_owned()),
            (None, Err(_)) => builder.data("application/octet-stream", payload.to_vec()),
        },
    }
}

/// Publishes a trigger's result events to its `then` subject, one structured CloudEvent per
/// message.
pub(crate) async fn publish_then(
    client: &async_nats::Client,
    trigger: &TriggerName,
    then: &str,
    invocation_id: &str,
    events: &[Event],
) -> Result<(), String> {
    for event in events {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
        headers.insert(TRIGGER_HEADER, trigger.as_str());
        headers.insert(INVOCATION_ID_HEADER, invocation_id);
        let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        client
            .publish_with_headers(then.to_owned(), headers, body.into())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
