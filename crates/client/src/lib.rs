//! Invoke and discover Mycelium functions over NATS.
//!
//! ```no_run
//! use mycelium_client::{Client, ConnectOptions};
//! use mycelium_core::cloudevents::{EventBuilder, EventBuilderV10};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ConnectOptions::new("nats://127.0.0.1:4222").connect().await?;
//! let event = EventBuilderV10::new()
//!     .id("123")
//!     .source("docs")
//!     .ty("com.example.test")
//!     .data("application/json", serde_json::json!({"key": "value"}))
//!     .build()?;
//! let events = client.invoke("example", event).await?;
//! println!("{}", events[0]);
//! for function in client.list().await? {
//!     println!("{} v{}", function.name, function.version);
//! }
//! # Ok(())
//! # }
//! ```

mod asynchronous;
mod logs;
mod triggers;

pub use async_nats;
pub use asynchronous::{Acceptance, AsyncError, AsyncErrorKind, StoredDeadLetter, SubmitOptions};
pub use logs::{FunctionLog, LogLine, LogsError, LogsErrorKind, LogsOptions};
pub use mycelium_core::asynchronous::AsyncQueueStats;
pub use mycelium_core::trigger::{Deliver, Trigger, TriggerSource};
pub use mycelium_registry::{
    ArtifactSource, DeleteErrorKind, DeployError, DeployErrorKind, DeploySpec, NatsRegistry,
    NatsRegistryConfig, OpenErrorKind, Registry, RegistryAdmin, RollbackErrorKind, RuntimeKey,
    SecretError, SecretErrorKind, SecretInfo, SecretStore, SigningKey, Versions,
};
pub use triggers::{trigger_consumer, TriggerOpError, TriggerOpErrorKind};

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use mycelium_core::{
    envelope::{self, DescribeRequest, ListReply},
    jitter::random_u64,
    trace::{TRACEPARENT, TRACESTATE},
    Error, ErrorCode, Event, FunctionMetadata, FunctionName, FunctionSummary, ProtocolError,
};
pub use mycelium_core::{TraceBridge, TraceContext};

/// How long [`Client::invoke`] lets a function run unless told otherwise.
pub const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long discovery requests wait.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time the client waits beyond a function's timeout, so that the runtime's own
/// `timeout` error arrives before the client gives up.
const REPLY_MARGIN: Duration = Duration::from_secs(2);

/// Why connecting failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// The credentials file could not be read.
    Credentials,
    /// The NATS server could not be reached or refused us.
    Connect,
}

/// A failed [`ConnectOptions::connect`].
pub type ConnectError = Error<ConnectErrorKind>;

/// Why a request (invoke, list, describe) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// The runtime answered with this protocol error code; the message says more.
    Remote(ErrorCode),
    /// The function name is invalid; nothing was sent.
    InvalidName,
    /// No runtime is listening on the subject.
    NoResponders,
    /// No reply arrived in time.
    TimedOut,
    /// Sending the request failed (connection trouble).
    Transport,
    /// A reply arrived but is not a Mycelium reply.
    InvalidReply,
}

/// A failed [`Client`] request.
pub type RequestError = Error<RequestErrorKind>;

