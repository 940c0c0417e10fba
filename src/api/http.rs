//! The HTTP API: the router, its shared state and its one error type.
//! Reads are in `read`, commands in `write`, incoming n8n results in
//! `n8n`, identities in `auth`. Every error is a JSON body
//! `{"error": {"code", "message", "param"?}}`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::PgPool;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::OpenApi;

use super::auth::{self, Allowance, Clients};
use super::request::{self, RequestFacts};
use super::{memory, n8n, read, secrets, write};
use crate::bus::{CommandBus, CommandError};
use crate::commands::registry::SharedRegistry;
use crate::commands::ErrorCode;
use crate::crypto::{SignatureError, SigningKey};
use crate::events::log::EventLog;
use crate::memory::service::MemoryService;
use crate::projections::db;
use crate::secrets::service::SecretService;

/// What every HTTP handler shares, built once by `app::Application::build`.
#[derive(Clone)]
pub struct AppState {
    /// The read-model database: the views the reads query, the projection
    /// checkpoints `/healthz` reports, the n8n `callback_nonces`.
    pub pool: PgPool,
    /// The NATS connection whose state `/healthz` reports.
    pub nats: async_nats::Client,
    /// The event stream; `/healthz` asks it for the last sequence.
    pub log: EventLog,
    /// Renders the Prometheus text `GET /metrics` answers.
    pub metrics: PrometheusHandle,
    /// The command side the write endpoints execute on.
    pub bus: Arc<CommandBus>,
    /// The workflow registry: which keys jobs may name, and what
    /// `GET /v1/meta` lists.
    pub registry: SharedRegistry,
    /// The bearer tokens and rate limits of the `[[clients]]` table.
    pub clients: Arc<Clients>,
    /// Verifies `POST /v1/callbacks/n8n`; none: that endpoint answers 503.
    pub n8n_key: Option<SigningKey>,
    /// Seconds an n8n callback's timestamp may be off from now
    /// (`callbacks.timestamp_window_seconds`); nonces are kept twice as long.
    pub callback_window_secs: i64,
    /// Per-source limits of `POST /v1/callbacks/n8n`.
    pub callback_limits: Arc<super::n8n::CallbackLimits>,
    /// The job handler's state for `/healthz` (`running`, `no_lease`, ...,
    /// and a reason when it is restarting); none: no handler runs here.
    pub handler_status: Option<HandlerStatusFn>,
    /// Secret access (`[secrets]`); none: `/v1/secrets/*` answer 503.
    pub secrets: Option<Arc<SecretService>>,
    /// Conversation memory (`[memory]`); none: `/v1/memory/*` answer 503.
    pub memory: Option<Arc<MemoryService>>,
    /// True while the service drains before it stops: `/healthz` answers
    /// 503 `draining` and `POST /v1/jobs` 503 with `Retry-After`; the rest
    /// (reads, cancels, approvals, n8n results of the steps in flight)
    /// is served until the stop.
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// The live job streams (`GET /v1/jobs/{id}/events`) open now, per
    /// client, and their limits (`[console]`).
    pub live: Arc<super::live::LiveStreams>,
    /// Serve the web console at `/console` (`[console] enabled`).
    pub console: bool,
    /// The origins browsers may call from (`http.cors_allowed_origins`,
    /// checked by the configuration); empty: no CORS header at all.
    pub cors_allowed_origins: Vec<String>,
}

/// The largest request body accepted (413 `payload_too_large` above).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Seconds a client with all its live streams open is told to wait.
pub const STREAM_RETRY_AFTER_SECONDS: u64 = 5;

/// Seconds a job submitted to a draining instance is told to wait
/// (`Retry-After`) before it is sent again, to another instance.
pub const DRAINING_RETRY_AFTER_SECONDS: u64 = 5;

