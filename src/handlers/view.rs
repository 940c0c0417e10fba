//! What the handler knows of one job, folded from its typed events (job
//! events and the events of its approval), decoded once by the ledger with
//! the upcasters applied. Unlike the aggregate, the view keeps times
//! (`occurred_at`), inputs and outputs: what the handler needs to resume a
//! job after a restart and to write its callback.
//!
//! Folding never panics: a value it cannot use (a retry due past the end
//! of time) is a [`FoldError`], and the manager parks that job alone.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::commands::approval::events::ApprovalEvent;
use crate::commands::job::events::{JobEvent, JobSubmitted, StepStatus};
use crate::commands::job::JobStatus;
use crate::events::envelope::{Actor, EventRecord};
use crate::events::store::{decode_event, DecodeError};

/// A job's event or its approval's, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum StoryEvent {
    /// An event of the `job` aggregate.
    Job(JobEvent),
    /// An event of the job's `approval` aggregate.
    Approval(ApprovalEvent),
}

/// One event of a job's story with the envelope facts the handler uses.
#[derive(Debug, Clone, PartialEq)]
pub struct StoryRecord {
    /// The job it belongs to (a job's approval has the job's id).
    pub job_id: String,
    /// The event's version in its own aggregate (job or approval).
    pub aggregate_version: u64,
    /// The stored `event_type`, the action of the callback's audit line.
    pub event_type: String,
    /// As stored (RFC 3339), for the callback's audit lines.
    pub occurred_at: String,
    /// `occurred_at` parsed: the time the fold computes with (starts, ends,
    /// retries due).
    pub at: DateTime<Utc>,
    /// Who issued the command that recorded it.
    pub actor: Actor,
    /// The decoded event.
    pub event: StoryEvent,
}

impl StoryRecord {
    /// Decodes a stored record of a job or approval subject; `None` for
    /// other aggregate types.
    pub fn decode(record: EventRecord) -> Option<Result<Self, DecodeError>> {
        let at = DateTime::parse_from_rfc3339(&record.occurred_at)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| DecodeError::Envelope(format!("occurred_at: {e}")));
        let event = match record.aggregate_type.as_str() {
            "job" => decode_event::<JobEvent>(&record).map(StoryEvent::Job),
            "approval" => decode_event::<ApprovalEvent>(&record).map(StoryEvent::Approval),
            _ => return None,
        };
        Some(event.and_then(|event| {
            Ok(StoryRecord {
                job_id: record.aggregate_id,
                aggregate_version: record.aggregate_version,
                event_type: record.event_type,
                occurred_at: record.occurred_at,
                at: at?,
                actor: record.actor,
                event,
            })
        }))
    }
}

/// A job event the view cannot fold; the job is parked with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FoldError {
    /// A `StepRetryScheduled` whose due time (`at` + `delay_ms`) is past
    /// the last time chrono can represent.
    #[error("step {step:?}: a retry {delay_ms} ms after {at} is past any representable time")]
    RetryOutOfRange {
        /// The step to be retried.
        step: String,
        /// When the retry was scheduled (the event's `occurred_at`).
        at: DateTime<Utc>,
        /// The delay the event asks for, in milliseconds.
        delay_ms: u64,
    },
}

/// How one attempt of a step ended, from its `StepResultRecorded`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    /// Succeeded, failed or timed out.
    pub status: StepStatus,
    /// The peer's JSON answer (null unless succeeded).
    pub output: Value,
    /// Why it failed, as a code (`http_503`, `step_timeout`, ...).
    pub error_code: Option<String>,
    /// Why it failed, for a person.
    pub error_message: Option<String>,
    /// How long the attempt took, in milliseconds.
    pub duration_ms: u64,
}

/// What the handler knows of one step of a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepView {
    /// Last attempt started (0: none).
    pub started: u32,
    /// The recorded results, by attempt number.
    pub results: BTreeMap<u32, AttemptResult>,
    /// A retry of attempt `.0` is due at `.1`.
    pub retry: Option<(u32, DateTime<Utc>)>,
    /// Attempts whose result a peer posted (an n8n callback), not the
    /// handler: a failure among them is retried by the handler's decision
    /// (`schedule_retry`), not by the result itself.
    pub posted: BTreeSet<u32>,
}

