//! Projections on real nats-server and PostgreSQL: read models, the read
//! API, exactly-once under SIGKILL, poison events, rebuilds under readers.

use std::time::{Duration, Instant};

use flowledger::app::resume_projection;
use flowledger::projections::{rebuild, ReadModel};
use serde_json::{json, Value};

use crate::helpers::*;

async fn job_story(app: &TestApp, id: &str, end: &str) {
    assert_eq!(app.submit(id, &format!("{id}-s")).await["ok"], json!(true));
    let first = json!([{"step": "ocr", "idempotency_key": format!("{id}:ocr:1")}]);
    app.send("job.start", json!({"job_id": id, "attempts": first}))
        .await;
    app.send("job.record_step_result", json!({"job_id": id, "step": "ocr", "attempt": 1, "status": "failed", "error_code": "HTTP_503", "duration_ms": 40})).await;
    let second = json!({"job_id": id, "step": "ocr", "attempt": 2, "idempotency_key": format!("{id}:ocr:2")});
    app.send("job.start_attempt", second).await;
    let r = match end {
        "complete" => app.send("job.complete", json!({"job_id": id, "outputs": {"total": 7}, "step_results": [{"step": "ocr", "attempt": 2, "status": "succeeded", "duration_ms": 30}]})).await,
        "fail" => app.send("job.fail", json!({"job_id": id, "error_code": "SOLVER_TIMEOUT", "error_message": "ocr timed out"})).await,
        "cancel" => app.send("job.cancel", json!({"job_id": id, "reason": "user asked"})).await,
        _ => return,
    };
    assert_eq!(r["ok"], json!(true), "{r}");
}

