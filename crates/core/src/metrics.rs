//! The metrics seam: what the runtime reports about invocations. Backends (Prometheus,
//! OpenTelemetry) implement [`MetricsCollector`]; [`InMemoryMetrics`] serves tests and
//! embedding.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use crate::{ErrorCode, FunctionName};

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The function returned events.
    Success,
    /// The invocation failed with this code.
    Failure(ErrorCode),
}

impl Outcome {
    /// `"success"` or the error code's text, for labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure(code) => code.as_str(),
        }
    }
}

/// One function's figures on one runtime instance, as `$SRV.STATS` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStats {
    /// The function.
    pub function: String,
    /// Invocations that ran or were refused for it, whatever the outcome.
    pub invocations: u64,
    /// Those that failed (any error code).
    pub errors: u64,
    /// Sum of the durations of the invocations that ran, in microseconds.
    pub total_duration_us: u64,
    /// Invocations executing now.
    pub in_flight: u64,
    /// Plugin processes started (cold starts).
    pub cold_starts: u64,
    /// Plugin processes that crashed or hung.
    pub crashes: u64,
    /// Resident memory of the function's live plugin processes (last samples), in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Invocations that ran, counted by duration: element `i` counts durations up to
    /// [`DURATION_BUCKETS_US`]`[i]` microseconds (and above the previous bound); the last
    /// element counts the longer ones. Fixed bounds, so instances' rows add up element-wise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duration_buckets: Vec<u64>,
}

/// Upper bounds, in microseconds, of [`FunctionStats::duration_buckets`]: roughly 1-2-5 steps
/// from 50 µs to 60 s. Part of the `$SRV.STATS` contract; only ever extended at the end.
pub const DURATION_BUCKETS_US: [u64; 19] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// The bucket of [`DURATION_BUCKETS_US`] (or the overflow bucket) a duration falls in.
fn duration_bucket(duration: Duration) -> usize {
    let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    DURATION_BUCKETS_US.partition_point(|&bound| bound < us)
}

impl FunctionStats {
    /// Adds another instance's row for the same function.
    pub fn merge(&mut self, other: &FunctionStats) {
        self.invocations += other.invocations;
        self.errors += other.errors;
        self.total_duration_us += other.total_duration_us;
        self.in_flight += other.in_flight;
        self.cold_starts += other.cold_starts;
        self.crashes += other.crashes;
        self.memory_bytes += other.memory_bytes;
        if self.duration_buckets.len() < other.duration_buckets.len() {
            self.duration_buckets
                .resize(other.duration_buckets.len(), 0);
        }
        for (sum, count) in self
            .duration_buckets
            .iter_mut()
            .zip(&other.duration_buckets)
        {
            *sum += count;
        }
    }

    /// The `q` quantile (0.5 for the median, 0.99, ...) of the durations, interpolated
    /// within its bucket; `None` before any invocation ran. Beyond the last bound it reports
    /// the last bound.
    pub fn duration_quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.duration_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0u64;
        for (i, &count) in self.duration_buckets.iter().enumerate() {
            if count > 0 && (seen + count) as f64 >= rank {
                let lower = if i == 0 {
                    0
                } else {
                    DURATION_BUCKETS_US[i - 1]
                };
                let Some(&upper) = DURATION_BUCKETS_US.get(i) else {
                    return Some(Duration::from_micros(lower));
                };
                let within = (rank - seen as f64) / count as f64;
                let us = lower as f64 + (upper - lower) as f64 * within;
                return Some(Duration::from_micros(us.round() as u64));
            }
            seen += count;
        }
        None
    }
}

