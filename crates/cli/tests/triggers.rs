//! Event triggers through real `mycelium` processes: the `trigger` commands, and a stream
//! trigger that loses no message while a runtime is SIGKILLed and picks up where its consumer
//! was when a runtime starts later.

mod common;

use std::{collections::HashMap, time::Duration};

use futures_util::StreamExt;
use mycelium_client::async_nats::jetstream;
use mycelium_core::{cloudevents::AttributesReader, Event};
use mycelium_test_support::{eventually, kill_now, ChildGuard, NatsServer};
use serde_json::Value;

use common::{run_at as run, serve_at, succeeded as ok};

/// A runtime whose killed instances' messages come back within seconds.
fn serve(url: &str) -> ChildGuard {
    serve_at(url, &["--async-ack-wait", "2s"])
}

fn payload(event: &Event) -> String {
    match event.data() {
        Some(mycelium_core::cloudevents::Data::String(text)) => text.clone(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_trigger_loses_nothing_when_a_runtime_is_killed() {
    const TOTAL: usize = 2_000;
    let server = NatsServer::start();
    let url = server.url();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let first = serve(&url);
    let _second = serve(&url);
    // The runtimes answer `echo` before the trigger is added (add checks the function).
    eventually(Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            run(&url, &["describe", "echo"])
                .status
                .success()
                .then_some(())
        }
    })
    .await;

    // Bad input is refused with a code; the good trigger is listed and described.
    let missing = run(
        &url,
        &[
            "trigger",
            "add",
            "t",
            "--function",
            "echo",
            "--stream",
            "NOPE",
        ],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("error[invalid_trigger]"));
    let two_sources = run(
        &url,
        &[
            "trigger",
            "add",
            "t",
            "--function",
            "echo",
            "--subject",
            "a",
            "--stream",
            "ORDERS",
        ],
    );
    assert_eq!(two_sources.status.code(), Some(2), "exactly one source");
    let added = ok(&run(
        &url,
        &[
            "trigger",
            "add",
            "orders",
            "--function",
            "echo",
            "--stream",
            "ORDERS",
            "--filter",
            "orders.new",
            "--then",
            "orders-done.x",
        ],
    ));
    assert!(
        added.contains("stream ORDERS (orders.new, new) -> echo"),
        "{added}"
    );
    let listed = ok(&run(&url, &["trigger", "list"]));
    assert!(
        listed.contains("orders") && listed.contains("active"),
        "{listed}"
    );
    let described: Value =
        serde_json::from_str(&ok(&run(&url, &["trigger", "describe", "orders"]))).unwrap();
    assert_eq!(described["source"]["stream"]["filter"], "orders.new");
    let nothing = run(&url, &["trigger", "describe", "nosuch"]);
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("error[trigger_not_found]"));

    let mut results = nats.subscribe("orders-done.x").await.unwrap();
    nats.flush().await.unwrap();
    // The consumer exists once a runtime started the trigger.
    let stream = js.get_stream("ORDERS").await.unwrap();
    eventually(Duration::from_secs(30), || {
        let stream = stream.clone();
        async move { stream.consumer_info("trigger-orders").await.ok().map(drop) }
    })
    .await;

    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for n in 0..TOTAL {
                js.publish("orders.new", format!("order-{n}").into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut first = Some(first);
    let mut third = None;
    while seen.len() < TOTAL {
        let message = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .unwrap_or_else(|_| panic!("stalled at {} of {TOTAL}", seen.len()))
            .unwrap();
        let event: Event = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(event.ty(), "io.mycelium.stream.message");
        *seen.entry(payload(&event)).or_default() += 1;
        if seen.len() == TOTAL / 4 {
            if let Some(runtime) = first.take() {
                kill_now(runtime.0.id());
                third = Some(serve(&url));
            }
        }
    }
    publisher.await.unwrap();
    assert!(third.is_some());
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("{TOTAL} messages processed, {duplicates} twice (redelivered after the kill)");
    assert!((0..TOTAL).all(|n| seen.contains_key(&format!("order-{n}"))));

    // A runtime started now continues from the consumer: the next message is the only new
    // result, nothing from the start of the stream.
    let _fourth = serve(&url);
    let consumer = stream.consumer_info("trigger-orders").await.unwrap();
    assert_eq!(consumer.delivered.stream_sequence, TOTAL as u64);
    js.publish("orders.new", "after".into())
        .await
        .unwrap()
        .await
        .unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .expect("the next message runs")
            .unwrap();
        let event: Event = serde_json::from_slice(&message.payload).unwrap();
        let text = payload(&event);
        if text == "after" {
            break;
        }
        // Only redeliveries of the killed runtime's last messages may still trail in.
        assert!(seen.contains_key(&text), "{text} was not published before");
    }

    let stats: Value = serde_json::from_str(&ok(&run(&url, &["stats", "--json"]))).unwrap();
    let row = &stats["triggers"][0];
    assert_eq!(row["trigger"], "orders", "{stats}");
    assert!(
        row["invocations"].as_u64().unwrap() > 0 && row["failures"] == 0,
        "{stats}"
    );
    let table = ok(&run(&url, &["stats"]));
    assert!(
        table.contains("TRIGGER") && table.contains("orders"),
        "{table}"
    );

    // Paused and deleted.
    ok(&run(&url, &["trigger", "pause", "orders"]));
    assert!(ok(&run(&url, &["trigger", "list"])).contains("paused"));
    ok(&run(&url, &["trigger", "delete", "orders"]));
    assert!(ok(&run(&url, &["trigger", "list"])).contains("No triggers."));
    eventually(Duration::from_secs(10), || {
        let stream = stream.clone();
        async move {
            stream
                .consumer_info("trigger-orders")
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
}
