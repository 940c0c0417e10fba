//! The Vault client (src/secrets/vault.rs) against a real OpenBao 2.7.2
//! (tests/integration/openbao.rs): KV v2 reads with a token or AppRole,
//! renewal, and each failure named for what the caller does.

use std::time::Duration;

use flowledger::secrets::vault::{AuthKind, VaultAuth, VaultClient, VaultConfig, VaultError};
use serde_json::json;

use crate::helpers::{capture_logs, ran_alone};
use crate::openbao::OpenBao;

const OCR: &str = "secret/data/external_apis/ocr";

/// Reads of `external_apis/*`: data and metadata.
const APIS_POLICY: &str = r#"
path "secret/data/external_apis/*" { capabilities = ["read"] }
path "secret/metadata/external_apis/*" { capabilities = ["read"] }
"#;

fn config(bao: &OpenBao, auth: VaultAuth) -> VaultConfig {
    VaultConfig {
        addr: bao.addr(),
        auth,
        timeout: Duration::from_secs(5),
    }
}

/// A server with `external_apis/ocr` in two versions and a token that may
/// read `external_apis/*`.
async fn seeded() -> (OpenBao, String) {
    let bao = OpenBao::start().await;
    assert_eq!(
        bao.put_secret(
            "external_apis/ocr",
            json!({"api_key": "k-one", "region": "eu"})
        )
        .await,
        1
    );
    assert_eq!(
        bao.put_secret(
            "external_apis/ocr",
            json!({"api_key": "k-two", "region": "eu"})
        )
        .await,
        2
    );
    bao.put_secret("other/db", json!({"password": "p"})).await;
    bao.write_policy("apis", APIS_POLICY).await;
    let token = bao.token_with_policies(&["apis"]).await;
    (bao, token)
}

async fn connect(bao: &OpenBao, auth: VaultAuth) -> VaultClient {
    VaultClient::connect(config(bao, auth))
        .await
        .unwrap_or_else(|e| panic!("connect to OpenBao: {e}"))
}

#[tokio::test]
async fn a_token_reads_a_field_the_whole_secret_and_a_version() {
    let (bao, token) = seeded().await;
    let vault = connect(&bao, VaultAuth::Token(token.into())).await;

    let key = vault
        .read(OCR, Some("api_key"), None)
        .await
        .expect("read a field");
    assert_eq!(key.value.expose_str(), Some("k-two"));
    assert_eq!(key.version, 2);

    let whole = vault.read(OCR, None, None).await.expect("read the secret");
    assert_eq!(
        whole.value.expose(),
        &json!({"api_key": "k-two", "region": "eu"})
    );
    assert_eq!(whole.version, 2);
    assert_eq!(format!("{whole:?}").matches("k-two").count(), 0);

    let old = vault
        .read(OCR, Some("api_key"), Some(1))
        .await
        .expect("read version 1");
    assert_eq!((old.value.expose_str(), old.version), (Some("k-one"), 1));

    // the logical form names the same secret
    let logical = vault
        .read("secret/external_apis/ocr", Some("region"), None)
        .await
        .expect("read by the logical path");
    assert_eq!(
        (logical.value.expose_str(), logical.version),
        (Some("eu"), 2)
    );

    match vault.read(OCR, Some("nope"), None).await {
        Err(VaultError::NoField { field, version, .. }) => {
            assert_eq!((field.as_str(), version), ("nope", 2))
        }
        other => panic!("a missing field: {other:?}"),
    }
    match vault.read(OCR, None, Some(9)).await {
        Err(VaultError::NotFound { version, .. }) => assert_eq!(version, Some(9)),
        other => panic!("a missing version: {other:?}"),
    }
    match vault
        .read("secret/data/external_apis/none", None, None)
        .await
    {
        Err(VaultError::NotFound {
            path,
            version: None,
        }) => {
            assert_eq!(path, "secret/data/external_apis/none")
        }
        other => panic!("a missing secret: {other:?}"),
    }
}

#[tokio::test]
async fn the_latest_version_follows_a_new_write() {
    let (bao, token) = seeded().await;
    let vault = connect(&bao, VaultAuth::Token(token.into())).await;
    assert_eq!(vault.latest_version(OCR).await.expect("metadata"), 2);
    bao.put_secret("external_apis/ocr", json!({"api_key": "k-three"}))
        .await;
    assert_eq!(vault.latest_version(OCR).await.expect("metadata"), 3);
    let read = vault.read(OCR, Some("api_key"), None).await.expect("read");
    assert_eq!(
        (read.value.expose_str(), read.version),
        (Some("k-three"), 3)
    );
}

