//! The OpenAPI document of the HTTP API (`GET /openapi.json`): the paths
//! the handlers declare with `#[utoipa::path]`, the schemas of their
//! request bodies (the types the handlers parse), of their answers and of
//! the one error body ([`ErrorBody`](super::http::ErrorBody)), the query
//! parameters of the lists (the `*Query` types the handlers receive, typed,
//! through `query::ApiQuery`: one type for the document and the parsing),
//! and per-route security.
//!
//! Most answers are rows PostgreSQL renders (`to_jsonb`) or JSON the
//! handlers build; their schemas here describe them for the document only
//! and are never built. `scripts/api-check.sh` (run by `scripts/test.sh`)
//! checks the document with openapi-spec-validator and runs schemathesis
//! against a running `serve`, answers checked against these schemas.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::http::{ErrorBody, ErrorDetail, MAX_BODY_BYTES};
use super::{console, http, live, memory, n8n, read, secrets, write};

/// The OpenAPI document of the HTTP API, served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "flowledger API",
        description = "Commands (jobs, approvals, the kill-switch, memory, secrets) and read models built from the flowledger event log. /v1 routes need `Authorization: Bearer <token>` except /v1/callbacks/n8n, which is signed (X-Flowledger-Timestamp, X-Flowledger-Signature; docs/CALLBACKS.md); the probes, /metrics and /openapi.json need nothing. Every error answer is the ErrorBody `{\"error\": {\"code\", \"message\", \"param\"?, \"reason\"?, \"request_id\"?}}`; every answer carries `x-request-id` (a client's own, 1-64 of A-Za-z0-9._-, is kept; else a new UUID), which `error.request_id` quotes; a POST body is JSON (415 otherwise) of at most 2 MiB (413)."
    ),
    paths(
        write::jobs_submit,
        write::jobs_cancel,
        write::jobs_retry,
        write::workflows_disable,
        write::workflows_enable,
        write::meta_get,
        write::approvals_approve,
        write::approvals_reject,
        write::approvals_bulk,
        n8n::callbacks_n8n,
        read::jobs_get,
        read::jobs_status,
        read::executions_list,
        read::audit_list,
        read::secret_accesses_list,
        read::approvals_list,
        read::approvals_get,
        read::me_get,
        live::jobs_events,
        console::console_page,
        secrets::secrets_read,
        memory::memory_command,
        memory::memory_assemble,
        memory::memory_episodes,
        memory::memory_facts,
        memory::memory_profile,
        secrets::secrets_invalidate,
        http::healthz,
        http::livez,
        http::readyz,
        http::metrics_get
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth, &ErrorAnswers)
)]
pub struct ApiDoc;

/// The security scheme of the `/v1` routes that need a bearer token; each
/// such route names it (`security(("bearer" = []))`), the others none.
pub(crate) const BEARER: &str = "bearer";

/// Declares the bearer-token scheme.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                BEARER,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Adds the error answers every route of a kind can give, whatever its own
/// list says (a bearer route: 401; a POST: 400, 413, and 415 where the body
/// must be JSON; a route with a path parameter: 400; every `/v1` route: 503),
/// and gives every 4xx and 5xx answer without a body of its own the
/// [`ErrorBody`].
struct ErrorAnswers;

impl ErrorAnswers {
    fn add(op: &mut Operation, status: u16, description: &str) {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| ResponseBuilder::new().description(description).into());
    }

    fn operation(path: &str, post: bool, op: &mut Operation) {
        let bearer = op
            .security
            .as_ref()
            .is_some_and(|s| !s.is_empty() && path.starts_with("/v1/"));
        let in_path = op
            .parameters
            .iter()
            .flatten()
            .any(|p| p.parameter_in == ParameterIn::Path);
        if bearer {
            Self::add(
                op,
                401,
                "no or unknown bearer token (`WWW-Authenticate: Bearer`)",
            );
        }
        if post {
            Self::add(op, 400, "bad body; error.param names the field");
            Self::add(
                op,
                413,
                &format!("the body is over {MAX_BODY_BYTES} bytes; send a smaller one"),
            );
            if bearer {
                Self::add(
                    op,
                    415,
                    "the body is not JSON (`Content-Type: application/json`, or none)",
                );
            }
        }
        if in_path {
            Self::add(op, 400, "a malformed or invalid path parameter");
        }
        if path.starts_with("/v1/") {
            Self::add(
                op,
                503,
                "a dependency (NATS, PostgreSQL, Vault) cannot be reached, or the feature is \
                 not configured; retry later",
            );
        }
        let error = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build();
        for (status, answer) in op.responses.responses.iter_mut() {
            let is_error = status.starts_with('4') || status.starts_with('5');
            if let (true, RefOr::T(answer)) = (is_error, answer) {
                if answer.content.is_empty() {
                    answer
                        .content
                        .insert("application/json".into(), error.clone());
                }
            }
        }
    }
}

impl utoipa::Modify for ErrorAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            if let Some(op) = item.get.as_mut() {
                Self::operation(path, false, op);
            }
            if let Some(op) = item.post.as_mut() {
                Self::operation(path, true, op);
            }
        }
    }
}

// ---- query parameters ----------------------------------------------------

