//! Auditors: digests, checkpoints, exports, and the tampering `verify`
//! catches. Every verdict on an export is reached twice, by `flowledger`'s
//! verifier and by the independent tools/verify_export.py, which must agree.

use std::path::{Path, PathBuf};

use flowledger::audit::checkpoint::{self, Checkpoint, CheckpointKey, Digest, KeyRing};
use flowledger::audit::export;
use flowledger::audit::read::Filter;
use flowledger::audit::verify::{self, Options, VerifyError};
use flowledger::events::chain;
use serde_json::{json, Value};

use crate::helpers::*;

fn key() -> CheckpointKey {
    CheckpointKey::from_hex("test-key", &"5a".repeat(32)).unwrap()
}

/// The HMAC secret of the v1 checkpoints of earlier versions.
const OLD_HMAC: &str = "4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f4f";

/// A key ring file holding the test key's public half (and the old HMAC
/// key as `old-hmac`).
fn ring_file(dir: &Path) -> PathBuf {
    let path = dir.join("ring.json");
    let ring = json!({"keys": [key().ring_entry(),
        {"key_id": "old-hmac", "algorithm": "hmac-sha256", "secret": OLD_HMAC}]});
    std::fs::write(&path, ring.to_string()).unwrap();
    path
}

fn options(ring: &Path) -> Options {
    Options {
        ring: Some(KeyRing::load(ring).unwrap()),
        ..Default::default()
    }
}

/// The verdict of tools/verify_export.py: its JSON line and exit code.
fn python_verdict(out: &Path, ring: Option<&Path>, allow_unsigned: bool) -> (Option<i32>, Value) {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/verify_export.py"
    ))
    .arg(out);
    if let Some(r) = ring {
        cmd.arg("--keys").arg(r);
    }
    if allow_unsigned {
        cmd.arg("--allow-unsigned");
    }
    let o = cmd.output().expect("python3 runs");
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify_export.py printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code(), v)
}

