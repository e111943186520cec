//! A quick sequential latency probe until the benchmark harness lands: a bare NATS
//! echo responder versus the built-in `echo` through `function.invoke`, same body size,
//! same server, same run. Run with `cargo run --release -p mycelium-runtime --example latency`.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mycelium_runtime::Runtime;
use mycelium_test_support::NatsServer;

const ROUNDS: usize = 20_000;

fn summarize(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:<24} p50 {:>7.1} µs  p90 {:>7.1} µs  p99 {:>7.1} µs  mean {:>7.1} µs",
        pick(0.5).as_secs_f64() * 1e6,
        pick(0.9).as_secs_f64() * 1e6,
        pick(0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
    );
}

async fn measure(nats: &async_nats::Client, subject: &str, body: &bytes::Bytes) -> Vec<Duration> {
    for _ in 0..1000 {
        nats.request(subject.to_owned(), body.clone())
            .await
            .unwrap();
    }
    let mut samples = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        nats.request(subject.to_owned(), body.clone())
            .await
            .unwrap();
        samples.push(start.elapsed());
    }
    samples
}

#[tokio::main]
async fn main() {
    let server = NatsServer::start();
    let runtime = Runtime::builder()
        .standard_builtins()
        .serve(&server.url())
        .await
        .unwrap();

    let responder = server.connect().await;
    let mut echo_requests = responder.subscribe("bench.echo").await.unwrap();
    tokio::spawn(async move {
        while let Some(message) = echo_requests.next().await {
            if let Some(reply) = message.reply {
                responder.publish(reply, message.payload).await.unwrap();
            }
        }
    });

    let nats = server.connect().await;
    let body = bytes::Bytes::from_static(
        br#"{"functionName":"echo","event":{"specversion":"1.0","id":"1","source":"bench","type":"com.example.bench","datacontenttype":"application/json","data":{"key":"value"}}}"#,
    );
    println!("{ROUNDS} sequential requests, {} byte body", body.len());
    summarize(
        "nats-echo (baseline)",
        measure(&nats, "bench.echo", &body).await,
    );
    summarize(
        "function.invoke echo",
        measure(&nats, "function.invoke", &body).await,
    );
    runtime.shutdown().await;
}
