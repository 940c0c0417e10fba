//! The memory service: turns a client's memory requests (plaintext, as the
//! doors parse them) into sealed commands on the subject's aggregate.
//!
//! Every personal value is sealed with the data subject's key before the
//! command exists ([`SubjectKeys`]); what the aggregate decides on (a
//! fact's id, whether its value changed) is derived here under the same
//! key. The command hash that tells a retry from a reused command id is
//! keyed too, so the log holds no digest of personal text that a guess
//! could be checked against. The actor is the verified caller; memory
//! commands never record a `user_id`.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, Retryable};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::bus::{ids, CommandBus, CommandError};
use crate::commands::limits::{
    MAX_APPROVAL_WINDOW_SECONDS, MAX_MEMORY_FACTS, MAX_MEMORY_FACT_KEY_CHARS,
    MAX_MEMORY_FACT_VALUE_CHARS, MAX_MEMORY_MESSAGES, MAX_MEMORY_TEXT_CHARS,
};
use crate::commands::memory::events::{ChunkSpan, MemoryEvent};
use crate::commands::memory::MemoryError;
use crate::commands::memory::{
    aggregate_id, check_subject_id, check_working_key, EpisodeInput, FactInput, MemoryCommand,
    SubjectRef, SOURCE_COMMAND, SOURCE_EXTRACTOR,
};
use crate::commands::ErrorCode;
use crate::config::ExtractMode;
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::store::{ExecuteError, Receipt};
use crate::memory::keys::{KeyError, SubjectKey, SubjectKeys};

/// The actor of the cleanup's expiries (a reserved client id).
pub const CLEANUP_ACTOR: &str = "flowledger";

/// What one cleanup command did on one subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Items recorded (expired, retired).
    pub recorded: usize,
    /// Items the aggregate left out (no longer there, or not due).
    pub skipped: usize,
}

/// One message of a turn.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A fact as a client gives it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FactBody {
    /// What it is about (e.g. `user`, `user.car`).
    pub subject: String,
    /// Which attribute (e.g. `favourite_colour`).
    pub key: String,
    /// Its value (any JSON; a string usually).
    pub value: Value,
    /// 0 to 1; default 1.
    pub confidence: Option<f64>,
}

/// `memory.writeback`: a turn and/or facts.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WritebackBody {
    /// The client's id for the person.
    pub subject_id: String,
    /// The turn's messages (with `response`, an episode).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// The assistant's answer.
    pub response: Option<String>,
    /// When the turn happened (RFC 3339); default now.
    pub timestamp: Option<DateTime<Utc>>,
    /// The caller's id for the turn: the same id and body answer the first
    /// receipt (1-128 of `[A-Za-z0-9_-]`); default a new id.
    pub turn_id: Option<String>,
    /// Facts to upsert.
    #[serde(default)]
    pub facts: Vec<FactBody>,
    /// Ask the configured extractor for the turn's facts (`true`), or not
    /// (`false`); default: `[memory.extractor] extract` (`on_request`: no,
    /// `always`: yes).
    pub extract: Option<bool>,
}

/// `memory.profile`: fields merged over the earlier ones.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    /// The client's id for the person.
    pub subject_id: String,
    /// `email`, `full_name`, `tags`, ... (a `null` removes a field).
    #[schema(value_type = Object)]
    pub fields: Map<String, Value>,
}

/// `memory.working_state.set`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetBody {
    /// The client's id for the person.
    pub subject_id: String,
    /// Its name.
    pub key: String,
    /// Its value.
    pub value: Value,
    /// Seconds it lives, 1 to 366 days.
    pub ttl_seconds: i64,
}

/// `memory.working_state.delete`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkingDeleteBody {
    /// The client's id for the person.
    pub subject_id: String,
    /// Its name.
    pub key: String,
}

/// `memory.forget`: a fact stops being valid.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgetBody {
    /// The client's id for the person.
    pub subject_id: String,
    /// The fact's subject.
    pub subject: String,
    /// The fact's key.
    pub key: String,
}

/// `memory.erase`: destroy the subject's key, then record it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseBody {
    /// The client's id for the person.
    pub subject_id: String,
    /// `data_subject_request`, `retention` or `legal`.
    pub reason: String,
    /// Operators only: whose subject (a client erases its own).
    pub owner: Option<String>,
}

/// How a turn is cut into chunks for search.
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    /// A chunk's most characters; longer messages are cut at whitespace.
    pub max_chars: usize,
}

