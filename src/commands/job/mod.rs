//! The `Job` aggregate: submit, start, record a step result, complete, fail,
//! cancel, retry (seed 002). Final states are `completed`, `failed`,
//! `cancelled`; a failed or cancelled job may be retried once as a new job
//! (`Retry` on it, then `SubmitRetry` on the new one, both issued by the
//! command bus).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod events;

use crate::commands::limits::{
    MAX_ATTEMPTS, MAX_CALLBACK_ATTEMPTS, MAX_DURATION_MS, MAX_JOB_TIMEOUT_SECONDS,
    MAX_RETRY_DELAY_MS, PRIORITY_RANGE,
};
use crate::commands::registry::SharedRegistry;
use crate::commands::{redact, write_decided, DomainError, ErrorCode};
use crate::crypto::SealKeys;
use events::{
    CallbackDelivered, CallbackFailed, JobCancelled, JobCompleted, JobEvent, JobFailed,
    JobHandlerChanged, JobRetried, JobStarted, JobSubmitted, StepAttemptStarted,
    StepResultRecorded, StepRetryScheduled, StepStatus,
};

/// The `priority` of a submission that gives none (range 1 to 10).
pub const DEFAULT_PRIORITY: u8 = 5;
/// The `timeout_seconds` of a submission that gives none: five minutes.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 300;

/// What a `Job` needs to decide: the registry and the configured limits.
#[derive(Debug, Clone)]
pub struct JobServices {
    /// The workflow registry; a submission's `workflow_key` must be in it.
    pub registry: SharedRegistry,
    /// The configured largest `timeout_seconds` (`--max-timeout-seconds`);
    /// [`MAX_JOB_TIMEOUT_SECONDS`] caps it.
    pub max_timeout_seconds: u32,
    /// Seals the credentials of a `callback_url` (userinfo, query) before
    /// they reach the log; `None`: such URLs are refused.
    pub callback_sealer: Option<Arc<SealKeys>>,
}

/// Where a job is in its life, as its events leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// No event yet: the job does not exist.
    #[default]
    None,
    /// Submitted, not started (it may wait for its approval or a slot).
    Pending,
    /// Started: attempts of its steps are sent and recorded.
    Running,
    /// Final: `JobCompleted`.
    Completed,
    /// Final: `JobFailed`.
    Failed,
    /// Final: `JobCancelled`.
    Cancelled,
}

impl JobStatus {
    /// Completed, failed or cancelled: only the callback outcome may still
    /// be recorded.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The lowercase name (`none`, `pending`, `running`, ...), as errors quote it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::None => "none",
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// The `Job` aggregate (type `job`, id = the job id): the state its
/// commands are decided on, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Where the job is; [`JobStatus::None`] until it is submitted.
    pub status: JobStatus,
    /// The registry workflow it runs.
    pub workflow_key: String,
    /// The client it belongs to.
    pub client_id: String,
    /// 1 (lowest) to 10.
    pub priority: u8,
    /// Its deadline in seconds from its start.
    pub timeout_seconds: u32,
    /// `(step, attempt)` pairs already recorded.
    pub recorded: BTreeSet<(String, u32)>,
    /// Attempts started per step.
    pub started: BTreeMap<String, u32>,
    /// Steps with a successful attempt: never called again.
    pub succeeded: BTreeSet<String>,
    /// `(step, attempt)` pairs a `StepRetryScheduled` is for.
    #[serde(default)]
    pub retries: BTreeSet<(String, u32)>,
    /// It was submitted with a `callback_url`, so an outcome can be recorded.
    pub has_callback_url: bool,
    /// `CallbackDelivered` or `CallbackFailed` is recorded.
    pub callback_recorded: bool,
    /// The fence of the newest lease a handler drove the job under (0:
    /// none yet); fenced commands under an older one are refused.
    pub fence: u64,
    /// The job this one retries (`JobSubmitted.retry_of`).
    #[serde(default)]
    pub retry_of: Option<String>,
    /// The job that retries this one (`JobRetried.retry_job_id`).
    #[serde(default)]
    pub retried_by: Option<String>,
}

/// The statuses a job may be retried from: it ended without success.
/// (A job past its deadline is `failed`, with `error_code`
/// `job_timeout`: it may be retried too.)
pub const RETRYABLE: &[JobStatus] = &[JobStatus::Failed, JobStatus::Cancelled];

/// `job.submit`: create the job (the job id is the aggregate id).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// A key of the workflow registry.
    pub workflow_key: String,
    /// The client the job belongs to; not blank.
    pub client_id: String,
    /// Sent to every step; `null` when absent.
    #[serde(default)]
    pub input: Value,
    /// 1 to 10; [`DEFAULT_PRIORITY`] when absent.
    pub priority: Option<u8>,
    /// 1 to the configured maximum (at most [`MAX_JOB_TIMEOUT_SECONDS`]);
    /// [`DEFAULT_TIMEOUT_SECONDS`] when absent.
    pub timeout_seconds: Option<u32>,
    /// An absolute `http`/`https` URL with a host, at most 2,048 characters.
    pub callback_url: Option<String>,
    /// Free-form JSON kept with the job (`confidence` feeds auto-approval).
    #[serde(default)]
    pub metadata: Value,
}

/// Start a pending job, sending the first attempt of the given steps.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StartJob {
    /// First attempts sent with the start, committed with it.
    #[serde(default)]
    pub attempts: Vec<NewAttempt>,
}

/// Attempt 1 of one step, sent with [`StartJob`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAttempt {
    /// The step's name; not empty.
    pub step: String,
    /// Sent as `Idempotency-Key`; not empty.
    pub idempotency_key: String,
}

/// Send attempt `attempt` (the next one) of a step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartAttempt {
    /// The step's name; not empty, without a successful attempt.
    pub step: String,
    /// The step's previous attempt plus 1, at most [`MAX_ATTEMPTS`].
    pub attempt: u32,
    /// Sent as `Idempotency-Key`; not empty.
    pub idempotency_key: String,
}

/// `job.record_callback`: how delivering the result callback of an ended
/// job went; give exactly one of `status_code` and `error_message`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordCallback {
    /// The callback URL without its query string.
    pub target: String,
    /// Deliveries made, at most [`MAX_CALLBACK_ATTEMPTS`].
    pub attempts: u32,
    /// Set when the receiver accepted the callback: its HTTP status, 100-599.
    pub status_code: Option<u16>,
    /// Set when every attempt failed.
    pub error_message: Option<String>,
}

/// `job.record_step_result`: how one started attempt of a step ended.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordStepResult {
    /// The step's name; not empty.
    pub step: String,
    /// A started attempt, 1 to [`MAX_ATTEMPTS`], not yet recorded.
    pub attempt: u32,
    /// How it ended.
    pub status: StepStatus,
    /// The step's JSON answer; `null` when absent.
    #[serde(default)]
    pub output: Value,
    /// A short machine-readable reason, for a failure.
    pub error_code: Option<String>,
    /// What went wrong, for people.
    pub error_message: Option<String>,
    /// How long the attempt took, in ms; at most [`MAX_DURATION_MS`].
    pub duration_ms: u64,
    /// Retry after this many milliseconds, at most [`MAX_RETRY_DELAY_MS`]:
    /// on a failed or timed-out attempt it adds `StepRetryScheduled` for the
    /// next one (so not on attempt [`MAX_ATTEMPTS`]).
    #[serde(default)]
    pub retry_in_ms: Option<u64>,
    /// The n8n execution that answered, when n8n named it: 1-128 of
    /// `A-Z a-z 0-9 _ -`.
    #[serde(default)]
    pub n8n_execution_id: Option<String>,
}

/// Retry a step whose latest attempt's result, recorded without a retry
/// (an n8n callback's `failed` or `timed_out`), ended it unsuccessfully:
/// the handler's decision by the step's retry policy, recorded as
/// `StepRetryScheduled` for the next attempt. Not a NATS command: the
/// handler issues it in process, fenced.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRetry {
    /// The step's name; not empty, without a successful attempt.
    pub step: String,
    /// The step's latest attempt, with a recorded result and no retry
    /// scheduled after it; below [`MAX_ATTEMPTS`].
    pub attempt: u32,
    /// The next attempt is due this many milliseconds after the event, at
    /// most [`MAX_RETRY_DELAY_MS`].
    pub delay_ms: u64,
}

/// `job.complete`: end a running job well.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteJob {
    /// The job's result; `null` when absent.
    #[serde(default)]
    pub outputs: Value,
    /// Step results not yet recorded; they are committed together with the
    /// completion, all or nothing.
    #[serde(default)]
    pub step_results: Vec<RecordStepResult>,
}

