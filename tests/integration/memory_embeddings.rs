//! Memory embeddings (issue 14, item 2) against real nats-server,
//! PostgreSQL 18 with pgvector and OpenBao, with an embeddings peer that
//! speaks the OpenAI `/v1/embeddings` API: the handler records the
//! vectors in the log, assemble searches them (HNSW), a rebuild never
//! calls the peer, erasure removes the vectors; the peer down answers
//! `embeddings_failed` or falls back to full text, as configured.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use flowledger::commands::memory::aggregate_id;
use flowledger::config::{EmbedderFallback, EmbedderSection};
use flowledger::memory::embedder::Embedder;
use flowledger::memory::keys::{KeyError, SubjectKeys};
use flowledger::memory::service::{AssembleDefaults, Chunking, MemoryService};
use flowledger::projections::rebuild;
use flowledger::projections::ReadModel;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::*;
use crate::openbao::OpenBao;

const DIMS: u32 = 512;

/// How the peer answers.
const ANSWER: u8 = 0;
const FAIL_500: u8 = 1;
const HANG: u8 = 2;

/// An OpenAI-compatible embeddings peer: a hashed bag of words (texts
/// sharing words are near), with a configurable failure mode.
#[derive(Clone)]
struct EmbedPeer {
    url: String,
    calls: Arc<AtomicU64>,
    mode: Arc<AtomicU8>,
}

const STOP: [&str; 16] = [
    "a", "an", "the", "is", "in", "i", "we", "my", "does", "which", "to", "and", "of", "am",
    "please", "every",
];

/// `text`'s vector of `dims` dimensions.
fn bag_of_words(text: &str, dims: usize) -> Vec<f32> {
    let mut v = vec![0f32; dims];
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| !w.is_empty() && !STOP.contains(&w.as_str()))
    {
        let h = Sha256::digest(w.as_bytes());
        v[u16::from_le_bytes([h[0], h[1]]) as usize % dims] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else {
        v[0] = 1.0;
    }
    v
}

async fn embeddings(
    State(p): State<EmbedPeer>,
    Json(body): Json<Value>,
) -> axum::response::Response {
    p.calls.fetch_add(1, Ordering::SeqCst);
    match p.mode.load(Ordering::SeqCst) {
        FAIL_500 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "model overloaded").into_response();
        }
        HANG => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        _ => {}
    }
    let texts: Vec<String> = body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    // as OpenAI's text-embedding-3 models: `dimensions` shortens them
    let dims = body["dimensions"]
        .as_u64()
        .map_or(DIMS as usize, |d| d as usize);
    // answered in reverse order: the client orders by index
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .rev()
        .map(
            |(i, t)| json!({"object": "embedding", "index": i, "embedding": bag_of_words(t, dims)}),
        )
        .collect();
    Json(json!({"object": "list", "model": body["model"], "data": data})).into_response()
}

impl EmbedPeer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the embeddings peer");
        let addr = listener.local_addr().expect("its address");
        let peer = EmbedPeer {
            url: format!("http://{addr}/v1"),
            calls: Arc::new(AtomicU64::new(0)),
            mode: Arc::new(AtomicU8::new(ANSWER)),
        };
        let app = axum::Router::new()
            .route("/v1/embeddings", axum::routing::post(embeddings))
            .with_state(peer.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        peer
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn keys(bao: &OpenBao) -> Arc<SubjectKeys> {
    Arc::new(SubjectKeys::new(
        root_secret_service(bao).await,
        MEMORY_KEY_PATH,
        Duration::from_secs(300),
    ))
}

fn service_with(
    keys: Arc<SubjectKeys>,
    peer: &EmbedPeer,
    on_failure: EmbedderFallback,
) -> Arc<MemoryService> {
    service_in(keys, peer, on_failure, "bag-of-words-512", DIMS)
}

/// [`service_with`] whose embedder is `model` in `dimensions`.
fn service_in(
    keys: Arc<SubjectKeys>,
    peer: &EmbedPeer,
    on_failure: EmbedderFallback,
    model: &str,
    dimensions: u32,
) -> Arc<MemoryService> {
    let cfg = EmbedderSection {
        url: peer.url.clone(),
        model: model.into(),
        dimensions,
        send_dimensions: true,
        timeout_ms: 2_000,
        max_attempts: 2,
        api_key_secret: None,
        on_failure,
        ranking: Default::default(),
    };
    let embedder = Embedder::new(cfg, None).expect("a valid embedder");
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
        .with_embedder(Arc::new(embedder)),
    )
}

