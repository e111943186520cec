//! End-to-end tests of plugin functions; the binaries in `src/bin` are the plugins and hosts
//! the tests run as real processes. What the tests and the bench share lives here.

use std::{path::Path, sync::Arc};

use mycelium_core::MetricsCollector;
use mycelium_plugin::pool::{PluginExecutor, PoolSettings};
use mycelium_registry::{ArtifactCache, RegistryAdmin};

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
