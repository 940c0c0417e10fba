//! HTTP API conventions on real nats-server and PostgreSQL: the error
//! envelope on every error answer (405, 413, 415, an unknown route).

use serde_json::Value;

use crate::helpers::*;

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
    let wrong = api
        .send("GET", "/v1/jobs", Some(BILLING_TOKEN), None, &[])
        .await;
    assert_envelope(&wrong, 405, "method_not_allowed");
    assert_eq!(wrong.headers["allow"], "POST");
    assert!(wrong.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("GET") && m.contains("POST")));
    let delete = api
        .send("DELETE", "/v1/jobs/j-1", Some(BILLING_TOKEN), None, &[])
        .await;
    assert_envelope(&delete, 405, "method_not_allowed");

    // 413: a body over the limit
    let big = format!(
        r#"{{"workflow_key":"invoice.extract","inputs":{{"x":"{}"}}}}"#,
        "a".repeat(flowledger::api::http::MAX_BODY_BYTES)
    );
    let large = api
        .send(
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
        let a = api
            .send(
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
    let charset = api
        .send(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(job.clone()),
            &[("content-type", "application/json; charset=utf-8")],
        )
        .await;
    assert_eq!(charset.status, 202, "{}", charset.body);
    let none = api
        .send(
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
        let a = api.send("GET", "/v1/no-such-thing", token, None, &[]).await;
        assert_envelope(&a, 404, "not_found");
    }
}

/// POSTs the JSON `body` with `token` and `Idempotency-Key: key`.
async fn post_keyed(api: &ReadSide, path: &str, token: &str, key: &str, body: Value) -> Answer {
    api.send(
        "POST",
        path,
        Some(token),
        Some(body.to_string().into_bytes()),
        &[
            ("content-type", "application/json"),
            ("idempotency-key", key),
        ],
    )
    .await
}

/// POSTs `body` (with `Idempotency-Key: key`, if any) to `first`, which answers
/// `status`, then the same to `second`, which answers the same; returns
/// the first answer.
async fn once_on_both(
    first: &ReadSide,
    second: &ReadSide,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: &Value,
    status: u16,
) -> Answer {
    let send = |api, body| async move {
        match key {
            Some(key) => post_keyed(api, path, token, key, body).await,
            None => api.post(path, token, body).await,
        }
    };
    let answer = send(first, body.clone()).await;
    assert_eq!(answer.status, status, "{path}: {}", answer.body);
    let again = send(second, body.clone()).await;
    assert_eq!(
        (again.status, &again.body),
        (status, &answer.body),
        "{path}: the repeat answers the first answer"
    );
    answer
}

/// Requests an approval for `job_id` (submitted) over NATS, as the
/// handler does.
async fn request_approval(app: &TestApp, job_id: &str) {
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let body = serde_json::json!({"approval_id": job_id, "job_id": job_id,
        "workflow_key": "invoice.extract", "requested_by": "flowledger-handler",
        "expires_at": expires});
    app.handle("flow.cmd.approval.request", body.to_string().as_bytes())
        .await
        .expect("approval requested");
}

#[tokio::test]
async fn an_idempotency_key_answers_the_first_answer_on_every_instance() {
    use serde_json::json;
    let app = spawn_app().await;
    // two instances on one log, each with its own database and caches: the
    // second one has never seen the first one's requests (as after a restart)
    let one = spawn_read_side(&app, false).await;
    let two = spawn_api_on(&app, false, registry(), fresh_database().await).await;
    let job = json!({"workflow_key": "invoice.extract", "inputs": {"n": 1}});

    // a submission without job_id: the key names the job
    let first = post_keyed(&one, "/v1/jobs", BILLING_TOKEN, "sub-1", job.clone()).await;
    assert_eq!(first.status, 202, "{}", first.body);
    for api in [&one, &two] {
        let again = post_keyed(api, "/v1/jobs", BILLING_TOKEN, "sub-1", job.clone()).await;
        assert_eq!((again.status, &again.body), (202, &first.body));
    }
    let job_id = first.body["job_id"].as_str().expect("a job id").to_string();
    // the same key with another body: 409 naming the header, nothing new
    let changed = json!({"workflow_key": "invoice.extract", "inputs": {"n": 2}});
    let conflict = post_keyed(&two, "/v1/jobs", BILLING_TOKEN, "sub-1", changed).await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert_eq!(conflict.body["error"]["param"], "Idempotency-Key");
    assert_eq!(conflict.body["error"]["code"], "conflict");
    // another client's same key is its own: another job
    let theirs = post_keyed(&two, "/v1/jobs", OTHER_TOKEN, "sub-1", job.clone()).await;
    assert_eq!(theirs.status, 202, "{}", theirs.body);
    assert_ne!(theirs.body["job_id"], first.body["job_id"]);
    // without the key, the same body is a new job each time
    let fresh = one.post("/v1/jobs", BILLING_TOKEN, job.clone()).await;
    assert_ne!(fresh.body["job_id"], first.body["job_id"]);

    // cancel: the repeat, on the other instance, answers the first answer
    let path = format!("/v1/jobs/{job_id}/cancel");
    let cancel = json!({"reason": "not needed"});
    once_on_both(
        &one,
        &two,
        &path,
        BILLING_TOKEN,
        Some("can-1"),
        &cancel,
        200,
    )
    .await;
    // the key of the cancel reused on another route: 409
    let reused = post_keyed(&two, "/v1/jobs", BILLING_TOKEN, "can-1", job.clone()).await;
    assert_eq!(reused.status, 409, "{}", reused.body);
    assert_eq!(reused.body["error"]["param"], "Idempotency-Key");

    // approve, reject, bulk
    for id in ["k-1", "k-2", "k-3"] {
        app.submit(id, &format!("submit-{id}")).await;
        request_approval(&app, id).await;
    }
    let ok = json!({"reason": "checked"});
    once_on_both(
        &one,
        &two,
        "/v1/approvals/k-1/approve",
        OPERATOR_TOKEN,
        Some("ap-1"),
        &ok,
        200,
    )
    .await;
    // the same key and body on reject (another route): 409
    let other_route = post_keyed(
        &two,
        "/v1/approvals/k-1/reject",
        OPERATOR_TOKEN,
        "ap-1",
        ok.clone(),
    )
    .await;
    assert_eq!(other_route.status, 409, "{}", other_route.body);
    assert_eq!(other_route.body["error"]["param"], "Idempotency-Key");
    let bulk = json!({"approval_ids": ["k-2", "k-3"], "decision": "reject", "reason": "no"});
    let decided = post_keyed(
        &one,
        "/v1/approvals/bulk",
        OPERATOR_TOKEN,
        "bulk-1",
        bulk.clone(),
    )
    .await;
    assert_eq!(decided.status, 200, "{}", decided.body);
    assert_eq!(decided.body["decided"], 2, "{}", decided.body);
    let again = post_keyed(
        &two,
        "/v1/approvals/bulk",
        OPERATOR_TOKEN,
        "bulk-1",
        bulk.clone(),
    )
    .await;
    assert_eq!((again.status, &again.body), (200, &decided.body));

    // the kill-switch
    let why = json!({"reason": "maintenance"});
    once_on_both(
        &one,
        &two,
        "/v1/workflows/invoice.extract/disable",
        OPERATOR_TOKEN,
        Some("off-1"),
        &why,
        200,
    )
    .await;
    once_on_both(
        &two,
        &one,
        "/v1/workflows/invoice.extract/enable",
        OPERATOR_TOKEN,
        Some("on-1"),
        &why,
        200,
    )
    .await;

    // each command once in the log: one submission under the key, one cancel
    let loaded = one.bus.load_job(&job_id).await.expect("the job");
    assert_eq!(loaded.version, 2, "submitted and cancelled, once each");
    assert!(loaded.commits.keys().all(|id| id.starts_with("idem:")));
}

#[tokio::test]
async fn a_bad_idempotency_key_is_refused_naming_the_header() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let job = serde_json::json!({"job_id": "bk-1", "workflow_key": "invoice.extract"});
    let long = "k".repeat(129);
    for key in ["a:b", "with space", long.as_str()] {
        let a = post_keyed(&api, "/v1/jobs", BILLING_TOKEN, key, job.clone()).await;
        assert_envelope(&a, 400, "validation");
        assert_eq!(a.body["error"]["param"], "Idempotency-Key");
        assert!(!a.body.to_string().contains(key), "the key is not echoed");
    }
    // sent twice
    let twice = api
        .send(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(job.to_string().into_bytes()),
            &[("idempotency-key", "a"), ("idempotency-key", "b")],
        )
        .await;
    assert_envelope(&twice, 400, "validation");
    let job = api.bus.load_job("bk-1").await.expect("the log answers");
    assert_eq!(job.version, 0, "nothing was submitted");
}

