//! One plugin process, host side: launch with the handshake environment, read the handshake,
//! connect over gRPC, check health, relay output into logs, call, and stop.

use std::{
    collections::{BTreeMap, VecDeque},
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mycelium_core::{
    logs::LogSink, Error, ErrorCode, Event, FunctionName, InvocationContext, ProtocolError,
};
use tokio::{io::BufReader, sync::watch};
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

pub use crate::channel::BusyPoller;
pub use crate::output::{OutputBudget, Redactions, MIN_SECRET_LEN};
use crate::{
    cgroup::{CgroupRoot, ProcessCgroup},
    channel::PluginChannel,
    convert, frames,
    framing::path,
    handshake::{self, Handshake},
    output::{read_line, relay, relay_stdio_stream, Output, STDERR_TAIL},
    proto::{
        function::{
            execute_response::Result as ExecuteResult, ErrorCode as ProtoCode, ExecuteRequest,
            ExecuteResponse, InvocationContext as ProtoContext,
        },
        go_plugin::Empty,
    },
    spawn,
};

static TRACEPARENT: http::HeaderName =
    http::HeaderName::from_static(mycelium_core::trace::TRACEPARENT);
static TRACESTATE: http::HeaderName =
    http::HeaderName::from_static(mycelium_core::trace::TRACESTATE);

/// Why a plugin process could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartErrorKind {
    /// The process could not be spawned (missing, not executable).
    Spawn,
    /// It exited before its handshake.
    ExitedEarly,
    /// It printed something other than a valid handshake.
    BadHandshake,
    /// No handshake within the start timeout.
    Timeout,
    /// Connecting or the health check failed.
    Unhealthy,
}

/// A failed [`PluginProcess::start`]; the message carries the plugin's stderr tail.
pub type StartError = Error<StartErrorKind>;

/// How to run a plugin process.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The function (for logs).
    pub function: FunctionName,
    /// Its version (for logs).
    pub version: u64,
    /// The working directory (created if missing).
    pub work_dir: PathBuf,
    /// The function's configured environment; nothing else of the runtime's leaks in.
    pub env: BTreeMap<String, String>,
    /// The function's opened secrets, added to that environment and cut out of its output.
    pub secrets: mycelium_core::secret::SecretEnv,
    /// Memory limit in MiB: resident memory of the process's control group when `cgroups` is
    /// set, else its address space (`RLIMIT_AS`).
    pub memory_mb: Option<u64>,
    /// Where the process gets a control group of its own (see [`crate::cgroup`]); `None`
    /// runs it without one.
    pub cgroups: Option<Arc<CgroupRoot>>,
    /// Open file limit (`RLIMIT_NOFILE`).
    pub max_open_files: u64,
    /// CPU time limit in seconds (`RLIMIT_CPU`).
    pub cpu_seconds: Option<u64>,
    /// How long the handshake and health check may take.
    pub start_timeout: Duration,
    /// How long a stopping plugin gets before it is killed.
    pub stop_grace: Duration,
    /// Texts never shown to callers: a plugin's output quoted in an error is redacted of them
    /// (the function's env values and the runtime's secrets; see [`Redactions`]).
    pub redactions: Redactions,
    /// How many output lines the function may log; shared by its processes.
    pub output_budget: Arc<OutputBudget>,
    /// Where the function's output lines go as log records (besides the runtime's log).
    pub log_sink: Option<Arc<dyn LogSink>>,
    /// Offer the plugin Mycelium's frame protocol besides gRPC (see
    /// [`crate::pool::PoolSettings::offer_frames`]).
    pub offer_frames: bool,
    /// Busy polling for answers (see
    /// [`crate::pool::PoolSettings::busy_poll`]), shared by the runtime's processes; `None`
    /// never spins.
    pub busy_poll: Option<Arc<BusyPoller>>,
}

impl ProcessConfig {
    /// A process of `function`'s `version` working in `work_dir`, run as a pool with default
    /// settings runs it: no environment, secrets, memory limit or control group.
    pub fn new(function: FunctionName, version: u64, work_dir: PathBuf) -> Self {
        let defaults = crate::pool::PoolSettings::default();
        Self {
            function,
            version,
            work_dir,
            env: BTreeMap::new(),
            secrets: mycelium_core::secret::SecretEnv::default(),
            memory_mb: None,
            cgroups: None,
            max_open_files: defaults.max_open_files,
            cpu_seconds: defaults.cpu_seconds,
            start_timeout: defaults.start_timeout,
            stop_grace: defaults.stop_grace,
            redactions: Redactions::of_runtime(),
            output_budget: OutputBudget::new(defaults.log_lines_per_second),
            log_sink: None,
            offer_frames: defaults.offer_frames,
            busy_poll: BusyPoller::new(defaults.busy_poll),
        }
    }
}

