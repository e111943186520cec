//! The harness itself: private servers clean up, clusters form with JetStream.

use std::time::Duration;

use mycelium_test_support::{eventually, NatsCluster, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_is_private_and_cleaned_up() {
    let server = NatsServer::start();
    let dir = server.dir().to_owned();
    let port = server.port();
    assert!(server.url().ends_with(&format!(":{port}")));
    let client = server.connect().await;
    let info = client.server_info();
    assert!(info.jetstream, "JetStream is on");
    drop(client);
    drop(server);
    assert!(!dir.exists(), "the store dir is removed");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_r3_streams() {
    let mut cluster = NatsCluster::start(3);
    let client = cluster.connect().await;
    assert_eq!(cluster.urls().split(',').count(), 3);
    let jetstream = async_nats::jetstream::new(client);
    // The JetStream meta leader is elected after the routes connect.
    let stream = eventually(Duration::from_secs(60), || {
        let jetstream = jetstream.clone();
        async move {
            jetstream
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "harness".into(),
                    subjects: vec!["harness.>".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(stream.cached_info().config.num_replicas, 3);
    assert_eq!(cluster.nodes_mut().len(), 3);
}
