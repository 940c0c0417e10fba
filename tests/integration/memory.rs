//! Conversation memory (issue 14) against real nats-server and OpenBao:
//! personal text is sealed before it reaches the log, a fact's history,
//! one client cannot reach another's subjects, and erasure destroys the
//! subject's key while `audit verify` still passes, live and on an export.

use std::sync::Arc;
use std::time::Duration;

use flowledger::audit::verify::{self, Options};
use flowledger::audit::{export, read::Filter};
use flowledger::commands::memory::aggregate_id;
use flowledger::commands::secret_access::policy::SecretPolicy;
use flowledger::crypto::Sealed;
use flowledger::memory::keys::{KeyError, SubjectKeys};
use flowledger::memory::service::{AssembleDefaults, Chunking, MemoryService};
use flowledger::secrets::service::{SecretRules, SecretService};
use flowledger::secrets::vault::{VaultAuth, VaultClient, VaultConfig};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::openbao::OpenBao;
use crate::secrets::{contains, files_under};

const KEY_PATH: &str = "secret/data/flowledger/memory-keys";

/// The memory service on `bao` (root token), sealing with keys under
/// [`KEY_PATH`].
async fn memory_on(bao: &OpenBao) -> Arc<MemoryService> {
    let vault = VaultClient::connect(VaultConfig {
        addr: bao.addr(),
        auth: VaultAuth::Token(bao.root_token().to_string()),
        timeout: Duration::from_secs(2),
    })
    .await
    .expect("connect to OpenBao");
    let secrets = Arc::new(SecretService::new(
        vault,
        SecretPolicy::new(vec![]).expect("no rules is a valid policy"),
        SecretRules {
            cache_ttl: Duration::from_secs(60),
            max_staleness: Duration::from_secs(600),
            retry_attempts: 2,
            retry_base: Duration::from_millis(50),
        },
    ));
    let keys = SubjectKeys::new(secrets, KEY_PATH, Duration::from_secs(60));
    Arc::new(MemoryService::new(
        Arc::new(keys),
        Chunking { max_chars: 200 },
        AssembleDefaults {
            top_k: 5,
            recent_episodes: 5,
            budget_ms: 2000,
        },
    ))
}

fn sealed_in(data: &Value, field: &str) -> Sealed {
    serde_json::from_value(data[field].clone()).expect("a sealed field")
}

