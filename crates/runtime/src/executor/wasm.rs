//! WebAssembly functions: WASI preview 1 modules in a fresh wasmtime instance per call, run by
//! [`mycelium_wasm::WasmExecutor`].

use std::sync::Arc;

use mycelium_core::{Function, FunctionKind, FunctionMetadata, ProtocolError};
use mycelium_wasm::WasmExecutor;

use super::Executor;

#[async_trait::async_trait]
impl Executor for WasmExecutor {
    fn kind(&self) -> FunctionKind {
        FunctionKind::Wasm
    }

    fn function(
        &self,
        metadata: &Arc<FunctionMetadata>,
    ) -> Result<Arc<dyn Function>, ProtocolError> {
        Ok(WasmExecutor::function(self, metadata))
    }

    async fn prestart(&self, metadata: &Arc<FunctionMetadata>) -> Result<(), ProtocolError> {
        WasmExecutor::prestart(self, metadata).await
    }
}
