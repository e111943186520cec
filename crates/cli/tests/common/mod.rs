//! What the CLI's test files share: the `mycelium` command and the binaries built beside it.

#![allow(dead_code)] // Each test file uses its own part of this.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use mycelium_test_support::{free_port, nats_server_binary, ChildGuard as Running};

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

/// `mycelium up` in the background, stopped on drop; returns once it is ready, with its
/// NATS URL, the banner it printed and the rest of its stdout.
pub fn start_up(
    data_dir: &std::path::Path,
) -> (
    Running,
    String,
    String,
    BufReader<std::process::ChildStdout>,
) {
    let port = free_port();
    let mut up = Running(
        mycelium()
            .args([
                "up",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(up.0.stdout.take().unwrap());
    let mut banner = String::new();
    while !banner.contains("Press Ctrl-C") {
        assert!(
            stdout.read_line(&mut banner).unwrap() > 0,
            "mycelium up exited early:\n{banner}"
        );
    }
    (up, format!("nats://127.0.0.1:{port}"), banner, stdout)
}

/// [`start_up`] for tests that do not read its output (drained so it never blocks).
pub fn start_up_quiet(data_dir: &std::path::Path) -> (Running, String) {
    let (up, url, _, mut stdout) = start_up(data_dir);
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (up, url)
}

/// A nats-server that requires user `alice` with `password`.
pub fn server_with_password(dir: &Path, password: &str) -> mycelium_natsd::NatsServer {
    let mut options = mycelium_natsd::ServerOptions::new(dir);
    options.binary = Some(nats_server_binary());
    options.extra_args = ["--user", "alice", "--pass", password]
        .iter()
        .map(|a| a.to_string())
        .collect();
    mycelium_natsd::NatsServer::spawn(&options).unwrap()
}

/// The child processes of `pid` (all its threads' children).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children: Vec<u32> = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    children.sort_unstable();
    children
}

/// Whether `pid` is a live (not zombie) process.
pub fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// The text of `GET /metrics` from a runtime's metrics address on 127.0.0.1 (blocking).
pub fn scrape_metrics(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// `mycelium --nats-url URL serve OPTIONS...` in the background (logs at warn, output
/// discarded), stopped on drop.
pub fn serve_at(url: &str, options: &[&str]) -> Running {
    Running(
        mycelium()
            .env("RUST_LOG", "warn")
            .args(["--nats-url", url, "serve"])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `mycelium --nats-url URL ARGS...`, to its end.
pub fn run_at(url: &str, args: &[&str]) -> std::process::Output {
    mycelium()
        .args(["--nats-url", url])
        .args(args)
        .output()
        .unwrap()
}

/// The stdout of a command that must have succeeded (its stderr in the panic otherwise).
pub fn succeeded(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until `count` runtime instances answer `$SRV.STATS`.
pub async fn wait_for_instances(client: &mycelium_client::Client, count: usize) {
    mycelium_test_support::eventually(std::time::Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let stats = client.stats(std::time::Duration::from_secs(1)).await.ok()?;
            (stats.instances == count).then_some(())
        }
    })
    .await;
}
