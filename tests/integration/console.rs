//! The web console (`/console`) and the live job stream it reads
//! (`GET /v1/jobs/{id}/events`), on the whole service in one process (HTTP
//! API, projections, job handler) against real nats-server and PostgreSQL,
//! with step peers. The console itself runs in headless Chromium
//! (scripts/console-check/check.mjs, playwright-core from
//! scripts/install-deps.sh).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

/// A registry of `w` (one quick step), `gated` (the same after an
/// approval), `stuck` (a step that never answers within the test) and
/// `flaky` (its peer fails the first call and answers the next).
async fn console_registry(peer: &Peer) -> std::sync::Arc<flowledger::commands::registry::Registry> {
    let quick = peer.script(
        "/quick",
        vec![peers::ok(300, json!({"total": "planted-output-99"}))],
    );
    let stuck = peer.script("/stuck", vec![peers::hang()]);
    let flaky = peer.script(
        "/flaky",
        vec![peers::status(5, 503), peers::ok(5, json!({"ok": true}))],
    );
    parse_registry(json!({"version": 1, "workflows": {
        "w": {"steps": [solver("quick", &quick, 5000, 1)]},
        "gated": {"steps": [solver("quick", &quick, 5000, 1)],
                  "requires_approval": true, "approval_timeout_seconds": 3600},
        "stuck": {"steps": [solver("stuck", &stuck, 120_000, 1)]},
        "flaky": {"steps": [solver("flaky", &flaky, 5000, 1)]},
    }}))
}

async fn submit(api: &ReadSide, job_id: &str, workflow: &str, inputs: Value) {
    let a = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": job_id, "workflow_key": workflow, "inputs": inputs}),
        )
        .await;
    assert_eq!(a.status, 202, "submit {job_id}: {}", a.body);
}

pub(crate) async fn open_stream(api: &ReadSide, job_id: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}/v1/jobs/{job_id}/events", api.http))
        .bearer_auth(token)
        .send()
        .await
        .expect("the live stream answers")
}

/// Reads a live stream to its `end` event: the events before it (name,
/// data) and the end's data. Fails if it does not end within 30 s.
pub(crate) async fn read_to_end(
    mut res: reqwest::Response,
) -> (Vec<(String, Value)>, Value, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut buf, mut raw, mut events) = (String::new(), String::new(), Vec::new());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, res.chunk())
            .await
            .expect("the stream ends within 30 s")
            .expect("the stream reads");
        let Some(chunk) = chunk else {
            panic!("the stream closed without an end event; got {raw}")
        };
        let text = String::from_utf8_lossy(&chunk).to_string();
        raw.push_str(&text);
        buf.push_str(&text);
        while let Some(cut) = buf.find("\n\n") {
            let frame = buf[..cut].to_string();
            buf.drain(..cut + 2);
            let (mut name, mut data) = (None, String::new());
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            let Some(name) = name else { continue };
            let data: Value = serde_json::from_str(&data).expect("event data is JSON");
            if name == "end" {
                return (events, data, raw);
            }
            events.push((name, data));
        }
    }
}

