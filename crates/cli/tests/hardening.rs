//! What probing the released binaries as a careless or hostile user found, each reproduced
//! against real processes so it cannot come back: a runtime killed by SIGPIPE, `up` leaving
//! its nats-server behind or sharing a store, a shutdown that never ends, credentials a plugin
//! could read, and flags that did less than they said.

mod common;

use std::{
    process::{Output, Stdio},
    time::Duration,
};

use mycelium_client::{Client, InvokeOptions};
use mycelium_core::cloudevents::{EventBuilder, EventBuilderV10};
use mycelium_test_support::{
    eventually, free_port, interrupt, kill_now, nats_server_binary, terminate,
    ChildGuard as Running, NatsServer,
};

use common::{children_of, is_alive, mycelium, start_up_quiet};
use mycelium_test_support::go_plugin;

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits (up to a ceiling far above any real shutdown) for a child to exit.
fn wait_exit(
    child: &mut std::process::Child,
    ceiling: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + ceiling;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The signals a process ignores, from `/proc/<pid>/status`.
fn ignored_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .expect("SigIgn in /proc status");
    u64::from_str_radix(line.trim(), 16).unwrap()
}

fn serve(url: &str, plugin_dir: &std::path::Path, extra: &[&str]) -> Running {
    Running(
        mycelium()
            .env("RUST_LOG", "warn")
            .args(["--nats-url", url, "serve"])
            .args(["--plugin-dir", plugin_dir.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn wait_ready(client: &Client) {
    eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.list().await.ok() }
    })
    .await;
}

fn upper_event(id: &str) -> mycelium_core::Event {
    EventBuilderV10::new()
        .id(id)
        .source("hardening")
        .ty("com.example.upper")
        .data("text/plain", "go")
        .build()
        .unwrap()
}

/// Calls `upper` from a few tasks until told to stop; returns how many calls succeeded.
fn load(
    client: &Client,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..4)
        .map(|worker| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut succeeded = 0;
                let mut i = 0;
                while !*stop.borrow() {
                    i += 1;
                    let options = InvokeOptions {
                        timeout: Some(Duration::from_secs(5)),
                        ..Default::default()
                    };
                    let event = upper_event(&format!("w{worker}-{i}"));
                    if client.invoke_with("upper", &event, options).await.is_ok() {
                        succeeded += 1;
                    }
                }
                succeeded
            })
        })
        .collect()
}

/// A runtime keeps SIGPIPE ignored: a Go plugin closing its socket while the host writes to
/// it must not kill the runtime. Each round warms a Go plugin, puts it under load, redeploys,
/// deletes or crashes it, then stops the runtime: it exits 0 every time, never by a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_plugin_never_kills_the_runtime_through_redeploys_deletes_crashes_and_shutdowns() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("go-upper");
    if !go_plugin(&binary) {
        return;
    }
    let server = NatsServer::start();
    let url = server.url();
    let client = Client::new(server.connect().await);
    let cli = |args: &[&str]| {
        let out = mycelium()
            .args(["--nats-url", &url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mycelium {args:?}: {}",
            stderr_of(&out)
        );
    };
    let binary = binary.to_str().unwrap();
    cli(&["deploy", "upper", binary]);
    for round in 0..8 {
        let mut runtime = serve(
            &url,
            &dir.path().join("plugins"),
            &["--shutdown-grace", "5s"],
        );
        let pid = runtime.0.id();
        wait_ready(&client).await;
        assert_eq!(
            ignored_signals(pid) >> (libc::SIGPIPE - 1) & 1,
            1,
            "the runtime must ignore SIGPIPE"
        );
        // Warm: a call answered by the plugin process.
        eventually(Duration::from_secs(30), || {
            let client = client.clone();
            async move { client.invoke("upper", upper_event("warm")).await.ok() }
        })
        .await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let workers = load(&client, &stopped);
        match round % 4 {
            0 => cli(&["deploy", "upper", binary]),
            1 => {
                cli(&["delete", "upper"]);
                cli(&["deploy", "upper", binary]);
            }
            2 => {
                for plugin in children_of(pid) {
                    kill_now(plugin);
                }
            }
            _ => {}
        }
        // The runtime goes on answering through it.
        eventually(Duration::from_secs(30), || {
            let client = client.clone();
            async move { client.invoke("upper", upper_event("after")).await.ok() }
        })
        .await;
        terminate(pid);
        let status = wait_exit(&mut runtime.0, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("round {round}: the runtime did not exit"));
        stop.send(true).unwrap();
        for worker in workers {
            worker.await.unwrap();
        }
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: the runtime ended with {status}"
        );
    }
}

