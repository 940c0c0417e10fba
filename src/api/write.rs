//! Commands over HTTP (seed 002 contract and more): submit and cancel jobs,
//! the kill-switch, approvals, and the registry listing. Every command runs
//! on the same [`CommandBus`](crate::bus::CommandBus) as NATS commands; the
//! caller's client id is the actor recorded on the events. An auditor
//! (read-only) is refused `forbidden` by every endpoint here that sends a
//! command.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;
use utoipa::ToSchema;
use uuid::Uuid;

use super::body::{from_fields, parse_object};
use super::caller::Caller;
use super::http::{ApiError, AppState};
use crate::bus::{ids, CommandError};
use crate::commands::approval::{ApprovalCommand, ApprovalError, Decide};
use crate::commands::job::{CancelJob, JobCommand, JobError, SubmitJob};
use crate::commands::registry::WorkflowDefinition;
use crate::commands::workflow::{WorkflowCommand, WorkflowError};
use crate::commands::DomainError;
use crate::events::chain;
use crate::events::envelope::CommandMeta;
use crate::events::log::valid_aggregate_id;
use crate::events::store::{ExecuteError, Receipt};

/// Most approvals one bulk request decides.
pub const MAX_BULK: usize = 100;

/// The header that makes a command idempotent per client: the same key and
/// request answer the first answer; the same key with another request 409.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The checked `Idempotency-Key` of a request, if it has one.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let values = headers
        .get_all(IDEMPOTENCY_KEY)
        .iter()
        .map(|v| v.to_str().ok());
    checked_idempotency_key(values).map_err(ApiError::Command)
}

/// The checked `Idempotency-Key` among a message's header values (`None`
/// for one that is not text), HTTP's or NATS's: at most one, valid.
pub(crate) fn checked_idempotency_key<'a>(
    mut values: impl Iterator<Item = Option<&'a str>>,
) -> Result<Option<String>, CommandError> {
    let bad = |message: &str| {
        CommandError::validation(
            Some("Idempotency-Key"),
            format!("header `Idempotency-Key`: {message}"),
        )
    };
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad("send it once, not several times"));
    }
    match value {
        Some(key) if ids::idempotency_key_is_valid(key) => Ok(Some(key.to_string())),
        _ => Err(bad(
            "must be 1 to 128 of A-Z a-z 0-9 _ - . (a UUID fits); send a new key",
        )),
    }
}

/// How one HTTP command is told from another: by its `Idempotency-Key`
/// when it has one (the key names the command; its hash covers the route
/// and body), else by the command's own rule (`default`: a job id, a
/// decision, a fresh id).
struct Identity<'a> {
    key: Option<&'a str>,
    request: String,
}

impl Identity<'_> {
    /// The command id, and what its hash is taken of.
    fn of(&self, caller: &Caller, default: String, body: &Value) -> (String, Value) {
        match self.key {
            Some(key) => (
                ids::http_idempotent(&caller.client_id, key),
                json!({"request": self.request, "body": body}),
            ),
            None => (default, body.clone()),
        }
    }

    /// The 409 of a key used before for another request; `None`: `e` is
    /// something else.
    fn reused<E: DomainError>(&self, e: &ExecuteError<E>) -> Option<ApiError> {
        match (self.key, e) {
            (Some(_), ExecuteError::CommandIdReused { .. }) => {
                Some(ApiError::Command(key_reused()))
            }
            _ => None,
        }
    }
}

/// The 409 of an `Idempotency-Key` this client used for another request.
pub(crate) fn key_reused() -> CommandError {
    CommandError {
        code: crate::commands::ErrorCode::Conflict,
        message: "header `Idempotency-Key`: this client already used the key for another \
                  request (another route, id or body); send that same request to get its \
                  answer, or use a new key"
            .into(),
        field: Some("Idempotency-Key".into()),
    }
}

