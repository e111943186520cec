//! What a deploy asks for ([`DeploySpec`]) and the checks and measurements every registry
//! makes before it stores anything.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use mycelium_core::{
    asynchronous::check_result_subject,
    secret::{check_env_name, SecretName},
    AsyncSettings, FunctionKind, FunctionMetadata, FunctionName,
};

use crate::{digest, ArtifactReader, DeployError, DeployErrorKind, SigningKey};

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
    /// Environment of plugin processes and WebAssembly instances.
    pub env: BTreeMap<String, String>,
    /// Secrets delivered in that environment: variable name -> secret name (references only).
    pub secrets: BTreeMap<String, SecretName>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Plugin protocol version.
    pub protocol_version: Option<u32>,
    /// Called as the binary uploads.
    pub progress: Option<Progress>,
    /// Signs the binary's digest, for runtimes that trust only signed binaries.
    pub signing_key: Option<SigningKey>,
    /// Retries and result destinations of asynchronous invocations.
    pub asynchronous: AsyncSettings,
}

impl DeploySpec {
    /// A plugin deployment of `artifact` with default settings.
    pub fn plugin(name: FunctionName, artifact: ArtifactSource) -> Self {
        Self::new(name, FunctionKind::Plugin, Some(artifact), None)
    }

    /// A WebAssembly deployment of `artifact` (a WASI preview 1 module) with default settings.
    pub fn wasm(name: FunctionName, artifact: ArtifactSource) -> Self {
        Self::new(name, FunctionKind::Wasm, Some(artifact), None)
    }

    /// A deployment of the binary at `path` as the kind its first bytes say (what
    /// `mycelium deploy NAME FILE` does): a WebAssembly module, else a plugin program.
    pub async fn of_file(name: FunctionName, path: PathBuf) -> Result<Self, DeployError> {
        use tokio::io::AsyncReadExt;
        let mut head = [0; 4];
        let mut read = 0;
        // An unreadable file is reported by `prepare`, with the kind's own checks.
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            while read < head.len() {
                match file.read(&mut head[read..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
        }
        let kind = kind_of_binary(&head[..read]);
        Ok(Self::new(
            name,
            kind,
            Some(ArtifactSource::File(path)),
            None,
        ))
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
            secrets: BTreeMap::new(),
            labels: BTreeMap::new(),
            protocol_version: None,
            asynchronous: AsyncSettings::default(),
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
            secrets: self.secrets.clone(),
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
            asynchronous: self.asynchronous.clone(),
        }
    }
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
        (FunctionKind::Wasm, None, _) => {
            return Err(invalid(format!(
                "WebAssembly function \"{}\" needs a module to deploy",
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
    for subject in [&spec.asynchronous.on_success, &spec.asynchronous.on_failure]
        .into_iter()
        .flatten()
    {
        // Checked against the default prefix here; each runtime checks again with its own.
        check_result_subject(subject, mycelium_core::subjects::DEFAULT_PREFIX, &[]).map_err(
            |e| {
                invalid(format!(
                    "{e}; give --on-success/--on-failure a subject results may go to"
                ))
            },
        )?;
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
            "a memory limit of {mb} MiB leaves a function no room to start; give it at least {MIN_MEMORY_MB} MiB, or none"
        )));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(invalid(format!(
                "environment variable name {key:?} is not valid"
            )));
        }
    }
    for variable in spec.secrets.keys() {
        check_env_name(variable).map_err(|e| invalid(format!("--secret {variable}=...: {e}")))?;
        if spec.env.contains_key(variable) {
            return Err(invalid(format!(
                "{variable} is given both as an environment variable and as a secret; keep one"
            )));
        }
    }
    if !spec.secrets.is_empty() && spec.kind == FunctionKind::Builtin {
        return Err(invalid(
            "built-in functions run inside the runtime and get no environment; secrets are for plugins and WebAssembly modules".into(),
        ));
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
            if spec.kind == FunctionKind::Wasm {
                check_head(spec.kind, bytes, "the binary")?;
            }
            (digest::digest_of(bytes), bytes.len() as u64)
        }
        ArtifactSource::File(path) => hash_file(path, spec.kind, max_size, &spec.name).await?,
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

/// The first bytes of every WebAssembly binary.
const WASM_MAGIC: &[u8] = b"\0asm";
/// The version field of a core module (components carry another).
const WASM_MODULE_VERSION: &[u8] = &[1, 0, 0, 0];

/// The kind of function a binary starting with `head` is: a WebAssembly binary (by its magic
/// bytes) is [`FunctionKind::Wasm`], anything else a plugin program.
pub fn kind_of_binary(head: &[u8]) -> FunctionKind {
    if head.starts_with(WASM_MAGIC) {
        FunctionKind::Wasm
    } else {
        FunctionKind::Plugin
    }
}

/// Refuses a binary whose first bytes are not what `kind` runs.
fn check_head(kind: FunctionKind, head: &[u8], what: &str) -> Result<(), DeployError> {
    let refuse = |message: String| Err(DeployError::new(DeployErrorKind::NotExecutable, message));
    match kind {
        FunctionKind::Wasm if head.get(4..8) == Some(WASM_MODULE_VERSION) => Ok(()),
        FunctionKind::Wasm if head.starts_with(WASM_MAGIC) => refuse(format!(
            "{what} is a WebAssembly component; Mycelium runs WASI preview 1 modules: build for wasm32-wasi (wasm32-wasip1)"
        )),
        FunctionKind::Wasm => refuse(format!(
            "{what} is not a WebAssembly module (it does not start with \\0asm); deploy the built .wasm file"
        )),
        _ if is_program(head) => Ok(()),
        _ => refuse(format!(
            "{what} is not a program: it is neither an ELF binary nor a script starting with #!; deploy the built binary"
        )),
    }
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
    kind: FunctionKind,
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
        if std::mem::take(&mut first) {
            check_head(kind, &buffer[..read], &path.display().to_string())?;
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
