//! Function log records as published on NATS (`<prefix>.logs.<function>`), one JSON object per
//! message, so `mycelium logs` or any NATS client can follow a function from anywhere.

use serde::{Deserialize, Serialize};

use crate::FunctionName;

/// The `tracing` target under which the plugin host echoes plugin output lines into the
/// runtime's own log (they reach function logs as [`LogRecord`]s through a [`LogSink`]).
pub const PLUGIN_OUTPUT_TARGET: &str = "mycelium::plugin";

/// Where function log records go: the runtime's publisher. Executors whose functions print
/// outside the runtime's `tracing` (plugin processes) hand their lines to it as records.
pub trait LogSink: Send + Sync + std::fmt::Debug + 'static {
    /// Takes one record; never blocks (a sink that cannot keep up drops and counts).
    fn record(&self, record: LogRecord);
}

/// The JetStream stream that keeps recent log records (when the runtime has JetStream).
pub const LOG_STREAM: &str = "MYCELIUM_LOGS";

/// The subject a function's log records are published on.
pub fn logs_subject(prefix: &str, function: &FunctionName) -> String {
    format!("{prefix}.logs.{function}")
}

/// One line a function logged: a plugin's stdout or stderr line (hclog JSON lines keep their
/// level and message), or a `tracing` event inside a built-in's invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogRecord {
    /// When the runtime saw the line, RFC 3339 in UTC.
    pub time: String,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The function that logged.
    pub function: FunctionName,
    /// Its version.
    pub version: u64,
    /// The invocation, when the line is known to belong to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
    /// The W3C trace id of that invocation, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// `stdout` or `stderr` for plugin output, `tracing` for built-in events.
    pub source: String,
    /// The text.
    pub message: String,
}

impl LogRecord {
    /// A record stamped with the current time, not attributed to an invocation.
    pub fn now(
        level: &str,
        function: FunctionName,
        version: u64,
        source: &str,
        message: String,
    ) -> Self {
        Self {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            level: level.to_owned(),
            function,
            version,
            invocation_id: None,
            trace_id: None,
            source: source.to_owned(),
            message,
        }
    }
}
