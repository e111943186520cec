//! Content addressing: SHA-256 digests as `sha256:<hex>` and object names derived from them.

use sha2::{Digest, Sha256};

/// Prefix of every digest Mycelium writes.
pub const DIGEST_PREFIX: &str = "sha256:";

/// Incremental SHA-256 with the byte count, for streaming uploads and downloads.
#[derive(Default)]
pub struct Hasher {
    sha: Sha256,
    size: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// The digest (`sha256:<hex>`) and the number of bytes fed.
    pub fn finish(self) -> (String, u64) {
        let hash = self.sha.finalize();
        let mut text = String::with_capacity(DIGEST_PREFIX.len() + 64);
        text.push_str(DIGEST_PREFIX);
        for byte in hash {
            text.push_str(&format!("{byte:02x}"));
        }
        (text, self.size)
    }
}

/// The digest of a byte slice.
pub fn digest_of(bytes: &[u8]) -> String {
    let mut hasher = Hasher::new();
    hasher.update(bytes);
    hasher.finish().0
}

/// The object (and cache file) name of a digest: `sha256-<hex>`, valid as an Object Store
/// name and a file name. `None` for text that is not a Mycelium digest.
pub fn object_name(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix(DIGEST_PREFIX)?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| format!("sha256-{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_object_name() {
        let digest = digest_of(b"abc");
        assert_eq!(
            digest,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            object_name(&digest).unwrap(),
            "sha256-ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(object_name("md5:abc"), None);
        assert_eq!(object_name("sha256:../../etc/passwd"), None);
    }
}
