//! What a plugin prints: lines read from its pipes (or go-plugin's stdio stream) within the
//! function's budget, logged under the function's name, and the secrets cut from output
//! quoted to callers.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Instant,
};

pub use mycelium_core::logs::OutputBudget;
use mycelium_core::{
    logs::{Admit, LogRecord, LogSink},
    secret::{SecretEnv, MIN_REDACTED_LEN},
    FunctionName,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};

use crate::host::ProcessConfig;

/// The longest output line relayed; longer lines are cut (a flood cannot exhaust memory).
pub(crate) const MAX_LINE: usize = 8 * 1024;
/// Lines of stderr kept for error messages.
pub(crate) const STDERR_TAIL: usize = 20;

/// Secret texts to cut from plugin output before it reaches a caller in an error message:
/// callers of a function are not necessarily its deployer, and a plugin that prints its
/// environment (or anything it could read) would otherwise hand it to them.
#[derive(Clone, Default)]
pub struct Redactions(Arc<[String]>);

/// Counts the texts instead of printing them: a config printed in a log line must not carry
/// the secrets it is there to hide.
impl std::fmt::Debug for Redactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactions")
            .field("texts", &self.0.len())
            .finish()
    }
}

/// The shortest value treated as a secret.
pub const MIN_SECRET_LEN: usize = 8;

/// Variables of the runtime's environment known to hold no secrets (their values are shown).
const PUBLIC_VARIABLES: [&str; 12] = [
    "PATH", "HOME", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "TERM", "LANG", "TMPDIR",
    "HOSTNAME", "RUST_LOG",
];

impl Redactions {
    /// The values of the runtime's environment, except variables known to be harmless (read
    /// once per executor; [`Self::with_env`] adds each function's own).
    pub fn of_runtime() -> Self {
        let values = std::env::vars_os().filter_map(|(key, value)| {
            let key = key.to_str()?;
            let public = PUBLIC_VARIABLES.contains(&key)
                || ["LC_", "XDG_", "MYCELIUM_", "CARGO"]
                    .iter()
                    .any(|prefix| key.starts_with(prefix));
            (!public).then(|| value.into_string().ok()).flatten()
        });
        Self::from_values(values)
    }

    /// These secrets, the values of `env` (a function's own variables) and its opened
    /// `secrets` (cut from a shorter length: they are known to be secret).
    pub fn with_env(&self, env: &BTreeMap<String, String>, secrets: &SecretEnv) -> Self {
        let mut values: Vec<String> = self.0.iter().chain(env.values()).cloned().collect();
        values.retain(|v| v.len() >= MIN_SECRET_LEN);
        values.extend(
            secrets
                .values()
                .filter(|v| v.len() >= MIN_REDACTED_LEN)
                .map(str::to_owned),
        );
        Self::sorted(values)
    }

    /// Values shorter than [`MIN_SECRET_LEN`] are left: cutting words like `exit` or `true`
    /// out of text garbles it and hides nothing.
    fn from_values(values: impl Iterator<Item = String>) -> Self {
        Self::sorted(values.filter(|v| v.len() >= MIN_SECRET_LEN).collect())
    }

    fn sorted(mut values: Vec<String>) -> Self {
        // Longest first, so a secret containing another is cut whole.
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Self(values.into())
    }

    /// `text` with every secret replaced by `[redacted]`.
    pub fn apply(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in self.0.iter() {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "[redacted]");
            }
        }
        text
    }
}

