//! Function names: the one identifier that travels into subjects and KV keys.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

/// The longest accepted function name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A validated function name: 1 to 64 of `a-z`, `0-9`, `-` and `_`.
///
/// Names become NATS subject tokens (`function.invoke.<name>`) and KV keys, so anything
/// that could split or widen a subject (`.`, `*`, `>`, whitespace) is rejected here, once.
/// Cloning is cheap: the text is shared.
///
/// ```
/// use mycelium_core::FunctionName;
/// let name: FunctionName = "resize-image".parse().unwrap();
/// assert_eq!(name.as_str(), "resize-image");
/// assert!("Resize.Image".parse::<FunctionName>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionName(Arc<str>);

/// Why a string is not a [`FunctionName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid function name {shown}: {reason}; use 1 to 64 characters of a-z, 0-9, '-' and '_'")]
pub struct InvalidFunctionName {
    shown: String,
    reason: &'static str,
}

impl FunctionName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, InvalidFunctionName> {
        validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(name: &str) -> Result<(), InvalidFunctionName> {
    let reject = |reason| {
        // Show at most a prefix so a hostile megabyte name does not echo back in full.
        let mut shown: String = name.chars().take(MAX_NAME_LEN + 8).collect();
        if shown.len() < name.len() {
            shown.push('…');
        }
        Err(InvalidFunctionName {
            shown: format!("{shown:?}"),
            reason,
        })
    };
    if name.is_empty() {
        return reject("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return reject("it is longer than 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return reject("it contains a character outside a-z, 0-9, '-' and '_'");
    }
    Ok(())
}

impl std::str::FromStr for FunctionName {
    type Err = InvalidFunctionName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for FunctionName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for FunctionName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        FunctionName::new(&text).map_err(serde::de::Error::custom)
    }
}

impl AsRef<str> for FunctionName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet_up_to_64() {
        for ok in ["a", "echo", "resize-image_v2", "0", &"x".repeat(64)] {
            assert_eq!(FunctionName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_that_could_touch_a_subject() {
        for bad in [
            "",
            "Echo",
            "a.b",
            "a*",
            ">",
            "a b",
            "a\tb",
            "é",
            "a/b",
            "a\0",
            "ab.>",
            &"x".repeat(65),
        ] {
            let err = FunctionName::new(bad).unwrap_err();
            assert!(err.to_string().contains("a-z, 0-9"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn error_message_truncates_long_names() {
        let err = FunctionName::new(&"Y".repeat(10_000))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 300, "{err}");
        assert!(err.contains("longer than 64"));
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<FunctionName>("\"ok-name\"").is_ok());
        assert!(serde_json::from_str::<FunctionName>("\"Bad.Name\"").is_err());
    }
}