/// The 409 of a reused `Idempotency-Key`, else `e` as it is.
fn reused_or<E: DomainError>(identity: &Identity<'_>, e: ExecuteError<E>) -> ApiError {
    identity.reused(&e).unwrap_or_else(|| command_error(e))
}

/// The job id of a submission without `job_id` sent with `Idempotency-Key`
/// `key` by `client_id`: the same for every repeat (a UUID v8 from a hash of
/// both), so the repeat finds its first answer.
fn keyed_job_id(client_id: &str, key: &str) -> String {
    uuid::Builder::from_custom_bytes(ids::keyed_digest("job-id", client_id, key))
        .into_uuid()
        .to_string()
}

/// Parses a JSON object body (an empty body is `{}`) into `T`, naming the
/// offending field; returns the parsed value too, for hashing.
fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<(Value, T), ApiError> {
    let value = parse_object(bytes, true)?;
    let parsed = from_fields(value.clone())?;
    Ok((value, parsed))
}

fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if valid_aggregate_id(id) {
        Ok(())
    } else {
        Err(ApiError::Command(CommandError::validation(
            Some(field),
            format!("{field} {id:?} is not a valid id (1-128 of A-Z a-z 0-9 _ -)"),
        )))
    }
}

/// Metadata of one HTTP command: the caller is the actor; `hash_of` is
/// what makes a repeated command "the same".
fn meta(
    caller: &Caller,
    user_id: Option<String>,
    command_id: String,
    hash_of: &Value,
) -> CommandMeta {
    let command_hash = chain::to_hex(&chain::sha256(
        json!({"client_id": caller.client_id, "body": hash_of})
            .to_string()
            .as_bytes(),
    ));
    CommandMeta::originating(command_id, caller.actor(user_id), command_hash)
}

fn command_error<E: DomainError>(e: ExecuteError<E>) -> ApiError {
    ApiError::Command(e.into())
}

/// The body of `POST /v1/jobs` (seed 002).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    /// The job's id (1-128 of A-Z a-z 0-9 _ -); default: a new one (with
    /// `Idempotency-Key`: one derived from the key).
    job_id: Option<String>,
    /// The caller's own client id, if named (another is refused).
    client_id: Option<String>,
    /// A key of the workflow registry (`GET /v1/meta`).
    workflow_key: String,
    /// The job's inputs: a JSON object (null: `{}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    inputs: Value,
    /// Where the job's outcome is posted (signed, docs/CALLBACKS.md).
    callback_url: Option<String>,
    /// 1 (low) to 10 (high); default 5.
    #[schema(minimum = 1, maximum = 10)]
    priority: Option<u8>,
    /// The job's deadline in seconds; default 300.
    timeout_seconds: Option<u32>,
    /// Free-form: a JSON object (null: `{}`); `user_id` is recorded as the
    /// actor's person, `confidence` feeds auto-approval.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Value,
}

fn object_or_empty(field: &str, v: Value) -> Result<Value, ApiError> {
    match v {
        Value::Null => Ok(json!({})),
        Value::Object(_) => Ok(v),
        other => Err(ApiError::Command(CommandError::validation(
            Some(field),
            format!("field `{field}`: must be a JSON object, got {other}"),
        ))),
    }
}

/// An upper bound on when a job accepted at `accepted` ends: the approval
/// window (if the workflow needs one) plus the slowest step's attempt
/// timeout, never after the job's own deadline.
fn estimated_completion(
    accepted: DateTime<Utc>,
    def: Option<&WorkflowDefinition>,
    timeout_seconds: u32,
) -> DateTime<Utc> {
    let deadline = accepted + chrono::Duration::seconds(timeout_seconds as i64);
    let Some(def) = def else { return deadline };
    let slowest = def.steps.iter().map(|s| s.timeout_ms).max().unwrap_or(0);
    let approval = if def.requires_approval {
        def.approval_timeout_seconds * 1000
    } else {
        0
    };
    (accepted + chrono::Duration::milliseconds((slowest + approval) as i64)).min(deadline)
}