/// Reads one line (up to [`MAX_LINE`] bytes, the rest of an overlong line dropped); `None` at EOF.
pub(crate) async fn read_line(reader: &mut (impl AsyncBufRead + Unpin)) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let buffer = reader.fill_buf().await.ok()?;
        if buffer.is_empty() {
            return (!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned());
        }
        let (chunk, found) = match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => (&buffer[..end], Some(end + 1)),
            None => (buffer, None),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = found.unwrap_or(buffer.len());
        reader.consume(consumed);
        if found.is_some() {
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// Where one process's output lines go: the function's log records and the runtime's own
/// log, within the function's budget.
pub(crate) struct Output {
    function: FunctionName,
    version: u64,
    pid: u32,
    budget: Arc<OutputBudget>,
    sink: Option<Arc<dyn LogSink>>,
    secrets: SecretEnv,
}

impl Output {
    pub(crate) fn new(config: &ProcessConfig, pid: u32) -> Self {
        Self {
            function: config.function.clone(),
            version: config.version,
            pid,
            budget: config.output_budget.clone(),
            sink: config.log_sink.clone(),
            secrets: config.secrets.clone(),
        }
    }

    pub(crate) fn line(&self, stream: &'static str, line: &str) {
        if line.is_empty() {
            return;
        }
        match self.budget.admit(Instant::now()) {
            Admit::Drop => {}
            Admit::Pass { dropped } => {
                self.report_dropped(dropped);
                self.emit(Line::parse(stream, line));
            }
        }
    }

    /// At the end of the output: the lines dropped since the last one let through.
    pub(crate) fn finish(&self) {
        self.report_dropped(self.budget.take_dropped());
    }

    fn report_dropped(&self, dropped: u64) {
        if dropped > 0 {
            self.emit(Line {
                stream: "stderr",
                level: "warn",
                message: self.budget.dropped_message(dropped),
                invocation_id: None,
                trace_id: None,
            });
        }
    }

    /// Hands the line to the function's log records and echoes it into the runtime's log.
    fn emit(&self, line: Line) {
        let Line {
            stream,
            level,
            message,
            invocation_id,
            trace_id,
        } = line;
        // A plugin printing its own secrets must not put them in the logs.
        let message = match self.secrets.redact(&message) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(redacted) => redacted,
        };
        let function = &self.function;
        let (version, pid) = (self.version, self.pid);
        macro_rules! echo {
            ($level:ident) => {
                match &invocation_id {
                    Some(invocation_id) => tracing::$level!(
                        target: mycelium_core::logs::PLUGIN_OUTPUT_TARGET,
                        function = %function, version, pid, stream, invocation_id,
                        trace_id = trace_id.as_deref().unwrap_or_default(),
                        "{message}"
                    ),
                    None => tracing::$level!(
                        target: mycelium_core::logs::PLUGIN_OUTPUT_TARGET,
                        function = %function, version, pid, stream,
                        "{message}"
                    ),
                }
            };
        }
        match level {
            "trace" => echo!(trace),
            "debug" => echo!(debug),
            "warn" => echo!(warn),
            "error" => echo!(error),
            _ => echo!(info),
        }
        if let Some(sink) = &self.sink {
            let mut record = LogRecord::now(level, function.clone(), version, stream, message);
            record.invocation_id = invocation_id;
            record.trace_id = trace_id;
            sink.record(record);
        }
    }
}

/// One output line as the log shows it.
struct Line {
    stream: &'static str,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    level: &'static str,
    message: String,
    invocation_id: Option<String>,
    trace_id: Option<String>,
}

