//! The `SecretCache` aggregate (aggregate type `secret_cache`, one per
//! secret path, id [`aggregate_id`]): an operator's invalidations of a
//! path's cached values. Each instance's cache drops the path when the
//! event is stored (rotation without restart).

pub mod events;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::commands::secret_access::{check_path, SecretAccessError};
use crate::commands::{DomainError, ErrorCode};
use events::{SecretCacheEvent, SecretCacheInvalidated};

/// A path holds '/', which aggregate ids (NATS subject tokens) may not:
/// the id is the first 32 hex digits of the path's SHA-256.
pub fn aggregate_id(path: &str) -> String {
    hex::encode(&Sha256::digest(path.as_bytes())[..16])
}

/// How often the path's cache was invalidated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretCache {
    /// Invalidations recorded.
    pub invalidations: u64,
}

/// Drop `path`'s cached values everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidate {
    /// The KV v2 path.
    pub path: String,
    /// Why; not blank.
    pub reason: String,
}

/// Why an invalidation was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecretCacheError {
    /// The path or the reason is malformed (`validation`).
    #[error(transparent)]
    Invalid(#[from] SecretAccessError),
}

impl DomainError for SecretCacheError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Validation
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            SecretCacheError::Invalid(e) => e.field(),
        }
    }
}

impl SecretCache {
    /// Pure decision: any valid path may be invalidated, with a reason.
    pub fn decide(&self, c: Invalidate) -> Result<Vec<SecretCacheEvent>, SecretCacheError> {
        check_path(&c.path)?;
        if c.reason.trim().is_empty() || c.reason.chars().count() > 500 {
            return Err(SecretAccessError::Invalid {
                field: "reason",
                message: "must say why the cache is dropped (1-500 characters)".into(),
            }
            .into());
        }
        Ok(vec![SecretCacheEvent::SecretCacheInvalidated(
            SecretCacheInvalidated {
                path: c.path,
                reason: c.reason,
            },
        )])
    }
}

crate::commands::aggregate!(
    SecretCache,
    "secret_cache",
    Invalidate,
    SecretCacheEvent,
    SecretCacheError
);

impl SecretCache {
    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, _: SecretCacheEvent) {
        self.invalidations += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_subject_tokens_and_differ_by_path() {
        let a = aggregate_id("secret/data/a");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, aggregate_id("secret/data/b"));
    }

    #[test]
    fn an_invalidation_needs_a_path_and_a_reason() {
        let c = SecretCache::default();
        let ok = c.decide(Invalidate {
            path: "secret/data/a".into(),
            reason: "rotated".into(),
        });
        assert_eq!(ok.unwrap().len(), 1);
        let e = c
            .decide(Invalidate {
                path: "secret/a".into(),
                reason: "rotated".into(),
            })
            .unwrap_err();
        assert_eq!(e.field(), Some("path"));
        let e = c
            .decide(Invalidate {
                path: "secret/data/a".into(),
                reason: " ".into(),
            })
            .unwrap_err();
        assert_eq!(e.field(), Some("reason"));
    }
}
