//! Input an attacker or a broken peer can send: every door refuses it with a
//! clear 4xx / `validation` naming the field, no read model stops, and the
//! job handler survives a job it cannot fold. Also: the kill-switch holds on
//! every door that submits jobs.

use std::time::{Duration, Instant};

use flowledger::commands::job::{Job, JobStatus};
use flowledger::events::chain;
use flowledger::events::envelope::{self, Actor, EventRecord};
use flowledger::events::store::AggregateStore;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

fn job_body(job_id: &str, workflow_key: &str) -> Value {
    json!({"job_id": job_id, "workflow_key": workflow_key, "inputs": {"n": 1}})
}

/// Flips the kill-switch of `invoice.extract` as the operator.
async fn switch(api: &ReadSide, action: &str) {
    let path = format!("/v1/workflows/invoice.extract/{action}");
    let a = api
        .post(&path, OPERATOR_TOKEN, json!({"reason": "incident 42"}))
        .await;
    assert_eq!(a.status, 200, "{action}: {}", a.body);
}

/// Submits `job_id` over NATS (reply) and over HTTP (`<job_id>-http`).
async fn submit_both_ways(app: &TestApp, api: &ReadSide, job_id: &str) -> (Value, Answer) {
    let body = json!({"job_id": job_id, "workflow_key": "invoice.extract", "client_id": "billing"});
    let nats = app.send("job.submit", body).await;
    let http_id = format!("{job_id}-http");
    let http = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            job_body(&http_id, "invoice.extract"),
        )
        .await;
    (nats, http)
}

#[tokio::test]
async fn the_kill_switch_holds_over_nats_as_well_as_http() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    switch(&api, "disable").await;
    // NATS runs on the intake's own bus, not the one that disabled it
    let (nats, http) = submit_both_ways(&app, &api, "ks").await;
    assert_eq!(code(&nats), "rejected", "{nats}");
    assert_eq!(nats["error"]["field"], "workflow_key", "{nats}");
    let message = nats["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("kill-switch"), "{nats}");
    assert_eq!(http.status, 409, "{}", http.body);
    assert_eq!(http.body["error"]["param"], "workflow_key");
    assert_eq!(app.messages_on("flow.ev.job.ks").await, 0);
    assert_eq!(app.messages_on("flow.ev.job.ks-http").await, 0);

    // switched on again: both doors accept
    switch(&api, "enable").await;
    let (nats, http) = submit_both_ways(&app, &api, "ks").await;
    assert_eq!(nats["ok"], true, "{nats}");
    assert_eq!(http.status, 202, "{}", http.body);
}

/// Asserts a NATS reply is a `validation` error naming `field`.
fn refused(reply: &Value, field: &str) {
    assert_eq!(code(reply), "validation", "{reply}");
    assert_eq!(reply["error"]["field"], field, "{reply}");
}

