//! Asynchronous invocation's contract: the streams, the headers, a function's retry settings
//! and the dead-letter record (docs/protocol.md, "Asynchronous invocation").
//!
//! A caller publishes a CloudEvent to `<prefix>.async.<name>` with JetStream; the PubAck
//! from the stream [`ASYNC_STREAM`] is the acceptance. Runtimes pull the stored invocations,
//! run them, retry retriable failures with backoff (a delayed NAK: JetStream redelivers), and
//! move what cannot succeed to [`DLQ_STREAM`] on `<prefix>.dlq.<name>`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ErrorCode, FunctionName, ProtocolError};

/// The stream that stores accepted asynchronous invocations (work queue: an invocation
/// leaves it when it has run or been dead-lettered).
pub const ASYNC_STREAM: &str = "MYCELIUM_ASYNC";
/// The stream of dead letters.
pub const DLQ_STREAM: &str = "MYCELIUM_DLQ";

/// Request header: where the result (or the failure) of this invocation is published.
pub const RESULT_SUBJECT_HEADER: &str = "Mycelium-Result-Subject";
/// Result header: the function that ran.
pub const FUNCTION_HEADER: &str = "Mycelium-Function";
/// Result header: how many attempts it took (from 1).
pub const ATTEMPTS_HEADER: &str = "Mycelium-Attempts";
/// Result header: the id of the event that was submitted.
pub const EVENT_ID_HEADER: &str = "Mycelium-Event-Id";
/// Submission header: JetStream's de-duplication key, Mycelium's idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "Nats-Msg-Id";

/// Retries of a function that sets none: three attempts in all.
pub const DEFAULT_RETRIES: u32 = 2;
/// How long an accepted invocation may wait to run, for functions that set nothing.
pub const DEFAULT_MAX_EVENT_AGE: Duration = Duration::from_secs(3600);
/// The first wait of the default exponential backoff; it doubles per retry.
pub const DEFAULT_FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait of the default exponential backoff.
pub const MAX_DEFAULT_BACKOFF: Duration = Duration::from_secs(300);

/// How a function's asynchronous invocations are retried and where their outcomes go, set
/// at deploy time. Unset fields take the defaults above.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AsyncSettings {
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// The wait before each retry (the last one repeats); empty: exponential with jitter.
    #[serde(
        default,
        rename = "retryBackoffMs",
        with = "durations_ms",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub retry_backoff: Vec<Duration>,
    /// How long an accepted invocation may wait to run; older ones are dead-lettered.
    #[serde(
        default,
        rename = "maxEventAgeMs",
        with = "crate::metadata::duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_event_age: Option<Duration>,
    /// Where results go when the call names no `Mycelium-Result-Subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<String>,
    /// Where failures (dead-lettered invocations) are also announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
}

impl AsyncSettings {
    /// Whether nothing is set (the record then omits the settings).
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }

    /// Retries after the first attempt.
    pub fn retries(&self) -> u32 {
        self.retries.unwrap_or(DEFAULT_RETRIES)
    }

    /// Attempts in all.
    pub fn attempts(&self) -> u32 {
        self.retries().saturating_add(1)
    }

    /// How long an accepted invocation may wait to run.
    pub fn max_event_age(&self) -> Duration {
        self.max_event_age.unwrap_or(DEFAULT_MAX_EVENT_AGE)
    }

    /// The wait after failed attempt `attempt` (from 1). The configured list is used as is
    /// (its last entry repeats); the default doubles from one second up to five minutes,
    /// drawn between half and all of that bound with `random` so that a burst of failures
    /// does not come back as a burst.
    pub fn backoff(&self, attempt: u32, random: u64) -> Duration {
        if let Some(last) = self.retry_backoff.last() {
            let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
            return *self.retry_backoff.get(index).unwrap_or(last);
        }
        let bound = DEFAULT_FIRST_BACKOFF
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(MAX_DEFAULT_BACKOFF);
        let half = bound / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(random % nanos)
    }
}

/// Whether an asynchronous invocation that failed with `code` is tried again. Failures of
/// the platform or of the function are; the caller's mistakes, and a function or binary
/// that is not there, not trusted or (a WebAssembly module) cannot run, are not: another
/// attempt would fail the same way.
pub const fn is_retriable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Timeout
            | ErrorCode::Unavailable
            | ErrorCode::Overloaded
            | ErrorCode::PluginCrashed
            | ErrorCode::PluginStartFailed
            | ErrorCode::SecretUnavailable
            | ErrorCode::FunctionError
            | ErrorCode::Internal
            | ErrorCode::Unknown
    )
}

