//! The NATS subjects and service names of a Mycelium installation, built in one place for the
//! runtime that answers on them and the clients that call them.

use serde::{Deserialize, Serialize};

use crate::{FunctionName, FunctionStats};

/// The default first token of every subject.
pub const DEFAULT_PREFIX: &str = "function";

/// The name under which runtimes register with the NATS services API by default.
pub const DEFAULT_SERVICE_NAME: &str = "mycelium";

/// The services API endpoint whose `$SRV.STATS` data carries the per-function figures.
pub const INVOKE_ENDPOINT: &str = "invoke";

/// The subjects of one installation, derived once from its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// The first token.
    pub prefix: String,
    /// `<prefix>.invoke`: the invocation envelope.
    pub invoke: String,
    /// `<prefix>.invoke.*`: the CloudEvents NATS binding, one subject per function.
    pub binding: String,
    /// `<prefix>.invoke.`, what precedes the function name on a binding subject.
    pub binding_prefix: String,
    /// `<prefix>.list`.
    pub list: String,
    /// `<prefix>.describe`.
    pub describe: String,
    /// `<prefix>.async.`, what precedes the function name on an asynchronous submission.
    pub async_prefix: String,
}

impl Subjects {
    /// The subjects under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            invoke: format!("{prefix}.invoke"),
            binding: format!("{prefix}.invoke.*"),
            binding_prefix: format!("{prefix}.invoke."),
            list: format!("{prefix}.list"),
            describe: format!("{prefix}.describe"),
            async_prefix: format!("{prefix}.async."),
        }
    }

    /// The binding subject of `function`.
    pub fn binding_of(&self, function: &FunctionName) -> String {
        format!("{}{function}", self.binding_prefix)
    }

    /// Where asynchronous invocations of `function` are submitted.
    pub fn async_of(&self, function: &FunctionName) -> String {
        format!("{}{function}", self.async_prefix)
    }

    /// Where `function`'s dead letters are kept.
    pub fn dlq_of(&self, function: &FunctionName) -> String {
        format!("{}.dlq.{function}", self.prefix)
    }

    /// The subject `function`'s log records are published on.
    pub fn logs_of(&self, function: &FunctionName) -> String {
        crate::logs::logs_subject(&self.prefix, function)
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

/// The `data` of the invoke endpoint in `$SRV.STATS`: this instance's per-function figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvokeEndpointData {
    /// One row per function this instance ran or refused.
    pub functions: Vec<FunctionStats>,
    /// One row per trigger this instance runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<crate::trigger::TriggerStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_under_a_prefix() {
        let subjects = Subjects::new("fx");
        let name: FunctionName = "resize".parse().unwrap();
        assert_eq!(subjects.invoke, "fx.invoke");
        assert_eq!(subjects.binding, "fx.invoke.*");
        assert_eq!(subjects.binding_of(&name), "fx.invoke.resize");
        assert_eq!(subjects.list, "fx.list");
        assert_eq!(subjects.describe, "fx.describe");
        assert_eq!(subjects.logs_of(&name), "fx.logs.resize");
        assert_eq!(subjects.async_of(&name), "fx.async.resize");
        assert_eq!(subjects.dlq_of(&name), "fx.dlq.resize");
        assert_eq!(Subjects::default().invoke, "function.invoke");
    }
}