/// `--memory-mb` limits resident memory (a control group) where the runtime can make control
/// groups: a Go plugin starts under 64 MiB, which as an address-space limit (`RLIMIT_AS`, what
/// it was) it never could, Go reserving far more than it uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_plugin_runs_under_a_small_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("go-upper");
    if !go_plugin(&binary) {
        return;
    }
    if mycelium_plugin::cgroup::CgroupRoot::detect().is_err() {
        eprintln!("SKIPPED: this machine does not let us create control groups (run as root)");
        return;
    }
    let server = NatsServer::start();
    let url = server.url();
    let client = Client::new(server.connect().await);
    let _runtime = serve(&url, &dir.path().join("plugins"), &[]);
    wait_ready(&client).await;
    let deploy = mycelium()
        .args(["--nats-url", &url, "deploy", "upper"])
        .arg(&binary)
        .args(["--memory-mb", "64"])
        .output()
        .unwrap();
    assert!(deploy.status.success(), "{}", stderr_of(&deploy));
    let events = eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.invoke("upper", upper_event("m1")).await.ok() }
    })
    .await;
    assert_eq!(
        mycelium_core::cloudevents::AttributesReader::id(&events[0]),
        "upper-m1"
    );
}

/// `serve` stopped at the moment its nats-server goes away still exits, within its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_when_nats_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start();
    let client = Client::new(server.connect().await);
    let mut runtime = serve(&server.url(), dir.path(), &["--shutdown-grace", "2s"]);
    wait_ready(&client).await;
    server.kill();
    terminate(runtime.0.id());
    // Before the fix it reconnected forever; the ceiling is far above the 2 s grace.
    let status = wait_exit(&mut runtime.0, Duration::from_secs(60))
        .expect("the runtime kept running after SIGTERM without NATS");
    assert_eq!(status.code(), Some(0), "{status}");
}

fn lock_record(data_dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data_dir.join("nats/lock")).unwrap()).unwrap()
}