/// What `assemble` returns when the request does not say.
#[derive(Debug, Clone, Copy)]
pub struct AssembleDefaults {
    /// Similar chunks.
    pub top_k: u32,
    /// Recent episodes.
    pub recent_episodes: u32,
    /// The time budget, milliseconds.
    pub budget_ms: u64,
}

/// What the cleanup removes besides expired working state
/// (`[memory] episode_retention_days`); `None`: kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Episodes whose turn is older than this are retired.
    pub episodes: Option<chrono::TimeDelta>,
}

impl Retention {
    /// From the setting's days (0: kept).
    pub fn from_days(episode_days: u32) -> Self {
        Retention {
            episodes: (episode_days > 0).then(|| chrono::TimeDelta::days(i64::from(episode_days))),
        }
    }
}

/// The memory commands of every door.
#[derive(Debug)]
pub struct MemoryService {
    keys: Arc<SubjectKeys>,
    chunking: Chunking,
    defaults: AssembleDefaults,
    cleanup: Option<croner::Cron>,
    retention: Retention,
    hnsw: crate::config::HnswSearch,
    embedder: Option<Arc<crate::memory::embedder::Embedder>>,
    extractor: Option<Arc<crate::memory::extractor::Extractor>>,
}

fn invalid(field: &str, message: impl Into<String>) -> CommandError {
    CommandError::validation(Some(field), message)
}

fn key_error(e: KeyError) -> CommandError {
    let code = match &e {
        KeyError::Erased => ErrorCode::Rejected,
        _ if e.is_retryable() => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    if code != ErrorCode::Rejected {
        tracing::error!(error = %e, "memory: the subject's key is unavailable");
    }
    CommandError {
        code,
        message: match e {
            KeyError::Erased => {
                "the subject was erased; nothing more is recorded for it (a returning person \
                 gets a new subject id)"
                    .into()
            }
            other => format!("{other}; retry later"),
        },
        field: None,
    }
}

fn check_chars(field: &str, text: &str, max: usize) -> Result<(), CommandError> {
    if text.chars().count() > max {
        return Err(invalid(field, format!("longer than {max} characters")));
    }
    Ok(())
}

/// Normalises a fact's subject or key for its identity: trimmed, lower case.
fn fact_part(field: &str, text: &str) -> Result<String, CommandError> {
    let t = text.trim().to_lowercase();
    if t.is_empty() {
        return Err(invalid(field, "must not be blank"));
    }
    check_chars(field, &t, MAX_MEMORY_FACT_KEY_CHARS)?;
    Ok(t)
}

/// A fact checked with a writeback's bounds: subject and key normalised
/// (trimmed, lower case, 1 to 256 characters), the value any JSON but
/// `null` (at most 4096 characters as JSON), the confidence 0 to 1.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedFact {
    /// What it is about, normalised.
    pub subject: String,
    /// Which attribute, normalised.
    pub key: String,
    /// Its value.
    pub value: Value,
    /// 0 to 1.
    pub confidence: f64,
}

/// Checks one fact; `field` (e.g. `facts[3]`) prefixes the field an error
/// names. No value is quoted in an error.
pub fn checked_fact(
    field: &str,
    subject: &str,
    key: &str,
    value: &Value,
    confidence: f64,
) -> Result<CheckedFact, CommandError> {
    let subject = fact_part(&format!("{field}.subject"), subject)?;
    let key = fact_part(&format!("{field}.key"), key)?;
    if value.is_null() {
        return Err(invalid(
            &format!("{field}.value"),
            "must not be null (forget a fact with memory.forget)",
        ));
    }
    check_chars(
        &format!("{field}.value"),
        &value.to_string(),
        MAX_MEMORY_FACT_VALUE_CHARS,
    )?;
    if !(0.0..=1.0).contains(&confidence) {
        return Err(invalid(
            &format!("{field}.confidence"),
            "must be between 0 and 1",
        ));
    }
    Ok(CheckedFact {
        subject,
        key,
        value: value.clone(),
        confidence,
    })
}

/// `f` sealed with the subject's key, from `source`.
fn seal_fact(key: &SubjectKey, f: &CheckedFact, source: &str) -> FactInput {
    FactInput {
        fact_id: key.keyed_id("fact", &[&f.subject, &f.key]),
        fact: key.seal_json(&json!({"subject": f.subject, "key": f.key, "value": f.value})),
        value_seal: key.seal_json(&f.value),
        confidence: f.confidence,
        source: source.into(),
    }
}

