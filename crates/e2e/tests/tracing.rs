//! W3C trace propagation end to end, asserted on captured spans: caller -> NATS -> runtime
//! invocation span -> gRPC -> the Rust plugin's own span. The runtime runs in this process
//! with an OpenTelemetry layer exporting to memory; the test plugin (a real process) runs the
//! SDK with the OpenTelemetry bridge and reports the contexts it saw.
//!
//! One test function: the OpenTelemetry subscriber is process-global.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use mycelium_client::{Client, InvokeOptions};
use mycelium_core::logs::LogRecord;
use mycelium_core::{
    cloudevents::{event::Data, EventBuilder, EventBuilderV10},
    envelope, Event, TraceContext,
};
use mycelium_observability::{otel_layer, OtelBridge};
use mycelium_runtime::{presets::Assembly, RuntimeConfig};
use mycelium_test_support::NatsServer;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{json, Value};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const TEST_PLUGIN: &str = env!("CARGO_BIN_EXE_mycelium-test-plugin");
const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn event(ty: &str) -> Event {
    EventBuilderV10::new()
        .id("t")
        .source("e2e")
        .ty(ty)
        .data("application/json", json!({}))
        .build()
        .unwrap()
}

/// The runtime's finished invocation spans, newest last.
fn invocation_spans(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|span| span.name == "invocation")
        .collect()
}

fn hex_trace(id: TraceId) -> String {
    format!("{id}")
}

