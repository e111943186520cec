//! What a registry records about a function version.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::FunctionName;

/// How a function is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FunctionKind {
    /// Rust code compiled into the runtime.
    Builtin,
    /// A separate process speaking go-plugin's gRPC protocol.
    Plugin,
    /// A WebAssembly module (WASI preview 1), run in a fresh sandboxed instance per call.
    Wasm,
}

impl std::fmt::Display for FunctionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Builtin => "builtin",
            Self::Plugin => "plugin",
            Self::Wasm => "wasm",
        })
    }
}

/// The metadata record of one function version, as `function.describe` answers it.
///
/// JSON field names are camelCase; absent optional fields are omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionMetadata {
    /// The function's name.
    pub name: FunctionName,
    /// Version number, from 1, monotonic per name.
    pub version: u64,
    /// How it runs.
    pub kind: FunctionKind,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// Longest an invocation may run; requests may ask for less, never more.
    #[serde(
        default,
        rename = "timeoutMs",
        with = "duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Invocations of this function allowed in flight on one runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Memory limit of a plugin process or a WebAssembly instance, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Environment variables given to plugin processes and WebAssembly instances.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Secrets delivered as environment variables: variable name -> secret name. Only the
    /// references are stored here; the values are sealed in the secrets bucket.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, crate::secret::SecretName>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// SHA-256 of the binary (plugins, WebAssembly modules), as `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The public NKey (`U...`, `A...`, ...) that signed the digest, when the deploy signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The ed25519 signature of the `digest` text by `signer`, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Size of the binary in bytes (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// When this version was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// What to run: for `builtin`, the name of the built-in implementation (a deployed
    /// name can run a built-in with its own settings); for `plugin`, reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// The plugin protocol version the binary speaks (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// Retries and result destinations of asynchronous invocations.
    #[serde(
        default,
        rename = "async",
        skip_serializing_if = "crate::AsyncSettings::is_default"
    )]
    pub asynchronous: crate::AsyncSettings,
}

impl FunctionMetadata {
    /// The record as shown to callers (`describe`, `versions`): environment variable values
    /// replaced by `***`, since they often hold credentials. The names stay.
    pub fn redacted(&self) -> FunctionMetadata {
        let mut shown = self.clone();
        for value in shown.env.values_mut() {
            *value = "***".into();
        }
        shown
    }

    /// Metadata for version 1 of a built-in function.
    pub fn builtin(name: FunctionName, description: impl Into<String>) -> Self {
        Self {
            name,
            version: 1,
            kind: FunctionKind::Builtin,
            description: description.into(),
            timeout: None,
            max_concurrency: None,
            memory_mb: None,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            labels: BTreeMap::new(),
            digest: None,
            signer: None,
            signature: None,
            size: None,
            created_at: None,
            entry_point: None,
            protocol_version: None,
            asynchronous: crate::AsyncSettings::default(),
        }
    }

    /// The short form `function.list` answers.
    pub fn summary(&self) -> FunctionSummary {
        FunctionSummary {
            name: self.name.clone(),
            version: self.version,
            kind: self.kind,
            description: self.description.clone(),
            digest: self.digest.clone(),
            size: self.size,
        }
    }
}

/// One row of `function.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSummary {
    /// The function's name.
    pub name: FunctionName,
    /// Its active version.
    pub version: u64,
    /// How it runs.
    pub kind: FunctionKind,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// SHA-256 of the binary (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size of the binary in bytes (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_json_is_camel_case_and_omits_absent_fields() {
        let mut meta = FunctionMetadata::builtin("echo".parse().unwrap(), "returns its input");
        meta.timeout = Some(Duration::from_millis(2500));
        meta.max_concurrency = Some(4);
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "echo", "version": 1, "kind": "builtin",
                "description": "returns its input", "timeoutMs": 2500, "maxConcurrency": 4
            })
        );
        assert_eq!(
            serde_json::from_value::<FunctionMetadata>(json).unwrap(),
            meta
        );
    }
}
