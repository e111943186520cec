//! From a decoded request to the function's result: lookup, limits, execution.
//! Knows nothing of NATS; the endpoints in `server` feed it.

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use mycelium_core::{
    cloudevents::AttributesReader, envelope::InvokeRequest, ErrorCode, Event, Function,
    FunctionMetadata, FunctionName, FunctionSummary, InvocationContext, MetricsCollector, Outcome,
    ProtocolError, TraceBridge,
};
use mycelium_registry::{protocol_error, Registry};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    executor::{Builtin, Executors},
    logs::CURRENT_INVOCATION,
};

pub(crate) struct Invoker {
    /// Compiled-in functions, answering under their own names.
    pub builtins: Arc<HashMap<FunctionName, Builtin>>,
    /// What runs deployed functions, by kind.
    pub executors: Executors,
    /// Per-version concurrency limits (`maxConcurrency`, else `max_concurrency`), created on
    /// first use; only resolved (registered) versions get one, and versions that left the
    /// registry are pruned, so callers' names cannot grow it.
    pub function_limits:
        std::sync::RwLock<HashMap<(FunctionName, u64), Arc<tokio::sync::Semaphore>>>,
    /// The limit of functions that set none.
    pub max_concurrency: usize,
    pub registry: Arc<dyn Registry>,
    /// Opens the secrets deployed functions name.
    pub secrets: Arc<crate::secrets::Secrets>,
    pub metrics: Arc<dyn MetricsCollector>,
    pub tracing: Arc<dyn TraceBridge>,
    pub default_timeout: Duration,
}

