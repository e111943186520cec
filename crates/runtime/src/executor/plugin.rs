//! Plugin functions: processes speaking go-plugin's gRPC protocol, run by
//! [`mycelium_plugin::pool::PluginExecutor`].

use std::sync::Arc;

use mycelium_core::{secret::SecretEnv, Function, FunctionKind, FunctionMetadata, ProtocolError};
use mycelium_plugin::pool::PluginExecutor;

use super::Executor;

#[async_trait::async_trait]
impl Executor for PluginExecutor {
    fn kind(&self) -> FunctionKind {
        FunctionKind::Plugin
    }

    fn function(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Result<Arc<dyn Function>, ProtocolError> {
        Ok(PluginExecutor::function(self, metadata, secrets))
    }

    async fn prestart(
        &self,
        metadata: &Arc<FunctionMetadata>,
        secrets: &SecretEnv,
    ) -> Result<(), ProtocolError> {
        PluginExecutor::prestart(self, metadata, secrets).await
    }

    async fn shutdown(&self) {
        PluginExecutor::shutdown(self).await;
    }
}