/// What the extraction handler records for an episode.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtractionOutcome {
    /// The extractor's facts (checked) and the model it named.
    Facts(crate::memory::extractor::Extracted),
    /// No facts: why (one of `EXTRACTION_FAILURES`), the peer's status,
    /// the attempts made.
    Failed {
        /// The code.
        reason: &'static str,
        /// The HTTP status, for `status`.
        status: Option<u16>,
        /// Calls made.
        attempts: u32,
    },
}

/// Cuts `text` into spans of at most `max` characters, at whitespace where
/// there is some; empty text has no chunk.
pub fn chunk_spans(text: &str, message: u32, max: usize) -> Vec<ChunkSpan> {
    let chars: Vec<char> = text.chars().collect();
    let max = max.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        // skip leading whitespace
        while start < chars.len() && chars[start].is_whitespace() {
            start += 1;
        }
        if start >= chars.len() {
            break;
        }
        let mut end = (start + max).min(chars.len());
        if end < chars.len() {
            if let Some(ws) = (start + 1..end).rev().find(|&i| chars[i].is_whitespace()) {
                end = ws;
            }
        }
        out.push(ChunkSpan {
            message,
            start: start as u32,
            end: end as u32,
        });
        start = end;
    }
    out
}

/// What a memory command's reply says.
pub struct Written {
    /// The subject.
    pub subject_id: String,
    /// The receipt of the commit (`None`: nothing changed, no event).
    pub receipt: Option<Arc<Receipt>>,
    /// The episode recorded, if any.
    pub episode_id: Option<String>,
}

impl Written {
    fn of(subject_id: String, receipt: Option<Arc<Receipt>>) -> Self {
        Written {
            subject_id,
            receipt,
            episode_id: None,
        }
    }

    /// The reply body.
    pub fn to_json(&self) -> Value {
        let mut v = match &self.receipt {
            Some(r) => json!({
                "ok": true,
                "subject_id": self.subject_id,
                "stream_seq": r.stream_seq,
                "duplicate": r.duplicate,
                "events": r.events.iter().map(|e| e.event_type.clone()).collect::<Vec<_>>(),
            }),
            None => json!({
                "ok": true,
                "subject_id": self.subject_id,
                "unchanged": true,
                "events": [],
            }),
        };
        if let Some(e) = &self.episode_id {
            v["episode_id"] = json!(e);
        }
        v
    }
}

/// The pauses before recording an erasure again while the log is
/// unavailable (the key is already destroyed): 200 ms doubling, 4 of them.
const ERASE_RECORD_RETRY: Backoff =
    Backoff::doubling(Duration::from_millis(200), Duration::from_millis(1600));

impl MemoryService {
    /// The service sealing with `keys`.
    pub fn new(keys: Arc<SubjectKeys>, chunking: Chunking, defaults: AssembleDefaults) -> Self {
        MemoryService {
            keys,
            chunking,
            defaults,
            cleanup: None,
            retention: Retention::default(),
            hnsw: crate::config::HnswSearch::default(),
            embedder: None,
            extractor: None,
        }
    }

    /// assemble's similarity search scans the HNSW index with `hnsw`
    /// (`[memory] hnsw_ef_search`, `hnsw_iterative_scan`).
    pub fn with_hnsw(mut self, hnsw: crate::config::HnswSearch) -> Self {
        self.hnsw = hnsw;
        self
    }

    /// How assemble's similarity search scans the HNSW index.
    pub fn hnsw(&self) -> crate::config::HnswSearch {
        self.hnsw
    }

    /// The cleanup also applies `retention`.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// What the cleanup retires besides expired working state.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// `serve` runs the cleanup at the times `schedule` names.
    pub fn with_cleanup(mut self, schedule: croner::Cron) -> Self {
        self.cleanup = Some(schedule);
        self
    }

    /// When `serve` runs the cleanup (`[memory] cleanup_cron`), if ever.
    pub fn cleanup_schedule(&self) -> Option<&croner::Cron> {
        self.cleanup.as_ref()
    }

    /// With `[memory.embedder]`: episodes are embedded, assemble searches
    /// by vector.
    pub fn with_embedder(mut self, embedder: Arc<crate::memory::embedder::Embedder>) -> Self {
        self.embedder = Some(embedder);
        self
    }

