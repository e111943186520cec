//! Command-line arguments.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Mycelium: serverless functions on NATS.
#[derive(Debug, Parser)]
#[command(name = "mycelium", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Log output format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, env = "MYCELIUM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Where NATS is and how to authenticate.
#[derive(Debug, Args)]
pub struct ConnectionArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// NATS user (with --password or NATS_PASSWORD).
    // Paired in `run`, not with clap's `requires`: that ignores a partner from the environment.
    #[arg(long, global = true, env = "NATS_USER")]
    pub user: Option<String>,
    /// NATS password (with --user or NATS_USER).
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// NATS authentication token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// NATS credentials file (.creds).
    #[arg(long, global = true, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// NKey seed file to authenticate with.
    #[arg(long, global = true, env = "NATS_NKEY")]
    pub nkey: Option<PathBuf>,
    /// CA certificate (PEM) to trust for TLS to NATS.
    #[arg(long, global = true, env = "NATS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for TLS to NATS (with --tls-key).
    #[arg(long, global = true, env = "NATS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM) (with --tls-cert).
    #[arg(long, global = true, env = "NATS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// First token of Mycelium's subjects.
    #[arg(
        long,
        global = true,
        env = "MYCELIUM_SUBJECT_PREFIX",
        default_value = "function"
    )]
    pub subject_prefix: String,
}

/// Where the JetStream registry keeps things.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// KV bucket of function metadata.
    #[arg(
        long,
        global = true,
        env = "MYCELIUM_FUNCTIONS_BUCKET",
        default_value = "mycelium_functions"
    )]
    pub functions_bucket: String,
    /// Object Store bucket of function binaries.
    #[arg(
        long,
        global = true,
        env = "MYCELIUM_ARTIFACTS_BUCKET",
        default_value = "mycelium_artifacts"
    )]
    pub artifacts_bucket: String,
    /// KV bucket of sealed secrets.
    #[arg(
        long,
        global = true,
        env = "MYCELIUM_SECRETS_BUCKET",
        default_value = "mycelium_secrets"
    )]
    pub secrets_bucket: String,
    /// Replicas of the buckets when they are created (3 on a 3-node cluster).
    #[arg(long, global = true, env = "MYCELIUM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Versions kept per function (the active one is always kept).
    #[arg(
        long,
        global = true,
        env = "MYCELIUM_KEEP_VERSIONS",
        default_value_t = 10
    )]
    pub keep_versions: usize,
    /// Largest binary accepted by deploy, in bytes.
    #[arg(long, global = true, env = "MYCELIUM_MAX_ARTIFACT_SIZE", default_value_t = 256 * 1024 * 1024)]
    pub max_artifact_size: u64,
}

/// Which registry a runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegistryKind {
    /// Versioned metadata in JetStream KV, binaries in the Object Store; survives restarts.
    Jetstream,
    /// In process memory: the built-ins only, nothing deployed survives.
    Memory,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a nats-server and a runtime with the built-in functions, all in one.
    Up(UpArgs),
    /// Run a runtime against an existing NATS (the production shape).
    Serve(ServeArgs),
    /// Invoke a function with a CloudEvent and print its reply.
    Invoke(InvokeArgs),
    /// List the functions.
    List(ListArgs),
    /// Show one function's metadata.
    Describe(DescribeArgs),
    /// Deploy a new version of a function: a plugin binary, or a built-in under a new name.
    Deploy(DeployArgs),
    /// List a function's kept versions.
    Versions(VersionsArgs),
    /// Make an earlier version active again.
    Rollback(RollbackArgs),
    /// Remove a function and all its versions.
    Delete(DeleteArgs),
    /// Per-function figures summed over every runtime instance.
    Stats(StatsArgs),
    /// `stats`, refreshed live with rates, the way one watches `htop`.
    Top(TopArgs),
    /// A function's log lines (plugin output, built-in `tracing` events) from every instance.
    Logs(LogsArgs),
    /// Dead letters of asynchronous invocations: list, replay, purge.
    Dlq(DlqArgs),
    /// Event triggers: functions that run on messages, stream and KV changes, schedules.
    Trigger(TriggerArgs),
    /// Store, list and delete secrets: sealed for the runtimes' xkey, delivered only to the
    /// functions that name them (`deploy --secret ENV=NAME`), never printed.
    Secret(SecretArgs),
}

