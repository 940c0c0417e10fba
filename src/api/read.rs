//! The read API over the projections: one job, executions, the audit
//! trail, approvals, secret accesses. Handlers are named `resource_verb`;
//! lists are keyset pages `{items, next_cursor}`.
//!
//! Operators and auditors read everything. A caller with the client role
//! reads only its own jobs (`client_id`), and the audit rows and approvals
//! of those jobs; another client's job answers 404, as if it did not exist.
//! The secret-access list is the operators' and auditors' alone (403 for a
//! client).

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{QueryBuilder, Row};

use super::caller::{Caller, Role};
use super::http::{bad, ApiError, AppState};
use super::openapi::{
    ApprovalView, ApprovalsPage, ApprovalsQuery, AuditPage, AuditQuery, Execution, ExecutionsPage,
    ExecutionsQuery, JobStatus, SecretAccessPage, SecretAccessesQuery,
};
use super::query::{ApiQuery, DEFAULT_LIMIT};

/// A `workflows_executions e` row as JSON in the job contract's names
/// (`job_id`, `workflow_key`, `inputs`, `outputs`, as `POST /v1/jobs`
/// takes them), with the read model's own column names beside them for one
/// release (`execution_id`, `workflow_id`, `input_data`, `output_data`:
/// deprecated, docs/OPERATIONS.md "One vocabulary").
/// `retry_of` and `retried_by` (the retry links) are null when none, and
/// on a read-model version made before them (a rebuild adds them).
pub(crate) const JOB_ROW: &str = "(to_jsonb(e) || jsonb_build_object('job_id', e.execution_id,      'workflow_key', e.workflow_id, 'inputs', e.input_data, 'outputs', e.output_data,      'retry_of', to_jsonb(e) -> 'retry_of', 'retried_by', to_jsonb(e) -> 'retried_by'))";

/// The client whose jobs `caller` may read; `None`: all (operators).
fn own_client(caller: &Caller) -> Option<String> {
    caller.job_scope().map(str::to_string)
}

/// Restricts rows with a `job_id` column to `caller`'s jobs.
fn only_own_jobs(q: &mut QueryBuilder<'_, sqlx::Postgres>, caller: &Caller) {
    if let Some(c) = own_client(caller) {
        q.push(" AND job_id IN (SELECT execution_id FROM workflows_executions WHERE client_id = ")
            .push_bind(c)
            .push(")");
    }
}

fn cursor_of(t: DateTime<Utc>, key: &str) -> String {
    format!("{}_{key}", t.timestamp_micros())
}

/// `{items, next_cursor}` from rows holding a `row` JSON column; a next
/// cursor (built from the last row) only when the page is full.
fn page(
    rows: &[sqlx::postgres::PgRow],
    limit: i64,
    cursor: impl Fn(&sqlx::postgres::PgRow) -> Result<String, sqlx::Error>,
) -> Result<Json<Value>, ApiError> {
    let next = match rows.last() {
        Some(r) if rows.len() as i64 == limit => Some(cursor(r)?),
        _ => None,
    };
    let items = rows
        .iter()
        .map(|r| r.try_get::<Value, _>("row"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

pub(crate) fn valid_id(param: &str, id: &str) -> Result<(), ApiError> {
    if crate::events::log::valid_aggregate_id(id) {
        Ok(())
    } else {
        Err(bad(param, "ids are 1-128 characters of A-Z a-z 0-9 _ -"))
    }
}

#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path, description = "job id")),
    security(("bearer" = [])),
    responses((status = 200, description = "the job's execution row (workflows_executions); status pending, awaiting_approval (its approval is requested and undecided), running, completed, failed or cancelled", body = Execution),
              (status = 404, description = "no such job"), (status = 400, description = "bad id")))]
pub(crate) async fn jobs_get(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    valid_id("id", &id)?;
    let row: Option<Value> = sqlx::query_scalar(&format!(
        "SELECT {JOB_ROW} FROM workflows_executions e
             WHERE execution_id = $1 AND ($2::text IS NULL OR client_id = $2)"
    ))
    .bind(&id)
    .bind(own_client(&caller))
    .fetch_optional(&s.pool)
    .await?;
    row.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("job {id}")))
}

#[utoipa::path(get, path = "/v1/me",
    security(("bearer" = [])),
    responses((status = 200, description = "who the bearer token is: its client id and role", body = super::openapi::Me)))]
pub(crate) async fn me_get(Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!({"client_id": caller.client_id, "role": caller.role.as_str()}))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/status", params(("id" = String, Path, description = "job id")),
    security(("bearer" = [])),
    responses((status = 200, description = "status of the job (pending, awaiting_approval, running, completed, failed, cancelled); `parked` (reason, seq, parked_at) when the job handler parked it, else null", body = JobStatus),
              (status = 404, description = "no such job"), (status = 400, description = "bad id")))]