#[tokio::test]
async fn numbers_past_their_bounds_are_refused_by_name() {
    let app = spawn_app().await;
    assert_eq!(app.submit("big", "s-big").await["ok"], true);
    let first = json!([{"step": "ocr", "idempotency_key": "big:ocr:1"}]);
    let started = app
        .send("job.start", json!({"job_id": "big", "attempts": first}))
        .await;
    assert_eq!(started["ok"], true, "{started}");
    let result = |extra: Value| {
        let mut b = json!({"job_id": "big", "step": "ocr", "attempt": 1, "status": "failed",
                           "error_code": "E", "duration_ms": 5});
        if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
            o.extend(e);
        }
        b
    };
    // a retry that would be due past the end of time (panicked the handler)
    let r = app
        .send(
            "job.record_step_result",
            result(json!({"retry_in_ms": 9_000_000_000_000_000u64})),
        )
        .await;
    refused(&r, "retry_in_ms");
    let r = app
        .send(
            "job.record_step_result",
            result(json!({"attempt": 4_294_967_295u64})),
        )
        .await;
    refused(&r, "attempt");
    let r = app
        .send(
            "job.record_step_result",
            result(json!({"duration_ms": u64::MAX})),
        )
        .await;
    refused(&r, "duration_ms");
    let r = app
        .send(
            "job.start_attempt",
            json!({"job_id": "big", "step": "ocr", "attempt": 4_294_967_295u64, "idempotency_key": "k"}),
        )
        .await;
    refused(&r, "attempt");
    // a result for an attempt that was never started
    let r = app
        .send("job.record_step_result", result(json!({"attempt": 2})))
        .await;
    assert_eq!(code(&r), "rejected", "{r}");
    assert_eq!(r["error"]["field"], "attempt", "{r}");
    // within bounds: accepted
    let ok = app
        .send(
            "job.record_step_result",
            result(json!({"retry_in_ms": 1000})),
        )
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    // an expiry PostgreSQL cannot hold (stopped the approvals read model)
    let r = app
        .send(
            "approval.request",
            json!({"job_id": "big", "workflow_key": "invoice.extract", "requested_by": "billing",
                   "expires_at": "+262142-12-31T23:59:59Z"}),
        )
        .await;
    refused(&r, "expires_at");
    // a job's approval has the job's id
    let r = app
        .send(
            "approval.request",
            json!({"approval_id": "other", "job_id": "big", "workflow_key": "invoice.extract",
                   "requested_by": "billing", "expires_at": "2026-12-31T00:00:00Z"}),
        )
        .await;
    refused(&r, "job_id");
    // a command id that could collide with one flowledger derives
    let r = app
        .send(
            "job.cancel",
            json!({"job_id": "big", "command_id": "end:big", "reason": "x"}),
        )
        .await;
    refused(&r, "command_id");
}

#[tokio::test]
async fn unstorable_or_unaddressable_input_gets_a_4xx_and_no_read_model_stops() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    // NUL in inputs (stopped the executions projection) and in the actor's
    // user id (stopped the audit projection)
    let nul_input = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "nul-1", "workflow_key": "invoice.extract", "inputs": {"a": "x\u{0}y"}}),
        )
        .await;
    assert_eq!(nul_input.status, 400, "{}", nul_input.body);
    assert_eq!(nul_input.body["error"]["param"], "inputs.a");
    let nul_user = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "nul-2", "workflow_key": "invoice.extract", "metadata": {"user_id": "u\u{0}"}}),
        )
        .await;
    assert_eq!(nul_user.status, 400, "{}", nul_user.body);
    assert_eq!(nul_user.body["error"]["param"], "metadata.user_id");
    let nul_nats = app
        .send(
            "job.submit",
            json!({"job_id": "nul-3", "workflow_key": "invoice.extract", "client_id": "billing",
                   "input": {"deep": [{"x": "\u{0}"}]}}),
        )
        .await;
    refused(&nul_nats, "input.deep[0].x");

    // workflow keys that are not subject tokens: 400 naming the field, not
    // 503 (retry) or 500 (a false tamper alarm)
    for key in ["", " ", "a b", "*", ">", "a.>", "x\ty"] {
        let http = api
            .post("/v1/jobs", BILLING_TOKEN, job_body("wk-1", key))
            .await;
        assert_eq!(http.status, 400, "{key:?}: {}", http.body);
        assert_eq!(http.body["error"]["param"], "workflow_key", "{key:?}");
        let nats = app
            .send(
                "job.submit",
                json!({"job_id": "wk-2", "workflow_key": key, "client_id": "billing"}),
            )
            .await;
        refused(&nats, "workflow_key");
    }
    for key in ["%2A", "%3E", "a%20b"] {
        let a = api
            .post(
                &format!("/v1/workflows/{key}/disable"),
                OPERATOR_TOKEN,
                json!({"reason": "r"}),
            )
            .await;
        assert_eq!(a.status, 404, "{key}: {}", a.body);
    }
    // NUL in a query parameter: 400, not 503
    for path in [
        "/v1/executions?workflow_id=%00",
        "/v1/audit?action=%00",
        "/v1/approvals?status=%00",
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
    }

    // accepted input next to it still flows, and every projection runs
    let fine = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            job_body("fine-1", "invoice.extract"),
        )
        .await;
    assert_eq!(fine.status, 202, "{}", fine.body);
    let rows = api.caught_up(&app.log).await;
    assert!(rows.iter().all(|r| r.state == "running"), "{rows:?}");
    assert_eq!(api.get("/v1/jobs/fine-1").await.0, 200);
}

