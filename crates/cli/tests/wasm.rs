//! WebAssembly functions end to end: modules deployed with `mycelium deploy`, run by `mycelium
//! serve` runtimes on a real nats-server. The guests are test-support's WAT programs, one
//! behaviour each; the C and Rust examples are in `wasm_examples.rs`.

use std::{path::PathBuf, process::Output, time::Duration};

use mycelium_client::{Client, InvokeOptions, RequestErrorKind};
use mycelium_core::{cloudevents::AttributesReader, ErrorCode, Event};
use mycelium_test_support::{event, eventually, wasm_guest, ChildGuard as Running, NatsServer};
use serde_json::{json, Value};

mod common;

use common::{run_at, serve_at, succeeded, wait_for_instances};

/// A nats-server, `count` runtimes on it (each with its own binary cache), and the guests
/// compiled to `.wasm` files.
struct Fixture {
    server: NatsServer,
    _runtimes: Vec<Running>,
    client: Client,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(count: usize) -> Self {
        let server = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let runtimes = (0..count)
            .map(|i| {
                let cache = dir.path().join(format!("runtime-{i}"));
                serve_at(&server.url(), &["--plugin-dir", cache.to_str().unwrap()])
            })
            .collect();
        let client = Client::new(server.connect().await);
        wait_for_instances(&client, count).await;
        Self {
            server,
            _runtimes: runtimes,
            client,
            dir,
        }
    }

    fn guest(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.wasm"));
        if !path.exists() {
            std::fs::write(&path, wasm_guest(name)).unwrap();
        }
        path
    }

    fn cli(&self, args: &[&str]) -> Output {
        run_at(&self.server.url(), args)
    }

    /// `mycelium deploy NAME <guest>.wasm OPTIONS... --json`: the new version's metadata.
    fn deploy(&self, name: &str, guest: &str, options: &[&str]) -> Value {
        let path = self.guest(guest);
        let mut args = vec!["deploy", name, path.to_str().unwrap(), "--json"];
        args.extend_from_slice(options);
        serde_json::from_str(&succeeded(&self.cli(&args))).unwrap()
    }

    /// `mycelium invoke NAME ...` that must fail: its `error[<code>]: <message>` line.
    fn invoke_error(&self, name: &str, options: &[&str]) -> String {
        let mut args = vec!["invoke", name];
        args.extend_from_slice(options);
        let output = self.cli(&args);
        assert!(!output.status.success(), "{name} succeeded");
        String::from_utf8_lossy(&output.stderr).trim().to_owned()
    }

    async fn call(
        &self,
        name: &str,
        id: &str,
    ) -> Result<Vec<Event>, mycelium_client::RequestError> {
        self.client.invoke(name, event(id, json!({"n": 1}))).await
    }
}

