//! Conversation memory (issue 14) against real nats-server and OpenBao:
//! personal text is sealed before it reaches the log, a fact's history,
//! one client cannot reach another's subjects, and erasure destroys the
//! subject's key while `audit verify` still passes, live and on an export.

use std::time::Duration;

use flowledger::audit::verify::{self, Options};
use flowledger::audit::{export, read::Filter};
use flowledger::commands::limits::MAX_CLEANUP_ITEMS;
use flowledger::commands::memory::aggregate_id;
use flowledger::crypto::Sealed;
use flowledger::memory::keys::KeyError;
use flowledger::memory::service::{Chunking, MemoryService, Retention};
use flowledger::projections::{rebuild, ReadModel};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::openbao::OpenBao;
use crate::secrets::{contains, files_under};

fn sealed_in(data: &Value, field: &str) -> Sealed {
    serde_json::from_value(data[field].clone()).expect("a sealed field")
}

#[tokio::test]
async fn personal_text_is_sealed_facts_keep_history_and_erasure_leaves_a_verifiable_log() {
    if ran_alone(
        "memory::personal_text_is_sealed_facts_keep_history_and_erasure_leaves_a_verifiable_log",
    )
    .await
    {
        return;
    }
    const ALICE: [&str; 5] = [
        "PLANTED-alice-turn-4411",
        "PLANTED-alice-reply-8123",
        "PLANTED-alice-colour-1",
        "planted.alice@example.test",
        "PLANTED-alice-intent-77",
    ];
    const BOB: &str = "PLANTED-bob-turn-9051";
    let logs = capture_logs(tracing::Level::DEBUG);

    let bao = OpenBao::start().await;
    let memory = memory_service(&bao).await;
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
                json!({"subject_id": "u-alice", "facts": [{"subject": " User", "key": "Colour", "value": value}]}),
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

/// Polls `assemble` until `done` holds for its answer.
async fn assemble_until(api: &ReadSide, body: Value, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = api
            .post("/v1/memory/assemble", BILLING_TOKEN, body.clone())
            .await;
        if a.status == 200 && done(&a.body) {
            return a.body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "assemble never answered as expected: {} {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn over_http_writeback_then_assemble_returns_the_turns_facts_and_live_working_state_to_its_client_only(
) {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let memory = memory_service(&bao).await;
    let api = spawn_api_with_memory(&app, true, fresh_database().await, memory.clone()).await;
    let post = |path: &'static str, token: &'static str, body: Value| {
        let api = &api;
        async move { api.post(path, token, body).await }
    };
    let turns = [
        (
            "My car is a red Volvo estate, bought in 2019.",
            "A red Volvo, noted.",
        ),
        (
            "We spend every summer holiday in Portugal.",
            "Portugal in summer, lovely.",
        ),
        (
            "I am allergic to peanuts, please remember.",
            "No peanuts, understood.",
        ),
    ];
    for (i, (said, answered)) in turns.iter().enumerate() {
        let city = ["Lyon", "Paris", "Porto"][i];
        let a = post(
            "/v1/memory/writeback",
            BILLING_TOKEN,
            json!({
                "subject_id": "cust-1",
                "turn_id": format!("t{i}"),
                "timestamp": format!("2026-12-0{}T10:00:00Z", i + 1),
                "messages": [{"role": "user", "content": said}],
                "response": answered,
                "facts": [{"subject": "user", "key": "city", "value": city}],
            }),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    // the same turn again answers the first receipt; another body under its id is a conflict
    let again = post(
        "/v1/memory/writeback",
        BILLING_TOKEN,
        json!({"subject_id": "cust-1", "turn_id": "t0", "timestamp": "2026-12-01T10:00:00Z",
               "messages": [{"role": "user", "content": turns[0].0}], "response": turns[0].1,
               "facts": [{"subject": "user", "key": "city", "value": "Lyon"}]}),
    )
    .await;
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    let reused = post(
        "/v1/memory/writeback",
        BILLING_TOKEN,
        json!({"subject_id": "cust-1", "turn_id": "t0", "response": "something else"}),
    )
    .await;
    assert_eq!(reused.status, 409, "{}", reused.body);
    for (key, ttl) in [("intent", 600), ("flash", 1)] {
        let a = post(
            "/v1/memory/working-state-set",
            BILLING_TOKEN,
            json!({"subject_id": "cust-1", "key": key, "value": {"k": key}, "ttl_seconds": ttl}),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let a = post(
        "/v1/memory/profile",
        BILLING_TOKEN,
        json!({"subject_id": "cust-1", "fields": {"full_name": "Ann Example", "tags": ["vip"]}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let ask = json!({"subject_id": "cust-1", "query": "which car does the customer drive"});
    // read your own write: with the last command's stream_seq, the first
    // assemble already shows it (it waits for the read model, in its budget)
    let last_seq = a.body["stream_seq"]
        .as_u64()
        .expect("a receipt's stream_seq");
    let mut own = ask.clone();
    own["after_seq"] = json!(last_seq);
    let first = post("/v1/memory/assemble", BILLING_TOKEN, own).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        first.body["profile"]["full_name"], "Ann Example",
        "{}",
        first.body
    );
    assert_eq!(
        first.body["working_state"]["intent"]["value"],
        json!({"k": "intent"})
    );
    // a sequence no command was answered yet is past the end of the log
    let mut ahead = ask.clone();
    ahead["after_seq"] = json!(last_seq + 1_000);
    let late = post("/v1/memory/assemble", BILLING_TOKEN, ahead).await;
    assert_eq!(
        (late.status, late.body["error"]["param"].clone()),
        (400, json!("after_seq")),
        "{}",
        late.body
    );
    assert!(
        late.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("past the end of the log")),
        "{}",
        late.body
    );
    let mut zero = ask.clone();
    zero["after_seq"] = json!(0);
    let zero = post("/v1/memory/assemble", BILLING_TOKEN, zero).await;
    assert_eq!(
        (zero.status, zero.body["error"]["param"].clone()),
        (400, json!("after_seq")),
        "{}",
        zero.body
    );
    let got = assemble_until(&api, ask.clone(), |b| {
        b["chunks"].as_array().is_some_and(|c| !c.is_empty()) && !b["profile"].is_null()
    })
    .await;
    let top = got["chunks"][0]["text"].as_str().unwrap();
    assert!(top.contains("Volvo"), "{got}");
    assert!(got["chunks"][0]["score"].as_f64().unwrap() > 0.0, "{got}");
    assert!(
        got["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| !c["text"].as_str().unwrap().contains("peanuts")),
        "a chunk that shares no word with the query is not returned: {got}"
    );
    assert_eq!(got["retrieval"], "full_text");
    assert_eq!(got["recent_episodes"].as_array().unwrap().len(), 3, "{got}");
    assert_eq!(
        got["recent_episodes"][0]["episode_id"], "t2",
        "newest first: {got}"
    );
    assert_eq!(got["profile"]["full_name"], "Ann Example", "{got}");
    let facts = got["facts"].as_array().unwrap();
    assert_eq!(facts.len(), 1, "only the valid version: {got}");
    assert_eq!(
        (facts[0]["value"].clone(), facts[0]["version"].clone()),
        (json!("Porto"), json!(3))
    );
    // the fact's history: three versions, each closed by the next
    let h = api
        .call(
            "GET",
            "/v1/memory/subjects/cust-1/facts?history=true",
            Some(BILLING_TOKEN),
            None,
        )
        .await;
    let versions = h.body["items"].as_array().unwrap();
    assert_eq!(versions.len(), 3, "{}", h.body);
    for w in versions.windows(2) {
        assert_eq!(w[0]["invalid_at"], w[1]["valid_from"], "{}", h.body);
    }
    assert!(versions[2]["invalid_at"].is_null(), "{}", h.body);
    // facts by text: subject, key and value, any word, best first
    let a = post(
        "/v1/memory/writeback",
        BILLING_TOKEN,
        json!({"subject_id": "cust-1", "facts": [
            {"subject": "user", "key": "favourite_drink", "value": "green tea"},
            {"subject": "user", "key": "pet", "value": "a dog named Rex"}]}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let facts_get = |q: &'static str| {
        let api = &api;
        async move {
            let path = format!("/v1/memory/subjects/cust-1/facts?{q}");
            api.call("GET", &path, Some(BILLING_TOKEN), None).await
        }
    };
    let facts_by = |q: &'static str| {
        let facts_get = &facts_get;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let a = facts_get(q).await;
                assert_eq!(a.status, 200, "{q}: {}", a.body);
                let items = a.body["items"].as_array().cloned().unwrap_or_default();
                if !items.is_empty() || std::time::Instant::now() > deadline {
                    return items;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let tea = facts_by("q=teas").await;
    assert_eq!(tea.len(), 1, "{tea:?}");
    assert_eq!(tea[0]["key"], "favourite_drink");
    assert!(tea[0]["score"].as_f64().unwrap() > 0.0, "{tea:?}");
    let by_key = facts_by("q=drinks%20dog").await;
    let keys: Vec<&str> = by_key.iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 2, "a key's words match too: {by_key:?}");
    assert!(keys.contains(&"favourite_drink") && keys.contains(&"pet"));
    let lyon = facts_by("q=Lyon&history=true").await;
    assert_eq!(lyon.len(), 1, "{lyon:?}");
    assert_eq!(
        (&lyon[0]["version"], &lyon[0]["value"]),
        (&json!(1), &json!("Lyon"))
    );
    assert!(
        !lyon[0]["invalid_at"].is_null(),
        "a superseded version: {lyon:?}"
    );
    for q in ["q=Lyon", "q=the"] {
        let a = facts_get(q).await;
        assert_eq!(a.status, 200, "{q}: {}", a.body);
        assert_eq!(
            a.body["items"],
            json!([]),
            "{q}: no valid fact has the word (or it is only a stop word)"
        );
    }
    // an unknown or malformed parameter is named, not ignored
    for q in ["history=yes", "histroy=true", "q="] {
        let a = facts_get(q).await;
        assert_eq!(a.status, 400, "{q}: {}", a.body);
        assert_eq!(
            a.body["error"]["param"],
            q.split('=').next().unwrap(),
            "{}",
            a.body
        );
    }
    // expired working state is never returned, before any cleanup
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = assemble_until(&api, ask.clone(), |_| true).await;
    assert!(got["working_state"].get("intent").is_some(), "{got}");
    assert!(got["working_state"].get("flash").is_none(), "{got}");

    // another client, the same subject id: not its subject; an auditor reads no memory
    for (token, status) in [(OTHER_TOKEN, 404), (AUDITOR_TOKEN, 403)] {
        let a = api.post("/v1/memory/assemble", token, ask.clone()).await;
        assert_eq!(a.status, status, "{}", a.body);
        let r = api
            .call(
                "GET",
                "/v1/memory/subjects/cust-1/episodes",
                Some(token),
                None,
            )
            .await;
        assert_eq!(r.status, status, "{}", r.body);
    }
    let a = api
        .post("/v1/memory/assemble", OTHER_TOKEN, ask.clone())
        .await;
    assert_eq!(a.body["error"]["reason"], "client_not_found", "{}", a.body);
    // bad input names its field
    let a = api
        .post(
            "/v1/memory/assemble",
            BILLING_TOKEN,
            json!({"subject_id": "cust-1", "query": "x", "top_k": 0}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["error"]["param"].clone()),
        (400, json!("top_k")),
        "{}",
        a.body
    );

    // the cleanup records the expiry of the due value only, as flowledger
    let report = flowledger::memory::cleanup::run_once(
        &api.bus,
        &memory,
        &api.pool,
        chrono::Utc::now(),
        &mut |_| {},
    )
    .await
    .expect("cleanup");
    assert_eq!((report.expired, report.failed), (1, 0), "{report:?}");
    let expired: Vec<_> = log_events(&app)
        .await
        .into_iter()
        .filter(|e| e.event_type == "WorkingStateExpired")
        .collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].data["keys"], json!(["flash"]));
    assert_eq!(expired[0].actor.client_id, "flowledger");
    api.caught_up(&app.log).await;
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM memory_working_state ORDER BY key")
        .fetch_all(&api.pool)
        .await
        .unwrap();
    assert_eq!(left, ["intent"]);
    // a second run finds nothing due
    let report = flowledger::memory::cleanup::run_once(
        &api.bus,
        &memory,
        &api.pool,
        chrono::Utc::now(),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.expired, 0, "{report:?}");

    // with a retention of one day, the cleanup at 2026-12-03T00:00Z retires
    // the turn of 12-01 only, as flowledger; the read model drops it, its
    // chunks and nothing else
    let retaining = flowledger::memory::service::MemoryService::new(
        memory.keys().clone(),
        flowledger::memory::service::Chunking { max_chars: 800 },
        memory.defaults(),
    )
    .with_retention(flowledger::memory::service::Retention::from_days(1));
    let midnight = "2026-12-03T00:00:00Z".parse().unwrap();
    let report = flowledger::memory::cleanup::run_once(
        &api.bus,
        &retaining,
        &api.pool,
        midnight,
        &mut |_| {},
    )
    .await
    .expect("cleanup");
    assert_eq!((report.retired, report.failed), (1, 0), "{report:?}");
    let retired: Vec<_> = log_events(&app)
        .await
        .into_iter()
        .filter(|e| e.event_type == "EpisodesRetired")
        .collect();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].data["episode_ids"], json!(["t0"]));
    assert_eq!(retired[0].data["reason"], "retention");
    assert_eq!(retired[0].actor.client_id, "flowledger");
    api.caught_up(&app.log).await;
    let e = api
        .call(
            "GET",
            "/v1/memory/subjects/cust-1/episodes",
            Some(BILLING_TOKEN),
            None,
        )
        .await;
    let ids: Vec<&str> = e.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["episode_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["t2", "t1"], "{}", e.body);
    let volvo: i64 =
        sqlx::query_scalar("SELECT count(*) FROM memory_chunks WHERE text LIKE '%Volvo%'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(volvo, 0);
    // the facts it carried keep their history (retention is of turns):
    // the city's three versions, the drink and the pet
    let facts: i64 = sqlx::query_scalar("SELECT count(*) FROM memory_facts")
        .fetch_one(&api.pool)
        .await
        .unwrap();
    assert_eq!(facts, 5);
    let report = flowledger::memory::cleanup::run_once(
        &api.bus,
        &retaining,
        &api.pool,
        midnight,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!((report.retired, report.skipped), (0, 0), "{report:?}");

    // erasure over HTTP: only the owner or an operator; it completes after
    // a crash between destroying the key and recording it, and for a key
    // lost from Vault; the read model then holds nothing of either subject
    const PLANTED: &str = "PLANTED-cust2-turn-5521";
    let a = post(
        "/v1/memory/writeback",
        BILLING_TOKEN,
        json!({"subject_id": "cust-2", "messages": [{"role": "user", "content": PLANTED}], "response": "ok"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let erase = |owner: Option<&str>| {
        let mut b = json!({"subject_id": "cust-2", "reason": "legal"});
        if let Some(o) = owner {
            b["owner"] = json!(o);
        }
        b
    };
    let a = post("/v1/memory/erase", OTHER_TOKEN, erase(Some("billing"))).await;
    assert_eq!(a.status, 403, "{}", a.body);
    let cust2 = aggregate_id("billing", "cust-2");
    memory
        .keys()
        .destroy(&cust2)
        .await
        .expect("the key destroyed, then a crash");
    let a = post("/v1/memory/erase", OPERATOR_TOKEN, erase(Some("billing"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["events"],
        json!(["MemorySubjectErased"]),
        "{}",
        a.body
    );
    // cust-1's key disappears from Vault: no new key is made for it
    let cust1 = aggregate_id("billing", "cust-1");
    let (status, _) = bao
        .api(
            "DELETE",
            &format!("secret/metadata/flowledger/memory-keys/{cust1}"),
            None,
        )
        .await;
    assert!(status < 300, "{status}");
    memory.keys().forget(&cust1);
    let a = post(
        "/v1/memory/writeback",
        BILLING_TOKEN,
        json!({"subject_id": "cust-1", "response": "after the loss"}),
    )
    .await;
    assert_eq!(a.status, 500, "{}", a.body);
    assert!(
        a.body.to_string().contains("missing from Vault"),
        "{}",
        a.body
    );
    let a = post(
        "/v1/memory/erase",
        BILLING_TOKEN,
        json!({"subject_id": "cust-1", "reason": "data_subject_request"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    api.caught_up(&app.log).await;
    let erased: i64 =
        sqlx::query_scalar("SELECT count(*) FROM memory_subjects WHERE erased_at IS NOT NULL")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(erased, 2);
    let dump = crate::secrets::pg_dump(&api.url);
    assert!(
        contains(&dump, "memory_subjects"),
        "the dump holds the memory tables"
    );
    for planted in [PLANTED, "Volvo", "Ann Example", "Porto"] {
        assert!(!contains(&dump, planted), "{planted} is in pg_dump");
    }
}

fn body<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid memory request body")
}

/// The working-state rows of the read model as (subject_id, key).
async fn working_rows(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT s.subject_id, w.key FROM memory_working_state w JOIN memory_subjects s \
         USING (aggregate_id) ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .expect("the working-state rows")
}

#[tokio::test]
async fn a_cleanup_records_one_event_per_subject_splits_a_large_one_leaves_out_a_value_set_anew_and_equals_a_rebuild(
) {
    let bao = OpenBao::start().await;
    let app = spawn_app().await;
    let memory = memory_service(&bao).await;
    let live = spawn_api_with_memory(&app, true, pgvector_database().await, memory.clone()).await;
    let t0: chrono::DateTime<chrono::Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
    let set = |subject: &str, key: &str, ttl: i64, at| {
        let (memory, bus) = (memory.clone(), live.bus.clone());
        let b = body(
            json!({"subject_id": subject, "key": key, "value": {"k": key},
            "ttl_seconds": ttl}),
        );
        async move {
            memory
                .working_set(&bus, "billing", b, None, at)
                .await
                .expect("set a working-state value")
        }
    };
    // "large": more due values than one event carries; "s0".."s3": five
    // due values and one not due; "s0" also "renewed", due when read
    let large = MAX_CLEANUP_ITEMS + 3;
    for i in 0..large {
        set("large", &format!("k{i:04}"), 60, t0).await;
    }
    for s in ["s0", "s1", "s2", "s3"] {
        for i in 0..5 {
            set(s, &format!("k{i}"), 60, t0).await;
        }
        set(s, "keep", 3600, t0).await;
    }
    set("s0", "renewed", 60, t0).await;
    // "s1" has two turns older than a day before the run and one not
    let now = t0 + chrono::TimeDelta::seconds(120);
    for (turn, at) in [
        ("old-a", "2026-11-28"),
        ("old-b", "2026-11-29"),
        ("new", "2026-12-01"),
    ] {
        memory
            .writeback(
                &live.bus,
                "billing",
                body(json!({"subject_id": "s1", "turn_id": turn,
                    "timestamp": format!("{at}T09:00:00Z"),
                    "messages": [{"role": "user", "content": format!("turn {turn}")}],
                    "response": "ok"})),
                t0,
            )
            .await
            .expect("a writeback");
    }
    // what the cleanup reads: a read model that stops here
    let stale = spawn_api_with_memory(&app, true, pgvector_database().await, memory.clone()).await;
    stale.caught_up(&app.log).await;
    let stale = stale.stop().await;
    // "renewed" is set anew after that read: it expires an hour later
    set("s0", "renewed", 3600, t0 + chrono::TimeDelta::seconds(30)).await;
    let retaining = MemoryService::new(
        memory.keys().clone(),
        Chunking { max_chars: 800 },
        memory.defaults(),
    )
    .with_retention(Retention::from_days(1));
    let before = app.last_seq().await;
    let mut pages = 0;
    let report =
        flowledger::memory::cleanup::run_once(&live.bus, &retaining, &stale, now, &mut |_| {
            pages += 1
        })
        .await
        .expect("cleanup");
    assert_eq!(
        (
            report.expired,
            report.retired,
            report.skipped,
            report.failed
        ),
        (large as u64 + 20, 2, 1, 0),
        "{report:?}"
    );
    assert!(pages >= 2, "one page per sweep at least: {pages}");
    // one event per subject, "large" in two; "renewed" is in none
    let events = log_events_after(&app, before).await;
    let mut expired: Vec<(String, usize)> = events
        .iter()
        .filter(|e| e.event_type == "WorkingStateExpired")
        .map(|e| {
            let keys = e.data["keys"].as_array().expect("keys").clone();
            assert!(!keys.contains(&json!("renewed")), "{keys:?}");
            assert_eq!(e.data["expired_at"], json!("2026-12-01T10:02:00Z"));
            assert_eq!(e.actor.client_id, "flowledger");
            (e.aggregate_id.clone(), keys.len())
        })
        .collect();
    expired.sort();
    let mut want: Vec<(String, usize)> = vec![
        (aggregate_id("billing", "large"), MAX_CLEANUP_ITEMS),
        (aggregate_id("billing", "large"), 3),
    ];
    for s in ["s0", "s1", "s2", "s3"] {
        want.push((aggregate_id("billing", s), 5));
    }
    want.sort();
    assert_eq!(expired, want);
    let retired: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "EpisodesRetired")
        .collect();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].data["episode_ids"], json!(["old-a", "old-b"]));
    assert!(
        events
            .iter()
            .all(|e| e.event_type == "WorkingStateExpired" || e.event_type == "EpisodesRetired"),
        "no other event: {:?}",
        events.iter().map(|e| &e.event_type).collect::<Vec<_>>()
    );
    // the live read model follows: what is not due, and the value set anew
    live.caught_up(&app.log).await;
    let mut left = vec![("s0".to_string(), "keep".to_string())];
    left.push(("s0".into(), "renewed".into()));
    for s in ["s1", "s2", "s3"] {
        left.push((s.into(), "keep".into()));
    }
    assert_eq!(working_rows(&live.pool).await, left);
    let episodes: Vec<String> =
        sqlx::query_scalar("SELECT episode_id FROM memory_episodes ORDER BY 1")
            .fetch_all(&live.pool)
            .await
            .unwrap();
    assert_eq!(episodes, ["new"]);
    let views = [
        ("memory_subjects", "aggregate_id"),
        ("memory_episodes", "aggregate_id, episode_id"),
        ("memory_chunks", "aggregate_id, episode_id, idx"),
        ("memory_working_state", "aggregate_id, key"),
    ];
    let mut rows = Vec::new();
    for (view, order) in views {
        rows.push(live.snapshot(view, order).await);
    }
    // a rebuild from the log makes the same rows
    rebuild::rebuild_with_keys(
        &live.pool,
        &app.log,
        ReadModel::Memory,
        Some(memory.keys().clone()),
    )
    .await
    .expect("rebuild the memory read model");
    for ((view, order), rows) in views.iter().zip(&rows) {
        assert_eq!(
            &live.snapshot(view, order).await,
            rows,
            "{view} differs from its rebuild"
        );
    }
    // a second run over the stale read finds nothing due any more
    let report =
        flowledger::memory::cleanup::run_once(&live.bus, &retaining, &stale, now, &mut |_| {})
            .await
            .expect("cleanup");
    assert_eq!(
        (report.expired, report.retired, report.failed),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.skipped, large as u64 + 21 + 2, "{report:?}");
}

#[tokio::test]
async fn assemble_after_a_sequence_the_read_model_has_not_applied_times_out_within_its_budget() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let memory = memory_service(&bao).await;
    // no projection runners: the read model never applies the writeback
    let api = spawn_api_with_memory(&app, false, fresh_database().await, memory).await;
    let w = api
        .post(
            "/v1/memory/writeback",
            BILLING_TOKEN,
            json!({"subject_id": "cust-9", "messages": [{"role": "user", "content": "hello"}],
                   "response": "hi"}),
        )
        .await;
    assert_eq!(w.status, 200, "{}", w.body);
    let seq = w.body["stream_seq"]
        .as_u64()
        .expect("a receipt's stream_seq");
    // the budget bounds the wait: without it, this would never answer
    let a = tokio::time::timeout(
        Duration::from_secs(60),
        api.post(
            "/v1/memory/assemble",
            BILLING_TOKEN,
            json!({"subject_id": "cust-9", "query": "hello", "after_seq": seq, "budget_ms": 300}),
        ),
    )
    .await
    .expect("assemble answers within its budget, not never");
    assert_eq!(
        (a.status, a.body["error"]["reason"].clone()),
        (503, json!("timeout")),
        "{}",
        a.body
    );
}
