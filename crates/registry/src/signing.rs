//! Signed binaries: the deployer signs a binary's digest with an NKey, runtimes that trust
//! signers refuse binaries not signed by one of them.

use std::sync::Arc;

use mycelium_core::FunctionMetadata;

use crate::{DeployError, DeployErrorKind, FetchError, FetchErrorKind};

/// An NKey that signs binaries' digests at deploy ([`DeploySpec::signing_key`]). Shows only
/// its public key when printed.
#[derive(Clone)]
pub struct SigningKey(Arc<nkeys::KeyPair>);

impl SigningKey {
    /// The key of an NKey seed (`SU...`, `SA...`, ...), as `nsc` or `nk -gen user` make them.
    pub fn from_seed(seed: &str) -> Result<Self, DeployError> {
        nkeys::KeyPair::from_seed(seed.trim())
            .map(|pair| Self(Arc::new(pair)))
            .map_err(|e| {
                DeployError::with_source(
                    DeployErrorKind::InvalidSpec,
                    "the signing key is not an NKey seed (it starts with S)",
                    e,
                )
            })
    }

    /// The public key runtimes are configured to trust.
    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    pub(crate) fn sign(&self, digest: &str) -> Result<String, DeployError> {
        let signature = self.0.sign(digest.as_bytes()).map_err(|e| {
            DeployError::with_source(DeployErrorKind::InvalidSpec, "signing the digest", e)
        })?;
        Ok(signature.iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SigningKey")
            .field(&self.public_key())
            .finish()
    }
}

/// Checks that the binary `metadata` pins was signed by one of `trusted` (public NKeys).
/// With no trusted keys every binary passes: signing is opt-in.
pub fn verify_signature(metadata: &FunctionMetadata, trusted: &[String]) -> Result<(), FetchError> {
    if trusted.is_empty() {
        return Ok(());
    }
    let untrusted = |why: String| {
        FetchError::new(
            FetchErrorKind::Untrusted,
            format!(
                "\"{}\" v{} {why}; this runtime runs only binaries signed by {}: deploy with \
                 --sign-key and a trusted key",
                metadata.name,
                metadata.version,
                trusted.join(", ")
            ),
        )
    };
    let (Some(digest), Some(signer), Some(signature)) = (
        metadata.digest.as_deref(),
        metadata.signer.as_deref(),
        metadata.signature.as_deref(),
    ) else {
        return Err(untrusted("is not signed".into()));
    };
    if !trusted.iter().any(|key| key == signer) {
        return Err(untrusted(format!(
            "is signed by {signer}, an untrusted key"
        )));
    }
    let bytes: Option<Vec<u8>> = (0..signature.len())
        .step_by(2)
        .map(|i| {
            signature
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let valid = bytes.is_some_and(|bytes| {
        nkeys::KeyPair::from_public_key(signer)
            .and_then(|key| key.verify(digest.as_bytes(), &bytes))
            .is_ok()
    });
    if valid {
        Ok(())
    } else {
        Err(untrusted(format!(
            "carries a signature by {signer} that does not match its digest"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest;

    fn signed(key: &SigningKey) -> FunctionMetadata {
        let mut metadata = FunctionMetadata::builtin("f".parse().unwrap(), "");
        metadata.digest = Some(digest::digest_of(b"binary"));
        metadata.signer = Some(key.public_key());
        metadata.signature = Some(key.sign(metadata.digest.as_deref().unwrap()).unwrap());
        metadata
    }

    #[test]
    fn signatures_are_checked_against_the_digest_and_the_trusted_keys() {
        let key = SigningKey::from_seed(&nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        let trusted = vec![key.public_key()];
        let good = signed(&key);
        assert!(verify_signature(&good, &trusted).is_ok());
        assert!(
            verify_signature(&good, &[]).is_ok(),
            "no trusted keys: signing is off"
        );

        let mut other_binary = good.clone();
        other_binary.digest = Some(digest::digest_of(b"another binary"));
        let mut flipped = good.clone();
        let mut text = flipped.signature.take().unwrap();
        let last = if text.ends_with('0') { "1" } else { "0" };
        text.replace_range(text.len() - 1.., last);
        flipped.signature = Some(text);
        let mut garbage = good.clone();
        garbage.signature = Some("zz".into());
        let mut unsigned = good.clone();
        unsigned.signature = None;
        for (metadata, why) in [
            (other_binary, "does not match"),
            (flipped, "does not match"),
            (garbage, "does not match"),
            (unsigned, "is not signed"),
        ] {
            let error = verify_signature(&metadata, &trusted).unwrap_err();
            assert_eq!(error.kind(), FetchErrorKind::Untrusted);
            assert!(error.to_string().contains(why), "{error}");
        }
        let stranger = SigningKey::from_seed(&nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        let error = verify_signature(&signed(&stranger), &trusted).unwrap_err();
        assert!(error.to_string().contains("untrusted key"), "{error}");
        assert!(
            format!("{key:?}").starts_with("SigningKey(\"U"),
            "only the public key shows"
        );
        assert!(SigningKey::from_seed("not a seed").is_err());
    }
}