#[tokio::test]
async fn extreme_n8n_timestamps_are_refused_before_the_signature() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let url = format!("{}/v1/callbacks/n8n", api.http);
    let body = json!({"job_id": "j", "step": "s", "attempt": 1, "nonce": "nonce-0001",
                      "status": "succeeded"})
    .to_string();
    let now = chrono::Utc::now().timestamp();
    // correctly signed, with timestamps that overflowed `(now - ts).abs()`
    for ts in [i64::MIN, i64::MIN + 1, now.wrapping_sub(i64::MIN), i64::MAX] {
        let sent = peers::post_signed(&url, N8N_KEY, ts, &body).await;
        assert_eq!(sent.status, 401, "timestamp {ts}");
    }
    // the window still admits a correctly signed, current callback (the
    // job does not exist: 404, past the signature check)
    let sent = peers::post_signed(&url, N8N_KEY, now, &body).await;
    assert_eq!(sent.status, 404);
}

/// Appends a commit with an event the domain does not know to `job_id`'s
/// subject, chained correctly: what a newer flowledger version, or a bug,
/// could leave in the log.
async fn append_unknown_event(app: &TestApp, job_id: &str) {
    let store = AggregateStore::<Job>::new(app.log.clone(), services());
    let loaded = store.load(job_id).await.expect("load the job");
    let mut record = [EventRecord {
        event_id: uuid::Uuid::now_v7(),
        aggregate_type: "job".into(),
        aggregate_id: job_id.into(),
        aggregate_version: loaded.version + 1,
        event_type: "JobTeleported".into(),
        schema_version: "1.0".into(),
        occurred_at: envelope::format_time(chrono::Utc::now()),
        actor: Actor {
            client_id: "tests".into(),
            user_id: None,
        },
        command_id: format!("teleport-{job_id}"),
        correlation_id: "c".into(),
        causation_id: "c".into(),
        command_hash: None,
        prev_hash: String::new(),
        data: json!({"to": "mars"}),
    }];
    let commit = envelope::encode_commit(&mut record, loaded.head).expect("encode");
    let head = chain::to_hex(commit.head().expect("one event"));
    app.log
        .append(
            format!("flow.ev.job.{job_id}"),
            commit.body,
            &format!("teleport-{job_id}"),
            loaded.subject_seq,
            &[(envelope::HDR_CHAIN_HEAD, head)],
        )
        .await
        .expect("append the unknown event");
}

