//! Memory retrieval evaluation (issue 14, acceptance "retrieval works"),
//! against real nats-server, PostgreSQL 18 with pgvector and OpenBao.
//!
//! A seeded generator writes 1,100 episodes (and the 500 tickets below)
//! through the real writeback
//! path (the memory service on the bus; the projection and the embedding
//! handler of the read side follow the log): twenty subjects of client
//! `billing` with 50 episodes each, and two subjects of client `other`
//! under the same subject ids (50 each) for the scoping check. Every
//! episode's user message names a product (of 14), a place (4 of 20 per
//! subject) and a price; within a subject each (product, place) pair occurs
//! once, each product about 3.6 times and each place about 12 times. The relevant chunk of an episode is its message (chunk
//! 0). Each query paraphrases it: the product by a synonym, other verbs and
//! nouns, the place by its name (lexical overlap that full text may use).
//!
//! The embeddings peer is a stand-in for a model, played by a small HTTP
//! server: a hashed bag of word stems (with a small synonym table) and
//! character trigrams, signed, L2-normalised, 256 dimensions, answered with
//! a little latency and, while the episodes are written, an occasional 429
//! (the handler retries). The figure measures flowledger's pipeline
//! (chunking, recording, the HNSW index, scoping to the client's subject,
//! ranking), not a model's quality.
//!
//! A second set: 25 support tickets per billing subject ("Ticket 4821377:
//! the refund has not arrived."), each asked for by its number alone ("any
//! news on ticket 4821377"): 500 queries where full text is exact and a
//! vector of digits is weak, the case hybrid ranking is for.
//!
//! Asserted: vector hit@5 >= 0.90 over the 1,000 paraphrased queries;
//! hit@5 >= 0.95 by full text and by hybrid over the 500 ticket queries; no
//! answer holds a chunk of another subject or client. Printed: hit@5 of
//! both sets by vector, hybrid and the full-text default (the same rows,
//! each ranking on a read side of its own); docs/MEMORY.md and
//! docs/BENCHMARKS.md record them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use flowledger::api::caller::{Caller, Role};
use flowledger::config::{EmbedderFallback, EmbedderSection, Ranking};
use flowledger::memory::embedder::Embedder;
use flowledger::memory::keys::SubjectKeys;
use flowledger::memory::service::{
    AssembleDefaults, Chunking, MemoryService, Message, WritebackBody,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::helpers::*;
use crate::openbao::OpenBao;

const DIMS: usize = 256;
const SEED: u64 = 14_001;
/// Billing's subjects and their episodes; the other client's.
const SUBJECTS: usize = 20;
const EPISODES: usize = 50;
/// The places of one subject (of [`PLACES`]): each occurs about 12 times.
const SUBJECT_PLACES: usize = 4;
const OTHER_SUBJECTS: usize = 2;
const OTHER_EPISODES: usize = 50;

/// (the word in the episode, the synonym in the query)
const PRODUCTS: [(&str, &str); 14] = [
    ("sofa", "couch"),
    ("bicycle", "bike"),
    ("automobile", "car"),
    ("television", "tv"),
    ("jacket", "coat"),
    ("sneakers", "trainers"),
    ("backpack", "rucksack"),
    ("stroller", "pram"),
    ("refrigerator", "fridge"),
    ("headphones", "earphones"),
    ("spectacles", "glasses"),
    ("suitcase", "luggage"),
    ("blender", "mixer"),
    ("scooter", "moped"),
];

const PLACES: [&str; 20] = [
    "Lyon", "Porto", "Oslo", "Krakow", "Seville", "Bergen", "Ghent", "Turin", "Split", "Bruges",
    "Tallinn", "Riga", "Malaga", "Bologna", "Zurich", "Utrecht", "Gdansk", "Nantes", "Graz",
    "Valencia",
];

const MESSAGES: [&str; 4] = [
    "Last month I bought a {product} for my trip to {place}; it cost {n} euros.",
    "For the {place} holiday we ordered a new {product}, {n} euros in the end.",
    "My sister recommended a {product} before the journey to {place}. I paid {n} euros.",
    "Reminder: the {product} I purchased ahead of visiting {place} came to {n} euros.",
];

const FILLERS: [&str; 6] = [
    "The weather has been rainy all week.",
    "Work is busy at the moment.",
    "I also need to call the bank tomorrow.",
    "The kids start school soon.",
    "Our neighbour adopted a cat.",
    "",
];

/// Support tickets of a billing subject, each with its own number: the
/// second query set asks for one by its number alone, where full text is
/// exact and a vector of digits is weak (the set hybrid ranking is for).
const TICKETS: usize = 25;
const TICKET_TOPICS: [&str; 8] = [
    "the invoice address is still wrong",
    "the refund has not arrived",
    "the password reset mail never came",
    "the login page shows an error",
    "the subscription renewed twice",
    "the delivery note lists the wrong name",
    "the receipt is missing a line",
    "the account was locked yesterday",
];
const TICKET_QUERIES: [&str; 3] = [
    "any news on ticket {id}",
    "what is the status of ticket {id}",
    "ticket {id} update please",
];

const RESPONSES: [&str; 4] = [
    "Noted, thanks for telling me.",
    "Got it, I will remember that.",
    "Thanks, noted.",
    "Understood.",
];

const QUERIES: [&str; 3] = [
    "which {syn} did I get for the {place} travel",
    "how much was the {syn} for going to {place}",
    "what did I spend on a {syn} for {place}",
];

/// The peer's synonym table: a word and the one it stands for (then
/// stemmed like any word).
const SYNONYMS: [(&str, &str); 28] = [
    ("couch", "sofa"),
    ("bike", "bicycle"),
    ("car", "automobile"),
    ("tv", "television"),
    ("coat", "jacket"),
    ("trainers", "sneakers"),
    ("rucksack", "backpack"),
    ("pram", "stroller"),
    ("fridge", "refrigerator"),
    ("earphones", "headphones"),
    ("glasses", "spectacles"),
    ("luggage", "suitcase"),
    ("mixer", "blender"),
    ("moped", "scooter"),
    ("bought", "buy"),
    ("ordered", "buy"),
    ("purchased", "buy"),
    ("paid", "buy"),
    ("get", "buy"),
    ("spend", "buy"),
    ("holiday", "trip"),
    ("journey", "trip"),
    ("travel", "trip"),
    ("visiting", "trip"),
    ("going", "trip"),
    ("cost", "price"),
    ("much", "price"),
    ("came", "price"),
];

const STOP: [&str; 24] = [
    "a", "an", "the", "is", "in", "i", "we", "my", "our", "did", "to", "and", "of", "for", "it",
    "on", "was", "what", "which", "how", "at", "be", "that", "all",
];

/// A crude stem: lower case, common English endings cut.
fn stem(word: &str) -> String {
    let w = word.to_lowercase();
    for suffix in ["ing", "ed", "es", "s"] {
        if let Some(s) = w.strip_suffix(suffix) {
            if s.chars().count() >= 3 {
                return s.to_string();
            }
        }
    }
    w
}

/// Adds `weight` to the signed bucket of `feature`.
fn add(v: &mut [f32], feature: &str, weight: f32) {
    let h = Sha256::digest(feature.as_bytes());
    let bucket = u16::from_le_bytes([h[0], h[1]]) as usize % DIMS;
    let sign = if h[2] & 1 == 0 { 1.0 } else { -1.0 };
    v[bucket] += sign * weight;
}

/// The stand-in model: stems (synonyms mapped to one word) and their
/// character trigrams, hashed, L2-normalised.
fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; DIMS];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let lower = word.to_lowercase();
        if STOP.contains(&lower.as_str()) {
            continue;
        }
        let word = SYNONYMS
            .iter()
            .find(|(from, _)| *from == lower)
            .map_or(lower.as_str(), |(_, to)| to);
        let s = stem(word);
        add(&mut v, &format!("w:{s}"), 1.0);
        let padded: Vec<char> = format!("^{s}$").chars().collect();
        for t in padded.windows(3) {
            add(&mut v, &format!("t:{}", t.iter().collect::<String>()), 0.25);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else {
        v[0] = 1.0;
    }
    v
}

