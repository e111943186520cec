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

mod cache;
mod catalog;
pub mod digest;
mod jetstream;
mod memory;

use std::{collections::BTreeMap, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use mycelium_core::{
    Error, ErrorCode, FunctionKind, FunctionMetadata, FunctionName, FunctionSummary, ProtocolError,
};

pub use cache::ArtifactCache;
pub use jetstream::{NatsRegistry, NatsRegistryConfig, OpenError, OpenErrorKind};
pub use memory::MemoryRegistry;

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
    let code = match err.kind() {
        LookupErrorKind::FunctionNotFound => ErrorCode::FunctionNotFound,
        LookupErrorKind::VersionNotFound => ErrorCode::VersionNotFound,
        LookupErrorKind::Unavailable => ErrorCode::Unavailable,
    };
    ProtocolError::new(code, format!("{err:#}"))
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
}

/// The error every registry reports for an unknown function.
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
            "function \"{name}\" has no version {version}; kept versions: {} (`mycelium versions {name}`)",
            if kept.is_empty() { "none".to_string() } else { kept.join(", ") }
        ),
    )
}

/// Reports upload progress: bytes done and bytes in all.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Where a deployed binary comes from.
#[derive(Clone)]
pub enum ArtifactSource {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A file, streamed (never read into memory whole).
    File(PathBuf),
}

/// What to deploy: a new version of a function.
#[derive(Clone)]
pub struct DeploySpec {
    /// The function.
    pub name: FunctionName,
    /// How it runs.
    pub kind: FunctionKind,
    /// The binary (required for plugins, absent for built-ins).
    pub artifact: Option<ArtifactSource>,
    /// For built-ins: which built-in implementation runs under this name.
    pub entry_point: Option<String>,
    /// One line for people.
    pub description: String,
    /// Longest an invocation may run.
    pub timeout: Option<Duration>,
    /// Memory limit for plugin processes, in MiB.
    pub memory_mb: Option<u64>,
    /// Invocations allowed in flight per runtime.
    pub max_concurrency: Option<u32>,
    /// Environment of plugin processes.
    pub env: BTreeMap<String, String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Plugin protocol version.
    pub protocol_version: Option<u32>,
    /// Called as the binary uploads.
    pub progress: Option<Progress>,
    /// Signs the binary's digest, for runtimes that trust only signed binaries.
    pub signing_key: Option<SigningKey>,
}

/// An NKey that signs binaries' digests at deploy ([`DeploySpec::signing_key`]). Shows only
/// its public key when printed.
#[derive(Clone)]
pub struct SigningKey(Arc<nkeys::KeyPair>);

impl SigningKey {
    /// The key of an NKey seed (`SU...`, `SA...`, ...), as `nsc` or `nk -gen user` make them.
    pub fn from_seed(seed: &str) -> Result<Self, DeployError> {
        nkeys::KeyPair::from_seed(seed.trim())
            .map(|pair| Self(Arc::new(pair)))
            .map_err(|e| {
                DeployError::with_source(
                    DeployErrorKind::InvalidSpec,
                    "the signing key is not an NKey seed (it starts with S)",
                    e,
                )
            })
    }

