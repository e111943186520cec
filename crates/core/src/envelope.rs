//! The invocation protocol's JSON envelopes: the wire contract other NATS clients rely on.
//!
//! Request on `<prefix>.invoke`:
//! `{"functionName": "<name>", "event": <CloudEvent JSON>, "version"?: n, "timeoutMs"?: n}`.
//! Success reply: `{"events": [<CloudEvent JSON>, ...]}`.
//! Failure reply: `{"error": {"code": "<code>", "message": "..."}}`.

use std::{borrow::Cow, time::Duration};

use cloudevents::Event;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    event::event_from_json_object, ErrorCode, FunctionMetadata, FunctionName, FunctionSummary,
    ProtocolError, TraceContext,
};

/// Header carrying the numeric, HTTP-like status of a failed request (NATS services API).
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// Header carrying the text of a failed request's error (NATS services API).
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
/// Header selecting a version in binding-mode requests.
pub const VERSION_HEADER: &str = "Mycelium-Version";
/// Header shortening the timeout in binding-mode requests, in milliseconds.
pub const TIMEOUT_HEADER: &str = "Mycelium-Timeout-Ms";
/// Header naming the invocation, so that a retried request keeps its id and a function can
/// recognise a repeat (`InvocationContext::invocation_id`). Without it the runtime makes one.
pub const INVOCATION_ID_HEADER: &str = "Mycelium-Invocation-Id";

/// Whether a caller-chosen invocation id is usable: 1 to 64 characters of `A-Z a-z 0-9 - _ . :`.
pub fn valid_invocation_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A decoded invocation request.
#[derive(Debug, Clone, PartialEq)]
pub struct InvokeRequest {
    /// The function to run.
    pub function: FunctionName,
    /// The event to hand it.
    pub event: Event,
    /// A specific version; the active one when absent.
    pub version: Option<u64>,
    /// A shorter timeout than the function's own.
    pub timeout: Option<Duration>,
    /// The caller's name for this invocation (header [`INVOCATION_ID_HEADER`]), if valid.
    pub invocation_id: Option<String>,
    /// The caller's W3C trace context: from the NATS headers (set by the endpoint, they win)
    /// or the event's distributed-tracing extension. Invalid contexts are dropped, not refused.
    pub trace: Option<TraceContext>,
}

/// The trace context an event carries in its CloudEvents distributed-tracing extension
/// (`traceparent`, `tracestate` attributes), if valid.
pub fn event_trace(event: &Event) -> Option<TraceContext> {
    use cloudevents::event::ExtensionValue;
    let text = |name: &str| match event.extension(name) {
        Some(ExtensionValue::String(value)) => Some(value.as_str()),
        _ => None,
    };
    let parent = text(crate::trace::TRACEPARENT)?;
    TraceContext::from_pairs(
        [(crate::trace::TRACEPARENT, parent)]
            .into_iter()
            .chain(text(crate::trace::TRACESTATE).map(|s| (crate::trace::TRACESTATE, s))),
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawInvokeRequest<'a> {
    #[serde(borrow)]
    function_name: Cow<'a, str>,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

const ENVELOPE_SHAPE: &str = r#"expected {"functionName": string, "event": object, "version"?: integer, "timeoutMs"?: integer}"#;

/// Classifies a serde_json failure as the protocol's `invalid_request`.
fn invalid_json(what: &str, e: &serde_json::Error) -> ProtocolError {
    let message = if e.is_data() {
        format!("{what} has the wrong shape: {e}; {ENVELOPE_SHAPE}")
    } else {
        format!("{what} is not valid JSON: {e}")
    };
    ProtocolError::new(ErrorCode::InvalidRequest, message)
}

/// Decodes an invocation request body.
pub fn decode_invoke_request(body: &[u8]) -> Result<InvokeRequest, ProtocolError> {
    let raw: RawInvokeRequest<'_> =
        serde_json::from_slice(body).map_err(|e| invalid_json("request", &e))?;
    let function = FunctionName::new(&raw.function_name)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidFunctionName, e.to_string()))?;
    let timeout = parse_timeout_ms(raw.timeout_ms)?;
    let event = event_from_raw(raw.event.get())?;
    Ok(InvokeRequest {
        function,
        invocation_id: None,
        trace: event_trace(&event),
        event,
        version: raw.version,
        timeout,
    })
}

