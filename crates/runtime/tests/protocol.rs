//! The invocation protocol against a real nats-server: the documented JSON (docs/protocol.md), the
//! CloudEvents binding, discovery, and every error code from a real bad request.

use std::{sync::Arc, time::Duration};

use async_nats::HeaderMap;
use mycelium_core::{
    from_fn, ErrorCode, FunctionKind, FunctionMetadata, FunctionName, InMemoryMetrics, Outcome,
};
use mycelium_registry::MemoryRegistry;
use mycelium_runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use mycelium_test_support::{
    functions::{Fails, Gate, GateControl, Panics, Sleeps},
    NatsServer,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

struct Fixture {
    _server: NatsServer,
    nats: async_nats::Client,
    runtime: Option<RuntimeHandle>,
    metrics: Arc<InMemoryMetrics>,
    gate: GateControl,
    cancelled: mpsc::UnboundedReceiver<String>,
}

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

async fn fixture(config: RuntimeConfig) -> Fixture {
    let server = NatsServer::start();
    let metrics = Arc::new(InMemoryMetrics::new());
    let registry = Arc::new(MemoryRegistry::new());
    let mut plugin = FunctionMetadata::builtin(name("resize"), "a deployed plugin");
    plugin.kind = FunctionKind::Plugin;
    registry.insert(plugin);
    let (gate, gate_control) = Gate::new();
    let (sleeps, cancelled) = Sleeps::new();
    let runtime = Runtime::builder()
        .config(config)
        .registry(registry)
        .metrics(metrics.clone())
        .standard_builtins()
        .builtin(name("panics"), "panics", Panics)
        .builtin(name("fails"), "fails", Fails)
        .builtin(name("sleeps"), "sleeps", sleeps)
        .builtin(name("gate"), "waits for the test", gate)
        .builtin(
            name("whoami"),
            "replies with its invocation id",
            from_fn(|mut event, ctx| async move {
                event.set_data("text/plain", ctx.invocation_id().to_owned());
                Ok(vec![event])
            }),
        )
        .builtin(
            name("big"),
            "replies with more than the server's max_payload",
            from_fn(|event, _ctx| async move {
                let mut big = event;
                big.set_data("text/plain", "x".repeat(2 * 1024 * 1024));
                Ok(vec![big])
            }),
        )
        .serve(&server.url())
        .await
        .unwrap();
    Fixture {
        nats: server.connect().await,
        _server: server,
        runtime: Some(runtime),
        metrics,
        gate: gate_control,
        cancelled,
    }
}

/// Sends a raw request and returns the reply's headers and JSON body.
async fn raw(
    nats: &async_nats::Client,
    subject: &str,
    body: impl Into<bytes::Bytes>,
) -> (Option<HeaderMap>, Value) {
    let reply = nats.request(subject.to_owned(), body.into()).await.unwrap();
    let body = serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", reply.payload));
    (reply.headers, body)
}

async fn raw_json(
    nats: &async_nats::Client,
    subject: &str,
    body: Value,
) -> (Option<HeaderMap>, Value) {
    raw(nats, subject, serde_json::to_vec(&body).unwrap()).await
}

/// Asserts that a reply is the error envelope with `code`, the matching service headers,
/// and a message containing `needle`.
fn assert_error(reply: &(Option<HeaderMap>, Value), code: ErrorCode, needle: &str) {
    let (headers, body) = reply;
    assert_eq!(body["error"]["code"], code.as_str(), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "message {message:?} lacks {needle:?}"
    );
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let headers = headers.as_ref().expect("error replies carry headers");
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        code.status().to_string()
    );
    assert!(headers
        .get("Nats-Service-Error")
        .unwrap()
        .as_str()
        .starts_with(code.as_str()));
}

