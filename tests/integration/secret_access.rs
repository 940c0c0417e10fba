//! Secret access (issue 13) end to end against a real OpenBao 2.7.2 with a
//! file audit device: flowledger's policy and Vault's, the cache (checked
//! against OpenBao's audit log), last-known-good while OpenBao is down,
//! rotation by invalidation, the NATS door, no value without its stored
//! access event, and a planted value found nowhere it should not be.

use std::time::Duration;

use flowledger::commands::secret_access::policy::{PolicyRule, SecretPolicy};
use flowledger::secrets::service::{SecretRules, SecretService};
use flowledger::secrets::vault::{VaultAuth, VaultClient, VaultConfig};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::helpers::*;
use crate::openbao::OpenBao;

/// flowledger's own token in Vault may read billing/* and shared/*, not ops/*.
const FLOWLEDGER_VAULT_POLICY: &str = r#"
path "secret/data/billing/*" { capabilities = ["read"] }
path "secret/data/shared/*" { capabilities = ["read"] }
"#;

const STRIPE: &str = "secret/data/billing/stripe";

fn rule(name: &str, clients: &[&str], roles: &[&str], paths: &[&str]) -> PolicyRule {
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
    PolicyRule {
        name: name.into(),
        clients: v(clients),
        roles: v(roles),
        paths: v(paths),
    }
}

/// billing may read billing/*; operators anything under secret/data (Vault
/// then refuses ops/*).
fn rules() -> Vec<PolicyRule> {
    vec![
        rule(
            "billing-keys",
            &["billing"],
            &[],
            &["secret/data/billing/*"],
        ),
        rule("operators", &[], &["operator"], &["secret/data/**"]),
    ]
}

/// OpenBao with billing/stripe (v1), ops/root, and flowledger's token.
pub(crate) async fn vault_with_secrets(stripe_key: &str) -> (OpenBao, String) {
    let bao = OpenBao::start().await;
    bao.put_secret(
        "billing/stripe",
        json!({"api_key": stripe_key, "account": "acct-1"}),
    )
    .await;
    bao.put_secret("ops/root", json!({"password": "ops-root-pw"}))
        .await;
    bao.write_policy("flowledger", FLOWLEDGER_VAULT_POLICY)
        .await;
    let token = bao.token_with_policies(&["flowledger"]).await;
    (bao, token)
}

pub(crate) async fn secrets_settings(
    bao: &OpenBao,
    token: &str,
    ttl: u64,
    stale: u64,
) -> Arc<SecretService> {
    let vault = VaultClient::connect(VaultConfig {
        addr: bao.addr(),
        auth: VaultAuth::Token(token.into()),
        timeout: Duration::from_secs(2),
    })
    .await
    .expect("connect to OpenBao");
    Arc::new(SecretService::new(
        vault,
        SecretPolicy::new(rules()).expect("valid rules"),
        SecretRules {
            cache_ttl: Duration::from_secs(ttl),
            max_staleness: Duration::from_secs(stale),
            retry_attempts: 3,
            retry_base: Duration::from_millis(50),
        },
    ))
}

pub(crate) async fn api_with_secrets(
    app: &TestApp,
    s: Arc<SecretService>,
    runners: bool,
) -> ReadSide {
    spawn_api_with(app, runners, registry(), fresh_database().await, Some(s)).await
}

/// The secret-access events in the log, oldest first.
async fn accesses(app: &TestApp) -> Vec<(String, Value, String)> {
    log_events(app)
        .await
        .into_iter()
        .filter(|r| r.aggregate_type == "secret_access")
        .map(|r| {
            (
                r.event_type.clone(),
                r.data.clone(),
                r.actor.client_id.clone(),
            )
        })
        .collect()
}

/// How often OpenBao's audit log shows a read of `path`.
fn vault_reads(bao: &OpenBao, path: &str) -> usize {
    bao.audit_lines()
        .iter()
        .filter(|l| l["type"] == "request" && l["request"]["operation"] == "read")
        .filter(|l| l["request"]["path"] == path)
        .count()
}