#[tokio::test]
async fn a_live_stream_shows_a_jobs_events_to_its_end_and_only_to_who_may_read_it() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let api = spawn_service(&app, console_registry(&peer).await, test_handler_config()).await;
    submit(&api, "live-1", "w", json!({"card": "planted-card-4111"})).await;

    // opened while the job runs: its events from the first, then the end
    let res = open_stream(&api, "live-1", BILLING_TOKEN).await;
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let (events, end, raw) = read_to_end(res).await;
    let types: Vec<&str> = events
        .iter()
        .map(|(_, d)| d["event_type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types.first(), Some(&"JobSubmitted"), "{types:?}");
    for t in ["JobStarted", "StepAttemptStarted", "StepResultRecorded"] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    assert_eq!(types.last(), Some(&"JobCompleted"), "{types:?}");
    assert_eq!(
        end,
        json!({"reason": "final", "event_type": "JobCompleted"})
    );
    let step = events
        .iter()
        .find(|(_, d)| d["event_type"] == "StepResultRecorded")
        .map(|(_, d)| d.clone())
        .unwrap();
    assert_eq!(
        (step["step"].clone(), step["status"].clone()),
        (json!("quick"), json!("succeeded"))
    );
    // in stream order, each named by its place in the log
    let seqs: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    assert!(events.iter().all(|(name, _)| name == "job_event"));
    // what the client sent and the peer answered is not in the stream
    assert!(
        !raw.contains("planted-card-4111") && !raw.contains("planted-output-99"),
        "{raw}"
    );

    // after the end, a new stream replays the whole job and ends at once
    let (again, end, _) = read_to_end(open_stream(&api, "live-1", OPERATOR_TOKEN).await).await;
    assert_eq!(again.len(), events.len());
    assert_eq!(end["reason"], "final");
    // the auditor reads it too; another client, like an unknown job, gets 404
    assert_eq!(
        open_stream(&api, "live-1", AUDITOR_TOKEN).await.status(),
        200
    );
    for (job, token) in [("live-1", OTHER_TOKEN), ("nope", BILLING_TOKEN)] {
        let r = open_stream(&api, job, token).await;
        assert_eq!(r.status(), 404, "{job} as {token}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
    let bad = open_stream(&api, "bad id!", BILLING_TOKEN).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(open_stream(&api, "live-1", "wrong").await.status(), 401);
}

#[tokio::test]
async fn a_client_holds_a_bounded_number_of_live_streams() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let api = spawn_service(&app, console_registry(&peer).await, test_handler_config()).await;
    submit(&api, "live-stuck", "stuck", json!({})).await;
    let max = flowledger::config::ConsoleSection::default().streams_per_client;
    let mut open = Vec::new();
    for i in 0..max {
        let r = open_stream(&api, "live-stuck", BILLING_TOKEN).await;
        assert_eq!(r.status(), 200, "stream {i}");
        open.push(r);
    }
    let refused = open_stream(&api, "live-stuck", BILLING_TOKEN).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("live streams"),
        "{body}"
    );
    // another client has its own
    assert_eq!(
        open_stream(&api, "live-stuck", OPERATOR_TOKEN)
            .await
            .status(),
        200
    );
    // a viewer that goes away gives its stream back
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = open_stream(&api, "live-stuck", BILLING_TOKEN).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            Instant::now() < deadline,
            "the closed stream was not given back within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The console's assets: served without a token, with a CSP that allows
/// only this origin's script.
#[tokio::test]
async fn the_console_page_is_served_with_its_security_headers() {
    let app = spawn_app().await;
    let api = spawn_read_side(&app, false).await;
    let a = api.call("GET", "/console", None, None).await;
    assert_eq!(a.status, 200);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = a.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let js = api.call("GET", "/console/app.js", None, None).await;
    assert_eq!(js.status, 200);
    assert!(js.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let me = api.call("GET", "/v1/me", Some(OPERATOR_TOKEN), None).await;
    assert_eq!(me.body, json!({"client_id": "ops", "role": "operator"}));
    let me = api.call("GET", "/v1/me", Some(BILLING_TOKEN), None).await;
    assert_eq!(me.body, json!({"client_id": "billing", "role": "client"}));
}

/// The console in headless Chromium, as an operator uses it: log in, see
/// a job appear and complete with its timeline, approve a job waiting for
/// an approval and watch it finish; then the log says the console did it.
#[tokio::test]
async fn an_operator_uses_the_console_in_headless_chromium() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let api = spawn_service(&app, console_registry(&peer).await, test_handler_config()).await;
    let node = std::env::var("FLOWLEDGER_NODE").unwrap_or_else(|_| "node".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/console-check/check.mjs"
    );
    let mut cmd = tokio::process::Command::new(&node);
    cmd.arg(script)
        .env("CONSOLE_URL", &api.http)
        .env("OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("CLIENT_TOKEN", BILLING_TOKEN)
        .env("WORKFLOW", "w")
        .env("GATED_WORKFLOW", "gated")
        .env("FLAKY_WORKFLOW", "flaky")
        .env("RUN", "t")
        .kill_on_drop(true);
    for var in ["CHROMIUM", "PLAYWRIGHT_DIR"] {
        if let Ok(v) = std::env::var(format!("FLOWLEDGER_{var}")) {
            cmd.env(var, v);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the console check ends within 180 s")
        .unwrap_or_else(|e| {
            panic!("cannot run {node} (scripts/install-deps.sh installs node, chromium and playwright-core): {e}")
        });
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "console check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("console-check: passed"), "{stdout}");
    eprintln!("{}", stdout.trim());

    // what the browser did is in the read models, as the operator's
    let (status, approval) = api.get("/v1/approvals/ui-gated-t").await;
    assert_eq!(status, 200, "{approval}");
    assert_eq!(approval["status"], "approved");
    assert_eq!(approval["decided_by"], "ops");
    assert_eq!(approval["decision_reason"], "checked in the console");
    for job in ["ui-t", "ui-gated-t"] {
        let (_, j) = api.get(&format!("/v1/jobs/{job}")).await;
        assert_eq!(j["status"], "completed", "{job}: {j}");
    }
    // the Retry button: the failed job linked to a new one that completed,
    // retried by the operator
    let (_, old) = api.get("/v1/jobs/ui-flaky-t").await;
    assert_eq!(old["status"], "failed", "{old}");
    let new = old["retried_by"]
        .as_str()
        .expect("the failed job was retried");
    assert!(stdout.contains(&format!("retried as {new}")), "{stdout}");
    let (_, retry) = api.get(&format!("/v1/jobs/{new}")).await;
    assert_eq!(
        (retry["status"].as_str(), retry["retry_of"].as_str()),
        (Some("completed"), Some("ui-flaky-t")),
        "{retry}"
    );
    let (_, audit) = api
        .get("/v1/audit?job_id=ui-flaky-t&action=JobRetried")
        .await;
    assert_eq!(audit["items"][0]["client_id"], "ops", "{audit}");
}