/// Reports the job handler's state: its name, and why when it is not
/// running as it should.
pub type HandlerStatusFn = Arc<dyn Fn() -> (&'static str, Option<String>) + Send + Sync>;

/// How long `/healthz` waits for each dependency before calling it
/// unreachable.
pub const HEALTH_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

/// What went wrong, named for what the client does about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `validation`: fix the named query parameter and retry.
    #[error("query parameter `{param}`: {message}")]
    BadParam {
        /// The query parameter's name (`error.param`).
        param: String,
        /// What is wrong with its value.
        message: String,
    },
    /// 404 `not_found`: the named job, approval, workflow or route does not
    /// exist.
    #[error("{0} not found")]
    NotFound(String),
    /// 405 `method_not_allowed` with `Allow`: the route exists, the method
    /// does not; use one of `allowed`.
    #[error("method {method} is not allowed on this route; use {allowed} (see /openapi.json)")]
    MethodNotAllowed {
        /// The method sent.
        method: String,
        /// The route's methods, as the `Allow` header lists them.
        allowed: String,
    },
    /// 413 `payload_too_large`: the body is over [`MAX_BODY_BYTES`]; send a
    /// smaller one.
    #[error("request body is larger than {MAX_BODY_BYTES} bytes; send a smaller body")]
    PayloadTooLarge,
    /// 415 `unsupported_media_type` (`error.param`: `Content-Type`): a
    /// command body is JSON; send `Content-Type: application/json` (or none).
    #[error("Content-Type {0:?} is not accepted: command bodies are JSON, send `Content-Type: application/json`")]
    UnsupportedMediaType(String),
    /// Any other refusal made before a handler ran (a malformed path, ...),
    /// with its status; the code follows the status.
    #[error("{message}")]
    Request {
        /// The status to answer.
        status: StatusCode,
        /// What was wrong.
        message: String,
    },
    /// 503 `unavailable`: the read-model query failed; retry later.
    #[error("read models unavailable, retry later")]
    Unavailable(#[source] sqlx::Error),
    /// 401 `unauthenticated` with `WWW-Authenticate: Bearer`: send a known
    /// bearer token.
    #[error("{0}")]
    Unauthenticated(String),
    /// 429 `rate_limited` with `Retry-After` and the `RateLimit-*`
    /// headers: wait, then submit again.
    #[error("client {client_id:?} is over its rate limit for job submissions; retry after {retry_after} s")]
    RateLimited {
        /// The client whose submission allowance is used up.
        client_id: String,
        /// Whole seconds until the next submission is allowed.
        retry_after: u64,
        /// The allowance as it stands (`remaining` 0).
        allowance: Allowance,
    },
    /// Too many callback posts (or refused ones) from one address: wait
    /// `retry_after` seconds.
    #[error("too many {what} from this address; retry after {retry_after} s")]
    SourceRateLimited {
        /// What was counted: "callback posts" or "refused callbacks".
        what: &'static str,
        /// Whole seconds until the next post is allowed.
        retry_after: u64,
    },
    /// 429 `rate_limited` with `Retry-After`: the client has its
    /// `[console] streams_per_client` live streams open; close one.
    #[error(
        "client {client_id:?} has {max} live streams open, the most it may; close one and retry"
    )]
    TooManyStreams {
        /// The client whose streams are all in use.
        client_id: String,
        /// `[console] streams_per_client`.
        max: usize,
    },
    /// A command was refused or failed; the code says which.
    #[error("{}", .0.message)]
    Command(CommandError),
    /// A refused memory request with its seed-001 reason (`error.reason`:
    /// `client_not_found`, `timeout`, `database_error`, ...).
    #[error("{}", .0.message)]
    Reasoned(CommandError, &'static str),
    /// 401 with the signature error's code: an n8n callback's signature is
    /// missing, bad, stale or replayed; it was recorded as `CallbackRejected`.
    #[error("callback refused: {0}")]
    Signature(SignatureError),
    /// 503 `not_configured`: the feature is off until an operator sets it up
    /// (the n8n key).
    #[error("{0}")]
    NotConfigured(String),
    /// 503 `unavailable` with `Retry-After`: this instance is stopping and
    /// takes no new job; submit again (another instance takes it).
    #[error(
        "this instance is draining before it stops and takes no new job; \
             submit again after {retry_after} s (another instance takes it)"
    )]
    Draining {
        /// Whole seconds to wait before submitting again.
        retry_after: u64,
    },
}

