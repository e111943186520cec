//! Turning wire input into CloudEvents: the JSON format (structured mode) and the
//! binary mode of the NATS protocol binding (`ce-*` headers, data in the body).

use cloudevents::{event::Data, Event, EventBuilder, EventBuilderV10};
use serde_json::{Map, Value};

use crate::{ErrorCode, ProtocolError};

/// Content type of a single structured-mode CloudEvent.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Content type of a batch of CloudEvents (a JSON array).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Prefix of binary-mode attribute headers.
pub const BINARY_HEADER_PREFIX: &str = "ce-";

mod fast;

pub use fast::fast_event_from_json;

fn invalid(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::InvalidEvent, message)
}

/// Builds an event from its JSON-format object.
///
/// A missing `specversion` is taken as `1.0` (the protocol's own examples may omit it);
/// `id`, `source` and `type` must be present, non-empty strings.
pub fn event_from_json_object(mut object: Map<String, Value>) -> Result<Event, ProtocolError> {
    for attribute in ["id", "source", "type"] {
        match object.get(attribute) {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::String(_)) => {
                return Err(invalid(format!(
                    "event attribute `{attribute}` is empty; CloudEvents requires a non-empty `id`, `source` and `type`"
                )))
            }
            Some(_) => {
                return Err(invalid(format!(
                    "event attribute `{attribute}` must be a string"
                )))
            }
            None => {
                return Err(invalid(format!(
                    "event is missing the required attribute `{attribute}`; CloudEvents requires `id`, `source` and `type`"
                )))
            }
        }
    }
    object
        .entry("specversion")
        .or_insert_with(|| Value::String("1.0".into()));
    serde_json::from_value(Value::Object(object))
        .map_err(|e| invalid(format!("event is not a valid CloudEvent: {e}")))
}

/// Builds an event from a structured-mode body: one CloudEvent in the JSON format.
pub fn event_from_json_slice(body: &[u8]) -> Result<Event, ProtocolError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => event_from_json_object(object),
        Ok(_) => Err(ProtocolError::new(
            ErrorCode::InvalidRequest,
            "structured-mode body must be a JSON object (one CloudEvent)",
        )),
        Err(e) => Err(ProtocolError::new(
            ErrorCode::InvalidRequest,
            format!("structured-mode body is not valid JSON: {e}"),
        )),
    }
}

/// Builds an event from binary mode: attributes in `ce-*` headers (names compared
/// case-insensitively), the data content type in `content_type`, the data in `body`.
///
/// Headers other than `ce-*` are ignored; unknown `ce-*` headers become string extensions.
pub fn event_from_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Event, ProtocolError> {
    let mut builder = EventBuilderV10::new();
    let mut dataschema = None;
    let mut seen_required = [false; 3];
    for (name, value) in headers {
        let Some(attribute) = strip_prefix_ignore_case(name, BINARY_HEADER_PREFIX) else {
            continue;
        };
        let attribute = attribute.to_ascii_lowercase();
        match attribute.as_str() {
            "specversion" if value != "1.0" => {
                return Err(invalid(format!(
                    "binary-mode event has ce-specversion {value:?}; only \"1.0\" is supported"
                )))
            }
            "specversion" => {}
            "id" => {
                seen_required[0] = !value.is_empty();
                builder = builder.id(value);
            }
            "source" => {
                seen_required[1] = !value.is_empty();
                builder = builder.source(value);
            }
            "type" => {
                seen_required[2] = !value.is_empty();
                builder = builder.ty(value);
            }
            "subject" => builder = builder.subject(value),
            "time" => builder = builder.time(value),
            "dataschema" => dataschema = Some(value),
            "datacontenttype" => {
                return Err(invalid(
                    "binary mode carries the data content type in the `content-type` header, not `ce-datacontenttype`",
                ))
            }
            _ if is_extension_name(&attribute) => builder = builder.extension(&attribute, value),
            _ => {
                return Err(invalid(format!(
                    "header {name:?} is not a valid CloudEvents extension name (use a-z and 0-9)"
                )))
            }
        }
    }
    for (seen, attribute) in seen_required.into_iter().zip(["id", "source", "type"]) {
        if !seen {
            return Err(invalid(format!(
                "binary-mode event lacks a non-empty `ce-{attribute}` header; CloudEvents requires `id`, `source` and `type`"
            )));
        }
    }
    if !body.is_empty() || content_type.is_some() {
        let content_type = content_type.unwrap_or("application/octet-stream");
        let data = data_from_body(content_type, body)?;
        builder = match dataschema {
            Some(schema) => builder.data_with_schema(content_type, schema, data),
            None => builder.data(content_type, data),
        };
    }
    builder
        .build()
        .map_err(|e| invalid(format!("binary-mode event is not a valid CloudEvent: {e}")))
}

