//! Ready-made runtimes, the Rust counterparts of the seed's constructors.

use crate::{Runtime, RuntimeBuilder, StartError};

/// The seed's `CreateExampleRuntimeService(natsURL)`: the built-in functions on an
/// in-memory registry.
pub async fn example_runtime(nats_url: &str) -> Result<Runtime, StartError> {
    RuntimeBuilder::new()
        .standard_builtins()
        .connect(nats_url)
        .await
}

/// The seed's `CreateProductionRuntimeService(natsURL)`: production settings and the
/// built-ins. Until the JetStream registry lands, deployed functions live in memory.
pub async fn production_runtime(nats_url: &str) -> Result<Runtime, StartError> {
    RuntimeBuilder::new()
        .standard_builtins()
        .connect(nats_url)
        .await
}