impl ApiError {
    /// The stable code in the JSON body (`error.code`).
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadParam { .. } => (StatusCode::BAD_REQUEST, "validation"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Request { status, .. } => (*status, code_of_status(*status)),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::RateLimited { .. }
            | ApiError::SourceRateLimited { .. }
            | ApiError::TooManyStreams { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Signature(e) => (StatusCode::UNAUTHORIZED, e.code()),
            ApiError::NotConfigured(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_configured"),
            ApiError::Draining { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Command(e) | ApiError::Reasoned(e, _) => {
                let status = match e.code {
                    ErrorCode::Validation => StatusCode::BAD_REQUEST,
                    ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
                    ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                    ErrorCode::NotFound => StatusCode::NOT_FOUND,
                    ErrorCode::Conflict | ErrorCode::Rejected => StatusCode::CONFLICT,
                    ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, e.code.as_str())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Unavailable(e) = &self {
            tracing::error!(error = %e, "read query failed");
        }
        let param = match &self {
            ApiError::BadParam { param, .. } => Some(param.clone()),
            ApiError::UnsupportedMediaType(_) => Some("Content-Type".to_string()),
            ApiError::Command(CommandError { field: Some(f), .. })
            | ApiError::Reasoned(CommandError { field: Some(f), .. }, _) => Some(f.clone()),
            _ => None,
        };
        let reason = match &self {
            ApiError::Reasoned(_, reason) => Some(reason.to_string()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
                param,
                reason,
                request_id: super::request::current_id(),
            },
        };
        let mut res = (status, Json(body)).into_response();
        match &self {
            ApiError::Unauthenticated(_) => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                if let Ok(v) = HeaderValue::from_str(allowed) {
                    res.headers_mut().insert(header::ALLOW, v);
                }
            }
            ApiError::RateLimited {
                retry_after,
                allowance,
                ..
            } => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
                allowance.put(res.headers_mut());
            }
            ApiError::SourceRateLimited { retry_after, .. }
            | ApiError::Draining { retry_after } => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::TooManyStreams { .. } => {
                res.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(STREAM_RETRY_AFTER_SECONDS),
                );
            }
            _ => {}
        }
        res
    }
}

/// The body of every error answer: `{"error": {code, message, param?,
/// reason?}}` (keys in this order, as serde_json writes a map's).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong, in an [`ErrorBody`] (and per id in a bulk decision,
/// there without `param` and `reason`).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// The stable code: `validation`, `unauthenticated`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conflict`, `rejected`,
    /// `payload_too_large`, `unsupported_media_type`, `rate_limited`,
    /// `unavailable`, `not_configured`, a signature's code
    /// (`signature_missing`, ...), ...
    #[schema(example = "validation")]
    pub code: String,
    /// What failed and how to fix it.
    pub message: String,
    /// The field, query parameter or header at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// A memory refusal's reason (`client_not_found`, `timeout`,
    /// `database_error`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request's id, as its `x-request-id` answer header says (the
    /// client's own when it sent a well-formed one): quote it to an
    /// operator, who finds the request's log lines by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "0193a5c2-7e51-7c3a-9f0e-2b1d4c5e6f70")]
    pub request_id: Option<String>,
}

/// The `error.code` of a status no variant names.
fn code_of_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "validation",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "invalid_request",
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Unavailable(e)
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError::Command(e)
    }
}

pub(crate) fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::BadParam {
        param: param.to_string(),
        message: message.into(),
    }
}

#[utoipa::path(get, path = "/healthz",
    responses((status = 200, description = "NATS and PostgreSQL reachable, no projection stopped", body = super::openapi::Health),
              (status = 503, description = "something is down, a projection is stopped or the instance is draining before it stops; details in the body", body = super::openapi::Health)))]