/// `mycelium trigger`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    #[command(subcommand)]
    pub command: TriggerCommand,
}

/// The `trigger` subcommands.
#[derive(Debug, Subcommand)]
pub enum TriggerCommand {
    /// Bind a function to a source of events.
    Add(Box<TriggerAddArgs>),
    /// The triggers.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One trigger.
    Describe {
        /// The trigger.
        name: String,
    },
    /// Remove a trigger everywhere.
    Delete {
        /// The trigger.
        name: String,
    },
    /// Stop a trigger from firing (durable sources keep their place).
    Pause {
        /// The trigger.
        name: String,
    },
    /// Let a paused trigger fire again.
    Resume {
        /// The trigger.
        name: String,
    },
}

/// `mycelium trigger add`.
#[derive(Debug, Args)]
pub struct TriggerAddArgs {
    /// The trigger's name.
    pub name: String,
    /// The function it runs.
    #[arg(long)]
    pub function: String,
    #[command(flatten)]
    pub source: TriggerSourceArgs,
    /// With --stream: only messages on this subject.
    #[arg(long, requires = "stream")]
    pub filter: Option<String>,
    /// With --stream: start with new messages or everything the stream holds.
    #[arg(long, requires = "stream", value_enum, default_value_t = DeliverArg::New)]
    pub deliver: DeliverArg,
    /// With --kv: only keys matching this pattern.
    #[arg(long, requires = "kv")]
    pub key: Option<String>,
    /// With --cron: its time zone (IANA, e.g. Europe/Paris; default UTC).
    #[arg(long, requires = "cron")]
    pub tz: Option<String>,
    /// Publish the function's result events here, one CloudEvent per message.
    #[arg(long, value_name = "SUBJECT")]
    pub then: Option<String>,
}

/// Exactly one source of a trigger.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TriggerSourceArgs {
    /// Core NATS messages on this subject (wildcards allowed), each run once, at most once.
    #[arg(long)]
    pub subject: Option<String>,
    /// A JetStream stream, through a durable consumer: at least once, with the function's
    /// retries and dead letters.
    #[arg(long)]
    pub stream: Option<String>,
    /// Every put and delete in this KV bucket.
    #[arg(long)]
    pub kv: Option<String>,
    /// A 6-field cron expression, seconds first ('0 */5 * * * *'), or @hourly, @daily, ...
    #[arg(long)]
    pub cron: Option<String>,
    /// A fixed interval (whole seconds, e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    pub every: Option<Duration>,
}

/// Where a stream trigger starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeliverArg {
    /// Messages stored from now on.
    New,
    /// Everything the stream holds.
    All,
}

/// `mycelium dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// The `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List a function's dead letters.
    List {
        /// The function.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Submit a function's dead letters again (all, or those of one event) and remove them.
    Replay {
        /// The function.
        name: String,
        /// Only the dead letters of this event id.
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove all of a function's dead letters.
    Purge {
        /// The function.
        name: String,
    },
}

impl Command {
    /// Whether this command runs a runtime (long-lived, hosting plugin processes) rather than
    /// printing a result and exiting.
    pub fn runs_a_runtime(&self) -> bool {
        matches!(self, Command::Up(_) | Command::Serve(_))
    }
}

/// `mycelium logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The function.
    pub name: String,
    /// Keep printing new lines as they arrive (until Ctrl-C).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How many of the most recent kept lines to show first (the runtime keeps an hour).
    #[arg(long, short = 'n', default_value_t = 100)]
    pub lines: usize,
    /// One JSON object per line, as published on NATS.
    #[arg(long)]
    pub json: bool,
}

/// `mycelium top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between refreshes.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub interval: Duration,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    pub iterations: Option<u64>,
}

