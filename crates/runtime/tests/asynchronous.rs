//! Asynchronous invocation against a real nats-server: acceptance, results with their
//! headers, idempotency, retries with the configured backoff, dead letters and replay, refused
//! result subjects, expiry and a full stream.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use mycelium_client::{AsyncErrorKind, Client, SubmitOptions};
use mycelium_core::{
    asynchronous::{
        DeadLetterReason, ASYNC_STREAM, ATTEMPTS_HEADER, EVENT_ID_HEADER, FUNCTION_HEADER,
    },
    cloudevents::AttributesReader,
    envelope::{self, INVOCATION_ID_HEADER},
    from_fn, AsyncSettings, ErrorCode, FunctionError, FunctionMetadata, FunctionName,
};
use mycelium_registry::MemoryRegistry;
use mycelium_runtime::{AsyncConfig, Runtime, RuntimeConfig, RuntimeHandle};
use mycelium_test_support::{event, eventually, NatsServer};
use serde_json::json;

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

/// When each event id was attempted.
type Attempts = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

struct Fixture {
    server: NatsServer,
    runtime: Option<RuntimeHandle>,
    client: Client,
    attempts: Attempts,
    /// While set, `broken` fails every call.
    broken: Arc<AtomicBool>,
}

/// A runtime with: `echo`; `flaky` (fails `unavailable` on an event's first two attempts,
/// backoff 300 ms then 600 ms); `broken` (fails while the flag is set; one retry after
/// 100 ms, failures announced on `failures.broken`).
async fn fixture(asynchronous: AsyncConfig) -> Fixture {
    let server = NatsServer::start();
    let attempts: Attempts = Arc::default();
    let broken = Arc::new(AtomicBool::new(true));
    let registry = Arc::new(MemoryRegistry::new());
    let mut flaky = FunctionMetadata::builtin(name("flaky"), "fails twice per event");
    flaky.entry_point = Some("flaky-impl".into());
    flaky.asynchronous = AsyncSettings {
        retry_backoff: vec![Duration::from_millis(300), Duration::from_millis(600)],
        ..Default::default()
    };
    registry.insert(flaky);
    let mut failing = FunctionMetadata::builtin(name("broken"), "fails while broken");
    failing.entry_point = Some("broken-impl".into());
    failing.asynchronous = AsyncSettings {
        retries: Some(1),
        retry_backoff: vec![Duration::from_millis(100)],
        on_failure: Some("failures.broken".into()),
        ..Default::default()
    };
    registry.insert(failing);
    let seen = attempts.clone();
    let flag = broken.clone();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            asynchronous,
            ..RuntimeConfig::default()
        })
        .registry(registry)
        .standard_builtins()
        .builtin(
            name("flaky-impl"),
            "fails twice per event",
            from_fn(move |event, _ctx| {
                let seen = seen.clone();
                async move {
                    let count = {
                        let mut seen = seen.lock().unwrap();
                        let times = seen.entry(event.id().to_owned()).or_default();
                        times.push(Instant::now());
                        times.len()
                    };
                    if count <= 2 {
                        return Err(FunctionError::with_code(
                            ErrorCode::Unavailable,
                            format!("not yet ({count})"),
                        ));
                    }
                    Ok(vec![event])
                }
            }),
        )
        .builtin(
            name("broken-impl"),
            "fails while broken",
            from_fn(move |event, _ctx| {
                let flag = flag.clone();
                async move {
                    if flag.load(Ordering::SeqCst) {
                        return Err(FunctionError::new("still broken"));
                    }
                    Ok(vec![event])
                }
            }),
        )
        .serve(&server.url())
        .await
        .unwrap();
    let client = Client::new(server.connect().await);
    wait_for_streams(&client).await;
    Fixture {
        server,
        runtime: Some(runtime),
        client,
        attempts,
        broken,
    }
}

impl Fixture {
    /// Stops the runtime, then submits `count` events (`<prefix>-<n>`) to `function`: they
    /// wait in the stream.
    async fn stop_and_store(&mut self, function: &str, prefix: &str, count: usize) {
        self.runtime.take().unwrap().shutdown().await;
        for n in 0..count {
            let event = event(&format!("{prefix}-{n}"), json!({}));
            self.client
                .submit(function, &event, SubmitOptions::default())
                .await
                .unwrap();
        }
    }

