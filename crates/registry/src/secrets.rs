//! Secrets sealed with NATS xkeys (curve25519, `crypto_box`) and stored in a JetStream KV
//! bucket. The deployer needs only the runtimes' public xkey; only a holder of the private key
//! (a runtime) can open a value, and a value altered in the bucket does not open.
//!
//! KV layout (bucket `mycelium_secrets` by default), values JSON:
//! - `secret.<name>`: a [`SealedSecret`]: its version, when it was set, the public keys it
//!   was sealed with and for, and the sealed box (base64). The box holds the name, the
//!   version and the value, so a sealed value copied under another name or version is refused.
//! - `xkey`: the public xkey runtimes announce, for `mycelium secret set` to seal to.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use async_nats::jetstream::{self, kv};
use base64::Engine;
use chrono::{DateTime, Utc};
use mycelium_core::{secret::SecretName, Error};
use nkeys::XKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::jetstream::{compare_and_set, follow, load};

/// The default bucket of sealed secrets.
pub const DEFAULT_SECRETS_BUCKET: &str = "mycelium_secrets";

/// The largest secret value accepted, in bytes (an environment variable must fit in the
/// kernel's 128 KiB per-string limit, with room to spare).
pub const MAX_SECRET_SIZE: usize = 64 * 1024;

const SECRET_KEY_PREFIX: &str = "secret.";
const RECIPIENT_KEY: &str = "xkey";

/// What the bucket holds for one secret: never the value, only its sealed box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedSecret {
    /// The secret's name.
    pub name: SecretName,
    /// From 1, one more at each `set`.
    pub version: u64,
    /// When this version was set.
    pub updated_at: DateTime<Utc>,
    /// The public xkey it was sealed for (the runtimes').
    pub recipient: String,
    /// The one-off public xkey it was sealed with.
    pub sender: String,
    /// The sealed box, base64: the name, version and value, readable only with the private
    /// key of `recipient`.
    pub sealed: String,
}

/// A secret as `mycelium secret list` shows it: no value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretInfo {
    /// The secret's name.
    pub name: SecretName,
    /// Its current version.
    pub version: u64,
    /// When that version was set.
    pub updated_at: DateTime<Utc>,
    /// The public xkey it is sealed for.
    pub recipient: String,
}

impl From<&SealedSecret> for SecretInfo {
    fn from(sealed: &SealedSecret) -> Self {
        Self {
            name: sealed.name.clone(),
            version: sealed.version,
            updated_at: sealed.updated_at,
            recipient: sealed.recipient.clone(),
        }
    }
}

/// What is inside the box.
#[derive(Serialize, Deserialize)]
struct Plaintext {
    name: SecretName,
    version: u64,
    value: String,
}

/// Why a secret operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretErrorKind {
    /// The value is empty, too large, not UTF-8 or holds a NUL byte.
    InvalidValue,
    /// A key (seed or public xkey) is malformed or of another kind.
    InvalidKey,
    /// No runtime has announced its public xkey and none was given.
    NoRecipient,
    /// No secret of that name.
    NotFound,
    /// The sealed value cannot be opened with this key: sealed for another key, altered, or
    /// copied from another secret or version.
    Unopenable,
    /// The bucket could not be read or written.
    Storage,
}

/// A failed secret operation.
pub type SecretError = Error<SecretErrorKind>;

/// A runtime's private xkey: it opens what was sealed for its public key. Cloning shares it.
#[derive(Clone)]
pub struct RuntimeKey(Arc<XKey>);

impl std::fmt::Debug for RuntimeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RuntimeKey({})", self.public_key())
    }
}