#[utoipa::path(post, path = "/v1/jobs",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)"),
           ("traceparent" = Option<String>, Header, description = "a W3C trace context (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>): with traces on, the job's trace continues the caller's (docs/OPERATIONS.md \"Traces\"); a malformed one is ignored, never refused")),
    request_body(content = SubmitBody, description = "the job"),
    security(("bearer" = [])),
    responses((status = 202, description = "accepted: job_id, status, message, accepted_at, estimated_completion; the same job_id and body answer the same", body = super::openapi::JobAccepted,
               headers(("Location" = String, description = "/v1/jobs/{job_id}"),
                       ("RateLimit-Limit" = u32, description = "the client's submissions per minute (rate_limit_per_minute): the most it may submit at once"),
                       ("RateLimit-Remaining" = u32, description = "submissions the client may make now, after this one"),
                       ("RateLimit-Reset" = u64, description = "whole seconds until the client's whole allowance is back if it submits nothing more"))),
              (status = 400, description = "bad body or Idempotency-Key; error.param names the field or header"),
              (status = 401, description = "no or unknown bearer token"),
              (status = 403, description = "client_id is not the caller's, or the caller is an auditor (read-only)"),
              (status = 409, description = "job_id already used with a different body, an Idempotency-Key used for another request, or the workflow is disabled"),
              (status = 429, description = "over the client's rate limit; see Retry-After",
               headers(("Retry-After" = u64, description = "whole seconds until the next submission is allowed"),
                       ("RateLimit-Limit" = u32, description = "the client's submissions per minute"),
                       ("RateLimit-Remaining" = u32, description = "0"),
                       ("RateLimit-Reset" = u64, description = "whole seconds until the client's whole allowance is back")))))]
pub(crate) async fn jobs_submit(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // an auditor is refused before it uses any allowance
    caller.require_may_command("submitting a job")?;
    let key = idempotency_key(&headers)?;
    let allowance = s.clients.take_submission(&caller)?;
    // every answer after the allowance was used says what is left of it
    let mut res = submit(&s, &caller, key, &body)
        .instrument(crate::telemetry::intake_span("http", "job.submit"))
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if let Some(a) = allowance {
        a.put(res.headers_mut());
    }
    Ok(res)
}

/// `POST /v1/jobs` once the caller may submit and its allowance is taken.
async fn submit(
    s: &AppState,
    caller: &Caller,
    key: Option<String>,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let (value, b) = parse_body::<SubmitBody>(body)?;
    caller.check_names_self("client_id", b.client_id.as_deref())?;
    let job_id = match (&b.job_id, &key) {
        (Some(id), _) => {
            check_id("job_id", id)?;
            id.clone()
        }
        (None, Some(key)) => keyed_job_id(&caller.client_id, key),
        (None, None) => Uuid::now_v7().to_string(),
    };
    tracing::Span::current().record("job_id", job_id.as_str());
    // the same job_id and body are the same command: the store answers the
    // original receipt; a different body is a reused command id (409)
    let identity = Identity {
        key: key.as_deref(),
        request: "POST /v1/jobs".into(),
    };
    let (command_id, hash_of) = identity.of(caller, ids::http_submit(&job_id), &value);
    let user_id = b
        .metadata
        .get("user_id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let meta = meta(caller, user_id, command_id, &hash_of);
    let submit = SubmitJob {
        workflow_key: b.workflow_key,
        client_id: caller.client_id.clone(),
        input: object_or_empty("inputs", b.inputs)?,
        priority: b.priority,
        timeout_seconds: b.timeout_seconds,
        callback_url: b.callback_url,
        metadata: object_or_empty("metadata", b.metadata)?,
    };
    let def = s.registry.current().get(&submit.workflow_key).cloned();
    let timeout = submit
        .timeout_seconds
        .unwrap_or(crate::commands::job::DEFAULT_TIMEOUT_SECONDS);
    let submitted = s.bus.job(&job_id, JobCommand::Submit(submit), &meta).await;
    if let Err(e) = &submitted {
        if let Some(refusal) = identity.reused(e) {
            return Err(refusal);
        }
    }
    let receipt = match submitted.map_err(CommandError::from) {
        Ok(r) => r,
        Err(e) if e.code == crate::commands::ErrorCode::Conflict => {
            return Err(ApiError::Command(CommandError {
                message: format!(
                    "job_id {job_id:?} was already submitted with a different body \
                     (or by another client); submit the same body to get the same answer, \
                     or use a new job_id"
                ),
                field: Some("job_id".into()),
                ..e
            }))
        }
        Err(e) => return Err(e.into()),
    };
    let accepted = DateTime::parse_from_rfc3339(&receipt.occurred_at)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|_| Utc::now());
    let waits = def.as_ref().is_some_and(|d| d.requires_approval);
    let message = if waits {
        "accepted; the job waits for approval before it runs"
    } else {
        "accepted; the job runs when a dispatch slot is free"
    };
    let estimated = estimated_completion(accepted, def.as_ref(), timeout)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body = json!({
        "job_id": job_id,
        "status": "pending",
        "message": message,
        "accepted_at": receipt.occurred_at,
        "estimated_completion": estimated,
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{job_id}"))],
        Json(body),
    )
        .into_response())
}

