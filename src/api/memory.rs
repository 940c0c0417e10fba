//! The memory door (docs/MEMORY.md), the same over HTTP (`POST
//! /v1/memory/<command>`, bearer auth) and NATS (`flow.cmd.memory.<command>`,
//! the caller the broker vouches for): writeback, profile, working state,
//! forget, erase, and `assemble`, a read. A client acts only on its own
//! subjects: the owner is always the verified caller (an operator may erase
//! another client's subject, naming it as `owner`). Auditors read no
//! memory: the audit trail shows memory commands with their content sealed.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::{PgPool, Row};

use super::body::{from_fields, parse_object};
use super::caller::{Caller, Role};
use super::http::{ApiError, AppState};
use super::query::{ApiQuery, DEFAULT_LIMIT};
use crate::bus::{CommandBus, CommandError};
use crate::commands::memory::{aggregate_id, check_subject_id};
use crate::commands::ErrorCode;
use crate::config::{EmbedderFallback, Ranking};
use crate::memory::service::{
    EraseBody, ForgetBody, MemoryService, ProfileBody, WorkingDeleteBody, WorkingSetBody,
    WritebackBody,
};

/// The memory commands, by the name after `flow.cmd.memory.` (and after
/// `/v1/memory/` over HTTP, with `_` as `-`).
pub const COMMANDS: [&str; 7] = [
    "writeback",
    "profile",
    "working_state_set",
    "working_state_delete",
    "forget",
    "erase",
    "assemble",
];

fn not_configured() -> CommandError {
    CommandError {
        code: ErrorCode::Unavailable,
        message: "memory is not configured on this instance: set [memory] enabled = true with \
                  [secrets] vault_addr (docs/MEMORY.md)"
            .into(),
        field: None,
    }
}

/// A refusal of the memory door, with the seed-001 reason where one
/// applies (`client_not_found`, `timeout`, `database_error`, ...): the
/// reply's `error.reason`.
#[derive(Debug, Clone)]
pub struct DoorError {
    /// The code and message, as every door answers them.
    pub error: CommandError,
    /// The seed-001 error name.
    pub reason: Option<&'static str>,
}

impl From<CommandError> for DoorError {
    fn from(error: CommandError) -> Self {
        DoorError {
            error,
            reason: None,
        }
    }
}

impl DoorError {
    fn reasoned(code: ErrorCode, reason: &'static str, message: String) -> Self {
        DoorError {
            error: CommandError {
                code,
                message,
                field: None,
            },
            reason: Some(reason),
        }
    }

    /// The NATS reply body.
    pub fn to_json(&self) -> Value {
        let mut v = self.error.to_json();
        if let Some(r) = self.reason {
            v["error"]["reason"] = json!(r);
        }
        v
    }
}

impl IntoResponse for DoorError {
    fn into_response(self) -> Response {
        match self.reason {
            Some(r) => ApiError::Reasoned(self.error, r),
            None => ApiError::Command(self.error),
        }
        .into_response()
    }
}

fn owner_role(caller: &Caller, what: &str) -> Result<(), CommandError> {
    // personal content: only the client whose subject it is
    caller.require(&[Role::Client, Role::Operator], what)
}

