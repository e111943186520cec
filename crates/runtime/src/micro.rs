//! The NATS services API ("micro", ADR-32) for the runtime: answers `$SRV.PING`,
//! `$SRV.INFO` and `$SRV.STATS` so `nats micro ls` and friends list Mycelium.
//!
//! The wire types are async-nats's own (`async_nats::service::{Info, PingResponse,
//! Stats}`); only the responder is ours. async-nats's `Service` endpoints can only
//! unsubscribe, which drops requests the server already routed to us, so a graceful
//! shutdown would lose them. Our endpoints are plain queue subscriptions that we
//! *drain* (UNSUB, then a PING round trip, then close) and serve to the last message.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_nats::service::{self, endpoint};
use futures_util::StreamExt;

const API_PREFIX: &str = "$SRV";

/// Counters of one endpoint, updated on every reply without locks (but for the last error).
#[derive(Debug, Default)]
pub(crate) struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_nanos: AtomicU64,
    last_error: Mutex<Option<service::error::Error>>,
}

impl EndpointStats {
    pub fn record(&self, elapsed: Duration, error: Option<(u16, &str)>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.processing_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some((code, status)) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(service::error::Error {
                    code: usize::from(code),
                    status: status.to_owned(),
                });
        }
    }

    fn snapshot(&self, info: &endpoint::Info) -> endpoint::Stats {
        let requests = self.requests.load(Ordering::Relaxed);
        let processing_time = Duration::from_nanos(self.processing_nanos.load(Ordering::Relaxed));
        endpoint::Stats {
            name: info.name.clone(),
            subject: info.subject.clone(),
            requests: usize::try_from(requests).unwrap_or(usize::MAX),
            errors: usize::try_from(self.errors.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
            processing_time,
            average_processing_time: if requests == 0 {
                Duration::ZERO
            } else {
                processing_time / u32::try_from(requests).unwrap_or(u32::MAX)
            },
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            data: None,
            queue_group: info.queue_group.clone(),
        }
    }
}

/// Extra figures an endpoint reports in `$SRV.STATS` (its `data` field).
pub(crate) type StatsData = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// One endpoint as the services API describes it, with its counters.
pub(crate) struct EndpointEntry {
    pub info: endpoint::Info,
    pub stats: Arc<EndpointStats>,
    pub data: Option<StatsData>,
}

/// The running `$SRV` responder. Dropping it stops answering.
pub(crate) struct MicroService {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MicroService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MicroService {
    /// Subscribes to the `$SRV` verbs for `name` and answers them.
    pub async fn start(
        client: async_nats::Client,
        name: &str,
        version: &str,
        description: &str,
        metadata: HashMap<String, String>,
        endpoints: Vec<EndpointEntry>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let id = nuid::next().to_string();
        let mut subscriptions = Vec::with_capacity(9);
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("{API_PREFIX}.{verb}"),
                format!("{API_PREFIX}.{verb}.{name}"),
                format!("{API_PREFIX}.{verb}.{name}.{id}"),
            ] {
                subscriptions.push(client.subscribe(subject).await?);
            }
        }
        let ping = service::PingResponse {
            kind: "io.nats.micro.v1.ping_response".into(),
            name: name.into(),
            id: id.clone(),
            version: version.into(),
            metadata: metadata.clone(),
        };
        let info = service::Info {
            kind: "io.nats.micro.v1.info_response".into(),
            name: name.into(),
            id: id.clone(),
            description: description.into(),
            version: version.into(),
            metadata,
            endpoints: endpoints.iter().map(|e| e.info.clone()).collect(),
        };
        let started = async_nats::datetime::now();
        let prefix_len = API_PREFIX.len() + 1;
        let task = tokio::spawn(async move {
            let mut requests = futures_util::stream::select_all(subscriptions);
            while let Some(message) = requests.next().await {
                let Some(reply) = message.reply else { continue };
                let verb = message.subject.get(prefix_len..).unwrap_or_default();
                let body = if verb.starts_with("PING") {
                    serde_json::to_vec(&ping)
                } else if verb.starts_with("INFO") {
                    serde_json::to_vec(&info)
                } else {
                    serde_json::to_vec(&service::Stats {
                        kind: "io.nats.micro.v1.stats_response".into(),
                        name: info.name.clone(),
                        id: info.id.clone(),
                        version: info.version.clone(),
                        started,
                        endpoints: endpoints
                            .iter()
                            .map(|e| {
                                let mut stats = e.stats.snapshot(&e.info);
                                stats.data = e.data.as_ref().map(|data| data());
                                stats
                            })
                            .collect(),
                    })
                };
                match body {
                    Ok(body) => {
                        if let Err(error) = client.publish(reply, body.into()).await {
                            tracing::debug!(%error, "answering a $SRV request failed");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "encoding a $SRV reply failed"),
                }
            }
        });
        Ok(Self { task })
    }
}
