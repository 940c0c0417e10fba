//! Events of the `Job` aggregate. Each variant is a public contract: its
//! `event_type` string is never renamed and its fields only grow (older
//! versions are upcast on read, see `events::upcasters`).

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

impl DomainEvent for JobEvent {
    fn event_type(&self) -> String {
        match self {
            JobEvent::JobSubmitted(_) => "JobSubmitted",
            JobEvent::JobStarted(_) => "JobStarted",
            JobEvent::StepResultRecorded(_) => "StepResultRecorded",
            JobEvent::JobCompleted(_) => "JobCompleted",
            JobEvent::JobFailed(_) => "JobFailed",
            JobEvent::JobCancelled(_) => "JobCancelled",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
