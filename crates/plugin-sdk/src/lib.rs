//! Write Mycelium plugins in Rust.
//!
//! Implement the same [`Function`] trait built-in functions use and hand it to [`serve`]:
//! the binary speaks HashiCorp go-plugin's gRPC protocol (handshake, health, controller)
//! and can be deployed with `mycelium deploy NAME ./binary`.
//!
//! ```no_run
//! use mycelium_core::{Event, Function, FunctionError, InvocationContext};
//!
//! struct Echo;
//!
//! #[async_trait::async_trait]
//! impl Function for Echo {
//!     async fn execute(&self, event: Event, _ctx: InvocationContext) -> Result<Vec<Event>, FunctionError> {
//!         Ok(vec![event])
//!     }
//! }
//!
//! fn main() {
//!     mycelium_plugin_sdk::serve(Echo);
//! }
//! ```

mod frame_server;
mod server;

use std::{
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::FutureExt;
use mycelium_core::{
    trace::{PassThrough, TRACEPARENT, TRACESTATE},
    Function, FunctionName, InvocationContext, TraceBridge, TraceContext,
};
use mycelium_plugin_protocol::{
    convert, frames,
    handshake::{self, Handshake, Network, Protocol},
    proto::{
        cloudevents::CloudEventBatch,
        function::{
            execute_response::Result as ExecuteResult, ErrorCode, ExecuteRequest, ExecuteResponse,
            FunctionError as ProtoError,
        },
        go_plugin::{stdio_data::Channel, StdioData},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long calls still in flight get after the host asks the plugin to shut down.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(250);

/// Runs `function` as a plugin until the host shuts it down; never returns.
///
/// Started by hand (without the host's handshake environment) it explains what it is and
/// exits with status 1, as go-plugin plugins do.
pub fn serve(function: impl Function) -> ! {
    Plugin::new(function).serve()
}

/// A plugin with options; [`serve`] is `Plugin::new(function).serve()`.
pub struct Plugin {
    function: Arc<dyn Function>,
    tracing: Arc<dyn TraceBridge>,
}

impl Plugin {
    /// A plugin serving `function`.
    pub fn new(function: impl Function) -> Self {
        Self {
            function: Arc::new(function),
            tracing: Arc::new(PassThrough),
        }
    }

    /// Joins each invocation's span to the caller's trace through `bridge` (for example
    /// `mycelium_observability::OtelBridge` with an OpenTelemetry layer installed), so the
    /// function's own spans join the trace. Without it the function still sees the caller's
    /// context in [`InvocationContext::trace`].
    pub fn tracing(mut self, bridge: Arc<dyn TraceBridge>) -> Self {
        self.tracing = bridge;
        self
    }

    /// Runs the plugin until the host shuts it down; never returns. See [`serve`].
    pub fn serve(self) -> ! {
        serve_plugin(self)
    }
}

/// The `tracing` layer the SDK logs with: one JSON object per line on stderr, with the fields of
/// the current invocation span (`function`, `version`, `invocation_id`, `trace_id`), which the
/// host turns into function log records (`mycelium logs`). [`serve`] installs it with an `info`
/// filter (`RUST_LOG` overrides) unless the plugin installed a subscriber itself; a plugin that
/// does can add this layer to keep its lines attributed.
pub fn log_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_writer(std::io::stderr)
}

fn install_default_logging() {
    use tracing_subscriber::{layer::SubscriberExt, EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::registry().with(log_layer().with_filter(filter));
    // Fails only when the plugin installed its own subscriber first: then that one stays.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

fn serve_plugin(plugin: Plugin) -> ! {
    if std::env::var(handshake::MAGIC_COOKIE_KEY).as_deref() != Ok(handshake::MAGIC_COOKIE_VALUE) {
        eprintln!(
            "This binary is a Mycelium plugin. It is not meant to be run directly: deploy it with \
             `mycelium deploy NAME {}` and invoke it through Mycelium.",
            std::env::args().next().unwrap_or_default()
        );
        std::process::exit(1);
    }
    if let Ok(offered) = std::env::var(handshake::PROTOCOL_VERSIONS_ENV) {
        let wanted = handshake::APP_PROTOCOL_VERSION.to_string();
        if !offered.split(',').any(|v| v.trim() == wanted) {
            eprintln!(
                "the host offers plugin protocol versions {offered}; this plugin speaks {wanted}"
            );
            std::process::exit(1);
        }
    }
    // Mycelium's host offers its frame protocol; go-plugin's own host does not, and gets gRPC.
    let protocol = match std::env::var(frames::OFFER_ENV) {
        Ok(offer) if frames::offered(&offer) => Protocol::Frames,
        _ => Protocol::Grpc,
    };
    // Listening and announced before anything else starts: the host connects and sends its
    // connection preface while the async runtime, logging and output capture come up, instead
    // of after (the socket's backlog holds the connection meanwhile).
    let (listener, path) = match announce(protocol) {
        Ok(announced) => announced,
        Err(error) => {
            eprintln!("cannot listen for the host: {error}");
            std::process::exit(1);
        }
    };
    install_default_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(plugin, listener, &path, protocol)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("plugin failed: {error}");
            1
        }
    };
    let _ = std::fs::remove_file(&path);
    std::process::exit(code)
}

/// Binds the plugin's socket and prints go-plugin's handshake line for it on stdout.
fn announce(protocol: Protocol) -> std::io::Result<(std::os::unix::net::UnixListener, PathBuf)> {
    use std::io::Write;
    let path = socket_path();
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    let line = Handshake {
        app_version: handshake::APP_PROTOCOL_VERSION,
        network: Network::Unix,
        address: path.display().to_string(),
        protocol,
    }
    .line();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok((listener, path))
}

fn socket_path() -> PathBuf {
    let dir = std::env::var_os(handshake::UNIX_SOCKET_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(
        "mycelium-plugin-{}-{nanos:x}.sock",
        std::process::id()
    ))
}

async fn run(
    plugin: Plugin,
    listener: std::os::unix::net::UnixListener,
    path: &std::path::Path,
    protocol: Protocol,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| format!("listening on {}: {e}", path.display()))?;
    let shutdown = CancellationToken::new();
    // From now on what the function prints travels over plugin.GRPCStdio, as with go-plugin.
    let stdio = Stdio::capture();

    let server = server::serve(
        listener,
        Arc::new(server::Services {
            function: Service {
                function: plugin.function,
                tracing: plugin.tracing,
            },
            shutdown: shutdown.clone(),
            stdio,
        }),
        protocol,
    );
    // The host asks for shutdown once the process is idle; the host's own connection
    // would keep a graceful drain waiting, so calls still in flight get a moment, not more.
    tokio::join!(server, async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
    });
    Ok(())
}

