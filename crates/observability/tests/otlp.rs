//! The OTLP exporter behind `--otlp-endpoint`, against a stand-in collector: an OTLP/gRPC
//! trace service in this process that records what it receives.

use mycelium_core::{TraceBridge, TraceContext};
use mycelium_observability::{otel_layer, tracer_provider, OtelBridge};
use mycelium_test_support::otlp::{Collector, ReceivedSpan};
use tracing_subscriber::layer::SubscriberExt;

// Multi-threaded: the exporter's thread blocks on gRPC I/O that this runtime drives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_the_callers_trace() {
    let collector = Collector::start();
    let endpoint = collector.endpoint().to_owned();
    let provider = tracer_provider("mycelium-test", Some(&endpoint)).unwrap();
    let subscriber = tracing_subscriber::registry().with(otel_layer(&provider));
    let caller = TraceContext::parse(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .unwrap();
    let continued = tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("invocation");
        let continued = OtelBridge.enter(&span, Some(&caller)).unwrap();
        drop(span);
        continued
    });
    assert_eq!(continued.trace_id(), caller.trace_id());
    assert_ne!(continued.parent_id(), caller.parent_id());

    let provider = tokio::task::spawn_blocking(move || {
        provider.force_flush().unwrap();
        provider
    })
    .await
    .unwrap();
    assert_eq!(
        collector.spans(),
        vec![ReceivedSpan {
            name: "invocation".to_owned(),
            trace_id: caller.trace_id().to_owned(),
            parent_span_id: caller.parent_id().to_owned(),
        }]
    );
    tokio::task::spawn_blocking(move || provider.shutdown().unwrap())
        .await
        .unwrap();
}
