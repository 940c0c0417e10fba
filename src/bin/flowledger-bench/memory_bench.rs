//! Memory benchmark (issue 14): assemble's queries on a memory read model
//! of `--chunks` chunk vectors, HNSW beside an exact pgvector scan of the
//! same data, writeback to "visible in assemble", and the cleanup.
//!
//! Needs PostgreSQL with pgvector (scripts/bench.sh starts PostgreSQL 18
//! from `PG18_BIN` for `memory`), nats-server, and a Vault API server for
//! the subjects' keys (an OpenBao dev server: `FLOWLEDGER_BENCH_VAULT_ADDR`,
//! root token `FLOWLEDGER_BENCH_VAULT_TOKEN`). In one run, on one database:
//!
//! 1. **fill**: the memory read model's tables, made by the projection's
//!    own DDL (`db::migrate_model`, `db::vector_ddl`), filled by COPY:
//!    subjects of skewed sizes (one of a tenth of all chunks, then blocks of
//!    10, 10, 10, 20, 50, 100, 300 and 1,500 chunks), two chunks per
//!    episode, seeded vectors of `--dimensions` around topic centroids (three
//!    topics per subject), and `--working-rows` working-state values not
//!    due; then the vector indexes (HNSW, the subject's btree) built on the
//!    loaded rows, timed.
//! 2. **assemble's queries**: `api::memory::gather` (the statements
//!    assemble runs, in its read-only snapshot, without the embedder's
//!    call) for query vectors near a chunk of subjects of each size, in
//!    sessions that differ only in settings: as deployed (the planner's
//!    choice; which index it used is read from `pg_stat_user_indexes`),
//!    exact (`enable_indexscan = off`: the subject's rows by bitmap scan,
//!    sorted by distance), and HNSW alone (the btree paths to the subject's
//!    rows removed for the run), without and with `hnsw.iterative_scan`.
//!    Recall is against the exact answer. Beside it, an unfiltered k-NN over
//!    all chunks (not assemble's query: the index itself), HNSW vs exact.
//! 3. **writeback → visible**: an `Application` with the memory projection
//!    and the embedding handler (an embeddings peer in this process, a
//!    hashed bag of words) on the same database; each writeback through the
//!    memory service and the bus, then `gather` polled until the episode's
//!    chunk is found by full text and by vector.
//! 4. **cleanup**: `--cleanup-values` working-state values due at once, on
//!    `--cleanup-subjects` subjects, written into the log as the bus writes
//!    them (`MemorySubjectOpened`, then `WorkingStateSet`s sealed with each
//!    subject's key, chained on the subject's last sequence;
//!    `--cleanup-per-commit` of them a commit, 1 being what one
//!    `working_state_set` each writes) and projected by the memory
//!    projection; then, on a fresh bus cache and key cache (as a
//!    `flowledger memory cleanup` process has), the real
//!    `memory::cleanup::run_once` past their expiry, beside the
//!    `--working-rows` rows not due. Before it, in the same run, the old
//!    per-value path (one `working_state_delete` marked expired per value,
//!    one at a time, as the cleanup did before `WorkingStateExpired`) over
//!    `--cleanup-single` values written the same way. `--only cleanup`
//!    skips parts 1 to 3 (no chunks, vectors or HNSW build).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Executor;

use flowledger::app::{Application, DatabaseSettings, Settings};
use flowledger::commands::memory::aggregate_id;
use flowledger::commands::registry::Registry;
use flowledger::commands::secret_access::policy::SecretPolicy;
use flowledger::config::{EmbedderFallback, EmbedderSection, HnswSearch, IterativeScan};
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::memory::embedder::Embedder;
use flowledger::memory::keys::SubjectKeys;
use flowledger::memory::service::{
    AssembleDefaults, Chunking, MemoryService, Message, WorkingDeleteBody, WritebackBody,
};
use flowledger::projections::db::{self, VECTORS_TABLE};
use flowledger::projections::ReadModel;
use flowledger::secrets::service::{SecretRules, SecretService};
use flowledger::secrets::vault::{VaultAuth, VaultClient, VaultConfig};

use crate::{connect_service, ms, percentile};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long, env = "FLOWLEDGER_NATS_URL")]
    nats_url: String,
    /// PostgreSQL with pgvector; an empty database.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The Vault (OpenBao) server of the subjects' keys.
    #[arg(long, env = "FLOWLEDGER_BENCH_VAULT_ADDR")]
    vault_addr: String,
    /// A token that may write and read `secret/` (the dev server's root).
    #[arg(long, env = "FLOWLEDGER_BENCH_VAULT_TOKEN", hide_env_values = true)]
    vault_token: String,
    /// Chunks (with their vectors) in the read model.
    #[arg(long, default_value_t = 100_000)]
    chunks: usize,
    /// Vector dimensions.
    #[arg(long, default_value_t = 256)]
    dimensions: usize,
    /// Queries per subject size and session kind.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Writebacks timed to "visible in assemble".
    #[arg(long, default_value_t = 200)]
    writebacks: usize,
    /// Working-state values due at once, expired by the cleanup.
    #[arg(long, default_value_t = 2_000)]
    cleanup_values: usize,
    /// The subjects they are spread over (default: one per 100 values).
    #[arg(long)]
    cleanup_subjects: Option<usize>,
    /// Values a setup commit holds (1: one commit per value, as the bus
    /// writes one `working_state_set` each).
    #[arg(long, default_value_t = 1)]
    cleanup_per_commit: usize,
    /// Values expired by the old per-value path first, for comparison (0:
    /// not run).
    #[arg(long, default_value_t = 2_000)]
    cleanup_single: usize,
    /// Run one part only: `cleanup` (no chunks, vectors or index build).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Working-state rows not due, filled beside them (default: --chunks).
    #[arg(long)]
    working_rows: Option<usize>,
    /// maintenance_work_mem for the index builds.
    #[arg(long, default_value = "4GB")]
    maintenance_work_mem: String,
}