/// Runs the plugin's function for `Execute` calls.
struct Service {
    function: Arc<dyn Function>,
    tracing: Arc<dyn TraceBridge>,
}

fn failure(code: ErrorCode, message: String) -> ExecuteResponse {
    ExecuteResponse {
        result: Some(ExecuteResult::Error(ProtoError {
            code: code as i32,
            message,
        })),
    }
}

impl Service {
    /// One call; failures of the function are part of the answer, never a gRPC error.
    async fn execute(
        &self,
        request: ExecuteRequest,
        metadata: &http::HeaderMap,
    ) -> ExecuteResponse {
        // gRPC metadata first (where tracing middleware puts it), then the request's fields.
        let metadata_trace = TraceContext::from_pairs(
            [TRACEPARENT, TRACESTATE]
                .into_iter()
                .filter_map(|key| Some((key, metadata.get(key)?.to_str().ok()?))),
        );
        let context = request.context.unwrap_or_default();
        let incoming_trace = metadata_trace.or_else(|| {
            TraceContext::from_pairs([
                (TRACEPARENT, context.traceparent.as_str()),
                (TRACESTATE, context.tracestate.as_str()),
            ])
        });
        let Some(event) = request.event else {
            return failure(
                ErrorCode::InvalidEvent,
                "the request carries no event".into(),
            );
        };
        let event = match convert::from_proto(event) {
            Ok(event) => event,
            Err(error) => return failure(ErrorCode::InvalidEvent, error.message),
        };
        let name = match FunctionName::new(&context.function_name) {
            Ok(name) => name,
            Err(error) => {
                return failure(
                    ErrorCode::InvalidEvent,
                    format!("the call names no valid function: {error}"),
                )
            }
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let remaining =
            Duration::from_millis(u64::try_from(context.deadline_unix_ms - now_ms).unwrap_or(0));
        let remaining = if context.deadline_unix_ms == 0 {
            Duration::from_secs(3600)
        } else {
            remaining
        };
        let span = tracing::info_span!(
            "invocation",
            function = %name,
            version = context.function_version,
            invocation_id = %context.invocation_id,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let trace = self.tracing.enter(&span, incoming_trace.as_ref());
        mycelium_core::trace::record_ids(&span, incoming_trace.as_ref(), trace.as_ref());
        let token = CancellationToken::new();
        let _cancel_on_drop = token.clone().drop_guard();
        let ctx = InvocationContext::new(
            name,
            context.function_version,
            context.invocation_id,
            Instant::now() + remaining,
            token,
            span.clone(),
        )
        .with_trace(trace);
        let outcome = AssertUnwindSafe(self.function.execute(event, ctx))
            .catch_unwind()
            .instrument(span)
            .await;
        match outcome {
            Ok(Ok(events)) => ExecuteResponse {
                result: Some(ExecuteResult::Events(CloudEventBatch {
                    events: events.iter().map(convert::to_proto).collect(),
                })),
            },
            Ok(Err(error)) => failure(ErrorCode::FunctionError, error.message().to_owned()),
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-text panic payload".into());
                failure(
                    ErrorCode::FunctionError,
                    format!("the plugin function panicked: {reason}"),
                )
            }
        }
    }
}

/// Chunks of captured output waiting for the host; beyond this many, output is dropped
/// rather than blocking the function.
const STDIO_BACKLOG: usize = 1024;

/// The plugin's stdout and stderr, captured into pipes and streamed to the host once.
struct Stdio {
    chunks: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<StdioData>>>,
}

impl Stdio {
    /// The captured chunks, for the first stream that asks.
    fn take(&self) -> Option<tokio::sync::mpsc::Receiver<StdioData>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn capture() -> Self {
        let (sender, receiver) = tokio::sync::mpsc::channel(STDIO_BACKLOG);
        for (fd, channel) in [(1, Channel::Stdout), (2, Channel::Stderr)] {
            match redirect(fd) {
                Ok(pipe) => {
                    let sender = sender.clone();
                    std::thread::spawn(move || pump(pipe, channel, sender));
                }
                // Output then stays on the inherited descriptor, which the host also reads.
                Err(error) => eprintln!("cannot capture fd {fd}: {error}"),
            }
        }
        Self {
            chunks: std::sync::Mutex::new(Some(receiver)),
        }
    }
}

/// Reads a pipe until it closes, forwarding chunks without ever blocking the writer.
fn pump(mut pipe: std::fs::File, channel: Channel, sender: tokio::sync::mpsc::Sender<StdioData>) {
    use std::io::Read;
    let mut buffer = vec![0; 16 * 1024];
    let mut forward = Forward::new(channel, sender);
    while let Ok(read) = pipe.read(&mut buffer) {
        if read == 0 {
            break;
        }
        forward.chunk(&buffer[..read]);
    }
}

/// Forwards one pipe's chunks; what finds the backlog full is dropped and counted, and the
/// count goes out as a line of its own once there is room, so the function's logs say that
/// output is missing instead of silently skipping it.
struct Forward {
    channel: Channel,
    sender: tokio::sync::mpsc::Sender<StdioData>,
    dropped: usize,
}

impl Forward {
    fn new(channel: Channel, sender: tokio::sync::mpsc::Sender<StdioData>) -> Self {
        Self {
            channel,
            sender,
            dropped: 0,
        }
    }

