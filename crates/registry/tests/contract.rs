//! One contract, two registries: every behaviour here holds for the in-memory registry and
//! for the JetStream registry on a real nats-server.

use std::{collections::BTreeSet, sync::Arc};

use bytes::Bytes;
use mycelium_core::{FunctionKind, FunctionName};
use mycelium_registry::{
    ArtifactCache, ArtifactSource, DeployErrorKind, DeploySpec, FetchErrorKind, LookupErrorKind,
    MemoryRegistry, NatsRegistry, NatsRegistryConfig, RegistryAdmin, RollbackErrorKind,
};
use mycelium_test_support::NatsServer;

fn name(text: &str) -> FunctionName {
    text.parse().unwrap()
}

fn plugin(fn_name: &str, bytes: &'static [u8]) -> DeploySpec {
    DeploySpec::plugin(
        name(fn_name),
        ArtifactSource::Bytes(Bytes::from_static(bytes)),
    )
}

/// A registry under test and what the test needs to reach behind it.
struct Subject {
    registry: Arc<dyn RegistryAdmin>,
    _server: Option<NatsServer>,
}

async fn memory(keep: usize, max_size: u64) -> Subject {
    Subject {
        registry: Arc::new(MemoryRegistry::with_limits(keep, max_size)),
        _server: None,
    }
}

async fn jetstream(keep: usize, max_size: u64) -> Subject {
    let server = NatsServer::start();
    let config = NatsRegistryConfig {
        keep_versions: keep,
        max_artifact_size: max_size,
        ..NatsRegistryConfig::default()
    };
    let registry = NatsRegistry::open(server.connect().await, config)
        .await
        .unwrap();
    Subject {
        registry: Arc::new(registry),
        _server: Some(server),
    }
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod on_memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::memory).await })*
        }
        mod on_jetstream {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() { super::$test(super::jetstream).await })*
        }
    };
}

contract!(
    deploy_list_describe_versions_rollback_delete,
    bad_deploys_leave_nothing_behind,
    same_binary_same_digest,
    racing_deploys_get_distinct_versions,
    old_versions_are_pruned_but_never_the_active_one,
    the_cache_verifies_and_serves_binaries,
);

type Make<F> = fn(usize, u64) -> F;

async fn deploy_list_describe_versions_rollback_delete<F: std::future::Future<Output = Subject>>(
    make: Make<F>,
) {
    let subject = make(10, 1 << 20).await;
    let registry = &subject.registry;
    let resize = name("resize");

    let mut spec = plugin("resize", b"binary one");
    spec.description = "resizes images".into();
    spec.timeout = Some(std::time::Duration::from_secs(5));
    spec.env.insert("MODE".into(), "fast".into());
    spec.labels.insert("team".into(), "media".into());
    let v1 = registry.deploy(spec).await.unwrap();
    assert_eq!(v1.version, 1);
    assert_eq!(v1.kind, FunctionKind::Plugin);
    assert_eq!(v1.size, Some(10));
    assert!(v1.digest.as_deref().unwrap().starts_with("sha256:"));
    assert!(v1.created_at.is_some());
    assert_eq!(registry.get(&resize, None).unwrap(), v1);

    let v2 = registry
        .deploy(plugin("resize", b"binary two"))
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_ne!(v2.digest, v1.digest);
    assert_eq!(registry.get(&resize, None).unwrap().version, 2);
    assert_eq!(registry.get(&resize, Some(1)).unwrap(), v1);

    let list = registry.list();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].version), ("resize", 2));

    let versions = registry.versions(&resize).unwrap();
    assert_eq!(
        versions
            .versions
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(versions.active, Some(2));

    let back = registry.rollback(&resize, 1).await.unwrap();
    assert_eq!(back, v1);
    assert_eq!(registry.get(&resize, None).unwrap().version, 1);
    assert_eq!(registry.versions(&resize).unwrap().active, Some(1));

    let err = registry.rollback(&resize, 9).await.unwrap_err();
    assert_eq!(err.kind(), RollbackErrorKind::VersionNotFound);
    assert!(err.to_string().contains("kept versions: 1, 2"), "{err}");
    let err = registry.rollback(&name("nobody"), 1).await.unwrap_err();
    assert_eq!(err.kind(), RollbackErrorKind::FunctionNotFound);

    // A deploy after a rollback makes the new version active.
    let v3 = registry
        .deploy(plugin("resize", b"binary three"))
        .await
        .unwrap();
    assert_eq!(v3.version, 3);
    assert_eq!(registry.get(&resize, None).unwrap().version, 3);

    // A built-in deployed under a new name, with its own settings.
    let mut alias = DeploySpec::builtin(name("greeter"), "example");
    alias.max_concurrency = Some(2);
    let greeter = registry.deploy(alias).await.unwrap();
    assert_eq!(
        (
            greeter.kind,
            greeter.entry_point.as_deref(),
            greeter.digest.as_deref()
        ),
        (FunctionKind::Builtin, Some("example"), None)
    );

    registry.delete(&resize).await.unwrap();
    assert_eq!(
        registry.get(&resize, None).unwrap_err().kind(),
        LookupErrorKind::FunctionNotFound
    );
    assert_eq!(
        registry.versions(&resize).unwrap_err().kind(),
        LookupErrorKind::FunctionNotFound
    );
    assert_eq!(registry.list().len(), 1);
    assert_eq!(
        registry.delete(&resize).await.unwrap_err().kind(),
        mycelium_registry::DeleteErrorKind::FunctionNotFound
    );

    // Version numbers are never reused, even after a delete.
    let v4 = registry
        .deploy(plugin("resize", b"binary one"))
        .await
        .unwrap();
    assert_eq!(v4.version, 4);
    assert_eq!(registry.versions(&resize).unwrap().versions.len(), 1);
}