fn data_text(event: &Event) -> String {
    match event.data() {
        Some(mycelium_core::cloudevents::Data::Json(Value::String(text))) => text.clone(),
        Some(mycelium_core::cloudevents::Data::String(text)) => text.clone(),
        other => panic!("unexpected data {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_modules_deploy_answer_and_fail_cleanly_through_the_cli() {
    let f = Fixture::new(1).await;
    let deployed = f.deploy("echo-wasm", "echo", &["--description", "echoes"]);
    assert_eq!(deployed["kind"], "wasm");
    assert_eq!(deployed["version"], 1);
    assert!(deployed["digest"].as_str().unwrap().starts_with("sha256:"));

    let reply: Value = serde_json::from_str(&succeeded(&f.cli(&[
        "invoke",
        "echo-wasm",
        "--id",
        "w1",
        "--data",
        r#"{"n": 1}"#,
    ])))
    .unwrap();
    assert_eq!(reply["events"][0]["id"], "w1");
    assert_eq!(reply["events"][0]["data"], json!({"n": 1}));
    let described: Value =
        serde_json::from_str(&succeeded(&f.cli(&["describe", "echo-wasm", "--json"]))).unwrap();
    assert_eq!(described["kind"], "wasm");
    let listed = succeeded(&f.cli(&["list"]));
    assert!(
        listed
            .lines()
            .any(|l| l.contains("echo-wasm") && l.contains("wasm")),
        "{listed}"
    );

    // A component's preamble (the magic, then layer 1 and version 0x0d) is refused by name.
    let component = f.dir.path().join("component.wasm");
    std::fs::write(&component, b"\0asm\x0d\0\x01\0").unwrap();
    let output = f.cli(&["deploy", "component", component.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error[not_executable]"), "{stderr}");
    assert!(stderr.contains("is a WebAssembly component"), "{stderr}");

    f.deploy("grow", "grow", &["--memory-mb", "16"]);
    let error = f.invoke_error("grow", &[]);
    assert!(error.starts_with("error[function_error]"), "{error}");
    assert!(error.contains("more than its 16 MiB of memory"), "{error}");

    f.deploy("trap", "trap", &[]);
    for _ in 0..2 {
        let error = f.invoke_error("trap", &[]);
        assert!(error.starts_with("error[function_error]"), "{error}");
        assert!(error.contains("trapped"), "{error}");
        assert_eq!(f.call("echo-wasm", "after-trap").await.unwrap().len(), 1);
    }

    f.deploy("flood", "flood", &[]);
    let error = f.invoke_error("flood", &[]);
    assert!(error.starts_with("error[payload_too_large]"), "{error}");

    f.deploy("open", "open", &[]);
    assert_eq!(
        f.invoke_error("open", &[]),
        "error[function_error]: function \"open\" failed: open failed with errno 08"
    );

    // The guest's stderr is in the function's logs, attributed to its invocation.
    let logged = eventually(Duration::from_secs(30), || async {
        let output = f.cli(&["logs", "trap", "--json"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let records: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (records.len() == 2).then_some(records)
    })
    .await;
    for record in logged {
        assert_eq!(record["message"], "about to trap");
        assert_eq!(record["source"], "stderr");
        assert!(record["invocationId"].is_string(), "{record}");
    }

    // Counted like any function's calls: one through the CLI and two after the traps; the
    // traps as failures.
    let stats: Value = serde_json::from_str(&succeeded(&f.cli(&["stats", "--json"]))).unwrap();
    let of = |name: &str| {
        stats["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["function"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not in {stats}"))
    };
    assert_eq!(of("echo-wasm")["invocations"], 3, "{stats}");
    assert_eq!(of("echo-wasm")["errors"], 0, "{stats}");
    assert_eq!(of("trap")["invocations"], 2, "{stats}");
    assert_eq!(of("trap")["errors"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_returns_times_out_and_others_keep_answering() {
    let f = Fixture::new(1).await;
    f.deploy("spin", "spin", &["--timeout", "20s"]);
    f.deploy("echo-wasm", "echo", &[]);
    let error = f.invoke_error("spin", &["--timeout", "500ms"]);
    assert!(error.starts_with("error[timeout]"), "{error}");

    // More spinning guests than the runtime has worker threads: only guests that yield leave
    // room for the echo calls.
    let spinning: Vec<_> = (0..3)
        .map(|i| {
            let client = f.client.clone();
            tokio::spawn(async move {
                let options = InvokeOptions {
                    timeout: Some(Duration::from_secs(10)),
                    ..InvokeOptions::default()
                };
                client
                    .invoke_with("spin", &event(&format!("s-{i}"), json!({})), options)
                    .await
            })
        })
        .collect();
    for i in 0..5 {
        let events = f.call("echo-wasm", &format!("e-{i}")).await.unwrap();
        assert_eq!(events[0].id(), format!("e-{i}"));
    }
    assert!(spinning.iter().all(|s| !s.is_finished()));
    for spin in spinning {
        let error = spin.await.unwrap().unwrap_err();
        assert_eq!(
            error.kind(),
            RequestErrorKind::Remote(ErrorCode::Timeout),
            "{error}"
        );
    }
    // The runtime is still whole.
    assert_eq!(f.call("echo-wasm", "after").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_alternate_between_two_modules_with_nothing_carried_over() {
    let f = Fixture::new(1).await;
    f.deploy("counter", "counter", &[]);
    f.deploy("echo-wasm", "echo", &[]);
    for i in 0..500 {
        let id = format!("c-{i}");
        let counted = f.call("counter", &id).await.unwrap();
        assert_eq!(
            data_text(&counted[0]),
            "11",
            "state carried over at call {i}"
        );
        let echoed = f.call("echo-wasm", &id).await.unwrap();
        assert_eq!(echoed[0].id(), id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_and_a_rollback_reach_every_runtime() {
    let f = Fixture::new(2).await;
    f.deploy("svc", "echo", &[]);
    f.deploy("svc", "env", &["--env", "TAG=v2"]);
    // A runtime that missed the new version would answer about half the calls with v1.
    let all_answer = |ty: &'static str| {
        let client = f.client.clone();
        async move {
            for i in 0..40 {
                let events = client
                    .invoke("svc", event(&format!("r-{i}"), json!({})))
                    .await
                    .ok()?;
                if events[0].ty() != ty {
                    return None;
                }
            }
            Some(())
        }
    };
    eventually(Duration::from_secs(30), || all_answer("env")).await;
    let events = f.call("svc", "v").await.unwrap();
    let text = data_text(&events[0]);
    assert!(
        text.contains("TAG=v2|") && text.contains("MYCELIUM_VERSION=2|"),
        "{text}"
    );

    succeeded(&f.cli(&["rollback", "svc", "--to", "1"]));
    eventually(Duration::from_secs(30), || all_answer("com.example.test")).await;
    let versions = succeeded(&f.cli(&["versions", "svc"]));
    assert_eq!(
        versions.lines().filter(|l| l.contains("wasm")).count(),
        2,
        "{versions}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_and_rust_examples_deploy_and_answer() {
    let f = Fixture::new(1).await;
    let built = f.dir.path().join("examples");
    if !mycelium_test_support::wasm_examples(&built) {
        return;
    }
    let upper = built.join("upper.wasm");
    let wordcount = built.join("wordcount.wasm");
    for (name, path) in [("shout", &upper), ("wordcount", &wordcount)] {
        let deployed: Value = serde_json::from_str(&succeeded(&f.cli(&[
            "deploy",
            name,
            path.to_str().unwrap(),
            "--json",
        ])))
        .unwrap();
        assert_eq!(deployed["kind"], "wasm", "{name}");
    }

    let invoke = |args: &[&str]| -> Value {
        let mut all = vec!["invoke"];
        all.extend_from_slice(args);
        serde_json::from_str(&succeeded(&f.cli(&all))).unwrap()
    };
    let shouted = invoke(&[
        "shout",
        "--id",
        "u1",
        "--type",
        "com.example.upper",
        "--content-type",
        "text/plain",
        "--data",
        "hello, \"wasm\"",
    ]);
    assert_eq!(
        shouted["events"][0],
        json!({
            "specversion": "1.0", "id": "upper-u1", "source": "mycelium/shout",
            "type": "com.example.upper.result", "datacontenttype": "text/plain",
            "data": "HELLO, \"WASM\""
        })
    );
    // The same reply as the Rust plugin example's (cli.rs, `cli_to_runtime_to_rust_plugin`).
    let counted = invoke(&[
        "wordcount",
        "--id",
        "w1",
        "--type",
        "com.example.wordcount",
        "--data",
        r#"{"text": "to be or not to be"}"#,
    ]);
    assert_eq!(
        counted["events"][0],
        json!({
            "specversion": "1.0", "id": "wordcount-w1", "source": "mycelium/wordcount",
            "type": "com.example.wordcount.result", "datacontenttype": "application/json",
            "data": {"words": 6, "characters": 18}
        })
    );
    // Other events are echoed by both.
    for name in ["shout", "wordcount"] {
        let echoed = invoke(&[name, "--id", "e1", "--data", "[1]"]);
        assert_eq!(echoed["events"][0]["id"], "e1", "{name}");
        assert_eq!(echoed["events"][0]["data"], json!([1]), "{name}");
    }
}