/// The one part `--only` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Only {
    /// The cleanup (part 4).
    Cleanup,
}

const SEED: u64 = 0x6d65_6d6f_7279;
const TOP_K: u32 = 5;
const OWNER: &str = "bench";
const KEY_PATH: &str = "secret/data/flowledger/memory-keys";
/// Chunks of the subjects of one block (the sizes repeat).
const BLOCK: [usize; 8] = [10, 10, 10, 20, 50, 100, 300, 1_500];
const TOPICS: usize = 256;

/// One subject of the fill: its number, aggregate id, first chunk, size.
struct Subject {
    n: usize,
    id: String,
    size: usize,
}

/// Subject sizes: one of a tenth of the chunks, then [`BLOCK`]s.
fn subjects(chunks: usize) -> Vec<Subject> {
    let mut out = Vec::new();
    let mut left = chunks;
    let mut sizes = std::iter::once(chunks / 10).chain(BLOCK.iter().copied().cycle());
    while left > 0 {
        let size = sizes.next().unwrap_or(10).min(left).max(2);
        let size = size.min(left);
        let n = out.len();
        out.push(Subject {
            n,
            id: aggregate_id(OWNER, &format!("s{n}")),
            size,
        });
        left -= size;
    }
    out
}

fn gaussian(rng: &mut fastrand::Rng) -> f32 {
    // Box-Muller
    let u1 = rng.f32().max(f32::MIN_POSITIVE);
    let u2 = rng.f32();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// The seeded vectors: topic centroids, three topics per subject, each
/// chunk a centroid plus noise.
struct Vectors {
    dims: usize,
    centroids: Vec<Vec<f32>>,
}

impl Vectors {
    fn new(dims: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(SEED);
        let centroids = (0..TOPICS)
            .map(|_| {
                let mut c: Vec<f32> = (0..dims).map(|_| gaussian(&mut rng)).collect();
                normalise(&mut c);
                c
            })
            .collect();
        Vectors { dims, centroids }
    }

    /// Chunk `i` of subject `s`, the same on every call.
    fn chunk(&self, s: usize, i: usize) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(SEED ^ ((s as u64) << 32) ^ i as u64);
        let topic = (s * 7 + rng.usize(..3) * 101) % TOPICS;
        let sigma = 0.9 / (self.dims as f32).sqrt();
        let mut v: Vec<f32> = self.centroids[topic]
            .iter()
            .map(|c| c + sigma * gaussian(&mut rng))
            .collect();
        normalise(&mut v);
        v
    }

    /// A query near chunk `i` of subject `s`.
    fn query(&self, s: usize, i: usize, salt: u64) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(SEED ^ salt.rotate_left(17) ^ i as u64);
        let sigma = 0.3 / (self.dims as f32).sqrt();
        let mut v: Vec<f32> = self
            .chunk(s, i)
            .iter()
            .map(|c| c + sigma * gaussian(&mut rng))
            .collect();
        normalise(&mut v);
        v
    }
}

fn vector_text(v: &[f32], out: &mut String) {
    out.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{x:.5}");
    }
    out.push(']');
}