/// The embeddings peer: OpenAI's `/v1/embeddings`, a little latency per
/// request and text, and, while `busy`, a 429 for every 150th request.
#[derive(Clone)]
struct Peer {
    url: String,
    requests: Arc<AtomicU64>,
    /// The 429s answered.
    refused: Arc<AtomicU64>,
    busy: Arc<AtomicBool>,
}

async fn embeddings(State(p): State<Peer>, Json(body): Json<Value>) -> axum::response::Response {
    let n = p.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let texts: Vec<String> = body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_micros(1_000 + 200 * texts.len() as u64)).await;
    if p.busy.load(Ordering::SeqCst) && n % 150 == 0 {
        p.refused.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "rate limited",
        )
            .into_response();
    }
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embed(t)}))
        .collect();
    Json(json!({"object": "list", "model": body["model"], "data": data})).into_response()
}

impl Peer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the embeddings peer");
        let addr = listener.local_addr().expect("its address");
        let peer = Peer {
            url: format!("http://{addr}/v1"),
            requests: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            busy: Arc::new(AtomicBool::new(true)),
        };
        let app = axum::Router::new()
            .route("/v1/embeddings", axum::routing::post(embeddings))
            .with_state(peer.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        peer
    }
}

/// The real model the second evaluation asks for, and its vectors' length.
const MODEL: &str = "all-MiniLM-L6-v2";
const MODEL_DIMS: usize = 384;

