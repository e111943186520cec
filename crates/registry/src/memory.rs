//! A registry in process memory: the same semantics as the JetStream one, nothing persisted.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use bytes::Bytes;
use mycelium_core::{
    trigger::{Trigger, TriggerName},
    FunctionMetadata, FunctionName, FunctionSummary,
};
use tokio::io::AsyncReadExt;

use crate::{
    catalog::Catalog, not_found, open_source, prepare, versions_to_prune, ArtifactReader,
    DeleteError, DeleteErrorKind, DeployError, DeployErrorKind, DeploySpec, FetchError,
    FetchErrorKind, LookupError, Registry, RegistryAdmin, RollbackError, RollbackErrorKind,
    TriggerError, Versions,
};

/// Default number of versions kept per function.
pub const DEFAULT_KEEP_VERSIONS: usize = 10;
/// Default largest binary accepted, in bytes.
pub const DEFAULT_MAX_ARTIFACT_SIZE: u64 = 256 * 1024 * 1024;

/// A registry held in process memory; nothing survives a restart.
#[derive(Debug)]
pub struct MemoryRegistry {
    state: RwLock<State>,
    keep_versions: usize,
    max_artifact_size: u64,
}

#[derive(Debug, Default)]
struct State {
    catalog: Catalog,
    /// Last version handed out per name; survives deletes so numbers are never reused.
    counters: HashMap<FunctionName, u64>,
    artifacts: HashMap<String, Bytes>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    /// An empty registry with default limits.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_KEEP_VERSIONS, DEFAULT_MAX_ARTIFACT_SIZE)
    }

    /// An empty registry keeping `keep_versions` versions and accepting binaries up to
    /// `max_artifact_size` bytes.
    pub fn with_limits(keep_versions: usize, max_artifact_size: u64) -> Self {
        Self {
            state: RwLock::default(),
            keep_versions,
            max_artifact_size,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) the version `metadata.version` of a function as given and makes it
    /// active, bypassing deploy (for embedding and tests).
    pub fn insert(&self, metadata: FunctionMetadata) {
        let mut state = self.write();
        let name = metadata.name.clone();
        let version = metadata.version;
        let counter = state.counters.entry(name.clone()).or_default();
        *counter = (*counter).max(version);
        state.catalog.insert_version(Arc::new(metadata));
        state.catalog.set_active(&name, Some(version));
    }

    /// Replaces the stored bytes of an artifact behind the registry's back (tests of
    /// corruption detection).
    pub fn tamper_with_artifact(&self, digest: &str, bytes: Bytes) {
        self.write().artifacts.insert(digest.to_owned(), bytes);
    }
}

impl Registry for MemoryRegistry {
    fn get(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Arc<FunctionMetadata>, LookupError> {
        self.read().catalog.get(name, version)
    }

    fn contains(&self, name: &FunctionName) -> bool {
        self.read().catalog.contains(name)
    }

    fn list(&self) -> Vec<FunctionSummary> {
        self.read().catalog.list()
    }

    fn triggers(&self) -> Vec<Arc<Trigger>> {
        self.read().catalog.triggers()
    }
}

#[async_trait::async_trait]
impl RegistryAdmin for MemoryRegistry {
    async fn deploy(&self, spec: DeploySpec) -> Result<Arc<FunctionMetadata>, DeployError> {
        let artifact = prepare(&spec, self.max_artifact_size).await?;
        let bytes = match &artifact {
            Some(artifact) => {
                let mut bytes = Vec::with_capacity(usize::try_from(artifact.size).unwrap_or(0));
                open_source(artifact)
                    .await?
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| {
                        DeployError::with_source(
                            DeployErrorKind::ArtifactUnreadable,
                            "reading the binary",
                            e,
                        )
                    })?;
                if let Some(progress) = &spec.progress {
                    progress(artifact.size, artifact.size);
                }
                Some(Bytes::from(bytes))
            }
            None => None,
        };
        let mut state = self.write();
        let counter = state.counters.entry(spec.name.clone()).or_default();
        *counter += 1;
        let version = *counter;
        let metadata = Arc::new(spec.metadata(version, artifact.as_ref()));
        if let (Some(artifact), Some(bytes)) = (&artifact, bytes) {
            state
                .artifacts
                .entry(artifact.digest.clone())
                .or_insert(bytes);
        }
        state.catalog.insert_version(metadata.clone());
        state.catalog.set_active(&spec.name, Some(version));
        let kept: Vec<u64> = state
            .catalog
            .versions(&spec.name)
            .map(|(versions, _)| versions.iter().map(|m| m.version).collect())
            .unwrap_or_default();
        for old in versions_to_prune(&kept, Some(version), self.keep_versions) {
            state.catalog.remove_version(&spec.name, old);
        }
        collect_garbage(&mut state);
        Ok(metadata)
    }

    fn versions(&self, name: &FunctionName) -> Result<Versions, LookupError> {
        let (versions, active) = self
            .read()
            .catalog
            .versions(name)
            .ok_or_else(|| not_found(name))?;
        Ok(Versions { versions, active })
    }

    async fn rollback(
        &self,
        name: &FunctionName,
        version: u64,
    ) -> Result<Arc<FunctionMetadata>, RollbackError> {
        let mut state = self.write();
        let metadata = state.catalog.get(name, Some(version)).map_err(|e| {
            let kind = match e.kind() {
                crate::LookupErrorKind::FunctionNotFound => RollbackErrorKind::FunctionNotFound,
                crate::LookupErrorKind::VersionNotFound => RollbackErrorKind::VersionNotFound,
                crate::LookupErrorKind::Unavailable => RollbackErrorKind::Storage,
            };
            RollbackError::new(kind, e.to_string())
        })?;
        state.catalog.set_active(name, Some(version));
        Ok(metadata)
    }

    async fn delete(&self, name: &FunctionName) -> Result<(), DeleteError> {
        let mut state = self.write();
        if !state.catalog.remove(name) {
            return Err(DeleteError::new(
                DeleteErrorKind::FunctionNotFound,
                not_found(name).to_string(),
            ));
        }
        collect_garbage(&mut state);
        Ok(())
    }

    async fn read_artifact(
        &self,
        metadata: &FunctionMetadata,
    ) -> Result<ArtifactReader, FetchError> {
        let digest = crate::pinned_digest(metadata)?;
        let bytes = self.read().artifacts.get(digest).cloned().ok_or_else(|| {
            FetchError::new(
                FetchErrorKind::Missing,
                format!("the binary {digest} of \"{}\" is not stored", metadata.name),
            )
        })?;
        Ok(Box::pin(std::io::Cursor::new(bytes)))
    }

    async fn put_trigger(&self, trigger: Trigger) -> Result<(), TriggerError> {
        self.write().catalog.set_trigger(Arc::new(trigger));
        Ok(())
    }

    async fn delete_trigger(&self, name: &TriggerName) -> Result<(), TriggerError> {
        let mut state = self.write();
        if state.catalog.trigger(name).is_none() {
            return Err(crate::error::trigger_not_found(name));
        }
        state.catalog.remove_trigger(name);
        Ok(())
    }
}

fn collect_garbage(state: &mut State) {
    let State {
        catalog, artifacts, ..
    } = state;
    artifacts.retain(|digest, _| catalog.references(digest));
}
