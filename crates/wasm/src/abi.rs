//! The guest ABI of WASI preview 1 functions: what a module reads (the event on stdin, its
//! settings in the environment) and how its output becomes the reply. docs/wasm.md is the
//! contract; these are its only encoders and decoders.

use mycelium_core::{
    event::{event_from_json_slice, fast_event_from_json},
    ErrorCode, Event, FunctionError, FunctionMetadata, InvocationContext,
};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// Environment variables the runtime sets for each call; a deploy's `--env` cannot replace
/// them.
pub(crate) const RESERVED_ENV: [&str; 6] = [
    "MYCELIUM_FUNCTION",
    "MYCELIUM_VERSION",
    "MYCELIUM_INVOCATION_ID",
    "MYCELIUM_DEADLINE_MS",
    "TRACEPARENT",
    "TRACESTATE",
];

/// The part of a guest's environment that is the same for every call of a version: the
/// deploy's `--env` and the function's name and version.
pub(crate) fn version_environment(metadata: &FunctionMetadata) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = metadata
        .env
        .iter()
        .filter(|(key, _)| !RESERVED_ENV.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    env.push(("MYCELIUM_FUNCTION".into(), metadata.name.to_string()));
    env.push(("MYCELIUM_VERSION".into(), metadata.version.to_string()));
    env
}

/// The part that changes with each call: the invocation id, the milliseconds left before the
/// deadline, and the W3C trace context (the variables OpenTelemetry's environment carrier
/// reads).
pub(crate) fn call_environment(ctx: &InvocationContext) -> Vec<(&'static str, String)> {
    let left = ctx
        .deadline()
        .saturating_duration_since(std::time::Instant::now());
    let mut env = vec![
        ("MYCELIUM_INVOCATION_ID", ctx.invocation_id().to_owned()),
        ("MYCELIUM_DEADLINE_MS", left.as_millis().to_string()),
    ];
    if let Some(trace) = ctx.trace() {
        env.push(("TRACEPARENT", trace.traceparent().to_owned()));
        if let Some(state) = trace.tracestate() {
            env.push(("TRACESTATE", state.to_owned()));
        }
    }
    env
}

/// The event as the guest reads it on stdin: CloudEvents structured-mode JSON.
pub(crate) fn input(event: &Event) -> Result<Vec<u8>, FunctionError> {
    serde_json::to_vec(event).map_err(|e| {
        FunctionError::with_code(
            ErrorCode::Internal,
            format!("cannot encode the event for the module: {e}"),
        )
    })
}

/// An object on stdout: a reply envelope, an error, or one event.
#[derive(serde::Deserialize)]
struct Object<'a> {
    #[serde(borrow)]
    events: Option<Vec<&'a RawValue>>,
    error: Option<GuestError>,
    /// Every event has an `id`; an envelope has none.
    id: Option<IgnoredAny>,
}

/// The error a guest reports: `{"error": {"code": "...", "message": "..."}}`.
#[derive(serde::Deserialize)]
struct GuestError {
    code: Option<String>,
    message: Option<String>,
}

/// The reply a guest wrote on stdout: `{"events": [...]}`, a list of events, one event, or
/// `{"error": {"code", "message"}}`; nothing at all is no events.
pub(crate) fn output(stdout: &[u8]) -> Result<Vec<Event>, FunctionError> {
    let text = std::str::from_utf8(stdout.trim_ascii())
        .map_err(|_| malformed("its output is not UTF-8 text"))?;
    let events: Vec<&RawValue> = match text.as_bytes().first() {
        None => return Ok(Vec::new()),
        Some(b'[') => serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?,
        Some(b'{') => {
            // The common reply, one event, is parsed once; anything else is read as an
            // envelope.
            if let Some(event) = fast_event_from_json(text) {
                return Ok(vec![event]);
            }
            let object: Object<'_> =
                serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
            match object {
                Object { id: Some(_), .. } => return parse_events(&[text]),
                Object {
                    events: Some(events),
                    ..
                } => events,
                Object {
                    error: Some(error), ..
                } => return Err(reported(error)),
                _ => return parse_events(&[text]),
            }
        }
        Some(_) => return Err(malformed("its output is not a JSON object or array")),
    };
    let texts: Vec<&str> = events.iter().map(|raw| raw.get()).collect();
    parse_events(&texts)
}