impl StepView {
    /// The result of the attempt that succeeded, if one did.
    pub fn succeeded(&self) -> Option<&AttemptResult> {
        self.results
            .values()
            .find(|r| r.status == StepStatus::Succeeded)
    }
}

/// Where the job's approval stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ApprovalState {
    /// No approval requested (not yet, or the workflow needs none).
    None,
    /// Requested, not decided.
    Pending {
        /// When it expires if nobody decides.
        expires_at: DateTime<Utc>,
    },
    /// Approved: the job may run.
    Granted {
        /// Who approved (an operator's client id, or `auto-approval`).
        by: String,
    },
    /// Rejected: the job fails.
    Rejected {
        /// Who rejected it (an operator's client id).
        by: String,
        /// The reason they gave.
        reason: String,
    },
    /// Nobody decided before `expires_at`.
    Expired,
}

/// One line of the callback's `audit` array (seed 002).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    /// The event's `occurred_at`, as stored.
    pub timestamp: String,
    /// The event's `event_type`.
    pub action: String,
    /// The step the event is about, if any.
    pub node_name: Option<String>,
    /// The event's facts that matter to the receiver (attempt, status,
    /// error, reason, ...).
    pub details: Value,
    /// How long the attempt took, in milliseconds (step results only).
    pub duration_ms: Option<u64>,
}

/// The handler's view of one job: what it needs to drive the job, resume it
/// after a restart and write its result callback.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// The job id (also its approval's and its execution's id).
    pub job_id: String,
    /// The registry key of the job's workflow.
    pub workflow_key: String,
    /// The client the job belongs to.
    pub client_id: String,
    /// 1 (lowest) to 10: the order in which waiting jobs are admitted.
    pub priority: u8,
    /// The job's deadline in seconds from its start (at least 1).
    pub timeout_seconds: u32,
    /// The submission's input, sent to every step as `inputs`.
    pub inputs: Value,
    /// The submission's free-form metadata (`confidence` feeds auto-approval).
    pub metadata: Value,
    /// Where the signed result is POSTed when the job ends; none: no
    /// callback. Without its credentials when `callback_url_sealed` is set.
    pub callback_url: Option<String>,
    /// The whole submitted `callback_url`, sealed: delivery opens it.
    pub callback_url_sealed: Option<crate::crypto::Sealed>,
    /// The stream sequence of the `JobSubmitted` (submission order, and the
    /// handler's low-water mark).
    pub submitted_seq: u64,
    /// When the job was submitted; the approval window counts from it.
    pub submitted_at: DateTime<Utc>,
    /// Pending, running, or the final status.
    pub status: JobStatus,
    /// When the job started running its steps.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed, failed or was cancelled.
    pub ended_at: Option<DateTime<Utc>>,
    /// Each step's attempts and results, by step name.
    pub steps: BTreeMap<String, StepView>,
    /// The outputs of a completed job (null otherwise).
    pub outputs: Value,
    /// Why it failed (`cancelled` when cancelled).
    pub error_code: Option<String>,
    /// The failure's message, or the cancellation's reason.
    pub error_message: Option<String>,
    /// Where its approval stands.
    pub approval: ApprovalState,
    /// Whether the callback's outcome (delivered or failed) is recorded.
    pub callback_recorded: bool,
    /// The lines of the callback's `audit` array, one per event folded.
    pub audit: Vec<AuditLine>,
    /// Last job aggregate version folded in.
    pub version: u64,
    /// Last approval aggregate version folded in.
    pub approval_version: u64,
    /// The `traceparent` header of the message that submitted the job
    /// (traces on): the job's handler span continues that trace. Never in
    /// an event, not part of the job's story.
    pub traceparent: Option<String>,
}

