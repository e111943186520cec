//! Randomness for spreading retries, from the standard library's per-process random keys
//! (no dependency: nothing here needs more than "not all clients at once").

/// A random number for ids and jitter, different on every call (not for security: std's
/// per-process random hash keys mixed with the clock).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
