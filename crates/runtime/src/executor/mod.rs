//! The seam every function kind plugs into: an [`Executor`] answers "give me something that
//! runs this function version", warms versions up ahead of their first call and stops what it
//! runs. One module per kind; the invoker holds one executor per [`FunctionKind`] and knows
//! nothing of processes or protocols.
//!
//! Adding a kind is a module implementing [`Executor`] plus one
//! [`RuntimeBuilder::executor`](crate::RuntimeBuilder::executor) call.

mod builtin;
mod plugin;
mod wasm;

use std::sync::Arc;

use mycelium_core::{secret::SecretEnv, Function, FunctionKind, FunctionMetadata, ProtocolError};

pub(crate) use builtin::{Builtin, BuiltinExecutor};

/// Runs the functions of one [`FunctionKind`].
#[async_trait::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// The kind of function this executor runs.
    fn kind(&self) -> FunctionKind;

    /// What runs `metadata`'s version, with `secrets` (the opened secrets it names; empty for
    /// most) in its environment. Called for every invocation of a deployed function: keep it a
    /// lookup (create what is missing once, reuse it after). When `secrets` differ from what
    /// it was given before (a rotation), what runs from now on must get the new values;
    /// calls in flight may finish on the old.
    fn function(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Result<Arc<dyn Function>, ProtocolError>;

    /// Gets `metadata`'s version ready ahead of its first call (a plugin process started), so
    /// callers pay no cold start. Nothing by default.
    async fn prestart(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Result<(), ProtocolError> {
        let _ = (metadata, secrets);
        Ok(())
    }

    /// Stops everything this executor runs; the runtime is shutting down. Nothing by default.
    async fn shutdown(&self) {}
}

/// The executors of a runtime, one per kind. A handful at most: a scan beats hashing.
#[derive(Clone, Default)]
pub(crate) struct Executors(Vec<Arc<dyn Executor>>);

impl Executors {
    /// Adds `executor`, replacing one of the same kind.
    pub fn insert(&mut self, executor: Arc<dyn Executor>) {
        self.0.retain(|e| e.kind() != executor.kind());
        self.0.push(executor);
    }

    pub fn get(&self, kind: FunctionKind) -> Option<&Arc<dyn Executor>> {
        self.0.iter().find(|e| e.kind() == kind)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Executor>> {
        self.0.iter()
    }
}