/// Runs memory command `command` (one of [`COMMANDS`] but `assemble`) for
/// `caller`, with the request's `Idempotency-Key` if it had one (an HTTP or
/// NATS header): the reply `{ok, subject_id, stream_seq, duplicate, events,
/// episode_id?}`.
///
/// A writeback without `turn_id` takes [`keyed_turn_id`]; profile, working
/// state and forget take the key as their command id
/// (`MemoryService::profile`); erase is once per subject and takes none.
/// Another body or command under a key the client used is a 409 naming the
/// header.
pub async fn command(
    bus: &CommandBus,
    memory: Option<&MemoryService>,
    caller: &Caller,
    command: &str,
    body: &[u8],
    key: Option<&str>,
) -> Result<Value, CommandError> {
    let what = format!("memory.{command}");
    caller.require_may_command(&what)?;
    owner_role(caller, &what)?;
    if command == "assemble" || !COMMANDS.contains(&command) {
        return Err(CommandError::validation(
            None,
            format!(
                "no memory command {command:?}; the memory commands are {}",
                COMMANDS.join(", ")
            ),
        ));
    }
    let fields = parse_object(body, false)?;
    let memory = memory.ok_or_else(not_configured)?;
    let owner = caller.client_id.as_str();
    let now = Utc::now();
    let written = match command {
        "writeback" => {
            let mut b: WritebackBody = from_fields(fields)?;
            // the caller's own turn id names the command: a reuse is the
            // turn id's, not the key's
            let keyed = key.is_some() && b.turn_id.is_none();
            if let (Some(key), None) = (key, &b.turn_id) {
                b.turn_id = Some(keyed_turn_id(owner, key));
            }
            memory
                .writeback(bus, owner, b, now)
                .await
                .map_err(|e| by_key(keyed, e))?
        }
        "profile" => {
            let b: ProfileBody = from_fields(fields)?;
            memory
                .profile(bus, owner, b, key)
                .await
                .map_err(|e| by_key(key.is_some(), e))?
        }
        "working_state_set" => {
            let b: WorkingSetBody = from_fields(fields)?;
            memory
                .working_set(bus, owner, b, key, now)
                .await
                .map_err(|e| by_key(key.is_some(), e))?
        }
        "working_state_delete" => {
            let b: WorkingDeleteBody = from_fields(fields)?;
            memory
                .working_delete(bus, owner, b, false, key, now)
                .await
                .map_err(|e| by_key(key.is_some(), e))?
        }
        "forget" => {
            let b: ForgetBody = from_fields(fields)?;
            memory
                .forget(bus, owner, b, key, now)
                .await
                .map_err(|e| by_key(key.is_some(), e))?
        }
        "erase" => {
            let b: EraseBody = from_fields(fields)?;
            let whose = match b.owner.as_deref() {
                None => owner,
                Some(o) if o == owner => owner,
                Some(o) => {
                    caller.require(&[Role::Operator], "erasing another client's subject")?;
                    o
                }
            };
            memory
                .erase(bus, whose, owner, &b.subject_id, b.reason)
                .await?
        }
        other => {
            return Err(CommandError::validation(
                None,
                format!(
                    "no memory command {other:?}; the memory commands are {}",
                    COMMANDS.join(", ")
                ),
            ))
        }
    };
    Ok(written.to_json())
}

/// `e`, or the 409 of a reused `Idempotency-Key` when the key named the
/// command (`keyed`) and the store found its id used for another one.
fn by_key(keyed: bool, e: CommandError) -> CommandError {
    if keyed && e.is_command_id_reused() {
        super::write::key_reused()
    } else {
        e
    }
}

/// The `turn_id` a writeback sent with `Idempotency-Key` `key` and without
/// a `turn_id` gets: the same for every repeat (from a hash of the client
/// and the key), so the repeat is the same command and answers the first
/// answer.
fn keyed_turn_id(client_id: &str, key: &str) -> String {
    let digest = crate::bus::ids::keyed_digest("turn-id", client_id, key);
    format!("idem-{}", hex::encode(digest))
}

/// The body of `memory.assemble`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AssembleBody {
    /// The caller's subject.
    subject_id: String,
    /// What the prompt is about (at most 4096 characters).
    #[schema(max_length = 4096)]
    query: String,
    /// Chunks, 1 to 100; default `[memory] top_k`.
    #[schema(minimum = 1, maximum = 100)]
    top_k: Option<u32>,
    /// Recent episodes, 0 to 100; default `[memory] recent_episodes`.
    #[schema(maximum = 100)]
    recent_episodes: Option<u32>,
    /// The time budget, 10 to 60000 ms; default `[memory] budget_ms`.
    #[schema(minimum = 10, maximum = 60000)]
    budget_ms: Option<u64>,
    /// Read your own write: wait, within the budget, until the memory
    /// read model has applied this stream sequence (the `stream_seq` a
    /// writeback or another memory command answered); past the budget,
    /// `timeout`; past the end of the log, 400. Without it, assemble reads
    /// the read model as it is.
    #[schema(minimum = 1)]
    after_seq: Option<u64>,
}

