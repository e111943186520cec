//! Observability backends behind the runtime's seams.
//!
//! [`PrometheusMetrics`] implements [`MetricsCollector`] with the `prometheus-client` crate, and
//! [`serve_metrics`] exposes it in the Prometheus text format on `GET /metrics`. Label sets
//! are bounded: function name and outcome code, never an invocation id.
//!
//! [`OtelBridge`] implements [`mycelium_core::TraceBridge`] with OpenTelemetry
//! (`tracing-opentelemetry`), and [`tracer_provider`] builds the provider binaries install,
//! exporting over OTLP when given an endpoint.

mod tracing_otel;

pub use tracing_otel::{
    otel_layer, remote_context, tracer_provider, OtelBridge, TracingSetupError,
};

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mycelium_core::{ErrorCode, FunctionName, MetricsCollector, Outcome};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    function: String,
    /// Empty for requests refused before a version was chosen.
    version: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    function: String,
    /// `cache` or `registry`.
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    function: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    function: String,
    version: String,
}

/// Invocation metrics in Prometheus form.
pub struct PrometheusMetrics {
    /// Keeps the per-function figures `$SRV.STATS` and `mycelium stats` read back.
    summary: mycelium_core::InMemoryMetrics,
    registry: Mutex<Registry>,
    invocations: Family<OutcomeLabels, Counter>,
    durations: Family<FunctionLabels, Histogram>,
    in_flight: Family<FunctionLabels, Gauge>,
    rejected: Family<CodeLabels, Counter>,
    plugin_memory: Family<VersionLabels, Gauge>,
    plugin_starts: Family<FunctionLabels, Counter>,
    plugin_crashes: Family<FunctionLabels, Counter>,
    plugin_processes: Family<FunctionLabels, Gauge>,
    cold_starts: Family<FunctionLabels, Histogram>,
    artifact_fetches: Family<FetchLabels, Counter>,
    /// Asynchronous queues, as JetStream counts them: pending, in flight, redelivered, dead.
    async_queue: [Family<FunctionLabels, Gauge>; 4],
    async_retries: Family<FunctionLabels, Counter>,
    async_dead_lettered: Family<ReasonLabels, Counter>,
    /// Per trigger: received, invocations, failures (counters).
    trigger_counts: [Family<TriggerLabels, Counter>; 3],
    /// Per trigger: lag, last firing (gauges).
    trigger_gauges: [Family<TriggerLabels, Gauge>; 2],
    nats_reconnects: Counter,
    resident_memory: Gauge,
    /// The runtime's NATS connection statistics, read at each scrape.
    nats: Mutex<Option<Arc<async_nats::Statistics>>>,
}

impl Default for PrometheusMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Duration buckets in seconds: 100 µs to 30 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
];

