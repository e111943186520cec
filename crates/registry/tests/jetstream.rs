//! What only the JetStream registry does: persistence, propagation between instances,
//! corruption behind its back, and a layout plain NATS clients can read.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mycelium_core::FunctionName;
use mycelium_registry::{
    digest, ArtifactCache, ArtifactSource, DeploySpec, FetchErrorKind, LookupErrorKind,
    MemoryRegistry, NatsRegistry, NatsRegistryConfig, OpenErrorKind, Registry, RegistryAdmin,
};
use mycelium_test_support::NatsServer;
use tokio::io::AsyncReadExt;

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

fn plugin(fn_name: &str, bytes: &'static [u8]) -> DeploySpec {
    DeploySpec::plugin(
        name(fn_name),
        ArtifactSource::Bytes(Bytes::from_static(bytes)),
    )
}

async fn open(server: &NatsServer) -> NatsRegistry {
    NatsRegistry::open(server.connect().await, NatsRegistryConfig::default())
        .await
        .unwrap()
}

/// Waits (on the registry's change notifications) for what a change causes.
async fn until<T>(registry: &NatsRegistry, check: impl FnMut(&NatsRegistry) -> Option<T>) -> T {
    registry
        .wait_for(Duration::from_secs(30), check)
        .await
        .expect("the change did not reach the other registry instance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_every_instance() {
    let server = NatsServer::start();
    let writer = open(&server).await;
    let reader = open(&server).await;
    let f = name("spread");

    writer.deploy(plugin("spread", b"one")).await.unwrap();
    assert_eq!(until(&reader, |r| r.get(&f, None).ok()).await.version, 1);
    writer.deploy(plugin("spread", b"two")).await.unwrap();
    until(&reader, |r| r.get(&f, None).ok().filter(|m| m.version == 2)).await;
    writer.rollback(&f, 1).await.unwrap();
    until(&reader, |r| r.get(&f, None).ok().filter(|m| m.version == 1)).await;
    writer.delete(&f).await.unwrap();
    until(&reader, |r| {
        r.get(&f, None)
            .err()
            .filter(|e| e.kind() == LookupErrorKind::FunctionNotFound)
    })
    .await;
    assert!(reader.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_runtime_and_server_restarts() {
    let mut server = NatsServer::start();
    {
        let registry = open(&server).await;
        registry
            .deploy(plugin("durable", b"v1 bytes"))
            .await
            .unwrap();
        registry
            .deploy(plugin("durable", b"v2 bytes"))
            .await
            .unwrap();
        registry.rollback(&name("durable"), 1).await.unwrap();
    }
    // A new instance (a restarted runtime) loads everything.
    let again = open(&server).await;
    assert_eq!(again.get(&name("durable"), None).unwrap().version, 1);
    drop(again);

    // The server restarts from its file store.
    server.kill();
    server.resume();
    let after = open(&server).await;
    let versions = after.versions(&name("durable")).unwrap();
    assert_eq!(versions.versions.len(), 2);
    assert_eq!(versions.active, Some(1));
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(dir.path(), 1 << 20).unwrap();
    let path = cache.fetch(&after, &versions.versions[1]).await.unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"v2 bytes");
    // Numbering continues where it was.
    assert_eq!(
        after
            .deploy(plugin("durable", b"v3 bytes"))
            .await
            .unwrap()
            .version,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_overwritten_behind_the_registry_is_never_used() {
    let server = NatsServer::start();
    let registry = open(&server).await;
    let meta = registry
        .deploy(plugin("victim", b"the real binary"))
        .await
        .unwrap();

    let objects = async_nats::jetstream::new(server.connect().await)
        .get_object_store("mycelium_artifacts")
        .await
        .unwrap();
    let object = digest::object_name(meta.digest.as_deref().unwrap()).unwrap();
    objects
        .put(object.as_str(), &mut &b"an evil binary!"[..])
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(dir.path(), 1 << 20).unwrap();
    let err = cache.fetch(&registry, &meta).await.unwrap_err();
    assert_eq!(err.kind(), FetchErrorKind::Corrupt);
    assert!(err.to_string().contains("was not run"), "{err}");
    assert_eq!(
        mycelium_registry::fetch_protocol_error(&err).code,
        mycelium_core::ErrorCode::ArtifactCorrupt
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing unverified is left"
    );

    // The same holds for the in-memory registry.
    let memory = MemoryRegistry::new();
    let meta = memory
        .deploy(plugin("victim", b"the real binary"))
        .await
        .unwrap();
    memory.tamper_with_artifact(
        meta.digest.as_deref().unwrap(),
        Bytes::from_static(b"the evil binary"),
    );
    assert_eq!(
        cache.fetch(&memory, &meta).await.unwrap_err().kind(),
        FetchErrorKind::Corrupt
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_nats_clients_can_read_the_registry() {
    let server = NatsServer::start();
    let registry = open(&server).await;
    let mut spec = plugin("readable", b"plain bytes");
    spec.description = "for other clients".into();
    registry.deploy(spec.clone()).await.unwrap();
    registry
        .deploy(DeploySpec {
            description: "v2".into(),
            ..spec
        })
        .await
        .unwrap();
    registry
        .deploy(plugin("other", b"plain bytes"))
        .await
        .unwrap();

    let js = async_nats::jetstream::new(server.connect().await);
    let kv = js.get_key_value("mycelium_functions").await.unwrap();
    let active: serde_json::Value =
        serde_json::from_slice(&kv.get("fn.readable.active").await.unwrap().unwrap()).unwrap();
    assert_eq!(active, serde_json::json!({"version": 2}));
    let v1: serde_json::Value =
        serde_json::from_slice(&kv.get("fn.readable.v.1").await.unwrap().unwrap()).unwrap();
    assert_eq!(v1["name"], "readable");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["kind"], "plugin");
    assert_eq!(v1["description"], "for other clients");
    assert_eq!(v1["size"], 11);
    let counter: serde_json::Value =
        serde_json::from_slice(&kv.get("seq.readable").await.unwrap().unwrap()).unwrap();
    assert_eq!(counter, serde_json::json!({"last": 2}));

    // One object for three versions of two functions with the same binary.
    let objects = js.get_object_store("mycelium_artifacts").await.unwrap();
    let names: Vec<String> = objects
        .list()
        .await
        .unwrap()
        .map(|info| info.unwrap().name)
        .collect()
        .await;
    let digest = v1["digest"].as_str().unwrap();
    assert_eq!(names, [digest::object_name(digest).unwrap()]);
    let mut bytes = Vec::new();
    objects
        .get(&names[0])
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    assert_eq!(bytes, b"plain bytes");

    // Deleting both functions removes the object nobody pins any more.
    registry.delete(&name("readable")).await.unwrap();
    assert_eq!(
        objects.list().await.unwrap().count().await,
        1,
        "still pinned by \"other\""
    );
    registry.delete(&name("other")).await.unwrap();
    assert_eq!(objects.list().await.unwrap().count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_without_jetstream_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = mycelium_natsd::ServerOptions::new(dir.path());
    options.binary = Some(mycelium_test_support::nats_server_binary());
    options.jetstream = false;
    let server = mycelium_natsd::NatsServer::spawn(&options).unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let err = NatsRegistry::open(client, NatsRegistryConfig::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), OpenErrorKind::NoJetStream);
    assert!(err.to_string().contains("-js"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_are_replicated_on_a_cluster() {
    let cluster = mycelium_test_support::NatsCluster::start(3);
    let client = cluster.connect().await;
    let config = NatsRegistryConfig {
        replicas: 3,
        ..NatsRegistryConfig::default()
    };
    // The JetStream meta leader is elected shortly after the routes connect.
    let registry = mycelium_test_support::eventually(Duration::from_secs(60), || {
        let (client, config) = (client.clone(), config.clone());
        async move { NatsRegistry::open(client, config).await.ok() }
    })
    .await;
    registry
        .deploy(plugin("replicated", b"r3 bytes"))
        .await
        .unwrap();

    let js = async_nats::jetstream::new(client);
    for stream in ["KV_mycelium_functions", "OBJ_mycelium_artifacts"] {
        let info = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        assert_eq!(
            info.config.storage,
            async_nats::jetstream::stream::StorageType::File,
            "{stream}"
        );
    }
}