impl RuntimeKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(Arc::new(XKey::new()))
    }

    /// The key of an xkey seed (`SX...`); surrounding whitespace is ignored.
    pub fn from_seed(seed: &str) -> Result<Self, SecretError> {
        XKey::from_seed(seed.trim()).map(|key| Self(Arc::new(key))).map_err(|e| {
            SecretError::with_source(
                SecretErrorKind::InvalidKey,
                "the xkey seed is not valid: it should be one line starting with SX (`mycelium up` writes one to <data-dir>/xkey.seed)",
                e,
            )
        })
    }

    /// The key whose seed is in the file at `path`.
    pub fn read(path: &std::path::Path) -> Result<Self, SecretError> {
        let seed = std::fs::read_to_string(path).map_err(|e| {
            SecretError::with_source(
                SecretErrorKind::InvalidKey,
                format!("cannot read the xkey seed file {}", path.display()),
                e,
            )
        })?;
        Self::from_seed(&seed).map_err(|e| {
            SecretError::new(
                SecretErrorKind::InvalidKey,
                format!("{}: {e}", path.display()),
            )
        })
    }

    /// The key in the file at `path`, made (readable by this user only) when there is none;
    /// `true` when it was made now.
    pub fn read_or_create(path: &std::path::Path) -> Result<(Self, bool), SecretError> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        if path.exists() {
            return Self::read(path).map(|key| (key, false));
        }
        let key = Self::generate();
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| {
                file.write_all(format!("{}\n", key.seed()).as_bytes())?;
                file.sync_all()
            });
        match written {
            Ok(()) => Ok((key, true)),
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::read(path).map(|key| (key, false))
            }
            Err(e) => Err(SecretError::with_source(
                SecretErrorKind::InvalidKey,
                format!("cannot write the xkey seed file {}", path.display()),
                e,
            )),
        }
    }

    /// The seed, for storing the key. Treat it like a password.
    pub fn seed(&self) -> String {
        self.0
            .seed()
            .expect("a generated or parsed seed has its private part")
    }

    /// The public key (`X...`), which deployers seal secrets for.
    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    /// Opens `sealed`. The message names the secret and the keys, never the value.
    pub fn open(&self, sealed: &SealedSecret) -> Result<String, SecretError> {
        let name = &sealed.name;
        let version = sealed.version;
        let own = self.public_key();
        if sealed.recipient != own {
            return Err(SecretError::new(
                SecretErrorKind::Unopenable,
                format!(
                    "secret \"{name}\" v{version} is sealed for the xkey {} and this runtime holds {own}: set it again (`mycelium secret set {name}`) once the runtimes share one key, or give this runtime the key it was sealed for (--xkey-seed-file)",
                    sealed.recipient
                ),
            ));
        }
        let unopenable = |why: &str| {
            SecretError::new(
                SecretErrorKind::Unopenable,
                format!(
                    "secret \"{name}\" v{version} cannot be opened: {why}; set it again with `mycelium secret set {name}`"
                ),
            )
        };
        let sender = XKey::from_public_key(&sealed.sender)
            .map_err(|_| unopenable("its sender key is malformed"))?;
        let boxed = base64::engine::general_purpose::STANDARD
            .decode(&sealed.sealed)
            .map_err(|_| unopenable("its sealed value is not base64"))?;
        let opened = self
            .0
            .open(&boxed, &sender)
            .map_err(|_| unopenable("its sealed value was altered or sealed for another key"))?;
        let plaintext: Plaintext = serde_json::from_slice(&opened)
            .map_err(|_| unopenable("its sealed content is malformed"))?;
        if plaintext.name != sealed.name || plaintext.version != sealed.version {
            return Err(unopenable(
                "its sealed value belongs to another secret or version (it was copied)",
            ));
        }
        Ok(plaintext.value)
    }
}

