//! `trigger add|list|describe|delete|pause|resume`.

use mycelium_client::{
    Client, Deliver, Trigger, TriggerOpError, TriggerOpErrorKind, TriggerSource,
};
use mycelium_core::{ErrorCode, FunctionName};

use crate::{
    args::{DeliverArg, TriggerAddArgs, TriggerArgs, TriggerCommand},
    output::{error_chain, Code, Failure},
    run::print_json,
};

impl From<TriggerOpError> for Failure {
    fn from(error: TriggerOpError) -> Self {
        let code = match error.kind() {
            TriggerOpErrorKind::Invalid => Code::InvalidTrigger,
            TriggerOpErrorKind::NotFound => Code::TriggerNotFound,
            TriggerOpErrorKind::Storage => Code::Registry,
        };
        Failure::new(code, error_chain(&error))
    }
}

fn name(text: &str, what: &str) -> Result<FunctionName, Failure> {
    FunctionName::new(text).map_err(|e| {
        Failure::new(
            Code::Remote(ErrorCode::InvalidFunctionName),
            format!("{what}: {e}"),
        )
    })
}

fn trigger_of(args: TriggerAddArgs) -> Result<Trigger, Failure> {
    let source = args.source;
    let source = if let Some(subject) = source.subject {
        TriggerSource::Subject { subject }
    } else if let Some(stream) = source.stream {
        TriggerSource::Stream {
            stream,
            filter: args.filter,
            deliver: match args.deliver {
                DeliverArg::New => Deliver::New,
                DeliverArg::All => Deliver::All,
            },
        }
    } else if let Some(bucket) = source.kv {
        TriggerSource::Kv {
            bucket,
            key: args.key,
        }
    } else {
        TriggerSource::Schedule {
            cron: source.cron,
            tz: args.tz,
            every: source.every,
        }
    };
    Ok(Trigger {
        name: name(&args.name, "the trigger's name")?,
        function: name(&args.function, "--function")?,
        source,
        then: args.then,
        paused: false,
        created_at: None,
    })
}

pub async fn trigger(client: &Client, args: TriggerArgs) -> Result<(), Failure> {
    match args.command {
        TriggerCommand::Add(args) => {
            let trigger = trigger_of(*args)?;
            let (name, function) = (trigger.name.clone(), trigger.function.clone());
            let source = trigger.source.describe();
            client.add_trigger(trigger).await?;
            println!("trigger {name}: {source} -> {function}");
        }
        TriggerCommand::List { json } => {
            let triggers = client.triggers().await?;
            if json {
                let triggers: Vec<&Trigger> = triggers.iter().map(|t| &**t).collect();
                print_json(&serde_json::json!({ "triggers": triggers }));
                return Ok(());
            }
            if triggers.is_empty() {
                println!("No triggers.");
                return Ok(());
            }
            println!(
                "{:<24}  {:<24}  {:<8}  {:<32}  THEN",
                "NAME", "FUNCTION", "STATE", "SOURCE"
            );
            for t in &triggers {
                println!(
                    "{:<24}  {:<24}  {:<8}  {:<32}  {}",
                    t.name.as_str(),
                    t.function.as_str(),
                    if t.paused { "paused" } else { "active" },
                    t.source.describe(),
                    t.then.as_deref().unwrap_or("-")
                );
            }
        }
        TriggerCommand::Describe { name } => {
            let trigger = client.trigger(&name).await?;
            print_json(&serde_json::to_value(&*trigger).unwrap_or_default());
        }
        TriggerCommand::Delete { name } => {
            client.delete_trigger(&name).await?;
            println!("deleted trigger {name}");
        }
        TriggerCommand::Pause { name } => {
            client.set_trigger_paused(&name, true).await?;
            println!("paused trigger {name}");
        }
        TriggerCommand::Resume { name } => {
            client.set_trigger_paused(&name, false).await?;
            println!("resumed trigger {name}");
        }
    }
    Ok(())
}