#[tokio::test]
async fn a_job_the_handler_cannot_fold_is_parked_and_the_others_go_on() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/s", vec![peers::ok(5, json!({"done": true}))]);
    let step =
        json!({"name": "s", "kind": "solver", "url": url, "timeout_ms": 2000, "max_attempts": 1});
    let registry = json!({"version": 1, "workflows": {
        "wait": {"steps": [step], "requires_approval": true},
        "w": {"steps": [step]},
    }});
    let h = spawn_handler(&app, registry, test_handler_config()).await;
    // a job waiting for its approval, then an event the handler cannot fold
    assert_eq!(h.submit("stuck", "wait", json!({})).await["ok"], true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.messages_on("flow.ev.approval.stuck").await == 0 {
        assert!(Instant::now() < deadline, "no approval requested");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    append_unknown_event(&app, "stuck").await;

    // another job submitted after it runs to the end
    assert_eq!(h.submit("after", "w", json!({})).await["ok"], true);
    let v = h.settled("after").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);

    // the stuck job is parked with the reason, visible in the handler's table
    let deadline = Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let row: Option<String> =
            sqlx::query_scalar("SELECT reason FROM handler_parked_jobs WHERE job_id = 'stuck'")
                .fetch_optional(&h.pool)
                .await
                .expect("read parked jobs");
        if let Some(r) = row {
            break r;
        }
        assert!(Instant::now() < deadline, "the job was not parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reason.contains("JobTeleported"), "{reason}");
    // and nothing was done for it: no step call beyond the other job's
    assert_eq!(peer.received("/s").len(), 1);
}

#[tokio::test]
async fn anonymous_callback_posts_add_nothing_to_the_log_and_are_rate_limited() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let before = app.last_seq().await;
    let http = flowledger::handlers::http_client_builder()
        .build()
        .expect("an HTTP client");
    let body = json!({"job_id": "j", "step": "s", "attempt": 1, "nonce": "nonce-0001",
                      "status": "succeeded"})
    .to_string();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..REFUSALS_PER_MINUTE + 5 {
        let r = http
            .post(format!("{}/v1/callbacks/n8n", api.http))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("a response");
        if r.status().as_u16() == 429 {
            retry_after = r.headers().get("retry-after").cloned();
        }
        statuses.push(r.status().as_u16());
    }
    let limit = REFUSALS_PER_MINUTE as usize;
    assert!(statuses[..limit].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[limit..].iter().all(|s| *s == 429), "{statuses:?}");
    assert!(retry_after.is_some(), "a 429 says when to come back");
    // nothing unauthenticated reached the immutable log
    assert_eq!(app.last_seq().await, before);
}

#[tokio::test]
async fn signed_results_for_attempts_or_steps_that_do_not_exist_are_refused() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    assert_eq!(app.submit("n-1", "s-n-1").await["ok"], true);
    let first = json!([{"step": "flow", "idempotency_key": "n-1:flow:1"}]);
    let started = app
        .send("job.start", json!({"job_id": "n-1", "attempts": first}))
        .await;
    assert_eq!(started["ok"], true, "{started}");
    let url = format!("{}/v1/callbacks/n8n", api.http);
    let now = chrono::Utc::now().timestamp();
    let post = |step: &str, attempt: u32, nonce: &str| {
        json!({"job_id": "n-1", "step": step, "attempt": attempt, "nonce": nonce,
               "status": "succeeded", "output": {"ok": true}})
        .to_string()
    };
    let never_started = peers::post_signed(&url, N8N_KEY, now, &post("flow", 7, "nonce-a-7")).await;
    assert_eq!(never_started.status, 409);
    let no_such_step = peers::post_signed(&url, N8N_KEY, now, &post("nope", 1, "nonce-b-1")).await;
    assert_eq!(no_such_step.status, 409);
    let real = peers::post_signed(&url, N8N_KEY, now, &post("flow", 1, "nonce-c-1")).await;
    assert_eq!(real.status, 200);
}

#[tokio::test]
async fn no_message_or_event_shows_a_urls_credentials() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    // a callback_url refused for its scheme: the error names it, redacted
    let bad = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "u-1", "workflow_key": "invoice.extract",
                   "callback_url": "ftp://alice:hunter2@r.example/cb?token=s3cret"}),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let text = bad.body.to_string();
    assert!(text.contains("r.example"), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );

    // a step whose peer cannot be reached: the error quotes no URL
    let registry = json!({"version": 1, "workflows": {"w": {"steps": [
        {"name": "s", "kind": "solver", "url": "http://127.0.0.1:9/x?api_key=k3y-s3cret",
         "timeout_ms": 2000, "max_attempts": 1}]}}});
    let h = spawn_handler(&app, registry, test_handler_config()).await;
    assert_eq!(h.submit("u-2", "w", json!({})).await["ok"], true);
    let v = h.settled("u-2").await;
    assert_eq!(v.status, JobStatus::Failed);
    let story = format!("{:?} {:?}", v.error_message, v.steps);
    assert!(story.contains("connection_failed"), "{story}");
    assert!(!story.contains("k3y-s3cret"), "{story}");
}