#[tokio::test]
async fn a_repeated_decision_answers_the_first_answer_and_another_stays_409() {
    use serde_json::json;
    let app = spawn_app().await;
    let one = spawn_read_side(&app, false).await;
    // another instance: the repeat is recognised from the log, not a cache
    let two = spawn_api_on(&app, false, registry(), fresh_database().await).await;
    for id in ["d-1", "d-2", "d-3"] {
        app.submit(id, &format!("submit-{id}")).await;
        request_approval(&app, id).await;
    }

    // approve: the same body again answers the first answer
    let ok = json!({"reason": "checked", "user_id": "olga"});
    once_on_both(
        &one,
        &two,
        "/v1/approvals/d-1/approve",
        OPERATOR_TOKEN,
        None,
        &ok,
        200,
    )
    .await;
    // another decision, or the same with another body: 409 saying what was decided
    for (path, body) in [
        ("/v1/approvals/d-1/reject", ok.clone()),
        ("/v1/approvals/d-1/approve", json!({"reason": "other"})),
    ] {
        let refused = two.post(path, OPERATOR_TOKEN, body).await;
        assert_eq!(refused.status, 409, "{}", refused.body);
        let message = refused.body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("approved") && message.contains("by ops"),
            "{message}"
        );
    }
    // requested and decided: two commits, whatever was sent again
    assert_eq!(app.messages_on("flow.ev.approval.d-1").await, 2);

    // the NATS door: the same body twice is one decision
    let body = json!({"approval_id": "d-2", "reason": "fine"}).to_string();
    let nats_first = app
        .handle("flow.cmd.approval.approve", body.as_bytes())
        .await
        .expect("approved over NATS");
    let nats_again = app
        .handle("flow.cmd.approval.approve", body.as_bytes())
        .await
        .expect("the repeat answers the first receipt");
    assert!(nats_again.duplicate);
    assert_eq!(nats_again.stream_seq, nats_first.stream_seq);
    let other = json!({"approval_id": "d-2", "reason": "changed"}).to_string();
    let refused = app
        .handle("flow.cmd.approval.reject", other.as_bytes())
        .await
        .expect_err("another decision is refused");
    assert_eq!(refused.code.as_str(), "rejected");
    assert!(refused.message.contains("approved"), "{}", refused.message);

    // cancel
    for id in ["x-1"] {
        let a = one
            .post(
                "/v1/jobs",
                BILLING_TOKEN,
                json!({"job_id": id, "workflow_key": "invoice.extract"}),
            )
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let why = json!({"reason": "not needed"});
    once_on_both(
        &one,
        &two,
        "/v1/jobs/x-1/cancel",
        BILLING_TOKEN,
        None,
        &why,
        200,
    )
    .await;
    let by_ops = two
        .post("/v1/jobs/x-1/cancel", OPERATOR_TOKEN, why.clone())
        .await;
    assert_eq!(by_ops.status, 409, "another caller: {}", by_ops.body);
    assert!(by_ops.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("cancelled")));
    let job = one.bus.load_job("x-1").await.expect("the job");
    assert_eq!(job.version, 2, "submitted and cancelled once");

    // the kill-switch: the same disable again answers the first; after an
    // enable the same body disables anew
    let path = "/v1/workflows/invoice.extract/disable";
    let off = json!({"reason": "maintenance"});
    let first = once_on_both(&one, &two, path, OPERATOR_TOKEN, None, &off, 200).await;
    let changed = two
        .post(path, OPERATOR_TOKEN, json!({"reason": "again"}))
        .await;
    assert_eq!(changed.status, 409, "{}", changed.body);
    assert!(changed.body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("already disabled")));
    let on = json!({"reason": "fixed"});
    let enabled = one
        .post(
            "/v1/workflows/invoice.extract/enable",
            OPERATOR_TOKEN,
            on.clone(),
        )
        .await;
    assert_eq!(enabled.status, 200, "{}", enabled.body);
    let again = two
        .post(
            "/v1/workflows/invoice.extract/enable",
            OPERATOR_TOKEN,
            on.clone(),
        )
        .await;
    assert_eq!((again.status, &again.body), (200, &enabled.body));
    let anew = two.post(path, OPERATOR_TOKEN, off.clone()).await;
    assert_eq!(anew.status, 200, "{}", anew.body);
    assert_ne!(
        anew.body["at"], first.body["at"],
        "a new disable, not the first one"
    );
}

