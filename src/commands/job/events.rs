//! Events of the `Job` aggregate. Each variant is a public contract: its
//! `event_type` string is never renamed and its fields only grow (older
//! versions are upcast on read, see `crate::events::upcasters`).

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every event of aggregate type `job`; the variant name is the stored
/// `event_type`, its struct the `data` (docs/EVENTS.md, section 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum JobEvent {
    /// `JobSubmitted`: the job exists, pending.
    JobSubmitted(JobSubmitted),
    /// `JobStarted`: the job runs its steps.
    JobStarted(JobStarted),
    /// `StepResultRecorded`: one attempt of a step ended.
    StepResultRecorded(StepResultRecorded),
    /// `JobCompleted`: final, the success policy was met.
    JobCompleted(JobCompleted),
    /// `JobFailed`: final, with an error code.
    JobFailed(JobFailed),
    /// `JobCancelled`: final, on request.
    JobCancelled(JobCancelled),
    /// `StepAttemptStarted`: an attempt of a step was sent.
    StepAttemptStarted(StepAttemptStarted),
    /// `StepRetryScheduled`: a failed attempt will be retried.
    StepRetryScheduled(StepRetryScheduled),
    /// `CallbackDelivered`: the result callback was accepted.
    CallbackDelivered(CallbackDelivered),
    /// `CallbackFailed`: the result callback could not be delivered.
    CallbackFailed(CallbackFailed),
    /// `JobHandlerChanged`: a handler instance drives the job from here on,
    /// under a newer partition lease.
    JobHandlerChanged(JobHandlerChanged),
    /// `JobRetried`: the ended job was retried as a new job.
    JobRetried(JobRetried),
}

/// A failed or cancelled job was retried: a new job (`retry_job_id`, whose
/// `JobSubmitted` has `retry_of` = this job) runs the same submission.
/// Recorded once per job: a repeated retry answers the same new job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRetried {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The new job's id (random, `bus::ids::retry_job_id`; every repeat of
    /// the retry reads it from here).
    pub retry_job_id: String,
}

/// A handler instance took the job over under a newer partition lease:
/// fenced commands under older leases are refused from here on. Recorded
/// with that instance's first command on the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobHandlerChanged {
    /// The job's workflow key.
    pub workflow_key: String,
    /// The lease's fence (it grows with every lease taken).
    pub fence: u64,
    /// The handler instance (`<host>/<pid>/<id>`).
    pub holder: String,
}

/// A job was accepted for a registry workflow; the values are the ones in
/// force (defaults filled in, bounds checked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmitted {
    /// The registry key of the workflow the job runs.
    pub workflow_key: String,
    /// The client the job belongs to: only it (or an operator) reads and
    /// cancels it over HTTP.
    pub client_id: String,
    /// The caller's input, sent to every step as `inputs`.
    pub input: Value,
    /// 1 (lowest) to 10: the dispatch order when jobs wait for a slot.
    pub priority: u8,
    /// The job's deadline in seconds, counted from its start; steps still
    /// running then fail the job.
    pub timeout_seconds: u32,
    /// Where the signed result is POSTed when the job ends; `None`: no
    /// callback. Without its credentials when `callback_url_sealed` is set.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The whole `callback_url` as submitted, sealed (it carried userinfo, a
    /// query or a fragment, which may hold the receiver's credentials): the
    /// handler opens it to deliver. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url_sealed: Option<crate::crypto::Sealed>,
    /// The caller's free-form JSON (`confidence` feeds auto-approval).
    #[serde(default)]
    pub metadata: Value,
    /// The failed or cancelled job this one retries (`POST
    /// /v1/jobs/{id}/retry`); absent for a job submitted as such.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

/// Every job event after submission repeats the job's `workflow_key`, so a
/// reader (the audit trail) needs no lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct JobStarted {
    /// The job's workflow key (empty when the stored data lacks it).
    #[serde(default)]
    pub workflow_key: String,
}

/// How one attempt of one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// `succeeded`: the step is never called again.
    Succeeded,
    /// `failed`: the call failed (an error answer, a bad body, or the peer
    /// could not be reached).
    Failed,
    /// `timed_out`: no result within the step's `timeout_ms`.
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

/// One started attempt of a step ended; recorded once per `(step, attempt)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResultRecorded {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The step's name in the registry.
    pub step: String,
    /// Which attempt, 1 to [`MAX_ATTEMPTS`](crate::commands::limits::MAX_ATTEMPTS).
    pub attempt: u32,
    /// How the attempt ended.
    pub status: StepStatus,
    /// The step's JSON answer (`null` when absent).
    #[serde(default)]
    pub output: Value,
    /// A short machine-readable reason, for a failure.
    #[serde(default)]
    pub error_code: Option<String>,
    /// What went wrong, for people.
    #[serde(default)]
    pub error_message: Option<String>,
    /// How long the attempt took, in ms; at most one week.
    pub duration_ms: u64,
    /// The n8n execution that answered (an n8n step whose answer, or
    /// result callback, named it; docs/CALLBACKS.md); absent otherwise and
    /// in events written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n8n_execution_id: Option<String>,
}

/// The job ended well: its workflow's success policy was met.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCompleted {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The job's result, as the completing command gave it.
    pub outputs: Value,
}

/// The job ended badly (e.g. too few steps succeeded, its deadline passed,
/// its approval was rejected or expired).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailed {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// A short machine-readable reason, never empty (e.g. `steps_failed`).
    pub error_code: String,
    /// What went wrong, for people.
    pub error_message: String,
}

/// The job was cancelled before it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCancelled {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// Why, as the canceller gave it (may be empty).
    pub reason: String,
}

/// An attempt of a step was sent. The call carries `idempotency_key`; a
/// handler that restarts before the result is recorded sends the same
/// attempt again with the same key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepAttemptStarted {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The step's name in the registry.
    pub step: String,
    /// The attempt's number: the step's previous one plus 1, starting at 1.
    pub attempt: u32,
    /// Sent as the `Idempotency-Key` header; `<job>:<step>:<attempt>` from
    /// the handler.
    pub idempotency_key: String,
}

/// A failed attempt will be followed by attempt `attempt` after `delay_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRetryScheduled {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The step's name in the registry.
    pub step: String,
    /// The attempt that will follow (the failed one plus 1).
    pub attempt: u32,
    /// The wait before it, in ms; at most one day.
    pub delay_ms: u64,
}

/// The job's result reached its `callback_url`. `target` is the URL without
/// its query string (which may carry a receiver's token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackDelivered {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The callback URL without its query string.
    pub target: String,
    /// Deliveries made, the successful one included; at most 100.
    pub attempts: u32,
    /// The receiver's HTTP status, 100 to 599.
    pub status_code: u16,
}

/// Every delivery attempt of the callback failed; nothing more is tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackFailed {
    /// The job's workflow key.
    #[serde(default)]
    pub workflow_key: String,
    /// The callback URL without its query string.
    pub target: String,
    /// Deliveries tried (0: none was sent); at most 100.
    pub attempts: u32,
    /// Why the last one failed (or why none was sent, e.g. no signing key).
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
            JobEvent::JobHandlerChanged(_) => "JobHandlerChanged",
            JobEvent::JobRetried(_) => "JobRetried",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