    fn data(&self, data: Vec<u8>) -> StdioData {
        StdioData {
            channel: self.channel as i32,
            data,
        }
    }

    fn chunk(&mut self, chunk: &[u8]) {
        if self.dropped == 0 {
            if self.sender.try_send(self.data(chunk.to_vec())).is_err() {
                self.dropped = chunk.len();
            }
            return;
        }
        // The notice and the chunk go together or not at all: a notice without the chunk
        // would be out of date at once.
        match self.sender.try_reserve_many(2) {
            Ok(mut permits) => {
                let notice = format!(
                    "[mycelium] {} bytes of this plugin's output were dropped: it wrote faster than the host read\n",
                    self.dropped
                );
                self.dropped = 0;
                for data in [notice.into_bytes(), chunk.to_vec()] {
                    if let Some(permit) = permits.next() {
                        permit.send(self.data(data));
                    }
                }
            }
            Err(_) => self.dropped += chunk.len(),
        }
    }
}

/// Points `fd` at a new pipe and returns the pipe's read end.
#[allow(unsafe_code)]
fn redirect(fd: std::os::fd::RawFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let mut ends = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the array we own; dup2/close act on
    // descriptors we just created; from_raw_fd takes sole ownership of the read end.
    unsafe {
        if libc::pipe(ends.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::dup2(ends[1], fd) < 0 {
            let error = std::io::Error::last_os_error();
            libc::close(ends[0]);
            libc::close(ends[1]);
            return Err(error);
        }
        libc::close(ends[1]);
        Ok(std::fs::File::from_raw_fd(ends[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(bytes: usize) -> String {
        format!("[mycelium] {bytes} bytes of this plugin's output were dropped: it wrote faster than the host read\n")
    }

    fn texts(receiver: &mut tokio::sync::mpsc::Receiver<StdioData>) -> Vec<String> {
        std::iter::from_fn(|| receiver.try_recv().ok())
            .map(|chunk| {
                assert_eq!(chunk.channel, Channel::Stderr as i32);
                String::from_utf8(chunk.data).unwrap()
            })
            .collect()
    }

    #[test]
    fn output_that_finds_the_backlog_full_is_counted_and_reported() {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(2);
        let mut forward = Forward::new(Channel::Stderr, sender);
        forward.chunk(b"one\n");
        forward.chunk(b"two\n");
        forward.chunk(b"three\n");
        assert_eq!(texts(&mut receiver), ["one\n", "two\n"]);
        // Room for both: the notice first, then the chunk.
        forward.chunk(b"four\n");
        assert_eq!(texts(&mut receiver), [notice(6), "four\n".into()]);
        // Room for one only: the chunk is dropped too, and counted with the earlier one.
        forward.chunk(b"five\n");
        forward.chunk(b"six\n");
        forward.chunk(b"seven\n");
        assert_eq!(receiver.try_recv().unwrap().data, b"five\n");
        forward.chunk(b"eight\n");
        assert_eq!(texts(&mut receiver), ["six\n"]);
        forward.chunk(b"ten\n");
        assert_eq!(texts(&mut receiver), [notice(12), "ten\n".into()]);
        forward.chunk(b"nine\n");
        assert_eq!(texts(&mut receiver), ["nine\n"], "nothing more to report");
    }
}