#[tokio::test]
async fn a_job_awaits_approval_in_its_status_while_its_approval_is_pending() {
    use serde_json::json;
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    for id in ["w-1", "w-2"] {
        let a = api
            .post(
                "/v1/jobs",
                BILLING_TOKEN,
                json!({"job_id": id, "workflow_key": "invoice.extract"}),
            )
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
        request_approval(&app, id).await;
    }
    api.caught_up(&app.log).await;
    let status_of = |id: &'static str| {
        let api = &api;
        async move {
            let (_, row) = api.get(&format!("/v1/jobs/{id}")).await;
            let (_, status) = api.get(&format!("/v1/jobs/{id}/status")).await;
            assert_eq!(row["status"], status["status"], "{row} {status}");
            row["status"].as_str().unwrap_or("").to_string()
        }
    };
    assert_eq!(status_of("w-1").await, "awaiting_approval");
    let (code, list) = api.get("/v1/executions?status=awaiting_approval").await;
    assert_eq!(code, 200, "{list}");
    let mut ids: Vec<_> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["execution_id"].as_str().unwrap_or("").to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["w-1", "w-2"]);

    // approved: pending again, until the handler starts it
    let ok = api
        .post(
            "/v1/approvals/w-1/approve",
            OPERATOR_TOKEN,
            json!({"reason": "ok"}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // cancelled while awaiting, then rejected: it stays cancelled
    let cancel = api
        .post(
            "/v1/jobs/w-2/cancel",
            BILLING_TOKEN,
            json!({"reason": "gone"}),
        )
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    api.caught_up(&app.log).await;
    assert_eq!(status_of("w-2").await, "cancelled");
    let no = api
        .post(
            "/v1/approvals/w-2/reject",
            OPERATOR_TOKEN,
            json!({"reason": "late"}),
        )
        .await;
    assert_eq!(no.status, 200, "{}", no.body);
    api.caught_up(&app.log).await;
    assert_eq!(status_of("w-1").await, "pending");
    assert_eq!(status_of("w-2").await, "cancelled");
    let (_, list) = api.get("/v1/executions?status=awaiting_approval").await;
    assert_eq!(list["items"], json!([]), "{list}");
}

#[tokio::test]
async fn an_approval_is_read_with_its_jobs_inputs_by_those_who_may() {
    use serde_json::json;
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    let job = json!({"job_id": "g-1", "workflow_key": "invoice.extract",
                     "inputs": {"invoice": 7, "amount": "120.50"}});
    assert_eq!(api.post("/v1/jobs", BILLING_TOKEN, job).await.status, 202);
    request_approval(&app, "g-1").await;
    api.caught_up(&app.log).await;

    let read = |token: &'static str, path: &'static str| {
        let api = &api;
        async move { api.call("GET", path, Some(token), None).await }
    };
    // its client, an operator and an auditor read it
    for token in [BILLING_TOKEN, OPERATOR_TOKEN, AUDITOR_TOKEN] {
        let a = read(token, "/v1/approvals/g-1").await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["approval_id"], "g-1");
        assert_eq!(a.body["status"], "pending");
        assert_eq!(a.body["requested_by"], "flowledger-handler");
        assert_eq!(
            a.body["job"]["inputs"],
            json!({"invoice": 7, "amount": "120.50"})
        );
        assert_eq!(a.body["job"]["status"], "awaiting_approval");
        assert_eq!(a.body["job"]["client_id"], "billing");
    }
    // another client: as a missing one
    let theirs = read(OTHER_TOKEN, "/v1/approvals/g-1").await;
    let missing = read(OPERATOR_TOKEN, "/v1/approvals/g-9").await;
    for a in [&theirs, &missing] {
        assert_envelope(a, 404, "not_found");
    }
    assert_eq!(
        theirs.body["error"]["message"]
            .as_str()
            .map(|m| m.replace("g-1", "g-9")),
        missing.body["error"]["message"]
            .as_str()
            .map(str::to_string)
    );
    let bad = read(OPERATOR_TOKEN, "/v1/approvals/a%20b").await;
    assert_envelope(&bad, 400, "validation");
    assert_eq!(bad.body["error"]["param"], "id");

    // decided: who and why
    let ok = api
        .post(
            "/v1/approvals/g-1/approve",
            OPERATOR_TOKEN,
            json!({"reason": "fine"}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    api.caught_up(&app.log).await;
    let a = read(BILLING_TOKEN, "/v1/approvals/g-1").await;
    assert_eq!(
        (
            &a.body["status"],
            &a.body["decided_by"],
            &a.body["decision_reason"]
        ),
        (&json!("approved"), &json!("ops"), &json!("fine")),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn an_idempotency_key_makes_a_secret_invalidation_once() {
    use crate::secret_access::{api_with_secrets, secrets_settings, vault_with_secrets};
    use serde_json::json;
    let app = spawn_app().await;
    let (bao, token) = vault_with_secrets("sk-1").await;
    let one = api_with_secrets(&app, secrets_settings(&bao, &token, 300, 3600).await, false).await;
    let two = api_with_secrets(&app, secrets_settings(&bao, &token, 300, 3600).await, false).await;
    let body = json!({"path": "secret/data/billing/stripe", "reason": "rotated"});
    let path = "/v1/secrets/invalidate";
    let first = once_on_both(&one, &two, path, OPERATOR_TOKEN, Some("inv-1"), &body, 200).await;
    let other = json!({"path": "secret/data/billing/stripe", "reason": "again"});
    let reused = post_keyed(&two, path, OPERATOR_TOKEN, "inv-1", other.clone()).await;
    assert_eq!(reused.status, 409, "{}", reused.body);
    assert_eq!(reused.body["error"]["param"], "Idempotency-Key");
    // without a key each invalidation is recorded anew
    let fresh = one.post(path, OPERATOR_TOKEN, other).await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    assert_ne!(fresh.body["event_seq"], first.body["event_seq"]);
}

#[tokio::test]
async fn an_idempotency_key_makes_a_memory_writeback_once() {
    use serde_json::json;
    let app = spawn_app().await;
    let bao = crate::openbao::OpenBao::start().await;
    let one = spawn_api_with_memory(
        &app,
        false,
        fresh_database().await,
        memory_service(&bao).await,
    )
    .await;
    // another instance with its own key cache
    let two = spawn_api_with_memory(
        &app,
        false,
        fresh_database().await,
        memory_service(&bao).await,
    )
    .await;
    let turn = json!({"subject_id": "cust-1",
        "messages": [{"role": "user", "content": "I moved to Lyon."}], "response": "Noted."});
    let path = "/v1/memory/writeback";
    let first = post_keyed(&one, path, BILLING_TOKEN, "turn-1", turn.clone()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = post_keyed(&two, path, BILLING_TOKEN, "turn-1", turn.clone()).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["episode_id"], first.body["episode_id"]);
    assert_eq!(again.body["stream_seq"], first.body["stream_seq"]);
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    // another body under the key: 409 naming the header
    let other = json!({"subject_id": "cust-1",
        "messages": [{"role": "user", "content": "I moved to Porto."}], "response": "Noted."});
    let reused = post_keyed(&two, path, BILLING_TOKEN, "turn-1", other.clone()).await;
    assert_eq!(reused.status, 409, "{}", reused.body);
    assert_eq!(reused.body["error"]["param"], "Idempotency-Key");
    assert!(
        !reused.body.to_string().contains("Porto"),
        "no personal text in the error"
    );
    // without the key the same turn is another episode
    let fresh = one.post(path, BILLING_TOKEN, turn).await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    assert_ne!(fresh.body["episode_id"], first.body["episode_id"]);
    // a bad key is refused before anything is recorded
    let bad = post_keyed(&one, path, BILLING_TOKEN, "a:b", other).await;
    assert_envelope(&bad, 400, "validation");
    assert_eq!(bad.body["error"]["param"], "Idempotency-Key");
}

/// Sends memory command `name` over NATS as billing, with
/// `Idempotency-Key: key` (in the header's usual case) when given.
async fn memory_over_nats(app: &TestApp, name: &str, key: Option<&str>, body: &Value) -> Value {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(k) = key {
        headers.insert("Idempotency-Key", k);
    }
    let reply = app
        .nats_as(Who::Billing)
        .request_with_headers(
            format!("flow.cmd.memory.{name}"),
            headers,
            body.to_string().into(),
        )
        .await
        .expect("a reply from the intake");
    serde_json::from_slice(&reply.payload).expect("replies are JSON")
}

#[tokio::test]
async fn an_idempotency_key_makes_every_memory_command_once_on_both_doors() {
    use serde_json::json;
    let bao = crate::openbao::OpenBao::start().await;
    let memory = memory_service(&bao).await;
    let app = spawn_app_with_memory(
        NatsServer::start(),
        flowledger::events::log::LogConfig::default(),
        None,
        Some(memory.clone()),
    )
    .await;
    let api = spawn_api_with_memory(&app, false, fresh_database().await, memory).await;
    let email = |e: &str| json!({"subject_id": "cust-1", "fields": {"email": e}});

    // a profile sent with a key over NATS, then another value without one
    let first = memory_over_nats(&app, "profile", Some("p-1"), &email("a@example.test")).await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["duplicate"], false, "{first}");
    let later = api
        .post("/v1/memory/profile", BILLING_TOKEN, email("b@example.test"))
        .await;
    assert_eq!(later.status, 200, "{}", later.body);
    let end = app.last_seq().await;
    // the keyed profile repeated, on either door, answers its first receipt
    // and records nothing: the later value is not overwritten by the retry
    let again = memory_over_nats(&app, "profile", Some("p-1"), &email("a@example.test")).await;
    assert_eq!(again["stream_seq"], first["stream_seq"], "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    let http = post_keyed(
        &api,
        "/v1/memory/profile",
        BILLING_TOKEN,
        "p-1",
        email("a@example.test"),
    )
    .await;
    assert_eq!(http.status, 200, "{}", http.body);
    assert_eq!(
        http.body["stream_seq"], first["stream_seq"],
        "{}",
        http.body
    );
    assert_eq!(app.last_seq().await, end, "a repeat records nothing");

    // the same key with another body, or for another command: 409 naming it
    let other = memory_over_nats(&app, "profile", Some("p-1"), &email("c@example.test")).await;
    assert_eq!(other["error"]["code"], "conflict", "{other}");
    assert_eq!(other["error"]["field"], "Idempotency-Key", "{other}");
    assert!(!other.to_string().contains("c@example"), "no personal text");
    let state = json!({"subject_id": "cust-1", "key": "cart", "value": [1], "ttl_seconds": 600});
    let misused = post_keyed(
        &api,
        "/v1/memory/working-state-set",
        BILLING_TOKEN,
        "p-1",
        state.clone(),
    )
    .await;
    assert_eq!(misused.status, 409, "{}", misused.body);
    assert_eq!(misused.body["error"]["param"], "Idempotency-Key");

    // working state set, deleted, and a fact forgotten: each once by key
    let fact = json!({"subject_id": "cust-1",
        "facts": [{"subject": "user", "key": "city", "value": "Lyon"}]});
    let wrote = api.post("/v1/memory/writeback", BILLING_TOKEN, fact).await;
    assert_eq!(wrote.status, 200, "{}", wrote.body);
    for (name, key, body) in [
        ("working_state_set", "w-1", state),
        (
            "working_state_delete",
            "d-1",
            json!({"subject_id": "cust-1", "key": "cart"}),
        ),
        (
            "forget",
            "f-1",
            json!({"subject_id": "cust-1", "subject": "user", "key": "city"}),
        ),
    ] {
        let once = memory_over_nats(&app, name, Some(key), &body).await;
        assert_eq!(once["ok"], true, "{name}: {once}");
        assert_eq!(once["duplicate"], false, "{name}: {once}");
        let end = app.last_seq().await;
        let path = format!("/v1/memory/{}", name.replace('_', "-"));
        let twice = post_keyed(&api, &path, BILLING_TOKEN, key, body.clone()).await;
        assert_eq!(twice.status, 200, "{name}: {}", twice.body);
        assert_eq!(twice.body["stream_seq"], once["stream_seq"], "{name}");
        assert_eq!(twice.body["duplicate"], true, "{name}: {}", twice.body);
        assert_eq!(
            app.last_seq().await,
            end,
            "{name}: a repeat records nothing"
        );
    }
    // without a key, deleting what is gone is refused: the key is what
    // made the repeat above an answer
    let gone = memory_over_nats(
        &app,
        "working_state_delete",
        None,
        &json!({"subject_id": "cust-1", "key": "cart"}),
    )
    .await;
    assert_eq!(gone["ok"], false, "{gone}");

    // a bad key over NATS is refused naming the header, before anything
    let end = app.last_seq().await;
    let bad = memory_over_nats(&app, "profile", Some("a:b"), &email("d@example.test")).await;
    assert_eq!(bad["error"]["code"], "validation", "{bad}");
    assert_eq!(bad["error"]["field"], "Idempotency-Key", "{bad}");
    assert_eq!(app.last_seq().await, end);
}

// ---- request id, access log, CORS, gzip, rate-limit headers (issue 15) ----

/// The `x-request-id` of an answer.
fn request_id(a: &Answer) -> String {
    a.headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no x-request-id on a {} answer: {}", a.status, a.body))
        .to_string()
}

/// A header of an answer as a number.
fn number(a: &Answer, name: &str) -> u64 {
    a.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no numeric {name} on a {} answer: {:?}",
                a.status, a.headers
            )
        })
}