/// COPY (text format) into `table` of the rows `row(i, &mut line)` writes
/// for `i` in `0..rows`, sent in pieces.
async fn copy_rows(
    pool: &PgPool,
    table: &str,
    columns: &str,
    rows: usize,
    mut row: impl FnMut(usize, &mut String),
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} ({columns}) FROM STDIN"))
        .await
        .with_context(|| format!("COPY into {table}"))?;
    let mut buf = String::with_capacity(1 << 22);
    for i in 0..rows {
        row(i, &mut buf);
        buf.push('\n');
        if buf.len() > (1 << 22) {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    if !buf.is_empty() {
        copy.send(buf.into_bytes()).await?;
    }
    copy.finish().await?;
    Ok(())
}

const WORDS: [&str; 16] = [
    "order",
    "invoice",
    "delivery",
    "holiday",
    "train",
    "doctor",
    "birthday",
    "garden",
    "kitchen",
    "insurance",
    "school",
    "football",
    "recipe",
    "concert",
    "flight",
    "meeting",
];

/// The model of the bench's vectors (filled and embedded by its peer): the
/// read model's vector space.
const MODEL: &str = "bench-bag-of-words";

/// Fills the memory read model of version `v` with the subjects' rows.
async fn fill(
    pool: &PgPool,
    v: i32,
    subjects: &[Subject],
    vectors: &Vectors,
    working_rows: usize,
) -> anyhow::Result<()> {
    let base =
        chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.with_timezone(&chrono::Utc);
    fill_subjects(pool, v, subjects).await?;
    // (subject, chunk within it) of each chunk, in order
    let place: Vec<(usize, usize)> = subjects
        .iter()
        .flat_map(|s| (0..s.size).map(move |i| (s.n, i)))
        .collect();
    let at = |i: usize| (base + chrono::TimeDelta::seconds(i as i64 * 30)).to_rfc3339();
    // two chunks per episode (the message, the response)
    let episodes: Vec<(usize, usize)> = place.iter().copied().filter(|(_, i)| i % 2 == 0).collect();
    copy_rows(
        pool,
        &format!("memory_episodes_v{v}"),
        "aggregate_id, episode_id, turn_at, recorded_at, turn, seq",
        episodes.len(),
        |e, b| {
            let (s, i) = episodes[e];
            let turn = json!({
                "messages": [{"role": "user", "content": format!("about the {} {i}", WORDS[i % 16])}],
                "response": "Noted.",
            });
            let _ = write!(
                b,
                "{}\te{s}-{}\t{}\t{}\t{turn}\t{e}",
                subjects[s].id,
                i / 2,
                at(i),
                at(i)
            );
        },
    )
    .await?;
    eprintln!("  filled subjects and episodes");
    copy_rows(
        pool,
        &format!("memory_chunks_v{v}"),
        "aggregate_id, episode_id, idx, text, turn_at",
        place.len(),
        |c, b| {
            let (s, i) = place[c];
            let _ = write!(
                b,
                "{}\te{s}-{}\t{}\tabout the {} {} of item {i}\t{}",
                subjects[s].id,
                i / 2,
                i % 2,
                WORDS[(s + i) % 16],
                WORDS[(s * 3 + i / 2) % 16],
                at(i)
            );
        },
    )
    .await?;
    eprintln!("  filled {} chunks", place.len());
    copy_rows(
        pool,
        &format!("{VECTORS_TABLE}_v{v}"),
        "aggregate_id, episode_id, idx, model, embedding",
        place.len(),
        |c, b| {
            let (s, i) = place[c];
            let _ = write!(
                b,
                "{}\te{s}-{}\t{}\t{MODEL}\t",
                subjects[s].id,
                i / 2,
                i % 2
            );
            vector_text(&vectors.chunk(s, i), b);
        },
    )
    .await?;
    eprintln!("  filled {} vectors", place.len());
    fill_working(pool, v, subjects, working_rows).await
}

/// Fills `working_rows` working-state rows, not due, of `subjects` (their
/// `memory_subjects` rows written already).
async fn fill_working(
    pool: &PgPool,
    v: i32,
    subjects: &[Subject],
    working_rows: usize,
) -> anyhow::Result<()> {
    let base =
        chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.with_timezone(&chrono::Utc);
    let until = (chrono::Utc::now() + chrono::TimeDelta::days(365)).to_rfc3339();
    copy_rows(
        pool,
        &format!("memory_working_state_v{v}"),
        "aggregate_id, key, value, expires_at, updated_at",
        working_rows,
        |w, b| {
            let s = w % subjects.len();
            let _ = write!(
                b,
                "{}\tk{}\t\"v\"\t{until}\t{}",
                subjects[s].id,
                w / subjects.len(),
                base.to_rfc3339()
            );
        },
    )
    .await?;
    eprintln!("  filled {working_rows} working-state rows (not due)");
    Ok(())
}

/// The `memory_subjects` rows of `subjects`.
async fn fill_subjects(pool: &PgPool, v: i32, subjects: &[Subject]) -> anyhow::Result<()> {
    let base =
        chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.with_timezone(&chrono::Utc);
    copy_rows(
        pool,
        &format!("memory_subjects_v{v}"),
        "aggregate_id, owner, subject_id, opened_at, last_seq",
        subjects.len(),
        |i, b| {
            let _ = write!(
                b,
                "{}\t{OWNER}\ts{i}\t{}\t0",
                subjects[i].id,
                base.to_rfc3339()
            );
        },
    )
    .await
}

/// A pool whose sessions run `settings` first.
async fn pool_with(url: &str, settings: &'static [&'static str]) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for s in settings {
                    conn.execute(*s).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?)
}

/// idx_scan of each index of the vectors table.
async fn index_scans(pool: &PgPool, v: i32) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT indexrelname::text, idx_scan FROM pg_stat_user_indexes \
         WHERE relname = $1 ORDER BY indexrelname",
    )
    .bind(format!("{VECTORS_TABLE}_v{v}"))
    .fetch_all(pool)
    .await?)
}