impl JobView {
    /// A view from the job's `JobSubmitted` record at stream sequence
    /// `seq`; `None` for any other record.
    pub fn submitted(seq: u64, r: &StoryRecord) -> Option<Self> {
        let StoryEvent::Job(JobEvent::JobSubmitted(s)) = &r.event else {
            return None;
        };
        let JobSubmitted {
            workflow_key,
            client_id,
            input,
            priority,
            timeout_seconds,
            callback_url,
            callback_url_sealed,
            metadata,
            retry_of: _,
        } = s.clone();
        let mut v = JobView {
            job_id: r.job_id.clone(),
            workflow_key,
            client_id,
            priority: priority.clamp(1, 10),
            timeout_seconds: timeout_seconds.max(1),
            inputs: input,
            metadata,
            callback_url,
            callback_url_sealed,
            submitted_seq: seq,
            submitted_at: r.at,
            status: JobStatus::Pending,
            started_at: None,
            ended_at: None,
            steps: BTreeMap::new(),
            outputs: Value::Null,
            error_code: None,
            error_message: None,
            approval: ApprovalState::None,
            callback_recorded: false,
            audit: Vec::new(),
            version: r.aggregate_version,
            approval_version: 0,
            traceparent: None,
        };
        v.line(r, None, json!({"client_id": r.actor.client_id}), None);
        Some(v)
    }

    fn line(
        &mut self,
        r: &StoryRecord,
        node: Option<String>,
        details: Value,
        duration_ms: Option<u64>,
    ) {
        self.audit.push(AuditLine {
            timestamp: r.occurred_at.clone(),
            action: r.event_type.clone(),
            node_name: node,
            details,
            duration_ms,
        });
    }

    /// Folds one later record of this job or of its approval. Records
    /// already folded (by aggregate version) are ignored, so a replay
    /// overlapping what is known changes nothing.
    pub fn apply(&mut self, r: &StoryRecord) -> Result<(), FoldError> {
        match &r.event {
            StoryEvent::Approval(_) if r.aggregate_version <= self.approval_version => Ok(()),
            StoryEvent::Approval(e) => {
                self.apply_approval(r, e);
                self.approval_version = r.aggregate_version;
                Ok(())
            }
            StoryEvent::Job(_) if r.aggregate_version <= self.version => Ok(()),
            StoryEvent::Job(e) => {
                self.apply_job(r, e)?;
                self.version = r.aggregate_version;
                Ok(())
            }
        }
    }

    fn apply_approval(&mut self, r: &StoryRecord, e: &ApprovalEvent) {
        let (decided_by, reason) = match e {
            ApprovalEvent::ApprovalRequested(a) => {
                self.approval = ApprovalState::Pending {
                    expires_at: a.expires_at,
                };
                (None, a.reason.clone())
            }
            ApprovalEvent::ApprovalGranted(d) => {
                self.approval = ApprovalState::Granted {
                    by: d.decided_by.clone(),
                };
                (Some(d.decided_by.clone()), Some(d.reason.clone()))
            }
            ApprovalEvent::ApprovalRejected(d) => {
                self.approval = ApprovalState::Rejected {
                    by: d.decided_by.clone(),
                    reason: d.reason.clone(),
                };
                (Some(d.decided_by.clone()), Some(d.reason.clone()))
            }
            ApprovalEvent::ApprovalExpired(_) => {
                self.approval = ApprovalState::Expired;
                (None, None)
            }
        };
        let details = json!({"decided_by": decided_by, "reason": reason});
        self.line(r, None, details, None);
    }

