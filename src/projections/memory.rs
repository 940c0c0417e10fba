//! The memory read model (`memory_*` tables, docs/PROJECTIONS.md): the
//! events of `memory` aggregates, their sealed values opened with each data
//! subject's key ([`SubjectKeys`]) and written as plaintext rows.
//!
//! * An event whose subject's key was destroyed (`KeyError::Erased`: a
//!   rebuild after an erasure, or the moment between the key's destruction
//!   and the erasure event) writes nothing; the subject's
//!   `MemorySubjectErased`, later in the log, marks it and deletes its rows.
//! * A key missing from Vault, a damaged key, or a value that does not open
//!   or does not have its shape is a poison at its stream sequence; Vault
//!   unreachable (or failing) is `Unavailable`, retried.
//! * No plaintext goes into an error or a log line: reasons name the event
//!   type, the subject's aggregate id and what is wrong, never a value.
//!
//! * An episode's extraction status (`memory_episodes.extraction`:
//!   `pending` from an `EpisodeRecorded` that asked, then `done` or
//!   `failed` with its reason code) is written where the version has the
//!   column (versions made before the extractor have not: rebuild to get
//!   it).
//! * With `[memory.embedder]` (the vectors table exists for this version),
//!   `EpisodeEmbedded`'s sealed vectors are opened into
//!   `memory_chunk_vectors`; without it they are passed over, so a database
//!   without pgvector keeps working.
//!
//! One statement per row (chunks: one per episode; the cleanup's
//! `WorkingStateExpired` and `EpisodesRetired`: one per event and table, for
//! all their items). Every value comes from
//! the events (times are the events' own), so a rebuild makes the same rows.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use sqlx::{Postgres, Transaction};

use crate::commands::memory::events::{ChunkSpan, MemoryEvent};
use crate::crypto::Sealed;
use crate::events::envelope::EventRecord;
use crate::events::store::decode_event;
use crate::memory::embedder::vector_from_bytes;
use crate::memory::keys::{KeyError, SubjectKey, SubjectKeys};
use crate::projections::apply::{time_of, Failure};
use crate::projections::db::VECTORS_TABLE;
use crate::projections::event::ProjectedEvent;
use crate::projections::{ApplyError, Msg};

type Tx<'a> = Transaction<'a, Postgres>;

/// The memory event types this build knows; any other (a later one) is
/// passed over, as the other read models pass over what they do not use.
pub const EVENT_TYPES: [&str; 15] = [
    "MemorySubjectOpened",
    "EpisodeRecorded",
    "FactRecorded",
    "FactForgotten",
    "ProfileUpdated",
    "WorkingStateSet",
    "WorkingStateDeleted",
    "MemorySubjectErased",
    "EpisodeEmbedded",
    "EpisodeEmbeddingFailed",
    "EpisodeRetired",
    "EpisodeExtracted",
    "EpisodeExtractionFailed",
    "WorkingStateExpired",
    "EpisodesRetired",
];

/// The typed event of the stored `line` of a `memory` aggregate (upcasters
/// applied); `None` for an event type this build does not know. A line
/// that does not decode is a poison at `seq`.
pub fn decode(
    seq: u64,
    line: &[u8],
    r: &ProjectedEvent,
) -> Result<Option<Box<MemoryEvent>>, ApplyError> {
    if !EVENT_TYPES.contains(&r.event_type.as_str()) {
        return Ok(None);
    }
    let poison = |why: String| ApplyError::Poison {
        seq,
        reason: format!(
            "{} of memory subject {}: {why}",
            r.event_type, r.aggregate_id
        ),
    };
    // the data holds sealed values and ids only: a decoding error shows no
    // plaintext
    let record: EventRecord = serde_json::from_slice(line).map_err(|e| poison(e.to_string()))?;
    let event = decode_event::<MemoryEvent>(&record).map_err(|e| poison(e.to_string()))?;
    Ok(Some(Box::new(event)))
}