/// Receives the runtime's measurements. Calls happen on the invocation path: keep them
/// cheap and never block.
pub trait MetricsCollector: Send + Sync + 'static {
    /// An invocation of `function` began executing.
    fn invocation_started(&self, function: &FunctionName);
    /// An invocation of `function` at `version` that had started ended after `duration`.
    fn invocation_finished(
        &self,
        function: &FunctionName,
        version: u64,
        outcome: Outcome,
        duration: Duration,
    );
    /// A request was refused before any function ran (bad input, unknown function,
    /// overload); `function` is known when the request named a valid one.
    fn request_rejected(&self, function: Option<&FunctionName>, code: ErrorCode);
    /// A plugin process of `function` at `version` started and passed its health check after
    /// `startup` (the cold start, without the first call).
    fn plugin_started(&self, function: &FunctionName, version: u64, startup: Duration) {
        let _ = (function, version, startup);
    }

    /// A plugin process ended: stopped on purpose (idle, retired, shutdown) or not (`crashed`:
    /// it died, or hung and was replaced).
    fn plugin_stopped(&self, function: &FunctionName, version: u64, pid: u32, crashed: bool) {
        let _ = (function, version, pid, crashed);
    }

    /// The resident memory of one plugin process of `function` at `version`, sampled.
    fn plugin_memory(&self, function: &FunctionName, version: u64, pid: u32, rss_bytes: u64) {
        let _ = (function, version, pid, rss_bytes);
    }

    /// A plugin binary was needed to start a process: `downloaded` from the registry, or
    /// found in the local cache.
    fn artifact_fetched(&self, function: &FunctionName, downloaded: bool) {
        let _ = (function, downloaded);
    }

    /// `function`'s asynchronous queue as JetStream counts it, sampled every few seconds.
    fn async_queue(&self, queue: &crate::asynchronous::AsyncQueueStats) {
        let _ = queue;
    }

    /// An asynchronous invocation of `function` failed and will be tried again.
    fn async_retried(&self, function: &FunctionName) {
        let _ = function;
    }

    /// An asynchronous invocation of `function` was dead-lettered.
    fn async_dead_lettered(
        &self,
        function: &FunctionName,
        reason: crate::asynchronous::DeadLetterReason,
    ) {
        let _ = (function, reason);
    }

    /// Per-function figures for `$SRV.STATS`, when this collector keeps them.
    fn function_stats(&self) -> Vec<FunctionStats> {
        Vec::new()
    }

    /// Something happened to a trigger of the registry (only registered triggers are named,
    /// so the names are bounded).
    fn trigger_event(&self, trigger: &FunctionName, event: TriggerEvent) {
        let _ = (trigger, event);
    }

    /// A trigger left the registry: its figures may go.
    fn trigger_removed(&self, trigger: &FunctionName) {
        let _ = trigger;
    }

    /// Per-trigger figures for `$SRV.STATS`, when this collector keeps them.
    fn trigger_stats(&self) -> Vec<crate::trigger::TriggerStats> {
        Vec::new()
    }
}

/// What happened to a trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerEvent {
    /// A message (or a tick) arrived.
    Received,
    /// Its function ran, successfully or not.
    Invoked {
        /// It failed (or will be retried).
        failed: bool,
    },
    /// A message could not become an event (or its result could not be published).
    Undeliverable,
    /// A schedule fired at this time (Unix milliseconds).
    Fired(i64),
    /// Messages waiting for it in its stream or bucket, sampled.
    Lag(u64),
}

/// Counts per function and outcome, kept in memory.
#[derive(Debug, Default)]
pub struct InMemoryMetrics {
    state: Mutex<State>,
}

// Keyed by `FunctionName` (an `Arc<str>`): recording an invocation clones a pointer, never
// allocates a string.
#[derive(Debug, Default)]
struct State {
    outcomes: HashMap<(FunctionName, Outcome), OutcomeStats>,
    in_flight: HashMap<FunctionName, u64>,
    rejected: HashMap<ErrorCode, u64>,
    /// Last resident-memory sample per live plugin process: (function, version, pid).
    plugin_memory: HashMap<(FunctionName, u64, u32), u64>,
    plugin_starts: HashMap<FunctionName, u64>,
    plugin_crashes: HashMap<FunctionName, u64>,
    durations: HashMap<FunctionName, [u64; DURATION_BUCKETS_US.len() + 1]>,
    triggers: HashMap<FunctionName, crate::trigger::TriggerStats>,
}

fn key(function: &str) -> Option<FunctionName> {
    FunctionName::new(function).ok()
}

/// Count and total duration of invocations with one outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeStats {
    /// Invocations counted.
    pub count: u64,
    /// Sum of their durations (zero for rejections).
    pub total_duration: Duration,
}

impl InMemoryMetrics {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Invocations of `function` that ended with `outcome` (rejections included).
    pub fn count(&self, function: &str, outcome: Outcome) -> u64 {
        self.stats(function, outcome).count
    }

    /// Count and total duration for `function` and `outcome`.
    pub fn stats(&self, function: &str, outcome: Outcome) -> OutcomeStats {
        let Some(function) = key(function) else {
            return OutcomeStats::default();
        };
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .outcomes
            .get(&(function, outcome))
            .copied()
            .unwrap_or_default()
    }

    /// Invocations of `function` executing now.
    pub fn in_flight(&self, function: &str) -> u64 {
        let Some(function) = key(function) else {
            return 0;
        };
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight.get(&function).copied().unwrap_or(0)
    }

