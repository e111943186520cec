//! The client crate against a real nats-server and runtime.

use std::time::Duration;

use mycelium_client::{Client, ConnectErrorKind, ConnectOptions, InvokeOptions, RequestErrorKind};
use mycelium_core::{cloudevents::AttributesReader, ErrorCode, FunctionKind};
use mycelium_natsd::ServerOptions;
use mycelium_runtime::{Runtime, RuntimeHandle};
use mycelium_test_support::{event, functions::Sleeps, NatsServer};
use serde_json::json;

async fn runtime(url: &str) -> RuntimeHandle {
    let (sleeps, _cancelled) = Sleeps::new();
    Runtime::builder()
        .standard_builtins()
        .builtin("sleeps".parse().unwrap(), "sleeps", sleeps)
        .serve(url)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_list_and_describe() {
    let server = NatsServer::start();
    let _runtime = runtime(&server.url()).await;
    let client = ConnectOptions::new(server.url()).connect().await.unwrap();

    let events = client
        .invoke("example", event("123", json!({"key": "value"})))
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id(), "response-123");
    assert_eq!(events[0].source().as_str(), "example-function");

    let input = event("e-1", json!({"n": 1}));
    let mut echoed = client.invoke("echo", input.clone()).await.unwrap();
    // The client started a trace and the event carries it (CloudEvents distributed tracing).
    let traceparent = echoed[0].remove_extension("traceparent").unwrap();
    assert!(
        mycelium_core::TraceContext::parse(&traceparent.to_string(), None).is_ok(),
        "{traceparent}"
    );
    assert_eq!(echoed, vec![input.clone()]);

    let list = client.list().await.unwrap();
    let names: Vec<&str> = list.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["echo", "example", "sleeps"]);
    assert!(list
        .iter()
        .all(|f| f.kind == FunctionKind::Builtin && f.version == 1));

    let echo = client.describe("echo", None).await.unwrap();
    assert_eq!(echo.description, "returns the input event unchanged");

    // Remote errors keep their protocol code and message.
    let err = client.invoke("nobody", input.clone()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        RequestErrorKind::Remote(ErrorCode::FunctionNotFound)
    );
    assert_eq!(
        mycelium_client::remote_code(&err),
        Some(ErrorCode::FunctionNotFound)
    );
    assert!(err.to_string().contains("\"nobody\""), "{err}");
    let err = client
        .invoke_with(
            "echo",
            &input,
            InvokeOptions {
                version: Some(2),
                timeout: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        RequestErrorKind::Remote(ErrorCode::VersionNotFound)
    );
    let err = client.describe("nobody", None).await.unwrap_err();
    assert_eq!(
        err.kind(),
        RequestErrorKind::Remote(ErrorCode::FunctionNotFound)
    );

    // A bad name never leaves the process.
    let err = client.invoke("Bad.Name", input.clone()).await.unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::InvalidName);

    // The per-call timeout reaches the runtime, which answers `timeout`.
    let slow = event("slow", json!({"ms": 600_000}));
    let err = client
        .invoke_with(
            "sleeps",
            &slow,
            InvokeOptions {
                version: None,
                timeout: Some(Duration::from_millis(100)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::Remote(ErrorCode::Timeout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_runtime_is_reported_as_such() {
    let server = NatsServer::start();
    let client = Client::new(server.connect().await);
    let err = client
        .invoke("echo", event("1", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    assert!(err.to_string().contains("mycelium up"), "{err}");
    assert_eq!(
        client.list().await.unwrap_err().kind(),
        RequestErrorKind::NoResponders
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_subject_prefix() {
    let server = NatsServer::start();
    let _runtime = Runtime::builder()
        .config(mycelium_runtime::RuntimeConfig {
            subject_prefix: "team-a.fn".into(),
            ..Default::default()
        })
        .standard_builtins()
        .serve(&server.url())
        .await
        .unwrap();
    let mut options = ConnectOptions::new(server.url());
    options.subject_prefix = "team-a.fn".into();
    let client = options.connect().await.unwrap();
    assert_eq!(
        client
            .invoke("echo", event("p", json!({})))
            .await
            .unwrap()
            .len(),
        1
    );
}

fn server_with_args(args: &[&str]) -> (mycelium_natsd::NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::new(dir.path());
    options.binary = Some(mycelium_test_support::nats_server_binary());
    options.jetstream = false;
    options.extra_args = args.iter().map(|a| a.to_string()).collect();
    (mycelium_natsd::NatsServer::spawn(&options).unwrap(), dir)
}

/// A nats-server started from the configuration `config` (`{DIR}` in it stands for a
/// directory that lives as long as the returned guard).
fn server_with_config(config: &str) -> (mycelium_natsd::NatsServer, [tempfile::TempDir; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, config.replace("{DIR}", dir.path().to_str().unwrap())).unwrap();
    let (server, server_dir) = server_with_args(&["-c", path.to_str().unwrap()]);
    (server, [dir, server_dir])
}

/// Starts a runtime on `client`'s own connection and checks that it answers through it.
async fn runtime_answering(client: &Client, id: &str) -> RuntimeHandle {
    let runtime = Runtime::builder()
        .standard_builtins()
        .build(client.nats().clone())
        .unwrap()
        .start()
        .await
        .unwrap();
    let events = client.invoke("echo", event(id, json!({}))).await.unwrap();
    assert_eq!(events.len(), 1);
    runtime
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_token_authentication() {
    let (server, _dir) = server_with_args(&["--user", "alice", "--pass", "s3cret"]);
    let mut options = ConnectOptions::new(server.url());
    options.user_password = Some(("alice".into(), "s3cret".into()));
    let client = options.connect().await.unwrap();
    let _runtime = runtime_answering(&client, "auth").await;

    options.user_password = Some(("alice".into(), "wrong".into()));
    let err = options.connect().await.unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Connect);

    let (server, _dir) = server_with_args(&["--auth", "t0ken"]);
    let mut options = ConnectOptions::new(server.url());
    options.token = Some("t0ken".into());
    options.connect().await.unwrap();
    options.token = Some("nope".into());
    assert_eq!(
        options.connect().await.unwrap_err().kind(),
        ConnectErrorKind::Connect
    );
}

#[tokio::test]
async fn unreadable_credentials_file_is_a_credentials_error() {
    let mut options = ConnectOptions::new("nats://127.0.0.1:1");
    options.credentials_file = Some("/nonexistent/user.creds".into());
    let err = options.connect().await.unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Credentials);
    assert!(err.to_string().contains("/nonexistent/user.creds"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_summed_over_runtime_instances() {
    let server = NatsServer::start();
    let mut runtimes = Vec::new();
    // Whatever name an instance registers under, it counts if it serves our subjects; an
    // installation on another prefix does not.
    for (service, prefix) in [
        ("mycelium", "function"),
        ("payments-runtime", "function"),
        ("mycelium", "other"),
    ] {
        runtimes.push(
            Runtime::builder()
                .config(mycelium_runtime::RuntimeConfig {
                    service_name: service.into(),
                    subject_prefix: prefix.into(),
                    ..Default::default()
                })
                .standard_builtins()
                .builtin(
                    "fails".parse().unwrap(),
                    "fails",
                    mycelium_test_support::functions::Fails,
                )
                .serve(&server.url())
                .await
                .unwrap(),
        );
    }
    let client = Client::new(server.connect().await);
    for i in 0..10 {
        client
            .invoke("echo", event(&i.to_string(), json!({})))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        client
            .invoke("fails", event("f", json!({})))
            .await
            .unwrap_err();
    }
    let stats = client.stats(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.instances, 2);
    let row = |name: &str| {
        stats
            .functions
            .iter()
            .find(|f| f.function == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        (
            row("echo").invocations,
            row("echo").errors,
            row("echo").in_flight
        ),
        (10, 0, 0)
    );
    assert_eq!((row("fails").invocations, row("fails").errors), (3, 3));
    assert!(row("echo").total_duration_us > 0);
}

/// The permissions README.md documents for a runtime (core NATS subjects; with the in-memory
/// registry), a caller that may invoke, and a reader that may only discover.
const LEAST_PRIVILEGE: &str = r#"
authorization {
  users = [
    { user: runtime, password: rt, permissions: {
        publish: { allow: ["_MYCELIUM.FENCE.>", "function.logs.>"] },
        subscribe: { allow: ["function.invoke", "function.invoke.*", "function.list",
                             "function.describe", "$SRV.>", "_INBOX.>"] },
        allow_responses: true } },
    { user: caller, password: c, permissions: {
        publish: { allow: ["function.invoke", "function.invoke.*", "function.list",
                           "function.describe", "$SRV.>"] },
        subscribe: { allow: ["_INBOX.>"] } } },
    { user: reader, password: r, permissions: {
        publish: { allow: ["function.list", "function.describe"] },
        subscribe: { allow: ["_INBOX.>"] } } }
  ]
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_permissions_decide_who_may_invoke_and_the_runtime_needs_only_its_own() {
    let (server, _dirs) = server_with_config(LEAST_PRIVILEGE);
    let as_user = |user: &str, password: &str| {
        let mut options = ConnectOptions::new(server.url());
        options.user_password = Some((user.into(), password.into()));
        options
    };

    let metrics = std::sync::Arc::new(mycelium_core::InMemoryMetrics::new());
    let runtime_nats = as_user("runtime", "rt").connect_nats().await.unwrap();
    let runtime = Runtime::builder()
        .standard_builtins()
        .metrics(metrics.clone())
        .build(runtime_nats)
        .unwrap()
        .start()
        .await
        .unwrap();

    // The caller invokes and discovers, over plain and binding subjects and $SRV.
    let caller = as_user("caller", "c").connect().await.unwrap();
    assert_eq!(
        caller.invoke("echo", event("c1", json!({}))).await.unwrap()[0].id(),
        "c1"
    );
    assert_eq!(
        caller
            .stats(Duration::from_secs(5))
            .await
            .unwrap()
            .instances,
        1
    );

    // The reader may list but not invoke: its request never reaches the runtime.
    let reader = as_user("reader", "r").connect().await.unwrap();
    assert!(!reader.list().await.unwrap().is_empty());
    let denied = reader
        .invoke_with(
            "echo",
            &event("r1", json!({})),
            InvokeOptions {
                timeout: Some(Duration::from_millis(200)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(denied.kind(), RequestErrorKind::TimedOut, "{denied}");
    assert_eq!(
        metrics.count("echo", mycelium_core::Outcome::Success),
        1,
        "only the caller's invocation ran"
    );

    // Shutting down needs nothing more (its fence request is allowed): it reports no
    // abandoned invocation.
    assert_eq!(runtime.shutdown().await.abandoned, 0);
}

/// A runtime on the JetStream registry: its core subjects plus the JetStream API and the
/// replies of its watchers and downloads (README.md lists the same).
const LEAST_PRIVILEGE_JETSTREAM: &str = r#"
jetstream { store_dir: "{DIR}/store" }
authorization {
  users = [
    { user: runtime, password: rt, permissions: {
        publish: { allow: ["$JS.API.>", "$JS.FC.>", "$JS.ACK.>", "_MYCELIUM.FENCE.>",
                           "function.logs.>"] },
        subscribe: { allow: ["function.invoke", "function.invoke.*", "function.list",
                             "function.describe", "$SRV.>", "_INBOX.>"] },
        allow_responses: true } },
    { user: deployer, password: d, permissions: {
        publish: { allow: ["$JS.API.>", "$JS.FC.>", "$JS.ACK.>", "$O.mycelium_artifacts.>",
                           "$KV.mycelium_functions.>", "$KV.mycelium_secrets.>", "function.>",
                           "$SRV.>"] },
        subscribe: { allow: ["_INBOX.>"] } } }
  ]
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_runtime_works_with_its_documented_permissions() {
    let (server, _dirs) = server_with_config(LEAST_PRIVILEGE_JETSTREAM);
    let as_user = |user: &str, password: &str| {
        let mut options = ConnectOptions::new(server.url());
        options.user_password = Some((user.into(), password.into()));
        options
    };
    // The deployer creates the buckets and deploys; the runtime only reads and watches.
    let deployer = as_user("deployer", "d").connect().await.unwrap();
    let registry = deployer.registry().await.unwrap();
    use mycelium_client::RegistryAdmin;
    let name: mycelium_core::FunctionName = "greeter".parse().unwrap();
    registry
        .deploy(mycelium_client::DeploySpec::builtin(name.clone(), "echo"))
        .await
        .unwrap();

    let runtime_nats = as_user("runtime", "rt").connect_nats().await.unwrap();
    let runtime_registry = mycelium_runtime::presets::open_registry(
        runtime_nats.clone(),
        mycelium_client::NatsRegistryConfig::default(),
    )
    .await
    .unwrap();
    let runtime = Runtime::builder()
        .standard_builtins()
        .registry(runtime_registry.clone())
        .build(runtime_nats)
        .unwrap()
        .start()
        .await
        .unwrap();
    assert_eq!(
        deployer
            .invoke("greeter", event("g1", json!({})))
            .await
            .unwrap()[0]
            .id(),
        "g1"
    );
    // A new version reaches the runtime through its watch.
    let v2 = registry
        .deploy(mycelium_client::DeploySpec::builtin(
            name.clone(),
            "example",
        ))
        .await
        .unwrap()
        .version;
    assert!(
        runtime_registry
            .wait_for_active(&name, v2, Duration::from_secs(30))
            .await
    );
    assert_eq!(
        deployer
            .invoke("greeter", event("g2", json!({})))
            .await
            .unwrap()[0]
            .id(),
        "response-g2"
    );
    assert_eq!(runtime.shutdown().await.abandoned, 0);

    // Secrets: the deployer seals and stores; the runtime reads the bucket and opens what it
    // holds with these permissions (announcing its key, optional, would need a publish more).
    let key = mycelium_client::RuntimeKey::generate();
    let secret: mycelium_core::secret::SecretName = "db".parse().unwrap();
    deployer
        .secrets()
        .await
        .unwrap()
        .set(&secret, "db-password-value", Some(&key.public_key()))
        .await
        .unwrap();
    let runtime_nats = as_user("runtime", "rt").connect_nats().await.unwrap();
    let store = mycelium_client::SecretStore::open(runtime_nats, "mycelium_secrets", 1)
        .await
        .unwrap();
    let catalog = store.catalog().await.unwrap();
    assert_eq!(
        key.open(&catalog.get(&secret).unwrap()).unwrap(),
        "db-password-value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authentication() {
    let user = nkeys::KeyPair::new_user();
    let (server, _dirs) = server_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();

    let mut options = ConnectOptions::new(server.url());
    options.nkey_file = Some(seed_file);
    let client = options.connect().await.unwrap();
    let _runtime = runtime_answering(&client, "nk").await;

    // Another key is refused; an unreadable seed file is a credentials error.
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    options.nkey_file = Some(stranger);
    assert_eq!(
        options.connect().await.unwrap_err().kind(),
        ConnectErrorKind::Connect
    );
    options.nkey_file = Some(dir.path().join("missing.nk"));
    assert_eq!(
        options.connect().await.unwrap_err().kind(),
        ConnectErrorKind::Credentials
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca_and_client_certificates() {
    let pki = mycelium_test_support::TestPki::generate();
    let (server, _dirs) = server_with_config(&pki.server_config());

    let mut options = ConnectOptions::new(server.url());
    options.tls_ca = Some(pki.path("ca.pem"));
    options.tls_client_cert = Some((pki.path("client.pem"), pki.path("client-key.pem")));
    let client = options.connect().await.unwrap();
    let _runtime = runtime_answering(&client, "tls").await;

    // No client certificate: the server refuses. No trusted CA: we refuse the server.
    let mut without_cert = options.clone();
    without_cert.tls_client_cert = None;
    assert_eq!(
        without_cert.connect().await.unwrap_err().kind(),
        ConnectErrorKind::Connect
    );
    let mut without_ca = options.clone();
    without_ca.tls_ca = None;
    assert_eq!(
        without_ca.connect().await.unwrap_err().kind(),
        ConnectErrorKind::Connect
    );
}

/// A NATS JWT signed by `issuer` (the decentralized-auth format nats-server checks).
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{}{}", name, nuid_like()),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = encode(claims.to_string().as_bytes());
    let signature = issuer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", encode(&signature))
}

fn nuid_like() -> String {
    nkeys::KeyPair::new_user().public_key()[1..20].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_authentication_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1});
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "mycelium-test",
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "functions",
        json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "runtime",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
               "type": "user", "version": 2}),
    );
    let (server, _dirs) = server_with_config(&format!(
        "operator: {operator_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt}\n}}\n",
        account.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("runtime.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();

    let mut options = ConnectOptions::new(server.url());
    options.credentials_file = Some(creds);
    let client = options.connect().await.unwrap();
    let _runtime = runtime_answering(&client, "jwt").await;

    // A user without credentials is refused.
    let anonymous = ConnectOptions::new(server.url())
        .connect()
        .await
        .unwrap_err();
    assert_eq!(anonymous.kind(), ConnectErrorKind::Connect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_give_the_last_kept_lines_then_the_live_ones() {
    use mycelium_client::{LogsErrorKind, LogsOptions};
    use mycelium_core::logs::{LogRecord, LOG_STREAM};

    let server = NatsServer::start();
    let nats = server.connect().await;
    let client = Client::new(nats.clone());
    let history_only = LogsOptions {
        lines: 2,
        follow: false,
    };
    let error = client.logs("quiet", history_only).await.unwrap_err();
    assert_eq!(error.kind(), LogsErrorKind::NoHistory, "{error}");
    assert_eq!(
        client
            .logs("not a name", history_only)
            .await
            .unwrap_err()
            .kind(),
        LogsErrorKind::InvalidName
    );

    // The stream as a runtime makes it, with three lines of `chatty` and one of another.
    let jetstream = async_nats::jetstream::new(nats.clone());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: LOG_STREAM.into(),
            subjects: vec!["function.logs.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let line = |n: u64| {
        let record = LogRecord::now(
            "info",
            "chatty".parse().unwrap(),
            n,
            "stdout",
            format!("line {n}"),
        );
        serde_json::to_vec(&record).unwrap().into()
    };
    for n in 1..=3 {
        jetstream
            .publish("function.logs.chatty", line(n))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    jetstream
        .publish("function.logs.other", line(9))
        .await
        .unwrap()
        .await
        .unwrap();

    let messages = |lines: &[mycelium_client::LogLine]| -> Vec<String> {
        lines.iter().map(|l| l.record().unwrap().message).collect()
    };
    let log = client.logs("chatty", history_only).await.unwrap();
    assert_eq!(messages(&log.history), ["line 2", "line 3"]);

    let mut log = client
        .logs(
            "chatty",
            LogsOptions {
                lines: 10,
                follow: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(messages(&log.history), ["line 1", "line 2", "line 3"]);
    jetstream
        .publish("function.logs.chatty", line(4))
        .await
        .unwrap()
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), log.next())
        .await
        .expect("the live line arrives")
        .unwrap()
        .unwrap();
    assert_eq!(next.record().unwrap().message, "line 4");
}