/// Why a chunk's text cannot be cut from its turn (no text in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The opened turn is not `{"messages": [{"role", "content"}], "response"}`.
    #[error("the turn is not {{\"messages\": [{{\"role\", \"content\"}}], \"response\"}}")]
    NotATurn,
    /// The turn holds another number of messages than the event says.
    #[error("the turn has {turn} messages, the event says {event}")]
    MessageCount {
        /// Messages in the opened turn.
        turn: usize,
        /// The event's `messages`.
        event: u32,
    },
    /// A span names a message the turn does not have (or the response of a
    /// turn without one).
    #[error("chunk {chunk} names message {message}, which the turn does not have")]
    NoSuchMessage {
        /// The chunk's index.
        chunk: usize,
        /// The message it names.
        message: u32,
    },
    /// A span lies outside its message.
    #[error("chunk {chunk} spans characters {start}..{end} of a message of {len} characters")]
    OutOfRange {
        /// The chunk's index.
        chunk: usize,
        /// Its first character.
        start: u32,
        /// One past its last.
        end: u32,
        /// The message's length in characters.
        len: usize,
    },
}

/// The texts of `spans` in `turn` (the opened `EpisodeRecorded.turn`, of
/// `messages` messages): for each span, the characters (Unicode scalar
/// values) `[start, end)` of message `message`, where `message ==
/// messages` is the response.
pub fn chunk_texts(
    turn: &Value,
    messages: u32,
    spans: &[ChunkSpan],
) -> Result<Vec<String>, ChunkError> {
    let list = turn
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(ChunkError::NotATurn)?;
    let contents = list
        .iter()
        .map(|m| m.get("content").and_then(Value::as_str))
        .collect::<Option<Vec<&str>>>()
        .ok_or(ChunkError::NotATurn)?;
    let response = match turn.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(ChunkError::NotATurn),
    };
    if contents.len() != messages as usize {
        return Err(ChunkError::MessageCount {
            turn: contents.len(),
            event: messages,
        });
    }
    spans
        .iter()
        .enumerate()
        .map(|(chunk, s)| {
            let text = match (s.message as usize).cmp(&contents.len()) {
                std::cmp::Ordering::Less => Some(contents[s.message as usize]),
                std::cmp::Ordering::Equal => response,
                std::cmp::Ordering::Greater => None,
            }
            .ok_or(ChunkError::NoSuchMessage {
                chunk,
                message: s.message,
            })?;
            char_range(text, s.start as usize, s.end as usize).ok_or_else(|| {
                ChunkError::OutOfRange {
                    chunk,
                    start: s.start,
                    end: s.end,
                    len: text.chars().count(),
                }
            })
        })
        .collect()
}

/// Characters `[start, end)` of `text`; `None` unless `start <= end <=`
/// its length in characters.
fn char_range(text: &str, start: usize, end: usize) -> Option<String> {
    if start > end {
        return None;
    }
    // the byte offset of character `i` (the text's length for i == count)
    let offset = |i: usize| {
        text.char_indices()
            .map(|(b, _)| b)
            .chain(std::iter::once(text.len()))
            .nth(i)
    };
    let from = offset(start)?;
    let to = offset(end)?;
    Some(text[from..to].to_string())
}

/// The subjects' keys of one batch: each subject's asked once per batch;
/// `None`: destroyed (erased).
struct BatchKeys<'k> {
    keys: Option<&'k SubjectKeys>,
    got: HashMap<String, Option<Arc<SubjectKey>>>,
    /// The space of this version's chunk vectors, once asked (`None`
    /// inside: no vectors table, no `[memory.embedder]`).
    vectors: Option<Option<crate::projections::db::TableSpace>>,
    /// Whether this version's episodes have the extraction columns, once
    /// asked.
    extraction: Option<bool>,
}

