//! SIGHUP reloads the configuration of a running `serve`: a client added
//! to `[[clients]]` is let in at once, a removed one gets 401, and a file
//! that is not valid changes nothing (the reason is logged).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// A second client's token, added and removed while `serve` runs.
const SHOP_TOKEN: &str = "test-shop-token-reloaded";

/// Waits until the log of `serve` holds `text` `n` times.
async fn logged_times(serve: &Serve, text: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while serve.log().matches(text).count() < n {
        assert!(
            Instant::now() < deadline,
            "serve did not log {text:?} {n} times within 30 s:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A configuration with billing and `more` `[[clients]]` tables; the
/// handler off (the jobs submitted here need no step to run).
fn config(more: &str) -> String {
    let hash = |t: &str| hex::encode(flowledger::events::chain::sha256(t.as_bytes()));
    format!(
        "[handler]\nenabled = false\n\n\
         [[clients]]\nid = \"billing\"\ntoken_sha256 = \"{}\"\n\n{more}",
        hash(BILLING_TOKEN)
    )
}

fn shop() -> String {
    let hash = hex::encode(flowledger::events::chain::sha256(SHOP_TOKEN.as_bytes()));
    format!("[[clients]]\nid = \"shop\"\ntoken_sha256 = \"{hash}\"\n")
}

/// `POST /v1/jobs` as the holder of `token`: the status.
async fn submit(http: &str, token: &str, job_id: &str) -> u16 {
    submit_to(http, token, job_id, "w").await
}

/// `POST /v1/jobs` of workflow `key` as the holder of `token`: the status.
async fn submit_to(http: &str, token: &str, job_id: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{http}/v1/jobs"))
        .bearer_auth(token)
        .json(&json!({"job_id": job_id, "workflow_key": key}))
        .send()
        .await
        .expect("the HTTP API answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn sighup_adds_and_removes_clients_and_keeps_the_old_ones_when_the_file_is_bad() {
    let app = spawn_app().await;
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.json");
    std::fs::write(
        &registry,
        one_workflow(
            json!([solver("s", "http://127.0.0.1:9/s", 1_000, 1)]),
            json!({}),
        )
        .to_string(),
    )
    .unwrap();
    let file = dir.path().join("flowledger.toml");
    std::fs::write(&file, config("")).unwrap();
    let serve = Serve::start(&app, &db, &registry, &file);
    let http = serve.http().await;
    assert_eq!(submit(&http, BILLING_TOKEN, "reload-1").await, 202);
    assert_eq!(
        submit(&http, SHOP_TOKEN, "reload-2").await,
        401,
        "not yet a client"
    );

    // added: its token works at once, no restart
    std::fs::write(&file, config(&shop())).unwrap();
    serve.hangup();
    logged_times(&serve, "SIGHUP: [[clients]] reloaded", 1).await;
    assert_eq!(submit(&http, SHOP_TOKEN, "reload-3").await, 202);
    assert_eq!(submit(&http, BILLING_TOKEN, "reload-4").await, 202);

    // removed: refused
    std::fs::write(&file, config("")).unwrap();
    serve.hangup();
    logged_times(&serve, "SIGHUP: [[clients]] reloaded", 2).await;
    assert_eq!(submit(&http, SHOP_TOKEN, "reload-5").await, 401);

    // a bad file: nothing applied (shop is not let in), the reason logged
    std::fs::write(
        &file,
        config(&format!(
            "{}\n[[clients]]\nid = \"x\"\ntoken_sha256 = \"abc\"\n",
            shop()
        )),
    )
    .unwrap();
    serve.hangup();
    serve
        .logged("SIGHUP: configuration not reloaded, the running one is kept")
        .await;
    assert_eq!(submit(&http, BILLING_TOKEN, "reload-6").await, 202);
    assert_eq!(
        submit(&http, SHOP_TOKEN, "reload-7").await,
        401,
        "never half-applied"
    );

    // what a reload does not apply is named
    std::fs::write(
        &file,
        config("").replace(
            "enabled = false",
            "enabled = false\ndrain_grace_seconds = 7",
        ),
    )
    .unwrap();
    serve.hangup();
    serve.logged("[handler] changed and not reloaded").await;
    assert_eq!(submit(&http, BILLING_TOKEN, "reload-8").await, 202);

    let log = serve.log();
    assert!(
        !log.contains("SIGHUP: workflow registry"),
        "an unchanged registry file is not loaded again: {log}"
    );
    assert!(log.contains("clients[2].token_sha256"), "the reason: {log}");
    assert!(log.contains("shop"), "the client id is logged: {log}");
    assert!(
        !log.contains(SHOP_TOKEN) && !log.contains(BILLING_TOKEN),
        "no token is logged: {log}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_workflow_registry_and_keeps_it_when_the_new_file_is_bad() {
    let app = spawn_app().await;
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.json");
    let step = || json!([solver("s", "http://127.0.0.1:9/s", 1_000, 1)]);
    std::fs::write(&registry, one_workflow(step(), json!({})).to_string()).unwrap();
    let file = dir.path().join("flowledger.toml");
    std::fs::write(&file, config("")).unwrap();
    let serve = Serve::start(&app, &db, &registry, &file);
    let http = serve.http().await;
    assert_eq!(
        submit_to(&http, BILLING_TOKEN, "registry-1", "w2").await,
        400,
        "w2 is not in the registry yet"
    );

    // w2 added, w kept: both are taken at once, no restart
    let two = json!({"version": 1, "workflows": {"w": {"steps": step()}, "w2": {"steps": step()}}});
    std::fs::write(&registry, two.to_string()).unwrap();
    serve.hangup();
    logged_times(&serve, "SIGHUP: workflow registry reloaded", 1).await;
    assert_eq!(
        submit_to(&http, BILLING_TOKEN, "registry-2", "w2").await,
        202
    );
    assert_eq!(submit(&http, BILLING_TOKEN, "registry-3").await, 202);
    let meta: serde_json::Value = reqwest::Client::new()
        .get(format!("{http}/v1/meta"))
        .bearer_auth(BILLING_TOKEN)
        .send()
        .await
        .expect("the HTTP API answers")
        .json()
        .await
        .expect("GET /v1/meta answers JSON");
    let keys: Vec<&str> = meta["workflows"]
        .as_array()
        .expect("workflows is a list")
        .iter()
        .filter_map(|w| w["workflow_key"].as_str())
        .collect();
    assert_eq!(keys, ["w", "w2"], "GET /v1/meta lists the new registry");

    // a bad file: the running registry is kept whole, the reason logged
    std::fs::write(
        &registry,
        r#"{"version": 1, "workflows": {"w3": {"steps": []}}}"#,
    )
    .unwrap();
    serve.hangup();
    serve
        .logged("SIGHUP: workflow registry not reloaded, the running one is kept")
        .await;
    assert_eq!(
        submit_to(&http, BILLING_TOKEN, "registry-4", "w2").await,
        202
    );
    assert_eq!(
        submit_to(&http, BILLING_TOKEN, "registry-5", "w3").await,
        400,
        "never half-applied"
    );

    // w2 removed: refused from now on, and the removal is warned about
    std::fs::write(&registry, one_workflow(step(), json!({})).to_string()).unwrap();
    serve.hangup();
    logged_times(&serve, "SIGHUP: workflow registry reloaded", 2).await;
    assert_eq!(
        submit_to(&http, BILLING_TOKEN, "registry-6", "w2").await,
        400
    );
    serve.logged("workflows removed from the registry").await;
}
