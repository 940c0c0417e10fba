//! `POST /v1/callbacks/n8n`: an n8n workflow that answered 202 posts its
//! step result here later (docs/CALLBACKS.md, "Incoming n8n callbacks").
//!
//! The request is signed like outgoing callbacks (HMAC-SHA256 over
//! `<timestamp>.<body>` with the n8n key) and its body carries a `nonce`
//! that is accepted once. A missing, bad, stale or replayed signature gets
//! 401, is counted (`flowledger_callbacks_rejected_total`) and logged, and
//! writes nothing to the event log; the job is not changed. Posts are rate
//! limited per source address, refused ones more tightly.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::retry_after_secs;
use super::body::{check_storable, from_fields};
use super::http::{ApiError, AppState};
use crate::bus::{ids, CommandError};
use crate::commands::job::events::StepStatus;
use crate::commands::job::{JobCommand, RecordStepResult};
use crate::crypto::{SignatureError, HDR_SIGNATURE, HDR_TIMESTAMP};
use crate::events::chain;
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::log::valid_aggregate_id;

/// The actor recorded on results n8n posts.
pub const N8N_ACTOR: &str = "n8n";

/// The body n8n posts: one step result.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct N8nResult {
    /// The job (1-128 of A-Z a-z 0-9 _ -).
    job_id: String,
    /// The step that answered 202.
    step: String,
    /// The attempt in flight.
    attempt: u32,
    /// Unique per callback (8-200 characters); covered by the signature
    /// because it is in the body.
    #[schema(min_length = 8, max_length = 200)]
    nonce: String,
    /// How the attempt ended.
    #[schema(value_type = super::openapi::StepOutcome)]
    status: StepStatus,
    /// The step's output.
    #[serde(default)]
    output: Value,
    /// Failed: the error's code.
    error_code: Option<String>,
    /// Failed: what failed.
    error_message: Option<String>,
    /// How long the attempt took.
    #[serde(default)]
    duration_ms: u64,
    /// The n8n execution that ran the step (`{{ $execution.id }}`):
    /// recorded with the result; 1-128 of A-Z a-z 0-9 _ -.
    #[schema(min_length = 1, max_length = 128)]
    #[serde(default)]
    n8n_execution_id: Option<String>,
}

fn meta(command_id: String, body: &[u8]) -> CommandMeta {
    let actor = Actor {
        client_id: N8N_ACTOR.into(),
        user_id: None,
    };
    CommandMeta::originating(command_id, actor, chain::to_hex(&chain::sha256(body)))
}

/// Per-source (peer address) limits of `POST /v1/callbacks/n8n`: all
/// posts (`callbacks.rate_limit_per_minute`) and refused ones
/// (`callbacks.refusals_per_minute`). Behind a proxy every post comes from
/// the proxy's address: limit there, or raise these.
pub struct CallbackLimits {
    posts: DefaultKeyedRateLimiter<IpAddr>,
    refusals: DefaultKeyedRateLimiter<IpAddr>,
}

/// Distinct sources remembered before stale ones are forgotten.
const MAX_TRACKED_SOURCES: usize = 10_000;

impl CallbackLimits {
    /// Limits of `posts_per_minute` posts and `refusals_per_minute` refused
    /// posts per source address (each at least 1).
    pub fn new(posts_per_minute: u32, refusals_per_minute: u32) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        CallbackLimits {
            posts: RateLimiter::keyed(quota(posts_per_minute)),
            refusals: RateLimiter::keyed(quota(refusals_per_minute)),
        }
    }

    fn take(
        limiter: &DefaultKeyedRateLimiter<IpAddr>,
        source: IpAddr,
        what: &'static str,
    ) -> Result<(), ApiError> {
        if limiter.len() > MAX_TRACKED_SOURCES {
            limiter.retain_recent();
        }
        limiter.check_key(&source).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::SourceRateLimited {
                what,
                retry_after: retry_after_secs(wait),
            }
        })
    }
}

/// A refused post: counted, logged while the source is under its refusal
/// limit, never written to the event log (nothing unauthenticated is).
/// Returns the 401, or a 429 once the source refused too often.
fn reject(s: &AppState, source: IpAddr, job_id: Option<&str>, why: SignatureError) -> ApiError {
    metrics::counter!("flowledger_callbacks_rejected_total", "reason" => why.code()).increment(1);
    if let Err(limited) =
        CallbackLimits::take(&s.callback_limits.refusals, source, "refused callbacks")
    {
        metrics::counter!("flowledger_callbacks_throttled_total").increment(1);
        return limited;
    }
    tracing::warn!(
        %source,
        job_id = job_id.unwrap_or("-"),
        reason = why.code(),
        "n8n callback refused"
    );
    ApiError::Signature(why)
}

