//! Starts one plugin process, prints its pid, and waits to be killed: the test kills this
//! host with SIGKILL and checks that the plugin does not outlive it.

use std::time::Duration;

use mycelium_plugin::host::{PluginProcess, ProcessConfig};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(plugin), Some(work_dir)) = (args.next(), args.next()) else {
        eprintln!("usage: mycelium-e2e-host PLUGIN WORK_DIR");
        std::process::exit(2);
    };
    let config = ProcessConfig {
        stop_grace: Duration::from_secs(1),
        redactions: Default::default(),
        ..ProcessConfig::new(
            "orphan-check".parse().expect("valid name"),
            1,
            work_dir.into(),
        )
    };
    let process = PluginProcess::start(plugin.as_ref(), config)
        .await
        .expect("plugin starts");
    println!("{}", process.pid());
    tokio::time::sleep(Duration::from_secs(3600)).await;
}
