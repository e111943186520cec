//! The subcommands.

use std::{io::Read, path::Path, time::Duration};

use mycelium_client::{
    Client, ConnectOptions, InvokeOptions, NatsRegistryConfig, RequestErrorKind, RuntimeKey,
};
use mycelium_core::{
    cloudevents::{EventBuilder, EventBuilderV10},
    envelope, ErrorCode, Event,
};
use mycelium_natsd::{NatsServer, ServerOptions, SpawnErrorKind};
use mycelium_plugin::pool::PoolSettings;
use mycelium_runtime::{
    presets::Assembly, AsyncConfig, RuntimeConfig, RuntimeHandle, StartErrorKind,
};

use crate::{
    args::{
        Cli, Command, ConnectionArgs, DescribeArgs, InvokeArgs, ListArgs, LogsArgs, RegistryArgs,
        RegistryKind, RuntimeArgs, ServeArgs, UpArgs,
    },
    async_commands,
    output::{error_chain, Code, Failure},
    registry_commands, secret_commands, trigger_commands,
};

pub async fn run(cli: Cli) -> Result<(), Failure> {
    match (&cli.connection.user, &cli.connection.password) {
        (Some(_), None) => {
            return Err(Failure::new(
                Code::Usage,
                "--user needs a password: pass --password or set NATS_PASSWORD",
            ))
        }
        (None, Some(_)) => {
            return Err(Failure::new(
                Code::Usage,
                "a password needs a user: pass --user or set NATS_USER",
            ))
        }
        _ => {}
    }
    let connection = Connection {
        args: &cli.connection,
        registry: registry_config(&cli.registry),
    };
    match cli.command {
        Command::Up(args) => up(&connection, args).await,
        Command::Serve(args) => serve(&connection, args).await,
        Command::Invoke(args) => invoke(&connection, args).await,
        Command::List(args) => list(&connection, args).await,
        Command::Describe(args) => describe(&connection, args).await,
        Command::Deploy(args) => registry_commands::deploy(&client(&connection).await?, args).await,
        Command::Versions(args) => {
            registry_commands::versions(&client(&connection).await?, args).await
        }
        Command::Rollback(args) => {
            registry_commands::rollback(&client(&connection).await?, args).await
        }
        Command::Delete(args) => registry_commands::delete(&client(&connection).await?, args).await,
        Command::Stats(args) => stats(&connection, args).await,
        Command::Top(args) => top(&connection, args).await,
        Command::Logs(args) => logs(&connection, args).await,
        Command::Dlq(args) => async_commands::dlq(&client(&connection).await?, args).await,
        Command::Trigger(args) => {
            trigger_commands::trigger(&client(&connection).await?, args).await
        }
        Command::Secret(args) => secret_commands::secret(&client(&connection).await?, args).await,
    }
}

/// Everything a command needs to reach NATS and the registry.
pub struct Connection<'a> {
    args: &'a ConnectionArgs,
    registry: NatsRegistryConfig,
}

fn registry_config(args: &RegistryArgs) -> NatsRegistryConfig {
    NatsRegistryConfig {
        functions_bucket: args.functions_bucket.clone(),
        artifacts_bucket: args.artifacts_bucket.clone(),
        secrets_bucket: args.secrets_bucket.clone(),
        replicas: args.replicas,
        keep_versions: args.keep_versions,
        max_artifact_size: args.max_artifact_size,
    }
}

fn connect_options(connection: &Connection<'_>) -> ConnectOptions {
    let registry = connection.registry.clone();
    let connection = connection.args;
    let mut options = ConnectOptions::new(&connection.nats_url);
    options.user_password = connection.user.clone().zip(connection.password.clone());
    options.token = connection.token.clone();
    options.credentials_file = connection.creds.clone();
    options.tls_ca = connection.tls_ca.clone();
    options.nkey_file = connection.nkey.clone();
    options.tls_client_cert = connection.tls_cert.clone().zip(connection.tls_key.clone());
    options.subject_prefix = connection.subject_prefix.clone();
    options.registry = registry;
    options
}