/// Seals `value` as version `version` of `name` for the runtimes' public key `recipient`, with
/// a one-off sender key (nothing but the recipient's private key opens it).
pub fn seal(
    name: &SecretName,
    version: u64,
    value: &str,
    recipient: &str,
) -> Result<SealedSecret, SecretError> {
    check_value(value)?;
    let recipient_key = XKey::from_public_key(recipient.trim()).map_err(|e| {
        SecretError::with_source(
            SecretErrorKind::InvalidKey,
            format!("{recipient:?} is not a public xkey (one starting with X)"),
            e,
        )
    })?;
    let sender = XKey::new();
    let plaintext = serde_json::to_vec(&Plaintext {
        name: name.clone(),
        version,
        value: value.to_owned(),
    })
    .expect("plain data serializes");
    let boxed = sender.seal(&plaintext, &recipient_key).map_err(|e| {
        SecretError::with_source(SecretErrorKind::InvalidKey, "sealing the value failed", e)
    })?;
    Ok(SealedSecret {
        name: name.clone(),
        version,
        updated_at: Utc::now(),
        recipient: recipient_key.public_key(),
        sender: sender.public_key(),
        sealed: base64::engine::general_purpose::STANDARD.encode(boxed),
    })
}

fn check_value(value: &str) -> Result<(), SecretError> {
    let invalid = |why: String| SecretError::new(SecretErrorKind::InvalidValue, why);
    if value.is_empty() {
        return Err(invalid(
            "the secret value is empty; give it on stdin or with --from-file".into(),
        ));
    }
    if value.len() > MAX_SECRET_SIZE {
        return Err(invalid(format!(
            "the secret value is {} bytes, over the limit of {MAX_SECRET_SIZE}; store large material elsewhere and keep its credentials here",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(invalid(
            "the secret value contains a NUL byte, which no environment variable can hold".into(),
        ));
    }
    Ok(())
}

fn secret_key(name: &SecretName) -> String {
    format!("{SECRET_KEY_PREFIX}{name}")
}

fn storage(
    what: String,
    e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
) -> SecretError {
    SecretError::with_source(SecretErrorKind::Storage, what, e)
}

/// The secrets bucket: set, list and delete (the CLI), the runtimes' public key, and a
/// watched snapshot for runtimes ([`SecretStore::catalog`]).
#[derive(Clone)]
pub struct SecretStore {
    kv: kv::Store,
}

impl SecretStore {
    /// Opens `bucket`, creating it (with `replicas`, as the registry's) on first use.
    pub async fn open(
        client: async_nats::Client,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, SecretError> {
        let js = jetstream::new(client);
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    description: "Mycelium secrets, sealed with the runtimes' xkey".into(),
                    // The current sealed value only: an old one is not kept to be opened later.
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| storage(format!("creating the KV bucket {bucket}"), e))?,
        };
        Ok(Self { kv })
    }

    /// The public xkey runtimes announced, if any.
    pub async fn recipient(&self) -> Result<Option<String>, SecretError> {
        let value = self
            .kv
            .get(RECIPIENT_KEY)
            .await
            .map_err(|e| storage("reading the runtimes' public xkey".into(), e))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).trim().to_owned()))
    }

    /// Announces `key`'s public half for deployers to seal to, unless a key is announced
    /// already: then returns that one when it differs (this runtime cannot open what is
    /// sealed for it).
    pub async fn announce(&self, key: &RuntimeKey) -> Result<Option<String>, SecretError> {
        let own = key.public_key();
        match self.kv.create(RECIPIENT_KEY, own.clone().into()).await {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(self
                .recipient()
                .await?
                .filter(|announced| *announced != own)),
            Err(e) => Err(storage("announcing this runtime's public xkey".into(), e)),
        }
    }

    /// Seals `value` for `recipient` (else the announced key) as the next version of `name`.
    pub async fn set(
        &self,
        name: &SecretName,
        value: &str,
        recipient: Option<&str>,
    ) -> Result<SecretInfo, SecretError> {
        check_value(value)?;
        let recipient = match recipient {
            Some(key) => key.to_owned(),
            None => self.recipient().await?.ok_or_else(|| {
                SecretError::new(
                    SecretErrorKind::NoRecipient,
                    "no runtime has announced its public xkey yet: start a runtime with a key (`mycelium up` makes one), or pass --public-xkey",
                )
            })?,
        };
        let key = secret_key(name);
        // A new version of the box for each try: the version is sealed inside it.
        let written = compare_and_set(&self.kv, &key, |current| {
            let last = current
                .and_then(|bytes| serde_json::from_slice::<SealedSecret>(bytes).ok())
                .map_or(0, |sealed| sealed.version);
            let sealed = seal(name, last + 1, value, &recipient)?;
            let bytes = serde_json::to_vec(&sealed).expect("plain data serializes");
            Ok(Some((bytes.into(), SecretInfo::from(&sealed))))
        })
        .await;
        match written {
            Ok(info) => info.ok_or_else(|| {
                SecretError::new(
                    SecretErrorKind::Storage,
                    format!("secret \"{name}\" was not written; retry"),
                )
            }),
            // Sealing's own error (a malformed recipient key) keeps its kind.
            Err(e) => Err(match e.downcast::<SecretError>() {
                Ok(sealing) => *sealing,
                Err(e) => storage(format!("writing secret \"{name}\""), e),
            }),
        }
    }

    /// Every secret, sorted by name: names, versions and times, no values.
    pub async fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let records = RwLock::new(HashMap::new());
        load(&self.kv, &|entry| apply(&records, entry))
            .await
            .map_err(|e| storage(format!("reading the secrets in {}", self.kv.name), e))?;
        let records = records.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<SecretInfo> = records.values().map(|s| SecretInfo::from(&**s)).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// Removes `name` and its sealed value.
    pub async fn delete(&self, name: &SecretName) -> Result<(), SecretError> {
        let key = secret_key(name);
        let exists = self
            .kv
            .entry(key.as_str())
            .await
            .map_err(|e| storage(format!("reading secret \"{name}\""), e))?
            .is_some_and(|e| e.operation == kv::Operation::Put);
        if !exists {
            return Err(not_found(name));
        }
        self.kv
            .purge(&key)
            .await
            .map_err(|e| storage(format!("deleting secret \"{name}\""), e))
    }

    /// A snapshot of every sealed secret, kept current by a watch (for runtimes: lookups
    /// never leave the process).
    pub async fn catalog(&self) -> Result<SecretCatalog, SecretError> {
        let records = Arc::new(RwLock::new(HashMap::new()));
        let loaded = records.clone();
        let last = load(&self.kv, &|entry| apply(&loaded, entry))
            .await
            .map_err(|e| storage(format!("reading the secrets in {}", self.kv.name), e))?;
        let (applied, changes) = watch::channel(last);
        let watched = records.clone();
        let watcher = tokio::spawn(follow(
            self.kv.clone(),
            move |entry| apply(&watched, entry),
            applied,
            last,
        ));
        Ok(SecretCatalog {
            records,
            changes,
            _watcher: Some(Arc::new(AbortOnDrop(watcher))),
        })
    }
}