    /// The resident memory of the live plugin processes of `function` at `version` (the sum
    /// of their last samples); `None` when none was sampled or all have stopped.
    pub fn plugin_memory(&self, function: &str, version: u64) -> Option<u64> {
        let function = key(function)?;
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut samples = state
            .plugin_memory
            .iter()
            .filter(|((f, v, _), _)| *f == function && *v == version)
            .map(|(_, rss)| *rss)
            .peekable();
        samples.peek()?;
        Some(samples.sum())
    }

    /// Plugin processes of `function` started so far (all versions).
    pub fn plugin_starts(&self, function: &str) -> u64 {
        let Some(function) = key(function) else {
            return 0;
        };
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.plugin_starts.get(&function).copied().unwrap_or(0)
    }

    /// Plugin processes of `function` that crashed or hung so far (all versions).
    pub fn plugin_crashes(&self, function: &str) -> u64 {
        let Some(function) = key(function) else {
            return 0;
        };
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.plugin_crashes.get(&function).copied().unwrap_or(0)
    }

    /// Requests refused with `code`, whatever the function.
    pub fn rejected(&self, code: ErrorCode) -> u64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.rejected.get(&code).copied().unwrap_or(0)
    }
}

impl MetricsCollector for InMemoryMetrics {
    fn trigger_event(&self, trigger: &FunctionName, event: TriggerEvent) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let stats =
            state
                .triggers
                .entry(trigger.clone())
                .or_insert_with(|| crate::trigger::TriggerStats {
                    trigger: trigger.clone(),
                    received: 0,
                    invocations: 0,
                    failures: 0,
                    lag: None,
                    last_fired: None,
                });
        match event {
            TriggerEvent::Received => stats.received += 1,
            TriggerEvent::Invoked { failed } => {
                stats.invocations += 1;
                stats.failures += u64::from(failed);
            }
            TriggerEvent::Undeliverable => stats.failures += 1,
            TriggerEvent::Fired(millis) => {
                stats.last_fired = chrono::DateTime::from_timestamp_millis(millis);
            }
            TriggerEvent::Lag(lag) => stats.lag = Some(lag),
        }
    }

    fn trigger_removed(&self, trigger: &FunctionName) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .triggers
            .remove(trigger);
    }

    fn trigger_stats(&self) -> Vec<crate::trigger::TriggerStats> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = state.triggers.values().cloned().collect();
        rows.sort_by(|a, b| a.trigger.cmp(&b.trigger));
        rows
    }

    fn function_stats(&self) -> Vec<FunctionStats> {
        fn row<'m, 'k>(
            rows: &'m mut HashMap<&'k FunctionName, FunctionStats>,
            name: &'k FunctionName,
        ) -> &'m mut FunctionStats {
            rows.entry(name).or_insert_with(|| FunctionStats {
                function: name.to_string(),
                ..FunctionStats::default()
            })
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_function: HashMap<&FunctionName, FunctionStats> = HashMap::new();
        for ((name, outcome), stats) in &state.outcomes {
            let row = row(&mut by_function, name);
            row.invocations += stats.count;
            if *outcome != Outcome::Success {
                row.errors += stats.count;
            }
            row.total_duration_us +=
                u64::try_from(stats.total_duration.as_micros()).unwrap_or(u64::MAX);
        }
        for (name, in_flight) in &state.in_flight {
            row(&mut by_function, name).in_flight = *in_flight;
        }
        for (name, starts) in &state.plugin_starts {
            row(&mut by_function, name).cold_starts = *starts;
        }
        for (name, crashes) in &state.plugin_crashes {
            row(&mut by_function, name).crashes = *crashes;
        }
        for (name, buckets) in &state.durations {
            row(&mut by_function, name).duration_buckets = buckets.to_vec();
        }
        for ((name, _, _), rss) in &state.plugin_memory {
            row(&mut by_function, name).memory_bytes += rss;
        }
        let mut rows: Vec<FunctionStats> = by_function.into_values().collect();
        rows.sort_by(|a, b| a.function.cmp(&b.function));
        rows
    }

    fn plugin_started(&self, function: &FunctionName, _version: u64, _startup: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.plugin_starts.entry(function.clone()).or_default() += 1;
    }

    fn plugin_stopped(&self, function: &FunctionName, version: u64, pid: u32, crashed: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .plugin_memory
            .remove(&(function.clone(), version, pid));
        if crashed {
            *state.plugin_crashes.entry(function.clone()).or_default() += 1;
        }
    }

    fn plugin_memory(&self, function: &FunctionName, version: u64, pid: u32, rss_bytes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .plugin_memory
            .insert((function.clone(), version, pid), rss_bytes);
    }

    fn invocation_started(&self, function: &FunctionName) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.in_flight.entry(function.clone()).or_default() += 1;
    }

    fn invocation_finished(
        &self,
        function: &FunctionName,
        _version: u64,
        outcome: Outcome,
        duration: Duration,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = state.in_flight.get_mut(function) {
            *n = n.saturating_sub(1);
        }
        let stats = state
            .outcomes
            .entry((function.clone(), outcome))
            .or_default();
        stats.count += 1;
        stats.total_duration += duration;
        state
            .durations
            .entry(function.clone())
            .or_insert([0; DURATION_BUCKETS_US.len() + 1])[duration_bucket(duration)] += 1;
    }

    fn request_rejected(&self, function: Option<&FunctionName>, code: ErrorCode) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.rejected.entry(code).or_default() += 1;
        if let Some(function) = function {
            state
                .outcomes
                .entry((function.clone(), Outcome::Failure(code)))
                .or_default()
                .count += 1;
        }
    }
}