/// A job's status in the executions read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// Submitted, not started.
    Pending,
    /// Its approval is requested and undecided.
    AwaitingApproval,
    /// Started.
    Running,
    /// Ended successfully.
    Completed,
    /// Ended unsuccessfully.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl ExecutionStatus {
    /// Its name, as the query and the read model spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Pending => "pending",
            ExecutionStatus::AwaitingApproval => "awaiting_approval",
            ExecutionStatus::Running => "running",
            ExecutionStatus::Completed => "completed",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::Cancelled => "cancelled",
        }
    }
}

/// The query of `GET /v1/executions`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExecutionsQuery {
    /// Only this workflow key (1-255 characters).
    #[param(min_length = 1, max_length = 255)]
    #[serde(default, deserialize_with = "super::query::text")]
    pub workflow_key: Option<String>,
    /// `workflow_key`'s deprecated alias, for one release (not with it).
    #[param(min_length = 1, max_length = 255)]
    #[deprecated = "workflow_key's alias, for one release"]
    #[serde(default, deserialize_with = "super::query::text")]
    pub workflow_id: Option<String>,
    /// Only this status (awaiting_approval: its approval is requested and undecided).
    #[param(inline)]
    pub status: Option<ExecutionStatus>,
    /// Created at or after (RFC 3339).
    #[serde(default, deserialize_with = "super::query::time")]
    pub since: Option<DateTime<Utc>>,
    /// Created before (RFC 3339).
    #[serde(default, deserialize_with = "super::query::time")]
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::query::limit")]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    #[param(value_type = Option<String>)]
    #[serde(default, deserialize_with = "super::query::id_cursor")]
    pub cursor: Option<(DateTime<Utc>, i64)>,
}

/// The query of `GET /v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this job (1-255 characters).
    #[param(min_length = 1, max_length = 255)]
    #[serde(default, deserialize_with = "super::query::text")]
    pub job_id: Option<String>,
    /// Only this client (1-255 characters).
    #[param(min_length = 1, max_length = 255)]
    #[serde(default, deserialize_with = "super::query::text")]
    pub client_id: Option<String>,
    /// Only this event type, e.g. JobCompleted (1-255 characters).
    #[param(min_length = 1, max_length = 255)]
    #[serde(default, deserialize_with = "super::query::text")]
    pub action: Option<String>,
    /// At or after (RFC 3339).
    #[serde(default, deserialize_with = "super::query::time")]
    pub since: Option<DateTime<Utc>>,
    /// Before (RFC 3339).
    #[serde(default, deserialize_with = "super::query::time")]
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::query::limit")]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    #[param(value_type = Option<String>)]
    #[serde(default, deserialize_with = "super::query::seq_cursor")]
    pub cursor: Option<(i64, i16)>,
}

/// A secret access's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessDecision {
    /// The value was served.
    Granted,
    /// A policy (flowledger's or Vault's) refused.
    Denied,
    /// Vault could not be read, or has no such secret.
    Failed,
}

impl AccessDecision {
    /// Its name, as the query and the read model spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessDecision::Granted => "granted",
            AccessDecision::Denied => "denied",
            AccessDecision::Failed => "failed",
        }
    }
}

/// The query of `GET /v1/audit/secret-accesses`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SecretAccessesQuery {
    /// Only this KV v2 path, exactly (e.g. secret/data/external_apis/ocr).
    #[param(min_length = 1, max_length = 512, pattern = "^[A-Za-z0-9_./-]+$")]
    #[serde(default, deserialize_with = "super::query::secret_read_path")]
    pub path: Option<String>,
    /// Only paths starting with this (e.g. secret/data/external_apis/).
    #[param(min_length = 1, max_length = 512, pattern = "^[A-Za-z0-9_./-]+$")]
    #[serde(default, deserialize_with = "super::query::secret_path")]
    pub path_prefix: Option<String>,
    /// Only this reader (the actor's client id).
    #[param(min_length = 1, max_length = 255)]
    #[serde(default, deserialize_with = "super::query::text")]
    pub client_id: Option<String>,
    /// Only reads on behalf of this job.
    #[param(min_length = 1, max_length = 255)]
    #[serde(default, deserialize_with = "super::query::text")]
    pub job_id: Option<String>,
    /// Only this decision.
    #[param(inline)]
    pub decision: Option<AccessDecision>,
    /// At or after (RFC 3339).
    #[serde(default, deserialize_with = "super::query::time")]
    pub since: Option<DateTime<Utc>>,
    /// Before (RFC 3339); not before `since`.
    #[serde(default, deserialize_with = "super::query::time")]
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::query::limit")]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    #[param(value_type = Option<String>)]
    #[serde(default, deserialize_with = "super::query::seq_cursor")]
    pub cursor: Option<(i64, i16)>,
}

/// An approval's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Requested, undecided.
    Pending,
    /// Approved (by a person or the auto-approval rule).
    Approved,
    /// Rejected.
    Rejected,
    /// Its window ended undecided.
    Expired,
}

impl ApprovalStatus {
    /// Its name, as the query and the read model spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Rejected => "rejected",
            ApprovalStatus::Expired => "expired",
        }
    }
}