fn runtime_config(connection: &Connection<'_>, args: &RuntimeArgs) -> RuntimeConfig {
    let registry = &connection.registry;
    let connection = connection.args;
    RuntimeConfig {
        subject_prefix: connection.subject_prefix.clone(),
        queue_group: args.queue_group.clone(),
        max_in_flight: args.max_in_flight,
        max_concurrency: args.max_concurrency,
        max_payload: args.max_payload,
        default_timeout: args.default_timeout,
        shutdown_grace: args.shutdown_grace,
        asynchronous: AsyncConfig {
            enabled: !args.no_async,
            replicas: registry.replicas,
            duplicate_window: args.async_duplicate_window,
            max_messages: args.async_max_messages,
            max_bytes: args.async_max_bytes,
            ack_wait: args.async_ack_wait,
            result_subjects: args.result_subjects.clone(),
            ..AsyncConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

/// The runtime's xkey: `--xkey-seed-file`, else `MYCELIUM_XKEY_SEED`, else (for `up`) the
/// seed file in its data directory, made on first start.
fn runtime_key(
    args: &RuntimeArgs,
    default_seed_file: Option<&Path>,
) -> Result<Option<RuntimeKey>, Failure> {
    let invalid = |e: mycelium_client::SecretError| Failure::new(Code::Config, error_chain(&e));
    if let Some(path) = &args.xkey_seed_file {
        return RuntimeKey::read(path).map(Some).map_err(invalid);
    }
    if let Some(seed) = std::env::var("MYCELIUM_XKEY_SEED")
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        return RuntimeKey::from_seed(&seed).map(Some).map_err(|e| {
            Failure::new(
                Code::Config,
                format!("MYCELIUM_XKEY_SEED: {}", error_chain(&e)),
            )
        });
    }
    let Some(path) = default_seed_file else {
        return Ok(None);
    };
    let (key, created) = RuntimeKey::read_or_create(path).map_err(invalid)?;
    if created {
        tracing::info!(path = %path.display(), public_xkey = %key.public_key(), "made this runtime's xkey; keep the file to keep opening the secrets sealed for it");
    }
    Ok(Some(key))
}

async fn start_runtime(
    nats: mycelium_client::async_nats::Client,
    connection: &Connection<'_>,
    args: &RuntimeArgs,
    default_plugin_dir: &Path,
    xkey: Option<RuntimeKey>,
) -> Result<RuntimeHandle, Failure> {
    let mut config = runtime_config(connection, args);
    config.prestart_plugins = !args.no_prestart;
    let logs = crate::output::function_logs();
    let tracing = args.otlp_endpoint.is_some().then(|| {
        std::sync::Arc::new(mycelium_observability::OtelBridge)
            as std::sync::Arc<dyn mycelium_core::TraceBridge>
    });
    let mut metrics: Option<std::sync::Arc<dyn mycelium_core::MetricsCollector>> = None;
    if let Some(addr) = args.metrics_addr {
        let prometheus = std::sync::Arc::new(mycelium_observability::PrometheusMetrics::new());
        let (bound, _serving) = mycelium_observability::serve_metrics(addr, prometheus.clone())
            .await
            .map_err(|e| {
                Failure::new(
                    Code::MetricsAddr,
                    format!("cannot serve metrics on {addr}: {e}"),
                )
            })?;
        tracing::info!(%bound, "serving Prometheus metrics at /metrics");
        prometheus.watch_nats(&nats);
        metrics = Some(prometheus);
    }
    let assembly = Assembly {
        config,
        registry: connection.registry.clone(),
        plugin_dir: args
            .plugin_dir
            .clone()
            .unwrap_or_else(|| default_plugin_dir.to_owned()),
        plugin_cache_size: args.plugin_cache_size,
        plugins: PoolSettings {
            max_processes: args
                .plugin_max_processes
                .unwrap_or_else(mycelium_plugin::pool::default_max_processes),
            concurrency_per_process: args.plugin_concurrency,
            idle_timeout: args.plugin_idle_timeout,
            trusted_signers: args.trusted_keys.clone(),
            log_lines_per_second: args.plugin_log_lines,
            cgroups: !args.no_plugin_cgroups,
            offer_frames: !args.plugin_grpc_only,
            busy_poll: Duration::from_micros(args.plugin_busy_poll_us),
            ..PoolSettings::default()
        },
        wasm: mycelium_wasm::WasmSettings::default(),
        xkey,
        metrics,
        logs,
        tracing,
    };
    let built = match args.registry {
        RegistryKind::Jetstream => assembly.build(nats).await.map(|built| built.runtime),
        RegistryKind::Memory => assembly.build_builtins_only(nats),
    };
    let runtime = built.map_err(|e| {
        let code = match e.kind() {
            StartErrorKind::Registry => Code::Registry,
            StartErrorKind::PluginDir => Code::PluginDir,
            _ => Code::Config,
        };
        Failure::new(code, error_chain(&e))
    })?;
    runtime
        .start()
        .await
        .map_err(|e| Failure::new(Code::Start, error_chain(&e)))
}

async fn up(connection: &Connection<'_>, args: UpArgs) -> Result<(), Failure> {
    let nats_dir = args.data_dir.join("nats");
    let mut options = ServerOptions::new(&nats_dir);
    options.host = args.listen.ip().to_string();
    options.port = Some(args.listen.port());
    options.die_with_parent = true;
    options.lock_dir = true;
    // On this thread, not a blocking-pool one: the server's parent-death signal follows the
    // thread that spawned it, and this one (main, under block_on) lives as long as we do.
    // Nothing else runs on it while the server starts.
    let mut server = NatsServer::spawn(&options)
        .map_err(|e| {
            if e.kind() == SpawnErrorKind::Locked {
                return Failure::new(Code::DataDirInUse, e.to_string());
            }
            let mut message = error_chain(&e);
            if e.kind() == SpawnErrorKind::Failed && message.contains("address already in use") {
                message.push_str(&format!(
                    "\n{} is taken: stop what uses it, or pick another address with --listen 127.0.0.1:<port>",
                    args.listen
                ));
            }
            Failure::new(Code::NatsServer, message)
        })?;
    let url = server.url().to_owned();

    let mut options = connect_options(connection);
    options.url = url.clone();
    options.name = "mycelium-runtime".into();
    let result = async {
        let xkey = runtime_key(&args.runtime, Some(&args.data_dir.join("xkey.seed")))?;
        let public_xkey = xkey.as_ref().map(RuntimeKey::public_key);
        let nats = options.connect_nats().await?;
        let handle = start_runtime(
            nats.clone(),
            connection,
            &args.runtime,
            &args.data_dir.join("plugins"),
            xkey,
        )
        .await?;
        Ok::<_, Failure>((nats, handle, public_xkey))
    }
    .await;
    let (nats, handle, public_xkey) = match result {
        Ok(started) => started,
        Err(failure) => {
            server.stop(Duration::from_secs(5));
            return Err(failure);
        }
    };

    print_welcome(
        &url,
        &args.data_dir,
        &connection.args.subject_prefix,
        public_xkey.as_deref(),
    );
    let stop_reason = tokio::select! {
        signal = shutdown_signal() => signal,
        () = watch_exit(&mut server) => "nats-server exited",
    };
    tracing::info!(reason = stop_reason, "stopping");
    handle.shutdown().await;
    close(&nats).await;
    tokio::task::spawn_blocking(move || server.stop(Duration::from_secs(10)))
        .await
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    if stop_reason == "nats-server exited" {
        return Err(Failure::new(
            Code::NatsServer,
            format!(
                "the embedded nats-server stopped unexpectedly; see {}",
                nats_dir.join("nats-server.log").display()
            ),
        ));
    }
    println!("Mycelium stopped.");
    Ok(())
}

/// Resolves when the child nats-server has exited (checked twice a second: there is no
/// exit notification for a std child we also need to signal).
async fn watch_exit(server: &mut NatsServer) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if server.has_exited() {
            return;
        }
    }
}

