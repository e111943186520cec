//! CloudEvent conversion to and from the protobuf format (every plugin call does both).

use criterion::{criterion_group, criterion_main, Criterion};
use mycelium_core::cloudevents::{EventBuilder, EventBuilderV10};
use mycelium_plugin_protocol::convert;
use prost::Message;

fn convert_benches(c: &mut Criterion) {
    let event = EventBuilderV10::new()
        .id("123")
        .source("test")
        .ty("com.example.test")
        .extension(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .data(
            "application/json",
            serde_json::json!({"key": "value", "n": [1, 2, 3]}),
        )
        .build()
        .unwrap();
    c.bench_function("to_proto + encode", |b| {
        b.iter(|| convert::to_proto(std::hint::black_box(&event)).encode_to_vec())
    });
    let bytes = convert::to_proto(&event).encode_to_vec();
    c.bench_function("decode + from_proto", |b| {
        b.iter(|| {
            let proto = mycelium_plugin_protocol::proto::cloudevents::CloudEvent::decode(
                std::hint::black_box(bytes.as_slice()),
            )
            .unwrap();
            convert::from_proto(proto).unwrap()
        })
    });
}

criterion_group!(benches, convert_benches);
criterion_main!(benches);
