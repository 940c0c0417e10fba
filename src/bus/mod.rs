//! The command bus: the one object through which every entry point (NATS,
//! HTTP, the n8n endpoint, the CLI) and every handler issues commands.
//!
//! It owns the aggregate stores (one per aggregate type, each with its
//! cache), applies the rules that span aggregates, and is the only place
//! that executes a command:
//! - the kill-switch: a job of a disabled workflow is not submitted,
//!   whichever door the submission came through;
//! - approval per job: a job's approval has the job's id, and is requested
//!   only for a job that exists (so no approval can be made up for a job
//!   under another id);
//! - every string that becomes a subject token is checked first, so no input
//!   reads or writes another subject than the one it names;
//! - a repeated decision answers the first one: an approve, reject, cancel,
//!   disable or enable refused because it is already so answers the receipt
//!   of the commit that made it so when that commit is the same command
//!   (same event type, same command hash: same caller and body) and came
//!   through the same door: HTTP and NATS hash different bodies, so a
//!   decision repeated over the other door is a conflict ([`repeated`]);
//! - a retry is two commits ([`CommandBus::retry_job`]): `JobRetried` on the
//!   failed job, then the new job's `JobSubmitted` with `retry_of`, the new
//!   job's id and the submission's command id derived from the old job's
//!   id, so a repeat answers the same new job and completes a retry cut
//!   short between the two.
//!
//! Command ids the system derives itself are built in [`ids`].

pub mod ids;

use std::sync::Arc;

use serde_json::{json, Value};

use crate::commands::approval::{Approval, ApprovalCommand, ApprovalError};
use crate::commands::job::events::{JobEvent, JobSubmitted};
use crate::commands::job::{Job, JobCommand, JobError, JobServices, RetryJob, SubmitRetry};
use crate::commands::memory::events::MemoryEvent;
use crate::commands::memory::{Memory, MemoryCommand, MemoryError};
use crate::commands::projection::{ProjectionCommand, ProjectionOps, ProjectionOpsError};
use crate::commands::registry::SharedRegistry;
use crate::commands::secret_access::{RecordAccess, SecretAccess, SecretAccessError};
use crate::commands::secret_cache::{self, Invalidate, SecretCache, SecretCacheError};
use crate::commands::workflow::{self, Workflow, WorkflowCommand, WorkflowError};
use crate::commands::{DomainError, ErrorCode};
use crate::events::envelope::CommandMeta;
use crate::events::log::EventLog;
use crate::events::store::{AggregateStore, ExecuteError, Loaded, Receipt, StoreError};

/// A command that was refused or failed: what the caller does about it
/// (`code`), what was wrong (`message`) and, for bad input, which field.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandError {
    /// The reply code (`error.code`): what the caller does about it.
    pub code: ErrorCode,
    /// Human-readable reason (`error.message`); never holds a secret.
    pub message: String,
    /// The request field at fault (`error.field`), for bad input only.
    pub field: Option<String>,
}

impl CommandError {
    /// Whether this is the store's refusal of a command id already used
    /// for another command ([`ExecuteError::CommandIdReused`]), not a
    /// conflict that a retry can clear (contention, a wrong key).
    pub fn is_command_id_reused(&self) -> bool {
        self.code == ErrorCode::Conflict
            && self.message.starts_with("command id ")
            && self
                .message
                .ends_with("was already used for a different command; use a new command id")
    }

    /// Bad input: `field` (if one is to blame) and what is wrong with it.
    pub fn validation(field: Option<&str>, message: impl Into<String>) -> Self {
        CommandError {
            code: ErrorCode::Validation,
            message: message.into(),
            field: field.map(str::to_string),
        }
    }