/// The (episode_id, index) of the chunks of a gather answer.
fn chunk_ids(answer: &Value) -> Vec<(String, i64)> {
    answer["chunks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["episode_id"].as_str().unwrap_or_default().to_string(),
                        c["index"].as_i64().unwrap_or(-1),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One query: the subject's aggregate id and its vector.
struct Query {
    id: String,
    vector: Vec<f32>,
}

struct Timed {
    latencies: Vec<Duration>,
    answers: Vec<Vec<(String, i64)>>,
}

/// assemble's queries for one query vector: `api::memory::gather`, the
/// HNSW index scanned with `hnsw`.
async fn ask(pool: &PgPool, q: &Query, hnsw: HnswSearch) -> anyhow::Result<Value> {
    flowledger::api::memory::gather(
        pool,
        &q.id,
        "",
        flowledger::api::memory::Rank::Vector(q.vector.clone()),
        TOP_K,
        5,
        60_000,
        hnsw,
    )
    .await
    .map_err(|e| anyhow::anyhow!("gather: {}", e.error.message))?
    .context("a filled subject is live")
}

/// `gather` for every query on `pool` (after one untimed pass over the
/// first few, to warm the caches).
async fn run_gather(pool: &PgPool, queries: &[Query], hnsw: HnswSearch) -> anyhow::Result<Timed> {
    for q in queries.iter().take(10) {
        ask(pool, q, hnsw).await?;
    }
    let mut latencies = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    for q in queries {
        let t = Instant::now();
        let a = ask(pool, q, hnsw).await?;
        latencies.push(t.elapsed());
        answers.push(chunk_ids(&a));
    }
    Ok(Timed { latencies, answers })
}

/// Mean recall@k against `exact`, and how many answers had fewer than
/// `want` chunks.
fn recall(got: &[Vec<(String, i64)>], exact: &[Vec<(String, i64)>]) -> (f64, usize) {
    let mut sum = 0.0;
    let mut short = 0;
    for (g, e) in got.iter().zip(exact) {
        let e: HashSet<_> = e.iter().collect();
        let hit = g.iter().filter(|c| e.contains(c)).count();
        sum += if e.is_empty() {
            1.0
        } else {
            hit as f64 / e.len() as f64
        };
        if g.len() < e.len() {
            short += 1;
        }
    }
    (sum / got.len().max(1) as f64, short)
}

fn p(lat: &[Duration]) -> (f64, f64) {
    let mut l = lat.to_vec();
    l.sort();
    (ms(percentile(&l, 0.5)), ms(percentile(&l, 0.95)))
}

/// The unfiltered k-NN over every chunk (the bench's own statement, not
/// assemble's): the index itself, HNSW or exact by the session.
async fn global_knn(pool: &PgPool, queries: &[Query]) -> anyhow::Result<Timed> {
    let sql = format!(
        "SELECT episode_id, idx FROM {VECTORS_TABLE} ORDER BY embedding <=> $1 LIMIT {TOP_K}"
    );
    let mut latencies = Vec::new();
    let mut answers = Vec::new();
    for (n, q) in queries.iter().enumerate() {
        let t = Instant::now();
        let rows: Vec<(String, i32)> = sqlx::query_as(&sql)
            .bind(pgvector::Vector::from(q.vector.clone()))
            .fetch_all(pool)
            .await?;
        if n > 2 {
            latencies.push(t.elapsed());
        }
        answers.push(rows.into_iter().map(|(e, i)| (e, i64::from(i))).collect());
    }
    Ok(Timed { latencies, answers })
}

/// The stand-in embedder of the live part: a hashed bag of words.
fn bag_of_words(text: &str, dims: usize) -> Vec<f32> {
    let mut v = vec![0f32; dims];
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = flowledger::events::chain::sha256(w.to_lowercase().as_bytes());
        v[u16::from_le_bytes([h[0], h[1]]) as usize % dims] += 1.0;
    }
    if v.iter().all(|x| *x == 0.0) {
        v[0] = 1.0;
    }
    normalise(&mut v);
    v
}

/// An OpenAI-compatible embeddings peer in this process; its URL.
async fn embeddings_peer(dims: usize) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/v1/embeddings",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
            let data: Vec<Value> = body["input"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .map(|(i, t)| {
                            json!({"object": "embedding", "index": i,
                                   "embedding": bag_of_words(t.as_str().unwrap_or_default(), dims)})
                        })
                        .collect()
                })
                .unwrap_or_default();
            axum::Json(json!({"object": "list", "model": body["model"], "data": data}))
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/v1"))
}

/// The memory service of the bench's keys (a key cache of its own), with
/// the bag-of-words embedder at `peer` if given.
async fn memory_service(args: &Args, peer: Option<&str>) -> anyhow::Result<Arc<MemoryService>> {
    let vault = VaultClient::connect(VaultConfig {
        addr: args.vault_addr.clone(),
        auth: VaultAuth::Token(args.vault_token.clone().into()),
        timeout: Duration::from_secs(10),
    })
    .await
    .with_context(|| format!("connect to Vault at {}", args.vault_addr))?;
    let secrets = Arc::new(SecretService::new(
        vault,
        SecretPolicy::new(Vec::new()).map_err(|e| anyhow::anyhow!("no rules: {e}"))?,
        SecretRules {
            cache_ttl: Duration::from_secs(0),
            max_staleness: Duration::from_secs(0),
            retry_attempts: 3,
            retry_base: Duration::from_millis(50),
        },
    ));
    let keys = Arc::new(SubjectKeys::new(
        secrets,
        KEY_PATH,
        Duration::from_secs(300),
    ));
    let service = MemoryService::new(
        keys,
        Chunking { max_chars: 800 },
        AssembleDefaults {
            top_k: TOP_K,
            recent_episodes: 5,
            budget_ms: 2_000,
        },
    );
    let Some(peer) = peer else {
        return Ok(Arc::new(service));
    };
    let embedder = Embedder::new(
        EmbedderSection {
            url: peer.into(),
            model: MODEL.into(),
            dimensions: args.dimensions as u32,
            send_dimensions: false,
            timeout_ms: 5_000,
            max_attempts: 3,
            api_key_secret: None,
            on_failure: EmbedderFallback::Error,
            ranking: Default::default(),
        },
        None,
    )
    .map_err(|e| anyhow::anyhow!("the embedder: {e}"))?;
    Ok(Arc::new(service.with_embedder(Arc::new(embedder))))
}

fn refused(e: flowledger::bus::CommandError) -> anyhow::Error {
    anyhow::anyhow!("refused {}: {}", e.code.as_str(), e.message)
}