/// A running plugin process.
pub struct PluginProcess {
    pid: u32,
    channel: PluginChannel,
    exit: watch::Receiver<Option<String>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    config: ProcessConfig,
    started: Instant,
    /// Dropped last (declared last): kills whatever the plugin left running.
    cgroup: Option<ProcessCgroup>,
}

impl std::fmt::Debug for PluginProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginProcess")
            .field("pid", &self.pid)
            .field("function", &self.config.function)
            .field("version", &self.config.version)
            .finish_non_exhaustive()
    }
}

/// The stderr tail for an error message, redacted: it goes to callers.
fn tail_text(tail: &Mutex<VecDeque<String>>, redactions: &Redactions) -> String {
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    if tail.is_empty() {
        "(the plugin wrote nothing to stderr)".into()
    } else {
        redactions.apply(&format!(
            "its stderr ended with:\n{}",
            tail.iter().cloned().collect::<Vec<_>>().join("\n")
        ))
    }
}

fn spawn_failed(what: String, e: std::io::Error) -> StartError {
    StartError::with_source(StartErrorKind::Spawn, what, e)
}

/// The plugin's environment: only the function's variables and secrets and go-plugin's
/// handshake settings (a later setting of a name wins, as with `Command::env`).
fn environment(config: &ProcessConfig) -> BTreeMap<OsString, OsString> {
    let mut env = BTreeMap::new();
    let mut set = |key: &OsStr, value: &OsStr| {
        env.insert(key.to_owned(), value.to_owned());
    };
    for (key, value) in &config.env {
        set(key.as_ref(), value.as_ref());
    }
    for (key, value) in config.secrets.vars() {
        set(key.as_ref(), value.as_ref());
    }
    let protocol = handshake::APP_PROTOCOL_VERSION.to_string();
    for (key, value) in [
        (handshake::MAGIC_COOKIE_KEY, handshake::MAGIC_COOKIE_VALUE),
        (handshake::PROTOCOL_VERSIONS_ENV, protocol.as_str()),
        (handshake::MIN_PORT_ENV, "10000"),
        (handshake::MAX_PORT_ENV, "25000"),
    ] {
        set(key.as_ref(), value.as_ref());
    }
    if config.offer_frames {
        // Plugins built with Mycelium's SDK answer with it; go-plugin's ignore it.
        set(frames::OFFER_ENV.as_ref(), frames::PROTOCOL.as_ref());
    }
    set(
        handshake::UNIX_SOCKET_DIR_ENV.as_ref(),
        config.work_dir.as_os_str(),
    );
    set("TMPDIR".as_ref(), config.work_dir.as_os_str());
    env
}

/// The process's control group, named after its working directory, when the host makes them.
fn control_group(
    config: &ProcessConfig,
    memory_bytes: Option<u64>,
) -> Result<Option<ProcessCgroup>, StartError> {
    let Some(root) = &config.cgroups else {
        return Ok(None);
    };
    let name = format!(
        "mycelium-{}",
        config
            .work_dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    root.create(&name, memory_bytes)
        .map(Some)
        .map_err(|e| spawn_failed("creating the plugin's control group".into(), e))
}

/// Moves `pid` into `group` from a blocking thread, off the start's critical path.
fn join_later_from_elsewhere(group: &ProcessCgroup, pid: u32, function: FunctionName) {
    let procs = group.procs_file();
    tokio::task::spawn_blocking(move || {
        if let Err(error) = std::fs::write(procs, pid.to_string()) {
            tracing::warn!(%function, pid, %error, "the plugin process could not join its control group; stopping it will not reach processes it starts in sessions of their own");
        }
    });
}

/// A process between spawn and its first healthy answer.
struct Starting<'a> {
    pid: u32,
    stderr_tail: &'a Mutex<VecDeque<String>>,
    config: &'a ProcessConfig,
    deadline: Instant,
}