/// `job.fail`: end a pending or running job badly.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailJob {
    /// A short machine-readable reason; not empty.
    pub error_code: String,
    /// What went wrong, for people.
    pub error_message: String,
    /// Step results not yet recorded, committed with the failure.
    #[serde(default)]
    pub step_results: Vec<RecordStepResult>,
}

/// `job.cancel`: end a pending or running job on request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    /// Why; empty when absent.
    #[serde(default)]
    pub reason: String,
}

/// `job.retry`: record that this failed or cancelled job is retried as the
/// new job `retry_job_id` (the command bus picks it at random and submits it with
/// [`SubmitRetry`] right after).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryJob {
    /// The new job's id; not empty.
    pub retry_job_id: String,
}

/// Submit the retry of job `retry_of`: the new job runs `submitted` (the
/// retried job's own submission, its sealed callback included), with
/// `retry_of` set. Issued by the command bus only, never a NATS command.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitRetry {
    /// The retried job's id; not empty.
    pub retry_of: String,
    /// The retried job's `JobSubmitted`, as stored.
    pub submitted: JobSubmitted,
}

/// A command on a job; each is `flow.cmd.job.<name>` over NATS.
#[derive(Debug, Clone, PartialEq)]
pub enum JobCommand {
    /// `submit`: create the job.
    Submit(SubmitJob),
    /// `start`: a pending job starts running.
    Start(StartJob),
    /// `start_attempt`: send the next attempt of a step.
    StartAttempt(StartAttempt),
    /// `record_step_result`: record how an attempt ended.
    RecordStepResult(RecordStepResult),
    /// `schedule_retry`: retry a step after a failed attempt recorded
    /// without a retry (the handler's, in process only).
    ScheduleRetry(ScheduleRetry),
    /// `complete`: the job succeeded.
    Complete(CompleteJob),
    /// `fail`: the job failed.
    Fail(FailJob),
    /// `cancel`: stop the job.
    Cancel(CancelJob),
    /// `record_callback`: record the result callback's outcome.
    RecordCallback(RecordCallback),
    /// `retry`: the ended job is retried as a new job (bus only: the
    /// NATS `job.retry` and HTTP retry go through `CommandBus::retry_job`).
    Retry(RetryJob),
    /// `submit_retry`: create the new job of a retry (bus only).
    SubmitRetry(SubmitRetry),
    /// A handler command issued under a partition lease: refused when a
    /// newer lease has driven the job (a stale owner), and it records
    /// `JobHandlerChanged` when its lease is newer than the last one. Never
    /// nested; not a NATS command (the handler issues it in process).
    Fenced {
        /// The lease the command was decided under.
        lease: Lease,
        /// The handler command itself.
        command: Box<JobCommand>,
    },
}

/// A handler's partition lease as a command carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's fence: it grows with every lease taken on any partition
    /// (`docs/adr/0010-handler-leases.md`).
    pub fence: u64,
    /// The handler instance holding it.
    pub holder: String,
}

impl JobCommand {
    /// The command's name, the last token of `flow.cmd.job.<name>`.
    pub fn name(&self) -> &'static str {
        match self {
            JobCommand::Submit(_) => "submit",
            JobCommand::Start(_) => "start",
            JobCommand::StartAttempt(_) => "start_attempt",
            JobCommand::RecordStepResult(_) => "record_step_result",
            JobCommand::ScheduleRetry(_) => "schedule_retry",
            JobCommand::Complete(_) => "complete",
            JobCommand::Fail(_) => "fail",
            JobCommand::Cancel(_) => "cancel",
            JobCommand::RecordCallback(_) => "record_callback",
            JobCommand::Retry(_) => "retry",
            JobCommand::SubmitRetry(_) => "submit_retry",
            JobCommand::Fenced { command, .. } => command.name(),
        }
    }
}

/// A callback URL is an absolute `http` or `https` URL with a host, of at
/// most 2,048 characters. Pure: parsing only, no lookup.
fn check_callback_url(url: &str) -> Result<(), JobError> {
    let bad = |reason: &str| JobError::InvalidCallbackUrl {
        // userinfo and query may hold a receiver's credentials: never echo them
        url: crate::commands::redact::display(url)
            .chars()
            .take(200)
            .collect(),
        reason: reason.into(),
    };
    if url.len() > 2048 {
        return Err(bad("longer than 2048 characters"));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(&format!("not an absolute URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(())
}

/// Why a job command was refused; nothing was written. [`DomainError`]
/// gives each its reply code and, for bad input, the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The job has no event yet (`not_found`); submit it first or check the id.
    #[error("job does not exist; submit it first")]
    NotFound,
    /// A submission for a job id that exists, in the given status
    /// (`conflict`); use a new `job_id`.
    #[error("job already exists (status {0}); use a new job_id")]
    AlreadyExists(&'static str),
    /// `priority` (the value sent) is not 1 to 10.
    #[error("priority must be between 1 and 10, got {0}")]
    InvalidPriority(u8),
    /// `timeout_seconds` is 0 or above the limit in force.
    #[error("timeout_seconds must be between 1 and {max}, got {got}")]
    InvalidTimeout {
        /// The value sent (or the default).
        got: u32,
        /// The configured maximum, capped at [`MAX_JOB_TIMEOUT_SECONDS`].
        max: u32,
    },
    /// `workflow_key` is not in the registry; pick one of `known`.
    #[error("unknown workflow_key {key:?}: known keys are {known} (see the workflow registry)")]
    UnknownWorkflow {
        /// The key sent.
        key: String,
        /// The registry's keys, comma-separated.
        known: String,
    },
    /// `client_id` is empty or only whitespace.
    #[error("client_id must not be empty")]
    EmptyClientId,
    /// A text field that must say something is empty.
    #[error("{field} must not be empty")]
    EmptyField {
        /// `step`, `idempotency_key` or `error_code`.
        field: &'static str,
    },
    /// The job's status does not allow the command (`rejected`), e.g. any
    /// change after a final state; nothing to retry.
    #[error("cannot {command} a job that is {status}")]
    InvalidTransition {
        /// The command in words, e.g. `record a step result for`.
        command: &'static str,
        /// The job's status ([`JobStatus::as_str`]).
        status: &'static str,
    },
    /// A retry of a job that did not end unsuccessfully (`rejected`): only
    /// a failed or cancelled job can be retried.
    #[error("cannot retry a job that is {status}: only a failed or cancelled job can be retried")]
    NotRetryable {
        /// The job's status ([`JobStatus::as_str`]).
        status: &'static str,
    },
    /// The job was already retried (`rejected`); the command bus answers
    /// that retry. Retry the newest job of the chain to go on.
    #[error("the job was already retried as job {retry_job_id}; retry that job to go on")]
    AlreadyRetried {
        /// The existing retry's job id.
        retry_job_id: String,
    },
    /// The new job's id of a retry names a job that is not that retry (a
    /// submission took the derived id first; `conflict`). Nothing was
    /// written to the new job.
    #[error(
        "the retry's job id {retry_job_id} is taken by another job; the retry cannot be \
         submitted (submit the job anew with POST /v1/jobs)"
    )]
    RetryIdTaken {
        /// The derived id of the new job.
        retry_job_id: String,
    },
    /// A handler command under a lease older than the one the job was last
    /// driven under: another instance owns the job now (`rejected`). The
    /// sender stops driving it.
    #[error(
        "the job is driven under lease fence {current} now; a command under the older \
         fence {sent} is refused (this handler instance lost the job's partition)"
    )]
    StaleLease {
        /// The fence the command carried.
        sent: u64,
        /// The job's newest fence.
        current: u64,
    },
    /// A fenced command inside a fenced command.
    #[error("a fenced command cannot carry another fenced command")]
    NestedFence,
    /// A retry asked for an attempt that is not the step's latest, has no
    /// result, or already has its retry scheduled.
    #[error(
        "step {step:?} attempt {attempt} is not a latest, recorded, failed attempt without a retry"
    )]
    NothingToRetry {
        /// The step's name.
        step: String,
        /// The attempt named.
        attempt: u32,
    },
    /// This attempt of the step already has a result (e.g. the handler and
    /// an n8n callback both recorded it); the first one stands.
    #[error("step {step:?} attempt {attempt} is already recorded")]
    DuplicateStepResult {
        /// The step's name.
        step: String,
        /// The attempt sent.
        attempt: u32,
    },
    /// The step has a successful attempt; it gets no further attempt or result.
    #[error("step {step:?} already succeeded; it is not called again")]
    StepAlreadySucceeded {
        /// The step's name.
        step: String,
    },
    /// `start_attempt` skips or repeats a number; send `expected`.
    #[error("step {step:?}: the next attempt is {expected}, not {got}")]
    AttemptOutOfOrder {
        /// The step's name.
        step: String,
        /// The step's next attempt number.
        expected: u32,
        /// The attempt sent.
        got: u32,
    },
    /// A result for an attempt that was never started (`rejected`).
    #[error("step {step:?}: attempt {attempt} was never started (attempts started: {started})")]
    AttemptNotStarted {
        /// The step's name.
        step: String,
        /// The attempt sent.
        attempt: u32,
        /// How many attempts of the step were started.
        started: u32,
    },
    /// `attempt` (the value sent) is 0 or above [`MAX_ATTEMPTS`].
    #[error("attempt must be 1 to {MAX_ATTEMPTS}, got {0}")]
    AttemptOutOfRange(u32),
    /// `retry_in_ms` (the value sent) is above [`MAX_RETRY_DELAY_MS`].
    #[error("retry_in_ms must be at most {MAX_RETRY_DELAY_MS} (one day), got {0}")]
    InvalidRetryDelay(u64),
    /// `duration_ms` (the value sent) is above [`MAX_DURATION_MS`].
    #[error("duration_ms must be at most {MAX_DURATION_MS} (one week), got {0}")]
    InvalidDuration(u64),
    /// `n8n_execution_id` (its start) is not 1-128 of `A-Z a-z 0-9 _ -`.
    #[error("n8n_execution_id must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-', got {0:?}")]
    InvalidN8nExecutionId(String),
    /// `retry_in_ms` on a failed attempt [`MAX_ATTEMPTS`] (the value): no
    /// attempt can follow; record it without a retry.
    #[error(
        "retry_in_ms: attempt {0} is the last one allowed ({MAX_ATTEMPTS}); no retry can follow it"
    )]
    RetryAfterLastAttempt(u32),
    /// `attempts` (the value sent) is above [`MAX_CALLBACK_ATTEMPTS`].
    #[error("attempts must be at most {MAX_CALLBACK_ATTEMPTS}, got {0}")]
    InvalidCallbackAttempts(u32),
    /// `status_code` (the value sent) is not 100 to 599.
    #[error("status_code must be an HTTP status (100-599), got {0}")]
    InvalidStatusCode(u16),
    /// The workflow's kill-switch is on (`rejected`; raised by the command
    /// bus on a submission, not by `decide`); an operator must enable it.
    #[error("workflow {key:?} is disabled (kill-switch); new jobs are refused until an operator enables it")]
    WorkflowDisabled {
        /// The workflow key.
        key: String,
    },
    /// `callback_url` is not an absolute `http`/`https` URL with a host of
    /// at most 2,048 characters.
    #[error("callback_url {url:?}: {reason}")]
    InvalidCallbackUrl {
        /// The URL sent, without its query, cut to 200 characters.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `callback_url` carries credentials (userinfo, query or fragment) and
    /// no sealing key is configured: they would land in the immutable log in
    /// plaintext.
    #[error(
        "callback_url {url:?} carries credentials (user:password@, a query or a fragment), \
         which would be stored in the immutable log in plaintext; the service has no \
         sealing key (callbacks.seal_keys_env): send a URL without them, or ask an \
         operator to configure one"
    )]
    UnsealedCallbackCredentials {
        /// The URL with its credentials shown as `***`.
        url: String,
    },
    /// `record_callback` on a job submitted without a `callback_url`.
    #[error("the job has no callback_url")]
    NoCallback,
    /// The job already has `CallbackDelivered` or `CallbackFailed`.
    #[error("the callback outcome is already recorded")]
    CallbackAlreadyRecorded,
    /// `record_callback` gave both or neither of `status_code` and `error_message`.
    #[error("a callback outcome needs exactly one of status_code and error_message")]
    CallbackOutcome,
}

