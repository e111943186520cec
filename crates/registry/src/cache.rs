//! The runtime host's artifact cache: content-addressed files, verified against the pinned
//! digest when they enter, bounded in size with least-recently-used eviction.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use mycelium_core::FunctionMetadata;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{digest, FetchError, FetchErrorKind, RegistryAdmin};

/// A directory of verified binaries named by digest.
#[derive(Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
}

fn storage(message: String, e: std::io::Error) -> FetchError {
    FetchError::with_source(FetchErrorKind::Storage, message, e)
}

impl ArtifactCache {
    /// A cache in `dir` (created if missing) holding at most `max_bytes`; the newest entry is
    /// kept even when it alone is larger.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, max_bytes })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The verified, executable local copy of the binary `metadata` pins: from the cache
    /// when present (warm), else downloaded from `registry`, checked against the pinned
    /// digest and size, and only then made visible. A mismatch is [`FetchErrorKind::Corrupt`]
    /// and leaves nothing behind.
    pub async fn fetch(
        &self,
        registry: &dyn RegistryAdmin,
        metadata: &FunctionMetadata,
    ) -> Result<PathBuf, FetchError> {
        self.fetch_reporting(registry, metadata)
            .await
            .map(|(path, _)| path)
    }

    /// [`ArtifactCache::fetch`], also saying whether the binary was downloaded (`true`) or
    /// already cached (`false`), for metrics.
    pub async fn fetch_reporting(
        &self,
        registry: &dyn RegistryAdmin,
        metadata: &FunctionMetadata,
    ) -> Result<(PathBuf, bool), FetchError> {
        let (Some(pinned), Some(size)) = (metadata.digest.as_deref(), metadata.size) else {
            return Err(FetchError::new(
                FetchErrorKind::NoArtifact,
                format!("\"{}\" v{} has no binary", metadata.name, metadata.version),
            ));
        };
        let object = digest::object_name(pinned).ok_or_else(|| {
            FetchError::new(
                FetchErrorKind::Corrupt,
                format!(
                    "\"{}\" v{} pins a malformed digest {pinned:?}",
                    metadata.name, metadata.version
                ),
            )
        })?;
        let path = self.dir.join(&object);
        // The warm path is one `stat`: done in place, where tokio's would hop to its blocking
        // pool and back (a cold start's cost, BENCHMARKS.md).
        if let Ok(existing) = std::fs::metadata(&path) {
            if existing.len() == size {
                touch(&path);
                return Ok((path, false));
            }
            // A truncated or foreign file under a content address: replace it.
            let _ = tokio::fs::remove_file(&path).await;
        }

        let partial = self
            .dir
            .join(format!(".partial-{object}-{}", std::process::id()));
        let result = self
            .download(registry, metadata, pinned, size, &partial)
            .await;
        if let Err(error) = result {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error);
        }
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(|e| storage(format!("moving the binary into {}", path.display()), e))?;
        self.evict(&path);
        Ok((path, true))
    }

    async fn download(
        &self,
        registry: &dyn RegistryAdmin,
        metadata: &FunctionMetadata,
        pinned: &str,
        size: u64,
        partial: &Path,
    ) -> Result<(), FetchError> {
        let mut reader = registry.read_artifact(metadata).await?;
        let mut file = tokio::fs::File::create(partial)
            .await
            .map_err(|e| storage(format!("creating {}", partial.display()), e))?;
        let mut hasher = digest::Hasher::new();
        let mut buffer = vec![0; 256 * 1024];
        loop {
            let read = reader.read(&mut buffer).await.map_err(|e| {
                FetchError::with_source(FetchErrorKind::Storage, "downloading the binary", e)
            })?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            file.write_all(&buffer[..read])
                .await
                .map_err(|e| storage(format!("writing {}", partial.display()), e))?;
        }
        let (actual, actual_size) = hasher.finish();
        if actual != pinned || actual_size != size {
            return Err(FetchError::new(
                FetchErrorKind::Corrupt,
                format!(
                    "the stored binary of \"{}\" v{} is {actual} ({actual_size} bytes) but its metadata pins {pinned} ({size} bytes); \
                     it was not run; deploy the function again",
                    metadata.name, metadata.version
                ),
            ));
        }
        file.flush()
            .await
            .map_err(|e| storage("flushing the binary".into(), e))?;
        file.sync_all()
            .await
            .map_err(|e| storage("syncing the binary".into(), e))?;
        set_executable(partial)
            .map_err(|e| storage(format!("making {} executable", partial.display()), e))
    }

    /// Where a file made from the binary `digest` pins (a compiled WebAssembly module) is kept:
    /// beside the binary as `sha256-<hex>.<tag>`, under the same size bound. `None` for a
    /// malformed digest. Write it elsewhere and rename it there, then [`ArtifactCache::admit`].
    pub fn derived_path(&self, digest: &str, tag: &str) -> Option<PathBuf> {
        let object = digest::object_name(digest)?;
        Some(self.dir.join(format!("{object}.{tag}")))
    }

    /// Counts a file just placed at a [`ArtifactCache::derived_path`] against the bound,
    /// evicting the least recently used entries (never this one) to make room.
    pub fn admit(&self, path: &Path) {
        self.evict(path);
    }

    /// Marks a cached file as just used, so eviction takes it last.
    pub fn touch(&self, path: &Path) {
        touch(path);
    }

    /// Removes least-recently-used entries until the cache fits, never `keep`.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("sha256-"))
            })
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::debug!(path = %path.display(), "evicted from the artifact cache");
                total -= len;
            }
        }
    }
}

fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

fn set_executable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}
