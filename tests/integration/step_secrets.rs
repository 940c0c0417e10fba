//! Secrets in job steps (issue 13, item 5): a registry step's headers name
//! secrets, the handler reads them through the secret access service (as
//! `flowledger-handler`, role `handler`, on behalf of the job, for the
//! step) at each attempt, and the value goes only into the outgoing
//! request. Against a real OpenBao and scripted solver and n8n peers.

use std::time::Duration;

use flowledger::commands::job::events::StepStatus;
use flowledger::commands::job::JobStatus;
use flowledger::commands::secret_access::policy::{PolicyRule, SecretPolicy};
use flowledger::secrets::service::{SecretRules, SecretService};
use flowledger::secrets::vault::{VaultAuth, VaultClient, VaultConfig};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::openbao::OpenBao;
use crate::peers::{self, Peer};

const OCR_KEY: &str = "ocr-key-planted-7f3a9c";
const N8N_TOKEN: &str = "n8n-token-planted-91c2d4";
const STRIPE_KEY: &str = "sk-live-planted-5e8b10";

/// OpenBao holding the steps' secrets, and a token for flowledger that
/// may read all of them (flowledger's own policy decides).
async fn vault() -> (OpenBao, String) {
    let bao = OpenBao::start().await;
    bao.put_secret("external_apis/ocr", json!({"api_key": OCR_KEY}))
        .await;
    bao.put_secret("external_apis/n8n", json!({"token": N8N_TOKEN}))
        .await;
    bao.put_secret("billing/stripe", json!({"api_key": STRIPE_KEY}))
        .await;
    bao.write_policy(
        "flowledger",
        r#"path "secret/data/*" { capabilities = ["read"] }"#,
    )
    .await;
    let token = bao.token_with_policies(&["flowledger"]).await;
    (bao, token)
}

/// The handler may read external_apis/*, nothing else.
async fn secrets(bao: &OpenBao, token: &str) -> std::sync::Arc<SecretService> {
    let vault = VaultClient::connect(VaultConfig {
        addr: bao.addr(),
        auth: VaultAuth::Token(token.into()),
        timeout: Duration::from_secs(2),
    })
    .await
    .expect("connect to OpenBao");
    std::sync::Arc::new(SecretService::new(
        vault,
        SecretPolicy::new(vec![PolicyRule {
            name: "handler-steps".into(),
            clients: vec!["flowledger-handler".into()],
            roles: vec![],
            paths: vec!["secret/data/external_apis/*".into()],
        }])
        .expect("valid rules"),
        SecretRules {
            cache_ttl: Duration::from_secs(300),
            max_staleness: Duration::from_secs(3600),
            retry_attempts: 2,
            retry_base: Duration::from_millis(20),
        },
    ))
}

async fn handler(
    app: &TestApp,
    registry: Value,
    secrets: Option<std::sync::Arc<SecretService>>,
) -> HandlerSide {
    start_handler_with_secrets(
        app,
        parse_registry(registry),
        test_handler_config(),
        fresh_database().await,
        secrets,
    )
    .await
}

/// The secret access events in the log: (event type, data, actor).
async fn accesses(app: &TestApp) -> Vec<(String, Value, String)> {
    log_events(app)
        .await
        .into_iter()
        .filter(|r| r.aggregate_type == "secret_access")
        .map(|r| (r.event_type, r.data, r.actor.client_id))
        .collect()
}

/// Whether any stored message of the log holds `needle`.
async fn log_holds(app: &TestApp, needle: &str) -> bool {
    for seq in 1..=app.last_seq().await {
        if let Some(m) = app.log.get(seq).await.expect("read the log") {
            if String::from_utf8_lossy(&m.payload).contains(needle) {
                return true;
            }
        }
    }
    false
}

fn step_result(
    v: &flowledger::handlers::view::JobView,
    step: &str,
    attempt: u32,
) -> flowledger::handlers::view::AttemptResult {
    v.steps[step].results[&attempt].clone()
}