#[tokio::test]
async fn personal_text_is_sealed_facts_keep_history_and_erasure_leaves_a_verifiable_log() {
    const ALICE: [&str; 5] = [
        "PLANTED-alice-turn-4411",
        "PLANTED-alice-reply-8123",
        "PLANTED-alice-colour-1",
        "planted.alice@example.test",
        "PLANTED-alice-intent-77",
    ];
    const BOB: &str = "PLANTED-bob-turn-9051";
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let bao = OpenBao::start().await;
    let memory = memory_on(&bao).await;
    let app = spawn_app_with_memory(
        crate::helpers::NatsServer::start(),
        flowledger::events::log::LogConfig::default(),
        None,
        Some(memory.clone()),
    )
    .await;
    // over NATS, as billing (a client)
    let wb = |subject: &str, text: &str, facts: Value| {
        json!({
            "subject_id": subject,
            "messages": [{"role": "user", "content": format!("hello, I am {text}")}],
            "response": ALICE[1],
            "facts": facts,
        })
    };
    let r = app
        .send_as(
            Who::Billing,
            "memory.writeback",
            wb(
                "u-alice",
                ALICE[0],
                json!([{"subject": "user", "key": "colour", "value": ALICE[2]}]),
            ),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["events"],
        json!(["MemorySubjectOpened", "EpisodeRecorded", "FactRecorded"]),
        "{r}"
    );
    // the same fact value again records nothing new about the fact; two
    // changes make versions 2 and 3
    for (value, want) in [
        (ALICE[2], json!([])),
        ("green", json!(["FactRecorded"])),
        ("red", json!(["FactRecorded"])),
    ] {
        let r = app
            .send_as(
                Who::Billing,
                "memory.writeback",
                json!({"subject_id": "u-alice", "facts": [{"subject": " User", "key": "Colour", "value": value, "confidence": 0.8}]}),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["events"], want, "{r}");
        assert_eq!(r["unchanged"] == true, want == json!([]), "{r}");
    }
    for (command, body) in [
        (
            "memory.profile",
            json!({"subject_id": "u-alice", "fields": {"email": ALICE[3], "tags": ["vip"]}}),
        ),
        (
            "memory.working_state_set",
            json!({"subject_id": "u-alice", "key": "intent", "value": ALICE[4], "ttl_seconds": 600}),
        ),
    ] {
        let r = app.send_as(Who::Billing, command, body).await;
        assert_eq!(r["ok"], true, "{command}: {r}");
    }
    let r = app
        .send_as(
            Who::Billing,
            "memory.writeback",
            wb("u-bob", BOB, json!([])),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");

    // the fact's versions in the log, each sealed
    let alice = aggregate_id("billing", "u-alice");
    let events = log_events(&app).await;
    let versions: Vec<u64> = events
        .iter()
        .filter(|e| e.aggregate_id == alice && e.event_type == "FactRecorded")
        .map(|e| e.data["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    assert!(events
        .iter()
        .filter(|e| e.aggregate_type == "memory")
        .all(|e| e.actor.client_id == "billing" && e.actor.user_id.is_none()));
    // the subject's key opens its episode: the content is there, sealed
    let episode = events
        .iter()
        .find(|e| e.aggregate_id == alice && e.event_type == "EpisodeRecorded")
        .unwrap();
    let key = memory.keys().get(&alice).await.expect("alice's key");
    let turn = key.open_json(&sealed_in(&episode.data, "turn")).unwrap();
    assert!(turn.to_string().contains(ALICE[0]), "{turn}");

    // another client names the same subject id: another subject, not alice's
    let r = app
        .send_as(
            Who::Ops,
            "memory.forget",
            json!({"subject_id": "u-alice", "subject": "user", "key": "colour"}),
        )
        .await;
    assert_eq!(code(&r), "not_found", "{r}");
    // bad input names its field
    let r = app
        .send_as(
            Who::Billing,
            "memory.writeback",
            json!({"subject_id": "alice@example.test", "response": "x"}),
        )
        .await;
    assert_eq!(r["error"]["field"], "subject_id", "{r}");

    // erase alice
    let r = app
        .send_as(
            Who::Billing,
            "memory.erase",
            json!({"subject_id": "u-alice", "reason": "data_subject_request"}),
        )
        .await;
    assert_eq!(r["events"], json!(["MemorySubjectErased"]), "{r}");
    memory.keys().forget(&alice);
    assert!(matches!(
        memory.keys().get(&alice).await,
        Err(KeyError::Erased)
    ));
    // OpenBao holds a tombstone; the version that held the key is destroyed
    let (status, body) = bao
        .api(
            "GET",
            &format!("secret/data/flowledger/memory-keys/{alice}?version=1"),
            None,
        )
        .await;
    assert!(
        status == 404 || body["data"]["data"].is_null(),
        "{status} {body}"
    );
    let (_, meta) = bao
        .api(
            "GET",
            &format!("secret/metadata/flowledger/memory-keys/{alice}"),
            None,
        )
        .await;
    assert_eq!(meta["data"]["versions"]["1"]["destroyed"], true, "{meta}");
    // nothing more for alice; bob is untouched
    let r = app
        .send_as(
            Who::Billing,
            "memory.writeback",
            wb("u-alice", "again", json!([])),
        )
        .await;
    assert_eq!(code(&r), "rejected", "{r}");
    let bob = aggregate_id("billing", "u-bob");
    let bob_episode = log_events(&app)
        .await
        .into_iter()
        .find(|e| e.aggregate_id == bob && e.event_type == "EpisodeRecorded")
        .unwrap();
    let bob_key = memory.keys().get(&bob).await.expect("bob's key");
    let bob_turn = bob_key
        .open_json(&sealed_in(&bob_episode.data, "turn"))
        .unwrap();
    assert!(bob_turn.to_string().contains(BOB));

    // the chain still verifies, live and from an export
    let options = Options {
        allow_unsigned: true,
        ..Default::default()
    };
    let live = verify::verify_live(&app.client, &app.log, None, &options)
        .await
        .expect("the live log verifies after erasure");
    assert!(live.events >= 9, "{live:?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    export::export(
        &app.client,
        &app.log,
        &Filter::default(),
        &out,
        None,
        &mut |_, _| {},
    )
    .await
    .expect("export");
    verify::verify_export(&out, &options).expect("the export verifies after erasure");

    // replay shows alice's sealed fields as erased, bob's as stored
    let mut replayed = Vec::new();
    flowledger::audit::read::replay(&app.log, &Filter::default(), &mut replayed)
        .await
        .expect("replay");
    let lines: Vec<Value> = String::from_utf8(replayed)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let episodes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event_type"] == "EpisodeRecorded")
        .collect();
    assert_eq!(episodes.len(), 2);
    for e in episodes {
        let is_alice = e["aggregate_id"] == alice.as_str();
        assert_eq!(e["erased"] == true, is_alice, "{e}");
        assert_eq!(
            e["data"]["turn"] == json!({"erased": true}),
            is_alice,
            "{e}"
        );
    }

    // no planted string in plaintext: the stream on disk, the export, the log
    app.client.flush().await.unwrap();
    let stored = files_under(&app.nats.store_dir());
    assert!(stored
        .iter()
        .any(|(_, b)| contains(b, "MemorySubjectErased")));
    let logged = logs.0.lock().unwrap().clone();
    assert!(!logged.is_empty(), "the capture saw the service's log");
    let places: Vec<(String, Vec<u8>)> = stored
        .into_iter()
        .chain(files_under(&out))
        .map(|(p, b)| (p.display().to_string(), b))
        .chain([("the service's log".to_string(), logged)])
        .collect();
    for planted in ALICE.iter().chain([&BOB]) {
        for (place, bytes) in &places {
            assert!(!contains(bytes, planted), "{planted} is in {place}");
        }
    }
}
