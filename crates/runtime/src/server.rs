//! The NATS side: service endpoints, request dispatch, replies and graceful shutdown.

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, task::Poll, time::Instant};

use async_nats::{HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use mycelium_core::{
    envelope::{self, InvokeRequest},
    event::{self, BATCH_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE},
    ErrorCode, Event, FunctionName, ProtocolError, Subjects, TraceContext,
};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{invoker::Invoker, micro::EndpointStats, RuntimeConfig};

/// What the endpoint loops share.
pub(crate) struct Shared {
    pub invoker: Invoker,
    pub config: RuntimeConfig,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    pub in_flight: Arc<Semaphore>,
    pub tracker: TaskTracker,
    /// Fires when the runtime stops taking requests.
    pub stop: CancellationToken,
    /// Fires when the runtime gives up on invocations still in flight.
    pub abort: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum EndpointKind {
    Invoke,
    Binding,
    List,
    Describe,
}

/// A request being served: the message, when it arrived, and its endpoint's counters.
pub(crate) struct Request {
    message: Message,
    received: Instant,
    stats: Arc<EndpointStats>,
}

/// Serves one endpoint until the runtime stops, then drains: the server stops routing
/// requests here, and every request it had already routed is still answered.
pub(crate) async fn serve_endpoint(
    shared: Arc<Shared>,
    mut subscriber: Subscriber,
    kind: EndpointKind,
    stats: Arc<EndpointStats>,
) {
    let mut draining = false;
    loop {
        let message = if draining {
            subscriber.next().await
        } else {
            tokio::select! {
                biased;
                () = shared.stop.cancelled() => {
                    if let Err(error) = subscriber.drain().await {
                        tracing::warn!(%error, "draining an endpoint failed");
                        return;
                    }
                    draining = true;
                    continue;
                }
                message = subscriber.next() => message,
            }
        };
        let Some(message) = message else { return };
        let request = Request {
            message,
            received: Instant::now(),
            stats: stats.clone(),
        };
        dispatch(&shared, request, kind).await;
    }
}

async fn dispatch(shared: &Arc<Shared>, request: Request, kind: EndpointKind) {
    let size = request.message.payload.len();
    if size > shared.config.max_payload {
        shared
            .invoker
            .metrics
            .request_rejected(None, ErrorCode::PayloadTooLarge);
        let error = ProtocolError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "request is {size} bytes, more than this runtime's limit of {} bytes; send less data or pass a reference to it",
                shared.config.max_payload
            ),
        );
        respond(shared, &request, Err(error), None).await;
        return;
    }
    match kind {
        EndpointKind::List => {
            let body = envelope::encode_list_reply(&shared.invoker.list());
            respond(shared, &request, Ok(body.into()), None).await;
        }
        EndpointKind::Describe => {
            let reply = envelope::decode_describe_request(&request.message.payload)
                .and_then(|(name, version)| shared.invoker.describe(&name, version))
                .map(|metadata| envelope::encode_describe_reply(&metadata).into());
            respond(shared, &request, reply, None).await;
        }
        EndpointKind::Invoke | EndpointKind::Binding => {
            let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
                shared
                    .invoker
                    .metrics
                    .request_rejected(None, ErrorCode::Overloaded);
                let error = ProtocolError::new(
                    ErrorCode::Overloaded,
                    format!(
                        "this runtime is running its limit of {} invocations; retry with backoff or add runtime instances",
                        shared.config.max_in_flight
                    ),
                );
                respond(shared, &request, Err(error), None).await;
                return;
            };
            let task_shared = shared.clone();
            run_inline_or_spawn(&shared.tracker, async move {
                let binding = matches!(kind, EndpointKind::Binding);
                handle_invocation(&task_shared, &request, binding).await;
                drop(permit);
            })
            .await;
        }
    }
}

/// Polls `work` once here and gives it a task of its own (on `tracker`) only if it must wait.
///
/// Most built-ins finish without waiting, and running them inline saves a task spawn and a
/// cross-thread wake-up per request, and lets the connection write several replies with one
/// syscall (profiled). The future is boxed: an invocation's state is several KiB, and spawning
/// moves it into the task cell; moving a pointer is cheaper (profiled). A panic in the inline
/// poll would end the caller's loop rather than one task; it is caught.
pub(crate) async fn run_inline_or_spawn(
    tracker: &TaskTracker,
    work: impl Future<Output = ()> + Send + 'static,
) {
    let mut work = Box::pin(work);
    let finished = std::future::poll_fn(|cx| {
        let poll = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx)));
        Poll::Ready(
            poll.unwrap_or_else(|_| {
                tracing::error!(
                    "an invocation panicked in the runtime; its request is not answered"
                );
                Poll::Ready(())
            })
            .is_ready(),
        )
    })
    .await;
    if !finished {
        tracker.spawn(work);
    }
}

/// Runs one invocation request, envelope or binding, and answers it in the same style.
async fn handle_invocation(shared: &Shared, request: &Request, binding: bool) {
    let decoded = if binding {
        decode_binding_request(shared, request)
    } else {
        envelope::decode_invoke_request(&request.message.payload).map(|mut invoke| {
            // The headers win over the event's extension: they are what NATS-aware tracing
            // (and our client) sets on each hop.
            if let Some(trace) = header_trace(&request.message) {
                invoke.trace = Some(trace);
            }
            invoke.invocation_id = header_invocation_id(&request.message);
            invoke
        })
    };
    let result = match decoded {
        Ok(invoke) => shared.invoker.invoke(invoke, &shared.abort).await,
        Err(error) => {
            shared.invoker.metrics.request_rejected(None, error.code);
            Err(error)
        }
    };
    if binding {
        let reply = result.map(|events: Vec<Event>| Bytes::from(envelope::encode_batch(&events)));
        respond(shared, request, reply, Some(BATCH_CONTENT_TYPE)).await;
    } else {
        let reply = result.map(|events| Bytes::from(envelope::encode_events(&events)));
        respond(shared, request, reply, None).await;
    }
}