fn print_welcome(url: &str, data_dir: &Path, prefix: &str, public_xkey: Option<&str>) {
    let request = serde_json::json!({
        "functionName": "example",
        "event": {"id": "1", "source": "cli", "type": "com.example.test", "data": {"key": "value"}}
    });
    println!("Mycelium is up.");
    println!("  NATS:      {url}");
    println!("  Data:      {}", data_dir.display());
    println!("  Functions: echo, example");
    if let Some(public_xkey) = public_xkey {
        // The public half only: `mycelium secret set` seals for it.
        println!("  Secrets:   sealed for {public_xkey}");
    }
    println!();
    println!("Try it:");
    let url_flag = if url == "nats://127.0.0.1:4222" {
        String::new()
    } else {
        format!(" --nats-url {url}")
    };
    println!("  mycelium{url_flag} invoke example --data '{{\"key\": \"value\"}}'");
    println!("  nats --server {url} request {prefix}.invoke '{request}'");
    println!();
    println!("Press Ctrl-C to stop.");
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return "interrupt";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupt",
        _ = terminate.recv() => "terminate",
    }
}

async fn serve(connection: &Connection<'_>, args: ServeArgs) -> Result<(), Failure> {
    let mut options = connect_options(connection);
    options.name = "mycelium-runtime".into();
    let xkey = runtime_key(&args.runtime, None)?;
    let nats = options.connect_nats().await?;
    let handle = start_runtime(
        nats.clone(),
        connection,
        &args.runtime,
        Path::new(".mycelium/plugins"),
        xkey,
    )
    .await?;
    tracing::info!(nats_url = %mycelium_client::redact_url(&connection.args.nats_url), "serving; Ctrl-C or SIGTERM stops gracefully");
    let reason = shutdown_signal().await;
    tracing::info!(reason, "stopping");
    handle.shutdown().await;
    close(&nats).await;
    Ok(())
}

