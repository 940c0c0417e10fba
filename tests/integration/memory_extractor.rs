//! Memory fact extraction (issue 14) against real nats-server, PostgreSQL
//! 18 and OpenBao, with an extractor peer that reads the turn it is sent
//! and answers the facts it states ("my <thing> is <value>"), with latency,
//! and, as scripted, a 503, a hang past the time limit, garbage, or a
//! request held until the test lets it go. The handler records the facts
//! in the log (sealed), the reads show them with source `extractor`, a
//! rebuild with the peer stopped never calls it, a bad answer is
//! `extraction_failed`, and a held extractor never holds a writeback.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use flowledger::commands::memory::{aggregate_id, SubjectRef};
use flowledger::config::{ExtractMode, ExtractorSection};
use flowledger::memory::extractor::Extractor;
use flowledger::memory::keys::SubjectKeys;
use flowledger::memory::service::{AssembleDefaults, Chunking, ExtractionOutcome, MemoryService};
use flowledger::projections::rebuild;
use flowledger::projections::ReadModel;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::helpers::*;
use crate::openbao::OpenBao;
use crate::secrets::{contains, files_under};

/// How the peer answers one request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// The facts of the turn, after a little latency.
    Answer,
    /// 503, as an overloaded model server does.
    Unavailable,
    /// No answer for an hour (past any time limit).
    Hang,
    /// 200 with a body that is not the contract's.
    Garbage,
    /// The facts, once the test lets the request go ([`ExtractPeer::release`]).
    Held,
}

