//! Asynchronous invocation through real `mycelium` processes: the CLI's `invoke --async`,
//! `deploy` retry flags, `dlq` and `stats`; and 2,000 invocations that all arrive although a
//! runtime is SIGKILLed under load.

mod common;

use std::{collections::HashMap, process::Output, time::Duration};

use futures_util::{stream, StreamExt};
use mycelium_client::{Client, SubmitOptions};
use mycelium_core::{
    asynchronous::{ASYNC_STREAM, DLQ_STREAM},
    cloudevents::AttributesReader,
    envelope,
};
use mycelium_test_support::{event, eventually, free_port, kill_now, NatsCluster, NatsServer};
use serde_json::{json, Value};

use common::{run_at as run, serve_at as serve, succeeded, wait_for_instances};

fn stdout_json(output: &Output) -> Value {
    serde_json::from_str(&succeeded(output)).unwrap()
}

async fn wait_for_streams(client: &Client) {
    let jetstream = mycelium_client::async_nats::jetstream::new(client.nats().clone());
    // A new cluster elects its JetStream leaders first, slowly on a loaded machine.
    eventually(Duration::from_secs(90), || {
        let jetstream = jetstream.clone();
        async move {
            let ready = jetstream.get_stream(ASYNC_STREAM).await.is_ok()
                && jetstream.get_stream(DLQ_STREAM).await.is_ok();
            ready.then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_deploys_with_retry_settings_and_manages_dead_letters() {
    let server = NatsServer::start();
    let url = server.url();
    let metrics_port = free_port();
    let _runtime = serve(
        &url,
        &["--metrics-addr", &format!("127.0.0.1:{metrics_port}")],
    );
    let client = Client::new(server.connect().await);
    wait_for_streams(&client).await;
    let nats = client.nats().clone();
    let mut results = nats.subscribe("results.cli").await.unwrap();
    nats.flush().await.unwrap();

    // Accepted, then run: the result arrives where it was asked to go.
    let keyed = [
        "invoke",
        "echo",
        "--async",
        "--id",
        "cli-1",
        "--result-subject",
        "results.cli",
        "--idempotency-key",
        "k-1",
    ];
    let accepted = stdout_json(&run(&url, &keyed));
    assert_eq!(accepted["stream"], ASYNC_STREAM);
    assert_eq!(accepted["duplicate"], false);
    let sequence = accepted["sequence"].as_u64().unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), results.next())
        .await
        .unwrap()
        .unwrap();
    let events = envelope::decode_invoke_reply(&message.payload)
        .unwrap()
        .unwrap();
    assert_eq!(events[0].id(), "cli-1");
    assert_eq!(
        message
            .headers
            .as_ref()
            .unwrap()
            .get("Mycelium-Invocation-Id")
            .unwrap()
            .as_str(),
        accepted["invocationId"].as_str().unwrap()
    );
    // The same key again: a duplicate, not stored, not run.
    let again = run(&url, &keyed);
    let again_json = stdout_json(&again);
    assert_eq!(again_json["duplicate"], true);
    assert_eq!(again_json["sequence"].as_u64().unwrap(), sequence);
    assert!(String::from_utf8_lossy(&again.stderr).contains("duplicate"));
    // Asynchronous options without --async are a usage error.
    let usage = run(&url, &["invoke", "echo", "--result-subject", "results.cli"]);
    assert_eq!(usage.status.code(), Some(2));

    // Deploy flags land in the metadata; a system subject as a default destination is refused.
    let deployed = run(
        &url,
        &[
            "deploy",
            "patient",
            "--builtin",
            "echo",
            "--retries",
            "4",
            "--retry-backoff",
            "1s,10s",
            "--max-event-age",
            "10m",
            "--on-success",
            "results.patient",
            "--on-failure",
            "failures.patient",
        ],
    );
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    let described = stdout_json(&run(&url, &["describe", "patient", "--json"]));
    assert_eq!(
        described["async"],
        json!({"retries": 4, "retryBackoffMs": [1000, 10000], "maxEventAgeMs": 600000, "onSuccess": "results.patient", "onFailure": "failures.patient"}),
        "{described}"
    );
    let refused = run(
        &url,
        &[
            "deploy",
            "sneaky",
            "--builtin",
            "echo",
            "--on-success",
            "$JS.API.STREAM.DELETE.MYCELIUM_ASYNC",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("system subject"), "{stderr}");

    // A refused result subject dead-letters the invocation; dlq shows it, replay and purge.
    let refused_subject = stdout_json(&run(
        &url,
        &[
            "invoke",
            "echo",
            "--async",
            "--id",
            "bad-1",
            "--result-subject",
            "$SYS.REQ.SERVER.PING",
        ],
    ));
    assert_eq!(refused_subject["duplicate"], false);
    let listed = eventually(Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let listed = stdout_json(&run(&url, &["dlq", "list", "echo", "--json"]));
            (listed["deadLetters"].as_array()?.len() == 1).then_some(listed)
        }
    })
    .await;
    let letter = &listed["deadLetters"][0];
    assert_eq!(letter["reason"], "result_subject_refused");
    assert_eq!(letter["event"]["id"], "bad-1");
    assert_eq!(letter["attempts"], 0);
    let table = run(&url, &["dlq", "list", "echo"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("bad-1"));

    let stats = stdout_json(&run(&url, &["stats", "echo", "--json"]));
    let queue = &stats["async"][0];
    assert_eq!(queue["function"], "echo", "{stats}");
    assert_eq!(queue["deadLettered"], 1, "{stats}");
    let top = run(&url, &["top", "--iterations", "1"]);
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.contains("ASYNC QUEUE") && top.contains("DEAD LETTERS"),
        "{top}"
    );
    // Prometheus: what this runtime dead-lettered, and the queues it samples every 10 s.
    eventually(Duration::from_secs(30), || async move {
        let text = tokio::task::spawn_blocking(move || common::scrape_metrics(metrics_port))
            .await
            .ok()?
            .ok()?;
        [
            r#"mycelium_async_dead_lettered_total{function="echo",reason="result_subject_refused"} 1"#,
            r#"mycelium_async_pending{function="echo"} 0"#,
            r#"mycelium_async_dead_letters{function="echo"} 1"#,
        ]
        .iter()
        .all(|line| text.lines().any(|l| l == *line))
        .then_some(())
    })
    .await;

    let replayed = run(&url, &["dlq", "replay", "echo", "--id", "bad-1"]);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    assert!(String::from_utf8_lossy(&replayed.stdout).contains("replayed 1"));
    // Replayed with the same refused subject, it is dead-lettered again.
    eventually(Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let listed = stdout_json(&run(&url, &["dlq", "list", "echo", "--json"]));
            let letters = listed["deadLetters"].as_array()?.clone();
            (letters.len() == 1 && letters[0]["dlqSequence"] != letter["dlqSequence"]).then_some(())
        }
    })
    .await;
    let nothing = run(&url, &["dlq", "replay", "echo", "--id", "no-such-event"]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("error[nothing_to_replay]"));
    let purged = run(&url, &["dlq", "purge", "echo"]);
    assert!(String::from_utf8_lossy(&purged.stdout).contains("purged 1"));
    let empty = run(&url, &["dlq", "list", "echo"]);
    assert!(String::from_utf8_lossy(&empty.stdout).contains("No dead letters"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_accepted_invocation_is_lost_when_a_runtime_is_killed_under_load() {
    const TOTAL: usize = 2_000;
    let server = NatsServer::start();
    let url = server.url();
    // A short ack wait: what the killed runtime held comes back within seconds.
    let options = ["--registry", "memory", "--async-ack-wait", "2s"];
    let first = serve(&url, &options);
    let _second = serve(&url, &options);
    let client = Client::new(server.connect().await);
    wait_for_instances(&client, 2).await;
    wait_for_streams(&client).await;
    let nats = client.nats().clone();
    let mut results = nats.subscribe("results.load").await.unwrap();
    nats.flush().await.unwrap();

    let submitter = {
        let client = client.clone();
        tokio::spawn(async move {
            stream::iter(0..TOTAL)
                .map(|n| {
                    let client = client.clone();
                    async move {
                        let options = SubmitOptions {
                            result_subject: Some("results.load".into()),
                            ..Default::default()
                        };
                        client
                            .submit("echo", &event(&format!("e-{n}"), json!({"n": n})), options)
                            .await
                            .unwrap()
                    }
                })
                .buffer_unordered(32)
                .count()
                .await
        })
    };

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut first = Some(first);
    let mut third = None;
    while seen.len() < TOTAL {
        let message = tokio::time::timeout(Duration::from_secs(60), results.next())
            .await
            .unwrap_or_else(|_| panic!("stalled with {} of {TOTAL} results", seen.len()))
            .unwrap();
        let events = envelope::decode_invoke_reply(&message.payload)
            .unwrap()
            .unwrap();
        *seen.entry(events[0].id().to_owned()).or_default() += 1;
        if seen.len() == TOTAL / 4 {
            if let Some(runtime) = first.take() {
                kill_now(runtime.0.id());
                third = Some(serve(&url, &options));
            }
        }
    }
    assert_eq!(
        submitter.await.unwrap(),
        TOTAL,
        "every submission was accepted"
    );
    assert!(
        first.is_none() && third.is_some(),
        "the kill happened under load"
    );
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("{TOTAL} results, {duplicates} duplicate(s) from the killed runtime's redeliveries");
    assert_eq!(seen.len(), TOTAL);
    assert!((0..TOTAL).all(|n| seen.contains_key(&format!("e-{n}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_at_r3_loses_no_invocation_when_a_node_is_lost() {
    use mycelium_client::async_nats::jetstream;
    const TOTAL: usize = 1_000;
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let options = [
        "--registry",
        "memory",
        "--replicas",
        "3",
        "--async-ack-wait",
        "2s",
    ];
    let _runtimes = [serve(&urls, &options), serve(&urls, &options)];
    let client = Client::new(cluster.connect().await);
    wait_for_streams(&client).await;
    let js = jetstream::new(client.nats().clone());
    // Results are kept in a stream of their own, replicated too: what a runtime published
    // before a node died is not lost with it, and the test reads them all at the end.
    eventually(Duration::from_secs(60), || {
        let js = js.clone();
        async move {
            js.get_or_create_stream(jetstream::stream::Config {
                name: "RESULTS".into(),
                subjects: vec!["results.r3".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    let info = js
        .get_stream(ASYNC_STREAM)
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.num_replicas, 3);

    // Each submission is retried with its idempotency key until accepted: a retry of one that
    // was stored after all is a duplicate, not a second invocation.
    let submit = |n: usize| {
        let client = client.clone();
        async move {
            let options = SubmitOptions {
                result_subject: Some("results.r3".into()),
                idempotency_key: Some(format!("r3-{n}")),
                ..Default::default()
            };
            let event = event(&format!("r3-{n}"), json!({"n": n}));
            eventually(Duration::from_secs(60), || {
                let (client, options, event) = (client.clone(), options.clone(), event.clone());
                async move { client.submit("echo", &event, options).await.ok() }
            })
            .await
        }
    };
    let mut accepted = Vec::new();
    for chunk in (0..TOTAL).collect::<Vec<_>>().chunks(TOTAL / 4) {
        if accepted.len() == TOTAL / 4 {
            cluster.nodes_mut()[0].kill();
        }
        if accepted.len() == 3 * TOTAL / 4 {
            cluster.nodes_mut()[0].resume();
        }
        let done: Vec<_> = stream::iter(chunk.to_vec())
            .map(submit)
            .buffer_unordered(16)
            .collect()
            .await;
        accepted.extend(done);
    }
    assert_eq!(accepted.len(), TOTAL);

    // Every accepted invocation's result is in the results stream (duplicates allowed).
    let seen = eventually(Duration::from_secs(120), || {
        let js = js.clone();
        async move {
            let stream = js.get_stream("RESULTS").await.ok()?;
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
                .await
                .ok()?;
            let mut pending = consumer.cached_info().num_pending;
            let mut messages = consumer.messages().await.ok()?;
            let mut seen = std::collections::HashSet::new();
            while pending > 0 {
                let message = messages.next().await?.ok()?;
                pending = message.info().ok()?.pending;
                let id = message
                    .headers
                    .as_ref()?
                    .get("Mycelium-Event-Id")?
                    .as_str()
                    .to_owned();
                seen.insert(id);
            }
            (seen.len() == TOTAL).then_some(seen)
        }
    })
    .await;
    assert!((0..TOTAL).all(|n| seen.contains(&format!("r3-{n}"))));
}