/// The protocol error code behind a request error, if the runtime sent one.
pub fn remote_code(error: &RequestError) -> Option<ErrorCode> {
    match error.kind() {
        RequestErrorKind::Remote(code) => Some(code),
        _ => None,
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// NATS server URL(s), comma-separated.
    pub url: String,
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// Authentication token.
    pub token: Option<String>,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU...`) to authenticate with.
    pub nkey_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for TLS.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (PEM files), for servers that verify clients.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// Connection name shown in NATS monitoring.
    pub name: String,
    /// First token of the Mycelium subjects.
    pub subject_prefix: String,
    /// Where the JetStream registry lives (for deploy, versions, rollback, delete).
    pub registry: NatsRegistryConfig,
    /// Retry invocations (off by default; see [`RetryPolicy`]).
    pub retry: Option<RetryPolicy>,
}

impl ConnectOptions {
    /// Options for `url` with defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            user_password: None,
            token: None,
            credentials_file: None,
            nkey_file: None,
            tls_ca: None,
            tls_client_cert: None,
            name: "mycelium-client".into(),
            subject_prefix: "function".into(),
            registry: NatsRegistryConfig::default(),
            retry: None,
        }
    }

    /// Connects and returns the raw NATS client, for the runtime or other uses.
    /// Reconnects are automatic and logged.
    pub async fn connect_nats(&self) -> Result<async_nats::Client, ConnectError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(&self.name)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from NATS; reconnecting")
                    }
                    other => tracing::debug!(event = %other, "NATS connection event"),
                }
            });
        if let Some(path) = &self.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                ConnectError::with_source(
                    ConnectErrorKind::Credentials,
                    format!("reading the credentials file {}", path.display()),
                    e,
                )
            })?;
        }
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                ConnectError::with_source(
                    ConnectErrorKind::Credentials,
                    format!("reading the NKey seed file {}", path.display()),
                    e,
                )
            })?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.tls_client_cert {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        let urls: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let addrs: Result<Vec<async_nats::ServerAddr>, _> =
            urls.iter().map(|u| u.parse()).collect();
        let addrs = addrs.map_err(|e| {
            ConnectError::with_source(
                ConnectErrorKind::Connect,
                format!("{:?} is not a NATS URL", redact_url(&self.url)),
                e,
            )
        })?;
        options.connect(addrs).await.map_err(|e| {
            ConnectError::with_source(
                ConnectErrorKind::Connect,
                format!(
                    "cannot connect to NATS at {}; is a server running? (`mycelium up` starts one)",
                    redact_url(&self.url)
                ),
                e,
            )
        })
    }

    /// Connects and returns a Mycelium [`Client`].
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let nats = self.connect_nats().await?;
        let client = Client::new(nats)
            .with_subject_prefix(&self.subject_prefix)
            .with_registry_config(self.registry.clone());
        Ok(match &self.retry {
            Some(policy) => client.with_retry(policy.clone()),
            None => client,
        })
    }
}

/// The URL(s) with any `user:password@` or `token@` replaced by `***@`, for messages and logs.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            (None, Some(at)) => format!("***{}", &url[at..]),
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Per-call options of [`Client::invoke_with`].
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Run this version instead of the active one.
    pub version: Option<u64>,
    /// Let the function run at most this long (default [`DEFAULT_INVOKE_TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// Continue this W3C trace. Without it the client continues the current span's trace
    /// (through its [`TraceBridge`], see [`Client::with_tracing`]) or starts a new one.
    pub trace: Option<TraceContext>,
}

/// A new trace: random non-zero ids, sampled.
fn new_trace() -> TraceContext {
    let trace_id = (u128::from(random_u64() | 1) << 64) | u128::from(random_u64());
    TraceContext::from_ids(trace_id, random_u64() | 1, true, None)
}

/// Opt-in retries of invocations ([`Client::with_retry`]).
///
/// Retried: no runtime listening (`NoResponders`), `unavailable` (a runtime shutting down),
/// `overloaded`, a request that could not be sent, and, with `retry_timeouts`, a request that
/// got no reply in time. Every attempt carries the same invocation id
/// ([`envelope::INVOCATION_ID_HEADER`], the function's `ctx.invocation_id()`).
///
/// **At least once.** An `unavailable` or `overloaded` reply means the function did not run,
/// but a timeout does not: the first attempt may still be running, or have finished with its
/// reply lost (its runtime was killed), when the retry runs. Functions with side effects
/// de-duplicate on the invocation id.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retry).
    pub attempts: u32,
    /// The wait before the first retry; it doubles with each retry, up to `max_backoff`, and
    /// each wait is drawn at random below that bound ("full jitter").
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// Also retry an attempt that got no reply within `attempt_timeout`.
    pub retry_timeouts: bool,
    /// With `retry_timeouts`: how long each attempt waits for its reply (default: the
    /// invocation's timeout).
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            retry_timeouts: false,
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// Whether `error` is worth another attempt under this policy.
    pub fn is_retriable(&self, error: &RequestError) -> bool {
        match error.kind() {
            RequestErrorKind::NoResponders | RequestErrorKind::Transport => true,
            RequestErrorKind::Remote(code) => {
                matches!(code, ErrorCode::Unavailable | ErrorCode::Overloaded)
            }
            RequestErrorKind::TimedOut => self.retry_timeouts,
            RequestErrorKind::InvalidName | RequestErrorKind::InvalidReply => false,
        }
    }

    /// The wait before retry number `retry` (1 for the first), with full jitter.
    fn backoff(&self, retry: u32) -> Duration {
        let bound = self
            .initial_backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random_u64() % nanos.max(1))
    }
}