/// Where scripts/install-deps.sh makes the embeddings peer's venv.
const EMBED_PYTHON_DEFAULT: &str = "/opt/flowledger/embed-peer/bin/python";

/// scripts/embed-peer.py (the model all-MiniLM-L6-v2 on the CPU) run by
/// `FLOWLEDGER_EMBED_PYTHON` (scripts/test.sh sets it from install-deps'
/// `EMBED_PEER_PYTHON`), else [`EMBED_PYTHON_DEFAULT`]; stopped when dropped.
/// Panics, naming install-deps, when neither is there: the evaluation
/// fails, never skips.
struct ModelPeer {
    child: std::process::Child,
    url: String,
}

impl ModelPeer {
    fn start() -> Self {
        use std::io::BufRead;
        let (python, from) = match std::env::var("FLOWLEDGER_EMBED_PYTHON") {
            Ok(p) if !p.is_empty() => (p, "FLOWLEDGER_EMBED_PYTHON"),
            _ => (EMBED_PYTHON_DEFAULT.to_string(), "the default"),
        };
        assert!(
            std::path::Path::new(&python).is_file(),
            "no Python for the embeddings peer: {from} {python} does not exist; run \
             scripts/install-deps.sh and set FLOWLEDGER_EMBED_PYTHON to the EMBED_PEER_PYTHON \
             it prints (scripts/test.sh does)"
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/embed-peer.py");
        let mut child = std::process::Command::new(&python)
            .args([script, "--port", "0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {script} with {python}: {e}"));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the peer's first line");
        let url = line
            .trim()
            .strip_prefix("embed-peer: listening on ")
            .unwrap_or_else(|| {
                panic!("{script} did not start (its first line: {line:?}; its log is above)")
            })
            .to_string();
        ModelPeer { child, url }
    }
}

impl Drop for ModelPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One generated episode and its query.
/// Which query set an episode's query belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Set {
    /// The product by a synonym, the place by its name.
    Paraphrase,
    /// A ticket by its number alone.
    Ticket,
}