/// `mycelium stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this function.
    pub name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `mycelium deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The function's name.
    pub name: String,
    /// The binary to upload: a WebAssembly module (.wasm, told by its first bytes) runs
    /// sandboxed; anything else runs as a plugin process.
    #[arg(required_unless_present = "builtin", conflicts_with = "builtin")]
    pub path: Option<PathBuf>,
    /// Run this built-in under NAME instead of uploading a binary.
    #[arg(long, value_name = "BUILTIN")]
    pub builtin: Option<String>,
    /// One line for people.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Longest an invocation may run (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Memory limit of the plugin process or WebAssembly instance, in MiB (WebAssembly
    /// default: 128).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Invocations allowed in flight per runtime.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Environment variable for the plugin process or WebAssembly instance (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// A secret in the environment of the plugin process or WebAssembly instance, as ENV
    /// (repeatable): `--secret DB_PASSWORD=db-password`. Only the reference is stored; the
    /// value is opened by the runtime (`mycelium secret set` stores it).
    #[arg(long = "secret", value_name = "ENV=SECRET", value_parser = parse_key_value)]
    pub secrets: Vec<(String, String)>,
    /// Label (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Sign the binary's digest with this NKey seed file, for runtimes started with
    /// --trusted-key (its public key).
    #[arg(
        long,
        env = "MYCELIUM_SIGN_KEY",
        value_name = "SEED_FILE",
        conflicts_with = "builtin"
    )]
    pub sign_key: Option<PathBuf>,
    /// Deploy under the name of a runtime's built-in function, replacing it for every caller
    /// (refused without this flag).
    #[arg(long)]
    pub replace_builtin: bool,
    /// Retries of a failed asynchronous invocation after its first attempt (default 2).
    #[arg(long)]
    pub retries: Option<u32>,
    /// Waits before each retry, e.g. 1s,10s,60s (the last repeats; default: exponential from
    /// 1s with jitter, at most 5m).
    #[arg(long, value_parser = parse_duration, value_delimiter = ',', value_name = "DURATIONS")]
    pub retry_backoff: Vec<Duration>,
    /// How long an accepted asynchronous invocation may wait to run before it is
    /// dead-lettered (default 1h).
    #[arg(long, value_parser = parse_duration)]
    pub max_event_age: Option<Duration>,
    /// Where results of asynchronous invocations go when the call names no result subject.
    #[arg(long, value_name = "SUBJECT")]
    pub on_success: Option<String>,
    /// Where failures of asynchronous invocations (dead letters) are announced.
    #[arg(long, value_name = "SUBJECT")]
    pub on_failure: Option<String>,
    /// Print the new version's metadata as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `mycelium secret`.
#[derive(Debug, Args)]
pub struct SecretArgs {
    #[command(subcommand)]
    pub command: SecretCommand,
}

/// What `mycelium secret` does.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret's value (a new version), read from stdin or --from-file, never from the
    /// command line. From stdin, one trailing newline is dropped (so `echo` works); a file is
    /// taken as it is.
    Set {
        /// The secret's name (A-Z, a-z, 0-9, '-', '_').
        name: String,
        /// Read the value from this file instead of stdin.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Seal for this public xkey (X...) instead of the one the runtimes announced.
        #[arg(long, env = "MYCELIUM_XKEY_PUBLIC", value_name = "XKEY")]
        public_xkey: Option<String>,
        /// Print the new version as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List secrets: names, versions and update times, never values.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret and its sealed value.
    Delete {
        /// The secret's name.
        name: String,
    },
}

/// `mycelium versions`.
#[derive(Debug, Args)]
pub struct VersionsArgs {
    /// The function.
    pub name: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `mycelium rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The function.
    pub name: String,
    /// The version to make active.
    #[arg(long)]
    pub to: u64,
}