impl DomainError for JobError {
    fn code(&self) -> ErrorCode {
        match self {
            JobError::NotFound => ErrorCode::NotFound,
            JobError::AlreadyExists(_) | JobError::RetryIdTaken { .. } => ErrorCode::Conflict,
            JobError::InvalidPriority(_)
            | JobError::InvalidTimeout { .. }
            | JobError::UnknownWorkflow { .. }
            | JobError::EmptyClientId
            | JobError::EmptyField { .. } => ErrorCode::Validation,
            JobError::CallbackOutcome
            | JobError::InvalidCallbackUrl { .. }
            | JobError::UnsealedCallbackCredentials { .. }
            | JobError::AttemptOutOfRange(_)
            | JobError::InvalidRetryDelay(_)
            | JobError::RetryAfterLastAttempt(_)
            | JobError::InvalidDuration(_)
            | JobError::InvalidN8nExecutionId(_)
            | JobError::InvalidCallbackAttempts(_)
            | JobError::InvalidStatusCode(_) => ErrorCode::Validation,
            JobError::WorkflowDisabled { .. }
            | JobError::AttemptNotStarted { .. }
            | JobError::InvalidTransition { .. }
            | JobError::DuplicateStepResult { .. }
            | JobError::NothingToRetry { .. }
            | JobError::StepAlreadySucceeded { .. }
            | JobError::AttemptOutOfOrder { .. }
            | JobError::NoCallback
            | JobError::StaleLease { .. }
            | JobError::NestedFence
            | JobError::NotRetryable { .. }
            | JobError::AlreadyRetried { .. }
            | JobError::CallbackAlreadyRecorded => ErrorCode::Rejected,
        }
    }

    fn field(&self) -> Option<&'static str> {
        Some(match self {
            JobError::InvalidPriority(_) => "priority",
            JobError::InvalidTimeout { .. } => "timeout_seconds",
            JobError::UnknownWorkflow { .. } | JobError::WorkflowDisabled { .. } => "workflow_key",
            JobError::EmptyClientId => "client_id",
            JobError::EmptyField { field } => field,
            JobError::InvalidCallbackUrl { .. } | JobError::UnsealedCallbackCredentials { .. } => {
                "callback_url"
            }
            JobError::AttemptOutOfRange(_)
            | JobError::AttemptNotStarted { .. }
            | JobError::NothingToRetry { .. }
            | JobError::AttemptOutOfOrder { .. } => "attempt",
            JobError::InvalidRetryDelay(_) | JobError::RetryAfterLastAttempt(_) => "retry_in_ms",
            JobError::InvalidDuration(_) => "duration_ms",
            JobError::InvalidN8nExecutionId(_) => "n8n_execution_id",
            JobError::InvalidCallbackAttempts(_) => "attempts",
            JobError::InvalidStatusCode(_) => "status_code",
            _ => return None,
        })
    }
}

