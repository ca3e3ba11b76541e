//! The API keys of `[server]`: listed in the topology (`api_keys`), in a file of their
//! own (`api_keys_file`) or in an environment variable (`api_keys_env`), in any
//! combination. Keys are secrets: they are held as [`SecretString`] (redacted when
//! debug-printed, wiped when dropped), and no error here ever quotes one.

use super::{Topology, TopologyError};
use secrecy::zeroize::Zeroizing;
use secrecy::SecretString;
use serde::de::{Deserializer, SeqAccess, Visitor};
use std::ffi::OsString;
use std::fmt;
use std::path::Path;

/// Why `key` cannot be an API key, if it cannot (without quoting it).
fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("is empty")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some(
            "has a space, a control character or a non-ASCII character \
             (keys are printable ASCII: they travel in an HTTP header)",
        )
    } else {
        None
    }
}

/// Deserializes `server.api_keys`: a list of strings, or one string. Unlike serde's
/// usual type errors, its errors never quote a string (a key).
pub(super) fn deserialize_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    d.deserialize_any(KeysVisitor)
}

struct KeysVisitor;

impl<'de> Visitor<'de> for KeysVisitor {
    type Value = Vec<SecretString>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of API keys (strings)")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(vec![SecretString::from(v)])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut keys = Vec::new();
        while let Some(k) = seq.next_element::<SecretString>()? {
            keys.push(k);
        }
        Ok(keys)
    }
}

impl Topology {
    /// Every API key the topology names: `server.api_keys`, then the lines of
    /// `server.api_keys_file`, then the words of `server.api_keys_env` (none at all: the
    /// API is open). Reads the file and the variable now; an unreadable file, an unset
    /// variable, or a source that holds no key is an error naming the topology key and
    /// line (and the line of the keys file), never a key.
    pub fn api_keys(&self) -> Result<Vec<SecretString>, TopologyError> {
        self.api_keys_with(|name| std::env::var_os(name))
    }

    /// [`Topology::api_keys`] with the environment given by `var`.
    pub(super) fn api_keys_with(
        &self,
        var: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Vec<SecretString>, TopologyError> {
        let s = &self.server;
        let mut keys = s.api_keys.clone();
        if let Some(path) = &s.api_keys_file {
            keys.extend(self.keys_from_file(path)?);
        }
        if let Some(name) = &s.api_keys_env {
            keys.extend(self.keys_from_env(name, var(name))?);
        }
        Ok(keys)
    }

    /// Checks of `[server]`'s key settings that need neither the file nor the variable.
    pub(super) fn check_api_key_settings(&self) -> Result<(), TopologyError> {
        let s = &self.server;
        for (i, k) in s.api_keys.iter().enumerate() {
            use secrecy::ExposeSecret;
            if let Some(p) = key_problem(k.expose_secret()) {
                return Err(self.error_at("server.api_keys", format!("key {} of the list {p}", i + 1)));
            }
        }
        if s.api_keys_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(self.error_at("server.api_keys_file", "must name a file"));
        }
        if s.api_keys_env.as_ref().is_some_and(|v| v.is_empty()) {
            return Err(self.error_at("server.api_keys_env", "must name an environment variable"));
        }
        Ok(())
    }

    /// One key a line; blank lines and lines starting with `#` are skipped.
    fn keys_from_file(&self, path: &Path) -> Result<Vec<SecretString>, TopologyError> {
        let key = "server.api_keys_file";
        let shown = path.display();
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| self.error_at(key, format!("cannot read `{shown}`: {e}")))?,
        );
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(p) = key_problem(line) {
                return Err(self.error_at(key, format!("`{shown}`, line {}: the key {p}", n + 1)));
            }
            keys.push(SecretString::from(line));
        }
        if keys.is_empty() {
            return Err(self.error_at(
                key,
                format!("`{shown}` holds no key (only blank lines and `#` comments)"),
            ));
        }
        Ok(keys)
    }

    /// Keys separated by commas or whitespace.
    fn keys_from_env(&self, name: &str, value: Option<OsString>) -> Result<Vec<SecretString>, TopologyError> {
        let key = "server.api_keys_env";
        let value = match value.map(OsString::into_string) {
            None => return Err(self.error_at(key, format!("the environment variable `{name}` is not set"))),
            Some(Err(_)) => {
                return Err(self.error_at(key, format!("the environment variable `{name}` is not valid UTF-8")))
            }
            Some(Ok(v)) => Zeroizing::new(v),
        };
        let mut keys = Vec::new();
        for (i, word) in value
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .enumerate()
        {
            if let Some(p) = key_problem(word) {
                return Err(self.error_at(key, format!("key {} of `{name}` {p}", i + 1)));
            }
            keys.push(SecretString::from(word));
        }
        if keys.is_empty() {
            return Err(self.error_at(
                key,
                format!("the environment variable `{name}` holds no key (it is empty or only commas and spaces)"),
            ));
        }
        Ok(keys)
    }
}
