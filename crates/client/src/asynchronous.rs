//! Asynchronous invocation from the caller's side: submit an event and get JetStream's
//! acceptance; read, replay and purge a function's dead letters.

use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use mycelium_core::{
    asynchronous::{
        consumer_function, AsyncQueueStats, DeadLetter, ASYNC_STREAM, DLQ_STREAM,
        IDEMPOTENCY_HEADER, RESULT_SUBJECT_HEADER,
    },
    envelope::INVOCATION_ID_HEADER,
    event::STRUCTURED_CONTENT_TYPE,
    Error, Event, FunctionName,
};

use crate::Client;

/// Why a submission or a dead-letter operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncErrorKind {
    /// The function name (or an option) is invalid; nothing was sent.
    InvalidRequest,
    /// No stream stores asynchronous invocations: no runtime with JetStream has started.
    NoStream,
    /// The stream is full (its message or byte limit); the invocation was not accepted.
    StreamFull,
    /// No acceptance arrived in time; the invocation may or may not be stored (submit again
    /// with the same idempotency key to be sure without running it twice).
    TimedOut,
    /// Talking to NATS failed.
    Transport,
}

/// A failed [`Client::submit`] or dead-letter operation.
pub type AsyncError = Error<AsyncErrorKind>;

/// Options of [`Client::submit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// Where the result (or the failure) is published (header `Mycelium-Result-Subject`).
    pub result_subject: Option<String>,
    /// The idempotency key (`Nats-Msg-Id`): a second submission with the same key inside the
    /// duplicate window is acknowledged as a duplicate and does not run again.
    pub idempotency_key: Option<String>,
    /// The invocation id (default: a new one).
    pub invocation_id: Option<String>,
}

/// JetStream's acceptance of a submission: from here on it will run or be dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    /// The id the invocation runs under (header `Mycelium-Invocation-Id`).
    pub invocation_id: String,
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// Whether the idempotency key was seen before: nothing new was stored.
    pub duplicate: bool,
}

/// A dead letter and where it is kept.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// Its sequence in the dead-letter stream.
    pub sequence: u64,
    /// The record.
    pub letter: DeadLetter,
}

fn invalid(message: String) -> AsyncError {
    AsyncError::new(AsyncErrorKind::InvalidRequest, message)
}