async fn bad_deploys_leave_nothing_behind<F: std::future::Future<Output = Subject>>(make: Make<F>) {
    let subject = make(10, 16).await;
    let registry = &subject.registry;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, [7u8; 17]).unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"echo hi\n").unwrap();

    let cases: Vec<(DeploySpec, DeployErrorKind, &str)> = vec![
        (
            DeploySpec::plugin(name("f"), ArtifactSource::File(dir.path().join("missing"))),
            DeployErrorKind::ArtifactUnreadable,
            "cannot read",
        ),
        (
            DeploySpec::plugin(name("f"), ArtifactSource::File(dir.path().to_owned())),
            DeployErrorKind::ArtifactUnreadable,
            "not a regular file",
        ),
        (
            DeploySpec::plugin(name("f"), ArtifactSource::File(empty)),
            DeployErrorKind::ArtifactEmpty,
            "empty",
        ),
        (
            DeploySpec::plugin(name("f"), ArtifactSource::File(big)),
            DeployErrorKind::ArtifactTooLarge,
            "limit of 16 bytes",
        ),
        (
            DeploySpec::plugin(name("f"), ArtifactSource::File(text)),
            DeployErrorKind::NotExecutable,
            "neither an ELF binary nor a script starting with #!",
        ),
        (
            DeploySpec {
                memory_mb: Some(0),
                ..plugin("f", b"x")
            },
            DeployErrorKind::InvalidSpec,
            "at least 16 MiB",
        ),
        (plugin("f", b""), DeployErrorKind::ArtifactEmpty, "empty"),
        (
            DeploySpec {
                artifact: None,
                ..plugin("f", b"x")
            },
            DeployErrorKind::InvalidSpec,
            "needs a binary",
        ),
        (
            DeploySpec {
                kind: FunctionKind::Builtin,
                ..plugin("f", b"x")
            },
            DeployErrorKind::InvalidSpec,
            "without a binary",
        ),
        (
            DeploySpec::builtin(name("f"), "Not.A.Name"),
            DeployErrorKind::InvalidSpec,
            "entry point",
        ),
    ];
    for (spec, kind, needle) in cases {
        let err = registry.deploy(spec).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(registry.list().is_empty());
    assert_eq!(
        registry.versions(&name("f")).unwrap_err().kind(),
        LookupErrorKind::FunctionNotFound
    );
    // No version number was consumed by the failures.
    assert_eq!(
        registry.deploy(plugin("f", b"ok")).await.unwrap().version,
        1
    );
}

async fn same_binary_same_digest<F: std::future::Future<Output = Subject>>(make: Make<F>) {
    let subject = make(10, 1 << 20).await;
    let registry = &subject.registry;
    let a = registry
        .deploy(plugin("a", b"shared binary"))
        .await
        .unwrap();
    let b = registry
        .deploy(plugin("b", b"shared binary"))
        .await
        .unwrap();
    let a2 = registry
        .deploy(plugin("a", b"shared binary"))
        .await
        .unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.digest, a2.digest);
    assert_eq!(a2.version, 2);
}