impl PrometheusMetrics {
    /// Metrics registered under the `mycelium` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mycelium");
        let invocations = Family::<OutcomeLabels, Counter>::default();
        let durations =
            Family::<FunctionLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        let in_flight = Family::<FunctionLabels, Gauge>::default();
        let rejected = Family::<CodeLabels, Counter>::default();
        let plugin_memory = Family::<VersionLabels, Gauge>::default();
        let plugin_starts = Family::<FunctionLabels, Counter>::default();
        let plugin_crashes = Family::<FunctionLabels, Counter>::default();
        let plugin_processes = Family::<FunctionLabels, Gauge>::default();
        let cold_starts =
            Family::<FunctionLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            "invocations",
            "Invocations by function and outcome (success or the error code)",
            invocations.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Time from the start of execution to its end",
            durations.clone(),
        );
        registry.register(
            "invocations_in_flight",
            "Invocations executing now",
            in_flight.clone(),
        );
        registry.register(
            "requests_rejected",
            "Requests refused before a function ran, by error code",
            rejected.clone(),
        );
        registry.register(
            "plugin_resident_memory_bytes",
            "Resident memory of a plugin process, last sample",
            plugin_memory.clone(),
        );
        registry.register(
            "plugin_starts",
            "Plugin processes started (cold starts)",
            plugin_starts.clone(),
        );
        registry.register(
            "plugin_crashes",
            "Plugin processes that died or hung and were replaced",
            plugin_crashes.clone(),
        );
        registry.register(
            "plugin_processes",
            "Plugin processes running now",
            plugin_processes.clone(),
        );
        registry.register(
            "plugin_cold_start_seconds",
            "Time from spawning a plugin process to its passed health check",
            cold_starts.clone(),
        );
        let artifact_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "plugin_artifact_fetches",
            "Plugin binaries needed to start a process, by source: the local cache or a registry download",
            artifact_fetches.clone(),
        );
        let async_queue: [Family<FunctionLabels, Gauge>; 4] = Default::default();
        for (family, (name, help)) in async_queue.iter().zip([
            ("async_pending", "Asynchronous invocations stored and not yet taken by a runtime (cluster-wide, sampled)"),
            ("async_in_flight", "Asynchronous invocations taken and not yet settled: running or waiting for a retry (cluster-wide, sampled)"),
            ("async_redelivered", "Asynchronous invocations in flight that were delivered more than once (cluster-wide, sampled)"),
            ("async_dead_letters", "Dead letters kept (cluster-wide, sampled)"),
        ]) {
            registry.register(name, help, family.clone());
        }
        let async_retries = Family::<FunctionLabels, Counter>::default();
        registry.register(
            "async_retries",
            "Asynchronous invocations this runtime sent back for a retry",
            async_retries.clone(),
        );
        let async_dead_lettered = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "async_dead_lettered",
            "Asynchronous invocations this runtime dead-lettered, by reason",
            async_dead_lettered.clone(),
        );
        let trigger_counts: [Family<TriggerLabels, Counter>; 3] = Default::default();
        for (family, (name, help)) in trigger_counts.iter().zip([
            (
                "trigger_received",
                "Messages and ticks a trigger received on this runtime",
            ),
            (
                "trigger_invocations",
                "Invocations a trigger ran on this runtime",
            ),
            (
                "trigger_failures",
                "Failed invocations of a trigger, and messages that could not become events",
            ),
        ]) {
            registry.register(name, help, family.clone());
        }
        let trigger_gauges: [Family<TriggerLabels, Gauge>; 2] = Default::default();
        for (family, (name, help)) in trigger_gauges.iter().zip([
            (
                "trigger_lag",
                "Messages waiting for a stream or KV trigger (sampled)",
            ),
            (
                "trigger_last_fired_timestamp_seconds",
                "When a schedule last fired",
            ),
        ]) {
            registry.register(name, help, family.clone());
        }
        let nats_reconnects = Counter::default();
        registry.register(
            "nats_reconnects",
            "Times the runtime's NATS connection was re-established",
            nats_reconnects.clone(),
        );
        let resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the runtime process",
            resident_memory.clone(),
        );
        Self {
            summary: mycelium_core::InMemoryMetrics::new(),
            registry: Mutex::new(registry),
            plugin_starts,
            plugin_crashes,
            plugin_processes,
            cold_starts,
            invocations,
            durations,
            in_flight,
            rejected,
            plugin_memory,
            artifact_fetches,
            async_queue,
            async_retries,
            async_dead_lettered,
            trigger_counts,
            trigger_gauges,
            nats_reconnects,
            resident_memory,
            nats: Mutex::new(None),
        }
    }

    /// The gauge of a version's plugin memory: the sum over its live processes.
    fn update_plugin_memory(&self, name: &FunctionName, version: u64) {
        let rss = self
            .summary
            .plugin_memory(name.as_str(), version)
            .unwrap_or(0);
        self.plugin_memory
            .get_or_create(&VersionLabels {
                function: name.to_string(),
                version: version.to_string(),
            })
            .set(i64::try_from(rss).unwrap_or(i64::MAX));
    }

    /// Reports the reconnects of this NATS connection (read at each scrape).
    pub fn watch_nats(&self, client: &async_nats::Client) {
        *self.nats.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.statistics());
    }

    /// The current values in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Figures kept elsewhere, brought up to date under the registry lock.
        if let Some(stats) = &*self.nats.lock().unwrap_or_else(|e| e.into_inner()) {
            let reconnects = stats
                .connects
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(1);
            self.nats_reconnects
                .inc_by(reconnects.saturating_sub(self.nats_reconnects.get()));
        }
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}