#[tokio::test]
async fn read_models_and_the_api_show_each_jobs_story() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, true).await;
    job_story(&app, "done-1", "complete").await;
    job_story(&app, "failed-1", "fail").await;
    job_story(&app, "cancel-1", "cancel").await;
    job_story(&app, "running-1", "none").await;
    let expires = (chrono::Utc::now() + chrono::Duration::minutes(5)).to_rfc3339();
    app.send("approval.request", json!({"approval_id": "done-1", "job_id": "done-1", "workflow_key": "invoice.extract", "requested_by": "billing", "expires_at": expires})).await;
    app.send("approval.request", json!({"approval_id": "failed-1", "job_id": "failed-1", "workflow_key": "invoice.extract", "requested_by": "billing", "expires_at": expires})).await;
    // the body's old `actor` field: its client_id is ignored, its user_id kept
    app.send("approval.approve", json!({"approval_id": "done-1", "reason": "ok", "actor": {"client_id": "someone-else", "user_id": "alice"}})).await;
    read.caught_up(&app.log).await;

    let (s, job) = read.get("/v1/jobs/done-1").await;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["status"], "completed");
    assert_eq!(job["workflow_id"], "invoice.extract");
    assert_eq!(job["output_data"], json!({"total": 7}));
    assert!(
        job["duration_ms"].as_i64().is_some() && job["started_at"].is_string(),
        "{job}"
    );
    let (_, failed) = read.get("/v1/jobs/failed-1/status").await;
    assert_eq!(
        (failed["status"].as_str(), failed["error_code"].as_str()),
        (Some("failed"), Some("SOLVER_TIMEOUT"))
    );
    let (_, running) = read.get("/v1/jobs/running-1/status").await;
    assert_eq!(running["status"], "running");

    // the audit trail: every event, who, step, status, hash
    let (_, audit) = read.get("/v1/audit?job_id=done-1").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "JobSubmitted",
            "JobStarted",
            "StepAttemptStarted",
            "StepResultRecorded",
            "StepAttemptStarted",
            "StepResultRecorded",
            "JobCompleted",
            "ApprovalRequested",
            "ApprovalGranted"
        ]
    );
    let steps = &audit["items"][3];
    assert_eq!(
        (
            steps["step"].as_str(),
            steps["status"].as_str(),
            steps["error_code"].as_str()
        ),
        (Some("ocr"), Some("failed"), Some("HTTP_503"))
    );
    assert_eq!(audit["items"][8]["user_id"], "alice");
    assert_eq!(audit["items"][0]["workflow_key"], "invoice.extract");
    assert_eq!(
        audit["items"][0]["event_hash"].as_str().map(str::len),
        Some(64)
    );

    // filters and cursor pagination
    let (_, page1) = read
        .get("/v1/executions?workflow_id=invoice.extract&limit=3")
        .await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 3);
    let cursor = page1["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, page2) = read
        .get(&format!(
            "/v1/executions?workflow_id=invoice.extract&limit=3&cursor={cursor}"
        ))
        .await;
    let ids: Vec<&str> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|r| r["execution_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["running-1", "cancel-1", "failed-1", "done-1"],
        "newest first, no repeats"
    );
    assert!(page2["next_cursor"].is_null());
    let (_, failed_only) = read.get("/v1/executions?status=failed").await;
    assert_eq!(failed_only["items"].as_array().unwrap().len(), 1);
    let since = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339()
        .replace('+', "%2B");
    let (_, none) = read.get(&format!("/v1/executions?since={since}")).await;
    assert_eq!(none["items"], json!([]));
    let (_, audit_page) = read.get("/v1/audit?client_id=billing&limit=2").await;
    let c = audit_page["next_cursor"].as_str().unwrap().to_string();
    let (_, audit_page2) = read
        .get(&format!("/v1/audit?client_id=billing&limit=2&cursor={c}"))
        .await;
    assert!(
        audit_page2["items"][0]["stream_seq"].as_i64()
            > audit_page["items"][1]["stream_seq"].as_i64()
    );
    let (_, pending) = read.get("/v1/approvals?status=pending").await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 1);
    assert_eq!(pending["items"][0]["approval_id"], "failed-1");
    let (_, approved) = read.get("/v1/approvals?status=approved").await;
    assert_eq!(approved["items"][0]["decided_by"], "ops");

    // bad input: 400 naming the parameter; unknown: 404
    for (path, param) in [
        ("/v1/executions?limit=0", "limit"),
        ("/v1/executions?limit=1001", "limit"),
        ("/v1/executions?status=done", "status"),
        ("/v1/executions?since=yesterday", "since"),
        ("/v1/executions?cursor=xyz", "cursor"),
        ("/v1/executions?colour=red", "colour"),
        ("/v1/audit?until=2026-13-01", "until"),
        ("/v1/audit?cursor=1", "cursor"),
        ("/v1/approvals?status=maybe", "status"),
        ("/v1/jobs/a.b", "id"),
    ] {
        let (s, body) = read.get(path).await;
        assert_eq!(s, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
    }
    assert_eq!(read.get("/v1/jobs/nobody").await.0, 404);
    assert_eq!(read.get("/v1/nothing-here").await.0, 404);

    let (s, health) = read.get("/healthz").await;
    assert_eq!(s, 200, "{health}");
    assert_eq!(
        health["projections"].as_array().unwrap().len(),
        ReadModel::ALL.len()
    );
    let (_, metrics) = read.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    promtool_accepts(&metrics);
    // described, histograms not summaries, outcomes present before use
    for line in [
        "# HELP flowledger_http_request_duration_seconds",
        "# TYPE flowledger_http_request_duration_seconds histogram",
        "flowledger_build_info{version=",
        "flowledger_callbacks_total{outcome=\"failed\"}",
        "# TYPE flowledger_projection_lag_events gauge",
        "flowledger_approvals_pending ",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    assert!(
        metrics.contains("flowledger_projection_events_applied_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowledger_http_request_duration_seconds"),
        "{metrics}"
    );
    let (_, doc) = read.get("/openapi.json").await;
    for p in [
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/status",
        "/v1/executions",
        "/v1/audit",
        "/v1/audit/secret-accesses",
        "/v1/approvals",
        "/v1/jobs",
        "/v1/jobs/{id}/cancel",
        "/v1/workflows/{key}/disable",
        "/v1/workflows/{key}/enable",
        "/v1/meta",
        "/v1/approvals/{id}/approve",
        "/v1/approvals/{id}/reject",
        "/v1/approvals/bulk",
        "/v1/callbacks/n8n",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "the bearer scheme is declared"
    );
    // the document itself needs no token
    assert_eq!(
        read.call("GET", "/openapi.json", None, None).await.status,
        200
    );
}

#[tokio::test]
async fn a_poison_event_stops_the_projection_until_fixed_or_skipped() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, true).await;
    job_story(&app, "before", "none").await;
    read.caught_up(&app.log).await;
    // an operator mistake: a constraint the projection's rows violate
    sqlx::query("ALTER TABLE workflows_executions_v1 ADD CONSTRAINT no_reports CHECK (workflow_id <> 'report.daily')")
        .execute(&read.pool).await.unwrap();
    let poison = app
        .send_as(
            Who::Ops,
            "job.submit",
            json!({"job_id": "report-1", "workflow_key": "report.daily", "client_id": "ops"}),
        )
        .await;
    let poison_seq = poison["stream_seq"].as_i64().unwrap();
    job_story(&app, "after", "none").await;
    let rows = read.caught_up(&app.log).await;
    let exec = rows.iter().find(|r| r.name == "executions").unwrap();
    assert_eq!(exec.state, "stopped");
    assert_eq!(exec.error_seq, Some(poison_seq));
    assert!(
        exec.error.as_deref().unwrap_or("").contains("no_reports"),
        "{exec:?}"
    );
    assert_eq!(
        exec.last_seq,
        poison_seq - 1,
        "everything before the poison is applied, nothing after"
    );
    let audit = rows.iter().find(|r| r.name == "audit").unwrap();
    assert_eq!(audit.state, "running", "other projections are not affected");
    let (s, health) = read.get("/healthz").await;
    assert_eq!(s, 503, "{health}");
    // a stopped projection is a degraded read model, not a process to
    // restart nor one that cannot take commands
    assert_eq!(read.get("/livez").await.0, 200);
    let (s, ready) = read.get("/readyz").await;
    assert_eq!(s, 200, "{ready}");
    // the metrics recorder is shared by the tests of this process, and a
    // runner of another test may set this gauge to 0 at its start; the
    // stopped runner sets it to 1 again every second
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = read.get("/metrics").await;
        let text = metrics.as_str().unwrap_or_default();
        if text.contains("flowledger_projection_stopped{projection=\"executions\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped gauge is not 1: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // fixed: the constraint goes, resume applies the event and what follows
    sqlx::query("ALTER TABLE workflows_executions_v1 DROP CONSTRAINT no_reports")
        .execute(&read.pool)
        .await
        .unwrap();
    let msg = resume_projection(&read.bus, &read.pool, ReadModel::Executions, None)
        .await
        .unwrap();
    assert!(msg.contains(&poison_seq.to_string()), "{msg}");
    let rows = read.caught_up(&app.log).await;
    assert!(rows.iter().all(|r| r.state == "running"), "{rows:?}");
    assert_eq!(
        read.get("/v1/jobs/report-1/status").await.1["status"],
        "pending"
    );
    assert_eq!(
        read.get("/v1/jobs/after/status").await.1["status"],
        "running"
    );

    // skipped: the skip is itself an event, the poison row never appears
    sqlx::query("ALTER TABLE workflows_executions_v1 ADD CONSTRAINT no_reports CHECK (workflow_id <> 'report.daily') NOT VALID")
        .execute(&read.pool).await.unwrap();
    let poison2 = app
        .send_as(
            Who::Ops,
            "job.submit",
            json!({"job_id": "report-2", "workflow_key": "report.daily", "client_id": "ops"}),
        )
        .await;
    let seq2 = poison2["stream_seq"].as_u64().unwrap();
    read.caught_up(&app.log).await;
    let wrong = resume_projection(
        &read.bus,
        &read.pool,
        ReadModel::Executions,
        Some((seq2 + 5, "x".into(), "ops".into())),
    )
    .await;
    assert!(
        wrong.is_err(),
        "skip must name the sequence the projection is stopped at"
    );
    resume_projection(
        &read.bus,
        &read.pool,
        ReadModel::Executions,
        Some((
            seq2,
            "report jobs are not tracked here".into(),
            "carol".into(),
        )),
    )
    .await
    .unwrap();
    let rows = read.caught_up(&app.log).await;
    assert!(rows.iter().all(|r| r.state == "running"), "{rows:?}");
    assert_eq!(read.get("/v1/jobs/report-2").await.0, 404);
    let last = app
        .log
        .get(app.log.last_seq().await.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.subject.as_str(), "flow.ev.projection.executions");
    let (_, audit) = read.get("/v1/audit?action=ProjectionEventSkipped").await;
    assert_eq!(audit["items"][0]["user_id"], "carol", "{audit}");
}

