//! Probe credentials (SMTP AUTH, IMAP login) from an agent-local TOML file that only its owner may
//! read. Passwords live in [`Secret`], whose `Debug` and `Display` print `***`; they never go into
//! results, logs or the collector.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;

/// A secret string; printing it in any way shows `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One login.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub user: String,
    pub password: Secret,
}

/// Logins by name (`[name] user = "…" password = "…"`), for probes to refer to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, Credential>);

impl Credentials {
    pub fn get(&self, name: &str) -> Option<&Credential> {
        self.0.get(name)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the file's text; errors give the line, never the file's content.
    pub fn parse(file: &str, text: &str) -> Result<Credentials, ConfigError> {
        toml::from_str::<BTreeMap<String, Credential>>(text)
            .map(Credentials)
            .map_err(|e| {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                    .unwrap_or(1);
                ConfigError::Credentials {
                    file: file.to_string(),
                    message: format!(
                        "line {line}: expected sections like [name] with user = \"…\" and \
                         password = \"…\" (both strings, nothing else)"
                    ),
                }
            })
    }

    /// Loads `path`, refusing a file that its group or others may read or write.
    pub fn load(path: &Path) -> Result<Credentials, ConfigError> {
        let file = path.display().to_string();
        let err = |message: String| ConfigError::Credentials {
            file: file.clone(),
            message,
        };
        let bytes = mxscope_proto::secret::read_private(path).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| err("not UTF-8 text (expected TOML sections)".to_string()))?;
        Credentials::parse(&file, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const FILE: &str = "[relay]\nuser = \"probe@example.com\"\npassword = \"hunter2-s3cret\"\n";

    #[test]
    fn secrets_never_print() {
        let creds = Credentials::parse("c.toml", FILE).unwrap();
        let c = creds.get("relay").expect("relay entry");
        assert_eq!(c.user, "probe@example.com");
        assert_eq!(c.password.expose(), "hunter2-s3cret");
        for shown in [
            format!("{creds:?}"),
            format!("{creds:#?}"),
            format!("{c:?}"),
            format!("{}", c.password),
        ] {
            assert!(!shown.contains("hunter2"), "secret leaked: {shown}");
        }
        assert!(format!("{c:?}").contains("***"));
    }

    #[test]
    fn group_or_world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        std::fs::write(&path, FILE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::load(&path).unwrap_err().to_string();
        assert!(e.contains("creds.toml") && e.contains("chmod 600"), "{e}");
        assert!(e.contains("0644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Credentials::load(&path).unwrap().len(), 1);
    }

    #[test]
    fn parse_errors_do_not_echo_the_content() {
        let bad = "[relay]\nuser = \"u\"\npassword = \"topsecret\"\nextra = \"x\"\n";
        let e = Credentials::parse("c.toml", bad).unwrap_err().to_string();
        assert!(!e.contains("topsecret"), "{e}");
        assert!(e.starts_with("c.toml: line "), "{e}");
    }
}