/// The body of a cancel, a kill-switch or an approval decision.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    /// Why (required, not empty, for the kill-switch and a rejection).
    #[serde(default)]
    reason: String,
    /// The person behind the client, recorded as the actor's user_id.
    user_id: Option<String>,
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path, description = "job id"), ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)")),
    request_body(content = ReasonBody, description = "reason?, user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "cancelled; in-flight calls are aborted", body = super::openapi::JobCancelled),
              (status = 403, description = "the caller is an auditor (read-only)"),
              (status = 404, description = "no such job, or another client's (the two answer alike)"),
              (status = 409, description = "the job already ended")))]
pub(crate) async fn jobs_cancel(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_may_command("cancelling a job")?;
    let key = idempotency_key(&headers)?;
    check_id("id", &id)?;
    let (value, b) = parse_body::<ReasonBody>(&body)?;
    // another client's job answers as a missing one does
    caller.check_job(&s.bus, &id).await?;
    let identity = Identity {
        key: key.as_deref(),
        request: format!("POST /v1/jobs/{id}/cancel"),
    };
    let (command_id, hash_of) = identity.of(&caller, Uuid::now_v7().to_string(), &value);
    let meta = meta(&caller, b.user_id, command_id, &hash_of);
    let receipt = s
        .bus
        .job(
            &id,
            JobCommand::Cancel(CancelJob { reason: b.reason }),
            &meta,
        )
        .await
        .map_err(|e| reused_or(&identity, e))?;
    Ok(Json(json!({
        "job_id": id, "status": "cancelled", "cancelled_at": receipt.occurred_at,
        "cancelled_by": caller.client_id,
    })))
}

/// The body of a retry: nothing is needed (an empty body is `{}`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    /// The person behind the client, recorded as the actor's user_id.
    user_id: Option<String>,
}

#[utoipa::path(post, path = "/v1/jobs/{id}/retry", params(("id" = String, Path, description = "the failed or cancelled job's id"), ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4). A retry is idempotent without one too: every repeat answers the same new job")),
    request_body(content = RetryBody, description = "user_id? (an empty body is fine)"),
    security(("bearer" = [])),
    responses((status = 202, description = "the retry is accepted: a new job (job_id) with the retried job's workflow, inputs, priority, timeout, callback and client, linked both ways (its retry_of, the old job's retried_by); a repeat, also after the new job ended, answers the same", body = super::openapi::JobRetryAccepted,
               headers(("Location" = String, description = "/v1/jobs/{job_id} of the new job"))),
              (status = 400, description = "bad id, body or Idempotency-Key; error.param names it"),
              (status = 403, description = "the caller is an auditor (read-only)"),
              (status = 404, description = "no such job, or another client's (the two answer alike)"),
              (status = 409, description = "the job is pending, running or completed (error.code rejected, the message names its status; only a failed or cancelled job is retried), the workflow is disabled (kill-switch), or an Idempotency-Key used for another request")))]
