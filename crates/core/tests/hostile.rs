//! Hostile input for the decoders on the invocation path: whatever the bytes, no panic, and
//! either a decoded request or a structured error with one of the input error codes.
//! (`fuzz/` has the same targets for cargo-fuzz, for longer runs.)

use mycelium_core::{
    cloudevents::AttributesReader, envelope, event, ErrorCode, FunctionMetadata, TraceContext,
};
use proptest::prelude::*;
use serde_json::{json, Value};

const INPUT_ERRORS: [ErrorCode; 3] = [
    ErrorCode::InvalidRequest,
    ErrorCode::InvalidEvent,
    ErrorCode::InvalidFunctionName,
];

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Something shaped like a CloudEvent, with each attribute possibly wrong.
fn event_like() -> impl Strategy<Value = Value> {
    let attribute = prop_oneof![".{0,20}".prop_map(Value::String), any_json()];
    (
        prop::option::of(attribute.clone()),
        prop::option::of(attribute.clone()),
        prop::option::of(attribute.clone()),
        prop::option::of(prop_oneof![
            Just(json!("1.0")),
            Just(json!("0.3")),
            attribute
        ]),
        prop::option::of(any_json()),
        prop::collection::btree_map("[a-z]{1,10}", any_json(), 0..4),
    )
        .prop_map(|(id, source, ty, spec, data, extra)| {
            let mut object: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (key, value) in [
                ("id", id),
                ("source", source),
                ("type", ty),
                ("specversion", spec),
                ("data", data),
            ] {
                if let Some(value) = value {
                    object.insert(key.into(), value);
                }
            }
            Value::Object(object)
        })
}

fn check(result: Result<envelope::InvokeRequest, mycelium_core::ProtocolError>) {
    match result {
        Ok(request) => {
            // What decodes is usable: a valid name and a complete event.
            assert!(!request.function.as_str().is_empty());
            assert!(!request.event.id().is_empty());
        }
        Err(error) => {
            assert!(INPUT_ERRORS.contains(&error.code), "{error:?}");
            assert!(!error.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(envelope::decode_invoke_request(&bytes));
        let _ = event::event_from_json_slice(&bytes);
        let _ = serde_json::from_slice::<FunctionMetadata>(&bytes);
    }

    #[test]
    fn envelope_shaped_input_decodes_or_fails_cleanly(
        name in prop_oneof![".{0,70}".prop_map(Value::String), any_json()],
        event in prop_oneof![event_like(), any_json()],
        version in prop::option::of(any_json()),
        timeout in prop::option::of(any_json()),
    ) {
        let mut request = json!({"functionName": name, "event": event});
        if let Some(version) = version {
            request["version"] = version;
        }
        if let Some(timeout) = timeout {
            request["timeoutMs"] = timeout;
        }
        check(envelope::decode_invoke_request(&serde_json::to_vec(&request).unwrap()));
    }

    #[test]
    fn binary_mode_headers_decode_or_fail_cleanly(
        headers in prop::collection::vec(("(ce-)?[a-z-]{0,16}|.{0,10}", ".{0,40}"), 0..12),
        content_type in prop::option::of(".{0,40}"),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        if let Err(error) = event::event_from_binary(pairs, content_type.as_deref(), &body) {
            prop_assert!(INPUT_ERRORS.contains(&error.code), "{:?}", error);
        }
    }

    #[test]
    fn metadata_records_decode_or_fail_cleanly(value in any_json()) {
        let _ = serde_json::from_value::<FunctionMetadata>(value);
    }

    #[test]
    fn trace_contexts_parse_or_are_refused(parent in ".{0,80}", state in prop::option::of(".{0,40}")) {
        if let Ok(trace) = TraceContext::parse(&parent, state.as_deref()) {
            // What is accepted is canonical and round-trips.
            let again = TraceContext::parse(trace.traceparent(), trace.tracestate()).unwrap();
            prop_assert_eq!(again, trace);
        }
    }
}

#[test]
fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
    let depth = 100_000;
    let nested = format!(
        r#"{{"functionName": "echo", "event": {{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {}{}}}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let error = envelope::decode_invoke_request(nested.as_bytes()).unwrap_err();
    assert!(INPUT_ERRORS.contains(&error.code), "{error:?}");
}
