//! Event triggers: what makes a function run without a caller: messages on a subject, in a
//! stream or a KV bucket, and schedules. A [`Trigger`] is stored in the registry's KV bucket
//! (`trigger.<name>`) and reaches every runtime by the registry's watch.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    asynchronous::{check_result_subject, subject_problem},
    FunctionName,
};

/// Header on messages a trigger's `then` publishes: the trigger's name.
pub const TRIGGER_HEADER: &str = "Mycelium-Trigger";

/// The KV key prefix of trigger records in the registry's bucket.
pub const TRIGGER_KEY_PREFIX: &str = "trigger.";

/// The stream that holds schedule definitions and their ticks.
pub const SCHEDULE_STREAM: &str = "MYCELIUM_SCHEDULES";

/// A trigger's name: the same rules as a function's (it becomes a subject token and a
/// consumer name).
pub type TriggerName = FunctionName;

/// Where a trigger's consumer starts in a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deliver {
    /// Only messages stored after the trigger was made.
    #[default]
    New,
    /// Everything the stream holds.
    All,
}

/// What a trigger listens to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TriggerSource {
    /// Core NATS: each message runs the function once across all runtimes (queue group), at
    /// most once.
    Subject {
        /// The subject, wildcards allowed.
        subject: String,
    },
    /// A JetStream stream, through a durable consumer: at least once, with the function's
    /// retries and dead letters.
    Stream {
        /// The stream.
        stream: String,
        /// Only messages on this subject (wildcards allowed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
        /// Where to start.
        #[serde(default)]
        deliver: Deliver,
    },
    /// Every put and delete in a KV bucket: at least once.
    Kv {
        /// The bucket.
        bucket: String,
        /// Only keys matching this pattern (`.`-separated, wildcards allowed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// A schedule kept by the NATS server (JetStream message schedules): one firing per tick
    /// across the cluster.
    Schedule {
        /// A 6-field cron expression (seconds first) or a predefined one (`@hourly`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cron: Option<String>,
        /// The IANA time zone of the cron expression (default UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tz: Option<String>,
        /// A fixed interval instead of a cron expression (at least one second).
        #[serde(
            default,
            rename = "everyMs",
            with = "crate::metadata::duration_ms",
            skip_serializing_if = "Option::is_none"
        )]
        every: Option<Duration>,
    },
}

impl TriggerSource {
    /// `subject`, `stream`, `kv` or `schedule`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Subject { .. } => "subject",
            Self::Stream { .. } => "stream",
            Self::Kv { .. } => "kv",
            Self::Schedule { .. } => "schedule",
        }
    }

    /// The `Nats-Schedule` header value of a schedule source.
    pub fn schedule_spec(&self) -> Option<String> {
        match self {
            Self::Schedule {
                every: Some(every), ..
            } => Some(format!("@every {}s", every.as_secs().max(1))),
            Self::Schedule {
                cron: Some(cron), ..
            } => Some(cron.clone()),
            _ => None,
        }
    }

    /// One line for people: `subject orders.>`, `stream ORDERS (orders.eu.>, new)`, ...
    pub fn describe(&self) -> String {
        match self {
            Self::Subject { subject } => format!("subject {subject}"),
            Self::Stream {
                stream,
                filter,
                deliver,
            } => {
                let deliver = match deliver {
                    Deliver::New => "new",
                    Deliver::All => "all",
                };
                match filter {
                    Some(filter) => format!("stream {stream} ({filter}, {deliver})"),
                    None => format!("stream {stream} ({deliver})"),
                }
            }
            Self::Kv { bucket, key } => match key {
                Some(key) => format!("kv {bucket} ({key})"),
                None => format!("kv {bucket}"),
            },
            Self::Schedule { cron, tz, every } => match (every, cron) {
                (Some(every), _) => format!("every {}s", every.as_secs()),
                (None, Some(cron)) => match tz {
                    Some(tz) => format!("cron '{cron}' ({tz})"),
                    None => format!("cron '{cron}'"),
                },
                (None, None) => "schedule".into(),
            },
        }
    }
}