async fn read(api: &ReadSide, token: &str, body: Value) -> Answer {
    api.post("/v1/secrets/read", token, body).await
}

#[tokio::test]
async fn policy_grants_and_denies_and_every_read_is_an_event_without_the_value() {
    let app = spawn_app().await;
    let (bao, token) = vault_with_secrets("sk-live-granted-1").await;
    let api = api_with_secrets(&app, secrets_settings(&bao, &token, 300, 3600).await, false).await;

    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": STRIPE, "field": "api_key", "purpose": "charge a card"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["value"], "sk-live-granted-1");
    assert_eq!(a.body["source"], "vault");
    assert_eq!(a.body["kv_version"], 1);
    assert_eq!(a.headers["cache-control"], "no-store");
    // the whole secret
    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": STRIPE, "purpose": "inspect"}),
    )
    .await;
    assert_eq!(a.body["value"]["account"], "acct-1", "{}", a.body);

    // flowledger's policy: another client, another path
    let a = read(
        &api,
        OTHER_TOKEN,
        json!({"path": STRIPE, "purpose": "curious"}),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.to_string().contains("no rule"), "{}", a.body);
    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": "secret/data/ops/root", "purpose": "x"}),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);

    // flowledger allows an operator; Vault's policy on flowledger's token does not
    let a = read(
        &api,
        OPERATOR_TOKEN,
        json!({"path": "secret/data/ops/root", "purpose": "audit"}),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(
        a.body.to_string().contains("permission denied"),
        "Vault's reason: {}",
        a.body
    );
    assert!(!a.body.to_string().contains("ops-root-pw"));

    // bad input is named, and not recorded
    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": "secret/billing/stripe", "purpose": "x"}),
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"]["param"].as_str()),
        (400, Some("path")),
        "{}",
        a.body
    );
    let a = read(&api, BILLING_TOKEN, json!({"path": STRIPE})).await;
    assert_eq!(a.status, 400, "{}", a.body);
    // an auditor writes nothing to the log, a secret read included
    let a = read(
        &api,
        AUDITOR_TOKEN,
        json!({"path": STRIPE, "purpose": "look"}),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": STRIPE, "purpose": "x", "actor": "ops"}),
    )
    .await;
    assert_eq!(a.status, 400, "a body never chooses its actor: {}", a.body);

    let events = accesses(&app).await;
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|(t, _, c)| (t.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("SecretAccessGranted", "billing"),
            ("SecretAccessGranted", "billing"),
            ("SecretAccessDenied", "other"),
            ("SecretAccessDenied", "billing"),
            ("SecretAccessDenied", "ops"),
        ]
    );
    let (_, granted, _) = &events[0];
    assert_eq!(granted["rule"], "billing-keys");
    assert_eq!(granted["purpose"], "charge a card");
    assert_eq!(granted["field"], "api_key");
    assert_eq!(granted["source"], "vault");
    assert_eq!(events[2].1["decided_by"], "policy");
    assert_eq!(events[2].1["rule"], Value::Null);
    let (_, by_vault, _) = &events[4];
    assert_eq!(by_vault["decided_by"], "vault");
    assert_eq!(by_vault["vault_error"]["kind"], "refused", "{by_vault}");
    assert_eq!(by_vault["vault_error"]["status"], 403, "{by_vault}");
    assert_eq!(by_vault["rule"], "operators");
    assert!(
        by_vault["reason"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{by_vault}"
    );
    for (_, data, _) in &events {
        let text = data.to_string();
        assert!(
            !text.contains("sk-live-granted-1") && !text.contains("acct-1"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_cache_hit_asks_vault_nothing_but_is_recorded_and_invalidation_picks_up_a_new_version() {
    let app = spawn_app().await;
    let (bao, token) = vault_with_secrets("sk-v1").await;
    let api = api_with_secrets(&app, secrets_settings(&bao, &token, 300, 3600).await, false).await;
    let body = json!({"path": STRIPE, "field": "api_key", "purpose": "charge"});

    let first = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(
        (first.body["source"].as_str(), first.body["value"].as_str()),
        (Some("vault"), Some("sk-v1"))
    );
    let vault_reads_before = vault_reads(&bao, STRIPE);
    assert_eq!(vault_reads_before, 1, "{:?}", bao.audited_requests());
    for _ in 0..3 {
        let a = read(&api, BILLING_TOKEN, body.clone()).await;
        assert_eq!(
            (a.body["source"].as_str(), a.body["value"].as_str()),
            (Some("cache"), Some("sk-v1")),
            "{}",
            a.body
        );
    }
    assert_eq!(
        vault_reads(&bao, STRIPE),
        vault_reads_before,
        "a cache hit asked Vault"
    );
    let sources: Vec<Value> = accesses(&app)
        .await
        .into_iter()
        .map(|(_, d, _)| d["source"].clone())
        .collect();
    assert_eq!(
        sources,
        vec![
            json!("vault"),
            json!("cache"),
            json!("cache"),
            json!("cache")
        ]
    );

    // rotation: the cache keeps v1 until an operator invalidates the path
    assert_eq!(
        bao.put_secret("billing/stripe", json!({"api_key": "sk-v2"}))
            .await,
        2
    );
    let a = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(
        (a.body["value"].as_str(), a.body["kv_version"].as_u64()),
        (Some("sk-v1"), Some(1))
    );
    let refused = api
        .post(
            "/v1/secrets/invalidate",
            BILLING_TOKEN,
            json!({"path": STRIPE, "reason": "rotated"}),
        )
        .await;
    assert_eq!(
        refused.status, 403,
        "only operators invalidate: {}",
        refused.body
    );
    let inv = api
        .post(
            "/v1/secrets/invalidate",
            OPERATOR_TOKEN,
            json!({"path": STRIPE, "reason": "rotated the key"}),
        )
        .await;
    assert_eq!(inv.status, 200, "{}", inv.body);
    let a = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(
        (
            a.body["value"].as_str(),
            a.body["kv_version"].as_u64(),
            a.body["source"].as_str()
        ),
        (Some("sk-v2"), Some(2), Some("vault")),
        "{}",
        a.body
    );
    // an older version by number, from Vault, then from the cache
    let v1 = json!({"path": STRIPE, "field": "api_key", "version": 1, "purpose": "compare"});
    let a = read(&api, BILLING_TOKEN, v1.clone()).await;
    assert_eq!(
        (a.body["value"].as_str(), a.body["source"].as_str()),
        (Some("sk-v1"), Some("vault")),
        "{}",
        a.body
    );
    let a = read(&api, BILLING_TOKEN, v1).await;
    assert_eq!(a.body["source"], "cache", "{}", a.body);
    // no such field or version: not_found, recorded
    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": STRIPE, "field": "nope", "purpose": "x"}),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    let a = read(
        &api,
        BILLING_TOKEN,
        json!({"path": STRIPE, "version": 9, "purpose": "x"}),
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    let events = accesses(&app).await;
    let failed: Vec<&Value> = events
        .iter()
        .filter(|(t, _, _)| t == "SecretAccessFailed")
        .map(|(_, d, _)| d)
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed.iter().all(|d| d["code"] == "not_found"),
        "{failed:?}"
    );
    let invalidations: Vec<_> = log_events(&app)
        .await
        .into_iter()
        .filter(|r| r.event_type == "SecretCacheInvalidated")
        .collect();
    assert_eq!(invalidations.len(), 1);
    assert_eq!(invalidations[0].actor.client_id, "ops");
}

#[tokio::test]
async fn with_openbao_down_last_known_good_is_served_and_recorded_then_unavailable_then_fresh_again(
) {
    let app = spawn_app().await;
    let (mut bao, token) = vault_with_secrets("sk-lkg").await;
    // fresh for 1 s, last-known-good up to 6 s
    let api = api_with_secrets(&app, secrets_settings(&bao, &token, 1, 6).await, false).await;
    let body = json!({"path": STRIPE, "field": "api_key", "purpose": "charge"});
    assert_eq!(
        read(&api, BILLING_TOKEN, body.clone()).await.body["source"],
        "vault"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bao.stop();

    let a = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        (a.body["source"].as_str(), a.body["value"].as_str()),
        (Some("last_known_good"), Some("sk-lkg"))
    );
    let events = accesses(&app).await;
    let lkg = &events.last().unwrap().1;
    assert_eq!(lkg["source"], "last_known_good");
    assert_eq!(lkg["vault_error"]["kind"], "unreachable", "{lkg}");

    // past the maximum staleness: unavailable, recorded
    tokio::time::sleep(Duration::from_secs(5)).await;
    let a = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(!a.body.to_string().contains("sk-lkg"));
    let events = accesses(&app).await;
    let (kind, failed, _) = events.last().unwrap();
    assert_eq!(kind, "SecretAccessFailed");
    assert_eq!(failed["code"], "unavailable");

    // OpenBao back (dev mode starts empty: the secret is written again)
    bao.start_again().await;
    bao.put_secret("billing/stripe", json!({"api_key": "sk-after"}))
        .await;
    bao.write_policy("flowledger", FLOWLEDGER_VAULT_POLICY)
        .await;
    // a fresh server knows no token of the old one: a new client logs in
    let token = bao.token_with_policies(&["flowledger"]).await;
    let api = api_with_secrets(&app, secrets_settings(&bao, &token, 1, 6).await, false).await;
    let a = read(&api, BILLING_TOKEN, body).await;
    assert_eq!(
        (a.body["source"].as_str(), a.body["value"].as_str()),
        (Some("vault"), Some("sk-after")),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn the_nats_door_answers_the_verified_caller_with_the_value() {
    let (bao, token) = vault_with_secrets("sk-over-nats").await;
    let s = secrets_settings(&bao, &token, 300, 3600).await;
    let app = spawn_app_with_secrets(NatsServer::start(), Default::default(), Some(s)).await;
    let r = app
        .send_as(
            Who::Billing,
            "secret.read",
            json!({"path": STRIPE, "field": "api_key", "purpose": "charge"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["value"], "sk-over-nats");
    // an operator may not read billing's path? it may (rule operators), but
    // a client naming another actor in the body is refused
    let r = app
        .send_as(
            Who::Billing,
            "secret.read",
            json!({"path": STRIPE, "purpose": "x", "client_id": "ops"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "validation", "{r}");
    let r = app
        .send_as(
            Who::Billing,
            "secret.invalidate",
            json!({"path": STRIPE, "reason": "x"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    let events = accesses(&app).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].2, "billing", "the actor is the broker's user");
}

#[tokio::test]
async fn no_value_is_returned_when_its_access_event_cannot_be_stored() {
    let mut app = spawn_app().await;
    let (bao, token) = vault_with_secrets("sk-never-without-event").await;
    let api = api_with_secrets(&app, secrets_settings(&bao, &token, 300, 3600).await, false).await;
    let body = json!({"path": STRIPE, "field": "api_key", "purpose": "charge"});
    assert_eq!(read(&api, BILLING_TOKEN, body.clone()).await.status, 200);
    // the stream is gone: the value is in the cache, but may not be served
    app.nats.kill();
    let a = read(&api, BILLING_TOKEN, body).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(
        !a.body.to_string().contains("sk-never-without-event"),
        "{}",
        a.body
    );
    assert_eq!(vault_reads(&bao, STRIPE), 1);
}

/// `serve` with `[secrets]` and `[secrets.keys]`: `token` in the
/// environment, the callback signing key read from Vault.
fn serve_with_vault_keys(
    app: &TestApp,
    db: &str,
    dir: &std::path::Path,
    bao: &OpenBao,
    token: &str,
) -> std::process::Command {
    let registry = dir.join("registry.json");
    let config = dir.join("flowledger.toml");
    std::fs::write(
        &config,
        format!(
            "[secrets]\nvault_addr = \"{}\"\n[secrets.keys]\n\
             callback_signing = \"secret/data/flowledger/keys#callback\"\n",
            bao.addr()
        ),
    )
    .unwrap();
    let mut cmd = serve_command(app, db, &registry, Some(&config));
    cmd.env("FLOWLEDGER_VAULT_TOKEN", token)
        .env_remove("FLOWLEDGER_CALLBACK_KEY");
    cmd
}

#[tokio::test]
async fn serve_signs_callbacks_with_its_key_from_vault_and_records_reading_it() {
    use crate::peers::{self, Peer};
    const KEY: &str = "callback-key-from-vault-0123456789";
    let app = spawn_app().await;
    let (bao, _) = vault_with_secrets("unused").await;
    bao.put_secret("flowledger/keys", json!({"callback": KEY}))
        .await;
    bao.write_policy(
        "fl-keys",
        r#"path "secret/data/flowledger/*" { capabilities = ["read"] }"#,
    )
    .await;
    let token = bao.token_with_policies(&["fl-keys"]).await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(10, json!("done"))]);
    peer.script("/cb", vec![peers::ok(0, json!({}))]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("registry.json"),
        one_workflow(json!([solver("s", &step, 5000, 1)]), json!({})).to_string(),
    )
    .unwrap();
    let db = fresh_database().await;

    // a bad token stops serve at start, naming the token, exit 2
    let out = serve_with_vault_keys(&app, &db, dir.path(), &bao, "not-a-token")
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Vault token was refused"), "{stderr}");
    assert!(!stderr.contains("not-a-token"), "{stderr}");
    // the key in Vault and in the environment: which is meant? exit 2
    let out = serve_with_vault_keys(&app, &db, dir.path(), &bao, &token)
        .env("FLOWLEDGER_CALLBACK_KEY", "another-key-0123456789")
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("secrets.keys.callback_signing"), "{stderr}");

    let mut serve = serve_with_vault_keys(&app, &db, dir.path(), &bao, &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start serve");
    let cb = format!("{}/cb", peer.url);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = app
            .send("job.submit", json!({"job_id": "vault-key-1", "workflow_key": "w", "client_id": "billing", "callback_url": cb}))
            .await;
        if r["ok"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while peer.received("/cb").is_empty() {
        assert!(std::time::Instant::now() < deadline, "no callback arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = serve.kill();
    let _ = serve.wait();
    let got = &peer.received("/cb")[0];
    let key = flowledger::crypto::SigningKey::new(KEY.as_bytes()).unwrap();
    let now = chrono::Utc::now().timestamp();
    key.verify(
        got.headers
            .get("x-flowledger-timestamp")
            .map(String::as_str),
        got.headers
            .get("x-flowledger-signature")
            .map(String::as_str),
        &got.raw,
        now,
        300,
    )
    .expect("the callback is signed with the key from Vault");
    let own: Vec<_> = log_events(&app)
        .await
        .into_iter()
        .filter(|r| r.event_type == "SecretAccessGranted" && r.actor.client_id == "flowledger")
        .collect();
    assert_eq!(own.len(), 1, "one read of the key at start");
    assert_eq!(own[0].data["rule"], "flowledger-own-keys");
    assert_eq!(own[0].data["path"], "secret/data/flowledger/keys");
    assert!(!own[0].data.to_string().contains(KEY));
}

#[tokio::test]
async fn a_planted_value_is_found_only_in_the_replies_meant_for_it() {
    if ran_alone("secret_access::a_planted_value_is_found_only_in_the_replies_meant_for_it").await {
        return;
    }
    use crate::secrets::{contains, files_under, pg_dump};
    use flowledger::audit::checkpoint::CheckpointKey;
    use flowledger::audit::{export, read::Filter};
    const PLANTED: &str = "PLANTED-zq8x-value-7731";
    // every log line of the service at debug level (the runtime is this
    // thread's: the service's tasks log here too)
    let logs = capture_logs(tracing::Level::DEBUG);

    let app = spawn_app().await;
    let (mut bao, token) = vault_with_secrets(PLANTED).await;
    let api = api_with_secrets(&app, secrets_settings(&bao, &token, 1, 600).await, true).await;
    let body = json!({"path": STRIPE, "field": "api_key", "purpose": "charge"});
    let mut replies = Vec::new();
    // granted from Vault, from the cache, the whole secret
    for b in [
        body.clone(),
        body.clone(),
        json!({"path": STRIPE, "purpose": "all"}),
    ] {
        let a = read(&api, BILLING_TOKEN, b).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.body.to_string().contains(PLANTED),
            "the intended reply holds it"
        );
        replies.push(a.body);
    }
    // denied by the policy and by Vault, no such field: the error bodies
    let mut errors = Vec::new();
    for (token, b) in [
        (OTHER_TOKEN, body.clone()),
        (
            OPERATOR_TOKEN,
            json!({"path": "secret/data/ops/root", "purpose": "x"}),
        ),
        (
            BILLING_TOKEN,
            json!({"path": STRIPE, "field": "nope", "purpose": "x"}),
        ),
    ] {
        let a = read(&api, token, b).await;
        assert!(a.status >= 400, "{}", a.body);
        errors.push(a.body.to_string());
    }
    // last-known-good, then invalidation, then unavailable
    tokio::time::sleep(Duration::from_millis(1200)).await;
    bao.stop();
    let a = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(a.body["source"], "last_known_good", "{}", a.body);
    let inv = api
        .post(
            "/v1/secrets/invalidate",
            OPERATOR_TOKEN,
            json!({"path": STRIPE, "reason": "rotated"}),
        )
        .await;
    assert_eq!(inv.status, 200, "{}", inv.body);
    let a = read(&api, BILLING_TOKEN, body.clone()).await;
    assert_eq!(a.status, 503, "{}", a.body);
    errors.push(a.body.to_string());

    for e in &errors {
        assert!(!e.contains(PLANTED), "an error body holds the value: {e}");
    }
    // the stream on disk
    app.client.flush().await.unwrap();
    let stored = files_under(&app.nats.store_dir());
    assert!(stored
        .iter()
        .any(|(_, b)| contains(b, "SecretAccessGranted")));
    assert!(stored.iter().any(|(_, b)| contains(b, "last_known_good")));
    // an export
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let key = CheckpointKey::from_hex("test-key", &"5a".repeat(32)).unwrap();
    export::export(
        &app.client,
        &app.log,
        &Filter::default(),
        &out,
        Some(&key),
        &mut |_, _| {},
    )
    .await
    .expect("export");
    let exported = files_under(&out);
    assert!(exported
        .iter()
        .any(|(_, b)| contains(b, "SecretAccessGranted")));
    // the read models
    api.caught_up(&app.log).await;
    let dump = pg_dump(&api.url);
    assert!(
        contains(&dump, "secret/data/billing/stripe"),
        "the read models hold the accesses"
    );
    // metrics
    let metrics = api.call("GET", "/metrics", None, None).await;
    assert!(
        metrics
            .body
            .to_string()
            .contains("flowledger_secret_reads_total"),
        "{}",
        metrics.body
    );
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(
        logged.contains("last-known-good"),
        "the capture saw the service's log"
    );
    let places: Vec<(String, Vec<u8>)> = stored
        .into_iter()
        .chain(exported)
        .map(|(p, b)| (p.display().to_string(), b))
        .chain([
            ("pg_dump".to_string(), dump),
            (
                "/metrics".to_string(),
                metrics.body.to_string().into_bytes(),
            ),
            ("the service's log".to_string(), logged.into_bytes()),
        ])
        .collect();
    for (place, bytes) in &places {
        assert!(!contains(bytes, PLANTED), "the value is in {place}");
    }
    drop(replies);
}