/// The error for an unknown secret.
pub fn not_found(name: &SecretName) -> SecretError {
    SecretError::new(
        SecretErrorKind::NotFound,
        format!("no secret named \"{name}\"; `mycelium secret list` shows them, `mycelium secret set {name}` creates it"),
    )
}

type Records = RwLock<HashMap<SecretName, Arc<SealedSecret>>>;

/// Applies one KV entry; other keys and malformed records are skipped.
fn apply(records: &Records, entry: &kv::Entry) {
    let Some(name) = entry
        .key
        .strip_prefix(SECRET_KEY_PREFIX)
        .and_then(|n| SecretName::new(n).ok())
    else {
        return;
    };
    let mut records = records.write().unwrap_or_else(|e| e.into_inner());
    if matches!(
        entry.operation,
        kv::Operation::Delete | kv::Operation::Purge
    ) {
        records.remove(&name);
        return;
    }
    match serde_json::from_slice::<SealedSecret>(&entry.value) {
        Ok(sealed) if sealed.name == name => {
            records.insert(name, Arc::new(sealed));
        }
        // Only the name is logged: the record holds nothing readable, but keep logs plain.
        Ok(_) => tracing::warn!(secret = %name, "a sealed secret does not match its key; ignored"),
        Err(error) => {
            tracing::warn!(secret = %name, %error, "an unreadable sealed secret; ignored")
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every sealed secret, in memory: what a runtime opens secrets from. Cheap to clone.
#[derive(Clone)]
pub struct SecretCatalog {
    records: Arc<Records>,
    changes: watch::Receiver<u64>,
    _watcher: Option<Arc<AbortOnDrop>>,
}

impl SecretCatalog {
    /// A fixed catalog of `records` (tests, embedding).
    pub fn of(records: impl IntoIterator<Item = SealedSecret>) -> Self {
        let records = records
            .into_iter()
            .map(|s| (s.name.clone(), Arc::new(s)))
            .collect();
        Self {
            records: Arc::new(RwLock::new(records)),
            changes: watch::channel(0).1,
            _watcher: None,
        }
    }

    /// The sealed secret `name`, if it exists.
    pub fn get(&self, name: &SecretName) -> Option<Arc<SealedSecret>> {
        self.records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The bucket revision applied; changes whenever a secret does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> SecretName {
        SecretName::new(text).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_only_where_it_was_sealed() {
        let runtime = RuntimeKey::generate();
        let sealed = seal(&name("db"), 3, "hunter2-password", &runtime.public_key()).unwrap();
        assert!(!sealed.sealed.contains("hunter2"));
        assert_eq!(runtime.open(&sealed).unwrap(), "hunter2-password");

        let other = RuntimeKey::generate();
        let error = other.open(&sealed).unwrap_err();
        assert_eq!(error.kind(), SecretErrorKind::Unopenable);
        assert!(error.to_string().contains("\"db\" v3"), "{error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");

        // The same box under another name or version is refused.
        for (n, v) in [("api", 3), ("db", 2)] {
            let moved = SealedSecret {
                name: name(n),
                version: v,
                ..sealed.clone()
            };
            let error = runtime.open(&moved).unwrap_err();
            assert!(error.to_string().contains("copied"), "{error}");
        }

        // One flipped bit in the box.
        let mut boxed = base64::engine::general_purpose::STANDARD
            .decode(&sealed.sealed)
            .unwrap();
        let last = boxed.len() - 1;
        boxed[last] ^= 1;
        let tampered = SealedSecret {
            sealed: base64::engine::general_purpose::STANDARD.encode(boxed),
            ..sealed
        };
        let error = runtime.open(&tampered).unwrap_err();
        assert!(error.to_string().contains("altered"), "{error}");
    }

    #[test]
    fn values_and_keys_are_checked() {
        let key = RuntimeKey::generate().public_key();
        for bad in ["", "a\0b"] {
            let error = seal(&name("x"), 1, bad, &key).unwrap_err();
            assert_eq!(error.kind(), SecretErrorKind::InvalidValue);
        }
        let big = "x".repeat(MAX_SECRET_SIZE + 1);
        assert_eq!(
            seal(&name("x"), 1, &big, &key).unwrap_err().kind(),
            SecretErrorKind::InvalidValue
        );
        let error = seal(&name("x"), 1, "value", "UABC").unwrap_err();
        assert_eq!(error.kind(), SecretErrorKind::InvalidKey);
        assert_eq!(
            RuntimeKey::from_seed("SUAGARBAGE").unwrap_err().kind(),
            SecretErrorKind::InvalidKey
        );
        let runtime = RuntimeKey::generate();
        let again = RuntimeKey::from_seed(&format!("{}\n", runtime.seed())).unwrap();
        assert_eq!(again.public_key(), runtime.public_key());
    }
}
