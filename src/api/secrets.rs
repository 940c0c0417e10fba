//! The secret-access door, the same over HTTP (`POST /v1/secrets/read`,
//! `POST /v1/secrets/invalidate`, bearer auth) and NATS
//! (`flow.cmd.secret.read`, `flow.cmd.secret.invalidate`, the caller the
//! broker vouches for). Every verified caller but an auditor (who writes
//! nothing to the log) may ask; flowledger's policy (`[[secrets.rules]]`)
//! decides, and records the decision. Each read is
//! its own request: its id is made here, never chosen by the caller, so no
//! retry can fetch a value without an access event of its own.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::body::{from_fields, parse_object};
use super::caller::{Caller, Role};
use super::http::{ApiError, AppState};
use crate::bus::{CommandBus, CommandError};
use crate::commands::secret_access::events::AccessRequest;
use crate::commands::ErrorCode;
use crate::events::envelope::CommandMeta;
use crate::secrets::service::SecretService;

/// The body of a secret read.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    /// A KV v2 path: `<mount>/data/<name>`.
    path: String,
    /// One field of the secret; default: the whole secret's data.
    field: Option<String>,
    /// A KV version; default: the current one.
    version: Option<u64>,
    /// Why it is read (recorded).
    purpose: String,
    /// The person behind the client (recorded).
    user_id: Option<String>,
}

/// The body of a cache invalidation.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    /// The KV v2 path whose cached values every instance drops.
    path: String,
    /// Why (recorded).
    reason: String,
    /// The person behind the client (recorded).
    user_id: Option<String>,
}

fn not_configured() -> CommandError {
    CommandError {
        code: ErrorCode::Unavailable,
        message: "secret access is not configured on this instance: set [secrets] vault_addr \
                  (docs/SECRETS.md)"
            .into(),
        field: None,
    }
}

fn meta(caller: &Caller, user_id: Option<String>) -> CommandMeta {
    // a fresh id per read: a repeated body is another read, recorded again
    CommandMeta::originating(
        Uuid::now_v7().to_string(),
        caller.actor(user_id),
        String::new(),
    )
}

/// Reads the secret the JSON `body` asks for (`path`, `field?`,
/// `version?`, `purpose`, `user_id?`) for `caller`. The reply holds the
/// value: `{ok, request_id, path, field, kv_version, source, event_seq,
/// value}`.
pub async fn read(
    bus: &CommandBus,
    secrets: Option<&SecretService>,
    caller: &Caller,
    body: &[u8],
) -> Result<Value, CommandError> {
    // a read is recorded in the log: an auditor writes nothing
    caller.require_may_command("secret.read")?;
    let b: ReadBody = from_fields(parse_object(body, false)?)?;
    let secrets = secrets.ok_or_else(not_configured)?;
    let meta = meta(caller, b.user_id);
    let request = AccessRequest {
        path: b.path,
        field: b.field,
        version: b.version,
        purpose: b.purpose,
        job_id: None,
        step: None,
    };
    let (path, field) = (request.path.clone(), request.field.clone());
    let served = secrets
        .read(bus, request, caller.role.as_str(), &meta)
        .await?;
    Ok(json!({
        "ok": true,
        "request_id": meta.command_id,
        "path": path,
        "field": field,
        "kv_version": served.kv_version,
        "source": served.source,
        "event_seq": served.event_seq,
        "value": served.value.expose(),
    }))
}

/// An operator drops a path's cached values on every instance (`path`,
/// `reason`, `user_id?`): `{ok, path, event_seq}`.
pub async fn invalidate(
    bus: &CommandBus,
    secrets: Option<&SecretService>,
    caller: &Caller,
    body: &[u8],
) -> Result<Value, CommandError> {
    invalidate_keyed(bus, secrets, caller, body, None).await
}

/// [`invalidate`] with an HTTP `Idempotency-Key`: the command id is the
/// key's (per client) and its hash covers the body, so a repeat answers
/// the first `event_seq` and another body under the key is a 409.
async fn invalidate_keyed(
    bus: &CommandBus,
    secrets: Option<&SecretService>,
    caller: &Caller,
    body: &[u8],
    key: Option<&str>,
) -> Result<Value, CommandError> {
    caller.require(&[Role::Operator], "secret.invalidate")?;
    let value = parse_object(body, false)?;
    let b: InvalidateBody = from_fields(value.clone())?;
    let secrets = secrets.ok_or_else(not_configured)?;
    let meta = match key {
        None => meta(caller, b.user_id),
        Some(key) => CommandMeta::originating(
            crate::bus::ids::http_idempotent(&caller.client_id, key),
            caller.actor(b.user_id),
            crate::events::chain::to_hex(&crate::events::chain::sha256(
                json!({"client_id": caller.client_id,
                       "request": "POST /v1/secrets/invalidate", "body": value})
                .to_string()
                .as_bytes(),
            )),
        ),
    };
    let path = b.path.clone();
    let seq = match secrets.invalidate(bus, b.path, b.reason, &meta).await {
        Ok(seq) => seq,
        // the key's id already holds another request: the store says reused
        Err(e) if key.is_some() && e.is_command_id_reused() => {
            return Err(super::write::key_reused())
        }
        Err(e) => return Err(e),
    };
    Ok(json!({"ok": true, "path": path, "event_seq": seq}))
}

fn no_store(body: Value) -> Response {
    // a reply holding a secret is not kept by any cache on the way
    let mut res = Json(body).into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    res
}

#[utoipa::path(post, path = "/v1/secrets/read",
    request_body(content = ReadBody, description = "path (KV v2: <mount>/data/<name>), field?, version?, purpose, user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "the value, after its SecretAccessGranted was stored: request_id, path, field, kv_version, source (vault, cache, last_known_good), event_seq, value; `Cache-Control: no-store`", body = super::openapi::SecretRead),
              (status = 400, description = "bad body; error.param names the field"),
              (status = 401, description = "no or unknown bearer token"),
              (status = 403, description = "denied by flowledger's policy or by Vault (recorded)"),
              (status = 404, description = "no such secret, version or field (recorded)"),
              (status = 503, description = "Vault cannot be read and no value within the maximum staleness is cached, the access could not be recorded, or secret access is not configured")))]
pub(crate) async fn secrets_read(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let reply = read(&s.bus, s.secrets.as_deref(), &caller, &body).await?;
    Ok(no_store(reply))
}

#[utoipa::path(post, path = "/v1/secrets/invalidate",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; the same key and body from the same client answer the first answer (the first event_seq); the same key with another route or body: 409 with error.param Idempotency-Key")),
    request_body(content = InvalidateBody, description = "path, reason, user_id?"),
    security(("bearer" = [])),
    responses((status = 200, description = "recorded (SecretCacheInvalidated); every instance drops the path", body = super::openapi::SecretInvalidated),
              (status = 400, description = "bad body; error.param names the field"),
              (status = 401, description = "no or unknown bearer token"),
              (status = 403, description = "not an operator"),
              (status = 409, description = "the Idempotency-Key was used by this client for another request; error.param Idempotency-Key")))]
pub(crate) async fn secrets_invalidate(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = super::write::idempotency_key(&headers)?;
    let reply =
        invalidate_keyed(&s.bus, s.secrets.as_deref(), &caller, &body, key.as_deref()).await?;
    Ok(Json(reply).into_response())
}
