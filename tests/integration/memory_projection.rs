//! The memory read model (issue 14) against real PostgreSQL 18, OpenBao and
//! nats-server: memory commands through the memory service and the bus,
//! rows in the `memory_*` views opened with each subject's key; a fact
//! changed twice has three versions with validity intervals; an erasure
//! deletes that subject's rows and no other's; the CLI's rebuild after an
//! erasure (keys destroyed) equals the live read model; a key missing from
//! Vault is a poison whose reason holds no plaintext; Vault down is
//! unavailable, not a poison.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use flowledger::memory::service::MemoryService;
use flowledger::projections::rebuild::{self, RebuildError};
use flowledger::projections::ReadModel;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::openbao::OpenBao;

/// The memory views and the order their rows are compared in.
const VIEWS: [(&str, &str); 6] = [
    ("memory_subjects", "aggregate_id"),
    ("memory_profiles", "aggregate_id"),
    ("memory_episodes", "aggregate_id, episode_id"),
    ("memory_chunks", "aggregate_id, episode_id, idx"),
    ("memory_facts", "aggregate_id, fact_id, version"),
    ("memory_working_state", "aggregate_id, key"),
];

fn body<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid memory request body")
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().expect("an RFC 3339 literal")
}

async fn snapshot(read: &ReadSide) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for (view, order) in VIEWS {
        out.push((view.to_string(), read.snapshot(view, order).await));
    }
    out
}

/// The rows of `aggregate_id` in every view but `memory_subjects`.
async fn rows_of(read: &ReadSide, aggregate_id: &str) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for (view, _) in &VIEWS[1..] {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {view} WHERE aggregate_id = $1"
        ))
        .bind(aggregate_id)
        .fetch_one(&read.pool)
        .await
        .expect("count rows");
        out.push((view.to_string(), n));
    }
    out
}

/// version, value, valid_from, invalid_at, subject, confidence
type FactVersion = (
    i32,
    Value,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
    f64,
);

fn aggregate(owner: &str, subject_id: &str) -> String {
    flowledger::commands::memory::aggregate_id(owner, subject_id)
}

/// Alice's turn, facts, profile and working state; Bob's turn and profile.
async fn write_memories(memory: &MemoryService, bus: &flowledger::bus::CommandBus) {
    let t0 = t("2026-12-01T10:00:00Z");
    let w = memory
        .writeback(
            bus,
            "billing",
            body(json!({
                "subject_id": "alice",
                "turn_id": "turn-1",
                "timestamp": "2026-12-01T09:59:00Z",
                "messages": [
                    {"role": "user", "content": "I drive a red Volvo to Göteborg every week"},
                    {"role": "system", "content": "be brief"},
                ],
                "response": "Noted: the red Volvo.",
                "facts": [
                    {"subject": "user", "key": "car_colour", "value": "red", "confidence": 0.9},
                    {"subject": "user", "key": "pet", "value": {"kind": "cat", "name": "Mio"}},
                ],
            })),
            t0,
        )
        .await
        .expect("alice's writeback");
    assert_eq!(w.episode_id.as_deref(), Some("turn-1"));
    // the car's colour changes twice: three versions
    for (i, colour) in ["blue", "green"].iter().enumerate() {
        memory
            .writeback(
                bus,
                "billing",
                body(json!({
                    "subject_id": "alice",
                    "facts": [{"subject": "User", "key": "car_colour", "value": colour}],
                })),
                t0 + TimeDelta::hours(i as i64 + 1),
            )
            .await
            .expect("a changed fact");
    }
    memory
        .forget(
            bus,
            "billing",
            body(json!({"subject_id": "alice", "subject": "user", "key": "pet"})),
            None,
            t0 + TimeDelta::hours(3),
        )
        .await
        .expect("forget the pet");
    for fields in [
        json!({"subject_id": "alice", "fields": {"email": "alice@example.org",
            "full_name": "Alice Andersson", "tags": ["vip"]}}),
        json!({"subject_id": "alice", "fields": {"full_name": null, "tags": ["vip", "volvo"]}}),
    ] {
        memory
            .profile(bus, "billing", body(fields), None)
            .await
            .expect("a profile update");
    }
    for key in ["draft", "cart"] {
        memory
            .working_set(
                bus,
                "billing",
                body(
                    json!({"subject_id": "alice", "key": key, "value": {"items": [key]},
                    "ttl_seconds": 3600}),
                ),
                None,
                t0,
            )
            .await
            .expect("set working state");
    }
    memory
        .working_delete(
            bus,
            "billing",
            body(json!({"subject_id": "alice", "key": "cart"})),
            false,
            None,
            t0,
        )
        .await
        .expect("delete working state");
    memory
        .writeback(
            bus,
            "billing",
            body(json!({
                "subject_id": "bob",
                "turn_id": "turn-b",
                "messages": [{"role": "user", "content": "My bike is yellow"}],
                "response": "A yellow bike.",
                "facts": [{"subject": "user", "key": "bike", "value": "yellow"}],
            })),
            t0,
        )
        .await
        .expect("bob's writeback");
    memory
        .profile(
            bus,
            "billing",
            body(json!({"subject_id": "bob", "fields": {"email": "bob@example.org"}})),
            None,
        )
        .await
        .expect("bob's profile");
    memory
        .working_set(
            bus,
            "billing",
            body(json!({"subject_id": "bob", "key": "draft", "value": "x", "ttl_seconds": 60})),
            None,
            t0,
        )
        .await
        .expect("bob's working state");
}

