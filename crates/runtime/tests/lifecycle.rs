//! Runtime lifecycle against a real nats-server: instances sharing a queue group,
//! graceful shutdown, and reconnecting after the server restarts.

use std::{collections::HashSet, time::Duration};

use mycelium_client::{Client, RequestErrorKind};
use mycelium_core::{from_fn, ErrorCode, Event, FunctionName};
use mycelium_runtime::{Runtime, RuntimeConfig, ShutdownReport};
use mycelium_test_support::{event, eventually, functions::Gate, NatsServer};
use serde_json::json;

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_the_load_through_the_queue_group() {
    let server = NatsServer::start();
    let mut handles = Vec::new();
    for instance in ["a", "b"] {
        let whoami = from_fn(move |_event: Event, _ctx| async move {
            Ok(vec![event(instance, json!({"instance": instance}))])
        });
        let handle = Runtime::builder()
            .builtin(name("whoami"), "names the instance that answered", whoami)
            .serve(&server.url())
            .await
            .unwrap();
        handles.push(handle);
    }
    let client = Client::new(server.connect().await);
    let mut seen = HashSet::new();
    let mut requests = 0;
    // Each request reaches exactly one instance; both take part.
    while seen.len() < 2 {
        requests += 1;
        assert!(requests <= 500, "only {seen:?} answered in 500 requests");
        let events = client
            .invoke("whoami", event("q", json!({})))
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
        seen.insert(mycelium_core::cloudevents::AttributesReader::id(&events[0]).to_owned());
    }
    assert_eq!(seen, HashSet::from(["a".to_owned(), "b".to_owned()]));

    // One instance stops; the other takes everything without a lost request.
    let stopped = handles.remove(0).shutdown().await;
    assert_eq!(stopped, ShutdownReport { abandoned: 0 });
    for _ in 0..20 {
        let events = client
            .invoke("whoami", event("q", json!({})))
            .await
            .unwrap();
        assert_eq!(
            mycelium_core::cloudevents::AttributesReader::id(&events[0]),
            "b"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_work_and_stops_taking_requests() {
    let server = NatsServer::start();
    let (gate, mut control) = Gate::new();
    let handle = Runtime::builder()
        .standard_builtins()
        .builtin(name("gate"), "waits", gate)
        .serve(&server.url())
        .await
        .unwrap();
    let client = Client::new(server.connect().await);

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.invoke("gate", event("held", json!({}))).await }
    });
    control.entered(1).await;
    let shutdown = tokio::spawn(handle.shutdown());

    // Once drained, nobody answers new requests, while the held one is still running.
    // Probes use a short timeout: one sent in the instant of the UNSUB can be dropped
    // inside async-nats (see ARCHITECTURE.md, "Graceful shutdown"), which only makes
    // that probe inconclusive.
    let nats = server.connect().await;
    let probe = serde_json::to_vec(
        &json!({"functionName": "echo", "event": {"id": "late", "source": "s", "type": "t"}}),
    )
    .unwrap();
    eventually(Duration::from_secs(10), || {
        let request = async_nats::Request::new()
            .payload(probe.clone().into())
            .timeout(Some(Duration::from_millis(500)));
        let nats = nats.clone();
        async move {
            match nats.send_request("function.invoke", request).await {
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(!shutdown.is_finished());

    control.release(1);
    let events = in_flight.await.unwrap().unwrap();
    assert_eq!(
        mycelium_core::cloudevents::AttributesReader::id(&events[0]),
        "held"
    );
    assert_eq!(shutdown.await.unwrap(), ShutdownReport { abandoned: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_what_outlives_the_grace_period() {
    let server = NatsServer::start();
    let (gate, mut control) = Gate::new();
    let config = RuntimeConfig {
        shutdown_grace: Duration::from_millis(100),
        ..RuntimeConfig::default()
    };
    let handle = Runtime::builder()
        .config(config)
        .builtin(name("gate"), "waits", gate)
        .serve(&server.url())
        .await
        .unwrap();
    let client = Client::new(server.connect().await);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.invoke("gate", event("held", json!({}))).await }
    });
    control.entered(1).await;
    assert_eq!(handle.shutdown().await, ShutdownReport { abandoned: 1 });
    let err = in_flight.await.unwrap().unwrap_err();
    assert_eq!(
        err.kind(),
        RequestErrorKind::Remote(ErrorCode::Unavailable),
        "{err}"
    );
    assert!(err.to_string().contains("shut down"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_restarts() {
    let mut server = NatsServer::start();
    let handle = Runtime::builder()
        .standard_builtins()
        .serve(&server.url())
        .await
        .unwrap();
    let client = Client::new(server.connect().await);
    assert_eq!(
        client
            .invoke("echo", event("before", json!({})))
            .await
            .unwrap()
            .len(),
        1
    );

    server.kill();
    server.resume();

    // Both the runtime and the client reconnect on their own and resubscribe.
    let events = eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.invoke("echo", event("after", json!({}))).await.ok() }
    })
    .await;
    assert_eq!(
        mycelium_core::cloudevents::AttributesReader::id(&events[0]),
        "after"
    );
    assert_eq!(handle.shutdown().await.abandoned, 0);
}
