//! One stored invocation, from the pulled message to its ack: decode, checks, the call (its
//! ack wait renewed while it runs), then the result published, a NAK with the backoff as
//! delay, or a dead letter.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{
    jetstream::{self, AckKind},
    HeaderMap,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use mycelium_core::{
    asynchronous::{
        check_result_subject, is_retriable, AsyncSettings, DeadLetter, DeadLetterReason,
        ATTEMPTS_HEADER, EVENT_ID_HEADER, FUNCTION_HEADER, RESULT_SUBJECT_HEADER,
    },
    cloudevents::AttributesReader,
    envelope::{self, INVOCATION_ID_HEADER},
    trigger::{Trigger, TriggerName},
    ErrorCode, Event, FunctionName, ProtocolError, TriggerEvent,
};

use crate::server::{self, Shared};

/// Runs stored invocations for one runtime.
pub(crate) struct Dispatcher {
    shared: Arc<Shared>,
    jetstream: jetstream::Context,
    /// Result subjects and whether a stream captures them, with when that was learnt.
    routes: Mutex<HashMap<String, (bool, std::time::Instant)>>,
}

/// What is known of a pulled invocation before it runs.
struct Stored {
    function: FunctionName,
    invocation_id: String,
    attempt: u32,
    sequence: u64,
    accepted_at: DateTime<Utc>,
    /// The caller's `Mycelium-Result-Subject`, as given.
    result_subject: Option<String>,
    /// A trigger's name and where its result events go, one message each.
    then: Option<(TriggerName, String)>,
    /// Whether this runtime knows the function (it has its settings).
    known: bool,
}

/// Where a pulled message comes from, which decides how it becomes an invocation and where
/// its result goes.
#[derive(Clone)]
pub(crate) enum Origin {
    /// A submission to `<prefix>.async.<name>`: a CloudEvent in the binding, its result to the
    /// caller's result subject or the function's `on_success`.
    Submission,
    /// A message a durable trigger took from its stream, KV bucket or schedule: wrapped into
    /// an event unless it is one, its result events to the trigger's `then`.
    Trigger(Arc<Trigger>),
}

/// How an invocation ends here.
enum Ending {
    /// It ran: publish its result (if it has a destination), ack.
    Done(Vec<Event>),
    /// It failed and may succeed later: NAK, redelivered after `delay`.
    Retry(ProtocolError, Duration),
    /// It will not run (again): dead-letter it, announce the failure, ack.
    DeadLetter(DeadLetterReason, ProtocolError),
}

