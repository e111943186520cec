//! WebAssembly functions: WASI preview 1 modules in a fresh wasmtime instance per call, run by
//! [`mycelium_wasm::WasmExecutor`].

use std::sync::Arc;

use mycelium_core::{secret::SecretEnv, Function, FunctionKind, FunctionMetadata, ProtocolError};
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
        secrets: &SecretEnv,
    ) -> Result<Arc<dyn Function>, ProtocolError> {
        Ok(WasmExecutor::function_with(self, metadata, secrets))
    }

    /// Only the module is loaded ahead: instances are made per call, with the secrets of the
    /// moment.
    async fn prestart(
        &self,
        metadata: &Arc<FunctionMetadata>,
        _secrets: &SecretEnv,
    ) -> Result<(), ProtocolError> {
        WasmExecutor::prestart(self, metadata).await
    }
}
