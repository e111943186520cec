//! Function log records as published on NATS (`<prefix>.logs.<function>`), one JSON object per
//! message, so `mycelium logs` or any NATS client can follow a function from anywhere.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::FunctionName;

/// A function's allowance of output lines per second, shared by everything that runs it (its
/// plugin processes, its WebAssembly instances). Lines beyond it are dropped, and the next line
/// let through is preceded by one record counting them: a function printing in a loop must not
/// flood the runtime's log, its CPU, or the log stream every function shares.
#[derive(Debug)]
pub struct OutputBudget {
    lines_per_second: u32,
    state: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    /// When the current one-second window began (none before the first line).
    window: Option<Instant>,
    used: u32,
    dropped: u64,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it, after a record of the `dropped` lines before it (when not 0).
    Pass {
        /// Lines dropped since the last one let through.
        dropped: u64,
    },
    /// Drop it (counted).
    Drop,
}

impl OutputBudget {
    /// An allowance of `lines_per_second` (at least 1).
    pub fn new(lines_per_second: u32) -> Arc<Self> {
        Arc::new(Self {
            lines_per_second: lines_per_second.max(1),
            state: Mutex::default(),
        })
    }

    /// The allowance.
    pub fn lines_per_second(&self) -> u32 {
        self.lines_per_second
    }

    /// Whether a line seen at `now` is let through.
    pub fn admit(&self, now: Instant) -> Admit {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state
            .window
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1))
        {
            state.window = Some(now);
            state.used = 0;
        }
        if state.used >= self.lines_per_second {
            state.dropped += 1;
            return Admit::Drop;
        }
        state.used += 1;
        Admit::Pass {
            dropped: std::mem::take(&mut state.dropped),
        }
    }

    /// The lines dropped since the last one let through (reset to 0): for a last record when
    /// the output ends.
    pub fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).dropped)
    }

    /// The record that stands for `dropped` lines.
    pub fn dropped_message(&self, dropped: u64) -> String {
        format!(
            "{dropped} lines dropped: the function's output exceeded {} lines per second",
            self.lines_per_second
        )
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_lets_its_lines_through_per_second_and_counts_the_rest() {
        let budget = OutputBudget::new(2);
        let start = Instant::now();
        assert_eq!(budget.admit(start), Admit::Pass { dropped: 0 });
        assert_eq!(budget.admit(start), Admit::Pass { dropped: 0 });
        assert_eq!(budget.admit(start), Admit::Drop);
        assert_eq!(
            budget.admit(start + Duration::from_millis(999)),
            Admit::Drop
        );
        // A new window: the first line carries the count of those dropped.
        let next = start + Duration::from_secs(1);
        assert_eq!(budget.admit(next), Admit::Pass { dropped: 2 });
        assert_eq!(budget.admit(next), Admit::Pass { dropped: 0 });
        assert_eq!(budget.admit(next), Admit::Drop);
        assert_eq!(budget.take_dropped(), 1);
        assert_eq!(budget.take_dropped(), 0);
        assert_eq!(
            budget.dropped_message(7),
            "7 lines dropped: the function's output exceeded 2 lines per second"
        );
    }
}
