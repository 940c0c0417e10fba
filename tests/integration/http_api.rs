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
    // a malformed Authorization header, on a read with a typed query: 401
    // before the query is looked at, the header's problem said
    for (header, message) in [
        ("Basic YmlsbGluZzp4", "is not `Bearer <token>`"),
        ("Bearer", "is not `Bearer <token>`"),
        ("Bearer    ", "is not `Bearer <token>`"),
        ("bearer not-a-token", "unknown bearer token"),
    ] {
        let a = api
            .send(
                "GET",
                "/v1/executions?colour=red",
                None,
                None,
                &[("authorization", header)],
            )
            .await;
        assert_eq!(a.status, 401, "{header}: {}", a.body);
        assert_eq!(a.headers["www-authenticate"], "Bearer");
        assert_eq!(a.body["error"]["code"], "unauthenticated");
        let said = a.body["error"]["message"].as_str().unwrap_or_default();
        assert!(said.contains(message), "{header}: {}", a.body);
        assert!(!said.contains("YmlsbGluZzp4") && !said.contains("not-a-token"));
    }
    // a known token, an unknown query parameter: 400 naming it and listing
    // the accepted ones
    let a = api
        .call(
            "GET",
            "/v1/executions?limit=5&colour=red",
            Some(BILLING_TOKEN),
            None,
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "validation");
    assert_eq!(a.body["error"]["param"], "colour");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown parameter; accepted: workflow_key, workflow_id")),
        "{}",
        a.body
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

