//! The job handler against real nats-server and PostgreSQL, with solver and
//! n8n peers played by HTTP servers that add latency, fail and hang.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flowledger::commands::job::events::StepStatus;
use flowledger::commands::job::JobStatus;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

fn actions(v: &flowledger::handlers::view::JobView) -> Vec<String> {
    v.audit.iter().map(|a| a.action.clone()).collect()
}

#[tokio::test]
async fn steps_run_in_parallel() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let steps: Vec<Value> = ["a", "b", "c"]
        .iter()
        .map(|s| {
            solver(
                s,
                &peer.script(&format!("/{s}"), vec![peers::ok(200, json!({"from": s}))]),
                5000,
                1,
            )
        })
        .collect();
    let h = spawn_handler(
        &app,
        one_workflow(json!(steps), json!({})),
        test_handler_config(),
    )
    .await;
    assert_eq!(
        h.submit("par-1", "w", json!({"input": {"n": 1}})).await["ok"],
        true
    );
    let v = h.settled("par-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    // all three were in flight at once: parallel, not one after another
    assert_eq!(peer.max_in_flight(), 3);
    assert_eq!(
        v.outputs,
        json!({"a": {"from": "a"}, "b": {"from": "b"}, "c": {"from": "c"}})
    );
    // each peer got the job's inputs and an idempotency key naming the attempt
    let got = peer.received("/b");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["inputs"], json!({"n": 1}));
    assert_eq!(got[0].headers["idempotency-key"], "par-1:b:1");
    let a = actions(&v);
    assert_eq!(a.iter().filter(|x| *x == "StepAttemptStarted").count(), 3);
    assert_eq!(a.iter().filter(|x| *x == "StepResultRecorded").count(), 3);
    assert_eq!(a.last().map(String::as_str), Some("JobCompleted"));
}

#[tokio::test]
async fn failed_attempts_are_retried_until_success() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script(
        "/flaky",
        vec![
            peers::status(5, 503),
            peers::status(5, 500),
            peers::ok(5, json!({"x": 1})),
        ],
    );
    let h = spawn_handler(
        &app,
        one_workflow(json!([solver("flaky", &url, 2000, 3)]), json!({})),
        test_handler_config(),
    )
    .await;
    h.submit("retry-1", "w", json!({})).await;
    let v = h.settled("retry-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    let s = &v.steps["flaky"];
    assert_eq!(s.started, 3);
    let statuses: Vec<_> = s.results.values().map(|r| r.status.as_str()).collect();
    assert_eq!(statuses, ["failed", "failed", "succeeded"]);
    assert_eq!(s.results[&1].error_code.as_deref(), Some("http_503"));
    assert_eq!(
        actions(&v)
            .iter()
            .filter(|x| *x == "StepRetryScheduled")
            .count(),
        2
    );
    let keys: BTreeSet<_> = peer
        .received("/flaky")
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "retry-1:flaky:1".into(),
            "retry-1:flaky:2".into(),
            "retry-1:flaky:3".into()
        ])
    );
}

#[tokio::test]
async fn a_step_that_never_answers_times_out_and_fails_the_job() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/slow", vec![peers::hang()]);
    let h = spawn_handler(
        &app,
        one_workflow(json!([solver("slow", &url, 100, 2)]), json!({})),
        test_handler_config(),
    )
    .await;
    h.submit("to-1", "w", json!({})).await;
    let v = h.settled("to-1").await;
    assert_eq!(v.status, JobStatus::Failed);
    assert_eq!(v.error_code.as_deref(), Some("steps_failed"));
    let s = &v.steps["slow"];
    assert!(
        s.results.values().all(|r| r.status == StepStatus::TimedOut),
        "{s:?}"
    );
    assert_eq!(s.results.len(), 2);
    assert!(
        v.error_message.as_deref().unwrap_or("").contains("slow"),
        "{:?}",
        v.error_message
    );
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/bad", vec![peers::status(0, 422)]);
    let h = spawn_handler(
        &app,
        one_workflow(json!([solver("bad", &url, 1000, 3)]), json!({})),
        test_handler_config(),
    )
    .await;
    h.submit("nr-1", "w", json!({})).await;
    let v = h.settled("nr-1").await;
    assert_eq!(v.status, JobStatus::Failed);
    assert_eq!(peer.received("/bad").len(), 1);
    assert_eq!(
        v.steps["bad"].results[&1].error_code.as_deref(),
        Some("http_422")
    );
}