/// The query of `GET /v1/approvals`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsQuery {
    /// Only this status.
    #[param(inline)]
    pub status: Option<ApprovalStatus>,
    /// Page size, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::query::limit")]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page, unchanged.
    #[param(value_type = Option<String>)]
    #[serde(default, deserialize_with = "super::query::time_cursor")]
    pub cursor: Option<(DateTime<Utc>, String)>,
}

/// The query of `GET /v1/memory/subjects/{subject_id}/episodes`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EpisodesQuery {
    /// How many, newest first: 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "super::query::limit")]
    pub limit: Option<i64>,
}

/// The query of `GET /v1/memory/subjects/{subject_id}/facts`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FactsQuery {
    /// true: every version with its validity interval; default: the valid ones.
    #[serde(default, deserialize_with = "super::query::boolean")]
    pub history: Option<bool>,
    /// 1-255 characters: only the facts whose subject, key or value has any
    /// of its words (English stemming, stop words ignored), best first,
    /// each with a score; no searchable word: no fact.
    #[serde(default, deserialize_with = "super::query::text")]
    pub q: Option<String>,
}

/// The memory commands of `POST /v1/memory/{command}`.
#[derive(ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryCommandName {
    /// A turn and/or facts (body: WritebackBody).
    Writeback,
    /// Profile fields merged over the earlier ones (ProfileBody).
    Profile,
    /// A working-state value with a lifetime (WorkingSetBody).
    WorkingStateSet,
    /// A working-state value removed (WorkingDeleteBody).
    WorkingStateDelete,
    /// A fact stops being valid (ForgetBody).
    Forget,
    /// The subject's key destroyed, its memory unreadable (EraseBody).
    Erase,
}

/// The body of `POST /v1/memory/{command}`: the one of its command.
#[derive(ToSchema)]
#[serde(untagged)]
pub enum MemoryCommandBody {
    /// `writeback`.
    Writeback(crate::memory::service::WritebackBody),
    /// `profile`.
    Profile(crate::memory::service::ProfileBody),
    /// `working-state-set`.
    WorkingStateSet(crate::memory::service::WorkingSetBody),
    /// `working-state-delete`.
    WorkingStateDelete(crate::memory::service::WorkingDeleteBody),
    /// `forget`.
    Forget(crate::memory::service::ForgetBody),
    /// `erase`.
    Erase(crate::memory::service::EraseBody),
}

/// How one attempt of one step ended, as n8n reports it.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// The step is never called again.
    Succeeded,
    /// The step failed.
    Failed,
    /// No result within the step's timeout.
    TimedOut,
}

// ---- answers (described for the document, never built) -------------------

/// `POST /v1/jobs`: the job is accepted (seed 002).
#[derive(ToSchema)]
pub struct JobAccepted {
    /// The job's id (the one sent, or a new one).
    pub job_id: String,
    /// `pending`.
    pub status: String,
    /// What happens next.
    pub message: String,
    /// When it was recorded (RFC 3339).
    pub accepted_at: String,
    /// An upper bound on when it ends (RFC 3339).
    pub estimated_completion: String,
}

/// `POST /v1/jobs/{id}/cancel`: the job is cancelled.
#[derive(ToSchema)]
pub struct JobCancelled {
    /// The job.
    pub job_id: String,
    /// `cancelled`.
    pub status: String,
    /// When (RFC 3339).
    pub cancelled_at: String,
    /// The caller's client id.
    pub cancelled_by: String,
}

/// `POST /v1/jobs/{id}/retry`: the retry (a new job) is accepted, or was
/// before (the same answer).
#[derive(ToSchema)]
pub struct JobRetryAccepted {
    /// The new job's id (derived from the retried job's id: the same on
    /// every repeat).
    pub job_id: String,
    /// The retried job (the one in the path).
    pub retry_of: String,
    /// `pending`: the status the new job was accepted in (read
    /// `GET /v1/jobs/{job_id}` for where it is now).
    pub status: String,
    /// When the new job was recorded (RFC 3339).
    pub accepted_at: String,
}

/// The kill-switch's answer.
#[derive(ToSchema)]
pub struct WorkflowSwitched {
    /// The workflow.
    pub workflow_key: String,
    /// Whether it is now disabled.
    pub disabled: bool,
    /// When (RFC 3339).
    pub at: String,
    /// The caller's client id.
    pub by: String,
}

/// One step of a workflow, as `/v1/meta` lists it (no URL).
#[derive(ToSchema)]
pub struct MetaStep {
    /// The step's name.
    pub name: String,
    /// `solver` or `n8n`.
    pub kind: String,
    /// The attempt's timeout.
    pub timeout_ms: u64,
    /// Attempts at most.
    pub max_attempts: u32,
}

/// The auto-approval rule of a workflow.
#[derive(ToSchema)]
pub struct MetaAutoApproval {
    /// Auto-approve when `metadata.confidence` is at least this.
    pub min_confidence: f64,
    /// At most this many auto-approvals per UTC day.
    pub daily_limit: u32,
}

