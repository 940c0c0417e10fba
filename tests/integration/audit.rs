//! Auditors: digests, checkpoints, exports, and the tampering `verify` catches.

use std::path::{Path, PathBuf};

use flowledger::audit::checkpoint::{self, CheckpointKey, Digest};
use flowledger::audit::export;
use flowledger::audit::read::Filter;
use flowledger::audit::verify::{self, VerifyError};
use flowledger::events::chain;
use serde_json::{json, Value};

use crate::helpers::*;

fn key() -> CheckpointKey {
    CheckpointKey::from_hex("test-key", &"5a".repeat(32)).unwrap()
}

/// Six jobs, three commands each: 18 messages over 6 aggregates, interleaved.
async fn history(app: &TestApp) {
    for i in 0..6 {
        app.submit(&format!("audit-{i}"), &format!("sub-{i}")).await;
    }
    for i in 0..6 {
        app.send("job.start", json!({"job_id": format!("audit-{i}")}))
            .await;
    }
    for i in 0..6 {
        let r = app
            .send(
                "job.cancel",
                json!({"job_id": format!("audit-{i}"), "reason": "test"}),
            )
            .await;
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    assert_eq!(app.last_seq().await, 18);
}

async fn export_to(app: &TestApp, filter: &Filter) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    export::export(
        &app.client,
        &app.log,
        filter,
        &out,
        Some(&key()),
        &mut |_, _| {},
    )
    .await
    .unwrap();
    (dir, out)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn line_for_seq(lines: &[String], seq: u64) -> usize {
    lines
        .iter()
        .position(|l| serde_json::from_str::<Value>(l).unwrap()["seq"] == json!(seq))
        .unwrap()
}

fn broken_at(r: Result<verify::Summary, VerifyError>) -> (u64, String) {
    match r {
        Err(VerifyError::Broken(b)) => (b.seq, b.reason),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[tokio::test]
async fn verify_passes_on_the_live_stream_and_on_an_export() {
    let app = spawn_app().await;
    history(&app).await;
    checkpoint::write_checkpoint(&app.client, &app.log, &key())
        .await
        .unwrap()
        .unwrap();
    let live = verify::verify_live(&app.client, &app.log, Some(key()), None)
        .await
        .unwrap();
    assert_eq!((live.messages, live.events, live.aggregates), (18, 18, 6));
    assert_eq!(live.signed_up_to, Some(18));
    app.submit("audit-late", "late").await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    let summary = verify::verify_export(&out, Some(key()), None).unwrap();
    assert_eq!(summary.to_seq, 19);
    assert_eq!(
        summary.signed_up_to,
        Some(19),
        "export signs a fresh checkpoint at its end"
    );
    assert_eq!(
        summary.digest,
        checkpoint::stream_digest(&app.log, None, None)
            .await
            .unwrap()
            .to_string()
    );
}

#[tokio::test]
async fn verify_names_the_altered_event() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    let path = out.join(export::MESSAGES_FILE);
    let mut ls = lines(&path);
    let i = line_for_seq(&ls, 9);
    let mut m: Value = serde_json::from_str(&ls[i]).unwrap();
    let body = m["body"]
        .as_str()
        .unwrap()
        .replace("\"client_id\":\"handler\"", "\"client_id\":\"mallory\"");
    assert_ne!(
        body,
        m["body"].as_str().unwrap(),
        "the test alters something"
    );
    m["body"] = json!(body);
    ls[i] = m.to_string();
    write_lines(&path, &ls);
    let (seq, reason) = broken_at(verify::verify_export(&out, Some(key()), None));
    assert_eq!(seq, 9, "{reason}");
    assert!(reason.contains("altered"), "{reason}");
}

#[tokio::test]
async fn verify_names_a_removed_event() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    // removed from the messages only
    let mpath = out.join(export::MESSAGES_FILE);
    let original = lines(&mpath);
    let mut ls = original.clone();
    ls.remove(line_for_seq(&ls, 7));
    write_lines(&mpath, &ls);
    assert_eq!(
        broken_at(verify::verify_export(&out, Some(key()), None)).0,
        7
    );
    // removed from the messages and the index alike
    let ipath = out.join(export::INDEX_FILE);
    let mut idx = lines(&ipath);
    idx.remove(line_for_seq(&idx, 7));
    write_lines(&ipath, &idx);
    let (seq, reason) = broken_at(verify::verify_export(&out, Some(key()), None));
    assert_eq!(seq, 7, "{reason}");
    assert!(reason.contains("missing"), "{reason}");
}

#[tokio::test]
async fn verify_names_two_swapped_events() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    for file in [export::MESSAGES_FILE, export::INDEX_FILE] {
        let path = out.join(file);
        let original = lines(&path);
        let mut ls = original.clone();
        let (a, b) = (line_for_seq(&ls, 4), line_for_seq(&ls, 11));
        ls.swap(a, b);
        write_lines(&path, &ls);
        let (seq, reason) = broken_at(verify::verify_export(&out, Some(key()), None));
        assert_eq!(seq, 4, "{file}: {reason}");
        write_lines(&path, &original);
    }
    // swapping the contents but keeping the sequence numbers is caught too
    let path = out.join(export::MESSAGES_FILE);
    let mut ls = lines(&path);
    let (a, b) = (line_for_seq(&ls, 4), line_for_seq(&ls, 11));
    let mut ma: Value = serde_json::from_str(&ls[a]).unwrap();
    let mut mb: Value = serde_json::from_str(&ls[b]).unwrap();
    let (sa, sb) = (ma["seq"].clone(), mb["seq"].clone());
    ma["seq"] = sb;
    mb["seq"] = sa;
    ls[a] = mb.to_string();
    ls[b] = ma.to_string();
    write_lines(&path, &ls);
    assert_eq!(
        broken_at(verify::verify_export(&out, Some(key()), None)).0,
        4
    );
}