impl BatchKeys<'_> {
    /// The vectors table's space (asked once per batch).
    async fn vectors(
        &mut self,
        tx: &mut Tx<'_>,
        v: i32,
    ) -> Result<Option<crate::projections::db::TableSpace>, sqlx::Error> {
        if let Some(d) = &self.vectors {
            return Ok(d.clone());
        }
        let d = crate::projections::db::table_space(&mut **tx, v).await?;
        self.vectors = Some(d.clone());
        Ok(d)
    }

    /// Whether version `v`'s episodes have the `extraction` column (asked
    /// once per batch).
    async fn extraction(&mut self, tx: &mut Tx<'_>, v: i32) -> Result<bool, sqlx::Error> {
        if let Some(x) = self.extraction {
            return Ok(x);
        }
        let x = crate::projections::db::has_column(
            &mut **tx,
            &format!("memory_episodes_v{v}"),
            "extraction",
        )
        .await?;
        self.extraction = Some(x);
        Ok(x)
    }
}

impl BatchKeys<'_> {
    /// The key of subject `id` for the event at `seq`; `None` when it was
    /// destroyed.
    async fn get(
        &mut self,
        seq: u64,
        id: &str,
        event_type: &str,
    ) -> Result<Option<Arc<SubjectKey>>, ApplyError> {
        if let Some(k) = self.got.get(id) {
            return Ok(k.clone());
        }
        let keys = self.keys.ok_or_else(|| {
            ApplyError::Unavailable(
                "the memory read model runs without the data subjects' keys ([memory] is not \
                 configured)"
                    .into(),
            )
        })?;
        let key = match keys.get(id).await {
            Ok(k) => Some(k),
            Err(KeyError::Erased) => {
                tracing::debug!(
                    seq,
                    subject = id,
                    event_type,
                    "memory: the subject's key is destroyed; nothing written for this event"
                );
                None
            }
            Err(e) if e.is_retryable() => {
                return Err(ApplyError::Unavailable(format!(
                    "the key of memory subject {id}: {e}"
                )))
            }
            Err(e) => {
                return Err(ApplyError::Poison {
                    seq,
                    reason: format!("{event_type} of memory subject {id}: {e}"),
                })
            }
        };
        self.got.insert(id.to_string(), key.clone());
        Ok(key)
    }
}

/// Opens a sealed JSON value; `what` names it in the poison's reason.
fn open(
    seq: u64,
    r: &ProjectedEvent,
    key: &SubjectKey,
    sealed: &Sealed,
    what: &str,
) -> Result<Value, ApplyError> {
    key.open_json(sealed).map_err(|e| ApplyError::Poison {
        seq,
        reason: format!(
            "{} of memory subject {}: the sealed {what} does not open: {e}",
            r.event_type, r.aggregate_id
        ),
    })
}

fn poison(seq: u64, r: &ProjectedEvent, why: impl std::fmt::Display) -> ApplyError {
    ApplyError::Poison {
        seq,
        reason: format!(
            "{} of memory subject {}: {why}",
            r.event_type, r.aggregate_id
        ),
    }
}

