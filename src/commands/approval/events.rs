//! Events of the `Approval` aggregate (seed 003). `event_type` strings are a
//! public contract and never renamed.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Every event of aggregate type `approval` (id = the job's id); the variant
/// name is the stored `event_type`, its struct the `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum ApprovalEvent {
    /// `ApprovalRequested`: the job waits for a decision until `expires_at`.
    ApprovalRequested(ApprovalRequested),
    /// `ApprovalGranted`: approved (by a person or the auto-approval rule).
    ApprovalGranted(ApprovalDecided),
    /// `ApprovalRejected`: rejected; the job handler then fails the job.
    ApprovalRejected(ApprovalDecided),
    /// `ApprovalExpired`: no decision before `expires_at`; the job handler
    /// then fails the job.
    ApprovalExpired(ApprovalExpired),
}

/// A job's approval was asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    /// The job waiting for it (also the approval's id).
    pub job_id: String,
    /// The job's workflow key.
    pub workflow_key: String,
    /// Who asked (the handler names the job's client).
    pub requested_by: String,
    /// Why, when the requester says.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it expires: after the request, at most 366 days later.
    pub expires_at: DateTime<Utc>,
}

/// The data of `ApprovalGranted` and `ApprovalRejected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalDecided {
    /// The job the approval is for and its workflow (so readers need no lookup).
    pub job_id: String,
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// Who decided: over HTTP the operator's client id, `auto-approval` for
    /// the rule.
    pub decided_by: String,
    /// Why, as the decider gave it.
    pub reason: String,
    /// When the decision was made (before `expires_at`).
    pub decided_at: DateTime<Utc>,
}

/// A job's approval reached `expires_at` undecided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalExpired {
    /// The job the approval was for.
    pub job_id: String,
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// When the expiry was recorded (at or after `expires_at`).
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
