//! Ready-made runtimes, the Rust counterparts of the seed's constructors.

use std::sync::Arc;

use mycelium_registry::{NatsRegistry, NatsRegistryConfig};

use crate::{Runtime, RuntimeBuilder, StartError, StartErrorKind};

/// The seed's `CreateExampleRuntimeService(natsURL)`: the built-in functions on an
/// in-memory registry.
pub async fn example_runtime(nats_url: &str) -> Result<Runtime, StartError> {
    RuntimeBuilder::new()
        .standard_builtins()
        .connect(nats_url)
        .await
}

/// The seed's `CreateProductionRuntimeService(natsURL)`: the built-ins plus every function
/// deployed to the JetStream registry (default buckets), hot-reloaded as it changes.
pub async fn production_runtime(nats_url: &str) -> Result<Runtime, StartError> {
    let client = crate::connect(nats_url).await?;
    let registry = open_registry(client.clone(), NatsRegistryConfig::default()).await?;
    RuntimeBuilder::new()
        .standard_builtins()
        .registry(registry)
        .build(client)
}

/// Opens the JetStream registry for a runtime.
pub async fn open_registry(
    client: async_nats::Client,
    config: NatsRegistryConfig,
) -> Result<Arc<NatsRegistry>, StartError> {
    NatsRegistry::open(client, config)
        .await
        .map(Arc::new)
        .map_err(|e| {
            StartError::with_source(
                StartErrorKind::Registry,
                "opening the JetStream registry",
                e,
            )
        })
}
