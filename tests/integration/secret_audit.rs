//! The read side of secret access (issue 13, item 7): the `secret_accesses`
//! read model and `GET /v1/audit/secret-accesses` (filters, paging, who may
//! call), secret reads in a job's audit trail, the auditor role (reads
//! every client's, sends no command), and a rebuild of the read model.
//! The accesses are recorded through the command bus directly, as the
//! secrets service records them.

use chrono::{DateTime, Utc};
use flowledger::commands::secret_access::events::{
    AccessRequest, DecidedBy, SecretAccessDenied, SecretAccessEvent, SecretAccessFailed,
    SecretAccessGranted, ValueSource, VaultFailure,
};
use flowledger::commands::secret_access::RecordAccess;
use flowledger::events::envelope::{Actor, CommandMeta};
use flowledger::projections::{db, rebuild, ReadModel};
use serde_json::{json, Value};

use crate::helpers::*;

fn request(path: &str, job: Option<(&str, &str)>) -> AccessRequest {
    AccessRequest {
        path: path.into(),
        field: Some("api_key".into()),
        version: None,
        purpose: "call the provider".into(),
        job_id: job.map(|(j, _)| j.into()),
        step: job.map(|(_, s)| s.into()),
    }
}

fn sealed() -> VaultFailure {
    VaultFailure {
        kind: "failing".into(),
        status: Some(503),
        message: "Vault is sealed".into(),
    }
}

fn granted(path: &str, job: Option<(&str, &str)>, source: ValueSource) -> SecretAccessEvent {
    SecretAccessEvent::SecretAccessGranted(SecretAccessGranted {
        request: request(path, job),
        rule: "ocr-readers".into(),
        kv_version: 3,
        source,
        read_from_vault_at: "2026-12-01T10:00:00Z".into(),
        vault_error: None,
    })
}

fn denied(path: &str) -> SecretAccessEvent {
    SecretAccessEvent::SecretAccessDenied(SecretAccessDenied {
        request: request(path, None),
        decided_by: DecidedBy::Policy,
        rule: None,
        reason: "no rule allows billing to read this path".into(),
        vault_error: None,
    })
}

fn failed(path: &str) -> SecretAccessEvent {
    SecretAccessEvent::SecretAccessFailed(SecretAccessFailed {
        request: request(path, None),
        rule: "ocr-readers".into(),
        code: "unavailable".into(),
        vault_error: sealed(),
    })
}

/// Records access `request_id` by `client_id` (user `alice`), as the
/// secrets service does.
async fn record(app: &TestApp, request_id: &str, client_id: &str, event: SecretAccessEvent) {
    let actor = Actor {
        client_id: client_id.into(),
        user_id: Some("alice".into()),
    };
    let meta = CommandMeta::originating(format!("{request_id}-cmd"), actor, String::new());
    app.bus
        .secret_access(request_id, RecordAccess(event), &meta)
        .await
        .expect("the access is recorded");
}

impl ReadSide {
    async fn get_as(&self, token: &str, path: &str) -> Answer {
        self.call("GET", path, Some(token), None).await
    }
}

/// The request ids of a list answer, in order.
fn ids(body: &Value) -> Vec<&str> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a list: {body}"))
        .iter()
        .map(|r| r["request_id"].as_str().expect("a request id"))
        .collect()
}

async fn list(read: &ReadSide, query: &str) -> Vec<String> {
    let a = read
        .get_as(AUDITOR_TOKEN, &format!("/v1/audit/secret-accesses{query}"))
        .await;
    assert_eq!(a.status, 200, "{query}: {}", a.body);
    ids(&a.body).into_iter().map(str::to_string).collect()
}

