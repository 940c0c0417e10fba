//! Events of the `Workflow` aggregate (one per workflow key): the
//! kill-switch and the daily auto-approval count. `event_type` strings are a
//! public contract and never renamed.

use chrono::NaiveDate;
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Every event of aggregate type `workflow`; the variant name is the stored
/// `event_type`, its struct the `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum WorkflowEvent {
    /// `WorkflowDisabled`: the kill-switch is on; new jobs are refused.
    WorkflowDisabled(WorkflowSwitched),
    /// `WorkflowEnabled`: the kill-switch is off again.
    WorkflowEnabled(WorkflowSwitched),
    /// `AutoApprovalCounted`: one more auto-approval today.
    AutoApprovalCounted(AutoApprovalCounted),
}

/// The data of `WorkflowDisabled` and `WorkflowEnabled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSwitched {
    /// The registry key (unescaped, unlike the aggregate id).
    pub workflow_key: String,
    /// Why the operator flipped the switch; never blank.
    pub reason: String,
}

/// One auto-approval counted against the workflow's daily limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoApprovalCounted {
    /// The registry key (unescaped).
    pub workflow_key: String,
    /// The job that was auto-approved.
    pub job_id: String,
    /// The UTC day counted on, as the handler gave it.
    pub day: NaiveDate,
    /// Auto-approvals on `day` including this one.
    pub used: u32,
    /// The registry's `daily_limit` in force; `used` never exceeds it.
    pub limit: u32,
}

impl DomainEvent for WorkflowEvent {
    fn event_type(&self) -> String {
        match self {
            WorkflowEvent::WorkflowDisabled(_) => "WorkflowDisabled",
            WorkflowEvent::WorkflowEnabled(_) => "WorkflowEnabled",
            WorkflowEvent::AutoApprovalCounted(_) => "AutoApprovalCounted",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