    /// The embedder, when configured.
    pub fn embedder(&self) -> Option<&Arc<crate::memory::embedder::Embedder>> {
        self.embedder.as_ref()
    }

    /// With `[memory.extractor]`: the turns that ask for it have their facts
    /// extracted by the peer.
    pub fn with_extractor(mut self, extractor: Arc<crate::memory::extractor::Extractor>) -> Self {
        self.extractor = Some(extractor);
        self
    }

    /// The extractor, when configured.
    pub fn extractor(&self) -> Option<&Arc<crate::memory::extractor::Extractor>> {
        self.extractor.as_ref()
    }

    /// `assemble`'s defaults (`[memory]`).
    pub fn defaults(&self) -> AssembleDefaults {
        self.defaults
    }

    /// The subjects' keys (the projection opens events with them).
    pub fn keys(&self) -> &Arc<SubjectKeys> {
        &self.keys
    }

    fn subject(owner: &str, subject_id: &str) -> Result<(String, SubjectRef), CommandError> {
        check_subject_id(subject_id).map_err(|e| invalid("subject_id", e.to_string()))?;
        Ok((
            aggregate_id(owner, subject_id),
            SubjectRef {
                owner: owner.to_string(),
                subject_id: subject_id.to_string(),
                // the id of the key that seals the content, set once it is had
                key_id: String::new(),
            },
        ))
    }

    /// The meta of a memory command: the keyed hash of `body` tells a retry
    /// (same id, same body) from a reused id.
    fn meta(key: &SubjectKey, actor: &str, command_id: String, body: &Value) -> CommandMeta {
        let hash = key.keyed_id("command", &[&body.to_string()]);
        CommandMeta::originating(
            command_id,
            Actor {
                client_id: actor.to_string(),
                user_id: None,
            },
            hash,
        )
    }

    /// The meta of memory command `name` sent by `owner` with an
    /// `Idempotency-Key` or without: with one, its id is the client's key
    /// ([`ids::http_idempotent`]), so a repeat answers the first receipt
    /// and the same key for another command or body is a reused id; the
    /// hash covers the command's name and its body. Without one, a fresh
    /// id: a repeat is a new command (idempotent by value where the
    /// aggregate finds nothing changed).
    fn keyed_meta(
        key: &SubjectKey,
        owner: &str,
        idempotency_key: Option<&str>,
        name: &str,
        body: &Value,
    ) -> CommandMeta {
        let command_id = match idempotency_key {
            Some(k) => ids::http_idempotent(owner, k),
            None => Uuid::now_v7().to_string(),
        };
        let hashed = json!({"command": name, "body": body});
        Self::meta(key, owner, command_id, &hashed)
    }

    /// The subject's key to seal a write with: made for a new subject only.
    /// A subject the log has whose key is missing from Vault is an error
    /// (restore Vault), never a new key that would leave its earlier events
    /// unreadable.
    async fn key_for_write(
        &self,
        bus: &CommandBus,
        id: &str,
    ) -> Result<Arc<SubjectKey>, CommandError> {
        match self.keys.get(id).await {
            Ok(k) => Ok(k),
            Err(KeyError::Missing(path)) => {
                let loaded = bus.load_memory(id).await.map_err(CommandError::from)?;
                if loaded.state.owner.is_some() {
                    tracing::error!(
                        aggregate_id = id,
                        "memory: the subject exists but its key is missing from Vault"
                    );
                    return Err(CommandError {
                        code: ErrorCode::Internal,
                        message: format!(
                            "the subject's key is missing from Vault at {path}; restore it from \
                             a Vault backup (nothing was recorded)"
                        ),
                        field: None,
                    });
                }
                self.keys.get_or_create(id).await.map_err(key_error)
            }
            Err(e) => Err(key_error(e)),
        }
    }

    /// The key of a subject that must exist already (a delete, a forget).
    async fn key_for_read(
        &self,
        id: &str,
        subject_id: &str,
    ) -> Result<Arc<SubjectKey>, CommandError> {
        self.keys.get(id).await.map_err(|e| match e {
            KeyError::Missing(_) => not_found(subject_id),
            other => key_error(other),
        })
    }

