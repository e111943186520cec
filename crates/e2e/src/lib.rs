//! End-to-end tests of plugin functions; the binaries in `src/bin` are the plugins and hosts
//! the tests run as real processes. What the tests and the bench share lives here.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mycelium_core::MetricsCollector;
use mycelium_plugin::pool::{PluginExecutor, PoolSettings};
use mycelium_registry::{ArtifactCache, ArtifactSource, DeploySpec, NatsRegistry, RegistryAdmin};

/// A plugin executor with its binary cache and process directories under `dir`.
pub fn plugin_executor(
    registry: Arc<dyn RegistryAdmin>,
    dir: &Path,
    settings: PoolSettings,
    metrics: Option<Arc<dyn MetricsCollector>>,
) -> Arc<PluginExecutor> {
    let cache = ArtifactCache::new(dir.join("cache"), 1 << 30).expect("creating the plugin cache");
    Arc::new(PluginExecutor::new(
        registry,
        cache,
        dir.join("work"),
        settings,
        metrics,
    ))
}

/// Deploys `binary` as plugin `name` through `admin` and waits until `runtime_registry` (the
/// runtime's view) has it active; returns the version.
pub async fn deploy_plugin(
    admin: &dyn RegistryAdmin,
    runtime_registry: &NatsRegistry,
    name: &str,
    binary: impl Into<PathBuf>,
) -> u64 {
    let name: mycelium_core::FunctionName = name.parse().expect("a valid function name");
    let spec = DeploySpec::plugin(name.clone(), ArtifactSource::File(binary.into()));
    let version = admin.deploy(spec).await.expect("deploying").version;
    assert!(
        runtime_registry
            .wait_for_active(&name, version, Duration::from_secs(30))
            .await,
        "the runtime did not see {name} v{version}"
    );
    version
}
