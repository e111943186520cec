//! Registry lookups: one per invocation, from memory.

use criterion::{criterion_group, criterion_main, Criterion};
use mycelium_core::{FunctionMetadata, FunctionName};
use mycelium_registry::{MemoryRegistry, Registry};

fn lookup_benches(c: &mut Criterion) {
    let registry = MemoryRegistry::new();
    for i in 0..1000 {
        registry.insert(FunctionMetadata::builtin(
            format!("function-{i}").parse().unwrap(),
            "bench",
        ));
    }
    let name: FunctionName = "function-500".parse().unwrap();
    c.bench_function("get active version (1000 functions)", |b| {
        b.iter(|| registry.get(std::hint::black_box(&name), None).unwrap())
    });
    c.bench_function("get explicit version", |b| {
        b.iter(|| registry.get(std::hint::black_box(&name), Some(1)).unwrap())
    });
}

criterion_group!(benches, lookup_benches);
criterion_main!(benches);
