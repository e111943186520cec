//! One version of a WebAssembly function: its module loaded once, a fresh instance per call.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use bytes::Bytes;
use mycelium_core::{
    logs::{Admit, LogRecord, OutputBudget, PLUGIN_OUTPUT_TARGET},
    secret::SecretEnv,
    ErrorCode, Event, Function, FunctionError, FunctionMetadata, InvocationContext, ProtocolError,
};
use mycelium_registry::{fetch_protocol_error, verify_signature};
use wasmtime::{InstancePre, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{
    p2::pipe::{MemoryInputPipe, MemoryOutputPipe},
    I32Exit, WasiCtxBuilder,
};

use crate::{
    abi,
    compiled::{self, LoadErrorKind},
    engine::{Guest, Machine, MemoryLimit},
    executor::Shared,
};

/// A version of a `wasm` function, as the runtime calls it. Made by
/// [`WasmExecutor::function`](crate::WasmExecutor::function).
pub struct WasmFunction {
    metadata: Arc<FunctionMetadata>,
    shared: Arc<Shared>,
    loaded: tokio::sync::OnceCell<Loaded>,
    /// Why the module can never run (it does not compile, say): answered at once afterwards.
    unusable: OnceLock<ProtocolError>,
    /// The log lines per second its instances share.
    log_budget: Arc<OutputBudget>,
}

/// A module ready to instantiate.
pub(crate) struct Loaded {
    pre: InstancePre<Guest>,
    /// `_start`, resolved once rather than by name in every instance.
    start: wasmtime::ModuleExport,
    env: Vec<(String, String)>,
    memory_bytes: usize,
}

/// The epoch callback's verdict on a call past its deadline (or abandoned).
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted at the deadline")
    }
}

impl std::error::Error for Interrupted {}

impl WasmFunction {
    pub(crate) fn new(metadata: Arc<FunctionMetadata>, shared: Arc<Shared>) -> Self {
        Self {
            log_budget: OutputBudget::new(shared.settings.log_lines_per_second),
            metadata,
            shared,
            loaded: tokio::sync::OnceCell::new(),
            unusable: OnceLock::new(),
        }
    }

    /// The version this runs.
    pub fn metadata(&self) -> &Arc<FunctionMetadata> {
        &self.metadata
    }

    /// Fetches and compiles the module unless done: the first call's work, done ahead by
    /// `prestart`. Failures that would recur (an invalid module) are kept and answered at once;
    /// others (the registry unreachable) are tried again by the next call.
    pub(crate) async fn load(&self) -> Result<(&Loaded, &Machine), ProtocolError> {
        let machine = self.shared.machine()?;
        if let Some(error) = self.unusable.get() {
            return Err(error.clone());
        }
        let loaded = self
            .loaded
            .get_or_try_init(|| self.load_module(machine))
            .await
            .inspect_err(|error| {
                if error.code == ErrorCode::ModuleInvalid {
                    let _ = self.unusable.set(error.clone());
                }
            })?;
        Ok((loaded, machine))
    }