#[utoipa::path(post, path = "/v1/callbacks/n8n",
    params(("X-Flowledger-Timestamp" = String, Header, description = "Unix seconds when signed; within callbacks.timestamp_window_seconds of now (docs/CALLBACKS.md)"),
           ("X-Flowledger-Signature" = String, Header, description = "`v1=` and the hex HMAC-SHA256, with the n8n key, of `<timestamp>.<body>` as sent (docs/CALLBACKS.md); no bearer token")),
    request_body(content = N8nResult, description = "one step result, signed"),
    responses((status = 200, description = "the step result is recorded", body = super::openapi::CallbackRecorded),
              (status = 400, description = "signed, but the body is not a step result"),
              (status = 401, description = "missing, bad, stale or replayed signature; counted and logged, nothing is written to the event log"),
              (status = 429, description = "too many posts, or refused posts, from this address; see Retry-After"),
              (status = 404, description = "no such job"),
              (status = 409, description = "the attempt is not in flight or already has a result"),
              (status = 503, description = "no n8n key configured")))]
pub(crate) async fn callbacks_n8n(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Some(key) = &s.n8n_key else {
        return Err(ApiError::NotConfigured(
            "n8n callbacks are off: set the environment variable named by callbacks.n8n_key_env \
             (default FLOWLEDGER_N8N_KEY)"
                .into(),
        ));
    };
    let source = peer.ip();
    CallbackLimits::take(&s.callback_limits.posts, source, "callback posts")?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let parsed = serde_json::from_slice::<Value>(&body);
    // which job the sender claims, for the log line only
    let claimed = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("job_id")?.as_str().map(str::to_string))
        .filter(|id| valid_aggregate_id(id));
    let now = Utc::now().timestamp();
    if let Err(why) = key.verify(
        header(HDR_TIMESTAMP),
        header(HDR_SIGNATURE),
        &body,
        now,
        s.callback_window_secs,
    ) {
        return Err(reject(&s, source, claimed.as_deref(), why));
    }
    let value: Value = parsed.map_err(|e| {
        ApiError::Command(CommandError::validation(
            None,
            format!("request body is not valid JSON: {e}"),
        ))
    })?;
    check_storable(&value)?;
    let r: N8nResult = from_fields(value)?;
    if !valid_aggregate_id(&r.job_id) {
        return Err(ApiError::Command(CommandError::validation(
            Some("job_id"),
            "field `job_id`: not a valid id (1-128 of A-Z a-z 0-9 _ -)",
        )));
    }
    if r.nonce.len() < 8 || r.nonce.len() > 200 {
        return Err(ApiError::Command(CommandError::validation(
            Some("nonce"),
            "field `nonce`: must be 8-200 characters, unique per callback",
        )));
    }
    // a nonce is kept for twice the window: any replay inside the window
    // finds it, an older one fails the timestamp check
    sqlx::query("DELETE FROM callback_nonces WHERE seen_at < now() - make_interval(secs => $1)")
        .bind((2 * s.callback_window_secs) as f64)
        .execute(&s.pool)
        .await?;
    let fresh = sqlx::query(
        "INSERT INTO callback_nonces (nonce, seen_at) VALUES ($1, now()) ON CONFLICT DO NOTHING",
    )
    .bind(&r.nonce)
    .execute(&s.pool)
    .await?
    .rows_affected()
        == 1;
    if !fresh {
        return Err(reject(
            &s,
            source,
            Some(&r.job_id),
            SignatureError::Replayed,
        ));
    }
    let command_id = ids::n8n_result(&r.job_id, &r.step, r.attempt);
    let result = RecordStepResult {
        step: r.step.clone(),
        attempt: r.attempt,
        status: r.status,
        output: r.output,
        error_code: r.error_code,
        error_message: r.error_message,
        duration_ms: r.duration_ms,
        retry_in_ms: None,
        n8n_execution_id: r.n8n_execution_id,
    };
    match s
        .bus
        .job(
            &r.job_id,
            JobCommand::RecordStepResult(result),
            &meta(command_id, &body),
        )
        .await
    {
        Ok(receipt) => Ok(Json(json!({
            "ok": true, "job_id": r.job_id, "step": r.step, "attempt": r.attempt,
            "recorded_at": receipt.occurred_at,
        }))),
        Err(e) => {
            // not recorded: the same request may be sent again
            if let Err(db) = sqlx::query("DELETE FROM callback_nonces WHERE nonce = $1")
                .bind(&r.nonce)
                .execute(&s.pool)
                .await
            {
                tracing::warn!(error = %db, "could not release a callback nonce");
            }
            Err(ApiError::Command(e.into()))
        }
    }
}
