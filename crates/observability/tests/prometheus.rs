//! A scrape after a known mix of outcomes shows exactly those counts.

use std::{io::Read, io::Write, sync::Arc};

use mycelium_observability::{serve_metrics, PrometheusMetrics};
use mycelium_runtime::Runtime;
use mycelium_test_support::{
    functions::{Fails, Sleeps},
    NatsServer,
};
use serde_json::json;

fn scrape(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_exact_counts() {
    let server = NatsServer::start();
    let metrics = Arc::new(PrometheusMetrics::new());
    let (sleeps, _cancelled) = Sleeps::new();
    let _runtime = Runtime::builder()
        .standard_builtins()
        .builtin("fails".parse().unwrap(), "fails", Fails)
        .builtin("sleeps".parse().unwrap(), "sleeps", sleeps)
        .metrics(metrics.clone())
        .serve(&server.url())
        .await
        .unwrap();
    let (addr, _server_task) = serve_metrics("127.0.0.1:0".parse().unwrap(), metrics.clone())
        .await
        .unwrap();

    let nats = server.connect().await;
    let call = |function: &str, extra: serde_json::Value| {
        let mut request = json!({"functionName": function, "event": {"id": "1", "source": "s", "type": "t", "data": {"ms": 600_000}}});
        if let (Some(object), Some(extra)) = (request.as_object_mut(), extra.as_object()) {
            object.extend(extra.clone());
        }
        let nats = nats.clone();
        async move {
            nats.request(
                "function.invoke",
                serde_json::to_vec(&request).unwrap().into(),
            )
            .await
            .unwrap()
        }
    };
    for _ in 0..3 {
        call("echo", json!({})).await;
    }
    for _ in 0..2 {
        call("fails", json!({})).await;
    }
    call("sleeps", json!({"timeoutMs": 50})).await;
    // Names nobody registered count under their code only: a caller sending a thousand
    // made-up names must not make a thousand series.
    for i in 0..50 {
        call(&format!("no-such-{i}"), json!({})).await;
    }
    nats.request("function.invoke", "not json".into())
        .await
        .unwrap();

    let response = tokio::task::spawn_blocking(move || scrape(addr, "/metrics"))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for line in [
        r#"mycelium_invocations_total{function="echo",version="1",outcome="success"} 3"#,
        r#"mycelium_invocations_total{function="fails",version="1",outcome="function_error"} 2"#,
        r#"mycelium_invocations_total{function="sleeps",version="1",outcome="timeout"} 1"#,
        r#"mycelium_requests_rejected_total{code="function_not_found"} 50"#,
        r#"mycelium_requests_rejected_total{code="invalid_request"} 1"#,
        r#"mycelium_invocation_duration_seconds_count{function="echo"} 3"#,
        r#"mycelium_invocation_duration_seconds_count{function="sleeps"} 1"#,
        r#"mycelium_invocations_in_flight{function="echo"} 0"#,
    ] {
        assert!(
            response.lines().any(|l| l == line),
            "missing {line:?} in:\n{response}"
        );
    }
    assert!(!response.contains("invocation_id"), "no unbounded labels");
    assert!(!response.contains("no-such"), "no series per unknown name");
    let rows = mycelium_core::MetricsCollector::function_stats(metrics.as_ref());
    assert!(
        rows.iter().all(|row| !row.function.starts_with("no-such")),
        "no stats row per unknown name: {:?}",
        rows.iter().map(|r| &r.function).collect::<Vec<_>>()
    );
    let rss = response
        .lines()
        .find_map(|l| l.strip_prefix("mycelium_process_resident_memory_bytes "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the runtime's resident memory");
    assert!(rss > 1 << 20, "{rss}");
    let not_found = tokio::task::spawn_blocking(move || scrape(addr, "/"))
        .await
        .unwrap();
    assert!(not_found.starts_with("HTTP/1.1 404"), "{not_found}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_artifact_fetches_are_counted() {
    let mut server = NatsServer::start();
    let metrics = Arc::new(PrometheusMetrics::new());
    let nats = server.connect().await;
    metrics.watch_nats(&nats);
    assert!(metrics
        .render()
        .contains("mycelium_nats_reconnects_total 0\n"));

    server.kill();
    server.resume();
    let statistics = nats.statistics();
    mycelium_test_support::eventually(std::time::Duration::from_secs(30), || {
        let connects = statistics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        async move { (connects >= 2).then_some(()) }
    })
    .await;
    assert!(
        metrics
            .render()
            .contains("mycelium_nats_reconnects_total 1\n"),
        "{}",
        metrics.render()
    );

    use mycelium_core::MetricsCollector;
    let name = "thumbs".parse().unwrap();
    metrics.artifact_fetched(&name, true);
    metrics.artifact_fetched(&name, false);
    metrics.artifact_fetched(&name, false);
    let text = metrics.render();
    for line in [
        r#"mycelium_plugin_artifact_fetches_total{function="thumbs",source="registry"} 1"#,
        r#"mycelium_plugin_artifact_fetches_total{function="thumbs",source="cache"} 2"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}
