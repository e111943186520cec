//! `mycelium-bench`: measures what callers feel, next to the physical limit (a bare NATS
//! request/reply to a responder that echoes), in one run on one server.
//!
//! By default it starts everything it measures: a nats-server, a `mycelium serve` process
//! (the CLI binary next to this one), and deploys the example Rust plugin and, when the Go
//! toolchain is there, the example Go plugin. See BENCHMARKS.md.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use mycelium_client::async_nats::{self, HeaderMap};
use mycelium_core::{
    cloudevents::{EventBuilder, EventBuilderV10},
    envelope, FunctionName, InvocationContext,
};
use mycelium_plugin::host::{PluginProcess, ProcessConfig};
use mycelium_registry::{
    ArtifactSource, DeploySpec, NatsRegistry, NatsRegistryConfig, RegistryAdmin,
};
use serde::Serialize;

/// The scenarios the load generator sends requests for, in the order they run.
const REQUEST_SCENARIOS: [&str; 10] = [
    "nats-echo",
    "builtin",
    "binding",
    "async",
    "trigger",
    "plugin-rust",
    "plugin-secret",
    "plugin-go",
    "wasm",
    "wasm-c",
];

/// The scenarios measured otherwise (go-plugin's own host, rounds, memory).
const OTHER_SCENARIOS: [&str; 7] = [
    "go-host",
    "go-host-paced",
    "go-direct",
    "cold-start",
    "wasm-cold",
    "wasm-density",
    "deploy",
];

/// The WAT echo guest of the tests: the same work as the built-in `echo`, in a fresh instance.
const WASM_ECHO: &str = include_str!("../../test-support/guests/echo.wat");

/// Mycelium benchmarks: latency and throughput of invocations against the bare NATS round trip.
#[derive(Debug, Parser)]
#[command(name = "mycelium-bench", version)]
struct Args {
    /// Measure against this NATS (with a runtime already serving) instead of starting both.
    #[arg(long)]
    nats_url: Option<String>,
    /// Measuring time per scenario and concurrency (e.g. 10s).
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    duration: Duration,
    /// Warm-up before each measurement, not recorded.
    #[arg(long, value_parser = parse_seconds, default_value = "2")]
    warmup: Duration,
    /// Requests in flight (closed loop); repeat for several, e.g. --concurrency 1 --concurrency 64.
    #[arg(long, default_values_t = [1, 64])]
    concurrency: Vec<usize>,
    /// Fixed-rate mode: requests per second, latency measured from the intended send time
    /// (no coordinated omission). Without it: closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Bytes of event data per request.
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// Only these scenarios (repeatable): nats-echo, builtin, binding, async (submit to result, through JetStream), trigger (publish to a subject trigger, to its --then), plugin-rust, plugin-secret (the Rust example naming a secret), plugin-go, go-host (go-plugin's own Go host calling the Go plugin directly, no NATS), go-host-paced (the same at c=1 with a pause before each call, so that both processes go idle between calls as they do behind the runtime), go-direct (Mycelium's plugin host, the runtime's code in this process, calling the Go plugin directly as go-host does: the plugin hop without NATS), wasm (the WAT echo guest), wasm-c (the C example, echoing; needs Debian's clang and wasi-libc), cold-start, wasm-cold (a new version of a module whose compiled code is cached: first call), wasm-density (runtime memory per deployed and loaded module, 100 of them), deploy.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Rounds of the cold-start and deploy scenarios.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Measure the request scenarios this many times, one pass of all of them after another,
    /// and report each ratio's median over the passes too. A ratio is taken within its pass
    /// (same minutes), so the machine's drift between passes does not enter it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    passes: u32,
    /// The `mycelium` binary to run the runtime with (default: next to this one).
    #[arg(long)]
    mycelium: Option<PathBuf>,
    /// The Rust plugin to deploy (default: mycelium-example-plugin next to this binary).
    #[arg(long)]
    rust_plugin: Option<PathBuf>,
    /// The Go plugin to deploy (default: built with examples/go-plugin/build.sh when Go is there).
    #[arg(long)]
    go_plugin: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Run the echo responder in this process instead of a separate one (the separate
    /// process is the fair baseline for a runtime that is a separate process too).
    #[arg(long)]
    in_process_echo: bool,
    /// Extra arguments for the `mycelium serve` it starts, repeatable, e.g.
    /// `--serve-arg=--metrics-addr=127.0.0.1:0` (to measure what observability costs).
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// `RUST_LOG` of the runtime it starts (`info` is what `mycelium serve` uses by default).
    #[arg(long, default_value = "warn")]
    runtime_log: String,
    /// Internal: serve the echo responder on this NATS URL and nothing else.
    #[arg(long, hide = true)]
    serve_echo: Option<String>,
}

/// The baseline responder: replies with the request body, nothing else.
async fn serve_echo(url: &str) -> Result<()> {
    use futures_util::StreamExt;
    let responder = async_nats::connect(url).await?;
    let mut echo = responder.subscribe("bench.echo").await?;
    responder.flush().await?;
    println!("ready");
    while let Some(message) = echo.next().await {
        if let Some(reply) = message.reply {
            let _ = responder.publish(reply, message.payload).await;
        }
    }
    Ok(())
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let number = text.trim_end_matches('s');
    number
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

#[derive(Debug, Serialize)]
struct Outcome {
    scenario: String,
    concurrency: usize,
    mode: &'static str,
    /// Which pass of `--passes` measured it (0 for the scenarios measured once).
    pass: u32,
    requests: u64,
    errors: u64,
    throughput_per_s: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// p50 and throughput relative to nats-echo at the same concurrency.
    p50_ratio: Option<f64>,
    throughput_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    nats_server: String,
    runtime_rss_idle_kib: Option<u64>,
    runtime_rss_end_kib: Option<u64>,
    /// The runtime's memory growth per WebAssembly module deployed and loaded (wasm-density).
    rss_per_wasm_module_kib: Option<f64>,
    outcomes: Vec<Outcome>,
    /// With `--passes` above 1: each ratio's median (and range) over the passes.
    medians: Vec<Median>,
}

/// A ratio taken in each pass, summarised.
#[derive(Debug, Serialize)]
struct Median {
    /// What is compared, e.g. `plugin-rust p50 / nats-echo p50`.
    ratio: String,
    concurrency: usize,
    median: f64,
    min: f64,
    max: f64,
    /// One per pass, in order.
    passes: Vec<f64>,
}

/// A request the load generator repeats.
#[derive(Clone)]
struct Shot {
    subject: String,
    headers: Option<HeaderMap>,
    body: Bytes,
    /// For asynchronous invocations: where results are awaited (the request is a JetStream
    /// publish, done when its result arrives).
    asynchronous: Option<Arc<AsyncResults>>,
}

/// Where the results of asynchronous invocations (or of a trigger) arrive, matched to their
/// senders by the invocation id each submission names (or the id of the event published to
/// the trigger, which its `then` carries on).
struct AsyncResults {
    nats: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    waiting:
        std::sync::Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<bool>>>,
    next: AtomicU64,
    /// Through a subject trigger rather than an asynchronous submission.
    trigger: bool,
}

const ASYNC_RESULTS: &str = "bench.async.results";
const TRIGGER_IN: &str = "bench.trigger.in";
const TRIGGER_OUT: &str = "bench.trigger.out";

impl AsyncResults {
    async fn start(nats: &async_nats::Client, trigger: bool) -> Result<Arc<Self>> {
        let mut results = nats
            .subscribe(if trigger { TRIGGER_OUT } else { ASYNC_RESULTS })
            .await?;
        nats.flush().await?;
        let this = Arc::new(Self {
            nats: nats.clone(),
            jetstream: async_nats::jetstream::new(nats.clone()),
            waiting: Default::default(),
            next: AtomicU64::new(0),
            trigger,
        });
        let waiting = Arc::downgrade(&this);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(message) = results.next().await {
                let Some(this) = waiting.upgrade() else {
                    return;
                };
                let headers = message.headers.as_ref();
                let id = if this.trigger {
                    serde_json::from_slice::<serde_json::Value>(&message.payload)
                        .ok()
                        .and_then(|event| event["id"].as_str().map(str::to_owned))
                } else {
                    headers
                        .and_then(|h| h.get(envelope::INVOCATION_ID_HEADER))
                        .map(|id| id.as_str().to_owned())
                };
                let ok =
                    headers.is_none_or(|h| h.get(envelope::SERVICE_ERROR_CODE_HEADER).is_none());
                let waiter = id.and_then(|id| {
                    this.waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(id.as_str())
                });
                if let Some(waiter) = waiter {
                    let _ = waiter.send(ok);
                }
            }
        });
        Ok(this)
    }

