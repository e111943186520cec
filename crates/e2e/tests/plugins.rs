//! Plugin functions end to end over a real nats-server: deploy the test plugin binary to the
//! JetStream registry, invoke it through the runtime, and make it misbehave.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use mycelium_client::{Client, InvokeOptions, RequestError, RequestErrorKind};
use mycelium_core::{
    cloudevents::{event::Data, AttributesReader, EventBuilder, EventBuilderV10},
    ErrorCode, Event, FunctionName, InMemoryMetrics,
};
use mycelium_plugin::{
    handshake::Protocol,
    pool::{PluginExecutor, PoolSettings},
};
use mycelium_registry::{
    ArtifactSource, DeploySpec, NatsRegistry, NatsRegistryConfig, Registry, RegistryAdmin,
};
use mycelium_runtime::{presets::Assembly, RuntimeConfig, RuntimeHandle};
use mycelium_test_support::{eventually, NatsServer};
use serde_json::{json, Value};

const TEST_PLUGIN: &str = env!("CARGO_BIN_EXE_mycelium-test-plugin");

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

struct Fixture {
    server: NatsServer,
    runtime_registry: Arc<NatsRegistry>,
    admin: NatsRegistry,
    client: Client,
    plugins: Arc<PluginExecutor>,
    metrics: Arc<InMemoryMetrics>,
    runtime: Option<RuntimeHandle>,
    _dir: tempfile::TempDir,
}

async fn fixture(settings: PoolSettings, prestart: bool) -> Fixture {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(InMemoryMetrics::new());
    let assembled = Assembly {
        config: RuntimeConfig {
            prestart_plugins: prestart,
            ..RuntimeConfig::default()
        },
        plugin_dir: dir.path().to_owned(),
        plugins: settings,
        metrics: Some(metrics.clone()),
        ..Assembly::default()
    }
    .build(server.connect().await)
    .await
    .unwrap();
    Fixture {
        admin: NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
            .await
            .unwrap(),
        client: Client::new(server.connect().await),
        server,
        runtime_registry: assembled.registry,
        plugins: assembled.plugins,
        metrics,
        runtime: Some(assembled.runtime.start().await.unwrap()),
        _dir: dir,
    }
}

impl Fixture {
    async fn deploy(&self, function: &str, env: &[(&str, &str)], memory_mb: Option<u64>) -> u64 {
        let mut spec = DeploySpec::plugin(name(function), ArtifactSource::File(TEST_PLUGIN.into()));
        spec.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec.memory_mb = memory_mb;
        let version = self.admin.deploy(spec).await.unwrap().version;
        assert!(
            self.runtime_registry
                .wait_for_active(&name(function), version, Duration::from_secs(30))
                .await,
            "the runtime did not see the deploy"
        );
        version
    }

    async fn call(
        &self,
        function: &str,
        behaviour: &str,
        data: Value,
    ) -> Result<Vec<Event>, RequestError> {
        self.call_with(function, behaviour, data, Duration::from_secs(20))
            .await
    }

    async fn call_with(
        &self,
        function: &str,
        behaviour: &str,
        data: Value,
        timeout: Duration,
    ) -> Result<Vec<Event>, RequestError> {
        let event = EventBuilderV10::new()
            .id("t")
            .source("e2e")
            .ty(behaviour)
            .data("application/json", data)
            .build()
            .unwrap();
        self.client
            .invoke_with(
                function,
                &event,
                InvokeOptions {
                    version: None,
                    timeout: Some(timeout),
                    ..Default::default()
                },
            )
            .await
    }
}

fn json_data(event: &Event) -> Value {
    match event.data() {
        Some(Data::Json(value)) => value.clone(),
        other => panic!("expected JSON data, got {other:?}"),
    }
}

fn pid_of(events: &[Event]) -> u64 {
    json_data(&events[0])["pid"].as_u64().unwrap()
}