#[tokio::test]
async fn partial_results_count_by_policy() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let good = peer.script("/good", vec![peers::ok(10, json!(1))]);
    let good2 = peer.script("/good2", vec![peers::ok(10, json!(2))]);
    let bad = peer.script("/bad", vec![peers::status(0, 400)]);
    let steps = json!([
        solver("good", &good, 1000, 1),
        solver("good2", &good2, 1000, 1),
        solver("bad", &bad, 1000, 1)
    ]);
    let registry = json!({"version": 1, "workflows": {
        "all": {"steps": steps, "success": "all"},
        "any": {"steps": steps, "success": "any"},
        "two": {"steps": steps, "success": {"at_least": 2}},
        "three": {"steps": steps, "success": {"at_least": 3}},
    }});
    let h = spawn_handler(&app, registry, test_handler_config()).await;
    for key in ["all", "any", "two", "three"] {
        h.submit(&format!("p-{key}"), key, json!({})).await;
    }
    let all = h.settled("p-all").await;
    assert_eq!(all.status, JobStatus::Failed);
    assert!(
        all.error_message
            .as_deref()
            .unwrap_or("")
            .contains("all steps must succeed"),
        "{:?}",
        all.error_message
    );
    let any = h.settled("p-any").await;
    assert_eq!(any.status, JobStatus::Completed);
    assert_eq!(any.outputs, json!({"good": 1, "good2": 2}));
    assert_eq!(h.settled("p-two").await.status, JobStatus::Completed);
    assert_eq!(h.settled("p-three").await.status, JobStatus::Failed);
}

#[tokio::test]
async fn the_job_timeout_ends_a_job_whose_steps_keep_going() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/long", vec![peers::hang()]);
    let h = spawn_handler(
        &app,
        one_workflow(json!([solver("long", &url, 30_000, 1)]), json!({})),
        test_handler_config(),
    )
    .await;
    h.submit("jt-1", "w", json!({"timeout_seconds": 1})).await;
    let v = h.settled("jt-1").await;
    assert_eq!(v.status, JobStatus::Failed);
    assert_eq!(v.error_code.as_deref(), Some("job_timeout"));
}

#[tokio::test]
async fn the_result_is_called_back_signed_and_retried() {
    use flowledger::crypto::SigningKey;
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(5, json!({"total": 7}))]);
    let cb = peer.script("/cb", vec![peers::status(0, 503), peers::ok(0, json!({}))]);
    let dead = peer.script("/dead", vec![peers::status(0, 500)]);
    let key = SigningKey::new(b"test-callback-secret-0123").unwrap();
    let config = flowledger::handlers::HandlerConfig {
        callback_key: Some(key.clone()),
        callback_max_attempts: 3,
        ..test_handler_config()
    };
    let h = spawn_handler(
        &app,
        one_workflow(json!([solver("s", &step, 1000, 1)]), json!({})),
        config,
    )
    .await;
    h.submit(
        "cb-1",
        "w",
        json!({"callback_url": format!("{cb}?token=receiver-secret")}),
    )
    .await;
    h.submit("cb-2", "w", json!({"callback_url": dead})).await;

    let v = h.settled("cb-1").await;
    assert!(
        actions(&v).contains(&"CallbackDelivered".to_string()),
        "{:?}",
        actions(&v)
    );
    let got = peer.received("/cb");
    assert_eq!(got.len(), 2, "one 503, then delivered");
    let last = &got[1];
    let now = chrono::Utc::now().timestamp();
    key.verify(
        last.headers
            .get("x-flowledger-timestamp")
            .map(String::as_str),
        last.headers
            .get("x-flowledger-signature")
            .map(String::as_str),
        &last.raw,
        now,
        300,
    )
    .expect("the callback verifies with the shared key");
    let body = &last.body;
    assert_eq!(body["job_id"], "cb-1");
    assert_eq!(body["status"], "success");
    assert_eq!(body["outputs"], json!({"s": {"total": 7}}));
    assert_eq!(body["execution_id"], "cb-1");
    for field in [
        "error_code",
        "error_message",
        "started_at",
        "completed_at",
        "audit",
    ] {
        assert!(body.get(field).is_some(), "callback lacks {field}: {body}");
    }
    assert!(body["audit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["action"] == "StepResultRecorded" && a["node_name"] == "s"));
    // the receiver's token in the query string is not written to the log
    let records = h.ctx.load_view("cb-1").await.unwrap().unwrap();
    assert!(!format!("{:?}", records.audit).contains("receiver-secret"));

    let v = h.settled("cb-2").await;
    assert!(
        actions(&v).contains(&"CallbackFailed".to_string()),
        "{:?}",
        actions(&v)
    );
    assert_eq!(peer.received("/dead").len(), 3);
}

/// A command from `caller`, in process, on the handler's bus.
async fn send(h: &HandlerSide, caller: &Caller, subject: &str, body: Value) -> Value {
    let subject = format!("flow.cmd.{subject}");
    reply(handle(&h.bus, caller, &subject, body.to_string().as_bytes()).await)
}

#[tokio::test]
async fn cancel_aborts_in_flight_calls() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/hang", vec![peers::hang()]);
    let h = spawn_handler(
        &app,
        one_workflow(json!([solver("hang", &url, 30_000, 1)]), json!({})),
        test_handler_config(),
    )
    .await;
    h.submit("cx-1", "w", json!({})).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while peer.in_flight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the step was never called"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let r = send(
        &h,
        &client("tests"),
        "job.cancel",
        json!({"job_id": "cx-1", "reason": "user asked", "actor": {"client_id": "tests"}}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let v = h.settled("cx-1").await;
    assert_eq!(v.status, JobStatus::Cancelled);
    // the call was aborted (the peer saw its connection close), not left to run 60 s
    while peer.in_flight() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the in-flight call was not aborted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!actions(&v).contains(&"JobCompleted".to_string()));
}

