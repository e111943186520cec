//! Secrets end to end: `mycelium secret set|list|delete`, `deploy --secret`, and `mycelium
//! serve` runtimes opening them with their xkey, on a real nats-server, with the real test
//! plugin and a real WebAssembly guest.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use mycelium_client::{async_nats::jetstream, Client, RequestErrorKind, RuntimeKey};
use mycelium_core::{ErrorCode, Event};
use mycelium_test_support::{
    event, eventually, free_port, wasm_guest, ChildGuard as Running, NatsServer,
};
use serde_json::{json, Value};

mod common;

use common::{mycelium, scrape_metrics, sibling_binary, succeeded, wait_for_instances};

const FIRST: &str = "first-Secret-Value-7f3a";
const SECOND: &str = "second-Secret-Value-91c2";

/// A nats-server, one runtime with its own xkey (its log kept in a file), and every CLI
/// output collected, to be searched for secret values at the end.
struct Fixture {
    server: NatsServer,
    runtime: Option<Running>,
    client: Client,
    dir: tempfile::TempDir,
    key: RuntimeKey,
    metrics_port: u16,
    outputs: std::sync::Mutex<Vec<u8>>,
}

impl Fixture {
    /// The runtime's seed in a file (`--xkey-seed-file`), or in `MYCELIUM_XKEY_SEED`.
    async fn new(seed_in_env: bool) -> Self {
        let server = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let key = RuntimeKey::generate();
        let mut f = Self {
            client: Client::new(server.connect().await),
            server,
            runtime: None,
            dir,
            key,
            metrics_port: free_port(),
            outputs: std::sync::Mutex::default(),
        };
        f.runtime = Some(f.serve_with(&f.key.seed(), "runtime", seed_in_env));
        wait_for_instances(&f.client, 1).await;
        f
    }

    /// `mycelium serve` with the xkey `seed`, logging at info into `<log>.log`.
    fn serve_with(&self, seed: &str, log: &str, seed_in_env: bool) -> Running {
        let log_file = std::fs::File::create(self.dir.path().join(format!("{log}.log"))).unwrap();
        let mut command = mycelium();
        command
            .env("RUST_LOG", "info")
            .args(["--nats-url", &self.server.url(), "serve", "--plugin-dir"])
            .arg(self.dir.path().join(format!("{log}-plugins")))
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .stdout(Stdio::null())
            .stderr(log_file);
        if seed_in_env {
            command.env("MYCELIUM_XKEY_SEED", seed);
        } else {
            let seed_file = self.dir.path().join(format!("{log}.seed"));
            std::fs::write(&seed_file, seed).unwrap();
            command.arg("--xkey-seed-file").arg(&seed_file);
        }
        Running(command.spawn().unwrap())
    }