pub(crate) async fn healthz(State(s): State<AppState>) -> Response {
    let nats_ok = matches!(
        s.nats.connection_state(),
        async_nats::connection::State::Connected
    );
    // every probe at once, each bounded: the answer comes within a second
    use tokio::time::timeout;
    let (last, pg, rows) = tokio::join!(
        timeout(HEALTH_PROBE_TIMEOUT, s.log.last_seq()),
        timeout(
            HEALTH_PROBE_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&s.pool)
        ),
        timeout(HEALTH_PROBE_TIMEOUT, db::checkpoints(&s.pool)),
    );
    let last = last.ok().and_then(Result::ok);
    let pg = pg.map_err(|_| ()).and_then(|r| r.map_err(|_| ()));
    let mut projections = Vec::new();
    let mut stopped = false;
    if let Ok(Ok(rows)) = rows {
        for r in rows {
            stopped |= r.state == "stopped";
            projections.push(json!({
                "name": r.name, "version": r.version, "active": r.active, "state": r.state,
                "checkpoint": r.last_seq,
                "lag": last.map(|l| (l as i64 - r.last_seq).max(0)),
                "stopped_at": r.error_seq, "error": r.error,
            }));
        }
    }
    let handler = s.handler_status.as_ref().map(|f| f());
    let handler_ok = handler
        .as_ref()
        .is_none_or(|(state, _)| *state != "restarting");
    // a draining instance is not ready: a load balancer sends new work elsewhere
    let draining = *s.draining.borrow();
    let ok = nats_ok && last.is_some() && pg.is_ok() && !stopped && handler_ok && !draining;
    let body = json!({
        "ok": ok,
        "draining": draining,
        "handler": handler.map(|(state, reason)| json!({"state": state, "reason": reason})),
        "nats": if nats_ok && last.is_some() { "ok" } else { "unreachable" },
        "postgres": if pg.is_ok() { "ok" } else { "unreachable" },
        "stream_last_seq": last,
        "projections": projections,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/livez",
    responses((status = 200, description = "the process is alive and answering (a liveness probe: it says nothing of NATS, PostgreSQL or the read models)", body = super::openapi::Live)))]
pub(crate) async fn livez() -> Response {
    Json(json!({"ok": true})).into_response()
}

#[utoipa::path(get, path = "/readyz",
    responses((status = 200, description = "it can take commands: NATS connected and the event stream answering", body = super::openapi::Ready),
              (status = 503, description = "it cannot take commands now: `nats` says why, or `draining` is true (it is stopping)", body = super::openapi::Ready)))]
pub(crate) async fn readyz(State(s): State<AppState>) -> Response {
    // read before the await: the watch's guard is not held across it
    let draining = *s.draining.borrow();
    readiness(&s.nats, &s.log, draining).await
}

/// `/readyz`'s answer: 200 when NATS is connected, the event stream answers
/// and the service is not draining, else 503 saying which.
async fn readiness(nats: &async_nats::Client, log: &EventLog, draining: bool) -> Response {
    let connected = matches!(
        nats.connection_state(),
        async_nats::connection::State::Connected
    );
    // the stream answers: it exists and has a leader (bounded, as /healthz)
    let last = if connected {
        tokio::time::timeout(HEALTH_PROBE_TIMEOUT, log.last_seq())
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        None
    };
    let nats = match (connected, last) {
        (true, Some(_)) => "ok",
        (true, None) => "stream_unavailable",
        (false, _) => "disconnected",
    };
    // a draining instance takes no new work: a load balancer sends it elsewhere
    let status = if nats == "ok" && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"ok": status == StatusCode::OK, "nats": nats, "draining": draining,
                      "stream_last_seq": last});
    (status, Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub(crate) async fn metrics_get(State(s): State<AppState>) -> String {
    // read when asked, bounded: PostgreSQL down leaves the gauge out, not
    // /metrics waiting
    let pending = tokio::time::timeout(
        HEALTH_PROBE_TIMEOUT,
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM approvals WHERE status = 'pending'")
            .fetch_one(&s.pool),
    )
    .await;
    match pending {
        Ok(Ok(n)) => metrics::gauge!("flowledger_approvals_pending").set(n as f64),
        _ => metrics::gauge!("flowledger_approvals_pending").set(f64::NAN),
    }
    s.metrics.render()
}

/// What the probes of a `serve` without a database read ([`probes`]).
#[derive(Clone)]
pub struct ProbeState {
    /// The NATS connection `/readyz` reports.
    pub nats: async_nats::Client,
    /// The event stream `/readyz` asks for its last sequence.
    pub log: EventLog,
    /// Renders `GET /metrics`.
    pub metrics: PrometheusHandle,
    /// True while the service drains: `/readyz` answers 503.
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// The routes of a `serve` without a database (its NATS intake only):
/// `/livez`, `/readyz` and `/metrics`, as the HTTP API answers them (no
/// read-model gauge); anything else is the 404 envelope.
pub fn probes(state: ProbeState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route(
            "/readyz",
            get(|State(p): State<ProbeState>| async move {
                let draining = *p.draining.borrow();
                readiness(&p.nats, &p.log, draining).await
            }),
        )
        .route(
            "/metrics",
            get(|State(p): State<ProbeState>| async move { p.metrics.render() }),
        )
        .layer(middleware::from_fn(track))
        .fallback(|| async {
            ApiError::Command(CommandError {
                code: crate::commands::ErrorCode::NotFound,
                message: "no such route: this serve runs without a database, only /livez, \
                          /readyz and /metrics are served"
                    .into(),
                field: None,
            })
        })
        .with_state(state)
        .layer(middleware::from_fn(request::conventions))
}

async fn openapi_get() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi::ApiDoc::openapi())
}

