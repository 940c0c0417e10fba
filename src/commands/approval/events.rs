//! Events of the `Approval` aggregate (seed 003). `event_type` strings are a
//! public contract and never renamed.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum ApprovalEvent {
    ApprovalRequested(ApprovalRequested),
    ApprovalGranted(ApprovalDecided),
    ApprovalRejected(ApprovalDecided),
    ApprovalExpired(ApprovalExpired),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    pub job_id: String,
    pub workflow_key: String,
    pub requested_by: String,
    #[serde(default)]
    pub reason: Option<String>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalDecided {
    /// The job the approval is for and its workflow (so readers need no lookup).
    pub job_id: String,
    #[serde(default)]
    pub workflow_key: String,
    pub decided_by: String,
    pub reason: String,
    pub decided_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalExpired {
    pub job_id: String,
    #[serde(default)]
    pub workflow_key: String,
    pub expired_at: DateTime<Utc>,
}

impl DomainEvent for ApprovalEvent {
    fn event_type(&self) -> String {
        match self {
            ApprovalEvent::ApprovalRequested(_) => "ApprovalRequested",
            ApprovalEvent::ApprovalGranted(_) => "ApprovalGranted",
            ApprovalEvent::ApprovalRejected(_) => "ApprovalRejected",
            ApprovalEvent::ApprovalExpired(_) => "ApprovalExpired",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
