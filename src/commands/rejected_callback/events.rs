//! Events of the `RejectedCallback` aggregate. `event_type` strings are a
//! public contract and never renamed.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Every event of aggregate type `callback`; the variant name is the
/// stored `event_type`, its struct the `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum CallbackEvent {
    /// `CallbackRejected`: an incoming callback was refused.
    CallbackRejected(CallbackRejected),
}

/// An incoming callback was refused; the job it named was not changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackRejected {
    /// The job the body claimed to be for, if it could be read.
    pub job_id: Option<String>,
    /// The endpoint that refused it: `n8n` (`POST /v1/callbacks/n8n`).
    pub source: String,
    /// A stable code: missing_signature, malformed_signature,
    /// stale_timestamp, bad_signature, replayed_nonce.
    pub error_code: String,
    /// Why it was refused, for people (never a secret).
    pub error_message: String,
}

impl DomainEvent for CallbackEvent {
    fn event_type(&self) -> String {
        match self {
            CallbackEvent::CallbackRejected(_) => "CallbackRejected",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