fn transport(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> AsyncError {
    AsyncError::with_source(AsyncErrorKind::Transport, what.to_owned(), e)
}

impl Client {
    /// Submits `event` for asynchronous invocation of `function` and waits for JetStream's
    /// acceptance. The event travels in the structured CloudEvents format.
    pub async fn submit(
        &self,
        function: &str,
        event: &Event,
        options: SubmitOptions,
    ) -> Result<Acceptance, AsyncError> {
        let name = FunctionName::new(function).map_err(|e| invalid(e.to_string()))?;
        let body = serde_json::to_vec(event).map_err(|e| invalid(e.to_string()))?;
        self.submit_raw(&name, body.into(), options).await
    }

    async fn submit_raw(
        &self,
        name: &FunctionName,
        body: Bytes,
        options: SubmitOptions,
    ) -> Result<Acceptance, AsyncError> {
        let invocation_id = options
            .invocation_id
            .unwrap_or_else(|| nuid::next().to_string());
        if !mycelium_core::envelope::valid_invocation_id(&invocation_id) {
            return Err(invalid(format!(
                "invocation id {invocation_id:?} must be 1 to 64 characters of A-Z a-z 0-9 - _ . :"
            )));
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
        headers.insert(INVOCATION_ID_HEADER, invocation_id.as_str());
        if let Some(subject) = &options.result_subject {
            headers.insert(RESULT_SUBJECT_HEADER, subject.as_str());
        }
        if let Some(key) = &options.idempotency_key {
            if key.is_empty() || key.chars().any(|c| c.is_control()) {
                return Err(invalid(format!(
                    "idempotency key {key:?} must be non-empty text on one line"
                )));
            }
            headers.insert(IDEMPOTENCY_HEADER, key.as_str());
        }
        let subject = self.subjects.async_of(name);
        let jetstream = jetstream::new(self.nats.clone());
        let ack = async {
            jetstream
                .publish_with_headers(subject.clone(), headers, body)
                .await?
                .await
        }
        .await
        .map_err(|e| match e.kind() {
            PublishErrorKind::StreamNotFound => AsyncError::with_source(
                AsyncErrorKind::NoStream,
                format!("nothing stores {subject}: no runtime with JetStream has started on this NATS (asynchronous invocation needs one); start one with `mycelium up` or `mycelium serve`"),
                e,
            ),
            PublishErrorKind::TimedOut => AsyncError::with_source(
                AsyncErrorKind::TimedOut,
                "no acceptance arrived in time; the invocation may or may not be stored (submit again with the same --idempotency-key to be sure)",
                e,
            ),
            _ if e.to_string().contains("exceeded") => AsyncError::with_source(
                AsyncErrorKind::StreamFull,
                "the asynchronous invocation stream is full; the invocation was not accepted (retry later, or raise the runtime's --async-max-messages/--async-max-bytes)",
                e,
            ),
            _ => transport("submitting", e),
        })?;
        Ok(Acceptance {
            invocation_id,
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// The dead letters of `function`, oldest first.
    pub async fn dead_letters(&self, function: &str) -> Result<Vec<StoredDeadLetter>, AsyncError> {
        let name = FunctionName::new(function).map_err(|e| invalid(e.to_string()))?;
        let Some(stream) = self.dead_letter_stream().await? else {
            return Ok(Vec::new());
        };
        self.dead_letters_in(&stream, &name).await
    }

    /// The dead letters of `name` in the dead-letter stream, oldest first.
    async fn dead_letters_in(
        &self,
        stream: &jetstream::stream::Stream,
        name: &FunctionName,
    ) -> Result<Vec<StoredDeadLetter>, AsyncError> {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.subjects.dlq_of(name),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| transport("reading dead letters", e))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut letters = Vec::new();
        if pending == 0 {
            return Ok(letters);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| transport("reading dead letters", e))?;
        while pending > 0 {
            let Some(message) = messages.next().await else {
                break;
            };
            let message = message.map_err(|e| transport("reading dead letters", e))?;
            let info = message
                .info()
                .map_err(|e| AsyncError::new(AsyncErrorKind::Transport, e.to_string()))?;
            pending = info.pending;
            let sequence = info.stream_sequence;
            if let Ok(letter) = serde_json::from_slice::<DeadLetter>(&message.message.payload) {
                letters.push(StoredDeadLetter { sequence, letter });
            }
        }
        Ok(letters)
    }

    /// Submits `function`'s dead letters again (only those of event `event_id` when given),
    /// with the result subject they had, and removes each from the dead-letter stream once
    /// it is accepted. Replaying the same letter twice runs it once (its idempotency key is
    /// the letter's sequence).
    pub async fn replay_dead_letters(
        &self,
        function: &str,
        event_id: Option<&str>,
    ) -> Result<Vec<Acceptance>, AsyncError> {
        let name = FunctionName::new(function).map_err(|e| invalid(e.to_string()))?;
        let Some(stream) = self.dead_letter_stream().await? else {
            return Ok(Vec::new());
        };
        let mut accepted = Vec::new();
        for stored in self.dead_letters_in(&stream, &name).await? {
            let letter = stored.letter;
            let id = letter.event.get("id").and_then(|v| v.as_str());
            if event_id.is_some_and(|wanted| Some(wanted) != id) {
                continue;
            }
            let body = serde_json::to_vec(&letter.event).map_err(|e| invalid(e.to_string()))?;
            let options = SubmitOptions {
                result_subject: letter.result_subject,
                idempotency_key: Some(format!("replay-{}", stored.sequence)),
                invocation_id: Some(letter.invocation_id),
            };
            accepted.push(self.submit_raw(&name, body.into(), options).await?);
            stream
                .delete_message(stored.sequence)
                .await
                .map_err(|e| transport("removing a replayed dead letter", e))?;
        }
        Ok(accepted)
    }

    /// Removes every dead letter of `function`; returns how many there were.
    pub async fn purge_dead_letters(&self, function: &str) -> Result<u64, AsyncError> {
        let name = FunctionName::new(function).map_err(|e| invalid(e.to_string()))?;
        let Some(stream) = self.dead_letter_stream().await? else {
            return Ok(0);
        };
        let purged = stream
            .purge()
            .filter(self.subjects.dlq_of(&name))
            .await
            .map_err(|e| transport("purging dead letters", e))?;
        Ok(purged.purged)
    }

    /// Every function's asynchronous queue as JetStream counts it (cluster-wide), sorted by
    /// name: functions with a consumer, and functions with dead letters.
    pub async fn async_stats(&self) -> Result<Vec<AsyncQueueStats>, AsyncError> {
        let mut queues = std::collections::BTreeMap::new();
        let blank = |function: FunctionName| AsyncQueueStats {
            function,
            pending: 0,
            in_flight: 0,
            redelivered: 0,
            dead_lettered: 0,
        };
        if let Some(stream) = self.stream(ASYNC_STREAM).await? {
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.map_err(|e| transport("reading the queues", e))?;
                let Some(function) = consumer_function(&info.name) else {
                    continue;
                };
                queues.insert(
                    function.clone(),
                    AsyncQueueStats {
                        pending: info.num_pending,
                        in_flight: info.num_ack_pending as u64,
                        redelivered: info.num_redelivered as u64,
                        ..blank(function)
                    },
                );
            }
        }
        if let Some(stream) = self.dead_letter_stream().await? {
            let prefix = format!("{}.dlq.", self.subjects.prefix);
            let mut subjects = stream
                .info_with_subjects(format!("{prefix}>"))
                .await
                .map_err(|e| transport("counting dead letters", e))?;
            while let Some(entry) = subjects.next().await {
                let (subject, count) = entry.map_err(|e| transport("counting dead letters", e))?;
                let Some(function) = subject
                    .strip_prefix(&prefix)
                    .and_then(|name| FunctionName::new(name).ok())
                else {
                    continue;
                };
                queues
                    .entry(function.clone())
                    .or_insert_with(|| blank(function))
                    .dead_lettered = count as u64;
            }
        }
        Ok(queues.into_values().collect())
    }

    async fn dead_letter_stream(&self) -> Result<Option<jetstream::stream::Stream>, AsyncError> {
        self.stream(DLQ_STREAM).await
    }

    async fn stream(&self, name: &str) -> Result<Option<jetstream::stream::Stream>, AsyncError> {
        match jetstream::new(self.nats.clone()).get_stream(name).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(inner)
                        if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                // The stream is not there: no runtime made it.
                Ok(None)
            }
            Err(e) => Err(transport(&format!("finding the stream {name}"), e)),
        }
    }
}
