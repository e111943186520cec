//! The secrets a deployed function names, opened for its processes or instances.
//!
//! Sealed values come from the registry's [`SecretCatalog`] (a watched snapshot of the secrets
//! bucket); this runtime's [`RuntimeKey`] opens them. What a function gets is resolved once
//! per change of the bucket and kept, so a call of a function with secrets costs a lock and a
//! lookup, and a call of one without costs nothing.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use mycelium_core::{
    secret::{SecretEnv, SecretName},
    ErrorCode, FunctionMetadata, FunctionName, ProtocolError,
};
use mycelium_registry::{secrets::SealedSecret, RuntimeKey, SecretCatalog};

/// Resolved envs kept at most; beyond it the cache starts over (it only holds deployed
/// functions that name secrets, so this is never reached in practice).
const MAX_CACHED: usize = 4096;

/// Opens the secrets functions name. Without a catalog (no JetStream) or a key, every
/// function that names a secret fails `secret_unavailable` with a message that says why.
pub struct Secrets {
    catalog: Option<SecretCatalog>,
    /// The catalog's revision, read on each call of a function with secrets.
    revision: Option<tokio::sync::watch::Receiver<u64>>,
    key: Option<RuntimeKey>,
    cache: RwLock<Cache>,
}

#[derive(Default)]
struct Cache {
    /// Per function: the bucket revision and version resolved at, and the outcome.
    envs: HashMap<FunctionName, Resolved>,
    /// Opened values by the sealed record they came from (a new record is a new `Arc`).
    opened: HashMap<SecretName, (Arc<SealedSecret>, Result<String, String>)>,
}

struct Resolved {
    revision: u64,
    version: u64,
    outcome: Result<SecretEnv, ProtocolError>,
}

impl Secrets {
    /// Secrets from `catalog`, opened with `key`.
    pub fn new(catalog: Option<SecretCatalog>, key: Option<RuntimeKey>) -> Self {
        Self {
            revision: catalog.as_ref().map(SecretCatalog::changes),
            catalog,
            key,
            cache: RwLock::default(),
        }
    }

