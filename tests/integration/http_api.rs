//! The HTTP command API on real nats-server and PostgreSQL: the seed 002
//! submission contract, bearer tokens and roles, the rate limit, cancel,
//! the kill-switch, approvals, and every 4xx answer.

use serde_json::{json, Value};

use crate::helpers::*;

fn job(id: &str) -> Value {
    json!({"job_id": id, "workflow_key": "invoice.extract",
           "inputs": {"invoice": 7}, "priority": 7, "metadata": {"user_id": "ann"}})
}

#[tokio::test]
async fn submission_answers_202_and_the_same_body_answers_the_same() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;

    let first = api.post("/v1/jobs", BILLING_TOKEN, job("h-1")).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let b = &first.body;
    assert_eq!(b["job_id"], "h-1");
    assert_eq!(b["status"], "pending");
    assert!(b["message"].as_str().is_some_and(|m| !m.is_empty()));
    let accepted = chrono::DateTime::parse_from_rfc3339(b["accepted_at"].as_str().unwrap())
        .expect("accepted_at is RFC 3339");
    let eta = chrono::DateTime::parse_from_rfc3339(b["estimated_completion"].as_str().unwrap())
        .expect("estimated_completion is RFC 3339");
    assert!(eta >= accepted, "{b}");
    assert_eq!(first.headers["location"], "/v1/jobs/h-1");

    // the same job_id and body, keys in another order: the same answer
    let again = api
        .call(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(r#"{"metadata":{"user_id":"ann"},"priority":7,"inputs":{"invoice":7},"workflow_key":"invoice.extract","job_id":"h-1"}"#.into()),
        )
        .await;
    assert_eq!((again.status, &again.body), (202, &first.body));

    // a different body under the same job_id: 409 naming job_id
    let mut changed = job("h-1");
    changed["priority"] = json!(3);
    let conflict = api.post("/v1/jobs", BILLING_TOKEN, changed).await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert_eq!(conflict.body["error"]["param"], "job_id");
    // ... and another client cannot take over the id with the same body
    assert_eq!(
        api.post("/v1/jobs", OTHER_TOKEN, job("h-1")).await.status,
        409
    );

    // one job was submitted, by billing, with ann as the user
    api.caught_up(&app.log).await;
    let (_, audit) = api.get("/v1/audit?job_id=h-1").await;
    let rows = audit["items"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(rows[0]["action"], "JobSubmitted");
    assert_eq!(rows[0]["client_id"], "billing");
    assert_eq!(rows[0]["user_id"], "ann");
    let (_, row) = api.get("/v1/jobs/h-1").await;
    assert_eq!(row["priority"], 7, "{row}");

    // without a job_id the service picks one
    let mut anon = job("x");
    anon.as_object_mut().unwrap().remove("job_id");
    let made = api.post("/v1/jobs", BILLING_TOKEN, anon).await;
    assert_eq!(made.status, 202);
    assert!(made.body["job_id"]
        .as_str()
        .is_some_and(|id| id.len() >= 32));
}

#[tokio::test]
async fn bad_submissions_get_a_4xx_that_names_the_problem() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;

    // who: no token, a malformed header, an unknown token
    let none = api
        .call("POST", "/v1/jobs", None, Some(job("b-1").to_string()))
        .await;
    assert_eq!(none.status, 401);
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    assert_eq!(none.body["error"]["code"], "unauthenticated");
    let unknown = api.post("/v1/jobs", "not-a-token", job("b-1")).await;
    assert_eq!(unknown.status, 401);
    assert!(!unknown.body.to_string().contains("not-a-token"));
    // reads need a token too
    assert_eq!(
        api.call("GET", "/v1/executions", None, None).await.status,
        401
    );
    // acting as another client
    let mut as_other = job("b-1");
    as_other["client_id"] = json!("other");
    let forbidden = api.post("/v1/jobs", BILLING_TOKEN, as_other).await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);

    // what: each bad field is named
    let cases = [
        (
            json!({"job_id": "b-2", "workflow_key": "nope"}),
            "workflow_key",
        ),
        (
            json!({"job_id": "b-2", "workflow_key": "invoice.extract", "priority": 11}),
            "priority",
        ),
        (
            json!({"job_id": "b-2", "workflow_key": "invoice.extract", "priority": "high"}),
            "priority",
        ),
        (
            json!({"job_id": "b-2", "workflow_key": "invoice.extract", "inputs": [1]}),
            "inputs",
        ),
        (
            json!({"job_id": "b 2", "workflow_key": "invoice.extract"}),
            "job_id",
        ),
        (
            json!({"job_id": "b-2", "workflow_key": "invoice.extract", "colour": "red"}),
            "colour",
        ),
        (json!({"job_id": "b-2"}), "workflow_key"),
        (
            json!({"job_id": "b-2", "workflow_key": "invoice.extract", "callback_url": "ftp://x/cb"}),
            "callback_url",
        ),
        (
            json!({"job_id": "b-2", "workflow_key": "invoice.extract", "timeout_seconds": 0}),
            "timeout_seconds",
        ),
    ];
    for (body, field) in cases {
        let a = api.post("/v1/jobs", BILLING_TOKEN, body.clone()).await;
        assert_eq!(a.status, 400, "{body} -> {}", a.body);
        assert_eq!(a.body["error"]["code"], "validation", "{body}");
        let named = a.body["error"]["param"] == field
            || a.body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(field);
        assert!(named, "{body}: error should name {field}: {}", a.body);
    }
    let not_json = api
        .call(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some("{oops".into()),
        )
        .await;
    assert_eq!(not_json.status, 400);
    assert!(not_json.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    // nothing was written by any of them
    assert_eq!(app.log.last_seq().await.unwrap(), 0);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    for i in 0..2 {
        let a = api
            .post("/v1/jobs", LIMITED_TOKEN, job(&format!("l-{i}")))
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let over = api.post("/v1/jobs", LIMITED_TOKEN, job("l-2")).await;
    assert_eq!(over.status, 429, "{}", over.body);
    assert_eq!(over.body["error"]["code"], "rate_limited");
    let retry: u64 = over.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(
        (1..=30).contains(&retry),
        "2 a minute: the next in about 30 s, got {retry}"
    );
    // nothing was written for the refused one; other clients are not limited
    assert_eq!(api.get("/v1/jobs/l-2").await.0, 404);
    assert_eq!(
        api.post("/v1/jobs", BILLING_TOKEN, job("l-3")).await.status,
        202
    );
}

#[tokio::test]
async fn clients_cancel_only_their_own_jobs() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    for id in ["c-1", "c-2"] {
        assert_eq!(
            api.post("/v1/jobs", BILLING_TOKEN, job(id)).await.status,
            202
        );
    }
    let theirs = api
        .post(
            "/v1/jobs/c-1/cancel",
            OTHER_TOKEN,
            json!({"reason": "mine now"}),
        )
        .await;
    // another client's job answers exactly as a missing one
    assert_eq!(theirs.status, 404, "{}", theirs.body);
    let missing = api
        .post("/v1/jobs/c-9/cancel", OTHER_TOKEN, json!({"reason": "x"}))
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        theirs.body["error"]["message"]
            .as_str()
            .map(|m| m.replace("c-1", "c-9")),
        missing.body["error"]["message"]
            .as_str()
            .map(str::to_string)
    );
    let own = api
        .post(
            "/v1/jobs/c-1/cancel",
            BILLING_TOKEN,
            json!({"reason": "not needed"}),
        )
        .await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.body["status"], "cancelled");
    let twice = api
        .post("/v1/jobs/c-1/cancel", BILLING_TOKEN, json!({}))
        .await;
    assert_eq!(twice.status, 409, "{}", twice.body);
    assert_eq!(
        api.post("/v1/jobs/none/cancel", BILLING_TOKEN, json!({}))
            .await
            .status,
        404
    );
    // an operator may cancel any job; an empty body is fine
    let op = api
        .call("POST", "/v1/jobs/c-2/cancel", Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(op.status, 200, "{}", op.body);

    api.caught_up(&app.log).await;
    let (_, status) = api.get("/v1/jobs/c-1/status").await;
    assert_eq!(status["status"], "cancelled");
    let (_, audit) = api.get("/v1/audit?job_id=c-2&action=JobCancelled").await;
    assert_eq!(audit["items"][0]["client_id"], "ops", "{audit}");
}