    /// The reply body: `{"ok": false, "error": {code, message, field?}}`.
    pub fn to_json(&self) -> Value {
        let mut error = json!({"code": self.code.as_str(), "message": self.message});
        if let Some(f) = &self.field {
            error["field"] = json!(f);
        }
        json!({"ok": false, "error": error})
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandError {}

impl<E: DomainError> From<ExecuteError<E>> for CommandError {
    fn from(e: ExecuteError<E>) -> Self {
        let (code, field) = match &e {
            ExecuteError::Rejected(d) => (d.code(), d.field()),
            ExecuteError::Conflict { .. } | ExecuteError::CommandIdReused { .. } => {
                (ErrorCode::Conflict, None)
            }
            ExecuteError::TooLarge(_) | ExecuteError::Unstorable => (ErrorCode::Validation, None),
            ExecuteError::Store(StoreError::InvalidAggregateId { aggregate_type, .. }) => {
                (ErrorCode::Validation, Some(id_field(aggregate_type)))
            }
            ExecuteError::Store(StoreError::Log(_)) => (ErrorCode::Unavailable, None),
            ExecuteError::Store(_) => (ErrorCode::Internal, None),
        };
        if matches!(code, ErrorCode::Internal | ErrorCode::Unavailable) {
            tracing::error!(error = %e, "command failed");
        }
        CommandError {
            code,
            message: e.to_string(),
            field: field.map(str::to_string),
        }
    }
}

/// The first answer to a command refused because its aggregate is already
/// where the command would take it: the latest commit holding one of
/// `events` (the events that set that state: a decision, an end, a
/// switch) is the same command as `meta`'s when it holds `event_type` and
/// carries `meta`'s command hash (the same caller and body). Its receipt,
/// marked duplicate; `None`: the refusal stands.
async fn repeated<A>(
    store: &AggregateStore<A>,
    aggregate_id: &str,
    meta: &CommandMeta,
    events: &[&str],
    event_type: &str,
) -> Result<Option<Arc<Receipt>>, StoreError>
where
    A: cqrs_es::Aggregate + Clone,
    A::Command: Clone,
{
    // a command without a hash (one a process issues) is never "the same"
    if meta.command_hash.is_empty() {
        return Ok(None);
    }
    let loaded = store.cached_or_load(aggregate_id).await?;
    let holds = |r: &Receipt, types: &[&str]| {
        r.events
            .iter()
            .any(|e| types.contains(&e.event_type.as_str()))
    };
    let last = loaded
        .commits
        .values()
        .filter(|r| holds(r, events))
        .max_by_key(|r| r.stream_seq);
    Ok(last
        .filter(|r| holds(r, &[event_type]) && r.command_hash == meta.command_hash)
        .map(|r| {
            Arc::new(Receipt {
                duplicate: true,
                ..Receipt::clone(r)
            })
        }))
}

/// What a retry answers: the new job and its submission's receipt
/// (`duplicate` when the retry was made before).
#[derive(Debug, Clone)]
pub struct Retried {
    /// The new job's id ([`ids::retry_job_id`] of the retried job).
    pub job_id: String,
    /// The receipt of the new job's `JobSubmitted`.
    pub receipt: Arc<Receipt>,
}

/// The request field that carries an aggregate's id.
fn id_field(aggregate_type: &str) -> &'static str {
    match aggregate_type {
        "job" => "job_id",
        "approval" => "approval_id",
        "workflow" => "workflow_key",
        "projection" => "projection",
        "secret_access" => "request_id",
        "secret_cache" => "path",
        "memory" => "subject_id",
        _ => "id",
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        ExecuteError::<JobError>::Store(e).into()
    }
}

/// The command side: one store per aggregate type, shared by every door.
pub struct CommandBus {
    jobs: AggregateStore<Job>,
    approvals: AggregateStore<Approval>,
    workflows: AggregateStore<Workflow>,
    projection_ops: AggregateStore<ProjectionOps>,
    secret_accesses: AggregateStore<SecretAccess>,
    secret_caches: AggregateStore<SecretCache>,
    memories: AggregateStore<Memory>,
    registry: SharedRegistry,
}

impl CommandBus {
    /// A bus on `log`, with empty caches; `job_services` (registry, largest
    /// job timeout) is what job commands are decided with.
    pub fn new(log: EventLog, job_services: JobServices) -> Self {
        CommandBus {
            registry: job_services.registry.clone(),
            jobs: AggregateStore::new(log.clone(), job_services),
            approvals: AggregateStore::new(log.clone(), ()),
            workflows: AggregateStore::new(log.clone(), ()),
            projection_ops: AggregateStore::new(log.clone(), ()),
            secret_accesses: AggregateStore::new(log.clone(), ()),
            secret_caches: AggregateStore::new(log.clone(), ()),
            memories: AggregateStore::new(log, ()),
        }
    }

