//! What every HTTP request gets, whatever its route: a request id
//! (`x-request-id`, kept from the client when well formed, else made here),
//! a tracing span holding it (so every log line of the request carries it;
//! with traces on, the HTTP server span, a child of a valid client
//! `traceparent`),
//! and one access log line at target `flowledger::access` when it is
//! answered. The access line names the matched route template, never the
//! raw path or its query (which can hold personal text), and never a header
//! or a body.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header that carries the request id, both ways.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id a client may send (longer: a new one is made).
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// The log target of the access log lines.
pub const ACCESS_TARGET: &str = "flowledger::access";

tokio::task_local! {
    /// The id of the request this task is answering.
    static CURRENT: String;
}

/// The id of the request being answered, for the error envelope
/// (`error.request_id`); none outside a request.
pub(crate) fn current_id() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// A client's request id, if it is one we keep: 1 to
/// [`MAX_REQUEST_ID_LEN`] of `A-Z a-z 0-9 . _ -`.
pub fn accepted_id(value: Option<&HeaderValue>) -> Option<String> {
    let v = value?.to_str().ok()?;
    let ok = (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| v.to_string())
}

/// What the inner layers learn about a request for its access line: the
/// route template (set by the router's latency layer) and the
/// authenticated client (set by `auth::authenticate`).
#[derive(Clone, Default)]
pub(crate) struct RequestFacts(Arc<Facts>);

#[derive(Default)]
struct Facts {
    route: OnceLock<String>,
    client_id: OnceLock<String>,
}

impl RequestFacts {
    /// The matched route template, e.g. `/v1/jobs/{id}`.
    pub(crate) fn set_route(&self, route: &str) {
        let _ = self.0.route.set(route.to_string());
    }

    /// The authenticated caller's client id.
    pub(crate) fn set_client_id(&self, client_id: &str) {
        let _ = self.0.client_id.set(client_id.to_string());
    }
}

/// Middleware, outside every other layer: gives the request its id (in the
/// request's headers for the inner layers, in the answer's headers, in the
/// span every log line of the request is written in, in the error
/// envelope), and writes the access line once the answer is ready.
pub async fn conventions(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = accepted_id(req.headers().get(&REQUEST_ID_HEADER))
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    // the id is 1-64 visible ASCII characters or a UUID: always a header value
    let value = HeaderValue::from_str(&id).ok();
    if let Some(v) = &value {
        req.headers_mut().insert(REQUEST_ID_HEADER, v.clone());
    }
    let facts = RequestFacts::default();
    req.extensions_mut().insert(facts.clone());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client_id = tracing::field::Empty,
        // set when answered, for the trace only (no log line follows)
        http.response.status_code = tracing::field::Empty,
    );
    // a trace the client started goes on here (traces on, valid header)
    let parent = req.headers().get(crate::telemetry::TRACEPARENT);
    crate::telemetry::adopt(&span, parent.and_then(|v| v.to_str().ok()));
    let mut res = CURRENT
        .scope(id.clone(), next.run(req))
        .instrument(span.clone())
        .await;
    if let Some(v) = value {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    let route = facts.0.route.get().map_or("unmatched", String::as_str);
    crate::telemetry::rename(&span, format!("{method} {route}"));
    span.record("http.response.status_code", res.status().as_u16());
    drop(span);
    tracing::info!(
        target: ACCESS_TARGET,
        method = %method,
        route,
        status = res.status().as_u16(),
        latency_ms,
        request_id = %id,
        client_id = facts.0.client_id.get().map(String::as_str),
        "request answered"
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_request_id_is_kept_only_when_well_formed() {
        let id = |s: &str| accepted_id(Some(&HeaderValue::from_str(s).expect("a header value")));
        for ok in ["a", "req-1.2_3", &"x".repeat(MAX_REQUEST_ID_LEN)] {
            assert_eq!(id(ok).as_deref(), Some(ok), "{ok}");
        }
        for no in [
            "",
            "has space",
            "semi;colon",
            "ünï",
            "a/b",
            &"x".repeat(MAX_REQUEST_ID_LEN + 1),
        ] {
            let v = HeaderValue::from_bytes(no.as_bytes()).expect("header bytes");
            assert_eq!(accepted_id(Some(&v)), None, "{no:?}");
        }
        assert_eq!(accepted_id(None), None);
    }
}
