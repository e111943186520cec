//! One warm call of a WebAssembly function through the executor, without NATS: what the
//! instance, the WASI context and the ABI cost per invocation (the `wasm` row of
//! `./dev bench` adds the runtime's request path).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use mycelium_core::{Function, InvocationContext};
use mycelium_registry::{ArtifactCache, ArtifactSource, DeploySpec, MemoryRegistry, RegistryAdmin};
use mycelium_test_support::{event, wasm_guest};
use mycelium_wasm::{WasmExecutor, WasmSettings};
use tokio_util::sync::CancellationToken;

fn call_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(MemoryRegistry::new());
    let executor = WasmExecutor::new(
        registry.clone(),
        ArtifactCache::new(dir.path(), 1 << 30).unwrap(),
        WasmSettings::default(),
        None,
    );
    let function = runtime.block_on(async {
        let spec = DeploySpec::wasm(
            "echo".parse().unwrap(),
            ArtifactSource::Bytes(Bytes::from(wasm_guest("echo"))),
        );
        let metadata = registry.deploy(spec).await.unwrap();
        executor.prestart(&metadata).await.unwrap();
        executor.function(&metadata)
    });
    let input = event("bench", serde_json::json!({"data": "x".repeat(64)}));
    c.bench_function("warm call of the WAT echo guest", |b| {
        b.to_async(&runtime).iter(|| {
            let ctx = InvocationContext::new(
                "echo".parse().unwrap(),
                1,
                "bench",
                Instant::now() + Duration::from_secs(30),
                CancellationToken::new(),
                tracing::Span::none(),
            );
            let (function, input) = (function.clone(), input.clone());
            async move { function.execute(input, ctx).await.unwrap() }
        })
    });
}

criterion_group!(benches, call_benches);
criterion_main!(benches);
