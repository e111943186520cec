//! The invocation envelope on the hot path: decode a request, encode a reply.

use criterion::{criterion_group, criterion_main, Criterion};
use mycelium_core::envelope;

const EXAMPLE_REQUEST: &[u8] = br#"{"functionName":"example","event":{"id":"123","source":"test","type":"com.example.test","datacontenttype":"application/json","data":{"key":"value"}}}"#;

fn envelope_benches(c: &mut Criterion) {
    c.bench_function("decode_invoke_request (protocol.md example)", |b| {
        b.iter(|| envelope::decode_invoke_request(std::hint::black_box(EXAMPLE_REQUEST)).unwrap())
    });
    let event = envelope::decode_invoke_request(EXAMPLE_REQUEST)
        .unwrap()
        .event;
    let events = vec![event];
    c.bench_function("encode_events (one event)", |b| {
        b.iter(|| envelope::encode_events(std::hint::black_box(&events)))
    });
    c.bench_function("encode_error", |b| {
        let error = mycelium_core::ProtocolError::new(
            mycelium_core::ErrorCode::FunctionNotFound,
            "no function named \"x\"",
        );
        b.iter(|| envelope::encode_error(std::hint::black_box(&error)))
    });
}

criterion_group!(benches, envelope_benches);
criterion_main!(benches);