/// This process's resident memory, from `/proc/self/status` (Linux).
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    mycelium_core::metrics::resident_bytes_from_proc_status(&status)
}

fn function(name: &FunctionName) -> FunctionLabels {
    FunctionLabels {
        function: name.to_string(),
    }
}

impl MetricsCollector for PrometheusMetrics {
    fn invocation_started(&self, name: &FunctionName) {
        self.summary.invocation_started(name);
        self.in_flight.get_or_create(&function(name)).inc();
    }

    fn invocation_finished(
        &self,
        name: &FunctionName,
        version: u64,
        outcome: Outcome,
        duration: Duration,
    ) {
        self.summary
            .invocation_finished(name, version, outcome, duration);
        let labels = function(name);
        self.in_flight.get_or_create(&labels).dec();
        self.durations
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        self.invocations
            .get_or_create(&OutcomeLabels {
                function: labels.function,
                version: version.to_string(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    fn request_rejected(&self, name: Option<&FunctionName>, code: ErrorCode) {
        self.summary.request_rejected(name, code);
        self.rejected
            .get_or_create(&CodeLabels {
                code: code.as_str().to_owned(),
            })
            .inc();
        if let Some(name) = name {
            self.invocations
                .get_or_create(&OutcomeLabels {
                    function: name.to_string(),
                    version: String::new(),
                    outcome: code.as_str().to_owned(),
                })
                .inc();
        }
    }

    fn plugin_started(&self, name: &FunctionName, version: u64, startup: Duration) {
        self.summary.plugin_started(name, version, startup);
        let labels = function(name);
        self.plugin_starts.get_or_create(&labels).inc();
        self.plugin_processes.get_or_create(&labels).inc();
        self.cold_starts
            .get_or_create(&labels)
            .observe(startup.as_secs_f64());
    }

    fn plugin_stopped(&self, name: &FunctionName, version: u64, pid: u32, crashed: bool) {
        self.summary.plugin_stopped(name, version, pid, crashed);
        self.update_plugin_memory(name, version);
        let labels = function(name);
        self.plugin_processes.get_or_create(&labels).dec();
        if crashed {
            self.plugin_crashes.get_or_create(&labels).inc();
        }
    }

    fn artifact_fetched(&self, name: &FunctionName, downloaded: bool) {
        self.artifact_fetches
            .get_or_create(&FetchLabels {
                function: name.to_string(),
                source: if downloaded { "registry" } else { "cache" }.to_owned(),
            })
            .inc();
    }

    fn function_stats(&self) -> Vec<mycelium_core::FunctionStats> {
        self.summary.function_stats()
    }

    fn async_queue(&self, queue: &mycelium_core::asynchronous::AsyncQueueStats) {
        let labels = function(&queue.function);
        let figures = [
            queue.pending,
            queue.in_flight,
            queue.redelivered,
            queue.dead_lettered,
        ];
        for (family, figure) in self.async_queue.iter().zip(figures) {
            family
                .get_or_create(&labels)
                .set(i64::try_from(figure).unwrap_or(i64::MAX));
        }
    }

    fn trigger_event(&self, name: &FunctionName, event: mycelium_core::TriggerEvent) {
        use mycelium_core::TriggerEvent;
        self.summary.trigger_event(name, event);
        let labels = TriggerLabels {
            trigger: name.to_string(),
        };
        let [received, invocations, failures] = &self.trigger_counts;
        let [lag, fired] = &self.trigger_gauges;
        match event {
            TriggerEvent::Received => {
                received.get_or_create(&labels).inc();
            }
            TriggerEvent::Invoked { failed } => {
                invocations.get_or_create(&labels).inc();
                if failed {
                    failures.get_or_create(&labels).inc();
                }
            }
            TriggerEvent::Undeliverable => {
                failures.get_or_create(&labels).inc();
            }
            TriggerEvent::Fired(millis) => {
                fired.get_or_create(&labels).set(millis / 1000);
            }
            TriggerEvent::Lag(waiting) => {
                lag.get_or_create(&labels)
                    .set(i64::try_from(waiting).unwrap_or(i64::MAX));
            }
        }
    }

    fn trigger_removed(&self, name: &FunctionName) {
        self.summary.trigger_removed(name);
        let labels = TriggerLabels {
            trigger: name.to_string(),
        };
        for family in &self.trigger_counts {
            family.remove(&labels);
        }
        for family in &self.trigger_gauges {
            family.remove(&labels);
        }
    }

    fn trigger_stats(&self) -> Vec<mycelium_core::trigger::TriggerStats> {
        self.summary.trigger_stats()
    }

    fn async_retried(&self, name: &FunctionName) {
        self.async_retries.get_or_create(&function(name)).inc();
    }

    fn async_dead_lettered(
        &self,
        name: &FunctionName,
        reason: mycelium_core::asynchronous::DeadLetterReason,
    ) {
        self.async_dead_lettered
            .get_or_create(&ReasonLabels {
                function: name.to_string(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    fn plugin_memory(&self, name: &FunctionName, version: u64, pid: u32, rss_bytes: u64) {
        MetricsCollector::plugin_memory(&self.summary, name, version, pid, rss_bytes);
        self.update_plugin_memory(name, version);
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped; returns the bound address
/// (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<PrometheusMetrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    if let Some(pause) = accept_backoff(&error) {
                        tracing::warn!(%error, ?pause, "accepting a metrics connection failed; pausing");
                        tokio::time::sleep(pause).await;
                    }
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&request, &metrics)) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "metrics connection ended");
                }
            });
        }
    });
    Ok((bound, task))
}

