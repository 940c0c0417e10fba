//! Nothing secret in the immutable log: a `callback_url`'s credentials are
//! sealed before they are appended, found nowhere in the stream's files, an
//! export or a dump of the databases, and the callback still arrives with
//! them, delivered by a handler that was not running when the job came in.

use flowledger::app::Application;
use flowledger::audit::checkpoint::CheckpointKey;
use flowledger::audit::export;
use flowledger::audit::read::Filter;
use flowledger::commands::job::JobStatus;
use flowledger::crypto::SigningKey;
use flowledger::events::envelope;
use serde_json::{json, Value};
use std::path::Path;

use crate::helpers::*;
use crate::peers::{self, Peer};

/// Every file under `dir`, read whole (the stream's block files, an export).
pub(crate) fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read a directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read a file");
                out.push((path, bytes));
            }
        }
    }
    out
}

pub(crate) fn contains(haystack: &[u8], needle: &str) -> bool {
    memchr::memmem::find(haystack, needle.as_bytes()).is_some()
}

/// `pg_dump` of a test database, as text.
pub(crate) fn pg_dump(url: &str) -> Vec<u8> {
    let out = std::process::Command::new(pg_bin("pg_dump"))
        .arg("--dbname")
        .arg(url)
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.len() > 1000, "pg_dump printed next to nothing");
    out.stdout
}

#[tokio::test]
async fn a_callback_urls_credentials_never_reach_the_log_and_the_callback_still_arrives_with_them()
{
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(5, json!({"total": 3}))]);
    let cb = peer.script("/cb", vec![peers::ok(0, json!({}))]);
    let token = format!("planted-token-{}", uuid::Uuid::new_v4().simple());
    let password = format!("planted-pw-{}", uuid::Uuid::new_v4().simple());
    let callback_url = format!(
        "{}?token={token}",
        cb.replacen("http://", &format!("http://hook:{password}@"), 1)
    );
    let registry = one_workflow(json!([solver("s", &step, 2000, 1)]), json!({}));

    // the job is accepted over HTTP while no handler runs
    let api = spawn_api(&app, true, parse_registry(registry.clone())).await;
    let body = json!({"job_id": "sealed-1", "workflow_key": "w", "inputs": {},
                      "callback_url": callback_url});
    let accepted = api.post("/v1/jobs", BILLING_TOKEN, body).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let subject = flowledger::events::log::subject_for("job", "sealed-1");
    let msg = app
        .log
        .next_for_subject(&subject, 1)
        .await
        .expect("read the job")
        .expect("the job has its JobSubmitted");
    let (_, record) = envelope::decode_commit(&msg.payload)
        .expect("a commit")
        .remove(0);
    let payload = &record.data;
    assert_eq!(payload["callback_url"], json!(format!("{cb}")), "{payload}");
    assert_eq!(
        payload["callback_url_sealed"]["key_id"], "test-1",
        "{payload}"
    );

    // a handler started afterwards opens the sealed URL and delivers to it
    let key = SigningKey::new(b"test-callback-secret-0123").unwrap();
    let config = flowledger::handlers::HandlerConfig {
        callback_key: Some(key),
        ..test_handler_config()
    };
    let h = start_handler(&app, parse_registry(registry), config).await;
    let v = h.settled("sealed-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    let got = peer.received("/cb");
    assert_eq!(got.len(), 1, "the callback arrived once");
    assert_eq!(
        got[0].query.as_deref(),
        Some(format!("token={token}").as_str())
    );
    let basic = format!("Basic {}", base64_of(format!("hook:{password}").as_bytes()));
    assert_eq!(
        got[0].headers.get("authorization"),
        Some(&basic),
        "the URL's userinfo is sent as basic auth"
    );

    // nowhere in the stream's files on disk ...
    app.client.flush().await.unwrap();
    let stored = files_under(&app.nats.store_dir());
    assert!(stored.iter().any(|(_, b)| contains(b, "sealed-1")));
    for (path, bytes) in &stored {
        for secret in [&token, &password] {
            assert!(!contains(bytes, secret), "{secret} in {}", path.display());
        }
    }
    // ... an export ...
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    let checkpoint_key = CheckpointKey::from_hex("test-key", &"5a".repeat(32)).unwrap();
    export::export(
        &app.client,
        &app.log,
        &Filter::default(),
        &out,
        Some(&checkpoint_key),
        &mut |_, _| {},
    )
    .await
    .expect("export");
    let exported = files_under(&out);
    assert!(exported.iter().any(|(_, b)| contains(b, "sealed-1")));
    for (path, bytes) in &exported {
        for secret in [&token, &password] {
            assert!(!contains(bytes, secret), "{secret} in {}", path.display());
        }
    }
    // ... the read models, the handler's tables, or an API answer
    api.caught_up(&app.log).await;
    for url in [&api.url, &h.url] {
        let dump = pg_dump(url);
        for secret in [&token, &password] {
            assert!(!contains(&dump, secret), "{secret} in the dump of {url}");
        }
    }
    for path in ["/v1/jobs/sealed-1", "/v1/audit?job_id=sealed-1"] {
        let (status, answer) = api.get(path).await;
        assert_eq!(status, 200, "{path}: {answer}");
        let text = answer.to_string();
        assert!(
            !text.contains(&token) && !text.contains(&password),
            "{path}: {text}"
        );
    }
}