/// Closes the runtime's NATS connection after a shutdown (the registry watch and the log
/// publisher hold clones), so it does not try to reconnect while the process exits.
/// Bounded: with the server gone, a drain would wait for a reconnect that may never come.
async fn close(nats: &mycelium_client::async_nats::Client) {
    match tokio::time::timeout(Duration::from_secs(1), nats.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "closing the NATS connection"),
        Err(_) => tracing::debug!("NATS is unreachable; closing without draining"),
    }
}

async fn client(connection: &Connection<'_>) -> Result<Client, Failure> {
    Ok(connect_options(connection).connect().await?)
}

fn read_data(data: &str) -> Result<Vec<u8>, Failure> {
    let read_failed = |what: &str, e: std::io::Error| {
        Failure::new(Code::InvalidData, format!("reading {what}: {e}"))
    };
    if data == "-" {
        let mut buffer = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buffer)
            .map_err(|e| read_failed("stdin", e))?;
        Ok(buffer)
    } else if let Some(path) = data.strip_prefix('@') {
        std::fs::read(path).map_err(|e| read_failed(path, e))
    } else {
        Ok(data.as_bytes().to_vec())
    }
}

fn build_event(args: &InvokeArgs) -> Result<Event, Failure> {
    let invalid = |message: String| Failure::new(Code::Remote(ErrorCode::InvalidEvent), message);
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", nuid::next()));
    let mut builder = EventBuilderV10::new()
        .id(id)
        .source(&args.source)
        .ty(&args.event_type);
    if let Some(data) = &args.data {
        let bytes = read_data(data)?;
        let content_type = args.content_type.as_deref().unwrap_or("application/json");
        builder = if content_type.contains("json") {
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                invalid(format!(
                    "--data is not valid JSON ({e}); pass --content-type text/plain to send text"
                ))
            })?;
            builder.data(content_type, value)
        } else {
            match String::from_utf8(bytes) {
                Ok(text) => builder.data(content_type, text),
                Err(e) => builder.data(content_type, e.into_bytes()),
            }
        };
    }
    builder
        .build()
        .map_err(|e| invalid(format!("cannot build the event: {e}")))
}

async fn invoke(connection: &Connection<'_>, args: InvokeArgs) -> Result<(), Failure> {
    let event = build_event(&args)?;
    let mut client = client(connection).await?;
    if args.asynchronous {
        return async_commands::invoke_async(&client, &args, &event).await;
    }
    if args.retries > 0 {
        client = client.with_retry(mycelium_client::RetryPolicy {
            attempts: args.retries.saturating_add(1),
            ..Default::default()
        });
    }
    let options = InvokeOptions {
        version: args.version,
        timeout: Some(args.timeout),
        ..Default::default()
    };
    let events = client.invoke_with(&args.name, &event, options).await?;
    let reply: serde_json::Value = serde_json::from_slice(&envelope::encode_events(&events))
        .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    print_json(&reply);
    Ok(())
}

async fn list(connection: &Connection<'_>, args: ListArgs) -> Result<(), Failure> {
    let functions = client(connection).await?.list().await?;
    if args.json {
        print_json(&serde_json::json!({ "functions": functions }));
        return Ok(());
    }
    if functions.is_empty() {
        println!("No functions.");
        return Ok(());
    }
    let width = functions
        .iter()
        .map(|f| f.name.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:>7}  {:<8}  {:>9}  {:<19}  DESCRIPTION",
        "NAME", "VERSION", "KIND", "SIZE", "DIGEST"
    );
    for function in &functions {
        println!(
            "{:<width$}  {:>7}  {:<8}  {:>9}  {:<19}  {}",
            function.name.as_str(),
            function.version,
            function.kind.to_string(),
            crate::output::human_size(function.size),
            crate::output::short_digest(function.digest.as_deref()),
            function.description
        );
    }
    Ok(())
}