#[tokio::test]
async fn every_answer_carries_a_request_id_kept_from_the_client_when_well_formed() {
    if ran_alone(
        "http_conventions::every_answer_carries_a_request_id_kept_from_the_client_when_well_formed",
    )
    .await
    {
        return;
    }
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let logs = capture_logs(tracing::Level::INFO);

    // a well-formed id is kept, on success and on every kind of error,
    // and the envelope quotes it
    let big = vec![b'a'; flowledger::api::http::MAX_BODY_BYTES + 1];
    // method, path, token, body, status
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<Vec<u8>>,
        u16,
    );
    let cases: Vec<Case> = vec![
        ("GET", "/livez", None, None, 200),
        ("GET", "/v1/meta", Some(BILLING_TOKEN), None, 200),
        ("GET", "/v1/no-such-route", Some(BILLING_TOKEN), None, 404),
        ("GET", "/v1/jobs", Some(BILLING_TOKEN), None, 405),
        ("POST", "/v1/jobs", Some(BILLING_TOKEN), Some(big), 413),
        ("GET", "/v1/jobs/nope", None, None, 401),
        ("GET", "/v1/jobs/nope", Some(BILLING_TOKEN), None, 404),
    ];
    for (i, (method, path, token, body, status)) in cases.into_iter().enumerate() {
        let sent = format!("client-req.{i}_x");
        let a = api
            .send(method, path, token, body, &[("x-request-id", &sent)])
            .await;
        assert_eq!(a.status, status, "{method} {path}: {}", a.body);
        assert_eq!(request_id(&a), sent, "{method} {path}");
        if status >= 400 {
            assert_envelope(&a, status, a.body["error"]["code"].as_str().unwrap_or(""));
            assert_eq!(
                a.body["error"]["request_id"],
                sent.as_str(),
                "{method} {path}"
            );
        }
    }

    // a malformed id (too long, a character outside A-Za-z0-9._-) or none:
    // a fresh UUID, a different one each time, quoted by the envelope
    let mut made = std::collections::BTreeSet::new();
    for sent in [
        Some("x".repeat(65)),
        Some("has space".into()),
        Some("a/b".into()),
        None,
    ] {
        let headers: Vec<(&str, &str)> =
            sent.iter().map(|s| ("x-request-id", s.as_str())).collect();
        let a = api
            .send("GET", "/v1/jobs/nope", Some(BILLING_TOKEN), None, &headers)
            .await;
        assert_eq!(a.status, 404);
        let id = request_id(&a);
        assert_ne!(Some(&id), sent.as_ref(), "a malformed id is replaced");
        let uuid = uuid::Uuid::parse_str(&id).expect("a made id is a UUID");
        assert!(matches!(uuid.get_version_num(), 4 | 7), "{id}");
        assert_eq!(a.body["error"]["request_id"], id.as_str());
        assert!(made.insert(id), "each request its own id");
    }

    // the id is in the request's span: a line a handler logs while it runs
    // (an unsigned n8n callback's refusal) carries it
    let refused = api
        .send(
            "POST",
            "/v1/callbacks/n8n",
            None,
            Some(b"{}".to_vec()),
            &[
                ("x-request-id", "span-check-1"),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).to_string();
    let line = logged
        .lines()
        .find(|l| l.contains("n8n callback refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{logged}"));
    assert!(line.contains("request{request_id=span-check-1}"), "{line}");
}