    /// Submits one invocation and waits for its result.
    async fn send(&self, shot: &Shot) -> bool {
        let id = format!("bench-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let mut headers = shot.headers.clone().unwrap_or_default();
        let sent = if self.trigger {
            // A structured CloudEvent passes through the trigger as is: its id comes back.
            let mut event: serde_json::Value =
                serde_json::from_slice(&shot.body).unwrap_or_default();
            event["id"] = id.as_str().into();
            let body = serde_json::to_vec(&event).unwrap_or_default();
            self.nats
                .publish_with_headers(shot.subject.clone(), headers, body.into())
                .await
                .is_ok()
        } else {
            headers.insert(envelope::INVOCATION_ID_HEADER, id.as_str());
            let accepted = async {
                self.jetstream
                    .publish_with_headers(shot.subject.clone(), headers, shot.body.clone())
                    .await?
                    .await
            };
            accepted.await.is_ok()
        };
        let ok = sent
            && tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .is_ok_and(|r| r.unwrap_or(false));
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        ok
    }
}

/// The event every request carries.
fn bench_event(data: &str) -> mycelium_core::Event {
    EventBuilderV10::new()
        .id("bench")
        .source("mycelium-bench")
        .ty("com.example.bench")
        .data("text/plain", data.to_owned())
        .build()
        .expect("a valid event")
}

fn invoke_body(function: &str, data: &str) -> Bytes {
    let name: FunctionName = function.parse().expect("a valid name");
    envelope::encode_invoke_request(&name, &bench_event(data), None, None).into()
}

fn shot_for(scenario: &str, data: &str, asynchronous: Option<Arc<AsyncResults>>) -> Shot {
    let invoke = |function: &str| Shot {
        subject: "function.invoke".into(),
        headers: None,
        body: invoke_body(function, data),
        asynchronous: None,
    };
    match scenario {
        // The baseline carries the same bytes as the envelope scenarios.
        "nats-echo" => Shot {
            subject: "bench.echo".into(),
            headers: None,
            body: invoke_body("echo", data),
            asynchronous: None,
        },
        "async" | "trigger" => {
            let mut headers = HeaderMap::new();
            headers.insert("Content-Type", "application/cloudevents+json");
            if scenario == "async" {
                headers.insert("Mycelium-Result-Subject", ASYNC_RESULTS);
            }
            let event = bench_event(data);
            Shot {
                subject: if scenario == "async" {
                    "function.async.echo".into()
                } else {
                    TRIGGER_IN.into()
                },
                headers: Some(headers),
                body: serde_json::to_vec(&event).expect("an event encodes").into(),
                asynchronous,
            }
        }
        "builtin" => invoke("echo"),
        "binding" => {
            let mut headers = HeaderMap::new();
            for (k, v) in [
                ("ce-specversion", "1.0"),
                ("ce-id", "bench"),
                ("ce-source", "mycelium-bench"),
                ("ce-type", "com.example.bench"),
                ("Content-Type", "text/plain"),
            ] {
                headers.insert(k, v);
            }
            Shot {
                subject: "function.invoke.echo".into(),
                headers: Some(headers),
                body: Bytes::from(data.to_owned()),
                asynchronous: None,
            }
        }
        "plugin-rust" => invoke("bench-rust"),
        "plugin-secret" => invoke("bench-rust-secret"),
        "plugin-go" => invoke("bench-go"),
        "wasm" => invoke("bench-wasm"),
        "wasm-c" => invoke("bench-wasm-c"),
        other => unreachable!("no request shape for {other}"),
    }
}

async fn send(nats: &async_nats::Client, shot: &Shot) -> bool {
    if let Some(asynchronous) = &shot.asynchronous {
        return asynchronous.send(shot).await;
    }
    let request = async_nats::Request::new()
        .payload(shot.body.clone())
        .timeout(Some(Duration::from_secs(10)));
    let request = match &shot.headers {
        Some(headers) => request.headers(headers.clone()),
        None => request,
    };
    match nats.send_request(shot.subject.clone(), request).await {
        Ok(reply) => reply
            .headers
            .as_ref()
            .is_none_or(|h| h.get(envelope::SERVICE_ERROR_CODE_HEADER).is_none()),
        Err(_) => false,
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What a closed loop's workers repeat: one request, sent and waited for.
trait Caller: Clone + Send + 'static {
    /// Sends one request; whether it succeeded.
    fn call(&self) -> impl std::future::Future<Output = bool> + Send;
}

/// A request through NATS.
#[derive(Clone)]
struct NatsCaller {
    nats: async_nats::Client,
    shot: Shot,
}

impl Caller for NatsCaller {
    fn call(&self) -> impl std::future::Future<Output = bool> + Send {
        send(&self.nats, &self.shot)
    }
}

/// Closed loop: `concurrency` workers, each sending its next request when the last returns.
async fn closed_loop<C: Caller>(
    caller: &C,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> (Histogram<u64>, u64, Duration) {
    let errors = Arc::new(AtomicU64::new(0));
    let measure_from = Instant::now() + warmup;
    let stop_at = measure_from + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (caller, errors) = (caller.clone(), errors.clone());
            tokio::spawn(async move {
                let mut recorded = histogram();
                loop {
                    let start = Instant::now();
                    if start >= stop_at {
                        break;
                    }
                    let ok = caller.call().await;
                    if start >= measure_from {
                        if ok {
                            let _ = recorded.record(micros(start));
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                recorded
            })
        })
        .collect();
    let mut all = histogram();
    for worker in workers {
        if let Ok(recorded) = worker.await {
            let _ = all.add(recorded);
        }
    }
    (all, errors.load(Ordering::Relaxed), duration)
}

/// Fixed rate: requests leave on a schedule; latency counts from when each was due, so a
/// stall shows up in every request it delays (no coordinated omission).
async fn fixed_rate(
    nats: &async_nats::Client,
    shot: &Shot,
    rate: u64,
    max_in_flight: usize,
    warmup: Duration,
    duration: Duration,
) -> (Histogram<u64>, u64, Duration) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let recorded = Arc::new(std::sync::Mutex::new(histogram()));
    // tokio's timer has millisecond resolution: sleeping on it until each send was due sent up
    // to a millisecond late, and that lateness (the load generator's own) was in every latency
    // counted from the due time. A thread of its own paces the sends with the OS's sleep.
    let (pace, mut due_times) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut due = start;
        while due < stop_at {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if pace.send(due).is_err() {
                break;
            }
            due += interval;
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(due) = due_times.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (nats, shot, errors, recorded) =
            (nats.clone(), shot.clone(), errors.clone(), recorded.clone());
        let intended = due;
        tasks.spawn(async move {
            let ok = send(&nats, &shot).await;
            if intended >= measure_from {
                if ok {
                    let _ = recorded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(micros(intended));
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let all = recorded.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (all, errors.load(Ordering::Relaxed), duration)
}

fn outcome(
    scenario: &str,
    concurrency: usize,
    mode: &'static str,
    histogram: &Histogram<u64>,
    errors: u64,
    elapsed: Duration,
) -> Outcome {
    let q = |q: f64| histogram.value_at_quantile(q) as f64;
    Outcome {
        scenario: scenario.to_owned(),
        concurrency,
        mode,
        pass: 0,
        requests: histogram.len(),
        errors,
        throughput_per_s: histogram.len() as f64 / elapsed.as_secs_f64(),
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: histogram.max() as f64,
        p50_ratio: None,
        throughput_ratio: None,
    }
}

/// The processes the bench starts, stopped on drop.
struct Stack {
    nats: Option<mycelium_natsd::NatsServer>,
    runtime: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut runtime) = self.runtime.take() {
            let _ = runtime.kill();
            let _ = runtime.wait();
        }
        if let Some(nats) = self.nats.as_mut() {
            nats.stop(Duration::from_secs(5));
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn start_stack(args: &Args) -> Result<(Stack, String)> {
    let dir = tempfile::tempdir()?;
    let nats = mycelium_natsd::NatsServer::spawn(&mycelium_natsd::ServerOptions::new(
        dir.path().join("nats"),
    ))
    .context("starting nats-server (set MYCELIUM_NATS_SERVER or run ./dev bench)")?;
    let url = nats.url().to_owned();
    let mycelium = args.mycelium.clone().unwrap_or_else(|| sibling("mycelium"));
    let runtime = Command::new(&mycelium)
        .args(["--nats-url", &url, "serve", "--no-prestart", "--plugin-dir"])
        .arg(dir.path().join("plugins"))
        .args(&args.serve_args)
        .env("RUST_LOG", &args.runtime_log)
        // A key of its own, so the `plugin-secret` scenario has secrets to open.
        .env(
            "MYCELIUM_XKEY_SEED",
            mycelium_registry::RuntimeKey::generate().seed(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} serve (build it with cargo build --release -p mycelium-cli)",
                mycelium.display()
            )
        })?;
    Ok((
        Stack {
            nats: Some(nats),
            runtime: Some(runtime),
            _dir: dir,
        },
        url,
    ))
}

async fn wait_for_runtime(nats: &async_nats::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if nats.request("function.list", Bytes::new()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no runtime answered function.list within 30 s")
}

fn go_plugin(args: &Args, dir: &Path) -> Option<PathBuf> {
    if let Some(path) = &args.go_plugin {
        return Some(path.clone());
    }
    build_go(dir.join("go-plugin"), &[])
}

/// Builds with examples/go-plugin/build.sh (`extra`: `--host` for the go-plugin host).
fn build_go(out: PathBuf, extra: &[&str]) -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/go-plugin/build.sh");
    let built = Command::new(script)
        .arg(&out)
        .args(extra)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    built.then_some(out)
}

/// go-plugin's own Go host calling the Go plugin directly (no NATS, no Mycelium), at one
/// concurrency: the baseline of what a plugin call costs go-plugin itself.
fn go_host(
    host: &Path,
    plugin: &Path,
    args: &Args,
    concurrency: usize,
    paced: bool,
) -> Result<Outcome> {
    let output = Command::new(host)
        .arg(plugin)
        .arg(args.duration.as_secs_f64().to_string())
        .arg(concurrency.to_string())
        .arg(args.warmup.as_secs_f64().to_string())
        // Go's sleep is at least a millisecond here: the calls come ~1.3 ms apart.
        .args(paced.then_some("250"))
        .stderr(Stdio::inherit())
        .output()
        .context("running the go-plugin host")?;
    if !output.status.success() {
        bail!("the go-plugin host failed: {}", output.status);
    }
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let us = |key: &str| figures[key].as_f64().unwrap_or(0.0);
    let requests = figures["requests"].as_u64().unwrap_or(0);
    Ok(Outcome {
        scenario: if paced { "go-host-paced" } else { "go-host" }.into(),
        concurrency,
        mode: "closed-loop",
        pass: 0,
        requests,
        errors: figures["errors"].as_u64().unwrap_or(0),
        throughput_per_s: requests as f64 / args.duration.as_secs_f64(),
        p50_us: us("p50_us"),
        p90_us: us("p90_us"),
        p99_us: us("p99_us"),
        p999_us: us("p999_us"),
        max_us: us("max_us"),
        p50_ratio: None,
        throughput_ratio: None,
    })
}

/// Mycelium's plugin host (the runtime's code, in this process) calling the Go plugin
/// directly, no NATS, in a closed loop as `go_host` does: the plugin hop alone, on our side
/// of the call, against go-plugin's own in the same run.
async fn go_direct(
    plugin: &Path,
    work: &Path,
    args: &Args,
    data: &str,
    concurrency: usize,
) -> Result<Outcome> {
    let name: FunctionName = "bench-direct".parse()?;
    let config = ProcessConfig::new(name.clone(), 1, work.join("go-direct"));
    let process = Arc::new(
        PluginProcess::start(plugin, config)
            .await
            .context("starting the Go plugin")?,
    );
    let caller = DirectCaller {
        process: process.clone(),
        event: Arc::new(bench_event(data)),
        name,
    };
    let (histogram, errors, elapsed) =
        closed_loop(&caller, concurrency, args.warmup, args.duration).await;
    process.stop().await;
    Ok(outcome(
        "go-direct",
        concurrency,
        "closed-loop",
        &histogram,
        errors,
        elapsed,
    ))
}

/// A call to a plugin process, straight through the runtime's plugin host.
#[derive(Clone)]
struct DirectCaller {
    process: Arc<PluginProcess>,
    event: Arc<mycelium_core::Event>,
    name: FunctionName,
}

impl Caller for DirectCaller {
    fn call(&self) -> impl std::future::Future<Output = bool> + Send {
        let ctx = InvocationContext::new(
            self.name.clone(),
            1,
            "bench",
            Instant::now() + Duration::from_secs(30),
            Default::default(),
            tracing::Span::none(),
        );
        async move { self.process.execute(&self.event, &ctx).await.is_ok() }
    }
}

/// Deploys `binary` as `name` (a plugin, or a WebAssembly module by its first bytes) and
/// waits until an invocation succeeds.
async fn deploy_and_wait(
    registry: &NatsRegistry,
    nats: &async_nats::Client,
    name: &str,
    source: ArtifactSource,
) -> Result<Duration> {
    let spec = match &source {
        ArtifactSource::Bytes(bytes)
            if mycelium_registry::kind_of_binary(bytes) == mycelium_core::FunctionKind::Wasm =>
        {
            DeploySpec::wasm(name.parse()?, source)
        }
        _ => DeploySpec::plugin(name.parse()?, source),
    };
    deploy_spec_and_wait(registry, nats, spec).await
}

/// Deploys `spec` and waits until an invocation succeeds.
async fn deploy_spec_and_wait(
    registry: &NatsRegistry,
    nats: &async_nats::Client,
    spec: DeploySpec,
) -> Result<Duration> {
    let start = Instant::now();
    let name = spec.name.to_string();
    let name = name.as_str();
    registry
        .deploy(spec)
        .await
        .with_context(|| format!("deploying {name}"))?;
    let shot = Shot {
        subject: "function.invoke".into(),
        headers: None,
        body: invoke_body(name, "x"),
        asynchronous: None,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !send(nats, &shot).await {
        if Instant::now() > deadline {
            bail!("{name} never answered after its deploy");
        }
    }
    Ok(start.elapsed())
}

/// Deploys `spec` (a new version of `name`) and times its first invocation, once the runtime
/// knows the version (the runtime runs without prestart, so that call pays the cold start).
async fn first_call(
    registry: &NatsRegistry,
    nats: &async_nats::Client,
    name: &str,
    spec: DeploySpec,
) -> Result<Duration> {
    registry.deploy(spec).await?;
    let version = registry.versions(&name.parse()?)?.active.unwrap_or(0);
    let shot = Shot {
        subject: "function.invoke".into(),
        headers: None,
        body: {
            let event = EventBuilderV10::new()
                .id("cold")
                .source("bench")
                .ty("cold")
                .build()?;
            envelope::encode_invoke_request(&name.parse()?, &event, Some(version), None).into()
        },
        asynchronous: None,
    };
    // The runtime learns of the version within milliseconds; wait for that outside the timing.
    let probe = Shot {
        subject: "function.describe".into(),
        headers: None,
        body: format!(r#"{{"functionName":"{name}","version":{version}}}"#).into(),
        asynchronous: None,
    };
    while !send(nats, &probe).await {}
    let start = Instant::now();
    if !send(nats, &shot).await {
        bail!("the first call of {name} v{version} failed");
    }
    Ok(start.elapsed())
}

fn summary(name: &str, samples: &mut [Duration]) -> Outcome {
    samples.sort();
    let mut histogram = histogram();
    for sample in samples.iter() {
        let _ = histogram.record(u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    let total: Duration = samples.iter().sum();
    outcome(name, 1, "rounds", &histogram, 0, total)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.serve_echo {
        return serve_echo(url).await;
    }
    // Interrupted (Ctrl-C, or SIGTERM from a script), the run is dropped, and with it the
    // processes it started: its `Stack` and echo responder kill theirs as they drop, and the
    // plugins die with the runtime.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the processes it started are stopped"),
        _ = terminate.recv() => bail!("terminated; the processes it started are stopped"),
    }
}

/// Every scenario asked for, start to report.
async fn run(args: Args) -> Result<()> {
    for scenario in &args.scenarios {
        if !REQUEST_SCENARIOS.contains(&scenario.as_str())
            && !OTHER_SCENARIOS.contains(&scenario.as_str())
        {
            bail!(
                "unknown scenario {scenario:?}; known: {}",
                [&REQUEST_SCENARIOS[..], &OTHER_SCENARIOS[..]]
                    .concat()
                    .join(", ")
            );
        }
    }
    let wanted = |s: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|w| w == s);
    let work = tempfile::tempdir()?;
    let (stack, url) = match &args.nats_url {
        Some(url) => (None, url.clone()),
        None => {
            let (stack, url) = start_stack(&args).await?;
            (Some(stack), url)
        }
    };
    let nats = async_nats::connect(url.as_str())
        .await
        .context("connecting to NATS")?;
    wait_for_runtime(&nats).await?;
    let runtime_pid = stack
        .as_ref()
        .and_then(|s| s.runtime.as_ref())
        .map(Child::id);
    let rss_idle = runtime_pid.and_then(rss_kib);

    let _echo_process = if args.in_process_echo {
        let url = url.clone();
        tokio::spawn(async move { serve_echo(&url).await });
        None
    } else {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--serve-echo", &url])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the echo responder process")?;
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut ready,
        )?;
        Some(KillOnDrop(child))
    };
    nats.flush().await?;

    let registry = NatsRegistry::open(nats.clone(), NatsRegistryConfig::default()).await?;
    let mut available = vec!["nats-echo", "builtin", "binding", "async"];
    if wanted("trigger") {
        let client = mycelium_client::Client::new(nats.clone());
        client
            .add_trigger(mycelium_client::Trigger {
                name: "bench".parse()?,
                function: "echo".parse()?,
                source: mycelium_client::TriggerSource::Subject {
                    subject: TRIGGER_IN.into(),
                },
                then: Some(TRIGGER_OUT.into()),
                paused: false,
                created_at: None,
            })
            .await?;
        // The runtime subscribes moments after the registry tells it.
        let probe = AsyncResults::start(&nats, true).await?;
        let shot = shot_for("trigger", "x", Some(probe.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !probe.send(&shot).await {
            if Instant::now() > deadline {
                bail!("the bench trigger never ran");
            }
        }
        available.push("trigger");
    }
    if wanted("plugin-rust") || wanted("plugin-secret") || wanted("cold-start") || wanted("deploy")
    {
        let rust = args
            .rust_plugin
            .clone()
            .unwrap_or_else(|| sibling("mycelium-example-plugin"));
        if rust.is_file() {
            deploy_and_wait(
                &registry,
                &nats,
                "bench-rust",
                ArtifactSource::File(rust.clone()),
            )
            .await?;
            available.push("plugin-rust");
            if wanted("plugin-secret") {
                // The same plugin naming a secret: what opening and delivering it costs a call.
                let client = mycelium_client::Client::new(nats.clone());
                let secret: mycelium_core::secret::SecretName = "bench-token".parse()?;
                match client
                    .secrets()
                    .await?
                    .set(&secret, "bench-secret-value", None)
                    .await
                {
                    Ok(_) => {
                        let mut spec = DeploySpec::plugin(
                            "bench-rust-secret".parse()?,
                            ArtifactSource::File(rust),
                        );
                        spec.secrets.insert("BENCH_TOKEN".into(), secret);
                        deploy_spec_and_wait(&registry, &nats, spec).await?;
                        available.push("plugin-secret");
                    }
                    Err(error) => eprintln!("plugin-secret: skipped, {error}"),
                }
            }
        } else {
            eprintln!("plugin-rust: skipped, {} is missing (cargo build --release -p mycelium-example-plugin)", rust.display());
        }
    }
    let mut go_built = None;
    if wanted("plugin-go") || wanted("go-host") || wanted("go-host-paced") || wanted("go-direct") {
        match go_plugin(&args, work.path()) {
            Some(go) => {
                if wanted("plugin-go") {
                    deploy_and_wait(&registry, &nats, "bench-go", ArtifactSource::File(go.clone()))
                        .await?;
                    available.push("plugin-go");
                }
                go_built = Some(go);
            }
            None => eprintln!(
                "plugin-go, go-host: skipped, the Go toolchain is missing (see examples/go-plugin/build.sh)"
            ),
        }
    }
    let wasm_echo = wat::parse_str(WASM_ECHO).context("compiling the WAT echo guest")?;
    if wanted("wasm") || wanted("wasm-cold") {
        deploy_and_wait(
            &registry,
            &nats,
            "bench-wasm",
            ArtifactSource::Bytes(wasm_echo.clone().into()),
        )
        .await?;
        available.push("wasm");
    }
    if wanted("wasm-c") {
        let built = work.path().join("wasm");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/build-wasm.sh");
        let ok = Command::new(script)
            .arg(&built)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let bytes = std::fs::read(built.join("upper.wasm"))?;
            deploy_and_wait(
                &registry,
                &nats,
                "bench-wasm-c",
                ArtifactSource::Bytes(bytes.into()),
            )
            .await?;
            available.push("wasm-c");
        } else {
            eprintln!("wasm-c: skipped, Debian's clang and wasi-libc are missing (see examples/build-wasm.sh)");
        }
    }
    let go_host_binary = go_built
        .as_ref()
        .filter(|_| wanted("go-host") || wanted("go-host-paced"))
        .and_then(|_| build_go(work.path().join("go-host"), &["--host"]));

    let data = "x".repeat(args.payload_size);
    let mut outcomes: Vec<Outcome> = Vec::new();
    for pass in 0..args.passes {
        for scenario in REQUEST_SCENARIOS {
            if !wanted(scenario) || !available.contains(&scenario) {
                continue;
            }
            let asynchronous = match scenario {
                "async" => Some(AsyncResults::start(&nats, false).await?),
                "trigger" => Some(AsyncResults::start(&nats, true).await?),
                _ => None,
            };
            let shot = shot_for(scenario, &data, asynchronous);
            for &concurrency in &args.concurrency {
                let (histogram, errors, elapsed, mode) = match args.rate {
                    Some(rate) => {
                        let (h, e, d) = fixed_rate(
                            &nats,
                            &shot,
                            rate,
                            concurrency.max(1) * 64,
                            args.warmup,
                            args.duration,
                        )
                        .await;
                        (h, e, d, "fixed-rate")
                    }
                    None => {
                        let (h, e, d) = closed_loop(
                            &NatsCaller {
                                nats: nats.clone(),
                                shot: shot.clone(),
                            },
                            concurrency,
                            args.warmup,
                            args.duration,
                        )
                        .await;
                        (h, e, d, "closed-loop")
                    }
                };
                eprintln!("{scenario} c={concurrency}: {} requests", histogram.len());
                outcomes.push(Outcome {
                    pass,
                    ..outcome(scenario, concurrency, mode, &histogram, errors, elapsed)
                });
            }
        }

        if let (Some(host), Some(plugin)) = (&go_host_binary, &go_built) {
            let paced = args.concurrency.contains(&1).then_some((1, true));
            let runs = args.concurrency.iter().map(|&c| (c, false));
            let runs = runs
                .filter(|_| wanted("go-host"))
                .chain(paced.filter(|_| wanted("go-host-paced")));
            for (concurrency, paced) in runs {
                let outcome = go_host(host, plugin, &args, concurrency, paced)?;
                eprintln!(
                    "{} c={concurrency}: {} requests",
                    outcome.scenario, outcome.requests
                );
                outcomes.push(Outcome { pass, ..outcome });
            }
        }
        if let Some(plugin) = go_built.as_ref().filter(|_| wanted("go-direct")) {
            for &concurrency in &args.concurrency {
                let outcome = go_direct(plugin, work.path(), &args, &data, concurrency).await?;
                eprintln!("go-direct c={concurrency}: {} requests", outcome.requests);
                outcomes.push(Outcome { pass, ..outcome });
            }
        }
    }

    if wanted("cold-start") && available.contains(&"plugin-rust") {
        // Each round deploys a new version of the same (cached) binary: the runtime runs
        // without prestart, so its first invocation pays spawn, handshake and health check.
        let rust = args
            .rust_plugin
            .clone()
            .unwrap_or_else(|| sibling("mycelium-example-plugin"));
        let mut samples = Vec::new();
        for round in 0..args.rounds {
            samples.push(
                first_call(
                    &registry,
                    &nats,
                    "bench-cold",
                    DeploySpec::plugin("bench-cold".parse()?, ArtifactSource::File(rust.clone())),
                )
                .await
                .with_context(|| format!("cold-start round {round}"))?,
            );
        }
        outcomes.push(summary("cold-start", &mut samples));
    }

    if wanted("wasm-cold") && available.contains(&"wasm") {
        // Each round deploys a new version of the same module: its binary and compiled code
        // are in the runtime's cache, so the first call pays the load (map the compiled code,
        // link) and the first instance. Compared with the warm call of the `wasm` scenario.
        let mut samples = Vec::new();
        for round in 0..args.rounds {
            samples.push(
                first_call(
                    &registry,
                    &nats,
                    "bench-wasm-cold",
                    DeploySpec::wasm(
                        "bench-wasm-cold".parse()?,
                        ArtifactSource::Bytes(wasm_echo.clone().into()),
                    ),
                )
                .await
                .with_context(|| format!("wasm-cold round {round}"))?,
            );
        }
        outcomes.push(summary("wasm-cold", &mut samples));
    }

    let mut rss_per_wasm_kib = None;
    if wanted("wasm-density") {
        // 100 distinct modules (the echo guest with a custom section naming each), each
        // deployed and called once so the runtime holds it loaded; the runtime's memory growth
        // per module.
        let before = runtime_pid.and_then(rss_kib);
        const MODULES: u64 = 100;
        for i in 0..MODULES {
            let mut module = wasm_echo.clone();
            module.extend_from_slice(&[0, 11, 2, b'm', b'b']);
            module.extend_from_slice(&i.to_le_bytes());
            deploy_and_wait(
                &registry,
                &nats,
                &format!("bench-dense-{i}"),
                ArtifactSource::Bytes(module.into()),
            )
            .await?;
        }
        let after = runtime_pid.and_then(rss_kib);
        if let (Some(before), Some(after)) = (before, after) {
            let per = after.saturating_sub(before) as f64 / MODULES as f64;
            eprintln!("wasm-density: {before} KiB before, {after} KiB after {MODULES} modules: {per:.0} KiB each");
            rss_per_wasm_kib = Some(per);
        }
    }

    if wanted("deploy") && available.contains(&"plugin-rust") {
        // A 10 MiB binary per round: the example plugin padded with fresh random-ish bytes,
        // so every round uploads, fetches, verifies and starts a new artifact.
        let rust = std::fs::read(
            args.rust_plugin
                .clone()
                .unwrap_or_else(|| sibling("mycelium-example-plugin")),
        )?;
        let mut samples = Vec::new();
        for round in 0..args.rounds.min(10) {
            let mut binary = rust.clone();
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (round as u64 + 1);
            while binary.len() < 10 * 1024 * 1024 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                binary.extend_from_slice(&x.to_le_bytes());
            }
            samples.push(
                deploy_and_wait(
                    &registry,
                    &nats,
                    "bench-deploy",
                    ArtifactSource::Bytes(binary.into()),
                )
                .await?,
            );
        }
        outcomes.push(summary("deploy-10mib", &mut samples));
    }

    for i in 0..outcomes.len() {
        let base = outcomes
            .iter()
            .find(|o| {
                o.scenario == "nats-echo"
                    && o.concurrency == outcomes[i].concurrency
                    && o.mode == outcomes[i].mode
                    && o.pass == outcomes[i].pass
            })
            .map(|o| (o.p50_us, o.throughput_per_s));
        if let Some((p50, throughput)) = base {
            if outcomes[i].mode != "rounds" {
                outcomes[i].p50_ratio = Some(outcomes[i].p50_us / p50);
                outcomes[i].throughput_ratio = Some(outcomes[i].throughput_per_s / throughput);
            }
        }
    }
    let report = Report {
        machine: machine(),
        nats_server: nats.server_info().version,
        runtime_rss_idle_kib: rss_idle,
        runtime_rss_end_kib: runtime_pid.and_then(rss_kib),
        rss_per_wasm_module_kib: rss_per_wasm_kib,
        medians: if args.passes > 1 {
            medians(&outcomes)
        } else {
            Vec::new()
        },
        outcomes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    drop(stack);
    Ok(())
}

/// Each ratio the targets are stated in, per pass, with its median: every scenario against
/// the echo, those through the runtime against the built-in too (p50 and throughput), and the
/// runtime's own cost per Go plugin call (plugin-go p50 minus built-in p50) against go-plugin's
/// own host.
fn medians(outcomes: &[Outcome]) -> Vec<Median> {
    let find = |scenario: &str, concurrency: usize, pass: u32| {
        outcomes.iter().find(|o| {
            o.scenario == scenario
                && o.concurrency == concurrency
                && o.pass == pass
                && o.mode != "rounds"
        })
    };
    let mut rows: Vec<(String, usize, Vec<f64>)> = Vec::new();
    let mut add = |ratio: String, concurrency: usize, value: f64| match rows
        .iter_mut()
        .find(|(r, c, _)| *r == ratio && *c == concurrency)
    {
        Some((_, _, values)) => values.push(value),
        None => rows.push((ratio, concurrency, vec![value])),
    };
    for o in outcomes.iter().filter(|o| o.mode != "rounds") {
        // Against the echo for everything; against the built-in for what goes through the
        // runtime (the WebAssembly targets are stated that way).
        let bases: &[&str] = match o.scenario.as_str() {
            "nats-echo" => &[],
            "builtin" | "go-host" | "go-host-paced" | "go-direct" => &["nats-echo"],
            _ => &["nats-echo", "builtin"],
        };
        for &base in bases {
            let Some(b) = find(base, o.concurrency, o.pass) else {
                continue;
            };
            add(
                format!("{} p50 / {base} p50", o.scenario),
                o.concurrency,
                o.p50_us / b.p50_us,
            );
            add(
                format!("{} req/s / {base} req/s", o.scenario),
                o.concurrency,
                o.throughput_per_s / b.throughput_per_s,
            );
        }
        if o.scenario == "go-direct" {
            if let Some(host) = find("go-host", o.concurrency, o.pass) {
                add(
                    "go-direct p50 / go-host p50".into(),
                    o.concurrency,
                    o.p50_us / host.p50_us,
                );
                add(
                    "go-direct req/s / go-host req/s".into(),
                    o.concurrency,
                    o.throughput_per_s / host.throughput_per_s,
                );
            }
        }
        if o.scenario.starts_with("go-host") {
            if let (Some(go), Some(builtin)) = (
                find("plugin-go", o.concurrency, o.pass),
                find("builtin", o.concurrency, o.pass),
            ) {
                add(
                    format!("(plugin-go p50 - builtin p50) / {} p50", o.scenario),
                    o.concurrency,
                    (go.p50_us - builtin.p50_us) / o.p50_us,
                );
            }
        }
    }
    rows.into_iter()
        .map(|(ratio, concurrency, passes)| {
            let mut sorted = passes.clone();
            sorted.sort_by(f64::total_cmp);
            let middle = sorted.len() / 2;
            let median = if sorted.len() % 2 == 0 {
                (sorted[middle - 1] + sorted[middle]) / 2.0
            } else {
                sorted[middle]
            };
            Median {
                ratio,
                concurrency,
                median,
                min: sorted[0],
                max: sorted[sorted.len() - 1],
                passes,
            }
        })
        .collect()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}

fn print_table(report: &Report) {
    println!(
        "machine: {}; nats-server {}",
        report.machine, report.nats_server
    );
    if let (Some(idle), Some(end)) = (report.runtime_rss_idle_kib, report.runtime_rss_end_kib) {
        println!(
            "runtime RSS: {:.1} MiB idle, {:.1} MiB at the end",
            idle as f64 / 1024.0,
            end as f64 / 1024.0
        );
    }
    if let Some(per) = report.rss_per_wasm_module_kib {
        println!("runtime RSS per WebAssembly module deployed and loaded: {per:.0} KiB");
    }
    println!(
        "{:<14} {:>4} {:>11} {:>9} {:>6} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "scenario",
        "c",
        "mode",
        "requests",
        "errors",
        "req/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "p50 x",
        "req/s x"
    );
    for o in &report.outcomes {
        let ratio = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.2}"));
        println!(
            "{:<14} {:>4} {:>11} {:>9} {:>6} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8} {:>8}",
            o.scenario, o.concurrency, o.mode, o.requests, o.errors, o.throughput_per_s, o.p50_us, o.p90_us, o.p99_us, o.p999_us, o.max_us,
            ratio(o.p50_ratio), ratio(o.throughput_ratio)
        );
    }
    if !report.medians.is_empty() {
        println!("\nratios over the passes (each taken within one pass):");
        println!(
            "{:<46} {:>4} {:>8} {:>8} {:>8}  per pass",
            "ratio", "c", "median", "min", "max"
        );
        for m in &report.medians {
            let passes: Vec<String> = m.passes.iter().map(|p| format!("{p:.2}")).collect();
            println!(
                "{:<46} {:>4} {:>8.2} {:>8.2} {:>8.2}  {}",
                m.ratio,
                m.concurrency,
                m.median,
                m.min,
                m.max,
                passes.join(" ")
            );
        }
    }
}
