//! Deploy figures until the benchmark harness lands: the time to deploy a 10 MB binary, and
//! the time from a deploy to the first invocation answered by the new version.
//! Run with `cargo run --release -p mycelium-runtime --example deploy_timing`.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use mycelium_client::Client;
use mycelium_core::cloudevents::AttributesReader;
use mycelium_registry::{
    ArtifactSource, DeploySpec, NatsRegistry, NatsRegistryConfig, RegistryAdmin,
};
use mycelium_runtime::Runtime;
use mycelium_test_support::{event, NatsServer};

#[tokio::main]
async fn main() {
    let server = NatsServer::start();
    let registry = Arc::new(
        NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
            .await
            .unwrap(),
    );
    let runtime = Runtime::builder()
        .standard_builtins()
        .registry(registry.clone())
        .serve(&server.url())
        .await
        .unwrap();
    let admin = NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
        .await
        .unwrap();
    let client = Client::new(server.connect().await);

    let mut samples = Vec::new();
    for round in 0..5u8 {
        let binary: Vec<u8> = (0..10 * 1024 * 1024)
            .map(|i: u32| (i as u8) ^ round)
            .collect();
        let start = Instant::now();
        admin
            .deploy(DeploySpec::plugin(
                "big".parse().unwrap(),
                ArtifactSource::Bytes(Bytes::from(binary)),
            ))
            .await
            .unwrap();
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "deploy of a new 10 MiB binary: median {:?} (min {:?}, max {:?})",
        samples[2], samples[0], samples[4]
    );

    admin
        .deploy(DeploySpec::builtin("svc".parse().unwrap(), "echo"))
        .await
        .unwrap();
    let mut switch = Vec::new();
    for round in 0..20 {
        let entry = if round % 2 == 0 { "example" } else { "echo" };
        let start = Instant::now();
        admin
            .deploy(DeploySpec::builtin("svc".parse().unwrap(), entry))
            .await
            .unwrap();
        loop {
            let events = client
                .invoke("svc", event("probe", serde_json::json!({})))
                .await
                .unwrap();
            let now_example = events[0].id() == "response-probe";
            if now_example == (entry == "example") {
                break;
            }
        }
        switch.push(start.elapsed());
    }
    switch.sort();
    println!(
        "deploy call to first invocation on the new version: median {:?} (p90 {:?}, max {:?})",
        switch[10], switch[18], switch[19]
    );
    runtime.shutdown().await;
}