impl Job {
    fn require(&self, command: &'static str, allowed: &[JobStatus]) -> Result<(), JobError> {
        if self.status == JobStatus::None {
            return Err(JobError::NotFound);
        }
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(JobError::InvalidTransition {
                command,
                status: self.status.as_str(),
            })
        }
    }

    fn attempt_event(&self, step: String, attempt: u32, key: String) -> Result<JobEvent, JobError> {
        if step.is_empty() {
            return Err(JobError::EmptyField { field: "step" });
        }
        if key.is_empty() {
            return Err(JobError::EmptyField {
                field: "idempotency_key",
            });
        }
        if self.succeeded.contains(&step) {
            return Err(JobError::StepAlreadySucceeded { step });
        }
        if attempt == 0 || attempt > MAX_ATTEMPTS {
            return Err(JobError::AttemptOutOfRange(attempt));
        }
        let expected = self
            .started
            .get(&step)
            .copied()
            .unwrap_or(0)
            .saturating_add(1);
        if attempt != expected {
            return Err(JobError::AttemptOutOfOrder {
                step,
                expected,
                got: attempt,
            });
        }
        Ok(JobEvent::StepAttemptStarted(StepAttemptStarted {
            workflow_key: self.workflow_key.clone(),
            step,
            attempt,
            idempotency_key: key,
        }))
    }

    fn retry_event(&self, r: ScheduleRetry) -> Result<Vec<JobEvent>, JobError> {
        if r.step.is_empty() {
            return Err(JobError::EmptyField { field: "step" });
        }
        if r.attempt == 0 || r.attempt > MAX_ATTEMPTS {
            return Err(JobError::AttemptOutOfRange(r.attempt));
        }
        if r.attempt == MAX_ATTEMPTS {
            return Err(JobError::RetryAfterLastAttempt(r.attempt));
        }
        if r.delay_ms > MAX_RETRY_DELAY_MS {
            return Err(JobError::InvalidRetryDelay(r.delay_ms));
        }
        if self.succeeded.contains(&r.step) {
            return Err(JobError::StepAlreadySucceeded { step: r.step });
        }
        let next = r.attempt + 1;
        let latest = self.started.get(&r.step).copied().unwrap_or(0) == r.attempt;
        let recorded = self.recorded.contains(&(r.step.clone(), r.attempt));
        if !latest || !recorded || self.retries.contains(&(r.step.clone(), next)) {
            return Err(JobError::NothingToRetry {
                step: r.step,
                attempt: r.attempt,
            });
        }
        Ok(vec![JobEvent::StepRetryScheduled(StepRetryScheduled {
            workflow_key: self.workflow_key.clone(),
            step: r.step,
            attempt: next,
            delay_ms: r.delay_ms,
        })])
    }

    /// The events of a batch of step results, decided one after another.
    fn step_events(
        &self,
        results: Vec<RecordStepResult>,
    ) -> Result<(Job, Vec<JobEvent>), JobError> {
        let mut scratch = self.clone();
        let mut events = Vec::with_capacity(results.len());
        for r in results {
            for e in scratch.step_event(r)? {
                scratch.apply(e.clone());
                events.push(e);
            }
        }
        Ok((scratch, events))
    }

    fn step_event(&self, r: RecordStepResult) -> Result<Vec<JobEvent>, JobError> {
        if r.step.is_empty() {
            return Err(JobError::EmptyField { field: "step" });
        }
        if r.attempt == 0 || r.attempt > MAX_ATTEMPTS {
            return Err(JobError::AttemptOutOfRange(r.attempt));
        }
        if r.duration_ms > MAX_DURATION_MS {
            return Err(JobError::InvalidDuration(r.duration_ms));
        }
        if let Some(id) = r
            .n8n_execution_id
            .as_deref()
            .filter(|id| !crate::events::log::valid_aggregate_id(id))
        {
            return Err(JobError::InvalidN8nExecutionId(
                id.chars().take(40).collect(),
            ));
        }
        if let Some(delay) = r.retry_in_ms.filter(|d| *d > MAX_RETRY_DELAY_MS) {
            return Err(JobError::InvalidRetryDelay(delay));
        }
        // a retry schedules attempt + 1, which must itself be startable
        if r.retry_in_ms.is_some() && r.status != StepStatus::Succeeded && r.attempt >= MAX_ATTEMPTS
        {
            return Err(JobError::RetryAfterLastAttempt(r.attempt));
        }
        let started = self.started.get(&r.step).copied().unwrap_or(0);
        if r.attempt > started {
            return Err(JobError::AttemptNotStarted {
                step: r.step,
                attempt: r.attempt,
                started,
            });
        }
        if self
            .recorded
            .iter()
            .any(|(s, a)| *s == r.step && *a == r.attempt)
        {
            return Err(JobError::DuplicateStepResult {
                step: r.step,
                attempt: r.attempt,
            });
        }
        if self.succeeded.contains(&r.step) {
            return Err(JobError::StepAlreadySucceeded { step: r.step });
        }
        let retry = match (r.retry_in_ms, r.status) {
            (Some(delay_ms), StepStatus::Failed | StepStatus::TimedOut) => {
                Some(JobEvent::StepRetryScheduled(StepRetryScheduled {
                    workflow_key: self.workflow_key.clone(),
                    step: r.step.clone(),
                    attempt: r.attempt.saturating_add(1),
                    delay_ms,
                }))
            }
            _ => None,
        };
        let mut events = vec![JobEvent::StepResultRecorded(StepResultRecorded {
            workflow_key: self.workflow_key.clone(),
            step: r.step,
            attempt: r.attempt,
            status: r.status,
            output: r.output,
            error_code: r.error_code,
            error_message: r.error_message,
            duration_ms: r.duration_ms,
            n8n_execution_id: r.n8n_execution_id,
        })];
        events.extend(retry);
        Ok(events)
    }

    /// Pure decision: the events a command produces, or why it is refused.
    pub fn decide(
        &self,
        command: JobCommand,
        services: &JobServices,
    ) -> Result<Vec<JobEvent>, JobError> {
        use JobStatus::{Pending, Running};
        match command {
            JobCommand::Submit(c) => {
                if self.status != JobStatus::None {
                    return Err(JobError::AlreadyExists(self.status.as_str()));
                }
                if c.client_id.trim().is_empty() {
                    return Err(JobError::EmptyClientId);
                }
                let priority = c.priority.unwrap_or(DEFAULT_PRIORITY);
                if !PRIORITY_RANGE.contains(&priority) {
                    return Err(JobError::InvalidPriority(priority));
                }
                let timeout_seconds = c.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
                let max = services.max_timeout_seconds.min(MAX_JOB_TIMEOUT_SECONDS);
                if timeout_seconds == 0 || timeout_seconds > max {
                    return Err(JobError::InvalidTimeout {
                        got: timeout_seconds,
                        max,
                    });
                }
                let (callback_url, callback_url_sealed) = match c.callback_url {
                    None => (None, None),
                    Some(url) => {
                        check_callback_url(&url)?;
                        if !redact::carries_secrets(&url) {
                            (Some(url), None)
                        } else if let Some(sealer) = &services.callback_sealer {
                            let sealed = sealer.seal(url.as_bytes());
                            (Some(redact::strip(&url)), Some(sealed))
                        } else {
                            return Err(JobError::UnsealedCallbackCredentials {
                                url: redact::display(&url).chars().take(200).collect(),
                            });
                        }
                    }
                };
                let registry = services.registry.current();
                if !registry.contains(&c.workflow_key) {
                    return Err(JobError::UnknownWorkflow {
                        key: c.workflow_key,
                        known: registry.keys().join(", "),
                    });
                }
                Ok(vec![JobEvent::JobSubmitted(JobSubmitted {
                    workflow_key: c.workflow_key,
                    client_id: c.client_id,
                    input: c.input,
                    priority,
                    timeout_seconds,
                    callback_url,
                    callback_url_sealed,
                    metadata: c.metadata,
                    retry_of: None,
                })])
            }
            JobCommand::Retry(c) => {
                if self.status == JobStatus::None {
                    return Err(JobError::NotFound);
                }
                if c.retry_job_id.is_empty() {
                    return Err(JobError::EmptyField {
                        field: "retry_job_id",
                    });
                }
                if let Some(existing) = &self.retried_by {
                    return Err(JobError::AlreadyRetried {
                        retry_job_id: existing.clone(),
                    });
                }
                if !RETRYABLE.contains(&self.status) {
                    return Err(JobError::NotRetryable {
                        status: self.status.as_str(),
                    });
                }
                Ok(vec![JobEvent::JobRetried(JobRetried {
                    workflow_key: self.workflow_key.clone(),
                    retry_job_id: c.retry_job_id,
                })])
            }
            JobCommand::SubmitRetry(c) => {
                if self.status != JobStatus::None {
                    return Err(JobError::AlreadyExists(self.status.as_str()));
                }
                if c.retry_of.is_empty() {
                    return Err(JobError::EmptyField { field: "retry_of" });
                }
                let registry = services.registry.current();
                if !registry.contains(&c.submitted.workflow_key) {
                    return Err(JobError::UnknownWorkflow {
                        key: c.submitted.workflow_key,
                        known: registry.keys().join(", "),
                    });
                }
                Ok(vec![JobEvent::JobSubmitted(JobSubmitted {
                    retry_of: Some(c.retry_of),
                    ..c.submitted
                })])
            }
            JobCommand::Start(c) => {
                self.require("start", &[Pending])?;
                let mut scratch = self.clone();
                let mut events = vec![JobEvent::JobStarted(JobStarted {
                    workflow_key: self.workflow_key.clone(),
                })];
                for a in c.attempts {
                    let e = scratch.attempt_event(a.step, 1, a.idempotency_key)?;
                    scratch.apply(e.clone());
                    events.push(e);
                }
                Ok(events)
            }
            JobCommand::StartAttempt(a) => {
                self.require("start an attempt for", &[Running])?;
                Ok(vec![self.attempt_event(
                    a.step,
                    a.attempt,
                    a.idempotency_key,
                )?])
            }
            JobCommand::RecordStepResult(r) => {
                self.require("record a step result for", &[Running])?;
                self.step_event(r)
            }
            JobCommand::ScheduleRetry(r) => {
                self.require("schedule a retry for", &[Running])?;
                self.retry_event(r)
            }
            JobCommand::RecordCallback(c) => {
                if !self.status.is_final() {
                    self.require("record the callback of", &[])?;
                }
                if !self.has_callback_url {
                    return Err(JobError::NoCallback);
                }
                if self.callback_recorded {
                    return Err(JobError::CallbackAlreadyRecorded);
                }
                if c.attempts > MAX_CALLBACK_ATTEMPTS {
                    return Err(JobError::InvalidCallbackAttempts(c.attempts));
                }
                if let Some(code) = c.status_code.filter(|c| !(100..=599).contains(c)) {
                    return Err(JobError::InvalidStatusCode(code));
                }
                let event = match (c.status_code, c.error_message) {
                    (Some(status_code), Option::None) => {
                        JobEvent::CallbackDelivered(CallbackDelivered {
                            workflow_key: self.workflow_key.clone(),
                            target: c.target,
                            attempts: c.attempts,
                            status_code,
                        })
                    }
                    (Option::None, Some(error_message)) => {
                        JobEvent::CallbackFailed(CallbackFailed {
                            workflow_key: self.workflow_key.clone(),
                            target: c.target,
                            attempts: c.attempts,
                            error_message,
                        })
                    }
                    _ => return Err(JobError::CallbackOutcome),
                };
                Ok(vec![event])
            }
            JobCommand::Complete(c) => {
                self.require("complete", &[Running])?;
                let (_, mut events) = self.step_events(c.step_results)?;
                events.push(JobEvent::JobCompleted(JobCompleted {
                    workflow_key: self.workflow_key.clone(),
                    outputs: c.outputs,
                }));
                Ok(events)
            }
            JobCommand::Fail(c) => {
                self.require("fail", &[Pending, Running])?;
                if c.error_code.is_empty() {
                    return Err(JobError::EmptyField {
                        field: "error_code",
                    });
                }
                let (_, mut events) = self.step_events(c.step_results)?;
                events.push(JobEvent::JobFailed(JobFailed {
                    workflow_key: self.workflow_key.clone(),
                    error_code: c.error_code,
                    error_message: c.error_message,
                }));
                Ok(events)
            }
            JobCommand::Cancel(c) => {
                self.require("cancel", &[Pending, Running])?;
                Ok(vec![JobEvent::JobCancelled(JobCancelled {
                    workflow_key: self.workflow_key.clone(),
                    reason: c.reason,
                })])
            }
            JobCommand::Fenced { lease, command } => {
                if matches!(*command, JobCommand::Fenced { .. }) {
                    return Err(JobError::NestedFence);
                }
                if lease.fence < self.fence {
                    return Err(JobError::StaleLease {
                        sent: lease.fence,
                        current: self.fence,
                    });
                }
                let mut events = self.decide(*command, services)?;
                if lease.fence > self.fence {
                    events.insert(
                        0,
                        JobEvent::JobHandlerChanged(JobHandlerChanged {
                            workflow_key: self.workflow_key.clone(),
                            fence: lease.fence,
                            holder: lease.holder,
                        }),
                    );
                }
                Ok(events)
            }
        }
    }
}

