//! Logging set-up, exit codes and how failures are shown.

use mycelium_client::{ConnectError, RequestError, RequestErrorKind};
use mycelium_core::ErrorCode;
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command, LogFormat};

/// The request reached a runtime and failed (the error code says why).
pub const EXIT_FAILED: u8 = 1;
/// The command line is wrong (clap exits with the same code for what it catches itself).
pub const EXIT_USAGE: u8 = 2;
/// NATS or a runtime could not be reached, or no reply came in time.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Mycelium itself failed.
pub const EXIT_INTERNAL: u8 = 4;

/// What failed: the `<code>` of `error[<code>]` and the exit status it means, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A code of the invocation protocol: the request reached Mycelium and was refused.
    Remote(ErrorCode),
    /// Flags that do not go together.
    Usage,
    /// `--data` could not be read.
    InvalidData,
    /// A deploy under the name of a runtime's built-in, without `--replace-builtin`.
    BuiltinName,
    /// A deploy of a file that is not a program.
    NotExecutable,
    /// A deploy of a binary that cannot be read.
    ArtifactUnreadable,
    /// A deploy of an empty binary.
    ArtifactEmpty,
    /// `up` on a data directory another process uses.
    DataDirInUse,
    /// `logs` without a log stream to read history from.
    NoLogHistory,
    /// NATS could not be reached.
    Connection,
    /// No runtime answered.
    NoRuntime,
    /// No reply came in time.
    NoReply,
    /// The embedded nats-server failed.
    NatsServer,
    /// The NATS server has no JetStream.
    NoJetstream,
    /// The registry could not be used.
    Registry,
    /// The runtime could not subscribe.
    Start,
    /// Reading from NATS failed midway.
    Unreachable,
    /// A reply that is not the protocol's.
    InvalidReply,
    /// The runtime's settings are unusable.
    Config,
    /// The metrics address cannot be served.
    MetricsAddr,
    /// The plugin directory cannot be used.
    PluginDir,
    /// No stream stores asynchronous invocations (no runtime with JetStream started).
    NoAsyncStream,
    /// The asynchronous invocation stream is full.
    StreamFull,
    /// `dlq replay` found nothing to replay.
    NothingToReplay,
    /// A trigger that cannot be added (bad source, missing function, stream or bucket).
    InvalidTrigger,
    /// No trigger of that name.
    TriggerNotFound,
    /// A secret name, value or xkey that cannot be used.
    InvalidSecret,
    /// `secret set` with no public xkey to seal for (none given, none announced).
    NoXkey,
    /// No secret of that name.
    SecretNotFound,
    /// Anything else inside the CLI.
    Internal,
}

impl Code {
    /// The text inside `error[...]`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Remote(code) => code.as_str(),
            Code::Usage => "usage",
            Code::InvalidData => "invalid_data",
            Code::BuiltinName => "builtin_name",
            Code::NotExecutable => "not_executable",
            Code::ArtifactUnreadable => "artifact_unreadable",
            Code::ArtifactEmpty => "artifact_empty",
            Code::DataDirInUse => "data_dir_in_use",
            Code::NoLogHistory => "no_log_history",
            Code::Connection => "connection",
            Code::NoRuntime => "no_runtime",
            Code::NoReply => "no_reply",
            Code::NatsServer => "nats_server",
            Code::NoJetstream => "no_jetstream",
            Code::Registry => "registry",
            Code::Start => "start",
            Code::Unreachable => "unreachable",
            Code::InvalidReply => "invalid_reply",
            Code::Config => "config",
            Code::MetricsAddr => "metrics_addr",
            Code::PluginDir => "plugin_dir",
            Code::NoAsyncStream => "no_async_stream",
            Code::StreamFull => "stream_full",
            Code::NothingToReplay => "nothing_to_replay",
            Code::InvalidTrigger => "invalid_trigger",
            Code::TriggerNotFound => "trigger_not_found",
            Code::InvalidSecret => "invalid_secret",
            Code::NoXkey => "no_xkey",
            Code::SecretNotFound => "secret_not_found",
            Code::Internal => "internal",
        }
    }

    /// The exit status.
    pub fn exit(self) -> u8 {
        match self {
            Code::Remote(_)
            | Code::InvalidData
            | Code::BuiltinName
            | Code::NotExecutable
            | Code::ArtifactUnreadable
            | Code::ArtifactEmpty
            | Code::DataDirInUse
            | Code::NoLogHistory
            | Code::StreamFull
            | Code::NothingToReplay
            | Code::InvalidTrigger
            | Code::TriggerNotFound
            | Code::InvalidSecret
            | Code::NoXkey
            | Code::SecretNotFound => EXIT_FAILED,
            Code::Usage => EXIT_USAGE,
            Code::Connection
            | Code::NoRuntime
            | Code::NoReply
            | Code::NatsServer
            | Code::NoJetstream
            | Code::Registry
            | Code::Start
            | Code::Unreachable
            | Code::NoAsyncStream => EXIT_UNREACHABLE,
            Code::InvalidReply
            | Code::Config
            | Code::MetricsAddr
            | Code::PluginDir
            | Code::Internal => EXIT_INTERNAL,
        }
    }
}

