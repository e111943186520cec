//! Managing event triggers: checked, then stored in the registry, where every runtime's watch
//! picks them up. Schedules are kept by the NATS server: their definition is a message in
//! [`SCHEDULE_STREAM`], which the server validates and turns into ticks.

use std::sync::Arc;

use async_nats::jetstream::{self, stream};
use mycelium_core::{
    trigger::{Trigger, TriggerName, TriggerSource, SCHEDULE_STREAM},
    Error, ErrorCode, FunctionName,
};
use mycelium_registry::{Registry, RegistryAdmin, TriggerErrorKind};

use crate::{Client, RequestErrorKind};

/// Why a trigger operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerOpErrorKind {
    /// The trigger is not valid (a bad subject, schedule or destination; a missing function,
    /// stream or bucket); nothing was stored.
    Invalid,
    /// No trigger of that name.
    NotFound,
    /// The registry or the server failed.
    Storage,
}

/// A failed trigger operation.
pub type TriggerOpError = Error<TriggerOpErrorKind>;

fn invalid(message: impl Into<String>) -> TriggerOpError {
    TriggerOpError::new(TriggerOpErrorKind::Invalid, message.into())
}

fn storage(what: String, e: impl std::error::Error + Send + Sync + 'static) -> TriggerOpError {
    TriggerOpError::with_source(TriggerOpErrorKind::Storage, what, e)
}

/// The durable consumer a stream or KV trigger reads through.
pub fn trigger_consumer(name: &TriggerName) -> String {
    format!("trigger-{name}")
}

impl Client {
    /// Every trigger, sorted by name.
    pub async fn triggers(&self) -> Result<Vec<Arc<Trigger>>, TriggerOpError> {
        Ok(self.trigger_registry().await?.triggers())
    }