#[derive(Clone)]
struct ExtractPeer {
    url: String,
    /// Requests received.
    calls: Arc<AtomicU64>,
    /// Requests answered with facts.
    answered: Arc<AtomicU64>,
    /// Requests waiting in `Held`.
    held: Arc<AtomicU64>,
    /// The modes of the next requests, in order; then `fallback`.
    script: Arc<Mutex<VecDeque<Mode>>>,
    fallback: Arc<Mutex<Mode>>,
    gate: Arc<Semaphore>,
    received: Arc<Mutex<Vec<Value>>>,
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// The facts a turn states: "my <thing> is <value>" in a user message, as
/// `{key: <thing> with '_' for spaces, value}`.
fn facts_of(request: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for m in request["messages"].as_array().into_iter().flatten() {
        if m["role"] != "user" {
            continue;
        }
        let text = m["content"].as_str().unwrap_or_default();
        for sentence in text.split(['.', '!', '\n']) {
            let lower = sentence.trim().to_lowercase();
            let Some(rest) = lower.strip_prefix("my ") else {
                continue;
            };
            if let Some((thing, value)) = rest.split_once(" is ") {
                out.push(json!({
                    "key": thing.trim().replace(' ', "_"),
                    "value": value.trim(),
                    "confidence": 0.8,
                    "source": "user message",
                }));
            }
        }
    }
    out
}

async fn extract(
    State(p): State<ExtractPeer>,
    Json(body): Json<Value>,
) -> axum::response::Response {
    p.calls.fetch_add(1, Ordering::SeqCst);
    p.received.lock().unwrap().push(body.clone());
    let mode = p
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(*p.fallback.lock().unwrap());
    match mode {
        Mode::Unavailable => {
            return (StatusCode::SERVICE_UNAVAILABLE, "model overloaded").into_response()
        }
        Mode::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
        Mode::Garbage => {
            return (
                StatusCode::OK,
                "<html><body>the model says hello</body></html>",
            )
                .into_response()
        }
        Mode::Held => {
            p.held.fetch_add(1, Ordering::SeqCst);
            let permit = p.gate.acquire().await.expect("the gate stays open");
            permit.forget();
            p.held.fetch_sub(1, Ordering::SeqCst);
        }
        Mode::Answer => {}
    }
    // a model takes a moment
    tokio::time::sleep(Duration::from_millis(40)).await;
    p.answered.fetch_add(1, Ordering::SeqCst);
    Json(json!({"model": "rules-1", "facts": facts_of(&body)})).into_response()
}

impl ExtractPeer {
    async fn start(script: Vec<Mode>, fallback: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the extractor peer");
        let addr = listener.local_addr().expect("its address");
        let peer = ExtractPeer {
            url: format!("http://{addr}/v1/extract"),
            calls: Arc::new(AtomicU64::new(0)),
            answered: Arc::new(AtomicU64::new(0)),
            held: Arc::new(AtomicU64::new(0)),
            script: Arc::new(Mutex::new(script.into())),
            fallback: Arc::new(Mutex::new(fallback)),
            gate: Arc::new(Semaphore::new(0)),
            received: Arc::new(Mutex::new(Vec::new())),
            server: Arc::new(Mutex::new(None)),
        };
        let app = axum::Router::new()
            .route("/v1/extract", axum::routing::post(extract))
            .with_state(peer.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *peer.server.lock().unwrap() = Some(server);
        peer
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Lets every held request (and as many later ones) go.
    fn release(&self) {
        self.gate.add_permits(1_000);
    }

    /// Stops listening: connections are refused from now on.
    fn stop(&self) {
        if let Some(s) = self.server.lock().unwrap().take() {
            s.abort();
        }
    }
}

async fn keys(bao: &OpenBao) -> Arc<SubjectKeys> {
    Arc::new(SubjectKeys::new(
        root_secret_service(bao).await,
        MEMORY_KEY_PATH,
        Duration::from_secs(300),
    ))
}

fn service_with(keys: Arc<SubjectKeys>, peer: &ExtractPeer, timeout_ms: u64) -> Arc<MemoryService> {
    service_extracting(keys, peer, timeout_ms, ExtractMode::OnRequest)
}

/// [`service_with`] whose writebacks without `extract` are extracted or
/// not as `extract` says.
fn service_extracting(
    keys: Arc<SubjectKeys>,
    peer: &ExtractPeer,
    timeout_ms: u64,
    extract: ExtractMode,
) -> Arc<MemoryService> {
    let cfg = ExtractorSection {
        url: peer.url.clone(),
        timeout_ms,
        max_attempts: 3,
        api_key_secret: None,
        extract,
    };
    let extractor = Extractor::new(cfg, None).expect("a valid extractor");
    Arc::new(
        MemoryService::new(
            keys,
            Chunking { max_chars: 800 },
            AssembleDefaults {
                top_k: 5,
                recent_episodes: 5,
                budget_ms: 2_000,
            },
        )
        .with_extractor(Arc::new(extractor)),
    )
}

async fn writeback(api: &ReadSide, subject: &str, turn: &str, said: &str, extract: bool) -> Answer {
    api.post(
        "/v1/memory/writeback",
        BILLING_TOKEN,
        json!({
            "subject_id": subject,
            "turn_id": turn,
            "timestamp": "2026-12-01T10:00:00Z",
            "messages": [{"role": "user", "content": said}],
            "response": "Noted.",
            "extract": extract,
        }),
    )
    .await
}

/// GETs `path` as the billing client until `done` holds for its body.
async fn until(api: &ReadSide, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = api.call("GET", path, Some(BILLING_TOKEN), None).await;
        if a.status == 200 && done(&a.body) {
            return a.body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {path} stays {} {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn extraction_of(episodes: &Value, episode: &str) -> Value {
    episodes["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["episode_id"] == episode)
        .map(|e| e["extraction"].clone())
        .unwrap_or(Value::Null)
}

const MEMORY_TABLES: [(&str, &str); 5] = [
    ("memory_subjects", "aggregate_id"),
    ("memory_episodes", "aggregate_id, episode_id"),
    ("memory_chunks", "aggregate_id, episode_id, idx"),
    ("memory_facts", "aggregate_id, fact_id, version"),
    ("memory_working_state", "aggregate_id, key"),
];

async fn memory_tables(api: &ReadSide) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    for (table, order) in MEMORY_TABLES {
        out.push(api.snapshot(table, order).await);
    }
    out
}

#[tokio::test]
async fn extracted_facts_are_recorded_sealed_read_and_rebuilt_without_calling_the_peer() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    // the first call is refused (503), the second hangs past the 500 ms
    // limit, the third answers
    let peer = ExtractPeer::start(vec![Mode::Unavailable, Mode::Hang], Mode::Answer).await;
    let keys = keys(&bao).await;
    let memory = service_with(keys.clone(), &peer, 500);
    let api = spawn_api_with_memory(&app, true, pgvector_database().await, memory.clone()).await;
    // a turn that does not ask: never sent to the extractor
    let a = writeback(&api, "cust-x", "t0", "My shoe size is 44.", false).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let said = "Hello. My favourite colour is zanzibar teal. My dog is called Pim!";
    let a = writeback(&api, "cust-x", "t1", said, true).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // the turn alone: its facts come later, from the handler
    assert_eq!(a.body["events"], json!(["EpisodeRecorded"]), "{}", a.body);
    let facts_path = "/v1/memory/subjects/cust-x/facts";
    let facts = until(&api, facts_path, "the extracted facts", |b| {
        b["items"].as_array().is_some_and(|i| i.len() == 2)
    })
    .await;
    let items = facts["items"].as_array().expect("items");
    assert_eq!(items[0]["key"], "dog", "{facts}");
    assert_eq!(items[0]["value"], "called pim", "{facts}");
    assert_eq!(items[1]["key"], "favourite_colour", "{facts}");
    assert_eq!(items[1]["value"], "zanzibar teal", "{facts}");
    for f in items {
        assert_eq!(f["source"], "extractor", "{facts}");
        assert_eq!(f["subject"], "user", "{facts}");
        assert_eq!(f["confidence"], 0.8, "{facts}");
    }
    let episodes = until(
        &api,
        "/v1/memory/subjects/cust-x/episodes",
        "extraction done",
        |b| extraction_of(b, "t1") == "done",
    )
    .await;
    assert_eq!(extraction_of(&episodes, "t0"), Value::Null, "{episodes}");
    // the 503 and the timeout were retried: three calls, all for t1, each
    // with the turn and nothing about whose it is
    assert_eq!(peer.calls(), 3);
    let received = peer.received.lock().unwrap().clone();
    for r in &received {
        let mut fields: Vec<&str> = r
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort();
        assert_eq!(
            fields,
            ["episode_id", "messages", "occurred_at", "response"],
            "{r}"
        );
        assert_eq!(r["episode_id"], "t1");
        assert_eq!(r["messages"][0]["content"], said);
        let text = r.to_string();
        assert!(!text.contains("cust-x") && !text.contains("billing"), "{r}");
    }
    // recorded by the handler, once
    let id = aggregate_id("billing", "cust-x");
    api.caught_up(&app.log).await;
    let actors: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, client_id FROM audit_trail WHERE action LIKE 'EpisodeExtract%' \
         ORDER BY stream_seq",
    )
    .fetch_all(&api.pool)
    .await
    .expect("the audit trail");
    assert_eq!(
        actors,
        [(
            "EpisodeExtracted".to_string(),
            "flowledger-handler".to_string()
        )]
    );
    // a second delivery of the outcome answers the first receipt
    let state = app.bus.load_memory(&id).await.expect("the subject").state;
    let key = keys.get(&id).await.expect("the subject's key");
    let again = memory
        .record_extraction(
            &app.bus,
            SubjectRef {
                owner: "billing".into(),
                subject_id: "cust-x".into(),
                key_id: state.key_id.clone(),
            },
            &key,
            "t1",
            ExtractionOutcome::Failed {
                reason: "timeout",
                status: None,
                attempts: 1,
            },
            chrono::Utc::now(),
        )
        .await
        .expect("the first receipt");
    assert!(again.duplicate, "{again:?}");
    // the facts are sealed in the log: neither the key the extractor made
    // nor the values are in the stream's files
    let stored = files_under(&app.nats.store_dir());
    assert!(!stored.is_empty());
    for planted in ["favourite_colour", "zanzibar", "called pim"] {
        for (path, bytes) in &stored {
            assert!(!contains(bytes, planted), "{planted} in {}", path.display());
        }
    }
    // a rebuild takes the facts from the log: the peer, stopped, is never called
    let live = memory_tables(&api).await;
    assert!(live[3].len() == 2 && live[1].len() == 2, "{live:?}");
    peer.stop();
    let before = peer.calls();
    assert!(before > 0, "the peer was called live");
    rebuild::rebuild_with_keys(&api.pool, &app.log, ReadModel::Memory, Some(keys.clone()))
        .await
        .expect("rebuild memory");
    assert_eq!(
        memory_tables(&api).await,
        live,
        "the rebuild equals the live rows"
    );
    assert_eq!(
        peer.calls(),
        before,
        "the rebuild never calls the extractor"
    );
}

#[tokio::test]
async fn an_extractor_answering_garbage_records_extraction_failed_and_no_fact() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = ExtractPeer::start(vec![], Mode::Garbage).await;
    let keys = keys(&bao).await;
    let url = pgvector_database().await;
    let api = spawn_api_with_memory(&app, true, url.clone(), service_with(keys, &peer, 500)).await;
    let a = writeback(&api, "cust-g", "t1", "My favourite colour is teal.", true).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let episodes = until(
        &api,
        "/v1/memory/subjects/cust-g/episodes",
        "extraction failed",
        |b| extraction_of(b, "t1") == "failed",
    )
    .await;
    assert_eq!(
        episodes["items"][0]["extraction_error"],
        json!({"code": "extraction_failed", "reason": "bad_answer"}),
        "{episodes}"
    );
    // a refused answer is not retried
    assert_eq!(peer.calls(), 1);
    let facts = api
        .call(
            "GET",
            "/v1/memory/subjects/cust-g/facts?history=true",
            Some(BILLING_TOKEN),
            None,
        )
        .await;
    assert_eq!(facts.status, 200, "{}", facts.body);
    assert_eq!(facts.body["items"], json!([]), "no fact: {}", facts.body);
    api.caught_up(&app.log).await;
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_trail WHERE action LIKE 'EpisodeExtract%' ORDER BY stream_seq",
    )
    .fetch_all(&api.pool)
    .await
    .expect("the audit trail");
    assert_eq!(failed, ["EpisodeExtractionFailed"]);
    // the reason is a code: nothing of the answer is kept
    for (path, bytes) in files_under(&app.nats.store_dir()) {
        assert!(!contains(&bytes, "the model says"), "{}", path.display());
    }
    // without an extractor, asking for extraction is a 400 naming the field
    let plain = spawn_api_with_memory(&app, false, url, memory_service(&bao).await).await;
    let a = writeback(&plain, "cust-g", "t2", "My city is Lyon.", true).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["error"]["param"], "extract", "{}", a.body);
}

#[tokio::test]
async fn a_held_extractor_never_holds_a_writeback() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = ExtractPeer::start(vec![], Mode::Held).await;
    let keys = keys(&bao).await;
    let api = spawn_api_with_memory(
        &app,
        true,
        pgvector_database().await,
        // the longest limit: the request stays held until released
        service_with(keys, &peer, 120_000),
    )
    .await;
    let a = writeback(&api, "cust-h", "t1", "My city is Lyon.", true).await;
    assert_eq!(a.status, 200, "{}", a.body);
    eventually("the extractor holds the first request", || {
        peer.held.load(Ordering::SeqCst) == 1
    })
    .await;
    let path = "/v1/memory/subjects/cust-h/episodes";
    until(&api, path, "extraction pending", |b| {
        extraction_of(b, "t1") == "pending"
    })
    .await;
    // the extractor still holds t1's request: a writeback answers all the same
    let a = writeback(&api, "cust-h", "t2", "My team is the Lions.", true).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(peer.answered.load(Ordering::SeqCst), 0);
    assert_eq!(peer.held.load(Ordering::SeqCst), 1);
    until(&api, path, "both turns recorded", |b| {
        extraction_of(b, "t2") == "pending" && extraction_of(b, "t1") == "pending"
    })
    .await;
    peer.release();
    until(&api, path, "both extracted", |b| {
        extraction_of(b, "t1") == "done" && extraction_of(b, "t2") == "done"
    })
    .await;
    let facts = until(&api, "/v1/memory/subjects/cust-h/facts", "two facts", |b| {
        b["items"].as_array().is_some_and(|i| i.len() == 2)
    })
    .await;
    assert_eq!(facts["items"][0]["key"], "city", "{facts}");
    assert_eq!(facts["items"][1]["value"], "the lions", "{facts}");
}