/// Whether the log line `l` has the field `name=value` (`kv`) whole.
fn field(l: &str, kv: &str) -> bool {
    l.split_whitespace().any(|w| w == kv)
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_with_the_route_template_and_no_query() {
    if ran_alone("http_conventions::the_access_log_has_one_line_per_request_with_the_route_template_and_no_query").await {
        return;
    }
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let logs = capture_logs(tracing::Level::INFO);
    let planted = "PlantedPersonalText4711";

    let a = api
        .send(
            "GET",
            &format!("/v1/jobs/{planted}-job"),
            Some(OPERATOR_TOKEN),
            None,
            &[("x-request-id", "access-1")],
        )
        .await;
    assert_eq!(a.status, 404, "{}", a.body);
    let b = api
        .send(
            "GET",
            &format!("/v1/executions?workflow_id={planted}&limit=5"),
            Some(BILLING_TOKEN),
            None,
            &[("x-request-id", "access-2")],
        )
        .await;
    assert_eq!(b.status, 200, "{}", b.body);
    let c = api
        .send(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(
                format!(r#"{{"workflow_key":"invoice.extract","inputs":{{"note":"{planted}"}}}}"#)
                    .into_bytes(),
            ),
            &[
                ("x-request-id", "access-3"),
                ("content-type", "application/json"),
            ],
        )
        .await;
    assert_eq!(c.status, 202, "{}", c.body);
    let d = api
        .send(
            "GET",
            &format!("/nowhere?q={planted}"),
            None,
            None,
            &[("x-request-id", "access-4")],
        )
        .await;
    assert_eq!(d.status, 404, "{}", d.body);

    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).to_string();
    let access: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains(" flowledger::access:"))
        .collect();
    let line = |id: &str| -> &str {
        let found: Vec<&&str> = access
            .iter()
            .filter(|l| field(l, &format!("request_id={id}")))
            .collect();
        assert_eq!(found.len(), 1, "one access line for {id}:\n{logged}");
        found[0]
    };
    for (id, method, route, status, client) in [
        ("access-1", "GET", "/v1/jobs/{id}", 404, Some("ops")),
        ("access-2", "GET", "/v1/executions", 200, Some("billing")),
        ("access-3", "POST", "/v1/jobs", 202, Some("billing")),
        ("access-4", "GET", "unmatched", 404, None),
    ] {
        let l = line(id);
        assert!(l.contains(" INFO "), "{l}");
        assert!(field(l, &format!("method={method}")), "{l}");
        assert!(field(l, &format!("route=\"{route}\"")), "{l}");
        assert!(field(l, &format!("status={status}")), "{l}");
        let latency = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("latency_ms="))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(latency.is_some_and(|ms| ms >= 0.0), "{l}");
        match client {
            Some(c) => assert!(field(l, &format!("client_id=\"{c}\"")), "{l}"),
            None => assert!(!l.contains("client_id="), "{l}"),
        }
    }
    // the planted value was in a path, a query and a body: in no log line;
    // nor is a token
    for secret in [planted, BILLING_TOKEN, OPERATOR_TOKEN, "Bearer"] {
        assert!(!logged.contains(secret), "{secret} logged:\n{logged}");
    }
}

