//! Plugin processes per function version: started on demand (or ahead of time), shared by
//! concurrent calls, replaced when they crash or hang, stopped when idle or retired.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::{Duration, Instant},
};

use mycelium_core::{
    logs::LogSink, secret::SecretEnv, ErrorCode, Event, Function, FunctionError, FunctionMetadata,
    FunctionName, InvocationContext, MetricsCollector, ProtocolError,
};
use mycelium_registry::{fetch_protocol_error, verify_signature, ArtifactCache, RegistryAdmin};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    cgroup::CgroupRoot,
    host::{BusyPoller, OutputBudget, PluginProcess, ProcessConfig, Redactions, StartErrorKind},
};

/// How plugin processes are run. Defaults suit small functions.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Processes per function version at most. The pool starts one more when a call finds
    /// every process's calls taken, and lets the extra ones go when they idle.
    pub max_processes: usize,
    /// Concurrent calls one process takes.
    pub concurrency_per_process: usize,
    /// Idle processes stop after this long (scale to zero).
    pub idle_timeout: Duration,
    /// Processes beyond a version's first stop after this long idle (at most `idle_timeout`):
    /// a burst's extra processes go soon after it.
    pub surplus_idle_timeout: Duration,
    /// Handshake and health check budget of a starting process.
    pub start_timeout: Duration,
    /// How long a stopping process gets before it is killed.
    pub stop_grace: Duration,
    /// Open files a plugin process may hold.
    pub max_open_files: u64,
    /// CPU seconds a plugin process may use (none by default).
    pub cpu_seconds: Option<u64>,
    /// Longest wait between restarts of a crash-looping plugin.
    pub max_restart_backoff: Duration,
    /// Give each process a control group where the runtime may make them (memory limits on
    /// resident memory, everything the plugin starts dies with it); else `RLIMIT_AS` only.
    pub cgroups: bool,
    /// Output lines per second one function's processes may log; beyond it lines are dropped
    /// and counted in a record of their own.
    pub log_lines_per_second: u32,
    /// Public NKeys whose signatures this runtime trusts; when any are set, binaries that are
    /// unsigned or signed by another key are refused (`artifact_untrusted`).
    pub trusted_signers: Vec<String>,
    /// Offer plugins Mycelium's frame protocol (`frames`), which plugins built with the Rust
    /// SDK take instead of gRPC over HTTP/2; go-plugin plugins keep gRPC either way. Off
    /// speaks gRPC to every plugin.
    pub offer_frames: bool,
    /// How long a call to a plugin may spin for its answer instead of parking its thread: on
    /// a virtual machine each wake-up of a parked thread costs tens of microseconds. A call
    /// spins when it is polled again after the poll that wrote its request (in the runtime at
    /// once: a waiting invocation gets a task of its own, whose first turn polls it), and
    /// again when woken by part of its answer (a go-plugin server's ping); only while it is
    /// the only plugin call the runtime waits on, and only on a connection whose recent
    /// answers came within this time. Zero never spins.
    pub busy_poll: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_processes: default_max_processes(),
            concurrency_per_process: 64,
            idle_timeout: Duration::from_secs(300),
            surplus_idle_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(2),
            max_open_files: 1024,
            cpu_seconds: None,
            max_restart_backoff: Duration::from_secs(30),
            log_lines_per_second: 1000,
            cgroups: true,
            trusted_signers: Vec::new(),
            offer_frames: true,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

/// The default of [`PoolSettings::busy_poll`] (BENCHMARKS.md, issue 15).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(300);

/// The default bound on processes per function version: the number of cores.
pub fn default_max_processes() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Tells a pool whether its version is still the active one (a retired version drains).
pub type ActiveCheck = Arc<dyn Fn(&FunctionName, u64) -> bool + Send + Sync>;

/// Everything pools share.
struct Shared {
    registry: Arc<dyn RegistryAdmin>,
    cache: ArtifactCache,
    work_root: PathBuf,
    settings: PoolSettings,
    metrics: Option<Arc<dyn MetricsCollector>>,
    is_active: ActiveCheck,
    cgroups: Option<Arc<CgroupRoot>>,
    /// The runtime's own secrets, to which each pool adds its function's `env`.
    redactions: Redactions,
    /// Where plugin output goes as function log records, once the runtime says.
    log_sink: OnceLock<Arc<dyn LogSink>>,
    /// Busy polling, shared by every process of the runtime.
    busy_poller: Option<Arc<BusyPoller>>,
}

