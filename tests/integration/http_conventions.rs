//! HTTP API conventions on real nats-server and PostgreSQL: the error
//! envelope on every error answer (405, 413, 415, an unknown route).

use serde_json::Value;

use crate::helpers::*;

/// Sends `body` with `headers` (and no other header but the bearer token).
async fn send(
    api: &ReadSide,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut req = flowledger::handlers::http_client_builder()
        .build()
        .expect("an HTTP client")
        .request(method, format!("{}{path}", api.http));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let r = req.send().await.expect("HTTP request");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.expect("body");
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// The envelope `{"error": {"code", "message", ...}}` with `code`.
fn assert_envelope(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.headers["content-type"], "application/json", "{}", a.body);
    assert_eq!(a.body["error"]["code"], code, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn every_error_answer_is_the_json_envelope() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let json = [("content-type", "application/json")];

    // 405: the route exists, the method does not; Allow says which do
    let wrong = send(&api, "GET", "/v1/jobs", Some(BILLING_TOKEN), None, &[]).await;
    assert_envelope(&wrong, 405, "method_not_allowed");
    assert_eq!(wrong.headers["allow"], "POST");
    assert!(wrong.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("GET") && m.contains("POST")));
    let delete = send(
        &api,
        "DELETE",
        "/v1/jobs/j-1",
        Some(BILLING_TOKEN),
        None,
        &[],
    )
    .await;
    assert_envelope(&delete, 405, "method_not_allowed");

    // 413: a body over the limit
    let big = format!(
        r#"{{"workflow_key":"invoice.extract","inputs":{{"x":"{}"}}}}"#,
        "a".repeat(flowledger::api::http::MAX_BODY_BYTES)
    );
    let large = send(
        &api,
        "POST",
        "/v1/jobs",
        Some(BILLING_TOKEN),
        Some(big.into_bytes()),
        &json,
    )
    .await;
    assert_envelope(&large, 413, "payload_too_large");

    // 415: a command body that says it is not JSON, with the header named
    let job = br#"{"job_id":"ct-1","workflow_key":"invoice.extract"}"#.to_vec();
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let a = send(
            &api,
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(job.clone()),
            &[("content-type", ct)],
        )
        .await;
        assert_envelope(&a, 415, "unsupported_media_type");
        assert_eq!(a.body["error"]["param"], "Content-Type");
    }
    // nothing was submitted by the refused ones; JSON with a charset, and
    // no Content-Type at all, are taken
    assert_eq!(api.get("/v1/jobs/ct-1/status").await.0, 404);
    let charset = send(
        &api,
        "POST",
        "/v1/jobs",
        Some(BILLING_TOKEN),
        Some(job.clone()),
        &[("content-type", "application/json; charset=utf-8")],
    )
    .await;
    assert_eq!(charset.status, 202, "{}", charset.body);
    let none = send(
        &api,
        "POST",
        "/v1/jobs",
        Some(BILLING_TOKEN),
        Some(br#"{"job_id":"ct-2","workflow_key":"invoice.extract"}"#.to_vec()),
        &[],
    )
    .await;
    assert_eq!(none.status, 202, "{}", none.body);

    // 404: an unknown route, with or without a token
    for token in [None, Some(BILLING_TOKEN)] {
        let a = send(&api, "GET", "/v1/no-such-thing", token, None, &[]).await;
        assert_envelope(&a, 404, "not_found");
    }
}