async fn caught_up(read: &ReadSide, app: &TestApp) {
    let rows = read.caught_up(&app.log).await;
    let memory = rows
        .iter()
        .find(|r| r.name == "memory")
        .expect("the memory read model runs where [memory] is configured");
    assert_eq!(memory.state, "running", "{memory:?}");
}

#[tokio::test]
async fn memory_read_model_rows_erasure_and_a_cli_rebuild_that_equals_live() {
    let bao = OpenBao::start().await;
    let app = spawn_app().await;
    let memory = memory_service(&bao).await;
    let read = spawn_api_with_memory(&app, true, pgvector_database().await, memory.clone()).await;
    write_memories(&memory, &read.bus).await;
    caught_up(&read, &app).await;
    let (alice, bob) = (aggregate("billing", "alice"), aggregate("billing", "bob"));

    // subjects
    let subjects = read.snapshot("memory_subjects", "subject_id").await;
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert_eq!(subjects[0]["aggregate_id"], json!(alice));
    assert_eq!(subjects[0]["owner"], json!("billing"));
    assert!(subjects[0]["erased_at"].is_null());

    // the episode, opened, and its chunks (message 0, 1, then the response)
    let (turn, turn_at): (Value, DateTime<Utc>) = sqlx::query_as(
        "SELECT turn, turn_at FROM memory_episodes WHERE aggregate_id = $1 AND episode_id = $2",
    )
    .bind(&alice)
    .bind("turn-1")
    .fetch_one(&read.pool)
    .await
    .expect("alice's episode");
    assert_eq!(turn_at, t("2026-12-01T09:59:00Z"));
    assert_eq!(turn["response"], json!("Noted: the red Volvo."));
    assert_eq!(
        turn["messages"][1],
        json!({"role": "system", "content": "be brief"})
    );
    let chunks: Vec<(i32, String)> = sqlx::query_as(
        "SELECT idx, text FROM memory_chunks WHERE aggregate_id = $1 ORDER BY episode_id, idx",
    )
    .bind(&alice)
    .fetch_all(&read.pool)
    .await
    .expect("alice's chunks");
    assert_eq!(
        chunks,
        [
            (0, "I drive a red Volvo to Göteborg every week".to_string()),
            (1, "be brief".to_string()),
            (2, "Noted: the red Volvo.".to_string()),
        ]
    );
    let hits: Vec<(String, i32)> = sqlx::query_as(
        "SELECT aggregate_id, idx FROM memory_chunks \
         WHERE tsv @@ plainto_tsquery('english', 'volvos') ORDER BY idx",
    )
    .fetch_all(&read.pool)
    .await
    .expect("full-text search");
    assert_eq!(hits, [(alice.clone(), 0), (alice.clone(), 2)]);

    // the car's colour: three versions, each valid until the next
    let versions: Vec<FactVersion> = sqlx::query_as(
        "SELECT version, value, valid_from, invalid_at, subject, confidence FROM memory_facts \
             WHERE aggregate_id = $1 AND key = 'car_colour' ORDER BY version",
    )
    .bind(&alice)
    .fetch_all(&read.pool)
    .await
    .expect("the car's versions");
    let t0 = t("2026-12-01T10:00:00Z");
    let h = TimeDelta::hours;
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.0, v.1.clone(), v.2, v.3))
            .collect::<Vec<_>>(),
        [
            (1, json!("red"), t0, Some(t0 + h(1))),
            (2, json!("blue"), t0 + h(1), Some(t0 + h(2))),
            (3, json!("green"), t0 + h(2), None),
        ]
    );
    assert!(versions.iter().all(|v| v.4 == "user"));
    assert_eq!((versions[0].5, versions[2].5), (0.9, 1.0));
    let pet: (Value, Option<DateTime<Utc>>, Option<String>) = sqlx::query_as(
        "SELECT value, invalid_at, episode_id FROM memory_facts \
         WHERE aggregate_id = $1 AND key = 'pet'",
    )
    .bind(&alice)
    .fetch_one(&read.pool)
    .await
    .expect("the forgotten pet");
    assert_eq!(
        pet,
        (
            json!({"kind": "cat", "name": "Mio"}),
            Some(t0 + h(3)),
            Some("turn-1".into())
        )
    );

    // the profile: merged, the null removed the field
    let fields: Value =
        sqlx::query_scalar("SELECT fields FROM memory_profiles WHERE aggregate_id = $1")
            .bind(&alice)
            .fetch_one(&read.pool)
            .await
            .expect("alice's profile");
    assert_eq!(
        fields,
        json!({"email": "alice@example.org", "tags": ["vip", "volvo"]})
    );

    // working state: the deleted key is gone
    let working: Vec<(String, Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT key, value, expires_at FROM memory_working_state WHERE aggregate_id = $1",
    )
    .bind(&alice)
    .fetch_all(&read.pool)
    .await
    .expect("alice's working state");
    assert_eq!(
        working,
        [("draft".to_string(), json!({"items": ["draft"]}), t0 + h(1))]
    );

    // erase alice: her rows go, the subject is marked, bob is untouched
    let bob_before = rows_of(&read, &bob).await;
    let bob_rows_before = snapshot(&read).await;
    assert!(bob_before.iter().all(|(_, n)| *n > 0), "{bob_before:?}");
    memory
        .erase(
            &read.bus,
            "billing",
            "billing",
            "alice",
            "data_subject_request".into(),
        )
        .await
        .expect("erase alice");
    caught_up(&read, &app).await;
    assert!(
        rows_of(&read, &alice).await.iter().all(|(_, n)| *n == 0),
        "{:?}",
        rows_of(&read, &alice).await
    );
    let marked: (Option<DateTime<Utc>>, Option<String>, i64) = sqlx::query_as(
        "SELECT erased_at, erase_reason, last_seq FROM memory_subjects WHERE aggregate_id = $1",
    )
    .bind(&alice)
    .fetch_one(&read.pool)
    .await
    .expect("alice's subject row");
    assert!(marked.0.is_some());
    assert_eq!(marked.1.as_deref(), Some("data_subject_request"));
    assert_eq!(marked.2 as u64, app.last_seq().await);
    assert_eq!(rows_of(&read, &bob).await, bob_before);
    let only_bob = |snap: &[(String, Vec<Value>)]| -> Vec<Value> {
        snap.iter()
            .flat_map(|(_, rows)| rows.iter())
            .filter(|r| r["aggregate_id"] == json!(bob))
            .cloned()
            .collect()
    };
    let live = snapshot(&read).await;
    assert_eq!(only_bob(&live), only_bob(&bob_rows_before));

    // the CLI: refused without [memory], then a rebuild with the keys (a
    // fresh process: no key cached) equals the live rows
    let refused = cli_rebuild(&app, &read, None).await;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("cannot rebuild memory") && stderr.contains("[memory]"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("flowledger.toml");
    std::fs::write(
        &config,
        format!(
            "[secrets]\nvault_addr = \"{}\"\ntoken_env = \"TEST_BAO_TOKEN\"\n\n\
             [memory]\nenabled = true\nkey_path = \"{MEMORY_KEY_PATH}\"\n",
            bao.addr()
        ),
    )
    .expect("write the configuration");
    let out = cli_rebuild(&app, &read, Some((&config, bao.root_token()))).await;
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("the rebuild's report");
    assert_eq!(report["name"], json!("memory"));
    assert_eq!(report["new_version"], json!(2), "{report}");
    assert_eq!(snapshot(&read).await, live);
    // and the live projection continues on the new version
    memory
        .profile(
            &read.bus,
            "billing",
            body(json!({"subject_id": "bob", "fields": {"full_name": "Bob"}})),
            None,
        )
        .await
        .expect("bob's profile again");
    caught_up(&read, &app).await;
    let fields: Value =
        sqlx::query_scalar("SELECT fields FROM memory_profiles_v2 WHERE aggregate_id = $1")
            .bind(&bob)
            .fetch_one(&read.pool)
            .await
            .expect("bob's profile on v2");
    assert_eq!(
        fields,
        json!({"email": "bob@example.org", "full_name": "Bob"})
    );
}