async fn describe(connection: &Connection<'_>, args: DescribeArgs) -> Result<(), Failure> {
    let metadata = client(connection)
        .await?
        .describe(&args.name, args.version)
        .await?;
    let value =
        serde_json::to_value(&metadata).map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
    if args.json {
        print_json(&value);
        return Ok(());
    }
    if let serde_json::Value::Object(fields) = value {
        let width = fields.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in fields {
            let shown = match value {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            };
            println!("{key:<width$}  {shown}");
        }
    }
    Ok(())
}

async fn stats(connection: &Connection<'_>, args: crate::args::StatsArgs) -> Result<(), Failure> {
    let client = client(connection).await?;
    let mut stats = client.stats(Duration::from_secs(3)).await?;
    let mut queues = async_queues(&client).await;
    if let Some(name) = &args.name {
        stats.functions.retain(|f| &f.function == name);
        queues.retain(|q| q.function.as_str() == name);
    }
    if args.json {
        let mut value = serde_json::to_value(&stats)
            .map_err(|e| Failure::new(Code::Internal, e.to_string()))?;
        // The quantiles, computed from the merged buckets, next to the raw figures.
        if let Some(rows) = value["functions"].as_array_mut() {
            for (row, f) in rows.iter_mut().zip(&stats.functions) {
                for (key, q) in [("p50Ms", 0.5), ("p99Ms", 0.99)] {
                    row[key] = f.duration_quantile(q).map_or(serde_json::Value::Null, |d| {
                        (d.as_secs_f64() * 1000.0).into()
                    });
                }
            }
        }
        value["async"] = serde_json::to_value(&queues).unwrap_or_default();
        print_json(&value);
        return Ok(());
    }
    print_stats(&stats, &queues, None);
    Ok(())
}

/// The asynchronous queues, or none (with a warning) when JetStream cannot say.
async fn async_queues(client: &mycelium_client::Client) -> Vec<mycelium_client::AsyncQueueStats> {
    client.async_stats().await.unwrap_or_else(|error| {
        eprintln!(
            "warning: the asynchronous queues are not shown: {}",
            error_chain(&error)
        );
        Vec::new()
    })
}

/// The stats table; with `previous` (and the seconds since), a rate column too.
fn print_stats(
    stats: &mycelium_client::ClusterStats,
    queues: &[mycelium_client::AsyncQueueStats],
    previous: Option<(&mycelium_client::ClusterStats, f64)>,
) {
    println!("{} runtime instance(s)", stats.instances);
    println!(
        "{:<24} {:>11} {:>8} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11} {:>7}",
        "FUNCTION",
        "INVOCATIONS",
        "PER SEC",
        "ERRORS",
        "ERROR%",
        "AVG MS",
        "P50 MS",
        "P99 MS",
        "MEMORY",
        "IN FLIGHT",
        "COLD STARTS",
        "CRASHES"
    );
    for f in &stats.functions {
        let ran = f.invocations.max(1) as f64;
        let rate = previous
            .map(|(before, seconds)| {
                let earlier = before
                    .functions
                    .iter()
                    .find(|b| b.function == f.function)
                    .map_or(0, |b| b.invocations);
                format!(
                    "{:.1}",
                    f.invocations.saturating_sub(earlier) as f64 / seconds.max(0.001)
                )
            })
            .unwrap_or_else(|| "-".into());
        let quantile = |q| {
            f.duration_quantile(q).map_or_else(
                || "-".to_owned(),
                |d| format!("{:.2}", d.as_secs_f64() * 1000.0),
            )
        };
        println!(
            "{:<24} {:>11} {:>8} {:>8} {:>6.1}% {:>10.2} {:>9} {:>9} {:>9} {:>9} {:>11} {:>7}",
            f.function,
            f.invocations,
            rate,
            f.errors,
            100.0 * f.errors as f64 / ran,
            f.total_duration_us as f64 / ran / 1000.0,
            quantile(0.5),
            quantile(0.99),
            if f.memory_bytes == 0 {
                "-".to_owned()
            } else {
                crate::output::human_size(Some(f.memory_bytes))
            },
            f.in_flight,
            f.cold_starts,
            f.crashes
        );
    }
    if !stats.triggers.is_empty() {
        println!();
        println!(
            "{:<24} {:>9} {:>11} {:>8} {:>8}  LAST FIRED",
            "TRIGGER", "RECEIVED", "INVOCATIONS", "FAILURES", "LAG"
        );
        for t in &stats.triggers {
            println!(
                "{:<24} {:>9} {:>11} {:>8} {:>8}  {}",
                t.trigger.as_str(),
                t.received,
                t.invocations,
                t.failures,
                t.lag.map_or_else(|| "-".to_owned(), |lag| lag.to_string()),
                t.last_fired.map_or_else(
                    || "-".to_owned(),
                    |at| at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
                )
            );
        }
    }
    if queues.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>11} {:>13}",
        "ASYNC QUEUE", "PENDING", "IN FLIGHT", "REDELIVERED", "DEAD LETTERS"
    );
    for q in queues {
        println!(
            "{:<24} {:>9} {:>9} {:>11} {:>13}",
            q.function.as_str(),
            q.pending,
            q.in_flight,
            q.redelivered,
            q.dead_lettered
        );
    }
}