/// A trigger as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// Its name.
    pub name: TriggerName,
    /// The function it runs.
    pub function: FunctionName,
    /// What it listens to.
    pub source: TriggerSource,
    /// Where the function's result events go, one message each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<String>,
    /// Paused triggers receive nothing (durable sources keep their place).
    #[serde(default)]
    pub paused: bool,
    /// When it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

/// Why a trigger is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTrigger(pub String);

impl Trigger {
    /// Checks what can be checked without the server: subjects, the `then` destination, the
    /// schedule's form, and that the trigger does not feed itself. `prefix` is the platform's
    /// subject prefix.
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidTrigger> {
        let refuse = |why: String| Err(InvalidTrigger(why));
        let subject_ok = |subject: &str| subject_problem(subject).is_none();
        match &self.source {
            TriggerSource::Subject { subject } => {
                if !subject_ok(subject) {
                    return refuse(format!(
                        "--subject {subject:?} is not a NATS subject (no spaces, no empty tokens)"
                    ));
                }
                if subject.starts_with('$') || subject.split('.').next() == Some(prefix) {
                    return refuse(format!("--subject {subject:?} is a system or platform subject; triggers listen to your own subjects"));
                }
            }
            TriggerSource::Stream { stream, filter, .. } => {
                if stream.is_empty() || stream.contains(['.', '*', '>', ' ']) {
                    return refuse(format!("--stream {stream:?} is not a stream name"));
                }
                if let Some(filter) = filter {
                    if !subject_ok(filter) {
                        return refuse(format!("--filter {filter:?} is not a NATS subject"));
                    }
                }
            }
            TriggerSource::Kv { bucket, key } => {
                if bucket.is_empty()
                    || !bucket
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return refuse(format!("--kv {bucket:?} is not a bucket name"));
                }
                if let Some(key) = key {
                    if !subject_ok(key) {
                        return refuse(format!("--key {key:?} is not a key pattern"));
                    }
                }
            }
            TriggerSource::Schedule { cron, every, tz } => match (cron, every) {
                (Some(_), Some(_)) | (None, None) => {
                    return refuse("a schedule is --cron or --every, exactly one".into())
                }
                (None, Some(every))
                    if *every < Duration::from_secs(1) || every.subsec_nanos() != 0 =>
                {
                    return refuse("--every must be whole seconds, at least 1s".into())
                }
                (Some(cron), None) => check_cron(cron).map_err(InvalidTrigger)?,
                _ if tz.is_some() && cron.is_none() => {
                    return refuse("--tz applies to --cron only".into())
                }
                _ => {}
            },
        }
        if let Some(then) = &self.then {
            check_result_subject(then, prefix, &[])
                .map_err(|e| InvalidTrigger(format!("--then: {e}")))?;
            if let TriggerSource::Subject { subject } = &self.source {
                if crate::asynchronous::subject_matches(subject, then) {
                    return refuse(format!(
                        "--then {then:?} matches the trigger's own --subject {subject:?}: it would feed itself forever"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The forms JetStream message schedules take: `@every <duration>`, the predefined
/// `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`, and 6-field
/// cron (seconds, minutes, hours, day of month, month, day of week). The server has the last
/// word; this catches what is plainly wrong before anything is stored.
fn check_cron(cron: &str) -> Result<(), String> {
    let cron = cron.trim();
    const PREDEFINED: [&str; 7] = [
        "@yearly",
        "@annually",
        "@monthly",
        "@weekly",
        "@daily",
        "@midnight",
        "@hourly",
    ];
    if PREDEFINED.contains(&cron) {
        return Ok(());
    }
    let fields: Vec<&str> = cron.split_whitespace().collect();
    if fields.len() != 6 {
        return Err(format!(
            "--cron {cron:?} has {} fields; give 6 (seconds minutes hours day-of-month month day-of-week, e.g. '0 */5 * * * *') or one of {}",
            fields.len(),
            PREDEFINED.join(", ")
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '*' | '/' | ',' | '-' | '?');
    if let Some(field) = fields.iter().find(|f| !f.chars().all(allowed)) {
        return Err(format!("--cron field {field:?} is not a cron field"));
    }
    Ok(())
}

/// Per-trigger figures, as each runtime reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerStats {
    /// The trigger.
    pub trigger: TriggerName,
    /// Messages (or ticks) received.
    pub received: u64,
    /// Invocations run.
    pub invocations: u64,
    /// Invocations that failed, and messages that could not become an event.
    pub failures: u64,
    /// Messages waiting in the stream or bucket (durable sources; sampled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// The last firing of a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired: Option<DateTime<Utc>>,
}

impl TriggerStats {
    /// Adds another instance's figures: counts add up, the lag and the last firing are the
    /// largest (they are samples of the same cluster-wide figure).
    pub fn merge(&mut self, other: &TriggerStats) {
        self.received += other.received;
        self.invocations += other.invocations;
        self.failures += other.failures;
        self.lag = self.lag.max(other.lag);
        self.last_fired = self.last_fired.max(other.last_fired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(source: TriggerSource, then: Option<&str>) -> Trigger {
        Trigger {
            name: "t".parse().unwrap(),
            function: "f".parse().unwrap(),
            source,
            then: then.map(str::to_owned),
            paused: false,
            created_at: None,
        }
    }

    fn subject(s: &str) -> TriggerSource {
        TriggerSource::Subject { subject: s.into() }
    }

    #[test]
    fn triggers_round_trip_as_json() {
        let t = trigger(
            TriggerSource::Schedule {
                cron: None,
                tz: None,
                every: Some(Duration::from_secs(5)),
            },
            Some("next.step"),
        );
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "t", "function": "f", "source": {"schedule": {"everyMs": 5000}}, "then": "next.step", "paused": false})
        );
        assert_eq!(serde_json::from_value::<Trigger>(json).unwrap(), t);
        assert_eq!(t.source.schedule_spec().as_deref(), Some("@every 5s"));
    }

    #[test]
    fn bad_triggers_are_refused_with_a_reason() {
        let cases = [
            (
                trigger(subject("orders created"), None),
                "not a NATS subject",
            ),
            (trigger(subject("$JS.API.>"), None), "system or platform"),
            (
                trigger(subject("function.invoke.x"), None),
                "system or platform",
            ),
            (
                trigger(subject("orders.>"), Some("$KV.x.y")),
                "system subject",
            ),
            (
                trigger(subject("orders.>"), Some("function.async.x")),
                "platform's own",
            ),
            (
                trigger(subject("orders.>"), Some("orders.done")),
                "feed itself",
            ),
            (
                trigger(
                    TriggerSource::Schedule {
                        cron: Some("* * *".into()),
                        tz: None,
                        every: None,
                    },
                    None,
                ),
                "has 3 fields",
            ),
            (
                trigger(
                    TriggerSource::Schedule {
                        cron: None,
                        tz: None,
                        every: Some(Duration::from_millis(500)),
                    },
                    None,
                ),
                "at least 1s",
            ),
            (
                trigger(
                    TriggerSource::Schedule {
                        cron: None,
                        tz: None,
                        every: None,
                    },
                    None,
                ),
                "exactly one",
            ),
            (
                trigger(
                    TriggerSource::Stream {
                        stream: "A.B".into(),
                        filter: None,
                        deliver: Deliver::New,
                    },
                    None,
                ),
                "not a stream name",
            ),
            (
                trigger(
                    TriggerSource::Kv {
                        bucket: "b k".into(),
                        key: None,
                    },
                    None,
                ),
                "not a bucket name",
            ),
        ];
        for (t, why) in cases {
            let error = t.validate("function").unwrap_err();
            assert!(error.0.contains(why), "{:?}: {error}", t.source);
        }
        for fine in [
            trigger(subject("orders.>"), Some("invoices.new")),
            trigger(
                TriggerSource::Schedule {
                    cron: Some("0 */5 * * * *".into()),
                    tz: Some("Europe/Paris".into()),
                    every: None,
                },
                None,
            ),
            trigger(
                TriggerSource::Schedule {
                    cron: Some("@hourly".into()),
                    tz: None,
                    every: None,
                },
                None,
            ),
            trigger(
                TriggerSource::Kv {
                    bucket: "config".into(),
                    key: Some("app.>".into()),
                },
                None,
            ),
        ] {
            fine.validate("function").unwrap();
        }
    }
}