/// Verifies an export with both verifiers and checks that they agree: the
/// same failing sequence, or the same end, digest and coverage.
pub(crate) fn verify_both(
    out: &Path,
    ring: Option<&Path>,
    allow_unsigned: bool,
) -> Result<verify::Summary, VerifyError> {
    let opts = Options {
        ring: ring.map(|r| KeyRing::load(r).unwrap()),
        allow_unsigned,
        ..Default::default()
    };
    let rust = verify::verify_export(out, &opts);
    let (code, py) = python_verdict(out, ring, allow_unsigned);
    match &rust {
        Ok(s) => {
            assert_eq!(
                code,
                Some(0),
                "python disagrees with an intact verdict: {py}"
            );
            for (field, want) in [
                ("to_seq", json!(s.to_seq)),
                ("digest", json!(s.digest)),
                ("signed_up_to", json!(s.signed_up_to)),
                ("unsigned_from", json!(s.unsigned_from)),
                ("checkpoints_verified", json!(s.checkpoints_verified)),
            ] {
                assert_eq!(py[field], want, "python's {field} differs: {py}");
            }
        }
        Err(VerifyError::Broken(b)) => {
            assert_eq!(code, Some(1), "python disagrees with {b:?}: {py}");
            assert_eq!(
                py["seq"],
                json!(b.seq),
                "python names another sequence than {b:?}: {py}"
            );
        }
        Err(e) => panic!("no verdict: {e}"),
    }
    rust
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

/// An export signed with the test key, and a key ring file beside it.
pub(crate) async fn export_to(
    app: &TestApp,
    filter: &Filter,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    export_with(app, filter, Some(&key())).await
}

async fn export_with(
    app: &TestApp,
    filter: &Filter,
    key: Option<&CheckpointKey>,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    export::export(&app.client, &app.log, filter, &out, key, &mut |_, _| {})
        .await
        .unwrap();
    let ring = ring_file(dir.path());
    (dir, out, ring)
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

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// What an attacker without any key can redo after editing messages: every
/// event hash and chain-head header, the index, the digests and the
/// manifest's end. Checkpoints and signatures are the one thing left stale.
fn rehash(out: &Path) {
    let mpath = out.join(export::MESSAGES_FILE);
    let mut heads: std::collections::HashMap<String, chain::Hash> = Default::default();
    let mut bodies: std::collections::HashMap<u64, (String, String)> = Default::default();
    let mut msgs = lines(&mpath);
    for l in msgs.iter_mut() {
        let mut m: Value = serde_json::from_str(l).unwrap();
        let subject = m["subject"].as_str().unwrap().to_string();
        let mut body = String::new();
        let mut last = chain::GENESIS;
        for line in m["body"].as_str().unwrap().lines() {
            let mut ev: Value = serde_json::from_str(line).unwrap();
            let prev = heads.get(&subject).copied().unwrap_or(chain::GENESIS);
            // lines still chained as stored keep their bytes
            let text = if ev["prev_hash"] == json!(chain::to_hex(&prev)) {
                line.to_string()
            } else {
                ev["prev_hash"] = json!(chain::to_hex(&prev));
                ev.to_string()
            };
            last = chain::event_hash(&prev, text.as_bytes());
            heads.insert(subject.clone(), last);
            body.push_str(&text);
            body.push('\n');
        }
        m["headers"]["Flowledger-Chain-Head"] = json!(chain::to_hex(&last));
        m["body"] = json!(body);
        bodies.insert(m["seq"].as_u64().unwrap(), (subject, body));
        *l = m.to_string();
    }
    write_lines(&mpath, &msgs);
    let ipath = out.join(export::INDEX_FILE);
    let mut idx = lines(&ipath);
    let manifest_path = out.join(export::MANIFEST_FILE);
    let mut manifest = read_json(&manifest_path);
    let mut d = chain::from_hex(manifest["start_digest"].as_str().unwrap()).unwrap();
    let mut last_seq = 0;
    for l in idx.iter_mut() {
        let mut e: Value = serde_json::from_str(l).unwrap();
        let seq = e["seq"].as_u64().unwrap();
        if let Some((_, body)) = bodies.get(&seq) {
            e["body_sha256"] = json!(chain::to_hex(&chain::sha256(body.as_bytes())));
        }
        let leaf = chain::Leaf {
            seq,
            subject_sha256: chain::sha256(e["subject"].as_str().unwrap().as_bytes()),
            body_sha256: chain::from_hex(e["body_sha256"].as_str().unwrap()).unwrap(),
        };
        d = chain::digest_step(&d, &leaf);
        last_seq = seq;
        *l = e.to_string();
    }
    write_lines(&ipath, &idx);
    manifest["to_seq"] = json!(last_seq);
    manifest["end_digest"] = json!(chain::to_hex(&d));
    manifest["messages_in_range"] = json!(idx.len());
    manifest["messages_included"] = json!(msgs.len());
    let events: usize = msgs
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["body"]
                .as_str()
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    manifest["events_included"] = json!(events);
    write_json(&manifest_path, &manifest);
}

/// Keeps the checkpoints `keep` says yes to.
fn edit_checkpoints(out: &Path, mut edit: impl FnMut(&mut Value) -> bool) {
    let path = out.join(export::CHECKPOINTS_FILE);
    let kept: Vec<String> = lines(&path)
        .into_iter()
        .filter_map(|l| {
            let mut cp: Value = serde_json::from_str(&l).unwrap();
            edit(&mut cp).then(|| cp.to_string())
        })
        .collect();
    write_lines(&path, &kept);
}

fn edit_message(out: &Path, seq: u64, edit: impl FnOnce(&mut Value)) {
    let path = out.join(export::MESSAGES_FILE);
    let mut ls = lines(&path);
    let i = line_for_seq(&ls, seq);
    let mut m: Value = serde_json::from_str(&ls[i]).unwrap();
    let before = m.clone();
    edit(&mut m);
    assert_ne!(m, before, "the test alters something");
    ls[i] = m.to_string();
    write_lines(&path, &ls);
}

/// Rewrites the cancellation reason in message `seq` of an export.
fn cancel_reason(out: &Path, seq: u64, reason: &str) {
    edit_message(out, seq, |m| {
        let body = m["body"]
            .as_str()
            .unwrap()
            .replace("\"reason\":\"test\"", &format!("\"reason\":\"{reason}\""));
        m["body"] = json!(body);
    });
}

fn drop_manifest_signature(out: &Path) {
    std::fs::remove_file(out.join(export::MANIFEST_SIG_FILE)).unwrap();
}

/// A checkpoint at `seq` in the stream, as a v1 (HMAC) one of an earlier
/// version was stored.
async fn store_v1_checkpoint(app: &TestApp, seq: u64) {
    use hmac::Mac;
    let d = checkpoint::stream_digest(&app.log, None, Some(seq))
        .await
        .unwrap();
    let mut cp = Checkpoint {
        format: checkpoint::CHECKPOINT_FORMAT_V1.into(),
        stream: app.log.config().stream.clone(),
        seq,
        digest: chain::to_hex(&d.digest),
        created_at: "2026-11-23T12:00:00.000000Z".into(),
        key_id: "old-hmac".into(),
        signature: None,
        mac: None,
    };
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(&hex::decode(OLD_HMAC).unwrap()).unwrap();
    mac.update(cp.signing_input().as_bytes());
    cp.mac = Some(hex::encode(mac.finalize().into_bytes()));
    app.log
        .jetstream()
        .publish(
            flowledger::events::log::CHECKPOINT_SUBJECT,
            serde_json::to_vec(&cp).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn verify_passes_on_the_live_stream_and_on_an_export_and_old_hmac_checkpoints_still_verify() {
    let app = spawn_app().await;
    history(&app).await;
    store_v1_checkpoint(&app, 9).await;
    checkpoint::checkpoint_at(&app.client, &app.log, &key(), None)
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ring = ring_file(dir.path());
    let live = verify::verify_live(&app.client, &app.log, None, &options(&ring))
        .await
        .unwrap();
    assert_eq!((live.messages, live.events, live.aggregates), (18, 18, 6));
    assert_eq!(
        (live.signed_up_to, live.checkpoints_verified),
        (Some(18), 2)
    );
    assert_eq!(live.signed_by.as_deref(), Some("test-key"));
    app.submit("audit-late", "late").await;
    // live, the message after the newest checkpoint is refused, not skipped
    let (seq, reason) =
        broken_at(verify::verify_live(&app.client, &app.log, None, &options(&ring)).await);
    assert_eq!(seq, 19, "{reason}");
    assert!(reason.contains("no valid signature"), "{reason}");
    let to_18 = verify::verify_live(&app.client, &app.log, Some(18), &options(&ring))
        .await
        .unwrap();
    assert_eq!(to_18.to_seq, 18);
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    let summary = verify_both(&out, Some(&ring), false).unwrap();
    assert_eq!(summary.to_seq, 19);
    assert_eq!(
        summary.signed_up_to,
        Some(19),
        "export signs a checkpoint at its end"
    );
    assert_eq!(summary.checkpoints_verified, 3, "v1 at 9, v2 at 18 and 19");
    assert_eq!(summary.manifest.as_deref(), Some("signed by test-key"));
    assert_eq!(
        summary.digest,
        checkpoint::stream_digest(&app.log, None, None)
            .await
            .unwrap()
            .to_string()
    );
    assert_eq!(
        summary.sentence(),
        "intact and signed up to 19 of 19 by key test-key"
    );
    // without the old HMAC key, its checkpoint is a failure, not a skip
    let only_new = out.parent().unwrap().join("only-new.json");
    std::fs::write(&only_new, json!({"keys": [key().ring_entry()]}).to_string()).unwrap();
    let (seq, reason) = broken_at(verify_both(&out, Some(&only_new), false));
    assert_eq!(seq, 9, "{reason}");
    assert!(reason.contains("\"old-hmac\""), "{reason}");
    // without any ring, nothing is signed: refused unless accepted, and said
    let (seq, reason) = broken_at(verify_both(&out, None, false));
    assert_eq!(seq, 1, "{reason}");
    let unsigned = verify_both(&out, None, true).unwrap();
    assert_eq!(unsigned.signatures, "not checked: no key ring given");
    assert!(
        unsigned.sentence().contains("NOT SIGNED"),
        "{}",
        unsigned.sentence()
    );
}

#[tokio::test]
async fn verify_names_the_altered_event() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    cancel_reason(&out, 14, "tset");
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 14, "{reason}");
    assert!(reason.contains("altered"), "{reason}");
}

#[tokio::test]
async fn a_rehashed_history_fails_where_the_signatures_stop() {
    let app = spawn_app().await;
    history(&app).await;
    checkpoint::checkpoint_at(&app.client, &app.log, &key(), Some(6))
        .await
        .unwrap();
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    let original = out.parent().unwrap().join("original");
    copy_dir(&out, &original);
    cancel_reason(&out, 14, "paid");
    rehash(&out);
    // the checkpoint at 18 no longer matches: at it, the digest differs
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 0, "the manifest's signature is stale first: {reason}");
    drop_manifest_signature(&out);
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 18, "{reason}");
    assert!(reason.contains("differs from the checkpoint"), "{reason}");
    // deleting the checkpoints that no longer match leaves 7.. unsigned
    edit_checkpoints(&out, |cp| cp["seq"].as_u64() < Some(14));
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 7, "the first sequence no signature covers: {reason}");
    assert!(reason.contains("no valid signature"), "{reason}");
    let accepted = verify_both(&out, Some(&ring), true).unwrap();
    assert_eq!(
        (accepted.signed_up_to, accepted.unsigned_from),
        (Some(6), Some(7))
    );
    assert!(
        accepted
            .sentence()
            .contains("messages 7 to 18 are covered by no valid signature"),
        "{}",
        accepted.sentence()
    );
    // relabelling the key id of the stale checkpoint instead: refused
    copy_dir(&original, &out);
    cancel_reason(&out, 14, "paid");
    rehash(&out);
    drop_manifest_signature(&out);
    edit_checkpoints(&out, |cp| {
        if cp["seq"] == json!(18) {
            cp["key_id"] = json!("someone-else");
        }
        true
    });
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 18, "{reason}");
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test]
async fn a_relabelled_key_id_is_a_failure_not_a_skip() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    edit_checkpoints(&out, |cp| {
        cp["key_id"] = json!("unknown-key");
        true
    });
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 18, "{reason}");
    assert!(reason.contains("does not hold"), "{reason}");
    // a checkpoint signed by another key under the same id
    let other = CheckpointKey::from_hex("test-key", &"77".repeat(32)).unwrap();
    let other_ring = out.parent().unwrap().join("other.json");
    std::fs::write(
        &other_ring,
        json!({"keys": [other.ring_entry()]}).to_string(),
    )
    .unwrap();
    let (_d2, out2, _) = export_to(&app, &Filter::default()).await;
    let (seq, reason) = broken_at(verify_both(&out2, Some(&other_ring), false));
    assert_eq!(
        seq, 0,
        "the manifest's signature is checked first: {reason}"
    );
    drop_manifest_signature(&out2);
    let (seq, reason) = broken_at(verify_both(&out2, Some(&other_ring), false));
    assert_eq!(seq, 18, "{reason}");
    assert!(reason.contains("signature is invalid"), "{reason}");
}