    fn apply_job(&mut self, r: &StoryRecord, e: &JobEvent) -> Result<(), FoldError> {
        match e {
            // a second submission cannot be committed; nothing to fold
            JobEvent::JobSubmitted(_) => {}
            // which instance drives the job is not part of its story
            JobEvent::JobHandlerChanged(_) => {}
            JobEvent::JobStarted(_) => {
                self.status = JobStatus::Running;
                self.started_at = Some(r.at);
                self.line(r, None, Value::Null, None);
            }
            JobEvent::StepAttemptStarted(a) => {
                let sv = self.steps.entry(a.step.clone()).or_default();
                sv.started = sv.started.max(a.attempt);
                sv.retry = None;
                let details = json!({"attempt": a.attempt});
                self.line(r, Some(a.step.clone()), details, None);
            }
            JobEvent::StepResultRecorded(s) => {
                let result = AttemptResult {
                    status: s.status,
                    output: s.output.clone(),
                    error_code: s.error_code.clone(),
                    error_message: s.error_message.clone(),
                    duration_ms: s.duration_ms,
                };
                let mut details = json!({
                    "attempt": s.attempt,
                    "status": s.status,
                    "error_code": s.error_code,
                    "error_message": s.error_message,
                });
                if let Some(id) = &s.n8n_execution_id {
                    details["n8n_execution_id"] = json!(id);
                }
                let sv = self.steps.entry(s.step.clone()).or_default();
                sv.started = sv.started.max(s.attempt);
                sv.results.insert(s.attempt, result);
                if r.actor.client_id != super::HANDLER_ACTOR {
                    sv.posted.insert(s.attempt);
                }
                self.line(r, Some(s.step.clone()), details, Some(s.duration_ms));
            }
            JobEvent::StepRetryScheduled(s) => {
                let due = i64::try_from(s.delay_ms)
                    .ok()
                    .and_then(|ms| r.at.checked_add_signed(chrono::Duration::milliseconds(ms)))
                    .ok_or_else(|| FoldError::RetryOutOfRange {
                        step: s.step.clone(),
                        at: r.at,
                        delay_ms: s.delay_ms,
                    })?;
                self.steps.entry(s.step.clone()).or_default().retry = Some((s.attempt, due));
                let details = json!({"attempt": s.attempt, "delay_ms": s.delay_ms});
                self.line(r, Some(s.step.clone()), details, None);
            }
            JobEvent::JobCompleted(c) => {
                self.status = JobStatus::Completed;
                self.ended_at = Some(r.at);
                self.outputs = c.outputs.clone();
                self.line(r, None, Value::Null, None);
            }
            JobEvent::JobFailed(f) => {
                self.status = JobStatus::Failed;
                self.ended_at = Some(r.at);
                self.error_code = Some(f.error_code.clone());
                self.error_message = Some(f.error_message.clone());
                let details =
                    json!({"error_code": self.error_code, "error_message": self.error_message});
                self.line(r, None, details, None);
            }
            JobEvent::JobCancelled(c) => {
                self.status = JobStatus::Cancelled;
                self.ended_at = Some(r.at);
                self.error_code = Some("cancelled".into());
                self.error_message = Some(c.reason.clone());
                let details = json!({"reason": self.error_message, "by": r.actor.client_id});
                self.line(r, None, details, None);
            }
            JobEvent::CallbackDelivered(c) => {
                self.callback_recorded = true;
                let details = json!({"attempts": c.attempts, "error_message": null});
                self.line(r, None, details, None);
            }
            JobEvent::CallbackFailed(c) => {
                self.callback_recorded = true;
                let details = json!({"attempts": c.attempts, "error_message": c.error_message});
                self.line(r, None, details, None);
            }
            // the job stays as it ended; its timeline names the new job
            JobEvent::JobRetried(e) => {
                let details = json!({"retry_job_id": e.retry_job_id, "by": r.actor.client_id});
                self.line(r, None, details, None);
            }
        }
        Ok(())
    }

    /// True while the handler still owes this job an action.
    pub fn needs_handler(&self) -> bool {
        !self.status.is_final() || (self.callback_url.is_some() && !self.callback_recorded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::job::events::StepRetryScheduled;

    fn record(version: u64, event: JobEvent) -> StoryRecord {
        StoryRecord {
            job_id: "j".into(),
            aggregate_version: version,
            event_type: "x".into(),
            occurred_at: "2026-12-01T00:00:00.000000Z".into(),
            at: "2026-12-01T00:00:00Z".parse().expect("a time"),
            actor: Actor::default(),
            event: StoryEvent::Job(event),
        }
    }

    #[test]
    fn a_retry_past_the_end_of_time_is_a_fold_error_not_a_panic() {
        let submitted = JobEvent::JobSubmitted(JobSubmitted {
            workflow_key: "w".into(),
            client_id: "c".into(),
            input: Value::Null,
            priority: 5,
            timeout_seconds: 60,
            callback_url: None,
            callback_url_sealed: None,
            metadata: Value::Null,
            retry_of: None,
        });
        let v = JobView::submitted(1, &record(1, submitted)).expect("a submission");
        for delay_ms in [u64::MAX, i64::MAX as u64, 8_400_000_000_000_000] {
            let retry = JobEvent::StepRetryScheduled(StepRetryScheduled {
                workflow_key: "w".into(),
                step: "s".into(),
                attempt: 2,
                delay_ms,
            });
            let e = v.clone().apply(&record(2, retry)).unwrap_err();
            assert!(matches!(e, FoldError::RetryOutOfRange { .. }), "{e}");
        }
    }
}
