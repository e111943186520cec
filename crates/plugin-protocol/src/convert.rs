//! CloudEvents between the SDK's `Event` and the CloudEvents protobuf format.
//!
//! Mapping (the CloudEvents protobuf format spec): `id`, `source`, `type` and
//! `spec_version` are fields; every other attribute and extension goes into `attributes`;
//! JSON and text data travel as `text_data`, binary data as `binary_data`.

use std::collections::HashMap;

use mycelium_core::{
    cloudevents::{event::Data, AttributesReader, Event, EventBuilder, EventBuilderV10},
    ErrorCode, ProtocolError,
};
use prost_types::Timestamp;

use crate::proto::cloudevents::{
    cloud_event::{cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data as ProtoData},
    CloudEvent,
};

fn string(value: impl Into<String>) -> CloudEventAttributeValue {
    CloudEventAttributeValue {
        attr: Some(Attr::CeString(value.into())),
    }
}

/// An event in the protobuf format.
pub fn to_proto(event: &Event) -> CloudEvent {
    let mut attributes = HashMap::new();
    if let Some(ct) = event.datacontenttype() {
        attributes.insert("datacontenttype".to_owned(), string(ct));
    }
    if let Some(schema) = event.dataschema() {
        attributes.insert(
            "dataschema".to_owned(),
            CloudEventAttributeValue {
                attr: Some(Attr::CeUri(schema.to_string())),
            },
        );
    }
    if let Some(subject) = event.subject() {
        attributes.insert("subject".to_owned(), string(subject));
    }
    if let Some(time) = event.time() {
        attributes.insert(
            "time".to_owned(),
            CloudEventAttributeValue {
                attr: Some(Attr::CeTimestamp(Timestamp {
                    seconds: time.timestamp(),
                    nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
                })),
            },
        );
    }
    for (name, value) in event.iter_extensions() {
        use mycelium_core::cloudevents::event::ExtensionValue;
        let attr = match value {
            ExtensionValue::String(s) => Attr::CeString(s.clone()),
            ExtensionValue::Boolean(b) => Attr::CeBoolean(*b),
            ExtensionValue::Integer(i) => match i32::try_from(*i) {
                Ok(small) => Attr::CeInteger(small),
                Err(_) => Attr::CeString(i.to_string()),
            },
        };
        attributes.insert(
            name.to_owned(),
            CloudEventAttributeValue { attr: Some(attr) },
        );
    }
    let data = event.data().map(|data| match data {
        Data::Binary(bytes) => ProtoData::BinaryData(bytes.clone()),
        Data::String(text) => ProtoData::TextData(text.clone()),
        Data::Json(value) => ProtoData::TextData(value.to_string()),
    });
    CloudEvent {
        id: event.id().to_owned(),
        source: event.source().to_string(),
        spec_version: "1.0".to_owned(),
        r#type: event.ty().to_owned(),
        attributes,
        data,
    }
}

fn invalid(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::InvalidEvent, message)
}

fn attr_text(value: &CloudEventAttributeValue) -> Option<String> {
    Some(match value.attr.as_ref()? {
        Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s) => s.clone(),
        Attr::CeBoolean(b) => b.to_string(),
        Attr::CeInteger(i) => i.to_string(),
        Attr::CeBytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Attr::CeTimestamp(t) => {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))?
                .to_rfc3339()
        }
    })
}