/// Four accesses by two clients, two before and two after the returned
/// time: r1 granted (billing, for job-s1's step ocr), r2 denied (billing),
/// r3 failed (other), r4 granted from the cache (other).
async fn four_accesses(app: &TestApp) -> DateTime<Utc> {
    assert_eq!(app.submit("job-s1", "job-s1-s").await["ok"], json!(true));
    let ocr = "secret/data/external_apis/ocr";
    let payroll = "secret/data/payroll/db";
    record(
        app,
        "r1",
        "billing",
        granted(ocr, Some(("job-s1", "ocr")), ValueSource::Vault),
    )
    .await;
    record(app, "r2", "billing", denied(payroll)).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mid = Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    record(app, "r3", "other", failed(ocr)).await;
    record(
        app,
        "r4",
        "other",
        granted("secret/data/payroll/api", None, ValueSource::Cache),
    )
    .await;
    mid
}

#[tokio::test]
async fn auditors_list_secret_accesses_by_path_client_decision_and_time() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, true).await;
    let mid = four_accesses(&app).await;
    read.caught_up(&app.log).await;

    let all = read
        .get_as(AUDITOR_TOKEN, "/v1/audit/secret-accesses")
        .await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert_eq!(ids(&all.body), ["r1", "r2", "r3", "r4"], "stream order");
    assert_eq!(all.body["next_cursor"], Value::Null);
    let r = &all.body["items"];
    let r1 = &r[0];
    assert_eq!(
        (&r1["decision"], &r1["client_id"], &r1["user_id"]),
        (&json!("granted"), &json!("billing"), &json!("alice"))
    );
    assert_eq!(r1["path"], "secret/data/external_apis/ocr");
    assert_eq!(
        (&r1["field"], &r1["requested_version"]),
        (&json!("api_key"), &Value::Null)
    );
    assert_eq!(
        (&r1["kv_version"], &r1["source"]),
        (&json!(3), &json!("vault"))
    );
    assert_eq!(
        (&r1["job_id"], &r1["step"]),
        (&json!("job-s1"), &json!("ocr"))
    );
    assert_eq!(
        (&r1["rule"], &r1["purpose"]),
        (&json!("ocr-readers"), &json!("call the provider"))
    );
    assert!(r1["read_from_vault_at"].is_string(), "{r1}");
    assert_eq!(r1["event_hash"].as_str().map(str::len), Some(64), "{r1}");
    let r2 = &r[1];
    assert_eq!(
        (&r2["decision"], &r2["decided_by"]),
        (&json!("denied"), &json!("policy"))
    );
    assert_eq!(
        (&r2["rule"], &r2["kv_version"]),
        (&Value::Null, &Value::Null)
    );
    assert!(
        r2["reason"].as_str().is_some_and(|s| s.contains("no rule")),
        "{r2}"
    );
    let r3 = &r[2];
    assert_eq!(
        (&r3["decision"], &r3["code"]),
        (&json!("failed"), &json!("unavailable"))
    );
    assert_eq!(
        (
            &r3["vault_error_kind"],
            &r3["vault_error_status"],
            &r3["vault_error_message"]
        ),
        (&json!("failing"), &json!(503), &json!("Vault is sealed"))
    );
    assert_eq!(r[3]["source"], "cache");
    // the operator reads the same list
    let (s, ops) = read.get("/v1/audit/secret-accesses").await;
    assert_eq!((s, ids(&ops)), (200, vec!["r1", "r2", "r3", "r4"]));

    // filters
    assert_eq!(
        list(&read, "?path=secret/data/external_apis/ocr").await,
        ["r1", "r3"]
    );
    assert_eq!(
        list(&read, "?path=secret/data/external_apis").await,
        Vec::<String>::new()
    );
    assert_eq!(
        list(&read, "?path_prefix=secret/data/payroll/").await,
        ["r2", "r4"]
    );
    // `_` in a prefix is itself, not a LIKE wildcard
    assert_eq!(
        list(&read, "?path_prefix=secret/data/external_").await,
        ["r1", "r3"]
    );
    assert_eq!(
        list(&read, "?path_prefix=secret/data/externalXapis").await,
        Vec::<String>::new()
    );
    assert_eq!(list(&read, "?client_id=other").await, ["r3", "r4"]);
    assert_eq!(list(&read, "?decision=denied").await, ["r2"]);
    assert_eq!(
        list(&read, "?decision=granted&client_id=billing").await,
        ["r1"]
    );
    assert_eq!(list(&read, "?job_id=job-s1").await, ["r1"]);
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(
        list(&read, &format!("?since={}", at(mid))).await,
        ["r3", "r4"]
    );
    assert_eq!(
        list(&read, &format!("?until={}", at(mid))).await,
        ["r1", "r2"]
    );
    assert_eq!(
        list(&read, &format!("?since={}&decision=failed", at(mid))).await,
        ["r3"]
    );
    // paging: a full page has a cursor, the next page continues after it
    let page1 = read
        .get_as(AUDITOR_TOKEN, "/v1/audit/secret-accesses?limit=3")
        .await;
    assert_eq!(ids(&page1.body), ["r1", "r2", "r3"]);
    let cursor = page1.body["next_cursor"]
        .as_str()
        .expect("a cursor")
        .to_string();
    let page2 = list(&read, &format!("?limit=3&cursor={cursor}")).await;
    assert_eq!(page2, ["r4"]);

    // bad filter values: 400, the parameter named
    for (query, param) in [
        ("decision=maybe", "decision"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("path=secret/ocr", "path"),
        ("path_prefix=secret/data/a%25", "path_prefix"),
        ("path_prefix=", "path_prefix"),
        ("client_id=", "client_id"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=x", "cursor"),
        ("value=1", "value"),
        (
            "since=2026-12-02T00:00:00Z&until=2026-12-01T00:00:00Z",
            "until",
        ),
    ] {
        let a = read
            .get_as(AUDITOR_TOKEN, &format!("/v1/audit/secret-accesses?{query}"))
            .await;
        assert_eq!(a.status, 400, "{query}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "validation", "{query}");
        assert_eq!(a.body["error"]["param"], param, "{query}: {}", a.body);
    }

    // a client may not list secret accesses, not even its own
    for token in [BILLING_TOKEN, OTHER_TOKEN] {
        let a = read.get_as(token, "/v1/audit/secret-accesses").await;
        assert_eq!(a.status, 403, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "forbidden");
    }
    let a = read
        .call("GET", "/v1/audit/secret-accesses", None, None)
        .await;
    assert_eq!(a.status, 401);

    // the job's audit trail lists the read made on its behalf
    let trail = read.get_as(AUDITOR_TOKEN, "/v1/audit?job_id=job-s1").await;
    assert_eq!(trail.status, 200, "{}", trail.body);
    let rows = trail.body["items"].as_array().expect("rows").clone();
    let read_row = rows
        .iter()
        .find(|r| r["action"] == "SecretAccessGranted")
        .unwrap_or_else(|| panic!("the trail lists the secret read: {}", trail.body));
    assert_eq!(read_row["aggregate_type"], "secret_access");
    assert_eq!(read_row["aggregate_id"], "r1");
    assert_eq!(
        (&read_row["step"], &read_row["status"]),
        (&json!("ocr"), &json!("granted"))
    );
    assert_eq!(read_row["client_id"], "billing");
    assert!(
        rows.iter().any(|r| r["action"] == "JobSubmitted"),
        "{}",
        trail.body
    );
    // the denied read names no job: it is in the trail, under no job
    let (_, denied) = read.get("/v1/audit?action=SecretAccessDenied").await;
    assert_eq!(denied["items"][0]["status"], "denied");
    assert_eq!(denied["items"][0]["job_id"], Value::Null);

    let (_, doc) = read.get("/openapi.json").await;
    assert!(
        doc["paths"].get("/v1/audit/secret-accesses").is_some(),
        "openapi lists the endpoint"
    );
}

#[tokio::test]
async fn an_auditor_reads_every_clients_jobs_and_sends_no_command() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, true).await;
    // billing's job, and one that waits for no approval decision by anyone
    let submitted = read
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "b-1", "workflow_key": "invoice.extract"}),
        )
        .await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    let expires = (Utc::now() + chrono::Duration::minutes(5)).to_rfc3339();
    let requested = app
        .send(
            "approval.request",
            json!({"approval_id": "b-1", "job_id": "b-1", "workflow_key": "invoice.extract", "requested_by": "billing", "expires_at": expires}),
        )
        .await;
    assert_eq!(requested["ok"], json!(true), "{requested}");
    read.caught_up(&app.log).await;

    // reads: every client's
    for path in [
        "/v1/jobs/b-1",
        "/v1/jobs/b-1/status",
        "/v1/executions",
        "/v1/audit?job_id=b-1",
        "/v1/approvals",
        "/v1/meta",
        "/v1/audit/secret-accesses",
    ] {
        let a = read.get_as(AUDITOR_TOKEN, path).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    let execs = read.get_as(AUDITOR_TOKEN, "/v1/executions").await;
    assert_eq!(execs.body["items"][0]["execution_id"], "b-1");
    let approvals = read.get_as(AUDITOR_TOKEN, "/v1/approvals").await;
    assert_eq!(approvals.body["items"][0]["approval_id"], "b-1");
    // another client still does not see billing's job
    let a = read.get_as(OTHER_TOKEN, "/v1/jobs/b-1").await;
    assert_eq!(a.status, 404);

    // commands: none, each refused before anything is written
    let before = app.last_seq().await;
    let reason = json!({"reason": "audit"});
    for (path, body) in [
        (
            "/v1/jobs",
            json!({"job_id": "a-1", "workflow_key": "invoice.extract"}),
        ),
        (
            "/v1/jobs",
            json!({"workflow_key": "invoice.extract", "client_id": "billing"}),
        ),
        ("/v1/jobs/b-1/cancel", reason.clone()),
        ("/v1/jobs/no-such-job/cancel", reason.clone()),
        ("/v1/workflows/invoice.extract/disable", reason.clone()),
        ("/v1/workflows/invoice.extract/enable", reason.clone()),
        ("/v1/approvals/b-1/approve", reason.clone()),
        ("/v1/approvals/b-1/reject", reason.clone()),
        (
            "/v1/approvals/bulk",
            json!({"approval_ids": ["b-1"], "decision": "approve", "reason": "audit"}),
        ),
    ] {
        let a = read.post(path, AUDITOR_TOKEN, body).await;
        assert_eq!(a.status, 403, "{path}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "forbidden", "{path}");
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("auditor")),
            "{path}: {}",
            a.body
        );
    }
    assert_eq!(app.last_seq().await, before, "an auditor wrote nothing");
    let (_, status) = read.get("/v1/jobs/b-1/status").await;
    assert_eq!(
        status["status"], "awaiting_approval",
        "the job is not cancelled and its approval not decided"
    );
}

#[tokio::test]
async fn a_rebuild_of_secret_accesses_gives_the_same_rows() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, true).await;
    four_accesses(&app).await;
    read.caught_up(&app.log).await;
    let before = read
        .snapshot("secret_accesses", "stream_seq, event_index")
        .await;
    assert_eq!(
        before.len(),
        4,
        "one row per access, none for the job's events"
    );
    let report = rebuild::rebuild(&read.pool, &app.log, ReadModel::SecretAccesses)
        .await
        .expect("the rebuild switches");
    assert_eq!((report.old_version, report.new_version), (1, 2));
    assert_eq!(
        db::active_version(&read.pool, ReadModel::SecretAccesses)
            .await
            .expect("checkpoints"),
        Some(2)
    );
    assert_eq!(
        read.snapshot("secret_accesses", "stream_seq, event_index")
            .await,
        before,
        "the rebuild equals the live projection, row for row"
    );
    // the live projection continues on the new version
    record(&app, "r5", "billing", denied("secret/data/payroll/db")).await;
    read.caught_up(&app.log).await;
    assert_eq!(list(&read, "?decision=denied").await, ["r2", "r5"]);
}
