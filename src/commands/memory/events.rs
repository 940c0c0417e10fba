//! Events of the `Memory` aggregate (type `memory`, one per data subject of
//! one client). `event_type` strings are a public contract and never
//! renamed.
//!
//! Every personal value (conversation text, fact subjects, keys and values,
//! profile fields, working-state values) is a [`Sealed`] value: encrypted
//! with the data subject's own key, which lives in Vault, never in the log.
//! The hash chain covers the ciphertext, so destroying the key erases the
//! content and leaves the chain verifiable (docs/MEMORY.md, "Erasure").

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::crypto::Sealed;

/// Every event of aggregate type `memory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum MemoryEvent {
    /// `MemorySubjectOpened`: the first event of a subject: whose it is and
    /// which key seals its content.
    MemorySubjectOpened(MemorySubjectOpened),
    /// `EpisodeRecorded`: one conversation turn, sealed.
    EpisodeRecorded(EpisodeRecorded),
    /// `FactRecorded`: a fact's new version (a changed value supersedes the
    /// previous version, which stays with its validity interval).
    FactRecorded(FactRecorded),
    /// `FactForgotten`: a fact's current version stops being valid.
    FactForgotten(FactForgotten),
    /// `ProfileUpdated`: profile fields set (merged over the earlier ones).
    ProfileUpdated(ProfileUpdated),
    /// `WorkingStateSet`: a short-lived value with an expiry.
    WorkingStateSet(WorkingStateSet),
    /// `WorkingStateDeleted`: a working-state value removed (deleted, or
    /// expired by the cleanup).
    WorkingStateDeleted(WorkingStateDeleted),
    /// `MemorySubjectErased`: the subject's key was destroyed; its sealed
    /// content can no longer be opened by anyone. Final.
    MemorySubjectErased(MemorySubjectErased),
    /// `EpisodeEmbedded`: the embeddings of an episode's chunks, one sealed
    /// vector per chunk, as the configured embedder answered (recorded by
    /// the embedding handler, so a rebuild never calls the embedder).
    EpisodeEmbedded(EpisodeEmbedded),
    /// `EpisodeEmbeddingFailed`: the embedder could not embed an episode
    /// (retries exhausted); its chunks are found by full text only.
    EpisodeEmbeddingFailed(EpisodeEmbeddingFailed),
    /// `EpisodeRetired`: an episode past the retention period
    /// (`[memory] episode_retention_days`) leaves the read models; its
    /// sealed turn stays in the log, readable only with the subject's key.
    EpisodeRetired(EpisodeRetired),
    /// `EpisodeExtracted`: the configured extractor answered for an episode
    /// that asked for extraction; its new or changed facts follow as
    /// `FactRecorded` (source `extractor`) in the same commit (recorded by
    /// the extraction handler, so a rebuild never calls the extractor).
    EpisodeExtracted(EpisodeExtracted),
    /// `EpisodeExtractionFailed`: the extractor could not extract facts from
    /// an episode (retries exhausted, or an answer refused): seed 001's
    /// `extraction_failed`.
    EpisodeExtractionFailed(EpisodeExtractionFailed),
    /// `WorkingStateExpired`: working-state values of one subject removed
    /// by the cleanup, all past their expiry at `expired_at`, in one event
    /// (a cleanup run records one per subject, or per
    /// [`MAX_CLEANUP_ITEMS`](crate::commands::limits::MAX_CLEANUP_ITEMS)
    /// of its values).
    WorkingStateExpired(WorkingStateExpired),
    /// `EpisodesRetired`: episodes of one subject past the retention period
    /// leave the read models, in one event (as `EpisodeRetired` each did;
    /// their sealed turns stay in the log, readable only with the
    /// subject's key).
    EpisodesRetired(EpisodesRetired),
}

/// A subject's first event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySubjectOpened {
    /// The client (service) whose subject this is: the only one that may
    /// write or read it.
    pub owner: String,
    /// The client's identifier for the person (pseudonymous: letters,
    /// digits, `_`, `-`).
    pub subject_id: String,
    /// The id of the subject's key in Vault (under `[memory] key_path`).
    pub key_id: String,
}

/// Where a chunk of an episode lies: a character range of one message
/// (`message` = the number of messages: the response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpan {
    /// The message's index; `messages.len()` is the response.
    pub message: u32,
    /// First character (Unicode scalar values, not bytes).
    pub start: u32,
    /// One past the last character.
    pub end: u32,
}

/// A conversation turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeRecorded {
    /// Made by flowledger from the command id; unique within the subject.
    pub episode_id: String,
    /// When the turn happened (the caller's timestamp).
    pub turn_at: DateTime<Utc>,
    /// The turn as JSON `{"messages":[{"role","content"}],"response"}`, sealed.
    pub turn: Sealed,
    /// The chunks search indexes (and the embedder embeds), in order.
    pub chunks: Vec<ChunkSpan>,
    /// Messages in the turn (not counting the response).
    pub messages: u32,
    /// The writeback asked for its facts to be extracted by the configured
    /// extractor (`[memory.extractor]`); absent (false) in earlier events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extract: bool,
}

/// A fact's version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactRecorded {
    /// Stable per (subject, key) of the fact: a keyed hash under the data
    /// subject's key, so it tells nothing once the key is destroyed.
    pub fact_id: String,
    /// 1 for the first value; each change adds one.
    pub version: u32,
    /// `{"subject","key","value"}` as JSON, sealed.
    pub fact: Sealed,
    /// The value alone, sealed: equal values seal equally, which is how a
    /// repeated value is recognised without opening it.
    pub value_seal: Sealed,
    /// How sure the source is, 0 to 1.
    pub confidence: f64,
    /// Where it came from: `command` (given in a writeback) or
    /// `extractor` (the configured extractor service).
    pub source: String,
    /// The episode it was learnt from, if any.
    pub episode_id: Option<String>,
    /// Valid from (the command's time); the previous version is valid
    /// until this instant.
    pub valid_from: DateTime<Utc>,
}

