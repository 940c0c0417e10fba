//! The workflow registry: which `workflow_key`s exist and what they run.
//!
//! Issue 2 only needs the set of keys (a job for an unknown key is refused);
//! the step definitions are read by the job execution handler (issue 4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Default location, relative to the working directory.
pub const DEFAULT_REGISTRY_PATH: &str = "workflows/registry.json";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub version: u32,
    pub workflows: BTreeMap<String, WorkflowDefinition>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkflowDefinition {
    #[serde(default)]
    pub description: String,
    /// Step definitions, interpreted by the execution handler.
    #[serde(default)]
    pub steps: Vec<Value>,
    #[serde(default)]
    pub requires_approval: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read workflow registry {path}: {source} (pass another file with --registry)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("workflow registry {path} is not valid: {path_in_file}: {message}")]
    Invalid {
        path: PathBuf,
        path_in_file: String,
        message: String,
    },
    #[error(
        "workflow registry {path}: unsupported version {version} (this build reads version 1)"
    )]
    Version { path: PathBuf, version: u32 },
    #[error("workflow registry {path}: workflow key {key:?} is not valid: keys are 1-128 characters of a-z, 0-9, '.', '_' and '-'")]
    BadKey { path: PathBuf, key: String },
}

impl Registry {
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, RegistryError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let registry: Registry =
            serde_path_to_error::deserialize(de).map_err(|e| RegistryError::Invalid {
                path: path.to_owned(),
                path_in_file: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        if registry.version != 1 {
            return Err(RegistryError::Version {
                path: path.to_owned(),
                version: registry.version,
            });
        }
        if let Some(key) = registry.workflows.keys().find(|k| !valid_key(k)) {
            return Err(RegistryError::BadKey {
                path: path.to_owned(),
                key: key.clone(),
            });
        }
        Ok(registry)
    }

    /// A registry holding the given keys with no steps (for tests and tools).
    pub fn with_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Registry {
            version: 1,
            workflows: keys
                .into_iter()
                .map(|k| {
                    (
                        k.to_string(),
                        WorkflowDefinition {
                            description: String::new(),
                            steps: Vec::new(),
                            requires_approval: false,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.workflows.contains_key(key)
    }

    pub fn keys(&self) -> Vec<&str> {
        self.workflows.keys().map(String::as_str).collect()
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_registry_parses() {
        let r = Registry::load(Path::new(DEFAULT_REGISTRY_PATH)).expect("shipped registry");
        assert!(r.contains("invoice.extract"));
    }

    #[test]
    fn invalid_registry_names_the_field() {
        let err = Registry::parse(
            Path::new("r.json"),
            r#"{"version":1,"workflows":{"a":{"requires_approval":"yes"}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("workflows.a.requires_approval"), "{err}");
    }

    #[test]
    fn bad_key_is_refused() {
        let err = Registry::parse(
            Path::new("r.json"),
            r#"{"version":1,"workflows":{"A B":{}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"A B\""), "{err}");
    }
}
