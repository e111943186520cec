//! What the CLI's test files share: the `mycelium` command and the binaries built beside it.

use std::{path::PathBuf, process::Command};

use mycelium_test_support::nats_server_binary;

/// The `mycelium` binary under test, with the test nats-server and no ambient NATS URL.
pub fn mycelium() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mycelium"));
    command
        .env_remove("NATS_URL")
        .env("MYCELIUM_NATS_SERVER", nats_server_binary());
    command
}

/// A binary of another workspace package, built next to the test binaries; `None` (the test
/// skips) when it is missing, unless `MYCELIUM_E2E_REQUIRED` is set.
pub fn sibling_binary(name: &str, package: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join(name);
    if path.is_file() {
        return Some(path);
    }
    let hint = format!(
        "{} is not built; run `cargo build -p {package}` or the whole suite",
        path.display()
    );
    assert!(
        std::env::var_os("MYCELIUM_E2E_REQUIRED").is_none(),
        "{hint}"
    );
    eprintln!("SKIPPED: {hint}");
    None
}