/// Runs plugin functions: one [`PluginPool`] per function version.
pub struct PluginExecutor {
    shared: Arc<Shared>,
    pools: Mutex<HashMap<(FunctionName, u64), Arc<PluginPool>>>,
    /// Pools a rotation of their secrets superseded, until they have drained (counted and
    /// stopped with the others).
    draining: Mutex<Vec<Weak<PluginPool>>>,
}

impl PluginExecutor {
    /// An executor fetching binaries from `registry` into `cache`, running processes in
    /// directories under `work_root`.
    pub fn new(
        registry: Arc<dyn RegistryAdmin>,
        cache: ArtifactCache,
        work_root: PathBuf,
        settings: PoolSettings,
        metrics: Option<Arc<dyn MetricsCollector>>,
    ) -> Self {
        let lookup = registry.clone();
        let cgroups = if settings.cgroups {
            match CgroupRoot::detect() {
                Ok(root) => {
                    tracing::debug!(?root, "plugin processes get control groups");
                    Some(Arc::new(root))
                }
                Err(why) => {
                    tracing::warn!(%why, "plugin processes run without control groups: memory limits fall back to RLIMIT_AS (address space), and processes a plugin starts in a session of their own can outlive it");
                    None
                }
            }
        } else {
            None
        };
        Self {
            shared: Arc::new(Shared {
                busy_poller: BusyPoller::new(settings.busy_poll),
                registry,
                cache,
                work_root,
                settings,
                metrics,
                cgroups,
                redactions: Redactions::of_runtime(),
                log_sink: OnceLock::new(),
                is_active: Arc::new(move |name, version| {
                    lookup
                        .get(name, None)
                        .map(|m| m.version == version)
                        .unwrap_or(false)
                }),
            }),
            pools: Mutex::default(),
            draining: Mutex::default(),
        }
    }

    /// Sends what plugin processes print to `sink` as function log records (processes started
    /// from now on). Only the first call counts.
    pub fn set_log_sink(&self, sink: Arc<dyn LogSink>) {
        let _ = self.shared.log_sink.set(sink);
    }

    /// The pool running `metadata`'s version with `secrets` (created on first use). When the
    /// secrets changed (a rotation), a new pool takes the calls from now on and the old one
    /// drains: its calls in flight finish on the old values, then its processes stop.
    pub fn pool(&self, metadata: &Arc<FunctionMetadata>, secrets: &SecretEnv) -> Arc<PluginPool> {
        let key = (metadata.name.clone(), metadata.version);
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        // The per-invocation path is one hash lookup; sweeping finished pools happens only
        // when a new one is created.
        if let Some(pool) = pools.get(&key).filter(|pool| !pool.is_finished()) {
            if pool.secrets == *secrets {
                return pool.clone();
            }
            tracing::info!(function = %metadata.name, version = metadata.version, secrets = ?secrets, "a secret changed: new plugin processes take the calls, the old ones drain");
            pool.superseded.store(true, Ordering::Relaxed);
            let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
            draining.retain(|pool| pool.upgrade().is_some_and(|pool| !pool.is_finished()));
            draining.push(Arc::downgrade(pool));
        }
        pools.retain(|_, pool| !pool.is_finished());
        let pool = PluginPool::new(metadata.clone(), secrets.clone(), self.shared.clone());
        pools.insert(key, pool.clone());
        pool
    }

    /// The function that runs `metadata`'s version with `secrets`.
    pub fn function(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Arc<dyn Function> {
        self.pool(metadata, secrets)
    }

    /// Starts a process for `metadata` ahead of the first call, so it pays no cold start.
    pub async fn prestart(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Result<(), ProtocolError> {
        let pool = self.pool(metadata, secrets);
        let deadline = Instant::now() + self.shared.settings.start_timeout * 2;
        pool.acquire(deadline).await.map(drop)
    }

    /// Whether plugin processes get control groups here (see [`PoolSettings::cgroups`]).
    pub fn has_cgroups(&self) -> bool {
        self.shared.cgroups.is_some()
    }

    /// Processes running now, over all pools.
    pub fn process_count(&self) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .values()
            .map(|pool| pool.process_count())
            .sum::<usize>()
            + draining
                .iter()
                .filter_map(Weak::upgrade)
                .map(|pool| pool.process_count())
                .sum::<usize>()
    }

    /// Stops every plugin process.
    pub async fn shutdown(&self) {
        let pools: Vec<Arc<PluginPool>> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .drain()
                .map(|(_, pool)| pool)
                .chain(draining.drain(..).filter_map(|pool| pool.upgrade()))
                .collect()
        };
        for pool in pools {
            pool.stop_all().await;
        }
    }
}

