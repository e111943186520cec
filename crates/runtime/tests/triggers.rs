//! Event triggers against a real nats-server, with runtimes on the JetStream registry: a
//! subject trigger over two runtimes, KV changes in order (a failed one holding the next back),
//! a schedule over three runtimes, a chain of three functions, and deletion reaching every
//! runtime.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use mycelium_client::{Client, Trigger, TriggerSource};
use mycelium_core::{
    cloudevents::{event::ExtensionValue, AttributesReader},
    from_fn, Event, FunctionName,
};
use mycelium_registry::{NatsRegistry, NatsRegistryConfig};
use mycelium_runtime::{Runtime, RuntimeHandle};
use mycelium_test_support::{event, eventually, NatsServer};
use serde_json::json;

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

/// Events each runtime's `record` function saw, by the runtime's index.
type Seen = Arc<Mutex<Vec<(usize, Event)>>>;

async fn runtimes(server: &NatsServer, count: usize) -> (Vec<RuntimeHandle>, Seen) {
    let seen: Seen = Arc::default();
    let mut handles = Vec::new();
    for index in 0..count {
        let nats = server.connect().await;
        let seen = seen.clone();
        let runtime = on_jetstream_registry(&nats)
            .await
            .standard_builtins()
            .builtin(
                name("record"),
                "records what it sees",
                from_fn(move |event: Event, _ctx| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push((index, event.clone()));
                        Ok(vec![event])
                    }
                }),
            )
            .build(nats)
            .unwrap()
            .start()
            .await
            .unwrap();
        handles.push(runtime);
    }
    (handles, seen)
}

/// A runtime builder on the JetStream registry of `nats` (triggers live there).
async fn on_jetstream_registry(nats: &async_nats::Client) -> mycelium_runtime::RuntimeBuilder {
    let registry = NatsRegistry::open(nats.clone(), NatsRegistryConfig::default())
        .await
        .unwrap();
    Runtime::builder().registry(Arc::new(registry))
}

fn trigger(trigger: &str, function: &str, source: TriggerSource, then: Option<&str>) -> Trigger {
    Trigger {
        name: name(trigger),
        function: name(function),
        source,
        then: then.map(str::to_owned),
        paused: false,
        created_at: None,
    }
}

fn subject(subject: &str) -> TriggerSource {
    TriggerSource::Subject {
        subject: subject.into(),
    }
}

async fn next_event(subscriber: &mut async_nats::Subscriber) -> (async_nats::Message, Event) {
    let message = tokio::time::timeout(Duration::from_secs(30), subscriber.next())
        .await
        .expect("a message arrives")
        .expect("the subscription is open");
    let event: Event = serde_json::from_slice(&message.payload).unwrap();
    (message, event)
}

/// Publishes probes on `subject` until one comes out on `then`: the trigger is running on
/// at least one runtime.
async fn wait_until_running(
    nats: &async_nats::Client,
    subject: &str,
    then: &mut async_nats::Subscriber,
) {
    for n in 0.. {
        nats.publish(subject.to_owned(), format!("probe-{n}").into())
            .await
            .unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), then.next()).await {
            return;
        }
        assert!(n < 150, "the trigger never ran");
    }
}

/// Waits until a runtime has made the trigger's durable `consumer` on `stream`.
async fn consumer_made(js: &async_nats::jetstream::Context, stream: &str, consumer: &str) {
    let stream = js.get_stream(stream).await.unwrap();
    eventually(Duration::from_secs(10), || {
        let stream = stream.clone();
        async move { stream.consumer_info(consumer).await.ok().map(drop) }
    })
    .await;
}

/// Waits until the durable `consumer` on `stream` is gone.
async fn consumer_gone(js: &async_nats::jetstream::Context, stream: &str, consumer: &str) {
    let stream = js.get_stream(stream).await.unwrap();
    eventually(Duration::from_secs(10), || {
        let stream = stream.clone();
        async move { stream.consumer_info(consumer).await.is_err().then_some(()) }
    })
    .await;
}

