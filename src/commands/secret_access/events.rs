//! Events of the `SecretAccess` aggregate (type `secret_access`, one per
//! access request). `event_type` strings are a public contract and never
//! renamed. No event holds a secret's value, a digest of it, or a token:
//! only which secret was asked for, by whom (the envelope's actor), why,
//! what decided, and where the value came from.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Every event of aggregate type `secret_access`; the variant name is the
/// stored `event_type`, its struct the `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum SecretAccessEvent {
    /// `SecretAccessGranted`: the value was handed to the caller (after
    /// this event was stored).
    SecretAccessGranted(SecretAccessGranted),
    /// `SecretAccessDenied`: flowledger's policy or Vault said no.
    SecretAccessDenied(SecretAccessDenied),
    /// `SecretAccessFailed`: allowed, but no value could be served.
    SecretAccessFailed(SecretAccessFailed),
}

/// What was asked for, as every access event records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// The KV v2 path, `<mount>/data/<name>` (e.g. `secret/data/ocr`).
    pub path: String,
    /// The one field asked for; `None`: the whole secret.
    pub field: Option<String>,
    /// The KV version asked for; `None`: the current one.
    pub version: Option<u64>,
    /// Why the caller reads it, in its own words (not blank).
    pub purpose: String,
    /// The job the read is for, when the job handler reads on behalf of a
    /// job (then `step` is set too); top-level, so the job's audit trail
    /// lists it.
    pub job_id: Option<String>,
    /// The step (registry name) whose outgoing request carries the secret.
    pub step: Option<String>,
}

/// Where a granted value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueSource {
    /// Read from Vault for this request.
    Vault,
    /// flowledger's in-memory cache, within its TTL.
    Cache,
    /// Vault could not be read; the last value read, older than the TTL
    /// but within the configured maximum staleness.
    LastKnownGood,
}

/// Why Vault gave no value, as recorded (Vault's own words where it gave
/// any; never a token or a value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultFailure {
    /// `unreachable`, `failing` (5xx, 429), `refused` (403), `not_found`,
    /// `rejected` (another 4xx), `auth` (flowledger's own login),
    /// `bad_answer`, `bad_request`.
    pub kind: String,
    /// The HTTP status Vault answered, if it answered.
    pub status: Option<u16>,
    /// What failed, for people.
    pub message: String,
}

/// The value was served to the caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretAccessGranted {
    /// What was asked for.
    #[serde(flatten)]
    pub request: AccessRequest,
    /// The policy rule that allowed it (`[[secrets.rules]]` name).
    pub rule: String,
    /// The KV version served.
    pub kv_version: u64,
    /// Where the value came from.
    pub source: ValueSource,
    /// When the value served was read from Vault (RFC 3339 UTC).
    pub read_from_vault_at: String,
    /// For `last_known_good`: why Vault was not used.
    pub vault_error: Option<VaultFailure>,
}

/// Who said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// flowledger's policy (`[[secrets.rules]]`; none matched: denied).
    Policy,
    /// Vault refused flowledger's own token (its policy).
    Vault,
}

/// The read was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretAccessDenied {
    /// What was asked for.
    #[serde(flatten)]
    pub request: AccessRequest,
    /// Who refused.
    pub decided_by: DecidedBy,
    /// The rule that allowed flowledger's part (a Vault refusal), or
    /// `None` when no rule matched.
    pub rule: Option<String>,
    /// Why, for people: "no rule allows ..." or Vault's reason.
    pub reason: String,
    /// For a refusal by Vault: what Vault answered.
    #[serde(default)]
    pub vault_error: Option<VaultFailure>,
}

/// Allowed by the policy, but no value could be served: Vault failed and
/// no value within the maximum staleness was at hand, or there is no such
/// secret (version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretAccessFailed {
    /// What was asked for.
    #[serde(flatten)]
    pub request: AccessRequest,
    /// The rule that allowed it.
    pub rule: String,
    /// The reply code the caller got: `unavailable` or `not_found`.
    pub code: String,
    /// What Vault answered (or that it did not).
    pub vault_error: VaultFailure,
}

impl SecretAccessEvent {
    /// The request this event records.
    pub fn request(&self) -> &AccessRequest {
        match self {
            SecretAccessEvent::SecretAccessGranted(e) => &e.request,
            SecretAccessEvent::SecretAccessDenied(e) => &e.request,
            SecretAccessEvent::SecretAccessFailed(e) => &e.request,
        }
    }
}

impl DomainEvent for SecretAccessEvent {
    fn event_type(&self) -> String {
        match self {
            SecretAccessEvent::SecretAccessGranted(_) => "SecretAccessGranted",
            SecretAccessEvent::SecretAccessDenied(_) => "SecretAccessDenied",
            SecretAccessEvent::SecretAccessFailed(_) => "SecretAccessFailed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
