//! Plugin functions: processes speaking go-plugin's gRPC protocol, run by
//! [`mycelium_plugin::pool::PluginExecutor`].

use std::sync::Arc;

use mycelium_core::{Function, FunctionKind, FunctionMetadata, ProtocolError};
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
    ) -> Result<Arc<dyn Function>, ProtocolError> {
        Ok(PluginExecutor::function(self, metadata))
    }

    async fn prestart(&self, metadata: &Arc<FunctionMetadata>) -> Result<(), ProtocolError> {
        PluginExecutor::prestart(self, metadata).await
    }

    async fn shutdown(&self) {
        PluginExecutor::shutdown(self).await;
    }
}