pub(crate) async fn jobs_status(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    valid_id("id", &id)?;
    let row: Option<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('job_id', execution_id, 'status', status, \
                'workflow_key', workflow_id,
                'error_code', error_code, 'error_message', error_message, 'updated_at', updated_at,
                'parked', (SELECT jsonb_build_object('reason', p.reason, 'seq', p.seq, \
                                                     'parked_at', p.parked_at)
                           FROM handler_parked_jobs p WHERE p.job_id = e.execution_id))
         FROM workflows_executions e
         WHERE execution_id = $1 AND ($2::text IS NULL OR client_id = $2)",
    )
    .bind(&id)
    .bind(own_client(&caller))
    .fetch_optional(&s.pool)
    .await?;
    row.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("job {id}")))
}

/// A job's statuses, as the executions list filters on them (and the
/// command line's `jobs list --status`).
pub(crate) const JOB_STATUSES: [&str; 6] = [
    "pending",
    "awaiting_approval",
    "running",
    "completed",
    "failed",
    "cancelled",
];

#[utoipa::path(get, path = "/v1/executions", params(ExecutionsQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "executions, newest first: {items, next_cursor}", body = ExecutionsPage),
              (status = 400, description = "a bad parameter, named in error.param")))]
pub(crate) async fn executions_list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<ExecutionsQuery>,
) -> Result<Json<Value>, ApiError> {
    #[allow(deprecated)] // the alias is read, for one release
    let alias = p.workflow_id;
    let workflow = match (p.workflow_key, alias) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "workflow_id",
                "give workflow_key alone (workflow_id is its deprecated alias)",
            ))
        }
        (key, alias) => key.or(alias),
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    let mut q = QueryBuilder::new(format!(
        "SELECT {JOB_ROW} AS row, created_at, id FROM workflows_executions e WHERE TRUE"
    ));
    if let Some(c) = own_client(&caller) {
        q.push(" AND client_id = ").push_bind(c);
    }
    if let Some(w) = workflow {
        q.push(" AND workflow_id = ").push_bind(w);
    }
    if let Some(st) = p.status {
        q.push(" AND status = ").push_bind(st.as_str());
    }
    if let Some(t) = p.since {
        q.push(" AND created_at >= ").push_bind(t);
    }
    if let Some(t) = p.until {
        q.push(" AND created_at < ").push_bind(t);
    }
    if let Some((t, id)) = p.cursor {
        q.push(" AND (created_at, id) < (")
            .push_bind(t)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit);
    let rows = q.build().fetch_all(&s.pool).await?;
    page(&rows, limit, |r| {
        Ok(cursor_of(
            r.try_get("created_at")?,
            &r.try_get::<i64, _>("id")?.to_string(),
        ))
    })
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "audit rows in stream order: {items, next_cursor}", body = AuditPage),
              (status = 400, description = "a bad parameter, named in error.param")))]
pub(crate) async fn audit_list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut q = QueryBuilder::new(
        "SELECT to_jsonb(a) AS row, stream_seq, event_index FROM audit_trail a WHERE TRUE",
    );
    only_own_jobs(&mut q, &caller);
    if let Some(v) = p.job_id {
        q.push(" AND job_id = ").push_bind(v);
    }
    if let Some(v) = p.client_id {
        q.push(" AND client_id = ").push_bind(v);
    }
    if let Some(v) = p.action {
        q.push(" AND action = ").push_bind(v);
    }
    if let Some(t) = p.since {
        q.push(" AND occurred_at >= ").push_bind(t);
    }
    if let Some(t) = p.until {
        q.push(" AND occurred_at < ").push_bind(t);
    }
    after_cursor(&mut q, p.cursor);
    stream_page(q, &s.pool, p.limit.unwrap_or(DEFAULT_LIMIT)).await
}

/// Runs a query over rows with `stream_seq` and `event_index` in stream
/// order, one page of `limit`, its cursor `<seq>_<index>`.
async fn stream_page(
    mut q: QueryBuilder<'_, sqlx::Postgres>,
    pool: &sqlx::PgPool,
    limit: i64,
) -> Result<Json<Value>, ApiError> {
    q.push(" ORDER BY stream_seq, event_index LIMIT ")
        .push_bind(limit);
    let rows = q.build().fetch_all(pool).await?;
    page(&rows, limit, |r| {
        Ok(format!(
            "{}_{}",
            r.try_get::<i64, _>("stream_seq")?,
            r.try_get::<i16, _>("event_index")?
        ))
    })
}

/// Adds `AND (stream_seq, event_index) > cursor`.
fn after_cursor(q: &mut QueryBuilder<'_, sqlx::Postgres>, after: Option<(i64, i16)>) {
    if let Some((seq, idx)) = after {
        q.push(" AND (stream_seq, event_index) > (")
            .push_bind(seq)
            .push(", ")
            .push_bind(idx)
            .push(")");
    }
}

/// `prefix` as a `LIKE` pattern: `\`, `%` and `_` escaped, `%` appended.
fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

