//! Built-in functions deployed under a name of their own: a registry entry of kind `builtin`
//! runs the compiled-in function its entry point names, with its own settings.

use std::{collections::HashMap, sync::Arc};

use mycelium_core::{
    ErrorCode, Function, FunctionKind, FunctionMetadata, FunctionName, ProtocolError,
};

use super::Executor;

/// A function compiled into the runtime.
#[derive(Clone)]
pub(crate) struct Builtin {
    pub metadata: Arc<FunctionMetadata>,
    pub function: Arc<dyn Function>,
}

/// Runs deployed `builtin` entries with the runtime's compiled-in functions.
pub(crate) struct BuiltinExecutor {
    pub builtins: Arc<HashMap<FunctionName, Builtin>>,
}

#[async_trait::async_trait]
impl Executor for BuiltinExecutor {
    fn kind(&self) -> FunctionKind {
        FunctionKind::Builtin
    }

    /// Built-ins get no environment, so no secrets (a deploy refuses them).
    fn function(
        &self,
        metadata: &Arc<FunctionMetadata>,
        _secrets: &mycelium_core::secret::SecretEnv,
    ) -> Result<Arc<dyn Function>, ProtocolError> {
        let name = &metadata.name;
        let entry = metadata.entry_point.as_deref().unwrap_or(name.as_str());
        FunctionName::new(entry)
            .ok()
            .and_then(|entry| self.builtins.get(&entry))
            .map(|builtin| builtin.function.clone())
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "\"{name}\" v{} runs the built-in \"{entry}\", which this runtime does not have; \
                         deploy it with an entry point this runtime lists, or run a runtime that includes it",
                        metadata.version
                    ),
                )
            })
    }
}
