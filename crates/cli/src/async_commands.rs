//! `invoke --async` and `dlq`: asynchronous invocation through JetStream.

use mycelium_client::{AsyncError, AsyncErrorKind, Client, SubmitOptions};
use mycelium_core::{ErrorCode, Event};

use crate::{
    args::{DlqArgs, DlqCommand, InvokeArgs},
    output::{error_chain, Code, Failure},
    run::print_json,
};

impl From<AsyncError> for Failure {
    fn from(error: AsyncError) -> Self {
        let code = match error.kind() {
            AsyncErrorKind::InvalidRequest => Code::Remote(ErrorCode::InvalidRequest),
            AsyncErrorKind::NoStream => Code::NoAsyncStream,
            AsyncErrorKind::StreamFull => Code::StreamFull,
            AsyncErrorKind::TimedOut => Code::NoReply,
            AsyncErrorKind::Transport => Code::Unreachable,
        };
        Failure::new(code, error_chain(&error))
    }
}

/// Submits the event and prints JetStream's acceptance.
pub async fn invoke_async(
    client: &Client,
    args: &InvokeArgs,
    event: &Event,
) -> Result<(), Failure> {
    let options = SubmitOptions {
        result_subject: args.result_subject.clone(),
        idempotency_key: args.idempotency_key.clone(),
        invocation_id: None,
    };
    let accepted = client.submit(&args.name, event, options).await?;
    print_json(&serde_json::json!({
        "invocationId": accepted.invocation_id,
        "stream": accepted.stream,
        "sequence": accepted.sequence,
        "duplicate": accepted.duplicate,
    }));
    if accepted.duplicate {
        eprintln!(
            "duplicate: the idempotency key was already accepted (sequence {}); it will not run again",
            accepted.sequence
        );
    }
    Ok(())
}

/// `mycelium dlq list|replay|purge`.
pub async fn dlq(client: &Client, args: DlqArgs) -> Result<(), Failure> {
    match args.command {
        DlqCommand::List { name, json } => {
            let letters = client.dead_letters(&name).await?;
            if json {
                let letters: Vec<_> = letters
                    .iter()
                    .map(|stored| {
                        let mut value = serde_json::to_value(&stored.letter).unwrap_or_default();
                        value["dlqSequence"] = stored.sequence.into();
                        value
                    })
                    .collect();
                print_json(&serde_json::json!({ "deadLetters": letters }));
                return Ok(());
            }
            if letters.is_empty() {
                println!("No dead letters for {name}.");
                return Ok(());
            }
            println!(
                "{:<8}  {:<24}  {:<24}  {:>8}  {:<22}  ERROR",
                "SEQ", "EVENT", "DEAD-LETTERED", "ATTEMPTS", "REASON"
            );
            for stored in &letters {
                let letter = &stored.letter;
                let reason = serde_json::to_value(letter.reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                println!(
                    "{:<8}  {:<24}  {:<24}  {:>8}  {:<22}  {}: {}",
                    stored.sequence,
                    letter
                        .event
                        .get("id")
                        .and_then(|v| v.as_str())
                        .unwrap_or("-"),
                    letter
                        .dead_lettered_at
                        .format("%Y-%m-%dT%H:%M:%SZ")
                        .to_string(),
                    letter.attempts,
                    reason,
                    letter.error.code,
                    letter.error.message
                );
            }
            Ok(())
        }
        DlqCommand::Replay { name, id } => {
            let accepted = client.replay_dead_letters(&name, id.as_deref()).await?;
            if accepted.is_empty() {
                return Err(Failure::new(
                    Code::NothingToReplay,
                    match id {
                        Some(id) => format!("no dead letter of {name} holds event {id}; `mycelium dlq list {name}` shows them"),
                        None => format!("{name} has no dead letters"),
                    },
                ));
            }
            println!("replayed {} dead letter(s) of {name}", accepted.len());
            Ok(())
        }
        DlqCommand::Purge { name } => {
            let purged = client.purge_dead_letters(&name).await?;
            println!("purged {purged} dead letter(s) of {name}");
            Ok(())
        }
    }
}
