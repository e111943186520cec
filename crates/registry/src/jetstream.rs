//! The production registry: metadata in a JetStream KV bucket, binaries content-addressed in
//! an Object Store bucket. Every instance keeps a local [`Catalog`] current from a KV watch,
//! so lookups never leave the process and deploys reach every runtime within milliseconds.
//!
//! KV layout (bucket `mycelium_functions` by default), all values JSON:
//! - `fn.<name>.v.<version>`: the [`FunctionMetadata`] of one immutable version;
//! - `fn.<name>.active`: `{"version": n}`, the active version;
//! - `seq.<name>`: `{"last": n}`, the last version number handed out (kept after delete, so
//!   numbers are never reused).
//!
//! Objects (bucket `mycelium_artifacts`): `sha256-<hex>`, shared by every version that pins it.

use std::{
    sync::{Arc, RwLock},
    task::Poll,
    time::Duration,
};

use async_nats::jetstream::{self, kv, object_store};
use futures_util::StreamExt;
use mycelium_core::{
    trigger::{Trigger, TriggerName, TRIGGER_KEY_PREFIX},
    Error, FunctionMetadata, FunctionName, FunctionSummary,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    catalog::Catalog,
    digest,
    memory::{DEFAULT_KEEP_VERSIONS, DEFAULT_MAX_ARTIFACT_SIZE},
    not_found, open_source, prepare, versions_to_prune, ArtifactReader, DeleteError,
    DeleteErrorKind, DeployError, DeployErrorKind, DeploySpec, FetchError, FetchErrorKind,
    LookupError, PreparedArtifact, Progress, Registry, RegistryAdmin, RollbackError,
    RollbackErrorKind, TriggerError, TriggerErrorKind, Versions,
};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where and how the JetStream registry stores things.
#[derive(Debug, Clone)]
pub struct NatsRegistryConfig {
    /// KV bucket of metadata.
    pub functions_bucket: String,
    /// Object Store bucket of binaries.
    pub artifacts_bucket: String,
    /// KV bucket of sealed secrets ([`crate::secrets`]).
    pub secrets_bucket: String,
    /// Replicas of every bucket (3 on a 3-node cluster for R3). Used when creating them.
    pub replicas: usize,
    /// Versions kept per function (the active one is always kept).
    pub keep_versions: usize,
    /// Largest binary accepted, in bytes.
    pub max_artifact_size: u64,
}

impl Default for NatsRegistryConfig {
    fn default() -> Self {
        Self {
            functions_bucket: "mycelium_functions".into(),
            artifacts_bucket: "mycelium_artifacts".into(),
            secrets_bucket: crate::secrets::DEFAULT_SECRETS_BUCKET.into(),
            replicas: 1,
            keep_versions: DEFAULT_KEEP_VERSIONS,
            max_artifact_size: DEFAULT_MAX_ARTIFACT_SIZE,
        }
    }
}

/// Why the registry could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenErrorKind {
    /// The NATS server has no JetStream.
    NoJetStream,
    /// Creating or reading the buckets failed.
    Storage,
}

/// A failed [`NatsRegistry::open`].
pub type OpenError = Error<OpenErrorKind>;

