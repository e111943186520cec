//! A plugin that misbehaves on request, for the runtime's failure tests.
//!
//! At start, `MYCELIUM_TEST_PLUGIN_START` picks: `ok` (default), `exit` (exit 3 before the
//! handshake), `garbage` (print a malformed handshake), `silent` (never shake hands).
//! Per call, the event type picks: `echo`, `upper` (upper-cases text data), `tag` (replies
//! with `$TAG`), `env` (replies with the environment variable names), `pid`, `sleep`
//! (`{"ms": n}`), `crash` (aborts the process), `hang` (stops the whole process), `print`
//! (a plain stdout line and an hclog JSON stderr line),
//! `flood` (writes megabytes to stdout and stderr), `alloc` (`{"mb": n}` touched memory),
//! `trace` (replies with the trace context the host sent and the one the function runs in:
//! the plugin installs an OpenTelemetry layer, so its span is a child of the host's), `log`
//! (a `tracing` warning through the SDK's log layer; replies with its invocation and trace ids),
//! `daemon` (starts `setsid sleep 600`, a process in a session of its own; replies with its pid),
//! `getenv` (`{"name": "X"}`: replies with `$X`, or null), `printenv` (`{"name": "X"}`: prints
//! `$X` on stdout and stderr, replies with nothing of it).

use mycelium_core::{
    cloudevents::{event::Data, AttributesReader, Event},
    Function, FunctionError, InvocationContext, TraceBridge, TraceContext,
};
use mycelium_observability::OtelBridge;
use serde_json::json;

struct TestPlugin;

fn number(event: &Event, key: &str) -> u64 {
    match event.data() {
        Some(Data::Json(value)) => value.get(key).and_then(|v| v.as_u64()).unwrap_or(0),
        _ => 0,
    }
}

fn reply(mut event: Event, data: serde_json::Value) -> Vec<Event> {
    event.set_data("application/json", data);
    vec![event]
}

