//! Compiled modules, kept on disk beside their binaries in the artifact cache
//! (`sha256-<hex>.cwasm-<engine>`), so each digest is compiled once per engine configuration
//! and a restarted runtime maps the code instead of compiling it again.

use std::{
    hash::{Hash, Hasher},
    path::Path,
};

use mycelium_registry::ArtifactCache;
use wasmtime::{Engine, Module};

/// Why a module could not be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadErrorKind {
    /// The bytes are not a module this engine compiles.
    Invalid,
    /// The binary could not be read.
    Storage,
}

pub(crate) type LoadError = mycelium_core::Error<LoadErrorKind>;

/// The module this engine compiled before from the binary `digest` pins, mapped from the
/// cache: a few system calls, fine on an async worker. `None` when there is none (or it does
/// not load: it is removed, to be compiled again).
pub(crate) fn cached(
    engine: &Engine,
    cache: &ArtifactCache,
    digest: &str,
    tag: &str,
) -> Option<Module> {
    let path = cache.derived_path(digest, tag)?;
    if !path.exists() {
        return None;
    }
    match deserialize_file(engine, &path) {
        Ok(module) => {
            cache.touch(&path);
            Some(module)
        }
        Err(error) => {
            tracing::debug!(path = %path.display(), %error, "compiling again: the cached module does not load");
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// Compiles the binary at `binary` (pinned as `digest`) and keeps the code beside it for
/// [`cached`]. Blocking and slow: call it off the async workers.
pub(crate) fn compile(
    engine: &Engine,
    cache: &ArtifactCache,
    digest: &str,
    tag: &str,
    binary: &Path,
) -> Result<Module, LoadError> {
    let bytes = std::fs::read(binary).map_err(|e| {
        LoadError::with_source(
            LoadErrorKind::Storage,
            format!("cannot read the module {}", binary.display()),
            e,
        )
    })?;
    let compiled = engine.precompile_module(&bytes).map_err(|e| {
        LoadError::new(
            LoadErrorKind::Invalid,
            format!("the module does not compile: {e:#}"),
        )
    })?;
    if let Some(path) = cache.derived_path(digest, tag) {
        match keep(cache, &path, &compiled) {
            Ok(()) => {
                if let Ok(module) = deserialize_file(engine, &path) {
                    return Ok(module);
                }
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "the compiled module is not kept on disk; it is compiled again after a restart");
            }
        }
    }
    deserialize(engine, &compiled)
}

/// Writes the compiled bytes beside the binary: to a partial file first, so a crash leaves
/// nothing half-written under the final name.
fn keep(cache: &ArtifactCache, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("module");
    let partial = path.with_file_name(format!(".partial-{name}-{}", std::process::id()));
    let written = std::fs::write(&partial, compiled).and_then(|()| std::fs::rename(&partial, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    cache.admit(path);
    Ok(())
}

/// The suffix of this engine's compiled files: what distinguishes its code from another's
/// (wasmtime version, target, settings), so a runtime upgrade compiles afresh instead of
/// failing to load.
pub(crate) fn engine_tag(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("cwasm-{:016x}", hasher.finish())
}

#[allow(unsafe_code)]
fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime runs the deserialized bytes as native code; this file is one this
    // runtime wrote from `Engine::precompile_module` into its own cache directory, where the
    // plugin binaries it runs natively live too (the same trust), and wasmtime checks its
    // header against the engine before using it.
    unsafe { Module::deserialize_file(engine, path) }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, compiled: &[u8]) -> Result<Module, LoadError> {
    // SAFETY: the bytes come from `Engine::precompile_module` of this engine, just now.
    unsafe { Module::deserialize(engine, compiled) }.map_err(|e| {
        LoadError::new(
            LoadErrorKind::Invalid,
            format!("the compiled module does not load: {e:#}"),
        )
    })
}