/// Records request latency per route, and the route template for the
/// access log.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    if let Some(facts) = req.extensions().get::<RequestFacts>() {
        facts.set_route(&route);
    }
    let method = req.method().to_string();
    let start = Instant::now();
    let res = next.run(req).await;
    metrics::histogram!("flowledger_http_request_duration_seconds",
        "method" => method, "route" => route, "status" => res.status().as_u16().to_string())
    .record(start.elapsed().as_secs_f64());
    res
}

/// Refuses a new job while the service drains (503, `Retry-After`).
async fn refuse_while_draining(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if *s.draining.borrow() {
        return ApiError::Draining {
            retry_after: DRAINING_RETRY_AFTER_SECONDS,
        }
        .into_response();
    }
    next.run(req).await
}

/// Refuses a POST whose `Content-Type` is not JSON (415); no
/// `Content-Type` is taken as JSON. Not on the n8n callback, whose signed
/// bytes are checked as sent.
async fn require_json(req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::POST {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            if !is_json(ct) {
                let shown = String::from_utf8_lossy(ct.as_bytes())
                    .chars()
                    .take(100)
                    .collect();
                return ApiError::UnsupportedMediaType(shown).into_response();
            }
        }
    }
    next.run(req).await
}

/// `application/json` or `application/<x>+json`, any parameters.
fn is_json(ct: &HeaderValue) -> bool {
    let Ok(ct) = ct.to_str() else { return false };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Puts every error answer made outside the handlers (axum's 405, the 413
/// of the body limit, a malformed path's 400) in the JSON envelope; an
/// answer that is JSON already passes unchanged.
async fn envelope(req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let json = res.headers().get(header::CONTENT_TYPE).is_some_and(is_json);
    if json {
        return res;
    }
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = res
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            ApiError::MethodNotAllowed { method, allowed }.into_response()
        }
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge.into_response(),
        _ => {
            // axum's rejections say what failed in a short text
            let text = axum::body::to_bytes(res.into_body(), 4096)
                .await
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .unwrap_or_default();
            let message = if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("request refused")
                    .to_lowercase()
            } else {
                text
            };
            ApiError::Request { status, message }.into_response()
        }
    }
}

