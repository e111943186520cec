//! The runtime on the JetStream registry: hot reload under load, explicit versions,
//! deployed built-ins with their own limits.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use mycelium_client::{Client, InvokeOptions, RequestErrorKind};
use mycelium_core::{cloudevents::AttributesReader, ErrorCode, FunctionName};
use mycelium_registry::{DeploySpec, NatsRegistry, NatsRegistryConfig, Registry, RegistryAdmin};
use mycelium_runtime::{Runtime, RuntimeHandle};
use mycelium_test_support::{event, functions::Gate, NatsServer};
use serde_json::json;
use tokio::sync::mpsc;

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

struct Fixture {
    server: NatsServer,
    runtime_registry: Arc<NatsRegistry>,
    admin: NatsRegistry,
    client: Client,
    _runtime: RuntimeHandle,
}

async fn fixture(gate: Option<Gate>) -> Fixture {
    let server = NatsServer::start();
    let runtime_registry = Arc::new(
        NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
            .await
            .unwrap(),
    );
    let mut builder = Runtime::builder()
        .standard_builtins()
        .registry(runtime_registry.clone());
    if let Some(gate) = gate {
        builder = builder.builtin(name("gate"), "waits", gate);
    }
    let runtime = builder.serve(&server.url()).await.unwrap();
    Fixture {
        admin: NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
            .await
            .unwrap(),
        client: Client::new(server.connect().await),
        runtime_registry,
        _runtime: runtime,
        server,
    }
}

impl Fixture {
    /// Waits until the runtime's registry shows `name` active at `version`.
    async fn active(&self, function: &str, version: u64) {
        assert!(
            self.runtime_registry
                .wait_for_active(&name(function), version, Duration::from_secs(30))
                .await,
            "the runtime did not see the change"
        );
    }
}

/// Waits for a reply of the wanted kind from the load.
async fn wait_for(wanted: &'static str, seen: &mut mpsc::UnboundedReceiver<&'static str>) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while seen.recv().await != Some(wanted) {}
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted} reply under load"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_loses_nothing() {
    let f = fixture(None).await;
    f.admin
        .deploy(DeploySpec::builtin(name("svc"), "echo"))
        .await
        .unwrap();
    f.active("svc", 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<&'static str>();
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (client, stop, failures, seen_tx) = (
                f.client.clone(),
                stop.clone(),
                failures.clone(),
                seen_tx.clone(),
            );
            tokio::spawn(async move {
                let mut count = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("load-{worker}-{count}");
                    match client.invoke("svc", event(&id, json!({}))).await {
                        Ok(events) if events.len() == 1 && events[0].id() == id => {
                            let _ = seen_tx.send("echo");
                        }
                        Ok(events)
                            if events.len() == 1 && events[0].id() == format!("response-{id}") =>
                        {
                            let _ = seen_tx.send("example");
                        }
                        other => {
                            eprintln!("failed invocation: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    count += 1;
                }
                count
            })
        })
        .collect();
    wait_for("echo", &mut seen).await;

    // Update: v2 runs `example`; the load switches over without a failure.
    f.admin
        .deploy(DeploySpec::builtin(name("svc"), "example"))
        .await
        .unwrap();
    wait_for("example", &mut seen).await;
    // Rollback: back to v1.
    f.admin.rollback(&name("svc"), 1).await.unwrap();
    f.active("svc", 1).await;
    while seen.try_recv().is_ok() {}
    wait_for("echo", &mut seen).await;

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for worker in load {
        total += worker.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed invocations across update and rollback"
    );
    assert!(total > 0);

    // An explicit version runs that version while it is kept.
    f.admin
        .deploy(DeploySpec::builtin(name("svc"), "example"))
        .await
        .unwrap();
    f.active("svc", 3).await;
    let pinned = f
        .client
        .invoke_with(
            "svc",
            &event("pin", json!({})),
            InvokeOptions {
                version: Some(1),
                timeout: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(pinned[0].id(), "pin");
    let active = f
        .client
        .invoke("svc", event("act", json!({})))
        .await
        .unwrap();
    assert_eq!(active[0].id(), "response-act");
    let err = f
        .client
        .invoke_with(
            "svc",
            &event("x", json!({})),
            InvokeOptions {
                version: Some(7),
                timeout: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        RequestErrorKind::Remote(ErrorCode::VersionNotFound)
    );

    // Discovery shows deployed functions next to the built-ins.
    let list = f.client.list().await.unwrap();
    let svc = list.iter().find(|s| s.name.as_str() == "svc").unwrap();
    assert_eq!(svc.version, 3);
    let described = f.client.describe("svc", Some(1)).await.unwrap();
    assert_eq!(described.entry_point.as_deref(), Some("echo"));

    // Delete: the name is gone from every runtime.
    f.admin.delete(&name("svc")).await.unwrap();
    let gone = f
        .runtime_registry
        .wait_for(Duration::from_secs(30), |r| {
            r.get(&name("svc"), None).is_err().then_some(())
        })
        .await;
    assert!(
        gone.is_some(),
        "the runtime still resolves the deleted function"
    );
    let err = f
        .client
        .invoke("svc", event("gone", json!({})))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        RequestErrorKind::Remote(ErrorCode::FunctionNotFound)
    );
    drop(f.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_limits_apply() {
    let (gate, mut control) = Gate::new();
    let f = fixture(Some(gate)).await;
    let mut spec = DeploySpec::builtin(name("limited"), "gate");
    spec.max_concurrency = Some(1);
    f.admin.deploy(spec).await.unwrap();
    f.active("limited", 1).await;

    let held = tokio::spawn({
        let client = f.client.clone();
        async move { client.invoke("limited", event("held", json!({}))).await }
    });
    control.entered(1).await;
    let err = f
        .client
        .invoke("limited", event("second", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::Remote(ErrorCode::Overloaded));
    assert!(err.to_string().contains("limit of 1 concurrent"), "{err}");
    control.release(1);
    assert_eq!(held.await.unwrap().unwrap()[0].id(), "held");

    // A deployment naming a built-in this runtime lacks is unavailable, not a crash.
    f.admin
        .deploy(DeploySpec::builtin(name("orphan"), "not-here"))
        .await
        .unwrap();
    f.active("orphan", 1).await;
    let err = f
        .client
        .invoke("orphan", event("o", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::Remote(ErrorCode::Unavailable));
    assert!(err.to_string().contains("not-here"), "{err}");
}