pub(crate) async fn jobs_retry(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_may_command("retrying a job")?;
    let key = idempotency_key(&headers)?;
    check_id("id", &id)?;
    let (value, b) = parse_body::<RetryBody>(&body)?;
    // another client's job answers as a missing one does
    caller.check_job(&s.bus, &id).await?;
    let identity = Identity {
        key: key.as_deref(),
        request: format!("POST /v1/jobs/{id}/retry"),
    };
    let (command_id, hash_of) = identity.of(&caller, ids::job_retry(&id), &value);
    let meta = meta(&caller, b.user_id, command_id, &hash_of);
    let retried = s.bus.retry_job(&id, &meta).await.map_err(|e| match e {
        e if identity.reused(&e).is_some() => reused_or(&identity, e),
        ExecuteError::Rejected(JobError::NotFound) => ApiError::NotFound(format!("job {id}")),
        e => command_error(e),
    })?;
    let body = json!({
        "job_id": retried.job_id,
        "retry_of": id,
        "status": "pending",
        "accepted_at": retried.receipt.occurred_at,
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{}", retried.job_id))],
        Json(body),
    )
        .into_response())
}

async fn switch_workflow(
    s: &AppState,
    caller: &Caller,
    key: &str,
    headers: &HeaderMap,
    body: &[u8],
    disable: bool,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator("the kill-switch")?;
    let idempotency = idempotency_key(headers)?;
    if !s.registry.current().contains(key) {
        return Err(ApiError::NotFound(format!(
            "workflow {key:?} (GET /v1/meta lists the registry)"
        )));
    }
    let (value, b) = parse_body::<ReasonBody>(body)?;
    let command = if disable {
        WorkflowCommand::Disable {
            workflow_key: key.to_string(),
            reason: b.reason,
        }
    } else {
        WorkflowCommand::Enable {
            workflow_key: key.to_string(),
            reason: b.reason,
        }
    };
    let identity = Identity {
        key: idempotency.as_deref(),
        request: format!(
            "POST /v1/workflows/{key}/{}",
            if disable { "disable" } else { "enable" }
        ),
    };
    let (command_id, hash_of) = identity.of(caller, Uuid::now_v7().to_string(), &value);
    let meta = meta(caller, b.user_id, command_id, &hash_of);
    let receipt = s
        .bus
        .workflow(key, command, &meta)
        .await
        .map_err(|e| match e {
            e if identity.reused(&e).is_some() => reused_or(&identity, e),
            ExecuteError::Rejected(WorkflowError::NoReason) => {
                ApiError::Command(CommandError::validation(
                    Some("reason"),
                    "field `reason`: say why (must not be empty)",
                ))
            }
            e => command_error(e),
        })?;
    Ok(Json(json!({
        "workflow_key": key, "disabled": disable, "at": receipt.occurred_at, "by": caller.client_id,
    })))
}

#[utoipa::path(post, path = "/v1/workflows/{key}/disable", params(("key" = String, Path, description = "workflow key"), ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)")),
    request_body(content = ReasonBody, description = "reason (required), user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "disabled: new jobs are refused, running ones continue", body = super::openapi::WorkflowSwitched),
              (status = 403, description = "needs the operator role"), (status = 404, description = "not in the registry"),
              (status = 409, description = "already disabled")))]
pub(crate) async fn workflows_disable(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    switch_workflow(&s, &caller, &key, &headers, &body, true).await
}

#[utoipa::path(post, path = "/v1/workflows/{key}/enable", params(("key" = String, Path, description = "workflow key"), ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)")),
    request_body(content = ReasonBody, description = "reason (required), user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "enabled again", body = super::openapi::WorkflowSwitched),
              (status = 403, description = "needs the operator role"), (status = 404, description = "not in the registry"),
              (status = 409, description = "not disabled")))]
