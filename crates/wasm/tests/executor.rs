//! The executor against real wasmtime and the WAT test guests (test-support's `guests/`), on
//! the in-memory registry. The same guests run through the CLI against a nats-server in the
//! e2e crate's `tests/wasm.rs`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use mycelium_core::{
    cloudevents::AttributesReader,
    logs::{LogRecord, LogSink},
    ErrorCode, Event, Function, FunctionError, FunctionMetadata, InvocationContext, TraceContext,
};
use mycelium_registry::{
    ArtifactCache, ArtifactSource, DeploySpec, MemoryRegistry, RegistryAdmin, SigningKey,
};
use mycelium_test_support::{event, wasm_guest, wat_bytes};
use mycelium_wasm::{WasmExecutor, WasmSettings};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Logs(Mutex<Vec<LogRecord>>);

impl LogSink for Logs {
    fn record(&self, record: LogRecord) {
        self.0.lock().unwrap().push(record);
    }
}

struct Host {
    registry: Arc<MemoryRegistry>,
    executor: WasmExecutor,
    logs: Arc<Logs>,
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(MemoryRegistry::new());
        let executor = executor(&registry, &dir);
        let logs = Arc::new(Logs::default());
        executor.set_log_sink(logs.clone());
        Self {
            registry,
            executor,
            logs,
            dir,
        }
    }

    async fn deploy_bytes(
        &self,
        name: &str,
        bytes: Vec<u8>,
        memory_mb: Option<u64>,
    ) -> Arc<FunctionMetadata> {
        let mut spec = DeploySpec::wasm(
            name.parse().unwrap(),
            ArtifactSource::Bytes(Bytes::from(bytes)),
        );
        spec.memory_mb = memory_mb;
        spec.env.insert("GREETING".into(), "hello".into());
        spec.env
            .insert("MYCELIUM_FUNCTION".into(), "spoofed".into());
        self.registry.deploy(spec).await.unwrap()
    }

    async fn deploy(&self, guest: &str) -> Arc<FunctionMetadata> {
        self.deploy_bytes(guest, wasm_guest(guest), None).await
    }

    async fn call(
        &self,
        metadata: &Arc<FunctionMetadata>,
        id: &str,
    ) -> Result<Vec<Event>, FunctionError> {
        self.call_until(
            metadata,
            id,
            Instant::now() + Duration::from_secs(60),
            CancellationToken::new(),
        )
        .await
    }

    async fn call_until(
        &self,
        metadata: &Arc<FunctionMetadata>,
        id: &str,
        deadline: Instant,
        cancellation: CancellationToken,
    ) -> Result<Vec<Event>, FunctionError> {
        let ctx = context(metadata, id, deadline, cancellation).with_trace(Some(trace()));
        self.executor
            .function(metadata)
            .execute(event(id, serde_json::json!({"n": 1})), ctx)
            .await
    }
}

fn context(
    metadata: &FunctionMetadata,
    id: &str,
    deadline: Instant,
    cancellation: CancellationToken,
) -> InvocationContext {
    InvocationContext::new(
        metadata.name.clone(),
        metadata.version,
        id,
        deadline,
        cancellation,
        tracing::Span::none(),
    )
}

/// A call's context with a minute to run.
fn minute(metadata: &FunctionMetadata, id: &str) -> InvocationContext {
    context(
        metadata,
        id,
        Instant::now() + Duration::from_secs(60),
        CancellationToken::new(),
    )
}

fn trace() -> TraceContext {
    TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("vendor=opaque"),
    )
    .unwrap()
}

fn executor(registry: &Arc<MemoryRegistry>, dir: &tempfile::TempDir) -> WasmExecutor {
    executor_with(registry, dir, Vec::new())
}

fn executor_with(
    registry: &Arc<MemoryRegistry>,
    dir: &tempfile::TempDir,
    trusted_signers: Vec<String>,
) -> WasmExecutor {
    let settings = WasmSettings {
        max_instances: 16,
        trusted_signers,
        ..WasmSettings::default()
    };
    WasmExecutor::new(
        registry.clone(),
        ArtifactCache::new(dir.path().join("cache"), 1 << 30).unwrap(),
        settings,
        None,
    )
}

fn data(event: &Event) -> String {
    match event.data() {
        Some(mycelium_core::cloudevents::Data::String(text)) => text.clone(),
        Some(mycelium_core::cloudevents::Data::Json(json)) => {
            json.as_str().unwrap_or_default().to_owned()
        }
        other => panic!("unexpected data {other:?}"),
    }
}

#[tokio::test]
async fn a_guest_echoes_the_event_and_every_call_gets_a_fresh_instance() {
    let host = Host::new();
    let echo = host.deploy("echo").await;
    let counter = host.deploy("counter").await;
    for i in 0..50 {
        let id = format!("e-{i}");
        let events = host.call(&echo, &id).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id(), id);
        assert_eq!(events[0].ty(), "com.example.test");
        let counted = host.call(&counter, &id).await.unwrap();
        assert_eq!(data(&counted[0]), "11", "state carried over at call {i}");
    }
}

