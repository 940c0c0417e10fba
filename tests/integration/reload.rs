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
    reqwest::Client::new()
        .post(format!("{http}/v1/jobs"))
        .bearer_auth(token)
        .json(&json!({"job_id": job_id, "workflow_key": "w"}))
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
    std::fs::write(
        &registry,
        one_workflow(
            json!([solver("s2", "http://127.0.0.1:9/s2", 1_000, 1)]),
            json!({}),
        )
        .to_string(),
    )
    .unwrap();
    serve.hangup();
    serve.logged("[handler] changed and not reloaded").await;
    serve
        .logged("the workflow registry file changed and is not reloaded")
        .await;
    assert_eq!(submit(&http, BILLING_TOKEN, "reload-8").await, 202);

    let log = serve.log();
    assert!(log.contains("clients[2].token_sha256"), "the reason: {log}");
    assert!(log.contains("shop"), "the client id is logged: {log}");
    assert!(
        !log.contains(SHOP_TOKEN) && !log.contains(BILLING_TOKEN),
        "no token is logged: {log}"
    );
}