impl Starting<'_> {
    /// Kills the process group and says why, with the end of what the plugin printed.
    fn fail(&self, kind: StartErrorKind, message: String) -> StartError {
        kill_group(self.pid);
        StartError::new(
            kind,
            format!(
                "{message}; {}",
                tail_text(self.stderr_tail, &self.config.redactions)
            ),
        )
    }

    /// The time left until the deadline (a little at least, so a last step can answer).
    fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// Reads go-plugin's handshake line from the plugin's stdout.
    async fn handshake(
        &self,
        stdout: &mut BufReader<tokio::net::unix::pipe::Receiver>,
        mut exited: watch::Receiver<Option<String>>,
    ) -> Result<Handshake, StartError> {
        let timeout = self.config.start_timeout;
        let line = tokio::select! {
            line = read_line(stdout) => line,
            _ = exited.wait_for(Option::is_some) => None,
            () = tokio::time::sleep(timeout) => {
                return Err(self.fail(StartErrorKind::Timeout, format!("the plugin printed no handshake within {timeout:?}")));
            }
        };
        let Some(line) = line else {
            // Let the exit status arrive so the message can name it.
            let status =
                tokio::time::timeout(Duration::from_secs(1), exited.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|s| s.ok().and_then(|s| s.clone()))
                    .unwrap_or_else(|| "closed its stdout".into());
            // The stderr relay may still be draining; give it a moment to fill the tail.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(self.fail(
                StartErrorKind::ExitedEarly,
                format!("the plugin exited before its handshake ({status})"),
            ));
        };
        Handshake::parse(&line).map_err(|e| self.fail(StartErrorKind::BadHandshake, e.to_string()))
    }

    /// Connects to the address of the handshake and waits for the plugin to report serving.
    async fn connect_healthy(&self, handshake: &Handshake) -> Result<PluginChannel, StartError> {
        let channel = tokio::time::timeout(
            self.remaining(),
            PluginChannel::connect(handshake, self.config.busy_poll.as_ref()),
        )
        .await
        .map_err(|_| {
            self.fail(
                StartErrorKind::Unhealthy,
                "connecting to the plugin timed out".into(),
            )
        })?
        .map_err(|e| {
            self.fail(
                StartErrorKind::Unhealthy,
                format!("connecting to the plugin at {}: {e}", handshake.address),
            )
        })?;
        match tokio::time::timeout(self.remaining(), check_health(&channel, self.remaining())).await
        {
            Ok(Ok(response)) if response.status == ServingStatus::Serving as i32 => Ok(channel),
            Ok(Ok(response)) => Err(self.fail(
                StartErrorKind::Unhealthy,
                format!(
                    "the plugin reports status {} for service \"plugin\"",
                    response.status
                ),
            )),
            Ok(Err(status)) => Err(self.fail(
                StartErrorKind::Unhealthy,
                format!("the plugin's health check failed: {status}"),
            )),
            Err(_) => Err(self.fail(
                StartErrorKind::Unhealthy,
                "the plugin's health check timed out".into(),
            )),
        }
    }
}

/// go-plugin's health check of the service "plugin".
async fn check_health(
    channel: &PluginChannel,
    within: Duration,
) -> Result<HealthCheckResponse, tonic::Status> {
    let request = HealthCheckRequest {
        service: handshake::HEALTH_SERVICE.into(),
    };
    channel
        .unary(path::HEALTH_CHECK, &request, within, &[])
        .await
}

/// Refuses what is not a program before the kernel (or the shell's fallback for files
/// without a format it knows, which runs them as scripts) gets to try.
fn check_executable(binary: &Path) -> Result<(), StartError> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let read = std::fs::File::open(binary)
        .and_then(|mut file| file.read(&mut head))
        .map_err(|e| {
            StartError::with_source(
                StartErrorKind::Spawn,
                format!("cannot read the plugin {}", binary.display()),
                e,
            )
        })?;
    let head = &head[..read];
    if head.starts_with(b"\x7fELF") || head.starts_with(b"#!") {
        return Ok(());
    }
    Err(StartError::new(
        StartErrorKind::Spawn,
        "the plugin binary is not an executable (neither an ELF binary nor a script starting with #!); deploy a program built for this machine",
    ))
}