impl Line {
    /// JSON lines keep their level and message: go-plugin's hclog (`@level`, `@message`) and
    /// the Rust SDK's (`level`, `message`, and the invocation span's `invocation_id` and
    /// `trace_id`, which attribute the line to its call). Anything else is an info line.
    fn parse(stream: &'static str, line: &str) -> Line {
        let parsed = line
            .starts_with('{')
            .then(|| serde_json::from_str::<serde_json::Value>(line).ok())
            .flatten();
        let text = |keys: &[&str]| -> Option<String> {
            let json = parsed.as_ref()?;
            keys.iter().find_map(|key| {
                json.get(key)
                    .or_else(|| json.get("span")?.get(key))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
        };
        let level = match text(&["@level", "level"])
            .map(|l| l.to_ascii_lowercase())
            .as_deref()
        {
            Some("trace") => "trace",
            Some("debug") => "debug",
            Some("warn" | "warning") => "warn",
            Some("error") => "error",
            _ => "info",
        };
        Line {
            stream,
            level,
            message: text(&["@message", "message"]).unwrap_or_else(|| line.to_owned()),
            invocation_id: text(&["invocation_id"]),
            trace_id: text(&["trace_id"]),
        }
    }
}

/// Relays a plugin's output into the log, tagged with the function; keeps a tail if asked
/// (the tail sees every line: it is for error messages, not the log).
pub(crate) async fn relay(
    mut reader: BufReader<impl AsyncRead + Unpin>,
    output: Output,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    stream: &'static str,
) {
    while let Some(line) = read_line(&mut reader).await {
        if let Some(tail) = &tail {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line.clone());
        }
        output.line(stream, &line);
    }
    output.finish();
}

/// Relays go-plugin's stdio stream. A chunk is one write, not one line (an unbuffered stderr
/// writes a line in pieces): lines are assembled per channel.
pub(crate) async fn relay_stdio_stream(
    mut stream: crate::channel::Messages<crate::proto::go_plugin::StdioData>,
    output: Output,
) {
    let mut pending = [Vec::new(), Vec::new()];
    while let Ok(Some(chunk)) = stream.message().await {
        let (index, channel) = if chunk.channel == 2 {
            (1, "stderr")
        } else {
            (0, "stdout")
        };
        let partial = &mut pending[index];
        for piece in chunk.data.split_inclusive(|&b| b == b'\n') {
            let room = MAX_LINE.saturating_sub(partial.len());
            let complete = piece.ends_with(b"\n");
            let text = piece.strip_suffix(b"\n").unwrap_or(piece);
            partial.extend_from_slice(&text[..text.len().min(room)]);
            if complete {
                output.line(channel, &String::from_utf8_lossy(partial));
                partial.clear();
            }
        }
    }
    for (partial, channel) in pending.iter().zip(["stdout", "stderr"]) {
        if !partial.is_empty() {
            output.line(channel, &String::from_utf8_lossy(partial));
        }
    }
    output.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactions_print_how_many_texts_not_the_texts() {
        let env = BTreeMap::from([("API_KEY".to_owned(), "do-not-print-me".to_owned())]);
        let redactions = Redactions::default().with_env(&env, &SecretEnv::default());
        assert_eq!(redactions.apply("key do-not-print-me"), "key [redacted]");
        assert_eq!(format!("{redactions:?}"), "Redactions { texts: 1 }");
    }

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<LogRecord>>);

    impl LogSink for Collect {
        fn record(&self, record: LogRecord) {
            self.0.lock().unwrap().push(record);
        }
    }

    fn output(lines_per_second: u32) -> (Output, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        let output = Output {
            function: "chatty".parse().unwrap(),
            version: 3,
            pid: 42,
            budget: OutputBudget::new(lines_per_second),
            sink: Some(sink.clone()),
            secrets: SecretEnv::new([(
                "TOKEN".to_owned(),
                "token".parse().unwrap(),
                1,
                "hunter2-token".to_owned(),
            )]),
        };
        (output, sink)
    }

    #[test]
    fn secrets_are_cut_out_of_output_lines() {
        let (output, sink) = output(100);
        output.line("stdout", "connecting with hunter2-token now");
        let records = sink.0.lock().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].message, "connecting with [redacted] now");
    }

    #[test]
    fn output_lines_become_typed_records() {
        let (output, sink) = output(100);
        output.line("stdout", "plain text");
        output.line(
            "stderr",
            r#"{"@level":"WARN","@message":"from hclog","@module":"p"}"#,
        );
        output.line(
            "stderr",
            r#"{"level":"ERROR","message":"from the SDK","span":{"invocation_id":"inv-1","trace_id":"0af7"}}"#,
        );
        output.line("stdout", "");
        output.line("stdout", "{not json");
        let records = sink.0.lock().unwrap();
        let seen: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.level.as_str(),
                    r.source.as_str(),
                    r.message.as_str(),
                    r.invocation_id.as_deref(),
                    r.trace_id.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("info", "stdout", "plain text", None, None),
                ("warn", "stderr", "from hclog", None, None),
                (
                    "error",
                    "stderr",
                    "from the SDK",
                    Some("inv-1"),
                    Some("0af7")
                ),
                ("info", "stdout", "{not json", None, None),
            ]
        );
        assert!(records
            .iter()
            .all(|r| r.function.as_str() == "chatty" && r.version == 3));
    }

    #[test]
    fn lines_over_the_budget_are_counted_in_one_record() {
        let (output, sink) = output(2);
        for n in 0..5 {
            output.line("stdout", &format!("line {n}"));
        }
        output.finish();
        let records = sink.0.lock().unwrap();
        let messages: Vec<_> = records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "line 0",
                "line 1",
                "3 lines dropped: the function's output exceeded 2 lines per second"
            ]
        );
        assert_eq!(records[2].level, "warn");
    }
}