#[tokio::test]
async fn cors_answers_a_preflight_from_an_allowed_origin_only() {
    let app = spawn_app().await;
    let allowed = "https://app.example.com";
    let api = spawn_api_with_cors(&app, &[allowed, "http://localhost:3000"]).await;
    let preflight = |origin: &'static str| {
        let api = &api;
        async move {
            api.send(
                "OPTIONS",
                "/v1/jobs",
                None,
                None,
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    (
                        "access-control-request-headers",
                        "authorization,content-type,idempotency-key,traceparent,x-request-id",
                    ),
                ],
            )
            .await
        }
    };

    // allowed: answered without a token, the origin, methods and headers said
    let ok = preflight("https://app.example.com").await;
    assert!(matches!(ok.status, 200 | 204), "{} {}", ok.status, ok.body);
    let h = |a: &Answer, name: &str| {
        a.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    assert_eq!(
        h(&ok, "access-control-allow-origin").as_deref(),
        Some(allowed)
    );
    let methods = h(&ok, "access-control-allow-methods").expect("methods");
    assert!(
        methods.contains("get") && methods.contains("post"),
        "{methods}"
    );
    let headers = h(&ok, "access-control-allow-headers").expect("headers");
    for name in [
        "authorization",
        "content-type",
        "idempotency-key",
        "traceparent",
        "x-request-id",
    ] {
        assert!(headers.contains(name), "{name} in {headers}");
    }
    request_id(&ok);

    // another origin: no CORS header to let it in
    let other = preflight("https://evil.example").await;
    assert!(
        other.headers.get("access-control-allow-origin").is_none(),
        "{:?}",
        other.headers
    );

    // an allowed origin's real request sees the headers it may read
    let job = api
        .send(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(br#"{"workflow_key":"invoice.extract"}"#.to_vec()),
            &[("origin", allowed), ("content-type", "application/json")],
        )
        .await;
    assert_eq!(job.status, 202, "{}", job.body);
    assert_eq!(
        h(&job, "access-control-allow-origin").as_deref(),
        Some(allowed)
    );
    let exposed = h(&job, "access-control-expose-headers").expect("exposed");
    for name in [
        "x-request-id",
        "retry-after",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
    ] {
        assert!(exposed.contains(name), "{name} in {exposed}");
    }

    // without [http] cors_allowed_origins: no CORS header at all
    let plain = spawn_read_side(&app, false).await;
    let a = plain
        .send(
            "OPTIONS",
            "/v1/jobs",
            None,
            None,
            &[
                ("origin", allowed),
                ("access-control-request-method", "POST"),
            ],
        )
        .await;
    assert!(
        !a.headers
            .keys()
            .any(|k| k.as_str().starts_with("access-control-")),
        "{:?}",
        a.headers
    );
}

#[tokio::test]
async fn a_list_answer_is_gzipped_when_asked_and_decodes_to_the_same_json() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    for i in 0..3 {
        let a = api
            .post(
                "/v1/jobs",
                BILLING_TOKEN,
                serde_json::json!({"job_id": format!("gz-{i}"), "workflow_key": "invoice.extract"}),
            )
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    api.caught_up(&app.log).await;
    let client = flowledger::handlers::http_client_builder()
        .build()
        .expect("an HTTP client");
    let get = |gzip: bool| {
        let mut req = client
            .get(format!("{}/v1/executions", api.http))
            .bearer_auth(OPERATOR_TOKEN);
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        async move { req.send().await.expect("HTTP request") }
    };
    let plain = get(false).await;
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("content-encoding").is_none());
    let plain: Value = serde_json::from_slice(&plain.bytes().await.expect("body")).expect("JSON");
    assert_eq!(plain["items"].as_array().map(Vec::len), Some(3), "{plain}");

    let zipped = get(true).await;
    assert_eq!(zipped.status(), 200);
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    let bytes = zipped.bytes().await.expect("body");
    assert!(
        serde_json::from_slice::<Value>(&bytes).is_err(),
        "the body is compressed"
    );
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .expect("gzip");
    let decoded: Value = serde_json::from_slice(&text).expect("JSON inside");
    assert_eq!(decoded, plain);
}