struct Episode {
    set: Set,
    owner: &'static str,
    subject: String,
    message: String,
    response: &'static str,
    query: String,
}

/// [`TICKETS`] ticket episodes for each of billing's `subjects` subjects,
/// numbered uniquely (seven digits), seeded by `rng`.
fn generate_tickets(rng: &mut fastrand::Rng, subjects: usize) -> Vec<Episode> {
    let mut numbers = HashSet::new();
    let mut out = Vec::new();
    for s in 0..subjects {
        for _ in 0..TICKETS {
            let id = loop {
                let n = rng.u32(1_000_000..10_000_000);
                if numbers.insert(n) {
                    break n;
                }
            };
            let topic = TICKET_TOPICS[rng.usize(..TICKET_TOPICS.len())];
            out.push(Episode {
                set: Set::Ticket,
                owner: "billing",
                subject: format!("cust-{s}"),
                message: format!("Ticket {id}: {topic}."),
                response: RESPONSES[rng.usize(..RESPONSES.len())],
                query: TICKET_QUERIES[rng.usize(..TICKET_QUERIES.len())]
                    .replace("{id}", &id.to_string()),
            });
        }
    }
    out
}

/// The episodes of `owner`'s `subjects` subjects, `per` each, seeded.
fn generate(
    rng: &mut fastrand::Rng,
    owner: &'static str,
    subjects: usize,
    per: usize,
) -> Vec<Episode> {
    let mut out = Vec::new();
    for s in 0..subjects {
        let mut places: Vec<usize> = (0..PLACES.len()).collect();
        rng.shuffle(&mut places);
        places.truncate(SUBJECT_PLACES);
        let mut pairs: Vec<(usize, usize)> = (0..PRODUCTS.len())
            .flat_map(|p| places.iter().map(move |&l| (p, l)))
            .collect();
        rng.shuffle(&mut pairs);
        for &(p, l) in pairs.iter().take(per) {
            let (product, synonym) = PRODUCTS[p];
            let place = PLACES[l];
            let n = rng.u32(20..2000).to_string();
            let filler = FILLERS[rng.usize(..FILLERS.len())];
            let said = MESSAGES[rng.usize(..MESSAGES.len())]
                .replace("{product}", product)
                .replace("{place}", place)
                .replace("{n}", &n);
            out.push(Episode {
                set: Set::Paraphrase,
                owner,
                subject: format!("cust-{s}"),
                message: format!("{said} {filler}").trim().to_string(),
                response: RESPONSES[rng.usize(..RESPONSES.len())],
                query: QUERIES[rng.usize(..QUERIES.len())]
                    .replace("{syn}", synonym)
                    .replace("{place}", place),
            });
        }
    }
    out
}

fn memory(keys: Arc<SubjectKeys>, embedder: Option<EmbedderSection>) -> Arc<MemoryService> {
    let service = MemoryService::new(
        keys,
        Chunking { max_chars: 800 },
        AssembleDefaults {
            top_k: 5,
            recent_episodes: 0,
            budget_ms: 5_000,
        },
    );
    let Some(cfg) = embedder else {
        return Arc::new(service);
    };
    let embedder = Embedder::new(cfg, None).expect("a valid embedder");
    Arc::new(service.with_embedder(Arc::new(embedder)))
}

/// `[memory.embedder]` for the peer at `url` serving `model` of `dimensions`.
fn embedder_section(url: &str, model: &str, dimensions: usize) -> EmbedderSection {
    EmbedderSection {
        url: url.into(),
        model: model.into(),
        dimensions: dimensions as u32,
        send_dimensions: false,
        // a CPU model on two shared cores: a query waits for the episodes'
        // batches ahead of it
        timeout_ms: 30_000,
        max_attempts: 5,
        api_key_secret: None,
        // a query that cannot be embedded fails the evaluation loudly
        on_failure: EmbedderFallback::Error,
        ranking: Ranking::Vector,
    }
}