    async fn load_module(&self, machine: &Machine) -> Result<Loaded, ProtocolError> {
        let metadata = &self.metadata;
        // Before anything is fetched or run: an untrusted module never reaches the disk.
        verify_signature(metadata, &self.shared.settings.trusted_signers)
            .map_err(|e| fetch_protocol_error(&e))?;
        let (binary, downloaded) = self
            .shared
            .cache
            .fetch_reporting(self.shared.registry.as_ref(), metadata)
            .await
            .map_err(|e| fetch_protocol_error(&e))?;
        if let Some(metrics) = &self.shared.metrics {
            metrics.artifact_fetched(&metadata.name, downloaded);
        }
        let digest = metadata.digest.clone().unwrap_or_default();
        let started = Instant::now();
        let module =
            match compiled::cached(&machine.engine, &self.shared.cache, &digest, &machine.tag) {
                Some(module) => module,
                None => {
                    let (engine, shared, tag) = (
                        machine.engine.clone(),
                        self.shared.clone(),
                        machine.tag.clone(),
                    );
                    tokio::task::spawn_blocking(move || {
                        compiled::compile(&engine, &shared.cache, &digest, &tag, &binary)
                    })
                    .await
                    .map_err(|e| {
                        ProtocolError::new(
                            ErrorCode::Internal,
                            format!("compiling the module: {e}"),
                        )
                    })?
                    .map_err(|e| {
                        let code = match e.kind() {
                            LoadErrorKind::Invalid => ErrorCode::ModuleInvalid,
                            LoadErrorKind::Storage => ErrorCode::Unavailable,
                        };
                        self.error(code, &e.to_string())
                    })?
                }
            };
        let start = module.get_export("_start");
        let start = match (start, module.get_export_index("_start")) {
            (Some(wasmtime::ExternType::Func(f)), Some(index))
                if f.params().len() == 0 && f.results().len() == 0 =>
            {
                index
            }
            _ => {
            return Err(self.error(
                ErrorCode::ModuleInvalid,
                "it exports no `_start` function: build a WASI command (a program with a `main`), not a library",
            ))
            }
        };
        if module.imports().len() > 0
            && !matches!(
                module.get_export("memory"),
                Some(wasmtime::ExternType::Memory(_))
            )
        {
            return Err(self.error(
                ErrorCode::ModuleInvalid,
                "it exports no `memory`, through which WASI passes everything",
            ));
        }
        let pre = machine.linker.instantiate_pre(&module).map_err(|e| {
            self.error(
                ErrorCode::ModuleInvalid,
                &format!(
                    "it imports what the runtime does not provide (WASI preview 1 only): {e:#}"
                ),
            )
        })?;
        tracing::info!(
            function = %metadata.name,
            version = metadata.version,
            load_ms = started.elapsed().as_secs_f64() * 1e3,
            "WebAssembly module ready"
        );
        let memory_mb = metadata
            .memory_mb
            .unwrap_or(self.shared.settings.default_memory_mb)
            .min(self.shared.settings.max_memory_mb);
        Ok(Loaded {
            pre,
            start,
            env: abi::version_environment(metadata),
            memory_bytes: usize::try_from(memory_mb << 20).unwrap_or(usize::MAX),
        })
    }

    fn error(&self, code: ErrorCode, why: &str) -> ProtocolError {
        ProtocolError::new(
            code,
            format!(
                "the module of \"{}\" v{} cannot run: {why}",
                self.metadata.name, self.metadata.version
            ),
        )
    }

    /// Hands what the guest wrote on stderr to the function's logs, a record per line.
    fn forward_logs(
        &self,
        stderr: &[u8],
        truncated: bool,
        ctx: &InvocationContext,
        secrets: &SecretEnv,
    ) {
        if stderr.is_empty() {
            return;
        }
        let sink = self.shared.log_sink.get();
        let text = String::from_utf8_lossy(stderr);
        let mut lines: Vec<String> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            // A guest printing its own secrets must not put them in the logs.
            .map(|line| secrets.redact(line).into_owned())
            .collect();
        if truncated {
            lines.push(format!(
                "(stderr cut at {} bytes, the limit of one call)",
                self.shared.settings.max_log_bytes
            ));
        }
        let (function, version) = (&self.metadata.name, self.metadata.version);
        let trace_id = ctx.trace().map(|t| t.trace_id().to_owned());
        let record = |level: &str, message: String| {
            if let Some(sink) = sink {
                let mut record =
                    LogRecord::now(level, function.clone(), version, "stderr", message);
                record.invocation_id = Some(ctx.invocation_id().to_owned());
                record.trace_id.clone_from(&trace_id);
                sink.record(record);
            }
        };
        let now = Instant::now();
        for message in lines {
            match self.log_budget.admit(now) {
                Admit::Drop => continue,
                Admit::Pass { dropped } if dropped > 0 => {
                    let counted = self.log_budget.dropped_message(dropped);
                    tracing::warn!(target: PLUGIN_OUTPUT_TARGET, function = %function, version, "{counted}");
                    record("warn", counted);
                }
                Admit::Pass { .. } => {}
            }
            tracing::info!(
                target: PLUGIN_OUTPUT_TARGET,
                function = %function, version, stream = "stderr",
                invocation_id = ctx.invocation_id(),
                "{message}"
            );
            record("info", message);
        }
    }

