//! The OTLP exporter behind `--otlp-endpoint`, against a stand-in collector: an OTLP/gRPC
//! trace service in this process that records what it receives.

use std::sync::{Arc, Mutex};

use mycelium_core::{TraceBridge, TraceContext};
use mycelium_observability::{otel_layer, tracer_provider, OtelBridge};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tracing_subscriber::layer::SubscriberExt;

#[derive(Default)]
struct Collector {
    /// (span name, trace id hex, parent span id hex) of every span received.
    spans: Mutex<Vec<(String, String, String)>>,
}

struct Shared(Arc<Collector>);

#[tonic::async_trait]
impl TraceService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut spans = self.0.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((span.name, hex(&span.trace_id), hex(&span.parent_span_id)));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

// Multi-threaded: the exporter's thread blocks on gRPC I/O that this runtime drives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_the_callers_trace() {
    let collector = Arc::new(Collector::default());
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = format!("http://{}", incoming.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Shared(collector.clone())))
            .serve_with_incoming(incoming),
    );

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
        *collector.spans.lock().unwrap(),
        vec![(
            "invocation".to_owned(),
            caller.trace_id().to_owned(),
            caller.parent_id().to_owned()
        )]
    );
    tokio::task::spawn_blocking(move || provider.shutdown().unwrap())
        .await
        .unwrap();
}