/// Makes the stream `name` over `subjects` and adds `trigger_name`, running `function` on
/// every message it holds (no `--then`).
async fn stream_trigger(
    client: &Client,
    js: &async_nats::jetstream::Context,
    (name, subjects): (&str, &str),
    trigger_name: &str,
    function: &str,
) {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    client
        .add_trigger(trigger(
            trigger_name,
            function,
            TriggerSource::Stream {
                stream: name.into(),
                filter: None,
                deliver: mycelium_client::Deliver::All,
            },
            None,
        ))
        .await
        .unwrap();
}

fn text(event: &Event) -> String {
    match event.data() {
        Some(mycelium_core::cloudevents::Data::String(text)) => text.clone(),
        Some(mycelium_core::cloudevents::Data::Json(value)) => value.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_trigger_runs_each_message_once_across_runtimes() {
    let server = NatsServer::start();
    let (_runtimes, seen) = runtimes(&server, 2).await;
    let nats = server.connect().await;
    let client = Client::new(nats.clone());
    let mut results = nats.subscribe("orders.done").await.unwrap();
    nats.flush().await.unwrap();
    client
        .add_trigger(trigger(
            "orders",
            "record",
            subject("orders.new"),
            Some("orders.done"),
        ))
        .await
        .unwrap();
    wait_until_running(&nats, "orders.new", &mut results).await;
    // Probes until both runtimes have run one: the trigger reached both.
    for n in 0.. {
        let runs_on: std::collections::HashSet<usize> =
            seen.lock().unwrap().iter().map(|(i, _)| *i).collect();
        if runs_on.len() == 2 {
            break;
        }
        assert!(n < 500, "the trigger did not reach both runtimes");
        nats.publish("orders.new", format!("probe-b{n}").into())
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), results.next()).await;
    }
    seen.lock().unwrap().clear();

    const TOTAL: usize = 1_000;
    for n in 0..TOTAL {
        nats.publish("orders.new", format!("order-{n}").into())
            .await
            .unwrap();
    }
    let mut out = HashMap::new();
    while out.len() < TOTAL {
        let (message, event) = next_event(&mut results).await;
        let payload = text(&event);
        if payload.starts_with("probe-") {
            continue;
        }
        assert_eq!(
            message
                .headers
                .as_ref()
                .unwrap()
                .get("Mycelium-Trigger")
                .unwrap()
                .as_str(),
            "orders"
        );
        assert_eq!(event.ty(), "io.mycelium.subject.message");
        assert_eq!(event.subject(), Some("orders.new"));
        assert!(out.insert(payload, ()).is_none(), "each result once");
    }
    let invocations: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, e)| text(e))
        .filter(|t| !t.starts_with("probe-"))
        .collect();
    assert_eq!(
        invocations.len(),
        TOTAL,
        "exactly one invocation per message"
    );
    assert!((0..TOTAL).all(|n| out.contains_key(&format!("order-{n}"))));

    // Deleted: no runtime listens any more (a request finds no responders).
    client.delete_trigger("orders").await.unwrap();
    eventually(Duration::from_secs(10), || async {
        // A listener that is still there does not answer: the request times out.
        let probe = tokio::time::timeout(
            Duration::from_millis(200),
            nats.request("orders.new", "gone?".into()),
        )
        .await
        .ok()?;
        matches!(probe, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders)
            .then_some(())
    })
    .await;
    assert!(client.triggers().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_changes_arrive_in_order_with_their_operation() {
    let server = NatsServer::start();
    let (_runtimes, _seen) = runtimes(&server, 2).await;
    let nats = server.connect().await;
    let client = Client::new(nats.clone());
    let js = async_nats::jetstream::new(nats.clone());
    // History enough for every write below: with one value per key, a change overwritten
    // while its turn is coming (or while it runs) leaves the stream, and its place in the
    // one-at-a-time order with it (docs/protocol.md, KV triggers).
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "config".into(),
            history: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut results = nats.subscribe("config.changed").await.unwrap();
    nats.flush().await.unwrap();
    client
        .add_trigger(trigger(
            "config-watch",
            "record",
            TriggerSource::Kv {
                bucket: "config".into(),
                key: Some("app.>".into()),
            },
            Some("config.changed"),
        ))
        .await
        .unwrap();
    // The consumer starts with what is new when the first runtime makes it: wait for it.
    consumer_made(&js, "KV_config", "trigger-config-watch").await;
    kv.put("app.a", "1".into()).await.unwrap();
    kv.put("other.x", "ignored".into()).await.unwrap();
    kv.put("app.a", "2".into()).await.unwrap();
    kv.put("app.b", "1".into()).await.unwrap();
    kv.delete("app.a").await.unwrap();
    kv.put("app.b", "2".into()).await.unwrap();
    let mut changes = Vec::new();
    while changes.len() < 5 {
        let (_, event) = next_event(&mut results).await;
        let extension = |name: &str| match event.extension(name) {
            Some(ExtensionValue::String(s)) => s.clone(),
            other => format!("{other:?}"),
        };
        let data = event.data().map(|_| text(&event)).unwrap_or_default();
        changes.push(format!(
            "{} {} {}",
            extension("kvoperation"),
            extension("kvkey"),
            data
        ));
    }
    assert_eq!(
        changes,
        [
            "put app.a 1",
            "put app.a 2",
            "put app.b 1",
            "delete app.a ",
            "put app.b 2"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_change_that_fails_keeps_the_next_one_waiting_until_it_succeeds() {
    use mycelium_core::FunctionError;
    let server = NatsServer::start();
    let nats = server.connect().await;
    // What the function saw, in order, with whether it failed.
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = calls.clone();
    let _runtime = on_jetstream_registry(&nats)
        .await
        .builtin(
            name("flaky"),
            "fails the first change it sees once",
            from_fn(move |event: Event, _ctx| {
                let calls = recorded.clone();
                async move {
                    let key = match event.extension("kvkey") {
                        Some(ExtensionValue::String(key)) => key.clone(),
                        other => format!("{other:?}"),
                    };
                    let mut calls = calls.lock().unwrap();
                    let first = calls.is_empty();
                    calls.push(format!("{key}{}", if first { " failed" } else { "" }));
                    if first {
                        return Err(FunctionError::new("not yet"));
                    }
                    Ok(vec![event])
                }
            }),
        )
        .build(nats.clone())
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(nats.clone());
    let js = async_nats::jetstream::new(nats.clone());
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "settings".into(),
            history: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut results = nats.subscribe("settings.changed").await.unwrap();
    nats.flush().await.unwrap();
    client
        .add_trigger(trigger(
            "settings-watch",
            "flaky",
            TriggerSource::Kv {
                bucket: "settings".into(),
                key: None,
            },
            Some("settings.changed"),
        ))
        .await
        .unwrap();
    consumer_made(&js, "KV_settings", "trigger-settings-watch").await;
    kv.put("first", "1".into()).await.unwrap();
    // The second change is written once the first has failed: it is there, and its turn
    // comes only after the first one's retry.
    eventually(Duration::from_secs(30), || async {
        (!calls.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    kv.put("second", "1".into()).await.unwrap();
    let mut order = Vec::new();
    while order.len() < 2 {
        let (_, event) = next_event(&mut results).await;
        match event.extension("kvkey") {
            Some(ExtensionValue::String(key)) => order.push(key.clone()),
            other => panic!("a result without its key: {other:?}"),
        }
    }
    assert_eq!(order, ["first", "second"]);
    assert_eq!(
        *calls.lock().unwrap(),
        ["first failed", "first", "second"],
        "the second change ran only after the first succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_tick_across_three_runtimes() {
    let server = NatsServer::start();
    let (_runtimes, seen) = runtimes(&server, 3).await;
    let nats = server.connect().await;
    let client = Client::new(nats.clone());
    client
        .add_trigger(trigger(
            "heartbeat",
            "record",
            TriggerSource::Schedule {
                cron: None,
                tz: None,
                every: Some(Duration::from_secs(1)),
            },
            None,
        ))
        .await
        .unwrap();
    // From the first firing, ten seconds.
    eventually(Duration::from_secs(30), || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let first = seen.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let fired = seen.lock().unwrap().len() - first;
    assert!((9..=11).contains(&fired), "{fired} firings in 10 s");
    let ticks = seen.lock().unwrap().clone();
    assert!(ticks
        .iter()
        .all(|(_, e)| e.ty() == "io.mycelium.schedule.tick"));
    let mut ids: Vec<&str> = ticks.iter().map(|(_, e)| e.id()).collect();
    ids.dedup();
    assert_eq!(ids.len(), ticks.len(), "no tick ran twice");
    // `mycelium stats` sees the firings, summed over the three runtimes.
    let stats = client.stats(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.instances, 3);
    let row = stats
        .triggers
        .iter()
        .find(|t| t.trigger.as_str() == "heartbeat")
        .expect("a row for the trigger");
    assert!(
        row.invocations >= ticks.len() as u64 && row.failures == 0,
        "{row:?}"
    );
    assert!(row.last_fired.is_some(), "{row:?}");

    // Paused: the server no longer holds its schedule; resumed: it does again.
    let schedules = async_nats::jetstream::new(nats.clone())
        .get_stream(mycelium_core::trigger::SCHEDULE_STREAM)
        .await
        .unwrap();
    let definition = "function.schedules.heartbeat";
    assert!(schedules
        .get_last_raw_message_by_subject(definition)
        .await
        .is_ok());
    client.set_trigger_paused("heartbeat", true).await.unwrap();
    assert!(schedules
        .get_last_raw_message_by_subject(definition)
        .await
        .is_err());
    assert!(client.trigger("heartbeat").await.unwrap().paused);
    client.set_trigger_paused("heartbeat", false).await.unwrap();
    let stored = schedules
        .get_last_raw_message_by_subject(definition)
        .await
        .unwrap();
    assert_eq!(
        stored.headers.get("Nats-Schedule").map(|v| v.as_str()),
        Some("@every 1s")
    );
    let bad_cron = client
        .add_trigger(trigger(
            "broken",
            "record",
            TriggerSource::Schedule {
                cron: Some("61 * * * * *".into()),
                tz: None,
                every: None,
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        bad_cron.kind(),
        mycelium_client::TriggerOpErrorKind::Invalid,
        "{bad_cron:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_functions_carries_each_event_through() {
    let server = NatsServer::start();
    let (_runtimes, seen) = runtimes(&server, 1).await;
    let nats = server.connect().await;
    let client = Client::new(nats.clone());
    let mut done = nats.subscribe("chain.done").await.unwrap();
    nats.flush().await.unwrap();
    for (t, from, to) in [
        ("a", "chain.a", "chain.b"),
        ("b", "chain.b", "chain.c"),
        ("c", "chain.c", "chain.done"),
    ] {
        client
            .add_trigger(trigger(t, "record", subject(from), Some(to)))
            .await
            .unwrap();
    }
    // Structured CloudEvents pass through every step unchanged.
    let send = |id: String| {
        let nats = nats.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/cloudevents+json");
            let body = serde_json::to_vec(&event(&id, json!({"step": 0}))).unwrap();
            nats.publish_with_headers("chain.a", headers, body.into())
                .await
                .unwrap();
        }
    };
    // The three triggers run once a probe makes it to the end.
    for n in 0.. {
        send(format!("probe-{n}")).await;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), done.next()).await {
            break;
        }
        assert!(n < 100, "the chain never ran");
    }
    seen.lock().unwrap().clear();
    for n in 0..20 {
        send(format!("c-{n}")).await;
    }
    let mut arrived = Vec::new();
    while arrived.len() < 20 {
        let (message, event) = next_event(&mut done).await;
        if event.id().starts_with("probe-") {
            continue;
        }
        assert_eq!(
            message
                .headers
                .as_ref()
                .unwrap()
                .get("Mycelium-Trigger")
                .unwrap()
                .as_str(),
            "c"
        );
        arrived.push(event.id().to_owned());
    }
    arrived.sort();
    let mut expected: Vec<String> = (0..20).map(|n| format!("c-{n}")).collect();
    expected.sort();
    assert_eq!(arrived, expected);
    let runs = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| e.id().starts_with("c-"))
        .count();
    assert_eq!(runs, 60, "each event ran three functions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_triggers_are_refused_at_add() {
    let server = NatsServer::start();
    let (_runtimes, _seen) = runtimes(&server, 1).await;
    let client = Client::new(server.connect().await);
    for (bad, why) in [
        (
            trigger("t1", "nosuch", subject("x.y"), None),
            "no function named",
        ),
        (
            trigger(
                "t2",
                "record",
                TriggerSource::Stream {
                    stream: "MISSING".into(),
                    filter: None,
                    deliver: Default::default(),
                },
                None,
            ),
            "no stream named",
        ),
        (
            trigger(
                "t3",
                "record",
                TriggerSource::Kv {
                    bucket: "missing".into(),
                    key: None,
                },
                None,
            ),
            "no KV bucket",
        ),
        (
            trigger("t4", "record", subject("a.b"), Some("$JS.API.X")),
            "system subject",
        ),
        (
            trigger("t5", "record", subject("loop.>"), Some("loop.again")),
            "feed itself",
        ),
        (
            trigger("t6", "record", subject("has space"), None),
            "not a NATS subject",
        ),
    ] {
        let error = client.add_trigger(bad).await.unwrap_err();
        assert_eq!(error.kind(), mycelium_client::TriggerOpErrorKind::Invalid);
        assert!(format!("{error:#}").contains(why), "{error:#}");
    }
    assert!(
        client.triggers().await.unwrap().is_empty(),
        "nothing was stored"
    );

    // The server takes a cron expression with a time zone, and refuses an unknown zone.
    let nightly = |name: &str, tz: &str| {
        trigger(
            name,
            "record",
            TriggerSource::Schedule {
                cron: Some("0 30 2 * * *".into()),
                tz: Some(tz.into()),
                every: None,
            },
            None,
        )
    };
    client
        .add_trigger(nightly("nightly", "Europe/Paris"))
        .await
        .unwrap();
    let stored = client.trigger("nightly").await.unwrap();
    assert_eq!(
        stored.source.describe(),
        "cron '0 30 2 * * *' (Europe/Paris)"
    );
    let error = client
        .add_trigger(nightly("elsewhere", "Not/A_Zone"))
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        mycelium_client::TriggerOpErrorKind::Invalid,
        "{error:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_triggers_dead_letters_are_kept_on_a_runtime_without_asynchronous_invocation() {
    use mycelium_core::{ErrorCode, FunctionError};
    use mycelium_runtime::{AsyncConfig, RuntimeConfig};
    let server = NatsServer::start();
    let nats = server.connect().await;
    let _runtime = on_jetstream_registry(&nats)
        .await
        .config(RuntimeConfig {
            asynchronous: AsyncConfig {
                enabled: false,
                ..AsyncConfig::default()
            },
            ..RuntimeConfig::default()
        })
        .builtin(
            name("picky"),
            "refuses every event",
            from_fn(|_event, _ctx| async move {
                Err(FunctionError::with_code(
                    ErrorCode::InvalidEvent,
                    "not for me",
                ))
            }),
        )
        .build(nats.clone())
        .unwrap()
        .start()
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nats.clone());
    let client = Client::new(nats.clone());
    stream_trigger(&client, &js, ("INBOX", "inbox.>"), "inbox", "picky").await;
    js.publish("inbox.x", "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let letters = eventually(Duration::from_secs(30), || async {
        let letters = client.dead_letters("picky").await.ok()?;
        (letters.len() == 1).then_some(letters)
    })
    .await;
    assert_eq!(letters[0].letter.error.code, ErrorCode::InvalidEvent);
    assert_eq!(
        letters[0].letter.event["type"],
        "io.mycelium.stream.message"
    );
    assert!(
        js.get_stream(mycelium_core::asynchronous::ASYNC_STREAM)
            .await
            .is_err(),
        "no async stream made"
    );
}

/// A stream trigger whose record goes without its consumer (as when a runtime that had not yet
/// seen the deletion made the consumer again after `trigger delete` removed it): the runtimes
/// delete the consumer once they see the trigger gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_triggers_consumer_does_not_outlive_it() {
    use mycelium_registry::RegistryAdmin;
    let server = NatsServer::start();
    let (_runtimes, _seen) = runtimes(&server, 2).await;
    let nats = server.connect().await;
    let js = async_nats::jetstream::new(nats.clone());
    let client = Client::new(nats.clone());
    stream_trigger(&client, &js, ("ORDERS", "orders.>"), "orders", "record").await;
    consumer_made(&js, "ORDERS", "trigger-orders").await;

    let registry = NatsRegistry::open(nats.clone(), NatsRegistryConfig::default())
        .await
        .unwrap();
    // Deleted under the runtimes through the registry alone: nothing but them touches the
    // consumer from here on.
    registry.delete_trigger(&name("orders")).await.unwrap();
    consumer_gone(&js, "ORDERS", "trigger-orders").await;
}
