//! Events of the `SecretCache` aggregate (type `secret_cache`). `event_type`
//! strings are a public contract and never renamed.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Every event of aggregate type `secret_cache`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum SecretCacheEvent {
    /// `SecretCacheInvalidated`: an operator dropped a path's cached
    /// values; every instance reads it from Vault next time.
    SecretCacheInvalidated(SecretCacheInvalidated),
}

/// A path's cached values were dropped (on every instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretCacheInvalidated {
    /// The KV v2 path.
    pub path: String,
    /// Why (for example "rotated the OCR key").
    pub reason: String,
}

impl DomainEvent for SecretCacheEvent {
    fn event_type(&self) -> String {
        match self {
            SecretCacheEvent::SecretCacheInvalidated(_) => "SecretCacheInvalidated",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