impl PluginProcess {
    /// Starts `binary` and returns once it has shaken hands and reports healthy.
    pub async fn start(binary: &Path, config: ProcessConfig) -> Result<Self, StartError> {
        let begun = Instant::now();
        check_executable(binary)?;
        std::fs::create_dir_all(&config.work_dir)
            .map_err(|e| spawn_failed(format!("creating {}", config.work_dir.display()), e))?;
        let memory_bytes = config.memory_mb.map(|mb| mb.saturating_mul(1024 * 1024));
        let cgroup = control_group(&config, memory_bytes)?;
        let limits = Limits {
            // With a control group the limit is on resident memory, there; without one it
            // can only be on address space.
            address_space: memory_bytes.filter(|_| cgroup.is_none()),
            open_files: config.max_open_files,
            cpu_seconds: config.cpu_seconds,
            // Joining a group costs the joiner an RCU grace period (10-15 ms measured on this
            // cgroup v1 VM, more than the whole cold start), so it happens before exec only
            // where it must: with a memory limit, no byte may be charged outside the group.
            // Otherwise the host moves the process in from another thread, off the start's
            // critical path (see `join_later`).
            cgroup_file: cgroup
                .as_ref()
                .filter(|_| memory_bytes.is_some())
                .and_then(ProcessCgroup::join_file),
        };
        let join_later = limits.cgroup_file.is_none();
        let env = environment(&config);
        let program = spawn::Program::new(
            binary,
            &config.work_dir,
            env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str())),
        )
        .map_err(|e| spawn_failed(format!("starting the plugin {}", binary.display()), e))?;
        let spawned = spawn::spawn(&program, &|| limits.apply_in_child())
            .map_err(|e| spawn_failed(format!("starting the plugin {}", binary.display()), e))?;
        let pid = spawned.pid;
        let spawned_in = begun.elapsed();
        // Until the start succeeds, any way out of this function (an error, or the caller
        // dropping the future) kills the process.
        let mut unfinished = KillOnDrop(Some(pid));
        if let Some(group) = cgroup.as_ref().filter(|_| join_later) {
            join_later_from_elsewhere(group, pid, config.function.clone());
        }
        // Watched first: whatever fails below, the process (ended by `unfinished`) is reaped.
        let (exit_tx, exit) = watch::channel(None);
        // SAFETY: the pidfd is owned by the AsyncFd from here on and stays open, unchanged,
        // until it drops.
        #[allow(unsafe_code)]
        let watched = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                spawned.pidfd,
                tokio::io::Interest::READABLE,
            )
        };
        match watched {
            Ok(pidfd) => {
                tokio::spawn(async move {
                    // A pidfd turns readable when its process has exited.
                    let status = match pidfd.readable().await {
                        Ok(_) => reap(pid),
                        Err(error) => format!("unknown (waiting for it failed: {error})"),
                    };
                    let _ = exit_tx.send(Some(status));
                });
            }
            Err(error) => {
                tracing::debug!(error = %std::io::Error::from(error), pid, "cannot watch a plugin's pidfd; waiting on a thread");
                tokio::task::spawn_blocking(move || exit_tx.send(Some(reap(pid))));
            }
        }
        let reader = |fd, what: &str| {
            tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                .map_err(|e| spawn_failed(format!("reading the plugin's {what}"), e))
        };
        let stderr = reader(spawned.stderr, "stderr")?;
        let stdout = reader(spawned.stdout, "stdout")?;

        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        tokio::spawn(relay(
            BufReader::new(stderr),
            Output::new(&config, pid),
            Some(stderr_tail.clone()),
            "stderr",
        ));
        let mut stdout = BufReader::new(stdout);

        let starting = Starting {
            pid,
            stderr_tail: &stderr_tail,
            config: &config,
            deadline: Instant::now() + config.start_timeout,
        };
        let handshake = starting.handshake(&mut stdout, exit.clone()).await?;
        let shook_hands = begun.elapsed();
        tokio::spawn(relay(stdout, Output::new(&config, pid), None, "stdout"));
        let channel = starting.connect_healthy(&handshake).await?;
        // go-plugin >= 1.2 streams the plugin's stdio over gRPC; older plugins (1.0.x) do not
        // offer the service, and their output arrives on the pipes instead. Asked off the
        // start's path: the first call need not wait for the answer.
        let stdio = channel.clone();
        let output = Output::new(&config, pid);
        tokio::spawn(async move {
            if let Ok(stream) = stdio.server_stream(path::STREAM_STDIO, &()).await {
                relay_stdio_stream(stream, output).await;
            }
        });
        // Where a cold start's time went, for whoever tunes it (BENCHMARKS.md, cold start).
        tracing::debug!(
            function = %config.function,
            version = config.version,
            pid,
            spawn_us = spawned_in.as_micros() as u64,
            handshake_us = (shook_hands - spawned_in).as_micros() as u64,
            healthy_us = (begun.elapsed() - shook_hands).as_micros() as u64,
            protocol = ?channel.protocol(),
            "plugin started"
        );
        unfinished.0 = None;
        Ok(Self {
            pid,
            channel,
            exit,
            stderr_tail,
            config,
            started: Instant::now(),
            cgroup,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The protocol the plugin chose in its handshake.
    pub fn protocol(&self) -> handshake::Protocol {
        self.channel.protocol()
    }

    /// How long the process has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether the process has exited.
    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Resolves when the process exits, with its status.
    pub async fn exited(&self) -> String {
        let mut exit = self.exit.clone();
        exit.wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Calls the plugin's `Execute`.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &InvocationContext,
    ) -> Result<Vec<Event>, ProtocolError> {
        let remaining = ctx.deadline().saturating_duration_since(Instant::now());
        let deadline_ms = SystemTime::now()
            .checked_add(remaining)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let request = ExecuteRequest {
            event: Some(convert::to_proto(event)),
            context: Some(ProtoContext {
                function_name: ctx.function().to_string(),
                function_version: ctx.version(),
                invocation_id: ctx.invocation_id().to_owned(),
                deadline_unix_ms: deadline_ms,
                traceparent: ctx
                    .trace()
                    .map(|t| t.traceparent().to_owned())
                    .unwrap_or_default(),
                tracestate: ctx
                    .trace()
                    .and_then(|t| t.tracestate())
                    .unwrap_or_default()
                    .to_owned(),
            }),
        };
        // Also as gRPC metadata, where gRPC tracing middleware (Go's otelgrpc, for one) looks.
        let mut metadata = Vec::new();
        let grpc = self.channel.protocol() == handshake::Protocol::Grpc;
        if let Some(trace) = ctx.trace().filter(|_| grpc) {
            if let Ok(value) = trace.traceparent().parse() {
                metadata.push((TRACEPARENT.clone(), value));
            }
            if let Some(Ok(value)) = trace.tracestate().map(str::parse) {
                metadata.push((TRACESTATE.clone(), value));
            }
        }
        let answer: Result<ExecuteResponse, _> = self
            .channel
            .unary(path::EXECUTE, &request, remaining, &metadata)
            .await;
        match answer {
            Ok(response) => match response.result {
                Some(ExecuteResult::Events(batch)) => {
                    batch.events.into_iter().map(convert::from_proto).collect()
                }
                Some(ExecuteResult::Error(error)) => {
                    let code =
                        match ProtoCode::try_from(error.code).unwrap_or(ProtoCode::FunctionError) {
                            ProtoCode::InvalidEvent => ErrorCode::InvalidEvent,
                            ProtoCode::Timeout => ErrorCode::Timeout,
                            ProtoCode::Unavailable => ErrorCode::Unavailable,
                            ProtoCode::FunctionError | ProtoCode::Unspecified => {
                                ErrorCode::FunctionError
                            }
                        };
                    Err(ProtocolError::new(
                        code,
                        format!("function \"{}\" failed: {}", ctx.function(), error.message),
                    ))
                }
                None => Err(ProtocolError::new(
                    ErrorCode::FunctionError,
                    "the plugin answered with neither events nor an error",
                )),
            },
            Err(status) => Err(self.call_failed(status, ctx).await),
        }
    }

    async fn call_failed(&self, status: tonic::Status, ctx: &InvocationContext) -> ProtocolError {
        // A dead process breaks the connection first; its exit status follows within moments.
        let mut exit = self.exit.clone();
        let exited =
            tokio::time::timeout(Duration::from_millis(500), exit.wait_for(Option::is_some)).await;
        if let Ok(Ok(status_text)) = exited {
            let status_text = status_text.clone().unwrap_or_default();
            return ProtocolError::new(
                ErrorCode::PluginCrashed,
                format!(
                    "the plugin process of \"{}\" v{} died during the call ({status_text}); the next call starts a new one; {}",
                    ctx.function(),
                    ctx.version(),
                    tail_text(&self.stderr_tail, &self.config.redactions)
                ),
            );
        }
        match status.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => ProtocolError::new(
                ErrorCode::Timeout,
                format!("function \"{}\" did not finish in time", ctx.function()),
            ),
            _ => ProtocolError::new(
                ErrorCode::Unavailable,
                format!(
                    "calling the plugin of \"{}\" failed: {}",
                    ctx.function(),
                    status.message()
                ),
            ),
        }
    }

    /// Whether the plugin answers its health check within `within`.
    pub async fn is_healthy(&self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, check_health(&self.channel, within)).await,
            Ok(Ok(response)) if response.status == ServingStatus::Serving as i32
        )
    }

    /// Asks the plugin to shut down, waits up to the grace period, then kills its process group.
    pub async fn stop(&self) {
        if self.has_exited() {
            return;
        }
        let shutdown =
            self.channel
                .unary::<_, Empty>(path::SHUTDOWN, &Empty {}, self.config.stop_grace, &[]);
        let _ = tokio::time::timeout(self.config.stop_grace, shutdown).await;
        if tokio::time::timeout(self.config.stop_grace, self.exited())
            .await
            .is_err()
        {
            tracing::warn!(function = %self.config.function, pid = self.pid, "plugin ignored shutdown; killing it");
        }
        self.kill();
    }

    /// Kills the plugin's whole process group at once, and with a control group everything it
    /// started, even in sessions of their own.
    pub fn kill(&self) {
        kill_group(self.pid);
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
    }

    /// Resident memory of the process in bytes, read from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        mycelium_core::metrics::resident_bytes_from_proc_status(&status)
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if !self.has_exited() {
            kill_group(self.pid);
        }
        // The socket and whatever the plugin wrote go with it.
        let _ = std::fs::remove_dir_all(&self.config.work_dir);
    }
}

struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            kill_group(pid);
        }
    }
}

#[allow(unsafe_code)]
fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions. The plugin leads its own process
    // group (process_group(0)), so -pid reaches it and anything it started.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Resource limits set in the child before its exec (see [`spawn`]).
struct Limits {
    address_space: Option<u64>,
    open_files: u64,
    cpu_seconds: Option<u64>,
    /// The `cgroup.procs` file to join, prepared before the fork.
    cgroup_file: Option<std::ffi::CString>,
}

impl Limits {
    /// Runs in the child between clone and exec (see [`spawn`]): only raw system calls
    /// (prctl, open/write/close, setrlimit, getppid, capset, _exit), no allocation.
    #[allow(unsafe_code)]
    fn apply_in_child(&self) -> std::io::Result<()> {
        // SAFETY: system calls on integers and the NUL-terminated path prepared before.
        unsafe {
            // Die with the runtime, even if it is SIGKILLed: no orphans.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
        }
        crate::cgroup::join_in_child(self.cgroup_file.as_ref())?;
        let set = |resource, value: u64| {
            let limit = libc::rlimit {
                rlim_cur: value as libc::rlim_t,
                rlim_max: value as libc::rlim_t,
            };
            // SAFETY: setrlimit reads the local struct.
            if unsafe { libc::setrlimit(resource, &limit) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        if let Some(bytes) = self.address_space {
            set(libc::RLIMIT_AS, bytes)?;
        }
        set(libc::RLIMIT_NOFILE, self.open_files)?;
        if let Some(seconds) = self.cpu_seconds {
            set(libc::RLIMIT_CPU, seconds)?;
        }
        drop_capabilities();
        Ok(())
    }
}

/// Reaps our child `pid`, waiting until it exits; its exit status as text.
#[allow(unsafe_code)]
fn reap(pid: u32) -> String {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing into the local integer.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    if reaped < 0 {
        return format!("unknown ({})", std::io::Error::last_os_error());
    }
    std::process::ExitStatus::from_raw(status).to_string()
}

/// Leaves the plugin no capabilities, even when the runtime runs as root: without
/// CAP_SYS_PTRACE it cannot read the (non-dumpable) runtime's `/proc/<pid>/environ` or memory,
/// and without the rest it cannot undo its limits. Emptying the bounding and inheritable sets
/// is what makes it stick across `execve`, where root would otherwise get every capability
/// back. Best effort: an unprivileged runtime has nothing to drop and may not drop it.
///
/// Runs in the child before exec (see [`spawn`]): only raw system calls, no allocation.
#[allow(unsafe_code)]
fn drop_capabilities() {
    // The kernel's capability ABI (linux/capability.h), version 3: two 32-bit words per set.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    // SAFETY: prctl and capset take plain integers and pointers to the live locals above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        // Capability numbers beyond the kernel's last one fail with EINVAL, harmlessly.
        for capability in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0);
        }
        let mut header = Header {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        libc::syscall(
            libc::SYS_capset,
            std::ptr::addr_of_mut!(header),
            data.as_ptr(),
        );
    }
}
