//! Plugin figures: cold start (spawn to first reply, binary already cached) and warm call
//! latency of the Rust test plugin and the Go example plugin, next to the built-in `echo`,
//! all through `function.invoke` on one nats-server, and the plugin executor alone (no NATS).
//! Run with `cargo bench -p mycelium-e2e --bench plugin_latency`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use mycelium_core::cloudevents::{EventBuilder, EventBuilderV10};
use mycelium_plugin::pool::PoolSettings;
use mycelium_registry::{NatsRegistry, NatsRegistryConfig, Registry};
use mycelium_runtime::{Runtime, RuntimeConfig};
use mycelium_test_support::NatsServer;

fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q) as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One row: p50, p90 and p99 of `samples` in microseconds.
fn report(label: &str, samples: &mut [Duration]) {
    println!(
        "{:<22} {:>12.1} {:>12.1} {:>12.1}",
        label,
        micros(percentile(samples, 0.5)),
        micros(percentile(samples, 0.9)),
        micros(percentile(samples, 0.99))
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let registry = Arc::new(
        NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
            .await
            .unwrap(),
    );
    let plugins =
        mycelium_e2e::plugin_executor(registry.clone(), dir.path(), PoolSettings::default(), None);
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            prestart_plugins: false,
            ..RuntimeConfig::default()
        })
        .standard_builtins()
        .registry(registry.clone())
        .plugins(plugins.clone())
        .serve(&server.url())
        .await
        .unwrap();

    let mut targets = vec![(
        "rust",
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_mycelium-test-plugin")),
    )];
    let go = dir.path().join("go-upper");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/go-plugin/build.sh");
    if std::process::Command::new(script)
        .arg(&go)
        .status()
        .is_ok_and(|s| s.success())
    {
        targets.push(("go", go));
    } else {
        println!("go: skipped (the Go toolchain is missing)");
    }
    for (label, binary) in &targets {
        let name = format!("bench-{label}");
        mycelium_e2e::deploy_plugin(&*registry, &registry, &name, binary.clone()).await;
    }

    let nats = server.connect().await;
    let body = |function: &str| {
        let event = EventBuilderV10::new()
            .id("1")
            .source("bench")
            .ty("echo")
            .data("application/json", serde_json::json!({"k": "v"}))
            .build()
            .unwrap();
        bytes::Bytes::from(mycelium_core::envelope::encode_invoke_request(
            &function.parse().unwrap(),
            &event,
            None,
            None,
        ))
    };
    let call = |subject_body: bytes::Bytes| {
        let nats = nats.clone();
        async move {
            let reply = nats.request("function.invoke", subject_body).await.unwrap();
            assert!(
                reply.headers.is_none(),
                "call failed: {:?}",
                String::from_utf8_lossy(&reply.payload)
            );
        }
    };

    println!(
        "{:<22} {:>12} {:>12} {:>12}",
        "scenario", "p50 µs", "p90 µs", "p99 µs"
    );
    let builtin = body("echo");
    let mut warm = Vec::new();
    for i in 0..3000 {
        let start = Instant::now();
        call(builtin.clone()).await;
        if i >= 500 {
            warm.push(start.elapsed());
        }
    }
    report("builtin echo (warm)", &mut warm);

    for (label, _) in &targets {
        let request = body(&format!("bench-{label}"));
        let mut cold = Vec::new();
        for _ in 0..20 {
            plugins.shutdown().await;
            let start = Instant::now();
            call(request.clone()).await;
            cold.push(start.elapsed());
        }
        let mut warm = Vec::new();
        for i in 0..3000 {
            let start = Instant::now();
            call(request.clone()).await;
            if i >= 500 {
                warm.push(start.elapsed());
            }
        }
        // The executor alone, without NATS: what the gRPC round trip to the process costs.
        let metadata = registry
            .get(&format!("bench-{label}").parse().unwrap(), None)
            .unwrap();
        let function = plugins.function(&metadata, &Default::default());
        let event = EventBuilderV10::new()
            .id("1")
            .source("bench")
            .ty("echo")
            .data("application/json", serde_json::json!({"k": "v"}))
            .build()
            .unwrap();
        let mut direct = Vec::new();
        // More rounds (DIRECT_ROUNDS=40000) give a profiler time to attach to this phase.
        let rounds: usize = std::env::var("DIRECT_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        eprintln!("{label}: executor-only rounds start");
        for i in 0..rounds {
            let ctx = mycelium_core::InvocationContext::new(
                metadata.name.clone(),
                metadata.version,
                "bench",
                Instant::now() + Duration::from_secs(10),
                Default::default(),
                tracing::Span::none(),
            );
            let start = Instant::now();
            function.execute(event.clone(), ctx).await.unwrap();
            if i >= 500 {
                direct.push(start.elapsed());
            }
        }
        report(&format!("{label} executor only"), &mut direct);
        report(&format!("{label} plugin cold start"), &mut cold);
        report(&format!("{label} plugin warm"), &mut warm);
    }
    runtime.shutdown().await;
}