/// A fact stops being valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactForgotten {
    /// The fact.
    pub fact_id: String,
    /// Its version that stops being valid.
    pub version: u32,
    /// Valid until (the command's time).
    pub invalid_at: DateTime<Utc>,
}

/// Profile fields, merged over the earlier ones (a `null` removes one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileUpdated {
    /// A JSON object of fields (`email`, `full_name`, `tags`, ...), sealed.
    pub fields: Sealed,
}

/// A working-state value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkingStateSet {
    /// Its name (letters, digits, `_`, `-`, `.`); not personal.
    pub key: String,
    /// The JSON value, sealed.
    pub value: Sealed,
    /// After this instant it is never returned.
    pub expires_at: DateTime<Utc>,
}

/// A working-state value removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingStateDeleted {
    /// Its name.
    pub key: String,
    /// `deleted` (by the client) or `expired` (by the cleanup).
    pub reason: String,
}

/// The subject was erased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySubjectErased {
    /// The destroyed key's id.
    pub key_id: String,
    /// Why, as a code: `data_subject_request`, `retention` or `legal`.
    pub reason: String,
}

/// An episode's chunk embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeEmbedded {
    /// The episode (an `EpisodeRecorded` of this subject).
    pub episode_id: String,
    /// The embedder's model.
    pub model: String,
    /// Every vector's length.
    pub dimensions: u32,
    /// One per chunk, in the episode's chunk order: the vector's `f32`
    /// values as little-endian bytes, sealed with the subject's key
    /// (an embedding can be inverted to approximate its text: it is
    /// personal data).
    pub vectors: Vec<Sealed>,
}

/// An episode the embedder could not embed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeEmbeddingFailed {
    /// The episode.
    pub episode_id: String,
    /// The embedder's model.
    pub model: String,
    /// The dimensions asked of the model; absent in failures recorded
    /// before they were named, which stand for every dimension of the
    /// model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// What went wrong (the kind of failure and the peer's status; never
    /// any text of the conversation).
    pub reason: String,
}

/// An episode retired by the cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeRetired {
    /// The episode (an `EpisodeRecorded` of this subject).
    pub episode_id: String,
    /// Why, as a code: `retention`.
    pub reason: String,
    /// The retention cut-off: the episode's turn was before it.
    pub before: DateTime<Utc>,
}

/// Working-state values expired by the cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingStateExpired {
    /// Their names (as `WorkingStateDeleted.key`: not personal), each once,
    /// in order; never empty.
    pub keys: Vec<String>,
    /// The cleanup's time: every value had expired by then.
    pub expired_at: DateTime<Utc>,
}

/// Episodes retired by the cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodesRetired {
    /// The episodes (`EpisodeRecorded` of this subject), each once, in
    /// order; never empty.
    pub episode_ids: Vec<String>,
    /// Why, as a code: `retention`.
    pub reason: String,
    /// The retention cut-off: every episode's turn was before it.
    pub before: DateTime<Utc>,
}

/// The extractor's answer for an episode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeExtracted {
    /// The episode (an `EpisodeRecorded` of this subject that asked for
    /// extraction).
    pub episode_id: String,
    /// The model the extractor said it used, if it said.
    pub model: Option<String>,
    /// The facts the extractor answered (the `FactRecorded` events that
    /// follow are the new or changed ones among them).
    pub facts: u32,
}

/// An episode the extractor could not extract facts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeExtractionFailed {
    /// The episode.
    pub episode_id: String,
    /// A code, never text of the conversation or of the answer: `timeout`,
    /// `unreachable`, `status` (see `status`), `bad_answer`, `api_key`,
    /// `unreadable_turn`, `too_large` (the facts do not fit in one event).
    pub reason: String,
    /// The extractor's HTTP status, for `status`.
    pub status: Option<u16>,
    /// The calls made (0: the turn could not be read).
    pub attempts: u32,
}

impl DomainEvent for MemoryEvent {
    fn event_type(&self) -> String {
        match self {
            MemoryEvent::MemorySubjectOpened(_) => "MemorySubjectOpened",
            MemoryEvent::EpisodeRecorded(_) => "EpisodeRecorded",
            MemoryEvent::FactRecorded(_) => "FactRecorded",
            MemoryEvent::FactForgotten(_) => "FactForgotten",
            MemoryEvent::ProfileUpdated(_) => "ProfileUpdated",
            MemoryEvent::WorkingStateSet(_) => "WorkingStateSet",
            MemoryEvent::WorkingStateDeleted(_) => "WorkingStateDeleted",
            MemoryEvent::MemorySubjectErased(_) => "MemorySubjectErased",
            MemoryEvent::EpisodeEmbedded(_) => "EpisodeEmbedded",
            MemoryEvent::EpisodeEmbeddingFailed(_) => "EpisodeEmbeddingFailed",
            MemoryEvent::EpisodeRetired(_) => "EpisodeRetired",
            MemoryEvent::EpisodeExtracted(_) => "EpisodeExtracted",
            MemoryEvent::EpisodeExtractionFailed(_) => "EpisodeExtractionFailed",
            MemoryEvent::WorkingStateExpired(_) => "WorkingStateExpired",
            MemoryEvent::EpisodesRetired(_) => "EpisodesRetired",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