/// One workflow of the registry.
#[derive(ToSchema)]
pub struct MetaWorkflow {
    /// Its key.
    pub workflow_key: String,
    /// What it does.
    pub description: String,
    /// Its steps.
    pub steps: Vec<MetaStep>,
    /// Whether a job waits for an approval.
    pub requires_approval: bool,
    /// How long an approval may wait.
    pub approval_timeout_seconds: u64,
    /// The rule that approves without a person, if any.
    pub auto_approval: Option<MetaAutoApproval>,
    /// How partial results count: `"all"`, `"any"` or `{"at_least": n}`.
    pub success: Value,
    /// Whether the kill-switch is on.
    pub disabled: bool,
}

/// `GET /v1/meta`: the workflow registry.
#[derive(ToSchema)]
pub struct Meta {
    /// `flowledger`.
    pub service: String,
    /// The service's version.
    pub version: String,
    /// The registry's version.
    pub registry_version: u32,
    /// Its workflows.
    pub workflows: Vec<MetaWorkflow>,
}

/// An approval decided.
#[derive(ToSchema)]
pub struct Decided {
    /// The approval (the job's id).
    pub approval_id: String,
    /// `approved` or `rejected`.
    pub status: String,
    /// The caller's client id.
    pub decided_by: String,
    /// When (RFC 3339).
    pub decided_at: String,
}

/// One id of a bulk decision.
#[derive(ToSchema)]
pub struct BulkResult {
    /// The approval.
    pub approval_id: String,
    /// Whether it was decided.
    pub ok: bool,
    /// Decided: `approved` or `rejected`.
    pub status: Option<String>,
    /// Decided: the caller's client id.
    pub decided_by: Option<String>,
    /// Decided: when.
    pub decided_at: Option<String>,
    /// Not decided: why.
    pub error: Option<ErrorDetail>,
}

/// `POST /v1/approvals/bulk`: one result per id, in order.
#[derive(ToSchema)]
pub struct BulkDecided {
    /// How many were decided.
    pub decided: u64,
    /// How many were not.
    pub failed: u64,
    /// One per id.
    pub results: Vec<BulkResult>,
}

/// `POST /v1/callbacks/n8n`: the step result is recorded.
#[derive(ToSchema)]
pub struct CallbackRecorded {
    /// `true`.
    pub ok: bool,
    /// The job.
    pub job_id: String,
    /// The step.
    pub step: String,
    /// The attempt.
    pub attempt: u32,
    /// When (RFC 3339).
    pub recorded_at: String,
}

/// A row of the executions read model (`workflows_executions`).
#[derive(ToSchema)]
pub struct Execution {
    /// The stream sequence of the job's first event.
    pub id: i64,
    /// The job id, as submitted.
    pub job_id: String,
    /// The workflow key, as submitted.
    pub workflow_key: String,
    /// The job's inputs, as submitted.
    pub inputs: Option<Value>,
    /// Its outputs, once completed (step name -> the step's output).
    pub outputs: Option<Value>,
    /// `workflow_key`'s deprecated alias, for one release.
    #[schema(deprecated)]
    pub workflow_id: String,
    /// `job_id`'s deprecated alias, for one release.
    #[schema(deprecated)]
    pub execution_id: String,
    /// Its status.
    #[schema(inline)]
    pub status: ExecutionStatus,
    /// `inputs`' deprecated alias, for one release.
    #[schema(deprecated)]
    pub input_data: Option<Value>,
    /// `outputs`' deprecated alias, for one release.
    #[schema(deprecated)]
    pub output_data: Option<Value>,
    /// Why it failed.
    pub error_code: Option<String>,
    /// What failed.
    pub error_message: Option<String>,
    /// The client whose job it is.
    pub client_id: String,
    /// 1 to 10.
    pub priority: i16,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub completed_at: Option<DateTime<Utc>>,
    /// How long it ran.
    pub duration_ms: Option<i32>,
    /// When it was submitted.
    pub created_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// The stream sequence of the last event applied.
    pub last_seq: i64,
    /// The failed or cancelled job this one retries (`POST
    /// /v1/jobs/{id}/retry`); null when it is not a retry.
    pub retry_of: Option<String>,
    /// The job that retries this one; null when it was not retried.
    pub retried_by: Option<String>,
}

/// Why the job handler parked a job it cannot drive.
#[derive(ToSchema)]
pub struct Parked {
    /// Why.
    pub reason: String,
    /// The stream sequence it stopped at.
    pub seq: i64,
    /// When.
    pub parked_at: DateTime<Utc>,
}

/// `GET /v1/jobs/{id}/status`.
#[derive(ToSchema)]
pub struct JobStatus {
    /// The job.
    pub job_id: String,
    /// Its status.
    #[schema(inline)]
    pub status: ExecutionStatus,
    /// Its workflow.
    pub workflow_key: String,
    /// Why it failed.
    pub error_code: Option<String>,
    /// What failed.
    pub error_message: Option<String>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// Set when the job handler parked the job; else null.
    pub parked: Option<Parked>,
}

/// A page of executions, newest first.
#[derive(ToSchema)]
pub struct ExecutionsPage {
    /// The rows.
    pub items: Vec<Execution>,
    /// Pass as `cursor` for the next page; null: the last page.
    pub next_cursor: Option<String>,
}