    /// Why a call that did not end well failed, in the caller's terms.
    fn failure(&self, error: &wasmtime::Error, memory_exceeded: Option<usize>) -> FunctionError {
        if let Some(bytes) = memory_exceeded {
            return FunctionError::new(format!(
                "the module needed more than its {} MiB of memory; deploy it with a larger --memory-mb, or make it use less",
                bytes >> 20
            ));
        }
        if error.is::<Interrupted>() {
            return FunctionError::with_code(
                ErrorCode::Timeout,
                "the module did not finish before the invocation's deadline",
            );
        }
        if error.is::<wasmtime::PoolConcurrencyLimitError>() {
            return FunctionError::with_code(
                ErrorCode::Overloaded,
                "every WebAssembly instance of this runtime is in use; retry with backoff",
            );
        }
        if let Some(trap) = error.downcast_ref::<Trap>() {
            return FunctionError::new(format!(
                "the module trapped ({trap}); the next call starts afresh; its stderr is in the function's logs"
            ));
        }
        FunctionError::new(format!("the module failed: {}", error.root_cause()))
    }
}

#[async_trait::async_trait]
impl Function for WasmFunction {
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        self.call(event, ctx, &SecretEnv::default()).await
    }
}

/// A version of a `wasm` function with the secrets its instances get (the function's
/// instances all share one compiled module; a rotation makes a new one of these).
pub struct WithSecrets {
    pub(crate) function: Arc<WasmFunction>,
    pub(crate) secrets: SecretEnv,
}

#[async_trait::async_trait]
impl Function for WithSecrets {
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        self.function.call(event, ctx, &self.secrets).await
    }
}

impl WasmFunction {
    /// One call in a fresh instance whose environment holds `secrets` too.
    async fn call(
        &self,
        event: Event,
        ctx: InvocationContext,
        secrets: &SecretEnv,
    ) -> Result<Vec<Event>, FunctionError> {
        let (loaded, machine) = self
            .load()
            .await
            .map_err(|e| FunctionError::with_code(e.code, e.message))?;
        let input = abi::input(&event)?;
        drop(event);
        let settings = &self.shared.settings;
        // One byte over each limit tells a full pipe from one that was cut.
        let stdout = MemoryOutputPipe::new(settings.max_output_bytes + 1);
        let stderr = MemoryOutputPipe::new(settings.max_log_bytes + 1);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdin(MemoryInputPipe::new(Bytes::from(input)))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg(self.metadata.name.as_str())
            .envs(&loaded.env)
            .envs(&abi::call_environment(&ctx));
        for (name, value) in secrets.vars() {
            wasi.env(name, value);
        }
        let wasi = wasi.build_p1();
        let mut store = Store::new(
            &machine.engine,
            Guest {
                wasi,
                limits: MemoryLimit {
                    bytes: loaded.memory_bytes,
                    exceeded: false,
                },
            },
        );
        store.limiter(|guest| &mut guest.limits);
        // Every tick the guest yields to the runtime's other work, until its deadline.
        let (deadline, cancellation) = (ctx.deadline(), ctx.cancellation().clone());
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if cancellation.is_cancelled() || Instant::now() >= deadline {
                Err(wasmtime::Error::new(Interrupted))
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let outcome = {
            let _running = machine.ticker.running();
            run(loaded, &mut store).await
        };
        let memory_exceeded = store.data().limits.exceeded.then_some(loaded.memory_bytes);
        drop(store);
        let stderr = drain(stderr);
        let cut = stderr.len() > settings.max_log_bytes;
        self.forward_logs(
            &stderr[..stderr.len().min(settings.max_log_bytes)],
            cut,
            &ctx,
            secrets,
        );
        let stdout = drain(stdout);
        if stdout.len() > settings.max_output_bytes {
            return Err(FunctionError::with_code(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the module wrote more than {} bytes on stdout, the limit of a reply; the output was dropped",
                    settings.max_output_bytes
                ),
            ));
        }
        match outcome {
            Ok(()) => abi::output(&stdout),
            Err(error) => match error.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => abi::output(&stdout),
                Some(I32Exit(status)) => Err(FunctionError::new(format!(
                    "the module exited with status {status}; its stderr is in the function's logs"
                ))),
                None => Err(self.failure(&error, memory_exceeded)),
            },
        }
    }
}

/// A fresh instance running `_start` to its end.
async fn run(loaded: &Loaded, store: &mut Store<Guest>) -> wasmtime::Result<()> {
    let instance = loaded.pre.instantiate_async(&mut *store).await?;
    let start = instance
        .get_module_export(&mut *store, &loaded.start)
        .and_then(wasmtime::Extern::into_func)
        .ok_or_else(|| wasmtime::format_err!("the module's `_start` is gone"))?
        .typed::<(), ()>(&*store)?;
    start.call_async(&mut *store, ()).await
}

/// What a pipe holds.
fn drain(pipe: MemoryOutputPipe) -> Bytes {
    pipe.contents()
}