/// hit@5 of `memory`'s assemble over billing's queries of `set`, asserting the retrieval kind and that every chunk is one of the
/// subject's own.
async fn evaluate(
    api: &ReadSide,
    memory: &Arc<MemoryService>,
    episodes: &[Episode],
    ids: &[String],
    own: &HashMap<String, HashSet<String>>,
    retrieval: &str,
    set: Set,
) -> f64 {
    let caller = Caller {
        client_id: "billing".into(),
        role: Role::Client,
    };
    let queries: Vec<usize> = (0..episodes.len())
        .filter(|&i| episodes[i].owner == "billing" && episodes[i].set == set)
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let queries = Arc::new(queries);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (next, hits, queries) = (next.clone(), hits.clone(), queries.clone());
        let (bus, pool, memory, caller) = (
            api.bus.clone(),
            api.pool.clone(),
            memory.clone(),
            caller.clone(),
        );
        let bodies: Vec<(String, String, String)> = queries
            .iter()
            .map(|&i| {
                (
                    episodes[i].subject.clone(),
                    episodes[i].query.clone(),
                    ids[i].clone(),
                )
            })
            .collect();
        let own = own.clone();
        let retrieval = retrieval.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let q = next.fetch_add(1, Ordering::SeqCst) as usize;
                let Some((subject, query, want)) = bodies.get(q) else {
                    return;
                };
                let body = json!({"subject_id": subject, "query": query, "top_k": 5});
                let a = flowledger::api::memory::assemble(
                    &bus,
                    Some(&pool),
                    Some(memory.as_ref()),
                    &caller,
                    body.to_string().as_bytes(),
                )
                .await
                .unwrap_or_else(|e| panic!("assemble {body}: {}", e.error.message));
                assert_eq!(a["retrieval"], retrieval.as_str(), "{body}: {a}");
                let chunks = a["chunks"].as_array().expect("chunks");
                assert!(chunks.len() <= 5, "top_k 5: {a}");
                let mine = &own[subject];
                for c in chunks {
                    let e = c["episode_id"].as_str().expect("an episode id");
                    assert!(
                        mine.contains(e),
                        "a chunk of another subject or client in billing's {subject}: {c}"
                    );
                }
                if chunks
                    .iter()
                    .any(|c| c["episode_id"] == want.as_str() && c["index"] == 0)
                {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("an evaluation task");
    }
    hits.load(Ordering::SeqCst) as f64 / queries.len() as f64
}

/// hit@5 of one query set by each ranking.
#[derive(Default, Clone, Copy)]
struct Hits {
    vector: f64,
    hybrid: f64,
    text: f64,
}

impl std::fmt::Display for Hits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vector {:.3}, hybrid {:.3}, full text {:.3}",
            self.vector, self.hybrid, self.text
        )
    }
}

/// What one evaluation measured.
struct Figures {
    paraphrase: Hits,
    tickets: Hits,
    /// From the start to every episode embedded and projected.
    embedded: Duration,
}

/// How many of billing's episodes have a query of `set`.
fn count(episodes: &[Episode], set: Set) -> usize {
    episodes
        .iter()
        .filter(|e| e.owner == "billing" && e.set == set)
        .count()
}