fn hex_span(id: SpanId) -> String {
    format!("{id}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_nats_the_runtime_and_a_plugin() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let (log_layer, function_logs) = mycelium_runtime::function_logs();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(otel_layer(&provider))
            .with(log_layer),
    )
    .unwrap();

    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = mycelium_client::RuntimeKey::generate();
    let assembled = Assembly {
        xkey: Some(key.clone()),
        config: RuntimeConfig {
            prestart_plugins: false,
            ..RuntimeConfig::default()
        },
        plugin_dir: dir.path().to_owned(),
        tracing: Some(Arc::new(OtelBridge)),
        logs: Some(function_logs),
        ..Assembly::default()
    }
    .build(server.connect().await)
    .await
    .unwrap();
    let registry = assembled.registry;
    let runtime = assembled.runtime.start().await.unwrap();
    let version = mycelium_e2e::deploy_plugin(&*registry, &registry, "traced", TEST_PLUGIN).await;
    let nats = server.connect().await;

    // 1. A caller that is not our client: a raw NATS request with a traceparent header.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", CALLER);
    let body = envelope::encode_invoke_request(&"echo".parse().unwrap(), &event("x"), None, None);
    let reply = nats
        .request_with_headers("function.invoke", headers, body.into())
        .await
        .unwrap();
    assert!(reply.headers.is_none(), "{:?}", reply);
    let spans = invocation_spans(&exporter);
    let span = spans
        .last()
        .expect("the runtime exported its invocation span");
    assert_eq!(hex_trace(span.span_context.trace_id()), &CALLER[3..35]);
    assert_eq!(hex_span(span.parent_span_id), &CALLER[36..52]);
    assert!(span.parent_span_is_remote);

    // 2. The same through the CloudEvents distributed-tracing extension only (no header).
    let mut traced = event("x");
    traced.set_extension(
        "traceparent",
        CALLER.replace("b7ad6b7169203331", "00000000000000aa"),
    );
    let body = envelope::encode_invoke_request(&"echo".parse().unwrap(), &traced, None, None);
    nats.request("function.invoke", body.into()).await.unwrap();
    let spans = invocation_spans(&exporter);
    let span = spans.last().unwrap();
    assert_eq!(hex_trace(span.span_context.trace_id()), &CALLER[3..35]);
    assert_eq!(hex_span(span.parent_span_id), "00000000000000aa");

    // 3. Our client inside the caller's own span, into a Rust plugin.
    let client = Client::new(server.connect().await).with_tracing(Arc::new(OtelBridge));
    let caller_span = tracing::info_span!("caller");
    let events = client
        .invoke_with("traced", &event("trace"), InvokeOptions::default())
        .instrument(caller_span)
        .await
        .unwrap();
    let Some(Data::Json(seen)) = events[0].data() else {
        panic!("the plugin replied without JSON data")
    };
    let received = TraceContext::parse(seen["received"].as_str().unwrap(), None).unwrap();
    let current = TraceContext::parse(seen["current"].as_str().unwrap(), None).unwrap();

    let finished = exporter.get_finished_spans().unwrap();
    let caller = finished.iter().find(|s| s.name == "caller").unwrap();
    let trace_id = hex_trace(caller.span_context.trace_id());
    let runtime_span = invocation_spans(&exporter)
        .into_iter()
        .find(|s| hex_trace(s.span_context.trace_id()) == trace_id)
        .expect("the runtime's span is in the caller's trace");
    assert_eq!(runtime_span.parent_span_id, caller.span_context.span_id());
    // The plugin was called from the runtime's invocation span...
    assert_eq!(received.trace_id(), trace_id);
    assert_eq!(
        received.parent_id(),
        hex_span(runtime_span.span_context.span_id())
    );
    // ...and its own span, in which the function ran, is a new span of the same trace.
    assert_eq!(current.trace_id(), trace_id);
    assert_ne!(current.parent_id(), received.parent_id());

    // 4. Without any context the client starts a trace: the runtime span is a child of it.
    let before = invocation_spans(&exporter).len();
    client.invoke("echo", event("x")).await.unwrap();
    let spans = invocation_spans(&exporter);
    assert_eq!(spans.len(), before + 1);
    let span = spans.last().unwrap();
    assert!(span.parent_span_is_remote, "the client started the trace");
    let value: Value = json!(hex_trace(span.span_context.trace_id()));
    assert_ne!(value, json!(trace_id), "a new trace, not the previous one");

    // 5. A plugin's `tracing` line (through the SDK's log layer) is published attributed to
    //    its invocation and trace.
    let mut published = nats.subscribe("function.logs.traced").await.unwrap();
    nats.flush().await.unwrap();
    let trace = TraceContext::parse(CALLER, None).unwrap();
    let events = client
        .invoke_with(
            "traced",
            &event("log"),
            InvokeOptions {
                trace: Some(trace.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let Some(Data::Json(ids)) = events[0].data() else {
        panic!("the plugin replied without JSON data")
    };
    let record = loop {
        let message = tokio::time::timeout(Duration::from_secs(30), published.next())
            .await
            .expect("no log record within 30 s")
            .unwrap();
        let record: LogRecord = serde_json::from_slice(&message.payload).unwrap();
        if record.message == "traced line from the plugin" {
            break record;
        }
    };
    assert_eq!(record.level, "warn");
    assert_eq!(record.source, "stderr");
    assert_eq!(record.version, version);
    assert_eq!(
        record.invocation_id.as_deref(),
        ids["invocationId"].as_str()
    );
    assert_eq!(record.trace_id.as_deref(), Some(trace.trace_id()));

    // 6. A function's secret reaches it and no span: not its attributes, events or names.
    const SECRET: &str = "trace-secret-value-5d1e";
    let secret: mycelium_core::secret::SecretName = "token".parse().unwrap();
    client
        .secrets()
        .await
        .unwrap()
        .set(&secret, SECRET, Some(&key.public_key()))
        .await
        .unwrap();
    let mut spec = mycelium_client::DeploySpec::plugin(
        "secretive".parse().unwrap(),
        mycelium_client::ArtifactSource::File(TEST_PLUGIN.into()),
    );
    spec.secrets.insert("TOKEN".into(), secret);
    use mycelium_client::RegistryAdmin;
    let secretive = registry.deploy(spec).await.unwrap();
    assert!(
        registry
            .wait_for_active(&secretive.name, secretive.version, Duration::from_secs(30))
            .await
    );
    let getenv = EventBuilderV10::new()
        .id("s")
        .source("e2e")
        .ty("getenv")
        .data("application/json", json!({"name": "TOKEN"}))
        .build()
        .unwrap();
    // The runtime's watch of the secrets bucket may lag the deploy's by a moment.
    mycelium_test_support::eventually(Duration::from_secs(30), || async {
        let events = client
            .invoke_with("secretive", &getenv, InvokeOptions::default())
            .await
            .ok()?;
        (events[0].data() == Some(&Data::Json(json!({"value": SECRET})))).then_some(())
    })
    .await;
    let exported = format!("{:?}", exporter.get_finished_spans().unwrap());
    assert!(
        exported.contains("secretive"),
        "the call's spans were exported"
    );
    assert!(!exported.contains(SECRET), "a span holds the secret");

    runtime.shutdown().await;
}
