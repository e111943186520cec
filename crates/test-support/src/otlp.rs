//! A stand-in OpenTelemetry collector: an OTLP/gRPC trace service on a loopback port that
//! records the spans it receives.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::sync::Notify;

/// One received span: its name, trace id and parent span id (hex; empty for a root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The span's name.
    pub name: String,
    /// Its trace id.
    pub trace_id: String,
    /// Its parent's span id.
    pub parent_span_id: String,
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    arrived: Notify,
}

struct Service(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut spans = self.0.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(ReceivedSpan {
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        self.0.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running stand-in collector; stops with the test's runtime.
pub struct Collector {
    endpoint: String,
    received: Arc<Received>,
}

impl Collector {
    /// Starts serving on a free loopback port (inside a Tokio runtime).
    pub fn start() -> Self {
        let incoming = tonic::transport::server::TcpIncoming::bind(([127, 0, 0, 1], 0).into())
            .expect("binding the stand-in collector");
        let endpoint = format!(
            "http://{}",
            incoming.local_addr().expect("the collector's address")
        );
        let received = Arc::new(Received::default());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Service(received.clone())))
                .serve_with_incoming(incoming),
        );
        Self { endpoint, received }
    }

    /// The URL to export to (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (up to `limit`) until a received span satisfies `wanted`, and returns it.
    pub async fn wait_for(
        &self,
        limit: std::time::Duration,
        wanted: impl Fn(&ReceivedSpan) -> bool,
    ) -> ReceivedSpan {
        tokio::time::timeout(limit, async {
            loop {
                let arrived = self.received.arrived.notified();
                if let Some(span) = self.spans().into_iter().find(|s| wanted(s)) {
                    return span;
                }
                arrived.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no such span within {limit:?}; got {:?}", self.spans()))
    }
}