/// `flowledger projections rebuild memory` on the read side's database;
/// with `config`, the configuration file and the Vault token it names.
async fn cli_rebuild(
    app: &TestApp,
    read: &ReadSide,
    config: Option<(&std::path::Path, &str)>,
) -> std::process::Output {
    let mut cmd = app.nats.cli(Who::Service);
    cmd.args([
        "projections",
        "rebuild",
        "memory",
        "--database-url",
        &read.url,
    ])
    .env_remove("FLOWLEDGER_CONFIG");
    if let Some((path, token)) = config {
        cmd.arg("--config").arg(path).env("TEST_BAO_TOKEN", token);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run flowledger"))
        .await
        .expect("the CLI ran")
}

#[tokio::test]
async fn a_key_missing_from_vault_is_a_poison_without_plaintext_and_vault_down_is_unavailable() {
    let mut bao = OpenBao::start().await;
    let app = spawn_app().await;
    let memory = memory_service(&bao).await;
    let read = spawn_api_with_memory(&app, true, pgvector_database().await, memory.clone()).await;
    memory
        .writeback(
            &read.bus,
            "billing",
            body(json!({"subject_id": "carol", "turn_id": "t-1",
                "messages": [{"role": "user", "content": "planted-carol-words"}],
                "response": "ok"})),
            Utc::now(),
        )
        .await
        .expect("carol's writeback");
    caught_up(&read, &app).await;
    let carol = aggregate("billing", "carol");
    assert_eq!(
        rows_of(&read, &carol).await[1..3],
        [
            ("memory_episodes".to_string(), 1),
            ("memory_chunks".to_string(), 2)
        ]
    );

    // Vault down: a rebuild (which has no key cached) is interrupted, not
    // stopped on a poison
    let fresh = memory_service_keys_only(&bao).await;
    bao.stop();
    match rebuild::rebuild_with_keys(&read.pool, &app.log, ReadModel::Memory, Some(fresh)).await {
        Err(RebuildError::Unavailable(why, name)) => {
            assert_eq!(name, "memory");
            assert!(!why.contains("planted"), "{why}");
        }
        other => panic!("unavailable while Vault is down, got {other:?}"),
    }

    // a dev server comes back empty: carol's key is missing, a poison at her
    // episode's sequence, whose reason says why without her words
    bao.start_again().await;
    let episode_seq: i64 =
        sqlx::query_scalar("SELECT seq FROM memory_episodes WHERE aggregate_id = $1")
            .bind(&carol)
            .fetch_one(&read.pool)
            .await
            .expect("carol's episode");
    let fresh = memory_service_keys_only(&bao).await;
    match rebuild::rebuild_with_keys(&read.pool, &app.log, ReadModel::Memory, Some(fresh)).await {
        Err(RebuildError::Poison { seq, reason, .. }) => {
            assert_eq!(seq as i64, episode_seq);
            assert!(
                reason.contains("EpisodeRecorded") && reason.contains(&carol),
                "{reason}"
            );
            assert!(!reason.contains("planted"), "{reason}");
        }
        other => panic!("a poison for the missing key, got {other:?}"),
    }
    // readers still see the live version, whole
    assert_eq!(rows_of(&read, &carol).await[1].1, 1);
    // and without keys the memory read model is refused before anything
    match rebuild::rebuild(&read.pool, &app.log, ReadModel::Memory).await {
        Err(RebuildError::Context(e)) => assert!(e.to_string().contains("[memory]"), "{e}"),
        other => panic!("refused without keys, got {other:?}"),
    }
}

/// The keys of a memory service of its own (an empty key cache).
async fn memory_service_keys_only(bao: &OpenBao) -> Arc<flowledger::memory::keys::SubjectKeys> {
    memory_service(bao).await.keys().clone()
}
