//! The job driver: one task per job the handler owes an action. It takes
//! the job through its approval gate, waits for a dispatch slot (by
//! priority), runs every step in parallel with retries, ends the job by
//! the workflow's success policy, then delivers the signed callback.
//!
//! Everything it does is a command with an id derived from the job, the
//! step and the attempt, so a driver restarted after a crash repeats no
//! event: a repeated command answers its first receipt. Outgoing calls
//! carry the same `Idempotency-Key` when an attempt is sent again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use chrono::Utc;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::bus::ids;
use crate::commands::approval::{ApprovalCommand, ApprovalError, Decide, RequestApproval};
use crate::commands::job::events::{JobEvent, StepStatus};
use crate::commands::job::{
    CompleteJob, FailJob, JobCommand, JobError, JobStatus, NewAttempt, RecordCallback,
    RecordStepResult, ScheduleRetry, StartAttempt, StartJob,
};
use crate::commands::limits::{MAX_ATTEMPTS, MAX_RETRY_DELAY_MS};
use crate::commands::registry::{StepDefinition, StepKind, WorkflowDefinition};
use crate::commands::workflow::{WorkflowCommand, WorkflowError};
use crate::events::store::ExecuteError;
use crate::handlers::lease;
use crate::handlers::peer::{self, CallOutcome, StepCall};
use crate::handlers::step_secrets;
use crate::handlers::view::{
    ApprovalState, AttemptResult, JobView, StepView, StoryEvent, StoryRecord,
};
use crate::handlers::{Ctx, FencedError, LoadError};

/// The events the manager forwards to a job's driver.
pub type Records = mpsc::UnboundedReceiver<Arc<StoryRecord>>;

/// Why a driver stopped before the job ended; the manager restarts it.
#[derive(Debug)]
pub enum Halt {
    /// The job changed under the driver (cancelled, or ended elsewhere).
    Superseded,
    /// This instance lost the job's partition: another instance drives it.
    Released,
    /// The job's state must be re-read from the log; the driver starts over.
    Reload,
    /// The job cannot go on without an operator (an event it cannot fold,
    /// a result it cannot record); the reason says why.
    Park(String),
}

/// How a step ended, as far as this run knows.
#[derive(Debug, Clone)]
enum StepEnd {
    /// Its final result is in the log already.
    Recorded {
        succeeded: bool,
        output: Value,
        summary: String,
    },
    /// Its final result still has to be written.
    Unrecorded(RecordStepResult),
}

impl StepEnd {
    fn succeeded(&self) -> bool {
        match self {
            StepEnd::Recorded { succeeded, .. } => *succeeded,
            StepEnd::Unrecorded(r) => r.status == StepStatus::Succeeded,
        }
    }
}

fn summary(r: &AttemptResult) -> String {
    describe(&r.error_code, &r.error_message, r.status.as_str())
}

/// "code: message", or what of it is there, else the status.
fn describe(code: &Option<String>, message: &Option<String>, status: &str) -> String {
    match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => status.to_string(),
    }
}