#[tokio::test]
async fn sigkill_of_the_service_changes_nothing_in_the_read_models() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, false).await;
    // this test drives jobs itself: the job handler stays off
    let config = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(config.path(), "[handler]\nenabled = false\n").expect("write the config");
    let registry = concat!(env!("CARGO_MANIFEST_DIR"), "/workflows/registry.json");
    let spawn_serve = || {
        start_serve(
            &app,
            &read.url,
            std::path::Path::new(registry),
            Some(config.path()),
        )
    };
    let mut serve = spawn_serve();
    // commands flow (through the test's own intake) while the service that
    // runs the projections is killed and restarted
    let load = {
        let bus = app.bus.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let id = format!("k-{i}");
                let submit = json!({"job_id": id, "workflow_key": "invoice.extract", "client_id": "billing", "input": {"i": i}});
                handle(
                    &bus,
                    &caller_for("flow.cmd.job.submit"),
                    "flow.cmd.job.submit",
                    submit.to_string().as_bytes(),
                )
                .await
                .unwrap();
                handle(
                    &bus,
                    &caller_for("flow.cmd.job.start"),
                    "flow.cmd.job.start",
                    json!({"job_id": id}).to_string().as_bytes(),
                )
                .await
                .unwrap();
                let end = if i % 3 == 0 {
                    json!({"job_id": id, "error_code": "E", "error_message": "boom"})
                } else {
                    json!({"job_id": id, "outputs": {"i": i}})
                };
                let subject = if i % 3 == 0 {
                    "flow.cmd.job.fail"
                } else {
                    "flow.cmd.job.complete"
                };
                handle(
                    &bus,
                    &caller_for(subject),
                    subject,
                    end.to_string().as_bytes(),
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for kill in 0..4 {
        tokio::time::sleep(Duration::from_millis(400 + 150 * kill)).await;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(serve.id() as i32, libc::SIGKILL) };
        let _ = serve.wait();
        serve = spawn_serve();
    }
    load.await.unwrap();
    let rows = read.caught_up(&app.log).await;
    assert!(rows.iter().all(|r| r.state == "running"), "{rows:?}");
    let _ = serve.kill();
    let _ = serve.wait();

    let executions = read.snapshot("workflows_executions", "id").await;
    let audit = read
        .snapshot("audit_trail", "stream_seq, event_index")
        .await;
    assert_eq!(executions.len(), 150);
    assert_eq!(audit.len(), 450, "one row per event, none twice");
    for model in ReadModel::ALL {
        rebuild::rebuild(&read.pool, &app.log, model).await.unwrap();
    }
    assert_eq!(
        flowledger::projections::db::active_version(&read.pool, ReadModel::Executions)
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        read.snapshot("workflows_executions", "id").await,
        executions,
        "rebuild equals the killed-and-restarted projection, row for row"
    );
    assert_eq!(
        read.snapshot("audit_trail", "stream_seq, event_index")
            .await,
        audit
    );
}

