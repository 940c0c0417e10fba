//! Events of the `Workflow` aggregate (one per workflow key): the
//! kill-switch and the daily auto-approval count. `event_type` strings are a
//! public contract and never renamed.

use chrono::NaiveDate;
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum WorkflowEvent {
    WorkflowDisabled(WorkflowSwitched),
    WorkflowEnabled(WorkflowSwitched),
    AutoApprovalCounted(AutoApprovalCounted),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSwitched {
    pub workflow_key: String,
    pub reason: String,
}

/// One auto-approval counted against the workflow's daily limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoApprovalCounted {
    pub workflow_key: String,
    pub job_id: String,
    pub day: NaiveDate,
    /// Auto-approvals on `day` including this one.
    pub used: u32,
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