/// [`intake`]'s middleware: the command's name as its state.
type IntakeLayer = middleware::FromFnLayer<IntakeFn, &'static str, (State<&'static str>, Request)>;
type IntakeFn = fn(State<&'static str>, Request, Next) -> BoxedResponse;
type BoxedResponse = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// What [`intake`] names `memory.<command>` after the path's last segment.
const MEMORY_COMMAND: &str = "memory.*";

/// The intake span (`telemetry::intake_span`, door `http`) around a write
/// route's handler, as the NATS door opens one per command: the commits
/// the command makes are its children. `command` names it
/// (`<aggregate_type>.<command>`, or [`MEMORY_COMMAND`]); a job's routes
/// record the job id of their path. `POST /v1/jobs` opens its own, once
/// the caller's allowance is taken.
fn intake(command: &'static str) -> IntakeLayer {
    middleware::from_fn_with_state(command, |State(command), req, next| {
        Box::pin(in_intake(command, req, next))
    })
}

async fn in_intake(command: &'static str, req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let path = req.uri().path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let span = if command == MEMORY_COMMAND {
        // a command's name, or none (the route answers 404 for it)
        let name = segments
            .last()
            .copied()
            .filter(|n| n.len() <= 32 && n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .unwrap_or("unknown");
        crate::telemetry::intake_span("http", &format!("memory.{name}"))
    } else {
        crate::telemetry::intake_span("http", command)
    };
    // /v1/jobs/{id}/<verb>, only a well-formed id (the command refuses
    // any other, and the span keeps no junk from a path)
    if let ["v1", "jobs", id, _] = segments.as_slice() {
        if crate::events::log::valid_aggregate_id(id) {
            span.record("job_id", *id);
        }
    }
    next.run(req).instrument(span).await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route (see /openapi.json)".into())
}

/// The HTTP API's router: every route, bearer authentication on `/v1`
/// (but the n8n callback), JSON bodies only on its POSTs (415), the body
/// limit (413), the latency metric, the JSON 404 fallback, the error
/// envelope on every error answer, gzip, CORS when configured, and outside
/// them all the request id and the access log.
pub fn app(state: AppState) -> Router {
    let cors = cors_layer(&state.cors_allowed_origins);
    // every /v1 route but the n8n callback needs a bearer token
    let authenticated = Router::new()
        .route(
            "/v1/jobs",
            post(write::jobs_submit).route_layer(middleware::from_fn_with_state(
                state.clone(),
                refuse_while_draining,
            )),
        )
        .route("/v1/jobs/{id}", get(read::jobs_get))
        .route("/v1/jobs/{id}/status", get(read::jobs_status))
        .route("/v1/jobs/{id}/events", get(super::live::jobs_events))
        .route("/v1/me", get(read::me_get))
        .route(
            "/v1/jobs/{id}/cancel",
            post(write::jobs_cancel).route_layer(intake("job.cancel")),
        )
        .route(
            "/v1/jobs/{id}/retry",
            post(write::jobs_retry).route_layer(intake("job.retry")),
        )
        .route(
            "/v1/workflows/{key}/disable",
            post(write::workflows_disable).route_layer(intake("workflow.disable")),
        )
        .route(
            "/v1/workflows/{key}/enable",
            post(write::workflows_enable).route_layer(intake("workflow.enable")),
        )
        .route("/v1/meta", get(write::meta_get))
        .route(
            "/v1/memory/assemble",
            post(memory::memory_assemble).route_layer(intake("memory.assemble")),
        )
        .route(
            "/v1/memory/{command}",
            post(memory::memory_command).route_layer(intake(MEMORY_COMMAND)),
        )
        .route(
            "/v1/memory/subjects/{subject_id}/episodes",
            get(memory::memory_episodes),
        )
        .route(
            "/v1/memory/subjects/{subject_id}/facts",
            get(memory::memory_facts),
        )
        .route(
            "/v1/memory/subjects/{subject_id}/profile",
            get(memory::memory_profile),
        )
        .route(
            "/v1/secrets/read",
            post(secrets::secrets_read).route_layer(intake("secret.read")),
        )
        .route(
            "/v1/secrets/invalidate",
            post(secrets::secrets_invalidate).route_layer(intake("secret.invalidate")),
        )
        .route("/v1/executions", get(read::executions_list))
        .route("/v1/audit", get(read::audit_list))
        .route("/v1/audit/secret-accesses", get(read::secret_accesses_list))
        .route("/v1/approvals", get(read::approvals_list))
        .route(
            "/v1/approvals/bulk",
            post(write::approvals_bulk).route_layer(intake("approval.bulk")),
        )
        .route("/v1/approvals/{id}", get(read::approvals_get))
        .route(
            "/v1/approvals/{id}/approve",
            post(write::approvals_approve).route_layer(intake("approval.approve")),
        )
        .route(
            "/v1/approvals/{id}/reject",
            post(write::approvals_reject).route_layer(intake("approval.reject")),
        )
        .route_layer(middleware::from_fn(require_json))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let console = if state.console {
        super::console::routes()
    } else {
        Router::new()
    };
    let routes = Router::new()
        .merge(authenticated)
        .merge(console)
        .route("/v1/callbacks/n8n", post(n8n::callbacks_n8n))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_get))
        .route("/openapi.json", get(openapi_get))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(track))
        .with_state(state);
    // outside the routes, so their answers are complete (axum adds `Allow`
    // to a 405 as the route answers) before the envelope is put on
    let api = Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(envelope))
        .layer(middleware::from_fn(super::time::one_time_format))
        // outside the envelope, which reads the bodies it replaces
        .layer(compression());
    // a preflight is answered here, before authentication; the envelope's
    // answers carry the CORS headers too, so a browser can read them
    let api = match cors {
        Some(cors) => api.layer(cors),
        None => api,
    };
    // outermost: every answer (a preflight, a 404, 405 or 413, the
    // envelope) has its request id and its access line
    api.layer(middleware::from_fn(request::conventions))
}