#[tokio::test]
async fn job_submissions_carry_the_rate_limit_headers_counting_down_to_the_429() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    // the `limited` client may submit 2 a minute
    let submit = |id: &'static str| {
        let api = &api;
        async move {
            api.post(
                "/v1/jobs",
                LIMITED_TOKEN,
                serde_json::json!({"job_id": id, "workflow_key": "invoice.extract"}),
            )
            .await
        }
    };
    let first = submit("rl-1").await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(number(&first, "ratelimit-limit"), 2);
    assert_eq!(number(&first, "ratelimit-remaining"), 1);
    let reset1 = number(&first, "ratelimit-reset");
    assert!(
        (1..=30).contains(&reset1),
        "one of 2 a minute back within 30 s: {reset1}"
    );

    let second = submit("rl-2").await;
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(number(&second, "ratelimit-limit"), 2);
    assert_eq!(number(&second, "ratelimit-remaining"), 0);
    let reset2 = number(&second, "ratelimit-reset");
    assert!(reset2 > reset1 && reset2 <= 60, "{reset1} then {reset2}");

    let over = submit("rl-3").await;
    assert_envelope(&over, 429, "rate_limited");
    let retry = number(&over, "retry-after");
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(number(&over, "ratelimit-limit"), 2);
    assert_eq!(number(&over, "ratelimit-remaining"), 0);
    let reset3 = number(&over, "ratelimit-reset");
    assert!(
        reset3 >= retry && reset3 <= 60,
        "Retry-After {retry}, reset {reset3}"
    );
    assert_eq!(over.body["error"]["request_id"], request_id(&over).as_str());

    // other routes carry no RateLimit header
    let read = api
        .send(
            "GET",
            "/v1/jobs/rl-1/status",
            Some(LIMITED_TOKEN),
            None,
            &[],
        )
        .await;
    assert!(
        read.headers.get("ratelimit-limit").is_none(),
        "{:?}",
        read.headers
    );
}