#[async_trait::async_trait]
impl Function for TestPlugin {
    async fn execute(
        &self,
        event: Event,
        ctx: InvocationContext,
    ) -> Result<Vec<Event>, FunctionError> {
        match event.ty() {
            "echo" => Ok(vec![event]),
            "upper" => {
                let text = match event.data() {
                    Some(Data::String(text)) => text.to_uppercase(),
                    _ => return Err(FunctionError::new("upper needs text data")),
                };
                let mut event = event;
                event.set_data("text/plain", text);
                Ok(vec![event])
            }
            "tag" => Ok(reply(
                event,
                json!({"tag": std::env::var("TAG").unwrap_or_default()}),
            )),
            "env" => {
                let names: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let cwd = std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                Ok(reply(event, json!({"names": names, "cwd": cwd})))
            }
            "daemon" => {
                let child = std::process::Command::new("setsid")
                    .args(["sleep", "600"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| FunctionError::new(format!("starting setsid: {e}")))?;
                Ok(reply(event, json!({"pid": child.id()})))
            }
            "pid" => Ok(reply(
                event,
                json!({"pid": std::process::id(), "pgid": process_group()}),
            )),
            "sleep" => {
                /// Says so when the call is dropped before it ends (the host cancelled it).
                struct Cancelled(bool);
                impl Drop for Cancelled {
                    fn drop(&mut self) {
                        if !self.0 {
                            eprintln!("sleep cancelled");
                        }
                    }
                }
                let mut cancelled = Cancelled(false);
                let ms = number(&event, "ms");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                cancelled.0 = true;
                Ok(reply(event, json!({"pid": std::process::id()})))
            }
            "crash" => std::process::abort(),
            "hang" => {
                stop_self();
                Ok(vec![event])
            }
            "flood" => {
                let line = "x".repeat(1000);
                for i in 0..5000 {
                    println!("stdout {i} {line}");
                    eprintln!("stderr {i} {line}");
                }
                // One enormous line without a newline must not exhaust the host either.
                print!("{}", "y".repeat(4 * 1024 * 1024));
                Ok(vec![event])
            }
            "alloc" => {
                let mb = usize::try_from(number(&event, "mb")).unwrap_or(0);
                let mut block = vec![0u8; mb * 1024 * 1024];
                for page in block.iter_mut().step_by(4096) {
                    *page = 1;
                }
                Ok(reply(event, json!({"touched": block.len()})))
            }
            "fail" => Err(FunctionError::new("failing on purpose")),
            "big" => {
                let bytes = usize::try_from(number(&event, "bytes")).unwrap_or(0);
                Ok(reply(event, json!({ "blob": "x".repeat(bytes) })))
            }
            "getenv" | "printenv" => {
                let name = match event.data() {
                    Some(Data::Json(value)) => {
                        value["name"].as_str().unwrap_or_default().to_owned()
                    }
                    _ => String::new(),
                };
                let value = std::env::var(&name).ok();
                if event.ty() == "getenv" {
                    return Ok(reply(event, json!({ "value": value })));
                }
                println!("stdout {name}={}", value.as_deref().unwrap_or_default());
                eprintln!("stderr {name}={}", value.as_deref().unwrap_or_default());
                Ok(reply(event, json!({ "printed": name })))
            }
            "log" => {
                tracing::warn!(answer = 42, "traced line from the plugin");
                Ok(reply(
                    event,
                    json!({
                        "invocationId": ctx.invocation_id(),
                        "traceId": ctx.trace().map(|t| t.trace_id().to_owned()),
                    }),
                ))
            }
            "trace" => {
                let received = LAST_RECEIVED_TRACE
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                Ok(reply(
                    event,
                    json!({
                        "received": received.map(|t| t.traceparent().to_owned()),
                        "current": ctx.trace().map(|t| t.traceparent().to_owned()),
                    }),
                ))
            }
            "print" => {
                println!("plain line from the plugin");
                eprintln!(
                    r#"{{"@level":"warn","@message":"hclog line from the plugin","@timestamp":"2026-01-01T00:00:00Z"}}"#
                );
                Ok(vec![event])
            }
            other => Err(FunctionError::new(format!(
                "unknown test behaviour {other:?}"
            ))),
        }
    }
}

/// The context the host sent with the last call (calls in the tests are sequential).
static LAST_RECEIVED_TRACE: std::sync::Mutex<Option<TraceContext>> = std::sync::Mutex::new(None);

/// The OpenTelemetry bridge, remembering what the host sent for the `trace` behaviour.
struct RecordingBridge(OtelBridge);

impl TraceBridge for RecordingBridge {
    fn enter(&self, span: &tracing::Span, parent: Option<&TraceContext>) -> Option<TraceContext> {
        *LAST_RECEIVED_TRACE
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = parent.cloned();
        self.0.enter(span, parent)
    }

    fn current(&self) -> Option<TraceContext> {
        self.0.current()
    }
}

fn serve_traced() -> ! {
    use tracing_subscriber::{layer::SubscriberExt, Layer};
    // Spans get OpenTelemetry ids but go nowhere: the host's side of the test checks them.
    let provider = match mycelium_observability::tracer_provider("mycelium-test-plugin", None) {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(1);
        }
    };
    let subscriber = tracing_subscriber::registry()
        .with(mycelium_observability::otel_layer(&provider))
        .with(
            mycelium_plugin_sdk::log_layer()
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        );
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("a tracing subscriber was already installed");
    }
    mycelium_plugin_sdk::Plugin::new(TestPlugin)
        .tracing(std::sync::Arc::new(RecordingBridge(OtelBridge)))
        .serve()
}

#[allow(unsafe_code)]
fn process_group() -> i32 {
    // SAFETY: getpgid(0) only reads the calling process's group id.
    unsafe { libc::getpgid(0) }
}

#[allow(unsafe_code)]
fn stop_self() {
    // SAFETY: raise(2) has no memory-safety preconditions; SIGSTOP freezes every thread,
    // which is the point: a plugin that stops answering altogether.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}

fn main() {
    match std::env::var("MYCELIUM_TEST_PLUGIN_START").as_deref() {
        Ok("exit") => {
            eprintln!("exiting on purpose before the handshake");
            std::process::exit(3);
        }
        Ok("garbage") => {
            println!("this is not a handshake");
            std::thread::sleep(std::time::Duration::from_secs(60));
            std::process::exit(0);
        }
        Ok("silent") => {
            std::thread::sleep(std::time::Duration::from_secs(600));
            std::process::exit(0);
        }
        _ => serve_traced(),
    }
}
