//! Where functions are registered, versioned and stored.
//!
//! - [`Registry`]: the read side the runtime uses on every invocation. It answers from
//!   memory: a remote registry keeps a watched local snapshot, so [`Registry::get`] never
//!   does I/O.
//! - [`RegistryAdmin`]: deploy, versions, rollback, delete and artifact reads.
//! - [`MemoryRegistry`]: everything in process memory, for tests and embedding.
//! - [`NatsRegistry`]: metadata in a JetStream KV bucket, binaries content-addressed in an
//!   Object Store bucket, kept current on every runtime by a KV watch.
//! - [`ArtifactCache`]: the runtime host's local, verified, size-bounded binary cache.
//! - [`DeploySpec`] says what to deploy; [`SigningKey`] and [`verify_signature`] sign binaries
//!   and check them.
//! - [`secrets`]: values sealed with the runtimes' xkey in a KV bucket ([`SecretStore`]), and
//!   the [`RuntimeKey`] that opens them.

mod cache;
mod catalog;
mod deploy;
pub mod digest;
mod error;
mod jetstream;
mod memory;
pub mod secrets;
mod signing;

use std::{pin::Pin, sync::Arc};

use mycelium_core::{
    trigger::{Trigger, TriggerName},
    FunctionMetadata, FunctionName, FunctionSummary,
};

pub use cache::ArtifactCache;
pub use deploy::{kind_of_binary, ArtifactSource, DeploySpec, Progress};
pub(crate) use deploy::{open_source, prepare, versions_to_prune, PreparedArtifact};
pub(crate) use error::pinned_digest;
pub use error::{
    fetch_protocol_error, not_found, protocol_error, trigger_not_found, version_not_found,
    DeleteError, DeleteErrorKind, DeployError, DeployErrorKind, FetchError, FetchErrorKind,
    LookupError, LookupErrorKind, RollbackError, RollbackErrorKind, TriggerError, TriggerErrorKind,
};
pub use jetstream::{NatsRegistry, NatsRegistryConfig, OpenError, OpenErrorKind};
pub use memory::MemoryRegistry;
pub use secrets::{
    RuntimeKey, SecretCatalog, SecretError, SecretErrorKind, SecretInfo, SecretStore,
};
pub use signing::{verify_signature, SigningKey};

/// A catalogue of function versions and which one of each is active.
pub trait Registry: Send + Sync + 'static {
    /// The metadata of `name` at `version`, or at its active version when `None`.
    fn get(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Arc<FunctionMetadata>, LookupError>;

    /// Every function at its active version, sorted by name.
    fn list(&self) -> Vec<FunctionSummary>;

    /// Whether `name` has an active version (without building an error when it has not: the
    /// runtime asks this for every call of a built-in, which a deploy may replace).
    fn contains(&self, name: &FunctionName) -> bool {
        self.get(name, None).is_ok()
    }

    /// A signal that changes whenever the catalog changes, for registries that change under
    /// the runtime (the JetStream registry); `None` for static ones.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Every trigger, sorted by name (from memory, like [`Registry::get`]).
    fn triggers(&self) -> Vec<Arc<Trigger>> {
        Vec::new()
    }
}

/// A function's kept versions and which one is active.
#[derive(Debug, Clone)]
pub struct Versions {
    /// Kept versions, oldest first.
    pub versions: Vec<Arc<FunctionMetadata>>,
    /// The active version, if any.
    pub active: Option<u64>,
}

/// A stream of an artifact's bytes.
pub type ArtifactReader = Pin<Box<dyn tokio::io::AsyncRead + Send>>;

/// The write side of a registry, and artifact reads.
#[async_trait::async_trait]
pub trait RegistryAdmin: Registry {
    /// Stores a new, immutable version (the next number for the name, never reused) and
    /// makes it active unless a newer version is already active.
    async fn deploy(&self, spec: DeploySpec) -> Result<Arc<FunctionMetadata>, DeployError>;

    /// The kept versions of `name`.
    fn versions(&self, name: &FunctionName) -> Result<Versions, LookupError>;

    /// Makes a kept version active again.
    async fn rollback(
        &self,
        name: &FunctionName,
        version: u64,
    ) -> Result<Arc<FunctionMetadata>, RollbackError>;

    /// Removes the function and its versions. Version numbers are not reused afterwards.
    async fn delete(&self, name: &FunctionName) -> Result<(), DeleteError>;

    /// The stored bytes of the binary `metadata` pins, unverified: callers verify against
    /// the pin ([`ArtifactCache::fetch`] does).
    async fn read_artifact(
        &self,
        metadata: &FunctionMetadata,
    ) -> Result<ArtifactReader, FetchError>;

    /// Stores a trigger (a new one, or a new state of one: paused, resumed), checked already.
    async fn put_trigger(&self, trigger: Trigger) -> Result<(), TriggerError>;

    /// Removes a trigger.
    async fn delete_trigger(&self, name: &TriggerName) -> Result<(), TriggerError>;
}