/// Every string under a time key (`*_at`, `valid_from`, `valid_to`,
/// `estimated_completion`) in `v`, with its path.
fn time_fields(v: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let here = format!("{path}.{k}");
                let timed = k.ends_with("_at")
                    || matches!(
                        k.as_str(),
                        "valid_from" | "valid_to" | "estimated_completion"
                    );
                match x {
                    serde_json::Value::String(s) if timed => out.push((here, s.clone())),
                    _ => time_fields(x, &here, out),
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                time_fields(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// UTC, microseconds, `Z`: `2026-12-07T15:04:05.123456Z`.
fn one_format(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && chrono::NaiveDateTime::parse_from_str(&s[..26], "%Y-%m-%dT%H:%M:%S%.6f").is_ok()
        && b[19] == b'.'
        && b[26] == b'Z'
}

#[tokio::test]
async fn every_read_endpoint_answers_its_timestamps_in_one_format() {
    use serde_json::json;
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    let job = json!({"job_id": "t-1", "workflow_key": "invoice.extract", "inputs": {"n": 1},
                     "callback_url": "https://example.com/done"});
    assert_eq!(api.post("/v1/jobs", BILLING_TOKEN, job).await.status, 202);
    request_approval(&app, "t-1").await;
    api.caught_up(&app.log).await;
    let ok = api
        .post(
            "/v1/approvals/t-1/approve",
            OPERATOR_TOKEN,
            json!({"reason": "fine"}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    api.caught_up(&app.log).await;
    let mut checked = 0;
    for path in [
        "/v1/jobs/t-1",
        "/v1/jobs/t-1/status",
        "/v1/executions",
        "/v1/audit?job_id=t-1",
        "/v1/approvals",
        "/v1/approvals/t-1",
        "/v1/audit/secret-accesses",
        "/v1/me",
        "/v1/meta",
        "/healthz",
    ] {
        let a = api.call("GET", path, Some(OPERATOR_TOKEN), None).await;
        assert!(
            a.status == 200 || path == "/healthz",
            "{path}: {} {}",
            a.status,
            a.body
        );
        let mut fields = Vec::new();
        time_fields(&a.body, "", &mut fields);
        for (field, value) in &fields {
            assert!(
                one_format(value),
                "{path} {field} = {value:?} is not UTC with microseconds and Z"
            );
        }
        checked += fields.len();
    }
    // the job, its audit rows and its approval carry times: the walk saw them
    assert!(checked >= 10, "only {checked} time fields seen");
}