/// Decodes a CloudEvents NATS protocol binding request on `<prefix>.invoke.<name>`.
fn decode_binding_request(
    shared: &Shared,
    request: &Request,
) -> Result<InvokeRequest, ProtocolError> {
    let message = &request.message;
    let name = message
        .subject
        .strip_prefix(shared.subjects.binding_prefix.as_str())
        .unwrap_or_default();
    decode_binding(message, name)
}

/// Decodes a message in the CloudEvents NATS protocol binding (structured or binary mode)
/// as an invocation of `name`: a binding request, or a stored asynchronous invocation.
pub(crate) fn decode_binding(
    message: &Message,
    name: &str,
) -> Result<InvokeRequest, ProtocolError> {
    let function = FunctionName::new(name)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidFunctionName, e.to_string()))?;

    let headers = message.headers.as_ref();
    let header_pairs = || {
        headers
            .into_iter()
            .flat_map(HeaderMap::iter)
            .flat_map(|(name, values)| values.iter().map(move |v| (name.as_ref(), v.as_str())))
    };
    let find = |wanted: &str| {
        header_pairs()
            .find(|(name, _): &(&str, &str)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| value)
    };

    let content_type = find("content-type");
    let event = match content_type {
        Some(ct) if ct.starts_with(STRUCTURED_CONTENT_TYPE) => event::event_from_json_slice(&message.payload)?,
        Some(ct) if ct.starts_with("application/cloudevents-batch") => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidRequest,
                "batch mode is not supported for invocation; send one event in structured or binary mode",
            ))
        }
        _ => event::event_from_binary(header_pairs(), content_type, &message.payload)?,
    };
    let version = find(envelope::VERSION_HEADER)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ProtocolError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "header {} must be a version number, got {v:?}",
                        envelope::VERSION_HEADER
                    ),
                )
            })
        })
        .transpose()?;
    let timeout_ms = find(envelope::TIMEOUT_HEADER)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ProtocolError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "header {} must be milliseconds, got {v:?}",
                        envelope::TIMEOUT_HEADER
                    ),
                )
            })
        })
        .transpose()?;
    Ok(InvokeRequest {
        function,
        invocation_id: header_invocation_id(message),
        trace: header_trace(message).or_else(|| envelope::event_trace(&event)),
        event,
        version,
        timeout: envelope::parse_timeout_ms(timeout_ms)?,
    })
}

/// The caller's invocation id header, if present and valid (an invalid one is ignored: the
/// runtime names the invocation itself).
fn header_invocation_id(message: &Message) -> Option<String> {
    let id = message
        .headers
        .as_ref()?
        .get(envelope::INVOCATION_ID_HEADER)?
        .as_str();
    envelope::valid_invocation_id(id).then(|| id.to_owned())
}

/// The W3C trace context in a request's NATS headers, if any and valid.
fn header_trace(message: &Message) -> Option<TraceContext> {
    let headers = message.headers.as_ref()?;
    TraceContext::from_pairs(
        headers
            .iter()
            .flat_map(|(name, values)| values.iter().map(move |v| (name.as_ref(), v.as_str()))),
    )
}

/// Sends a reply: the body, or the error envelope with the NATS services error headers.
/// A reply larger than the server accepts becomes a `payload_too_large` error instead of
/// being lost.
async fn respond(
    shared: &Shared,
    request: &Request,
    reply: Result<Bytes, ProtocolError>,
    content_type: Option<&str>,
) {
    if request.message.reply.is_none() {
        if let Err(error) = &reply {
            tracing::debug!(%error, "request had no reply subject; the outcome is dropped");
        }
        return;
    }
    let max_reply = shared.client.max_payload();
    let reply = match reply {
        Ok(body) if max_reply > 0 && body.len() > max_reply => Err(ProtocolError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the function's reply is {} bytes, more than the NATS server's max_payload of {max_reply} bytes",
                body.len()
            ),
        )),
        other => other,
    };
    let mut error_status = None;
    let (headers, body) = match reply {
        Ok(body) => {
            let mut headers = HeaderMap::new();
            if let Some(content_type) = content_type {
                headers.insert("Content-Type", content_type);
            }
            (headers, body)
        }
        Err(error) => {
            error_status = Some((error.code.status(), error.code.as_str()));
            (error_headers(&error), envelope::encode_error(&error).into())
        }
    };
    let Some(reply_to) = request.message.reply.clone() else {
        return;
    };
    let sent = if headers.is_empty() {
        shared.client.publish(reply_to, body).await
    } else {
        shared
            .client
            .publish_with_headers(reply_to, headers, body)
            .await
    };
    request
        .stats
        .record(request.received.elapsed(), error_status);
    if let Err(error) = sent {
        tracing::warn!(%error, "sending a reply failed");
    }
}

/// The headers of an error reply: the NATS services API's error code and text, and the JSON
/// content type of the error envelope.
pub(crate) fn error_headers(error: &ProtocolError) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        envelope::SERVICE_ERROR_CODE_HEADER,
        error.code.status().to_string().as_str(),
    );
    headers.insert(
        envelope::SERVICE_ERROR_HEADER,
        error_header_text(error).as_str(),
    );
    headers.insert("Content-Type", "application/json");
    headers
}

/// Header values cannot hold line breaks; messages are also kept short there (the body has them whole).
fn error_header_text(error: &ProtocolError) -> String {
    let mut text: String = format!("{}: {}", error.code, error.message)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(256)
        .collect();
    text.truncate(text.trim_end().len());
    text
}