fn base64_of(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Submits job `id` with `callback_url` as client `tests`; the JSON reply.
async fn submit_with_callback(
    bus: &flowledger::bus::CommandBus,
    id: &str,
    callback_url: &str,
) -> Value {
    let body = json!({"job_id": id, "workflow_key": "invoice.extract",
                      "client_id": "tests", "callback_url": callback_url});
    let subject = "flow.cmd.job.submit";
    reply(handle(bus, &client("tests"), subject, body.to_string().as_bytes()).await)
}

#[tokio::test]
async fn without_a_seal_key_a_url_with_credentials_is_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let mut s = settings(&app, registry());
    s.callback_sealer = None;
    let service = Application::build(s).await.expect("build the service");
    let bus = service.bus();
    let before = app.last_seq().await;
    for url in [
        "https://hook:planted-pw@receiver.example/cb",
        "https://receiver.example/cb?token=planted-token",
        "https://receiver.example/cb#planted-token",
    ] {
        let answer = submit_with_callback(bus, "refused-1", url).await;
        assert_eq!(code(&answer), "validation", "{url}: {answer}");
        assert_eq!(answer["error"]["field"], "callback_url", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("seal"),
            "the message says what to do: {message}"
        );
        assert!(!message.contains("planted"), "{message}");
    }
    assert_eq!(app.last_seq().await, before, "nothing was appended");
    // a URL without credentials needs no key
    let answer = submit_with_callback(bus, "plain-1", "https://receiver.example/cb").await;
    assert_eq!(answer["ok"], true, "{answer}");
}

#[tokio::test]
async fn a_handler_without_the_seal_key_records_the_callback_as_failed_and_sends_nothing() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(5, json!({}))]);
    let cb = peer.script("/cb", vec![peers::ok(0, json!({}))]);
    let registry = one_workflow(json!([solver("s", &step, 2000, 1)]), json!({}));
    let config = flowledger::handlers::HandlerConfig {
        callback_key: Some(SigningKey::new(b"test-callback-secret-0123").unwrap()),
        callback_sealer: None,
        ..test_handler_config()
    };
    let h = start_handler(&app, parse_registry(registry), config).await;
    // the bus of the test app seals (the harness gives it the ring)
    let answer = h
        .submit(
            "unopened-1",
            "w",
            json!({"callback_url": format!("{cb}?token=t0ken")}),
        )
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let v = h.settled("unopened-1").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    let failed: Vec<Value> = h
        .ctx
        .load_view("unopened-1")
        .await
        .unwrap()
        .unwrap()
        .audit
        .iter()
        .filter(|a| a.action == "CallbackFailed")
        .map(|a| a.details.clone())
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", v.audit);
    assert!(
        failed[0].to_string().contains("seal"),
        "the failure says why: {}",
        failed[0]
    );
    assert!(peer.received("/cb").is_empty(), "nothing was sent");
}