/// Writebacks timed until `gather` finds the episode's chunk by full text,
/// then by vector; sorted latencies of each.
async fn writeback_visible(
    app: &Application,
    memory: &Arc<MemoryService>,
    pool: &PgPool,
    n: usize,
    dims: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let bus = app.bus();
    let write = |i: usize, subject: String| {
        let text = format!("live check {i}: the token zq{i}x is about the blue kettle");
        let body = WritebackBody {
            subject_id: subject,
            messages: vec![Message {
                role: "user".into(),
                content: text.clone(),
            }],
            response: Some("Noted.".into()),
            timestamp: None,
            turn_id: None,
            facts: Vec::new(),
            extract: None,
        };
        (text, body)
    };
    // the subjects' keys made and cached first
    for s in 0..10 {
        let (_, body) = write(1_000_000 + s, format!("live-{s}"));
        memory
            .writeback(bus, OWNER, body, chrono::Utc::now())
            .await
            .map_err(refused)?;
    }
    let (mut text, mut vector) = (Vec::new(), Vec::new());
    for i in 0..n {
        let subject = format!("live-{}", i % 10);
        let id = aggregate_id(OWNER, &subject);
        let (said, body) = write(i, subject);
        let started = Instant::now();
        let w = memory
            .writeback(bus, OWNER, body, chrono::Utc::now())
            .await
            .map_err(refused)?;
        let episode = w.episode_id.context("a turn records an episode")?;
        let query = bag_of_words(&said, dims);
        let (mut by_text, mut by_vector) = (None, None);
        while by_text.is_none() || by_vector.is_none() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "writeback {i} not visible in assemble after 60 s"
            );
            if by_text.is_none() {
                let a = flowledger::api::memory::gather(
                    pool,
                    &id,
                    &format!("zq{i}x"),
                    flowledger::api::memory::Rank::Text,
                    TOP_K,
                    5,
                    2_000,
                    memory.hnsw(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.error.message))?;
                if a.is_some_and(|a| chunk_ids(&a).iter().any(|(e, _)| *e == episode)) {
                    by_text = Some(started.elapsed());
                }
            }
            if by_vector.is_none() {
                let a = flowledger::api::memory::gather(
                    pool,
                    &id,
                    "",
                    flowledger::api::memory::Rank::Vector(query.clone()),
                    TOP_K,
                    5,
                    2_000,
                    memory.hnsw(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.error.message))?;
                if a.is_some_and(|a| chunk_ids(&a).iter().any(|(e, _)| *e == episode)) {
                    by_vector = Some(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        text.extend(by_text);
        vector.extend(by_vector);
    }
    text.sort();
    vector.sort();
    Ok((text, vector))
}

/// Working-state rows of the subjects named `<prefix>-*` in the read model.
async fn rows_of(pool: &PgPool, prefix: &str) -> anyhow::Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM memory_working_state w JOIN memory_subjects s \
         USING (aggregate_id) WHERE s.subject_id LIKE $1",
    )
    .bind(format!("{prefix}-%"))
    .fetch_one(pool)
    .await?;
    Ok(n as usize)
}