/// The event of an envelope. The common case (a complete CloudEvent) is parsed straight from
/// the text; anything else takes the slow path, which adds a missing `specversion` and
/// explains exactly what is wrong.
fn event_from_raw(text: &str) -> Result<Event, ProtocolError> {
    if !text.starts_with('{') {
        return Err(ProtocolError::new(
            ErrorCode::InvalidRequest,
            format!("request has the wrong shape: \"event\" must be a JSON object (a CloudEvent); {ENVELOPE_SHAPE}"),
        ));
    }
    if let Some(event) = crate::event::fast_event_from_json(text) {
        return Ok(event);
    }
    let object: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| invalid_json("request", &e))?;
    event_from_json_object(object)
}

/// Validates a requested timeout: positive milliseconds.
pub fn parse_timeout_ms(timeout_ms: Option<u64>) -> Result<Option<Duration>, ProtocolError> {
    match timeout_ms {
        Some(0) => Err(ProtocolError::new(
            ErrorCode::InvalidRequest,
            "timeoutMs must be a positive number of milliseconds",
        )),
        other => Ok(other.map(Duration::from_millis)),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RawInvokeRequestOut<'a> {
    function_name: &'a str,
    event: &'a Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
}

/// Encodes an invocation request (the client side of [`decode_invoke_request`]).
pub fn encode_invoke_request(
    function: &FunctionName,
    event: &Event,
    version: Option<u64>,
    timeout: Option<Duration>,
) -> Vec<u8> {
    to_vec(&RawInvokeRequestOut {
        function_name: function.as_str(),
        event,
        version,
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
    })
}

#[derive(Serialize)]
struct EventsOut<'a> {
    events: &'a [Event],
}

/// Encodes the success reply `{"events": [...]}`.
pub fn encode_events(events: &[Event]) -> Vec<u8> {
    to_vec(&EventsOut { events })
}

/// Encodes a batch (`application/cloudevents-batch+json`): a JSON array of events.
pub fn encode_batch(events: &[Event]) -> Vec<u8> {
    to_vec(&events)
}

#[derive(Serialize, Deserialize)]
struct ErrorEnvelope<E> {
    error: E,
}

/// Encodes the failure reply `{"error": {"code": ..., "message": ...}}`.
pub fn encode_error(error: &ProtocolError) -> Vec<u8> {
    to_vec(&ErrorEnvelope { error })
}

/// Serializing our own types to JSON cannot fail: every map key is a string and no
/// Serialize impl involved returns an error.
fn to_vec(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializing envelope types to JSON is infallible")
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReplyIn {
    Events { events: Vec<Event> },
    Error { error: ProtocolError },
}

/// Decodes an invoke reply: the events, or the remote error. `Err(Err(..))` means the
/// reply was not a protocol reply at all.
pub fn decode_invoke_reply(body: &[u8]) -> Result<Result<Vec<Event>, ProtocolError>, String> {
    match serde_json::from_slice::<ReplyIn>(body) {
        Ok(ReplyIn::Events { events }) => Ok(Ok(events)),
        Ok(ReplyIn::Error { error }) => Ok(Err(error)),
        Err(e) => Err(format!(
            "reply is neither {{\"events\"}} nor {{\"error\"}}: {e}"
        )),
    }
}

/// Decodes a reply that carries either `T` or `{"error": ...}`.
pub fn decode_reply<T: for<'de> Deserialize<'de>>(
    body: &[u8],
) -> Result<Result<T, ProtocolError>, String> {
    if let Ok(ErrorEnvelope { error }) =
        serde_json::from_slice::<ErrorEnvelope<ProtocolError>>(body)
    {
        return Ok(Err(error));
    }
    serde_json::from_slice::<T>(body)
        .map(Ok)
        .map_err(|e| format!("unexpected reply: {e}"))
}

/// The reply of `<prefix>.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    /// Every function, sorted by name, each at its active version.
    pub functions: Vec<FunctionSummary>,
}

