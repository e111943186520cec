//! The built-in functions every runtime ships.

use cloudevents::{AttributesReader, EventBuilder, EventBuilderV10};
use mycelium_core::{cloudevents, Event, Function, FunctionError, InvocationContext};
use serde_json::json;

/// Replies with one event, `response-<id>` from `example-function`, whose data says which
/// function processed the event (the reply shape of the protocol's examples).
pub struct Example;

#[async_trait::async_trait]
impl Function for Example {
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        let response = EventBuilderV10::new()
            .id(format!("response-{}", event.id()))
            .source("example-function")
            .ty("com.example.response")
            .data(
                "application/json",
                json!({"message": format!("Processed event {} by function {}", event.id(), ctx.function())}),
            )
            .build()
            .map_err(|e| FunctionError::with_source("building the response event", e))?;
        Ok(vec![response])
    }
}

/// Returns the input event unchanged.
pub struct Echo;

#[async_trait::async_trait]
impl Function for Echo {
    async fn execute(
        &self,
        event: Event,
        _ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        Ok(vec![event])
    }
}