#[tokio::test]
async fn readers_see_no_error_and_no_gap_during_a_rebuild() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, true).await;
    for i in 0..400 {
        let id = format!("r-{i}");
        let body = json!({"job_id": id, "workflow_key": "invoice.extract", "client_id": "billing"});
        app.handle("flow.cmd.job.submit", body.to_string().as_bytes())
            .await
            .unwrap();
    }
    read.caught_up(&app.log).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (http, stop) = (read.http.clone(), stop.clone());
        tokio::spawn(async move {
            let client = flowledger::handlers::http_client_builder()
                .build()
                .expect("an HTTP client");
            let (mut reads, mut failures) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for path in [
                    "/v1/executions?limit=20",
                    "/v1/jobs/r-7",
                    "/v1/audit?job_id=r-9",
                ] {
                    match client
                        .get(format!("{http}{path}"))
                        .bearer_auth(OPERATOR_TOKEN)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => {
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            let empty = v
                                .get("items")
                                .is_some_and(|i| i.as_array().is_none_or(Vec::is_empty))
                                || v.is_null();
                            if empty {
                                failures.push(format!("{path}: empty"));
                            }
                        }
                        Ok(r) => failures.push(format!("{path}: {}", r.status())),
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                    reads += 1;
                }
            }
            (reads, failures)
        })
    };
    // writes continue during the rebuild
    let writer = {
        let bus = app.bus.clone();
        tokio::spawn(async move {
            for i in 400..500 {
                let body = json!({"job_id": format!("r-{i}"), "workflow_key": "invoice.extract", "client_id": "billing"});
                handle(
                    &bus,
                    &caller_for("flow.cmd.job.submit"),
                    "flow.cmd.job.submit",
                    body.to_string().as_bytes(),
                )
                .await
                .unwrap();
            }
        })
    };
    let started = Instant::now();
    for model in ReadModel::ALL {
        let report = rebuild::rebuild(&read.pool, &app.log, model).await.unwrap();
        assert_eq!(report.new_version, 2);
    }
    writer.await.unwrap();
    read.caught_up(&app.log).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, failures) = reader.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        reads > 10,
        "the reader kept reading during {:?}: {reads} reads",
        started.elapsed()
    );
    let (_, page) = read.get("/v1/executions?limit=1000").await;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        500,
        "the new version caught up with the writes made during the rebuild"
    );
    let old: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('workflows_executions_v1')::text")
            .fetch_one(&read.pool)
            .await
            .unwrap();
    assert_eq!(old, None, "the old version is dropped after the switch");
}

/// `promtool check metrics` (Debian's prometheus package; FLOWLEDGER_PROMTOOL,
/// else `promtool`) accepts the exposition: a check that cannot run fails.
pub(crate) fn promtool_accepts(text: &str) {
    use std::io::Write;
    let tool = std::env::var("FLOWLEDGER_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = std::process::Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} cannot run ({e}): scripts/install-deps.sh installs it"));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("promtool reads");
    let out = child.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