    fn runtime_log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{log}.log"))).unwrap()
    }

    /// `mycelium ARGS...` with `stdin`, its output kept for the final search.
    fn cli_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let output = run_with_stdin(&self.server.url(), args, stdin);
        let mut outputs = self.outputs.lock().unwrap();
        outputs.extend_from_slice(&output.stdout);
        outputs.extend_from_slice(&output.stderr);
        output
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, b"")
    }

    fn set_secret(&self, name: &str, value: &str) -> String {
        succeeded(&self.cli_with_stdin(&["secret", "set", name], format!("{value}\n").as_bytes()))
    }

    async fn getenv(&self, function: &str, variable: &str) -> Result<Value, ErrorCode> {
        let reply = self
            .client
            .invoke(function, call("getenv", json!({"name": variable})))
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::Remote(code) => code,
                other => panic!("{function}: {other:?} {e}"),
            })?;
        Ok(data(&reply[0])["value"].clone())
    }

    async fn pid(&self, function: &str) -> u64 {
        let reply = self.client.invoke(function, call("pid", json!({}))).await;
        data(&reply.unwrap()[0])["pid"].as_u64().unwrap()
    }

    /// Waits until the runtime knows each of `functions` (its registry watch has the deploys).
    async fn known(&self, functions: &[&str]) {
        for function in functions {
            eventually(Duration::from_secs(30), || async {
                self.client.describe(function, None).await.ok()
            })
            .await;
        }
    }

    /// The environment the `env` guest deployed as `wasm-secret` sees, `|`-separated.
    async fn wasm_env(&self, id: &str) -> String {
        let reply = self
            .client
            .invoke("wasm-secret", event(id, json!({})))
            .await
            .unwrap();
        data(&reply[0]).as_str().unwrap().to_owned()
    }

    fn wasm(&self) -> PathBuf {
        let path = self.dir.path().join("env.wasm");
        std::fs::write(&path, wasm_guest("env")).unwrap();
        path
    }

    /// Everything stored for the secrets bucket: its stream's raw messages and the server's
    /// files.
    async fn stored_bytes(&self) -> Vec<u8> {
        let js = jetstream::new(self.server.connect().await);
        let mut stream = js.get_stream("KV_mycelium_secrets").await.unwrap();
        let info = stream.info().await.unwrap().clone();
        let mut bytes = Vec::new();
        for sequence in info.state.first_sequence..=info.state.last_sequence {
            if let Ok(message) = stream.get_raw_message(sequence).await {
                bytes.extend_from_slice(message.subject.as_bytes());
                bytes.extend_from_slice(&message.payload);
            }
        }
        assert!(
            !bytes.is_empty(),
            "the secrets stream holds nothing: {info:?}"
        );
        bytes.extend(files_under(self.server.dir()));
        bytes
    }
}