/// The evaluation against the embeddings peer `embedder`: the episodes
/// written, embedded and projected (then `ingested` is called), the
/// queries asked by vector and by the full-text default; every answer
/// checked to hold only the subject's own chunks.
async fn run(embedder: EmbedderSection, ingested: impl FnOnce()) -> Figures {
    let started = Instant::now();
    let dimensions = embedder.dimensions;
    let app = spawn_app().await;
    let bao = OpenBao::start().await;
    let keys = Arc::new(SubjectKeys::new(
        root_secret_service(&bao).await,
        MEMORY_KEY_PATH,
        Duration::from_secs(300),
    ));
    let url = pgvector_database().await;
    let hybrid = EmbedderSection {
        ranking: Ranking::Hybrid,
        ..embedder.clone()
    };
    let vector = memory(keys.clone(), Some(embedder));
    let api = spawn_api_with_memory(&app, true, url.clone(), vector.clone()).await;

    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut episodes = generate(&mut rng, "billing", SUBJECTS, EPISODES);
    episodes.extend(generate(&mut rng, "other", OTHER_SUBJECTS, OTHER_EPISODES));
    assert!(episodes.iter().filter(|e| e.owner == "billing").count() >= 1_000);
    // the tickets from a generator of their own, so the paraphrase set is
    // the one it was before they came
    episodes.extend(generate_tickets(
        &mut fastrand::Rng::with_seed(SEED + 1),
        SUBJECTS,
    ));

    // the writes: one task per subject (a subject's commands serialise on
    // its aggregate anyway), each turn a minute after the last
    let base = chrono::DateTime::parse_from_rfc3339("2026-06-01T08:00:00Z")
        .expect("a time")
        .with_timezone(&chrono::Utc);
    let mut by_subject: HashMap<(&'static str, String), Vec<usize>> = HashMap::new();
    for (i, e) in episodes.iter().enumerate() {
        by_subject
            .entry((e.owner, e.subject.clone()))
            .or_default()
            .push(i);
    }
    let episodes = Arc::new(episodes);
    let mut tasks = Vec::new();
    for ((owner, _), list) in by_subject {
        let (bus, memory, episodes) = (api.bus.clone(), vector.clone(), episodes.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in list {
                let e = &episodes[i];
                let body = WritebackBody {
                    subject_id: e.subject.clone(),
                    messages: vec![Message {
                        role: "user".into(),
                        content: e.message.clone(),
                    }],
                    response: Some(e.response.into()),
                    timestamp: Some(base + chrono::TimeDelta::minutes(i as i64)),
                    turn_id: Some(format!("t{i}")),
                    facts: Vec::new(),
                    extract: None,
                };
                let w = memory
                    .writeback(&bus, owner, body, chrono::Utc::now())
                    .await
                    .unwrap_or_else(|e| panic!("writeback {i}: {}", e.message));
                ids.push((i, w.episode_id.expect("a turn records an episode")));
            }
            ids
        }));
    }
    let mut ids = vec![String::new(); episodes.len()];
    for t in tasks {
        for (i, id) in t.await.expect("a writer task") {
            ids[i] = id;
        }
    }
    let wrote = started.elapsed();
    // every episode embedded (two chunks each: the message, the response)
    // and projected
    let chunks = 2 * episodes.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM memory_chunk_vectors")
            .fetch_one(&api.pool)
            .await
            .expect("count the vectors");
        if n == chunks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {chunks} chunk vectors after 300 s"
        );
        if std::env::var_os("TEST_LOG").is_some() {
            eprintln!(
                "  {n} of {chunks} chunk vectors at {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_trail WHERE action = 'EpisodeEmbeddingFailed'",
    )
    .fetch_one(&api.pool)
    .await
    .expect("count the failures");
    assert_eq!(
        failed, 0,
        "every episode embedded (the handler retries what may pass)"
    );
    // the read model's vector column has the configured dimensions
    let column: String = sqlx::query_scalar(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'memory_chunk_vectors'::regclass AND attname = 'embedding'",
    )
    .fetch_one(&api.pool)
    .await
    .expect("the vector column's type");
    assert_eq!(column, format!("vector({dimensions})"));
    let embedded = started.elapsed();
    ingested();

    // each billing subject's own episodes: what its answers may hold
    let mut own: HashMap<String, HashSet<String>> = HashMap::new();
    for (e, id) in episodes.iter().zip(&ids) {
        if e.owner == "billing" {
            own.entry(e.subject.clone()).or_default().insert(id.clone());
        }
    }
    // the three rankings, each on a read side of its own over the same
    // rows: by vector; the vector and full-text rankings fused; the
    // full-text default (a memory without an embedder)
    let fused = memory(keys.clone(), Some(hybrid));
    let fused_side = spawn_api_with_memory(&app, false, url.clone(), fused.clone()).await;
    let plain = memory(keys, None);
    let text_side = spawn_api_with_memory(&app, false, url, plain.clone()).await;
    let asking = Instant::now();
    let mut hits = [Hits::default(), Hits::default()];
    for (set, h) in [Set::Paraphrase, Set::Ticket].into_iter().zip(&mut hits) {
        h.vector = evaluate(&api, &vector, &episodes, &ids, &own, "vector", set).await;
        h.hybrid = evaluate(&fused_side, &fused, &episodes, &ids, &own, "hybrid", set).await;
        h.text = evaluate(&text_side, &plain, &episodes, &ids, &own, "full_text", set).await;
    }
    let asked = asking.elapsed();
    let [paraphrase, tickets] = hits;
    eprintln!(
        "memory retrieval: {} episodes; hit@5 of {} paraphrased queries: {paraphrase}; \
         of {} ticket-number queries: {tickets}; written in {:.1} s, embedded by {:.1} s, \
         the queries in {:.1} s, total {:.1} s",
        episodes.len(),
        count(&episodes, Set::Paraphrase),
        count(&episodes, Set::Ticket),
        wrote.as_secs_f64(),
        embedded.as_secs_f64(),
        asked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Figures {
        paraphrase,
        tickets,
        embedded,
    }
}

/// The pipeline's figure: the stand-in peer (hashed stems and trigrams with
/// a synonym table), 429s while the episodes are written.
#[tokio::test]
async fn the_relevant_chunk_is_in_the_top_5_for_90_percent_of_1000_paraphrased_queries() {
    let peer = Peer::start().await;
    let busy = peer.busy.clone();
    let f = run(
        embedder_section(&peer.url, "stand-in-stems-trigrams-256", DIMS),
        move || busy.store(false, Ordering::SeqCst),
    )
    .await;
    // every 150th request of the ingest was refused, and asked again (no
    // episode's embedding failed)
    let refused = peer.refused.load(Ordering::SeqCst);
    assert!(
        refused > 0,
        "no 429 was answered while the episodes were written"
    );
    assert!(
        f.paraphrase.vector >= 0.90,
        "paraphrase vector hit@5 under 0.90: {}",
        f.paraphrase
    );
    tickets_found_by_their_number(&f);
}

/// The retrieval figure with a real model: all-MiniLM-L6-v2 (384
/// dimensions) served by scripts/embed-peer.py.
#[tokio::test]
async fn with_a_real_model_the_relevant_chunk_is_in_the_top_5_for_90_percent_of_queries() {
    let peer = ModelPeer::start();
    let f = run(embedder_section(&peer.url, MODEL, MODEL_DIMS), || ()).await;
    eprintln!(
        "memory retrieval, {MODEL}: hit@5 paraphrased: {}; ticket numbers: {}; \
         ingest embedded by {:.1} s",
        f.paraphrase,
        f.tickets,
        f.embedded.as_secs_f64()
    );
    assert!(
        f.paraphrase.vector >= 0.90,
        "paraphrase vector hit@5 with {MODEL} under 0.90: {}",
        f.paraphrase
    );
    tickets_found_by_their_number(&f);
}

/// A ticket asked for by its number alone is found by full text and by
/// hybrid ranking (measured 1.000 and 0.998-1.000; the real model's vector
/// alone 0.908: digits are what a sentence embedding blurs).
fn tickets_found_by_their_number(f: &Figures) {
    assert!(
        f.tickets.text >= 0.95 && f.tickets.hybrid >= 0.95,
        "ticket-number hit@5 under 0.95 by full text or hybrid: {}",
        f.tickets
    );
}