#[tokio::test]
async fn a_path_outside_the_policy_is_refused_with_vaults_reason() {
    let (bao, token) = seeded().await;
    let vault = connect(&bao, VaultAuth::Token(token.into())).await;
    let err = vault
        .read("secret/data/other/db", Some("password"), None)
        .await
        .expect_err("the policy does not allow other/");
    match &err {
        VaultError::Refused {
            path,
            status,
            reason,
        } => {
            assert_eq!((path.as_str(), *status), ("secret/data/other/db", 403));
            assert!(reason.contains("permission denied"), "{reason}");
        }
        other => panic!("not Refused: {other:?}"),
    }
    assert!(err.to_string().contains("secret/data/other/db"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_bad_token_fails_at_connect_naming_the_token() {
    let bao = OpenBao::start().await;
    let err = VaultClient::connect(config(&bao, VaultAuth::Token("wrong-token-value".into())))
        .await
        .expect_err("a token OpenBao never issued");
    assert!(
        matches!(
            err,
            VaultError::Auth {
                kind: AuthKind::Token,
                status: 403,
                ..
            }
        ),
        "{err:?}"
    );
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("the Vault token was refused (403"),
        "{shown}"
    );
    assert!(!shown.contains("wrong-token-value"), "{shown}");
}

#[tokio::test]
async fn approle_logs_in_and_a_bad_secret_id_is_named() {
    let (bao, _) = seeded().await;
    bao.enable_approle().await;
    let (role_id, secret_id) = bao
        .approle("flowledger", &["apis"], Duration::from_secs(600))
        .await;
    let vault = connect(
        &bao,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: role_id.clone().into(),
            secret_id: secret_id.clone().into(),
        },
    )
    .await;
    let read = vault.read(OCR, Some("api_key"), None).await.expect("read");
    assert_eq!(read.value.expose_str(), Some("k-two"));
    assert!(bao
        .audited_requests()
        .iter()
        .any(|p| p == "auth/approle/login"));

    let err = VaultClient::connect(config(
        &bao,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: role_id.clone().into(),
            secret_id: "not-the-secret-id".into(),
        },
    ))
    .await
    .expect_err("a wrong secret_id");
    assert!(
        matches!(
            err,
            VaultError::Auth {
                kind: AuthKind::AppRole { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("the AppRole role_id/secret_id was refused"),
        "{shown}"
    );
    assert!(
        !shown.contains("not-the-secret-id") && !shown.contains(&role_id),
        "{shown}"
    );
}

#[tokio::test]
async fn the_token_is_renewed_before_it_expires() {
    let (bao, _) = seeded().await;
    bao.enable_approle().await;
    let (role_id, secret_id) = bao
        .approle("short", &["apis"], Duration::from_secs(4))
        .await;
    let vault = connect(
        &bao,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: role_id.into(),
            secret_id: secret_id.into(),
        },
    )
    .await;
    // past the token's 4 s TTL: only a renewed token still reads
    tokio::time::sleep(Duration::from_secs(7)).await;
    let read = vault
        .read(OCR, Some("api_key"), None)
        .await
        .expect("read after the TTL");
    assert_eq!(read.value.expose_str(), Some("k-two"));
    let requests = bao.audited_requests();
    assert!(
        requests.iter().any(|p| p == "auth/token/renew-self"),
        "no renewal in the audit log: {requests:?}"
    );
    // renewed, not replaced by new logins
    assert_eq!(
        requests
            .iter()
            .filter(|p| *p == "auth/approle/login")
            .count(),
        1,
        "{requests:?}"
    );
}

#[tokio::test]
async fn approle_logs_in_again_when_the_max_ttl_nears() {
    let (bao, _) = seeded().await;
    bao.enable_approle().await;
    let (role_id, secret_id) = bao
        .approle_ttls(
            "capped",
            &["apis"],
            Duration::from_secs(3),
            Duration::from_secs(5),
        )
        .await;
    let vault = connect(
        &bao,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: role_id.into(),
            secret_id: secret_id.into(),
        },
    )
    .await;
    // past the first token's 5 s max TTL
    tokio::time::sleep(Duration::from_secs(8)).await;
    let read = vault
        .read(OCR, Some("api_key"), None)
        .await
        .expect("read after the max TTL");
    assert_eq!(read.value.expose_str(), Some("k-two"));
    let logins = bao
        .audited_requests()
        .iter()
        .filter(|p| *p == "auth/approle/login")
        .count();
    assert!(logins >= 2, "{logins} AppRole login(s)");
}

#[tokio::test]
async fn a_stopped_server_is_unreachable() {
    let mut bao = OpenBao::start().await;
    bao.put_secret("external_apis/ocr", json!({"api_key": "k"}))
        .await;
    let vault = connect(&bao, VaultAuth::Token(bao.root_token().into())).await;
    bao.stop();
    let err = vault.read(OCR, None, None).await.expect_err("no server");
    assert!(matches!(err, VaultError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&bao.addr()), "{err}");
    let at_start = VaultClient::connect(config(&bao, VaultAuth::Token(bao.root_token().into())))
        .await
        .expect_err("no server at connect");
    assert!(
        matches!(at_start, VaultError::Unreachable { .. }),
        "{at_start:?}"
    );

    // the same port again; dev mode lost the secret, written again
    bao.start_again().await;
    match vault.read(OCR, None, None).await {
        Err(VaultError::NotFound { .. }) => {}
        other => panic!("a restarted dev server is empty: {other:?}"),
    }
    bao.put_secret("external_apis/ocr", json!({"api_key": "k2"}))
        .await;
    let read = vault
        .read(OCR, Some("api_key"), None)
        .await
        .expect("read again");
    assert_eq!(read.value.expose_str(), Some("k2"));
}

#[tokio::test]
async fn an_audit_device_that_cannot_write_fails_every_read_with_500() {
    let (bao, token) = seeded().await;
    let vault = connect(&bao, VaultAuth::Token(token.clone().into())).await;
    vault.read(OCR, None, None).await.expect("read");

    bao.break_audit().await;
    let (health, _) = bao.api("GET", "sys/health", None).await;
    assert_eq!(health, 200, "health stays 200");
    let err = vault
        .read(OCR, None, None)
        .await
        .expect_err("no audit, no read");
    match &err {
        VaultError::Failing { status, path, .. } => {
            assert_eq!((*status, path.as_str()), (500, OCR))
        }
        other => panic!("not Failing: {other:?}"),
    }
    assert!(err.is_retryable());
    let at_start = VaultClient::connect(config(&bao, VaultAuth::Token(token.into())))
        .await
        .expect_err("the token lookup is audited too");
    assert!(
        matches!(at_start, VaultError::Failing { status: 500, .. }),
        "{at_start:?}"
    );

    bao.repair_audit().await;
    let read = vault
        .read(OCR, Some("api_key"), None)
        .await
        .expect("read after repair");
    assert_eq!(read.value.expose_str(), Some("k-two"));
}

#[tokio::test]
async fn no_value_token_or_secret_id_in_the_logs_at_trace_level() {
    if ran_alone("secrets_vault::no_value_token_or_secret_id_in_the_logs_at_trace_level").await {
        return;
    }
    let logs = capture_logs(tracing::Level::TRACE);

    let (bao, token) = seeded().await;
    bao.enable_approle().await;
    let (role_id, secret_id) = bao
        .approle("logged", &["apis"], Duration::from_secs(3))
        .await;
    let vault = connect(&bao, VaultAuth::Token(token.clone().into())).await;
    vault.read(OCR, None, None).await.expect("read");
    vault
        .read(OCR, Some("api_key"), Some(1))
        .await
        .expect("read v1");
    let _ = vault.read(OCR, Some("nope"), None).await;
    let _ = vault.read("secret/data/other/db", None, None).await;
    let approle = connect(
        &bao,
        VaultAuth::AppRole {
            mount: "approle".into(),
            role_id: role_id.clone().into(),
            secret_id: secret_id.clone().into(),
        },
    )
    .await;
    // a renewal (at 2/3 of the 3 s TTL; a loaded machine may take longer)
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !String::from_utf8_lossy(&logs.0.lock().expect("the logs")).contains("renew-self") {
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    approle
        .read(OCR, None, None)
        .await
        .expect("read after renewal");
    let _ = VaultClient::connect(config(&bao, VaultAuth::Token("wrong-token-value".into()))).await;
    bao.break_audit().await;
    let _ = vault.read(OCR, None, None).await;
    drop((vault, approle));

    let text = String::from_utf8_lossy(&logs.0.lock().expect("the logs")).to_string();
    assert!(
        text.contains("auth/token/renew-self"),
        "the capture saw no renewal, so it proves nothing: {text}"
    );
    for secret in [
        "k-one",
        "k-two",
        token.as_str(),
        role_id.as_str(),
        secret_id.as_str(),
        "wrong-token-value",
    ] {
        assert!(!text.contains(secret), "{secret:?} is in the logs:\n{text}");
    }
}
