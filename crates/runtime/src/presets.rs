//! Ready-made runtimes ([`example_runtime`], [`production_runtime`]) and [`Assembly`],
//! the one place a full runtime (JetStream registry, binary cache, plugin and WebAssembly
//! executors, metrics, function logs, tracing) is put together, for `mycelium up`, `mycelium serve`, the
//! production preset and the tests alike.

use std::{path::PathBuf, sync::Arc};

use mycelium_core::{MetricsCollector, TraceBridge};
use mycelium_plugin::pool::{PluginExecutor, PoolSettings};
use mycelium_registry::{ArtifactCache, NatsRegistry, NatsRegistryConfig, RuntimeKey, SecretStore};
use mycelium_wasm::{WasmExecutor, WasmSettings};

use crate::{FunctionLogs, Runtime, RuntimeBuilder, RuntimeConfig, StartError, StartErrorKind};

/// The built-in functions on an in-memory registry: nothing to deploy, nothing kept.
pub async fn example_runtime(nats_url: &str) -> Result<Runtime, StartError> {
    RuntimeBuilder::new()
        .standard_builtins()
        .connect(nats_url)
        .await
}

/// The built-ins plus every function deployed to the JetStream registry (default buckets),
/// plugins included, hot-reloaded as it changes. Plugin binaries are cached under
/// `$MYCELIUM_PLUGIN_DIR`, else `.mycelium/plugins` (as `mycelium serve` does).
pub async fn production_runtime(nats_url: &str) -> Result<Runtime, StartError> {
    let client = crate::connect(nats_url).await?;
    Ok(Assembly::default().build(client).await?.runtime)
}

/// Everything a full runtime is made of that its user chooses; [`Assembly::build`] puts it
/// together.
#[derive(Clone)]
pub struct Assembly {
    /// The runtime's settings.
    pub config: RuntimeConfig,
    /// The JetStream registry's buckets and limits.
    pub registry: NatsRegistryConfig,
    /// Where plugin binaries are cached (`<dir>/cache`) and plugin processes get their working
    /// directories (`<dir>/run`).
    pub plugin_dir: PathBuf,
    /// Bytes of plugin binaries kept in the cache.
    pub plugin_cache_size: u64,
    /// How plugin processes are run.
    pub plugins: PoolSettings,
    /// How WebAssembly functions are run (their compiled modules are kept in the binary
    /// cache, beside the modules). `max_instances` is at most `config.max_in_flight`; the
    /// trusted signers and the log lines per second are the plugins' (one setting of each for
    /// every kind).
    pub wasm: WasmSettings,
    /// The private xkey that opens the secrets functions name (`--xkey-seed-file`); without
    /// one, functions that name secrets fail `secret_unavailable`. Its public half is
    /// announced in the secrets bucket for deployers to seal to, unless a key is announced
    /// already.
    pub xkey: Option<RuntimeKey>,
    /// Where measurements go (default: in memory).
    pub metrics: Option<Arc<dyn MetricsCollector>>,
    /// Function log publishing, if its layer is installed.
    pub logs: Option<Arc<FunctionLogs>>,
    /// A tracing backend (default: pass the caller's context through).
    pub tracing: Option<Arc<dyn TraceBridge>>,
}

impl Default for Assembly {
    fn default() -> Self {
        Self {
            config: RuntimeConfig::default(),
            registry: NatsRegistryConfig::default(),
            plugin_dir: std::env::var_os("MYCELIUM_PLUGIN_DIR")
                .filter(|dir| !dir.is_empty())
                .map_or_else(|| PathBuf::from(".mycelium/plugins"), PathBuf::from),
            plugin_cache_size: 1 << 30,
            plugins: PoolSettings::default(),
            wasm: WasmSettings::default(),
            xkey: None,
            metrics: None,
            logs: None,
            tracing: None,
        }
    }
}

/// A runtime put together by [`Assembly::build`], with the parts its user may want to watch.
pub struct Assembled {
    /// The runtime, ready to [`Runtime::start`].
    pub runtime: Runtime,
    /// Its view of the registry.
    pub registry: Arc<NatsRegistry>,
    /// Its plugin executor.
    pub plugins: Arc<PluginExecutor>,
    /// Its WebAssembly executor.
    pub wasm: Arc<WasmExecutor>,
}

