//! W3C trace context (`traceparent`, `tracestate`) as it travels with an invocation: in NATS
//! message headers, as the CloudEvents distributed-tracing extension, and in the plugin call.
//!
//! This module only validates and carries the context. Joining it to spans is the job of a
//! [`TraceBridge`] (the OpenTelemetry one lives in `mycelium-observability`), so that neither
//! this crate nor the runtime depends on a tracing backend.

use std::fmt;

/// The NATS header and CloudEvents extension attribute that carry the parent.
pub const TRACEPARENT: &str = "traceparent";
/// The NATS header and CloudEvents extension attribute that carry vendor state.
pub const TRACESTATE: &str = "tracestate";

/// A validated W3C trace context.
///
/// ```
/// use mycelium_core::trace::TraceContext;
/// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
/// assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(ctx.parent_id(), "00f067aa0ba902b7");
/// assert!(ctx.sampled());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

/// Why a `traceparent` was refused. Callers drop such a context and start a new trace, as the
/// W3C specification asks, rather than failing the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid traceparent {0:?}: expected 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"
)]
pub struct InvalidTraceparent(pub String);

impl TraceContext {
    /// Validates a `traceparent` (and keeps `tracestate` as given, if any and not empty).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, InvalidTraceparent> {
        let text = traceparent.trim();
        let invalid = || InvalidTraceparent(traceparent.chars().take(80).collect());
        let mut parts = text.split('-');
        let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let lower_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
        // Version 00 has exactly four fields; later versions may append more (forward compatible).
        let extra = parts.next();
        if !lower_hex(version, 2)
            || version == "ff"
            || (version == "00" && extra.is_some())
            || !lower_hex(trace_id, 32)
            || all_zero(trace_id)
            || !lower_hex(parent_id, 16)
            || all_zero(parent_id)
            || !lower_hex(flags, 2)
        {
            return Err(invalid());
        }
        Ok(Self {
            traceparent: format!("00-{trace_id}-{parent_id}-{flags}"),
            tracestate: tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        })
    }

    /// A context from its parts: 16-byte trace id, 8-byte span id, sampled flag.
    pub fn from_ids(
        trace_id: u128,
        span_id: u64,
        sampled: bool,
        tracestate: Option<String>,
    ) -> Self {
        Self {
            traceparent: format!(
                "00-{trace_id:032x}-{span_id:016x}-{:02x}",
                u8::from(sampled)
            ),
            tracestate,
        }
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The id of the span this context continues from, 16 lowercase hex digits.
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Whether the caller sampled (records) this trace.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.traceparent[53..55], 16).is_ok_and(|flags| flags & 1 == 1)
    }

    /// The same trace, continued from another span.
    pub fn with_parent(&self, span_id: u64) -> Self {
        let mut next = self.clone();
        next.traceparent
            .replace_range(36..52, &format!("{span_id:016x}"));
        next
    }

    /// Reads the context from name/value pairs (NATS headers, gRPC metadata, event attributes);
    /// names compare case-insensitively. `None` when absent or invalid.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let mut parent = None;
        let mut state = None;
        for (name, value) in pairs {
            if name.eq_ignore_ascii_case(TRACEPARENT) {
                parent.get_or_insert(value);
            } else if name.eq_ignore_ascii_case(TRACESTATE) {
                state.get_or_insert(value);
            }
        }
        let parent = parent?;
        match Self::parse(parent, state) {
            Ok(ctx) => Some(ctx),
            Err(error) => {
                tracing::debug!(%error, "ignoring the trace context; a new trace starts here");
                None
            }
        }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent)
    }
}

/// Records `trace_id` on `span`, and `span_id` when the backend gave the span an id of its own
/// (`current` continues from a different span than the caller's), for log lines.
pub fn record_ids(
    span: &tracing::Span,
    caller: Option<&TraceContext>,
    current: Option<&TraceContext>,
) {
    let Some(current) = current else {
        return;
    };
    span.record("trace_id", current.trace_id());
    if caller.is_none_or(|caller| caller.parent_id() != current.parent_id()) {
        span.record("span_id", current.parent_id());
    }
}

/// Joins invocations to a tracing backend. The runtime calls [`TraceBridge::enter`] when it
/// creates an invocation span, the plugin SDK when it creates its own, and the client
/// [`TraceBridge::current`] before it sends a request.
///
/// The default, [`PassThrough`], has no backend: it hands the caller's context on unchanged, so a
/// trace still crosses a runtime that records nothing itself.
pub trait TraceBridge: Send + Sync + 'static {
    /// Makes `span` a child of `parent` (the caller's context, if any) and returns the context
    /// to hand to whatever the span calls next.
    fn enter(&self, span: &tracing::Span, parent: Option<&TraceContext>) -> Option<TraceContext>;

    /// The context of the current span, for a request about to leave; `None` outside any trace.
    fn current(&self) -> Option<TraceContext>;
}

/// A [`TraceBridge`] without a backend: contexts pass through unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl TraceBridge for PassThrough {
    fn enter(&self, _span: &tracing::Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
        parent.cloned()
    }

    fn current(&self) -> Option<TraceContext> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_exposes_the_parts() {
        let ctx = TraceContext::parse(VALID, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(ctx.traceparent(), VALID);
        assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE"));
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_id(), "00f067aa0ba902b7");
        assert!(ctx.sampled());
        assert!(!TraceContext::parse(&VALID.replace("-01", "-00"), None)
            .unwrap()
            .sampled());
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                TraceContext::parse(bad, None).is_err(),
                "{bad:?} was accepted"
            );
        }
        // A future version may carry more fields; its first four are still understood.
        let future = TraceContext::parse(&format!("cc{}-what-ever", &VALID[2..]), None).unwrap();
        assert_eq!(future.traceparent(), VALID);
    }

    #[test]
    fn continues_a_trace_from_another_span() {
        let ctx = TraceContext::parse(VALID, None).unwrap().with_parent(0xabc);
        assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_id(), "0000000000000abc");
        let made = TraceContext::from_ids(1, 2, true, None);
        assert_eq!(
            made.traceparent(),
            "00-00000000000000000000000000000001-0000000000000002-01"
        );
    }

    #[test]
    fn reads_pairs_case_insensitively_and_ignores_invalid_ones() {
        let ctx =
            TraceContext::from_pairs([("Traceparent", VALID), ("TraceState", "a=b")]).unwrap();
        assert_eq!(ctx.tracestate(), Some("a=b"));
        assert_eq!(TraceContext::from_pairs([("traceparent", "garbage")]), None);
        assert_eq!(TraceContext::from_pairs([("other", VALID)]), None);
    }
}