#[tokio::test]
async fn step_headers_carry_secrets_read_for_the_job_and_nowhere_else() {
    let app = spawn_app().await;
    let (bao, token) = vault().await;
    let peer = Peer::start().await;
    // the solver fails once: its retry reads the secret again
    let ocr = peer.script(
        "/ocr",
        vec![peers::status(5, 503), peers::ok(5, json!({"text": "ok"}))],
    );
    // an n8n step answering at once goes through the same request
    let hook = peer.script("/hook", vec![peers::ok(5, json!({"done": true}))]);
    let registry = one_workflow(
        json!([
            {"name": "ocr", "kind": "solver", "url": ocr, "timeout_ms": 5000, "max_attempts": 2,
             "headers": {"Authorization": "Bearer {secret/data/external_apis/ocr#api_key}"}},
            {"name": "hook", "kind": "n8n", "url": hook, "timeout_ms": 5000, "max_attempts": 1,
             "headers": {"X-N8N-Token": "{secret/data/external_apis/n8n#token}",
                         "X-Both": "{secret/data/external_apis/ocr#api_key}:{{{secret/data/external_apis/n8n#token}}}"}},
        ]),
        json!({}),
    );
    let h = handler(&app, registry, Some(secrets(&bao, &token).await)).await;
    assert_eq!(h.submit("sec-1", "w", json!({})).await["ok"], true);
    let v = h.settled("sec-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);

    // the peers got the values in their headers, and only there
    let got = peer.received("/ocr");
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.headers["authorization"], format!("Bearer {OCR_KEY}"));
        assert!(!String::from_utf8_lossy(&r.raw).contains(OCR_KEY));
    }
    let got = peer.received("/hook");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-n8n-token"], N8N_TOKEN);
    assert_eq!(
        got[0].headers["x-both"],
        format!("{OCR_KEY}:{{{N8N_TOKEN}}}")
    );
    assert_eq!(got[0].headers["idempotency-key"], "sec-1:hook:1");
    assert!(!String::from_utf8_lossy(&got[0].raw).contains(N8N_TOKEN));

    // every read is recorded, for the job and the step, as the handler
    let a = accesses(&app).await;
    let granted: Vec<_> = a
        .iter()
        .filter(|(t, _, _)| t == "SecretAccessGranted")
        .collect();
    assert_eq!(a.len(), granted.len(), "{a:?}");
    for (_, data, actor) in &granted {
        assert_eq!(actor, "flowledger-handler");
        assert_eq!(data["job_id"], "sec-1");
        assert_eq!(data["rule"], "handler-steps");
    }
    let reads = |step: &str, path: &str| {
        granted
            .iter()
            .filter(|(_, d, _)| d["step"] == step && d["path"] == path)
            .count()
    };
    // two attempts of ocr, one read each; hook's two secrets, one read
    // each though X-Both names them again
    assert_eq!(reads("ocr", "secret/data/external_apis/ocr"), 2);
    assert_eq!(reads("hook", "secret/data/external_apis/n8n"), 1);
    assert_eq!(reads("hook", "secret/data/external_apis/ocr"), 1);
    assert_eq!(granted.len(), 4);
    let purpose = granted
        .iter()
        .find(|(_, d, _)| d["step"] == "ocr")
        .map(|(_, d, _)| d["purpose"].clone());
    assert_eq!(purpose, Some(json!("header authorization of step ocr")));

    // no value in any stored event, nor in the job as read
    for needle in [OCR_KEY, N8N_TOKEN] {
        assert!(!log_holds(&app, needle).await, "{needle} is in the log");
        assert!(!format!("{v:?}").contains(needle));
    }
}