#[tokio::test]
async fn a_guest_that_never_returns_ends_at_its_deadline_and_others_run_meanwhile() {
    let host = Arc::new(Host::new());
    let spin = host.deploy("spin").await;
    let echo = host.deploy("echo").await;

    let error = host
        .call_until(
            &spin,
            "s-1",
            Instant::now() + Duration::from_millis(200),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::Timeout, "{error}");

    // On this one-thread runtime the echo calls can only finish if the spinning guest yields.
    let cancellation = CancellationToken::new();
    let spinning = tokio::spawn({
        let (host, spin, cancellation) = (host.clone(), spin.clone(), cancellation.clone());
        async move {
            host.call_until(
                &spin,
                "s-2",
                Instant::now() + Duration::from_secs(3600),
                cancellation,
            )
            .await
        }
    });
    for i in 0..5 {
        assert_eq!(host.call(&echo, &format!("e-{i}")).await.unwrap().len(), 1);
    }
    assert!(!spinning.is_finished());
    cancellation.cancel();
    let error = spinning.await.unwrap().unwrap_err();
    assert_eq!(error.code(), ErrorCode::Timeout, "{error}");
}

#[tokio::test]
async fn memory_past_the_limit_fails_the_call_clearly() {
    let host = Host::new();
    let grow = host
        .deploy_bytes("grow", wasm_guest("grow"), Some(16))
        .await;
    let error = host.call(&grow, "g-1").await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::FunctionError);
    assert!(
        error.message().contains("more than its 16 MiB of memory"),
        "{error}"
    );
    // With room, the same module runs.
    let roomy = host
        .deploy_bytes("grow-roomy", wasm_guest("grow"), Some(128))
        .await;
    assert_eq!(host.call(&roomy, "g-2").await.unwrap().len(), 0);
}

#[tokio::test]
async fn a_trap_fails_only_its_own_call_and_its_stderr_reaches_the_logs() {
    let host = Host::new();
    let trap = host.deploy("trap").await;
    let echo = host.deploy("echo").await;
    for i in 0..3 {
        let error = host.call(&trap, &format!("t-{i}")).await.unwrap_err();
        assert_eq!(error.code(), ErrorCode::FunctionError);
        assert!(error.message().contains("trapped"), "{error}");
        assert!(error.message().contains("unreachable"), "{error}");
        assert_eq!(host.call(&echo, "e").await.unwrap().len(), 1);
    }
    let logs = host.logs.0.lock().unwrap();
    let lines: Vec<(&str, Option<&str>)> = logs
        .iter()
        .map(|r| (r.message.as_str(), r.invocation_id.as_deref()))
        .collect();
    assert_eq!(
        lines,
        [
            ("about to trap", Some("t-0")),
            ("about to trap", Some("t-1")),
            ("about to trap", Some("t-2"))
        ]
    );
    assert!(logs
        .iter()
        .all(|r| r.source == "stderr" && r.function.as_str() == "trap"));
}

#[tokio::test]
async fn a_functions_log_lines_are_rate_limited_across_its_calls() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(MemoryRegistry::new());
    let executor = WasmExecutor::new(
        registry.clone(),
        ArtifactCache::new(dir.path().join("cache"), 1 << 30).unwrap(),
        WasmSettings {
            max_instances: 4,
            log_lines_per_second: 5,
            ..WasmSettings::default()
        },
        None,
    );
    let logs = Arc::new(Logs::default());
    executor.set_log_sink(logs.clone());
    let spec = DeploySpec::wasm(
        "chatty".parse().unwrap(),
        ArtifactSource::Bytes(Bytes::from(wasm_guest("chatty"))),
    );
    let chatty = registry.deploy(spec).await.unwrap();
    let function = executor.function(&chatty);
    let call = |id: &'static str| {
        let ctx = context(
            &chatty,
            id,
            Instant::now() + Duration::from_secs(60),
            CancellationToken::new(),
        );
        function.execute(event(id, serde_json::json!({})), ctx)
    };
    let records = |logs: &Logs| -> Vec<(String, String)> {
        logs.0
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.message.clone(), r.invocation_id.clone().unwrap()))
            .collect()
    };
    let line = |id: &str| ("chatty line".to_owned(), id.to_owned());
    // One call's lines share one instant: 5 of its 20 pass.
    assert!(call("c1").await.unwrap().is_empty());
    assert_eq!(records(&logs), vec![line("c1"); 5]);
    // The budget is the function's, not the call's: a second call in the same second logs
    // nothing; in the next one, it first says how many were dropped.
    assert!(call("c2").await.unwrap().is_empty());
    let after = records(&logs);
    let next_window = [
        vec![line("c1"); 5],
        vec![(
            "15 lines dropped: the function's output exceeded 5 lines per second".to_owned(),
            "c2".to_owned(),
        )],
        vec![line("c2"); 5],
    ]
    .concat();
    assert!(
        after == vec![line("c1"); 5] || after == next_window,
        "{after:?}"
    );
}

