//! Events of the `RejectedCallback` aggregate. `event_type` strings are a
//! public contract and never renamed.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum CallbackEvent {
    CallbackRejected(CallbackRejected),
}

/// An incoming callback was refused; the job it named was not changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackRejected {
    /// The job the body claimed to be for, if it could be read.
    pub job_id: Option<String>,
    pub source: String,
    /// A stable code: missing_signature, malformed_signature,
    /// stale_timestamp, bad_signature, replayed_nonce.
    pub error_code: String,
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