struct Slot {
    process: PluginProcess,
    permits: Arc<Semaphore>,
    last_used: Mutex<Instant>,
    stopping: AtomicBool,
    /// Whether the end of this process was reported to the metrics (exactly once).
    reported: AtomicBool,
}

impl Slot {
    fn is_idle(&self, capacity: usize) -> bool {
        self.permits.available_permits() == capacity
    }
}

#[derive(Default)]
struct PoolState {
    slots: Vec<Arc<Slot>>,
    /// Crashes in a row; restarts wait longer each time.
    crashes: u32,
    not_before: Option<Instant>,
    /// Why the last start failed, answered at once to calls arriving during the backoff.
    last_start_error: Option<String>,
    binary: Option<PathBuf>,
    /// A process is being added for calls that found every process busy.
    growing: bool,
}

/// The processes of one function version.
pub struct PluginPool {
    me: Weak<PluginPool>,
    metadata: Arc<FunctionMetadata>,
    shared: Arc<Shared>,
    state: tokio::sync::Mutex<PoolState>,
    finished: AtomicBool,
    /// The secrets its processes get.
    secrets: SecretEnv,
    /// A newer pool of the same version took over (its secrets changed): drain like a
    /// retired version.
    superseded: AtomicBool,
    /// Processes running now, readable without the async state lock.
    process_count: std::sync::atomic::AtomicUsize,
    /// Told when a call ends or a process is added: calls waiting for a free one look again.
    freed: tokio::sync::Notify,
    redactions: Redactions,
    output_budget: Arc<OutputBudget>,
}