/// The request of `<prefix>.describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DescribeRequest {
    /// The function to describe.
    pub function_name: String,
    /// A specific version; the active one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// Decodes a describe request into a validated name and optional version.
pub fn decode_describe_request(body: &[u8]) -> Result<(FunctionName, Option<u64>), ProtocolError> {
    let raw: DescribeRequest = serde_json::from_slice(body).map_err(|e| {
        let mut err = invalid_json("describe request", &e);
        if e.is_data() {
            err.message = format!(
                "describe request has the wrong shape: {e}; expected {{\"functionName\": string, \"version\"?: integer}}"
            );
        }
        err
    })?;
    let name = FunctionName::new(&raw.function_name)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidFunctionName, e.to_string()))?;
    Ok((name, raw.version))
}

/// Encodes a describe request (the client side of [`decode_describe_request`]).
pub fn encode_describe_request(request: &DescribeRequest) -> Vec<u8> {
    to_vec(request)
}

/// Encodes the reply of `<prefix>.describe`: the metadata record.
pub fn encode_describe_reply(metadata: &FunctionMetadata) -> Vec<u8> {
    to_vec(&metadata.redacted())
}

/// Encodes the reply of `<prefix>.list`.
pub fn encode_list_reply(functions: &[FunctionSummary]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        functions: &'a [FunctionSummary],
    }
    to_vec(&Out { functions })
}

#[cfg(test)]
mod tests {
    use cloudevents::AttributesReader;
    use serde_json::json;

    use super::*;

    fn decode(value: Value) -> Result<InvokeRequest, ProtocolError> {
        decode_invoke_request(&serde_json::to_vec(&value).unwrap())
    }