impl Invoker {
    /// Finds what to run. A deployed function replaces a built-in of the same name (deploy
    /// asks for `--replace-builtin` before it lets that happen).
    fn resolve(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<(Arc<FunctionMetadata>, Arc<dyn Function>), ProtocolError> {
        if let Some(builtin) = self.builtin(name, version)? {
            return Ok((builtin.metadata.clone(), builtin.function.clone()));
        }
        let metadata = self.registry.get(name, version).map_err(protocol_error)?;
        self.run_deployed(name, metadata)
    }

    fn run_deployed(
        &self,
        name: &FunctionName,
        metadata: Arc<FunctionMetadata>,
    ) -> Result<(Arc<FunctionMetadata>, Arc<dyn Function>), ProtocolError> {
        let kind = metadata.kind;
        let Some(executor) = self.executors.get(kind) else {
            return Err(ProtocolError::new(
                ErrorCode::Unavailable,
                format!("\"{name}\" is a {kind} function and this runtime has no {kind} executor; run a runtime with {kind} support"),
            ));
        };
        let secrets = self.secrets.env_of(&metadata)?;
        let function = executor.function(&metadata, &secrets)?;
        Ok((metadata, function))
    }

    pub fn describe(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Arc<FunctionMetadata>, ProtocolError> {
        match self.builtin(name, version)? {
            Some(builtin) => Ok(builtin.metadata.clone()),
            None => self.registry.get(name, version).map_err(protocol_error),
        }
    }

    /// The built-in of that name, unless a deployed function replaced it; built-ins have
    /// exactly one version.
    fn builtin(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Option<&Builtin>, ProtocolError> {
        let Some(builtin) = self.builtins.get(name) else {
            return Ok(None);
        };
        if self.registry.contains(name) {
            return Ok(None);
        }
        match version {
            Some(v) if v != builtin.metadata.version => Err(ProtocolError::new(
                ErrorCode::VersionNotFound,
                format!(
                    "\"{name}\" is a built-in function and has no version {v}, only version {}; omit \"version\" or use it",
                    builtin.metadata.version
                ),
            )),
            _ => Ok(Some(builtin)),
        }
    }

    pub fn list(&self) -> Vec<FunctionSummary> {
        let mut list: Vec<FunctionSummary> = self
            .registry
            .list()
            .into_iter()
            .chain(
                self.builtins
                    .values()
                    .filter(|b| !self.registry.contains(&b.metadata.name))
                    .map(|b| b.metadata.summary()),
            )
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Runs one invocation to its end: result, error, timeout, panic or shutdown.
    /// `abort` fires when the runtime gives up on in-flight work.
    pub async fn invoke(
        &self,
        request: InvokeRequest,
        abort: &CancellationToken,
    ) -> Result<Vec<Event>, ProtocolError> {
        let InvokeRequest {
            function: name,
            event,
            version,
            timeout,
            trace,
            invocation_id,
        } = request;
        let (metadata, function) = match self.resolve(&name, version) {
            Ok(found) => found,
            Err(err) => {
                // Names nobody registered are counted under their code alone: per-name
                // figures for whatever callers send would grow without bound.
                let known = err.code != ErrorCode::FunctionNotFound;
                self.metrics
                    .request_rejected(known.then_some(&name), err.code);
                return Err(err);
            }
        };
        let _function_permit = match self.function_permit(&metadata) {
            Ok(permit) => permit,
            Err(err) => {
                self.metrics.request_rejected(Some(&name), err.code);
                return Err(err);
            }
        };
        let limit = metadata.timeout.unwrap_or(self.default_timeout);
        let timeout = timeout.map_or(limit, |asked| asked.min(limit));

        let invocation_id = invocation_id.unwrap_or_else(|| nuid::next().to_string());
        // Debug level: at the default `info` the span is not built at all (it cost ~10% of
        // built-in throughput in span bookkeeping, profiled); function logs find the invocation
        // through `CURRENT_INVOCATION` instead, and an OpenTelemetry layer enables this span by
        // name when traces are exported.
        let span = tracing::debug_span!(
            "invocation",
            function = %name,
            version = metadata.version,
            invocation_id = %invocation_id,
            event_id = %event.id(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let incoming = trace;
        let trace = self.tracing.enter(&span, incoming.as_ref());
        mycelium_core::trace::record_ids(&span, incoming.as_ref(), trace.as_ref());
        // A fresh token, not a child of `abort`: creating children locks the parent, a
        // contention point under load; the select below links the two on abort.
        let cancellation = CancellationToken::new();
        let started = Instant::now();
        let ctx = InvocationContext::new(
            name.clone(),
            metadata.version,
            invocation_id,
            started + timeout,
            cancellation.clone(),
            span.clone(),
        )
        .with_trace(trace);

        self.metrics.invocation_started(&name);
        let current = ctx.clone();
        let execution = CURRENT_INVOCATION.scope(
            ctx.clone(),
            AssertUnwindSafe(function.execute(event, ctx))
                .catch_unwind()
                .instrument(span.clone()),
        );
        // The runtime's own words about this invocation count as its logs too.
        let log = |emit: &dyn Fn()| CURRENT_INVOCATION.sync_scope(current.clone(), emit);
        // Shutdown is checked first: a function reacting to its cancelled context must
        // not turn the runtime's `unavailable` into its own error.
        let result = tokio::select! {
            biased;
            () = abort.cancelled() => {
                cancellation.cancel();
                Err(ProtocolError::new(
                    ErrorCode::Unavailable,
                    "the runtime shut down before the function finished; retry, another instance will take it",
                ))
            }
            outcome = tokio::time::timeout(timeout, execution) => match outcome {
                Ok(Ok(Ok(events))) => Ok(events),
                Ok(Ok(Err(error))) => {
                    log(&|| tracing::debug!(parent: &span, function = %name, invocation_id = current.invocation_id(), error = %error, source = ?std::error::Error::source(&error), "function returned an error"));
                    Err(match error.code() {
                        ErrorCode::FunctionError => ProtocolError::new(
                            ErrorCode::FunctionError,
                            format!("function \"{name}\" failed: {}", error.message()),
                        ),
                        code => ProtocolError::new(code, error.message()),
                    })
                }
                Ok(Err(panic)) => {
                    let reason = panic_message(panic.as_ref());
                    log(&|| tracing::error!(parent: &span, function = %name, invocation_id = current.invocation_id(), panic = %reason, "function panicked"));
                    Err(ProtocolError::new(ErrorCode::FunctionError, format!("function \"{name}\" panicked: {reason}")))
                }
                Err(_) => {
                    cancellation.cancel();
                    log(&|| tracing::warn!(parent: &span, function = %name, invocation_id = current.invocation_id(), ?timeout, "function timed out"));
                    Err(ProtocolError::new(
                        ErrorCode::Timeout,
                        format!("function \"{name}\" did not finish within {} ms", timeout.as_millis()),
                    ))
                }
            },
        };
        let outcome = match &result {
            Ok(_) => Outcome::Success,
            Err(e) => Outcome::Failure(e.code),
        };
        self.metrics
            .invocation_finished(&name, metadata.version, outcome, started.elapsed());
        result
    }
}

impl Invoker {
    /// Invocations of `metadata`'s version allowed at once on this runtime: its own
    /// `maxConcurrency`, else the runtime's default.
    fn concurrency_limit(&self, metadata: &FunctionMetadata) -> usize {
        metadata
            .max_concurrency
            .map_or(self.max_concurrency, |max| max as usize)
    }

    /// Invocations of `name`'s active version allowed at once (the runtime's default for a
    /// function it does not know): how many the event sources take at a time.
    pub fn concurrency_of(&self, name: &FunctionName) -> usize {
        self.describe(name, None)
            .map_or(self.max_concurrency, |metadata| {
                self.concurrency_limit(&metadata)
            })
            .max(1)
    }

    /// Takes one of the function version's concurrency slots.
    fn function_permit(
        &self,
        metadata: &FunctionMetadata,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ProtocolError> {
        let max = self.concurrency_limit(metadata);
        let key = (metadata.name.clone(), metadata.version);
        let found = self
            .function_limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let semaphore = match found {
            Some(semaphore) => semaphore,
            None => {
                let mut limits = self
                    .function_limits
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                // New versions are rare: the moment to forget the deleted and retired ones.
                limits.retain(|(name, version), _| self.is_registered(name, *version));
                limits
                    .entry(key)
                    .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(max)))
                    .clone()
            }
        };
        semaphore.try_acquire_owned().map_err(|_| {
            let source = if metadata.max_concurrency.is_some() {
                "its maxConcurrency, set by `mycelium deploy --max-concurrency`"
            } else {
                "the runtime's per-function limit, `mycelium serve --max-concurrency`"
            };
            ProtocolError::new(
                ErrorCode::Overloaded,
                format!(
                    "function \"{}\" is running its limit of {max} concurrent invocations ({source}); retry with backoff",
                    metadata.name
                ),
            )
        })
    }

    fn is_registered(&self, name: &FunctionName, version: u64) -> bool {
        self.builtins
            .get(name)
            .is_some_and(|b| b.metadata.version == version)
            || self.registry.get(name, Some(version)).is_ok()
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-text panic payload)")
}

#[cfg(test)]
mod tests {
    use mycelium_core::InMemoryMetrics;
    use mycelium_registry::{MemoryRegistry, RegistryAdmin};

    use super::*;

    fn invoker(registry: Arc<MemoryRegistry>) -> Invoker {
        Invoker {
            builtins: Arc::default(),
            executors: crate::executor::Executors::default(),
            function_limits: std::sync::RwLock::default(),
            max_concurrency: 4,
            registry,
            secrets: Arc::new(crate::secrets::Secrets::new(None, None)),
            metrics: Arc::new(InMemoryMetrics::new()),
            tracing: Arc::new(mycelium_core::trace::PassThrough),
            default_timeout: Duration::from_secs(1),
        }
    }

    fn limits_held(invoker: &Invoker) -> Vec<String> {
        let limits = invoker.function_limits.read().unwrap();
        let mut held: Vec<String> = limits
            .keys()
            .map(|(name, version)| format!("{name}@{version}"))
            .collect();
        held.sort();
        held
    }

    /// Limits exist only for registered versions, and those of deleted functions go.
    #[tokio::test]
    async fn concurrency_limits_follow_the_registry() {
        let registry = Arc::new(MemoryRegistry::new());
        let invoker = invoker(registry.clone());
        let deploy = |name: &str| {
            let name: FunctionName = name.parse().unwrap();
            registry.insert(FunctionMetadata::builtin(name.clone(), "test"));
            registry.get(&name, None).unwrap()
        };
        let a = deploy("a");
        drop(invoker.function_permit(&a).unwrap());
        assert_eq!(limits_held(&invoker), ["a@1"]);
        // Four permits held: the fifth call is refused with the runtime's limit.
        let held: Vec<_> = (0..4)
            .map(|_| invoker.function_permit(&a).unwrap())
            .collect();
        let refused = invoker.function_permit(&a).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        assert!(
            refused.message.contains("limit of 4"),
            "{}",
            refused.message
        );
        drop(held);

        registry.delete(&a.name).await.unwrap();
        let b = deploy("b");
        drop(invoker.function_permit(&b).unwrap());
        assert_eq!(limits_held(&invoker), ["b@1"], "a's limit was pruned");
    }
}