impl PluginPool {
    fn new(metadata: Arc<FunctionMetadata>, secrets: SecretEnv, shared: Arc<Shared>) -> Arc<Self> {
        let pool = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            state: tokio::sync::Mutex::default(),
            finished: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            process_count: std::sync::atomic::AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            output_budget: OutputBudget::new(shared.settings.log_lines_per_second),
            redactions: shared.redactions.with_env(&metadata.env, &secrets),
            secrets,
            metadata,
            shared,
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    /// Processes running now.
    pub fn process_count(&self) -> usize {
        self.process_count.load(Ordering::Relaxed)
    }

    /// A process slot with a free call permit: the first process with one (so the surplus
    /// ones idle and stop after a burst), else a new process when none runs, else the first
    /// permit freed, while one more process starts if the bound allows.
    async fn acquire(
        &self,
        deadline: Instant,
    ) -> Result<(Arc<Slot>, OwnedSemaphorePermit), ProtocolError> {
        let settings = &self.shared.settings;
        loop {
            let mut state = self.state.lock().await;
            self.forget_dead(&mut state);
            for slot in &state.slots {
                if let Ok(permit) = slot.permits.clone().try_acquire_owned() {
                    return Ok((slot.clone(), permit));
                }
            }
            // During a restart backoff, answer at once when nothing runs: holding callers (and
            // their in-flight slots) for the wait would let one broken plugin starve the rest.
            let backoff = state.not_before.filter(|&t| t > Instant::now());
            if state.slots.is_empty() {
                if let Some(not_before) = backoff {
                    return Err(self.backing_off(&state, not_before));
                }
                drop(state);
                // The first process: the call waits for its start and gets its error.
                self.start_in_background().await?;
                continue;
            }
            // Registered under the state lock, where processes are added and growth ends: a
            // call ending meanwhile leaves a permit in the `Notify` that this picks up.
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if backoff.is_none()
                && !state.growing
                && state.slots.len() < settings.max_processes.max(1)
            {
                state.growing = true;
                if let Some(pool) = self.me.upgrade() {
                    tokio::spawn(async move {
                        if let Err(error) = pool.start_in_background().await {
                            tracing::warn!(function = %pool.metadata.name, version = pool.metadata.version, %error, "an extra plugin process for queued calls did not start");
                        }
                        pool.state.lock().await.growing = false;
                        // Calls still waiting look again: they may need one more process.
                        pool.freed.notify_waiters();
                    });
                }
            }
            drop(state);
            if tokio::time::timeout_at(deadline.into(), freed)
                .await
                .is_err()
            {
                return Err(ProtocolError::new(
                    ErrorCode::Timeout,
                    format!(
                        "every plugin process of \"{}\" stayed busy until the deadline",
                        self.metadata.name
                    ),
                ));
            }
        }
    }

    /// Starts a process in a task of its own: a caller that gives up (its deadline) must not
    /// abandon a half-started process or lose the crash accounting.
    async fn start_in_background(&self) -> Result<(), ProtocolError> {
        let Some(pool) = self.me.upgrade() else {
            return Err(ProtocolError::new(
                ErrorCode::Unavailable,
                "the plugin pool is shutting down",
            ));
        };
        match tokio::spawn(async move { pool.start_if_needed().await }).await {
            Ok(result) => result,
            Err(join) => Err(ProtocolError::new(
                ErrorCode::Internal,
                format!("starting the plugin failed: {join}"),
            )),
        }
    }

    /// The answer to a call arriving while restarts back off: the last start error when the
    /// plugin fails to start, `unavailable` when it keeps crashing once started.
    fn backing_off(&self, state: &PoolState, not_before: Instant) -> ProtocolError {
        let wait = not_before.saturating_duration_since(Instant::now());
        let (name, version, failures) = (&self.metadata.name, self.metadata.version, state.crashes);
        match &state.last_start_error {
            Some(error) => ProtocolError::new(
                ErrorCode::PluginStartFailed,
                format!(
                    "the plugin of \"{name}\" v{version} failed {failures} times in a row; the next attempt is in {wait:.1?}; the last one: {error}"
                ),
            ),
            None => ProtocolError::new(
                ErrorCode::Unavailable,
                format!(
                    "the plugin of \"{name}\" v{version} keeps crashing ({failures} times in a row); the next restart is in {wait:.1?}"
                ),
            ),
        }
    }

    /// Drops slots whose process has died; an unexpected death counts as a crash.
    fn forget_dead(&self, state: &mut PoolState) {
        let before = state.slots.len();
        let mut crashed_after = None;
        state.slots.retain(|slot| {
            let dead = slot.process.has_exited();
            if dead {
                let crashed = !slot.stopping.load(Ordering::Relaxed);
                if crashed {
                    crashed_after = Some(slot.process.uptime());
                }
                self.report_end(slot, crashed);
            }
            !dead
        });
        if let Some(uptime) = crashed_after {
            self.record_crash(state, uptime);
            state.last_start_error = None;
        }
        if state.slots.len() != before {
            self.publish_count(state);
        }
    }

    /// Counts a crash (or a failed start): the first restart is immediate, a crash loop backs
    /// off exponentially up to the configured maximum. A process that had run for a minute
    /// starts the count afresh.
    fn record_crash(&self, state: &mut PoolState, uptime: Duration) {
        state.crashes = if uptime > Duration::from_secs(60) {
            1
        } else {
            state.crashes + 1
        };
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << state.crashes.saturating_sub(2).min(16))
            .min(self.shared.settings.max_restart_backoff);
        state.not_before = (state.crashes > 1).then(|| Instant::now() + backoff);
        tracing::warn!(function = %self.metadata.name, version = self.metadata.version, crashes = state.crashes, ?backoff, "plugin process died or failed to start");
    }

    /// Reports the end of a slot's process to the metrics, once.
    fn report_end(&self, slot: &Slot, crashed: bool) {
        if slot.reported.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(metrics) = &self.shared.metrics {
            metrics.plugin_stopped(
                &self.metadata.name,
                self.metadata.version,
                slot.process.pid(),
                crashed,
            );
        }
    }

    fn publish_count(&self, state: &PoolState) {
        self.process_count
            .store(state.slots.len(), Ordering::Relaxed);
    }

    /// Starts one more process unless, by the time the lock is ours, a free slot exists or
    /// the pool is full; waits out the crash backoff first.
    async fn start_if_needed(&self) -> Result<(), ProtocolError> {
        let mut state = self.state.lock().await;
        // The reaper ends a retired version's pool under this lock once it is empty; a call
        // that picked the pool up just before must not start a process nobody would stop.
        if self.is_finished() {
            return Err(ProtocolError::new(
                ErrorCode::Unavailable,
                format!(
                    "the processes of \"{}\" v{} were closed as this call arrived (the version was retired or the runtime is stopping); retry",
                    self.metadata.name, self.metadata.version
                ),
            ));
        }
        self.forget_dead(&mut state);
        let full = state.slots.len() >= self.shared.settings.max_processes.max(1);
        if full
            || state
                .slots
                .iter()
                .any(|slot| slot.permits.available_permits() > 0)
        {
            return Ok(());
        }
        if let Some(not_before) = state.not_before {
            tokio::time::sleep_until(not_before.into()).await;
        }
        let slot = self.start(&mut state).await?;
        state.slots.push(slot);
        self.publish_count(&state);
        // Calls waiting for a free process take the new one.
        self.freed.notify_waiters();
        Ok(())
    }