/// `mycelium delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The function.
    pub name: String,
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// `mycelium up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the embedded NATS keeps its JetStream store and log.
    #[arg(long, env = "MYCELIUM_DATA_DIR", default_value = ".mycelium")]
    pub data_dir: PathBuf,
    /// Address the embedded NATS listens on.
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `mycelium serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Settings of a runtime.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// Where plugin binaries are cached and plugin processes get their working directories
    /// (default: `<data-dir>/plugins` for `up`, `./.mycelium/plugins` for `serve`).
    #[arg(long, env = "MYCELIUM_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Bytes of plugin binaries kept in the local cache.
    #[arg(long, env = "MYCELIUM_PLUGIN_CACHE_SIZE", default_value_t = 1024 * 1024 * 1024)]
    pub plugin_cache_size: u64,
    /// Processes per plugin function version at most (default: the number of cores). One
    /// more starts when a call finds every process's `--plugin-concurrency` calls taken;
    /// the extra ones stop after 30 s idle.
    #[arg(long, env = "MYCELIUM_PLUGIN_MAX_PROCESSES")]
    pub plugin_max_processes: Option<usize>,
    /// Concurrent calls one plugin process takes.
    #[arg(long, env = "MYCELIUM_PLUGIN_CONCURRENCY", default_value_t = 64)]
    pub plugin_concurrency: usize,
    /// Idle plugin processes stop after this long (scale to zero).
    #[arg(long, env = "MYCELIUM_PLUGIN_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub plugin_idle_timeout: Duration,
    /// Output lines per second one plugin or WebAssembly function may log; the excess is
    /// dropped and counted in a record of its own.
    #[arg(long, env = "MYCELIUM_PLUGIN_LOG_LINES", default_value_t = 1000)]
    pub plugin_log_lines: u32,
    /// Run plugin processes without control groups of their own even where they can be made
    /// (memory limits then fall back to RLIMIT_AS).
    #[arg(long, env = "MYCELIUM_NO_PLUGIN_CGROUPS")]
    pub no_plugin_cgroups: bool,
    /// Speak gRPC (HTTP/2) to every plugin, including those built with the Rust SDK, which
    /// otherwise take Mycelium's lighter frame protocol. For comparison and diagnosis.
    #[arg(long, env = "MYCELIUM_PLUGIN_GRPC_ONLY")]
    pub plugin_grpc_only: bool,
    /// Microseconds a plugin call may spin for its answer instead of parking its thread (only
    /// while it is the only plugin call in flight, on a plugin whose answers come within that
    /// time; 0 never spins).
    #[arg(long, env = "MYCELIUM_PLUGIN_BUSY_POLL_US", default_value_t = 300)]
    pub plugin_busy_poll_us: u64,
    /// Do not start plugin processes ahead of their first call.
    #[arg(long, env = "MYCELIUM_NO_PRESTART")]
    pub no_prestart: bool,
    /// Serve Prometheus metrics on this address at /metrics (e.g. 127.0.0.1:9464); off by default.
    #[arg(long, env = "MYCELIUM_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317); off by
    /// default. Invocations then continue their callers' W3C traces with spans of their own.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Run only plugin binaries signed by this public NKey (repeatable); unsigned or otherwise
    /// signed binaries are refused with `artifact_untrusted`. Off by default.
    #[arg(
        long = "trusted-key",
        env = "MYCELIUM_TRUSTED_KEYS",
        value_delimiter = ',',
        value_name = "PUBLIC_NKEY"
    )]
    pub trusted_keys: Vec<String>,
    /// The file holding this runtime's private xkey seed (SX...), which opens the secrets
    /// functions name; `MYCELIUM_XKEY_SEED` may hold the seed itself instead. `up` makes
    /// `<data-dir>/xkey.seed` when neither is given. Without a key, functions that name
    /// secrets fail `secret_unavailable`.
    #[arg(long, env = "MYCELIUM_XKEY_SEED_FILE", value_name = "FILE")]
    pub xkey_seed_file: Option<PathBuf>,
    /// Where deployed functions are looked up.
    #[arg(long, env = "MYCELIUM_REGISTRY", value_enum, default_value_t = RegistryKind::Jetstream)]
    pub registry: RegistryKind,
    /// Invocations executing at once; beyond it requests are answered `overloaded`.
    #[arg(long, env = "MYCELIUM_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Invocations of one function executing at once, for functions deployed without
    /// --max-concurrency; beyond it that function's requests are answered `overloaded`, so
    /// one function's flood cannot take every in-flight slot.
    #[arg(long, env = "MYCELIUM_MAX_CONCURRENCY", default_value_t = 256)]
    pub max_concurrency: usize,
    /// Largest accepted request, in bytes.
    #[arg(long, env = "MYCELIUM_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    pub max_payload: usize,
    /// Timeout of functions that set none (e.g. 30s, 500ms, 2m).
    #[arg(long, env = "MYCELIUM_DEFAULT_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub default_timeout: Duration,
    /// On shutdown, how long in-flight invocations may take to finish.
    #[arg(long, env = "MYCELIUM_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// Queue group shared by the runtime instances.
    #[arg(long, env = "MYCELIUM_QUEUE_GROUP", default_value = "mycelium")]
    pub queue_group: String,
    /// Subjects (NATS patterns) results of asynchronous invocations may be published to
    /// (default: any that is not a system `$...` subject nor one of the platform's own).
    #[arg(
        long,
        env = "MYCELIUM_RESULT_SUBJECTS",
        num_args = 1..,
        value_delimiter = ',',
        value_name = "PATTERN"
    )]
    pub result_subjects: Vec<String>,
    /// How long an idempotency key (Nats-Msg-Id) of an asynchronous submission is remembered.
    #[arg(long, env = "MYCELIUM_ASYNC_DUPLICATE_WINDOW", value_parser = parse_duration, default_value = "2m")]
    pub async_duplicate_window: Duration,
    /// Asynchronous invocations stored at most; beyond it submissions are refused.
    #[arg(long, env = "MYCELIUM_ASYNC_MAX_MESSAGES", default_value_t = 1_000_000)]
    pub async_max_messages: i64,
    /// Bytes of asynchronous invocations stored at most; beyond it submissions are refused.
    #[arg(long, env = "MYCELIUM_ASYNC_MAX_BYTES", default_value_t = 1 << 30)]
    pub async_max_bytes: i64,
    /// How long a runtime that took an asynchronous invocation has before another may take it
    /// (running calls renew it).
    #[arg(long, env = "MYCELIUM_ASYNC_ACK_WAIT", value_parser = parse_duration, default_value = "30s")]
    pub async_ack_wait: Duration,
    /// Do not run asynchronous invocations on this runtime.
    #[arg(long, env = "MYCELIUM_NO_ASYNC")]
    pub no_async: bool,
}

/// `mycelium invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The function to invoke.
    pub name: String,
    /// Event data: JSON text, @FILE to read a file, or - to read stdin.
    #[arg(long, short)]
    pub data: Option<String>,
    /// Content type of the data (default application/json; anything else sends the data as text).
    #[arg(long)]
    pub content_type: Option<String>,
    /// Event type.
    #[arg(long = "type", default_value = "com.example.test")]
    pub event_type: String,
    /// Event source.
    #[arg(long, default_value = "mycelium-cli")]
    pub source: String,
    /// Event id (generated when absent).
    #[arg(long)]
    pub id: Option<String>,
    /// Invoke this version instead of the active one.
    #[arg(long)]
    pub version: Option<u64>,
    /// How long the function may run (e.g. 5s, 250ms).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,
    /// Retry this many times when no runtime answered or one was shutting down or overloaded
    /// (the function did not run); backoff with jitter.
    #[arg(long, default_value_t = 0, conflicts_with = "asynchronous")]
    pub retries: u32,
    /// Submit for asynchronous invocation (stored in JetStream, retried, dead-lettered) and
    /// print the acceptance instead of waiting for the result.
    #[arg(long = "async")]
    pub asynchronous: bool,
    /// With --async: where the result (or the failure) is published.
    #[arg(long, requires = "asynchronous", value_name = "SUBJECT")]
    pub result_subject: Option<String>,
    /// With --async: the idempotency key (Nats-Msg-Id); the same key again within the
    /// duplicate window is not run twice.
    #[arg(long, requires = "asynchronous", value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// `mycelium list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `mycelium describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// The function to describe.
    pub name: String,
    /// A specific version instead of the active one.
    #[arg(long)]
    pub version: Option<u64>,
    /// Print JSON instead of a listing.
    #[arg(long)]
    pub json: bool,
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use e.g. 250ms, 5s, 2m"))?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m or h"
            ))
        }
    };
    if duration.is_zero() {
        return Err("a duration must be positive".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("nothing").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
