//! Logging set-up, exit codes and how failures are shown.

use mycelium_client::{ConnectError, RequestError, RequestErrorKind};
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command, LogFormat};

/// The request reached a runtime and failed (the error code says why).
pub const EXIT_FAILED: u8 = 1;
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
pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Up(_) | Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