/// Applies the `memory` events of `batch` to version `v`.
pub(crate) async fn apply(
    tx: &mut Tx<'_>,
    v: i32,
    batch: &[Msg],
    keys: Option<&SubjectKeys>,
) -> Result<(), Failure> {
    let mut keys = BatchKeys {
        keys,
        got: HashMap::new(),
        vectors: None,
        extraction: None,
    };
    for m in batch {
        let mut subject: Option<&str> = None;
        for (_, r) in &m.events {
            if r.aggregate_type != "memory" {
                continue;
            }
            let Some(event) = r.memory.as_deref() else {
                continue; // an event type this build does not know
            };
            subject = Some(&r.aggregate_id);
            apply_event(tx, v, m.seq, r, event, &mut keys).await?;
        }
        if let Some(id) = subject {
            sqlx::query(&format!(
                "UPDATE memory_subjects_v{v} SET last_seq = $2 WHERE aggregate_id = $1"
            ))
            .bind(id)
            .bind(m.seq as i64)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// The row tables of a subject (everything but `memory_subjects`): its
/// erasure deletes its rows from each.
const SUBJECT_ROWS: [&str; 5] = [
    "memory_profiles",
    "memory_episodes",
    "memory_chunks",
    "memory_facts",
    "memory_working_state",
];

async fn apply_event(
    tx: &mut Tx<'_>,
    v: i32,
    seq: u64,
    r: &ProjectedEvent,
    event: &MemoryEvent,
    keys: &mut BatchKeys<'_>,
) -> Result<(), Failure> {
    let at = time_of(seq, r)?;
    let id = r.aggregate_id.as_str();
    let seq_i = seq as i64;
    match event {
        MemoryEvent::MemorySubjectOpened(o) => {
            sqlx::query(&format!(
                "INSERT INTO memory_subjects_v{v} (aggregate_id, owner, subject_id, opened_at, \
                 last_seq) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (aggregate_id) DO NOTHING"
            ))
            .bind(id)
            .bind(&o.owner)
            .bind(&o.subject_id)
            .bind(at)
            .bind(seq_i)
            .execute(&mut **tx)
            .await?;
        }
        MemoryEvent::EpisodeRecorded(e) => {
            let Some(key) = keys.get(seq, id, &r.event_type).await? else {
                return Ok(());
            };
            let turn = open(seq, r, &key, &e.turn, "turn")?;
            let texts = chunk_texts(&turn, e.messages, &e.chunks)
                .map_err(|c| poison(seq, r, format_args!("episode {}: {c}", e.episode_id)))?;
            sqlx::query(&format!(
                "INSERT INTO memory_episodes_v{v} (aggregate_id, episode_id, turn_at, \
                 recorded_at, turn, seq) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (aggregate_id, episode_id) DO NOTHING"
            ))
            .bind(id)
            .bind(&e.episode_id)
            .bind(e.turn_at)
            .bind(at)
            .bind(&turn)
            .bind(seq_i)
            .execute(&mut **tx)
            .await?;
            if e.extract && keys.extraction(tx, v).await? {
                sqlx::query(&format!(
                    "UPDATE memory_episodes_v{v} SET extraction = 'pending' \
                     WHERE aggregate_id = $1 AND episode_id = $2 AND extraction IS NULL"
                ))
                .bind(id)
                .bind(&e.episode_id)
                .execute(&mut **tx)
                .await?;
            }
            if !texts.is_empty() {
                sqlx::query(&format!(
                    "INSERT INTO memory_chunks_v{v} (aggregate_id, episode_id, idx, text, \
                     turn_at) SELECT $1, $2, (c.i - 1)::int, c.t, $4 \
                     FROM UNNEST($3::text[]) WITH ORDINALITY AS c(t, i) \
                     ON CONFLICT (aggregate_id, episode_id, idx) DO NOTHING"
                ))
                .bind(id)
                .bind(&e.episode_id)
                .bind(&texts)
                .bind(e.turn_at)
                .execute(&mut **tx)
                .await?;
            }
        }
        MemoryEvent::FactRecorded(f) => {
            let Some(key) = keys.get(seq, id, &r.event_type).await? else {
                return Ok(());
            };
            let fact = open(seq, r, &key, &f.fact, "fact")?;
            let (Some(subject), Some(fact_key), Some(value)) = (
                fact.get("subject").and_then(Value::as_str),
                fact.get("key").and_then(Value::as_str),
                fact.get("value").filter(|v| !v.is_null()),
            ) else {
                return Err(poison(
                    seq,
                    r,
                    format_args!(
                        "fact {} v{} does not open to {{\"subject\", \"key\", \"value\"}}",
                        f.fact_id, f.version
                    ),
                )
                .into());
            };
            let version = i32::try_from(f.version)
                .map_err(|_| poison(seq, r, format_args!("fact version {}", f.version)))?;
            if version > 1 {
                sqlx::query(&format!(
                    "UPDATE memory_facts_v{v} SET invalid_at = $4 WHERE aggregate_id = $1 \
                     AND fact_id = $2 AND version = $3 AND invalid_at IS NULL"
                ))
                .bind(id)
                .bind(&f.fact_id)
                .bind(version - 1)
                .bind(f.valid_from)
                .execute(&mut **tx)
                .await?;
            }
            sqlx::query(&format!(
                "INSERT INTO memory_facts_v{v} (aggregate_id, fact_id, version, subject, key, \
                 value, confidence, source, episode_id, valid_from, invalid_at, seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11) \
                 ON CONFLICT (aggregate_id, fact_id, version) DO NOTHING"
            ))
            .bind(id)
            .bind(&f.fact_id)
            .bind(version)
            .bind(subject)
            .bind(fact_key)
            .bind(value)
            .bind(f.confidence)
            .bind(&f.source)
            .bind(f.episode_id.as_deref())
            .bind(f.valid_from)
            .bind(seq_i)
            .execute(&mut **tx)
            .await?;
        }
        MemoryEvent::FactForgotten(f) => {
            let version = i32::try_from(f.version)
                .map_err(|_| poison(seq, r, format_args!("fact version {}", f.version)))?;
            sqlx::query(&format!(
                "UPDATE memory_facts_v{v} SET invalid_at = $4 WHERE aggregate_id = $1 \
                 AND fact_id = $2 AND version = $3"
            ))
            .bind(id)
            .bind(&f.fact_id)
            .bind(version)
            .bind(f.invalid_at)
            .execute(&mut **tx)
            .await?;
        }
        MemoryEvent::ProfileUpdated(p) => {
            let Some(key) = keys.get(seq, id, &r.event_type).await? else {
                return Ok(());
            };
            let fields = open(seq, r, &key, &p.fields, "profile fields")?;
            if !fields.is_object() {
                return Err(poison(seq, r, "the profile fields do not open to an object").into());
            }
            // merged over the stored fields; a field set to null is removed
            sqlx::query(&format!(
                "INSERT INTO memory_profiles_v{v} AS p (aggregate_id, fields, updated_at) \
                 VALUES ($1, $2::jsonb - {nulls}, $3) \
                 ON CONFLICT (aggregate_id) DO UPDATE \
                 SET fields = (p.fields || $2::jsonb) - {nulls}, updated_at = $3",
                nulls = NULL_KEYS
            ))
            .bind(id)
            .bind(&fields)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        MemoryEvent::WorkingStateSet(w) => {
            let Some(key) = keys.get(seq, id, &r.event_type).await? else {
                return Ok(());
            };
            let value = open(seq, r, &key, &w.value, "working-state value")?;
            sqlx::query(&format!(
                "INSERT INTO memory_working_state_v{v} (aggregate_id, key, value, expires_at, \
                 updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (aggregate_id, key) DO UPDATE SET value = EXCLUDED.value, \
                 expires_at = EXCLUDED.expires_at, updated_at = EXCLUDED.updated_at"
            ))
            .bind(id)
            .bind(&w.key)
            .bind(&value)
            .bind(w.expires_at)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        MemoryEvent::WorkingStateDeleted(w) => {
            expire_working_state(tx, v, id, std::slice::from_ref(&w.key)).await?;
        }
        MemoryEvent::WorkingStateExpired(w) => {
            expire_working_state(tx, v, id, &w.keys).await?;
        }
        MemoryEvent::EpisodeEmbedded(e) => {
            // the vectors table exists only with [memory.embedder]
            let Some(space) = keys.vectors(tx, v).await? else {
                return Ok(());
            };
            // another model's or other dimensions' vectors are not
            // comparable: the version indexes its own space only (another
            // version may index those, docs/MEMORY.md)
            if !space.holds(&e.model, e.dimensions) {
                tracing::debug!(
                    seq,
                    subject = id,
                    episode = %e.episode_id,
                    event_dimensions = e.dimensions,
                    "memory: embeddings of another space than the vectors table's ({space}); not indexed"
                );
                return Ok(());
            }
            let Some(key) = keys.get(seq, id, &r.event_type).await? else {
                return Ok(());
            };
            for (idx, sealed) in e.vectors.iter().enumerate() {
                let bytes = key.open(sealed).map_err(|x| {
                    poison(
                        seq,
                        r,
                        format_args!(
                            "vector {idx} of episode {} does not open: {x}",
                            e.episode_id
                        ),
                    )
                })?;
                let vector = vector_from_bytes(&bytes, e.dimensions).map_err(|x| {
                    poison(
                        seq,
                        r,
                        format_args!("vector {idx} of episode {}: {x}", e.episode_id),
                    )
                })?;
                sqlx::query(&format!(
                    "INSERT INTO {VECTORS_TABLE}_v{v} (aggregate_id, episode_id, idx, model,                      embedding) VALUES ($1, $2, $3, $4, $5)                      ON CONFLICT (aggregate_id, episode_id, idx) DO NOTHING"
                ))
                .bind(id)
                .bind(&e.episode_id)
                .bind(idx as i32)
                .bind(&e.model)
                .bind(pgvector::Vector::from(vector))
                .execute(&mut **tx)
                .await?;
            }
        }
        MemoryEvent::EpisodeEmbeddingFailed(_) => {
            // its chunks stay findable by full text only
        }
        MemoryEvent::EpisodeRetired(e) => {
            retire_episodes(tx, v, id, std::slice::from_ref(&e.episode_id), keys).await?;
        }
        MemoryEvent::EpisodesRetired(e) => {
            retire_episodes(tx, v, id, &e.episode_ids, keys).await?;
        }
        // the facts themselves follow as FactRecorded
        MemoryEvent::EpisodeExtracted(x) => {
            set_extraction(tx, v, id, &x.episode_id, "done", None, keys).await?;
        }
        MemoryEvent::EpisodeExtractionFailed(x) => {
            let reason = Some(x.reason.as_str());
            set_extraction(tx, v, id, &x.episode_id, "failed", reason, keys).await?;
        }
        MemoryEvent::MemorySubjectErased(e) => {
            sqlx::query(&format!(
                "UPDATE memory_subjects_v{v} SET erased_at = $2, erase_reason = $3 \
                 WHERE aggregate_id = $1"
            ))
            .bind(id)
            .bind(at)
            .bind(&e.reason)
            .execute(&mut **tx)
            .await?;
            for table in SUBJECT_ROWS {
                sqlx::query(&format!("DELETE FROM {table}_v{v} WHERE aggregate_id = $1"))
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
            }
            if keys.vectors(tx, v).await?.is_some() {
                sqlx::query(&format!(
                    "DELETE FROM {VECTORS_TABLE}_v{v} WHERE aggregate_id = $1"
                ))
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
            // nothing of it opens any more: drop the key this instance holds
            if let Some(k) = keys.keys {
                k.forget(id);
            }
            keys.got.insert(id.to_string(), None);
        }
    }
    Ok(())
}

/// Removes subject `id`'s working-state values `keys` (one statement).
async fn expire_working_state(
    tx: &mut Tx<'_>,
    v: i32,
    id: &str,
    keys: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM memory_working_state_v{v} WHERE aggregate_id = $1 AND key = ANY($2)"
    ))
    .bind(id)
    .bind(keys)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Removes subject `id`'s episodes `episode_ids` with their chunks and
/// vectors (one statement a table).
async fn retire_episodes(
    tx: &mut Tx<'_>,
    v: i32,
    id: &str,
    episode_ids: &[String],
    keys: &mut BatchKeys<'_>,
) -> Result<(), sqlx::Error> {
    let vectors = keys.vectors(tx, v).await?.is_some();
    let tables = ["memory_episodes", "memory_chunks", VECTORS_TABLE];
    for table in &tables[..if vectors { 3 } else { 2 }] {
        sqlx::query(&format!(
            "DELETE FROM {table}_v{v} WHERE aggregate_id = $1 AND episode_id = ANY($2)"
        ))
        .bind(id)
        .bind(episode_ids)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Sets episode `episode_id`'s extraction status where the version has the
/// column (an erased subject has no episode row: nothing changes).
async fn set_extraction(
    tx: &mut Tx<'_>,
    v: i32,
    id: &str,
    episode_id: &str,
    status: &str,
    reason: Option<&str>,
    keys: &mut BatchKeys<'_>,
) -> Result<(), sqlx::Error> {
    if !keys.extraction(tx, v).await? {
        return Ok(());
    }
    sqlx::query(&format!(
        "UPDATE memory_episodes_v{v} SET extraction = $3, extraction_reason = $4 \
         WHERE aggregate_id = $1 AND episode_id = $2"
    ))
    .bind(id)
    .bind(episode_id)
    .bind(status)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The top-level keys of `$2` whose value is JSON `null`, as `text[]`.
const NULL_KEYS: &str = "ARRAY(SELECT n.k FROM jsonb_each($2::jsonb) AS n(k, val) \
                         WHERE jsonb_typeof(n.val) = 'null')";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn span(message: u32, start: u32, end: u32) -> ChunkSpan {
        ChunkSpan {
            message,
            start,
            end,
        }
    }

    #[test]
    fn chunks_are_character_ranges_of_their_message_or_the_response() {
        let turn = json!({
            "messages": [
                {"role": "user", "content": "héllo wörld"},
                {"role": "user", "content": "日本語のテキスト"},
            ],
            "response": "fine, thanks",
        });
        let texts = chunk_texts(
            &turn,
            2,
            &[span(0, 0, 5), span(0, 6, 11), span(1, 3, 8), span(2, 6, 12)],
        )
        .expect("every span lies in its text");
        assert_eq!(texts, ["héllo", "wörld", "のテキスト", "thanks"]);
        // the whole text, and an empty range at its end
        assert_eq!(
            chunk_texts(&turn, 2, &[span(0, 0, 11), span(2, 12, 12)]).expect("in range"),
            ["héllo wörld", ""]
        );
    }

    #[test]
    fn a_span_outside_its_text_or_turn_is_refused_without_the_text() {
        let turn = json!({
            "messages": [{"role": "user", "content": "secret words"}],
            "response": null,
        });
        let e = chunk_texts(&turn, 1, &[span(0, 0, 3), span(0, 7, 13)]).unwrap_err();
        assert_eq!(
            e,
            ChunkError::OutOfRange {
                chunk: 1,
                start: 7,
                end: 13,
                len: 12
            }
        );
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(
            chunk_texts(&turn, 1, &[span(0, 5, 2)]).unwrap_err(),
            ChunkError::OutOfRange {
                chunk: 0,
                start: 5,
                end: 2,
                len: 12
            }
        );
        // no response to cut from, and no message 2
        assert_eq!(
            chunk_texts(&turn, 1, &[span(1, 0, 1)]).unwrap_err(),
            ChunkError::NoSuchMessage {
                chunk: 0,
                message: 1
            }
        );
        assert_eq!(
            chunk_texts(&turn, 1, &[span(2, 0, 1)]).unwrap_err(),
            ChunkError::NoSuchMessage {
                chunk: 0,
                message: 2
            }
        );
        assert_eq!(
            chunk_texts(&turn, 2, &[]).unwrap_err(),
            ChunkError::MessageCount { turn: 1, event: 2 }
        );
        for bad in [
            json!({"messages": "x"}),
            json!({"messages": [{"role": "user"}]}),
            json!({"messages": [], "response": 3}),
            json!([1, 2]),
        ] {
            assert_eq!(
                chunk_texts(&bad, 0, &[]).unwrap_err(),
                ChunkError::NotATurn,
                "{bad}"
            );
        }
    }

    #[test]
    fn the_spans_the_service_cuts_give_back_the_words() {
        let text = "one two three four five six seven eight nine ten";
        let spans = crate::memory::service::chunk_spans(text, 0, 12);
        let turn = json!({"messages": [{"role": "user", "content": text}], "response": null});
        let texts = chunk_texts(&turn, 1, &spans).expect("the service's spans fit");
        assert!(texts.len() > 1);
        assert_eq!(
            texts.join(" ").split_whitespace().collect::<Vec<_>>(),
            text.split_whitespace().collect::<Vec<_>>()
        );
    }
}
