//! What integration tests share: a private nats-server per test (free port, JetStream,
//! its own temp store, killed and removed on drop), a 3-node cluster, CloudEvent
//! builders and event-driven waiting.

pub mod otlp;

use std::{future::Future, path::Path, time::Duration};

use mycelium_core::{
    cloudevents::{EventBuilder, EventBuilderV10},
    Event,
};
use mycelium_natsd::{ClusterOptions, ServerOptions};
use tempfile::TempDir;

/// A private nats-server for one test.
pub struct NatsServer {
    process: Option<mycelium_natsd::NatsServer>,
    options: ServerOptions,
    // Declared last: dropped after the process is killed.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a nats-server with JetStream on a free loopback port.
    ///
    /// # Panics
    /// When no nats-server is installed, with the command that installs one.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mycelium-nats-")
            .tempdir()
            .expect("creating a temp dir for nats-server");
        Self::start_with(ServerOptions::new(dir.path()), dir)
    }

    fn start_with(options: ServerOptions, dir: TempDir) -> Self {
        Self::try_start_with(options, dir).unwrap_or_else(|e| {
            panic!("starting a test nats-server failed: {e}\n(hint: run the test suite with `./dev test`, which installs nats-server)")
        })
    }

    fn try_start_with(
        mut options: ServerOptions,
        dir: TempDir,
    ) -> Result<Self, mycelium_core::Error<mycelium_natsd::SpawnErrorKind>> {
        options.binary = options.binary.or_else(workspace_tools_binary);
        let process = mycelium_natsd::NatsServer::spawn(&options)?;
        // Pin the port so a restart comes back where clients reconnect.
        options.port = Some(process.port());
        Ok(Self {
            process: Some(process),
            options,
            dir,
        })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// The client port (stable across restarts).
    pub fn port(&self) -> u16 {
        self.options
            .port
            .expect("port is pinned after the first start")
    }

    /// The server's working directory (store, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server abruptly, as a crash would. [`NatsServer::resume`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and store after [`NatsServer::kill`].
    pub fn resume(&mut self) {
        assert!(self.process.is_none(), "resume() needs a killed server");
        self.process = Some(spawn(&self.options));
    }

    /// A plain NATS connection to this server.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to the test nats-server at {}: {e}", self.url()))
    }
}

fn spawn(options: &ServerOptions) -> mycelium_natsd::NatsServer {
    let mut options = options.clone();
    options.binary = options.binary.or_else(workspace_tools_binary);
    mycelium_natsd::NatsServer::spawn(&options).unwrap_or_else(|e| {
        panic!("starting a test nats-server failed: {e}\n(hint: run the test suite with `./dev test`, which installs nats-server)")
    })
}

/// The nats-server binary tests use (for processes that start their own, like `mycelium up`).
pub fn nats_server_binary() -> std::path::PathBuf {
    workspace_tools_binary()
        .map(Ok)
        .unwrap_or_else(mycelium_natsd::find_binary)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Sends SIGTERM to a process, as `kill` or a service manager would.
pub fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM);
}

/// Sends SIGINT to a process, as Ctrl-C at its terminal would.
pub fn interrupt(pid: u32) {
    signal(pid, libc::SIGINT);
}

/// Sends SIGKILL to a process, as `kill -9` would.
pub fn kill_now(pid: u32) {
    signal(pid, libc::SIGKILL);
}

#[allow(unsafe_code)]
fn signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Builds the example Go plugin (`examples/go-plugin/build.sh`) into `out`; `false` (the test
/// skips, saying so) without Debian's Go packages, unless `MYCELIUM_GO_REQUIRED` is set (CI).
pub fn go_plugin(out: &Path) -> bool {
    build_example("go-plugin/build.sh", out, &[], "MYCELIUM_GO_REQUIRED", "Go")
}

/// Builds go-plugin's own Go host for the example plugin (`examples/go-plugin/host`, what the
/// benchmarks compare with) into `out`; `false`, after saying so, when Go is missing, as
/// [`go_plugin`].
pub fn go_plugin_host(out: &Path) -> bool {
    build_example(
        "go-plugin/build.sh",
        out,
        &["--host"],
        "MYCELIUM_GO_REQUIRED",
        "Go",
    )
}

/// Builds the WebAssembly examples (`examples/build-wasm.sh`: `upper.wasm` from C,
/// `wordcount.wasm` from Rust) into the directory `out`; `false` (the test skips, saying so)
/// without Debian's clang, wasi-libc and wasm32 Rust packages, unless
/// `MYCELIUM_WASM_REQUIRED` is set (CI).
pub fn wasm_examples(out: &Path) -> bool {
    build_example(
        "build-wasm.sh",
        out,
        &[],
        "MYCELIUM_WASM_REQUIRED",
        "WebAssembly (clang, wasi-libc, wasm32 Rust)",
    )
}

/// Runs `examples/<script> OUT ARGS...`; a script exiting 3 lacks its toolchain.
fn build_example(script: &str, out: &Path, args: &[&str], required: &str, what: &str) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(script);
    let output = std::process::Command::new(&script)
        .arg(out)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    if output.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.code() == Some(3) && std::env::var_os(required).is_none(),
        "building with {what} failed: {why}"
    );
    eprintln!("SKIPPED: this test needs Debian's {what} packages: {why}");
    false
}