#[utoipa::path(get, path = "/v1/audit/secret-accesses", params(SecretAccessesQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "secret accesses (secret_accesses rows, never a value) in stream order: {items, next_cursor}", body = SecretAccessPage),
              (status = 400, description = "a bad parameter, named in error.param"),
              (status = 403, description = "needs the operator or auditor role")))]
pub(crate) async fn secret_accesses_list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<ApiQuery<SecretAccessesQuery>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    // another client's reads are not a client's to see: the role first
    caller.require(&[Role::Operator, Role::Auditor], "listing secret accesses")?;
    let ApiQuery(p) = query?;
    if let (Some(a), Some(b)) = (p.since, p.until) {
        if b < a {
            return Err(bad("until", "is before since"));
        }
    }
    let mut q = QueryBuilder::new(
        "SELECT to_jsonb(a) AS row, stream_seq, event_index FROM secret_accesses a WHERE TRUE",
    );
    if let Some(v) = p.path {
        q.push(" AND path = ").push_bind(v);
    }
    if let Some(v) = p.path_prefix {
        q.push(" AND path LIKE ").push_bind(like_prefix(&v));
    }
    if let Some(v) = p.client_id {
        q.push(" AND client_id = ").push_bind(v);
    }
    if let Some(v) = p.job_id {
        q.push(" AND job_id = ").push_bind(v);
    }
    if let Some(v) = p.decision {
        q.push(" AND decision = ").push_bind(v.as_str());
    }
    if let Some(t) = p.since {
        q.push(" AND occurred_at >= ").push_bind(t);
    }
    if let Some(t) = p.until {
        q.push(" AND occurred_at < ").push_bind(t);
    }
    after_cursor(&mut q, p.cursor);
    stream_page(q, &s.pool, p.limit.unwrap_or(DEFAULT_LIMIT)).await
}

#[utoipa::path(get, path = "/v1/approvals", params(ApprovalsQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "approvals, newest first: {items, next_cursor}", body = ApprovalsPage),
              (status = 400, description = "a bad parameter, named in error.param")))]
pub(crate) async fn approvals_list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(p): ApiQuery<ApprovalsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    let mut q = QueryBuilder::new(
        "SELECT to_jsonb(a) AS row, created_at, approval_id FROM approvals a WHERE TRUE",
    );
    only_own_jobs(&mut q, &caller);
    if let Some(st) = p.status {
        q.push(" AND status = ").push_bind(st.as_str());
    }
    if let Some((t, id)) = p.cursor {
        q.push(" AND (created_at, approval_id) < (")
            .push_bind(t)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" ORDER BY created_at DESC, approval_id DESC LIMIT ")
        .push_bind(limit);
    let rows = q.build().fetch_all(&s.pool).await?;
    page(&rows, limit, |r| {
        Ok(cursor_of(
            r.try_get("created_at")?,
            &r.try_get::<String, _>("approval_id")?,
        ))
    })
}

#[utoipa::path(get, path = "/v1/approvals/{id}", params(("id" = String, Path, description = "approval id (the job id)")),
    security(("bearer" = [])),
    responses((status = 200, description = "the approval (approvals row: approval_id, job_id, workflow_key, status, requested_by, request_reason, expires_at, decided_by, decision_reason, decided_at, ...) with `job`: the job's job_id (and its deprecated alias execution_id), status, client_id, priority, created_at and `inputs` (its input_data); `job` is null until the executions read model has the job", body = ApprovalView),
              (status = 400, description = "bad id"),
              (status = 404, description = "no such approval, or another client's (the two answer alike)")))]
pub(crate) async fn approvals_get(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    valid_id("id", &id)?;
    // a client sees only the approvals of its own jobs, as in the list
    let mut q = QueryBuilder::new(
        "SELECT to_jsonb(a) || jsonb_build_object('job', \
           (SELECT jsonb_build_object('job_id', e.execution_id, \
                   'execution_id', e.execution_id, 'status', e.status, \
                   'workflow_key', e.workflow_id, 'client_id', e.client_id, \
                   'priority', e.priority, 'created_at', e.created_at, 'inputs', e.input_data) \
            FROM workflows_executions e WHERE e.execution_id = a.job_id)) \
         FROM approvals a WHERE approval_id = ",
    );
    q.push_bind(&id);
    only_own_jobs(&mut q, &caller);
    let row: Option<Value> = q.build_query_scalar().fetch_optional(&s.pool).await?;
    row.map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("approval {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_prefix_matches_literally() {
        assert_eq!(
            like_prefix("secret/data/ext_apis/"),
            "secret/data/ext\\_apis/%"
        );
        assert_eq!(like_prefix("a%b\\"), "a\\%b\\\\%");
        assert!("secret/data/a_b"
            .chars()
            .all(super::super::query::path_char));
        assert!(!"secret/data/a%".chars().all(super::super::query::path_char));
    }
}
