//! The `Job` aggregate: submit, start, record a step result, complete, fail,
//! cancel (seed 002). Final states are `completed`, `failed`, `cancelled`.

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
use crate::commands::registry::Registry;
use crate::commands::{write_decided, DomainError, ErrorCode};
use events::{
    CallbackDelivered, CallbackFailed, JobCancelled, JobCompleted, JobEvent, JobFailed, JobStarted,
    JobSubmitted, StepAttemptStarted, StepResultRecorded, StepRetryScheduled, StepStatus,
};

pub const DEFAULT_PRIORITY: u8 = 5;
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 300;

/// What a `Job` needs to decide: the registry and the configured limits.
#[derive(Debug, Clone)]
pub struct JobServices {
    pub registry: Arc<Registry>,
    pub max_timeout_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// No event yet: the job does not exist.
    #[default]
    None,
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub status: JobStatus,
    pub workflow_key: String,
    pub client_id: String,
    pub priority: u8,
    pub timeout_seconds: u32,
    /// `(step, attempt)` pairs already recorded.
    pub recorded: BTreeSet<(String, u32)>,
    /// Attempts started per step.
    pub started: BTreeMap<String, u32>,
    /// Steps with a successful attempt: never called again.
    pub succeeded: BTreeSet<String>,
    pub has_callback_url: bool,
    /// `CallbackDelivered` or `CallbackFailed` is recorded.
    pub callback_recorded: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    pub workflow_key: String,
    pub client_id: String,
    #[serde(default)]
    pub input: Value,
    pub priority: Option<u8>,
    pub timeout_seconds: Option<u32>,
    pub callback_url: Option<String>,
    #[serde(default)]
    pub metadata: Value,
}

/// Start a pending job, sending the first attempt of the given steps.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StartJob {
    #[serde(default)]
    pub attempts: Vec<NewAttempt>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAttempt {
    pub step: String,
    pub idempotency_key: String,
}