impl Aggregate for Job {
    const TYPE: &'static str = "job";
    type Command = JobCommand;
    type Event = JobEvent;
    type Error = JobError;
    type Services = JobServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let decided = self.decide(command, services);
        write_decided(self, decided, sink).await
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            JobEvent::JobSubmitted(e) => {
                self.status = JobStatus::Pending;
                self.workflow_key = e.workflow_key;
                self.client_id = e.client_id;
                self.priority = e.priority;
                self.timeout_seconds = e.timeout_seconds;
                self.has_callback_url = e.callback_url.is_some();
                self.retry_of = e.retry_of;
            }
            JobEvent::JobRetried(e) => self.retried_by = Some(e.retry_job_id),
            JobEvent::JobStarted(_) => self.status = JobStatus::Running,
            JobEvent::StepAttemptStarted(e) => {
                self.started.insert(e.step, e.attempt);
            }
            JobEvent::StepResultRecorded(e) => {
                if e.status == StepStatus::Succeeded {
                    self.succeeded.insert(e.step.clone());
                }
                self.recorded.insert((e.step, e.attempt));
            }
            JobEvent::StepRetryScheduled(e) => {
                self.retries.insert((e.step, e.attempt));
            }
            JobEvent::JobHandlerChanged(e) => self.fence = self.fence.max(e.fence),
            JobEvent::CallbackDelivered(_) | JobEvent::CallbackFailed(_) => {
                self.callback_recorded = true;
            }
            JobEvent::JobCompleted(_) => self.status = JobStatus::Completed,
            JobEvent::JobFailed(_) => self.status = JobStatus::Failed,
            JobEvent::JobCancelled(_) => self.status = JobStatus::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;
    use serde_json::json;

    fn services() -> JobServices {
        JobServices {
            registry: crate::commands::registry::Registry::with_keys([
                "invoice.extract",
                "report.daily",
            ])
            .into(),
            max_timeout_seconds: 3600,
            callback_sealer: None,
        }
    }

    fn framework() -> TestFramework<Job> {
        TestFramework::with(services())
    }

    fn submit() -> SubmitJob {
        SubmitJob {
            workflow_key: "invoice.extract".into(),
            client_id: "billing".into(),
            input: json!({"invoice": 42}),
            priority: None,
            timeout_seconds: None,
            callback_url: None,
            metadata: Value::Null,
        }
    }

    fn submitted() -> JobEvent {
        JobEvent::JobSubmitted(JobSubmitted {
            workflow_key: "invoice.extract".into(),
            client_id: "billing".into(),
            input: json!({"invoice": 42}),
            priority: 5,
            timeout_seconds: 300,
            callback_url: None,
            callback_url_sealed: None,
            metadata: Value::Null,
            retry_of: None,
        })
    }

    fn step(name: &str, attempt: u32) -> RecordStepResult {
        RecordStepResult {
            step: name.into(),
            attempt,
            status: StepStatus::Succeeded,
            output: json!({"ok": true}),
            error_code: None,
            error_message: None,
            duration_ms: 12,
            retry_in_ms: None,
            n8n_execution_id: None,
        }
    }

    fn step_event(name: &str, attempt: u32) -> JobEvent {
        JobEvent::StepResultRecorded(StepResultRecorded {
            workflow_key: "invoice.extract".into(),
            step: name.into(),
            attempt,
            status: StepStatus::Succeeded,
            output: json!({"ok": true}),
            error_code: None,
            error_message: None,
            duration_ms: 12,
            n8n_execution_id: None,
        })
    }

    #[test]
    fn submit_applies_default_priority_and_timeout() {
        framework()
            .given_no_previous_events()
            .when(JobCommand::Submit(submit()))
            .then_expect_events(vec![submitted()]);
    }

    #[test]
    fn callback_urls_must_be_http_with_a_host() {
        for bad in ["not a url", "ftp://host/cb", "/relative/cb", "http://"] {
            let r = Job::default().decide(
                JobCommand::Submit(SubmitJob {
                    callback_url: Some(bad.into()),
                    ..submit()
                }),
                &services(),
            );
            assert!(
                matches!(r, Err(JobError::InvalidCallbackUrl { .. })),
                "{bad}: {r:?}"
            );
        }
        let e = check_callback_url("mailto:x?token=s3cret").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(check_callback_url("https://receiver.example/cb?token=t").is_ok());
    }

    #[test]
    fn submit_twice_is_a_conflict() {
        framework()
            .given(vec![submitted()])
            .when(JobCommand::Submit(submit()))
            .then_expect_error(JobError::AlreadyExists("pending"));
    }

    #[test]
    fn priority_out_of_range_is_refused() {
        for p in [0u8, 11] {
            framework()
                .given_no_previous_events()
                .when(JobCommand::Submit(SubmitJob {
                    priority: Some(p),
                    ..submit()
                }))
                .then_expect_error(JobError::InvalidPriority(p));
        }
    }

    #[test]
    fn priority_bounds_are_accepted() {
        for p in [1u8, 10] {
            let events = framework()
                .given_no_previous_events()
                .when(JobCommand::Submit(SubmitJob {
                    priority: Some(p),
                    ..submit()
                }))
                .inspect_result()
                .expect("priority within 1..10");
            assert!(matches!(&events[0], JobEvent::JobSubmitted(e) if e.priority == p));
        }
    }

    #[test]
    fn timeout_above_configured_maximum_is_refused() {
        framework()
            .given_no_previous_events()
            .when(JobCommand::Submit(SubmitJob {
                timeout_seconds: Some(3601),
                ..submit()
            }))
            .then_expect_error(JobError::InvalidTimeout {
                got: 3601,
                max: 3600,
            });
    }