pub(crate) async fn workflows_enable(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    switch_workflow(&s, &caller, &key, &headers, &body, false).await
}

#[utoipa::path(get, path = "/v1/meta",
    security(("bearer" = [])),
    responses((status = 200, description = "the workflow registry: keys, steps (no URLs), approval rules, success policy, kill-switch state", body = super::openapi::Meta)))]
pub(crate) async fn meta_get(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let registry = s.registry.current();
    let mut workflows = Vec::new();
    for (key, def) in &registry.workflows {
        let disabled = s
            .bus
            .workflow_disabled(key)
            .await
            .map_err(|e| ApiError::Command(e.into()))?;
        let steps: Vec<Value> = def
            .steps
            .iter()
            .map(|st| {
                json!({"name": st.name, "kind": st.kind, "timeout_ms": st.timeout_ms,
                       "max_attempts": st.max_attempts})
            })
            .collect();
        workflows.push(json!({
            "workflow_key": key,
            "description": def.description,
            "steps": steps,
            "requires_approval": def.requires_approval,
            "approval_timeout_seconds": def.approval_timeout_seconds,
            "auto_approval": def.auto_approval,
            "success": def.success,
            "disabled": disabled,
        }));
    }
    Ok(Json(json!({
        "service": "flowledger",
        "version": env!("CARGO_PKG_VERSION"),
        "registry_version": registry.version,
        "workflows": workflows,
    })))
}

/// What a bulk request decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum Decision {
    /// Approve every id.
    Approve,
    /// Reject every id.
    Reject,
}

#[allow(clippy::too_many_arguments)]
async fn decide(
    s: &AppState,
    caller: &Caller,
    id: &str,
    decision: Decision,
    reason: String,
    user_id: Option<String>,
    identity: &Identity<'_>,
    command_id: Option<String>,
    hash_of: &Value,
) -> Result<std::sync::Arc<Receipt>, ApiError> {
    check_id("approval_id", id)?;
    let d = Decide {
        decided_by: caller.client_id.clone(),
        reason,
    };
    let at = Utc::now();
    let command = match decision {
        Decision::Approve => ApprovalCommand::Approve { decision: d, at },
        Decision::Reject => ApprovalCommand::Reject { decision: d, at },
    };
    let command_id = command_id.unwrap_or_else(|| Uuid::now_v7().to_string());
    let meta = meta(caller, user_id, command_id, hash_of);
    s.bus
        .approval(id, command, &meta)
        .await
        .map_err(|e| match e {
            e if identity.reused(&e).is_some() => reused_or(identity, e),
            ExecuteError::Rejected(ApprovalError::NotFound) => {
                ApiError::NotFound(format!("approval {id}"))
            }
            e => command_error(e),
        })
}

async fn approvals_decide(
    s: AppState,
    caller: Caller,
    id: String,
    headers: HeaderMap,
    body: Bytes,
    decision: Decision,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator("deciding an approval")?;
    let key = idempotency_key(&headers)?;
    let (value, b) = parse_body::<ReasonBody>(&body)?;
    let verb = if decision == Decision::Approve {
        "approve"
    } else {
        "reject"
    };
    let identity = Identity {
        key: key.as_deref(),
        request: format!("POST /v1/approvals/{id}/{verb}"),
    };
    let (command_id, hash_of) = identity.of(&caller, Uuid::now_v7().to_string(), &value);
    let r = decide(
        &s,
        &caller,
        &id,
        decision,
        b.reason,
        b.user_id,
        &identity,
        Some(command_id),
        &hash_of,
    )
    .await?;
    Ok(Json(decided(&id, decision, &caller, &r)))
}

fn decided(id: &str, decision: Decision, caller: &Caller, r: &Receipt) -> Value {
    json!({
        "approval_id": id,
        "status": if decision == Decision::Approve { "approved" } else { "rejected" },
        "decided_by": caller.client_id,
        "decided_at": r.occurred_at,
    })
}

