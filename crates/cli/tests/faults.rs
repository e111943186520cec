//! Fault injection under load, every invocation accounted for: runtime instances (real
//! `mycelium serve` processes) killed with SIGKILL or drained while a load generator runs, and
//! the nats-server restarted under load. With the client's retry policy on, nothing fails.

mod common;

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use mycelium_client::{
    Client, ConnectOptions, DeploySpec, InvokeOptions, RegistryAdmin, RequestErrorKind, RetryPolicy,
};
use mycelium_core::{
    cloudevents::{AttributesReader, EventBuilder, EventBuilderV10},
    FunctionName,
};
use mycelium_test_support::{
    event, eventually, kill_now, terminate, ChildGuard, NatsCluster, NatsServer,
};
use serde_json::json;
use tokio::sync::watch;

use common::{mycelium, sibling_binary, wait_for_instances};

fn serve(url: &str) -> ChildGuard {
    serve_with(url, &[], &["--registry", "memory"])
}

fn serve_with(url: &str, global: &[&str], options: &[&str]) -> ChildGuard {
    ChildGuard(
        mycelium()
            .env("RUST_LOG", "warn")
            .args(["--nats-url", url])
            .args(global)
            .arg("serve")
            .args(options)
            .args(["--shutdown-grace", "10s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// What a load run saw: successes, and failures by kind.
#[derive(Debug, Default)]
struct Tally {
    succeeded: usize,
    failed: BTreeMap<String, usize>,
}

/// Sends `total` invocations of `echo` from `workers` concurrent callers; `done` counts the
/// finished ones so the test can inject faults at known points of the run.
async fn load(
    client: Client,
    function: &'static str,
    total: usize,
    workers: usize,
    timeout: Option<Duration>,
    done: watch::Sender<usize>,
) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(done);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return tally;
                }
                let id = format!("load-{i}");
                let options = InvokeOptions {
                    timeout,
                    ..Default::default()
                };
                // Type `echo`: what both the built-in and the test plugin echo back.
                let request = EventBuilderV10::new()
                    .id(id.as_str())
                    .source("load")
                    .ty("echo")
                    .data("application/json", json!({"i": i}))
                    .build()
                    .unwrap();
                match client.invoke_with(function, &request, options).await {
                    Ok(events) if events.len() == 1 && events[0].id() == id => tally.succeeded += 1,
                    Ok(events) => panic!("invocation {i} answered with {events:?}"),
                    Err(error) => {
                        *tally
                            .failed
                            .entry(format!("{:?}", error.kind()))
                            .or_default() += 1;
                    }
                }
                done.send_modify(|n| *n += 1);
            }
        }));
    }
    let mut sum = Tally::default();
    for task in tasks {
        let tally = task.await.unwrap();
        sum.succeeded += tally.succeeded;
        for (kind, n) in tally.failed {
            *sum.failed.entry(kind).or_default() += n;
        }
    }
    sum
}

