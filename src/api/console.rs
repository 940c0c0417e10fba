//! The web console (`[console] enabled`): one static page and its script and
//! style, compiled into the binary (no build step, nothing fetched from
//! elsewhere), served at `/console`. It logs in with a client's bearer
//! token and reads and commands through the same `/v1` API as every other
//! caller: executions with filters, a job's live timeline
//! (`GET /v1/jobs/{id}/events`) and audit trail, the approvals inbox for the
//! operator role, and the projections' state (`/healthz`).
//!
//! The assets hold no data and need no token. They are served with a
//! Content-Security-Policy that allows only this origin's script and style
//! and no framing; the script puts every value as text, never as HTML.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::http::AppState;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// Only this origin's script, style and API; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

#[utoipa::path(get, path = "/console", responses((status = 200, description = "the web console's page (HTML); it logs in with a bearer token and uses the /v1 API", body = String, content_type = "text/html")))]
pub(crate) async fn console_page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn console_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn console_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// The console's routes: its page, script and style.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(console_page))
        .route("/console/", get(console_page))
        .route("/console/app.js", get(console_js))
        .route("/console/app.css", get(console_css))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets_and_the_script_writes_no_html() {
        assert!(INDEX_HTML.contains("src=\"/console/app.js\""));
        assert!(
            !INDEX_HTML.contains("<script>"),
            "no inline script: the CSP refuses it"
        );
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(
                !APP_JS.contains(sink),
                "app.js uses {sink}: values must go in as text"
            );
        }
    }
}