#[tokio::test]
async fn forged_commits_appended_after_the_last_checkpoint_are_refused() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    // forge message 19 for a new job from a real one's line
    let mpath = out.join(export::MESSAGES_FILE);
    let mut ms = lines(&mpath);
    let mut forged: Value = serde_json::from_str(&ms[0]).unwrap();
    let body = forged["body"]
        .as_str()
        .unwrap()
        .replace("audit-0", "forged-1");
    forged["body"] = json!(body);
    forged["seq"] = json!(19);
    forged["subject"] = json!("flow.ev.job.forged-1");
    ms.push(forged.to_string());
    write_lines(&mpath, &ms);
    let ipath = out.join(export::INDEX_FILE);
    let mut idx = lines(&ipath);
    idx.push(json!({"seq": 19, "subject": "flow.ev.job.forged-1", "body_sha256": "00", "included": true}).to_string());
    write_lines(&ipath, &idx);
    rehash(&out);
    drop_manifest_signature(&out);
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 19, "{reason}");
    assert!(reason.contains("no valid signature"), "{reason}");
}

#[tokio::test]
async fn a_tail_dropped_with_its_checkpoint_is_refused() {
    let app = spawn_app().await;
    history(&app).await;
    checkpoint::checkpoint_at(&app.client, &app.log, &key(), Some(12))
        .await
        .unwrap();
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    for file in [export::MESSAGES_FILE, export::INDEX_FILE] {
        let path = out.join(file);
        let kept: Vec<String> = lines(&path)
            .into_iter()
            .filter(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64() <= Some(12))
            .collect();
        write_lines(&path, &kept);
    }
    edit_checkpoints(&out, |cp| cp["seq"].as_u64() <= Some(12));
    rehash(&out);
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(
        seq, 0,
        "the manifest no longer matches its signature: {reason}"
    );
    drop_manifest_signature(&out);
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 0, "{reason}");
    assert!(reason.contains("not signed"), "{reason}");
    // dropping the tail but leaving its checkpoint: truncated
    let (_d2, out2, ring2) = export_to(&app, &Filter::default()).await;
    for file in [export::MESSAGES_FILE, export::INDEX_FILE] {
        let path = out2.join(file);
        let mut ls = lines(&path);
        ls.truncate(ls.len() - 2);
        write_lines(&path, &ls);
    }
    let (seq, reason) = broken_at(verify_both(&out2, Some(&ring2), false));
    assert_eq!(
        seq, 18,
        "the signed checkpoint at 18 is past the end: {reason}"
    );
    assert!(reason.contains("truncated"), "{reason}");
}