async fn racing_deploys_get_distinct_versions<F: std::future::Future<Output = Subject>>(
    make: Make<F>,
) {
    let subject = make(100, 1 << 20).await;
    let deploys: Vec<_> = (0..8)
        .map(|i| {
            let registry = subject.registry.clone();
            tokio::spawn(async move {
                let bytes: &'static [u8] =
                    Box::leak(format!("binary {i}").into_bytes().into_boxed_slice());
                registry
                    .deploy(plugin("raced", bytes))
                    .await
                    .unwrap()
                    .version
            })
        })
        .collect();
    let mut versions = BTreeSet::new();
    for deploy in deploys {
        assert!(
            versions.insert(deploy.await.unwrap()),
            "a version was handed out twice"
        );
    }
    assert_eq!(versions, (1..=8).collect());
    // The newest version is active, whichever deploy finished last.
    assert_eq!(
        subject.registry.get(&name("raced"), None).unwrap().version,
        8
    );
}

async fn old_versions_are_pruned_but_never_the_active_one<
    F: std::future::Future<Output = Subject>,
>(
    make: Make<F>,
) {
    let subject = make(3, 1 << 20).await;
    let registry = &subject.registry;
    let f = name("pruned");
    for i in 1..=5u8 {
        let bytes: &'static [u8] = Box::leak(vec![i; 4].into_boxed_slice());
        registry.deploy(plugin("pruned", bytes)).await.unwrap();
    }
    let kept: Vec<u64> = registry
        .versions(&f)
        .unwrap()
        .versions
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(kept, [3, 4, 5]);
    assert_eq!(
        registry.get(&f, Some(1)).unwrap_err().kind(),
        LookupErrorKind::VersionNotFound
    );

    registry.rollback(&f, 3).await.unwrap();
    registry.deploy(plugin("pruned", b"six")).await.unwrap();
    registry.deploy(plugin("pruned", b"seven")).await.unwrap();
    let kept: Vec<u64> = registry
        .versions(&f)
        .unwrap()
        .versions
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(kept, [5, 6, 7]);
}

async fn the_cache_verifies_and_serves_binaries<F: std::future::Future<Output = Subject>>(
    make: Make<F>,
) {
    let subject = make(10, 1 << 20).await;
    let registry = &subject.registry;
    let dir = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(dir.path().join("cache"), 64).unwrap();

    let binary = registry
        .deploy(plugin("cached", b"#!/bin/sh\necho hi\n"))
        .await
        .unwrap();
    let path = cache.fetch(registry.as_ref(), &binary).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"#!/bin/sh\necho hi\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o111,
        0o111,
        "executable"
    );
    assert_eq!(
        cache.fetch(registry.as_ref(), &binary).await.unwrap(),
        path,
        "warm fetch"
    );

    // Built-ins have no binary.
    let builtin = registry
        .deploy(DeploySpec::builtin(name("alias"), "echo"))
        .await
        .unwrap();
    assert_eq!(
        cache
            .fetch(registry.as_ref(), &builtin)
            .await
            .unwrap_err()
            .kind(),
        FetchErrorKind::NoArtifact
    );

    // Metadata whose pin does not match the stored bytes is refused and leaves no file.
    let mut forged = (*binary).clone();
    forged.digest = Some(mycelium_registry::digest::digest_of(b"something else"));
    let err = cache.fetch(registry.as_ref(), &forged).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            FetchErrorKind::Corrupt | FetchErrorKind::Missing
        ),
        "{err}"
    );
    let files = std::fs::read_dir(cache.dir()).unwrap().count();
    assert_eq!(files, 1, "only the verified binary is in the cache");

    // The size bound evicts the least recently used binary.
    let a = registry.deploy(plugin("a", &[1; 40])).await.unwrap();
    let b = registry.deploy(plugin("b", &[2; 40])).await.unwrap();
    let path_a = cache.fetch(registry.as_ref(), &a).await.unwrap();
    let path_b = cache.fetch(registry.as_ref(), &b).await.unwrap();
    assert!(path_b.exists());
    assert!(
        !path_a.exists(),
        "a was evicted to keep the cache under 64 bytes"
    );
}