/// Send attempt `attempt` (the next one) of a step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartAttempt {
    pub step: String,
    pub attempt: u32,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordCallback {
    pub target: String,
    pub attempts: u32,
    /// Set when the receiver accepted the callback.
    pub status_code: Option<u16>,
    /// Set when every attempt failed.
    pub error_message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordStepResult {
    pub step: String,
    pub attempt: u32,
    pub status: StepStatus,
    #[serde(default)]
    pub output: Value,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub duration_ms: u64,
    /// A failed attempt to be retried after this many milliseconds.
    #[serde(default)]
    pub retry_in_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteJob {
    #[serde(default)]
    pub outputs: Value,
    /// Step results not yet recorded; they are committed together with the
    /// completion, all or nothing.
    #[serde(default)]
    pub step_results: Vec<RecordStepResult>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailJob {
    pub error_code: String,
    pub error_message: String,
    /// Step results not yet recorded, committed with the failure.
    #[serde(default)]
    pub step_results: Vec<RecordStepResult>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobCommand {
    Submit(SubmitJob),
    Start(StartJob),
    StartAttempt(StartAttempt),
    RecordStepResult(RecordStepResult),
    Complete(CompleteJob),
    Fail(FailJob),
    Cancel(CancelJob),
    RecordCallback(RecordCallback),
}

impl JobCommand {
    pub fn name(&self) -> &'static str {
        match self {
            JobCommand::Submit(_) => "submit",
            JobCommand::Start(_) => "start",
            JobCommand::StartAttempt(_) => "start_attempt",
            JobCommand::RecordStepResult(_) => "record_step_result",
            JobCommand::Complete(_) => "complete",
            JobCommand::Fail(_) => "fail",
            JobCommand::Cancel(_) => "cancel",
            JobCommand::RecordCallback(_) => "record_callback",
        }
    }
}

/// A callback URL is an absolute `http` or `https` URL with a host, of at
/// most 2,048 characters. Pure: parsing only, no lookup.
fn check_callback_url(url: &str) -> Result<(), JobError> {
    let bad = |reason: &str| JobError::InvalidCallbackUrl {
        // the query string may hold a receiver's token: never echo it
        url: url
            .split('?')
            .next()
            .unwrap_or_default()
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

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("job does not exist; submit it first")]
    NotFound,
    #[error("job already exists (status {0}); use a new job_id")]
    AlreadyExists(&'static str),
    #[error("priority must be between 1 and 10, got {0}")]
    InvalidPriority(u8),
    #[error("timeout_seconds must be between 1 and {max}, got {got}")]
    InvalidTimeout { got: u32, max: u32 },
    #[error("unknown workflow_key {key:?}: known keys are {known} (see the workflow registry)")]
    UnknownWorkflow { key: String, known: String },
    #[error("client_id must not be empty")]
    EmptyClientId,
    #[error("{field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("cannot {command} a job that is {status}")]
    InvalidTransition {
        command: &'static str,
        status: &'static str,
    },
    #[error("step {step:?} attempt {attempt} is already recorded")]
    DuplicateStepResult { step: String, attempt: u32 },
    #[error("step {step:?} already succeeded; it is not called again")]
    StepAlreadySucceeded { step: String },
    #[error("step {step:?}: the next attempt is {expected}, not {got}")]
    AttemptOutOfOrder {
        step: String,
        expected: u32,
        got: u32,
    },
    #[error("step {step:?}: attempt {attempt} was never started (attempts started: {started})")]
    AttemptNotStarted {
        step: String,
        attempt: u32,
        started: u32,
    },
    #[error("attempt must be 1 to {MAX_ATTEMPTS}, got {0}")]
    AttemptOutOfRange(u32),
    #[error("retry_in_ms must be at most {MAX_RETRY_DELAY_MS} (one day), got {0}")]
    InvalidRetryDelay(u64),
    #[error("duration_ms must be at most {MAX_DURATION_MS} (one week), got {0}")]
    InvalidDuration(u64),
    #[error(
        "retry_in_ms: attempt {0} is the last one allowed ({MAX_ATTEMPTS}); no retry can follow it"
    )]
    RetryAfterLastAttempt(u32),
    #[error("attempts must be at most {MAX_CALLBACK_ATTEMPTS}, got {0}")]
    InvalidCallbackAttempts(u32),
    #[error("status_code must be an HTTP status (100-599), got {0}")]
    InvalidStatusCode(u16),
    #[error("workflow {key:?} is disabled (kill-switch); new jobs are refused until an operator enables it")]
    WorkflowDisabled { key: String },
    #[error("callback_url {url:?}: {reason}")]
    InvalidCallbackUrl { url: String, reason: String },
    #[error("the job has no callback_url")]
    NoCallback,
    #[error("the callback outcome is already recorded")]
    CallbackAlreadyRecorded,
    #[error("a callback outcome needs exactly one of status_code and error_message")]
    CallbackOutcome,
}

impl DomainError for JobError {
    fn code(&self) -> ErrorCode {
        match self {
            JobError::NotFound => ErrorCode::NotFound,
            JobError::AlreadyExists(_) => ErrorCode::Conflict,
            JobError::InvalidPriority(_)
            | JobError::InvalidTimeout { .. }
            | JobError::UnknownWorkflow { .. }
            | JobError::EmptyClientId
            | JobError::EmptyField { .. } => ErrorCode::Validation,
            JobError::CallbackOutcome
            | JobError::InvalidCallbackUrl { .. }
            | JobError::AttemptOutOfRange(_)
            | JobError::InvalidRetryDelay(_)
            | JobError::RetryAfterLastAttempt(_)
            | JobError::InvalidDuration(_)
            | JobError::InvalidCallbackAttempts(_)
            | JobError::InvalidStatusCode(_) => ErrorCode::Validation,
            JobError::WorkflowDisabled { .. }
            | JobError::AttemptNotStarted { .. }
            | JobError::InvalidTransition { .. }
            | JobError::DuplicateStepResult { .. }
            | JobError::StepAlreadySucceeded { .. }
            | JobError::AttemptOutOfOrder { .. }
            | JobError::NoCallback
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
            JobError::InvalidCallbackUrl { .. } => "callback_url",
            JobError::AttemptOutOfRange(_)
            | JobError::AttemptNotStarted { .. }
            | JobError::AttemptOutOfOrder { .. } => "attempt",
            JobError::InvalidRetryDelay(_) | JobError::RetryAfterLastAttempt(_) => "retry_in_ms",
            JobError::InvalidDuration(_) => "duration_ms",
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
                if let Some(url) = &c.callback_url {
                    check_callback_url(url)?;
                }
                if !services.registry.contains(&c.workflow_key) {
                    return Err(JobError::UnknownWorkflow {
                        key: c.workflow_key,
                        known: services.registry.keys().join(", "),
                    });
                }
                Ok(vec![JobEvent::JobSubmitted(JobSubmitted {
                    workflow_key: c.workflow_key,
                    client_id: c.client_id,
                    input: c.input,
                    priority,
                    timeout_seconds,
                    callback_url: c.callback_url,
                    metadata: c.metadata,
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
            }
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
            JobEvent::StepRetryScheduled(_) => {}
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
            registry: Arc::new(Registry::with_keys(["invoice.extract", "report.daily"])),
            max_timeout_seconds: 3600,
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
            metadata: Value::Null,
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
}