fn code(result: Result<Vec<Event>, RequestError>) -> (ErrorCode, String) {
    let err = result.unwrap_err();
    match err.kind() {
        RequestErrorKind::Remote(code) => (code, err.to_string()),
        other => panic!("expected a remote error, got {other:?}: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_plugin_runs_cold_then_warm_with_a_clean_environment() {
    let f = fixture(PoolSettings::default(), false).await;
    f.deploy("rusty", &[("GREETING", "hello")], None).await;
    assert_eq!(
        f.plugins.process_count(),
        0,
        "no process before the first call"
    );

    let echoed = f.call("rusty", "echo", json!({"n": 1})).await.unwrap();
    assert_eq!(echoed[0].id(), "t");
    assert_eq!(json_data(&echoed[0]), json!({"n": 1}));
    let identity = f.call("rusty", "pid", json!({})).await.unwrap();
    let first_pid = pid_of(&identity);
    // Its own process group, led by itself: signals to the group reach only the plugin.
    assert_eq!(json_data(&identity[0])["pgid"], json!(first_pid));
    #[allow(unsafe_code)]
    // SAFETY: getpgid(0) only reads this process's group id.
    let own_group = unsafe { libc::getpgid(0) };
    assert_ne!(i64::from(own_group), first_pid as i64);
    for _ in 0..20 {
        assert_eq!(
            pid_of(&f.call("rusty", "pid", json!({})).await.unwrap()),
            first_pid,
            "warm calls reuse the process"
        );
    }
    assert_eq!(f.plugins.process_count(), 1);
    assert_eq!(
        f.metrics.plugin_starts("rusty"),
        1,
        "one cold start for 22 calls"
    );
    assert_eq!(f.metrics.plugin_crashes("rusty"), 0);

    let text = EventBuilderV10::new()
        .id("u")
        .source("e2e")
        .ty("upper")
        .data("text/plain", "shout")
        .build()
        .unwrap();
    let upper = f.client.invoke("rusty", text).await.unwrap();
    assert_eq!(upper[0].data(), Some(&Data::String("SHOUT".into())));

    let env = json_data(&f.call("rusty", "env", json!({})).await.unwrap()[0]);
    let mut names: Vec<&str> = env["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "GREETING",
            "MYCELIUM_PLUGIN_MAGIC_COOKIE",
            "MYCELIUM_PLUGIN_PROTOCOLS",
            "PLUGIN_MAX_PORT",
            "PLUGIN_MIN_PORT",
            "PLUGIN_PROTOCOL_VERSIONS",
            "PLUGIN_UNIX_SOCKET_DIR",
            "TMPDIR"
        ],
        "only the handshake and the function's own environment"
    );
    assert!(
        env["cwd"].as_str().unwrap().contains("rusty-v1-"),
        "its own working directory: {env}"
    );

    let (code_, message) = code(f.call("rusty", "fail", json!({})).await);
    assert_eq!(code_, ErrorCode::FunctionError);
    assert!(message.contains("failing on purpose"), "{message}");

    // Memory of the process is sampled through the metrics seam.
    eventually(Duration::from_secs(10), || async {
        f.metrics.plugin_memory("rusty", 1).filter(|rss| *rss > 0)
    })
    .await;
}

/// Log output of this test binary, captured for assertions.
static LOGS: std::sync::LazyLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::LazyLock::new(|| {
    let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("mycelium::plugin=debug")
        .with_ansi(false)
        .with_writer(move || LogWriter(sink.clone()))
        .init();
    logs
});

struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_output_becomes_tagged_log_records() {
    let logs = LOGS.clone();
    let f = fixture(PoolSettings::default(), false).await;
    f.deploy("chatty", &[], None).await;
    f.call("chatty", "print", json!({})).await.unwrap();
    let (plain, hclog) = eventually(Duration::from_secs(10), || {
        let logs = logs.clone();
        async move {
            let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
            let find = |needle: &str| text.lines().find(|l| l.contains(needle)).map(str::to_owned);
            Some((
                find("plain line from the plugin")?,
                find("hclog line from the plugin")?,
            ))
        }
    })
    .await;
    assert!(
        plain.contains("INFO")
            && plain.contains("function=chatty")
            && plain.contains("stream=\"stdout\""),
        "{plain}"
    );
    assert!(
        hclog.contains("WARN") && hclog.contains("stream=\"stderr\"") && !hclog.contains("@level"),
        "{hclog}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_call_fails_that_call_only() {
    let f = fixture(PoolSettings::default(), false).await;
    f.deploy("crashy", &[], None).await;
    let before = pid_of(&f.call("crashy", "pid", json!({})).await.unwrap());
    let (code_, message) = code(f.call("crashy", "crash", json!({})).await);
    assert_eq!(code_, ErrorCode::PluginCrashed, "{message}");
    assert!(message.contains("died during the call"), "{message}");
    let after = pid_of(&f.call("crashy", "pid", json!({})).await.unwrap());
    assert_ne!(before, after, "a new process took over");
    assert_eq!(
        (
            f.metrics.plugin_starts("crashy"),
            f.metrics.plugin_crashes("crashy")
        ),
        (2, 1)
    );
}

/// An answer over the 4 MiB message limit fails its own call only, in either protocol: the
/// process goes on answering on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_fails_only_its_own_call() {
    for offer_frames in [true, false] {
        let settings = PoolSettings {
            offer_frames,
            ..PoolSettings::default()
        };
        let f = fixture(settings, false).await;
        f.deploy("big", &[], None).await;
        let before = pid_of(&f.call("big", "pid", json!({})).await.unwrap());
        let fits = f
            .call("big", "big", json!({"bytes": 100_000}))
            .await
            .unwrap();
        assert_eq!(json_data(&fits[0])["blob"].as_str().unwrap().len(), 100_000);
        let (code_, message) = code(f.call("big", "big", json!({"bytes": 5 << 20})).await);
        assert_eq!(code_, ErrorCode::Unavailable, "{message}");
        assert!(
            message.contains("4194304"),
            "frames {offer_frames}: {message}"
        );
        let after = pid_of(&f.call("big", "pid", json!({})).await.unwrap());
        assert_eq!(
            before, after,
            "frames {offer_frames}: the same process answers on"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_plugin_mid_call() {
    let f = fixture(PoolSettings::default(), false).await;
    f.deploy("killed", &[], None).await;
    let pid = pid_of(&f.call("killed", "pid", json!({})).await.unwrap());
    let slow = tokio::spawn({
        let client = f.client.clone();
        async move {
            let event = EventBuilderV10::new()
                .id("s")
                .source("e2e")
                .ty("sleep")
                .data("application/json", json!({"ms": 60_000}))
                .build()
                .unwrap();
            client.invoke("killed", event).await
        }
    });
    // The call is in the plugin once the runtime reports it in flight.
    eventually(Duration::from_secs(10), || async {
        (f.metrics.in_flight("killed") == 1).then_some(())
    })
    .await;
    mycelium_test_support::kill_now(u32::try_from(pid).unwrap());
    let (code_, message) = code(slow.await.unwrap());
    assert_eq!(code_, ErrorCode::PluginCrashed, "{message}");
    assert!(message.contains("signal: 9"), "{message}");
    let after = pid_of(&f.call("killed", "pid", json!({})).await.unwrap());
    assert_ne!(after, pid);
}

/// A call past its deadline is dropped in the plugin too (a cancel frame, or a reset stream
/// over gRPC), not left running there, and the process goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_is_cancelled_in_the_plugin() {
    let logs = LOGS.clone();
    for (offer_frames, function) in [(true, "sleeper"), (false, "grpc-sleeper")] {
        let settings = PoolSettings {
            offer_frames,
            ..PoolSettings::default()
        };
        let f = fixture(settings, false).await;
        f.deploy(function, &[], None).await;
        let before = pid_of(&f.call(function, "pid", json!({})).await.unwrap());
        let (code_, message) = code(
            f.call_with(
                function,
                "sleep",
                json!({"ms": 600_000}),
                Duration::from_millis(300),
            )
            .await,
        );
        assert_eq!(code_, ErrorCode::Timeout, "{message}");
        let tag = format!("function={function} ");
        let cancelled = eventually(Duration::from_secs(10), || {
            let logs = logs.clone();
            let tag = tag.clone();
            async move {
                let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
                text.lines()
                    .find(|l| l.contains(&tag) && l.contains("sleep cancelled"))
                    .map(str::to_owned)
            }
        })
        .await;
        assert!(cancelled.contains("stream=\"stderr\""), "{cancelled}");
        let after = pid_of(&f.call(function, "pid", json!({})).await.unwrap());
        assert_eq!(before, after, "{function}: the same process answers on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_plugin_times_out_and_is_replaced() {
    let f = fixture(PoolSettings::default(), false).await;
    f.deploy("hangs", &[], None).await;
    let before = pid_of(&f.call("hangs", "pid", json!({})).await.unwrap());
    let (code_, message) = code(
        f.call_with("hangs", "hang", json!({}), Duration::from_millis(500))
            .await,
    );
    assert_eq!(code_, ErrorCode::Timeout, "{message}");
    let after = eventually(Duration::from_secs(30), || async {
        f.call_with("hangs", "pid", json!({}), Duration::from_secs(2))
            .await
            .ok()
            .map(|events| pid_of(&events))
    })
    .await;
    assert_ne!(before, after, "the stopped process was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_are_clear() {
    let f = fixture(
        PoolSettings {
            start_timeout: Duration::from_secs(2),
            ..PoolSettings::default()
        },
        false,
    )
    .await;
    f.deploy(
        "early-exit",
        &[("MYCELIUM_TEST_PLUGIN_START", "exit")],
        None,
    )
    .await;
    let (code_, message) = code(f.call("early-exit", "echo", json!({})).await);
    assert_eq!(code_, ErrorCode::PluginStartFailed, "{message}");
    assert!(message.contains("exited before its handshake"), "{message}");
    assert!(
        message.contains("exiting on purpose before the handshake"),
        "the stderr tail: {message}"
    );

    f.deploy(
        "garbage",
        &[("MYCELIUM_TEST_PLUGIN_START", "garbage")],
        None,
    )
    .await;
    let (code_, message) = code(f.call("garbage", "echo", json!({})).await);
    assert_eq!(code_, ErrorCode::PluginStartFailed, "{message}");
    assert!(
        message.contains("malformed handshake \"this is not a handshake\""),
        "{message}"
    );

    f.deploy("silent", &[("MYCELIUM_TEST_PLUGIN_START", "silent")], None)
        .await;
    let (code_, message) = code(f.call("silent", "echo", json!({})).await);
    assert_eq!(code_, ErrorCode::PluginStartFailed, "{message}");
    assert!(message.contains("no handshake within"), "{message}");

    // The runtime is unharmed.
    f.deploy("fine", &[], None).await;
    assert_eq!(f.call("fine", "echo", json!({})).await.unwrap().len(), 1);
    assert_eq!(
        f.plugins.process_count(),
        1,
        "failed starts leave no process behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off_and_answers_at_once_meanwhile() {
    let f = fixture(
        PoolSettings {
            max_restart_backoff: Duration::from_secs(30),
            ..PoolSettings::default()
        },
        false,
    )
    .await;
    f.deploy("looping", &[("MYCELIUM_TEST_PLUGIN_START", "exit")], None)
        .await;
    // Each failed start doubles the wait before the next (100 ms, 200 ms, ...). Calls that
    // arrive meanwhile are answered at once with the last start error: nobody waits out a
    // backoff holding an in-flight slot, and the process is not spawned again for them.
    let (mut during_backoff, mut most_failures) = (0, 0);
    for _ in 0..40 {
        let (code_, message) = code(
            f.call_with("looping", "echo", json!({}), Duration::from_secs(30))
                .await,
        );
        assert_eq!(code_, ErrorCode::PluginStartFailed, "{message}");
        assert!(
            message.contains("exiting on purpose before the handshake"),
            "the last start error: {message}"
        );
        if let Some(rest) = message.split("failed ").nth(1) {
            if let Some(n) = rest.split(" times in a row; the next attempt is in").next() {
                if let Ok(n) = n.parse::<u32>() {
                    during_backoff += 1;
                    most_failures = most_failures.max(n);
                }
            }
        }
    }
    assert!(during_backoff > 0, "no call was answered during a backoff");
    // Spinning would have started a process for each of the 40 calls; the doubling waits
    // allow only a handful within any plausible run time.
    assert!(
        (2..=12).contains(&most_failures),
        "{most_failures} starts for 40 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_processes_scale_to_zero() {
    let f = fixture(
        PoolSettings {
            idle_timeout: Duration::from_millis(300),
            ..PoolSettings::default()
        },
        false,
    )
    .await;
    f.deploy("sleepy", &[], None).await;
    let first = pid_of(&f.call("sleepy", "pid", json!({})).await.unwrap());
    eventually(Duration::from_secs(20), || async {
        (f.plugins.process_count() == 0).then_some(())
    })
    .await;
    let second = pid_of(&f.call("sleepy", "pid", json!({})).await.unwrap());
    assert_ne!(first, second, "a cold start after scaling to zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_and_memory_limits_do_not_hurt_the_runtime() {
    let logs = LOGS.clone();
    let f = fixture(
        PoolSettings {
            log_lines_per_second: 100,
            ..PoolSettings::default()
        },
        false,
    )
    .await;
    f.deploy("loud", &[], None).await;
    assert_eq!(f.call("loud", "flood", json!({})).await.unwrap().len(), 1);
    assert_eq!(f.call("loud", "echo", json!({})).await.unwrap().len(), 1);
    // 10,000 lines in a burst (some the plugin's SDK already drops when the host does not
    // read fast enough): 100 a second reach the log, and the rest are counted in records of
    // their own, the last when the process ends.
    let mut f = f;
    f.runtime.take().unwrap().shutdown().await;
    let (passed, dropped) = eventually(Duration::from_secs(30), || {
        let logs = logs.clone();
        async move {
            let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
            let loud = text.lines().filter(|l| l.contains("function=loud"));
            let (mut passed, mut dropped) = (0u64, 0u64);
            for line in loud {
                if line.contains(" xxxxxxxx") {
                    passed += 1;
                } else if let Some(n) = line
                    .split(" lines dropped: the function's output exceeded 100 lines per second")
                    .next()
                    .filter(|_| line.contains("lines dropped"))
                    .and_then(|head| head.rsplit(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    dropped += n;
                }
            }
            (dropped > 0).then_some((passed, dropped))
        }
    })
    .await;
    assert!(
        (100..1_000).contains(&passed),
        "{passed} lines passed, {dropped} dropped"
    );
    let f = fixture(PoolSettings::default(), false).await;

    f.deploy("greedy", &[], Some(256)).await;
    assert_eq!(
        json_data(&f.call("greedy", "alloc", json!({"mb": 16})).await.unwrap()[0])["touched"],
        16 << 20
    );
    let (code_, message) = code(f.call("greedy", "alloc", json!({"mb": 1024})).await);
    assert_eq!(
        code_,
        ErrorCode::PluginCrashed,
        "over its memory limit: {message}"
    );
    assert_eq!(f.call("greedy", "echo", json!({})).await.unwrap().len(), 1);
}

/// With control groups, what a plugin starts in a session of its own (out of reach of its
/// process group) dies with it, and its memory limit is on resident memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_daemons_die_with_it_and_memory_is_limited_in_its_cgroup() {
    let mut f = fixture(PoolSettings::default(), false).await;
    if !f.plugins.has_cgroups() {
        assert!(
            std::env::var_os("MYCELIUM_CGROUPS_REQUIRED").is_none(),
            "control groups are required here"
        );
        eprintln!("SKIPPED: this runtime cannot create control groups (run as root)");
        return;
    }
    // With a memory limit the process joins its group before exec; without one the host
    // moves it in while it starts (the wait below), off the cold start's path.
    f.deploy("limited", &[], Some(64)).await;
    f.deploy("spawner", &[], None).await;
    let in_group = |pid: u64, function: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|text| text.contains(&format!("mycelium-{function}-v1-")))
    };
    let plugin = pid_of(&f.call("spawner", "pid", json!({})).await.unwrap());
    eventually(Duration::from_secs(30), || async {
        in_group(plugin, "spawner").then_some(())
    })
    .await;
    let mut daemons = Vec::new();
    for function in ["limited", "spawner"] {
        let reply = f.call(function, "daemon", json!({})).await.unwrap();
        let daemon = json_data(&reply[0])["pid"].as_u64().unwrap();
        assert!(
            in_group(daemon, function),
            "{function}'s daemon is in its group"
        );
        daemons.push(daemon);
    }
    // 16 MiB fits in 64; 128 MiB of resident memory does not, whatever the address space.
    assert_eq!(
        json_data(&f.call("limited", "alloc", json!({"mb": 16})).await.unwrap()[0])["touched"],
        16 << 20
    );
    let (code_, message) = code(f.call("limited", "alloc", json!({"mb": 128})).await);
    assert_eq!(code_, ErrorCode::PluginCrashed, "{message}");

    f.runtime.take().unwrap().shutdown().await;
    eventually(Duration::from_secs(30), || async {
        let alive = daemons.iter().any(|daemon| {
            std::fs::read_to_string(format!("/proc/{daemon}/stat")).is_ok_and(|s| {
                !matches!(
                    s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()),
                    Some('Z' | 'X')
                )
            })
        });
        (!alive).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_binary_is_never_executed() {
    let f = fixture(PoolSettings::default(), false).await;
    let version = f.deploy("tampered", &[], None).await;
    let meta = f
        .runtime_registry
        .get(&name("tampered"), Some(version))
        .unwrap();
    let objects = async_nats::jetstream::new(f.server.connect().await)
        .get_object_store("mycelium_artifacts")
        .await
        .unwrap();
    let object = mycelium_registry::digest::object_name(meta.digest.as_deref().unwrap()).unwrap();
    objects
        .put(object.as_str(), &mut &b"#!/bin/sh\necho pwned\n"[..])
        .await
        .unwrap();

    let (code_, message) = code(f.call("tampered", "echo", json!({})).await);
    assert_eq!(code_, ErrorCode::ArtifactCorrupt, "{message}");
    assert_eq!(f.plugins.process_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_grows_with_queued_calls_and_shrinks_when_idle() {
    let settings = PoolSettings {
        max_processes: 3,
        concurrency_per_process: 2,
        surplus_idle_timeout: Duration::from_millis(300),
        ..PoolSettings::default()
    };
    let f = fixture(settings, false).await;
    f.deploy("pooled", &[], None).await;
    // Eight two-second calls against room for two per process: the pool grows to its bound of
    // three while calls queue (a start takes milliseconds, the calls seconds), and the two
    // calls that find no room wait for a free one.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let client = f.client.clone();
            tokio::spawn(async move {
                let event = EventBuilderV10::new()
                    .id("p")
                    .source("e2e")
                    .ty("sleep")
                    .data("application/json", json!({"ms": 2000}))
                    .build()
                    .unwrap();
                client.invoke("pooled", event).await
            })
        })
        .collect();
    let mut served_by: HashMap<u64, usize> = HashMap::new();
    for call in calls {
        let events = call
            .await
            .unwrap()
            .expect("a queued call waits, it does not fail");
        *served_by.entry(pid_of(&events)).or_default() += 1;
    }
    assert_eq!(served_by.len(), 3, "three processes served: {served_by:?}");
    assert_eq!(served_by.values().sum::<usize>(), 8);
    // The burst is over: the two extra processes stop, the first stays for its idle timeout.
    eventually(Duration::from_secs(20), || async {
        (f.plugins.process_count() == 1).then_some(())
    })
    .await;
    let events = f.call("pooled", "pid", json!({})).await.unwrap();
    assert!(
        served_by.contains_key(&pid_of(&events)),
        "the first process stayed"
    );
    assert_eq!(f.plugins.process_count(), 1);
}

async fn wait_for(seen: &mut tokio::sync::mpsc::UnboundedReceiver<String>, tag: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while seen.recv().await.as_deref() != Some(tag) {}
    })
    .await
    .unwrap_or_else(|_| panic!("no {tag} reply under load"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_of_a_plugin_under_load_loses_nothing() {
    let f = fixture(PoolSettings::default(), true).await;
    f.deploy("reloaded", &[("TAG", "v1")], None).await;
    // Prestart: the process exists before any call.
    eventually(Duration::from_secs(20), || async {
        (f.plugins.process_count() == 1).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop, failures, seen_tx) = (
                f.client.clone(),
                stop.clone(),
                failures.clone(),
                seen_tx.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let event = EventBuilderV10::new()
                        .id("l")
                        .source("e2e")
                        .ty("tag")
                        .data("application/json", json!({}))
                        .build()
                        .unwrap();
                    match client.invoke("reloaded", event).await {
                        Ok(events) => {
                            let _ = seen_tx.send(
                                json_data(&events[0])["tag"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                            );
                        }
                        Err(error) => {
                            eprintln!("failed invocation: {error}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    wait_for(&mut seen, "v1").await;
    f.deploy("reloaded", &[("TAG", "v2")], None).await;
    wait_for(&mut seen, "v2").await;
    f.admin.rollback(&name("reloaded"), 1).await.unwrap();
    wait_for(&mut seen, "v1").await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed invocations across update and rollback"
    );
    // The retired version's process drains and stops; the active one stays.
    eventually(Duration::from_secs(30), || async {
        (f.plugins.process_count() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_plugin_process() {
    let mut f = fixture(PoolSettings::default(), false).await;
    f.deploy("stopped", &[], None).await;
    let pid = pid_of(&f.call("stopped", "pid", json!({})).await.unwrap());
    f.runtime.take().unwrap().shutdown().await;
    assert_eq!(f.plugins.process_count(), 0);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
        "plugin {pid} still runs"
    );
}

fn is_zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

#[test]
fn no_orphans_when_the_host_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = std::process::Command::new(env!("CARGO_BIN_EXE_mycelium-e2e-host"))
        .arg(TEST_PLUGIN)
        .arg(dir.path().join("work"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(host.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let plugin_pid: u64 = line.trim().parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{plugin_pid}")).exists());
    host.kill().unwrap(); // SIGKILL: the host gets no chance to clean up
    host.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{plugin_pid}")).exists() && !is_zombie(plugin_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "plugin {plugin_pid} outlived its SIGKILLed host"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_binaries_signed_by_a_trusted_key_run() {
    let trusted = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let f = fixture(
        PoolSettings {
            trusted_signers: vec![trusted.public_key()],
            ..PoolSettings::default()
        },
        false,
    )
    .await;
    let deploy = |function: &'static str, key: Option<&nkeys::KeyPair>| {
        let mut spec = DeploySpec::plugin(name(function), ArtifactSource::File(TEST_PLUGIN.into()));
        spec.signing_key =
            key.map(|k| mycelium_registry::SigningKey::from_seed(&k.seed().unwrap()).unwrap());
        let (admin, registry) = (&f.admin, f.runtime_registry.clone());
        async move {
            let deployed = admin.deploy(spec).await.unwrap();
            assert!(
                registry
                    .wait_for_active(&deployed.name, deployed.version, Duration::from_secs(30))
                    .await
            );
            deployed
        }
    };

    deploy("unsigned", None).await;
    let (unsigned, message) = code(f.call("unsigned", "echo", json!({})).await);
    assert_eq!(unsigned, ErrorCode::ArtifactUntrusted, "{message}");
    assert!(message.contains("is not signed"), "{message}");
    assert!(
        message.contains(&trusted.public_key()),
        "says which key is trusted: {message}"
    );

    let by_stranger = deploy("stranger", Some(&stranger)).await;
    assert_eq!(
        by_stranger.signer.as_deref(),
        Some(stranger.public_key().as_str())
    );
    let (refused, message) = code(f.call("stranger", "echo", json!({})).await);
    assert_eq!(refused, ErrorCode::ArtifactUntrusted, "{message}");
    assert!(message.contains("untrusted key"), "{message}");
    assert_eq!(
        f.plugins.process_count(),
        0,
        "nothing untrusted was started"
    );
    assert_eq!(
        f.metrics.plugin_starts("unsigned") + f.metrics.plugin_starts("stranger"),
        0
    );

    deploy("signed", Some(&trusted)).await;
    let echoed = f.call("signed", "echo", json!({"ok": true})).await.unwrap();
    assert_eq!(json_data(&echoed[0]), json!({"ok": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_hanging_and_crash_looping_plugins_under_load_hurt_only_their_own_calls() {
    let f = fixture(PoolSettings::default(), false).await;
    f.deploy("healthy", &[], None).await;
    f.deploy("crashy", &[], None).await;
    f.deploy("hangs", &[], None).await;
    f.deploy("looping", &[("MYCELIUM_TEST_PLUGIN_START", "exit")], None)
        .await;
    f.call("healthy", "echo", json!({})).await.unwrap();

    const HEALTHY: usize = 400;
    let healthy = {
        let mut tasks = Vec::new();
        for worker in 0..8 {
            let client = f.client.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for i in 0..HEALTHY / 8 {
                    let id = format!("h{worker}-{i}");
                    let event = EventBuilderV10::new()
                        .id(id.as_str())
                        .source("e2e")
                        .ty("echo")
                        .data("application/json", json!({}))
                        .build()
                        .unwrap();
                    if let Ok(events) = client.invoke("healthy", event).await {
                        ok += usize::from(events[0].id() == id);
                    }
                }
                ok
            }));
        }
        tasks
    };
    // Meanwhile: calls that kill their process, a call that hangs its process, and calls to a
    // plugin that cannot start at all.
    let mut codes: std::collections::BTreeMap<&str, Vec<ErrorCode>> = Default::default();
    for _ in 0..5 {
        let (crashed, _) = code(f.call("crashy", "crash", json!({})).await);
        codes.entry("crash").or_default().push(crashed);
    }
    let (hung, _) = code(
        f.call_with("hangs", "hang", json!({}), Duration::from_millis(500))
            .await,
    );
    codes.entry("hang").or_default().push(hung);
    for _ in 0..3 {
        let (looped, _) = code(
            f.call_with("looping", "echo", json!({}), Duration::from_secs(1))
                .await,
        );
        codes.entry("loop").or_default().push(looped);
    }

    let mut succeeded = 0;
    for task in healthy {
        succeeded += task.await.unwrap();
    }
    assert_eq!(succeeded, HEALTHY, "the healthy function kept answering");
    // The first restart is immediate; after the second crash, calls arriving during the
    // backoff are answered `unavailable` at once (the function did not run; retry).
    assert_eq!(
        codes["crash"][..2],
        [ErrorCode::PluginCrashed, ErrorCode::PluginCrashed],
        "{codes:?}"
    );
    assert!(
        codes["crash"]
            .iter()
            .all(|c| matches!(c, ErrorCode::PluginCrashed | ErrorCode::Unavailable)),
        "{codes:?}"
    );
    assert_eq!(codes["hang"], [ErrorCode::Timeout]);
    assert!(
        codes["loop"].iter().all(|c| matches!(
            c,
            ErrorCode::PluginStartFailed | ErrorCode::Unavailable | ErrorCode::Timeout
        )),
        "{codes:?}"
    );
    // The crashing function recovers by itself: its next call starts a fresh process.
    f.call("crashy", "echo", json!({})).await.unwrap();
}

/// Many calls in flight on one process's connection, with nothing else polling it (no pool, no
/// reaper, no health checks): every call gets its own answer, none waits for one forever. (The
/// hand-over of wake-ups between the calls is tested exactly in `channel/driver.rs`.) In the
/// frame protocol the SDK takes when offered, and in gRPC when it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_plugin_connection() {
    concurrent_calls_on_one_connection(true, Protocol::Frames).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_plugin_connection_over_grpc() {
    concurrent_calls_on_one_connection(false, Protocol::Grpc).await;
}

async fn concurrent_calls_on_one_connection(offer_frames: bool, protocol: Protocol) {
    use mycelium_plugin::host::{PluginProcess, ProcessConfig};

    let dir = tempfile::tempdir().unwrap();
    let config = ProcessConfig {
        start_timeout: Duration::from_secs(20),
        offer_frames,
        ..ProcessConfig::new(name("driven"), 1, dir.path().join("work"))
    };
    let process = Arc::new(
        PluginProcess::start(TEST_PLUGIN.as_ref(), config)
            .await
            .unwrap(),
    );
    assert_eq!(process.protocol(), protocol);
    const IN_FLIGHT: usize = 64;
    const ROUNDS: usize = 100;
    let callers: Vec<_> = (0..IN_FLIGHT)
        .map(|caller| {
            let process = process.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                for round in 0..ROUNDS {
                    let event = EventBuilderV10::new()
                        .id(format!("{caller}-{round}"))
                        .source("e2e")
                        .ty("echo")
                        .data(
                            "application/json",
                            json!({"caller": caller, "round": round}),
                        )
                        .build()
                        .unwrap();
                    let ctx = mycelium_core::InvocationContext::new(
                        name("driven"),
                        1,
                        format!("{caller}-{round}"),
                        std::time::Instant::now() + Duration::from_secs(30),
                        Default::default(),
                        tracing::Span::none(),
                    );
                    let events = tokio::time::timeout(
                        Duration::from_secs(30),
                        process.execute(&event, &ctx),
                    )
                    .await
                    .expect("a call waited 30 s for its answer: a wake-up was lost")
                    .unwrap();
                    assert_eq!(events, vec![event], "each call gets its own answer");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let mut answered = 0;
    for caller in callers {
        answered += caller.await.unwrap();
    }
    assert_eq!(answered, IN_FLIGHT * ROUNDS);
    process.stop().await;
    assert!(process.has_exited());
}