const TURNS: [(&str, &str); 3] = [
    ("My car is a red Volvo estate, bought in 2019.", "Noted."),
    ("We spend every summer holiday in Portugal.", "Lovely."),
    ("I am allergic to peanuts, please remember.", "Understood."),
];

async fn write_turns(api: &ReadSide, subject: &str) {
    for (i, (said, answered)) in TURNS.iter().enumerate() {
        let a = api
            .post(
                "/v1/memory/writeback",
                BILLING_TOKEN,
                json!({
                    "subject_id": subject,
                    "turn_id": format!("t{i}"),
                    "timestamp": format!("2026-12-0{}T10:00:00Z", i + 1),
                    "messages": [{"role": "user", "content": said}],
                    "response": answered,
                }),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
}

/// Polls `query` (one BIGINT) until it is `want`.
async fn until_count(pool: &sqlx::PgPool, query: &str, bind: &str, want: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(query)
            .bind(bind)
            .fetch_one(pool)
            .await
            .unwrap_or(-1);
        if n == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{query} [{bind}] stays {n}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn vector_rows(pool: &sqlx::PgPool) -> Vec<(String, String, i32, String, String)> {
    sqlx::query_as(
        "SELECT aggregate_id, episode_id, idx, model, embedding::text FROM memory_chunk_vectors \
         ORDER BY aggregate_id, episode_id, idx",
    )
    .fetch_all(pool)
    .await
    .expect("the vectors")
}

#[tokio::test]
async fn embeddings_are_recorded_searched_by_vector_rebuilt_without_the_peer_and_erased() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = EmbedPeer::start().await;
    let keys = keys(&bao).await;
    let memory = service_with(keys.clone(), &peer, EmbedderFallback::Error);
    let api = spawn_api_with_memory(&app, true, pgvector_database().await, memory).await;
    write_turns(&api, "cust-v").await;
    let id = aggregate_id("billing", "cust-v");
    // two chunks per turn (the message, the response), each with its vector
    until_count(
        &api.pool,
        "SELECT count(*) FROM memory_chunk_vectors WHERE aggregate_id = $1",
        &id,
        6,
    )
    .await;
    until_count(
        &api.pool,
        "SELECT count(*) FROM audit_trail WHERE action = $1",
        "EpisodeEmbedded",
        3,
    )
    .await;
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT client_id FROM audit_trail WHERE action = 'EpisodeEmbedded'",
    )
    .fetch_all(&api.pool)
    .await
    .expect("the actors");
    assert_eq!(actors, ["flowledger-handler"]);
    let a = api
        .post(
            "/v1/memory/assemble",
            BILLING_TOKEN,
            json!({"subject_id": "cust-v", "query": "which car does the customer drive", "top_k": 3}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["retrieval"], "vector", "{}", a.body);
    let chunks = a.body["chunks"].as_array().expect("chunks");
    assert_eq!(chunks.len(), 3, "top_k of the subject's 6: {}", a.body);
    assert!(
        chunks[0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("Volvo"),
        "{}",
        a.body
    );
    let s0 = chunks[0]["score"].as_f64().expect("a score");
    let s1 = chunks[1]["score"].as_f64().expect("a score");
    assert!(
        s0 > s1,
        "the nearest first, by 1 - cosine distance: {}",
        a.body
    );
    // a rebuild takes the vectors from the log: the peer is not called
    let live = vector_rows(&api.pool).await;
    assert_eq!(live.len(), 6);
    let calls = peer.calls();
    rebuild::rebuild_with_keys(&api.pool, &app.log, ReadModel::Memory, Some(keys.clone()))
        .await
        .expect("rebuild memory");
    assert_eq!(
        vector_rows(&api.pool).await,
        live,
        "the rebuild equals the live rows"
    );
    assert_eq!(peer.calls(), calls, "the rebuild never calls the embedder");
    // erasure: the vectors go, and the sealed ones in the log no longer open
    let e = api
        .post(
            "/v1/memory/erase",
            BILLING_TOKEN,
            json!({"subject_id": "cust-v", "reason": "data_subject_request"}),
        )
        .await;
    assert_eq!(e.status, 200, "{}", e.body);
    until_count(
        &api.pool,
        "SELECT count(*) FROM memory_chunk_vectors WHERE aggregate_id = $1",
        &id,
        0,
    )
    .await;
    let fresh = SubjectKeys::new(
        root_secret_service(&bao).await,
        MEMORY_KEY_PATH,
        Duration::from_secs(300),
    );
    assert!(matches!(fresh.get(&id).await, Err(KeyError::Erased)));
}

#[tokio::test]
async fn the_embedder_down_answers_embeddings_failed_or_the_full_text_fallback_never_a_hang() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = EmbedPeer::start().await;
    peer.set(FAIL_500);
    let keys = keys(&bao).await;
    let url = pgvector_database().await;
    let fallback = service_with(keys.clone(), &peer, EmbedderFallback::FullText);
    let api = spawn_api_with_memory(&app, true, url.clone(), fallback).await;
    write_turns(&api, "cust-d").await;
    // the handler's retries run out: each episode's failure is recorded
    until_count(
        &api.pool,
        "SELECT count(*) FROM audit_trail WHERE action = $1",
        "EpisodeEmbeddingFailed",
        3,
    )
    .await;
    let ask = json!({"subject_id": "cust-d", "query": "which car does the customer drive"});
    let a = api
        .post("/v1/memory/assemble", BILLING_TOKEN, ask.clone())
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["retrieval"], "full_text_fallback", "{}", a.body);
    assert!(
        a.body["chunks"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("Volvo"),
        "{}",
        a.body
    );
    // on_failure = error: embeddings_failed, for a 500 and for a peer that hangs
    let strict = service_with(keys, &peer, EmbedderFallback::Error);
    let read = spawn_api_with_memory(&app, false, url, strict).await;
    let a = read
        .post("/v1/memory/assemble", BILLING_TOKEN, ask.clone())
        .await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["error"]["reason"], "embeddings_failed", "{}", a.body);
    peer.set(HANG);
    let mut hung = ask.clone();
    hung["budget_ms"] = json!(300);
    let a = read
        .post("/v1/memory/assemble", BILLING_TOKEN, hung.clone())
        .await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["error"]["reason"], "embeddings_failed", "{}", a.body);
    let a = api.post("/v1/memory/assemble", BILLING_TOKEN, hung).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["retrieval"], "full_text_fallback", "{}", a.body);
}

