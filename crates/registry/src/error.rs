//! What each registry operation can fail with, and the invocation protocol's answer to it.

use mycelium_core::{Error, ErrorCode, FunctionMetadata, FunctionName, ProtocolError};

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

/// Why a trigger could not be stored or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerErrorKind {
    /// No trigger of that name.
    NotFound,
    /// The store failed.
    Storage,
}

/// A failed trigger write.
pub type TriggerError = Error<TriggerErrorKind>;

/// The error for an unknown trigger.
pub fn trigger_not_found(name: &FunctionName) -> TriggerError {
    TriggerError::new(
        TriggerErrorKind::NotFound,
        format!("no trigger named \"{name}\"; `mycelium trigger list` shows them"),
    )
}

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
