//! The invocation protocol's stable error codes, the wire error body, and the
//! `Error<Kind>` shape every Mycelium library error takes.

use std::{borrow::Cow, fmt};

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code of the invocation protocol.
///
/// The snake_case text (`function_not_found`, ...) is part of the wire contract: callers in
/// any language branch on it. New codes may be added; decoders map codes they do not know
/// to [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is not JSON, has fields of the wrong type, or lacks a required field.
    InvalidRequest,
    /// The CloudEvent is malformed or lacks `id`, `source` or `type`.
    InvalidEvent,
    /// The function name breaks the naming rules.
    InvalidFunctionName,
    /// No function of that name is registered.
    FunctionNotFound,
    /// The function exists but not in the requested version.
    VersionNotFound,
    /// The request (or the reply) is larger than the configured limit.
    PayloadTooLarge,
    /// The function did not finish within its timeout.
    Timeout,
    /// The function returned an error or panicked.
    FunctionError,
    /// The runtime is at its limit of invocations in flight; retry with backoff.
    Overloaded,
    /// The runtime cannot run the function now (shutting down, executor missing).
    Unavailable,
    /// A fault inside Mycelium itself.
    Internal,
    /// A function's stored binary does not match the digest its metadata pins; it was not run.
    ArtifactCorrupt,
    /// The plugin process could not be started (bad binary, bad handshake, no health).
    PluginStartFailed,
    /// The plugin process died during the call; the next call starts a new one.
    PluginCrashed,
    /// The runtime trusts only signed binaries and this one is unsigned or signed by a key it
    /// does not trust; it was not run.
    ArtifactUntrusted,
    /// The WebAssembly module cannot run here (it does not compile, exports no `_start`, or
    /// imports what the runtime does not provide); it was not run.
    ModuleInvalid,
    /// A secret the function names is missing, or this runtime cannot open it (no key, another
    /// key, a tampered value); the function was not run. The message names the secret, never
    /// its value.
    SecretUnavailable,
    /// A code this version of Mycelium does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 18] = [
        Self::InvalidRequest,
        Self::InvalidEvent,
        Self::InvalidFunctionName,
        Self::FunctionNotFound,
        Self::VersionNotFound,
        Self::PayloadTooLarge,
        Self::Timeout,
        Self::FunctionError,
        Self::Overloaded,
        Self::Unavailable,
        Self::Internal,
        Self::ArtifactCorrupt,
        Self::PluginStartFailed,
        Self::PluginCrashed,
        Self::ArtifactUntrusted,
        Self::ModuleInvalid,
        Self::SecretUnavailable,
        Self::Unknown,
    ];

    /// The wire text of the code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidEvent => "invalid_event",
            Self::InvalidFunctionName => "invalid_function_name",
            Self::FunctionNotFound => "function_not_found",
            Self::VersionNotFound => "version_not_found",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Timeout => "timeout",
            Self::FunctionError => "function_error",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::ArtifactCorrupt => "artifact_corrupt",
            Self::PluginStartFailed => "plugin_start_failed",
            Self::PluginCrashed => "plugin_crashed",
            Self::ArtifactUntrusted => "artifact_untrusted",
            Self::ModuleInvalid => "module_invalid",
            Self::SecretUnavailable => "secret_unavailable",
            Self::Unknown => "unknown",
        }
    }

    /// The HTTP-like status sent in the `Nats-Service-Error-Code` header.
    pub const fn status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::InvalidEvent | Self::InvalidFunctionName => 400,
            Self::FunctionNotFound | Self::VersionNotFound => 404,
            Self::PayloadTooLarge => 413,
            Self::ArtifactUntrusted => 403,
            Self::Overloaded => 429,
            Self::Timeout => 504,
            Self::Unavailable | Self::SecretUnavailable => 503,
            Self::PluginStartFailed | Self::PluginCrashed | Self::ModuleInvalid => 502,
            Self::FunctionError | Self::Internal | Self::ArtifactCorrupt | Self::Unknown => 500,
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Overloaded | Self::Unavailable | Self::Timeout | Self::PluginCrashed
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .unwrap_or(Self::Unknown))
    }
}

/// A failed invocation as it travels on the wire:
/// `{"error": {"code": "<code>", "message": "<what happened and what to do>"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    /// The stable code.
    pub code: ErrorCode,
    /// What happened and what to do about it, for people.
    pub message: String,
}

impl ProtocolError {
    /// A new error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of Mycelium's libraries, in the style of async-nats's `Error<Kind>`:
/// a small, matchable `kind` per operation, a message for people, and the source kept.
pub struct Error<K> {
    kind: K,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl<K: Clone> Error<K> {
    /// An error of `kind` with a message.
    pub fn new(kind: K, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(
        kind: K,
        message: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> K {
        self.kind.clone()
    }

    /// The message for people, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<K: fmt::Debug> fmt::Debug for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

/// `{}` prints the message only, so that a printer walking [`std::error::Error::source`]
/// does not print a cause twice; `{:#}` prints the message and every cause, as [`Chain`] does.
impl<K> fmt::Display for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if f.alternate() {
            if let Some(source) = &self.source {
                write!(f, ": {}", Chain(source.as_ref()))?;
            }
        }
        Ok(())
    }
}

/// An error and all its causes on one line, `message: cause: cause`.
///
/// Errors of other crates (async-nats among them) print their own cause in their `Display`;
/// a cause the text printed so far already ends with is not printed again.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !previous.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            previous = text;
            source = cause.source();
        }
        Ok(())
    }
}

impl<K: fmt::Debug> std::error::Error for Error<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_text_and_json() {
        for code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), code);
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"from_the_future\"").unwrap(),
            ErrorCode::Unknown
        );
    }

    #[test]
    fn protocol_error_wire_shape() {
        let err = ProtocolError::new(ErrorCode::FunctionNotFound, "no function \"x\"");
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            serde_json::json!({"code": "function_not_found", "message": "no function \"x\""})
        );
    }

    #[test]
    fn error_displays_message_alone_and_chain_in_full() {
        #[derive(Debug, Clone)]
        enum Kind {
            Io,
        }
        let err = Error::with_source(Kind::Io, "reading config", std::io::Error::other("disk"));
        assert_eq!(err.to_string(), "reading config");
        assert_eq!(format!("{err:#}"), "reading config: disk");
        assert_eq!(Chain(&err).to_string(), "reading config: disk");
        assert!(matches!(err.kind(), Kind::Io));
        assert!(std::error::Error::source(&err).is_some());
        let outer = Error::with_source(Kind::Io, "starting", err);
        assert_eq!(format!("{outer:#}"), "starting: reading config: disk");
        assert_eq!(Chain(&outer).to_string(), "starting: reading config: disk");
    }
}