/// The JetStream-backed registry.
pub struct NatsRegistry {
    kv: kv::Store,
    objects: object_store::ObjectStore,
    catalog: Arc<RwLock<Catalog>>,
    config: NatsRegistryConfig,
    applied: watch::Receiver<u64>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for NatsRegistry {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

#[derive(Serialize, Deserialize)]
struct ActivePointer {
    version: u64,
}

#[derive(Serialize, Deserialize)]
struct Counter {
    last: u64,
}

fn version_key(name: &FunctionName, version: u64) -> String {
    format!("fn.{name}.v.{version}")
}

fn active_key(name: &FunctionName) -> String {
    format!("fn.{name}.active")
}

fn counter_key(name: &FunctionName) -> String {
    format!("seq.{name}")
}

fn trigger_key(name: &TriggerName) -> String {
    format!("{TRIGGER_KEY_PREFIX}{name}")
}

/// What a KV key means.
enum Key {
    Version(FunctionName, u64),
    Active(FunctionName),
    Trigger(TriggerName),
}

fn parse_key(key: &str) -> Option<Key> {
    if let Some(name) = key.strip_prefix(TRIGGER_KEY_PREFIX) {
        return TriggerName::new(name).ok().map(Key::Trigger);
    }
    let rest = key.strip_prefix("fn.")?;
    let (name, tail) = rest.split_once('.')?;
    let name = FunctionName::new(name).ok()?;
    match tail {
        "active" => Some(Key::Active(name)),
        _ => tail
            .strip_prefix("v.")?
            .parse()
            .ok()
            .map(|v| Key::Version(name, v)),
    }
}

fn storage<K: Clone>(
    kind: K,
    what: String,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error<K> {
    Error::with_source(kind, what, e)
}

/// Applies one KV entry to the catalog; unknown keys and malformed values are skipped.
fn apply(catalog: &RwLock<Catalog>, entry: &kv::Entry) {
    let Some(key) = parse_key(&entry.key) else {
        return;
    };
    let mut catalog = catalog.write().unwrap_or_else(|e| e.into_inner());
    let removed = matches!(
        entry.operation,
        kv::Operation::Delete | kv::Operation::Purge
    );
    match key {
        Key::Version(name, version) if removed => catalog.remove_version(&name, version),
        Key::Version(name, version) => {
            match serde_json::from_slice::<FunctionMetadata>(&entry.value) {
                Ok(meta) if meta.name == name && meta.version == version => {
                    catalog.insert_version(Arc::new(meta))
                }
                Ok(_) => {
                    tracing::warn!(key = %entry.key, "metadata does not match its key; ignored")
                }
                Err(error) => {
                    tracing::warn!(key = %entry.key, %error, "unreadable metadata; ignored")
                }
            }
        }
        Key::Trigger(name) if removed => catalog.remove_trigger(&name),
        Key::Trigger(name) => match serde_json::from_slice::<Trigger>(&entry.value) {
            Ok(trigger) if trigger.name == name => catalog.set_trigger(Arc::new(trigger)),
            Ok(_) => tracing::warn!(key = %entry.key, "trigger does not match its key; ignored"),
            Err(error) => tracing::warn!(key = %entry.key, %error, "unreadable trigger; ignored"),
        },
        Key::Active(name) if removed => catalog.set_active(&name, None),
        Key::Active(name) => match serde_json::from_slice::<ActivePointer>(&entry.value) {
            Ok(pointer) => catalog.set_active(&name, Some(pointer.version)),
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "unreadable active pointer; ignored")
            }
        },
    }
}

impl NatsRegistry {
    /// Opens (creating on first use) the buckets, loads the catalog, and keeps it current.
    pub async fn open(
        client: async_nats::Client,
        config: NatsRegistryConfig,
    ) -> Result<Self, OpenError> {
        let js = jetstream::new(client);
        if let Err(error) = js.query_account().await {
            return Err(OpenError::with_source(
                OpenErrorKind::NoJetStream,
                "the NATS server has no JetStream, which the registry needs; start nats-server with -js \
                 (mycelium up does), or run the runtime with --registry memory",
                error,
            ));
        }
        let kv = match js.get_key_value(&config.functions_bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: config.functions_bucket.clone(),
                    description: "Mycelium function metadata".into(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    storage(
                        OpenErrorKind::Storage,
                        format!("creating the KV bucket {}", config.functions_bucket),
                        e,
                    )
                })?,
        };
        let objects = match js.get_object_store(&config.artifacts_bucket).await {
            Ok(objects) => objects,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: config.artifacts_bucket.clone(),
                    description: Some("Mycelium function binaries, by SHA-256".into()),
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    storage(
                        OpenErrorKind::Storage,
                        format!(
                            "creating the Object Store bucket {}",
                            config.artifacts_bucket
                        ),
                        e,
                    )
                })?,
        };

        let catalog = Arc::new(RwLock::new(Catalog::default()));
        let (applied_tx, applied) = watch::channel(0);
        let last = load(&kv, &|entry| apply(&catalog, entry))
            .await
            .map_err(|e| {
                OpenError::with_source(
                    OpenErrorKind::Storage,
                    format!("loading the registry from {}", config.functions_bucket),
                    e,
                )
            })?;
        applied_tx.send_replace(last);
        let watched = catalog.clone();
        let watcher = tokio::spawn(follow(
            kv.clone(),
            move |entry| apply(&watched, entry),
            applied_tx,
            last,
        ));
        Ok(Self {
            kv,
            objects,
            catalog,
            config,
            applied,
            watcher,
        })
    }

    /// The KV revision the local catalog has applied; it rises as changes arrive.
    pub fn applied_revision(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Waits until `check` finds what it looks for in this instance's catalog, re-checking
    /// each time a change arrives; `None` after `limit`. For "deploy, then wait until this
    /// runtime sees it".
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Option<T> {
        let mut applied = self.applied.clone();
        tokio::time::timeout(limit, async {
            loop {
                if let Some(found) = check(self) {
                    return Some(found);
                }
                if applied.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Waits until `name` is active at `version` in this instance's catalog.
    pub async fn wait_for_active(
        &self,
        name: &FunctionName,
        version: u64,
        limit: Duration,
    ) -> bool {
        self.wait_for(limit, |registry| {
            (registry.get(name, None).map(|m| m.version).ok() == Some(version)).then_some(())
        })
        .await
        .is_some()
    }

    /// The settings in force.
    pub fn config(&self) -> &NatsRegistryConfig {
        &self.config
    }

    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The next version number of `name`: racing deploys each get their own.
    async fn next_version(&self, name: &FunctionName) -> Result<u64, DeployError> {
        let allocated = compare_and_set(&self.kv, &counter_key(name), |current| {
            let last = match current {
                Some(bytes) => serde_json::from_slice::<Counter>(bytes)?.last,
                None => 0,
            };
            Ok(Some((json(&Counter { last: last + 1 }), last + 1)))
        })
        .await;
        allocated
            .and_then(|version| version.ok_or_else(|| "no version was allocated".into()))
            .map_err(|e| {
                DeployError::with_source(
                    DeployErrorKind::Storage,
                    format!("allocating a version for \"{name}\""),
                    e,
                )
            })
    }

    /// Moves the active pointer to `version` unless a newer version is already active.
    async fn advance_active(&self, name: &FunctionName, version: u64) -> Result<(), DeployError> {
        compare_and_set(&self.kv, &active_key(name), |current| {
            let active = current
                .and_then(|bytes| serde_json::from_slice::<ActivePointer>(bytes).ok())
                .map_or(0, |pointer| pointer.version);
            Ok((active < version).then(|| (json(&ActivePointer { version }), ())))
        })
        .await
        .map(drop)
        .map_err(|e| {
            DeployError::with_source(
                DeployErrorKind::Storage,
                format!("activating \"{name}\" v{version}"),
                e,
            )
        })
    }

    /// Uploads the binary unless an object with its digest is already stored.
    async fn store_artifact(
        &self,
        artifact: &PreparedArtifact,
        progress: Option<&Progress>,
    ) -> Result<(), DeployError> {
        let name =
            digest::object_name(&artifact.digest).expect("digests we compute are well-formed");
        if let Ok(info) = self.objects.info(&name).await {
            if !info.deleted && info.size as u64 == artifact.size {
                if let Some(progress) = progress {
                    progress(artifact.size, artifact.size);
                }
                return Ok(());
            }
        }
        let reader = open_source(artifact).await?;
        let mut reader = ProgressReader {
            inner: reader,
            done: 0,
            total: artifact.size,
            progress: progress.cloned(),
        };
        let info = self
            .objects
            .put(name.as_str(), &mut reader)
            .await
            .map_err(|e| {
                storage(
                    DeployErrorKind::Storage,
                    format!("uploading the binary to {}", self.config.artifacts_bucket),
                    e,
                )
            })?;
        if info.size as u64 != artifact.size {
            let _ = self.objects.delete(&name).await;
            return Err(DeployError::new(
                DeployErrorKind::ArtifactUnreadable,
                format!("the binary changed while uploading ({} bytes stored, {} expected); deploy again", info.size, artifact.size),
            ));
        }
        Ok(())
    }

    /// Deletes stored binaries no kept version pins any more.
    async fn collect_garbage(&self, digests: impl IntoIterator<Item = String>) {
        for digest in digests {
            if self.catalog().references(&digest) {
                continue;
            }
            if let Some(name) = digest::object_name(&digest) {
                match self.objects.delete(&name).await {
                    Ok(()) => tracing::debug!(%digest, "deleted an unreferenced binary"),
                    Err(error) => {
                        tracing::debug!(%digest, %error, "could not delete an unreferenced binary")
                    }
                }
            }
        }
    }
}

fn json(value: &impl Serialize) -> bytes::Bytes {
    serde_json::to_vec(value)
        .expect("registry records serialize")
        .into()
}

/// Loads every current key into the catalog; returns the last revision seen.
/// Reads `key`, asks `next` for its new value given the current one (`None`: leave it),
/// and writes it only if nobody wrote in between (compare-and-set on the KV revision),
/// retrying on conflicts. Returns what `next` decided, or why it could not be written.
pub(crate) async fn compare_and_set<T>(
    kv: &kv::Store,
    key: &str,
    mut next: impl FnMut(Option<&[u8]>) -> Result<Option<(bytes::Bytes, T)>, BoxError>,
) -> Result<Option<T>, BoxError> {
    for _ in 0..100 {
        let entry = kv.entry(key).await?;
        let current = entry.as_ref().filter(|e| e.operation == kv::Operation::Put);
        let Some((value, decided)) = next(current.map(|e| e.value.as_ref()))? else {
            return Ok(None);
        };
        let conflict = match current {
            Some(entry) => match kv.update(key, value, entry.revision).await {
                Ok(_) => false,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => true,
                Err(e) => return Err(e.into()),
            },
            None => match kv.create(key, value).await {
                Ok(_) => false,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => true,
                Err(e) => return Err(e.into()),
            },
        };
        if !conflict {
            return Ok(Some(decided));
        }
    }
    Err(format!("too many concurrent changes to {key}; retry").into())
}

/// Applies every entry the bucket holds now; the last revision applied (0 when empty).
pub(crate) async fn load(
    kv: &kv::Store,
    apply: &impl Fn(&kv::Entry),
) -> Result<u64, async_nats::Error> {
    let status = kv.status().await?;
    if status.values() == 0 {
        return Ok(0);
    }
    let mut entries = kv.watch_with_history(">").await?;
    let mut last = 0;
    while let Some(entry) = entries.next().await {
        let entry = entry?;
        apply(&entry);
        last = last.max(entry.revision);
        if entry.delta == 0 || entry.seen_current {
            break;
        }
    }
    Ok(last)
}

/// Applies every change after `from`, resuming the watch if it breaks. A single failure is
/// routine (a reconnect, the process shutting down); only repeated ones are warned about.
pub(crate) async fn follow(
    kv: kv::Store,
    apply: impl Fn(&kv::Entry),
    applied: watch::Sender<u64>,
    mut from: u64,
) {
    let mut failures = 0u32;
    loop {
        let error = match kv.watch_all_from_revision(from + 1).await {
            Ok(mut entries) => loop {
                match entries.next().await {
                    Some(Ok(entry)) => {
                        failures = 0;
                        apply(&entry);
                        from = from.max(entry.revision);
                        applied.send_replace(from);
                    }
                    Some(Err(error)) => break error.to_string(),
                    None => break "the watch ended".to_string(),
                }
            },
            Err(error) => error.to_string(),
        };
        failures += 1;
        if failures >= 3 {
            tracing::warn!(%error, failures, bucket = %kv.name, "a KV watch keeps failing; changes may not reach this runtime");
        } else {
            tracing::debug!(%error, bucket = %kv.name, "KV watch interrupted; resuming");
        }
        tokio::time::sleep(Duration::from_millis(250 * u64::from(failures.min(8)))).await;
    }
}

impl Registry for NatsRegistry {
    fn get(
        &self,
        name: &FunctionName,
        version: Option<u64>,
    ) -> Result<Arc<FunctionMetadata>, LookupError> {
        self.catalog().get(name, version)
    }

    fn list(&self) -> Vec<FunctionSummary> {
        self.catalog().list()
    }

    fn contains(&self, name: &FunctionName) -> bool {
        self.catalog().contains(name)
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.applied.clone())
    }

    fn triggers(&self) -> Vec<Arc<Trigger>> {
        self.catalog().triggers()
    }
}

#[async_trait::async_trait]
impl RegistryAdmin for NatsRegistry {
    async fn deploy(&self, spec: DeploySpec) -> Result<Arc<FunctionMetadata>, DeployError> {
        let artifact = prepare(&spec, self.config.max_artifact_size).await?;
        if let Some(artifact) = &artifact {
            self.store_artifact(artifact, spec.progress.as_ref())
                .await?;
        }
        // Only now, with the binary stored, does anything point at it.
        let version = self.next_version(&spec.name).await?;
        let metadata = Arc::new(spec.metadata(version, artifact.as_ref()));
        self.kv
            .put(version_key(&spec.name, version), json(&*metadata))
            .await
            .map_err(|e| {
                storage(
                    DeployErrorKind::Storage,
                    format!("writing the metadata of \"{}\" v{version}", spec.name),
                    e,
                )
            })?;
        // A concurrent delete elsewhere may have collected the object between upload and
        // metadata; store it again so the version we publish is always runnable.
        if let Some(artifact) = &artifact {
            self.store_artifact(artifact, None).await?;
        }
        self.advance_active(&spec.name, version).await?;

        let (kept, active) = {
            let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
            catalog.insert_version(metadata.clone());
            let active = catalog
                .get(&spec.name, None)
                .map(|m| m.version)
                .unwrap_or(version)
                .max(version);
            catalog.set_active(&spec.name, Some(active));
            let kept: Vec<Arc<FunctionMetadata>> = catalog
                .versions(&spec.name)
                .map(|(v, _)| v)
                .unwrap_or_default();
            (kept, active)
        };
        let numbers: Vec<u64> = kept.iter().map(|m| m.version).collect();
        let mut dropped_digests = Vec::new();
        for old in versions_to_prune(&numbers, Some(active), self.config.keep_versions) {
            if let Err(error) = self.kv.purge(version_key(&spec.name, old)).await {
                tracing::warn!(%error, function = %spec.name, version = old, "could not drop an old version");
                continue;
            }
            let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
            catalog.remove_version(&spec.name, old);
            dropped_digests.extend(
                kept.iter()
                    .filter(|m| m.version == old)
                    .filter_map(|m| m.digest.clone()),
            );
        }
        self.collect_garbage(dropped_digests).await;
        Ok(metadata)
    }

    fn versions(&self, name: &FunctionName) -> Result<Versions, LookupError> {
        let (versions, active) = self
            .catalog()
            .versions(name)
            .ok_or_else(|| not_found(name))?;
        Ok(Versions { versions, active })
    }

    async fn rollback(
        &self,
        name: &FunctionName,
        version: u64,
    ) -> Result<Arc<FunctionMetadata>, RollbackError> {
        let failed = |e: BoxError| {
            RollbackError::with_source(
                RollbackErrorKind::Storage,
                format!("rolling back \"{name}\""),
                e,
            )
        };
        // Read the store, not the snapshot: the version must exist now, wherever it was written.
        let stored = self
            .kv
            .get(version_key(name, version))
            .await
            .map_err(|e| failed(e.into()))?;
        let Some(stored) = stored else {
            let known = self
                .kv
                .get(counter_key(name))
                .await
                .map_err(|e| failed(e.into()))?
                .is_some()
                && self.catalog().versions(name).is_some();
            return Err(if known {
                let kept = self
                    .catalog()
                    .versions(name)
                    .map(|(v, _)| v)
                    .unwrap_or_default();
                RollbackError::new(
                    RollbackErrorKind::VersionNotFound,
                    crate::version_not_found(name, version, kept.iter().map(|m| m.version))
                        .to_string(),
                )
            } else {
                RollbackError::new(
                    RollbackErrorKind::FunctionNotFound,
                    not_found(name).to_string(),
                )
            });
        };
        let metadata: FunctionMetadata =
            serde_json::from_slice(&stored).map_err(|e| failed(e.into()))?;
        self.kv
            .put(active_key(name), json(&ActivePointer { version }))
            .await
            .map_err(|e| failed(e.into()))?;
        let metadata = Arc::new(metadata);
        let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        catalog.insert_version(metadata.clone());
        catalog.set_active(name, Some(version));
        Ok(metadata)
    }

    async fn delete(&self, name: &FunctionName) -> Result<(), DeleteError> {
        let failed = |e: BoxError| {
            DeleteError::with_source(DeleteErrorKind::Storage, format!("deleting \"{name}\""), e)
        };
        let active = self
            .kv
            .get(active_key(name))
            .await
            .map_err(|e| failed(e.into()))?;
        let kept = self
            .catalog()
            .versions(name)
            .map(|(v, _)| v)
            .unwrap_or_default();
        if active.is_none() && kept.is_empty() {
            return Err(DeleteError::new(
                DeleteErrorKind::FunctionNotFound,
                not_found(name).to_string(),
            ));
        }
        // The pointer goes first: from then on nobody resolves the function.
        self.kv
            .purge(active_key(name))
            .await
            .map_err(|e| failed(e.into()))?;
        for meta in &kept {
            self.kv
                .purge(version_key(name, meta.version))
                .await
                .map_err(|e| failed(e.into()))?;
        }
        self.catalog
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let digests: Vec<String> = kept.iter().filter_map(|m| m.digest.clone()).collect();
        self.collect_garbage(digests).await;
        Ok(())
    }

    async fn read_artifact(
        &self,
        metadata: &FunctionMetadata,
    ) -> Result<ArtifactReader, FetchError> {
        let digest = crate::pinned_digest(metadata)?;
        let name = digest::object_name(digest).ok_or_else(|| {
            FetchError::new(
                FetchErrorKind::Corrupt,
                format!("malformed digest {digest:?}"),
            )
        })?;
        match self.objects.get(&name).await {
            Ok(object) => Ok(Box::pin(object)),
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => Err(FetchError::new(
                FetchErrorKind::Missing,
                format!(
                    "the binary {digest} of \"{}\" v{} is missing from {}; deploy it again",
                    metadata.name, metadata.version, self.config.artifacts_bucket
                ),
            )),
            Err(e) => Err(storage(
                FetchErrorKind::Storage,
                format!("downloading {name}"),
                e,
            )),
        }
    }

    async fn put_trigger(&self, trigger: Trigger) -> Result<(), TriggerError> {
        let key = trigger_key(&trigger.name);
        self.kv.put(&key, json(&trigger)).await.map_err(|e| {
            storage(
                TriggerErrorKind::Storage,
                format!("writing the trigger \"{}\"", trigger.name),
                e,
            )
        })?;
        self.catalog
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_trigger(Arc::new(trigger));
        Ok(())
    }

    async fn delete_trigger(&self, name: &TriggerName) -> Result<(), TriggerError> {
        let key = trigger_key(name);
        let stored = self.kv.get(&key).await.map_err(|e| {
            storage(
                TriggerErrorKind::Storage,
                format!("reading the trigger \"{name}\""),
                e,
            )
        })?;
        if stored.is_none() {
            return Err(crate::error::trigger_not_found(name));
        }
        self.kv.purge(&key).await.map_err(|e| {
            storage(
                TriggerErrorKind::Storage,
                format!("deleting the trigger \"{name}\""),
                e,
            )
        })?;
        self.catalog
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove_trigger(name);
        Ok(())
    }
}

/// Reports upload progress as the Object Store reads the binary.
struct ProgressReader {
    inner: ArtifactReader,
    done: u64,
    total: u64,
    progress: Option<Progress>,
}

impl tokio::io::AsyncRead for ProgressReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = (buf.filled().len() - before) as u64;
            self.done += read;
            if let Some(progress) = &self.progress {
                progress(self.done, self.total);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_key_is_understood_or_skipped(key in ".{0,80}") {
            if let Some(Key::Version(name, _) | Key::Active(name)) = parse_key(&key) {
                // Only keys of the documented layout are understood.
                let prefix = format!("fn.{name}.");
                proptest::prop_assert!(key.starts_with(&prefix), "{} lacks {}", key, prefix);
            }
        }
    }

    #[test]
    fn the_documented_keys_are_understood() {
        assert!(
            matches!(parse_key("fn.resize.v.12"), Some(Key::Version(n, 12)) if n.as_str() == "resize")
        );
        assert!(
            matches!(parse_key("fn.resize.active"), Some(Key::Active(n)) if n.as_str() == "resize")
        );
        for other in [
            "seq.resize",
            "fn.Resize.active",
            "fn.resize.v.x",
            "fn.resize",
            "fn..active",
        ] {
            assert!(parse_key(other).is_none(), "{other}");
        }
    }
}
