//! A plugin written in Go with hashicorp/go-plugin runs unchanged.
//!
//! Needs Debian's Go packages (see examples/go-plugin/build.sh). `./dev test` installs them
//! and sets MYCELIUM_GO_REQUIRED, so CI always runs this; elsewhere, without Go, the test is
//! skipped with a visible message.

use std::time::Duration;

use mycelium_client::{Client, InvokeOptions};
use mycelium_core::cloudevents::{event::Data, AttributesReader, EventBuilder, EventBuilderV10};
use mycelium_registry::{NatsRegistry, NatsRegistryConfig};
use mycelium_runtime::presets::Assembly;
use mycelium_test_support::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_plugin_built_with_go_plugin_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("go-upper");
    if !mycelium_test_support::go_plugin(&binary) {
        return;
    }
    let server = NatsServer::start();
    let assembled = Assembly {
        plugin_dir: dir.path().to_owned(),
        ..Assembly::default()
    }
    .build(server.connect().await)
    .await
    .unwrap();
    let (registry, plugins) = (assembled.registry, assembled.plugins);
    let runtime = assembled.runtime.start().await.unwrap();
    let admin = NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
        .await
        .unwrap();
    mycelium_e2e::deploy_plugin(&admin, &registry, "upper", binary).await;

    let client = Client::new(server.connect().await);
    let options = InvokeOptions {
        version: None,
        timeout: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    let event = EventBuilderV10::new()
        .id("g1")
        .source("e2e")
        .ty("com.example.upper")
        .data("text/plain", "hello from go")
        .build()
        .unwrap();
    let events = client
        .invoke_with("upper", &event, options.clone())
        .await
        .unwrap();
    assert_eq!(events[0].id(), "upper-g1");
    assert_eq!(events[0].ty(), "com.example.upper.result");
    assert_eq!(
        events[0].data(),
        Some(&Data::String("HELLO FROM GO".into()))
    );

    let other = EventBuilderV10::new()
        .id("g2")
        .source("e2e")
        .ty("anything")
        .data("application/json", serde_json::json!({"k": [1, 2]}))
        .build()
        .unwrap();
    let mut echoed = client
        .invoke_with("upper", &other, options.clone())
        .await
        .unwrap();
    // The trace context the client added to the event survives the Go side unchanged.
    let traceparent = echoed[0].remove_extension("traceparent").unwrap();
    assert_eq!(traceparent.to_string().len(), 55, "{traceparent}");
    assert_eq!(echoed, vec![other]);

    // A request larger than grpc-go's first flow-control window (64 KiB) goes out as the
    // plugin grants more, and its answer as large comes back whole.
    let text: String = (0..600_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let large = EventBuilderV10::new()
        .id("g-large")
        .source("e2e")
        .ty("com.example.upper")
        .data("text/plain", text.clone())
        .build()
        .unwrap();
    let events = client
        .invoke_with("upper", &large, options.clone())
        .await
        .unwrap();
    assert_eq!(
        events[0].data(),
        Some(&Data::String(text.to_uppercase())),
        "the large answer differs"
    );

    // Calls in flight together on the one connection each get their own answer.
    let calls = (0..64).map(|i| {
        let (client, options) = (client.clone(), options.clone());
        async move {
            let event = EventBuilderV10::new()
                .id(format!("c{i}"))
                .source("e2e")
                .ty("com.example.upper")
                .data("text/plain", format!("call {i}"))
                .build()
                .unwrap();
            client.invoke_with("upper", &event, options).await.unwrap()
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    for (i, events) in answers.iter().enumerate() {
        assert_eq!(events[0].id(), format!("upper-c{i}"));
        assert_eq!(events[0].data(), Some(&Data::String(format!("CALL {i}"))));
    }

    let wrong = EventBuilderV10::new()
        .id("g3")
        .source("e2e")
        .ty("com.example.upper")
        .data("application/octet-stream", vec![1u8])
        .build()
        .unwrap();
    let err = client
        .invoke_with("upper", &wrong, options)
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        mycelium_client::RequestErrorKind::Remote(mycelium_core::ErrorCode::InvalidEvent),
        "{err}"
    );
    assert_eq!(plugins.process_count(), 1);
    runtime.shutdown().await;
    assert_eq!(plugins.process_count(), 0);
}

/// The other direction: go-plugin's own Go host (grpc-go's client: handshake, health check,
/// calls, graceful shutdown) runs a plugin built with the Rust SDK.
#[test]
fn go_plugins_own_host_runs_a_rust_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("go-host");
    if !mycelium_test_support::go_plugin_host(&host) {
        return;
    }
    // Half a second of calls, eight at a time, no warm-up.
    let output = std::process::Command::new(&host)
        .args([env!("CARGO_BIN_EXE_mycelium-test-plugin"), "0.5", "8", "0"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the Go host failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(figures["errors"], 0, "{figures}");
    assert!(figures["requests"].as_u64().unwrap() > 0, "{figures}");
}