/// A row of the audit trail: one per event.
#[derive(ToSchema)]
pub struct AuditRow {
    /// The commit's stream sequence.
    pub stream_seq: i64,
    /// The event's place in its commit.
    pub event_index: i16,
    /// The event's id.
    pub event_id: String,
    /// When.
    pub occurred_at: DateTime<Utc>,
    /// The actor's client id.
    pub client_id: String,
    /// The person behind the client, if named.
    pub user_id: Option<String>,
    /// `job`, `approval`, `workflow`, ...
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The job it concerns.
    pub job_id: Option<String>,
    /// The workflow it concerns.
    pub workflow_key: Option<String>,
    /// The event type.
    pub action: String,
    /// The step or node.
    pub step: Option<String>,
    /// The status it records.
    pub status: Option<String>,
    /// An error's code.
    pub error_code: Option<String>,
    /// An error's message.
    pub error_message: Option<String>,
    /// How long it took.
    pub duration_ms: Option<i64>,
    /// The event's hash in the chain.
    pub event_hash: String,
    /// The n8n execution that answered a step (`StepResultRecorded` of an
    /// n8n step that named it); absent in rows written before a rebuild
    /// added the column.
    pub n8n_execution_id: Option<String>,
}

/// A page of audit rows, in stream order.
#[derive(ToSchema)]
pub struct AuditPage {
    /// The rows.
    pub items: Vec<AuditRow>,
    /// Pass as `cursor` for the next page; null: the last page.
    pub next_cursor: Option<String>,
}

/// A row of the secret-access read model (never a value).
#[derive(ToSchema)]
pub struct SecretAccess {
    /// The commit's stream sequence.
    pub stream_seq: i64,
    /// The event's place in its commit.
    pub event_index: i16,
    /// The event's id.
    pub event_id: String,
    /// When.
    pub occurred_at: DateTime<Utc>,
    /// The read's id.
    pub request_id: String,
    /// Who read (the actor).
    pub client_id: String,
    /// The person behind the client, if named.
    pub user_id: Option<String>,
    /// The KV v2 path.
    pub path: String,
    /// The field asked for.
    pub field: Option<String>,
    /// The version asked for; null: the current one.
    pub requested_version: Option<i64>,
    /// The version served.
    pub kv_version: Option<i64>,
    /// Why it was read.
    pub purpose: String,
    /// On behalf of this job.
    pub job_id: Option<String>,
    /// And step.
    pub step: Option<String>,
    /// `granted`, `denied` or `failed`.
    #[schema(inline)]
    pub decision: AccessDecision,
    /// Denied: `policy` or `vault`.
    pub decided_by: Option<String>,
    /// The policy rule.
    pub rule: Option<String>,
    /// Granted: `vault`, `cache` or `last_known_good`.
    pub source: Option<String>,
    /// Failed: `unavailable` or `not_found`.
    pub code: Option<String>,
    /// Why it was denied.
    pub reason: Option<String>,
    /// Vault's error kind.
    pub vault_error_kind: Option<String>,
    /// Vault's status.
    pub vault_error_status: Option<i32>,
    /// Vault's message.
    pub vault_error_message: Option<String>,
    /// Granted: when Vault was read.
    pub read_from_vault_at: Option<DateTime<Utc>>,
    /// The event's hash in the chain.
    pub event_hash: String,
}

/// A page of secret accesses, in stream order.
#[derive(ToSchema)]
pub struct SecretAccessPage {
    /// The rows.
    pub items: Vec<SecretAccess>,
    /// Pass as `cursor` for the next page; null: the last page.
    pub next_cursor: Option<String>,
}

/// A row of the approvals read model.
#[derive(ToSchema)]
pub struct Approval {
    /// The approval (the job's id).
    pub approval_id: String,
    /// The job.
    pub job_id: String,
    /// Its workflow.
    pub workflow_key: String,
    /// Its status.
    #[schema(inline)]
    pub status: ApprovalStatus,
    /// Who asked.
    pub requested_by: String,
    /// Why.
    pub request_reason: Option<String>,
    /// When the window ends.
    pub expires_at: DateTime<Utc>,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Why.
    pub decision_reason: Option<String>,
    /// When.
    pub decided_at: Option<DateTime<Utc>>,
    /// When requested.
    pub created_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// The stream sequence of the last event applied.
    pub last_seq: i64,
}

/// A page of approvals, newest first.
#[derive(ToSchema)]
pub struct ApprovalsPage {
    /// The rows.
    pub items: Vec<Approval>,
    /// Pass as `cursor` for the next page; null: the last page.
    pub next_cursor: Option<String>,
}

/// The job an approval is for.
#[derive(ToSchema)]
pub struct ApprovalJob {
    /// The job id.
    pub job_id: String,
    /// The job id: the deprecated alias of `job_id`, for one release.
    #[schema(deprecated)]
    pub execution_id: String,
    /// Its status.
    #[schema(inline)]
    pub status: ExecutionStatus,
    /// Its workflow.
    pub workflow_key: String,
    /// Whose job it is.
    pub client_id: String,
    /// 1 to 10.
    pub priority: i16,
    /// When submitted.
    pub created_at: DateTime<Utc>,
    /// Its inputs.
    pub inputs: Option<Value>,
}