/// How long to wait after a failed `accept`, as axum does: errors of one connection (it was
/// reset before we took it) are skipped at once, anything else (EMFILE: out of descriptors)
/// is waited out, because retrying at once would spin a core until it clears.
fn accept_backoff(error: &std::io::Error) -> Option<std::time::Duration> {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused
        | ErrorKind::ConnectionAborted
        | ErrorKind::ConnectionReset => None,
        _ => Some(std::time::Duration::from_secs(1)),
    }
}

fn respond(request: &Request<Incoming>, metrics: &PrometheusMetrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(metrics.render()),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"metrics are at /metrics\n"),
        )
    };
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(Full::new(body))
        .expect("a static response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asynchronous_queues_render_per_function() {
        use mycelium_core::asynchronous::{AsyncQueueStats, DeadLetterReason};
        let metrics = PrometheusMetrics::new();
        let name: FunctionName = "resize".parse().unwrap();
        metrics.async_queue(&AsyncQueueStats {
            function: name.clone(),
            pending: 7,
            in_flight: 3,
            redelivered: 1,
            dead_lettered: 2,
        });
        metrics.async_retried(&name);
        metrics.async_retried(&name);
        metrics.async_dead_lettered(&name, DeadLetterReason::RetriesExhausted);
        let text = metrics.render();
        for line in [
            r#"mycelium_async_pending{function="resize"} 7"#,
            r#"mycelium_async_in_flight{function="resize"} 3"#,
            r#"mycelium_async_redelivered{function="resize"} 1"#,
            r#"mycelium_async_dead_letters{function="resize"} 2"#,
            r#"mycelium_async_retries_total{function="resize"} 2"#,
            r#"mycelium_async_dead_lettered_total{function="resize",reason="retries_exhausted"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn triggers_render_and_go_when_removed() {
        use mycelium_core::TriggerEvent;
        let metrics = PrometheusMetrics::new();
        let name: FunctionName = "orders".parse().unwrap();
        metrics.trigger_event(&name, TriggerEvent::Received);
        metrics.trigger_event(&name, TriggerEvent::Received);
        metrics.trigger_event(&name, TriggerEvent::Invoked { failed: false });
        metrics.trigger_event(&name, TriggerEvent::Invoked { failed: true });
        metrics.trigger_event(&name, TriggerEvent::Lag(5));
        metrics.trigger_event(&name, TriggerEvent::Fired(1_700_000_000_000));
        let text = metrics.render();
        for line in [
            r#"mycelium_trigger_received_total{trigger="orders"} 2"#,
            r#"mycelium_trigger_invocations_total{trigger="orders"} 2"#,
            r#"mycelium_trigger_failures_total{trigger="orders"} 1"#,
            r#"mycelium_trigger_lag{trigger="orders"} 5"#,
            r#"mycelium_trigger_last_fired_timestamp_seconds{trigger="orders"} 1700000000"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        let stats = metrics.trigger_stats();
        assert_eq!(
            (
                stats[0].received,
                stats[0].invocations,
                stats[0].failures,
                stats[0].lag
            ),
            (2, 2, 1, Some(5))
        );
        metrics.trigger_removed(&name);
        assert!(!metrics.render().contains("trigger=\"orders\""));
        assert!(metrics.trigger_stats().is_empty());
    }

    #[test]
    fn plugin_lifecycle_renders_with_bounded_labels() {
        let metrics = PrometheusMetrics::new();
        let name: FunctionName = "resize".parse().unwrap();
        metrics.plugin_started(&name, 3, Duration::from_millis(4));
        metrics.plugin_started(&name, 3, Duration::from_millis(6));
        metrics.plugin_stopped(&name, 3, 41, true);
        metrics.plugin_memory(&name, 3, 42, 10 << 20);
        let text = metrics.render();
        for line in [
            r#"mycelium_plugin_starts_total{function="resize"} 2"#,
            r#"mycelium_plugin_crashes_total{function="resize"} 1"#,
            r#"mycelium_plugin_processes{function="resize"} 1"#,
            r#"mycelium_plugin_cold_start_seconds_count{function="resize"} 2"#,
            r#"mycelium_plugin_resident_memory_bytes{function="resize",version="3"} 10485760"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("pid"), "no per-process labels");

        // Two live processes add up; a stopped one no longer counts.
        metrics.plugin_memory(&name, 3, 43, 5 << 20);
        assert!(metrics.render().contains(
            r#"mycelium_plugin_resident_memory_bytes{function="resize",version="3"} 15728640"#
        ));
        assert_eq!(metrics.function_stats()[0].memory_bytes, 15 << 20);
        metrics.plugin_stopped(&name, 3, 42, false);
        metrics.plugin_stopped(&name, 3, 43, false);
        assert!(metrics
            .render()
            .contains(r#"mycelium_plugin_resident_memory_bytes{function="resize",version="3"} 0"#));
        assert_eq!(metrics.function_stats()[0].memory_bytes, 0);
    }
}

#[cfg(test)]
mod accept_tests {
    use super::accept_backoff;

    #[test]
    fn running_out_of_descriptors_pauses_the_accept_loop() {
        let emfile = std::io::Error::from_raw_os_error(libc_emfile());
        assert_eq!(
            accept_backoff(&emfile),
            Some(std::time::Duration::from_secs(1))
        );
        let aborted = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(accept_backoff(&aborted), None);
    }

    /// EMFILE on Linux ("Too many open files").
    const fn libc_emfile() -> i32 {
        24
    }
}