/// Drives one job until the handler owes it nothing more. `folded` is the
/// job's view as of the records `rx` continues from (the manager's fold);
/// without it, or after a reload, the view is read from the log. Returns
/// why the job is parked, if it is.
pub async fn drive(
    ctx: Arc<Ctx>,
    job_id: String,
    mut folded: Option<JobView>,
    mut rx: Records,
) -> Option<String> {
    let mut reloads: u32 = 0;
    loop {
        let loaded = match folded.take() {
            Some(v) => Ok(Some(v)),
            None => ctx.load_view(&job_id).await,
        };
        let view = match loaded {
            Ok(Some(v)) => v,
            Ok(None) => return None,
            Err(LoadError::Fold { seq, reason }) => {
                return Some(format!("stream sequence {seq}: {reason}"))
            }
            Err(e) => {
                tracing::warn!(job_id, error = %e, "cannot read the job; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if !view.status.is_final() {
            match advance(&ctx, view, &mut rx).await {
                Err(Halt::Reload) => {
                    // back off when the job keeps changing under us
                    reloads = reloads.saturating_add(1);
                    let wait = 50 * u64::from(reloads.min(100));
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(Halt::Park(reason)) => return Some(reason),
                Err(Halt::Released) => return None,
                Ok(()) | Err(Halt::Superseded) => {}
            }
            continue;
        }
        if view.callback_url.is_some() && !view.callback_recorded {
            // a partition being given away waits for a delivery under way;
            // without the partition the driver ends, not parked (None)
            let _effect = ctx.leases.effect(&job_id).await?;
            super::delivery::deliver(&ctx, &view).await;
        }
        return None;
    }
}

/// Folds a forwarded record into the driver's view; a record it cannot
/// fold parks the job.
fn fold(view: &mut JobView, r: &StoryRecord) -> Result<(), Halt> {
    view.apply(r)
        .map_err(|e| Halt::Park(format!("cannot fold {}: {e}", r.event_type)))
}

/// Moves a job that has not ended as far as it goes; returns when it ended
/// or when its state has to be re-read.
async fn advance(ctx: &Arc<Ctx>, mut view: JobView, rx: &mut Records) -> Result<(), Halt> {
    let Some(def) = ctx.registry.current().get(&view.workflow_key).cloned() else {
        let msg = format!(
            "workflow {:?} is no longer in the registry; the job cannot run",
            view.workflow_key
        );
        return fail(ctx, &view, "unknown_workflow", msg, vec![]).await;
    };
    if view.status == JobStatus::Pending && def.requires_approval {
        approval_gate(ctx, &mut view, &def, rx).await?;
    }
    let queued = Instant::now();
    let permit = tokio::select! {
        p = ctx.dispatcher.admit(view.priority, view.submitted_seq) => p,
        r = wait_cancelled(rx, &mut view) => return r,
    };
    metrics::histogram!("flowledger_handler_queue_seconds").record(queued.elapsed().as_secs_f64());
    // the steps' calls are effects: a partition being given away waits
    // for them to end (up to its drain deadline)
    let Some(effect) = ctx.leases.effect(&view.job_id).await else {
        return Err(Halt::Released);
    };
    let r = run(ctx, &mut view, &def, rx).await;
    drop(effect);
    drop(permit);
    r
}

/// Resolves when a record says the job was cancelled.
async fn wait_cancelled(rx: &mut Records, view: &mut JobView) -> Result<(), Halt> {
    while let Some(r) = rx.recv().await {
        fold(view, &r)?;
        if view.status.is_final() {
            return Err(Halt::Superseded);
        }
    }
    // the manager is shutting down
    std::future::pending().await
}

async fn approval_gate(
    ctx: &Ctx,
    view: &mut JobView,
    def: &WorkflowDefinition,
    rx: &mut Records,
) -> Result<(), Halt> {
    let job_id = view.job_id.clone();
    loop {
        match view.approval.clone() {
            ApprovalState::None => {
                let expires_at = view.submitted_at
                    + chrono::Duration::seconds(def.approval_timeout_seconds as i64);
                let request = ApprovalCommand::Request {
                    request: RequestApproval {
                        job_id: job_id.clone(),
                        workflow_key: view.workflow_key.clone(),
                        requested_by: view.client_id.clone(),
                        reason: Some(format!("workflow {} requires approval", view.workflow_key)),
                        expires_at,
                    },
                    at: Utc::now().min(expires_at - chrono::Duration::milliseconds(1)),
                };
                match ctx
                    .approval(&job_id, request, &ids::approval_request(&job_id))
                    .await
                {
                    Ok(()) | Err(ExecuteError::Rejected(ApprovalError::AlreadyExists(_))) => {}
                    Err(e) => return retry_later(&job_id, "request the approval", e).await,
                }
                view.approval = ApprovalState::Pending { expires_at };
                auto_approve(ctx, view, def).await?;
            }
            ApprovalState::Pending { expires_at } => {
                let wait = (expires_at - Utc::now()).to_std().unwrap_or_default();
                tokio::select! {
                    // a closed channel disables this branch: the expiry still fires
                    Some(r) = rx.recv() => fold(view, &r)?,
                    _ = tokio::time::sleep(wait) => expire(ctx, view, expires_at).await?,
                }
            }
            ApprovalState::Granted { .. } => return Ok(()),
            ApprovalState::Rejected { by, reason } => {
                let msg = format!("approval rejected by {by}: {reason}");
                fail(ctx, view, "approval_rejected", msg, vec![]).await?;
                return Err(Halt::Superseded);
            }
            ApprovalState::Expired => {
                let msg = format!(
                    "approval expired after {} s without a decision",
                    def.approval_timeout_seconds
                );
                fail(ctx, view, "approval_expired", msg, vec![]).await?;
                return Err(Halt::Superseded);
            }
        }
        if view.status.is_final() {
            return Err(Halt::Superseded);
        }
    }
}

/// Expires the pending approval once it is due.
async fn expire(
    ctx: &Ctx,
    view: &mut JobView,
    expires_at: chrono::DateTime<Utc>,
) -> Result<(), Halt> {
    let job_id = &view.job_id;
    let cmd = ApprovalCommand::Expire {
        at: Utc::now().max(expires_at),
    };
    match ctx
        .approval(job_id, cmd, &ids::approval_expire(job_id))
        .await
    {
        Ok(()) => view.approval = ApprovalState::Expired,
        // decided meanwhile: the record is on its way
        Err(ExecuteError::Rejected(_)) => return Err(Halt::Reload),
        Err(e) => return retry_later(job_id, "expire the approval", e).await,
    }
    Ok(())
}

/// Approves without a human when the workflow's rule allows it: the job's
/// `metadata.confidence` reaches the threshold and the day's count is
/// below the limit (counted on the workflow aggregate, so it holds across
/// restarts).
async fn auto_approve(ctx: &Ctx, view: &mut JobView, def: &WorkflowDefinition) -> Result<(), Halt> {
    let Some(rule) = &def.auto_approval else {
        return Ok(());
    };
    let Some(confidence) = view.metadata.get("confidence").and_then(Value::as_f64) else {
        return Ok(());
    };
    if confidence < rule.min_confidence {
        return Ok(());
    }
    let job_id = view.job_id.clone();
    let day = Utc::now().date_naive();
    let count = WorkflowCommand::CountAutoApproval {
        workflow_key: view.workflow_key.clone(),
        job_id: job_id.clone(),
        day,
        limit: rule.daily_limit,
    };
    let meta = ctx.meta(&ids::auto_approval_count(&job_id), &job_id);
    let used = match ctx.bus.workflow(&view.workflow_key, count, &meta).await {
        Ok(_) => true,
        Err(ExecuteError::Rejected(WorkflowError::DailyLimitReached { day, limit })) => {
            tracing::info!(job_id, %day, limit, "auto-approval limit reached; waiting for a human");
            false
        }
        Err(e) => return retry_later(&job_id, "count the auto-approval", e).await,
    };
    if !used {
        return Ok(());
    }
    let approve = ApprovalCommand::Approve {
        decision: Decide {
            decided_by: "auto-approval".into(),
            reason: format!(
                "confidence {confidence} >= {} (daily limit {})",
                rule.min_confidence, rule.daily_limit
            ),
        },
        at: Utc::now(),
    };
    match ctx
        .approval(&job_id, approve, &ids::auto_approve(&job_id))
        .await
    {
        Ok(()) => {
            view.approval = ApprovalState::Granted {
                by: "auto-approval".into(),
            };
            Ok(())
        }
        // a human was faster, or it expired: the record is on its way
        Err(ExecuteError::Rejected(_)) => Err(Halt::Reload),
        Err(e) => retry_later(&job_id, "auto-approve", e).await,
    }
}

async fn retry_later<T, E: std::fmt::Display>(job_id: &str, what: &str, e: E) -> Result<T, Halt> {
    tracing::warn!(job_id, error = %e, "cannot {what}; retrying");
    tokio::time::sleep(Duration::from_secs(1)).await;
    Err(Halt::Reload)
}

async fn fail(
    ctx: &Ctx,
    view: &JobView,
    code: &str,
    message: String,
    step_results: Vec<RecordStepResult>,
) -> Result<(), Halt> {
    let job_id = &view.job_id;
    let cmd = JobCommand::Fail(FailJob {
        error_code: code.into(),
        error_message: message,
        step_results,
    });
    job_result(ctx, job_id, cmd, &ids::job_end(job_id)).await?;
    job_ended(view, "failed");
    Ok(())
}

/// Counts a job this instance ended.
fn job_ended(view: &JobView, outcome: &'static str) {
    metrics::counter!("flowledger_jobs_ended_total",
        "workflow" => view.workflow_key.clone(), "outcome" => outcome)
    .increment(1);
}

/// Runs a job command whose failure means the job moved on without us.
async fn job_result(ctx: &Ctx, job_id: &str, cmd: JobCommand, id: &str) -> Result<(), Halt> {
    let e = match ctx.job(job_id, cmd, id).await {
        Ok(()) => return Ok(()),
        Err(FencedError::NotHeld) => return Err(Halt::Released),
        Err(FencedError::Execute(e)) => e,
    };
    match e {
        ExecuteError::Rejected(JobError::InvalidTransition { .. }) => Err(Halt::Superseded),
        ExecuteError::Rejected(e) => {
            tracing::info!(job_id, error = %e, "job changed meanwhile; re-reading it");
            Err(Halt::Reload)
        }
        // the same command would be refused again: an operator must look
        e @ (ExecuteError::TooLarge(_) | ExecuteError::Unstorable) => {
            Err(Halt::Park(format!("cannot record the job's progress: {e}")))
        }
        e => retry_later(job_id, "record the job's progress", e).await,
    }
}

/// Where a step stands at the start of a run, from the view.
fn settled(sv: &StepView, step: &StepDefinition) -> Option<StepEnd> {
    if let Some(r) = sv.succeeded() {
        return Some(StepEnd::Recorded {
            succeeded: true,
            output: r.output.clone(),
            summary: summary(r),
        });
    }
    let last = sv.results.get(&sv.started)?;
    let scheduled = matches!(sv.retry, Some((next, _)) if next == sv.started + 1);
    if (scheduled || retry_owed(sv, step)) && sv.started < step.max_attempts {
        return None;
    }
    Some(StepEnd::Recorded {
        succeeded: false,
        output: Value::Null,
        summary: summary(last),
    })
}

/// The step's latest attempt failed by a result a peer posted (an n8n
/// callback's `failed` or `timed_out`), no retry is scheduled after it and
/// the step has attempts left: the handler retries it by the step's policy.
fn retry_owed(sv: &StepView, step: &StepDefinition) -> bool {
    let failed = sv
        .results
        .get(&sv.started)
        .is_some_and(|r| r.status != StepStatus::Succeeded);
    let scheduled = matches!(sv.retry, Some((next, _)) if next == sv.started + 1);
    failed
        && sv.posted.contains(&sv.started)
        && !scheduled
        && sv.started < step.max_attempts.min(MAX_ATTEMPTS)
}

/// Schedules the retry of `attempt`, whose failure a peer posted, after the
/// step's backoff; returns the backoff to wait.
async fn schedule_retry(
    ctx: &Ctx,
    job_id: &str,
    step: &StepDefinition,
    attempt: u32,
) -> Result<Duration, Halt> {
    let delay = ctx
        .config
        .retry
        .with_base_ms(step.backoff_ms)
        .delay(attempt);
    let delay_ms = u64::try_from(delay.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_RETRY_DELAY_MS);
    let cmd = JobCommand::ScheduleRetry(ScheduleRetry {
        step: step.name.clone(),
        attempt,
        delay_ms,
    });
    let id = ids::attempt_retry(job_id, &step.name, attempt);
    job_result(ctx, job_id, cmd, &id).await?;
    Ok(Duration::from_millis(delay_ms))
}

async fn run(
    ctx: &Arc<Ctx>,
    view: &mut JobView,
    def: &WorkflowDefinition,
    rx: &mut Records,
) -> Result<(), Halt> {
    let job_id = view.job_id.clone();
    if view.status == JobStatus::Pending {
        let attempts = def
            .steps
            .iter()
            .map(|s| NewAttempt {
                step: s.name.clone(),
                idempotency_key: ids::idempotency_key(&job_id, &s.name, 1),
            })
            .collect();
        job_result(
            ctx,
            &job_id,
            JobCommand::Start(StartJob { attempts }),
            &ids::job_start(&job_id),
        )
        .await?;
        view.status = JobStatus::Running;
        view.started_at = Some(Utc::now());
        for s in &def.steps {
            view.steps.entry(s.name.clone()).or_default().started = 1;
        }
    }
    let started_at = view.started_at.unwrap_or_else(Utc::now);
    let deadline = started_at + chrono::Duration::seconds(view.timeout_seconds as i64);
    let until_deadline = (deadline - Utc::now()).to_std().unwrap_or_default();

    let mut ends: BTreeMap<String, StepEnd> = BTreeMap::new();
    let mut notices: HashMap<String, mpsc::UnboundedSender<(u32, AttemptResult)>> = HashMap::new();
    // Each step runs in its own task, polled by the runtime whatever the
    // driver awaits: a step suspended inside a store write (holding the
    // job's lock) always finishes it, so the driver's own writes and its
    // deadline never wait on a future nobody polls. Dropping the set aborts
    // the steps.
    let mut tasks = tokio::task::JoinSet::new();
    for step in &def.steps {
        let sv = view.steps.get(&step.name).cloned().unwrap_or_default();
        if let Some(end) = settled(&sv, step) {
            ends.insert(step.name.clone(), end);
            continue;
        }
        let (tx, notice_rx) = mpsc::unbounded_channel();
        notices.insert(step.name.clone(), tx);
        let job = JobRef {
            id: job_id.clone(),
            workflow_key: view.workflow_key.clone(),
            inputs: view.inputs.clone(),
        };
        let (step, ctx) = (step.clone(), ctx.clone());
        // a task of its own, in the job's span
        tasks.spawn(
            async move {
                let end = run_step(&ctx, &job, &step, sv, notice_rx).await;
                (step.name.clone(), end)
            }
            .instrument(tracing::Span::current()),
        );
    }
    let total = def.steps.len();
    let needed = def.success.needed(total);
    let sleep = tokio::time::sleep(until_deadline);
    tokio::pin!(sleep);
    let mut records_open = true;
    // steps that stopped before a new call or retry wait (their partition
    // is being given away, the instance drains): still open, and the
    // others' calls in flight end and are recorded before the driver stops
    let mut released = false;
    loop {
        let succeeded = ends.values().filter(|e| e.succeeded()).count();
        let open = total - ends.len();
        if open == 0 || succeeded + open < needed {
            break;
        }
        if released && tasks.is_empty() {
            return Err(Halt::Released);
        }
        tokio::select! {
            Some(joined) = tasks.join_next() => {
                let (name, end) = joined.map_err(|e| {
                    Halt::Park(format!("a step's task ended abnormally: {e}"))
                })?;
                let end = match end {
                    Err(Halt::Released) => {
                        released = true;
                        continue;
                    }
                    end => end?,
                };
                let end = step_ended(ctx, &job_id, end, succeeded, open, needed).await?;
                ends.insert(name, end);
            }
            r = rx.recv(), if records_open => match r {
                Some(r) => while_running(view, &r, &notices)?,
                // the manager stopped forwarding: the steps and the
                // deadline still decide the job
                None => records_open = false,
            },
            _ = &mut sleep => {
                drop(tasks);
                return timed_out(ctx, view, def, &mut ends).await;
            }
        }
    }
    drop(tasks); // aborts steps no longer needed (early failure)
    let succeeded: Vec<&String> = ends
        .iter()
        .filter(|(_, e)| e.succeeded())
        .map(|(n, _)| n)
        .collect();
    let failures: Vec<String> = ends
        .iter()
        .filter(|(_, e)| !e.succeeded())
        .map(|(n, e)| match e {
            StepEnd::Recorded { summary, .. } => format!("{n} ({summary})"),
            StepEnd::Unrecorded(r) => format!("{n} ({})", result_summary(r)),
        })
        .collect();
    let ok = succeeded.len() >= needed;
    let mut outputs = Map::new();
    for (name, end) in &ends {
        match end {
            StepEnd::Recorded {
                succeeded: true,
                output,
                ..
            } => {
                outputs.insert(name.clone(), output.clone());
            }
            StepEnd::Unrecorded(r) if r.status == StepStatus::Succeeded => {
                outputs.insert(name.clone(), r.output.clone());
            }
            _ => {}
        }
    }
    let n_ok = succeeded.len();
    let step_results = unrecorded(&mut ends);
    if ok {
        let cmd = JobCommand::Complete(CompleteJob {
            outputs: Value::Object(outputs),
            step_results,
        });
        job_result(ctx, &job_id, cmd, &ids::job_end(&job_id)).await?;
        job_ended(view, "completed");
        Ok(())
    } else {
        let msg = format!(
            "{n_ok} of {total} steps succeeded; {}. Failed: {}",
            def.success.describe(),
            failures.join(", ")
        );
        fail(ctx, view, "steps_failed", msg, step_results).await
    }
}

/// A step's end during a run in which `succeeded` steps have succeeded so
/// far and `open` steps (this one included) had not ended. It is recorded
/// now unless it decides the job, whose end then records it.
async fn step_ended(
    ctx: &Ctx,
    job_id: &str,
    end: StepEnd,
    succeeded: usize,
    open: usize,
    needed: usize,
) -> Result<StepEnd, Halt> {
    let succeeded = succeeded + usize::from(end.succeeded());
    let decided = open == 1 || succeeded + open - 1 < needed;
    let end = match end {
        StepEnd::Unrecorded(r) if !decided => {
            let id = ids::attempt_result(job_id, &r.step, r.attempt);
            let (ok, output, s) = (
                r.status == StepStatus::Succeeded,
                r.output.clone(),
                result_summary(&r),
            );
            job_result(ctx, job_id, JobCommand::RecordStepResult(r), &id).await?;
            StepEnd::Recorded {
                succeeded: ok,
                output,
                summary: s,
            }
        }
        other => other,
    };
    Ok(end)
}

/// Folds a record forwarded while the steps run, and hands a step result
/// recorded by someone else to its step.
fn while_running(
    view: &mut JobView,
    r: &StoryRecord,
    notices: &HashMap<String, mpsc::UnboundedSender<(u32, AttemptResult)>>,
) -> Result<(), Halt> {
    fold(view, r)?;
    if view.status.is_final() {
        return Err(Halt::Superseded);
    }
    if r.actor.client_id != super::HANDLER_ACTOR {
        forward(r, notices);
    }
    Ok(())
}

/// Fails a job whose deadline passed with steps still running.
async fn timed_out(
    ctx: &Ctx,
    view: &JobView,
    def: &WorkflowDefinition,
    ends: &mut BTreeMap<String, StepEnd>,
) -> Result<(), Halt> {
    let pending: Vec<_> = def
        .steps
        .iter()
        .map(|s| s.name.clone())
        .filter(|n| !ends.contains_key(n))
        .collect();
    let msg = format!(
        "job timed out after {} s (timeout_seconds) with steps still running: {}",
        view.timeout_seconds,
        pending.join(", ")
    );
    let unrecorded = unrecorded(ends);
    fail(ctx, view, "job_timeout", msg, unrecorded).await?;
    Ok(())
}

fn unrecorded(ends: &mut BTreeMap<String, StepEnd>) -> Vec<RecordStepResult> {
    ends.values()
        .filter_map(|e| match e {
            StepEnd::Unrecorded(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn result_summary(r: &RecordStepResult) -> String {
    describe(&r.error_code, &r.error_message, r.status.as_str())
}

/// Hands a step result recorded by someone else (n8n) to its step's task.
fn forward(
    r: &StoryRecord,
    notices: &HashMap<String, mpsc::UnboundedSender<(u32, AttemptResult)>>,
) {
    let StoryEvent::Job(JobEvent::StepResultRecorded(s)) = &r.event else {
        return;
    };
    if let Some(tx) = notices.get(&s.step) {
        let _ = tx.send((
            s.attempt,
            AttemptResult {
                status: s.status,
                output: s.output.clone(),
                error_code: s.error_code.clone(),
                error_message: s.error_message.clone(),
                duration_ms: s.duration_ms,
            },
        ));
    }
}

struct JobRef {
    id: String,
    workflow_key: String,
    inputs: Value,
}

/// Runs the remaining attempts of one step. Failed attempts that will be
/// retried are recorded here; the final result is returned unrecorded so
/// the driver can commit it together with the job's end when it decides it.
async fn run_step(
    ctx: &Ctx,
    job: &JobRef,
    step: &StepDefinition,
    sv: StepView,
    mut notices: mpsc::UnboundedReceiver<(u32, AttemptResult)>,
) -> Result<StepEnd, Halt> {
    // resume where the log says the step is
    let (mut attempt, mut need_start) = match sv.results.get(&sv.started) {
        _ if sv.started == 0 => (1, true),
        None => (sv.started, false), // sent, no result: send again, same key
        Some(_) => {
            if retry_owed(&sv, step) {
                // an n8n failure recorded before this driver decided its retry
                let delay = schedule_retry(ctx, &job.id, step, sv.started).await?;
                pause_unless_given_away(ctx, &job.id, delay).await?;
            } else if let Some((_, due)) = sv.retry {
                let wait = (due - Utc::now()).to_std().unwrap_or_default();
                pause_unless_given_away(ctx, &job.id, wait).await?;
            }
            (sv.started + 1, true)
        }
    };
    let callback_url = ctx
        .config
        .public_url
        .as_ref()
        .map(|u| format!("{u}/v1/callbacks/n8n"));
    loop {
        let key = ids::idempotency_key(&job.id, &step.name, attempt);
        // a partition being given away (or a draining instance) sends no
        // new call: the next holder sends it, with the same key
        if !ctx.leases.may_start(lease::partition(&job.id)) {
            return Err(Halt::Released);
        }
        if need_start {
            let cmd = JobCommand::StartAttempt(StartAttempt {
                step: step.name.clone(),
                attempt,
                idempotency_key: key.clone(),
            });
            let id = ids::attempt_start(&job.id, &step.name, attempt);
            job_result(ctx, &job.id, cmd, &id).await?;
        }
        let kind = if step.kind == StepKind::N8n {
            "n8n"
        } else {
            "solver"
        };
        metrics::counter!("flowledger_handler_step_attempts_total", "kind" => kind).increment(1);
        // counted until its result is known (a drain logs the calls in flight)
        let calling = ctx.leases.calling(&job.id);
        let t0 = Instant::now();
        // the headers' secrets, read for this attempt; without them the
        // attempt fails unsent
        // the attempt's span; the peer is sent its `traceparent`
        let span = tracing::info_span!(
            "step_call",
            job_id = %job.id,
            step = %step.name,
            attempt,
            kind,
            outcome = tracing::field::Empty,
        );
        let mut outcome = match step_secrets::resolve(ctx, &job.id, step).await {
            Ok(headers) => {
                let call = StepCall {
                    job_id: &job.id,
                    workflow_key: &job.workflow_key,
                    attempt,
                    inputs: &job.inputs,
                    callback_url: callback_url.as_deref(),
                    headers,
                };
                let outcome = peer::call(&ctx.http, step, &call)
                    .instrument(span.clone())
                    .await;
                span.record("outcome", outcome.as_str());
                outcome
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, step = %step.name, code = e.code(), error = %e,
                    "step attempt not sent: its secrets could not be read");
                CallOutcome::Failed {
                    code: e.code().into(),
                    message: e.to_string(),
                    retryable: e.retryable(),
                }
            }
        };
        if outcome == CallOutcome::Accepted {
            // n8n answers later on /v1/callbacks/n8n, which records the result
            let left = Duration::from_millis(step.timeout_ms).saturating_sub(t0.elapsed());
            let wait = async {
                while let Some((a, r)) = notices.recv().await {
                    if a == attempt {
                        return Some(r);
                    }
                }
                None
            };
            match tokio::time::timeout(left, wait).await {
                // a posted failure with attempts left is retried like any
                // other: the retry is recorded, the next attempt follows
                // after the backoff
                Ok(Some(r))
                    if r.status != StepStatus::Succeeded
                        && attempt < step.max_attempts.min(MAX_ATTEMPTS) =>
                {
                    tracing::info!(job_id = %job.id, step = %step.name, attempt,
                        status = r.status.as_str(), error = %summary(&r),
                        "n8n reported the attempt failed; retrying");
                    let delay = schedule_retry(ctx, &job.id, step, attempt).await?;
                    pause_unless_given_away(ctx, &job.id, delay).await?;
                    attempt = attempt.saturating_add(1);
                    need_start = true;
                    continue;
                }
                Ok(Some(r)) => {
                    return Ok(StepEnd::Recorded {
                        succeeded: r.status == StepStatus::Succeeded,
                        output: r.output.clone(),
                        summary: summary(&r),
                    })
                }
                _ => outcome = CallOutcome::TimedOut,
            }
        }
        drop(calling);
        let duration_ms = t0.elapsed().as_millis() as u64;
        let mut n8n_execution_id = None;
        let (status, output, error_code, error_message, retryable) = match outcome {
            CallOutcome::Succeeded {
                output,
                n8n_execution_id: execution,
            } => {
                n8n_execution_id = execution;
                (StepStatus::Succeeded, output, None, None, false)
            }
            CallOutcome::Failed {
                code,
                message,
                retryable,
            } => (
                StepStatus::Failed,
                Value::Null,
                Some(code),
                Some(message),
                retryable,
            ),
            CallOutcome::TimedOut | CallOutcome::Accepted => (
                StepStatus::TimedOut,
                Value::Null,
                Some("step_timeout".to_string()),
                Some(format!(
                    "{} gave no answer within {} ms",
                    step.name, step.timeout_ms
                )),
                true,
            ),
        };
        metrics::counter!("flowledger_step_attempt_results_total",
            "workflow" => job.workflow_key.clone(), "step" => step.name.clone(),
            "status" => status.as_str())
        .increment(1);
        let mut result = RecordStepResult {
            step: step.name.clone(),
            attempt,
            status,
            output,
            error_code,
            error_message,
            duration_ms,
            retry_in_ms: None,
            n8n_execution_id,
        };
        if status == StepStatus::Succeeded || !retryable || attempt >= step.max_attempts {
            return Ok(StepEnd::Unrecorded(result));
        }
        let delay = ctx
            .config
            .retry
            .with_base_ms(step.backoff_ms)
            .delay(attempt);
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        result.retry_in_ms = Some(delay_ms.min(MAX_RETRY_DELAY_MS));
        let id = ids::attempt_result(&job.id, &step.name, attempt);
        match ctx
            .job(&job.id, JobCommand::RecordStepResult(result), &id)
            .await
        {
            Ok(()) => {}
            Err(FencedError::NotHeld) => return Err(Halt::Released),
            // an n8n callback recorded this attempt meanwhile
            Err(FencedError::Execute(ExecuteError::Rejected(JobError::DuplicateStepResult {
                ..
            }))) => return Err(Halt::Reload),
            Err(FencedError::Execute(ExecuteError::Rejected(JobError::InvalidTransition {
                ..
            }))) => return Err(Halt::Superseded),
            Err(e) => return retry_later(&job.id, "record a step result", e).await,
        }
        pause_unless_given_away(ctx, &job.id, delay).await?;
        attempt = attempt.saturating_add(1);
        need_start = true;
    }
}

/// Sleeps `delay` (a retry's backoff), ending early with `Released` when
/// the job's partition is being given away or the instance drains: a drain
/// does not wait for a backoff, and the next holder resumes the retry when
/// it is due.
pub(crate) async fn pause_unless_given_away(
    ctx: &Ctx,
    job_id: &str,
    delay: Duration,
) -> Result<(), Halt> {
    let until = Instant::now() + delay;
    let p = lease::partition(job_id);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if !ctx.leases.may_start(p) {
            return Err(Halt::Released);
        }
        tokio::time::sleep(left.min(Duration::from_millis(200))).await;
    }
}

/// The body of the job's callback (seed 002, "Callback").
pub fn callback_body(view: &JobView) -> Value {
    let status = match view.status {
        JobStatus::Completed => "success",
        JobStatus::Cancelled => "cancelled",
        _ => "failed",
    };
    let audit: Vec<Value> = view
        .audit
        .iter()
        .map(|a| {
            json!({
                "timestamp": a.timestamp,
                "action": a.action,
                "node_name": a.node_name,
                "details": a.details,
                "duration_ms": a.duration_ms,
            })
        })
        .collect();
    let micros = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    json!({
        "job_id": view.job_id,
        "status": status,
        "outputs": view.outputs,
        "error_code": view.error_code,
        "error_message": view.error_message,
        "audit": audit,
        "started_at": view.started_at.map(micros),
        "completed_at": view.ended_at.map(micros),
        "execution_id": view.job_id,
        "workflow_key": view.workflow_key,
        "client_id": view.client_id,
    })
}

/// Records the callback's outcome.
pub async fn record_callback(ctx: &Ctx, job_id: &str, outcome: RecordCallback) {
    let id = ids::callback_outcome(job_id);
    loop {
        match ctx
            .job(job_id, JobCommand::RecordCallback(outcome.clone()), &id)
            .await
        {
            Ok(())
            | Err(FencedError::NotHeld | FencedError::Execute(ExecuteError::Rejected(_))) => return,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "cannot record the callback outcome; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