#[tokio::test]
async fn verify_detects_truncation_and_forged_checkpoints() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    for file in [export::MESSAGES_FILE, export::INDEX_FILE] {
        let path = out.join(file);
        let mut ls = lines(&path);
        ls.truncate(ls.len() - 2);
        write_lines(&path, &ls);
    }
    let (seq, reason) = broken_at(verify::verify_export(&out, Some(key()), None));
    assert_eq!(
        seq, 18,
        "the signed checkpoint at 18 is past the end: {reason}"
    );
    assert!(reason.contains("truncated"), "{reason}");
    // a checkpoint signed with another key is refused
    let (_d2, out2) = export_to(&app, &Filter::default()).await;
    let other = CheckpointKey::from_hex("test-key", &"77".repeat(32)).unwrap();
    let (seq, reason) = broken_at(verify::verify_export(&out2, Some(other), None));
    assert_eq!(seq, 18);
    assert!(reason.contains("signature"), "{reason}");
}

#[tokio::test]
async fn a_kept_digest_proves_history_unchanged() {
    let app = spawn_app().await;
    history(&app).await;
    let kept = checkpoint::stream_digest(&app.log, None, None)
        .await
        .unwrap();
    app.submit("after-digest", "ad").await;
    let s = verify::verify_live(&app.client, &app.log, None, Some(kept))
        .await
        .unwrap();
    assert_eq!(s.to_seq, 19);
    let forged = Digest {
        seq: kept.seq,
        digest: chain::sha256(b"other history"),
    };
    assert_eq!(
        broken_at(verify::verify_live(&app.client, &app.log, None, Some(forged)).await).0,
        18
    );
    let beyond = Digest {
        seq: 99,
        digest: kept.digest,
    };
    assert_eq!(
        broken_at(verify::verify_live(&app.client, &app.log, None, Some(beyond)).await).0,
        99
    );
}

#[tokio::test]
async fn a_filtered_export_still_verifies_against_the_whole_stream() {
    let app = spawn_app().await;
    history(&app).await;
    let mut f = Filter::default();
    f.set_aggregate("job:audit-2").unwrap();
    let (_d, out) = export_to(&app, &f).await;
    let s = verify::verify_export(&out, Some(key()), None).unwrap();
    assert_eq!((s.messages, s.events, s.aggregates), (18, 3, 1));
    let by_type = Filter {
        event_type: Some("JobCancelled".into()),
        from_seq: Some(10),
        ..Default::default()
    };
    let (_d2, out2) = export_to(&app, &by_type).await;
    let s = verify::verify_export(&out2, Some(key()), None).unwrap();
    assert_eq!((s.from_seq, s.to_seq, s.events), (10, 18, 6));
}

#[tokio::test]
async fn the_cli_exits_1_and_names_the_sequence() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    let run = |args: &[&str]| {
        app.nats
            .cli(Who::Service)
            .args(args)
            .env("FLOWLEDGER_CHECKPOINT_KEY", "5a".repeat(32))
            .env("FLOWLEDGER_CHECKPOINT_KEY_ID", "test-key")
            .output()
            .unwrap()
    };
    let good = run(&["audit", "verify", "--export", out.to_str().unwrap()]);
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let path = out.join(export::INDEX_FILE);
    let mut ls = lines(&path);
    ls.remove(line_for_seq(&ls, 5));
    write_lines(&path, &ls);
    let bad = run(&["audit", "verify", "--export", out.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["seq"], json!(5), "{v}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("stream sequence 5"));
    let live = run(&["audit", "verify"]);
    assert_eq!(
        live.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let digest = run(&["audit", "digest"]);
    let d = String::from_utf8(digest.stdout).unwrap();
    assert!(d.starts_with("18:"), "{d}");
    let usage = run(&["audit", "replay", "--aggregate", "job:a.b"]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--aggregate"));
}

#[tokio::test]
async fn an_independent_python_verifier_agrees() {
    // tools/verify_export.py implements docs/EVENTS.md with Python's
    // standard library only: the spec is enough to verify an export.
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out) = export_to(&app, &Filter::default()).await;
    let run = || {
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tools/verify_export.py"
            ))
            .arg(&out)
            .args(["--key-hex", &"5a".repeat(32), "--key-id", "test-key"])
            .output()
            .expect("python3 runs")
    };
    let good = run();
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&good.stdout),
        String::from_utf8_lossy(&good.stderr)
    );
    let v: Value = serde_json::from_slice(&good.stdout).unwrap();
    let rust = verify::verify_export(&out, Some(key()), None).unwrap();
    assert_eq!(v["digest"], json!(rust.digest));
    assert_eq!(v["signed_up_to"], json!(18));
    let path = out.join(export::MESSAGES_FILE);
    let mut ls = lines(&path);
    let i = line_for_seq(&ls, 14);
    let altered = ls[i].replace("test", "tset");
    assert_ne!(altered, ls[i], "the test alters something");
    ls[i] = altered;
    write_lines(&path, &ls);
    let bad = run();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stdout).starts_with("broken at 14"),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
}