    #[test]
    fn zero_timeout_is_refused() {
        framework()
            .given_no_previous_events()
            .when(JobCommand::Submit(SubmitJob {
                timeout_seconds: Some(0),
                ..submit()
            }))
            .then_expect_error(JobError::InvalidTimeout { got: 0, max: 3600 });
    }

    #[test]
    fn unknown_workflow_key_is_refused_with_known_keys() {
        framework()
            .given_no_previous_events()
            .when(JobCommand::Submit(SubmitJob {
                workflow_key: "nope".into(),
                ..submit()
            }))
            .then_expect_error(JobError::UnknownWorkflow {
                key: "nope".into(),
                known: "invoice.extract, report.daily".into(),
            });
    }

    #[test]
    fn start_a_pending_job() {
        framework()
            .given(vec![submitted()])
            .when(JobCommand::Start(StartJob::default()))
            .then_expect_events(vec![JobEvent::JobStarted(JobStarted {
                workflow_key: "invoice.extract".into(),
            })]);
    }

    #[test]
    fn commands_on_a_missing_job_are_not_found() {
        framework()
            .given_no_previous_events()
            .when(JobCommand::Start(StartJob::default()))
            .then_expect_error(JobError::NotFound);
    }

    #[test]
    fn step_result_needs_a_running_job() {
        framework()
            .given(vec![submitted()])
            .when(JobCommand::RecordStepResult(step("ocr", 1)))
            .then_expect_error(JobError::InvalidTransition {
                command: "record a step result for",
                status: "pending",
            });
    }

    #[test]
    fn step_result_is_recorded_once() {
        framework()
            .given(vec![
                submitted(),
                JobEvent::JobStarted(JobStarted {
                    workflow_key: "invoice.extract".into(),
                }),
                attempt_started("ocr", 1),
                attempt_started("llm", 1),
            ])
            .when(JobCommand::RecordStepResult(step("ocr", 1)))
            .then_expect_events(vec![step_event("ocr", 1)]);
        framework()
            .given(vec![
                submitted(),
                JobEvent::JobStarted(JobStarted {
                    workflow_key: "invoice.extract".into(),
                }),
                attempt_started("ocr", 1),
                step_event("ocr", 1),
            ])
            .when(JobCommand::RecordStepResult(step("ocr", 1)))
            .then_expect_error(JobError::DuplicateStepResult {
                step: "ocr".into(),
                attempt: 1,
            });
    }

    #[test]
    fn complete_commits_pending_step_results_with_it() {
        framework()
            .given(vec![
                submitted(),
                JobEvent::JobStarted(JobStarted {
                    workflow_key: "invoice.extract".into(),
                }),
                attempt_started("ocr", 1),
                attempt_started("llm", 1),
            ])
            .when(JobCommand::Complete(CompleteJob {
                outputs: json!({"total": 10}),
                step_results: vec![step("ocr", 1), step("llm", 1)],
            }))
            .then_expect_events(vec![
                step_event("ocr", 1),
                step_event("llm", 1),
                JobEvent::JobCompleted(JobCompleted {
                    workflow_key: "invoice.extract".into(),
                    outputs: json!({"total": 10}),
                }),
            ]);
    }

    #[test]
    fn complete_with_a_duplicate_step_writes_nothing() {
        framework()
            .given(vec![
                submitted(),
                JobEvent::JobStarted(JobStarted {
                    workflow_key: "invoice.extract".into(),
                }),
                attempt_started("ocr", 1),
                attempt_started("llm", 1),
            ])
            .when(JobCommand::Complete(CompleteJob {
                outputs: json!({}),
                step_results: vec![step("ocr", 1), step("ocr", 1)],
            }))
            .then_expect_error(JobError::DuplicateStepResult {
                step: "ocr".into(),
                attempt: 1,
            });
    }

    #[test]
    fn fail_a_running_job() {
        framework()
            .given(vec![
                submitted(),
                JobEvent::JobStarted(JobStarted {
                    workflow_key: "invoice.extract".into(),
                }),
            ])
            .when(JobCommand::Fail(FailJob {
                error_code: "SOLVER_TIMEOUT".into(),
                error_message: "ocr timed out".into(),
                step_results: vec![],
            }))
            .then_expect_events(vec![JobEvent::JobFailed(JobFailed {
                workflow_key: "invoice.extract".into(),
                error_code: "SOLVER_TIMEOUT".into(),
                error_message: "ocr timed out".into(),
            })]);
    }

    #[test]
    fn cancel_a_pending_job() {
        framework()
            .given(vec![submitted()])
            .when(JobCommand::Cancel(CancelJob {
                reason: "user asked".into(),
            }))
            .then_expect_events(vec![JobEvent::JobCancelled(JobCancelled {
                workflow_key: "invoice.extract".into(),
                reason: "user asked".into(),
            })]);
    }

    #[test]
    fn no_transition_out_of_a_final_state() {
        let finals = [
            (
                JobEvent::JobCompleted(JobCompleted {
                    workflow_key: "invoice.extract".into(),
                    outputs: json!({}),
                }),
                "completed",
            ),
            (
                JobEvent::JobFailed(JobFailed {
                    workflow_key: "invoice.extract".into(),
                    error_code: "X".into(),
                    error_message: "x".into(),
                }),
                "failed",
            ),
            (
                JobEvent::JobCancelled(JobCancelled {
                    workflow_key: "invoice.extract".into(),
                    reason: "r".into(),
                }),
                "cancelled",
            ),
        ];
        for (final_event, status) in finals {
            let history = vec![
                submitted(),
                JobEvent::JobStarted(JobStarted {
                    workflow_key: "invoice.extract".into(),
                }),
                final_event,
            ];
            for (command, verb) in [
                (JobCommand::Start(StartJob::default()), "start"),
                (
                    JobCommand::Cancel(CancelJob { reason: "r".into() }),
                    "cancel",
                ),
                (
                    JobCommand::Fail(FailJob {
                        error_code: "E".into(),
                        error_message: "e".into(),
                        step_results: vec![],
                    }),
                    "fail",
                ),
                (
                    JobCommand::Complete(CompleteJob {
                        outputs: json!({}),
                        step_results: vec![],
                    }),
                    "complete",
                ),
                (
                    JobCommand::RecordStepResult(step("late", 9)),
                    "record a step result for",
                ),
            ] {
                framework()
                    .given(history.clone())
                    .when(command)
                    .then_expect_error(JobError::InvalidTransition {
                        command: verb,
                        status,
                    });
            }
        }
    }

    fn started() -> JobEvent {
        JobEvent::JobStarted(JobStarted {
            workflow_key: "invoice.extract".into(),
        })
    }

    fn attempt_started(step: &str, attempt: u32) -> JobEvent {
        JobEvent::StepAttemptStarted(StepAttemptStarted {
            workflow_key: "invoice.extract".into(),
            step: step.into(),
            attempt,
            idempotency_key: format!("j:{step}:{attempt}"),
        })
    }

    fn fenced(fence: u64, command: JobCommand) -> JobCommand {
        JobCommand::Fenced {
            lease: Lease {
                fence,
                holder: format!("h{fence}"),
            },
            command: Box::new(command),
        }
    }

    fn handler_changed(fence: u64) -> JobEvent {
        JobEvent::JobHandlerChanged(JobHandlerChanged {
            workflow_key: "invoice.extract".into(),
            fence,
            holder: format!("h{fence}"),
        })
    }

    fn first_attempt(step: &str) -> JobCommand {
        JobCommand::StartAttempt(StartAttempt {
            step: step.into(),
            attempt: 2,
            idempotency_key: format!("j:{step}:2"),
        })
    }

    #[test]
    fn a_newer_lease_records_the_handler_change_once() {
        let start = || JobCommand::Start(StartJob { attempts: vec![] });
        framework()
            .given(vec![submitted()])
            .when(fenced(3, start()))
            .then_expect_events(vec![handler_changed(3), started()]);
        // the same lease again: no change to record
        framework()
            .given(vec![
                submitted(),
                handler_changed(3),
                started(),
                attempt_started("ocr", 1),
            ])
            .when(fenced(3, first_attempt("ocr")))
            .then_expect_events(vec![attempt_started("ocr", 2)]);
    }

    #[test]
    fn a_command_under_an_older_lease_is_refused() {
        framework()
            .given(vec![
                submitted(),
                handler_changed(3),
                started(),
                attempt_started("ocr", 1),
                handler_changed(9),
            ])
            .when(fenced(3, first_attempt("ocr")))
            .then_expect_error(JobError::StaleLease {
                sent: 3,
                current: 9,
            });
        // the refusal is a rejection the sender stops on
        assert_eq!(
            JobError::StaleLease {
                sent: 3,
                current: 9
            }
            .code(),
            ErrorCode::Rejected
        );
    }