#[tokio::test]
async fn a_denied_or_missing_secret_fails_the_attempt_unsent() {
    let app = spawn_app().await;
    let (bao, token) = vault().await;
    let peer = Peer::start().await;
    let pay = peer.script("/pay", vec![peers::ok(5, json!({}))]);
    let ocr = peer.script("/ocr", vec![peers::ok(5, json!({}))]);
    let registry = one_workflow(
        json!([
            // flowledger's policy does not let the handler read billing/*
            {"name": "pay", "kind": "solver", "url": pay, "timeout_ms": 5000, "max_attempts": 3,
             "headers": {"Authorization": "Bearer {secret/data/billing/stripe#api_key}"}},
            // allowed, but the secret has no such field
            {"name": "ocr", "kind": "n8n", "url": ocr, "timeout_ms": 5000, "max_attempts": 3,
             "headers": {"X-Key": "{secret/data/external_apis/ocr#nope}"}},
        ]),
        // both steps run to their end before the job fails
        json!({"success": "any"}),
    );
    let h = handler(&app, registry, Some(secrets(&bao, &token).await)).await;
    h.submit("deny-1", "w", json!({})).await;
    let v = h.settled("deny-1").await;
    assert_eq!(v.status, JobStatus::Failed);

    // neither peer was called; each step failed once, not retried
    assert!(peer.received("/pay").is_empty());
    assert!(peer.received("/ocr").is_empty());
    let pay_result = step_result(&v, "pay", 1);
    assert_eq!(pay_result.status, StepStatus::Failed);
    assert_eq!(pay_result.error_code.as_deref(), Some("secret_denied"));
    let message = pay_result.error_message.unwrap_or_default();
    assert!(
        message.contains("secret/data/billing/stripe#api_key"),
        "{message}"
    );
    assert_eq!(v.steps["pay"].started, 1);
    let ocr_result = step_result(&v, "ocr", 1);
    assert_eq!(ocr_result.error_code.as_deref(), Some("secret_not_found"));
    assert_eq!(v.steps["ocr"].started, 1);

    // the refusals are recorded for the job
    let a = accesses(&app).await;
    let denied: Vec<_> = a
        .iter()
        .filter(|(t, _, _)| t == "SecretAccessDenied")
        .collect();
    assert_eq!(denied.len(), 1, "{a:?}");
    assert_eq!(denied[0].1["job_id"], "deny-1");
    assert_eq!(denied[0].1["step"], "pay");
    assert_eq!(denied[0].1["decided_by"], "policy");
    assert_eq!(denied[0].2, "flowledger-handler");
    let failed: Vec<_> = a
        .iter()
        .filter(|(t, _, _)| t == "SecretAccessFailed")
        .collect();
    assert_eq!(failed.len(), 1, "{a:?}");
    assert_eq!(failed[0].1["step"], "ocr");
    assert_eq!(failed[0].1["code"], "not_found");
    assert!(!log_holds(&app, STRIPE_KEY).await);
    assert!(!log_holds(&app, OCR_KEY).await);
}

#[tokio::test]
async fn without_secrets_configured_a_step_that_reads_one_stops_the_handler_at_start() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/ocr", vec![peers::ok(5, json!({}))]);
    let registry = one_workflow(
        json!([{"name": "ocr", "kind": "solver", "url": url, "timeout_ms": 5000, "max_attempts": 2,
                "headers": {"Authorization": "Bearer {secret/data/external_apis/ocr#api_key}"}}]),
        json!({}),
    );
    let mut s = settings(&app, parse_registry(registry));
    s.database = Some(flowledger::app::DatabaseSettings {
        url: fresh_database().await,
        max_connections: 4,
        projections: false,
        handler: Some(test_handler_config()),
        http: None,
    });
    let e = match flowledger::app::Application::build(s).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("the handler started without [secrets] for a step that reads one"),
    };
    assert!(e.contains("\"ocr\"") && e.contains("[secrets]"), "{e}");
    assert!(peer.received("/ocr").is_empty());
    assert!(accesses(&app).await.is_empty());
}
