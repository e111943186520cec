//! Function log records as published on NATS (`<prefix>.logs.<function>`), one JSON object per
//! message, so `mycelium logs` or any NATS client can follow a function from anywhere.

use serde::{Deserialize, Serialize};

use crate::FunctionName;

/// The `tracing` target under which the plugin host relays plugin output lines.
pub const PLUGIN_OUTPUT_TARGET: &str = "mycelium::plugin";

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