    #[test]
    fn a_fenced_command_is_still_decided_on_the_state() {
        // a newer lease does not make an invalid command valid, and records nothing
        framework()
            .given(vec![submitted()])
            .when(fenced(5, first_attempt("ocr")))
            .then_expect_error(JobError::InvalidTransition {
                command: "start an attempt for",
                status: "pending",
            });
        framework()
            .given(vec![submitted()])
            .when(fenced(5, fenced(6, first_attempt("ocr"))))
            .then_expect_error(JobError::NestedFence);
    }

    #[test]
    fn start_sends_first_attempts_in_the_same_commit() {
        framework()
            .given(vec![submitted()])
            .when(JobCommand::Start(StartJob {
                attempts: vec![
                    NewAttempt {
                        step: "ocr".into(),
                        idempotency_key: "j:ocr:1".into(),
                    },
                    NewAttempt {
                        step: "llm".into(),
                        idempotency_key: "j:llm:1".into(),
                    },
                ],
            }))
            .then_expect_events(vec![
                started(),
                attempt_started("ocr", 1),
                attempt_started("llm", 1),
            ]);
    }

    #[test]
    fn attempts_go_in_order_and_stop_after_success() {
        let attempt = |n| {
            JobCommand::StartAttempt(StartAttempt {
                step: "ocr".into(),
                attempt: n,
                idempotency_key: format!("j:ocr:{n}"),
            })
        };
        framework()
            .given(vec![submitted(), started(), attempt_started("ocr", 1)])
            .when(attempt(3))
            .then_expect_error(JobError::AttemptOutOfOrder {
                step: "ocr".into(),
                expected: 2,
                got: 3,
            });
        framework()
            .given(vec![submitted(), started(), attempt_started("ocr", 1)])
            .when(attempt(2))
            .then_expect_events(vec![attempt_started("ocr", 2)]);
        framework()
            .given(vec![
                submitted(),
                started(),
                attempt_started("ocr", 1),
                step_event("ocr", 1),
            ])
            .when(attempt(2))
            .then_expect_error(JobError::StepAlreadySucceeded { step: "ocr".into() });
    }

    #[test]
    fn failed_attempt_with_retry_schedules_the_next() {
        let failed = RecordStepResult {
            status: StepStatus::Failed,
            error_code: Some("HTTP_503".into()),
            retry_in_ms: Some(5000),
            output: Value::Null,
            ..step("ocr", 1)
        };
        framework()
            .given(vec![submitted(), started(), attempt_started("ocr", 1)])
            .when(JobCommand::RecordStepResult(failed))
            .then_expect_events(vec![
                JobEvent::StepResultRecorded(StepResultRecorded {
                    workflow_key: "invoice.extract".into(),
                    step: "ocr".into(),
                    attempt: 1,
                    status: StepStatus::Failed,
                    output: Value::Null,
                    error_code: Some("HTTP_503".into()),
                    error_message: None,
                    duration_ms: 12,
                    n8n_execution_id: None,
                }),
                JobEvent::StepRetryScheduled(StepRetryScheduled {
                    workflow_key: "invoice.extract".into(),
                    step: "ocr".into(),
                    attempt: 2,
                    delay_ms: 5000,
                }),
            ]);
    }

    #[test]
    fn a_failed_result_recorded_without_a_retry_is_retried_once_by_the_handler() {
        let failed = |attempt| {
            JobEvent::StepResultRecorded(StepResultRecorded {
                workflow_key: "invoice.extract".into(),
                step: "ocr".into(),
                attempt,
                status: StepStatus::Failed,
                output: Value::Null,
                error_code: Some("n8n_failed".into()),
                error_message: None,
                duration_ms: 12,
                n8n_execution_id: None,
            })
        };
        let retry = |attempt, delay_ms| ScheduleRetry {
            step: "ocr".into(),
            attempt,
            delay_ms,
        };
        let scheduled = JobEvent::StepRetryScheduled(StepRetryScheduled {
            workflow_key: "invoice.extract".into(),
            step: "ocr".into(),
            attempt: 2,
            delay_ms: 800,
        });
        let given = vec![submitted(), started(), attempt_started("ocr", 1), failed(1)];
        framework()
            .given(given.clone())
            .when(JobCommand::ScheduleRetry(retry(1, 800)))
            .then_expect_events(vec![scheduled.clone()]);
        // once: a second retry of the same attempt is refused
        let mut twice = given.clone();
        twice.push(scheduled);
        framework()
            .given(twice)
            .when(JobCommand::ScheduleRetry(retry(1, 800)))
            .then_expect_error(JobError::NothingToRetry {
                step: "ocr".into(),
                attempt: 1,
            });
        // not an attempt without a result, nor one that is not the latest
        framework()
            .given(vec![submitted(), started(), attempt_started("ocr", 1)])
            .when(JobCommand::ScheduleRetry(retry(1, 800)))
            .then_expect_error(JobError::NothingToRetry {
                step: "ocr".into(),
                attempt: 1,
            });
        let mut later = given.clone();
        later.push(attempt_started("ocr", 2));
        framework()
            .given(later)
            .when(JobCommand::ScheduleRetry(retry(1, 800)))
            .then_expect_error(JobError::NothingToRetry {
                step: "ocr".into(),
                attempt: 1,
            });
        // bounded like a result's retry
        framework()
            .given(given.clone())
            .when(JobCommand::ScheduleRetry(retry(1, MAX_RETRY_DELAY_MS + 1)))
            .then_expect_error(JobError::InvalidRetryDelay(MAX_RETRY_DELAY_MS + 1));
        framework()
            .given(given)
            .when(JobCommand::ScheduleRetry(retry(MAX_ATTEMPTS, 800)))
            .then_expect_error(JobError::RetryAfterLastAttempt(MAX_ATTEMPTS));
        // a succeeded step is never retried
        framework()
            .given(vec![
                submitted(),
                started(),
                attempt_started("ocr", 1),
                JobEvent::StepResultRecorded(StepResultRecorded {
                    status: StepStatus::Succeeded,
                    ..match failed(1) {
                        JobEvent::StepResultRecorded(r) => r,
                        _ => unreachable!("failed() is a StepResultRecorded"),
                    }
                }),
            ])
            .when(JobCommand::ScheduleRetry(retry(1, 800)))
            .then_expect_error(JobError::StepAlreadySucceeded { step: "ocr".into() });
    }

    #[test]
    fn callback_outcome_is_recorded_once_after_the_end() {
        let with_url = JobEvent::JobSubmitted(JobSubmitted {
            callback_url: Some("http://receiver/cb".into()),
            ..match submitted() {
                JobEvent::JobSubmitted(s) => s,
                _ => unreachable!("submitted() is a JobSubmitted"),
            }
        });
        let done = JobEvent::JobCompleted(JobCompleted {
            workflow_key: "invoice.extract".into(),
            outputs: json!({}),
        });
        let delivered = RecordCallback {
            target: "http://receiver/cb".into(),
            attempts: 2,
            status_code: Some(200),
            error_message: None,
        };
        framework()
            .given(vec![with_url.clone(), started()])
            .when(JobCommand::RecordCallback(delivered.clone()))
            .then_expect_error(JobError::InvalidTransition {
                command: "record the callback of",
                status: "running",
            });
        framework()
            .given(vec![submitted(), started(), done.clone()])
            .when(JobCommand::RecordCallback(delivered.clone()))
            .then_expect_error(JobError::NoCallback);
        framework()
            .given(vec![with_url.clone(), started(), done.clone()])
            .when(JobCommand::RecordCallback(delivered.clone()))
            .then_expect_events(vec![JobEvent::CallbackDelivered(CallbackDelivered {
                workflow_key: "invoice.extract".into(),
                target: "http://receiver/cb".into(),
                attempts: 2,
                status_code: 200,
            })]);
        let recorded = JobEvent::CallbackDelivered(CallbackDelivered {
            workflow_key: "invoice.extract".into(),
            target: "http://receiver/cb".into(),
            attempts: 2,
            status_code: 200,
        });
        framework()
            .given(vec![with_url, started(), done, recorded])
            .when(JobCommand::RecordCallback(delivered))
            .then_expect_error(JobError::CallbackAlreadyRecorded);
    }

    #[test]
    fn a_result_for_an_attempt_never_started_is_refused() {
        framework()
            .given(vec![submitted(), started(), attempt_started("ocr", 1)])
            .when(JobCommand::RecordStepResult(step("ocr", 2)))
            .then_expect_error(JobError::AttemptNotStarted {
                step: "ocr".into(),
                attempt: 2,
                started: 1,
            });
        framework()
            .given(vec![submitted(), started()])
            .when(JobCommand::RecordStepResult(step("never", 1)))
            .then_expect_error(JobError::AttemptNotStarted {
                step: "never".into(),
                attempt: 1,
                started: 0,
            });
    }