/// Polls until `rows_of(prefix)` is `want` (at most 30 minutes).
async fn until_rows(pool: &PgPool, prefix: &str, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let n = rows_of(pool, prefix).await?;
        if n == want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{prefix}: {n} working-state rows, not {want}, after 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes `values` working-state values, all expiring one second after
/// `at`, of the subjects `<prefix>-0` .. `<prefix>-<subjects - 1>` into the
/// log as the bus writes them (the subject's `MemorySubjectOpened` first,
/// each value sealed with the subject's key, every commit chained on the
/// subject's last sequence), `per_commit` values a commit, 16 subjects at
/// a time; then waits until the memory projection has them all. Answers
/// the time to write and the time until projected.
async fn write_due(
    app: &Application,
    memory: &Arc<MemoryService>,
    pool: &PgPool,
    prefix: &str,
    (values, subjects, per_commit): (usize, usize, usize),
    at: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<(Duration, Duration)> {
    use flowledger::commands::memory::events::{MemoryEvent, MemorySubjectOpened, WorkingStateSet};
    use flowledger::events::envelope::{Actor, CommandMeta};
    let started = Instant::now();
    let bus = app.bus();
    let mut writes = futures::stream::iter(0..subjects)
        .map(|s| async move {
            let subject_id = format!("{prefix}-{s}");
            let id = aggregate_id(OWNER, &subject_id);
            let key = memory
                .keys()
                .get_or_create(&id)
                .await
                .map_err(|e| anyhow::anyhow!("the key of {subject_id}: {e}"))?;
            let n = values / subjects + usize::from(s < values % subjects);
            let mut events = vec![MemoryEvent::MemorySubjectOpened(MemorySubjectOpened {
                owner: OWNER.into(),
                subject_id: subject_id.clone(),
                key_id: key.id().to_string(),
            })];
            for k in 0..n {
                events.push(MemoryEvent::WorkingStateSet(WorkingStateSet {
                    key: format!("k{k}"),
                    value: key.seal_json(&json!({"step": k, "cart": ["a", "b"]})),
                    expires_at: at + chrono::TimeDelta::seconds(1),
                }));
                // the opening rides with the first value, as a first set's does
                if (k + 1) % per_commit == 0 || k + 1 == n {
                    let command_id = uuid::Uuid::now_v7().to_string();
                    let meta = CommandMeta::originating(
                        command_id.clone(),
                        Actor {
                            client_id: OWNER.into(),
                            user_id: None,
                        },
                        key.keyed_id("command", &[&command_id]),
                    );
                    bus.memory_undecided(&id, std::mem::take(&mut events), &meta)
                        .await
                        .map_err(|e| anyhow::anyhow!("append for {subject_id}: {e}"))?;
                }
            }
            anyhow::Ok(())
        })
        .buffer_unordered(16);
    while let Some(r) = writes.next().await {
        r?;
    }
    drop(writes);
    let written = started.elapsed();
    until_rows(pool, prefix, values).await?;
    Ok((written, started.elapsed()))
}

/// The cleanup's old path, for comparison: one `working_state_delete`
/// marked expired (a `WorkingStateDeleted` command) per due value of the
/// `<prefix>-*` subjects, one at a time, as `run_once` did before
/// `WorkingStateExpired`. Answers the values expired and the time.
async fn single_path(
    app: &Application,
    memory: &Arc<MemoryService>,
    pool: &PgPool,
    prefix: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let due: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.subject_id, w.key FROM memory_working_state w JOIN memory_subjects s \
         USING (aggregate_id) WHERE s.subject_id LIKE $1 AND w.expires_at <= $2 \
         ORDER BY w.aggregate_id, w.key",
    )
    .bind(format!("{prefix}-%"))
    .bind(now)
    .fetch_all(pool)
    .await?;
    for (subject_id, key) in &due {
        let body = WorkingDeleteBody {
            subject_id: subject_id.clone(),
            key: key.clone(),
        };
        memory
            .working_delete(app.bus(), OWNER, body, true, None, now)
            .await
            .map_err(refused)?;
    }
    Ok((due.len(), started.elapsed()))
}

/// Part 4: the old path over `--cleanup-single` values, then `run_once`
/// over `--cleanup-values`, each set up by [`write_due`].
async fn cleanup(
    app: &Application,
    args: &Args,
    pool: &PgPool,
    working_rows: usize,
) -> anyhow::Result<()> {
    let values = args.cleanup_values;
    let subjects = args
        .cleanup_subjects
        .unwrap_or(values / 100)
        .clamp(1, values.max(1));
    let per_commit = args.cleanup_per_commit.max(1);
    let setup = memory_service(args, None).await?;
    let at = chrono::Utc::now();
    let now = at + chrono::TimeDelta::seconds(5);
    println!(
        "\ncleanup ({values} due values on {subjects} subjects, {per_commit} a setup commit, \
         beside {working_rows} rows not due):"
    );
    if args.cleanup_single > 0 {
        let n = args.cleanup_single;
        let shape = (n, (n / 100).max(1), per_commit);
        let (written, projected) = write_due(app, &setup, pool, "single", shape, at).await?;
        println!(
            "  old path's {n} values written in {:.1} s, projected after {:.1} s",
            written.as_secs_f64(),
            projected.as_secs_f64()
        );
        app.bus().clear_memory_cache();
        let fresh = memory_service(args, None).await?;
        let (done, took) = single_path(app, &fresh, pool, "single", now).await?;
        anyhow::ensure!(done == n, "the old path found {done} of {n} values due");
        until_rows(pool, "single", 0).await?;
        println!(
            "  old path (one WorkingStateDeleted command per value, one at a time): {done} \
             values in {:.2} s, {:.0} values/s",
            took.as_secs_f64(),
            done as f64 / took.as_secs_f64().max(1e-9)
        );
    }
    let shape = (values, subjects, per_commit);
    let (written, projected) = write_due(app, &setup, pool, "clean", shape, at).await?;
    println!(
        "  {values} values written into the log in {:.1} s ({:.0}/s), projected after {:.1} s",
        written.as_secs_f64(),
        values as f64 / written.as_secs_f64().max(1e-9),
        projected.as_secs_f64()
    );
    // as a `flowledger memory cleanup` process: nothing cached
    app.bus().clear_memory_cache();
    let fresh = memory_service(args, None).await?;
    let now = chrono::Utc::now().max(now);
    let report = flowledger::memory::cleanup::run_once(app.bus(), &fresh, pool, now, &mut |_| {})
        .await
        .context("the cleanup")?;
    let took = Duration::from_millis(report.took_ms);
    let t = Instant::now();
    until_rows(pool, "clean", 0).await?;
    let rate = report.expired as f64 / took.as_secs_f64().max(1e-9);
    println!(
        "  cleanup::run_once (one WorkingStateExpired per subject and 1,000 values, {} subjects \
         at a time): {} expired, {} skipped, {} failed in {:.2} s, {rate:.0} values/s; read \
         model empty of them {:.2} s later",
        flowledger::memory::cleanup::CONCURRENCY,
        report.expired,
        report.skipped,
        report.failed,
        took.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        report.expired as usize == values && report.failed == 0,
        "the cleanup did not expire every value"
    );
    Ok(())
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let working_rows = args.working_rows.unwrap_or(args.chunks);
    let pool = db::connect(&args.database_url, 8).await?;
    let version: String = sqlx::query_scalar(
        "SELECT current_setting('server_version') || ', pgvector ' || \
         coalesce((SELECT default_version FROM pg_available_extensions WHERE name = 'vector'), 'none')",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "flowledger-bench memory: {} chunks, {} dimensions, PostgreSQL {version}, on this machine",
        args.chunks, args.dimensions
    );
    sqlx::query("CREATE EXTENSION IF NOT EXISTS vector")
        .execute(&pool)
        .await
        .context("pgvector is needed (scripts/bench.sh memory starts PostgreSQL 18 with it)")?;
    db::migrate(&pool).await?;
    db::migrate_model(&pool, ReadModel::Memory).await?;
    let v = db::active_version(&pool, ReadModel::Memory)
        .await?
        .context("the memory read model's version")?;
    let filled: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM memory_chunks_v{v}"))
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(filled == 0, "the database is not empty: give a fresh one");
    let only_cleanup = args.only == Some(Only::Cleanup);
    if only_cleanup {
        // subjects holding the rows not due, without chunks
        let idle: Vec<Subject> = (0..1_000)
            .map(|n| Subject {
                n,
                id: aggregate_id(OWNER, &format!("s{n}")),
                size: 0,
            })
            .collect();
        fill_subjects(&pool, v, &idle).await?;
        fill_working(&pool, v, &idle, working_rows).await?;
    } else {
        search(&args, &pool, v, working_rows).await?;
    }

    // the live parts: the bus, the projection, the embedding handler
    let client = connect_service(&args.nats_url).await?;
    log::init(&client, &LogConfig::default()).await?;
    let event_log = EventLog::open(client.clone(), LogConfig::default()).await?;
    let peer = match only_cleanup {
        true => None,
        false => Some(embeddings_peer(args.dimensions).await?),
    };
    let memory = memory_service(&args, peer.as_deref()).await?;
    let app = Application::build(Settings {
        nats: client,
        log: event_log,
        registry: Arc::new(Registry::with_keys(["bench.workflow"])),
        max_timeout_seconds: 3600,
        callback_sealer: None,
        intake: false,
        nats_accounts: Default::default(),
        checkpoints: None,
        database: Some(DatabaseSettings {
            url: args.database_url.clone(),
            max_connections: 10,
            projections: true,
            handler: None,
            http: None,
        }),
        secrets: None,
        memory: Some(memory.clone()),
        probes: None,
    })
    .await
    .map_err(|e| anyhow::anyhow!("build the service: {e}"))?;
    if !only_cleanup {
        writebacks(&app, &memory, &pool, &args).await?;
    }
    cleanup(&app, &args, &pool, working_rows).await?;
    drop(app);
    Ok(())
}

/// Part 3: writebacks timed until visible in assemble.
async fn writebacks(
    app: &Application,
    memory: &Arc<MemoryService>,
    pool: &PgPool,
    args: &Args,
) -> anyhow::Result<()> {
    let (text, vector) =
        writeback_visible(app, memory, pool, args.writebacks, args.dimensions).await?;
    println!(
        "\nwriteback -> visible in assemble ({} writebacks, one at a time, memory service + bus + \
         projection; by vector also the embedding handler and its peer), ms p50 / p95: full text \
         {:.1} / {:.1} | vector {:.1} / {:.1}",
        args.writebacks,
        ms(percentile(&text, 0.5)),
        ms(percentile(&text, 0.95)),
        ms(percentile(&vector, 0.5)),
        ms(percentile(&vector, 0.95))
    );
    Ok(())
}

/// Parts 1 and 2: the fill with chunks and vectors, the index build, and
/// assemble's queries.
async fn search(args: &Args, pool: &PgPool, v: i32, working_rows: usize) -> anyhow::Result<()> {
    let pool = pool.clone();
    // the projection's own DDL: the table first, its indexes after the load
    let (indexes, tables): (Vec<String>, Vec<String>) = db::vector_ddl(v, args.dimensions as u32)
        .into_iter()
        .partition(|s| db::is_index(s));
    for stmt in &tables {
        sqlx::query(stmt).execute(&pool).await?;
    }
    let subjects = subjects(args.chunks);
    let vectors = Vectors::new(args.dimensions);
    let t = Instant::now();
    fill(&pool, v, &subjects, &vectors, working_rows).await?;
    println!(
        "  fill (COPY of {} subjects, {} chunks and vectors, {} episodes): {:.1} s",
        subjects.len(),
        args.chunks,
        args.chunks / 2,
        t.elapsed().as_secs_f64()
    );
    {
        let mut conn = pool.acquire().await?;
        sqlx::query(&format!(
            "SET maintenance_work_mem = '{}'",
            args.maintenance_work_mem.replace('\'', "")
        ))
        .execute(&mut *conn)
        .await?;
        let workers: String = sqlx::query_scalar("SHOW max_parallel_maintenance_workers")
            .fetch_one(&mut *conn)
            .await?;
        for stmt in &indexes {
            let t = Instant::now();
            sqlx::query(stmt).execute(&mut *conn).await?;
            let name = stmt.split_whitespace().nth(5).unwrap_or("?");
            println!(
                "  index build {name}: {:.1} s (maintenance_work_mem {}, \
                 max_parallel_maintenance_workers {workers})",
                t.elapsed().as_secs_f64(),
                args.maintenance_work_mem
            );
        }
    }
    let space = db::VectorSpace {
        model: MODEL.into(),
        dimensions: args.dimensions as u32,
    };
    db::setup_vectors(&pool, v, &space, true).await?;
    for stmt in db::analyze(ReadModel::Memory, v) {
        sqlx::query(&stmt).execute(&pool).await?;
    }
    sqlx::query(&format!("ANALYZE {VECTORS_TABLE}_v{v}"))
        .execute(&pool)
        .await?;
    let sizes: (String, String) = sqlx::query_as(&format!(
        "SELECT pg_size_pretty(pg_table_size('{VECTORS_TABLE}_v{v}')), \
                pg_size_pretty(pg_relation_size('{VECTORS_TABLE}_v{v}_hnsw'))"
    ))
    .fetch_one(&pool)
    .await?;
    println!("  vectors table {}, HNSW index {}", sizes.0, sizes.1);

    // the query sets, by subject size
    let classes: Vec<(&str, Vec<&Subject>)> = vec![
        ("huge", subjects.iter().filter(|s| s.n == 0).collect()),
        (
            "large",
            subjects.iter().filter(|s| s.size == 1_500).collect(),
        ),
        (
            "medium",
            subjects.iter().filter(|s| s.size == 100).collect(),
        ),
        ("small", subjects.iter().filter(|s| s.size == 10).collect()),
    ];
    let mut rng = fastrand::Rng::with_seed(SEED + 1);
    let sets: Vec<(String, Vec<Query>)> = classes
        .iter()
        .filter(|(_, list)| !list.is_empty())
        .map(|(name, list)| {
            let qs = (0..args.queries)
                .map(|q| {
                    let s = list[q % list.len()];
                    let i = rng.usize(..s.size);
                    Query {
                        id: s.id.clone(),
                        vector: vectors.query(s.n, i, q as u64),
                    }
                })
                .collect();
            (format!("{name}: {} chunks", list[0].size), qs)
        })
        .collect();

    println!(
        "\nassemble's queries (api::memory::gather: subject check, profile, top-{TOP_K} chunks, \
         5 recent episodes, facts, working state; one read-only snapshot), per subject size; \
         ms p50 / p95, recall@{TOP_K} against exact, answers short of top_k:"
    );
    let url = args.database_url.clone();
    let mut exact_answers = Vec::new();
    for (name, qs) in &sets {
        let exact = pool_with(&url, &["SET enable_indexscan = off"]).await?;
        let e = run_gather(&exact, qs, HnswSearch::default()).await?;
        exact.close().await;
        // pgvector's own scan settings, which assemble had before [memory]
        // hnsw_ef_search and hnsw_iterative_scan
        let before_settings = pool_with(&url, &[]).await?;
        let o = run_gather(&before_settings, qs, HnswSearch::PGVECTOR_DEFAULTS).await?;
        before_settings.close().await;
        let before = index_scans(&pool, v).await?;
        let deployed = pool_with(&url, &[]).await?;
        let d = run_gather(&deployed, qs, HnswSearch::default()).await?;
        deployed.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = index_scans(&pool, v).await?;
        let used: Vec<String> = after
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.1 > b.1)
            .map(|(a, b)| format!("{} x{}", a.0, a.1 - b.1))
            .collect();
        let (rd, sd) = recall(&d.answers, &e.answers);
        let (ro, so) = recall(&o.answers, &e.answers);
        let ((d50, d95), (e50, e95)) = (p(&d.latencies), p(&e.latencies));
        let (o50, o95) = p(&o.latencies);
        println!(
            "  {name:>22}: as deployed {d50:.2} / {d95:.2} (recall {rd:.3}, short {sd}; \
             indexes used: {}) | pgvector's defaults {o50:.2} / {o95:.2} (recall {ro:.3}, \
             short {so}) | exact {e50:.2} / {e95:.2} | ratio p95 {:.2}",
            if used.is_empty() {
                "none".to_string()
            } else {
                used.join(", ")
            },
            d95 / e95
        );
        exact_answers.push(e.answers);
    }

    // HNSW alone: the btree paths to a subject's rows removed for the run
    println!(
        "\n  HNSW alone (the primary key and subject index dropped for this run, seq scans off):"
    );
    sqlx::query(&format!(
        "ALTER TABLE {VECTORS_TABLE}_v{v} DROP CONSTRAINT {VECTORS_TABLE}_v{v}_pkey"
    ))
    .execute(&pool)
    .await?;
    sqlx::query(&format!("DROP INDEX {VECTORS_TABLE}_v{v}_subject"))
        .execute(&pool)
        .await?;
    for (n, (name, qs)) in sets.iter().enumerate() {
        let hnsw_only = pool_with(&url, &["SET enable_seqscan = off"]).await?;
        let h = run_gather(&hnsw_only, qs, HnswSearch::PGVECTOR_DEFAULTS).await?;
        let relaxed_40 = HnswSearch {
            iterative_scan: IterativeScan::RelaxedOrder,
            ..HnswSearch::PGVECTOR_DEFAULTS
        };
        let i = run_gather(&hnsw_only, qs, relaxed_40).await?;
        let c = run_gather(&hnsw_only, qs, HnswSearch::default()).await?;
        hnsw_only.close().await;
        let (rh, sh) = recall(&h.answers, &exact_answers[n]);
        let (ri, si) = recall(&i.answers, &exact_answers[n]);
        let (rc, sc) = recall(&c.answers, &exact_answers[n]);
        let ((h50, h95), (i50, i95)) = (p(&h.latencies), p(&i.latencies));
        let (c50, c95) = p(&c.latencies);
        let d = HnswSearch::default();
        println!(
            "  {name:>22}: ef_search 40 {h50:.2} / {h95:.2} (recall {rh:.3}, short {sh}) | \
             ef_search 40 + iterative_scan relaxed_order {i50:.2} / {i95:.2} (recall {ri:.3}, \
             short {si}) | the defaults (ef_search {}, {}) {c50:.2} / {c95:.2} (recall {rc:.3}, \
             short {sc})",
            d.ef_search,
            d.iterative_scan.as_str()
        );
    }
    // back as the projection's DDL has them
    sqlx::query(&format!(
        "ALTER TABLE {VECTORS_TABLE}_v{v} ADD PRIMARY KEY (aggregate_id, episode_id, idx)"
    ))
    .execute(&pool)
    .await?;
    for stmt in &indexes {
        sqlx::query(stmt).execute(&pool).await?;
    }

    // the index itself: k-NN over every chunk
    let global: Vec<Query> = (0..args.queries.min(50))
        .map(|q| {
            let s = &subjects[rng.usize(..subjects.len())];
            Query {
                id: String::new(),
                vector: vectors.query(s.n, rng.usize(..s.size), 7_000 + q as u64),
            }
        })
        .collect();
    let hnsw = pool_with(&url, &[]).await?;
    let h = global_knn(&hnsw, &global).await?;
    hnsw.close().await;
    let exact = pool_with(&url, &["SET enable_indexscan = off"]).await?;
    let e = global_knn(&exact, &global).await?;
    exact.close().await;
    let (r, _) = recall(&h.answers, &e.answers);
    let ((h50, h95), (e50, e95)) = (p(&h.latencies), p(&e.latencies));
    println!(
        "\nunfiltered top-{TOP_K} over all {} chunks (not assemble's query), ms p50 / p95: HNSW \
         {h50:.2} / {h95:.2} (recall {r:.3}) | exact scan {e50:.1} / {e95:.1} | exact / HNSW p95 \
         {:.0}x",
        args.chunks,
        e95 / h95
    );

    Ok(())
}