    /// The public key runtimes are configured to trust.
    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    fn sign(&self, digest: &str) -> Result<String, DeployError> {
        let signature = self.0.sign(digest.as_bytes()).map_err(|e| {
            DeployError::with_source(DeployErrorKind::InvalidSpec, "signing the digest", e)
        })?;
        Ok(signature.iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SigningKey")
            .field(&self.public_key())
            .finish()
    }
}

/// Checks that the binary `metadata` pins was signed by one of `trusted` (public NKeys).
/// With no trusted keys every binary passes: signing is opt-in.
pub fn verify_signature(metadata: &FunctionMetadata, trusted: &[String]) -> Result<(), FetchError> {
    if trusted.is_empty() {
        return Ok(());
    }
    let untrusted = |why: String| {
        FetchError::new(
            FetchErrorKind::Untrusted,
            format!(
                "\"{}\" v{} {why}; this runtime runs only binaries signed by {}: deploy with \
                 --sign-key and a trusted key",
                metadata.name,
                metadata.version,
                trusted.join(", ")
            ),
        )
    };
    let (Some(digest), Some(signer), Some(signature)) = (
        metadata.digest.as_deref(),
        metadata.signer.as_deref(),
        metadata.signature.as_deref(),
    ) else {
        return Err(untrusted("is not signed".into()));
    };
    if !trusted.iter().any(|key| key == signer) {
        return Err(untrusted(format!(
            "is signed by {signer}, an untrusted key"
        )));
    }
    let bytes: Option<Vec<u8>> = (0..signature.len())
        .step_by(2)
        .map(|i| {
            signature
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let valid = bytes.is_some_and(|bytes| {
        nkeys::KeyPair::from_public_key(signer)
            .and_then(|key| key.verify(digest.as_bytes(), &bytes))
            .is_ok()
    });
    if valid {
        Ok(())
    } else {
        Err(untrusted(format!(
            "carries a signature by {signer} that does not match its digest"
        )))
    }
}

impl DeploySpec {
    /// A plugin deployment of `artifact` with default settings.
    pub fn plugin(name: FunctionName, artifact: ArtifactSource) -> Self {
        Self::new(name, FunctionKind::Plugin, Some(artifact), None)
    }

    /// A deployment that runs the built-in `entry_point` under `name`.
    pub fn builtin(name: FunctionName, entry_point: &str) -> Self {
        Self::new(
            name,
            FunctionKind::Builtin,
            None,
            Some(entry_point.to_owned()),
        )
    }

    fn new(
        name: FunctionName,
        kind: FunctionKind,
        artifact: Option<ArtifactSource>,
        entry_point: Option<String>,
    ) -> Self {
        Self {
            name,
            kind,
            artifact,
            entry_point,
            description: String::new(),
            timeout: None,
            memory_mb: None,
            max_concurrency: None,
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
            protocol_version: None,
            progress: None,
            signing_key: None,
        }
    }

    /// The metadata record of this spec at `version`, with the artifact's pin.
    pub(crate) fn metadata(
        &self,
        version: u64,
        artifact: Option<&PreparedArtifact>,
    ) -> FunctionMetadata {
        FunctionMetadata {
            name: self.name.clone(),
            version,
            kind: self.kind,
            description: self.description.clone(),
            timeout: self.timeout,
            max_concurrency: self.max_concurrency,
            memory_mb: self.memory_mb,
            env: self.env.clone(),
            labels: self.labels.clone(),
            digest: artifact.map(|a| a.digest.clone()),
            signer: artifact
                .and_then(|a| a.signature.as_ref())
                .map(|s| s.0.clone()),
            signature: artifact
                .and_then(|a| a.signature.as_ref())
                .map(|s| s.1.clone()),
            size: artifact.map(|a| a.size),
            created_at: Some(chrono::Utc::now()),
            entry_point: self.entry_point.clone(),
            protocol_version: self.protocol_version,
        }
    }
}

/// Why a deploy failed. Nothing is left pointing at a half-written artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployErrorKind {
    /// The spec is inconsistent (a plugin without a binary, a built-in with one, ...).
    InvalidSpec,
    /// The binary could not be read.
    ArtifactUnreadable,
    /// The binary is empty.
    ArtifactEmpty,
    /// The binary is larger than the registry accepts.
    ArtifactTooLarge,
    /// The file is not a program (neither an ELF binary nor a `#!` script).
    NotExecutable,
    /// The store failed or is unreachable.
    Storage,
}

/// A failed [`RegistryAdmin::deploy`].
pub type DeployError = Error<DeployErrorKind>;

/// Why a rollback failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackErrorKind {
    /// No such function.
    FunctionNotFound,
    /// No such kept version.
    VersionNotFound,
    /// The store failed.
    Storage,
}

/// A failed [`RegistryAdmin::rollback`].
pub type RollbackError = Error<RollbackErrorKind>;

/// Why a delete failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteErrorKind {
    /// No such function.
    FunctionNotFound,
    /// The store failed.
    Storage,
}

/// A failed [`RegistryAdmin::delete`].
pub type DeleteError = Error<DeleteErrorKind>;

/// Why a binary could not be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// The version has no binary (a built-in).
    NoArtifact,
    /// The binary is gone from the store.
    Missing,
    /// The binary does not match the pinned digest or size: it is never used.
    Corrupt,
    /// The store or the local cache failed.
    Storage,
    /// The runtime trusts only signed binaries and this one's signature is missing or wrong.
    Untrusted,
}

/// A failed artifact fetch.
pub type FetchError = Error<FetchErrorKind>;

/// The digest `metadata` pins, or why there is none.
pub(crate) fn pinned_digest(metadata: &FunctionMetadata) -> Result<&str, FetchError> {
    metadata.digest.as_deref().ok_or_else(|| {
        FetchError::new(
            FetchErrorKind::NoArtifact,
            format!("\"{}\" v{} has no binary", metadata.name, metadata.version),
        )
    })
}

