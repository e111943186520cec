//! Secrets as functions see them: the names a deploy refers to, and the opened values a runtime
//! hands to one function's processes or instances. Sealing and storage live in the registry.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

/// The longest accepted secret name, in bytes.
pub const MAX_SECRET_NAME_LEN: usize = 64;

/// A validated secret name: 1 to 64 of `A-Z`, `a-z`, `0-9`, `-` and `_`.
///
/// Names become KV keys (`secret.<name>`), so nothing that could split a key is accepted.
///
/// ```
/// use mycelium_core::secret::SecretName;
/// assert!(SecretName::new("db-password").is_ok());
/// assert!(SecretName::new("DB_PASSWORD").is_ok());
/// assert!(SecretName::new("db.password").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretName(Arc<str>);

/// Why a string is not a [`SecretName`] or an environment variable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(String);

impl SecretName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        let fits = !name.is_empty()
            && name.len() <= MAX_SECRET_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !fits {
            return Err(InvalidName(format!(
                "invalid secret name {}: use 1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'",
                shown(name)
            )));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks an environment variable name a secret is delivered under: a letter or `_`, then
/// letters, digits and `_` (what every shell and runtime reads back).
pub fn check_env_name(name: &str) -> Result<(), InvalidName> {
    let mut bytes = name.bytes();
    let first = bytes.next();
    let fits = name.len() <= 256
        && first.is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if fits {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "invalid environment variable name {}: use a letter or '_', then letters, digits and '_'",
            shown(name)
        )))
    }
}

/// At most a prefix of a rejected name, so a hostile megabyte does not echo back in full.
fn shown(name: &str) -> String {
    let mut shown: String = name.chars().take(72).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

impl std::str::FromStr for SecretName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for SecretName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        SecretName::new(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so tables can align names with `{:<32}`.
        f.pad(&self.0)
    }
}

impl fmt::Debug for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The opened secrets of one function version: environment variables for its processes or
/// instances, and which version of each secret they hold.
///
/// Two `SecretEnv`s are equal when they hold the same versions of the same secrets under the
/// same names: an executor keeps what it started while that holds, and starts afresh (the
/// rotation) when it does not. `Debug` shows names and versions, never values. Cloning is
/// cheap, and an empty one (the default) allocates nothing.
#[derive(Clone, Default)]
pub struct SecretEnv(Option<Arc<[SecretVar]>>);

/// One delivered secret.
struct SecretVar {
    env: String,
    secret: SecretName,
    version: u64,
    value: String,
}

impl SecretEnv {
    /// The env of `(environment variable, secret, version, value)` entries.
    pub fn new(vars: impl IntoIterator<Item = (String, SecretName, u64, String)>) -> Self {
        let mut vars: Vec<SecretVar> = vars
            .into_iter()
            .map(|(env, secret, version, value)| SecretVar {
                env,
                secret,
                version,
                value,
            })
            .collect();
        vars.sort_by(|a, b| a.env.cmp(&b.env));
        Self((!vars.is_empty()).then(|| vars.into()))
    }

    /// Whether there is nothing to deliver.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn entries(&self) -> &[SecretVar] {
        self.0.as_deref().unwrap_or_default()
    }

    /// The environment variables: `(name, value)`.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries()
            .iter()
            .map(|v| (v.env.as_str(), v.value.as_str()))
    }

    /// The values, for cutting out of text that leaves the function (see `redact`).
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.entries().iter().map(|v| v.value.as_str())
    }

    /// `text` with every value of at least [`MIN_REDACTED_LEN`] bytes replaced by
    /// `[redacted]`; borrowed when there is nothing to cut.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut text = std::borrow::Cow::Borrowed(text);
        for value in self.values().filter(|v| v.len() >= MIN_REDACTED_LEN) {
            if text.contains(value) {
                text = text.replace(value, "[redacted]").into();
            }
        }
        text
    }
}

/// The shortest secret value cut out of output: shorter ones (`true`, `1`) would garble text
/// and hide nothing.
pub const MIN_REDACTED_LEN: usize = 4;

impl PartialEq for SecretEnv {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => true,
            (Some(a), Some(b)) => {
                a.len() == b.len()
                    && a.iter().zip(b.iter()).all(|(a, b)| {
                        a.env == b.env && a.secret == b.secret && a.version == b.version
                    })
            }
            _ => false,
        }
    }
}

impl Eq for SecretEnv {}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.entries()
                    .iter()
                    .map(|v| (&v.env, format!("{}@v{}", v.secret, v.version))),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(version: u64, value: &str) -> SecretEnv {
        SecretEnv::new([(
            "DB_PASSWORD".to_owned(),
            SecretName::new("db").unwrap(),
            version,
            value.to_owned(),
        )])
    }

    #[test]
    fn names_line_up_in_tables() {
        assert_eq!(
            format!("[{:<6}]", SecretName::new("db").unwrap()),
            "[db    ]"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(SecretName::new("a").is_ok());
        assert!(SecretName::new(&"a".repeat(64)).is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"a".repeat(65)] {
            assert!(SecretName::new(bad).is_err(), "{bad:?}");
        }
        assert!(check_env_name("DB_PASSWORD").is_ok());
        assert!(check_env_name("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A=B", "A\0"] {
            assert!(check_env_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn envs_are_equal_by_secret_versions_and_never_show_values() {
        assert_eq!(env(1, "hunter22"), env(1, "hunter22"));
        assert_ne!(env(1, "hunter22"), env(2, "hunter22"));
        let shown = format!("{:?}", env(3, "hunter22"));
        assert_eq!(shown, r#"{"DB_PASSWORD": "db@v3"}"#);
    }

    #[test]
    fn values_are_cut_out_of_text() {
        let env = env(1, "hunter22");
        assert_eq!(env.redact("pw=hunter22!"), "pw=[redacted]!");
        assert!(matches!(
            env.redact("nothing here"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