#[tokio::test]
async fn manifest_edits_are_refused() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    let original = out.parent().unwrap().join("original");
    copy_dir(&out, &original);
    let mpath = out.join(export::MANIFEST_FILE);
    for (field, value) in [
        ("events_included", json!(17)),
        ("messages_included", json!(17)),
        ("messages_in_range", json!(19)),
    ] {
        copy_dir(&original, &out);
        let mut m = read_json(&mpath);
        m[field] = value;
        write_json(&mpath, &m);
        let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
        assert_eq!(seq, 0, "{field}: the signature fails first: {reason}");
        drop_manifest_signature(&out);
        let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
        assert_eq!(seq, 18, "{field}: {reason}");
        assert!(reason.contains("counts"), "{field}: {reason}");
    }
    // a junk manifest.sig with no ring and a kept digest: not vouched for
    copy_dir(&original, &out);
    std::fs::write(
        out.join(export::MANIFEST_SIG_FILE),
        r#"{"key_id":"x","signature":"00"}"#,
    )
    .unwrap();
    let kept = checkpoint::stream_digest(&app.log, None, Some(18))
        .await
        .unwrap();
    let no_ring = Options {
        expect: Some(kept),
        ..Default::default()
    };
    let (seq, reason) = broken_at(verify::verify_export(&out, &no_ring));
    assert_eq!(seq, 0, "{reason}");
    assert!(reason.contains("not checked"), "{reason}");
    // a v1-style claim that the chain is incomplete is not a field any more
    copy_dir(&original, &out);
    let mut m = read_json(&mpath);
    m["chain_complete"] = json!(false);
    write_json(&mpath, &m);
    let (seq, _) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 0);
}

