//! Function logs on NATS: what functions log reaches [`FunctionLogs`] as [`LogRecord`]s
//! (plugin output from the plugin host through [`LogSink`]; events emitted while a built-in's
//! invocation runs through a `tracing` layer), and a task publishes each on
//! `<prefix>.logs.<function>`.
//!
//! The layer never blocks the code that logs: records go through a bounded channel, and when
//! NATS cannot keep up the excess is counted and dropped.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use mycelium_core::logs::{logs_subject, LogRecord, LogSink, LOG_STREAM};
use tokio::sync::mpsc;
use tracing::{
    field::{Field, Visit},
    Event, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

pub use mycelium_core::logs::PLUGIN_OUTPUT_TARGET;
tokio::task_local! {
    /// The invocation whose code is running: what the log layer attributes events to.
    pub(crate) static CURRENT_INVOCATION: mycelium_core::InvocationContext;
}

/// Libraries whose events inside an invocation are transport detail, not function output.
const TRANSPORT_TARGETS: [&str; 8] = [
    "h2",
    "hyper",
    "tonic",
    "tower",
    "async_nats",
    "wasmtime",
    "cranelift",
    "wiggle",
];

/// Records waiting for NATS; beyond this many they are dropped (and counted).
const BACKLOG: usize = 4096;

/// Function log records on their way to NATS. Make one with [`function_logs`], install its
/// layer in the subscriber, and hand it to [`RuntimeBuilder::function_logs`](crate::RuntimeBuilder::function_logs).
pub struct FunctionLogs {
    sender: mpsc::Sender<LogRecord>,
    receiver: Mutex<Option<mpsc::Receiver<LogRecord>>>,
    dropped: AtomicU64,
}

impl fmt::Debug for FunctionLogs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionLogs")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// A log pipeline: the layer for the `tracing` subscriber and the handle for the runtime.
pub fn function_logs() -> (FunctionLogLayer, Arc<FunctionLogs>) {
    let (sender, receiver) = mpsc::channel(BACKLOG);
    let logs = Arc::new(FunctionLogs {
        sender,
        receiver: Mutex::new(Some(receiver)),
        dropped: AtomicU64::new(0),
    });
    (FunctionLogLayer { logs: logs.clone() }, logs)
}

impl FunctionLogs {
    /// Records dropped because NATS did not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Publishes records on `<prefix>.logs.<function>` until the runtime stops; keeps recent
    /// ones in the JetStream stream [`LOG_STREAM`] when the server has JetStream. Only the
    /// first call starts a publisher.
    pub(crate) fn start(&self, client: async_nats::Client, prefix: String) {
        let Some(mut receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        tokio::spawn(async move {
            ensure_stream(&client, &prefix).await;
            while let Some(record) = receiver.recv().await {
                let subject = logs_subject(&prefix, &record.function);
                let Ok(body) = serde_json::to_vec(&record) else {
                    continue;
                };
                if client.publish(subject, body.into()).await.is_err() {
                    // The connection is closed for good; nothing more can be sent.
                    break;
                }
            }
        });
    }
}

impl LogSink for FunctionLogs {
    fn record(&self, record: LogRecord) {
        if self.sender.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Lines kept per function: one function's flood replaces its own history, not another's.
const LINES_KEPT_PER_FUNCTION: i64 = 10_000;

/// Keeps the last hour (at most 64 MiB, and [`LINES_KEPT_PER_FUNCTION`] per function) of
/// function logs, so `mycelium logs` can show what happened before it was started. A stream
/// made by an older runtime gets the per-function limit too. Best effort: without JetStream,
/// logs are live only.
async fn ensure_stream(client: &async_nats::Client, prefix: &str) {
    let jetstream = async_nats::jetstream::new(client.clone());
    let config = async_nats::jetstream::stream::Config {
        name: LOG_STREAM.into(),
        subjects: vec![format!("{prefix}.logs.>")],
        max_age: Duration::from_secs(3600),
        max_bytes: 64 * 1024 * 1024,
        max_messages_per_subject: LINES_KEPT_PER_FUNCTION,
        discard: async_nats::jetstream::stream::DiscardPolicy::Old,
        ..Default::default()
    };
    if let Err(error) = jetstream.create_or_update_stream(config).await {
        tracing::debug!(%error, "function logs are live only (no JetStream stream for them)");
    }
}

/// The `tracing` layer of a [`FunctionLogs`] pipeline.
pub struct FunctionLogLayer {
    logs: Arc<FunctionLogs>,
}

/// An event's message.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S> Layer<S> for FunctionLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        // Plugin output reaches the logs as records from the plugin host (this is its echo in
        // the runtime's own log); transport events are the plumbing of a call, not something
        // the function said.
        if metadata.target() == PLUGIN_OUTPUT_TARGET
            || TRANSPORT_TARGETS
                .iter()
                .any(|t| metadata.target().starts_with(t))
        {
            return;
        }
        // An event in an invocation's code (a built-in's, or the runtime's about it).
        let Ok(mut record) = CURRENT_INVOCATION.try_with(|ctx| {
            let mut record = LogRecord::now(
                &metadata.level().as_str().to_ascii_lowercase(),
                ctx.function().clone(),
                ctx.version(),
                "tracing",
                String::new(),
            );
            record.invocation_id = Some(ctx.invocation_id().to_owned());
            record.trace_id = ctx.trace().map(|t| t.trace_id().to_owned());
            record
        }) else {
            return;
        };
        let mut message = Message::default();
        event.record(&mut message);
        record.message = message.0;
        self.logs.record(record);
    }
}
