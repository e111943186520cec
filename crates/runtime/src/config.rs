//! Runtime settings and their defaults.

use std::time::Duration;

/// How a runtime behaves. Every field has a production default ([`RuntimeConfig::default`]).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// First token of every subject: `<prefix>.invoke`, `<prefix>.list`, ...
    pub subject_prefix: String,
    /// Queue group shared by all runtime instances, so each request reaches one of them.
    pub queue_group: String,
    /// Name under which the runtime registers with the NATS services API.
    pub service_name: String,
    /// Invocations executing at once on this instance; beyond it requests get `overloaded`.
    pub max_in_flight: usize,
    /// Invocations of one function version executing at once on this instance, for functions
    /// that set no `maxConcurrency` of their own; beyond it that function's requests get
    /// `overloaded`, so one function's flood cannot take every in-flight slot.
    pub max_concurrency: usize,
    /// Largest accepted request body, in bytes; beyond it requests get `payload_too_large`.
    pub max_payload: usize,
    /// Timeout of functions whose metadata sets none.
    pub default_timeout: Duration,
    /// On shutdown, how long in-flight invocations may take to finish before they are cancelled.
    pub shutdown_grace: Duration,
    /// Start plugin processes when a version becomes active, before its first call.
    pub prestart_plugins: bool,
    /// Asynchronous invocation (`<prefix>.async.<name>` through JetStream).
    pub asynchronous: crate::AsyncConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            subject_prefix: mycelium_core::subjects::DEFAULT_PREFIX.into(),
            queue_group: "mycelium".into(),
            service_name: mycelium_core::subjects::DEFAULT_SERVICE_NAME.into(),
            max_in_flight: 1024,
            max_concurrency: 256,
            max_payload: 1024 * 1024,
            default_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            prestart_plugins: true,
            asynchronous: crate::AsyncConfig::default(),
        }
    }
}