#[tokio::test]
async fn the_kill_switch_refuses_new_jobs_of_a_disabled_workflow() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let path = "/v1/workflows/invoice.extract/disable";
    assert_eq!(
        api.post(path, BILLING_TOKEN, json!({"reason": "x"}))
            .await
            .status,
        403,
        "clients cannot pull the switch"
    );
    let no_reason = api.post(path, OPERATOR_TOKEN, json!({})).await;
    assert_eq!(no_reason.status, 400);
    assert_eq!(no_reason.body["error"]["param"], "reason");
    assert_eq!(
        api.post(
            "/v1/workflows/nope/disable",
            OPERATOR_TOKEN,
            json!({"reason": "x"})
        )
        .await
        .status,
        404
    );
    let off = api
        .post(
            path,
            OPERATOR_TOKEN,
            json!({"reason": "bad extractions", "user_id": "olga"}),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.body);
    assert_eq!(
        api.post(path, OPERATOR_TOKEN, json!({"reason": "again"}))
            .await
            .status,
        409
    );

    let refused = api.post("/v1/jobs", BILLING_TOKEN, job("k-1")).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.body["error"]["param"], "workflow_key");
    assert!(refused.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("disabled"));
    // other workflows still run
    let mut other = job("k-2");
    other["workflow_key"] = json!("report.daily");
    assert_eq!(api.post("/v1/jobs", BILLING_TOKEN, other).await.status, 202);

    let (s, meta) = api.get("/v1/meta").await;
    assert_eq!(s, 200);
    let wf = |key: &str| {
        meta["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["workflow_key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} in {meta}"))
    };
    assert_eq!(wf("invoice.extract")["disabled"], true);
    assert_eq!(wf("invoice.extract")["steps"][0]["name"], "main", "{meta}");
    assert!(
        !meta.to_string().contains("\"url\""),
        "step URLs may carry credentials: not listed"
    );
    assert_eq!(wf("report.daily")["disabled"], false);

    let on = api
        .post(
            "/v1/workflows/invoice.extract/enable",
            OPERATOR_TOKEN,
            json!({"reason": "fixed"}),
        )
        .await;
    assert_eq!(on.status, 200, "{}", on.body);
    assert_eq!(
        api.post("/v1/jobs", BILLING_TOKEN, job("k-3")).await.status,
        202
    );
}

