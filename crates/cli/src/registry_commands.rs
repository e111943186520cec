//! `deploy`, `versions`, `rollback`, `delete`: straight to the JetStream registry.

use std::{collections::BTreeMap, io::IsTerminal, sync::Arc, time::Instant};

use mycelium_client::{
    Client, DeleteErrorKind, DeployErrorKind, DeploySpec, NatsRegistry, OpenErrorKind,
    RegistryAdmin, RollbackErrorKind,
};
use mycelium_core::{ErrorCode, FunctionKind, FunctionName};

use crate::{
    args::{DeleteArgs, DeployArgs, RollbackArgs, VersionsArgs},
    output::{error_chain, human_size, short_digest, Code, Failure},
    run::print_json,
};

async fn registry(client: &Client) -> Result<Arc<NatsRegistry>, Failure> {
    client.registry().await.map_err(|e| {
        let code = match e.kind() {
            OpenErrorKind::NoJetStream => Code::NoJetstream,
            OpenErrorKind::Storage => Code::Registry,
        };
        Failure::new(code, error_chain(&e))
    })
}

fn function_name(text: &str) -> Result<FunctionName, Failure> {
    FunctionName::new(text)
        .map_err(|e| Failure::new(Code::Remote(ErrorCode::InvalidFunctionName), e.to_string()))
}