    /// One trigger.
    pub async fn trigger(&self, name: &str) -> Result<Arc<Trigger>, TriggerOpError> {
        let name = trigger_name(name)?;
        self.trigger_registry()
            .await?
            .triggers()
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| not_found(&name))
    }

    /// Checks `trigger` (its form, that its function exists, that its stream or bucket
    /// exists, that the server accepts its schedule) and stores it; every runtime starts it.
    pub async fn add_trigger(&self, mut trigger: Trigger) -> Result<(), TriggerOpError> {
        trigger
            .validate(&self.subjects.prefix)
            .map_err(|e| invalid(e.0))?;
        let registry = self.trigger_registry().await?;
        if registry.triggers().iter().any(|t| t.name == trigger.name) {
            return Err(invalid(format!(
                "a trigger named \"{}\" exists; delete it first or choose another name",
                trigger.name
            )));
        }
        self.check_function(&registry, &trigger.function).await?;
        let jetstream = jetstream::new(self.nats.clone());
        match &trigger.source {
            TriggerSource::Stream { stream, .. } => {
                if jetstream.get_stream(stream).await.is_err() {
                    return Err(invalid(format!(
                        "no stream named {stream:?}; create it first (or check --stream)"
                    )));
                }
            }
            TriggerSource::Kv { bucket, .. } => {
                if jetstream.get_key_value(bucket).await.is_err() {
                    return Err(invalid(format!(
                        "no KV bucket named {bucket:?}; create it first (or check --kv)"
                    )));
                }
            }
            TriggerSource::Schedule { .. } => self.publish_schedule(&trigger).await?,
            TriggerSource::Subject { .. } => {}
        }
        trigger.created_at = Some(chrono::Utc::now());
        registry
            .put_trigger(trigger)
            .await
            .map_err(|e| storage("storing the trigger".into(), e))
    }

    /// Pauses (`true`) or resumes a trigger. A paused durable trigger keeps its place in its
    /// stream; a paused schedule does not tick.
    pub async fn set_trigger_paused(&self, name: &str, paused: bool) -> Result<(), TriggerOpError> {
        let mut trigger = Trigger::clone(&*self.trigger(name).await?);
        if trigger.paused == paused {
            return Ok(());
        }
        trigger.paused = paused;
        if matches!(trigger.source, TriggerSource::Schedule { .. }) {
            if paused {
                self.purge_schedule(&trigger.name).await?;
            } else {
                self.publish_schedule(&trigger).await?;
            }
        }
        self.trigger_registry()
            .await?
            .put_trigger(trigger)
            .await
            .map_err(|e| storage("storing the trigger".into(), e))
    }

    /// Deletes a trigger everywhere: its record, its schedule, its durable consumer.
    pub async fn delete_trigger(&self, name: &str) -> Result<(), TriggerOpError> {
        let trigger = self.trigger(name).await?;
        self.trigger_registry()
            .await?
            .delete_trigger(&trigger.name)
            .await
            .map_err(|e| match e.kind() {
                TriggerErrorKind::NotFound => not_found(&trigger.name),
                TriggerErrorKind::Storage => storage("deleting the trigger".into(), e),
            })?;
        let jetstream = jetstream::new(self.nats.clone());
        let consumer = trigger_consumer(&trigger.name);
        // What runtimes made for it goes too; runtimes that still run it stop within moments.
        match &trigger.source {
            TriggerSource::Schedule { .. } => {
                self.purge_schedule(&trigger.name).await?;
                if let Ok(stream) = jetstream.get_stream(SCHEDULE_STREAM).await {
                    let _ = stream.delete_consumer(&consumer).await;
                }
            }
            TriggerSource::Stream { stream, .. } => {
                if let Ok(stream) = jetstream.get_stream(stream).await {
                    let _ = stream.delete_consumer(&consumer).await;
                }
            }
            TriggerSource::Kv { bucket, .. } => {
                if let Ok(stream) = jetstream.get_stream(format!("KV_{bucket}")).await {
                    let _ = stream.delete_consumer(&consumer).await;
                }
            }
            TriggerSource::Subject { .. } => {}
        }
        Ok(())
    }

    async fn trigger_registry(
        &self,
    ) -> Result<Arc<mycelium_registry::NatsRegistry>, TriggerOpError> {
        self.registry()
            .await
            .map_err(|e| storage("opening the registry".into(), e))
    }

    /// A deployed function, or one a runtime answers for (a built-in).
    async fn check_function(
        &self,
        registry: &mycelium_registry::NatsRegistry,
        function: &FunctionName,
    ) -> Result<(), TriggerOpError> {
        if registry.contains(function) {
            return Ok(());
        }
        match self.describe(function.as_str(), None).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == RequestErrorKind::Remote(ErrorCode::FunctionNotFound) => Err(invalid(format!(
                "no function named \"{function}\"; deploy it first (`mycelium list` shows the functions)"
            ))),
            Err(e) => Err(TriggerOpError::with_source(
                TriggerOpErrorKind::Invalid,
                format!("cannot check that \"{function}\" exists (is a runtime running?)"),
                e,
            )),
        }
    }

    /// The stream of schedule definitions and ticks, made on first use.
    async fn schedule_stream(&self) -> Result<stream::Stream, TriggerOpError> {
        let prefix = &self.subjects.prefix;
        jetstream::new(self.nats.clone())
            .get_or_create_stream(stream::Config {
                name: SCHEDULE_STREAM.into(),
                subjects: vec![format!("{prefix}.schedules.>"), format!("{prefix}.ticks.>")],
                allow_message_schedules: true,
                // One definition per schedule subject; ticks are consumed and removed.
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                num_replicas: self.registry_config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| storage(format!("making the stream {SCHEDULE_STREAM}"), e))
    }

    async fn publish_schedule(&self, trigger: &Trigger) -> Result<(), TriggerOpError> {
        let Some(spec) = trigger.source.schedule_spec() else {
            return Ok(());
        };
        self.schedule_stream().await?;
        let prefix = &self.subjects.prefix;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Schedule", spec.as_str());
        headers.insert(
            "Nats-Schedule-Target",
            format!("{prefix}.ticks.{}", trigger.name).as_str(),
        );
        if let TriggerSource::Schedule { tz: Some(tz), .. } = &trigger.source {
            headers.insert("Nats-Schedule-Time-Zone", tz.as_str());
        }
        let subject = format!("{prefix}.schedules.{}", trigger.name);
        let body =
            serde_json::to_vec(&serde_json::json!({ "trigger": trigger.name })).unwrap_or_default();
        let accepted = async {
            jetstream::new(self.nats.clone())
                .publish_with_headers(subject, headers, body.into())
                .await?
                .await
        };
        accepted.await.map(drop).map_err(|e| {
            TriggerOpError::with_source(
                TriggerOpErrorKind::Invalid,
                format!("the NATS server refused the schedule {spec:?} (it needs nats-server 2.14 for --every and --cron)"),
                e,
            )
        })
    }

    async fn purge_schedule(&self, name: &TriggerName) -> Result<(), TriggerOpError> {
        let stream = self.schedule_stream().await?;
        let prefix = &self.subjects.prefix;
        for subject in [
            format!("{prefix}.schedules.{name}"),
            format!("{prefix}.ticks.{name}"),
        ] {
            stream
                .purge()
                .filter(subject)
                .await
                .map_err(|e| storage("removing the schedule".into(), e))?;
        }
        Ok(())
    }
}

fn trigger_name(name: &str) -> Result<TriggerName, TriggerOpError> {
    TriggerName::new(name).map_err(|e| invalid(e.to_string()))
}

fn not_found(name: &TriggerName) -> TriggerOpError {
    TriggerOpError::new(
        TriggerOpErrorKind::NotFound,
        mycelium_registry::trigger_not_found(name)
            .message()
            .to_owned(),
    )
}
