//! The job handler against real nats-server and PostgreSQL, with solver and
//! n8n peers played by HTTP servers that add latency, fail and hang.

use std::collections::BTreeSet;

use flowledger::commands::job::JobStatus;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

fn solver(name: &str, url: &str, timeout_ms: u64, max_attempts: u32) -> Value {
    json!({"name": name, "kind": "solver", "url": url, "timeout_ms": timeout_ms, "max_attempts": max_attempts})
}

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
    assert!(s.results.values().all(|r| r.status == "timed_out"), "{s:?}");
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
    use flowledger::handlers::signing::SigningKey;
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