fn parse_events(texts: &[&str]) -> Result<Vec<Event>, FunctionError> {
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            fast_event_from_json(text)
                .map_or_else(|| event_from_json_slice(text.as_bytes()), Ok)
                .map_err(|e| {
                    FunctionError::new(format!(
                        "event {index} of the module's output is not a valid CloudEvent: {}",
                        e.message
                    ))
                })
        })
        .collect()
}

fn malformed(why: &str) -> FunctionError {
    FunctionError::new(format!(
        "the module's output is not a reply ({why}); write {{\"events\": [...]}}, a list of events, or {{\"error\": {{\"code\", \"message\"}}}} on stdout"
    ))
}

fn reported(error: GuestError) -> FunctionError {
    // A guest may choose any code of the protocol; one it made up is a function error.
    let code = match error.code.as_deref().map(str::parse::<ErrorCode>) {
        Some(Ok(code)) if code != ErrorCode::Unknown => code,
        _ => ErrorCode::FunctionError,
    };
    FunctionError::with_code(
        code,
        error
            .message
            .unwrap_or_else(|| "the module reported an error".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"specversion":"1.0","id":"1","source":"/t","type":"t.v1"}"#;

    #[test]
    fn every_reply_shape_decodes() {
        let ids = |events: Vec<Event>| -> Vec<String> {
            events
                .iter()
                .map(|e| mycelium_core::cloudevents::AttributesReader::id(e).to_owned())
                .collect()
        };
        assert_eq!(ids(output(b"").unwrap()), Vec::<String>::new());
        assert_eq!(ids(output(b" \n").unwrap()), Vec::<String>::new());
        assert_eq!(ids(output(EVENT.as_bytes()).unwrap()), ["1"]);
        let list = format!("[{EVENT},{}]", EVENT.replace("\"1\"", "\"2\""));
        assert_eq!(ids(output(list.as_bytes()).unwrap()), ["1", "2"]);
        let envelope = format!("{{\"events\":{list}}}\n");
        assert_eq!(ids(output(envelope.as_bytes()).unwrap()), ["1", "2"]);
        assert_eq!(
            ids(output(br#"{"events":[]}"#).unwrap()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn errors_keep_known_codes_and_messages() {
        let error =
            output(br#"{"error":{"code":"invalid_event","message":"no data"}}"#).unwrap_err();
        assert_eq!(
            (error.code(), error.message()),
            (ErrorCode::InvalidEvent, "no data")
        );
        let error = output(br#"{"error":{"code":"made_up","message":"x"}}"#).unwrap_err();
        assert_eq!(error.code(), ErrorCode::FunctionError);
        let error = output(br#"{"error":{}}"#).unwrap_err();
        assert_eq!(
            (error.code(), error.message()),
            (ErrorCode::FunctionError, "the module reported an error")
        );
    }

    #[test]
    fn malformed_output_says_what_to_write() {
        for bad in [
            &b"hello"[..],
            b"{\"a\":",
            b"[1]",
            b"\xff",
            br#"{"events":[{"id":"1"}]}"#,
        ] {
            let error = output(bad).unwrap_err();
            assert_eq!(error.code(), ErrorCode::FunctionError, "{bad:?}");
        }
        assert!(output(b"hello")
            .unwrap_err()
            .message()
            .contains("on stdout"));
        assert!(output(br#"[{"id":"1"}]"#)
            .unwrap_err()
            .message()
            .starts_with("event 0 of the module's output is not a valid CloudEvent"));
    }
}