#[tokio::test]
async fn a_commit_hidden_by_its_included_flag_is_refused() {
    let app = spawn_app().await;
    history(&app).await;
    let mut f = Filter::default();
    f.set_aggregate("job:audit-2").unwrap();
    let (_d, out, ring) = export_to(&app, &f).await;
    let s = verify_both(&out, Some(&ring), false).unwrap();
    assert_eq!((s.messages, s.events, s.aggregates), (18, 3, 1));
    // a range that starts mid-history verifies from its start digest
    let tail = Filter {
        from_seq: Some(10),
        ..Default::default()
    };
    let (_dt, out_tail, ring_tail) = export_to(&app, &tail).await;
    let s = verify_both(&out_tail, Some(&ring_tail), false).unwrap();
    assert_eq!((s.from_seq, s.to_seq, s.events), (10, 18, 9));
    // hide the aggregate's last commit (its cancellation): seq 15
    let ipath = out.join(export::INDEX_FILE);
    let mut idx = lines(&ipath);
    let i = line_for_seq(&idx, 15);
    let mut e: Value = serde_json::from_str(&idx[i]).unwrap();
    assert_eq!(e["included"], json!(true));
    e["included"] = json!(false);
    idx[i] = e.to_string();
    write_lines(&ipath, &idx);
    let mpath = out.join(export::MESSAGES_FILE);
    let mut ms = lines(&mpath);
    ms.remove(line_for_seq(&ms, 15));
    write_lines(&mpath, &ms);
    rehash(&out);
    drop_manifest_signature(&out);
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 15, "{reason}");
    assert!(reason.contains("hidden"), "{reason}");
    // an export may not select by what a verifier cannot check
    let by_type = Filter {
        event_type: Some("JobCancelled".into()),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let e = export::export(
        &app.client,
        &app.log,
        &by_type,
        &dir.path().join("x"),
        Some(&key()),
        &mut |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, export::ExportError::UncheckableFilter), "{e}");
}

#[tokio::test]
async fn an_edited_or_added_header_is_refused() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    let original = out.parent().unwrap().join("original");
    copy_dir(&out, &original);
    for (name, value) in [
        ("Nats-Expected-Last-Subject-Sequence", json!("3")),
        ("Nats-Msg-Id", json!("another-command")),
        ("Flowledger-Command-Hash", json!("00".repeat(32))),
        ("Flowledger-Format", json!("2")),
        ("X-Injected", json!("1")),
    ] {
        copy_dir(&original, &out);
        edit_message(&out, 13, |m| m["headers"][name] = value.clone());
        let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
        assert_eq!(seq, 13, "{name}: {reason}");
        assert!(reason.contains(name), "{name}: {reason}");
    }
}