async fn top(connection: &Connection<'_>, args: crate::args::TopArgs) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let client = client(connection).await?;
    let live = std::io::stdout().is_terminal();
    let mut previous: Option<(mycelium_client::ClusterStats, std::time::Instant)> = None;
    let mut shown = 0;
    loop {
        let stats = client.stats(Duration::from_secs(3)).await?;
        let queues = async_queues(&client).await;
        if live {
            // Clear the screen and go home, as top does.
            print!("\x1b[2J\x1b[H");
        }
        let since = previous
            .as_ref()
            .map(|(before, at)| (before, at.elapsed().as_secs_f64()));
        print_stats(&stats, &queues, since);
        println!();
        shown += 1;
        if args.iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        previous = Some((stats, std::time::Instant::now()));
        tokio::select! {
            () = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub fn print_json(value: &serde_json::Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("error[internal]: {error}"),
    }
}

/// Prints a function's kept log lines, then (with `--follow`) new ones as they arrive.
async fn logs(connection: &Connection<'_>, args: LogsArgs) -> Result<(), Failure> {
    use mycelium_client::{LogLine, LogsErrorKind, LogsOptions};

    let client = client(connection).await?;
    let print = |line: &LogLine| {
        if args.json {
            println!("{}", String::from_utf8_lossy(&line.payload));
        } else if let Some(record) = line.record() {
            let invocation = record.invocation_id.as_deref().unwrap_or("-");
            println!(
                "{} {:<5} v{} {} {}: {}",
                record.time,
                record.level.to_uppercase(),
                record.version,
                invocation,
                record.source,
                record.message
            );
        }
    };
    let options = LogsOptions {
        lines: args.lines,
        follow: args.follow,
    };
    let mut log = client.logs(&args.name, options).await.map_err(|e| {
        let code = match e.kind() {
            LogsErrorKind::InvalidName => Code::Remote(ErrorCode::InvalidFunctionName),
            LogsErrorKind::NoHistory => Code::NoLogHistory,
            LogsErrorKind::Transport => Code::Unreachable,
        };
        Failure::new(code, error_chain(&e))
    })?;
    log.history.iter().for_each(print);
    if log.history.is_empty() && !args.follow {
        // Nothing kept: say whether the name is wrong or the function has been quiet, rather
        // than print nothing and succeed either way.
        return match client.describe(&args.name, None).await {
            Err(error) if error.kind() == RequestErrorKind::Remote(ErrorCode::FunctionNotFound) => {
                Err(Failure::new(
                    Code::Remote(ErrorCode::FunctionNotFound),
                    format!("no function {} and no kept log lines for it; `mycelium list` shows the functions", args.name),
                ))
            }
            _ => {
                eprintln!("no log lines kept for {} (the runtime keeps an hour)", args.name);
                Ok(())
            }
        };
    }
    while let Some(line) = log.next().await {
        let line = line.map_err(|e| Failure::new(Code::Unreachable, error_chain(&e)))?;
        print(&line);
    }
    Ok(())
}
