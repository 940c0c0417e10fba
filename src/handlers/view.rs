//! What the handler knows of one job, folded from its event records (job
//! events and the events of its approval). Unlike the aggregate, the view
//! keeps times (`occurred_at`), inputs and outputs: what the handler needs
//! to resume a job after a restart and to write its callback.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::commands::job::JobStatus;
use crate::events::envelope::EventRecord;

#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub status: String,
    pub output: Value,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepView {
    /// Last attempt started (0: none).
    pub started: u32,
    pub results: BTreeMap<u32, AttemptResult>,
    /// A retry of attempt `.0` is due at `.1`.
    pub retry: Option<(u32, DateTime<Utc>)>,
}

impl StepView {
    pub fn succeeded(&self) -> Option<&AttemptResult> {
        self.results.values().find(|r| r.status == "succeeded")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApprovalState {
    None,
    Pending { expires_at: DateTime<Utc> },
    Granted { by: String },
    Rejected { by: String, reason: String },
    Expired,
}

/// One line of the callback's `audit` array (seed 002).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    pub timestamp: String,
    pub action: String,
    pub node_name: Option<String>,
    pub details: Value,
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job_id: String,
    pub workflow_key: String,
    pub client_id: String,
    pub priority: u8,
    pub timeout_seconds: u32,
    pub inputs: Value,
    pub metadata: Value,
    pub callback_url: Option<String>,
    pub submitted_seq: u64,
    pub submitted_at: DateTime<Utc>,
    pub status: JobStatus,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub steps: BTreeMap<String, StepView>,
    pub outputs: Value,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub approval: ApprovalState,
    pub callback_recorded: bool,
    pub audit: Vec<AuditLine>,
    /// Last job aggregate version folded in.
    pub version: u64,
}

fn time(r: &EventRecord) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&r.occurred_at)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|_| Utc::now())
}

fn s(d: &Value, k: &str) -> Option<String> {
    d.get(k).and_then(Value::as_str).map(str::to_string)
}

fn n(d: &Value, k: &str) -> u64 {
    d.get(k).and_then(Value::as_u64).unwrap_or(0)
}

impl JobView {
    /// A view from the job's `JobSubmitted` record at stream sequence `seq`.
    pub fn submitted(seq: u64, r: &EventRecord) -> Option<Self> {
        if r.aggregate_type != "job" || r.event_type != "JobSubmitted" {
            return None;
        }
        let d = &r.data;
        let mut v = JobView {
            job_id: r.aggregate_id.clone(),
            workflow_key: s(d, "workflow_key")?,
            client_id: s(d, "client_id")?,
            priority: n(d, "priority").clamp(1, 10) as u8,
            timeout_seconds: n(d, "timeout_seconds").max(1) as u32,
            inputs: d.get("input").cloned().unwrap_or(Value::Null),
            metadata: d.get("metadata").cloned().unwrap_or(Value::Null),
            callback_url: s(d, "callback_url"),
            submitted_seq: seq,
            submitted_at: time(r),
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
        };
        v.line(r, None, json!({"client_id": r.actor.client_id}), None);
        Some(v)
    }

    fn line(
        &mut self,
        r: &EventRecord,
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
    pub fn apply(&mut self, r: &EventRecord) {
        let d = &r.data;
        if r.aggregate_type == "approval" {
            match r.event_type.as_str() {
                "ApprovalRequested" => {
                    if let Some(t) =
                        s(d, "expires_at").and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                    {
                        self.approval = ApprovalState::Pending {
                            expires_at: t.with_timezone(&Utc),
                        };
                    }
                }
                "ApprovalGranted" => {
                    self.approval = ApprovalState::Granted {
                        by: s(d, "decided_by").unwrap_or_default(),
                    }
                }
                "ApprovalRejected" => {
                    self.approval = ApprovalState::Rejected {
                        by: s(d, "decided_by").unwrap_or_default(),
                        reason: s(d, "reason").unwrap_or_default(),
                    }
                }
                "ApprovalExpired" => self.approval = ApprovalState::Expired,
                _ => return,
            }
            let details = json!({"decided_by": s(d, "decided_by"), "reason": s(d, "reason")});
            self.line(r, None, details, None);
            return;
        }
        if r.aggregate_type != "job" || r.aggregate_version <= self.version {
            return;
        }
        self.version = r.aggregate_version;
        let at = time(r);
        let step = s(d, "step");
        match r.event_type.as_str() {
            "JobStarted" => {
                self.status = JobStatus::Running;
                self.started_at = Some(at);
                self.line(r, None, Value::Null, None);
            }
            "StepAttemptStarted" => {
                let attempt = n(d, "attempt") as u32;
                if let Some(name) = &step {
                    let sv = self.steps.entry(name.clone()).or_default();
                    sv.started = sv.started.max(attempt);
                    sv.retry = None;
                }
                self.line(r, step, json!({"attempt": attempt}), None);
            }
            "StepResultRecorded" => {
                let attempt = n(d, "attempt") as u32;
                let result = AttemptResult {
                    status: s(d, "status").unwrap_or_default(),
                    output: d.get("output").cloned().unwrap_or(Value::Null),
                    error_code: s(d, "error_code"),
                    error_message: s(d, "error_message"),
                    duration_ms: n(d, "duration_ms"),
                };
                let details = json!({
                    "attempt": attempt,
                    "status": result.status,
                    "error_code": result.error_code,
                    "error_message": result.error_message,
                });
                let duration = result.duration_ms;
                if let Some(name) = &step {
                    let sv = self.steps.entry(name.clone()).or_default();
                    sv.started = sv.started.max(attempt);
                    sv.results.insert(attempt, result);
                }
                self.line(r, step, details, Some(duration));
            }
            "StepRetryScheduled" => {
                let attempt = n(d, "attempt") as u32;
                let delay = n(d, "delay_ms");
                if let Some(name) = &step {
                    let due = at + chrono::Duration::milliseconds(delay as i64);
                    self.steps.entry(name.clone()).or_default().retry = Some((attempt, due));
                }
                self.line(
                    r,
                    step,
                    json!({"attempt": attempt, "delay_ms": delay}),
                    None,
                );
            }
            "JobCompleted" => {
                self.status = JobStatus::Completed;
                self.ended_at = Some(at);
                self.outputs = d.get("outputs").cloned().unwrap_or(Value::Null);
                self.line(r, None, Value::Null, None);
            }
            "JobFailed" => {
                self.status = JobStatus::Failed;
                self.ended_at = Some(at);
                self.error_code = s(d, "error_code");
                self.error_message = s(d, "error_message");
                let details =
                    json!({"error_code": self.error_code, "error_message": self.error_message});
                self.line(r, None, details, None);
            }
            "JobCancelled" => {
                self.status = JobStatus::Cancelled;
                self.ended_at = Some(at);
                self.error_code = Some("cancelled".into());
                self.error_message = s(d, "reason");
                let details = json!({"reason": self.error_message, "by": r.actor.client_id});
                self.line(r, None, details, None);
            }
            "CallbackDelivered" | "CallbackFailed" => {
                self.callback_recorded = true;
                let details =
                    json!({"attempts": n(d, "attempts"), "error_message": s(d, "error_message")});
                self.line(r, None, details, None);
            }
            _ => {}
        }
    }

    /// True while the handler still owes this job an action.
    pub fn needs_handler(&self) -> bool {
        !self.status.is_final() || (self.callback_url.is_some() && !self.callback_recorded)
    }
}
