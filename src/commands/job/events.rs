//! Events of the `Job` aggregate. Each variant is a public contract: its
//! `event_type` string is never renamed and its fields only grow (older
//! versions are upcast on read, see `crate::events::upcasters`).

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum JobEvent {
    JobSubmitted(JobSubmitted),
    JobStarted(JobStarted),
    StepResultRecorded(StepResultRecorded),
    JobCompleted(JobCompleted),
    JobFailed(JobFailed),
    JobCancelled(JobCancelled),
    StepAttemptStarted(StepAttemptStarted),
    StepRetryScheduled(StepRetryScheduled),
    CallbackDelivered(CallbackDelivered),
    CallbackFailed(CallbackFailed),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmitted {
    pub workflow_key: String,
    pub client_id: String,
    pub input: Value,
    pub priority: u8,
    pub timeout_seconds: u32,
    #[serde(default)]
    pub callback_url: Option<String>,
    #[serde(default)]
    pub metadata: Value,
}

/// Every job event after submission repeats the job's `workflow_key`, so a
/// reader (the audit trail) needs no lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobStarted {
    #[serde(default)]
    pub workflow_key: String,
}

/// How one attempt of one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    TimedOut,
}

impl StepStatus {
    /// The stored form (`succeeded`, `failed`, `timed_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed_out",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResultRecorded {
    #[serde(default)]
    pub workflow_key: String,
    pub step: String,
    pub attempt: u32,
    pub status: StepStatus,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCompleted {
    #[serde(default)]
    pub workflow_key: String,
    pub outputs: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailed {
    #[serde(default)]
    pub workflow_key: String,
    pub error_code: String,
    pub error_message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCancelled {
    #[serde(default)]
    pub workflow_key: String,
    pub reason: String,
}

/// An attempt of a step was sent. The call carries `idempotency_key`; a
/// handler that restarts before the result is recorded sends the same
/// attempt again with the same key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepAttemptStarted {
    #[serde(default)]
    pub workflow_key: String,
    pub step: String,
    pub attempt: u32,
    pub idempotency_key: String,
}

/// A failed attempt will be followed by attempt `attempt` after `delay_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRetryScheduled {
    #[serde(default)]
    pub workflow_key: String,
    pub step: String,
    pub attempt: u32,
    pub delay_ms: u64,
}

/// The job's result reached its `callback_url`. `target` is the URL without
/// its query string (which may carry a receiver's token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackDelivered {
    #[serde(default)]
    pub workflow_key: String,
    pub target: String,
    pub attempts: u32,
    pub status_code: u16,
}

/// Every delivery attempt of the callback failed; nothing more is tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackFailed {
    #[serde(default)]
    pub workflow_key: String,
    pub target: String,
    pub attempts: u32,
    pub error_message: String,
}

impl DomainEvent for JobEvent {
    fn event_type(&self) -> String {
        match self {
            JobEvent::JobSubmitted(_) => "JobSubmitted",
            JobEvent::JobStarted(_) => "JobStarted",
            JobEvent::StepResultRecorded(_) => "StepResultRecorded",
            JobEvent::JobCompleted(_) => "JobCompleted",
            JobEvent::JobFailed(_) => "JobFailed",
            JobEvent::JobCancelled(_) => "JobCancelled",
            JobEvent::StepAttemptStarted(_) => "StepAttemptStarted",
            JobEvent::StepRetryScheduled(_) => "StepRetryScheduled",
            JobEvent::CallbackDelivered(_) => "CallbackDelivered",
            JobEvent::CallbackFailed(_) => "CallbackFailed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