/// Waits until the read model shows job `id` in a final status; answers
/// its row.
async fn ended_row(api: &ReadSide, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, row) = api.get(&format!("/v1/jobs/{id}")).await;
        if status == 200
            && ["completed", "failed", "cancelled"].contains(&row["status"].as_str().unwrap_or(""))
        {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} did not end within 30 s: {row}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failed_job_is_retried_over_http_as_one_new_linked_job() {
    use crate::peers::{self, Peer};
    let app = spawn_app().await;
    let peer = Peer::start().await;
    // the step answers 500 to the first job's two attempts, 200 after
    let flaky = peer.script(
        "/flaky",
        vec![
            peers::status(5, 500),
            peers::status(5, 500),
            peers::ok(5, json!({"total": 42})),
        ],
    );
    let registry = parse_registry(json!({"version": 1, "workflows": {
        "invoice.extract": {"steps": [solver("s", &flaky, 5000, 2)]},
        "report.daily": {"steps": [solver("s", &flaky, 5000, 1)], "requires_approval": true},
    }}));
    let api = spawn_api(&app, true, registry.clone()).await;
    let h = start_handler(&app, registry, test_handler_config()).await;

    let submitted = api.post("/v1/jobs", BILLING_TOKEN, job("rt-1")).await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    let old = ended_row(&api, "rt-1").await;
    assert_eq!(old["status"], "failed", "{old}");
    assert_eq!(old["retried_by"], Value::Null, "{old}");

    // another client's job answers as a missing one; an auditor sends nothing
    let theirs = api
        .post("/v1/jobs/rt-1/retry", OTHER_TOKEN, json!({}))
        .await;
    assert_eq!(theirs.status, 404, "{}", theirs.body);
    let missing = api
        .post("/v1/jobs/rt-9/retry", OTHER_TOKEN, json!({}))
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(
        theirs.body["error"]["message"]
            .as_str()
            .map(|m| m.replace("rt-1", "rt-9")),
        missing.body["error"]["message"]
            .as_str()
            .map(str::to_string)
    );
    assert_eq!(
        api.post("/v1/jobs/rt-1/retry", AUDITOR_TOKEN, json!({}))
            .await
            .status,
        403
    );

    // the retry: a new job, linked, that runs (the peer answers 200 now)
    let retried = api
        .call("POST", "/v1/jobs/rt-1/retry", Some(BILLING_TOKEN), None)
        .await;
    assert_eq!(retried.status, 202, "{}", retried.body);
    let new_id = retried.body["job_id"]
        .as_str()
        .expect("the new job's id")
        .to_string();
    assert_ne!(new_id, "rt-1");
    assert_eq!(retried.body["retry_of"], "rt-1");
    assert_eq!(retried.body["status"], "pending");
    assert_eq!(retried.headers["location"], format!("/v1/jobs/{new_id}"));
    let new = ended_row(&api, &new_id).await;
    assert_eq!(new["status"], "completed", "{new}");
    assert_eq!(new["retry_of"], "rt-1", "{new}");
    assert_eq!(new["retried_by"], Value::Null, "{new}");
    // the same submission: workflow, inputs, priority, client
    for field in ["workflow_key", "inputs", "priority", "client_id"] {
        assert_eq!(new[field], old[field], "{field}: {new} vs {old}");
    }
    api.caught_up(&app.log).await;
    let (_, old) = api.get("/v1/jobs/rt-1").await;
    assert_eq!(old["retried_by"], new_id.as_str(), "{old}");
    assert_eq!(old["status"], "failed", "the retried job stays as it ended");
    assert_eq!(old["retry_of"], Value::Null, "{old}");
    let (_, page) = api.get("/v1/executions?workflow_key=invoice.extract").await;
    let listed = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|r| r["job_id"] == new_id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{new_id} in {page}"));
    assert_eq!(listed["retry_of"], "rt-1", "{listed}");
    // the old job's timeline shows the retry, by its client
    let (_, audit) = api.get("/v1/audit?job_id=rt-1&action=JobRetried").await;
    let rows = audit["items"].as_array().expect("items");
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(rows[0]["client_id"], "billing");
    assert_eq!(rows[0]["status"], "retried");

    // a repeat, by the client or an operator, answers the same new job
    // (also now that it completed), and makes nothing new
    let before = app.last_seq().await;
    let again = api
        .post("/v1/jobs/rt-1/retry", BILLING_TOKEN, json!({}))
        .await;
    assert_eq!((again.status, &again.body), (202, &retried.body));
    let by_ops = api
        .post("/v1/jobs/rt-1/retry", OPERATOR_TOKEN, json!({}))
        .await;
    assert_eq!((by_ops.status, &by_ops.body), (202, &retried.body));
    // with an Idempotency-Key too; a bad key is refused by name
    let json_body = ("content-type", "application/json");
    let keyed = api
        .send(
            "POST",
            "/v1/jobs/rt-1/retry",
            Some(BILLING_TOKEN),
            Some(b"{}".to_vec()),
            &[json_body, ("idempotency-key", "rt-1-retry")],
        )
        .await;
    assert_eq!((keyed.status, &keyed.body), (202, &retried.body));
    let bad_key = api
        .send(
            "POST",
            "/v1/jobs/rt-1/retry",
            Some(BILLING_TOKEN),
            Some(b"{}".to_vec()),
            &[json_body, ("idempotency-key", "a:b")],
        )
        .await;
    assert_eq!(bad_key.status, 400, "{}", bad_key.body);
    assert_eq!(bad_key.body["error"]["param"], "Idempotency-Key");
    assert_eq!(
        app.last_seq().await,
        before,
        "a repeated retry appends nothing"
    );

    // a completed job is not retried: 409 naming its status
    let done = api
        .post(
            &format!("/v1/jobs/{new_id}/retry"),
            BILLING_TOKEN,
            json!({}),
        )
        .await;
    assert_eq!(done.status, 409, "{}", done.body);
    assert_eq!(done.body["error"]["code"], "rejected");
    let message = done.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("completed"), "{message}");
    // nor a pending one (this one waits for its approval)
    let mut waiting = job("rt-2");
    waiting["workflow_key"] = json!("report.daily");
    assert_eq!(
        api.post("/v1/jobs", BILLING_TOKEN, waiting).await.status,
        202
    );
    let pending = api
        .post("/v1/jobs/rt-2/retry", BILLING_TOKEN, json!({}))
        .await;
    assert_eq!(pending.status, 409, "{}", pending.body);
    assert!(
        pending.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pending")),
        "{}",
        pending.body
    );
    // a cancelled job is retried, but not while its workflow is disabled
    assert_eq!(
        api.post("/v1/jobs/rt-2/cancel", BILLING_TOKEN, json!({}))
            .await
            .status,
        200
    );
    let off = api
        .post(
            "/v1/workflows/report.daily/disable",
            OPERATOR_TOKEN,
            json!({"reason": "maintenance"}),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.body);
    let refused = api
        .post("/v1/jobs/rt-2/retry", BILLING_TOKEN, json!({}))
        .await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.body["error"]["param"], "workflow_key");
    let (_, old) = api.get("/v1/jobs/rt-2").await;
    assert_eq!(
        old["retried_by"],
        Value::Null,
        "a refused retry records nothing"
    );
    // a body field the retry does not take is refused by name
    let bad = api
        .post(
            "/v1/jobs/rt-1/retry",
            BILLING_TOKEN,
            json!({"client_id": "ops"}),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.body["error"]["param"], "client_id");

    // a rebuild from the log gives the same rows, the links included (the
    // old job's JobRetried and the new job's submission in one batch)
    h.stop().await;
    api.caught_up(&app.log).await;
    let live = api.snapshot("workflows_executions", "id").await;
    assert!(
        live.iter()
            .any(|r| r["execution_id"] == "rt-1" && r["retried_by"] == new_id.as_str()),
        "{live:?}"
    );
    flowledger::projections::rebuild::rebuild(
        &api.pool,
        &app.log,
        flowledger::projections::ReadModel::Executions,
    )
    .await
    .expect("rebuild executions");
    assert_eq!(api.snapshot("workflows_executions", "id").await, live);
}