#[tokio::test]
async fn an_export_taken_under_load_ends_on_its_own_signature() {
    let app = spawn_app().await;
    history(&app).await;
    let writer = {
        let client = app.nats_as(Who::Billing).clone();
        tokio::spawn(async move {
            for i in 0..400 {
                let body = json!({"job_id": format!("load-{i}"), "workflow_key": "invoice.extract",
                                  "client_id": "billing"});
                let reply = client
                    .request("flow.cmd.job.submit", body.to_string().into())
                    .await
                    .expect("a reply from the intake");
                let v: Value = serde_json::from_slice(&reply.payload).unwrap();
                assert_eq!(v["ok"], json!(true), "{v}");
            }
        })
    };
    let mut verified = 0;
    while !writer.is_finished() || verified == 0 {
        let (_d, out, ring) = export_to(&app, &Filter::default()).await;
        let s = verify_both(&out, Some(&ring), false).unwrap();
        assert_eq!(s.signed_up_to, Some(s.to_seq), "{s:?}");
        assert_eq!(s.unsigned_from, None);
        verified += 1;
    }
    writer.await.unwrap();
    assert!(app.last_seq().await >= 400 + 18);
}

#[tokio::test]
async fn verify_names_a_removed_event() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    // removed from the messages only
    let mpath = out.join(export::MESSAGES_FILE);
    let mut ls = lines(&mpath);
    ls.remove(line_for_seq(&ls, 7));
    write_lines(&mpath, &ls);
    assert_eq!(broken_at(verify_both(&out, Some(&ring), false)).0, 7);
    // removed from the messages and the index alike
    let ipath = out.join(export::INDEX_FILE);
    let mut idx = lines(&ipath);
    idx.remove(line_for_seq(&idx, 7));
    write_lines(&ipath, &idx);
    let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
    assert_eq!(seq, 7, "{reason}");
    assert!(reason.contains("missing"), "{reason}");
}

#[tokio::test]
async fn verify_names_two_swapped_events() {
    let app = spawn_app().await;
    history(&app).await;
    let (_d, out, ring) = export_to(&app, &Filter::default()).await;
    for file in [export::MESSAGES_FILE, export::INDEX_FILE] {
        let path = out.join(file);
        let original = lines(&path);
        let mut ls = original.clone();
        let (a, b) = (line_for_seq(&ls, 4), line_for_seq(&ls, 11));
        ls.swap(a, b);
        write_lines(&path, &ls);
        let (seq, reason) = broken_at(verify_both(&out, Some(&ring), false));
        assert_eq!(seq, 4, "{file}: {reason}");
        write_lines(&path, &original);
    }
}

#[tokio::test]
async fn a_kept_digest_proves_history_unchanged() {
    let app = spawn_app().await;
    history(&app).await;
    let kept = checkpoint::stream_digest(&app.log, None, None)
        .await
        .unwrap();
    app.submit("after-digest", "ad").await;
    let with = |expect| Options {
        expect: Some(expect),
        allow_unsigned: true,
        ..Default::default()
    };
    let s = verify::verify_live(&app.client, &app.log, None, &with(kept))
        .await
        .unwrap();
    assert_eq!(
        (s.to_seq, s.signed_up_to, s.unsigned_from),
        (19, None, Some(19))
    );
    // a kept digest covers what it names: up to 18, nothing else needed
    let strict = Options {
        expect: Some(kept),
        ..Default::default()
    };
    let s = verify::verify_live(&app.client, &app.log, Some(18), &strict)
        .await
        .unwrap();
    assert_eq!((s.signed_up_to, s.unsigned_from), (None, None));
    assert!(
        s.sentence().contains("covered by the digest you kept"),
        "{}",
        s.sentence()
    );
    let forged = Digest {
        seq: kept.seq,
        digest: chain::sha256(b"other history"),
    };
    assert_eq!(
        broken_at(verify::verify_live(&app.client, &app.log, None, &with(forged)).await).0,
        18
    );
    let beyond = Digest {
        seq: 99,
        digest: kept.digest,
    };
    assert_eq!(
        broken_at(verify::verify_live(&app.client, &app.log, None, &with(beyond)).await).0,
        99
    );
}

