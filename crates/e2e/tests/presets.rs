//! The ready-made runtimes run what they promise: the example preset its built-ins, the
//! production preset every deployed function, plugins included.
//! One test: the production preset reads `MYCELIUM_PLUGIN_DIR`, set here for this process.

use std::time::Duration;

use mycelium_client::Client;
use mycelium_core::cloudevents::{AttributesReader, AttributesWriter};
use mycelium_registry::{
    ArtifactSource, DeploySpec, NatsRegistry, NatsRegistryConfig, RegistryAdmin,
};
use mycelium_test_support::{event, eventually, NatsServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presets_run_their_functions() {
    let plugin_dir = tempfile::tempdir().unwrap();
    std::env::set_var("MYCELIUM_PLUGIN_DIR", plugin_dir.path());

    // The example preset: the built-ins on an in-memory registry.
    let server = NatsServer::start();
    let example = mycelium_runtime::presets::example_runtime(&server.url())
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
    let client = Client::new(server.connect().await);
    let names: Vec<String> = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name.to_string())
        .collect();
    assert_eq!(names, ["echo", "example"]);
    let reply = client
        .invoke("example", event("e1", json!({})))
        .await
        .unwrap();
    assert_eq!(reply[0].id(), "response-e1");
    example.shutdown().await;

    // The production preset: a plugin deployed to JetStream runs.
    let server = NatsServer::start();
    let production = mycelium_runtime::presets::production_runtime(&server.url())
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
    let admin = NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
        .await
        .unwrap();
    admin
        .deploy(DeploySpec::plugin(
            "echoer".parse().unwrap(),
            ArtifactSource::File(env!("CARGO_BIN_EXE_mycelium-test-plugin").into()),
        ))
        .await
        .unwrap();
    let client = Client::new(server.connect().await);
    let mut request = event("p1", json!({"k": 1}));
    request.set_type("echo");
    let reply = eventually(Duration::from_secs(30), || {
        let (client, request) = (client.clone(), request.clone());
        async move { client.invoke("echoer", request).await.ok() }
    })
    .await;
    assert_eq!(reply[0].id(), "p1");
    assert!(
        plugin_dir.path().join("cache").is_dir(),
        "the binary was cached where MYCELIUM_PLUGIN_DIR says"
    );
    production.shutdown().await;
}