/// Why an invocation was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Every attempt failed with a retriable error.
    RetriesExhausted,
    /// It failed with an error another attempt would repeat.
    NotRetriable,
    /// It waited longer than the function's maximum event age.
    Expired,
    /// Its `Mycelium-Result-Subject` is not one this runtime publishes to.
    ResultSubjectRefused,
}

impl DeadLetterReason {
    /// The snake_case text, as in the dead letter's JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "retries_exhausted",
            Self::NotRetriable => "not_retriable",
            Self::Expired => "expired",
            Self::ResultSubjectRefused => "result_subject_refused",
        }
    }
}

/// A dead letter, as stored on `<prefix>.dlq.<name>` in [`DLQ_STREAM`]: everything needed to
/// see what failed and to submit it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The function it was for.
    pub function: FunctionName,
    /// The invocation id every attempt ran under.
    pub invocation_id: String,
    /// The submitted CloudEvent, in the structured JSON format.
    pub event: serde_json::Value,
    /// Why it was dead-lettered.
    pub reason: DeadLetterReason,
    /// The last error.
    pub error: ProtocolError,
    /// Attempts made (0 when it never ran: expired or refused).
    pub attempts: u32,
    /// When JetStream accepted it.
    pub accepted_at: DateTime<Utc>,
    /// When it was dead-lettered (the end of the last attempt).
    pub dead_lettered_at: DateTime<Utc>,
    /// The `Mycelium-Result-Subject` it was submitted with, kept for replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_subject: Option<String>,
    /// The stream sequence of the submission.
    pub sequence: u64,
}

/// The durable consumer of `function`'s invocations, shared by every runtime.
pub fn consumer_name(function: &FunctionName) -> String {
    format!("fn-{function}")
}

/// The function whose invocations the consumer `name` takes, if it is one of ours.
pub fn consumer_function(name: &str) -> Option<FunctionName> {
    FunctionName::new(name.strip_prefix("fn-")?).ok()
}

/// A function's asynchronous queue, as JetStream counts it (cluster-wide).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AsyncQueueStats {
    /// The function.
    pub function: FunctionName,
    /// Invocations stored and not yet taken by a runtime.
    pub pending: u64,
    /// Invocations taken and not yet settled (running, or waiting for a retry).
    pub in_flight: u64,
    /// Of those, invocations delivered more than once (retries, or a runtime that died).
    pub redelivered: u64,
    /// Dead letters kept.
    pub dead_lettered: u64,
}

/// Why a subject is not one a runtime publishes results to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RefusedSubject(String);

/// Checks a result subject before anything is published to it: a valid subject to publish to
/// (no wildcards, no empty tokens, no whitespace), not a system subject (`$...`) nor one of the
/// platform's own under `prefix`, and matching one of `allowed` when that list is not empty.
pub fn check_result_subject(
    subject: &str,
    prefix: &str,
    allowed: &[String],
) -> Result<(), RefusedSubject> {
    let refuse = |why: &str| Err(RefusedSubject(format!("result subject {subject:?} {why}")));
    if let Some(problem) = subject_problem(subject) {
        return refuse(problem);
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| *t == "*" || *t == ">") {
        return refuse("has a wildcard; results go to one subject");
    }
    if subject.starts_with('$') {
        return refuse(
            "is a system subject ($JS, $KV, $O, $SYS, $SRV, ...); results are not published there",
        );
    }
    if tokens[0] == prefix {
        return refuse(&format!(
            "is one of the platform's own subjects ({prefix}.>); publish results elsewhere"
        ));
    }
    if !allowed.is_empty()
        && !allowed
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
    {
        return refuse(&format!(
            "is not allowed by this runtime (allowed: {})",
            allowed.join(", ")
        ));
    }
    Ok(())
}

/// What keeps `subject` from being a NATS subject (or pattern), if anything: its length,
/// whitespace, an empty token.
pub fn subject_problem(subject: &str) -> Option<&'static str> {
    if subject.is_empty() || subject.len() > 1024 {
        Some("must be 1 to 1024 bytes")
    } else if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace")
    } else if subject.split('.').any(str::is_empty) {
        Some("has an empty token")
    } else {
        None
    }
}