fn registry_of(v: &Value) -> std::sync::Arc<flowledger::commands::registry::Registry> {
    std::sync::Arc::new(
        flowledger::commands::registry::Registry::parse(
            std::path::Path::new("r.json"),
            &v.to_string(),
        )
        .unwrap(),
    )
}

fn approval_registry(url: &str, extra: Value) -> Value {
    let mut w = json!({"steps": [solver("s", url, 1000, 1)], "requires_approval": true});
    if let (Some(o), Value::Object(e)) = (w.as_object_mut(), extra) {
        o.extend(e);
    }
    json!({"version": 1, "workflows": {"w": w}})
}

/// Waits until the job's approval is requested (the approval id is the job id).
async fn approval_pending(h: &HandlerSide, job_id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = h.ctx.load_view(job_id).await.unwrap();
        if let Some(v) = v {
            if matches!(
                v.approval,
                flowledger::handlers::view::ApprovalState::Pending { .. }
            ) {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no approval requested for {job_id}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn approvals_gate_the_job() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/s", vec![peers::ok(5, json!("done"))]);
    let h = spawn_handler(
        &app,
        approval_registry(&url, json!({})),
        test_handler_config(),
    )
    .await;

    // approved: the job runs after the decision, and says who approved it
    h.submit("ap-yes", "w", json!({})).await;
    approval_pending(&h, "ap-yes").await;
    assert!(
        peer.received("/s").is_empty(),
        "no step runs before the approval"
    );
    let r = send(
        &h,
        &operator("alice"),
        "approval.approve",
        json!({"approval_id": "ap-yes", "reason": "checked"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let v = h.settled("ap-yes").await;
    assert_eq!(v.status, JobStatus::Completed);
    assert!(v
        .audit
        .iter()
        .any(|a| a.action == "ApprovalGranted" && a.details["decided_by"] == "alice"));

    // rejected: the job fails with the reason, no step is called
    h.submit("ap-no", "w", json!({})).await;
    approval_pending(&h, "ap-no").await;
    let r = send(
        &h,
        &operator("bob"),
        "approval.reject",
        json!({"approval_id": "ap-no", "decided_by": "bob", "reason": "wrong amount"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let v = h.settled("ap-no").await;
    assert_eq!(v.status, JobStatus::Failed);
    assert_eq!(v.error_code.as_deref(), Some("approval_rejected"));
    assert!(v
        .error_message
        .as_deref()
        .unwrap_or("")
        .contains("wrong amount"));
    assert_eq!(
        peer.received("/s").len(),
        1,
        "only the approved job called the step"
    );
}

#[tokio::test]
async fn an_undecided_approval_expires_and_fails_the_job() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/s", vec![peers::ok(5, json!("done"))]);
    let h = spawn_handler(
        &app,
        approval_registry(&url, json!({"approval_timeout_seconds": 1})),
        test_handler_config(),
    )
    .await;
    h.submit("ap-exp", "w", json!({})).await;
    let v = h.settled("ap-exp").await;
    assert_eq!(v.status, JobStatus::Failed);
    assert_eq!(v.error_code.as_deref(), Some("approval_expired"));
    assert!(v.audit.iter().any(|a| a.action == "ApprovalExpired"));
    assert!(peer.received("/s").is_empty());
}

#[tokio::test]
async fn confident_jobs_are_auto_approved_up_to_the_daily_limit() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/s", vec![peers::ok(5, json!("done"))]);
    let rule = json!({"auto_approval": {"min_confidence": 85, "daily_limit": 2}});
    let h = spawn_handler(&app, approval_registry(&url, rule), test_handler_config()).await;
    for (id, confidence) in [("auto-1", 90), ("auto-low", 50), ("auto-2", 99)] {
        h.submit(id, "w", json!({"metadata": {"confidence": confidence}}))
            .await;
    }
    for id in ["auto-1", "auto-2"] {
        let v = h.settled(id).await;
        assert_eq!(v.status, JobStatus::Completed, "{id}");
        assert!(
            v.audit.iter().any(
                |a| a.action == "ApprovalGranted" && a.details["decided_by"] == "auto-approval"
            ),
            "{id}"
        );
    }
    // below the threshold: waits for a human
    approval_pending(&h, "auto-low").await;
    // over the daily limit: waits for a human too
    h.submit("auto-3", "w", json!({"metadata": {"confidence": 95}}))
        .await;
    approval_pending(&h, "auto-3").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let v = h.ctx.load_view("auto-3").await.unwrap().unwrap();
    assert_eq!(
        v.status,
        JobStatus::Pending,
        "the third confident job of the day is not auto-approved"
    );
}

/// A real `flowledger serve` is SIGKILLed while a job has one step done and
/// one in flight; after a restart the job completes, the finished step is
/// not called again, the in-flight attempt is re-sent with the same
/// idempotency key, and no step result is recorded twice.
#[tokio::test]
async fn sigkill_mid_job_loses_nothing_and_repeats_nothing() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, false).await;
    let peer = Peer::start().await;
    let fast = peer.script("/fast", vec![peers::ok(10, json!("fast"))]);
    let slow = peer.script("/slow", vec![peers::ok(1500, json!("slow"))]);
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.json");
    std::fs::write(
        &registry,
        one_workflow(
            json!([
                solver("fast", &fast, 5000, 1),
                solver("slow", &slow, 5000, 1)
            ]),
            json!({}),
        )
        .to_string(),
    )
    .unwrap();
    let spawn_serve = || start_serve(&app, &read.url, &registry, None);
    let mut serve = spawn_serve();
    let submit = json!({"job_id": "crash-1", "workflow_key": "w", "client_id": "billing"});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = app
            .nats_as(Who::Billing)
            .request("flow.cmd.job.submit", submit.to_string().into())
            .await;
        if let Ok(m) = r {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["ok"] == true {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not take the job"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // wait until the fast step's result is in the log and the slow one is in flight
    // (read through a context with no handler running)
    let reader = flowledger::handlers::Ctx::new(
        app.second_bus().await,
        registry_of(&one_workflow(
            json!([solver("x", &fast, 1000, 1)]),
            json!({}),
        ))
        .into(),
        test_handler_config(),
        None,
    );
    loop {
        let v = reader.load_view("crash-1").await.unwrap();
        if v.as_ref()
            .is_some_and(|v| v.steps.get("fast").is_some_and(|s| !s.results.is_empty()))
            && peer.in_flight() == 1
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not get half way: {v:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    unsafe { libc::kill(serve.id() as i32, libc::SIGKILL) };
    let _ = serve.wait();
    serve = spawn_serve();
    let v = loop {
        let v = reader
            .load_view("crash-1")
            .await
            .unwrap()
            .expect("the job exists");
        if !v.needs_handler() {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(20),
            "the job did not end after the restart"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert_eq!(v.outputs, json!({"fast": "fast", "slow": "slow"}));
    assert_eq!(
        peer.received("/fast").len(),
        1,
        "a finished step is not called again"
    );
    let slow_keys: Vec<_> = peer
        .received("/slow")
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(
        slow_keys,
        vec!["crash-1:slow:1".to_string(); 2],
        "the in-flight attempt is re-sent with its key"
    );
    let results: Vec<_> = v
        .audit
        .iter()
        .filter(|a| a.action == "StepResultRecorded")
        .map(|a| (a.node_name.clone(), a.details["attempt"].clone()))
        .collect();
    let unique: BTreeSet<_> = results.iter().map(|r| format!("{r:?}")).collect();
    assert_eq!(
        results.len(),
        unique.len(),
        "a step result recorded twice: {results:?}"
    );
    assert_eq!(results.len(), 2);
    assert_eq!(
        v.audit
            .iter()
            .filter(|a| a.action == "JobCompleted")
            .count(),
        1
    );
}

/// An HTTP API (with the test clients) and a job handler on `registry`;
/// n8n peers call back on the API.
pub(crate) async fn handler_with_api(app: &TestApp, registry: Value) -> (HandlerSide, ReadSide) {
    let registry = parse_registry(registry);
    let api = spawn_api(app, true, registry.clone()).await;
    let config = config_with_api(&api);
    (start_handler(app, registry, config).await, api)
}

/// The handler configuration of [`handler_with_api`]: n8n posts results to
/// `api`, callbacks are signed.
fn config_with_api(api: &ReadSide) -> flowledger::handlers::HandlerConfig {
    let mut config = test_handler_config();
    config.public_url = Some(api.http.clone());
    config.callback_key = Some(
        flowledger::crypto::SigningKey::new(b"test-callback-secret-0123").expect("a long key"),
    );
    config
}

#[tokio::test]
async fn n8n_results_come_back_signed_and_bad_callbacks_are_refused() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script(
        "/hook",
        vec![peers::n8n_accepts(
            3000,
            N8N_KEY,
            json!({"summary": "from n8n"}),
        )],
    );
    let registry = one_workflow(
        json!([{"name": "flow", "kind": "n8n", "url": url, "timeout_ms": 30_000, "max_attempts": 1}]),
        json!({}),
    );
    let (h, api) = handler_with_api(&app, registry).await;
    h.submit("n8n-1", "w", json!({"input": {"doc": 1}})).await;
    eventually("n8n to be called", || peer.received("/hook").len() == 1).await;
    let call = peer.received("/hook")[0].body.clone();
    let callback_url = call["callback_url"]
        .as_str()
        .expect("n8n is told where to answer");
    assert_eq!(callback_url, format!("{}/v1/callbacks/n8n", api.http));

    // while n8n works, forged, stale and unsigned results arrive
    let now = chrono::Utc::now().timestamp();
    let forged = json!({"job_id": "n8n-1", "step": "flow", "attempt": 1,
                        "nonce": "forged-nonce-1", "status": "failed", "error_code": "x"})
    .to_string();
    let unsigned = flowledger::handlers::http_client_builder()
        .build()
        .expect("an HTTP client")
        .post(callback_url)
        .header("content-type", "application/json")
        .body(forged.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    let body: Value = unsigned.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_signature");
    let wrong_key = peers::post_signed(callback_url, b"someone-elses-key-0123", now, &forged).await;
    assert_eq!(wrong_key.status, 401);
    let stale = peers::post_signed(callback_url, N8N_KEY, now - 3600, &forged).await;
    assert_eq!(stale.status, 401);
    // the job was not changed by any of them
    let v = h.ctx.load_view("n8n-1").await.unwrap().unwrap();
    assert_eq!(v.status, JobStatus::Running);
    assert!(!actions(&v).contains(&"StepResultRecorded".to_string()));

    // n8n's own signed result completes the job
    let v = h.settled("n8n-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert_eq!(v.outputs, json!({"flow": {"summary": "from n8n"}}));
    let sent = peer.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, 200);
    // the same request again: its nonce was used
    let replay = peers::post_signed(
        &sent[0].url,
        N8N_KEY,
        sent[0].timestamp.parse().unwrap(),
        &sent[0].body,
    )
    .await;
    assert_eq!(replay.status, 401);

    // refused posts are counted, and nothing unauthenticated is in the log
    api.caught_up(&app.log).await;
    let (_, rejected) = api.get("/v1/audit?action=CallbackRejected").await;
    assert_eq!(rejected["items"], json!([]), "{rejected}");
    let (_, metrics) = api.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    for reason in [
        "missing_signature",
        "bad_signature",
        "stale_timestamp",
        "replayed_nonce",
    ] {
        let line = format!("flowledger_callbacks_rejected_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{reason} not counted: {metrics}");
    }
    let (_, results) = api
        .get("/v1/audit?job_id=n8n-1&action=StepResultRecorded")
        .await;
    let rows = results["items"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "one result, recorded once: {results}");
    assert_eq!(rows[0]["client_id"], "n8n");
}

#[tokio::test]
async fn http_approvals_release_jobs_and_http_cancel_aborts_calls() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let ok = peer.script("/s", vec![peers::ok(5, json!("done"))]);
    let slow = peer.script("/slow", vec![peers::hang()]);
    let registry = json!({"version": 1, "workflows": {
        "w": {"steps": [solver("s", &ok, 1000, 1)], "requires_approval": true},
        "slow": {"steps": [solver("slow", &slow, 30_000, 1)]},
    }});
    let (h, api) = handler_with_api(&app, registry).await;

    let receiver = peer.script("/cb", vec![peers::ok(3, json!({}))]);
    let submit = |id: &str, key: &str| json!({"job_id": id, "workflow_key": key});
    let mut first = submit("hap-1", "w");
    first["callback_url"] = json!(receiver);
    assert_eq!(api.post("/v1/jobs", BILLING_TOKEN, first).await.status, 202);
    approval_pending(&h, "hap-1").await;
    let yes = api
        .post(
            "/v1/approvals/hap-1/approve",
            OPERATOR_TOKEN,
            json!({"reason": "looks right", "user_id": "olga"}),
        )
        .await;
    assert_eq!(yes.status, 200, "{}", yes.body);
    let v = h.settled("hap-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert!(v
        .audit
        .iter()
        .any(|a| a.action == "ApprovalGranted" && a.details["decided_by"] == "ops"));

    assert_eq!(
        api.post("/v1/jobs", BILLING_TOKEN, submit("hc-1", "slow"))
            .await
            .status,
        202
    );
    eventually("the slow step to be called", || peer.in_flight() == 1).await;
    // the kill-switch refuses new jobs; the running one goes on
    let off = api
        .post(
            "/v1/workflows/slow/disable",
            OPERATOR_TOKEN,
            json!({"reason": "peer incident"}),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.body);
    let refused = api
        .post("/v1/jobs", BILLING_TOKEN, submit("hc-2", "slow"))
        .await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let v = h.ctx.load_view("hc-1").await.unwrap().unwrap();
    assert_eq!(v.status, JobStatus::Running);
    assert_eq!(
        peer.in_flight(),
        1,
        "the running job's call was not aborted"
    );
    let cancel = api
        .post(
            "/v1/jobs/hc-1/cancel",
            BILLING_TOKEN,
            json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    let v = h.settled("hc-1").await;
    assert_eq!(v.status, JobStatus::Cancelled);
    eventually("the in-flight call to be aborted", || peer.in_flight() == 0).await;

    // the read models tell both stories
    api.caught_up(&app.log).await;
    let (_, row) = api.get("/v1/jobs/hc-1").await;
    assert_eq!(row["status"], "cancelled", "{row}");
    let (_, audit) = api.get("/v1/audit?job_id=hap-1").await;
    let who: Vec<_> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["client_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // the whole story, in order, with who did each part
    let handler = "flowledger-handler";
    let story: Vec<(String, String)> = [
        ("JobSubmitted", "billing"),
        ("ApprovalRequested", handler),
        ("ApprovalGranted", "ops"),
        // the first command under the instance's partition lease
        ("JobHandlerChanged", handler),
        ("JobStarted", handler),
        ("StepAttemptStarted", handler),
        ("StepResultRecorded", handler),
        ("JobCompleted", handler),
        ("CallbackDelivered", handler),
    ]
    .iter()
    .map(|(a, c)| (a.to_string(), c.to_string()))
    .collect();
    assert_eq!(who, story);
    assert_eq!(peer.received("/cb").len(), 1, "the result was called back");
    let (_, row) = api.get("/v1/jobs/hap-1").await;
    assert_eq!(row["status"], "completed", "{row}");
}

/// Thousands of jobs whose steps fail and are retried while other steps'
/// results are recorded at the same moment: every job ends, each with one
/// terminal event (the interleaving that hung drivers: a step's retry
/// record written while another step's result is recorded).
#[tokio::test]
async fn thousands_of_jobs_with_retries_and_concurrent_results_all_end() {
    const JOBS: usize = 2000;
    let app = spawn_app().await;
    let peer = Peer::start().await;
    // step a: every third call fails with 503 (retried); b and c answer
    // with varied small delays so results land together
    let a: Vec<_> = (0..3 * JOBS)
        .map(|i| match i % 3 {
            0 => peers::status((i % 4) as u64, 503),
            _ => peers::ok((i % 5) as u64, json!({"a": i})),
        })
        .collect();
    let b: Vec<_> = (0..3 * JOBS)
        .map(|i| peers::ok((i % 3) as u64, json!({"b": i})))
        .collect();
    let c: Vec<_> = (0..3 * JOBS)
        .map(|i| match i % 7 {
            0 => peers::status(1, 500),
            _ => peers::ok((i % 2) as u64, json!({"c": i})),
        })
        .collect();
    let steps = json!([
        solver("a", &peer.script("/a", a), 5000, 4),
        solver("b", &peer.script("/b", b), 5000, 4),
        solver("c", &peer.script("/c", c), 5000, 4),
    ]);
    let config = flowledger::handlers::HandlerConfig {
        max_concurrent_jobs: 500,
        ..test_handler_config()
    };
    let h = spawn_handler(&app, one_workflow(steps, json!({})), config).await;
    let submits = (0..JOBS).map(|i| {
        let h = &h;
        async move {
            let r = h
                .submit(&format!("stress-{i}"), "w", json!({"timeout_seconds": 120}))
                .await;
            assert_eq!(r["ok"], true, "{r}");
        }
    });
    futures::future::join_all(submits).await;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut open: Vec<usize> = (0..JOBS).collect();
    while !open.is_empty() {
        let mut still = Vec::new();
        for i in open {
            let v = h
                .ctx
                .load_view(&format!("stress-{i}"))
                .await
                .unwrap()
                .unwrap();
            if !v.status.is_final() {
                still.push(i);
            }
        }
        open = still;
        assert!(
            Instant::now() < deadline || open.is_empty(),
            "{} of {JOBS} jobs did not end within 240 s, e.g. stress-{}",
            open.len(),
            open[0]
        );
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for i in (0..JOBS).step_by(97) {
        let v = h
            .ctx
            .load_view(&format!("stress-{i}"))
            .await
            .unwrap()
            .unwrap();
        let ends = actions(&v)
            .iter()
            .filter(|a| ["JobCompleted", "JobFailed", "JobCancelled"].contains(&a.as_str()))
            .count();
        assert_eq!(ends, 1, "stress-{i}: {:?}", actions(&v));
    }
}

/// n8n restarting answers "starting up" (200, text) and then 404 until the
/// workflow's webhook is registered; both are retried, and the step then
/// succeeds on the attempt n8n accepts.
#[tokio::test]
async fn an_n8n_restart_is_retried_until_its_webhook_answers() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script(
        "/hook",
        vec![
            peers::ok(0, json!("n8n is starting up. Please wait")),
            peers::status(0, 404),
            peers::n8n_accepts(50, N8N_KEY, json!({"summary": "after restart"})),
        ],
    );
    let registry = one_workflow(
        json!([{"name": "flow", "kind": "n8n", "url": url, "timeout_ms": 10_000, "max_attempts": 4}]),
        json!({}),
    );
    let (h, _api) = handler_with_api(&app, registry).await;
    h.submit("n8n-restart", "w", json!({})).await;
    let v = h.settled("n8n-restart").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert_eq!(
        peer.received("/hook").len(),
        3,
        "two refusals, then accepted"
    );
    let codes: Vec<String> = v
        .audit
        .iter()
        .filter(|a| a.action == "StepResultRecorded")
        .map(|a| a.details["error_code"].as_str().unwrap_or("ok").to_string())
        .collect();
    assert_eq!(codes, ["peer_starting", "http_404", "ok"], "{:?}", v.audit);
}

/// An n8n workflow that reports `failed` (or `timed_out`) on its result
/// callback is retried by the step's policy like any failed attempt: each
/// attempt and the retry are events, and the job completes on the attempt
/// that succeeds; with no attempts left the failure ends the step.
#[tokio::test]
async fn a_failed_or_timed_out_n8n_result_is_retried_while_attempts_are_left() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script(
        "/hook",
        vec![
            peers::n8n_accepts_then_reports(20, N8N_KEY, "failed"),
            peers::n8n_accepts_then_reports(20, N8N_KEY, "timed_out"),
            peers::n8n_accepts(20, N8N_KEY, json!({"summary": "third time"})),
        ],
    );
    let once = peer.script(
        "/once",
        vec![peers::n8n_accepts_then_reports(20, N8N_KEY, "failed")],
    );
    let registry = json!({"version": 1, "workflows": {
        "w": {"steps": [{"name": "flow", "kind": "n8n", "url": url, "timeout_ms": 10_000,
                         "max_attempts": 3, "backoff_ms": 50}]},
        "w1": {"steps": [{"name": "flow", "kind": "n8n", "url": once, "timeout_ms": 10_000,
                          "max_attempts": 1}]},
    }});
    let (h, api) = handler_with_api(&app, registry).await;
    h.submit("n8n-retried", "w", json!({})).await;
    let v = h.settled("n8n-retried").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert_eq!(v.outputs, json!({"flow": {"summary": "third time"}}));
    let calls = peer.received("/hook");
    let attempts: Vec<u64> = calls
        .iter()
        .map(|c| c.body["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(attempts, [1, 2, 3], "one call per attempt");
    let keys: std::collections::BTreeSet<_> = calls
        .iter()
        .map(|c| c.headers.get("idempotency-key").cloned())
        .collect();
    assert_eq!(keys.len(), 3, "each attempt its own Idempotency-Key");
    let results: Vec<(u64, String)> = v
        .audit
        .iter()
        .filter(|a| a.action == "StepResultRecorded")
        .map(|a| {
            (
                a.details["attempt"].as_u64().unwrap_or(0),
                a.details["status"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            (1, "failed".to_string()),
            (2, "timed_out".to_string()),
            (3, "succeeded".to_string())
        ],
        "{:?}",
        v.audit
    );
    let retries: Vec<u64> = v
        .audit
        .iter()
        .filter(|a| a.action == "StepRetryScheduled")
        .map(|a| a.details["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(retries, [2, 3], "{:?}", v.audit);
    let starts: Vec<u64> = v
        .audit
        .iter()
        .filter(|a| a.action == "StepAttemptStarted")
        .map(|a| a.details["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(starts, [1, 2, 3], "{:?}", v.audit);
    // every result n8n posted was accepted
    assert!(
        peer.sent().iter().all(|s| s.status == 200),
        "{:?}",
        peer.sent()
    );
    // no attempts left: the reported failure ends the step and the job
    h.submit("n8n-once", "w1", json!({})).await;
    let v = h.settled("n8n-once").await;
    assert_eq!(v.status, JobStatus::Failed);
    assert_eq!(v.error_code.as_deref(), Some("steps_failed"));
    assert_eq!(peer.received("/once").len(), 1);
    assert!(!v.audit.iter().any(|a| a.action == "StepRetryScheduled"));
    drop(api);
}

#[tokio::test]
async fn a_handler_restarted_between_an_n8n_failure_and_its_retry_still_retries() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    // attempt 1 is accepted, and reported failed 1.5 s later, when its
    // handler is gone; attempt 2 succeeds
    let url = peer.script(
        "/hook",
        vec![
            peers::n8n_accepts_then_reports(1_500, N8N_KEY, "failed"),
            peers::n8n_accepts(20, N8N_KEY, json!({"summary": "second time"})),
        ],
    );
    let registry = json!({"version": 1, "workflows": {
        "w": {"steps": [{"name": "flow", "kind": "n8n", "url": url, "timeout_ms": 20_000,
                         "max_attempts": 2, "backoff_ms": 50}]},
    }});
    let (first, api) = handler_with_api(&app, registry.clone()).await;
    first.submit("n8n-restart", "w", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer.received("/hook").is_empty() {
        assert!(Instant::now() < deadline, "attempt 1 was not sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = first.url.clone();
    first.stop().await;
    // the failure comes in through the API while no handler runs
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.sent().is_empty() {
        assert!(Instant::now() < deadline, "n8n did not post its result");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(peer.sent()[0].status, 200, "{:?}", peer.sent());
    loop {
        let failed = log_events(&app).await.into_iter().any(|r| {
            r.aggregate_id == "n8n-restart"
                && r.event_type == "StepResultRecorded"
                && r.data["status"] == "failed"
        });
        if failed {
            break;
        }
        assert!(Instant::now() < deadline, "n8n's failure was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        peer.received("/hook").len(),
        1,
        "no retry without a handler"
    );
    let second = start_handler_on(&app, parse_registry(registry), config_with_api(&api), db).await;
    let v = second.settled("n8n-restart").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert_eq!(v.outputs, json!({"flow": {"summary": "second time"}}));
    let attempts: Vec<u64> = peer
        .received("/hook")
        .iter()
        .map(|c| c.body["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(attempts, [1, 2], "attempt 2 sent once, by the new handler");
    let retries: Vec<u64> = v
        .audit
        .iter()
        .filter(|a| a.action == "StepRetryScheduled")
        .map(|a| a.details["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(retries, [2], "{:?}", v.audit);
}