/// The test guest `guests/<name>.wat` as a WebAssembly module: WASI preview 1 programs with
/// one behaviour each (echo, counter, spin, grow, trap, flood, open, exit, env, chatty), written in
/// WAT so the executor's edge cases are tested on any machine.
pub fn wasm_guest(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("guests/{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("compiling {}: {e}", path.display()))
}

/// A WebAssembly module from WAT text, for a test's one-off guest.
pub fn wat_bytes(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap_or_else(|e| panic!("compiling WAT: {e}"))
}

/// A loopback port that was free a moment ago, for processes that must be told a port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral port")
}

/// The nats-server `./dev` installs under `.tools/`, so that a plain `cargo test` finds it
/// after one `./dev test`. `MYCELIUM_NATS_SERVER` still wins.
fn workspace_tools_binary() -> Option<std::path::PathBuf> {
    if std::env::var_os(mycelium_natsd::BINARY_ENV).is_some() {
        return None;
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools");
    std::fs::read_dir(tools)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin/nats-server"))
        .find(|candidate| candidate.is_file())
}

/// A cluster of nats-servers with JetStream, routed to each other.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes (3 for JetStream R3), each routed to all others, and returns
    /// once all accept clients (the JetStream meta leader may still be electing).
    pub fn start(size: usize) -> Self {
        assert!(size >= 1, "a cluster needs a node");
        // The route ports are chosen before the servers bind them; another test's server can
        // take one in between. Then the whole cluster starts again on fresh ports.
        let mut attempt = 1;
        loop {
            match Self::try_start(size) {
                Ok(cluster) => return cluster,
                Err(e) if attempt < 5 && e.to_string().contains("address already in use") => {
                    attempt += 1;
                }
                Err(e) => panic!("starting a test nats-server cluster failed: {e}"),
            }
        }
    }

    fn try_start(
        size: usize,
    ) -> Result<Self, mycelium_core::Error<mycelium_natsd::SpawnErrorKind>> {
        // JetStream clustering wants every node to know its routes up front.
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let nodes = route_ports
            .iter()
            .enumerate()
            .map(|(index, &port)| {
                let dir = tempfile::Builder::new()
                    .prefix("mycelium-nats-cluster-")
                    .tempdir()
                    .expect("creating a temp dir for nats-server");
                let mut options = ServerOptions::new(dir.path());
                options.cluster = Some(ClusterOptions {
                    name: "mycelium-test".into(),
                    server_name: format!("n{index}"),
                    port: Some(port),
                    routes: routes
                        .iter()
                        .filter(|r| !r.ends_with(&format!(":{port}")))
                        .cloned()
                        .collect(),
                });
                NatsServer::try_start_with(options, dir)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { nodes })
    }

    /// The nodes, to kill and resume individually.
    pub fn nodes_mut(&mut self) -> &mut [NatsServer] {
        &mut self.nodes
    }

    /// A comma-separated URL list of every node (the form `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A NATS connection that knows every node.
    pub async fn connect(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|node| node.url().parse().expect("a valid server URL"))
            .collect();
        async_nats::connect(addrs)
            .await
            .expect("connecting to the test cluster")
    }
}

/// A CloudEvent with the given id, source `test`, type `com.example.test` and JSON data.
pub fn event(id: &str, data: serde_json::Value) -> Event {
    EventBuilderV10::new()
        .id(id)
        .source("test")
        .ty("com.example.test")
        .data("application/json", data)
        .build()
        .expect("a valid test event")
}

/// Retries `check` until it returns `Some` or `limit` passes; for conditions that are
/// reached through events we cannot subscribe to (a reconnect, a queue-group rebalance).
/// The limit is a ceiling for a broken system, not a timing assumption.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Functions with controlled behaviour, for exercising the runtime's limits.
pub mod functions {
    use std::sync::Arc;

    use mycelium_core::{
        cloudevents::event::Data, Event, Function, FunctionError, InvocationContext,
    };
    use tokio::sync::{mpsc, Semaphore};