#[tokio::test]
async fn output_past_the_limit_is_dropped_with_a_clear_error() {
    let host = Host::new();
    let flood = host.deploy("flood").await;
    let error = host.call(&flood, "f-1").await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::PayloadTooLarge, "{error}");
    assert!(
        error
            .message()
            .contains("more than 4194304 bytes on stdout"),
        "{error}"
    );
}

#[tokio::test]
async fn the_sandbox_has_no_filesystem_and_exit_statuses_count() {
    let host = Host::new();
    let open = host.deploy("open").await;
    let error = host.call(&open, "o-1").await.unwrap_err();
    // EBADF: there is no preopened directory to open anything through.
    assert_eq!(error.message(), "open failed with errno 08");
    let exit = host.deploy("exit").await;
    let error = host.call(&exit, "x-1").await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::FunctionError);
    assert!(
        error
            .message()
            .starts_with("the module exited with status 3"),
        "{error}"
    );
}

#[tokio::test]
async fn the_environment_is_the_deploys_and_the_calls_only() {
    let host = Host::new();
    let env = host.deploy("env").await;
    let events = host.call(&env, "inv-1").await.unwrap();
    let text = data(&events[0]);
    let mut entries: Vec<&str> = text.split('|').filter(|e| !e.is_empty()).collect();
    let deadline = entries
        .iter()
        .position(|e| e.starts_with("MYCELIUM_DEADLINE_MS="))
        .map(|i| entries.remove(i))
        .unwrap();
    assert!(
        deadline["MYCELIUM_DEADLINE_MS=".len()..]
            .parse::<u64>()
            .is_ok(),
        "{deadline}"
    );
    entries.sort_unstable();
    assert_eq!(
        entries,
        [
            "GREETING=hello",
            "MYCELIUM_FUNCTION=env",
            "MYCELIUM_INVOCATION_ID=inv-1",
            "MYCELIUM_VERSION=1",
            "TRACEPARENT=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "TRACESTATE=vendor=opaque",
        ]
    );
}

#[tokio::test]
async fn with_trusted_signers_only_modules_they_signed_run() {
    let host = Host::new();
    let signer = SigningKey::from_seed(&nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let mut spec = DeploySpec::wasm(
        "signed".parse().unwrap(),
        ArtifactSource::Bytes(Bytes::from(wasm_guest("echo"))),
    );
    spec.signing_key = Some(signer.clone());
    let signed = host.registry.deploy(spec).await.unwrap();
    let unsigned = host.deploy("echo").await;

    let strict = executor_with(&host.registry, &host.dir, vec![signer.public_key()]);
    let call = |metadata: Arc<FunctionMetadata>| {
        let ctx = minute(&metadata, "s");
        let function = strict.function(&metadata);
        async move {
            function
                .execute(event("s", serde_json::json!(1)), ctx)
                .await
        }
    };
    assert_eq!(call(signed).await.unwrap().len(), 1);
    let error = call(unsigned).await.unwrap_err();
    assert_eq!(error.code(), ErrorCode::ArtifactUntrusted, "{error}");
    assert!(error.message().contains("is not signed"), "{error}");
}

#[tokio::test]
async fn modules_that_cannot_run_are_refused_with_module_invalid() {
    let host = Host::new();
    let cases = [
        ("garbage", b"\0asm\x01\0\0\0\x01garbage".to_vec(), "does not compile"),
        ("library", wat_bytes("(module (func (export \"add\")))"), "exports no `_start`"),
        (
            "imports",
            wat_bytes("(module (import \"env\" \"host\" (func)) (memory (export \"memory\") 1) (func (export \"_start\")))"),
            "imports what the runtime does not provide",
        ),
        (
            "no-memory",
            wat_bytes("(module (import \"wasi_snapshot_preview1\" \"proc_exit\" (func (param i32))) (func (export \"_start\")))"),
            "exports no `memory`",
        ),
    ];
    for (name, bytes, why) in cases {
        let metadata = host.deploy_bytes(name, bytes, None).await;
        for _ in 0..2 {
            let error = host.call(&metadata, "i").await.unwrap_err();
            assert_eq!(error.code(), ErrorCode::ModuleInvalid, "{name}: {error}");
            assert!(error.message().contains(why), "{name}: {error}");
        }
    }
}

#[tokio::test]
async fn a_compiled_module_is_kept_on_disk_and_a_new_engine_maps_it() {
    let host = Host::new();
    let echo = host.deploy("echo").await;
    host.executor.prestart(&echo).await.unwrap();
    let cache = host.dir.path().join("cache");
    let compiled: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".cwasm-"))
        .collect();
    assert_eq!(compiled.len(), 1, "{compiled:?}");
    let inode = |path: &std::path::Path| {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
    };
    let before = inode(&compiled[0]);

    // Another executor on the same cache: a restarted runtime.
    let again = executor(&host.registry, &host.dir);
    again.prestart(&echo).await.unwrap();
    assert_eq!(inode(&compiled[0]), before, "the module was compiled again");
    let ctx = minute(&echo, "r-1");
    assert_eq!(
        again
            .function(&echo)
            .execute(event("r-1", serde_json::json!(null)), ctx)
            .await
            .unwrap()
            .len(),
        1
    );
}