#[tokio::test]
async fn the_cli_exits_1_names_the_sequence_and_says_it_in_words() {
    let app = spawn_app().await;
    history(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut c = app.nats.cli(Who::Service);
        c.args(args)
            .env_remove("FLOWLEDGER_CHECKPOINT_KEY")
            .env_remove("FLOWLEDGER_CHECKPOINT_SIGNING_KEY")
            .env_remove("FLOWLEDGER_CHECKPOINT_KEYS");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    // a key made by keygen signs; its printed entry is the ring
    let seed = dir.path().join("seed");
    let made = run(
        &[
            "audit",
            "keygen",
            "--key-id",
            "2026-12",
            "--seed-out",
            seed.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        made.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let entry: Value = serde_json::from_slice(&made.stdout).unwrap();
    let ring = dir.path().join("ring.json");
    std::fs::write(&ring, json!({"keys": [entry]}).to_string()).unwrap();
    let again = run(
        &[
            "audit",
            "keygen",
            "--key-id",
            "x",
            "--seed-out",
            seed.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        again.status.code(),
        Some(2),
        "a seed file is never overwritten"
    );
    let seed_hex = std::fs::read_to_string(&seed).unwrap();
    let signer = [
        ("FLOWLEDGER_CHECKPOINT_SIGNING_KEY", seed_hex.trim()),
        ("FLOWLEDGER_CHECKPOINT_KEY_ID", "2026-12"),
    ];
    let out = dir.path().join("export");
    let exported = run(
        &["audit", "export", "--out", out.to_str().unwrap()],
        &signer,
    );
    assert_eq!(
        exported.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    // the seed read from the file its `_FILE` variable names signs alike
    let from_file = dir.path().join("export-from-file");
    let by_file = run(
        &["audit", "export", "--out", from_file.to_str().unwrap()],
        &[
            (
                "FLOWLEDGER_CHECKPOINT_SIGNING_KEY_FILE",
                seed.to_str().unwrap(),
            ),
            ("FLOWLEDGER_CHECKPOINT_KEY_ID", "2026-12"),
        ],
    );
    assert_eq!(
        by_file.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&by_file.stderr)
    );
    let ring_arg = ["--keys", ring.to_str().unwrap()];
    let verified = run(
        &[
            &["audit", "verify", "--export", from_file.to_str().unwrap()][..],
            &ring_arg,
        ]
        .concat(),
        &[],
    );
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let good = run(
        &[
            &["audit", "verify", "--export", out.to_str().unwrap()][..],
            &ring_arg,
        ]
        .concat(),
        &[],
    );
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        String::from_utf8_lossy(&good.stderr)
            .contains("intact and signed up to 18 of 18 by key 2026-12"),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let live = run(&[&["audit", "verify"][..], &ring_arg].concat(), &[]);
    assert_eq!(
        live.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let path = out.join(export::INDEX_FILE);
    let mut ls = lines(&path);
    ls.remove(line_for_seq(&ls, 5));
    write_lines(&path, &ls);
    let bad = run(
        &[
            &["audit", "verify", "--export", out.to_str().unwrap()][..],
            &ring_arg,
        ]
        .concat(),
        &[],
    );
    assert_eq!(bad.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["seq"], json!(5), "{v}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("broken at 5"));
    // no ring: nothing is signed, refused
    let unsigned = run(&["audit", "verify"], &[]);
    assert_eq!(
        unsigned.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&unsigned.stderr)
    );
    // the HMAC key of earlier versions is refused with what to do
    let legacy = run(
        &["audit", "checkpoint"],
        &[("FLOWLEDGER_CHECKPOINT_KEY", &"5a".repeat(32))],
    );
    assert_eq!(legacy.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&legacy.stderr).contains("audit keygen"));
    let empty = run(
        &["audit", "checkpoint"],
        &[("FLOWLEDGER_CHECKPOINT_SIGNING_KEY", "")],
    );
    assert_eq!(empty.status.code(), Some(2));
    let digest = run(&["audit", "digest"], &[]);
    let d = String::from_utf8(digest.stdout).unwrap();
    assert!(d.starts_with("18:"), "{d}");
    let usage = run(&["audit", "replay", "--aggregate", "job:a.b"], &[]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("--aggregate"));
    let by_type = run(
        &[
            "audit",
            "export",
            "--out",
            dir.path().join("t").to_str().unwrap(),
            "--type",
            "JobCancelled",
        ],
        &signer,
    );
    assert_eq!(by_type.status.code(), Some(2));
    let help = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/verify_export.py"
        ))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--keys"));
}

#[tokio::test]
async fn a_signer_that_loses_its_leadership_before_publishing_stores_nothing() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let app = spawn_app().await;
    history(&app).await;
    let stored = || async {
        checkpoint::load_all(&app.client, app.log.config())
            .await
            .unwrap()
    };
    // not leading at all: nothing is done
    let r = checkpoint::checkpoint_as_leader(&app.client, &app.log, &key(), || false)
        .await
        .unwrap();
    assert_eq!(r, checkpoint::Signing::NotLeader);
    // leading when it starts, lost while it signs: the publish is withheld
    let asked = AtomicU32::new(0);
    let r = checkpoint::checkpoint_as_leader(&app.client, &app.log, &key(), || {
        asked.fetch_add(1, Ordering::SeqCst) == 0
    })
    .await
    .unwrap();
    assert_eq!(r, checkpoint::Signing::NotLeader);
    assert!(
        asked.load(Ordering::SeqCst) >= 2,
        "asked again before the publish"
    );
    assert!(
        stored().await.is_empty(),
        "a stale leader stored a checkpoint"
    );
    // leading throughout: stored once, then found
    let r = checkpoint::checkpoint_as_leader(&app.client, &app.log, &key(), || true)
        .await
        .unwrap();
    let checkpoint::Signing::Stored(cp) = r else {
        panic!("not stored: {r:?}")
    };
    assert_eq!(cp.seq, 18);
    let again = checkpoint::checkpoint_as_leader(&app.client, &app.log, &key(), || true)
        .await
        .unwrap();
    assert_eq!(again, checkpoint::Signing::Existing(cp.clone()));
    assert_eq!(stored().await, vec![cp]);
}

#[tokio::test]
async fn checkpoints_continue_from_the_newest_usable_one_and_reuse_one_at_the_target() {
    let app = spawn_app().await;
    history(&app).await;
    let other = CheckpointKey::from_hex("other-key", &"cd".repeat(32)).unwrap();
    let at = |key: CheckpointKey, upto: Option<u64>| {
        let app = &app;
        async move {
            checkpoint::checkpoint_at(&app.client, &app.log, &key, upto)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let (c12, new) = at(key(), Some(12)).await;
    assert!(new);
    let (c18, new) = at(key(), None).await;
    assert!(new);
    // another key's checkpoint stored last is not a starting point for this key
    let (o18, _) = at(other.clone(), None).await;
    assert_eq!(o18.seq, 18);
    // at a target with one: found, past newer ones and another key's
    assert_eq!(at(key(), Some(12)).await, (c12.clone(), false));
    assert_eq!(at(key(), None).await, (c18.clone(), false));
    // between them: continues from 12, and the digest is the stream's
    let (c15, new) = at(key(), Some(15)).await;
    assert!(new);
    let whole = checkpoint::stream_digest(&app.log, None, Some(15))
        .await
        .unwrap();
    assert_eq!(c15.digest, chain::to_hex(&whole.digest));
    app.submit("audit-late", "late").await;
    let (c19, new) = at(key(), None).await;
    assert!(new);
    let whole = checkpoint::stream_digest(&app.log, None, None)
        .await
        .unwrap();
    assert_eq!((c19.seq, c19.digest), (19, chain::to_hex(&whole.digest)));
    let stored = checkpoint::load_all(&app.client, app.log.config())
        .await
        .unwrap();
    assert_eq!(stored.len(), 5, "nothing stored twice: {stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_whose_checkpoint_another_signer_beat_stores_nothing() {
    let app = spawn_app().await;
    history(&app).await;
    let other = CheckpointKey::from_hex("other-key", &"cd".repeat(32)).unwrap();
    let runtime = tokio::runtime::Handle::current();
    let asked = std::sync::atomic::AtomicU32::new(0);
    // right before this signer publishes (the second time it asks whether
    // it leads), another one stores a checkpoint
    let r = checkpoint::checkpoint_as_leader(&app.client, &app.log, &key(), || {
        if asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return true;
        }
        tokio::task::block_in_place(|| {
            runtime.block_on(checkpoint::checkpoint_at(
                &app.client,
                &app.log,
                &other,
                None,
            ))
        })
        .unwrap();
        true
    })
    .await
    .unwrap();
    assert_eq!(r, checkpoint::Signing::Raced);
    let stored = checkpoint::load_all(&app.client, app.log.config())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key_id, "other-key");
    // the next round stores its own
    let r = checkpoint::checkpoint_as_leader(&app.client, &app.log, &key(), || true)
        .await
        .unwrap();
    assert!(matches!(r, checkpoint::Signing::Stored(_)), "{r:?}");
}