/// The invocation protocol's answer when a function cannot run because of its binary.
pub fn fetch_protocol_error(error: &FetchError) -> ProtocolError {
    let code = match error.kind() {
        FetchErrorKind::Corrupt => ErrorCode::ArtifactCorrupt,
        FetchErrorKind::Untrusted => ErrorCode::ArtifactUntrusted,
        _ => ErrorCode::Unavailable,
    };
    ProtocolError::new(code, format!("{error:#}"))
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
}

/// A binary measured before it is stored.
pub(crate) struct PreparedArtifact {
    pub digest: String,
    pub size: u64,
    pub source: ArtifactSource,
    /// (signer's public key, signature hex) when the deploy signs.
    pub signature: Option<(String, String)>,
}

/// Checks the spec and measures the binary (streaming files through SHA-256).
pub(crate) async fn prepare(
    spec: &DeploySpec,
    max_size: u64,
) -> Result<Option<PreparedArtifact>, DeployError> {
    let invalid = |message: String| DeployError::new(DeployErrorKind::InvalidSpec, message);
    match (spec.kind, &spec.artifact, &spec.entry_point) {
        (FunctionKind::Plugin, None, _) => {
            return Err(invalid(format!(
                "plugin \"{}\" needs a binary to deploy",
                spec.name
            )))
        }
        (FunctionKind::Builtin, Some(_), _) => return Err(invalid(
            "a built-in function runs code compiled into the runtime; deploy it without a binary"
                .into(),
        )),
        (FunctionKind::Builtin, None, None) => {
            return Err(invalid(
                "a built-in deployment needs an entry point: the built-in to run".into(),
            ))
        }
        _ => {}
    }
    if let Some(entry) = &spec.entry_point {
        if FunctionName::new(entry).is_err() {
            return Err(invalid(format!(
                "entry point {entry:?} is not a valid function name"
            )));
        }
    }
    if let Some(mb) = spec.memory_mb.filter(|&mb| mb < MIN_MEMORY_MB) {
        return Err(invalid(format!(
            "a memory limit of {mb} MiB leaves a plugin no room to start; give it at least {MIN_MEMORY_MB} MiB, or none"
        )));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(invalid(format!(
                "environment variable name {key:?} is not valid"
            )));
        }
    }
    let Some(source) = &spec.artifact else {
        if spec.signing_key.is_some() {
            return Err(invalid(
                "only binaries are signed; a built-in deployment has none: deploy without a signing key".into(),
            ));
        }
        return Ok(None);
    };
    let (digest, size) = match source {
        ArtifactSource::Bytes(bytes) => {
            check_size(bytes.len() as u64, max_size, &spec.name)?;
            (digest::digest_of(bytes), bytes.len() as u64)
        }
        ArtifactSource::File(path) => hash_file(path, max_size, &spec.name).await?,
    };
    let signature = match &spec.signing_key {
        Some(key) => Some((key.public_key(), key.sign(&digest)?)),
        None => None,
    };
    Ok(Some(PreparedArtifact {
        digest,
        size,
        source: source.clone(),
        signature,
    }))
}

/// The least memory limit a deploy accepts, in MiB.
pub const MIN_MEMORY_MB: u64 = 16;

/// Whether a file starting with `head` is something `execve` runs: an ELF binary or a `#!`
/// script. Anything else would be run by the shell's fallback as a script, which is never
/// what was meant. Checked for binaries deployed from files (what `mycelium deploy` sends).
fn is_program(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF") || head.starts_with(b"#!")
}

fn check_size(size: u64, max_size: u64, name: &FunctionName) -> Result<(), DeployError> {
    if size == 0 {
        return Err(DeployError::new(
            DeployErrorKind::ArtifactEmpty,
            format!("the binary for \"{name}\" is empty; build it first"),
        ));
    }
    if size > max_size {
        return Err(DeployError::new(
            DeployErrorKind::ArtifactTooLarge,
            format!("the binary for \"{name}\" is {size} bytes, more than the registry's limit of {max_size} bytes; strip it or raise the limit"),
        ));
    }
    Ok(())
}