fn json_value(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

pub async fn deploy(client: &Client, args: DeployArgs) -> Result<(), Failure> {
    let name = function_name(&args.name)?;
    let mut spec = match (&args.path, &args.builtin) {
        // The file's first bytes say its kind: a WebAssembly module, else a plugin program.
        (Some(path), _) => DeploySpec::of_file(name, path.clone())
            .await
            .map_err(|e| deploy_failure(&e))?,
        (None, Some(entry)) => DeploySpec::builtin(name, entry),
        (None, None) => unreachable!("clap requires PATH or --builtin"),
    };
    spec.description = args.description;
    spec.timeout = args.timeout;
    spec.memory_mb = args.memory_mb;
    spec.max_concurrency = args.max_concurrency;
    spec.env = args.env.into_iter().collect::<BTreeMap<_, _>>();
    spec.labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
    for (variable, secret) in args.secrets {
        let secret = mycelium_core::secret::SecretName::new(&secret).map_err(|e| {
            Failure::new(
                Code::Remote(ErrorCode::InvalidRequest),
                format!("--secret {variable}={secret}: {e}"),
            )
        })?;
        spec.secrets.insert(variable, secret);
    }
    spec.asynchronous = mycelium_core::AsyncSettings {
        retries: args.retries,
        retry_backoff: args.retry_backoff,
        max_event_age: args.max_event_age,
        on_success: args.on_success,
        on_failure: args.on_failure,
    };
    if let Some(path) = &args.sign_key {
        let seed = std::fs::read_to_string(path).map_err(|e| {
            Failure::new(
                Code::Remote(ErrorCode::InvalidRequest),
                format!("cannot read the signing key {}: {e}", path.display()),
            )
        })?;
        let key = mycelium_registry::SigningKey::from_seed(&seed)
            .map_err(|e| Failure::new(Code::Remote(ErrorCode::InvalidRequest), error_chain(&e)))?;
        spec.signing_key = Some(key);
    }

    // A progress bar only for a person watching; piped output stays clean.
    let bar = (spec.kind != FunctionKind::Builtin && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_message("uploading");
        bar
    });
    if let Some(bar) = &bar {
        let bar = bar.clone();
        spec.progress = Some(Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        }));
    }

    let registry = registry(client).await?;
    if !args.replace_builtin {
        refuse_builtin_name(client, &registry, &spec.name).await?;
    }
    let started = Instant::now();
    let result = registry.deploy(spec).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let metadata = result.map_err(|e| deploy_failure(&e))?;
    if args.json {
        print_json(&json_value(&metadata.redacted()));
    } else {
        println!(
            "deployed {} v{} ({}, {}) in {:.2}s",
            metadata.name,
            metadata.version,
            metadata.entry_point.as_deref().map_or_else(
                || short_digest(metadata.digest.as_deref()),
                |e| format!("built-in {e}")
            ),
            human_size(metadata.size),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn deploy_failure(e: &mycelium_client::DeployError) -> Failure {
    let code = match e.kind() {
        DeployErrorKind::InvalidSpec => Code::Remote(ErrorCode::InvalidRequest),
        DeployErrorKind::ArtifactUnreadable => Code::ArtifactUnreadable,
        DeployErrorKind::ArtifactEmpty => Code::ArtifactEmpty,
        DeployErrorKind::ArtifactTooLarge => Code::Remote(ErrorCode::PayloadTooLarge),
        DeployErrorKind::NotExecutable => Code::NotExecutable,
        DeployErrorKind::Storage => Code::Registry,
    };
    Failure::new(code, error_chain(e))
}

/// A name the runtimes answer with a compiled-in built-in (listed as one, with nothing of it in
/// the registry) is taken: deploying there would silently replace it for every caller. When
/// no runtime answers, there is nothing to compare with and the deploy goes ahead.
async fn refuse_builtin_name(
    client: &Client,
    registry: &NatsRegistry,
    name: &FunctionName,
) -> Result<(), Failure> {
    let Ok(functions) = client.list().await else {
        return Ok(());
    };
    let builtin = functions
        .iter()
        .any(|f| &f.name == name && f.kind == FunctionKind::Builtin);
    if builtin && registry.versions(name).is_err() {
        return Err(Failure::new(Code::BuiltinName, format!("\"{name}\" is a built-in function of the running runtimes; deploying under its name would replace it for every caller: pick another name, or pass --replace-builtin to replace it")));
    }
    Ok(())
}

pub async fn versions(client: &Client, args: VersionsArgs) -> Result<(), Failure> {
    let name = function_name(&args.name)?;
    let registry = registry(client).await?;
    let versions = registry
        .versions(&name)
        .map_err(|e| Failure::new(Code::Remote(ErrorCode::FunctionNotFound), e.to_string()))?;
    if args.json {
        let list: Vec<serde_json::Value> = versions
            .versions
            .iter()
            .map(|m| json_value(&m.redacted()))
            .collect();
        print_json(&serde_json::json!({"name": name, "active": versions.active, "versions": list}));
        return Ok(());
    }
    println!(
        "{:>7}  {:<6}  {:<8}  {:>9}  {:<19}  {:<20}  DESCRIPTION",
        "VERSION", "ACTIVE", "KIND", "SIZE", "DIGEST", "CREATED"
    );
    for meta in versions.versions.iter().rev() {
        println!(
            "{:>7}  {:<6}  {:<8}  {:>9}  {:<19}  {:<20}  {}",
            meta.version,
            if Some(meta.version) == versions.active {
                "*"
            } else {
                ""
            },
            meta.kind.to_string(),
            human_size(meta.size),
            short_digest(meta.digest.as_deref()),
            meta.created_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            meta.description
        );
    }
    Ok(())
}

pub async fn rollback(client: &Client, args: RollbackArgs) -> Result<(), Failure> {
    let name = function_name(&args.name)?;
    let registry = registry(client).await?;
    let metadata = registry.rollback(&name, args.to).await.map_err(|e| {
        let code = match e.kind() {
            RollbackErrorKind::FunctionNotFound => Code::Remote(ErrorCode::FunctionNotFound),
            RollbackErrorKind::VersionNotFound => Code::Remote(ErrorCode::VersionNotFound),
            RollbackErrorKind::Storage => Code::Registry,
        };
        Failure::new(code, error_chain(&e))
    })?;
    println!("{} now runs version {}", metadata.name, metadata.version);
    Ok(())
}

pub async fn delete(client: &Client, args: DeleteArgs) -> Result<(), Failure> {
    let name = function_name(&args.name)?;
    let registry = registry(client).await?;
    registry.delete(&name).await.map_err(|e| {
        let code = match e.kind() {
            DeleteErrorKind::FunctionNotFound => Code::Remote(ErrorCode::FunctionNotFound),
            DeleteErrorKind::Storage => Code::Registry,
        };
        Failure::new(code, error_chain(&e))
    })?;
    println!("deleted {name}");
    Ok(())
}
