//! A Prometheus scrape after a known mix that includes plugin cold starts: exact counters and
//! histogram counts, from a runtime running the test plugin as a real process.

use std::{sync::Arc, time::Duration};

use mycelium_client::{Client, InvokeOptions};
use mycelium_core::{
    cloudevents::{EventBuilder, EventBuilderV10},
    Event,
};
use mycelium_observability::PrometheusMetrics;
use mycelium_runtime::{presets::Assembly, RuntimeConfig};
use mycelium_test_support::NatsServer;
use serde_json::json;

const TEST_PLUGIN: &str = env!("CARGO_BIN_EXE_mycelium-test-plugin");

fn event(ty: &str) -> Event {
    EventBuilderV10::new()
        .id("m")
        .source("e2e")
        .ty(ty)
        .data("application/json", json!({"ms": 60_000}))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_cold_starts_fetches_and_outcomes_exactly() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(PrometheusMetrics::new());
    let assembled = Assembly {
        config: RuntimeConfig {
            prestart_plugins: false,
            ..RuntimeConfig::default()
        },
        plugin_dir: dir.path().to_owned(),
        metrics: Some(metrics.clone()),
        ..Assembly::default()
    }
    .build(server.connect().await)
    .await
    .unwrap();
    let (registry, plugins) = (assembled.registry, assembled.plugins);
    let runtime = assembled.runtime.start().await.unwrap();
    mycelium_e2e::deploy_plugin(&*registry, &registry, "counted", TEST_PLUGIN).await;
    let client = Client::new(server.connect().await);
    let call = |ty: &'static str, timeout_ms: u64| {
        let client = client.clone();
        async move {
            client
                .invoke_with(
                    "counted",
                    &event(ty),
                    InvokeOptions {
                        timeout: Some(Duration::from_millis(timeout_ms)),
                        ..Default::default()
                    },
                )
                .await
        }
    };

    // Cold start 1 (binary downloaded), 3 successes, 2 function errors.
    for _ in 0..3 {
        call("echo", 20_000).await.unwrap();
    }
    for _ in 0..2 {
        call("fail", 20_000).await.unwrap_err();
    }
    // Cold start 2 after the processes stop (binary from the local cache), then a timeout.
    plugins.shutdown().await;
    call("echo", 20_000).await.unwrap();
    call("sleep", 300).await.unwrap_err();

    let text = metrics.render();
    for line in [
        r#"mycelium_invocations_total{function="counted",version="1",outcome="success"} 4"#,
        r#"mycelium_invocations_total{function="counted",version="1",outcome="function_error"} 2"#,
        r#"mycelium_invocations_total{function="counted",version="1",outcome="timeout"} 1"#,
        r#"mycelium_invocation_duration_seconds_count{function="counted"} 7"#,
        r#"mycelium_plugin_starts_total{function="counted"} 2"#,
        r#"mycelium_plugin_cold_start_seconds_count{function="counted"} 2"#,
        r#"mycelium_plugin_artifact_fetches_total{function="counted",source="registry"} 1"#,
        r#"mycelium_plugin_artifact_fetches_total{function="counted",source="cache"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    runtime.shutdown().await;
}
