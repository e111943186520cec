//! Logging set-up, exit codes and how failures are shown.

use mycelium_client::{ConnectError, RequestError, RequestErrorKind};
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

/// A command's failure: printed as `error[<code>]: <message>` and exited with `exit`.
#[derive(Debug)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub exit: u8,
}

impl Failure {
    pub fn new(code: impl Into<String>, message: impl Into<String>, exit: u8) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            exit,
        }
    }
}

impl From<RequestError> for Failure {
    fn from(error: RequestError) -> Self {
        let (code, exit) = match error.kind() {
            RequestErrorKind::Remote(code) => (code.as_str(), EXIT_FAILED),
            RequestErrorKind::InvalidName => ("invalid_function_name", EXIT_FAILED),
            RequestErrorKind::NoResponders => ("no_runtime", EXIT_UNREACHABLE),
            RequestErrorKind::TimedOut => ("no_reply", EXIT_UNREACHABLE),
            RequestErrorKind::Transport => ("connection", EXIT_UNREACHABLE),
            RequestErrorKind::InvalidReply => ("invalid_reply", EXIT_INTERNAL),
        };
        Failure::new(code, error_chain(&error), exit)
    }
}

impl From<ConnectError> for Failure {
    fn from(error: ConnectError) -> Self {
        Failure::new("connection", error_chain(&error), EXIT_UNREACHABLE)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::new("cli", format!("{error:#}"), EXIT_FAILED)
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
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
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
    // Each layer has its own filter: RUST_LOG sets what the runtime prints, not what its
    // functions publish (their output at info and above always is) nor which spans a trace
    // has (invocations always, when exporting).
    // A runtime publishes what its functions log; other commands have no functions.
    let function_logs = matches!(cli.command, Command::Up(_) | Command::Serve(_)).then(|| {
        use tracing_subscriber::filter::{filter_fn, FilterExt};
        let (layer, logs) = mycelium_runtime::function_logs();
        let _ = FUNCTION_LOGS.set(logs);
        let plugin_output = filter_fn(|metadata| {
            metadata.target() == mycelium_runtime::logs::PLUGIN_OUTPUT_TARGET
                && *metadata.level() <= tracing::Level::INFO
        });
        layer.with_filter(plugin_output.or(filter()))
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