/// Whether `subject` matches the NATS subject `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(actual)) if literal == actual => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

mod durations_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            value
                .iter()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        Ok(Vec::<u64>::deserialize(deserializer)?
            .into_iter()
            .map(Duration::from_millis)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_backoff_is_used_as_is_and_its_last_entry_repeats() {
        let settings = AsyncSettings {
            retry_backoff: vec![Duration::from_secs(1), Duration::from_secs(10)],
            ..Default::default()
        };
        let waits: Vec<_> = (1..=4).map(|a| settings.backoff(a, 12345)).collect();
        assert_eq!(waits, [1, 10, 10, 10].map(Duration::from_secs), "{waits:?}");
    }

    #[test]
    fn default_backoff_doubles_with_jitter_within_half_and_all_of_its_bound() {
        let settings = AsyncSettings::default();
        for (attempt, bound) in [(1, 1), (2, 2), (3, 4), (10, 300), (40, 300)] {
            let bound = Duration::from_secs(bound);
            for random in [0, 1, u64::MAX / 3, u64::MAX] {
                let wait = settings.backoff(attempt, random);
                assert!(wait >= bound / 2 && wait <= bound, "{attempt}: {wait:?}");
            }
        }
        assert_eq!(settings.attempts(), 3);
        assert_eq!(settings.max_event_age(), Duration::from_secs(3600));
    }

    #[test]
    fn settings_round_trip_as_camel_case_milliseconds() {
        let settings = AsyncSettings {
            retries: Some(4),
            retry_backoff: vec![Duration::from_millis(1500)],
            max_event_age: Some(Duration::from_secs(60)),
            on_success: Some("results.ok".into()),
            on_failure: None,
        };
        let json = serde_json::to_value(&settings).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"retries": 4, "retryBackoffMs": [1500], "maxEventAgeMs": 60000, "onSuccess": "results.ok"})
        );
        assert_eq!(
            serde_json::from_value::<AsyncSettings>(json).unwrap(),
            settings
        );
        assert!(AsyncSettings::default().is_default());
    }

    #[test]
    fn result_subjects_that_would_lend_the_runtime_authority_are_refused() {
        let none: &[String] = &[];
        assert!(check_result_subject("results.orders", "function", none).is_ok());
        assert!(check_result_subject("_INBOX.abc", "function", none).is_ok());
        for refused in [
            "$JS.API.STREAM.DELETE.X",
            "$KV.mycelium_functions.fn",
            "$O.mycelium_artifacts.x",
            "$SYS.REQ.SERVER.PING",
            "$SRV.STATS",
            "function.invoke.echo",
            "function.async.echo",
            "function.dlq.echo",
            "results.*",
            "results.>",
            "a..b",
            "",
            "with space",
        ] {
            assert!(
                check_result_subject(refused, "function", none).is_err(),
                "{refused:?} must be refused"
            );
        }
        let allowed = vec!["results.>".to_owned(), "audit.*".to_owned()];
        assert!(check_result_subject("results.a.b", "function", &allowed).is_ok());
        assert!(check_result_subject("audit.x", "function", &allowed).is_ok());
        let error = check_result_subject("audit.x.y", "function", &allowed).unwrap_err();
        assert!(error.to_string().contains("not allowed"), "{error}");
    }

    #[test]
    fn consumer_names_map_back_to_their_function() {
        let name: FunctionName = "resize".parse().unwrap();
        assert_eq!(consumer_function(&consumer_name(&name)), Some(name));
        assert_eq!(consumer_function("other"), None);
        assert_eq!(consumer_function("fn-Not.A.Name"), None);
    }

    #[test]
    fn subject_patterns_match_like_nats() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.c.d"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }

    #[test]
    fn only_failures_another_attempt_may_fix_are_retried() {
        for code in ErrorCode::ALL {
            let expected = !matches!(
                code,
                ErrorCode::InvalidRequest
                    | ErrorCode::InvalidEvent
                    | ErrorCode::InvalidFunctionName
                    | ErrorCode::FunctionNotFound
                    | ErrorCode::VersionNotFound
                    | ErrorCode::PayloadTooLarge
                    | ErrorCode::ArtifactCorrupt
                    | ErrorCode::ArtifactUntrusted
                    | ErrorCode::ModuleInvalid
            );
            assert_eq!(is_retriable(code), expected, "{code}");
        }
    }
}