/// An event from the protobuf format; JSON content types get JSON data.
pub fn from_proto(event: CloudEvent) -> Result<Event, ProtocolError> {
    if event.id.is_empty() || event.source.is_empty() || event.r#type.is_empty() {
        return Err(invalid(
            "an event from the plugin lacks id, source or type".into(),
        ));
    }
    let mut builder = EventBuilderV10::new()
        .id(event.id)
        .source(event.source)
        .ty(event.r#type);
    let mut content_type = None;
    let mut schema = None;
    for (name, value) in &event.attributes {
        match name.as_str() {
            "datacontenttype" => content_type = attr_text(value),
            "dataschema" => schema = attr_text(value),
            "subject" => {
                if let Some(subject) = attr_text(value) {
                    builder = builder.subject(subject);
                }
            }
            "time" => {
                if let Some(Attr::CeTimestamp(t)) = &value.attr {
                    if let Some(time) = chrono::DateTime::from_timestamp(
                        t.seconds,
                        u32::try_from(t.nanos).unwrap_or(0),
                    ) {
                        builder = builder.time(time);
                    }
                } else if let Some(text) = attr_text(value) {
                    builder = builder.time(text);
                }
            }
            _ => {
                use mycelium_core::cloudevents::event::ExtensionValue;
                let extension = match &value.attr {
                    Some(Attr::CeBoolean(b)) => ExtensionValue::Boolean(*b),
                    Some(Attr::CeInteger(i)) => ExtensionValue::Integer(i64::from(*i)),
                    _ => ExtensionValue::String(attr_text(value).unwrap_or_default()),
                };
                builder = builder.extension(name, extension);
            }
        }
    }
    if let Some(data) = event.data {
        let is_json = content_type.as_deref().is_none_or(|ct| {
            ct.starts_with("application/json")
                || ct.starts_with("text/json")
                || ct.contains("+json")
        });
        let data = match data {
            ProtoData::TextData(text) if is_json => serde_json::from_str(&text)
                .map(Data::Json)
                .unwrap_or(Data::String(text)),
            ProtoData::TextData(text) => Data::String(text),
            ProtoData::BinaryData(bytes) if is_json && content_type.is_some() => {
                serde_json::from_slice(&bytes)
                    .map(Data::Json)
                    .unwrap_or(Data::Binary(bytes))
            }
            ProtoData::BinaryData(bytes) => Data::Binary(bytes),
            ProtoData::ProtoData(any) => Data::Binary(any.value),
        };
        let content_type = content_type.unwrap_or_else(|| match data {
            Data::Json(_) => "application/json".into(),
            Data::String(_) => "text/plain".into(),
            Data::Binary(_) => "application/octet-stream".into(),
        });
        builder = match schema {
            Some(schema) => builder.data_with_schema(content_type, schema, data),
            None => builder.data(content_type, data),
        };
    }
    builder.build().map_err(|e| {
        invalid(format!(
            "an event from the plugin is not a valid CloudEvent: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use mycelium_core::cloudevents::{EventBuilder, EventBuilderV10};
    use serde_json::json;

    use super::*;

    fn round_trip(event: Event) {
        let back = from_proto(to_proto(&event)).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn events_survive_the_round_trip() {
        round_trip(
            EventBuilderV10::new()
                .id("1")
                .source("/s")
                .ty("t")
                .subject("sub")
                .time("2026-01-02T03:04:05Z")
                .extension("traceparent", "00-abc")
                .extension("count", 7i64)
                .extension("flag", true)
                .data("application/json", json!({"a": [1, 2]}))
                .build()
                .unwrap(),
        );
        round_trip(
            EventBuilderV10::new()
                .id("2")
                .source("s")
                .ty("t")
                .data("text/plain", "hello")
                .build()
                .unwrap(),
        );
        round_trip(
            EventBuilderV10::new()
                .id("3")
                .source("s")
                .ty("t")
                .data("application/octet-stream", vec![0u8, 255])
                .build()
                .unwrap(),
        );
        round_trip(
            EventBuilderV10::new()
                .id("4")
                .source("s")
                .ty("t")
                .build()
                .unwrap(),
        );
        round_trip(
            EventBuilderV10::new()
                .id("5")
                .source("s")
                .ty("t")
                .data_with_schema("application/json", "https://example.com/schema", json!(1))
                .build()
                .unwrap(),
        );
    }

    #[test]
    fn proto_json_layout() {
        let event = EventBuilderV10::new()
            .id("1")
            .source("s")
            .ty("t")
            .data("application/json", json!({"k": "v"}))
            .build()
            .unwrap();
        let proto = to_proto(&event);
        assert_eq!(proto.spec_version, "1.0");
        assert_eq!(proto.data, Some(ProtoData::TextData(r#"{"k":"v"}"#.into())));
        assert!(from_proto(CloudEvent {
            id: String::new(),
            ..proto
        })
        .is_err());
    }
}