/// Cancels `job_id` over NATS as its client.
async fn cancel_over_nats(app: &TestApp, job_id: &str) {
    let r = app
        .send("job.cancel", json!({"job_id": job_id, "reason": "stop"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn a_retry_cut_short_between_its_two_commits_is_completed_by_repeating_it_over_nats() {
    use flowledger::bus::ids;
    use flowledger::commands::job::{JobCommand, RetryJob};
    use flowledger::events::envelope::{Actor, CommandMeta};
    let app = spawn_app().await;
    assert_eq!(app.submit("nr-1", "nr-1-submit").await["ok"], true);
    cancel_over_nats(&app, "nr-1").await;

    // the first of the two commits only, as a crash would leave it
    let new_id = ids::retry_job_id();
    let meta = CommandMeta::originating(
        ids::job_retry("nr-1"),
        Actor {
            client_id: "billing".into(),
            user_id: None,
        },
        "crashed-retry".into(),
    );
    app.bus
        .job(
            "nr-1",
            JobCommand::Retry(RetryJob {
                retry_job_id: new_id.clone(),
            }),
            &meta,
        )
        .await
        .expect("JobRetried is recorded");
    assert_eq!(
        app.bus.load_job(&new_id).await.expect("read").version,
        0,
        "no new job yet"
    );

    // the retry asked again over NATS: it submits the new job
    let r = app
        .send_as(Who::Billing, "job.retry", json!({"job_id": "nr-1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["aggregate_id"], new_id.as_str(), "{r}");
    assert_eq!(r["events"][0]["event_type"], "JobSubmitted", "{r}");
    assert_eq!(r["duplicate"], false, "{r}");
    let new = app.bus.load_job(&new_id).await.expect("read").state;
    assert_eq!(new.retry_of.as_deref(), Some("nr-1"));
    assert_eq!(new.client_id, "billing");
    assert_eq!(new.workflow_key, "invoice.extract");
    let old = app.bus.load_job("nr-1").await.expect("read").state;
    assert_eq!(old.retried_by.as_deref(), Some(new_id.as_str()));
    // one JobRetried on the old job, one JobSubmitted on the new one
    assert_eq!(app.messages_on("flow.ev.job.nr-1").await, 3);
    assert_eq!(app.messages_on(&format!("flow.ev.job.{new_id}")).await, 1);

    // a repeat answers the same submission
    let again = app
        .send_as(Who::Billing, "job.retry", json!({"job_id": "nr-1"}))
        .await;
    assert_eq!(again["aggregate_id"], new_id.as_str(), "{again}");
    assert_eq!(again["stream_seq"], r["stream_seq"], "{again}");
    assert_eq!(again["duplicate"], true, "{again}");

    // the new job is pending: not retried (the refusal names its status)
    let pending = app
        .send_as(Who::Billing, "job.retry", json!({"job_id": new_id}))
        .await;
    assert_eq!(pending["error"]["code"], "rejected", "{pending}");
    assert!(
        pending["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pending")),
        "{pending}"
    );
    // once it ended unsuccessfully, retrying it goes on with the chain,
    // while the first job still answers its own retry
    cancel_over_nats(&app, &new_id).await;
    let third = app
        .send_as(Who::Billing, "job.retry", json!({"job_id": new_id}))
        .await;
    let third_id = third["aggregate_id"].as_str().expect("the third job's id");
    assert!(third_id != new_id && third_id != "nr-1", "{third}");
    assert_eq!(
        app.bus
            .load_job(third_id)
            .await
            .expect("read")
            .state
            .retry_of
            .as_deref(),
        Some(new_id.as_str())
    );
    let first_again = app
        .send_as(Who::Billing, "job.retry", json!({"job_id": "nr-1"}))
        .await;
    assert_eq!(
        first_again["aggregate_id"],
        new_id.as_str(),
        "{first_again}"
    );

    // a handler may not send it; an unknown job is not found
    let handler = app
        .send_as(Who::Handler, "job.retry", json!({"job_id": "nr-1"}))
        .await;
    assert_eq!(handler["error"]["code"], "forbidden", "{handler}");
    let missing = app
        .send_as(Who::Billing, "job.retry", json!({"job_id": "nr-404"}))
        .await;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
}
