//! An example plugin: events of type `com.example.wordcount` with text (or `{"text": ...}`)
//! data get a word count back; every other event is echoed.
//!
//! Build, deploy and invoke it:
//! ```sh
//! cargo build --release -p mycelium-example-plugin
//! mycelium deploy wordcount target/release/mycelium-example-plugin
//! mycelium invoke wordcount --type com.example.wordcount --data '{"text": "to be or not to be"}'
//! ```

use mycelium_core::{
    cloudevents::{event::Data, AttributesReader, EventBuilder, EventBuilderV10},
    Event, Function, FunctionError, InvocationContext,
};
use serde_json::json;

struct WordCount;

fn text_of(event: &Event) -> Option<String> {
    match event.data()? {
        Data::String(text) => Some(text.clone()),
        Data::Json(value) => value.get("text")?.as_str().map(str::to_owned),
        Data::Binary(bytes) => String::from_utf8(bytes.clone()).ok(),
    }
}

#[async_trait::async_trait]
impl Function for WordCount {
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        if event.ty() != "com.example.wordcount" {
            return Ok(vec![event]);
        }
        let text = text_of(&event)
            .ok_or_else(|| FunctionError::new("send text data, or JSON {\"text\": \"...\"}"))?;
        let words = text.split_whitespace().count();
        let reply = EventBuilderV10::new()
            .id(format!("wordcount-{}", event.id()))
            .source(format!("mycelium/{}", ctx.function()))
            .ty("com.example.wordcount.result")
            .data(
                "application/json",
                json!({"words": words, "characters": text.chars().count()}),
            )
            .build()
            .map_err(|e| FunctionError::with_source("building the reply", e))?;
        Ok(vec![reply])
    }
}

fn main() {
    mycelium_plugin_sdk::serve(WordCount);
}