/// gzip when the client accepts it (no other encoding is built in); the
/// default predicate leaves bodies under 32 bytes, images and
/// `text/event-stream` uncompressed.
fn compression() -> CompressionLayer {
    CompressionLayer::new().gzip(true)
}

/// The CORS layer for `origins` (checked by the configuration: `["*"]`, or
/// origins as browsers send them); none when the list is empty.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    use axum::http::{HeaderName, Method};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| {
            HeaderValue::from_str(o)
                .inspect_err(|_| {
                    tracing::error!("CORS origin {o:?} is not a header value; left out")
                })
                .ok()
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("traceparent"),
                request::REQUEST_ID_HEADER,
            ])
            .expose_headers([
                request::REQUEST_ID_HEADER,
                header::RETRY_AFTER,
                auth::RATELIMIT_LIMIT,
                auth::RATELIMIT_REMAINING,
                auth::RATELIMIT_RESET,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_told_from_others() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for no in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "json",
            "",
        ] {
            assert!(!is_json(&HeaderValue::from_static(no)), "{no}");
        }
    }

    #[tokio::test]
    async fn gzip_compresses_json_when_accepted_and_never_an_event_stream() {
        use tower::ServiceExt;
        let big = "x".repeat(4096);
        let body = big.clone();
        let router: Router = Router::new()
            .route(
                "/json",
                get(move || {
                    let b = body.clone();
                    async move { Json(json!({ "items": [b] })) }
                }),
            )
            .route(
                "/events",
                get(move || {
                    let b = big.clone();
                    async move { ([(header::CONTENT_TYPE, "text/event-stream")], b) }
                }),
            )
            .layer(compression());
        let ask = |path: &str, gzip: bool| {
            let mut req = Request::builder().uri(path);
            if gzip {
                req = req.header(header::ACCEPT_ENCODING, "gzip");
            }
            req.body(axum::body::Body::empty()).expect("a request")
        };
        let encoding = |res: &Response| res.headers().get(header::CONTENT_ENCODING).cloned();
        let res = router
            .clone()
            .oneshot(ask("/json", true))
            .await
            .expect("an answer");
        assert_eq!(
            encoding(&res).as_ref().map(|v| v.as_bytes()),
            Some(&b"gzip"[..])
        );
        let res = router
            .clone()
            .oneshot(ask("/json", false))
            .await
            .expect("an answer");
        assert_eq!(encoding(&res), None, "not asked for");
        let res = router
            .oneshot(ask("/events", true))
            .await
            .expect("an answer");
        assert_eq!(
            encoding(&res),
            None,
            "an event stream is sent as it is written"
        );
    }
}