/// `mycelium --nats-url URL ARGS...` with `stdin`, to its end.
fn run_with_stdin(url: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = mycelium()
        .args(["--nats-url", url])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn files_under(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes.extend(files_under(&path));
        } else if let Ok(content) = std::fs::read(&path) {
            bytes.extend(content);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn call(ty: &str, data: Value) -> Event {
    use mycelium_core::cloudevents::{EventBuilder, EventBuilderV10};
    EventBuilderV10::new()
        .id(format!("{ty}-call"))
        .source("/secrets-test")
        .ty(ty)
        .data("application/json", data)
        .build()
        .unwrap()
}

fn data(event: &Event) -> Value {
    match event.data() {
        Some(mycelium_core::cloudevents::Data::Json(value)) => value.clone(),
        Some(mycelium_core::cloudevents::Data::String(text)) => Value::String(text.clone()),
        other => panic!("unexpected data {other:?}"),
    }
}

fn stderr_of(output: &Output) -> String {
    assert!(!output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_only_the_functions_that_name_them_and_are_never_printed() {
    let Some(plugin) = sibling_binary("mycelium-test-plugin", "mycelium-e2e") else {
        return;
    };
    let f = Fixture::new(false).await;
    let plugin = plugin.to_str().unwrap();

    let set = f.set_secret("db-password", FIRST);
    assert_eq!(
        set.trim(),
        format!(
            "secret db-password set: v1 (sealed for {})",
            f.key.public_key()
        )
    );
    // Sealed before it left the CLI: nothing stored holds the value.
    let stored = f.stored_bytes().await;
    assert!(contains(&stored, "secret.db-password"));
    assert!(!contains(&stored, FIRST), "the plaintext is stored");

    succeeded(&f.cli(&[
        "deploy",
        "with-secret",
        plugin,
        "--secret",
        "DB_PASSWORD=db-password",
    ]));
    succeeded(&f.cli(&["deploy", "without-secret", plugin]));
    let wasm = f.wasm();
    succeeded(&f.cli(&[
        "deploy",
        "wasm-secret",
        wasm.to_str().unwrap(),
        "--secret",
        "DB_PASSWORD=db-password",
    ]));

    f.known(&["with-secret", "without-secret", "wasm-secret"])
        .await;
    // The runtime's watch of the secrets bucket may lag the deploys' by a moment.
    eventually(Duration::from_secs(30), || async {
        (f.getenv("with-secret", "DB_PASSWORD").await == Ok(json!(FIRST))).then_some(())
    })
    .await;
    assert_eq!(
        f.getenv("without-secret", "DB_PASSWORD").await,
        Ok(Value::Null)
    );
    let wasm_env = f.wasm_env("w1").await;
    assert!(
        wasm_env
            .split('|')
            .any(|entry| entry == format!("DB_PASSWORD={FIRST}")),
        "{wasm_env}"
    );

    // `describe` and `versions` show the reference, never a value.
    let described: Value =
        serde_json::from_str(&succeeded(&f.cli(&["describe", "with-secret", "--json"]))).unwrap();
    assert_eq!(described["secrets"], json!({"DB_PASSWORD": "db-password"}));
    succeeded(&f.cli(&["describe", "with-secret"]));
    succeeded(&f.cli(&["versions", "with-secret"]));

    // A function printing its secret: its logs carry `[redacted]` instead.
    succeeded(&f.cli(&[
        "invoke",
        "with-secret",
        "--type",
        "printenv",
        "--data",
        r#"{"name": "DB_PASSWORD"}"#,
    ]));
    let logged = eventually(Duration::from_secs(30), || async {
        let output = f.cli(&["logs", "with-secret"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        (text.contains("stdout DB_PASSWORD=") && text.contains("stderr DB_PASSWORD="))
            .then_some(text)
    })
    .await;
    assert!(logged.contains("DB_PASSWORD=[redacted]"), "{logged}");
    let wasm_logged = eventually(Duration::from_secs(30), || async {
        let output = f.cli(&["logs", "wasm-secret"]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.contains("DB_PASSWORD=").then_some(text)
    })
    .await;
    assert!(
        wasm_logged.contains("DB_PASSWORD=[redacted]"),
        "{wasm_logged}"
    );

    // Rotation: the next process gets the new value; a call in flight finishes on the old
    // one, which then stops.
    let old_pid = f.pid("with-secret").await;
    let in_flight = {
        let client = f.client.clone();
        tokio::spawn(async move {
            client
                .invoke("with-secret", call("sleep", json!({"ms": 3000})))
                .await
        })
    };
    eventually(Duration::from_secs(30), || async {
        let stats = f.client.stats(Duration::from_secs(1)).await.ok()?;
        let row = stats
            .functions
            .iter()
            .find(|r| r.function == "with-secret")?;
        (row.in_flight == 1).then_some(())
    })
    .await;
    assert!(f.set_secret("db-password", SECOND).contains(": v2 "));
    eventually(Duration::from_secs(30), || async {
        (f.getenv("with-secret", "DB_PASSWORD").await == Ok(json!(SECOND))).then_some(())
    })
    .await;
    assert_ne!(
        f.pid("with-secret").await,
        old_pid,
        "the same process kept running"
    );
    let finished = in_flight.await.unwrap().expect("the call in flight failed");
    assert_eq!(
        data(&finished[0])["pid"],
        json!(old_pid),
        "it ran on the old process"
    );
    eventually(Duration::from_secs(30), || async {
        (!common::is_alive(old_pid as u32)).then_some(())
    })
    .await;
    succeeded(&f.cli(&["stats"]));
    succeeded(&f.cli(&["stats", "--json"]));
    assert_eq!(
        f.getenv("without-secret", "DB_PASSWORD").await,
        Ok(Value::Null)
    );
    let wasm_env = f.wasm_env("w2").await;
    assert!(
        wasm_env.contains(&format!("DB_PASSWORD={SECOND}")),
        "the WebAssembly instance has the old value"
    );

    let listed = succeeded(&f.cli(&["secret", "list"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with("db-password"))
        .unwrap();
    // Columns line up under the header.
    assert!(
        listed.starts_with(&format!("{:<32} {:>7}  UPDATED\n", "NAME", "VERSION")),
        "{listed}"
    );
    assert!(
        row.starts_with(&format!("{:<32} {:>7}  ", "db-password", "v2")),
        "{listed}"
    );
    let listed: Value =
        serde_json::from_str(&succeeded(&f.cli(&["secret", "list", "--json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "db-password");
    assert_eq!(listed[0]["version"], 2);
    assert_eq!(listed[0]["recipient"], f.key.public_key().as_str());

    // Deleted: the function that names it fails by the secret's name; the others run on.
    assert_eq!(
        succeeded(&f.cli(&["secret", "delete", "db-password"])).trim(),
        "secret db-password deleted"
    );
    let error = eventually(Duration::from_secs(30), || async {
        f.getenv("with-secret", "DB_PASSWORD").await.err()
    })
    .await;
    assert_eq!(error, ErrorCode::SecretUnavailable);
    let message = stderr_of(&f.cli(&["invoke", "with-secret", "--type", "echo"]));
    assert!(
        message.starts_with("error[secret_unavailable]")
            && message
                .contains("needs secret \"db-password\" (as DB_PASSWORD), which does not exist"),
        "{message}"
    );
    assert_eq!(f.getenv("without-secret", "X").await, Ok(Value::Null));
    let again = stderr_of(&f.cli(&["secret", "delete", "db-password"]));
    assert!(again.starts_with("error[secret_not_found]"), "{again}");

    // Nothing printed anywhere holds either value: CLI output, the runtime's log, metrics.
    let metrics = scrape_metrics(f.metrics_port).unwrap();
    assert!(
        metrics.contains("with_secret") || metrics.contains("with-secret"),
        "{metrics}"
    );
    let outputs = f.outputs.lock().unwrap().clone();
    let log = f.runtime_log("runtime");
    assert!(log.contains("secret_unavailable"), "{log}");
    for value in [FIRST, SECOND] {
        assert!(!contains(&outputs, value), "a CLI output holds {value}");
        assert!(!log.contains(value), "the runtime's log holds {value}");
        assert!(!metrics.contains(value), "the metrics hold {value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_cannot_open_a_secret_says_which_and_runs_everything_else() {
    let Some(plugin) = sibling_binary("mycelium-test-plugin", "mycelium-e2e") else {
        return;
    };
    let f = Fixture::new(true).await;
    let plugin = plugin.to_str().unwrap();

    // Sealed for a key this runtime does not hold.
    let elsewhere = RuntimeKey::generate();
    let output = f.cli_with_stdin(
        &[
            "secret",
            "set",
            "api-token",
            "--public-xkey",
            &elsewhere.public_key(),
        ],
        FIRST.as_bytes(),
    );
    succeeded(&output);
    succeeded(&f.cli(&[
        "deploy",
        "needs-token",
        plugin,
        "--secret",
        "TOKEN=api-token",
    ]));
    succeeded(&f.cli(&["deploy", "plain", plugin]));
    f.known(&["needs-token", "plain"]).await;
    let message = stderr_of(&f.cli(&["invoke", "needs-token", "--type", "echo"]));
    assert!(
        message.starts_with("error[secret_unavailable]"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "secret \"api-token\" v1 is sealed for the xkey {} and this runtime holds {}",
            elsewhere.public_key(),
            f.key.public_key()
        )),
        "{message}"
    );
    assert_eq!(f.getenv("plain", "TOKEN").await, Ok(Value::Null));
    // The runtime's own key, given in its environment, is not in a plugin's.
    assert_eq!(
        f.getenv("plain", "MYCELIUM_XKEY_SEED").await,
        Ok(Value::Null)
    );
    let log = eventually(Duration::from_secs(30), || async {
        let log = f.runtime_log("runtime");
        log.contains("api-token").then_some(log)
    })
    .await;
    let line = log.lines().find(|l| l.contains("api-token")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("needs-token"),
        "{line}"
    );

    // Sealed for this runtime, then altered in the bucket: refused, by name.
    succeeded(&f.cli_with_stdin(&["secret", "set", "api-token"], FIRST.as_bytes()));
    eventually(Duration::from_secs(30), || async {
        (f.getenv("needs-token", "TOKEN").await == Ok(json!(FIRST))).then_some(())
    })
    .await;
    let js = jetstream::new(f.server.connect().await);
    let kv = js.get_key_value("mycelium_secrets").await.unwrap();
    let mut record: Value =
        serde_json::from_slice(&kv.get("secret.api-token").await.unwrap().unwrap()).unwrap();
    // One base64 character in the middle of the box changed: still base64, no longer sealed.
    let mut sealed: Vec<char> = record["sealed"].as_str().unwrap().chars().collect();
    let middle = sealed.len() / 2;
    sealed[middle] = if sealed[middle] == 'A' { 'B' } else { 'A' };
    record["sealed"] = json!(sealed.into_iter().collect::<String>());
    kv.put(
        "secret.api-token",
        serde_json::to_vec(&record).unwrap().into(),
    )
    .await
    .unwrap();
    let error = eventually(Duration::from_secs(30), || async {
        f.getenv("needs-token", "TOKEN").await.err()
    })
    .await;
    assert_eq!(error, ErrorCode::SecretUnavailable);
    let message = stderr_of(&f.cli(&["invoke", "needs-token", "--type", "echo"]));
    assert!(
        message.contains("secret \"api-token\" v2 cannot be opened: its sealed value was altered"),
        "{message}"
    );
    assert_eq!(f.getenv("plain", "TOKEN").await, Ok(Value::Null));

    // Deploy checks: a bad variable, a secret that is also an --env, a built-in.
    for (args, expected) in [
        (
            vec!["deploy", "bad", plugin, "--secret", "1X=api-token"],
            "invalid environment variable name",
        ),
        (
            vec!["deploy", "bad", plugin, "--secret", "X=api.token"],
            "invalid secret name",
        ),
        (
            vec![
                "deploy",
                "bad",
                plugin,
                "--secret",
                "X=api-token",
                "--env",
                "X=1",
            ],
            "X is given both as an environment variable and as a secret",
        ),
        (
            vec![
                "deploy",
                "bad",
                "--builtin",
                "echo",
                "--secret",
                "X=api-token",
            ],
            "secrets are for plugins and WebAssembly modules",
        ),
    ] {
        let message = stderr_of(&f.cli(&args));
        assert!(
            message.starts_with("error[invalid_request]") && message.contains(expected),
            "{args:?}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_set_needs_a_value_and_a_key_to_seal_for() {
    let server = NatsServer::start();
    let cli = |args: &[&str], stdin: &[u8]| run_with_stdin(&server.url(), args, stdin);
    // No runtime has announced a key yet.
    let message = stderr_of(&cli(&["secret", "set", "db"], b"value"));
    assert!(message.starts_with("error[no_xkey]"), "{message}");
    let key = RuntimeKey::generate().public_key();
    let empty = stderr_of(&cli(&["secret", "set", "db", "--public-xkey", &key], b"\n"));
    assert!(
        empty.starts_with("error[invalid_secret]") && empty.contains("empty"),
        "{empty}"
    );
    let bad_name = stderr_of(&cli(&["secret", "set", "a.b", "--public-xkey", &key], b"v"));
    assert!(bad_name.starts_with("error[invalid_secret]"), "{bad_name}");
    let bad_key = stderr_of(&cli(
        &["secret", "set", "db", "--public-xkey", "UABC"],
        b"v",
    ));
    assert!(bad_key.starts_with("error[invalid_secret]"), "{bad_key}");

    // From a file, taken as it is (a trailing newline kept).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, "line\n").unwrap();
    let set = succeeded(&cli(
        &[
            "secret",
            "set",
            "db",
            "--from-file",
            file.to_str().unwrap(),
            "--public-xkey",
            &key,
            "--json",
        ],
        b"",
    ));
    let set: Value = serde_json::from_str(&set).unwrap();
    assert_eq!(set["version"], 1);
    assert_eq!(set["recipient"], key.as_str());
    let listed = succeeded(&cli(&["secret", "list"], b""));
    assert_eq!(listed.lines().count(), 2, "{listed}");

    // A runtime given a seed that is not one refuses to start, saying which.
    let bad = dir.path().join("bad.seed");
    std::fs::write(&bad, "SUNOTANXKEY").unwrap();
    let output = cli(&["serve", "--xkey-seed-file", bad.to_str().unwrap()], b"");
    let message = stderr_of(&output);
    assert!(
        message.starts_with("error[config]") && message.contains("bad.seed"),
        "{message}"
    );
    assert!(!message.contains("SUNOTANXKEY"), "{message}");
}