    /// Signals a change of the secrets bucket (for getting rotated functions ready ahead).
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.catalog.as_ref().map(SecretCatalog::changes)
    }

    /// The opened secrets `metadata` names, as its environment gets them.
    pub fn env_of(&self, metadata: &FunctionMetadata) -> Result<SecretEnv, ProtocolError> {
        if metadata.secrets.is_empty() {
            return Ok(SecretEnv::default());
        }
        let revision = self
            .revision
            .as_ref()
            .map_or(0, |revision| *revision.borrow());
        // Every call of the function reads; only a change of the bucket (or a new version)
        // writes.
        {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(resolved) = cache.envs.get(&metadata.name) {
                if resolved.revision == revision && resolved.version == metadata.version {
                    return resolved.outcome.clone();
                }
            }
        }
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let outcome = self.resolve(metadata, &mut cache);
        if let Err(error) = &outcome {
            // Once per change, not per call: the outcome is kept until the bucket changes.
            tracing::warn!(function = %metadata.name, version = metadata.version, code = %error.code, "{}", error.message);
        }
        // An unchanged set of secrets keeps its env, so the function's processes stay.
        let previous = cache.envs.remove(&metadata.name);
        let outcome = match (outcome, previous) {
            (
                Ok(env),
                Some(Resolved {
                    outcome: Ok(old), ..
                }),
            ) if old == env => Ok(old),
            (outcome, _) => outcome,
        };
        if cache.envs.len() >= MAX_CACHED {
            cache.envs.clear();
        }
        cache.envs.insert(
            metadata.name.clone(),
            Resolved {
                revision,
                version: metadata.version,
                outcome: outcome.clone(),
            },
        );
        outcome
    }

    fn resolve(
        &self,
        metadata: &FunctionMetadata,
        cache: &mut Cache,
    ) -> Result<SecretEnv, ProtocolError> {
        let function = &metadata.name;
        let unavailable =
            |message: String| ProtocolError::new(ErrorCode::SecretUnavailable, message);
        let Some(catalog) = &self.catalog else {
            return Err(unavailable(format!(
                "function \"{function}\" names secrets and this runtime has no secret store (it runs without the JetStream registry); run it with the JetStream registry"
            )));
        };
        let Some(key) = &self.key else {
            return Err(unavailable(format!(
                "function \"{function}\" names secrets and this runtime has no xkey to open them; start it with --xkey-seed-file or MYCELIUM_XKEY_SEED (`mycelium up` makes one in its data directory)"
            )));
        };
        let mut vars = Vec::with_capacity(metadata.secrets.len());
        for (variable, name) in &metadata.secrets {
            let Some(sealed) = catalog.get(name) else {
                return Err(unavailable(format!(
                    "function \"{function}\" needs secret \"{name}\" (as {variable}), which does not exist; create it with `mycelium secret set {name}`"
                )));
            };
            let opened = match cache.opened.get(name) {
                Some((record, opened)) if Arc::ptr_eq(record, &sealed) => opened.clone(),
                _ => {
                    let opened = key.open(&sealed).map_err(|e| e.to_string());
                    cache
                        .opened
                        .insert(name.clone(), (sealed.clone(), opened.clone()));
                    opened
                }
            };
            let value = opened.map_err(|why| {
                unavailable(format!(
                    "function \"{function}\" needs secret \"{name}\" (as {variable}): {why}"
                ))
            })?;
            vars.push((variable.clone(), name.clone(), sealed.version, value));
        }
        // Opened values of secrets no longer in the bucket are dropped as they are noticed.
        cache.opened.retain(|name, _| catalog.get(name).is_some());
        Ok(SecretEnv::new(vars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycelium_registry::secrets::seal;

    fn metadata(secrets: &[(&str, &str)]) -> FunctionMetadata {
        let mut metadata = FunctionMetadata::builtin("f".parse().unwrap(), "");
        metadata.secrets = secrets
            .iter()
            .map(|(env, name)| (env.to_string(), SecretName::new(name).unwrap()))
            .collect();
        metadata
    }

    fn name(text: &str) -> SecretName {
        SecretName::new(text).unwrap()
    }

    #[test]
    fn a_function_gets_exactly_the_secrets_it_names() {
        let key = RuntimeKey::generate();
        let catalog = SecretCatalog::of([
            seal(&name("db"), 2, "db-value-1", &key.public_key()).unwrap(),
            seal(&name("api"), 1, "api-value-1", &key.public_key()).unwrap(),
        ]);
        let secrets = Secrets::new(Some(catalog), Some(key));
        let env = secrets.env_of(&metadata(&[("DB", "db")])).unwrap();
        assert_eq!(env.vars().collect::<Vec<_>>(), [("DB", "db-value-1")]);
        assert_eq!(format!("{env:?}"), r#"{"DB": "db@v2"}"#);
        // Kept: the same env (and so the same processes) on the next call.
        let again = secrets.env_of(&metadata(&[("DB", "db")])).unwrap();
        assert_eq!(again, env);
        assert!(secrets.env_of(&metadata(&[])).unwrap().is_empty());
    }

    #[test]
    fn missing_or_unopenable_secrets_fail_with_their_name_only() {
        let key = RuntimeKey::generate();
        let other = RuntimeKey::generate();
        let catalog =
            SecretCatalog::of([seal(&name("db"), 1, "db-value-1", &other.public_key()).unwrap()]);
        let secrets = Secrets::new(Some(catalog.clone()), Some(key));
        let error = secrets.env_of(&metadata(&[("DB", "db")])).unwrap_err();
        assert_eq!(error.code, ErrorCode::SecretUnavailable);
        assert!(
            error.message.contains("secret \"db\" (as DB)"),
            "{}",
            error.message
        );
        assert!(!error.message.contains("db-value-1"), "{}", error.message);

        let f = metadata(&[("X", "missing")]);
        let error = Secrets::new(Some(catalog.clone()), Some(RuntimeKey::generate()))
            .env_of(&f)
            .unwrap_err();
        assert!(
            error.message.contains("`mycelium secret set missing`"),
            "{}",
            error.message
        );
        let error = Secrets::new(Some(catalog), None).env_of(&f).unwrap_err();
        assert!(
            error.message.contains("--xkey-seed-file"),
            "{}",
            error.message
        );
        let error = Secrets::new(None, None).env_of(&f).unwrap_err();
        assert!(
            error.message.contains("no secret store"),
            "{}",
            error.message
        );
    }
}