/// Requests an approval for `job_id` (submitted) over NATS, as the
/// handler does.
async fn request_approval(app: &TestApp, job_id: &str) {
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let body = json!({"approval_id": job_id, "job_id": job_id, "workflow_key": "invoice.extract",
                      "requested_by": "flowledger-handler", "expires_at": expires});
    app.handle("flow.cmd.approval.request", body.to_string().as_bytes())
        .await
        .expect("approval requested");
}

#[tokio::test]
async fn operators_decide_approvals_one_by_one_or_in_bulk() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    for id in ["a-1", "a-2", "a-3", "a-4"] {
        app.submit(id, &format!("submit-{id}")).await;
        request_approval(&app, id).await;
    }
    let path = "/v1/approvals/a-1/approve";
    assert_eq!(api.post(path, BILLING_TOKEN, json!({})).await.status, 403);
    let yes = api
        .post(
            path,
            OPERATOR_TOKEN,
            json!({"reason": "checked", "user_id": "olga"}),
        )
        .await;
    assert_eq!(yes.status, 200, "{}", yes.body);
    assert_eq!(
        (&yes.body["status"], &yes.body["decided_by"]),
        (&json!("approved"), &json!("ops"))
    );
    assert_eq!(api.post(path, OPERATOR_TOKEN, json!({})).await.status, 409);
    assert_eq!(
        api.post("/v1/approvals/zzz/approve", OPERATOR_TOKEN, json!({}))
            .await
            .status,
        404
    );
    let no = api
        .post(
            "/v1/approvals/a-2/reject",
            OPERATOR_TOKEN,
            json!({"reason": "wrong amount"}),
        )
        .await;
    assert_eq!(no.status, 200, "{}", no.body);

    // bulk: each id on its own, results in order
    let bulk = api
        .post(
            "/v1/approvals/bulk",
            OPERATOR_TOKEN,
            json!({"approval_ids": ["a-3", "a-1", "zzz", "a-4"], "decision": "approve", "reason": "batch"}),
        )
        .await;
    assert_eq!(bulk.status, 200, "{}", bulk.body);
    assert_eq!(
        (&bulk.body["decided"], &bulk.body["failed"]),
        (&json!(2), &json!(2))
    );
    let oks: Vec<_> = bulk.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["approval_id"].as_str().unwrap().to_string(),
                r["ok"] == true,
            )
        })
        .collect();
    assert_eq!(
        oks,
        [("a-3", true), ("a-1", false), ("zzz", false), ("a-4", true)]
            .map(|(a, b)| (a.to_string(), b))
    );
    for bad in [
        json!({"approval_ids": [], "decision": "approve"}),
        json!({"approval_ids": ["a-9"], "decision": "maybe"}),
    ] {
        let a = api.post("/v1/approvals/bulk", OPERATOR_TOKEN, bad).await;
        assert_eq!(a.status, 400, "{}", a.body);
    }
    assert_eq!(
        api.post(
            "/v1/approvals/bulk",
            BILLING_TOKEN,
            json!({"approval_ids": ["a-9"], "decision": "approve"})
        )
        .await
        .status,
        403
    );

    // who and why are in the audit trail
    api.caught_up(&app.log).await;
    let (_, audit) = api.get("/v1/audit?job_id=a-1&action=ApprovalGranted").await;
    let row = &audit["items"][0];
    assert_eq!(
        (&row["client_id"], &row["user_id"]),
        (&json!("ops"), &json!("olga")),
        "{audit}"
    );
    let (_, list) = api.get("/v1/approvals?status=approved").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 3, "{list}");
}