    #[test]
    fn reads_the_distributed_tracing_extension() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let event = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t",
            "traceparent": parent, "tracestate": "k=v"});
        let request = decode(json!({"functionName": "f", "event": event})).unwrap();
        let trace = request.trace.unwrap();
        assert_eq!(
            (trace.traceparent(), trace.tracestate()),
            (parent, Some("k=v"))
        );
        // Still an attribute of the event the function sees.
        assert!(request.event.extension("traceparent").is_some());

        let invalid = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t",
            "traceparent": "not-a-trace"});
        let request = decode(json!({"functionName": "f", "event": invalid})).unwrap();
        assert_eq!(request.trace, None);
    }

    #[test]
    fn decodes_the_seed_request_exactly() {
        let body = br#"{
            "functionName": "example",
            "event": {
                "id": "123",
                "source": "test",
                "type": "com.example.test",
                "datacontenttype": "application/json",
                "data": {"key": "value"}
            }
        }"#;
        let request = decode_invoke_request(body).unwrap();
        assert_eq!(request.function.as_str(), "example");
        assert_eq!(request.event.id(), "123");
        assert_eq!(request.version, None);
        assert_eq!(request.timeout, None);
    }

    #[test]
    fn decodes_version_and_timeout() {
        let request = decode(json!({
            "functionName": "echo", "version": 3, "timeoutMs": 250,
            "event": {"id": "1", "source": "s", "type": "t", "specversion": "1.0"}
        }))
        .unwrap();
        assert_eq!(request.version, Some(3));
        assert_eq!(request.timeout, Some(Duration::from_millis(250)));
    }

    #[test]
    fn classifies_every_bad_request() {
        let event = json!({"id": "1", "source": "s", "type": "t"});
        let cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
            (
                b"not json".to_vec(),
                ErrorCode::InvalidRequest,
                "not valid JSON",
            ),
            (
                b"{\"functionName\": \"x\", ".to_vec(),
                ErrorCode::InvalidRequest,
                "not valid JSON",
            ),
            (b"[]".to_vec(), ErrorCode::InvalidRequest, "wrong shape"),
            (
                serde_json::to_vec(&json!({"event": event})).unwrap(),
                ErrorCode::InvalidRequest,
                "functionName",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "x"})).unwrap(),
                ErrorCode::InvalidRequest,
                "event",
            ),
            (
                serde_json::to_vec(&json!({"functionName": 5, "event": event})).unwrap(),
                ErrorCode::InvalidRequest,
                "wrong shape",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "x", "event": "e"})).unwrap(),
                ErrorCode::InvalidRequest,
                "wrong shape",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "x", "event": event, "version": "2"}))
                    .unwrap(),
                ErrorCode::InvalidRequest,
                "wrong shape",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "x", "event": event, "timeoutMs": -1}))
                    .unwrap(),
                ErrorCode::InvalidRequest,
                "wrong shape",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "x", "event": event, "timeoutMs": 0}))
                    .unwrap(),
                ErrorCode::InvalidRequest,
                "positive",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "a.>", "event": event})).unwrap(),
                ErrorCode::InvalidFunctionName,
                "a-z",
            ),
            (
                serde_json::to_vec(&json!({"functionName": "", "event": event})).unwrap(),
                ErrorCode::InvalidFunctionName,
                "empty",
            ),
            (
                serde_json::to_vec(
                    &json!({"functionName": "x", "event": {"id": "1", "source": "s"}}),
                )
                .unwrap(),
                ErrorCode::InvalidEvent,
                "`type`",
            ),
        ];
        for (body, code, needle) in cases {
            let err = decode_invoke_request(&body).unwrap_err();
            assert_eq!(
                err.code,
                code,
                "{}: {}",
                String::from_utf8_lossy(&body),
                err.message
            );
            assert!(
                err.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(&body),
                err.message
            );
        }
    }

    #[test]
    fn request_round_trips_through_the_client_encoder() {
        let request = decode(json!({
            "functionName": "echo",
            "event": {"id": "1", "source": "s", "type": "t", "data": {"a": 1}}
        }))
        .unwrap();
        let body = encode_invoke_request(
            &request.function,
            &request.event,
            Some(2),
            Some(Duration::from_millis(10)),
        );
        let again = decode_invoke_request(&body).unwrap();
        assert_eq!(again.event, request.event);
        assert_eq!(again.version, Some(2));
        assert_eq!(again.timeout, Some(Duration::from_millis(10)));
    }

    #[test]
    fn replies_have_the_contract_shape() {
        let event =
            decode(json!({"functionName": "e", "event": {"id": "1", "source": "s", "type": "t"}}))
                .unwrap()
                .event;
        let events: Value =
            serde_json::from_slice(&encode_events(std::slice::from_ref(&event))).unwrap();
        assert_eq!(
            events,
            json!({"events": [{"specversion": "1.0", "id": "1", "source": "s", "type": "t"}]})
        );
        let batch: Value =
            serde_json::from_slice(&encode_batch(std::slice::from_ref(&event))).unwrap();
        assert_eq!(
            batch,
            json!([{"specversion": "1.0", "id": "1", "source": "s", "type": "t"}])
        );

        let error = ProtocolError::new(ErrorCode::Timeout, "took too long");
        let body = encode_error(&error);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"error": {"code": "timeout", "message": "took too long"}})
        );
        assert_eq!(decode_invoke_reply(&body).unwrap(), Err(error));
        assert_eq!(
            decode_invoke_reply(&encode_events(std::slice::from_ref(&event))).unwrap(),
            Ok(vec![event])
        );
        assert!(decode_invoke_reply(b"{}").is_err());
    }

    #[test]
    fn describe_request_validation() {
        assert_eq!(
            decode_describe_request(br#"{"functionName":"echo","version":2}"#).unwrap(),
            ("echo".parse().unwrap(), Some(2))
        );
        assert_eq!(
            decode_describe_request(br#"{"functionName":"E"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidFunctionName
        );
        assert_eq!(
            decode_describe_request(b"{}").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }
}