    async fn start(&self, state: &mut PoolState) -> Result<Arc<Slot>, ProtocolError> {
        // Before anything is fetched or run: an untrusted binary never reaches the disk.
        verify_signature(&self.metadata, &self.shared.settings.trusted_signers)
            .map_err(|e| fetch_protocol_error(&e))?;
        let binary = match &state.binary {
            Some(binary) => binary.clone(),
            None => {
                let (binary, downloaded) = self
                    .shared
                    .cache
                    .fetch_reporting(self.shared.registry.as_ref(), &self.metadata)
                    .await
                    .map_err(|e| fetch_protocol_error(&e))?;
                if let Some(metrics) = &self.shared.metrics {
                    metrics.artifact_fetched(&self.metadata.name, downloaded);
                }
                state.binary = Some(binary.clone());
                binary
            }
        };
        let settings = &self.shared.settings;
        let config = ProcessConfig {
            function: self.metadata.name.clone(),
            version: self.metadata.version,
            work_dir: self.shared.work_root.join(format!(
                "{}-v{}-{}",
                self.metadata.name,
                self.metadata.version,
                owner_suffix()
            )),
            env: self.metadata.env.clone(),
            secrets: self.secrets.clone(),
            memory_mb: self.metadata.memory_mb,
            cgroups: self.shared.cgroups.clone(),
            max_open_files: settings.max_open_files,
            cpu_seconds: settings.cpu_seconds,
            start_timeout: settings.start_timeout,
            stop_grace: settings.stop_grace,
            redactions: self.redactions.clone(),
            output_budget: self.output_budget.clone(),
            log_sink: self.shared.log_sink.get().cloned(),
            offer_frames: settings.offer_frames,
            busy_poll: self.shared.busy_poller.clone(),
        };
        let work_dir = config.work_dir.clone();
        let started = Instant::now();
        let process = PluginProcess::start(&binary, config).await.map_err(|e| {
            let _ = std::fs::remove_dir_all(&work_dir);
            if e.kind() != StartErrorKind::Spawn {
                self.record_crash(state, started.elapsed());
                state.last_start_error = Some(format!("{e:#}"));
            }
            ProtocolError::new(
                ErrorCode::PluginStartFailed,
                format!(
                    "the plugin of \"{}\" v{} did not start: {e:#}",
                    self.metadata.name, self.metadata.version
                ),
            )
        })?;
        tracing::info!(
            function = %self.metadata.name,
            version = self.metadata.version,
            pid = process.pid(),
            cold_start_ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin process started"
        );
        if let Some(metrics) = &self.shared.metrics {
            metrics.plugin_started(
                &self.metadata.name,
                self.metadata.version,
                started.elapsed(),
            );
        }
        Ok(Arc::new(Slot {
            process,
            permits: Arc::new(Semaphore::new(settings.concurrency_per_process.max(1))),
            last_used: Mutex::new(Instant::now()),
            stopping: AtomicBool::new(false),
            reported: AtomicBool::new(false),
        }))
    }

    async fn stop_slot(&self, slot: &Slot) {
        slot.stopping.store(true, Ordering::Relaxed);
        self.report_end(slot, false);
        slot.process.stop().await;
    }

    async fn remove_slot(&self, target: &Arc<Slot>) {
        let mut state = self.state.lock().await;
        state.slots.retain(|slot| !Arc::ptr_eq(slot, target));
        self.publish_count(&state);
    }

    async fn stop_all(&self) {
        let slots = {
            let mut state = self.state.lock().await;
            self.finished.store(true, Ordering::Relaxed);
            let slots = std::mem::take(&mut state.slots);
            self.publish_count(&state);
            slots
        };
        for slot in slots {
            self.stop_slot(&slot).await;
        }
    }

    /// A plugin that no longer answers its health check is replaced (after a timed-out call,
    /// and periodically).
    async fn check_after_timeout(&self, slot: Arc<Slot>) {
        if slot.process.is_healthy(Duration::from_secs(1)).await {
            return;
        }
        tracing::warn!(function = %self.metadata.name, pid = slot.process.pid(), "plugin stopped answering; replacing it");
        slot.stopping.store(true, Ordering::Relaxed);
        self.report_end(&slot, true);
        slot.process.kill();
        self.remove_slot(&slot).await;
    }
}

