//! The in-memory view every registry answers lookups from: versions per function and the
//! active pointer. The JetStream registry keeps one up to date from a KV watch.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use mycelium_core::{
    trigger::{Trigger, TriggerName},
    FunctionMetadata, FunctionName, FunctionSummary,
};

use crate::{not_found, version_not_found, LookupError};

#[derive(Debug, Default)]
pub(crate) struct Catalog {
    functions: HashMap<FunctionName, Entry>,
    triggers: BTreeMap<TriggerName, Arc<Trigger>>,
}

#[derive(Debug, Default)]
struct Entry {
    versions: BTreeMap<u64, Arc<FunctionMetadata>>,
    active: Option<u64>,
}

impl Catalog {
    /// Every trigger, sorted by name.
    pub fn triggers(&self) -> Vec<Arc<Trigger>> {
        self.triggers.values().cloned().collect()
    }

    pub fn trigger(&self, name: &TriggerName) -> Option<Arc<Trigger>> {
        self.triggers.get(name).cloned()
    }

    pub fn set_trigger(&mut self, trigger: Arc<Trigger>) {
        self.triggers.insert(trigger.name.clone(), trigger);
    }

    pub fn remove_trigger(&mut self, name: &TriggerName) {
        self.triggers.remove(name);
    }

    pub fn get(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Arc<FunctionMetadata>, LookupError> {
        let entry = self.functions.get(name).ok_or_else(|| not_found(name))?;
        let version = match version.or(entry.active) {
            Some(version) => version,
            None => return Err(not_found(name)),
        };
        entry
            .versions
            .get(&version)
            .cloned()
            .ok_or_else(|| version_not_found(name, version, entry.versions.keys().copied()))
    }

    /// Whether `name` has an active version.
    pub fn contains(&self, name: &FunctionName) -> bool {
        self.functions
            .get(name)
            .is_some_and(|entry| entry.active.is_some())
    }

    pub fn list(&self) -> Vec<FunctionSummary> {
        let mut list: Vec<FunctionSummary> = self
            .functions
            .values()
            .filter_map(|entry| entry.versions.get(&entry.active?))
            .map(|meta| meta.summary())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Every kept version of `name` (oldest first) and the active one.
    pub fn versions(
        &self,
        name: &FunctionName,
    ) -> Option<(Vec<Arc<FunctionMetadata>>, Option<u64>)> {
        let entry = self.functions.get(name)?;
        if entry.active.is_none() && entry.versions.is_empty() {
            return None;
        }
        Some((entry.versions.values().cloned().collect(), entry.active))
    }

    pub fn insert_version(&mut self, metadata: Arc<FunctionMetadata>) {
        let entry = self.functions.entry(metadata.name.clone()).or_default();
        entry.versions.insert(metadata.version, metadata);
    }

    pub fn remove_version(&mut self, name: &FunctionName, version: u64) {
        if let Some(entry) = self.functions.get_mut(name) {
            entry.versions.remove(&version);
        }
        self.drop_if_empty(name);
    }

    pub fn set_active(&mut self, name: &FunctionName, version: Option<u64>) {
        self.functions.entry(name.clone()).or_default().active = version;
        self.drop_if_empty(name);
    }

    pub fn remove(&mut self, name: &FunctionName) -> bool {
        self.functions.remove(name).is_some()
    }

    /// Whether any kept version of any function pins `digest`.
    pub fn references(&self, digest: &str) -> bool {
        self.functions
            .values()
            .flat_map(|entry| entry.versions.values())
            .any(|meta| meta.digest.as_deref() == Some(digest))
    }

    fn drop_if_empty(&mut self, name: &FunctionName) {
        if self
            .functions
            .get(name)
            .is_some_and(|entry| entry.active.is_none() && entry.versions.is_empty())
        {
            self.functions.remove(name);
        }
    }
}