/// `GET /v1/approvals/{id}`: the approval and its job.
#[derive(ToSchema)]
pub struct ApprovalView {
    /// The approval's row.
    #[serde(flatten)]
    pub approval: Approval,
    /// Its job; null until the executions read model has it.
    pub job: Option<ApprovalJob>,
}

/// `POST /v1/secrets/read`: the value, after its access was recorded.
#[derive(ToSchema)]
pub struct SecretRead {
    /// `true`.
    pub ok: bool,
    /// The read's id (in the access event).
    pub request_id: String,
    /// The KV v2 path.
    pub path: String,
    /// The field asked for; null: the whole secret.
    pub field: Option<String>,
    /// The version served.
    pub kv_version: u64,
    /// `vault`, `cache` or `last_known_good`.
    pub source: String,
    /// The stream sequence of the access event.
    pub event_seq: u64,
    /// The value (the field's, or the whole secret's data).
    pub value: Value,
}

/// `POST /v1/secrets/invalidate`: recorded.
#[derive(ToSchema)]
pub struct SecretInvalidated {
    /// `true`.
    pub ok: bool,
    /// The path dropped.
    pub path: String,
    /// The stream sequence of SecretCacheInvalidated.
    pub event_seq: u64,
}

/// `POST /v1/memory/{command}`: what was recorded.
#[derive(ToSchema)]
pub struct MemoryWritten {
    /// `true`.
    pub ok: bool,
    /// The subject.
    pub subject_id: String,
    /// The commit's stream sequence (absent when nothing changed).
    pub stream_seq: Option<u64>,
    /// Whether it was recorded before (a repeat).
    pub duplicate: Option<bool>,
    /// `true` when nothing changed and no event was recorded.
    pub unchanged: Option<bool>,
    /// The event types recorded.
    pub events: Vec<String>,
    /// The episode recorded, if any.
    pub episode_id: Option<String>,
}

/// A chunk of an episode, ranked against the query.
#[derive(ToSchema)]
pub struct Chunk {
    /// Its episode.
    pub episode_id: String,
    /// Its place in the episode.
    pub index: i32,
    /// Its text.
    pub text: String,
    /// When the turn happened.
    pub turn_at: DateTime<Utc>,
    /// Its rank (text rank, or 1 - cosine distance).
    pub score: f32,
}

/// Why the extractor gave up on an episode.
#[derive(ToSchema)]
pub struct ExtractionError {
    /// `extraction_failed`.
    pub code: String,
    /// The reason code.
    pub reason: String,
}

/// An episode: a turn.
#[derive(ToSchema)]
pub struct Episode {
    /// Its id.
    pub episode_id: String,
    /// When the turn happened.
    pub turn_at: DateTime<Utc>,
    /// The episodes list: when it was recorded.
    pub recorded_at: Option<DateTime<Utc>>,
    /// The turn's messages `[{role, content}]`.
    pub messages: Value,
    /// The assistant's answer.
    pub response: Value,
    /// null (not asked), `pending`, `done` or `failed`.
    pub extraction: Option<String>,
    /// Once the extractor gave up.
    pub extraction_error: Option<ExtractionError>,
}

/// A fact, one version.
#[derive(ToSchema)]
pub struct Fact {
    /// What it is about.
    pub subject: String,
    /// Which attribute.
    pub key: String,
    /// Its value.
    pub value: Value,
    /// 0 to 1.
    pub confidence: f64,
    /// `command` or `extractor`.
    pub source: String,
    /// Its version.
    pub version: i32,
    /// Valid from.
    pub valid_from: DateTime<Utc>,
    /// The facts list: valid until (superseded or forgotten); null: valid.
    pub invalid_at: Option<DateTime<Utc>>,
    /// The facts list with `q`: its full-text rank (higher first).
    pub score: Option<f32>,
}