fn retrying() -> RetryPolicy {
    RetryPolicy {
        attempts: 8,
        retry_timeouts: true,
        attempt_timeout: Some(Duration::from_secs(2)),
        ..RetryPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_killed_and_drained_under_load_lose_nothing_with_retries() {
    let server = NatsServer::start();
    let url = server.url();
    let mut instances = [serve(&url), serve(&url), serve(&url)];
    let client = Client::new(server.connect().await).with_retry(retrying());
    wait_for_instances(&client, 3).await;

    const TOTAL: usize = 3000;
    let (done, mut progress) = watch::channel(0);
    let run = tokio::spawn(load(client.clone(), "echo", TOTAL, 16, None, done));

    progress.wait_for(|n| *n >= TOTAL / 3).await.unwrap();
    kill_now(instances[0].0.id());
    progress.wait_for(|n| *n >= 2 * TOTAL / 3).await.unwrap();
    terminate(instances[1].0.id());

    let tally = run.await.unwrap();
    eprintln!("tally: {tally:?}");
    assert_eq!(
        (tally.succeeded, &tally.failed),
        (TOTAL, &BTreeMap::new()),
        "every invocation succeeded"
    );
    // The drained instance exited by itself, cleanly; the killed one did not get to.
    let drained = instances[1].0.wait().unwrap();
    assert!(drained.success(), "drain ended with {drained}");
    let killed = instances[0].0.wait().unwrap();
    assert!(!killed.success());
    wait_for_instances(&client, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retries_a_killed_instance_costs_only_its_in_flight_calls() {
    let server = NatsServer::start();
    let url = server.url();
    let instances = [serve(&url), serve(&url)];
    let client = Client::new(server.connect().await);
    wait_for_instances(&client, 2).await;

    const TOTAL: usize = 1500;
    let (done, mut progress) = watch::channel(0);
    // A short timeout, so that calls lost with the killed instance end soon, as timeouts.
    let timeout = Some(Duration::from_millis(500));
    let run = tokio::spawn(load(client, "echo", TOTAL, 8, timeout, done));
    progress.wait_for(|n| *n >= TOTAL / 2).await.unwrap();
    kill_now(instances[0].0.id());
    let tally = run.await.unwrap();
    eprintln!("tally: {tally:?}");

    // Every call is accounted for; the only failures are calls the killed instance held
    // (at most the 8 in flight), and they fail as timeouts, not as anything else.
    let failed: usize = tally.failed.values().sum();
    assert_eq!(tally.succeeded + failed, TOTAL);
    assert!(failed <= 8, "{:?}", tally.failed);
    assert!(
        tally
            .failed
            .keys()
            .all(|kind| kind == &format!("{:?}", RequestErrorKind::TimedOut)),
        "{:?}",
        tally.failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_under_load_loses_nothing_with_retries() {
    let mut server = NatsServer::start();
    let url = server.url();
    let _instances = [serve(&url), serve(&url)];
    let client = Client::new(server.connect().await).with_retry(RetryPolicy {
        attempts: 30,
        max_backoff: Duration::from_millis(500),
        ..retrying()
    });
    wait_for_instances(&client, 2).await;

    const TOTAL: usize = 2000;
    let (done, mut progress) = watch::channel(0);
    let run = tokio::spawn(load(client.clone(), "echo", TOTAL, 8, None, done));
    progress.wait_for(|n| *n >= TOTAL / 3).await.unwrap();
    server.kill();
    server.resume();

    let tally = run.await.unwrap();
    eprintln!("tally: {tally:?}");
    assert_eq!(
        (tally.succeeded, &tally.failed),
        (TOTAL, &BTreeMap::new()),
        "every invocation succeeded across the restart"
    );
    // Both runtimes came back by themselves.
    wait_for_instances(&client, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_nodes_lost_and_restarted_under_load_lose_no_call_and_no_version() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let mut options = ConnectOptions::new(&urls);
    options.registry.replicas = 3;
    options.retry = Some(RetryPolicy {
        attempts: 40,
        max_backoff: Duration::from_millis(500),
        ..retrying()
    });
    let client = options.connect().await.unwrap();
    // The JetStream meta leader is elected shortly after the routes connect.
    let registry = eventually(Duration::from_secs(60), || {
        let client = client.clone();
        async move { client.registry().await.ok() }
    })
    .await;
    let name: FunctionName = "svc".parse().unwrap();
    let deploy = || {
        let (registry, name) = (registry.clone(), name.clone());
        async move {
            // A deploy refused while the cluster elects a new leader is tried again; one that
            // returns a version has stored it.
            eventually(Duration::from_secs(60), || {
                let (registry, name) = (registry.clone(), name.clone());
                async move {
                    registry
                        .deploy(DeploySpec::builtin(name, "echo"))
                        .await
                        .ok()
                }
            })
            .await
            .version
        }
    };
    let mut deployed = vec![deploy().await];
    let _instances = [
        serve_with(&urls, &["--replicas", "3"], &[]),
        serve_with(&urls, &["--replicas", "3"], &[]),
    ];
    wait_for_instances(&client, 2).await;
    eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.invoke("svc", event("warm", json!({}))).await.ok() }
    })
    .await;

    const TOTAL: usize = 2000;
    let (done, mut progress) = watch::channel(0);
    let run = tokio::spawn(load(client.clone(), "svc", TOTAL, 8, None, done));
    progress.wait_for(|n| *n >= TOTAL / 3).await.unwrap();
    cluster.nodes_mut()[0].kill();
    deployed.push(deploy().await);
    progress.wait_for(|n| *n >= TOTAL / 2).await.unwrap();
    cluster.nodes_mut()[0].resume();
    deployed.push(deploy().await);
    // Then a rolling restart of another node.
    progress.wait_for(|n| *n >= 3 * TOTAL / 4).await.unwrap();
    cluster.nodes_mut()[1].kill();
    cluster.nodes_mut()[1].resume();
    deployed.push(deploy().await);

    let tally = run.await.unwrap();
    eprintln!("tally: {tally:?}, deployed: {deployed:?}");
    assert_eq!(
        (tally.succeeded, &tally.failed),
        (TOTAL, &BTreeMap::new()),
        "every invocation succeeded while a node was down"
    );
    // Every deployed version is kept and the last is active (the local catalog follows the
    // KV watch, which resumes after the node loss: wait for it to catch up, not for a loss).
    let (kept, active) = eventually(Duration::from_secs(30), || {
        let (registry, name, deployed) = (registry.clone(), name.clone(), deployed.clone());
        async move {
            let versions = registry.versions(&name).ok()?;
            let kept: Vec<u64> = versions.versions.iter().map(|v| v.version).collect();
            (deployed.iter().all(|v| kept.contains(v))
                && versions.active == deployed.last().copied())
            .then_some((kept, versions.active))
        }
    })
    .await;
    eprintln!("kept {kept:?}, active {active:?}");
}

/// Resident memory (KiB) and open file descriptors of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// Processes whose executable lies under `dir` (plugin processes run from the binary cache).
fn processes_under(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
        })
        .collect()
}

/// A soak at high concurrency over built-in and plugin calls, bounded by count
/// (`MYCELIUM_SOAK_REQUESTS`, default 60 000, for longer runs): memory and descriptors stay
/// flat after the warm-up, nothing fails, and nothing is left running afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_keeps_memory_descriptors_and_processes_flat() {
    let Some(plugin) = sibling_binary("mycelium-test-plugin", "mycelium-e2e") else {
        return;
    };
    let total: usize = std::env::var("MYCELIUM_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    let server = NatsServer::start();
    let url = server.url();
    let work = tempfile::tempdir().unwrap();
    let plugin_dir = work.path().join("plugins");
    let serve = serve_with(&url, &[], &["--plugin-dir", plugin_dir.to_str().unwrap()]);
    let client = Client::new(server.connect().await);
    wait_for_instances(&client, 1).await;
    let registry = client.registry().await.unwrap();
    registry
        .deploy(mycelium_client::DeploySpec::plugin(
            "soaked".parse().unwrap(),
            mycelium_client::ArtifactSource::File(plugin),
        ))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let warm = EventBuilderV10::new()
                .id("w")
                .source("soak")
                .ty("echo")
                .build()
                .ok()?;
            client.invoke("soaked", warm).await.ok()
        }
    })
    .await;

    let pid = serve.0.id();
    let warm_up = total / 6;
    let (done, mut progress) = watch::channel(0);
    let builtin = tokio::spawn(load(client.clone(), "echo", total, 56, None, done));
    let (plugin_done, _) = watch::channel(0);
    let plugin_calls = tokio::spawn(load(
        client.clone(),
        "soaked",
        total / 10,
        8,
        None,
        plugin_done,
    ));
    progress.wait_for(|n| *n >= warm_up).await.unwrap();
    let warm = footprint(pid);
    let (builtin, plugin_calls) = (builtin.await.unwrap(), plugin_calls.await.unwrap());
    let end = footprint(pid);
    eprintln!(
        "soak: {total} built-in + {} plugin calls; RSS {} -> {} KiB; fds {} -> {}",
        total / 10,
        warm.0,
        end.0,
        warm.1,
        end.1
    );
    assert_eq!(
        (builtin.succeeded, &builtin.failed),
        (total, &BTreeMap::new())
    );
    assert_eq!(
        (plugin_calls.succeeded, &plugin_calls.failed),
        (total / 10, &BTreeMap::new())
    );
    assert!(
        end.1 <= warm.1 + 4,
        "descriptors grew: {} -> {}",
        warm.1,
        end.1
    );
    assert!(
        end.0 <= warm.0 + warm.0 / 4 + 4096,
        "memory grew: {} -> {} KiB",
        warm.0,
        end.0
    );
    assert_eq!(
        processes_under(&plugin_dir).len(),
        1,
        "one plugin process served it all"
    );
    drop(serve);
    assert_eq!(
        processes_under(&plugin_dir),
        Vec::<u32>::new(),
        "nothing left running"
    );
}