    /// Waits for exactly `count` dead letters of `function`.
    async fn dead_letters(
        &self,
        function: &str,
        count: usize,
    ) -> Vec<mycelium_client::StoredDeadLetter> {
        eventually(Duration::from_secs(30), || async {
            let letters = self.client.dead_letters(function).await.unwrap();
            (letters.len() == count).then_some(letters)
        })
        .await
    }
}

/// The runtime makes the streams as it starts serving; a submission before that would find
/// no stream.
async fn wait_for_streams(client: &Client) {
    let jetstream = async_nats::jetstream::new(client.nats().clone());
    eventually(Duration::from_secs(10), || {
        let jetstream = jetstream.clone();
        async move {
            let ok = jetstream.get_stream(ASYNC_STREAM).await.is_ok()
                && jetstream
                    .get_stream(mycelium_core::asynchronous::DLQ_STREAM)
                    .await
                    .is_ok();
            ok.then_some(())
        }
    })
    .await;
}

fn to(subject: &str) -> SubmitOptions {
    SubmitOptions {
        result_subject: Some(subject.into()),
        ..Default::default()
    }
}

async fn next(subscriber: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(30), subscriber.next())
        .await
        .expect("a message arrives")
        .expect("the subscription is open")
}

fn header(message: &async_nats::Message, name: &str) -> String {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_invocations_run_and_their_results_arrive_with_headers() {
    let f = fixture(AsyncConfig::default()).await;
    let nats = f.client.nats().clone();
    let mut results = nats.subscribe("results.echo").await.unwrap();
    nats.flush().await.unwrap();
    let mut accepted = HashMap::new();
    for n in 0..50 {
        let id = format!("e-{n}");
        let acceptance = f
            .client
            .submit("echo", &event(&id, json!({"n": n})), to("results.echo"))
            .await
            .unwrap();
        assert_eq!(acceptance.stream, ASYNC_STREAM);
        assert!(!acceptance.duplicate);
        accepted.insert(id, acceptance.invocation_id);
    }
    let mut seen = HashMap::new();
    while seen.len() < 50 {
        let message = next(&mut results).await;
        let events = envelope::decode_invoke_reply(&message.payload)
            .unwrap()
            .unwrap();
        assert_eq!(events.len(), 1);
        let id = events[0].id().to_owned();
        assert_eq!(header(&message, EVENT_ID_HEADER), id);
        assert_eq!(header(&message, FUNCTION_HEADER), "echo");
        assert_eq!(header(&message, ATTEMPTS_HEADER), "1");
        assert_eq!(header(&message, INVOCATION_ID_HEADER), accepted[&id]);
        assert!(seen.insert(id, ()).is_none(), "no result twice");
    }
    // Everything ran: the work queue is empty.
    let jetstream = async_nats::jetstream::new(nats);
    let messages = eventually(Duration::from_secs(10), || {
        let jetstream = jetstream.clone();
        async move {
            let mut stream = jetstream.get_stream(ASYNC_STREAM).await.ok()?;
            let messages = stream.info().await.ok()?.state.messages;
            (messages == 0).then_some(messages)
        }
    })
    .await;
    assert_eq!(messages, 0);
    f.runtime.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_is_accepted_once_and_runs_once() {
    let f = fixture(AsyncConfig::default()).await;
    let nats = f.client.nats().clone();
    let mut results = nats.subscribe("results.once").await.unwrap();
    nats.flush().await.unwrap();
    let keyed = SubmitOptions {
        result_subject: Some("results.once".into()),
        idempotency_key: Some("order-17".into()),
        ..Default::default()
    };
    let first = f
        .client
        .submit("echo", &event("once", json!({})), keyed.clone())
        .await
        .unwrap();
    let second = f
        .client
        .submit("echo", &event("once-again", json!({})), keyed)
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "{second:?}");
    assert_eq!(second.sequence, first.sequence, "nothing new was stored");
    // A marker submitted after both: once it has run, so has anything stored before it.
    f.client
        .submit("echo", &event("marker", json!({})), to("results.once"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    while !ids.contains(&"marker".to_owned()) || ids.len() < 2 {
        let message = next(&mut results).await;
        let events = envelope::decode_invoke_reply(&message.payload)
            .unwrap()
            .unwrap();
        ids.push(events[0].id().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["marker", "once"]);
    f.runtime.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_failures_are_retried_after_the_configured_backoff() {
    let f = fixture(AsyncConfig::default()).await;
    let nats = f.client.nats().clone();
    let mut results = nats.subscribe("results.flaky").await.unwrap();
    nats.flush().await.unwrap();
    for id in ["f-1", "f-2", "f-3"] {
        f.client
            .submit("flaky", &event(id, json!({})), to("results.flaky"))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let message = next(&mut results).await;
        assert_eq!(
            header(&message, ATTEMPTS_HEADER),
            "3",
            "succeeded on the third attempt"
        );
        assert!(envelope::decode_invoke_reply(&message.payload)
            .unwrap()
            .is_ok());
    }
    let attempts = f.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3);
    for (id, times) in attempts {
        assert_eq!(times.len(), 3, "{id}: exactly three attempts");
        let gaps = [times[1] - times[0], times[2] - times[1]];
        assert!(
            gaps[0] >= Duration::from_millis(300) && gaps[1] >= Duration::from_millis(600),
            "{id}: the waits follow the backoff 300ms, 600ms: {gaps:?}"
        );
    }
    f.runtime.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_keeps_failing_is_dead_lettered_and_replay_runs_it_after_a_fix() {
    let f = fixture(AsyncConfig::default()).await;
    let nats = f.client.nats().clone();
    let mut failures = nats.subscribe("failures.broken").await.unwrap();
    let mut results = nats.subscribe("results.broken").await.unwrap();
    nats.flush().await.unwrap();
    for n in 0..5 {
        f.client
            .submit(
                "broken",
                &event(&format!("b-{n}"), json!({})),
                to("results.broken"),
            )
            .await
            .unwrap();
    }
    // Each failure goes to the caller's result subject (the error envelope) ...
    for _ in 0..5 {
        let message = next(&mut results).await;
        let error = envelope::decode_invoke_reply(&message.payload)
            .unwrap()
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::FunctionError);
        assert_eq!(header(&message, ATTEMPTS_HEADER), "2");
    }
    // ... and the dead letters hold all five, with the attempts made.
    let letters = f.dead_letters("broken", 5).await;
    for stored in &letters {
        assert_eq!(stored.letter.attempts, 2);
        assert_eq!(stored.letter.reason, DeadLetterReason::RetriesExhausted);
        assert_eq!(stored.letter.error.code, ErrorCode::FunctionError);
        assert_eq!(
            stored.letter.result_subject.as_deref(),
            Some("results.broken")
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), failures.next())
            .await
            .is_err(),
        "the function's on-failure subject is for calls that name no result subject"
    );

    // Fixed: a replay runs them all, and the dead letters are gone.
    f.broken.store(false, Ordering::SeqCst);
    let replayed = f.client.replay_dead_letters("broken", None).await.unwrap();
    assert_eq!(replayed.len(), 5);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let message = next(&mut results).await;
        let events = envelope::decode_invoke_reply(&message.payload)
            .unwrap()
            .unwrap();
        ids.push(events[0].id().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["b-0", "b-1", "b-2", "b-3", "b-4"]);
    assert!(f.client.dead_letters("broken").await.unwrap().is_empty());

    // Without a result subject, the failure is announced on the function's on-failure subject.
    f.broken.store(true, Ordering::SeqCst);
    f.client
        .submit(
            "broken",
            &event("quiet", json!({})),
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let message = next(&mut failures).await;
    assert_eq!(header(&message, EVENT_ID_HEADER), "quiet");
    assert_eq!(f.client.purge_dead_letters("broken").await.unwrap(), 1);
    f.runtime.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_subjects_the_runtime_must_not_publish_to_are_refused() {
    let f = fixture(AsyncConfig {
        result_subjects: vec!["results.>".into()],
        ..AsyncConfig::default()
    })
    .await;
    let nats = f.client.nats().clone();
    let mut allowed = nats.subscribe("results.ok").await.unwrap();
    nats.flush().await.unwrap();
    let refused = [
        "$JS.API.STREAM.DELETE.MYCELIUM_ASYNC",
        "$KV.mycelium_functions.x",
        "$SYS.REQ.SERVER.PING",
        "function.invoke.echo",
        "elsewhere.x",
    ];
    for (n, subject) in refused.iter().enumerate() {
        f.client
            .submit("echo", &event(&format!("r-{n}"), json!({})), to(subject))
            .await
            .unwrap();
    }
    f.client
        .submit("echo", &event("fine", json!({})), to("results.ok"))
        .await
        .unwrap();
    let message = next(&mut allowed).await;
    assert_eq!(header(&message, EVENT_ID_HEADER), "fine");
    let letters = f.dead_letters("echo", refused.len()).await;
    for stored in &letters {
        assert_eq!(stored.letter.reason, DeadLetterReason::ResultSubjectRefused);
        assert_eq!(stored.letter.attempts, 0, "it never ran");
        assert!(
            stored.letter.error.message.contains("result subject"),
            "{}",
            stored.letter.error.message
        );
    }
    // The stream the first one named is still there.
    let jetstream = async_nats::jetstream::new(nats);
    assert!(jetstream.get_stream(ASYNC_STREAM).await.is_ok());
    f.runtime.unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_submissions_and_old_invocations_expire() {
    let mut f = fixture(AsyncConfig {
        max_messages: 3,
        ..AsyncConfig::default()
    })
    .await;
    // Nothing runs while the runtime is away: the stream keeps what it accepted.
    f.stop_and_store("echo", "old", 3).await;
    let error = f
        .client
        .submit(
            "echo",
            &event("one-too-many", json!({})),
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), AsyncErrorKind::StreamFull, "{error:#}");
    assert!(error.to_string().contains("full"), "{error}");

    // A runtime whose `echo` lets events wait at most 1 ms finds them all too old.
    let registry = Arc::new(MemoryRegistry::new());
    let mut echo = FunctionMetadata::builtin(name("echo"), "echo, impatient");
    echo.entry_point = Some("echo".into());
    echo.asynchronous = AsyncSettings {
        max_event_age: Some(Duration::from_millis(1)),
        ..Default::default()
    };
    registry.insert(echo);
    let runtime = Runtime::builder()
        .registry(registry)
        .standard_builtins()
        .serve(&f.server.url())
        .await
        .unwrap();
    let letters = f.dead_letters("echo", 3).await;
    for stored in &letters {
        assert_eq!(stored.letter.reason, DeadLetterReason::Expired);
        assert_eq!(stored.letter.attempts, 0);
    }
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_without_a_runtime_say_so() {
    let server = NatsServer::start();
    let client = Client::new(server.connect().await);
    let error = client
        .submit("echo", &event("x", json!({})), SubmitOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), AsyncErrorKind::NoStream, "{error:#}");
    assert!(client.dead_letters("echo").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_of_functions_no_runtime_knows_are_dead_lettered_after_the_grace() {
    let mut f = fixture(AsyncConfig::default()).await;
    f.stop_and_store("nosuch", "n", 3).await;
    // Older than the grace before a runtime looks at them.
    let grace = Duration::from_millis(100);
    tokio::time::sleep(grace * 2).await;
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            asynchronous: AsyncConfig {
                unknown_function_grace: grace,
                ..AsyncConfig::default()
            },
            ..RuntimeConfig::default()
        })
        .standard_builtins()
        .serve(&f.server.url())
        .await
        .unwrap();
    let letters = f.dead_letters("nosuch", 3).await;
    for stored in &letters {
        assert_eq!(stored.letter.reason, DeadLetterReason::NotRetriable);
        assert_eq!(stored.letter.error.code, ErrorCode::FunctionNotFound);
    }
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_nats_client_can_submit_in_binary_mode_with_a_plain_request() {
    let f = fixture(AsyncConfig::default()).await;
    let nats = f.client.nats().clone();
    let mut results = nats.subscribe("results.raw").await.unwrap();
    nats.flush().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "raw-1"),
        ("ce-source", "a-shell-script"),
        ("ce-type", "com.example.raw"),
        ("Content-Type", "text/plain"),
        ("Nats-Msg-Id", "raw-1"),
        ("Mycelium-Result-Subject", "results.raw"),
    ] {
        headers.insert(name, value);
    }
    // JetStream answers the request with its PubAck: the acceptance.
    let ack = nats
        .request_with_headers("function.async.echo", headers.clone(), "hello".into())
        .await
        .unwrap();
    let ack: serde_json::Value = serde_json::from_slice(&ack.payload).unwrap();
    assert_eq!(ack["stream"], ASYNC_STREAM, "{ack}");
    let again = nats
        .request_with_headers("function.async.echo", headers, "hello".into())
        .await
        .unwrap();
    let again: serde_json::Value = serde_json::from_slice(&again.payload).unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    let message = next(&mut results).await;
    let events = envelope::decode_invoke_reply(&message.payload)
        .unwrap()
        .unwrap();
    assert_eq!(events[0].id(), "raw-1");
    assert_eq!(events[0].source().as_str(), "a-shell-script");
    assert_eq!(
        header(&message, INVOCATION_ID_HEADER),
        format!("async-{}", ack["seq"])
    );
    f.runtime.unwrap().shutdown().await;
}