/// A command's failure: printed as `error[<code>]: <message>`, exiting with the code's status.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<RequestError> for Failure {
    fn from(error: RequestError) -> Self {
        let code = match error.kind() {
            RequestErrorKind::Remote(code) => Code::Remote(code),
            RequestErrorKind::InvalidName => Code::Remote(ErrorCode::InvalidFunctionName),
            RequestErrorKind::NoResponders => Code::NoRuntime,
            RequestErrorKind::TimedOut => Code::NoReply,
            RequestErrorKind::Transport => Code::Connection,
            RequestErrorKind::InvalidReply => Code::InvalidReply,
        };
        Failure::new(code, error_chain(&error))
    }
}

impl From<ConnectError> for Failure {
    fn from(error: ConnectError) -> Self {
        Failure::new(Code::Connection, error_chain(&error))
    }
}

/// `10.0 MiB`, or `-` for none.
pub fn human_size(size: Option<u64>) -> String {
    let Some(size) = size else { return "-".into() };
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = size as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{size} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `sha256:0123456789ab`, or `-` for none.
pub fn short_digest(digest: Option<&str>) -> String {
    digest.map_or_else(|| "-".into(), |d| d.chars().take(19).collect())
}

/// An error and its sources on one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    mycelium_core::Chain(error).to_string()
}

/// Logs go to stderr, filtered by RUST_LOG; servers log at info, one-shot commands at warn.
pub fn init_logging(cli: &Cli) -> Option<TracerProvider> {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};
    let default = match cli.command {
        Command::Up(_) | Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let otlp_endpoint = match &cli.command {
        Command::Up(args) => args.runtime.otlp_endpoint.as_deref(),
        Command::Serve(args) => args.runtime.otlp_endpoint.as_deref(),
        _ => None,
    };
    let provider = otlp_endpoint.and_then(|endpoint| {
        mycelium_observability::tracer_provider("mycelium", Some(endpoint))
            .inspect_err(|error| eprintln!("warning: {error}; traces will not be exported"))
            .ok()
    });
    // Colours only for a person at a terminal: log files and journald get plain text (and
    // the runtime skips the escape-code formatting on every span, which showed in profiles).
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match cli.log_format {
        LogFormat::Human => fmt.with_filter(filter()).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter()).boxed(),
    };
    // Each layer has its own filter: RUST_LOG sets what the runtime prints and which events of
    // built-ins are published, not which spans a trace has (invocations always, when
    // exporting). Plugin output is published whole (within its budget) by the plugin host.
    // A runtime publishes what its functions log; other commands have no functions.
    let function_logs = matches!(cli.command, Command::Up(_) | Command::Serve(_)).then(|| {
        let (layer, logs) = mycelium_runtime::function_logs();
        let _ = FUNCTION_LOGS.set(logs);
        layer.with_filter(filter())
    });
    let otel = provider.as_ref().map(|provider| {
        // Info and above, and every invocation span (debug level, so that without tracing
        // the runtime does not build them).
        mycelium_observability::otel_layer(provider).with_filter(
            tracing_subscriber::filter::filter_fn(|metadata| {
                *metadata.level() <= tracing::Level::INFO
                    || (metadata.is_span() && metadata.name() == "invocation")
            }),
        )
    });
    tracing_subscriber::registry()
        .with(otel)
        .with(function_logs)
        .with(fmt)
        .init();
    provider
}

static FUNCTION_LOGS: std::sync::OnceLock<std::sync::Arc<mycelium_runtime::FunctionLogs>> =
    std::sync::OnceLock::new();

/// The function log pipeline `init_logging` installed (for `up` and `serve`).
pub fn function_logs() -> Option<std::sync::Arc<mycelium_runtime::FunctionLogs>> {
    FUNCTION_LOGS.get().cloned()
}

/// The OpenTelemetry tracer provider, flushed with `shutdown` before exit.
pub type TracerProvider = opentelemetry_sdk::trace::SdkTracerProvider;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_digests_for_people() {
        assert_eq!(human_size(None), "-");
        assert_eq!(human_size(Some(512)), "512 B");
        assert_eq!(human_size(Some(10 * 1024 * 1024)), "10.0 MiB");
        assert_eq!(
            short_digest(Some("sha256:0123456789abcdef0123")),
            "sha256:0123456789ab"
        );
        assert_eq!(short_digest(None), "-");
    }
}