/// Invokes and discovers functions. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    subjects: mycelium_core::Subjects,
    registry_config: NatsRegistryConfig,
    registry: std::sync::Arc<tokio::sync::OnceCell<std::sync::Arc<NatsRegistry>>>,
    tracing: std::sync::Arc<dyn TraceBridge>,
    retry: Option<RetryPolicy>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("invoke_subject", &self.subjects.invoke)
            .field("registry", &self.registry_config)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client on an existing NATS connection, with the default subject prefix.
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            nats,
            subjects: mycelium_core::Subjects::default(),
            registry_config: NatsRegistryConfig::default(),
            registry: Default::default(),
            tracing: std::sync::Arc::new(mycelium_core::trace::PassThrough),
            retry: None,
        }
    }

    /// Retries invocations that failed in a retriable way (see [`RetryPolicy`], and its
    /// at-least-once consequence). Off by default.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Continues the current span's trace through `bridge` (for example
    /// `mycelium_observability::OtelBridge`) when an invocation has no explicit trace.
    pub fn with_tracing(mut self, bridge: std::sync::Arc<dyn TraceBridge>) -> Self {
        self.tracing = bridge;
        self
    }

    /// Uses these buckets and limits for the registry operations.
    pub fn with_registry_config(mut self, config: NatsRegistryConfig) -> Self {
        self.registry_config = config;
        self.registry = Default::default();
        self
    }

    /// The JetStream registry, opened on first use (creating its buckets if needed): deploy,
    /// versions, rollback and delete go through it, straight to JetStream.
    ///
    /// ```no_run
    /// use mycelium_client::{ArtifactSource, ConnectOptions, DeploySpec, RegistryAdmin};
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = ConnectOptions::new("nats://127.0.0.1:4222").connect().await?;
    /// let registry = client.registry().await?;
    /// let spec = DeploySpec::plugin("resize".parse()?, ArtifactSource::File("target/release/resize".into()));
    /// let deployed = registry.deploy(spec).await?;
    /// registry.rollback(&deployed.name, 1).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn registry(
        &self,
    ) -> Result<std::sync::Arc<NatsRegistry>, mycelium_registry::OpenError> {
        self.registry
            .get_or_try_init(|| async {
                NatsRegistry::open(self.nats.clone(), self.registry_config.clone())
                    .await
                    .map(std::sync::Arc::new)
            })
            .await
            .cloned()
    }

    /// The secrets bucket (created on first use): `set` seals a value for the runtimes'
    /// public xkey before it leaves this process; `list` shows names and versions only.
    pub async fn secrets(&self) -> Result<SecretStore, SecretError> {
        SecretStore::open(
            self.nats.clone(),
            &self.registry_config.secrets_bucket,
            self.registry_config.replicas,
        )
        .await
    }

    /// Uses `prefix` instead of `function` for all subjects.
    pub fn with_subject_prefix(mut self, prefix: &str) -> Self {
        self.subjects = mycelium_core::Subjects::new(prefix);
        self
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Invokes the active version of `function` with `event` and returns its events.
    pub async fn invoke(&self, function: &str, event: Event) -> Result<Vec<Event>, RequestError> {
        self.invoke_with(function, &event, InvokeOptions::default())
            .await
    }

    /// Invokes `function` with per-call options.
    pub async fn invoke_with(
        &self,
        function: &str,
        event: &Event,
        options: InvokeOptions,
    ) -> Result<Vec<Event>, RequestError> {
        let name = FunctionName::new(function)
            .map_err(|e| RequestError::new(RequestErrorKind::InvalidName, e.to_string()))?;
        let timeout = options.timeout.unwrap_or(DEFAULT_INVOKE_TIMEOUT);
        let trace = options
            .trace
            .or_else(|| self.tracing.current())
            .unwrap_or_else(new_trace);
        tracing::debug!(trace_id = trace.trace_id(), function, "invoking");
        // The event carries the context too (CloudEvents distributed-tracing extension), unless
        // it already records where it was created.
        let body = if event.extension(TRACEPARENT).is_some() {
            envelope::encode_invoke_request(&name, event, options.version, Some(timeout))
        } else {
            let mut traced = event.clone();
            traced.set_extension(TRACEPARENT, trace.traceparent());
            if let Some(state) = trace.tracestate() {
                traced.set_extension(TRACESTATE, state);
            }
            envelope::encode_invoke_request(&name, &traced, options.version, Some(timeout))
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(TRACEPARENT, trace.traceparent());
        if let Some(state) = trace.tracestate() {
            headers.insert(TRACESTATE, state);
        }
        headers.insert(
            envelope::INVOCATION_ID_HEADER,
            nuid::next().to_string().as_str(),
        );
        let body = Bytes::from(body);
        let Some(policy) = &self.retry else {
            return self
                .invoke_once(body, headers, timeout + REPLY_MARGIN)
                .await;
        };
        let wait = match policy.attempt_timeout {
            Some(limit) if policy.retry_timeouts => limit,
            _ => timeout + REPLY_MARGIN,
        };
        let mut attempt = 1;
        loop {
            match self.invoke_once(body.clone(), headers.clone(), wait).await {
                Err(error) if attempt < policy.attempts.max(1) && policy.is_retriable(&error) => {
                    tracing::debug!(%error, attempt, function, "retrying the invocation");
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn invoke_once(
        &self,
        body: Bytes,
        headers: async_nats::HeaderMap,
        wait: Duration,
    ) -> Result<Vec<Event>, RequestError> {
        let reply = self
            .request_with_headers(&self.subjects.invoke, body, Some(headers), wait)
            .await?;
        match envelope::decode_invoke_reply(&reply.payload) {
            Ok(Ok(events)) => Ok(events),
            Ok(Err(error)) => Err(remote(error)),
            Err(problem) => Err(invalid_reply(&reply, problem)),
        }
    }

    /// Lists every function at its active version.
    pub async fn list(&self) -> Result<Vec<FunctionSummary>, RequestError> {
        let reply = self
            .request(&self.subjects.list, Bytes::new(), DEFAULT_REQUEST_TIMEOUT)
            .await?;
        match envelope::decode_reply::<ListReply>(&reply.payload) {
            Ok(Ok(list)) => Ok(list.functions),
            Ok(Err(error)) => Err(remote(error)),
            Err(problem) => Err(invalid_reply(&reply, problem)),
        }
    }

    /// The metadata of `function` (its active version, or `version`).
    pub async fn describe(
        &self,
        function: &str,
        version: Option<u64>,
    ) -> Result<FunctionMetadata, RequestError> {
        let name = FunctionName::new(function)
            .map_err(|e| RequestError::new(RequestErrorKind::InvalidName, e.to_string()))?;
        let body = Bytes::from(envelope::encode_describe_request(&DescribeRequest {
            function_name: name.to_string(),
            version,
        }));
        let reply = self
            .request(&self.subjects.describe, body, DEFAULT_REQUEST_TIMEOUT)
            .await?;
        match envelope::decode_reply::<FunctionMetadata>(&reply.payload) {
            Ok(Ok(metadata)) => Ok(metadata),
            Ok(Err(error)) => Err(remote(error)),
            Err(problem) => Err(invalid_reply(&reply, problem)),
        }
    }

    async fn request(
        &self,
        subject: &str,
        body: Bytes,
        wait: Duration,
    ) -> Result<async_nats::Message, RequestError> {
        self.request_with_headers(subject, body, None, wait).await
    }

    async fn request_with_headers(
        &self,
        subject: &str,
        body: Bytes,
        headers: Option<async_nats::HeaderMap>,
        wait: Duration,
    ) -> Result<async_nats::Message, RequestError> {
        let mut request = async_nats::Request::new().payload(body).timeout(Some(wait));
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        self.nats
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|e| {
                use async_nats::RequestErrorKind as Nats;
                match e.kind() {
                    Nats::NoResponders => RequestError::new(
                        RequestErrorKind::NoResponders,
                        format!("no Mycelium runtime is listening on {subject}; start one with `mycelium up` or `mycelium serve`"),
                    ),
                    Nats::TimedOut => RequestError::new(
                        RequestErrorKind::TimedOut,
                        format!("no reply on {subject} within {} ms", wait.as_millis()),
                    ),
                    Nats::MaxPayloadExceeded => RequestError::with_source(
                        RequestErrorKind::Remote(ErrorCode::PayloadTooLarge),
                        "the request is larger than the NATS server's max_payload",
                        e,
                    ),
                    _ => RequestError::with_source(RequestErrorKind::Transport, format!("request on {subject} failed"), e),
                }
            })
    }
}

/// Per-function figures summed over every runtime instance that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStats {
    /// Runtime instances that answered.
    pub instances: usize,
    /// One row per function, sorted by name.
    pub functions: Vec<mycelium_core::FunctionStats>,
    /// One row per trigger, sorted by name: counts summed over the instances, the largest lag
    /// and the latest firing.
    pub triggers: Vec<mycelium_core::trigger::TriggerStats>,
}

impl Client {
    /// Gathers `$SRV.STATS` from every runtime instance serving this client's subjects
    /// (whatever service name it registered under) and sums the per-function figures. Waits
    /// up to `wait` for the first answer and a moment for the rest.
    pub async fn stats(&self, wait: Duration) -> Result<ClusterStats, RequestError> {
        use futures_util::StreamExt;
        let transport = |e: &dyn std::fmt::Display| {
            RequestError::new(RequestErrorKind::Transport, format!("gathering stats: {e}"))
        };
        let inbox = self.nats.new_inbox();
        let mut replies = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| transport(&e))?;
        self.nats
            .publish_with_reply("$SRV.STATS", inbox, Bytes::new())
            .await
            .map_err(|e| transport(&e))?;
        let mut per_function: std::collections::BTreeMap<String, mycelium_core::FunctionStats> =
            Default::default();
        let mut per_trigger = std::collections::BTreeMap::new();
        let mut instances = 0;
        let mut limit = wait;
        while let Ok(Some(reply)) = tokio::time::timeout(limit, replies.next()).await {
            // After the first answer, the others arrive within moments.
            limit = Duration::from_millis(250);
            let Ok(stats) = serde_json::from_slice::<async_nats::service::Stats>(&reply.payload)
            else {
                continue;
            };
            // Other services on this NATS answer too: a runtime is one with our invoke subject.
            let Some(invoke) = stats
                .endpoints
                .iter()
                .find(|e| e.subject == self.subjects.invoke)
            else {
                continue;
            };
            instances += 1;
            let data = invoke
                .data
                .clone()
                .and_then(|data| {
                    serde_json::from_value::<mycelium_core::subjects::InvokeEndpointData>(data).ok()
                })
                .unwrap_or_default();
            for row in data.triggers {
                per_trigger
                    .entry(row.trigger.clone())
                    .and_modify(|sum: &mut mycelium_core::trigger::TriggerStats| sum.merge(&row))
                    .or_insert(row);
            }
            for row in data.functions {
                let sum = per_function.entry(row.function.clone()).or_insert_with(|| {
                    mycelium_core::FunctionStats {
                        function: row.function.clone(),
                        ..Default::default()
                    }
                });
                sum.merge(&row);
            }
        }
        if instances == 0 {
            return Err(RequestError::new(
                RequestErrorKind::NoResponders,
                format!(
                    "no Mycelium runtime serving {} answered $SRV.STATS; start one with `mycelium up` or `mycelium serve`",
                    self.subjects.invoke
                ),
            ));
        }
        Ok(ClusterStats {
            instances,
            functions: per_function.into_values().collect(),
            triggers: per_trigger.into_values().collect(),
        })
    }
}

fn remote(error: ProtocolError) -> RequestError {
    RequestError::new(RequestErrorKind::Remote(error.code), error.message)
}

fn invalid_reply(reply: &async_nats::Message, problem: String) -> RequestError {
    // A service error without a Mycelium body (another responder on our subject).
    if let Some(headers) = &reply.headers {
        if let Some(text) = headers.get(envelope::SERVICE_ERROR_HEADER) {
            return RequestError::new(
                RequestErrorKind::Remote(ErrorCode::Unknown),
                text.to_string(),
            );
        }
    }
    RequestError::new(RequestErrorKind::InvalidReply, problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redact_url("nats://alice:s3cret@h1:4222, tls://t0ken@h2,nats://h3"),
            "nats://***@h1:4222, tls://***@h2,nats://h3"
        );
        assert_eq!(redact_url("alice:pw@host:4222"), "***@host:4222");
    }

    #[test]
    fn retries_only_what_did_not_run_unless_told() {
        let policy = RetryPolicy::default();
        let error = |kind| RequestError::new(kind, "x");
        for kind in [
            RequestErrorKind::NoResponders,
            RequestErrorKind::Transport,
            RequestErrorKind::Remote(ErrorCode::Unavailable),
            RequestErrorKind::Remote(ErrorCode::Overloaded),
        ] {
            assert!(policy.is_retriable(&error(kind)), "{kind:?}");
        }
        for kind in [
            RequestErrorKind::TimedOut,
            RequestErrorKind::InvalidName,
            RequestErrorKind::InvalidReply,
            RequestErrorKind::Remote(ErrorCode::FunctionError),
            RequestErrorKind::Remote(ErrorCode::Timeout),
            RequestErrorKind::Remote(ErrorCode::InvalidEvent),
        ] {
            assert!(!policy.is_retriable(&error(kind)), "{kind:?}");
        }
        let timeouts = RetryPolicy {
            retry_timeouts: true,
            ..RetryPolicy::default()
        };
        assert!(timeouts.is_retriable(&error(RequestErrorKind::TimedOut)));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_below_it() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        };
        for _ in 0..200 {
            assert!(policy.backoff(1) < Duration::from_millis(10));
            assert!(policy.backoff(2) < Duration::from_millis(20));
            assert!(policy.backoff(30) < Duration::from_millis(50));
        }
        let spread: std::collections::HashSet<Duration> =
            (0..50).map(|_| policy.backoff(3)).collect();
        assert!(spread.len() > 10, "jitter spreads the waits");
    }
}