async fn hash_file(
    path: &std::path::Path,
    max_size: u64,
    name: &FunctionName,
) -> Result<(String, u64), DeployError> {
    use tokio::io::AsyncReadExt;
    let unreadable = |e: std::io::Error| {
        DeployError::with_source(
            DeployErrorKind::ArtifactUnreadable,
            format!("cannot read the binary {}", path.display()),
            e,
        )
    };
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let meta = file.metadata().await.map_err(unreadable)?;
    if !meta.is_file() {
        return Err(DeployError::new(
            DeployErrorKind::ArtifactUnreadable,
            format!("{} is not a regular file", path.display()),
        ));
    }
    check_size(meta.len(), max_size, name)?;
    let mut hasher = digest::Hasher::new();
    let mut buffer = vec![0; 256 * 1024];
    let mut first = true;
    loop {
        let read = file.read(&mut buffer).await.map_err(unreadable)?;
        if read == 0 {
            break;
        }
        if std::mem::take(&mut first) && !is_program(&buffer[..read]) {
            return Err(DeployError::new(
                DeployErrorKind::NotExecutable,
                format!(
                    "{} is not a program: it is neither an ELF binary nor a script starting with #!; deploy the built binary",
                    path.display()
                ),
            ));
        }
        hasher.update(&buffer[..read]);
    }
    let (digest, size) = hasher.finish();
    // The file changed while we read it: refuse rather than pin a digest of nothing stable.
    check_size(size, max_size, name)?;
    Ok((digest, size))
}

/// Opens the source of a prepared artifact for reading.
pub(crate) async fn open_source(
    artifact: &PreparedArtifact,
) -> Result<ArtifactReader, DeployError> {
    match &artifact.source {
        ArtifactSource::Bytes(bytes) => Ok(Box::pin(std::io::Cursor::new(bytes.clone()))),
        ArtifactSource::File(path) => tokio::fs::File::open(path)
            .await
            .map(|f| Box::pin(f) as ArtifactReader)
            .map_err(|e| {
                DeployError::with_source(
                    DeployErrorKind::ArtifactUnreadable,
                    format!("cannot read the binary {}", path.display()),
                    e,
                )
            }),
    }
}

/// Which versions to drop after a deploy: all but the newest `keep`, never the active one.
pub(crate) fn versions_to_prune(versions: &[u64], active: Option<u64>, keep: usize) -> Vec<u64> {
    let mut sorted = versions.to_vec();
    sorted.sort_unstable();
    let cut = sorted.len().saturating_sub(keep.max(1));
    sorted[..cut]
        .iter()
        .copied()
        .filter(|v| Some(*v) != active)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_and_the_active() {
        assert_eq!(versions_to_prune(&[1, 2, 3, 4, 5], Some(5), 3), [1, 2]);
        assert_eq!(versions_to_prune(&[5, 1, 3, 2, 4], Some(1), 3), [2]);
        assert_eq!(versions_to_prune(&[1, 2], Some(2), 10), Vec::<u64>::new());
        assert_eq!(versions_to_prune(&[1, 2, 3], None, 0), [1, 2]);
    }
}

#[cfg(test)]
mod signing_tests {
    use super::*;

    fn signed(key: &SigningKey) -> FunctionMetadata {
        let mut metadata = FunctionMetadata::builtin("f".parse().unwrap(), "");
        metadata.digest = Some(digest::digest_of(b"binary"));
        metadata.signer = Some(key.public_key());
        metadata.signature = Some(key.sign(metadata.digest.as_deref().unwrap()).unwrap());
        metadata
    }

    #[test]
    fn signatures_are_checked_against_the_digest_and_the_trusted_keys() {
        let key = SigningKey::from_seed(&nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        let trusted = vec![key.public_key()];
        let good = signed(&key);
        assert!(verify_signature(&good, &trusted).is_ok());
        assert!(
            verify_signature(&good, &[]).is_ok(),
            "no trusted keys: signing is off"
        );

        let mut other_binary = good.clone();
        other_binary.digest = Some(digest::digest_of(b"another binary"));
        let mut flipped = good.clone();
        let mut text = flipped.signature.take().unwrap();
        let last = if text.ends_with('0') { "1" } else { "0" };
        text.replace_range(text.len() - 1.., last);
        flipped.signature = Some(text);
        let mut garbage = good.clone();
        garbage.signature = Some("zz".into());
        let mut unsigned = good.clone();
        unsigned.signature = None;
        for (metadata, why) in [
            (other_binary, "does not match"),
            (flipped, "does not match"),
            (garbage, "does not match"),
            (unsigned, "is not signed"),
        ] {
            let error = verify_signature(&metadata, &trusted).unwrap_err();
            assert_eq!(error.kind(), FetchErrorKind::Untrusted);
            assert!(error.to_string().contains(why), "{error}");
        }
        let stranger = SigningKey::from_seed(&nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        let error = verify_signature(&signed(&stranger), &trusted).unwrap_err();
        assert!(error.to_string().contains("untrusted key"), "{error}");
        assert!(
            format!("{key:?}").starts_with("SigningKey(\"U"),
            "only the public key shows"
        );
        assert!(SigningKey::from_seed("not a seed").is_err());
    }
}
