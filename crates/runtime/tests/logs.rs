//! Function logs on NATS: a built-in's `tracing` events inside its invocation are published on
//! `function.logs.<name>` with function, version, invocation id and trace id.
//! One test: the log layer lives in the process-global subscriber.

use std::time::Duration;

use futures_util::StreamExt;
use mycelium_client::{Client, InvokeOptions, TraceContext};
use mycelium_core::{from_fn, logs::LogRecord, FunctionName};
use mycelium_runtime::Runtime;
use mycelium_test_support::{event, NatsServer};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builtins_tracing_events_are_published_with_their_invocation() {
    let (layer, logs) = mycelium_runtime::function_logs();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    let server = NatsServer::start();
    // The log stream as an older runtime made it, without a per-function limit.
    let jetstream = async_nats::jetstream::new(server.connect().await);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: mycelium_core::logs::LOG_STREAM.into(),
            subjects: vec!["function.logs.>".into()],
            max_age: Duration::from_secs(3600),
            max_bytes: 64 * 1024 * 1024,
            ..Default::default()
        })
        .await
        .unwrap();
    let chatty: FunctionName = "chatty".parse().unwrap();
    let runtime = Runtime::builder()
        .builtin(
            chatty.clone(),
            "logs a line per call",
            from_fn(|event, _ctx| async move {
                tracing::warn!(answer = 42, "hello from a built-in");
                Ok(vec![event])
            }),
        )
        .function_logs(logs.clone())
        .serve(&server.url())
        .await
        .unwrap();
    let nats = server.connect().await;
    let mut published = nats.subscribe("function.logs.chatty").await.unwrap();
    nats.flush().await.unwrap();

    let trace = TraceContext::parse(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .unwrap();
    Client::new(nats.clone())
        .invoke_with(
            "chatty",
            &event("c1", json!({})),
            InvokeOptions {
                trace: Some(trace.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), published.next())
        .await
        .expect("no log record within 30 s")
        .unwrap();
    let record: LogRecord = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(record.function, chatty);
    assert_eq!(record.version, 1);
    assert_eq!(record.level, "warn");
    assert_eq!(record.source, "tracing");
    assert_eq!(record.message, "hello from a built-in");
    assert_eq!(record.trace_id.as_deref(), Some(trace.trace_id()));
    let invocation_id = record.invocation_id.expect("the invocation id");
    assert!(!invocation_id.is_empty());
    assert_eq!(logs.dropped(), 0);

    // One function's flood replaces its own history, not another's.
    let mut stream = jetstream
        .get_stream(mycelium_core::logs::LOG_STREAM)
        .await
        .unwrap();
    let kept = stream.info().await.unwrap().config.max_messages_per_subject;
    assert_eq!(kept, 10_000, "the runtime set the per-function limit");
    nats.publish("function.logs.quiet", "a quiet line".into())
        .await
        .unwrap();
    for i in 0..10_050 {
        nats.publish("function.logs.flood", format!("line {i}").into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    let count = |subject: &'static str| {
        let stream = stream.clone();
        async move {
            stream
                .info_with_subjects(subject)
                .await
                .unwrap()
                .next()
                .await
                .map_or(0, |entry| entry.unwrap().1)
        }
    };
    mycelium_test_support::eventually(Duration::from_secs(30), || async {
        (count("function.logs.flood").await == 10_000).then_some(())
    })
    .await;
    assert_eq!(count("function.logs.quiet").await, 1);
    runtime.shutdown().await;
}
