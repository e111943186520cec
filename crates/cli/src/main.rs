//! `mycelium`: run the runtime (`up`, `serve`), invoke functions and inspect them.
//!
//! The CLI is a thin shell: argument parsing, output formatting and process lifecycle.
//! What it does, the client, runtime and natsd crates do.

mod args;
mod async_commands;
mod output;
mod registry_commands;
mod run;
mod secret_commands;
mod trigger_commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    if cli.command.runs_a_runtime() {
        protect_runtime_process();
    } else {
        restore_sigpipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error[internal]: cannot start the async runtime: {error}");
            return ExitCode::from(output::EXIT_INTERNAL);
        }
    };
    // The OTLP exporter's gRPC channel is made inside the async runtime.
    let tracer_provider = {
        let _inside = runtime.enter();
        output::init_logging(&cli)
    };
    let outcome = runtime.block_on(run::run(cli));
    if let Some(provider) = tracer_provider {
        if let Err(error) = provider.shutdown() {
            eprintln!("warning: flushing the last traces failed: {error}");
        }
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error[{}]: {}", failure.code.as_str(), failure.message);
            ExitCode::from(failure.code.exit())
        }
    }
}

/// `mycelium list | head` should end quietly, as Unix tools do, not panic on a closed pipe:
/// Rust ignores SIGPIPE by default, which turns every later print into an error.
///
/// Only for the commands that print: a runtime (`up`, `serve`) keeps SIGPIPE ignored, because
/// a plugin closing its socket while the host writes to it (an HTTP/2 PING ACK) would
/// otherwise kill the whole runtime and every invocation in flight.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A runtime process is made non-dumpable: its `/proc/<pid>/environ`, `mem` and `maps` are
/// then readable only with CAP_SYS_PTRACE, which plugin processes never hold (the plugin host
/// drops every capability), so a plugin running as the same user cannot read the runtime's
/// credentials from its environment.
#[allow(unsafe_code)]
fn protect_runtime_process() {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers and touches no memory of ours.
    let result = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if result != 0 {
        eprintln!(
            "warning: cannot make the runtime non-dumpable ({}); plugins running as this user may read its environment",
            std::io::Error::last_os_error()
        );
    }
}
