//! The [`Function`] trait and what an invocation hands to it.

use std::{future::Future, sync::Arc, time::Instant};

use cloudevents::Event;
use tokio_util::sync::CancellationToken;

use crate::{trace::TraceContext, FunctionName};

/// A serverless function: takes one CloudEvent, returns zero or more.
///
/// Built-in functions implement it in-process; plugin processes implement it behind
/// go-plugin's gRPC protocol, and the runtime sees both through this one trait.
///
/// An implementation should watch [`InvocationContext::cancelled`] (or the deadline) in
/// long-running work: once the invocation times out or the runtime shuts down, its result
/// is discarded.
///
/// ```
/// use mycelium_core::{Event, Function, FunctionError, InvocationContext};
///
/// struct Greeter;
///
/// #[async_trait::async_trait]
/// impl Function for Greeter {
///     async fn execute(&self, event: Event, ctx: InvocationContext) -> Result<Vec<Event>, FunctionError> {
///         tracing::info!(parent: ctx.span(), "greeting");
///         Ok(vec![event])
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Function: Send + Sync + 'static {
    /// Handles one event.
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError>;
}

/// An error a function returns. The runtime answers it with its code (`function_error`
/// unless the function chose another) and this message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FunctionError {
    code: crate::ErrorCode,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl FunctionError {
    /// An error with a message for the caller.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            code: crate::ErrorCode::FunctionError,
            message: message.into(),
            source: None,
        }
    }

    /// An error answered with a specific protocol code (`invalid_event`, `unavailable`,
    /// or, for executors, `timeout`, `plugin_crashed`, ...).
    pub fn with_code(code: crate::ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// The protocol code the runtime answers with.
    pub fn code(&self) -> crate::ErrorCode {
        self.code
    }

    /// An error with a message for the caller and the cause kept for logs.
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            code: crate::ErrorCode::FunctionError,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The message for the caller.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// What a function knows about the invocation it serves. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InvocationContext {
    inner: Arc<ContextInner>,
    cancellation: CancellationToken,
    span: tracing::Span,
}

#[derive(Debug, Clone)]
struct ContextInner {
    function: FunctionName,
    version: u64,
    invocation_id: String,
    deadline: Instant,
    trace: Option<TraceContext>,
}

impl InvocationContext {
    /// A context for one invocation of `function` at `version`.
    pub fn new(
        function: FunctionName,
        version: u64,
        invocation_id: impl Into<String>,
        deadline: Instant,
        cancellation: CancellationToken,
        span: tracing::Span,
    ) -> Self {
        Self {
            inner: Arc::new(ContextInner {
                function,
                version,
                invocation_id: invocation_id.into(),
                deadline,
                trace: None,
            }),
            cancellation,
            span,
        }
    }

    /// The function being invoked.
    pub fn function(&self) -> &FunctionName {
        &self.inner.function
    }

    /// The version being invoked.
    pub fn version(&self) -> u64 {
        self.inner.version
    }

    /// Unique id of this invocation (not the event id), for logs and traces.
    pub fn invocation_id(&self) -> &str {
        &self.inner.invocation_id
    }

    /// When the caller stops waiting; work past it is wasted.
    pub fn deadline(&self) -> Instant {
        self.inner.deadline
    }

    /// Fires when the invocation is abandoned: timeout or runtime shutdown.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation
    }

    /// Resolves when the invocation is abandoned.
    pub async fn cancelled(&self) {
        self.cancellation.cancelled().await
    }

    /// The span of this invocation (carries function name and invocation id).
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The W3C trace context this invocation runs in: hand it on (as a `traceparent` header)
    /// to whatever the function calls, so those calls join the caller's trace.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.inner.trace.as_ref()
    }

    /// The same context, running in `trace`.
    pub fn with_trace(mut self, trace: Option<TraceContext>) -> Self {
        Arc::make_mut(&mut self.inner).trace = trace;
        self
    }
}

/// Wraps an async closure as a [`Function`].
///
/// ```
/// use mycelium_core::{from_fn, Function};
/// let echo = from_fn(|event, _ctx| async move { Ok(vec![event]) });
/// # fn is_function(_: &impl Function) {}
/// # is_function(&echo);
/// ```
pub fn from_fn<F, Fut>(f: F) -> FnFunction<F>
where
    F: Fn(Event, InvocationContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Event>, FunctionError>> + Send + 'static,
{
    FnFunction(f)
}

/// A [`Function`] made from a closure by [`from_fn`].
pub struct FnFunction<F>(F);

#[async_trait::async_trait]
impl<F, Fut> Function for FnFunction<F>
where
    F: Fn(Event, InvocationContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Event>, FunctionError>> + Send + 'static,
{
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        (self.0)(event, ctx).await
    }
}