    async fn run(
        &self,
        bus: &CommandBus,
        id: &str,
        command: MemoryCommand,
        meta: &CommandMeta,
    ) -> Result<Option<Arc<Receipt>>, CommandError> {
        match bus.memory(id, command, meta).await {
            Ok(r) => Ok(Some(r)),
            Err(ExecuteError::Rejected(MemoryError::NothingChanged)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A writeback by `owner` (the verified caller's client id).
    pub async fn writeback(
        &self,
        bus: &CommandBus,
        owner: &str,
        b: WritebackBody,
        now: DateTime<Utc>,
    ) -> Result<Written, CommandError> {
        let (id, subject) = Self::subject(owner, &b.subject_id)?;
        if b.messages.len() > MAX_MEMORY_MESSAGES {
            return Err(invalid(
                "messages",
                format!("at most {MAX_MEMORY_MESSAGES} messages per turn"),
            ));
        }
        if b.facts.len() > MAX_MEMORY_FACTS {
            return Err(invalid(
                "facts",
                format!("at most {MAX_MEMORY_FACTS} facts per writeback"),
            ));
        }
        for (i, m) in b.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "user" | "assistant" | "system" | "tool") {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    "must be user, assistant, system or tool",
                ));
            }
            check_chars(
                &format!("messages[{i}].content"),
                &m.content,
                MAX_MEMORY_TEXT_CHARS,
            )?;
        }
        if let Some(r) = &b.response {
            check_chars("response", r, MAX_MEMORY_TEXT_CHARS)?;
        }
        let has_turn = !b.messages.is_empty() || b.response.is_some();
        if !has_turn && b.facts.is_empty() {
            return Err(invalid(
                "messages",
                "a writeback needs a turn (messages, response) or facts",
            ));
        }
        if let Some(t) = &b.turn_id {
            let ok = (1..=128).contains(&t.len())
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'));
            if !ok {
                return Err(invalid(
                    "turn_id",
                    "must be 1-128 of A-Z a-z 0-9 _ - (stored in plaintext: an id, never text \
                     of the conversation)",
                ));
            }
        }
        let parts = b
            .facts
            .iter()
            .enumerate()
            .map(|(i, f)| {
                checked_fact(
                    &format!("facts[{i}]"),
                    &f.subject,
                    &f.key,
                    &f.value,
                    f.confidence.unwrap_or(1.0),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let has_text = b.messages.iter().any(|m| !m.content.trim().is_empty())
            || b.response.as_ref().is_some_and(|r| !r.trim().is_empty());
        let extract = match (&self.extractor, b.extract) {
            (None, Some(true)) => {
                return Err(invalid(
                    "extract",
                    "no extractor is configured ([memory.extractor]); give the facts in the \
                     writeback",
                ))
            }
            (_, Some(true)) if !has_text => {
                return Err(invalid("extract", "extraction needs a turn with some text"))
            }
            (None, _) | (_, Some(false)) => false,
            (Some(_), Some(true)) => true,
            (Some(x), None) => has_text && x.config().extract == ExtractMode::Always,
        };
        let key = self.key_for_write(bus, &id).await?;
        let subject = subject.sealed_with(key.id());
        let turn_id = b
            .turn_id
            .clone()
            .unwrap_or_else(|| Uuid::now_v7().simple().to_string());
        let mut hashed = json!({
            "turn_id": turn_id,
            "messages": b.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "response": b.response,
            "timestamp": b.timestamp,
            "facts": parts.iter().map(|f| json!([f.subject, f.key, f.value, f.confidence])).collect::<Vec<_>>(),
        });
        if b.extract == Some(true) {
            // what the caller asked, not what this instance's default made
            // of it: a retry on an instance with another `extract` default
            // is the same request (the first one decided the turn's
            // extraction); only when asked, so earlier hashes stay theirs
            hashed["extract"] = json!(true);
        }
        let command_id = crate::bus::ids::memory_writeback(&id, &turn_id);
        let meta = Self::meta(&key, owner, command_id, &hashed);
        let episode = has_turn.then(|| {
            let mut chunks = Vec::new();
            for (i, m) in b.messages.iter().enumerate() {
                chunks.extend(chunk_spans(&m.content, i as u32, self.chunking.max_chars));
            }
            if let Some(r) = &b.response {
                chunks.extend(chunk_spans(
                    r,
                    b.messages.len() as u32,
                    self.chunking.max_chars,
                ));
            }
            EpisodeInput {
                episode_id: turn_id.clone(),
                turn_at: b.timestamp.unwrap_or(now),
                turn: key.seal_json(&json!({
                    "messages": b.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
                    "response": b.response,
                })),
                chunks,
                messages: b.messages.len() as u32,
                extract,
            }
        });
        let facts = parts
            .iter()
            .map(|f| seal_fact(&key, f, SOURCE_COMMAND))
            .collect();
        let episode_id = episode.as_ref().map(|e| e.episode_id.clone());
        let command = MemoryCommand::Writeback {
            subject,
            episode,
            facts,
            at: now,
        };
        let receipt = self.run(bus, &id, command, &meta).await?;
        Ok(Written {
            subject_id: b.subject_id,
            receipt,
            episode_id,
        })
    }

    /// Profile fields by `owner`.
    pub async fn profile(
        &self,
        bus: &CommandBus,
        owner: &str,
        b: ProfileBody,
        idempotency_key: Option<&str>,
    ) -> Result<Written, CommandError> {
        let (id, subject) = Self::subject(owner, &b.subject_id)?;
        if b.fields.is_empty() {
            return Err(invalid("fields", "give at least one field"));
        }
        if b.fields.len() > 64 {
            return Err(invalid("fields", "at most 64 fields"));
        }
        let fields = Value::Object(b.fields);
        check_chars("fields", &fields.to_string(), MAX_MEMORY_TEXT_CHARS)?;
        let key = self.key_for_write(bus, &id).await?;
        let subject = subject.sealed_with(key.id());
        let meta = Self::keyed_meta(&key, owner, idempotency_key, "profile", &fields);
        let command = MemoryCommand::UpsertProfile {
            subject,
            fields: key.seal_json(&fields),
        };
        let receipt = self.run(bus, &id, command, &meta).await?;
        Ok(Written::of(b.subject_id, receipt))
    }

    /// A working-state value by `owner`.
    pub async fn working_set(
        &self,
        bus: &CommandBus,
        owner: &str,
        b: WorkingSetBody,
        idempotency_key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Written, CommandError> {
        let (id, subject) = Self::subject(owner, &b.subject_id)?;
        check_working_key(&b.key).map_err(|e| invalid("key", e.to_string()))?;
        if !(1..=MAX_APPROVAL_WINDOW_SECONDS).contains(&b.ttl_seconds) {
            return Err(invalid(
                "ttl_seconds",
                format!("must be 1 to {MAX_APPROVAL_WINDOW_SECONDS} seconds"),
            ));
        }
        check_chars("value", &b.value.to_string(), MAX_MEMORY_TEXT_CHARS)?;
        let key = self.key_for_write(bus, &id).await?;
        let subject = subject.sealed_with(key.id());
        let meta = Self::keyed_meta(
            &key,
            owner,
            idempotency_key,
            "working_state_set",
            &json!([b.key, b.value, b.ttl_seconds]),
        );
        let command = MemoryCommand::SetWorkingState {
            subject,
            key: b.key,
            value: key.seal_json(&b.value),
            expires_at: now + TimeDelta::seconds(b.ttl_seconds),
            at: now,
        };
        let receipt = self.run(bus, &id, command, &meta).await?;
        Ok(Written::of(b.subject_id, receipt))
    }

    /// Removes a working-state value. `expired`: the cleanup's, recorded
    /// under flowledger's own actor (and never keyed).
    pub async fn working_delete(
        &self,
        bus: &CommandBus,
        owner: &str,
        b: WorkingDeleteBody,
        expired: bool,
        idempotency_key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Written, CommandError> {
        let (id, subject) = Self::subject(owner, &b.subject_id)?;
        let key = self.key_for_read(&id, &b.subject_id).await?;
        let subject = subject.sealed_with(key.id());
        let meta = if expired {
            Self::meta(
                &key,
                CLEANUP_ACTOR,
                Uuid::now_v7().to_string(),
                &json!([b.key, expired]),
            )
        } else {
            Self::keyed_meta(
                &key,
                owner,
                idempotency_key,
                "working_state_delete",
                &json!([b.key]),
            )
        };
        let command = MemoryCommand::DeleteWorkingState {
            subject,
            key: b.key,
            expired,
            at: now,
        };
        let receipt = self.run(bus, &id, command, &meta).await?;
        Ok(Written::of(b.subject_id, receipt))
    }

    /// Records the expiry of those of `keys` (working-state values of
    /// `owner`'s subject `subject_id`, at most
    /// [`MAX_CLEANUP_ITEMS`](crate::commands::limits::MAX_CLEANUP_ITEMS))
    /// that have expired at `now`, in one `WorkingStateExpired` (the cleanup's,
    /// under flowledger's own actor); the aggregate leaves out the others.
    pub async fn expire_working_state(
        &self,
        bus: &CommandBus,
        owner: &str,
        subject_id: &str,
        keys: Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<Swept, CommandError> {
        let hashed = json!(["expire", keys, now]);
        self.sweep(bus, owner, subject_id, keys.len(), &hashed, |subject| {
            MemoryCommand::ExpireWorkingState {
                subject,
                keys,
                at: now,
            }
        })
        .await
    }

    /// Retires those of `episode_ids` (of `owner`'s subject `subject_id`,
    /// at most
    /// [`MAX_CLEANUP_ITEMS`](crate::commands::limits::MAX_CLEANUP_ITEMS))
    /// whose turn was before `before`, in one `EpisodesRetired`
    /// (the cleanup's retention, under flowledger's own actor); the
    /// aggregate leaves out the others.
    pub async fn retire_episodes(
        &self,
        bus: &CommandBus,
        owner: &str,
        subject_id: &str,
        episode_ids: Vec<String>,
        before: DateTime<Utc>,
    ) -> Result<Swept, CommandError> {
        let hashed = json!(["retention", episode_ids, before]);
        self.sweep(
            bus,
            owner,
            subject_id,
            episode_ids.len(),
            &hashed,
            |subject| MemoryCommand::RetireEpisodes {
                subject,
                episode_ids,
                before,
            },
        )
        .await
    }

    /// Runs a cleanup command of `items` items on `owner`'s subject: what
    /// its event recorded, the rest skipped (none due: nothing recorded).
    async fn sweep(
        &self,
        bus: &CommandBus,
        owner: &str,
        subject_id: &str,
        items: usize,
        hashed: &Value,
        command: impl FnOnce(SubjectRef) -> MemoryCommand,
    ) -> Result<Swept, CommandError> {
        let (id, subject) = Self::subject(owner, subject_id)?;
        let key = self.key_for_read(&id, subject_id).await?;
        let meta = Self::meta(&key, CLEANUP_ACTOR, Uuid::now_v7().to_string(), hashed);
        let command = command(subject.sealed_with(key.id()));
        let recorded = match bus.memory_with_events(&id, command, &meta).await {
            Ok((_, events)) => events
                .iter()
                .map(|e| match e {
                    MemoryEvent::WorkingStateExpired(x) => x.keys.len(),
                    MemoryEvent::EpisodesRetired(x) => x.episode_ids.len(),
                    _ => 0,
                })
                .sum(),
            Err(ExecuteError::Rejected(MemoryError::NothingDue(_))) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Swept {
            recorded,
            skipped: items.saturating_sub(recorded),
        })
    }

    /// A fact stops being valid.
    pub async fn forget(
        &self,
        bus: &CommandBus,
        owner: &str,
        b: ForgetBody,
        idempotency_key: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Written, CommandError> {
        let (id, subject) = Self::subject(owner, &b.subject_id)?;
        let s = fact_part("subject", &b.subject)?;
        let k = fact_part("key", &b.key)?;
        let key = self.key_for_read(&id, &b.subject_id).await?;
        let subject = subject.sealed_with(key.id());
        let meta = Self::keyed_meta(&key, owner, idempotency_key, "forget", &json!([s, k]));
        let command = MemoryCommand::ForgetFact {
            subject,
            fact_id: key.keyed_id("fact", &[&s, &k]),
            at: now,
        };
        let receipt = self.run(bus, &id, command, &meta).await?;
        Ok(Written::of(b.subject_id, receipt))
    }

    /// Records the outcome of episode `episode_id`'s extraction on
    /// `subject` (whose key `key` is): the facts sealed like a writeback's
    /// (source `extractor`), or the failure's code; as
    /// `flowledger-handler`, under the command id
    /// [`crate::bus::ids::memory_extraction`], so a second delivery answers
    /// the first receipt.
    pub async fn record_extraction(
        &self,
        bus: &CommandBus,
        subject: SubjectRef,
        key: &SubjectKey,
        episode_id: &str,
        outcome: ExtractionOutcome,
        now: DateTime<Utc>,
    ) -> Result<Arc<Receipt>, ExecuteError<MemoryError>> {
        let id = aggregate_id(&subject.owner, &subject.subject_id);
        let meta = CommandMeta::originating(
            crate::bus::ids::memory_extraction(&id, episode_id),
            Actor {
                client_id: crate::handlers::HANDLER_ACTOR.into(),
                user_id: None,
            },
            key.keyed_id("command", &["extraction", episode_id]),
        );
        let command = match outcome {
            ExtractionOutcome::Facts(x) => MemoryCommand::RecordExtractedFacts {
                subject,
                episode_id: episode_id.to_string(),
                model: x.model,
                facts: x
                    .facts
                    .iter()
                    .map(|f| seal_fact(key, f, SOURCE_EXTRACTOR))
                    .collect(),
                at: now,
            },
            ExtractionOutcome::Failed {
                reason,
                status,
                attempts,
            } => MemoryCommand::RecordExtractionFailure {
                subject,
                episode_id: episode_id.to_string(),
                reason: reason.to_string(),
                status,
                attempts,
            },
        };
        bus.memory(&id, command, &meta).await
    }

    /// Erases `owner`'s subject: destroys its key in Vault, then records
    /// `MemorySubjectErased`. Repeating it after a failure in between
    /// finishes the job (the key is already destroyed).
    pub async fn erase(
        &self,
        bus: &CommandBus,
        owner: &str,
        actor: &str,
        subject_id: &str,
        reason: String,
    ) -> Result<Written, CommandError> {
        let (id, subject) = Self::subject(owner, subject_id)?;
        if !crate::commands::memory::ERASE_REASONS.contains(&reason.as_str()) {
            return Err(invalid(
                "reason",
                format!(
                    "must be one of {}",
                    crate::commands::memory::ERASE_REASONS.join(", ")
                ),
            ));
        }
        let state = bus.load_memory(&id).await.map_err(CommandError::from)?;
        if state.state.erased {
            return Err(key_error(KeyError::Erased));
        }
        if !state.state.exists() {
            return Err(not_found(subject_id));
        }
        self.keys.destroy(&id).await.map_err(key_error)?;
        // the key is gone: the command hash cannot be keyed, and need not
        // be: one erasure per subject, whatever its reason
        let meta = CommandMeta::originating(
            crate::bus::ids::memory_erase(&id),
            Actor {
                client_id: actor.to_string(),
                user_id: None,
            },
            crate::events::chain::to_hex(&crate::events::chain::sha256(b"memory-erase")),
        );
        let subject = subject.sealed_with(&state.state.key_id);
        let command = MemoryCommand::Erase { subject, reason };
        // the key is already destroyed: record it now if at all possible
        // (a repeated erase finishes it otherwise)
        let receipt = (|| self.run(bus, &id, command.clone(), &meta))
            .retry(ERASE_RECORD_RETRY.build().take(4))
            .when(|e| e.code == ErrorCode::Unavailable)
            .notify(|e, _| {
                tracing::warn!(error = %e.message, "memory: erasure not recorded yet; retrying")
            })
            .await?;
        Ok(Written::of(subject_id.to_string(), receipt))
    }
}

fn not_found(subject_id: &str) -> CommandError {
    CommandError {
        code: ErrorCode::NotFound,
        message: format!("no memory for subject {subject_id:?}"),
        field: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_text_at_whitespace_within_the_limit() {
        let text = "one two three four five six seven";
        let spans = chunk_spans(text, 2, 10);
        let chars: Vec<char> = text.chars().collect();
        let mut covered = String::new();
        for s in &spans {
            assert_eq!(s.message, 2);
            assert!(s.end - s.start <= 10, "{s:?}");
            let piece: String = chars[s.start as usize..s.end as usize].iter().collect();
            assert!(!piece.starts_with(' '), "{piece:?}");
            covered.push_str(piece.trim());
            covered.push(' ');
        }
        assert_eq!(covered.trim(), text);
        assert!(chunk_spans("   ", 0, 10).is_empty());
        // no whitespace: cut hard; multibyte characters count once
        let spans = chunk_spans("ééééééé", 0, 3);
        assert_eq!(spans.len(), 3);
        assert_eq!(spans[2].end, 7);
    }

    #[test]
    fn fact_parts_are_normalised_and_bounded() {
        assert_eq!(
            fact_part("k", "  Favourite_Colour ").unwrap(),
            "favourite_colour"
        );
        assert_eq!(fact_part("k", " ").unwrap_err().field.as_deref(), Some("k"));
        assert!(fact_part("k", &"x".repeat(MAX_MEMORY_FACT_KEY_CHARS + 1)).is_err());
    }
}
