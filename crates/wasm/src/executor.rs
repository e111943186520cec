//! [`WasmExecutor`]: the functions of kind `wasm`, one [`WasmFunction`] per version, sharing
//! one engine.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use mycelium_core::{
    logs::LogSink, secret::SecretEnv, ErrorCode, Function, FunctionMetadata, FunctionName,
    MetricsCollector, ProtocolError,
};
use mycelium_registry::{ArtifactCache, RegistryAdmin};

use crate::{engine::Machine, function::WithSecrets, WasmFunction};

/// How WebAssembly functions are run. Defaults suit small functions.
#[derive(Debug, Clone)]
pub struct WasmSettings {
    /// Instances running at once, over all functions (the pooling allocator's slots; a call
    /// finding none free is answered `overloaded`). Match the runtime's `max_in_flight`.
    pub max_instances: u32,
    /// Memory of an instance whose function sets no `--memory-mb`, in MiB.
    pub default_memory_mb: u64,
    /// The most memory any instance may have, in MiB, whatever its function asks.
    pub max_memory_mb: u64,
    /// Bytes a call may write on stdout (its reply); beyond it the call fails
    /// `payload_too_large`.
    pub max_output_bytes: usize,
    /// Bytes of stderr kept from one call for the function's logs; the rest is cut.
    pub max_log_bytes: usize,
    /// Lines per second one function's instances may log together; the excess is dropped and
    /// counted in a record of its own (as for plugins).
    pub log_lines_per_second: u32,
    /// How often running guests are interrupted to yield and check their deadline.
    pub epoch_tick: Duration,
    /// Public NKeys whose signatures this runtime trusts; when any are set, modules that are
    /// unsigned or signed by another key are refused (`artifact_untrusted`).
    pub trusted_signers: Vec<String>,
}

impl Default for WasmSettings {
    fn default() -> Self {
        Self {
            max_instances: 1024,
            default_memory_mb: 128,
            max_memory_mb: 4096,
            max_output_bytes: 4 << 20,
            max_log_bytes: 64 << 10,
            log_lines_per_second: 1000,
            epoch_tick: Duration::from_millis(10),
            trusted_signers: Vec::new(),
        }
    }
}

/// What every function of an executor shares.
pub(crate) struct Shared {
    pub registry: Arc<dyn RegistryAdmin>,
    pub cache: ArtifactCache,
    pub settings: WasmSettings,
    pub metrics: Option<Arc<dyn MetricsCollector>>,
    pub log_sink: OnceLock<Arc<dyn LogSink>>,
    /// Made at the first WebAssembly call: a runtime without `wasm` functions reserves no
    /// instance slots and runs no epoch thread.
    machine: OnceLock<Result<Machine, String>>,
}

impl Shared {
    pub fn machine(&self) -> Result<&Machine, ProtocolError> {
        self.machine
            .get_or_init(|| Machine::new(&self.settings).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|why| {
                ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!("this runtime cannot run WebAssembly: {why}"),
                )
            })
    }
}

/// Runs WebAssembly functions: one [`WasmFunction`] per version, each call in a fresh
/// instance.
pub struct WasmExecutor {
    shared: Arc<Shared>,
    functions: Mutex<HashMap<(FunctionName, u64), Entry>>,
}

/// One version: its function, and its binding to the secrets of the moment if it names any.
struct Entry {
    function: Arc<WasmFunction>,
    bound: Option<Arc<WithSecrets>>,
}

impl WasmExecutor {
    /// An executor fetching modules from `registry` into `cache` (where their compiled code is
    /// kept too).
    pub fn new(
        registry: Arc<dyn RegistryAdmin>,
        cache: ArtifactCache,
        settings: WasmSettings,
        metrics: Option<Arc<dyn MetricsCollector>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry,
                cache,
                settings,
                metrics,
                log_sink: OnceLock::new(),
                machine: OnceLock::new(),
            }),
            functions: Mutex::default(),
        }
    }

    /// Sends what guests write on stderr to `sink` as function log records. Only the first
    /// call counts.
    pub fn set_log_sink(&self, sink: Arc<dyn LogSink>) {
        let _ = self.shared.log_sink.set(sink);
    }

    /// The function that runs `metadata`'s version (made on first use). Versions no longer
    /// active are let go when a new one is made; calls still running keep theirs.
    pub fn function(&self, metadata: &Arc<FunctionMetadata>) -> Arc<WasmFunction> {
        self.entry(metadata, |entry| entry.function.clone())
    }

    /// The function that runs `metadata`'s version with `secrets` in each instance's
    /// environment: the version's one compiled module, with the secrets of the moment (a
    /// rotation makes a new binding; calls running keep the old one).
    pub fn function_with(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Arc<dyn Function> {
        if secrets.is_empty() {
            return self.function(metadata);
        }
        self.entry(metadata, |entry| match &entry.bound {
            Some(bound) if bound.secrets == *secrets => bound.clone(),
            _ => {
                let bound = Arc::new(WithSecrets {
                    function: entry.function.clone(),
                    secrets: secrets.clone(),
                });
                entry.bound = Some(bound.clone());
                bound
            }
        })
    }

    fn entry<T>(&self, metadata: &Arc<FunctionMetadata>, then: impl FnOnce(&mut Entry) -> T) -> T {
        let key = (metadata.name.clone(), metadata.version);
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = functions.get_mut(&key) {
            return then(entry);
        }
        let registry = &self.shared.registry;
        functions.retain(|(name, version), _| {
            registry
                .get(name, None)
                .is_ok_and(|active| active.version == *version)
        });
        let entry = functions.entry(key).or_insert_with(|| Entry {
            function: Arc::new(WasmFunction::new(metadata.clone(), self.shared.clone())),
            bound: None,
        });
        then(entry)
    }

    /// Fetches and compiles `metadata`'s module ahead of its first call.
    pub async fn prestart(&self, metadata: &Arc<FunctionMetadata>) -> Result<(), ProtocolError> {
        self.function(metadata).load().await.map(drop)
    }

    /// Versions held now (loaded or not).
    pub fn function_count(&self) -> usize {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}