/// A working-state value.
#[derive(ToSchema)]
pub struct WorkingValue {
    /// The value.
    pub value: Value,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// `POST /v1/memory/assemble`: what a prompt needs of a subject.
#[derive(ToSchema)]
pub struct Assembled {
    /// `true`.
    pub ok: bool,
    /// The subject.
    pub subject_id: String,
    /// Its profile fields; null when never set.
    pub profile: Option<Value>,
    /// The top-k chunks.
    pub chunks: Vec<Chunk>,
    /// The recent episodes, newest first.
    pub recent_episodes: Vec<Episode>,
    /// The valid facts.
    pub facts: Vec<Fact>,
    /// The working state not expired, by key.
    pub working_state: BTreeMap<String, WorkingValue>,
    /// `vector`, `hybrid`, `full_text` or `full_text_fallback`.
    pub retrieval: String,
    /// How long it took.
    pub took_ms: u64,
}

/// `GET /v1/memory/subjects/{subject_id}/episodes`.
#[derive(ToSchema)]
pub struct EpisodesPage {
    /// Newest first.
    pub items: Vec<Episode>,
}

/// `GET /v1/memory/subjects/{subject_id}/facts`.
#[derive(ToSchema)]
pub struct FactsPage {
    /// By subject, key and version.
    pub items: Vec<Fact>,
}

/// `GET /v1/memory/subjects/{subject_id}/profile`.
#[derive(ToSchema)]
pub struct Profile {
    /// The subject.
    pub subject_id: String,
    /// Its fields; null when never set.
    pub fields: Option<Value>,
    /// When last set.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The job handler's state.
#[derive(ToSchema)]
pub struct HandlerHealth {
    /// `running`, `no_lease`, `restarting`, ...
    pub state: String,
    /// Why, when it is not running as it should.
    pub reason: Option<String>,
}

/// A read model's projection.
#[derive(ToSchema)]
pub struct ProjectionHealth {
    /// Its name.
    pub name: String,
    /// Its schema version.
    pub version: i32,
    /// Whether readers' views point at it.
    pub active: bool,
    /// `running`, `stopped` or `building`.
    pub state: String,
    /// The last stream sequence applied.
    pub checkpoint: i64,
    /// How far behind the stream.
    pub lag: Option<i64>,
    /// The sequence a stopped projection could not apply.
    pub stopped_at: Option<i64>,
    /// Why.
    pub error: Option<String>,
}

/// `GET /healthz`.
#[derive(ToSchema)]
pub struct Health {
    /// Everything is fine.
    pub ok: bool,
    /// The instance is draining before it stops.
    pub draining: bool,
    /// The job handler's state; null: none runs here.
    pub handler: Option<HandlerHealth>,
    /// `ok` or `unreachable`.
    pub nats: String,
    /// `ok` or `unreachable`.
    pub postgres: String,
    /// The event stream's last sequence.
    pub stream_last_seq: Option<u64>,
    /// The projections.
    pub projections: Vec<ProjectionHealth>,
}

/// `GET /v1/me`: who the bearer token is.
#[derive(ToSchema)]
pub struct Me {
    /// The `[[clients]]` id the token belongs to: the actor of its commands.
    pub client_id: String,
    /// Its role.
    #[schema(inline)]
    pub role: MeRole,
}

/// A caller's role over HTTP.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MeRole {
    /// Submits, reads and cancels its own jobs.
    Client,
    /// Also decides approvals, flips the kill-switch, acts on any job.
    Operator,
    /// Reads everything, commands nothing.
    Auditor,
}

/// One Server-Sent Event of `GET /v1/jobs/{id}/events`, as a reader
/// parses it.
#[derive(ToSchema)]
pub struct LiveEvent {
    /// `job_event` per stored event of the job, then `end`.
    #[schema(inline)]
    pub event: LiveEventName,
    /// JSON text. `job_event`: seq, index, event_type, version,
    /// occurred_at, and step, attempt, status, error_code, duration_ms,
    /// n8n_execution_id where the event has them. `end`: reason (`final` with the final
    /// event_type, `time_limit`, `draining`, `log_unavailable`).
    #[schema(content_media_type = "application/json")]
    pub data: String,
    /// `<stream seq>-<index in its commit>` (a `job_event` only).
    pub id: Option<String>,
}

/// The name of a live event.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LiveEventName {
    /// A stored event of the job.
    JobEvent,
    /// The stream's last event.
    End,
}

/// `GET /livez`.
#[derive(ToSchema)]
pub struct Live {
    /// `true`.
    pub ok: bool,
}

/// `GET /readyz`.
#[derive(ToSchema)]
pub struct Ready {
    /// It can take commands.
    pub ok: bool,
    /// `ok`, `stream_unavailable` or `disconnected`.
    pub nats: String,
    /// It is stopping.
    pub draining: bool,
    /// The event stream's last sequence.
    pub stream_last_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use utoipa::OpenApi;

    use super::ApiDoc;