    /// The event log the bus appends to.
    pub fn log(&self) -> &EventLog {
        self.jobs.log()
    }

    /// Runs a job command. A submission of a disabled workflow's job is
    /// refused (the kill-switch); every other rule is the aggregate's.
    pub async fn job(
        &self,
        job_id: &str,
        command: JobCommand,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<JobError>> {
        let cancel = matches!(command, JobCommand::Cancel(_));
        match &command {
            JobCommand::Submit(submit) => self.refuse_disabled(&submit.workflow_key).await?,
            JobCommand::SubmitRetry(retry) => {
                self.refuse_disabled(&retry.submitted.workflow_key).await?
            }
            _ => {}
        }
        let result = self.jobs.execute(job_id, command, meta).await;
        if let (true, Err(ExecuteError::Rejected(JobError::InvalidTransition { .. }))) =
            (cancel, &result)
        {
            let ended = ["JobCancelled", "JobCompleted", "JobFailed"];
            if let Some(first) = repeated(&self.jobs, job_id, meta, &ended, "JobCancelled").await? {
                return Ok(first);
            }
        }
        result
    }

    /// The kill-switch: a new job of `workflow_key` is refused while it is
    /// disabled. An unknown key is the aggregate's to refuse (it lists the
    /// known ones); only a registry key names a workflow aggregate.
    async fn refuse_disabled(&self, workflow_key: &str) -> Result<(), ExecuteError<JobError>> {
        if self.registry.current().contains(workflow_key)
            && self.workflow_disabled(workflow_key).await?
        {
            return Err(ExecuteError::Rejected(JobError::WorkflowDisabled {
                key: workflow_key.to_string(),
            }));
        }
        Ok(())
    }

    /// Retries the failed or cancelled job `job_id` as a new job (a random
    /// id, [`ids::retry_job_id`], kept in `JobRetried`) with the same submission (workflow, input,
    /// priority, timeout, callback, client, metadata), in two commits:
    /// `JobRetried` on the old job (under `meta`), then the new job's
    /// `JobSubmitted` with `retry_of` (command id [`ids::retry_submit`],
    /// the actor `meta`'s). A job already retried answers its retry: a
    /// repeat gets the same new job (and submits it if a crash came
    /// between the two commits), also after the new job failed in turn
    /// (retrying the new job goes on with the chain). Who may retry is the
    /// adapter's check (the job's client or an operator); the kill-switch
    /// refuses a retry like a submission.
    pub async fn retry_job(
        &self,
        job_id: &str,
        meta: &CommandMeta,
    ) -> Result<Retried, ExecuteError<JobError>> {
        let old = self.jobs.cached_or_load(job_id).await?;
        let retry_job_id = match old.state.retried_by {
            Some(existing) => existing,
            None => {
                self.refuse_disabled(&old.state.workflow_key).await?;
                // random, not derived: nobody can take the new job's id
                // before the retry submits it; `JobRetried` keeps it, so a
                // repeat reads it from the old job
                let new_id = ids::retry_job_id();
                let command = JobCommand::Retry(RetryJob {
                    retry_job_id: new_id.clone(),
                });
                match self.jobs.execute(job_id, command, meta).await {
                    Ok(r) if !r.duplicate => new_id,
                    // the same command stored before (its id then): as recorded
                    Ok(_) => match self.jobs.load(job_id).await?.state.retried_by {
                        Some(existing) => existing,
                        None => {
                            return Err(ExecuteError::Conflict {
                                aggregate_id: job_id.to_string(),
                                attempts: 1,
                            })
                        }
                    },
                    Err(ExecuteError::Rejected(JobError::AlreadyRetried { retry_job_id })) => {
                        retry_job_id
                    }
                    // the derived id from another caller (its hash differs):
                    // a concurrent retry of the same job, made or not
                    Err(ExecuteError::CommandIdReused { .. })
                        if meta.command_id == ids::job_retry(job_id) =>
                    {
                        match self.jobs.load(job_id).await?.state.retried_by {
                            Some(existing) => existing,
                            None => {
                                return Err(ExecuteError::Conflict {
                                    aggregate_id: job_id.to_string(),
                                    attempts: 1,
                                })
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let submitted = self.submission(job_id).await?;
        let command_id = ids::retry_submit(job_id);
        let submit_meta = CommandMeta {
            command_hash: crate::events::chain::to_hex(&crate::events::chain::sha256(
                command_id.as_bytes(),
            )),
            command_id,
            actor: meta.actor.clone(),
            correlation_id: meta.correlation_id.clone(),
            causation_id: meta.command_id.clone(),
        };
        let command = JobCommand::SubmitRetry(SubmitRetry {
            retry_of: job_id.to_string(),
            submitted,
        });
        let receipt = match self.job(&retry_job_id, command, &submit_meta).await {
            Err(ExecuteError::Rejected(JobError::AlreadyExists(_))) => {
                return Err(ExecuteError::Rejected(JobError::RetryIdTaken {
                    retry_job_id,
                }))
            }
            r => r?,
        };
        Ok(Retried {
            job_id: retry_job_id,
            receipt,
        })
    }

    /// The `JobSubmitted` of job `job_id`, as stored (upcast).
    async fn submission(&self, job_id: &str) -> Result<JobSubmitted, ExecuteError<JobError>> {
        self.jobs
            .load_envelopes(job_id)
            .await?
            .into_iter()
            .find_map(|e| match e.payload {
                JobEvent::JobSubmitted(s) => Some(s),
                _ => None,
            })
            .ok_or(ExecuteError::Rejected(JobError::NotFound))
    }

    /// Runs an approval command. A job's approval has the job's id and is
    /// requested only for a job that exists.
    pub async fn approval(
        &self,
        approval_id: &str,
        command: ApprovalCommand,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<ApprovalError>> {
        if let ApprovalCommand::Request { request, .. } = &command {
            if request.job_id != approval_id {
                return Err(ExecuteError::Rejected(ApprovalError::NotTheJobsId {
                    approval_id: approval_id.to_string(),
                    job_id: request.job_id.clone(),
                }));
            }
            let job = self.jobs.load(approval_id).await?;
            if job.version == 0 {
                return Err(ExecuteError::Rejected(ApprovalError::NoSuchJob(
                    request.job_id.clone(),
                )));
            }
        }
        let decided = match &command {
            ApprovalCommand::Approve { .. } => Some("ApprovalGranted"),
            ApprovalCommand::Reject { .. } => Some("ApprovalRejected"),
            _ => None,
        };
        let result = self.approvals.execute(approval_id, command, meta).await;
        if let (
            Some(event_type),
            Err(ExecuteError::Rejected(ApprovalError::AlreadyDecided { .. })),
        ) = (decided, &result)
        {
            let finals = ["ApprovalGranted", "ApprovalRejected", "ApprovalExpired"];
            if let Some(first) =
                repeated(&self.approvals, approval_id, meta, &finals, event_type).await?
            {
                return Ok(first);
            }
        }
        result
    }

    /// Runs a command on the workflow `workflow_key` (kill-switch, daily
    /// auto-approval count).
    pub async fn workflow(
        &self,
        workflow_key: &str,
        command: WorkflowCommand,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<WorkflowError>> {
        if !self.registry.current().contains(workflow_key) {
            return Err(ExecuteError::Rejected(WorkflowError::UnknownWorkflow {
                key: workflow_key.to_string(),
            }));
        }
        let switched = match &command {
            WorkflowCommand::Disable { .. } => Some("WorkflowDisabled"),
            WorkflowCommand::Enable { .. } => Some("WorkflowEnabled"),
            WorkflowCommand::CountAutoApproval { .. } => None,
        };
        let id = workflow::aggregate_id(workflow_key);
        let result = self.workflows.execute(&id, command, meta).await;
        if let (
            Some(event_type),
            Err(ExecuteError::Rejected(
                WorkflowError::AlreadyDisabled | WorkflowError::NotDisabled,
            )),
        ) = (switched, &result)
        {
            let switches = ["WorkflowDisabled", "WorkflowEnabled"];
            if let Some(first) = repeated(&self.workflows, &id, meta, &switches, event_type).await?
            {
                return Ok(first);
            }
        }
        result
    }

    /// Records an operator's action on projection `projection`.
    pub async fn projection(
        &self,
        projection: &str,
        command: ProjectionCommand,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<ProjectionOpsError>> {
        self.projection_ops.execute(projection, command, meta).await
    }

    /// Records how the secret read `request_id` was decided. Only the
    /// secrets service calls this, and hands a value out only after it
    /// returns `Ok` (the event is stored).
    pub async fn secret_access(
        &self,
        request_id: &str,
        command: RecordAccess,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<SecretAccessError>> {
        self.secret_accesses
            .execute(request_id, command, meta)
            .await
    }

    /// Records an operator's invalidation of a secret path's cache.
    pub async fn secret_cache(
        &self,
        command: Invalidate,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<SecretCacheError>> {
        let id = secret_cache::aggregate_id(&command.path);
        self.secret_caches.execute(&id, command, meta).await
    }

    /// Runs a command on the memory of one data subject (aggregate id
    /// `memory::aggregate_id(owner, subject_id)`, made by the memory
    /// service, which seals the command's content first).
    pub async fn memory(
        &self,
        aggregate_id: &str,
        command: MemoryCommand,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<MemoryError>> {
        self.memories.execute(aggregate_id, command, meta).await
    }

    /// [`memory`](Self::memory), answering the commit's events too (the
    /// cleanup's commands leave out what is no longer due and count what
    /// was recorded).
    pub async fn memory_with_events(
        &self,
        aggregate_id: &str,
        command: MemoryCommand,
        meta: &CommandMeta,
    ) -> Result<(Arc<Receipt>, Vec<MemoryEvent>), ExecuteError<MemoryError>> {
        self.memories
            .execute_with_events(aggregate_id, command, meta)
            .await
    }

    /// Appends memory `events` to `aggregate_id` in one commit without a
    /// decision ([`AggregateStore::append_undecided`]): for the benchmark
    /// program's setups only.
    #[cfg(feature = "bench")]
    pub async fn memory_undecided(
        &self,
        aggregate_id: &str,
        events: Vec<MemoryEvent>,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<MemoryError>> {
        self.memories
            .append_undecided(aggregate_id, events, meta)
            .await
    }

    /// Drops every cached memory aggregate, so the next command on each
    /// loads it from the log (as a fresh process does): for benchmarks.
    pub fn clear_memory_cache(&self) {
        self.memories.clear_cache();
    }

    /// A subject's memory as the log has it now: this bus's cached state
    /// brought up to the log's end (only the commits since are read), or
    /// loaded whole ([`AggregateStore::current`]).
    pub async fn load_memory(&self, aggregate_id: &str) -> Result<Loaded<Memory>, StoreError> {
        self.memories.current(aggregate_id).await
    }

    /// The job as the log has it (version 0: no such job). For adapters
    /// that decide who may act on it.
    pub async fn load_job(&self, job_id: &str) -> Result<Loaded<Job>, StoreError> {
        self.jobs.load(job_id).await
    }

    /// The job as this bus's cache holds it (loaded from the log when not
    /// cached): what the next command on it is decided on.
    pub async fn load_job_cached(&self, job_id: &str) -> Result<Loaded<Job>, StoreError> {
        self.jobs.cached_or_load(job_id).await
    }

    /// Whether the kill-switch of `workflow_key` is on.
    pub async fn workflow_disabled(&self, workflow_key: &str) -> Result<bool, StoreError> {
        let wf = self
            .workflows
            .load(&workflow::aggregate_id(workflow_key))
            .await?;
        Ok(wf.state.disabled)
    }
}

#[cfg(test)]
mod command_error_tests {
    use super::*;
    use crate::commands::job::JobError;

    #[test]
    fn a_reused_command_id_is_told_from_other_conflicts() {
        let reused: CommandError = ExecuteError::<JobError>::CommandIdReused {
            command_id: "idem:00:k".into(),
        }
        .into();
        assert!(reused.is_command_id_reused(), "{}", reused.message);
        let contention: CommandError = ExecuteError::<JobError>::Conflict {
            aggregate_id: "j".into(),
            attempts: 5,
        }
        .into();
        assert_eq!(contention.code, ErrorCode::Conflict);
        assert!(!contention.is_command_id_reused(), "{}", contention.message);
    }
}