impl Dispatcher {
    pub(crate) fn new(shared: Arc<Shared>, jetstream: jetstream::Context) -> Self {
        Self {
            shared,
            jetstream,
            routes: Mutex::default(),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs one pulled invocation of `function` and settles it with the server.
    pub(crate) async fn run(
        &self,
        function: &FunctionName,
        origin: &Origin,
        message: jetstream::Message,
    ) {
        let Ok(info) = message.info() else {
            // Not a JetStream delivery; nothing to settle.
            return;
        };
        let settings = self
            .shared
            .invoker
            .describe(function, None)
            .map(|m| m.asynchronous.clone());
        let stored = Stored {
            function: function.clone(),
            invocation_id: match origin {
                Origin::Submission => header(&message, INVOCATION_ID_HEADER)
                    .filter(|id| envelope::valid_invocation_id(id))
                    .map_or_else(|| format!("async-{}", info.stream_sequence), str::to_owned),
                Origin::Trigger(trigger) => format!("{}-{}", trigger.name, info.stream_sequence),
            },
            attempt: u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1),
            sequence: info.stream_sequence,
            accepted_at: info.published,
            result_subject: match origin {
                Origin::Submission => header(&message, RESULT_SUBJECT_HEADER).map(str::to_owned),
                Origin::Trigger(_) => None,
            },
            then: match origin {
                Origin::Submission => None,
                Origin::Trigger(trigger) => trigger
                    .then
                    .clone()
                    .map(|then| (trigger.name.clone(), then)),
            },
            known: settings.is_ok(),
        };
        if let Origin::Trigger(trigger) = origin {
            let metrics = &self.shared.invoker.metrics;
            metrics.trigger_event(&trigger.name, TriggerEvent::Received);
            if matches!(
                trigger.source,
                mycelium_core::trigger::TriggerSource::Schedule { .. }
            ) {
                metrics.trigger_event(
                    &trigger.name,
                    TriggerEvent::Fired(info.published.timestamp_millis()),
                );
            }
        }
        let decoded = match origin {
            Origin::Submission => server::decode_binding(&message.message, function.as_str()),
            Origin::Trigger(trigger) => crate::triggers::event_of(
                &message.message,
                trigger,
                Some((&info, &self.shared.config.subject_prefix)),
            )
            .map(|event| envelope::InvokeRequest {
                function: function.clone(),
                trace: envelope::event_trace(&event),
                event,
                version: None,
                timeout: None,
                invocation_id: None,
            }),
        };
        let (ending, event, settings) = match (decoded, settings) {
            (Err(error), settings) => (
                Ending::DeadLetter(DeadLetterReason::NotRetriable, error),
                None,
                settings.unwrap_or_default(),
            ),
            (Ok(request), Err(error)) => {
                let grace = self.shared.config.asynchronous.unknown_function_grace;
                let age = (Utc::now() - stored.accepted_at)
                    .to_std()
                    .unwrap_or_default();
                let ending = if error.code == ErrorCode::FunctionNotFound && age < grace {
                    // A deploy may be on its way to this runtime.
                    Ending::Retry(error, grace - age)
                } else {
                    Ending::DeadLetter(DeadLetterReason::NotRetriable, error)
                };
                (ending, Some(request.event), AsyncSettings::default())
            }
            (Ok(mut request), Ok(settings)) => {
                let event = request.event.clone();
                request.invocation_id = Some(stored.invocation_id.clone());
                let ending = self.attempt(&stored, &settings, &message, request).await;
                (ending, Some(event), settings)
            }
        };
        if let Origin::Trigger(trigger) = origin {
            let event = match &ending {
                Ending::Done(_) => TriggerEvent::Invoked { failed: false },
                Ending::Retry(..) => TriggerEvent::Invoked { failed: true },
                Ending::DeadLetter(DeadLetterReason::NotRetriable, e)
                    if e.code == ErrorCode::InvalidEvent =>
                {
                    TriggerEvent::Undeliverable
                }
                Ending::DeadLetter(..) => TriggerEvent::Invoked { failed: true },
            };
            self.shared
                .invoker
                .metrics
                .trigger_event(&trigger.name, event);
        }
        self.settle(&stored, &settings, event, &message, ending)
            .await;
    }

    /// The checks before the call, then the call itself.
    async fn attempt(
        &self,
        stored: &Stored,
        settings: &AsyncSettings,
        message: &jetstream::Message,
        request: envelope::InvokeRequest,
    ) -> Ending {
        let destination = stored
            .result_subject
            .as_ref()
            .or(stored.then.as_ref().map(|(_, then)| then));
        if let Some(subject) = destination {
            if let Err(refused) = self.check_subject(subject) {
                return Ending::DeadLetter(
                    DeadLetterReason::ResultSubjectRefused,
                    ProtocolError::new(ErrorCode::InvalidRequest, refused.to_string()),
                );
            }
        }
        let age = (Utc::now() - stored.accepted_at)
            .to_std()
            .unwrap_or_default();
        if age > settings.max_event_age() {
            return Ending::DeadLetter(
                DeadLetterReason::Expired,
                ProtocolError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the invocation waited {:.0?}, longer than the function's maximum event age of {:?}; it did not run",
                        age,
                        settings.max_event_age()
                    ),
                ),
            );
        }
        let call = self.shared.invoker.invoke(request, &self.shared.abort);
        let result = renewing(message, self.shared.config.asynchronous.ack_wait, call).await;
        match result {
            Ok(events) => Ending::Done(events),
            Err(error) if !is_retriable(error.code) => {
                Ending::DeadLetter(DeadLetterReason::NotRetriable, error)
            }
            Err(error) if stored.attempt >= settings.attempts() => {
                Ending::DeadLetter(DeadLetterReason::RetriesExhausted, error)
            }
            Err(error) => {
                let delay = settings.backoff(stored.attempt, mycelium_core::jitter::random_u64());
                Ending::Retry(error, delay)
            }
        }
    }

    fn check_subject(
        &self,
        subject: &str,
    ) -> Result<(), mycelium_core::asynchronous::RefusedSubject> {
        check_result_subject(
            subject,
            &self.shared.config.subject_prefix,
            &self.shared.config.asynchronous.result_subjects,
        )
    }

    /// Tells the server how it ended. Nothing is acked before its result or its dead letter
    /// is out: a failure on the way leaves the invocation to be delivered again.
    async fn settle(
        &self,
        stored: &Stored,
        settings: &AsyncSettings,
        event: Option<Event>,
        message: &jetstream::Message,
        ending: Ending,
    ) {
        let function = &stored.function;
        match ending {
            Ending::Done(events) if stored.then.is_some() => {
                let Some((trigger, then)) = &stored.then else {
                    return;
                };
                if let Err(error) = crate::triggers::publish_then(
                    &self.shared.client,
                    trigger,
                    then,
                    &stored.invocation_id,
                    &events,
                )
                .await
                {
                    tracing::warn!(%function, %error, then, "publishing a trigger's results failed; the event will run again");
                    again_soon(message).await;
                    return;
                }
                self.ack(message).await;
            }
            Ending::Done(events) => {
                let destination = stored
                    .result_subject
                    .as_deref()
                    .or(settings.on_success.as_deref());
                if let Some(subject) = destination {
                    let headers = self.result_headers(stored, event.as_ref());
                    let body = Bytes::from(envelope::encode_events(&events));
                    if let Err(error) = self.publish(subject, headers, body).await {
                        tracing::warn!(%function, %error, subject, "publishing an asynchronous result failed; the invocation will run again");
                        again_soon(message).await;
                        return;
                    }
                }
                self.ack(message).await;
            }
            Ending::Retry(error, delay) => {
                self.shared.invoker.metrics.async_retried(function);
                tracing::debug!(%function, invocation_id = %stored.invocation_id, attempt = stored.attempt, code = %error.code, ?delay, "asynchronous invocation failed; retrying");
                if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::debug!(%function, %error, "the retry could not be asked for; the ack wait will bring it back");
                }
            }
            Ending::DeadLetter(reason, error) => {
                let attempts = match reason {
                    DeadLetterReason::RetriesExhausted | DeadLetterReason::NotRetriable => {
                        stored.attempt
                    }
                    DeadLetterReason::Expired | DeadLetterReason::ResultSubjectRefused => {
                        stored.attempt.saturating_sub(1)
                    }
                };
                tracing::warn!(%function, invocation_id = %stored.invocation_id, attempts, reason = reason.as_str(), code = %error.code, "asynchronous invocation dead-lettered: {}", error.message);
                let event_json = event
                    .as_ref()
                    .and_then(|e| serde_json::to_value(e).ok())
                    .unwrap_or_else(|| {
                        serde_json::Value::String(
                            String::from_utf8_lossy(&message.payload).into_owned(),
                        )
                    });
                let letter = DeadLetter {
                    function: function.clone(),
                    invocation_id: stored.invocation_id.clone(),
                    event: event_json,
                    reason,
                    error: error.clone(),
                    attempts,
                    accepted_at: stored.accepted_at,
                    dead_lettered_at: Utc::now(),
                    result_subject: stored.result_subject.clone(),
                    sequence: stored.sequence,
                };
                let subject = format!("{}.dlq.{function}", self.shared.config.subject_prefix);
                let body = serde_json::to_vec(&letter).unwrap_or_default();
                let mut headers = self.result_headers(stored, event.as_ref());
                // A redelivery of an invocation already dead-lettered (its ack was lost) is
                // not stored twice.
                headers.insert(
                    mycelium_core::asynchronous::IDEMPOTENCY_HEADER,
                    format!("dlq-{}", stored.sequence).as_str(),
                );
                let stored_letter = async {
                    self.jetstream
                        .publish_with_headers(subject, headers, body.into())
                        .await?
                        .await
                };
                if let Err(error) = stored_letter.await {
                    tracing::warn!(%function, %error, "storing a dead letter failed; the invocation stays queued");
                    again_soon(message).await;
                    return;
                }
                // The failure is announced where the caller (or the deployer) asked; a refused
                // caller subject is not used for it.
                let destination = match reason {
                    DeadLetterReason::ResultSubjectRefused => None,
                    _ => stored.result_subject.as_deref(),
                }
                .or(settings.on_failure.as_deref());
                if let Some(subject) = destination {
                    let mut headers = self.result_headers(stored, event.as_ref());
                    for (name, value) in server::error_headers(&error).iter() {
                        for value in value {
                            headers.append(name.clone(), value.clone());
                        }
                    }
                    let body = Bytes::from(envelope::encode_error(&error));
                    if let Err(error) = self.publish(subject, headers, body).await {
                        tracing::warn!(%function, %error, subject, "announcing a dead letter failed");
                    }
                }
                // Counted for functions this runtime knows only: the names of the others
                // are the callers'.
                if stored.known {
                    self.shared
                        .invoker
                        .metrics
                        .async_dead_lettered(function, reason);
                }
                self.ack(message).await;
            }
        }
    }

    /// Publishes a result where it was asked for, checked again: a per-function default may
    /// predate this runtime's allow-list. When a stream captures the subject, the result is
    /// published the JetStream way and stored before the invocation is acked; otherwise it
    /// goes to subscribers as a plain publish.
    async fn publish(&self, subject: &str, headers: HeaderMap, body: Bytes) -> Result<(), String> {
        self.check_subject(subject).map_err(|e| e.to_string())?;
        if self.captured(subject).await? {
            self.jetstream
                .publish_with_headers(subject.to_owned(), headers, body)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            // No flush: the double ack that follows on the same connection is answered only
            // after the server has processed this publish (a connection's commands are
            // handled in order), which saves a round trip per invocation (measured).
            self.shared
                .client
                .publish_with_headers(subject.to_owned(), headers, body)
                .await
                .map_err(|e| e.to_string())
        }
    }

    /// Whether a stream captures `subject`, remembered for a few seconds (the subjects are
    /// callers', so the memory is bounded and simply forgets when full).
    async fn captured(&self, subject: &str) -> Result<bool, String> {
        use async_nats::jetstream::context::GetStreamByNameErrorKind;
        const REMEMBER: Duration = Duration::from_secs(10);
        const SUBJECTS: usize = 1024;
        let now = std::time::Instant::now();
        if let Some((captured, at)) = self
            .routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(subject)
        {
            if now.duration_since(*at) < REMEMBER {
                return Ok(*captured);
            }
        }
        let captured = match self.jetstream.stream_by_subject(subject).await {
            Ok(_) => true,
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => false,
            Err(e) => return Err(format!("asking which stream captures {subject}: {e}")),
        };
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.len() >= SUBJECTS {
            routes.clear();
        }
        routes.insert(subject.to_owned(), (captured, now));
        Ok(captured)
    }

    fn result_headers(&self, stored: &Stored, event: Option<&Event>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(INVOCATION_ID_HEADER, stored.invocation_id.as_str());
        headers.insert(FUNCTION_HEADER, stored.function.as_str());
        headers.insert(ATTEMPTS_HEADER, stored.attempt.to_string().as_str());
        if let Some(event) = event {
            headers.insert(EVENT_ID_HEADER, event.id());
        }
        headers
    }

    async fn ack(&self, message: &jetstream::Message) {
        // Double: the server confirms, so a lost ack does not run the invocation twice.
        if let Err(error) = message.double_ack().await {
            tracing::debug!(%error, "an ack was not confirmed; the invocation may run again");
        }
    }
}

/// Hands an invocation back to the server to be delivered again in a second: its result or
/// dead letter could not be sent, so it is not settled.
async fn again_soon(message: &jetstream::Message) {
    let _ = message
        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
        .await;
}

/// Runs `call`, telling the server every third of the ack wait that the invocation is still
/// being worked on, so a long call is not handed to another runtime.
async fn renewing<T>(
    message: &jetstream::Message,
    ack_wait: Duration,
    call: impl std::future::Future<Output = T>,
) -> T {
    let mut call = std::pin::pin!(call);
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            result = &mut call => return result,
            () = tokio::time::sleep(period) => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()?
        .get(name)
        .map(async_nats::HeaderValue::as_str)
}
