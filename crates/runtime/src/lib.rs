//! The Mycelium runtime service: answers `function.invoke` (and the CloudEvents binding,
//! `function.list`, `function.describe`) over NATS, looks functions up in a
//! [`Registry`], and runs them within timeouts, concurrency and size limits; runs the
//! asynchronous invocations callers store in JetStream (`function.async.<name>`), with
//! retries and dead letters ([`AsyncConfig`]).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // The built-in functions on an in-memory registry.
//! let runtime = mycelium_runtime::presets::example_runtime("nats://127.0.0.1:4222").await?;
//! let handle = runtime.start().await?;
//! tokio::signal::ctrl_c().await?;
//! handle.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod asynchronous;
mod builtins;
mod config;
pub mod executor;
mod invoker;
pub mod logs;
mod micro;
pub mod presets;
mod secrets;
mod server;
mod triggers;

use std::{collections::HashMap, sync::Arc};

pub use asynchronous::AsyncConfig;
pub use logs::{function_logs, FunctionLogLayer, FunctionLogs};

use mycelium_core::{
    trace::PassThrough, Error, Function, FunctionMetadata, FunctionName, InMemoryMetrics,
    MetricsCollector, Subjects, TraceBridge,
};
use mycelium_plugin::pool::PluginExecutor;
use mycelium_registry::{MemoryRegistry, Registry};
use mycelium_wasm::WasmExecutor;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use builtins::{Echo, Example};
pub use config::RuntimeConfig;
pub use executor::Executor;

use crate::{
    executor::{Builtin, BuiltinExecutor, Executors},
    invoker::Invoker,
    server::{serve_endpoint, EndpointKind, Shared},
};

/// The version the runtime reports to the NATS services API.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a runtime could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartErrorKind {
    /// Connecting to NATS failed.
    Connect,
    /// Registering the service or subscribing failed.
    Subscribe,
    /// The configuration is unusable.
    Config,
    /// The registry could not be opened.
    Registry,
    /// The plugin directory cannot be used.
    PluginDir,
}

/// A failed [`RuntimeBuilder::connect`] or [`Runtime::start`].
pub type StartError = Error<StartErrorKind>;

