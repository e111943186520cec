//! OpenTelemetry tracing: the [`OtelBridge`] behind the [`TraceBridge`] seam, and the tracer
//! provider binaries install (optionally exporting over OTLP/gRPC).

use std::time::Duration;

use mycelium_core::{TraceBridge, TraceContext};
use opentelemetry::{
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
    },
    Context, KeyValue,
};
use opentelemetry_sdk::{trace::SdkTracerProvider, Resource};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Joins `tracing` spans to W3C trace contexts through `tracing-opentelemetry`.
///
/// Needs an [`otel_layer`] in the subscriber; without one spans have no OpenTelemetry
/// context, and the bridge passes the caller's context on unchanged, like `PassThrough`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OtelBridge;

impl TraceBridge for OtelBridge {
    fn enter(&self, span: &tracing::Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
        if let Some(parent) = parent.and_then(remote_context) {
            if let Err(error) = span.set_parent(parent) {
                tracing::debug!(%error, "the span could not take the caller's trace");
            }
        }
        let tracestate = parent.and_then(TraceContext::tracestate).map(str::to_owned);
        to_trace_context(&span.context(), tracestate).or_else(|| parent.cloned())
    }

    fn current(&self) -> Option<TraceContext> {
        to_trace_context(&tracing::Span::current().context(), None)
    }
}

/// The OpenTelemetry context of a caller's W3C context.
pub fn remote_context(trace: &TraceContext) -> Option<Context> {
    let trace_id = TraceId::from_hex(trace.trace_id()).ok()?;
    let span_id = SpanId::from_hex(trace.parent_id()).ok()?;
    let flags = if trace.sampled() {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = trace
        .tracestate()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let span = SpanContext::new(trace_id, span_id, flags, true, state);
    Some(Context::new().with_remote_span_context(span))
}

fn to_trace_context(cx: &Context, tracestate: Option<String>) -> Option<TraceContext> {
    let span = cx.span();
    let span = span.span_context();
    if !span.is_valid() {
        return None;
    }
    Some(TraceContext::from_ids(
        u128::from_be_bytes(span.trace_id().to_bytes()),
        u64::from_be_bytes(span.span_id().to_bytes()),
        span.is_sampled(),
        tracestate,
    ))
}

/// Why the tracer provider could not be built.
#[derive(Debug, thiserror::Error)]
#[error("setting up the OTLP trace exporter for {endpoint}: {source}")]
pub struct TracingSetupError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// A tracer provider for `service_name`. With `otlp_endpoint` (e.g. `http://127.0.0.1:4317`)
/// finished spans are batched and exported over OTLP/gRPC; without it spans get ids (so logs
/// carry trace ids and plugins join the trace) but are not exported.
///
/// Must be called inside a Tokio runtime when exporting. Call
/// [`SdkTracerProvider::shutdown`] before exit to flush the last spans.
pub fn tracer_provider(
    service_name: &'static str,
    otlp_endpoint: Option<&str>,
) -> Result<SdkTracerProvider, TracingSetupError> {
    let resource = Resource::builder()
        .with_service_name(service_name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| TracingSetupError {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The `tracing-subscriber` layer that gives spans OpenTelemetry contexts from `provider`.
pub fn otel_layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("mycelium"))
}
