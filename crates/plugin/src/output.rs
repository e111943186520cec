//! What a plugin prints: lines read from its pipes (or go-plugin's stdio stream) within the
//! function's budget, logged under the function's name, and the secrets cut from output
//! quoted to callers.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mycelium_core::FunctionName;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};

use crate::host::ProcessConfig;

/// The longest output line relayed; longer lines are cut (a flood cannot exhaust memory).
pub(crate) const MAX_LINE: usize = 8 * 1024;
/// Lines of stderr kept for error messages.
pub(crate) const STDERR_TAIL: usize = 20;

/// A function's allowance of output lines per second, shared by its processes. Lines beyond
/// it are dropped, and the next line let through is preceded by one record counting them: a
/// plugin printing in a loop must not flood the runtime's log, its CPU, or the log stream
/// every function shares.
#[derive(Debug)]
pub struct OutputBudget {
    lines_per_second: u32,
    state: Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    window: Instant,
    used: u32,
    dropped: u64,
}

/// What to do with one line.
enum Admit {
    /// Log it, after a record of the `dropped` lines before it (when not 0).
    Pass {
        dropped: u64,
    },
    Drop,
}

impl OutputBudget {
    /// An allowance of `lines_per_second` (at least 1).
    pub fn new(lines_per_second: u32) -> Arc<Self> {
        Arc::new(Self {
            lines_per_second: lines_per_second.max(1),
            state: Mutex::new(BudgetState {
                window: Instant::now(),
                used: 0,
                dropped: 0,
            }),
        })
    }

    fn admit(&self) -> Admit {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.window.elapsed() >= Duration::from_secs(1) {
            state.window = Instant::now();
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

    fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).dropped)
    }
}

/// Secret texts to cut from plugin output before it reaches a caller in an error message:
/// callers of a function are not necessarily its deployer, and a plugin that prints its
/// environment (or anything it could read) would otherwise hand it to them.
#[derive(Debug, Clone, Default)]
pub struct Redactions(Arc<[String]>);

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

    /// These secrets and the values of `env` (a function's own variables).
    pub fn with_env(&self, env: &BTreeMap<String, String>) -> Self {
        Self::from_values(self.0.iter().chain(env.values()).cloned())
    }

    /// Values shorter than [`MIN_SECRET_LEN`] are left: cutting words like `exit` or `true`
    /// out of text garbles it and hides nothing.
    fn from_values(values: impl Iterator<Item = String>) -> Self {
        let mut values: Vec<String> = values.filter(|v| v.len() >= MIN_SECRET_LEN).collect();
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

/// Where one process's output lines go: the log, within the function's budget.
pub(crate) struct Output {
    function: FunctionName,
    version: u64,
    pid: u32,
    budget: Arc<OutputBudget>,
}

impl Output {
    pub(crate) fn new(config: &ProcessConfig, pid: u32) -> Self {
        Self {
            function: config.function.clone(),
            version: config.version,
            pid,
            budget: config.output_budget.clone(),
        }
    }

    pub(crate) fn line(&self, stream: &str, line: &str) {
        match self.budget.admit() {
            Admit::Drop => {}
            Admit::Pass { dropped } => {
                self.report_dropped(dropped);
                log_line(&self.function, self.version, self.pid, stream, line);
            }
        }
    }

    /// At the end of the output: the lines dropped since the last one let through.
    pub(crate) fn finish(&self) {
        self.report_dropped(self.budget.take_dropped());
    }

    fn report_dropped(&self, dropped: u64) {
        if dropped > 0 {
            tracing::warn!(
                target: mycelium_core::logs::PLUGIN_OUTPUT_TARGET,
                function = %self.function, version = self.version, pid = self.pid, stream = "stderr",
                "{dropped} lines dropped: the function's output exceeded {} lines per second",
                self.budget.lines_per_second
            );
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

/// Logs one output line. JSON lines keep their level and message: go-plugin's hclog
/// (`@level`, `@message`) and the Rust SDK's (`level`, `message`, and the invocation span's
/// `invocation_id` and `trace_id`, which attribute the line to its call).
fn log_line(function: &FunctionName, version: u64, pid: u32, stream: &str, line: &str) {
    if line.is_empty() {
        return;
    }
    let parsed = line
        .starts_with('{')
        .then(|| serde_json::from_str::<serde_json::Value>(line).ok())
        .flatten();
    let text = |keys: &[&str]| {
        let json = parsed.as_ref()?;
        keys.iter().find_map(|key| {
            json.get(key)
                .or_else(|| json.get("span")?.get(key))
                .and_then(|v| v.as_str())
        })
    };
    let level = text(&["@level", "level"])
        .unwrap_or("info")
        .to_ascii_lowercase();
    let message = text(&["@message", "message"]).unwrap_or(line);
    let invocation_id = text(&["invocation_id"]);
    let trace_id = text(&["trace_id"]);
    macro_rules! emit {
        ($level:ident) => {
            match invocation_id {
                Some(invocation_id) => tracing::$level!(
                    target: mycelium_core::logs::PLUGIN_OUTPUT_TARGET,
                    function = %function, version, pid, stream, invocation_id,
                    trace_id = trace_id.unwrap_or_default(),
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
    match level.as_str() {
        "trace" => emit!(trace),
        "debug" => emit!(debug),
        "warn" | "warning" => emit!(warn),
        "error" => emit!(error),
        _ => emit!(info),
    }
}