/// Assembles a [`Runtime`].
pub struct RuntimeBuilder {
    config: RuntimeConfig,
    executors: Executors,
    registry: Option<Arc<dyn Registry>>,
    secrets: Option<(
        mycelium_registry::SecretCatalog,
        Option<mycelium_registry::RuntimeKey>,
    )>,
    metrics: Option<Arc<dyn MetricsCollector>>,
    tracing: Option<Arc<dyn TraceBridge>>,
    logs: Option<Arc<FunctionLogs>>,
    builtins: HashMap<FunctionName, Builtin>,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RuntimeBuilder {
    /// A builder with default settings, no functions, an in-memory registry.
    pub fn new() -> Self {
        Self {
            config: RuntimeConfig::default(),
            executors: Executors::default(),
            registry: None,
            secrets: None,
            metrics: None,
            tracing: None,
            logs: None,
            builtins: HashMap::new(),
        }
    }

    /// Replaces all settings.
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// Where deployed functions are looked up (default: an empty [`MemoryRegistry`]).
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Where the secrets functions name come from (`catalog`, the watched secrets bucket) and
    /// the key that opens them. Without it, or without a key, a function that names a secret
    /// fails `secret_unavailable`.
    pub fn secrets(
        mut self,
        catalog: mycelium_registry::SecretCatalog,
        key: Option<mycelium_registry::RuntimeKey>,
    ) -> Self {
        self.secrets = Some((catalog, key));
        self
    }

    /// Runs deployed functions of `executor`'s kind with it (replacing any earlier one of that
    /// kind). A kind without an executor answers `unavailable`; deployed built-ins always have
    /// one.
    pub fn executor(mut self, executor: Arc<dyn Executor>) -> Self {
        self.executors.insert(executor);
        self
    }

    /// Runs functions of kind `plugin` with this executor: [`Self::executor`] for plugins.
    pub fn plugins(self, executor: Arc<PluginExecutor>) -> Self {
        self.executor(executor)
    }

    /// Runs functions of kind `wasm` with this executor: [`Self::executor`] for WebAssembly.
    pub fn wasm(self, executor: Arc<WasmExecutor>) -> Self {
        self.executor(executor)
    }

    /// Where measurements go (default: an [`InMemoryMetrics`]).
    pub fn metrics(mut self, metrics: Arc<dyn MetricsCollector>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Joins invocation spans to a tracing backend (default: [`PassThrough`], which hands the
    /// caller's W3C trace context on to plugins unchanged). `mycelium-observability` has the
    /// OpenTelemetry one.
    pub fn tracing(mut self, bridge: Arc<dyn TraceBridge>) -> Self {
        self.tracing = Some(bridge);
        self
    }

    /// Publishes what functions log on `<prefix>.logs.<function>` (see [`logs`]); the
    /// pipeline's layer must be installed in the `tracing` subscriber.
    pub fn function_logs(mut self, logs: Arc<FunctionLogs>) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Adds a built-in function with the given metadata (its kind is forced to builtin).
    pub fn builtin_with(mut self, mut metadata: FunctionMetadata, function: impl Function) -> Self {
        metadata.kind = mycelium_core::FunctionKind::Builtin;
        self.builtins.insert(
            metadata.name.clone(),
            Builtin {
                metadata: Arc::new(metadata),
                function: Arc::new(function),
            },
        );
        self
    }

    /// Adds a built-in function at version 1.
    pub fn builtin(self, name: FunctionName, description: &str, function: impl Function) -> Self {
        self.builtin_with(FunctionMetadata::builtin(name, description), function)
    }

    /// Adds the built-ins every Mycelium ships: `example` and `echo`.
    pub fn standard_builtins(self) -> Self {
        self.builtin(
            FunctionName::new("example").expect("valid name"),
            "replies with one event, response-<id>, saying which function processed the event",
            Example,
        )
        .builtin(
            FunctionName::new("echo").expect("valid name"),
            "returns the input event unchanged",
            Echo,
        )
    }

    /// Builds the runtime on an existing NATS connection.
    pub fn build(self, client: async_nats::Client) -> Result<Runtime, StartError> {
        let config = self.config;
        if config.max_in_flight == 0 || config.max_payload == 0 || config.max_concurrency == 0 {
            return Err(StartError::new(
                StartErrorKind::Config,
                "max_in_flight, max_concurrency and max_payload must be at least 1",
            ));
        }
        let prefix_ok = config.subject_prefix.split('.').all(|token| {
            !token.is_empty() && !token.contains(['*', '>']) && !token.contains(char::is_whitespace)
        });
        if !prefix_ok {
            return Err(StartError::new(
                StartErrorKind::Config,
                format!("subject prefix {:?} is not a literal NATS subject (tokens separated by '.', no wildcards or spaces)", config.subject_prefix),
            ));
        }
        let builtins = Arc::new(self.builtins);
        let mut executors = self.executors;
        executors.insert(Arc::new(BuiltinExecutor {
            builtins: builtins.clone(),
        }));
        let invoker = Invoker {
            builtins,
            executors,
            function_limits: std::sync::RwLock::default(),
            max_concurrency: config.max_concurrency,
            registry: self
                .registry
                .unwrap_or_else(|| Arc::new(MemoryRegistry::new())),
            secrets: Arc::new(match self.secrets {
                Some((catalog, key)) => secrets::Secrets::new(Some(catalog), key),
                None => secrets::Secrets::new(None, None),
            }),
            metrics: self
                .metrics
                .unwrap_or_else(|| Arc::new(InMemoryMetrics::new())),
            tracing: self.tracing.unwrap_or_else(|| Arc::new(PassThrough)),
            default_timeout: config.default_timeout,
        };
        Ok(Runtime {
            client,
            invoker,
            config,
            logs: self.logs,
        })
    }

    /// Connects to NATS at `url`, builds and starts the runtime: the one-call form.
    pub async fn serve(self, url: &str) -> Result<RuntimeHandle, StartError> {
        self.connect(url).await?.start().await
    }

    /// Connects to NATS at `url` and builds the runtime.
    pub async fn connect(self, url: &str) -> Result<Runtime, StartError> {
        self.build(connect(url).await?)
    }
}

async fn connect(url: &str) -> Result<async_nats::Client, StartError> {
    async_nats::ConnectOptions::new()
        .name("mycelium-runtime")
        .connect(url)
        .await
        .map_err(|e| {
            StartError::with_source(
                StartErrorKind::Connect,
                format!("connecting to NATS at {url}"),
                e,
            )
        })
}

/// A runtime ready to start.
pub struct Runtime {
    client: async_nats::Client,
    invoker: Invoker,
    config: RuntimeConfig,
    logs: Option<Arc<FunctionLogs>>,
}

impl Runtime {
    /// A builder.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::new()
    }

    /// Registers with the NATS services API, subscribes, and serves until shut down.
    pub async fn start(self) -> Result<RuntimeHandle, StartError> {
        let Runtime {
            client,
            invoker,
            config,
            logs,
        } = self;
        if let Some(logs) = logs {
            logs.start(client.clone(), config.subject_prefix.clone());
        }
        let subscribe_error =
            |what: &str, e| StartError::with_source(StartErrorKind::Subscribe, what.to_owned(), e);
        let subjects = Subjects::new(&config.subject_prefix);
        let endpoints = [
            (
                mycelium_core::subjects::INVOKE_ENDPOINT,
                subjects.invoke.clone(),
                EndpointKind::Invoke,
            ),
            (
                "invoke-binding",
                subjects.binding.clone(),
                EndpointKind::Binding,
            ),
            ("list", subjects.list.clone(), EndpointKind::List),
            (
                "describe",
                subjects.describe.clone(),
                EndpointKind::Describe,
            ),
        ];
        let mut subscribed = Vec::with_capacity(endpoints.len());
        let mut entries = Vec::with_capacity(endpoints.len());
        for (name, subject, kind) in endpoints {
            let subscriber = client
                .queue_subscribe(subject.clone(), config.queue_group.clone())
                .await
                .map_err(|e| subscribe_error(&format!("subscribing to {subject}"), e))?;
            let stats = Arc::new(micro::EndpointStats::default());
            // The invoke endpoint carries the per-function figures (`mycelium stats`).
            let data: Option<micro::StatsData> = matches!(kind, EndpointKind::Invoke).then(|| {
                let metrics = invoker.metrics.clone();
                Arc::new(move || {
                    let data = mycelium_core::subjects::InvokeEndpointData {
                        functions: metrics.function_stats(),
                        triggers: metrics.trigger_stats(),
                    };
                    serde_json::to_value(data).unwrap_or_default()
                }) as micro::StatsData
            });
            entries.push(micro::EndpointEntry {
                data,
                info: async_nats::service::endpoint::Info {
                    name: name.into(),
                    subject,
                    queue_group: config.queue_group.clone(),
                    metadata: HashMap::new(),
                },
                stats: stats.clone(),
            });
            subscribed.push((subscriber, kind, stats));
        }
        let service = micro::MicroService::start(
            client.clone(),
            &config.service_name,
            VERSION,
            "Mycelium serverless function runtime",
            HashMap::from([("subject_prefix".to_string(), config.subject_prefix.clone())]),
            entries,
        )
        .await
        .map_err(|e| subscribe_error("registering with the NATS services API", e))?;
        // The server must have processed the subscriptions before we report ready, or a
        // request sent right after start() returns could find no responder (seen in tests).
        client.flush().await.map_err(|e| {
            StartError::with_source(StartErrorKind::Subscribe, "flushing subscriptions", e)
        })?;
        fence(&client).await;

        let shared = Arc::new(Shared {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            invoker,
            subjects,
            client: client.clone(),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            config,
        });
        let prestart = shared
            .config
            .prestart_plugins
            .then(|| prestart(&shared))
            .flatten();
        let asynchronous = shared
            .config
            .asynchronous
            .enabled
            .then(|| asynchronous::start(&shared));
        let triggers = triggers::start(&shared);
        let endpoint_tasks = subscribed
            .into_iter()
            .map(|(subscriber, kind, stats)| {
                tokio::spawn(serve_endpoint(shared.clone(), subscriber, kind, stats))
            })
            .collect();
        tracing::info!(
            subject = %shared.subjects.invoke,
            queue_group = %shared.config.queue_group,
            "runtime started"
        );
        Ok(RuntimeHandle {
            shared,
            service,
            endpoint_tasks,
            prestart,
            asynchronous,
            triggers,
        })
    }
}

/// A running runtime. Call [`RuntimeHandle::shutdown`] to stop it gracefully; dropping
/// it stops nothing (the endpoint tasks keep serving).
pub struct RuntimeHandle {
    shared: Arc<Shared>,
    service: micro::MicroService,
    endpoint_tasks: Vec<tokio::task::JoinHandle<()>>,
    prestart: Option<tokio::task::JoinHandle<()>>,
    asynchronous: Option<tokio::task::JoinHandle<()>>,
    triggers: tokio::task::JoinHandle<()>,
}

/// Resolves when the registry has changed (`true`), or when it never will again (`false`: its
/// watch ended). A static registry (`None`) never resolves.
async fn registry_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match changes.as_mut() {
        Some(changes) => changes.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Gets the active version of every deployed function ready ahead of its first call (a plugin
/// process started), now and whenever the registry changes (deploy, rollback), so callers pay
/// no cold start.
fn prestart(shared: &Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    let executors = shared.invoker.executors.clone();
    let registry = shared.invoker.registry.clone();
    let secrets = shared.invoker.secrets.clone();
    let mut changes = registry.changes();
    // A rotated secret is a change too: the function's new processes start ahead.
    let mut secret_changes = secrets.changes();
    Some(tokio::spawn(async move {
        loop {
            for summary in registry.list() {
                let Some(executor) = executors.get(summary.kind).cloned() else {
                    continue;
                };
                let Ok(metadata) = registry.get(&summary.name, None) else {
                    continue;
                };
                // A function whose secrets cannot be opened is reported when it is called.
                let Ok(env) = secrets.env_of(&metadata) else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Err(error) = executor.prestart(&metadata, &env).await {
                        tracing::warn!(function = %metadata.name, version = metadata.version, %error, "getting the function ready ahead of time failed");
                    }
                });
            }
            if changes.is_none() && secret_changes.is_none() {
                return;
            }
            tokio::select! {
                changed = registry_changed(&mut changes) => if !changed { return },
                changed = registry_changed(&mut secret_changes) => if !changed {
                    secret_changes = None;
                },
            }
        }
    }))
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Invocations cancelled because they outlived the grace period.
    pub abandoned: usize,
}

impl RuntimeHandle {
    /// The NATS connection the runtime uses.
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// The settings in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// Invocations executing now.
    pub fn in_flight(&self) -> usize {
        self.shared.config.max_in_flight - self.shared.in_flight.available_permits()
    }

    /// Stops taking requests, lets in-flight invocations finish within the grace period,
    /// answers the rest `unavailable`, and flushes the replies.
    ///
    /// The grace bounds the whole shutdown, whether NATS is there or not: steps that need the
    /// server (draining the subscriptions, the fence, the last flush) give up when it is gone,
    /// so a runtime stopped together with its nats-server still exits (after at most the
    /// grace and a second for the last replies).
    pub async fn shutdown(self) -> ShutdownReport {
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace;
        tracing::info!(in_flight = self.in_flight(), "runtime stopping");
        shared.stop.cancel();
        // Draining needs the server to take the UNSUBs; without it the loops would wait
        // for as long as the server is away.
        let aborts: Vec<_> = self
            .endpoint_tasks
            .iter()
            .map(tokio::task::JoinHandle::abort_handle)
            .collect();
        let drained = futures_util::future::join_all(self.endpoint_tasks);
        if tokio::time::timeout_at(deadline, drained).await.is_err() {
            tracing::warn!("NATS did not confirm the end of the subscriptions within the grace period (is the server gone?); stopping without it");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
        // Once the server has processed the UNSUBs, no new request is routed here.
        let _ = tokio::time::timeout_at(deadline, fence(&shared.client)).await;
        shared.tracker.close();
        let mut abandoned = 0;
        if tokio::time::timeout_at(deadline, shared.tracker.wait())
            .await
            .is_err()
        {
            abandoned = shared.tracker.len();
            tracing::warn!(
                abandoned,
                "grace period over; cancelling the invocations still running"
            );
            shared.abort.cancel();
            shared.tracker.wait().await;
        }
        drop(self.service);
        if let Some(prestart) = self.prestart {
            prestart.abort();
        }
        if let Some(asynchronous) = self.asynchronous {
            asynchronous.abort();
        }
        self.triggers.abort();
        for executor in shared.invoker.executors.iter() {
            executor.shutdown().await;
        }
        let last_replies = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(LAST_FLUSH);
        match tokio::time::timeout(last_replies, shared.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "flushing the last replies failed"),
            Err(_) => tracing::warn!("NATS is unreachable; the last replies may be lost"),
        }
        tracing::info!(abandoned, "runtime stopped");
        ShutdownReport { abandoned }
    }
}

/// The least time the last replies get to leave, even when the grace is used up.
const LAST_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// A round trip the server answers (with "no responders") only after it has processed every
/// command this connection sent before it, SUBs and UNSUBs included: a client's commands are
/// handled in order. `flush` alone only waits for the socket write.
async fn fence(client: &async_nats::Client) {
    let subject = format!("_MYCELIUM.FENCE.{}", nuid::next());
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.request(subject, bytes::Bytes::new()),
    )
    .await;
}

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;