/// A SIGKILLed `up` takes its nats-server with it, and the data directory can be used again.
#[test]
fn a_killed_up_leaves_no_nats_server_behind() {
    let data_dir = tempfile::tempdir().unwrap();
    let (up, _url) = start_up_quiet(data_dir.path());
    let record = lock_record(data_dir.path());
    assert_eq!(record["pid"], up.0.id());
    let server_pid = u32::try_from(record["server_pid"].as_u64().unwrap()).unwrap();
    assert!(is_alive(server_pid));
    kill_now(up.0.id());
    drop(up);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while is_alive(server_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server {server_pid} outlived its mycelium up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same data directory serves again, on another port.
    let (_again, _) = start_up_quiet(data_dir.path());
}

/// A second `up` on a data directory in use refuses and names the process using it.
#[test]
fn a_second_up_on_the_same_data_dir_refuses() {
    let data_dir = tempfile::tempdir().unwrap();
    let (first, _url) = start_up_quiet(data_dir.path());
    let second = mycelium()
        .args(["up", "--data-dir", data_dir.path().to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = stderr_of(&second);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error[data_dir_in_use]:"), "{stderr}");
    assert!(
        stderr.contains(&format!("process {}", first.0.id())),
        "{stderr}"
    );
}

/// A nats-server left running on the store (by a `mycelium up` of an older release, or one
/// started by hand) is recognised and named, instead of a second server opening the store.
#[test]
fn an_orphaned_nats_server_on_the_data_dir_is_named() {
    let data_dir = tempfile::tempdir().unwrap();
    let nats_dir = data_dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir).unwrap();
    let orphan = Running(
        std::process::Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &free_port().to_string(),
                "-js",
                "-sd",
            ])
            .arg(nats_dir.join("jetstream"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::write(
        nats_dir.join("lock"),
        format!(r#"{{"pid": 1, "server_pid": {}}}"#, orphan.0.id()),
    )
    .unwrap();
    let up = mycelium()
        .args(["up", "--data-dir", data_dir.path().to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = stderr_of(&up);
    assert_eq!(up.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("orphaned nats-server (pid {})", orphan.0.id())),
        "{stderr}"
    );
}

/// `--user` on the command line with the password from `NATS_PASSWORD`, as the README says.
#[test]
fn user_flag_with_password_from_the_environment() {
    const PASSWORD: &str = "pw-from-env";
    let dir = tempfile::tempdir().unwrap();
    let server = common::server_with_password(dir.path(), PASSWORD);
    let list = mycelium()
        .env("NATS_PASSWORD", PASSWORD)
        .args(["--nats-url", server.url(), "--user", "alice", "deploy"])
        .args(["hello", "--builtin", "echo"])
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", stderr_of(&list));
    let alone = mycelium()
        .args(["--nats-url", server.url(), "--user", "alice", "list"])
        .output()
        .unwrap();
    assert_eq!(alone.status.code(), Some(2), "{}", stderr_of(&alone));
    assert!(
        stderr_of(&alone).contains("--user needs a password"),
        "{}",
        stderr_of(&alone)
    );
}

/// `mycelium logs` of a name that is no function fails instead of printing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_an_unknown_function_fail() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let client = Client::new(server.connect().await);
    let _runtime = serve(&server.url(), dir.path(), &[]);
    wait_ready(&client).await;
    let out = mycelium()
        .args(["--nats-url", &server.url(), "logs", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).starts_with("error[function_not_found]:"),
        "{}",
        stderr_of(&out)
    );
    // A function that exists but logged nothing is not an error.
    let quiet = mycelium()
        .args(["--nats-url", &server.url(), "logs", "echo"])
        .output()
        .unwrap();
    assert!(quiet.status.success(), "{}", stderr_of(&quiet));
    assert!(quiet.stdout.is_empty());
}

/// A plugin running as the runtime's user cannot read the runtime's environment through
/// `/proc/<runtime pid>/environ` (the runtime is non-dumpable and plugins hold no
/// capabilities, even under root), and a start failure quoting a plugin's output to its caller
/// cuts the function's own secrets out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_read_the_runtimes_credentials() {
    const RUNTIME_SECRET: &str = "rt-Hq93-never-leak";
    const FUNCTION_SECRET: &str = "fn-Lm27-never-leak";
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let url = server.url();
    let client = Client::new(server.connect().await);
    let _runtime = Running(
        mycelium()
            .env(
                "DATABASE_URL",
                format!("postgres://app:{RUNTIME_SECRET}@db/app"),
            )
            .args(["--nats-url", &url, "serve"])
            .args(["--plugin-dir", dir.path().join("plugins").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(&client).await;
    let script = dir.path().join("snoop.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         if tr '\\0' '\\n' < /proc/$PPID/environ >&2; then echo READ-ALLOWED >&2; else echo READ-DENIED >&2; fi\n\
         echo \"my key is $API_KEY\" >&2\n\
         exit 1\n",
    )
    .unwrap();
    let deploy = mycelium()
        .args(["--nats-url", &url, "deploy", "snoop"])
        .arg(&script)
        .args(["--env", &format!("API_KEY={FUNCTION_SECRET}")])
        .output()
        .unwrap();
    assert!(deploy.status.success(), "{}", stderr_of(&deploy));
    let error = client
        .invoke(
            "snoop",
            mycelium_test_support::event("s1", serde_json::json!({})),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        mycelium_client::RequestErrorKind::Remote(mycelium_core::ErrorCode::PluginStartFailed),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("READ-DENIED"), "{message}");
    assert!(message.contains("my key is [redacted]"), "{message}");
    for secret in [RUNTIME_SECRET, FUNCTION_SECRET] {
        assert!(
            !message.contains(secret),
            "a secret reached the caller: {message}"
        );
    }
}

/// Deploying under a built-in's name is refused unless asked for; when asked, the deployed
/// function replaces the built-in for every caller, and deleting it brings the built-in back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_builtin_takes_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let url = server.url();
    let client = Client::new(server.connect().await);
    let _runtime = serve(&url, dir.path(), &[]);
    wait_ready(&client).await;
    let cli = |args: &[&str]| {
        mycelium()
            .args(["--nats-url", &url])
            .args(args)
            .output()
            .unwrap()
    };
    let refused = cli(&["deploy", "echo", "--builtin", "example"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr_of(&refused));
    assert!(
        stderr_of(&refused).starts_with("error[builtin_name]:")
            && stderr_of(&refused).contains("--replace-builtin"),
        "{}",
        stderr_of(&refused)
    );
    let echo = || async {
        let events = client
            .invoke(
                "echo",
                mycelium_test_support::event("r1", serde_json::json!({})),
            )
            .await
            .unwrap();
        mycelium_core::cloudevents::AttributesReader::id(&events[0]).to_owned()
    };
    assert_eq!(echo().await, "r1", "the built-in echo");

    let replaced = cli(&[
        "deploy",
        "echo",
        "--builtin",
        "example",
        "--replace-builtin",
    ]);
    assert!(replaced.status.success(), "{}", stderr_of(&replaced));
    eventually(Duration::from_secs(30), || async {
        (echo().await == "response-r1").then_some(())
    })
    .await;
    let listed = client.list().await.unwrap();
    assert_eq!(
        listed.iter().filter(|f| f.name.as_str() == "echo").count(),
        1
    );

    let deleted = cli(&["delete", "echo"]);
    assert!(deleted.status.success(), "{}", stderr_of(&deleted));
    eventually(Duration::from_secs(30), || async {
        (echo().await == "r1").then_some(())
    })
    .await;
}

/// `up` keeps SIGPIPE ignored too: stopped with SIGINT (Ctrl-C) while a Go plugin is warm, it
/// exits 0 every time and takes its nats-server with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_warm_go_plugin_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("go-upper");
    if !go_plugin(&binary) {
        return;
    }
    let data_dir = dir.path().join("data");
    for round in 0..3 {
        let (mut up, url) = start_up_quiet(&data_dir);
        let client = Client::new(
            mycelium_client::async_nats::connect(url.as_str())
                .await
                .unwrap(),
        );
        if round == 0 {
            let deploy = mycelium()
                .args(["--nats-url", &url, "deploy", "upper"])
                .arg(&binary)
                .output()
                .unwrap();
            assert!(deploy.status.success(), "{}", stderr_of(&deploy));
        }
        eventually(Duration::from_secs(30), || {
            let client = client.clone();
            async move { client.invoke("upper", upper_event("warm")).await.ok() }
        })
        .await;
        let pid = up.0.id();
        assert_eq!(ignored_signals(pid) >> (libc::SIGPIPE - 1) & 1, 1);
        interrupt(pid);
        let status = wait_exit(&mut up.0, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("round {round}: up did not exit"));
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: up ended with {status}"
        );
    }
}

/// The metrics endpoint out of file descriptors (EMFILE on accept) pauses instead of spinning,
/// says so, and serves again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_out_of_descriptors_pauses_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let port = free_port();
    let log = dir.path().join("serve.log");
    // 40 descriptors: the runtime needs about 13 at rest; the connections below take the rest.
    let _runtime = Running(
        std::process::Command::new("prlimit")
            .arg("--nofile=40:40")
            .arg(env!("CARGO_BIN_EXE_mycelium"))
            .env("RUST_LOG", "warn")
            .env("MYCELIUM_NATS_SERVER", nats_server_binary())
            .args(["--nats-url", &server.url(), "serve", "--registry", "memory"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = Client::new(server.connect().await);
    wait_ready(&client).await;
    let scrape = move || {
        let text = common::scrape_metrics(port).ok()?;
        text.starts_with("HTTP/1.1 200").then_some(())
    };
    // Held open, these connections use up the runtime's descriptors (the kernel keeps
    // completing handshakes into the listen backlog after accept starts failing).
    let held: Vec<std::net::TcpStream> = (0..60)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let log_path = log.clone();
    eventually(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move {
            text.contains("accepting a metrics connection failed; pausing")
                .then_some(())
        }
    })
    .await;
    drop(held);
    eventually(Duration::from_secs(30), || async {
        tokio::task::spawn_blocking(scrape).await.unwrap()
    })
    .await;
    // The runtime itself kept answering throughout.
    client
        .invoke(
            "echo",
            mycelium_test_support::event("fd", serde_json::json!({})),
        )
        .await
        .unwrap();
}
