//! `mycelium`: run the runtime (`up`, `serve`), invoke functions and inspect them.
//!
//! The CLI is a thin shell: argument parsing, output formatting and process lifecycle.
//! What it does, the client, runtime and natsd crates do.

mod args;
mod output;
mod registry_commands;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = args::Cli::parse();
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
            eprintln!("error[{}]: {}", failure.code, failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

/// `mycelium list | head` should end quietly, as Unix tools do, not panic on a closed pipe:
/// Rust ignores SIGPIPE by default, which turns every later print into an error.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