/// Resident memory in bytes from the text of a Linux `/proc/<pid>/status` (its `VmRSS` line, in
/// kB, so no page size is involved). The reading is the caller's; this is the one parser.
pub fn resident_bytes_from_proc_status(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod proc_tests {
    #[test]
    fn resident_memory_from_proc_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(
            super::resident_bytes_from_proc_status(status),
            Some(1234 * 1024)
        );
        assert_eq!(super::resident_bytes_from_proc_status("Name:\tx\n"), None);
    }
}

#[cfg(test)]
mod quantile_tests {
    use super::*;

    #[test]
    fn quantiles_come_from_mergeable_buckets() {
        let metrics = InMemoryMetrics::new();
        let f: FunctionName = "f".parse().unwrap();
        for us in [30, 40, 150, 150, 150, 150, 150, 150, 900, 70_000_000] {
            metrics.invocation_started(&f);
            metrics.invocation_finished(&f, 1, Outcome::Success, Duration::from_micros(us));
        }
        let row = metrics.function_stats().remove(0);
        assert_eq!(row.duration_buckets.iter().sum::<u64>(), 10);
        assert_eq!(row.duration_buckets[0], 2); // <= 50 us
        assert_eq!(row.duration_buckets[2], 6); // 100-200 us
        assert_eq!(row.duration_buckets[19], 1); // beyond 60 s
                                                 // The median (5th of 10) is the 3rd of 6 in 100-200 us: 150 us.
        assert_eq!(row.duration_quantile(0.5), Some(Duration::from_micros(150)));
        assert_eq!(row.duration_quantile(0.99), Some(Duration::from_secs(60)));
        assert_eq!(FunctionStats::default().duration_quantile(0.5), None);

        let mut sum = row.clone();
        sum.merge(&row);
        assert_eq!(sum.invocations, 20);
        assert_eq!(sum.duration_buckets[2], 12);
        assert_eq!(sum.duration_quantile(0.5), row.duration_quantile(0.5));
        assert_eq!(duration_bucket(Duration::from_micros(50)), 0);
        assert_eq!(duration_bucket(Duration::from_micros(51)), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outcomes_and_in_flight() {
        let metrics = InMemoryMetrics::new();
        let echo: FunctionName = "echo".parse().unwrap();
        metrics.invocation_started(&echo);
        metrics.invocation_started(&echo);
        assert_eq!(metrics.in_flight("echo"), 2);
        metrics.invocation_finished(&echo, 1, Outcome::Success, Duration::from_millis(3));
        metrics.invocation_finished(
            &echo,
            1,
            Outcome::Failure(ErrorCode::Timeout),
            Duration::from_millis(5),
        );
        metrics.request_rejected(Some(&echo), ErrorCode::Overloaded);
        metrics.request_rejected(None, ErrorCode::InvalidRequest);
        assert_eq!(metrics.in_flight("echo"), 0);
        assert_eq!(
            metrics.stats("echo", Outcome::Success),
            OutcomeStats {
                count: 1,
                total_duration: Duration::from_millis(3)
            }
        );
        assert_eq!(
            metrics.count("echo", Outcome::Failure(ErrorCode::Timeout)),
            1
        );
        assert_eq!(
            metrics.count("echo", Outcome::Failure(ErrorCode::Overloaded)),
            1
        );
        assert_eq!(metrics.rejected(ErrorCode::InvalidRequest), 1);
        assert_eq!(metrics.count("other", Outcome::Success), 0);
    }
}