fn data_from_body(content_type: &str, body: &[u8]) -> Result<Data, ProtocolError> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.starts_with("application/json")
        || essence.starts_with("text/json")
        || essence.ends_with("+json")
    {
        return serde_json::from_slice(body).map(Data::Json).map_err(|e| {
            invalid(format!(
                "event data is declared as {content_type:?} but is not valid JSON: {e}"
            ))
        });
    }
    if essence.starts_with("text/") {
        if let Ok(text) = std::str::from_utf8(body) {
            return Ok(Data::String(text.to_owned()));
        }
    }
    Ok(Data::Binary(body.to_vec()))
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use cloudevents::AttributesReader;
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn json_event_without_specversion_is_1_0() {
        let event = event_from_json_object(object(json!({
            "id": "123", "source": "test", "type": "com.example.test",
            "datacontenttype": "application/json", "data": {"key": "value"}
        })))
        .unwrap();
        assert_eq!(event.id(), "123");
        assert_eq!(event.specversion().as_str(), "1.0");
        assert_eq!(event.data(), Some(&Data::Json(json!({"key": "value"}))));
    }

    #[test]
    fn json_event_missing_or_bad_required_attributes() {
        let base = json!({"id": "1", "source": "s", "type": "t"});
        for attribute in ["id", "source", "type"] {
            let mut missing = object(base.clone());
            missing.remove(attribute);
            let err = event_from_json_object(missing).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEvent);
            assert!(
                err.message.contains(&format!("`{attribute}`")),
                "{}",
                err.message
            );

            let mut wrong = object(base.clone());
            wrong.insert(attribute.into(), json!(7));
            let err = event_from_json_object(wrong).unwrap_err();
            assert!(err.message.contains("must be a string"), "{}", err.message);

            let mut empty = object(base.clone());
            empty.insert(attribute.into(), json!(""));
            assert_eq!(
                event_from_json_object(empty).unwrap_err().code,
                ErrorCode::InvalidEvent
            );
        }
        let mut bad_version = object(base);
        bad_version.insert("specversion".into(), json!("9.9"));
        assert_eq!(
            event_from_json_object(bad_version).unwrap_err().code,
            ErrorCode::InvalidEvent
        );
    }

    #[test]
    fn binary_mode_builds_the_event() {
        let headers = [
            ("ce-specversion", "1.0"),
            ("CE-ID", "b-1"),
            ("ce-source", "/sensor/7"),
            ("ce-type", "com.example.reading"),
            ("ce-subject", "temp"),
            ("ce-traceparent", "00-abc"),
            ("Nats-Msg-Id", "ignored"),
        ];
        let event = event_from_binary(headers, Some("application/json"), br#"{"c": 21}"#).unwrap();
        assert_eq!(event.id(), "b-1");
        assert_eq!(event.source().as_str(), "/sensor/7");
        assert_eq!(event.ty(), "com.example.reading");
        assert_eq!(event.subject(), Some("temp"));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(event.data(), Some(&Data::Json(json!({"c": 21}))));
        assert_eq!(
            event.extension("traceparent").unwrap().to_string(),
            "00-abc"
        );
    }

    #[test]
    fn binary_mode_text_and_bytes_and_errors() {
        let required = [("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t")];
        let text = event_from_binary(required, Some("text/plain"), b"hi").unwrap();
        assert_eq!(text.data(), Some(&Data::String("hi".into())));
        let bytes = event_from_binary(required, None, &[0, 159]).unwrap();
        assert_eq!(bytes.data(), Some(&Data::Binary(vec![0, 159])));
        let empty = event_from_binary(required, None, b"").unwrap();
        assert_eq!(empty.data(), None);

        let err = event_from_binary(required[..2].iter().copied(), None, b"").unwrap_err();
        assert!(err.message.contains("ce-type"), "{}", err.message);
        let err = event_from_binary(required, Some("application/json"), b"{").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEvent);
        let err = event_from_binary(
            required.into_iter().chain([("ce-specversion", "0.2")]),
            None,
            b"",
        )
        .unwrap_err();
        assert!(err.message.contains("0.2"));
    }

    #[test]
    fn structured_body_must_be_an_object() {
        assert_eq!(
            event_from_json_slice(b"[1]").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            event_from_json_slice(b"nope").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        let event = event_from_json_slice(br#"{"id":"1","source":"s","type":"t"}"#).unwrap();
        assert_eq!(event.id(), "1");
    }
}