const SEED_REQUEST: &str = r#"{
    "functionName": "example",
    "event": {
        "id": "123",
        "source": "test",
        "type": "com.example.test",
        "datacontenttype": "application/json",
        "data": {"key": "value"}
    }
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_request_gets_the_seed_reply() {
    let f = fixture(RuntimeConfig::default()).await;
    let (headers, body) = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    assert!(headers.is_none_or(|h| h.get("Nats-Service-Error").is_none()));
    assert_eq!(
        body,
        json!({"events": [{
            "specversion": "1.0",
            "id": "response-123",
            "source": "example-function",
            "type": "com.example.response",
            "datacontenttype": "application/json",
            "data": {"message": "Processed event 123 by function example"}
        }]})
    );
    assert_eq!(f.metrics.count("example", Outcome::Success), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_the_event_with_its_extensions() {
    let f = fixture(RuntimeConfig::default()).await;
    let event = json!({
        "specversion": "1.0", "id": "e-1", "source": "/a/b", "type": "t.x",
        "subject": "s", "time": "2026-01-02T03:04:05Z", "traceparent": "00-1-2-01",
        "datacontenttype": "text/plain", "data": "hello"
    });
    let (_, body) = raw_json(
        &f.nats,
        "function.invoke",
        json!({"functionName": "echo", "event": event}),
    )
    .await;
    assert_eq!(body, json!({"events": [event]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_structured_mode() {
    let f = fixture(RuntimeConfig::default()).await;
    let mut headers = HeaderMap::new();
    headers.insert(
        "Content-Type",
        "application/cloudevents+json; charset=utf-8",
    );
    let event = json!({"id": "s-1", "source": "binding", "type": "t", "data": {"n": 1}});
    let reply = f
        .nats
        .request_with_headers(
            "function.invoke.echo",
            headers,
            serde_json::to_vec(&event).unwrap().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.headers.unwrap().get("Content-Type").unwrap().as_str(),
        "application/cloudevents-batch+json"
    );
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        body,
        json!([{"specversion": "1.0", "id": "s-1", "source": "binding", "type": "t", "data": {"n": 1}}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_binary_mode() {
    let f = fixture(RuntimeConfig::default()).await;
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "b-7"),
        ("ce-source", "/sensors/7"),
        ("ce-type", "com.example.reading"),
        ("ce-partitionkey", "p1"),
        ("Content-Type", "application/json"),
    ] {
        headers.insert(k, v);
    }
    let reply = f
        .nats
        .request_with_headers(
            "function.invoke.example",
            headers,
            r#"{"celsius": 21}"#.into(),
        )
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body[0]["id"], "response-b-7");
    assert_eq!(
        body[0]["data"]["message"],
        "Processed event b-7 by function example"
    );

    // Echo shows that every binary-mode attribute arrived.
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-id", "b-8"),
        ("ce-source", "s"),
        ("ce-type", "t"),
        ("ce-partitionkey", "p1"),
        ("Content-Type", "text/plain"),
    ] {
        headers.insert(k, v);
    }
    let reply = f
        .nats
        .request_with_headers("function.invoke.echo", headers, "plain".into())
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        body,
        json!([{"specversion": "1.0", "id": "b-8", "source": "s", "type": "t", "partitionkey": "p1",
                "datacontenttype": "text/plain", "data": "plain"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_errors() {
    let f = fixture(RuntimeConfig::default()).await;
    let mut headers = HeaderMap::new();
    headers.insert("ce-id", "1");
    headers.insert("ce-source", "s");
    let reply = f
        .nats
        .request_with_headers("function.invoke.echo", headers, "".into())
        .await
        .unwrap();
    let parsed = (
        reply.headers.clone(),
        serde_json::from_slice(&reply.payload).unwrap(),
    );
    assert_error(&parsed, ErrorCode::InvalidEvent, "ce-type");

    let reply = f
        .nats
        .request("function.invoke.Echo", "{}".into())
        .await
        .unwrap();
    let parsed = (
        reply.headers.clone(),
        serde_json::from_slice(&reply.payload).unwrap(),
    );
    assert_error(&parsed, ErrorCode::InvalidFunctionName, "a-z");

    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    let reply = f
        .nats
        .request_with_headers(
            "function.invoke.nobody",
            headers,
            r#"{"id":"1","source":"s","type":"t"}"#.into(),
        )
        .await
        .unwrap();
    let parsed = (
        reply.headers.clone(),
        serde_json::from_slice(&reply.payload).unwrap(),
    );
    assert_error(&parsed, ErrorCode::FunctionNotFound, "nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_error_codes() {
    let f = fixture(RuntimeConfig::default()).await;
    let event = json!({"id": "1", "source": "s", "type": "t"});
    let cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
        (
            b"{not json".to_vec(),
            ErrorCode::InvalidRequest,
            "not valid JSON",
        ),
        (b"".to_vec(), ErrorCode::InvalidRequest, "not valid JSON"),
        (
            serde_json::to_vec(&json!({"functionName": ["echo"], "event": event})).unwrap(),
            ErrorCode::InvalidRequest,
            "functionName",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "echo"})).unwrap(),
            ErrorCode::InvalidRequest,
            "missing field `event`",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "echo", "event": event, "timeoutMs": "5"}))
                .unwrap(),
            ErrorCode::InvalidRequest,
            "wrong shape",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "echo", "event": {"id": "1", "type": "t"}}))
                .unwrap(),
            ErrorCode::InvalidEvent,
            "`source`",
        ),
        (
            serde_json::to_vec(
                &json!({"functionName": "echo", "event": {"id": 1, "source": "s", "type": "t"}}),
            )
            .unwrap(),
            ErrorCode::InvalidEvent,
            "`id` must be a string",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "ec.ho", "event": event})).unwrap(),
            ErrorCode::InvalidFunctionName,
            "a-z",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "x".repeat(65), "event": event})).unwrap(),
            ErrorCode::InvalidFunctionName,
            "longer than 64",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "nobody", "event": event})).unwrap(),
            ErrorCode::FunctionNotFound,
            "\"nobody\"",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "echo", "version": 7, "event": event}))
                .unwrap(),
            ErrorCode::VersionNotFound,
            "version 1",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "fails", "event": event})).unwrap(),
            ErrorCode::FunctionError,
            "deliberate test failure",
        ),
        (
            serde_json::to_vec(&json!({"functionName": "resize", "event": event})).unwrap(),
            ErrorCode::Unavailable,
            "plugin",
        ),
    ];
    for (body, code, needle) in cases {
        let reply = raw(&f.nats, "function.invoke", body).await;
        assert_error(&reply, code, needle);
    }
    assert_eq!(f.metrics.rejected(ErrorCode::InvalidRequest), 5);
    // A reply the server would refuse becomes an error reply instead of silence.
    let request = json!({"functionName": "big", "event": event});
    let reply = raw_json(&f.nats, "function.invoke", request).await;
    assert_error(
        &reply,
        ErrorCode::PayloadTooLarge,
        "the function's reply is",
    );
    assert_eq!(
        f.metrics
            .count("fails", Outcome::Failure(ErrorCode::FunctionError)),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests_are_refused() {
    let f = fixture(RuntimeConfig {
        max_payload: 2048,
        ..RuntimeConfig::default()
    })
    .await;
    let request = json!({"functionName": "echo", "event": {"id": "1", "source": "s", "type": "t", "data": "x".repeat(4096)}});
    let reply = raw_json(&f.nats, "function.invoke", request).await;
    assert_error(&reply, ErrorCode::PayloadTooLarge, "limit of 2048 bytes");
    let reply = raw(&f.nats, "function.invoke.echo", vec![b'x'; 4096]).await;
    assert_error(&reply, ErrorCode::PayloadTooLarge, "2048");
    // Just under the limit still works.
    let request = json!({"functionName": "echo", "event": {"id": "1", "source": "s", "type": "t", "data": "x".repeat(1900)}});
    let (_, body) = raw_json(&f.nats, "function.invoke", request).await;
    assert_eq!(body["events"][0]["id"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_and_cancel_the_function() {
    let mut f = fixture(RuntimeConfig::default()).await;
    let request = json!({"functionName": "sleeps", "timeoutMs": 50,
                         "event": {"id": "1", "source": "s", "type": "t", "data": {"ms": 600_000}}});
    let reply = raw_json(&f.nats, "function.invoke", request).await;
    assert_error(&reply, ErrorCode::Timeout, "within 50 ms");
    // The function observed the cancellation signal.
    let cancelled = f.cancelled.recv().await.unwrap();
    assert!(!cancelled.is_empty());
    assert_eq!(
        f.metrics
            .count("sleeps", Outcome::Failure(ErrorCode::Timeout)),
        1
    );

    // A function's own timeout caps what the request asks for.
    let f = fixture(RuntimeConfig {
        default_timeout: Duration::from_millis(50),
        ..RuntimeConfig::default()
    })
    .await;
    let request = json!({"functionName": "sleeps", "timeoutMs": 600_000,
                         "event": {"id": "1", "source": "s", "type": "t", "data": {"ms": 600_000}}});
    let reply = raw_json(&f.nats, "function.invoke", request).await;
    assert_error(&reply, ErrorCode::Timeout, "within 50 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_function_does_not_take_the_runtime_down() {
    let f = fixture(RuntimeConfig::default()).await;
    let request =
        json!({"functionName": "panics", "event": {"id": "1", "source": "s", "type": "t"}});
    for _ in 0..3 {
        let reply = raw_json(&f.nats, "function.invoke", request.clone()).await;
        assert_error(
            &reply,
            ErrorCode::FunctionError,
            "panicked: deliberate test panic",
        );
    }
    let (_, body) = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    assert_eq!(body["events"][0]["id"], "response-123");
    assert_eq!(
        f.metrics
            .count("panics", Outcome::Failure(ErrorCode::FunctionError)),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_in_flight_limit_is_overloaded() {
    let mut f = fixture(RuntimeConfig {
        max_in_flight: 2,
        ..RuntimeConfig::default()
    })
    .await;
    let gate_request = serde_json::to_vec(
        &json!({"functionName": "gate", "event": {"id": "g", "source": "s", "type": "t"}}),
    )
    .unwrap();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let nats = f.nats.clone();
            let body = gate_request.clone();
            tokio::spawn(async move { nats.request("function.invoke", body.into()).await.unwrap() })
        })
        .collect();
    f.gate.entered(2).await;
    assert_eq!(f.runtime.as_ref().unwrap().in_flight(), 2);

    let reply = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    assert_error(&reply, ErrorCode::Overloaded, "limit of 2 invocations");
    assert_eq!(f.metrics.rejected(ErrorCode::Overloaded), 1);
    // Discovery is not subject to the invocation limit.
    let (_, list) = raw(&f.nats, "function.list", "").await;
    assert!(list["functions"].is_array());

    f.gate.release(2);
    for reply in held {
        let reply = reply.await.unwrap();
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(body["events"][0]["id"], "g");
    }
    let (_, body) = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    assert_eq!(body["events"][0]["id"], "response-123");
}

/// One function's flood takes only its own share of the in-flight slots: with room for 32
/// invocations and 8 per function, 40 held calls to one function leave 24 slots for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_functions_flood_does_not_starve_the_others() {
    let mut f = fixture(RuntimeConfig {
        max_in_flight: 32,
        max_concurrency: 8,
        ..RuntimeConfig::default()
    })
    .await;
    let gate_request = serde_json::to_vec(
        &json!({"functionName": "gate", "event": {"id": "g", "source": "s", "type": "t"}}),
    )
    .unwrap();
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let nats = f.nats.clone();
            let body = gate_request.clone();
            tokio::spawn(async move { nats.request("function.invoke", body.into()).await.unwrap() })
        })
        .collect();
    f.gate.entered(8).await;
    // Every call beyond the function's 8 is refused at once (before any is released, so no
    // late call can take a slot the first ones free).
    let metrics = f.metrics.clone();
    mycelium_test_support::eventually(std::time::Duration::from_secs(30), || {
        let refused = metrics.count("gate", Outcome::Failure(ErrorCode::Overloaded));
        async move { (refused == 32).then_some(()) }
    })
    .await;
    // Other functions keep answering while the flood is held.
    let (_, body) = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    assert_eq!(body["events"][0]["id"], "response-123");
    f.gate.release(8);
    let (mut answered, mut overloaded) = (0, 0);
    for call in flood {
        let reply = call.await.unwrap();
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        if body["events"][0]["id"] == "g" {
            answered += 1;
        } else {
            assert_eq!(body["error"]["code"], "overloaded", "{body}");
            assert!(
                body["error"]["message"].as_str().unwrap().contains(
                    "limit of 8 concurrent invocations (the runtime's per-function limit"
                ),
                "{body}"
            );
            overloaded += 1;
        }
    }
    assert_eq!((answered, overloaded), (8, 32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_describe() {
    let f = fixture(RuntimeConfig::default()).await;
    let (_, body) = raw(&f.nats, "function.list", "").await;
    let names: Vec<&str> = body["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["big", "echo", "example", "fails", "gate", "panics", "resize", "sleeps", "whoami"]
    );
    assert_eq!(
        body["functions"][2],
        json!({"name": "example", "version": 1, "kind": "builtin",
               "description": "replies with one event, response-<id>, saying which function processed the event"})
    );
    assert_eq!(body["functions"][6]["kind"], "plugin");

    let (_, body) = raw_json(
        &f.nats,
        "function.describe",
        json!({"functionName": "echo"}),
    )
    .await;
    assert_eq!(
        body,
        json!({"name": "echo", "version": 1, "kind": "builtin", "description": "returns the input event unchanged"})
    );
    let reply = raw_json(
        &f.nats,
        "function.describe",
        json!({"functionName": "nobody"}),
    )
    .await;
    assert_error(&reply, ErrorCode::FunctionNotFound, "nobody");
    let reply = raw_json(
        &f.nats,
        "function.describe",
        json!({"functionName": "echo", "version": 2}),
    )
    .await;
    assert_error(&reply, ErrorCode::VersionNotFound, "no version 2");
    let reply = raw(&f.nats, "function.describe", "nope").await;
    assert_error(&reply, ErrorCode::InvalidRequest, "not valid JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_the_nats_services_api() {
    let f = fixture(RuntimeConfig::default()).await;
    let (_, info) = raw(&f.nats, "$SRV.INFO.mycelium", "").await;
    assert_eq!(info["type"], "io.nats.micro.v1.info_response");
    assert_eq!(info["name"], "mycelium");
    assert_eq!(info["version"], mycelium_runtime::VERSION);
    let mut subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "function.describe",
            "function.invoke",
            "function.invoke.*",
            "function.list"
        ]
    );
    assert!(info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["queue_group"] == "mycelium"));

    let (_, ping) = raw(&f.nats, "$SRV.PING", "").await;
    assert_eq!(ping["name"], "mycelium");

    let _ = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    let (_, stats) = raw(&f.nats, "$SRV.STATS.mycelium", "").await;
    let invoke = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "invoke")
        .unwrap();
    assert_eq!(invoke["num_requests"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_prefix_is_configurable() {
    let f = fixture(RuntimeConfig {
        subject_prefix: "acme.fn".into(),
        ..RuntimeConfig::default()
    })
    .await;
    let (_, body) = raw(&f.nats, "acme.fn.invoke", SEED_REQUEST).await;
    assert_eq!(body["events"][0]["id"], "response-123");
    let err = f
        .nats
        .request("function.invoke", SEED_REQUEST.into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_invocation_id_is_kept_and_a_bad_one_replaced() {
    let f = fixture(RuntimeConfig::default()).await;
    let body = serde_json::to_vec(&json!({"functionName": "whoami",
        "event": {"specversion": "1.0", "id": "1", "source": "s", "type": "t"}}))
    .unwrap();
    let ask = |id: &'static str| {
        let (nats, body) = (f.nats.clone(), body.clone());
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("Mycelium-Invocation-Id", id);
            let reply = nats
                .request_with_headers("function.invoke", headers, body.into())
                .await
                .unwrap();
            let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
            reply["events"][0]["data"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(ask("order-42:attempt").await, "order-42:attempt");
    // Not a usable id (a space, or too long): the runtime names the invocation itself.
    let replaced = ask("has space").await;
    assert_ne!(replaced, "has space");
    assert!(!replaced.is_empty());
    let long: &'static str = Box::leak("x".repeat(65).into_boxed_str());
    assert_ne!(ask(long).await, long);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrage_of_hostile_requests_gets_exact_codes_while_valid_traffic_flows() {
    let f = fixture(RuntimeConfig::default()).await;
    let valid = {
        let nats = f.nats.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..500 {
                let (headers, body) = raw_json(
                    &nats,
                    "function.invoke",
                    json!({"functionName": "echo", "event": {"specversion": "1.0", "id": format!("v{i}"), "source": "s", "type": "t"}}),
                )
                .await;
                if headers.is_none() && body["events"][0]["id"] == format!("v{i}") {
                    ok += 1;
                }
            }
            ok
        })
    };
    let event = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t"});
    let nested = format!(
        r#"{{"functionName": "echo", "event": {{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {}{}}}}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let hostile: Vec<(Vec<u8>, ErrorCode)> = vec![
        (b"\xff\xfe\x00\x01 binary garbage".to_vec(), ErrorCode::InvalidRequest),
        (vec![0u8; 4096], ErrorCode::InvalidRequest),
        (b"{\"functionName\": \"echo\", \"event\": {\"id\": \"\xff\xfe\"}}".to_vec(), ErrorCode::InvalidRequest),
        (nested.into_bytes(), ErrorCode::InvalidRequest),
        (serde_json::to_vec(&json!({"functionName": "x".repeat(900_000), "event": event})).unwrap(), ErrorCode::InvalidFunctionName),
        (serde_json::to_vec(&json!({"functionName": 5, "event": event})).unwrap(), ErrorCode::InvalidRequest),
        (serde_json::to_vec(&json!({"functionName": ["echo"], "event": event})).unwrap(), ErrorCode::InvalidRequest),
        (serde_json::to_vec(&json!({"functionName": "echo", "event": "not an event"})).unwrap(), ErrorCode::InvalidRequest),
        (serde_json::to_vec(&json!({"functionName": "echo", "event": {"specversion": "1.0", "source": "s", "type": "t"}})).unwrap(), ErrorCode::InvalidEvent),
        (serde_json::to_vec(&json!({"functionName": "echo", "event": {"specversion": "9.9", "id": "1", "source": "s", "type": "t"}})).unwrap(), ErrorCode::InvalidEvent),
        (serde_json::to_vec(&json!({"functionName": "echo", "event": event, "version": "one"})).unwrap(), ErrorCode::InvalidRequest),
        (serde_json::to_vec(&json!({"functionName": "echo", "event": event, "timeoutMs": -1})).unwrap(), ErrorCode::InvalidRequest),
        (serde_json::to_vec(&json!({"functionName": "echo", "event": event, "timeoutMs": 0})).unwrap(), ErrorCode::InvalidRequest),
    ];
    let injection = [
        "a.b",
        "a*",
        ">",
        "echo\r\nPUB evil 1",
        "../etc/passwd",
        "",
        "ECHO",
        "echo ",
    ];
    for (body, code) in hostile.into_iter().chain(injection.iter().map(|name| {
        (
            serde_json::to_vec(&json!({"functionName": name, "event": event})).unwrap(),
            ErrorCode::InvalidFunctionName,
        )
    })) {
        let preview = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        let reply = raw(&f.nats, "function.invoke", body).await;
        assert_eq!(
            reply.1["error"]["code"],
            code.as_str(),
            "{preview}: {}",
            reply.1
        );
        assert_error(&reply, code, "");
    }
    // The binding: bad names in the subject, garbage in binary-mode headers.
    let mut headers = HeaderMap::new();
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", "\u{7f}");
    let reply = f
        .nats
        .request_with_headers("function.invoke.echo", headers, "x".into())
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["error"]["code"], "invalid_event", "{body}");
    let reply = raw(&f.nats, "function.invoke.NOT-VALID", "x").await;
    assert_error(&reply, ErrorCode::InvalidFunctionName, "");

    assert_eq!(valid.await.unwrap(), 500, "valid traffic flowed throughout");
    let (headers, body) = raw(&f.nats, "function.invoke", SEED_REQUEST).await;
    assert!(headers.is_none(), "{body}");
}
