//! The hot path's CloudEvent parser: one pass over the text, attributes borrowed; anything
//! unusual is left to the SDK's parser in the parent module, which also explains problems.

use cloudevents::{event::Data, Event, EventBuilder, EventBuilderV10};
use serde_json::Value;

/// Parses a complete CloudEvents 1.0 JSON event straight from text, for the hot path: one
/// pass, attributes borrowed, no intermediate `Value` tree for the envelope (the SDK's own
/// deserializer builds the tree three times). `None` for anything unusual (`specversion`
/// other than 1.0 or missing, `data_base64`, wrong types, empty required attributes): the
/// caller then takes the SDK path, which also explains the problem.
pub fn fast_event_from_json(text: &str) -> Option<Event> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use std::borrow::Cow;

    struct Fields<'a> {
        id: Option<Cow<'a, str>>,
        source: Option<Cow<'a, str>>,
        ty: Option<Cow<'a, str>>,
        specversion_ok: bool,
        datacontenttype: Option<Cow<'a, str>>,
        dataschema: Option<Cow<'a, str>>,
        subject: Option<Cow<'a, str>>,
        time: Option<Cow<'a, str>>,
        data: Option<&'a serde_json::value::RawValue>,
        extensions: Vec<(String, cloudevents::event::ExtensionValue)>,
        unusual: bool,
    }

    struct FieldsVisitor;

    impl<'de> Visitor<'de> for FieldsVisitor {
        type Value = Fields<'de>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a CloudEvent object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            use cloudevents::event::ExtensionValue;
            let mut fields = Fields {
                id: None,
                source: None,
                ty: None,
                specversion_ok: false,
                datacontenttype: None,
                dataschema: None,
                subject: None,
                time: None,
                data: None,
                extensions: Vec::new(),
                unusual: false,
            };
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                match key.as_ref() {
                    "id" => fields.id = Some(map.next_value()?),
                    "source" => fields.source = Some(map.next_value()?),
                    "type" => fields.ty = Some(map.next_value()?),
                    "specversion" => {
                        fields.specversion_ok = map.next_value::<Cow<'de, str>>()? == "1.0"
                    }
                    "datacontenttype" => fields.datacontenttype = map.next_value()?,
                    "dataschema" => fields.dataschema = map.next_value()?,
                    "subject" => fields.subject = map.next_value()?,
                    "time" => fields.time = map.next_value()?,
                    "data" => fields.data = Some(map.next_value()?),
                    "data_base64" => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        fields.unusual = true;
                    }
                    _ => match map.next_value::<Value>()? {
                        Value::String(s) => fields
                            .extensions
                            .push((key.into_owned(), ExtensionValue::String(s))),
                        Value::Bool(b) => fields
                            .extensions
                            .push((key.into_owned(), ExtensionValue::Boolean(b))),
                        Value::Number(n) if n.is_i64() => fields.extensions.push((
                            key.into_owned(),
                            ExtensionValue::Integer(n.as_i64().unwrap_or_default()),
                        )),
                        Value::Null => {}
                        _ => fields.unusual = true,
                    },
                }
            }
            Ok(fields)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(text);
    let fields = deserializer.deserialize_map(FieldsVisitor).ok()?;
    deserializer.end().ok()?;
    let (Some(id), Some(source), Some(ty)) = (fields.id, fields.source, fields.ty) else {
        return None;
    };
    if fields.unusual
        || !fields.specversion_ok
        || id.is_empty()
        || source.is_empty()
        || ty.is_empty()
    {
        return None;
    }
    let mut builder = EventBuilderV10::new().id(id).source(source).ty(ty);
    if let Some(subject) = fields.subject {
        builder = builder.subject(subject);
    }
    if let Some(time) = fields.time {
        builder = builder.time(time.as_ref());
    }
    for (name, value) in fields.extensions {
        builder = builder.extension(&name, value);
    }
    if let Some(raw) = fields.data {
        let content_type = fields
            .datacontenttype
            .as_deref()
            .unwrap_or("application/json");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let is_json = essence.starts_with("application/json")
            || essence.starts_with("text/json")
            || essence.ends_with("+json");
        let data = if is_json {
            Data::Json(serde_json::from_str(raw.get()).ok()?)
        } else {
            match serde_json::from_str::<Value>(raw.get()).ok()? {
                Value::String(text) => Data::String(text),
                other => Data::Json(other),
            }
        };
        builder = match (&fields.datacontenttype, fields.dataschema) {
            (_, Some(schema)) => builder.data_with_schema(content_type, schema.as_ref(), data),
            (Some(ct), None) => builder.data(ct.as_ref(), data),
            (None, None) => {
                // No datacontenttype: keep it absent, as the SDK's parser does.
                let mut event = builder.build().ok()?;
                event.set_data_unchecked(data);
                return Some(event);
            }
        };
    } else if fields.datacontenttype.is_some() || fields.dataschema.is_some() {
        // Attributes without data: the SDK path keeps them exactly.
        return None;
    }
    builder.build().ok()
}

#[cfg(test)]
mod fast_tests {
    use serde_json::json;

    use super::*;

    /// The fast parser must agree with the SDK's parser on everything it accepts.
    #[test]
    fn agrees_with_the_sdk_parser() {
        let cases = [
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t"}),
            json!({"specversion": "1.0", "id": "1", "source": "/a/b", "type": "t", "datacontenttype": "application/json", "data": {"k": [1, 2]}}),
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "datacontenttype": "text/plain", "data": "hello"}),
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {"no": "content type"}}),
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "sub", "time": "2026-01-02T03:04:05Z",
                   "traceparent": "00-1-2-01", "count": 7, "flag": true}),
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "datacontenttype": "application/cloudevents+json",
                   "dataschema": "https://example.com/s", "data": 5}),
        ];
        for case in cases {
            let text = case.to_string();
            let fast =
                fast_event_from_json(&text).unwrap_or_else(|| panic!("fast path refused {text}"));
            let sdk: Event = serde_json::from_str(&text).unwrap();
            assert_eq!(fast, sdk, "{text}");
        }
    }

    #[test]
    fn leaves_the_unusual_to_the_sdk_path() {
        for case in [
            json!({"id": "1", "source": "s", "type": "t"}),
            json!({"specversion": "0.3", "id": "1", "source": "s", "type": "t"}),
            json!({"specversion": "1.0", "id": "", "source": "s", "type": "t"}),
            json!({"specversion": "1.0", "id": 1, "source": "s", "type": "t"}),
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data_base64": "AAE="}),
            json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "nested": {"a": 1}}),
        ] {
            assert!(fast_event_from_json(&case.to_string()).is_none(), "{case}");
        }
    }
}