#[tokio::test]
async fn clients_read_only_their_own_jobs() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, true).await;
    assert_eq!(
        api.post("/v1/jobs", BILLING_TOKEN, job("r-b")).await.status,
        202
    );
    assert_eq!(
        api.post("/v1/jobs", OTHER_TOKEN, job("r-o")).await.status,
        202
    );
    request_approval(&app, "r-b").await;
    api.caught_up(&app.log).await;
    let read = |token: &'static str, path: &'static str| {
        let api = &api;
        async move { api.call("GET", path, Some(token), None).await }
    };
    // one's own job, yes; another's is as if it did not exist
    assert_eq!(read(BILLING_TOKEN, "/v1/jobs/r-b").await.status, 200);
    assert_eq!(read(OTHER_TOKEN, "/v1/jobs/r-b").await.status, 404);
    assert_eq!(read(OTHER_TOKEN, "/v1/jobs/r-b/status").await.status, 404);
    let ids = |v: &Value, key: &str| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[key].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let mine = read(OTHER_TOKEN, "/v1/executions").await;
    assert_eq!(ids(&mine.body, "execution_id"), ["r-o"]);
    assert!(ids(
        &read(OTHER_TOKEN, "/v1/audit?job_id=r-b").await.body,
        "job_id"
    )
    .is_empty());
    assert_eq!(
        ids(
            &read(BILLING_TOKEN, "/v1/audit?job_id=r-b").await.body,
            "job_id"
        )
        .len(),
        2
    );
    assert!(ids(
        &read(OTHER_TOKEN, "/v1/approvals").await.body,
        "approval_id"
    )
    .is_empty());
    assert_eq!(
        ids(
            &read(BILLING_TOKEN, "/v1/approvals").await.body,
            "approval_id"
        ),
        ["r-b"]
    );
    // operators read everything
    let all = read(OPERATOR_TOKEN, "/v1/executions").await;
    assert_eq!(ids(&all.body, "execution_id").len(), 2);
}
