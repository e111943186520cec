//! Mycelium's core vocabulary, shared by the runtime, the client, plugins and the CLI.
//!
//! This crate does no I/O: it knows neither NATS nor processes nor files. It defines
//! - the [`Function`] trait every function implements, with its [`InvocationContext`];
//! - [`FunctionName`], the validated name that becomes a NATS subject token and a KV key;
//! - the wire contract in [`envelope`]: request decoding and reply encoding, exactly as
//!   other NATS clients see them;
//! - the stable [`ErrorCode`]s of the invocation protocol and the [`ProtocolError`] body;
//! - [`FunctionMetadata`], the record a registry keeps per function version;
//! - the [`MetricsCollector`] seam and an in-memory collector;
//! - W3C [`TraceContext`] and the [`TraceBridge`] seam to a tracing backend;
//! - the contract of [`asynchronous`] invocation: streams, headers, retry settings, dead letters;
//! - event [`trigger`]s: what makes a function run without a caller;
//! - [`secret`]s as functions see them: names, references, the opened values of one function.

pub mod asynchronous;
pub mod envelope;
pub mod error;
pub mod event;
pub mod function;
pub mod jitter;
pub mod logs;
pub mod metadata;
pub mod metrics;
pub mod name;
pub mod secret;
pub mod subjects;
pub mod trace;
pub mod trigger;

pub use asynchronous::AsyncSettings;
pub use cloudevents;
pub use cloudevents::Event;
pub use error::{Chain, Error, ErrorCode, ProtocolError};
pub use function::{from_fn, Function, FunctionError, InvocationContext};
pub use metadata::{FunctionKind, FunctionMetadata, FunctionSummary};
pub use metrics::{
    FunctionStats, InMemoryMetrics, MetricsCollector, Outcome, TriggerEvent, DURATION_BUCKETS_US,
};
pub use name::{FunctionName, InvalidFunctionName};
pub use subjects::Subjects;
pub use trace::{TraceBridge, TraceContext};