#[tokio::test]
async fn with_an_embedder_a_database_without_pgvector_is_a_clear_start_error() {
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = EmbedPeer::start().await;
    let memory = service_with(keys(&bao).await, &peer, EmbedderFallback::FullText);
    // PostgreSQL 15 of the rest of the suite: no pgvector
    let mut s = settings(&app, registry());
    s.memory = Some(memory);
    s.database = Some(flowledger::app::DatabaseSettings {
        url: fresh_database().await,
        max_connections: 5,
        projections: true,
        handler: None,
        http: None,
    });
    let err = match flowledger::app::Application::build(s).await {
        Ok(_) => panic!("started without pgvector"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("pgvector") && err.contains("CREATE EXTENSION IF NOT EXISTS vector"),
        "{err}"
    );
    assert_eq!(peer.calls(), 0);
}

#[tokio::test]
async fn a_new_model_and_dimensions_are_refused_until_a_rebuild_then_the_history_is_embedded_again()
{
    use flowledger::projections::db::{table_space, VectorSpace};
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let peer = EmbedPeer::start().await;
    let keys = keys(&bao).await;
    let url = pgvector_database().await;
    let id = aggregate_id("billing", "cust-m");
    let vectors_of = "SELECT count(*) FROM memory_chunk_vectors WHERE model = $1";
    let old = service_with(keys.clone(), &peer, EmbedderFallback::Error);
    let api = spawn_api_with_memory(&app, true, url.clone(), old).await;
    write_turns(&api, "cust-m").await;
    until_count(&api.pool, vectors_of, "bag-of-words-512", 6).await;
    let pool = api.pool.clone();
    drop(api);

    // the new configuration: another model, 64 dimensions
    let new = || {
        service_in(
            keys.clone(),
            &peer,
            EmbedderFallback::Error,
            "bag-of-words-64",
            64,
        )
    };
    let mut s = settings(&app, registry());
    s.memory = Some(new());
    s.database = Some(flowledger::app::DatabaseSettings {
        url: url.clone(),
        max_connections: 5,
        projections: true,
        handler: None,
        http: None,
    });
    let err = match flowledger::app::Application::build(s).await {
        Ok(_) => panic!("started with vectors of another space"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("bag-of-words-512")
            && err.contains("bag-of-words-64")
            && err.contains("flowledger projections rebuild memory --config"),
        "the refusal says what is recorded, what is configured and what to do: {err}"
    );

    // the rebuild with the new configuration: a version of the new space,
    // which indexes none of the recorded vectors (not comparable)
    let calls = peer.calls();
    let space = VectorSpace {
        model: "bag-of-words-64".into(),
        dimensions: 64,
    };
    let report = rebuild::rebuild_in_space(
        &pool,
        &app.log,
        ReadModel::Memory,
        Some(keys.clone()),
        Some(space.clone()),
    )
    .await
    .expect("rebuild memory in the new space");
    let v = report.new_version;
    let recorded = table_space(&pool, v)
        .await
        .expect("the new version's space")
        .expect("a vectors table");
    assert_eq!(recorded.space(), Some(space));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM memory_chunk_vectors")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(n, 0, "no vector of the old space is indexed");
    assert_eq!(peer.calls(), calls, "the rebuild never calls the embedder");

    // serve starts; its handler embeds the history again in the new space
    let api = spawn_api_with_memory(&app, true, url, new()).await;
    until_count(&api.pool, vectors_of, "bag-of-words-64", 6).await;
    let dims: Vec<i32> = sqlx::query_scalar(
        "SELECT DISTINCT vector_dims(embedding) FROM memory_chunk_vectors WHERE aggregate_id = $1",
    )
    .bind(&id)
    .fetch_all(&api.pool)
    .await
    .expect("the dimensions");
    assert_eq!(dims, [64]);
    assert_eq!(peer.calls(), calls + 3, "one call per episode, once");
    let a = api
        .post(
            "/v1/memory/assemble",
            BILLING_TOKEN,
            json!({"subject_id": "cust-m", "query": "a red Volvo car", "top_k": 1}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["retrieval"], "vector", "{}", a.body);
    assert!(
        a.body["chunks"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("Volvo")),
        "{}",
        a.body
    );
    // both spaces are in the log: a rebuild in the new one equals live and
    // calls no one
    until_count(
        &api.pool,
        "SELECT count(*) FROM audit_trail WHERE action = $1",
        "EpisodeEmbedded",
        6,
    )
    .await;
    let live = vector_rows(&api.pool).await;
    // (assemble embedded its query: one call)
    let calls = peer.calls();
    rebuild::rebuild_with_keys(&api.pool, &app.log, ReadModel::Memory, Some(keys.clone()))
        .await
        .expect("rebuild memory");
    assert_eq!(vector_rows(&api.pool).await, live);
    assert_eq!(peer.calls(), calls);
}