    fn doc() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("the document serializes")
    }

    /// The schema a `$ref` names, or the schema itself.
    fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("a local schema ref: {r}"));
                let found = &doc["components"]["schemas"][name];
                assert!(!found.is_null(), "{r} is declared");
                found
            }
            None => schema,
        }
    }

    /// A body schema says what it holds: a typed object (properties, or
    /// one of several), a list, or a scalar; never a bare `{"type": "object"}`.
    fn typed(doc: &Value, schema: &Value) -> bool {
        let s = resolve(doc, schema);
        s.get("properties").is_some()
            || s.get("oneOf").is_some()
            || s.get("allOf").is_some()
            || (s.get("type").is_some() && s["type"] != "object")
    }

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                ops.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
        ops
    }

    #[test]
    fn every_operation_answers_a_typed_2xx_and_its_errors_with_the_error_body() {
        let doc = doc();
        let ops = operations(&doc);
        assert!(
            ops.len() >= 27,
            "every route is in the document: {}",
            ops.len()
        );
        for (method, path, op) in &ops {
            let name = format!("{method} {path}");
            let responses = op["responses"].as_object().expect("responses");
            let ok: Vec<_> = responses.keys().filter(|s| s.starts_with('2')).collect();
            assert!(!ok.is_empty(), "{name}: a 2xx answer");
            for status in ok {
                let content = responses[status]["content"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{name} {status}: a body"));
                for (media, c) in content {
                    assert!(
                        typed(&doc, &c["schema"]),
                        "{name} {status} {media}: a typed schema, not {}",
                        c["schema"]
                    );
                }
            }
            if let Some(body) = op.get("requestBody") {
                let schema = &body["content"]["application/json"]["schema"];
                assert!(typed(&doc, schema), "{name}: a typed request body");
            }
            if !path.starts_with("/v1/") {
                continue;
            }
            let errors: Vec<_> = responses
                .keys()
                .filter(|s| s.starts_with('4') || s.starts_with('5'))
                .collect();
            assert!(errors.iter().any(|s| *s == "503"), "{name}: 503");
            if method == "POST" {
                for s in ["400", "413"] {
                    assert!(responses.contains_key(s), "{name}: {s}");
                }
            }
            for status in errors {
                assert_eq!(
                    responses[status]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{name} {status}: the error body"
                );
            }
        }
        let error = &doc["components"]["schemas"]["ErrorDetail"];
        assert_eq!(
            error["required"],
            serde_json::json!(["code", "message"]),
            "{error}"
        );
        for p in ["code", "message", "param", "reason", "request_id"] {
            assert!(error["properties"].get(p).is_some(), "ErrorDetail.{p}");
        }
    }

    /// Every `$ref` anywhere in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_schema_referred_to_is_declared() {
        let doc = doc();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 100, "the document refers to its schemas");
        for r in all {
            resolve(&doc, &serde_json::json!({ "$ref": r }));
        }
    }

    #[test]
    fn only_the_v1_routes_but_the_n8n_callback_need_a_bearer_token() {
        let doc = doc();
        assert!(doc.get("security").is_none(), "no global security");
        for (method, path, op) in operations(&doc) {
            let name = format!("{method} {path}");
            let bearer = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            let signed = path == "/v1/callbacks/n8n";
            assert_eq!(
                bearer,
                path.starts_with("/v1/") && !signed,
                "{name}: bearer {bearer}"
            );
            assert_eq!(
                op["responses"].get("401").is_some(),
                path.starts_with("/v1/"),
                "{name}: 401 where a token or signature is checked"
            );
            if signed {
                let headers: Vec<_> = op["parameters"]
                    .as_array()
                    .expect("parameters")
                    .iter()
                    .filter(|p| p["in"] == "header" && p["required"] == true)
                    .map(|p| p["name"].as_str().unwrap_or_default().to_string())
                    .collect();
                assert_eq!(
                    headers,
                    [crate::crypto::HDR_TIMESTAMP, crate::crypto::HDR_SIGNATURE],
                    "{name}: its signature headers"
                );
            }
        }
    }

    #[test]
    fn a_lists_documented_parameters_are_the_ones_it_accepts() {
        use crate::api::query::accepted;
        let doc = doc();
        let documented = |path: &str| -> Vec<String> {
            doc["paths"][path]["get"]["parameters"]
                .as_array()
                .unwrap_or_else(|| panic!("{path}: parameters"))
                .iter()
                .filter(|p| p["in"] == "query")
                .map(|p| p["name"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        for (path, fields) in [
            ("/v1/executions", accepted::<super::ExecutionsQuery>()),
            ("/v1/audit", accepted::<super::AuditQuery>()),
            (
                "/v1/audit/secret-accesses",
                accepted::<super::SecretAccessesQuery>(),
            ),
            ("/v1/approvals", accepted::<super::ApprovalsQuery>()),
            (
                "/v1/memory/subjects/{subject_id}/episodes",
                accepted::<super::EpisodesQuery>(),
            ),
            (
                "/v1/memory/subjects/{subject_id}/facts",
                accepted::<super::FactsQuery>(),
            ),
        ] {
            assert!(!fields.is_empty(), "{path}");
            assert_eq!(documented(path), fields, "{path}");
        }
        assert_eq!(
            documented("/v1/executions"),
            [
                "workflow_key",
                "workflow_id",
                "status",
                "since",
                "until",
                "limit",
                "cursor"
            ]
        );
    }

    #[test]
    fn the_status_names_are_the_documented_ones() {
        use super::{AccessDecision, ApprovalStatus, ExecutionStatus};
        let doc = doc();
        let names = |path: &str, param: &str| -> Vec<String> {
            let p = doc["paths"][path]["get"]["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == param))
                .unwrap_or_else(|| panic!("{path} {param}"));
            serde_json::from_value(p["schema"]["enum"].clone())
                .unwrap_or_else(|e| panic!("{path} {param}: {e}: {p}"))
        };
        use ExecutionStatus as E;
        let exec: Vec<_> = [
            E::Pending,
            E::AwaitingApproval,
            E::Running,
            E::Completed,
            E::Failed,
            E::Cancelled,
        ]
        .map(E::as_str)
        .to_vec();
        assert_eq!(names("/v1/executions", "status"), exec);
        assert_eq!(exec, crate::api::read::JOB_STATUSES);
        use AccessDecision as D;
        assert_eq!(
            names("/v1/audit/secret-accesses", "decision"),
            [D::Granted, D::Denied, D::Failed].map(D::as_str)
        );
        use ApprovalStatus as A;
        assert_eq!(
            names("/v1/approvals", "status"),
            [A::Pending, A::Approved, A::Rejected, A::Expired].map(A::as_str)
        );
    }
}