/// Waits until the active memory read model has applied stream sequence
/// `seq` (the caller bounds the wait: assemble's budget). A stopped
/// projection never gets there: that is an error at once.
async fn applied(pool: &PgPool, seq: u64) -> Result<(), DoorError> {
    let mut pause = Duration::from_millis(2);
    loop {
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT last_seq, state FROM projection_checkpoints \
             WHERE name = 'memory' AND active",
        )
        .fetch_optional(pool)
        .await
        .map_err(database_error)?;
        match row {
            Some((last, _)) if last >= 0 && last as u64 >= seq => return Ok(()),
            Some((_, state)) if state == "stopped" => {
                return Err(DoorError::reasoned(
                    ErrorCode::Unavailable,
                    "database_error",
                    format!(
                        "the memory read model is stopped before stream sequence {seq} \
                         (flowledger projections status); it cannot show that write yet"
                    ),
                ))
            }
            _ => {}
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn database_error(e: sqlx::Error) -> DoorError {
    // 57014: query_canceled, here the statement_timeout of the budget
    if let sqlx::Error::Database(d) = &e {
        if d.code().as_deref() == Some("57014") {
            return DoorError::reasoned(
                ErrorCode::Unavailable,
                "timeout",
                "assemble's queries took longer than its budget; retry, or give a larger budget_ms"
                    .into(),
            );
        }
    }
    tracing::error!(error = %e, "memory: assemble query failed");
    DoorError::reasoned(
        ErrorCode::Unavailable,
        "database_error",
        "the memory read model could not be queried; retry later".into(),
    )
}

/// `assemble`: for one of the caller's subjects and a query, the profile,
/// the top-k chunks by text rank (with scores), the recent episodes, the
/// valid facts and the working state not expired, within a time budget.
pub async fn assemble(
    bus: &CommandBus,
    pool: Option<&PgPool>,
    memory: Option<&MemoryService>,
    caller: &Caller,
    body: &[u8],
) -> Result<Value, DoorError> {
    owner_role(caller, "memory.assemble")?;
    let b: AssembleBody = from_fields(parse_object(body, false)?)?;
    let memory = memory.ok_or_else(not_configured)?;
    let pool = pool.ok_or_else(|| CommandError {
        code: ErrorCode::Unavailable,
        message: "this instance has no read-model database (--database-url): assemble reads \
                  the memory read model"
            .into(),
        field: None,
    })?;
    let d = memory.defaults();
    let d = (d.top_k, d.recent_episodes, d.budget_ms);
    check_subject_id(&b.subject_id)
        .map_err(|e| CommandError::validation(Some("subject_id"), e.to_string()))?;
    if b.query.chars().count() > 4096 {
        return Err(CommandError::validation(Some("query"), "longer than 4096 characters").into());
    }
    let top_k = b.top_k.unwrap_or(d.0);
    let recent = b.recent_episodes.unwrap_or(d.1);
    if !(1..=100).contains(&top_k) || recent > 100 {
        return Err(CommandError::validation(
            Some(if recent > 100 {
                "recent_episodes"
            } else {
                "top_k"
            }),
            "top_k must be 1 to 100, recent_episodes at most 100",
        )
        .into());
    }
    let budget = b.budget_ms.unwrap_or(d.2);
    if !(10..=60_000).contains(&budget) {
        return Err(CommandError::validation(Some("budget_ms"), "must be 10 to 60000").into());
    }
    if b.after_seq == Some(0) {
        return Err(CommandError::validation(Some("after_seq"), "must be at least 1").into());
    }
    if let Some(seq) = b.after_seq {
        // a receipt's sequence is in the log already: one past its end was
        // never answered to anyone, and waiting for it would only run out
        // the budget
        let last = bus.log().last_seq().await.map_err(|e| {
            tracing::warn!(error = %e, "memory: assemble: the stream's last sequence is unknown");
            DoorError::reasoned(
                ErrorCode::Unavailable,
                "database_error",
                "the event stream cannot be asked for its last sequence (after_seq); retry later"
                    .into(),
            )
        })?;
        if seq > last {
            return Err(CommandError::validation(
                Some("after_seq"),
                format!(
                    "{seq} is past the end of the log (its last sequence is {last}); give the \
                     stream_seq a command answered"
                ),
            )
            .into());
        }
    }
    let id = aggregate_id(&caller.client_id, &b.subject_id);
    let started = Instant::now();
    let work = async {
        if let Some(seq) = b.after_seq {
            applied(pool, seq).await?;
        }
        // with an embedder: the query's vector, within three quarters of
        // the budget (the rest leaves room for the full-text fallback)
        let (rank, retrieval) = match memory.embedder() {
            Some(e) if !b.query.trim().is_empty() => {
                let limit = Duration::from_millis((budget * 3 / 4).max(1));
                match e
                    .embed(bus, std::slice::from_ref(&b.query), Some(limit))
                    .await
                {
                    Ok(mut v) => match (v.pop(), e.config().ranking) {
                        (Some(v), Ranking::Hybrid) => (Rank::Hybrid(v), "hybrid"),
                        (Some(v), Ranking::Vector) => (Rank::Vector(v), "vector"),
                        (None, _) => (Rank::Text, "full_text_fallback"),
                    },
                    Err(x) => match e.config().on_failure {
                        EmbedderFallback::Error => {
                            tracing::warn!(error = %x, "memory: assemble: the query could not be embedded");
                            return Err(DoorError::reasoned(
                                ErrorCode::Unavailable,
                                "embeddings_failed",
                                // the detail (a secret's path, the peer's status) is logged
                                "the query could not be embedded; retry later".into(),
                            ));
                        }
                        EmbedderFallback::FullText => {
                            tracing::warn!(error = %x, "memory: assemble: the query could not be \
                                embedded; ranking by full text");
                            (Rank::Text, "full_text_fallback")
                        }
                    },
                }
            }
            _ => (Rank::Text, "full_text"),
        };
        // the queries get what is left of the budget
        let left = budget
            .saturating_sub(started.elapsed().as_millis() as u64)
            .max(1);
        let g = gather(
            pool,
            &id,
            &b.query,
            rank,
            top_k,
            recent,
            left,
            memory.hnsw(),
        )
        .await?;
        Ok::<_, DoorError>(g.map(|g| (g, retrieval)))
    };
    let Ok(gathered) = tokio::time::timeout(Duration::from_millis(budget), work).await else {
        return Err(DoorError::reasoned(
            ErrorCode::Unavailable,
            "timeout",
            format!("assemble took longer than its budget of {budget} ms; retry, or give a larger budget_ms"),
        ));
    };
    let (mut v, retrieval) = gathered?.ok_or_else(|| {
        DoorError::reasoned(
            ErrorCode::NotFound,
            "client_not_found",
            format!(
                "no memory for subject {:?} (never written, or erased)",
                b.subject_id
            ),
        )
    })?;
    v["subject_id"] = json!(b.subject_id);
    v["retrieval"] = json!(retrieval);
    v["took_ms"] = json!(started.elapsed().as_millis() as u64);
    Ok(v)
}

/// The read-only transaction assemble reads in: one connection, one
/// snapshot, each statement bounded by `budget_ms` (PostgreSQL itself stops
/// a statement past it, so a timed-out assemble leaves no work behind);
/// with `hnsw` (the vector path: pgvector is there), its scan settings,
/// `SET LOCAL` to this transaction. Public so a test can look at the
/// settings inside it.
pub async fn snapshot(
    pool: &PgPool,
    budget_ms: u64,
    hnsw: Option<crate::config::HnswSearch>,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, DoorError> {
    let mut tx = pool.begin().await.map_err(database_error)?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(database_error)?;
    sqlx::query(&format!(
        "SET LOCAL statement_timeout = {}",
        budget_ms.max(1)
    ))
    .execute(&mut *tx)
    .await
    .map_err(database_error)?;
    if let Some(h) = hnsw {
        // set_config(.., true): SET LOCAL, with the values bound
        sqlx::query(
            "SELECT set_config('hnsw.ef_search', $1, true), \
                    set_config('hnsw.iterative_scan', $2, true)",
        )
        .bind(h.ef_search.to_string())
        .bind(h.iterative_scan.as_str())
        .execute(&mut *tx)
        .await
        .map_err(database_error)?;
    }
    Ok(tx)
}

/// How [`gather`] ranks a subject's chunks.
#[derive(Debug, Clone)]
pub enum Rank {
    /// By full text (any word of the query, cover density).
    Text,
    /// By cosine distance to the query's vector (HNSW).
    Vector(Vec<f32>),
    /// Both, fused by reciprocal rank ([`CHUNKS_HYBRID`]).
    Hybrid(Vec<f32>),
}

/// How many candidates each ranking of [`Rank::Hybrid`] gives the fusion
/// per chunk asked for (at least [`HYBRID_MIN_CANDIDATES`]).
const HYBRID_CANDIDATES_PER_CHUNK: u32 = 4;
const HYBRID_MIN_CANDIDATES: u32 = 40;

/// Everything `assemble` returns, read in one [`snapshot`] with each
/// statement bounded by `budget_ms`; `None`: no such (live) subject.
/// `rank`: by full text, by the query's embedding (cosine distance, the
/// HNSW index scanned with `hnsw`, its `ef_search` at least the candidates
/// asked for), or both fused. Public so the memory benchmark times
/// assemble's own queries, without the embedder's call.
#[allow(clippy::too_many_arguments)]
pub async fn gather(
    pool: &PgPool,
    id: &str,
    query: &str,
    rank: Rank,
    top_k: u32,
    recent: u32,
    budget_ms: u64,
    hnsw: crate::config::HnswSearch,
) -> Result<Option<Value>, DoorError> {
    let subject =
        sqlx::query("SELECT 1 FROM memory_subjects WHERE aggregate_id = $1 AND erased_at IS NULL");
    let profile = sqlx::query("SELECT fields FROM memory_profiles WHERE aggregate_id = $1");
    let by_vector = !matches!(rank, Rank::Text);
    let candidates = match rank {
        Rank::Hybrid(_) => (top_k * HYBRID_CANDIDATES_PER_CHUNK).max(HYBRID_MIN_CANDIDATES),
        _ => top_k,
    };
    let chunks = match rank {
        // the nearest chunk vectors of the subject by cosine distance
        // (HNSW); score = 1 - distance
        Rank::Vector(v) => sqlx::query(
            "SELECT c.episode_id, c.idx, c.text, c.turn_at, \
                    (1 - (e.embedding <=> $2))::real AS score \
             FROM memory_chunk_vectors e \
             JOIN memory_chunks c USING (aggregate_id, episode_id, idx) \
             WHERE e.aggregate_id = $1 \
             ORDER BY e.embedding <=> $2 LIMIT $3",
        )
        .bind(id)
        .bind(pgvector::Vector::from(v)),
        Rank::Hybrid(v) => sqlx::query(CHUNKS_HYBRID)
            .bind(id)
            .bind(query)
            .bind(pgvector::Vector::from(v))
            .bind(i64::from(candidates)),
        // any query word may match (OR), ranked by cover density
        Rank::Text => sqlx::query(CHUNKS_BY_TEXT).bind(id).bind(query),
    };
    // a failed vector query is vector_search_failed (past the budget: timeout)
    let chunk_error = |e: sqlx::Error| {
        let timed_out =
            matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("57014"));
        if by_vector && !timed_out {
            tracing::error!(error = %e, "memory: assemble: the vector query failed");
            DoorError::reasoned(
                ErrorCode::Unavailable,
                "vector_search_failed",
                "the similarity search failed; retry later".into(),
            )
        } else {
            database_error(e)
        }
    };
    let episodes_sql = format!(
        "SELECT episode_id, turn_at, turn, {EXTRACTION} FROM memory_episodes e \
         WHERE aggregate_id = $1 ORDER BY turn_at DESC, episode_id DESC LIMIT $2"
    );
    let episodes = sqlx::query(&episodes_sql);
    let facts = sqlx::query(
        "SELECT subject, key, value, confidence, source, version, valid_from FROM memory_facts \
         WHERE aggregate_id = $1 AND invalid_at IS NULL ORDER BY subject, key",
    );
    let working = sqlx::query(
        "SELECT key, value, expires_at FROM memory_working_state \
         WHERE aggregate_id = $1 AND expires_at > now() ORDER BY key",
    );
    let hnsw = by_vector.then(|| crate::config::HnswSearch {
        // fewer candidates than asked for would cut the answer short
        ef_search: hnsw.ef_search.max(candidates),
        ..hnsw
    });
    let mut tx = snapshot(pool, budget_ms, hnsw).await?;
    let subject = subject
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(database_error)?;
    if subject.is_none() {
        return Ok(None);
    }
    let profile = profile
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(database_error)?;
    let chunks = chunks
        .bind(i64::from(top_k))
        .fetch_all(&mut *tx)
        .await
        .map_err(chunk_error)?;
    let episodes = episodes
        .bind(id)
        .bind(i64::from(recent))
        .fetch_all(&mut *tx)
        .await
        .map_err(database_error)?;
    let facts = facts
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(database_error)?;
    let working = working
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(database_error)?;
    // read only: nothing to keep
    tx.rollback().await.map_err(database_error)?;
    if subject.is_none() {
        return Ok(None);
    }
    let profile: Option<Value> = profile
        .map(|r| r.try_get("fields"))
        .transpose()
        .map_err(database_error)?;
    let chunks = chunks
        .iter()
        .map(|r| {
            Ok(json!({
                "episode_id": r.try_get::<String, _>("episode_id")?,
                "index": r.try_get::<i32, _>("idx")?,
                "text": r.try_get::<String, _>("text")?,
                "turn_at": r.try_get::<DateTime<Utc>, _>("turn_at")?,
                "score": r.try_get::<f32, _>("score")?,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(database_error)?;
    let episodes = episodes
        .iter()
        .map(episode_json)
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(database_error)?;
    let facts = facts
        .iter()
        .map(fact_json)
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(database_error)?;
    let mut state = Map::new();
    for r in &working {
        let key: String = r.try_get("key").map_err(database_error)?;
        let value: Value = r.try_get("value").map_err(database_error)?;
        let expires: DateTime<Utc> = r.try_get("expires_at").map_err(database_error)?;
        state.insert(key, json!({"value": value, "expires_at": expires}));
    }
    Ok(Some(json!({
        "ok": true,
        "profile": profile,
        "chunks": chunks,
        "recent_episodes": episodes,
        "facts": facts,
        "working_state": state,
    })))
}

/// The query words of text parameter `$2`, any of which may match (OR),
/// as `w.q` (NULL when it has none, e.g. only stop words).
macro_rules! any_word_of_2 {
    () => {
        "(SELECT NULLIF(replace(plainto_tsquery('english', $2)::text, ' & ', ' | '), '')::tsquery AS q) w"
    };
}

/// The subject's (`$1`) chunks matching any word of `$2`, ranked by cover
/// density, `$3` at most.
const CHUNKS_BY_TEXT: &str = concat!(
    "SELECT c.episode_id, c.idx, c.text, c.turn_at, ts_rank_cd(c.tsv, q) AS score \
     FROM memory_chunks c, ",
    any_word_of_2!(),
    " WHERE c.aggregate_id = $1 AND w.q IS NOT NULL AND c.tsv @@ w.q \
     ORDER BY score DESC, c.turn_at DESC, c.idx LIMIT $3"
);

/// The subject's (`$1`) chunks by reciprocal rank fusion (k = 60) of the
/// `$4` nearest by cosine distance to `$3` and the `$4` best by full text
/// of `$2` (any word, cover density), `$5` at most: score = the sum over
/// both rankings of 1 / (60 + rank), so a chunk near the top of either
/// comes first, and one both find before one either finds alone.
const CHUNKS_HYBRID: &str = concat!(
    "WITH v AS (SELECT episode_id, idx, row_number() OVER (ORDER BY d, episode_id, idx) AS r \
       FROM (SELECT episode_id, idx, embedding <=> $3 AS d FROM memory_chunk_vectors \
             WHERE aggregate_id = $1 ORDER BY embedding <=> $3 LIMIT $4) n), \
     t AS (SELECT episode_id, idx, \
             row_number() OVER (ORDER BY s DESC, turn_at DESC, idx) AS r \
       FROM (SELECT c.episode_id, c.idx, c.turn_at, ts_rank_cd(c.tsv, w.q) AS s \
             FROM memory_chunks c, ",
    any_word_of_2!(),
    "       WHERE c.aggregate_id = $1 AND w.q IS NOT NULL AND c.tsv @@ w.q \
             ORDER BY s DESC, c.turn_at DESC, c.idx LIMIT $4) m), \
     f AS (SELECT episode_id, idx, sum(1.0 / (60 + r)) AS score \
       FROM (SELECT * FROM v UNION ALL SELECT * FROM t) u GROUP BY episode_id, idx) \
     SELECT c.episode_id, c.idx, c.text, c.turn_at, f.score::real AS score \
     FROM f JOIN memory_chunks c ON c.aggregate_id = $1 AND c.episode_id = f.episode_id \
       AND c.idx = f.idx \
     ORDER BY f.score DESC, c.turn_at DESC, c.idx LIMIT $5"
);

/// The subject's (`$1`) facts (with `$3`: every version, else the valid
/// ones) whose subject, key or value has any word of `$2`, best first.
/// A subject's facts are few (each key one row per version), so the text
/// is matched as it is read, without an index.
const FACTS_BY_TEXT: &str = concat!(
    "SELECT f.subject, f.key, f.value, f.confidence, f.source, f.version, f.valid_from, \
            f.invalid_at, ts_rank_cd(t.tsv, w.q) AS score \
     FROM memory_facts f, ",
    any_word_of_2!(),
    ", LATERAL (SELECT to_tsvector('english', f.subject || ' ' || replace(f.key, '_', ' ') \
                 || ' ' || coalesce(f.value #>> '{}', '')) AS tsv) t \
     WHERE f.aggregate_id = $1 AND ($3 OR f.invalid_at IS NULL) \
       AND w.q IS NOT NULL AND t.tsv @@ w.q \
     ORDER BY score DESC, f.subject, f.key, f.version"
);

/// An episode's extraction status and reason, as columns `extraction` and
/// `extraction_reason` of `memory_episodes e`; read through `to_jsonb` so a
/// version made before the extractor (without the columns) gives nulls.
const EXTRACTION: &str = "to_jsonb(e) ->> 'extraction' AS extraction, \
                          to_jsonb(e) ->> 'extraction_reason' AS extraction_reason";

fn episode_json(r: &sqlx::postgres::PgRow) -> Result<Value, sqlx::Error> {
    let turn: Value = r.try_get("turn")?;
    let mut v = json!({
        "episode_id": r.try_get::<String, _>("episode_id")?,
        "turn_at": r.try_get::<DateTime<Utc>, _>("turn_at")?,
        "messages": turn.get("messages").cloned().unwrap_or(Value::Null),
        "response": turn.get("response").cloned().unwrap_or(Value::Null),
        "extraction": r.try_get::<Option<String>, _>("extraction")?,
    });
    // seed 001's writeback error, once the extractor gave up
    if let Some(reason) = r.try_get::<Option<String>, _>("extraction_reason")? {
        v["extraction_error"] = json!({"code": "extraction_failed", "reason": reason});
    }
    Ok(v)
}

fn fact_json(r: &sqlx::postgres::PgRow) -> Result<Value, sqlx::Error> {
    let mut v = json!({
        "subject": r.try_get::<String, _>("subject")?,
        "key": r.try_get::<String, _>("key")?,
        "value": r.try_get::<Value, _>("value")?,
        "confidence": r.try_get::<f64, _>("confidence")?,
        "source": r.try_get::<String, _>("source")?,
        "version": r.try_get::<i32, _>("version")?,
        "valid_from": r.try_get::<DateTime<Utc>, _>("valid_from")?,
    });
    if let Ok(t) = r.try_get::<Option<DateTime<Utc>>, _>("invalid_at") {
        v["invalid_at"] = json!(t);
    }
    Ok(v)
}

fn http_command_name(path: &str) -> String {
    path.replace('-', "_")
}

#[utoipa::path(post, path = "/v1/memory/{command}",
    params(("command" = inline(super::openapi::MemoryCommandName), Path, description = "writeback | profile | working-state-set | working-state-delete | forget | erase"),
           ("Idempotency-Key" = Option<String>, Header, description = "1-128 of A-Z a-z 0-9 _ - .; a writeback without turn_id takes a turn_id derived from the client and the key; profile, working-state-set, working-state-delete and forget take the key as their command id; the same key and body answer the first answer (duplicate: true) and record nothing, another body or command under the key is a 409 with error.param Idempotency-Key (docs/MEMORY.md); erase is once per subject")),
    request_body(content = super::openapi::MemoryCommandBody, description = "writeback: subject_id, messages [{role, content}], response, timestamp?, turn_id?, facts [{subject, key, value, confidence?}], extract? (ask the configured extractor for the turn's facts); profile: subject_id, fields; working-state-set: subject_id, key, value, ttl_seconds; working-state-delete: subject_id, key; forget: subject_id, subject, key; erase: subject_id, reason, owner? (operators)"),
    security(("bearer" = [])),
    responses((status = 200, description = "recorded: subject_id, stream_seq, duplicate, events, episode_id?", body = super::openapi::MemoryWritten),
              (status = 400, description = "bad body; error.param names the field"),
              (status = 401, description = "no or unknown bearer token"),
              (status = 403, description = "an auditor, or erasing another client's subject without the operator role"),
              (status = 404, description = "no such subject, fact or working-state key"),
              (status = 409, description = "the subject was erased, or a turn_id reused with another body"),
              (status = 503, description = "memory not configured, Vault (the subject's key) or the log unavailable")))]
pub(crate) async fn memory_command(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = http_command_name(&name);
    if name == "assemble" || !COMMANDS.contains(&name.as_str()) {
        return Err(ApiError::NotFound(format!("memory command {name:?}")));
    }
    let key = super::write::idempotency_key(&headers)?;
    let memory = s.memory.as_deref();
    let reply = command(&s.bus, memory, &caller, &name, &body, key.as_deref()).await?;
    Ok(Json(reply).into_response())
}

#[utoipa::path(post, path = "/v1/memory/assemble",
    request_body(content = AssembleBody, description = "subject_id, query, top_k? (1-100), recent_episodes? (0-100), budget_ms? (10-60000)"),
    security(("bearer" = [])),
    responses((status = 200, description = "profile, chunks [{episode_id, index, text, turn_at, score}], recent_episodes, facts, working_state, retrieval, took_ms", body = super::openapi::Assembled),
              (status = 400, description = "bad body; error.param names the field"),
              (status = 404, description = "error.reason client_not_found: no memory for the subject"),
              (status = 503, description = "error.reason timeout (over the budget), database_error, embeddings_failed (the query could not be embedded, with on_failure = error) or vector_search_failed")))]
pub(crate) async fn memory_assemble(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, DoorError> {
    let reply = assemble(&s.bus, Some(&s.pool), s.memory.as_deref(), &caller, &body).await?;
    Ok(Json(reply).into_response())
}

/// The aggregate id of the caller's live subject `subject_id`: refused
/// for auditors and when memory is not configured; 404 when never
/// written or erased.
async fn live_subject(s: &AppState, caller: &Caller, subject_id: &str) -> Result<String, ApiError> {
    owner_role(caller, "reading memory")?;
    if s.memory.is_none() {
        return Err(ApiError::Command(not_configured()));
    }
    check_subject_id(subject_id).map_err(|e| super::http::bad("subject_id", e.to_string()))?;
    let id = aggregate_id(&caller.client_id, subject_id);
    let found =
        sqlx::query("SELECT 1 FROM memory_subjects WHERE aggregate_id = $1 AND erased_at IS NULL")
            .bind(&id)
            .fetch_optional(&s.pool)
            .await?;
    match found {
        Some(_) => Ok(id),
        None => Err(ApiError::NotFound(format!(
            "memory of subject {subject_id:?}"
        ))),
    }
}

#[utoipa::path(get, path = "/v1/memory/subjects/{subject_id}/episodes",
    params(("subject_id" = String, Path, description = "the caller's subject"), super::openapi::EpisodesQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "episodes, newest first: {items: [{episode_id, turn_at, recorded_at, messages, response, extraction (null, pending, done or failed), extraction_error? {code: extraction_failed, reason}}]}", body = super::openapi::EpisodesPage),
              (status = 404, description = "no memory for the subject")))]
pub(crate) async fn memory_episodes(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(subject_id): Path<String>,
    query: Result<ApiQuery<super::openapi::EpisodesQuery>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    // the subject (and the caller's role) before the query, as before
    let id = live_subject(&s, &caller, &subject_id).await?;
    let limit = query?.0.limit.unwrap_or(DEFAULT_LIMIT);
    let rows = sqlx::query(&format!(
        "SELECT episode_id, turn_at, recorded_at, turn, {EXTRACTION} FROM memory_episodes e \
         WHERE aggregate_id = $1 ORDER BY turn_at DESC, episode_id DESC LIMIT $2"
    ))
    .bind(&id)
    .bind(limit)
    .fetch_all(&s.pool)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let mut e = episode_json(r)?;
            e["recorded_at"] = json!(r.try_get::<DateTime<Utc>, _>("recorded_at")?);
            Ok(e)
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(json!({ "items": items })))
}