    /// Panics on every call.
    pub struct Panics;

    #[async_trait::async_trait]
    impl Function for Panics {
        async fn execute(
            &self,
            _: Event,
            _: InvocationContext,
        ) -> Result<Vec<Event>, FunctionError> {
            panic!("deliberate test panic")
        }
    }

    /// Returns an error on every call.
    pub struct Fails;

    #[async_trait::async_trait]
    impl Function for Fails {
        async fn execute(
            &self,
            _: Event,
            _: InvocationContext,
        ) -> Result<Vec<Event>, FunctionError> {
            Err(FunctionError::new("deliberate test failure"))
        }
    }

    /// Sleeps for the event's `{"ms": n}`. Reports each invocation whose cancellation
    /// signal fired, from a detached task: the runtime drops the function's own future on
    /// timeout, so the signal is what reaches work a function spawned.
    pub struct Sleeps {
        cancelled: mpsc::UnboundedSender<String>,
    }

    impl Sleeps {
        /// The function and the receiver of cancelled invocation ids.
        pub fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
            let (cancelled, rx) = mpsc::unbounded_channel();
            (Self { cancelled }, rx)
        }
    }

    #[async_trait::async_trait]
    impl Function for Sleeps {
        async fn execute(
            &self,
            event: Event,
            ctx: InvocationContext,
        ) -> Result<Vec<Event>, FunctionError> {
            let ms = match event.data() {
                Some(Data::Json(v)) => v.get("ms").and_then(|ms| ms.as_u64()).unwrap_or(0),
                _ => 0,
            };
            let token = ctx.cancellation().clone();
            let report = self.cancelled.clone();
            let id = ctx.invocation_id().to_owned();
            tokio::spawn(async move {
                token.cancelled().await;
                let _ = report.send(id);
            });
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            Ok(vec![event])
        }
    }

    /// Holds every invocation until the test releases it.
    pub struct Gate {
        entered: mpsc::UnboundedSender<()>,
        release: Arc<Semaphore>,
    }

    /// The test's side of a [`Gate`].
    pub struct GateControl {
        entered: mpsc::UnboundedReceiver<()>,
        release: Arc<Semaphore>,
    }

    impl Gate {
        /// A closed gate and its control.
        pub fn new() -> (Self, GateControl) {
            let (entered, entered_rx) = mpsc::unbounded_channel();
            let release = Arc::new(Semaphore::new(0));
            (
                Self {
                    entered,
                    release: release.clone(),
                },
                GateControl {
                    entered: entered_rx,
                    release,
                },
            )
        }
    }

    impl GateControl {
        /// Waits until `n` more invocations are inside the gate.
        pub async fn entered(&mut self, n: usize) {
            for _ in 0..n {
                self.entered.recv().await.expect("gate function dropped");
            }
        }

        /// Lets `n` invocations through.
        pub fn release(&self, n: usize) {
            self.release.add_permits(n);
        }
    }

    #[async_trait::async_trait]
    impl Function for Gate {
        async fn execute(
            &self,
            event: Event,
            ctx: InvocationContext,
        ) -> Result<Vec<Event>, FunctionError> {
            let _ = self.entered.send(());
            tokio::select! {
                permit = self.release.acquire() => {
                    permit.map_err(|e| FunctionError::with_source("gate closed", e))?.forget();
                    Ok(vec![event])
                }
                () = ctx.cancelled() => Err(FunctionError::new("cancelled at the gate")),
            }
        }
    }
}

/// A child process stopped on drop (SIGTERM, so `mycelium up` also stops its nats-server; up to
/// 10 s to exit, then SIGKILL), so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            terminate(self.0.id());
            for _ in 0..500 {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A throwaway PKI for TLS tests: a CA, a server certificate for `127.0.0.1` and `localhost`,
/// and a client certificate, written as PEM files into a temp dir.
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generates the CA and both certificates.
    pub fn generate() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let dir = tempfile::Builder::new()
            .prefix("mycelium-pki-")
            .tempdir()
            .expect("creating a temp dir for certificates");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("writing a certificate")
        };
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Mycelium test CA");
        write("ca.pem", ca.self_signed(&ca_key).expect("the CA").pem());
        let issuer = Issuer::new(ca, ca_key);
        for (name, sans, purpose) in [
            (
                "server",
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec!["client.mycelium.test".to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(sans).expect("certificate parameters");
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &issuer).expect("a certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Self { dir }
    }

    /// The PEM file `name` (`ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
    /// `client-key.pem`).
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// A nats-server `tls { ... }` block that requires clients to present a certificate from
    /// this CA.
    pub fn server_config(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem")
        )
    }
}
