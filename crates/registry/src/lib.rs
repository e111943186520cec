//! Where the runtime looks functions up.
//!
//! [`Registry`] answers from memory: lookups sit on the invocation hot path, so an
//! implementation backed by a remote store (the JetStream registry) keeps a watched local
//! snapshot and never does I/O inside [`Registry::get`]. [`MemoryRegistry`] serves tests
//! and embedding.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use mycelium_core::{
    Error, ErrorCode, FunctionMetadata, FunctionName, FunctionSummary, ProtocolError,
};

/// Why a lookup found nothing to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupErrorKind {
    /// No function of that name.
    FunctionNotFound,
    /// The function exists, the version does not (or is no longer kept).
    VersionNotFound,
    /// The registry cannot answer now.
    Unavailable,
}

/// A failed [`Registry::get`].
pub type LookupError = Error<LookupErrorKind>;

/// The invocation protocol's answer to a failed lookup.
pub fn protocol_error(err: LookupError) -> ProtocolError {
    {
        let code = match err.kind() {
            LookupErrorKind::FunctionNotFound => ErrorCode::FunctionNotFound,
            LookupErrorKind::VersionNotFound => ErrorCode::VersionNotFound,
            LookupErrorKind::Unavailable => ErrorCode::Unavailable,
        };
        ProtocolError::new(code, err.to_string())
    }
}

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
}

/// Builds the lookup errors every registry reports the same way.
pub fn not_found(name: &FunctionName) -> LookupError {
    LookupError::new(
        LookupErrorKind::FunctionNotFound,
        format!("no function named \"{name}\" is registered; `mycelium list` shows the available functions"),
    )
}

/// The error for a version that is not (or no longer) kept.
pub fn version_not_found(
    name: &FunctionName,
    version: u64,
    kept: impl Iterator<Item = u64>,
) -> LookupError {
    let kept: Vec<String> = kept.map(|v| v.to_string()).collect();
    LookupError::new(
        LookupErrorKind::VersionNotFound,
        format!(
            "function \"{name}\" has no version {version}; kept versions: {}",
            kept.join(", ")
        ),
    )
}

/// A registry held in process memory; nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    functions: RwLock<HashMap<FunctionName, Entry>>,
}

#[derive(Debug)]
struct Entry {
    versions: BTreeMap<u64, Arc<FunctionMetadata>>,
    active: u64,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the version `metadata.version` of a function and makes it active.
    pub fn insert(&self, metadata: FunctionMetadata) {
        let mut functions = self.functions.write().unwrap_or_else(|e| e.into_inner());
        let version = metadata.version;
        let entry = functions
            .entry(metadata.name.clone())
            .or_insert_with(|| Entry {
                versions: BTreeMap::new(),
                active: version,
            });
        entry.versions.insert(version, Arc::new(metadata));
        entry.active = version;
    }

    /// Makes a kept version the active one.
    pub fn activate(&self, name: &FunctionName, version: u64) -> Result<(), LookupError> {
        let mut functions = self.functions.write().unwrap_or_else(|e| e.into_inner());
        let entry = functions.get_mut(name).ok_or_else(|| not_found(name))?;
        if !entry.versions.contains_key(&version) {
            return Err(version_not_found(
                name,
                version,
                entry.versions.keys().copied(),
            ));
        }
        entry.active = version;
        Ok(())
    }

    /// Removes a function and all its versions; returns whether it existed.
    pub fn remove(&self, name: &FunctionName) -> bool {
        let mut functions = self.functions.write().unwrap_or_else(|e| e.into_inner());
        functions.remove(name).is_some()
    }
}

impl Registry for MemoryRegistry {
    fn get(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Arc<FunctionMetadata>, LookupError> {
        let functions = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let entry = functions.get(name).ok_or_else(|| not_found(name))?;
        let version = version.unwrap_or(entry.active);
        entry
            .versions
            .get(&version)
            .cloned()
            .ok_or_else(|| version_not_found(name, version, entry.versions.keys().copied()))
    }

    fn list(&self) -> Vec<FunctionSummary> {
        let functions = self.functions.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<FunctionSummary> = functions
            .values()
            .filter_map(|entry| entry.versions.get(&entry.active))
            .map(|meta| meta.summary())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

#[cfg(test)]
mod tests {
    use mycelium_core::FunctionKind;

    use super::*;

    fn meta(name: &str, version: u64) -> FunctionMetadata {
        let mut m = FunctionMetadata::builtin(name.parse().unwrap(), format!("{name} v{version}"));
        m.version = version;
        m.kind = FunctionKind::Plugin;
        m
    }

    #[test]
    fn versions_and_active_pointer() {
        let registry = MemoryRegistry::new();
        let name: FunctionName = "resize".parse().unwrap();
        registry.insert(meta("resize", 1));
        registry.insert(meta("resize", 2));
        assert_eq!(registry.get(&name, None).unwrap().version, 2);
        assert_eq!(registry.get(&name, Some(1)).unwrap().version, 1);
        registry.activate(&name, 1).unwrap();
        assert_eq!(registry.get(&name, None).unwrap().version, 1);

        let err = registry.get(&name, Some(9)).unwrap_err();
        assert_eq!(err.kind(), LookupErrorKind::VersionNotFound);
        assert!(err.to_string().contains("kept versions: 1, 2"), "{err}");
        assert_eq!(
            registry.activate(&name, 9).unwrap_err().kind(),
            LookupErrorKind::VersionNotFound
        );
        assert_eq!(protocol_error(err).code, ErrorCode::VersionNotFound);
    }

    #[test]
    fn list_is_sorted_and_shows_active_versions() {
        let registry = MemoryRegistry::new();
        registry.insert(meta("zeta", 1));
        registry.insert(meta("alpha", 1));
        registry.insert(meta("alpha", 2));
        let list = registry.list();
        let rows: Vec<(&str, u64)> = list.iter().map(|s| (s.name.as_str(), s.version)).collect();
        assert_eq!(rows, [("alpha", 2), ("zeta", 1)]);
    }

    #[test]
    fn missing_and_removed_functions() {
        let registry = MemoryRegistry::new();
        let name: FunctionName = "gone".parse().unwrap();
        assert_eq!(
            registry.get(&name, None).unwrap_err().kind(),
            LookupErrorKind::FunctionNotFound
        );
        registry.insert(meta("gone", 1));
        assert!(registry.remove(&name));
        assert!(!registry.remove(&name));
        let err = registry.get(&name, None).unwrap_err();
        assert_eq!(protocol_error(err).code, ErrorCode::FunctionNotFound);
    }
}