#[utoipa::path(post, path = "/v1/approvals/{id}/approve", params(("id" = String, Path, description = "approval id (the job id)"), ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)")),
    request_body(content = ReasonBody, description = "reason?, user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "approved; who and why are on the event", body = super::openapi::Decided),
              (status = 403, description = "needs the operator role"), (status = 404, description = "no such approval"),
              (status = 409, description = "already decided or expired")))]
pub(crate) async fn approvals_approve(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    approvals_decide(s, caller, id, headers, body, Decision::Approve).await
}

#[utoipa::path(post, path = "/v1/approvals/{id}/reject", params(("id" = String, Path, description = "approval id (the job id)"), ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)")),
    request_body(content = ReasonBody, description = "reason (required), user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "rejected; the job fails with approval_rejected", body = super::openapi::Decided),
              (status = 403, description = "needs the operator role"), (status = 404, description = "no such approval"),
              (status = 409, description = "already decided or expired")))]
pub(crate) async fn approvals_reject(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    approvals_decide(s, caller, id, headers, body, Decision::Reject).await
}

/// The body of `POST /v1/approvals/bulk`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    /// 1 to 100 approval ids, each decided on its own.
    #[schema(min_items = 1, max_items = 100)]
    approval_ids: Vec<String>,
    /// Approve or reject them all.
    decision: Decision,
    /// Why (required, not empty, to reject).
    #[serde(default)]
    reason: String,
    /// The person behind the client, recorded as the actor's user_id.
    user_id: Option<String>,
}

#[utoipa::path(post, path = "/v1/approvals/bulk",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key, route and body from the same client answer the first answer (on any instance, after restarts); the same key with another body for the same job, approval or workflow: 409 with error.param Idempotency-Key; for another job, approval or workflow only within the stream's 2-minute duplicate window (docs/EVENTS.md 7.4)")),
    request_body(content = BulkBody, description = "approval_ids (1-100), decision approve|reject, reason, user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "one result per id, in order: each decided on its own (not all-or-nothing)", body = super::openapi::BulkDecided),
              (status = 400, description = "bad body"), (status = 403, description = "needs the operator role")))]
pub(crate) async fn approvals_bulk(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator("deciding approvals")?;
    let key = idempotency_key(&headers)?;
    let (value, b) = parse_body::<BulkBody>(&body)?;
    if b.approval_ids.is_empty() || b.approval_ids.len() > MAX_BULK {
        return Err(ApiError::Command(CommandError::validation(
            Some("approval_ids"),
            format!(
                "field `approval_ids`: give 1 to {MAX_BULK} ids, got {}",
                b.approval_ids.len()
            ),
        )));
    }
    let mut results = Vec::with_capacity(b.approval_ids.len());
    let mut done = 0;
    for id in &b.approval_ids {
        // one hash per id: the bulk body plus the id it decides; with a
        // key, one command id per id under it
        let hash_of = json!({"bulk": value, "approval_id": id});
        let identity = Identity {
            key: key.as_deref(),
            request: "POST /v1/approvals/bulk".into(),
        };
        let command_id = key
            .as_deref()
            .map(|k| ids::http_idempotent_part(&caller.client_id, k, id));
        match decide(
            &s,
            &caller,
            id,
            b.decision,
            b.reason.clone(),
            b.user_id.clone(),
            &identity,
            command_id,
            &hash_of,
        )
        .await
        {
            Ok(r) => {
                done += 1;
                let mut v = decided(id, b.decision, &caller, &r);
                v["ok"] = json!(true);
                results.push(v);
            }
            Err(e) => {
                let code = e.code();
                results.push(json!({"approval_id": id, "ok": false,
                                    "error": {"code": code, "message": e.to_string()}}));
            }
        }
    }
    Ok(Json(json!({
        "decided": done,
        "failed": results.len() - done,
        "results": results,
    })))
}