/// A call's permit: given back when the call ends or is abandoned, and a call waiting for
/// one told.
struct Held<'a> {
    permit: Option<OwnedSemaphorePermit>,
    freed: &'a tokio::sync::Notify,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// Runs after a call is abandoned (its future dropped at the deadline) to check the process.
struct CallGuard {
    pool: Weak<PluginPool>,
    slot: Option<Arc<Slot>>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let (Some(slot), Some(pool)) = (self.slot.take(), self.pool.upgrade()) {
            tokio::spawn(async move { pool.check_after_timeout(slot).await });
        }
    }
}

#[async_trait::async_trait]
impl Function for PluginPool {
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        let to_error = |e: ProtocolError| FunctionError::with_code(e.code, e.message);
        let (slot, permit) = self.acquire(ctx.deadline()).await.map_err(to_error)?;
        let _held = Held {
            permit: Some(permit),
            freed: &self.freed,
        };
        *slot.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        // Armed while the call runs: if the invocation is abandoned at its deadline, the
        // process is checked and replaced when it no longer answers.
        let mut guard = CallGuard {
            pool: self.me.clone(),
            slot: Some(slot.clone()),
        };
        let result = slot.process.execute(&event, &ctx).await;
        match &result {
            Err(error) if error.code == ErrorCode::Timeout => {}
            Err(error) if error.code == ErrorCode::PluginCrashed => {
                guard.slot = None;
                let mut state = self.state.lock().await;
                self.forget_dead(&mut state);
            }
            _ => guard.slot = None,
        }
        *slot.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        result.map_err(to_error)
    }
}

/// Health checks run every this many reaper ticks (500 ms each).
const HEALTH_EVERY_TICKS: u64 = 10;

/// Per pool: stops idle processes (and all of a retired version once idle), samples memory.
async fn reap(pool: Weak<PluginPool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let Some(pool) = pool.upgrade() else { break };
        if pool.is_finished() {
            break;
        }
        let settings = &pool.shared.settings;
        let retired = pool.superseded.load(Ordering::Relaxed)
            || !(pool.shared.is_active)(&pool.metadata.name, pool.metadata.version);
        let to_stop: Vec<Arc<Slot>> = {
            let mut state = pool.state.lock().await;
            pool.forget_dead(&mut state);
            let capacity = settings.concurrency_per_process.max(1);
            // Calls go to the first process with room, so the later ones idle first and go
            // sooner.
            let mut timeout = settings.idle_timeout;
            let (stop, keep): (Vec<_>, Vec<_>) = state.slots.drain(..).partition(|slot| {
                let idle_for = slot
                    .last_used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed();
                let stop = slot.is_idle(capacity) && (retired || idle_for >= timeout);
                timeout = settings.surplus_idle_timeout.min(settings.idle_timeout);
                stop
            });
            state.slots = keep;
            pool.publish_count(&state);
            if retired && state.slots.is_empty() && stop.is_empty() {
                // Nothing left to drain: the pool ends; a call pinned to this version
                // later gets a fresh one.
                pool.finished.store(true, Ordering::Relaxed);
            }
            if let Some(metrics) = &pool.shared.metrics {
                for slot in &state.slots {
                    if let Some(rss) = slot.process.rss_bytes() {
                        metrics.plugin_memory(
                            &pool.metadata.name,
                            pool.metadata.version,
                            slot.process.pid(),
                            rss,
                        );
                    }
                }
            }
            stop
        };
        for slot in to_stop {
            tracing::info!(function = %pool.metadata.name, version = pool.metadata.version, pid = slot.process.pid(), retired, "stopping an idle plugin process");
            pool.stop_slot(&slot).await;
        }
        // Every few seconds, a process that stopped answering its health check is replaced
        // even when no call is waiting on it.
        if ticks.is_multiple_of(HEALTH_EVERY_TICKS) {
            let slots: Vec<Arc<Slot>> = pool.state.lock().await.slots.clone();
            for slot in slots {
                pool.check_after_timeout(slot).await;
            }
        }
    }
}

/// `<runtime pid>-<n>`: unique among this runtime's processes, and naming the runtime, which
/// the sweep of control groups left by dead runtimes reads back (`cgroup::CgroupRoot`).
fn owner_suffix() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