#[utoipa::path(get, path = "/v1/memory/subjects/{subject_id}/facts",
    params(("subject_id" = String, Path, description = "the caller's subject"), super::openapi::FactsQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "facts: {items: [{subject, key, value, confidence, source, version, valid_from, invalid_at, score? (with q)}]}", body = super::openapi::FactsPage),
              (status = 404, description = "no memory for the subject")))]
pub(crate) async fn memory_facts(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(subject_id): Path<String>,
    query: Result<ApiQuery<super::openapi::FactsQuery>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let id = live_subject(&s, &caller, &subject_id).await?;
    let ApiQuery(params) = query?;
    let history = params.history.unwrap_or(false);
    let text = params.q;
    let rows =
        match &text {
            Some(q) => {
                sqlx::query(FACTS_BY_TEXT)
                    .bind(&id)
                    .bind(q)
                    .bind(history)
                    .fetch_all(&s.pool)
                    .await?
            }
            None => sqlx::query(
                "SELECT subject, key, value, confidence, source, version, valid_from, invalid_at \
                 FROM memory_facts WHERE aggregate_id = $1 AND ($2 OR invalid_at IS NULL) \
                 ORDER BY subject, key, version",
            )
            .bind(&id)
            .bind(history)
            .fetch_all(&s.pool)
            .await?,
        };
    let items = rows
        .iter()
        .map(|r| {
            let mut f = fact_json(r)?;
            if text.is_some() {
                f["score"] = json!(r.try_get::<f32, _>("score")?);
            }
            Ok(f)
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(json!({ "items": items })))
}

#[utoipa::path(get, path = "/v1/memory/subjects/{subject_id}/profile",
    params(("subject_id" = String, Path, description = "the caller's subject")),
    security(("bearer" = [])),
    responses((status = 200, description = "{subject_id, fields, updated_at}; fields null when never set", body = super::openapi::Profile),
              (status = 404, description = "no memory for the subject")))]
pub(crate) async fn memory_profile(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(subject_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = live_subject(&s, &caller, &subject_id).await?;
    let row = sqlx::query("SELECT fields, updated_at FROM memory_profiles WHERE aggregate_id = $1")
        .bind(&id)
        .fetch_optional(&s.pool)
        .await?;
    let (fields, updated_at) = match row {
        Some(r) => (
            r.try_get::<Value, _>("fields")?,
            Some(r.try_get::<DateTime<Utc>, _>("updated_at")?),
        ),
        None => (Value::Null, None),
    };
    Ok(Json(
        json!({"subject_id": subject_id, "fields": fields, "updated_at": updated_at}),
    ))
}