#[tokio::test]
async fn a_writeback_retried_on_an_instance_with_another_extract_default_answers_its_first_receipt()
{
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = ExtractPeer::start(vec![], Mode::Garbage).await;
    let keys = keys(&bao).await;
    let url = pgvector_database().await;
    let always = service_extracting(keys.clone(), &peer, 500, ExtractMode::Always);
    let asked = service_extracting(keys, &peer, 500, ExtractMode::OnRequest);
    let one = spawn_api_with_memory(&app, false, url.clone(), always).await;
    let two = spawn_api_with_memory(&app, false, url, asked).await;
    // no `extract` in the body: each instance's default would differ
    let turn = json!({"subject_id": "cust-x", "turn_id": "t1",
        "messages": [{"role": "user", "content": "My city is Lyon."}], "response": "Noted."});
    let first = one
        .post("/v1/memory/writeback", BILLING_TOKEN, turn.clone())
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = two.post("/v1/memory/writeback", BILLING_TOKEN, turn).await;
    assert_eq!(again.status, 200, "the same request: {}", again.body);
    assert_eq!(again.body["stream_seq"], first.body["stream_seq"]);
    assert_eq!(again.body["duplicate"], true, "{}", again.body);
    // asking for extraction is another request under the same turn id
    let asking = json!({"subject_id": "cust-x", "turn_id": "t1", "extract": true,
        "messages": [{"role": "user", "content": "My city is Lyon."}], "response": "Noted."});
    let other = two
        .post("/v1/memory/writeback", BILLING_TOKEN, asking)
        .await;
    assert_eq!(other.status, 409, "{}", other.body);
}