    #[test]
    fn numbers_from_outside_are_bounded() {
        let given = || vec![submitted(), started(), attempt_started("ocr", 1)];
        for attempt in [0, MAX_ATTEMPTS + 1, u32::MAX] {
            framework()
                .given(given())
                .when(JobCommand::RecordStepResult(step("ocr", attempt)))
                .then_expect_error(JobError::AttemptOutOfRange(attempt));
            framework()
                .given(given())
                .when(JobCommand::StartAttempt(StartAttempt {
                    step: "ocr".into(),
                    attempt,
                    idempotency_key: "k".into(),
                }))
                .then_expect_error(JobError::AttemptOutOfRange(attempt));
        }
        for retry in [MAX_RETRY_DELAY_MS + 1, u64::MAX] {
            let r = RecordStepResult {
                status: StepStatus::Failed,
                retry_in_ms: Some(retry),
                ..step("ocr", 1)
            };
            framework()
                .given(given())
                .when(JobCommand::RecordStepResult(r))
                .then_expect_error(JobError::InvalidRetryDelay(retry));
        }
        let r = RecordStepResult {
            duration_ms: u64::MAX,
            ..step("ocr", 1)
        };
        framework()
            .given(given())
            .when(JobCommand::RecordStepResult(r))
            .then_expect_error(JobError::InvalidDuration(u64::MAX));
        for bad in ["", "has space", "x".repeat(129).as_str()] {
            let r = RecordStepResult {
                n8n_execution_id: Some(bad.into()),
                ..step("ocr", 1)
            };
            framework()
                .given(given())
                .when(JobCommand::RecordStepResult(r))
                .then_expect_error(JobError::InvalidN8nExecutionId(
                    bad.chars().take(40).collect(),
                ));
        }
        let named = RecordStepResult {
            n8n_execution_id: Some("4711".into()),
            ..step("ocr", 1)
        };
        let JobEvent::StepResultRecorded(recorded) = step_event("ocr", 1) else {
            unreachable!("step_event is a StepResultRecorded")
        };
        framework()
            .given(given())
            .when(JobCommand::RecordStepResult(named))
            .then_expect_events(vec![JobEvent::StepResultRecorded(StepResultRecorded {
                n8n_execution_id: Some("4711".into()),
                ..recorded
            })]);
        let e = Job::default()
            .decide(
                JobCommand::Submit(SubmitJob {
                    timeout_seconds: Some(u32::MAX),
                    ..submit()
                }),
                &JobServices {
                    max_timeout_seconds: u32::MAX,
                    ..services()
                },
            )
            .unwrap_err();
        assert_eq!(
            e,
            JobError::InvalidTimeout {
                got: u32::MAX,
                max: MAX_JOB_TIMEOUT_SECONDS
            }
        );
    }

    fn ended(status: JobStatus) -> Vec<JobEvent> {
        let k = || "invoice.extract".to_string();
        let end = match status {
            JobStatus::Completed => JobEvent::JobCompleted(JobCompleted {
                workflow_key: k(),
                outputs: json!({}),
            }),
            JobStatus::Failed => JobEvent::JobFailed(JobFailed {
                workflow_key: k(),
                error_code: "steps_failed".into(),
                error_message: "0 of 1 steps succeeded".into(),
            }),
            JobStatus::Cancelled => JobEvent::JobCancelled(JobCancelled {
                workflow_key: k(),
                reason: String::new(),
            }),
            JobStatus::Pending => return vec![submitted()],
            JobStatus::Running => return vec![submitted(), started()],
            JobStatus::None => return vec![],
        };
        vec![submitted(), started(), end]
    }

    fn retry(id: &str) -> JobCommand {
        JobCommand::Retry(RetryJob {
            retry_job_id: id.into(),
        })
    }

    fn retried(id: &str) -> JobEvent {
        JobEvent::JobRetried(JobRetried {
            workflow_key: "invoice.extract".into(),
            retry_job_id: id.into(),
        })
    }

    #[test]
    fn a_failed_or_cancelled_job_is_retried() {
        for status in [JobStatus::Failed, JobStatus::Cancelled] {
            framework()
                .given(ended(status))
                .when(retry("j-2"))
                .then_expect_events(vec![retried("j-2")]);
        }
    }

    #[test]
    fn a_job_that_did_not_fail_is_not_retried_and_the_refusal_names_its_status() {
        for status in [JobStatus::Pending, JobStatus::Running, JobStatus::Completed] {
            let r = Job::default();
            let mut job = r;
            for e in ended(status) {
                job.apply(e);
            }
            let err = job.decide(retry("j-2"), &services()).unwrap_err();
            assert_eq!(
                err,
                JobError::NotRetryable {
                    status: status.as_str()
                }
            );
            assert_eq!(err.code(), ErrorCode::Rejected);
            assert!(err.to_string().contains(status.as_str()), "{err}");
        }
        framework()
            .given_no_previous_events()
            .when(retry("j-2"))
            .then_expect_error(JobError::NotFound);
    }

    #[test]
    fn a_job_is_retried_once_and_a_second_retry_names_the_first() {
        let mut given = ended(JobStatus::Failed);
        given.push(retried("j-2"));
        framework()
            .given(given)
            .when(retry("j-3"))
            .then_expect_error(JobError::AlreadyRetried {
                retry_job_id: "j-2".into(),
            });
        framework()
            .given(ended(JobStatus::Failed))
            .when(retry(""))
            .then_expect_error(JobError::EmptyField {
                field: "retry_job_id",
            });
    }

    fn the_submission() -> JobSubmitted {
        match submitted() {
            JobEvent::JobSubmitted(s) => s,
            _ => unreachable!("submitted() is a JobSubmitted"),
        }
    }

    #[test]
    fn a_retry_submission_copies_the_retried_job_and_links_it() {
        let original = JobSubmitted {
            priority: 9,
            timeout_seconds: 60,
            callback_url: Some("https://receiver.example/cb".into()),
            input: json!({"invoice": 7}),
            ..the_submission()
        };
        framework()
            .given_no_previous_events()
            .when(JobCommand::SubmitRetry(SubmitRetry {
                retry_of: "j-1".into(),
                submitted: original.clone(),
            }))
            .then_expect_events(vec![JobEvent::JobSubmitted(JobSubmitted {
                retry_of: Some("j-1".into()),
                ..original
            })]);
    }

    #[test]
    fn a_retry_submission_is_refused_on_an_existing_job_or_an_unknown_workflow() {
        let submit = |key: &str| {
            JobCommand::SubmitRetry(SubmitRetry {
                retry_of: "j-1".into(),
                submitted: JobSubmitted {
                    workflow_key: key.into(),
                    ..the_submission()
                },
            })
        };
        framework()
            .given(vec![submitted()])
            .when(submit("invoice.extract"))
            .then_expect_error(JobError::AlreadyExists("pending"));
        let r = Job::default().decide(submit("gone.workflow"), &services());
        assert!(
            matches!(r, Err(JobError::UnknownWorkflow { ref key, .. }) if key == "gone.workflow"),
            "{r:?}"
        );
    }

    #[test]
    fn the_links_are_folded_both_ways() {
        let mut old = Job::default();
        for e in ended(JobStatus::Failed) {
            old.apply(e);
        }
        old.apply(retried("j-2"));
        assert_eq!(old.retried_by.as_deref(), Some("j-2"));
        assert_eq!(old.status, JobStatus::Failed);
        let mut new = Job::default();
        new.apply(JobEvent::JobSubmitted(JobSubmitted {
            retry_of: Some("j-1".into()),
            ..the_submission()
        }));
        assert_eq!(new.retry_of.as_deref(), Some("j-1"));
    }

    #[test]
    fn an_old_job_submission_without_retry_of_still_decodes() {
        let e: JobEvent = serde_json::from_value(json!({
            "event_type": "JobSubmitted",
            "data": {"workflow_key": "invoice.extract", "client_id": "billing",
                     "input": {}, "priority": 5, "timeout_seconds": 300}
        }))
        .expect("a JobSubmitted from before retries decodes");
        assert!(matches!(e, JobEvent::JobSubmitted(s) if s.retry_of.is_none()));
        // and one without a retry is stored as before: no `retry_of` key
        let stored = serde_json::to_value(submitted()).expect("encodes");
        assert!(stored["data"].get("retry_of").is_none(), "{stored}");
    }
}