impl Assembly {
    /// Opens the registry on `client`, makes the binary cache and the plugin executor, and
    /// builds the runtime with the standard built-ins.
    pub async fn build(self, client: async_nats::Client) -> Result<Assembled, StartError> {
        let registry = open_registry(client.clone(), self.registry.clone()).await?;
        // Both executors keep binaries in one directory under one bound (the cache holds no
        // state beyond the directory).
        let cache = || {
            ArtifactCache::new(self.plugin_dir.join("cache"), self.plugin_cache_size).map_err(|e| {
                StartError::with_source(
                    StartErrorKind::PluginDir,
                    format!("cannot use {} for plugins", self.plugin_dir.display()),
                    e,
                )
            })
        };
        let mut wasm_settings = self.wasm.clone();
        wasm_settings.max_instances = wasm_settings
            .max_instances
            .min(u32::try_from(self.config.max_in_flight).unwrap_or(u32::MAX));
        wasm_settings
            .trusted_signers
            .clone_from(&self.plugins.trusted_signers);
        // One log budget setting for every kind that prints.
        wasm_settings.log_lines_per_second = self.plugins.log_lines_per_second;
        let wasm = Arc::new(WasmExecutor::new(
            registry.clone(),
            cache()?,
            wasm_settings,
            self.metrics.clone(),
        ));
        let plugins = Arc::new(PluginExecutor::new(
            registry.clone(),
            cache()?,
            self.plugin_dir.join("run"),
            self.plugins.clone(),
            self.metrics.clone(),
        ));
        if let Some(logs) = &self.logs {
            plugins.set_log_sink(logs.clone());
            wasm.set_log_sink(logs.clone());
        }
        let secrets = open_secrets(client.clone(), &self.registry, self.xkey.as_ref()).await?;
        let runtime = self
            .builder()
            .registry(registry.clone())
            .secrets(secrets, self.xkey.clone())
            .plugins(plugins.clone())
            .wasm(wasm.clone())
            .build(client)?;
        Ok(Assembled {
            runtime,
            registry,
            plugins,
            wasm,
        })
    }

    /// The same runtime without a registry: the built-ins only, nothing deployed, no plugins
    /// (`mycelium serve --registry memory`).
    pub fn build_builtins_only(self, client: async_nats::Client) -> Result<Runtime, StartError> {
        self.builder().build(client)
    }

    /// Settings, built-ins and observability: what every runtime assembled here has.
    fn builder(&self) -> RuntimeBuilder {
        let mut builder = RuntimeBuilder::new()
            .config(self.config.clone())
            .standard_builtins();
        if let Some(metrics) = &self.metrics {
            builder = builder.metrics(metrics.clone());
        }
        if let Some(logs) = &self.logs {
            builder = builder.function_logs(logs.clone());
        }
        if let Some(tracing) = &self.tracing {
            builder = builder.tracing(tracing.clone());
        }
        builder
    }
}

/// Opens the secrets bucket and its watched catalog, announcing `key`'s public half (and
/// saying so loudly when another key is announced: this runtime cannot open what is sealed for
/// that one).
async fn open_secrets(
    client: async_nats::Client,
    config: &NatsRegistryConfig,
    key: Option<&RuntimeKey>,
) -> Result<mycelium_registry::SecretCatalog, StartError> {
    let failed =
        |e| StartError::with_source(StartErrorKind::Registry, "opening the secrets bucket", e);
    let store = SecretStore::open(client, &config.secrets_bucket, config.replicas)
        .await
        .map_err(failed)?;
    // Announcing is a convenience for deployers (`secret set` without --public-xkey), done
    // before the runtime answers so that `up` is ready for `secret set` when it says so; bounded,
    // because a runtime without the permission to write the bucket gets no reply, and it still
    // opens secrets.
    match key {
        Some(key) => {
            let announced =
                tokio::time::timeout(std::time::Duration::from_secs(2), store.announce(key)).await;
            match announced {
                Ok(Ok(None)) => {
                    tracing::info!(public_xkey = %key.public_key(), "secrets are sealed for this runtime's xkey")
                }
                Ok(Ok(Some(announced))) => tracing::warn!(
                    public_xkey = %key.public_key(), announced = %announced,
                    "this runtime's xkey is not the one secrets are sealed for (announced in {}): functions naming those secrets will fail secret_unavailable here; give every runtime the same --xkey-seed-file",
                    config.secrets_bucket
                ),
                Ok(Err(error)) => tracing::warn!(
                    public_xkey = %key.public_key(), error = %mycelium_core::Chain(&error),
                    "could not announce this runtime's public xkey; deployers need `mycelium secret set --public-xkey` with it"
                ),
                Err(_) => tracing::warn!(
                    public_xkey = %key.public_key(),
                    "announcing this runtime's public xkey got no answer in 2 s (no permission to publish to the secrets bucket?); deployers need `mycelium secret set --public-xkey` with it"
                ),
            }
        }
        None => tracing::debug!(
            "no xkey: functions that name secrets fail secret_unavailable (give --xkey-seed-file)"
        ),
    }
    store.catalog().await.map_err(failed)
}

/// Opens the JetStream registry for a runtime.
pub async fn open_registry(
    client: async_nats::Client,
    config: NatsRegistryConfig,
) -> Result<Arc<NatsRegistry>, StartError> {
    NatsRegistry::open(client, config)
        .await
        .map(Arc::new)
        .map_err(|e| {
            StartError::with_source(
                StartErrorKind::Registry,
                "opening the JetStream registry",
                e,
            )
        })
}
