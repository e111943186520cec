//! A core NATS subject trigger: one queue subscription per runtime in a group per trigger, so
//! each message runs the function once across the runtimes; at most once (a message whose
//! call fails is counted and logged, not retried).

use std::sync::Arc;

use futures_util::StreamExt;
use mycelium_core::{
    envelope::InvokeRequest,
    trigger::{Trigger, TriggerSource},
    TriggerEvent,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::server::Shared;

pub(super) async fn run(shared: Arc<Shared>, trigger: Arc<Trigger>, stop: CancellationToken) {
    let TriggerSource::Subject { subject } = &trigger.source else {
        return;
    };
    let group = format!("mycelium-trigger-{}", trigger.name);
    let mut messages = match shared.client.queue_subscribe(subject.clone(), group).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::warn!(trigger = %trigger.name, %error, "subscribing for a trigger failed");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(
        shared.invoker.concurrency_of(&trigger.function),
    ));
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => {
                // Messages already routed here still run; nothing new comes.
                let _ = messages.unsubscribe().await;
                return;
            }
            message = messages.next() => message,
        };
        let Some(message) = message else { return };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (task_shared, trigger) = (shared.clone(), trigger.clone());
        crate::server::run_inline_or_spawn(&shared.tracker, async move {
            run_once(&task_shared, &trigger, &message).await;
            drop(slot);
        })
        .await;
    }
}

async fn run_once(shared: &Shared, trigger: &Trigger, message: &async_nats::Message) {
    let metrics = &shared.invoker.metrics;
    metrics.trigger_event(&trigger.name, TriggerEvent::Received);
    // This runtime's allow-list may be narrower than what `trigger add` checked.
    if let Some(then) = &trigger.then {
        let config = &shared.config;
        if let Err(refused) = mycelium_core::asynchronous::check_result_subject(
            then,
            &config.subject_prefix,
            &config.asynchronous.result_subjects,
        ) {
            metrics.trigger_event(&trigger.name, TriggerEvent::Undeliverable);
            tracing::warn!(trigger = %trigger.name, "the trigger's message was not run: {refused}");
            return;
        }
    }
    let event = match super::event_of(message, trigger, None) {
        Ok(event) => event,
        Err(error) => {
            metrics.trigger_event(&trigger.name, TriggerEvent::Undeliverable);
            tracing::warn!(trigger = %trigger.name, subject = %message.subject, code = %error.code, "a message could not become an event; dropped: {}", error.message);
            return;
        }
    };
    let invocation_id = nuid::next().to_string();
    let request = InvokeRequest {
        function: trigger.function.clone(),
        trace: mycelium_core::envelope::event_trace(&event),
        event,
        version: None,
        timeout: None,
        invocation_id: Some(invocation_id.clone()),
    };
    let result = shared.invoker.invoke(request, &shared.abort).await;
    metrics.trigger_event(
        &trigger.name,
        TriggerEvent::Invoked {
            failed: result.is_err(),
        },
    );
    match result {
        Ok(events) => {
            if let Some(then) = &trigger.then {
                if let Err(error) = super::publish_then(
                    &shared.client,
                    &trigger.name,
                    then,
                    &invocation_id,
                    &events,
                )
                .await
                {
                    metrics.trigger_event(&trigger.name, TriggerEvent::Undeliverable);
                    tracing::warn!(trigger = %trigger.name, %error, "publishing a trigger's results failed");
                }
            }
        }
        Err(error) => {
            tracing::warn!(trigger = %trigger.name, function = %trigger.function, code = %error.code, "a triggered invocation failed: {}", error.message);
        }
    }
}
