//! The `Memory` aggregate (type `memory`, one per data subject of one
//! client, id [`aggregate_id`]): a person's conversation memory as the
//! assistant was told it (seed 001): episodes, facts with their history,
//! a profile and short-lived working state, until the subject is erased.
//!
//! The aggregate never sees plaintext: the memory service (src/memory)
//! seals every personal value with the subject's key before the command is
//! built, and derives what decisions need from it (a fact's id, the sealed
//! value that says whether a value changed). It decides on ids, versions
//! and times only.

pub mod events;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::commands::limits::{MAX_APPROVAL_WINDOW_SECONDS, MAX_CLEANUP_ITEMS, MAX_MEMORY_FACTS};
use crate::commands::{DomainError, ErrorCode};
use crate::crypto::Sealed;
use events::{
    ChunkSpan, EpisodeEmbedded, EpisodeEmbeddingFailed, EpisodeExtracted, EpisodeExtractionFailed,
    EpisodeRecorded, EpisodesRetired, FactForgotten, FactRecorded, MemoryEvent,
    MemorySubjectErased, MemorySubjectOpened, ProfileUpdated, WorkingStateDeleted,
    WorkingStateExpired, WorkingStateSet,
};

/// A subject id is the client's name for a person: the aggregate id is the
/// first 32 hex digits of SHA-256 over `<owner> NUL <subject_id>`, so two
/// clients' subjects never share an aggregate and the id says nothing.
pub fn aggregate_id(owner: &str, subject_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(owner.as_bytes());
    h.update([0u8]);
    h.update(subject_id.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Checks a subject id: 1 to 64 of `[A-Za-z0-9_-]`. No `@` or `.`, so an
/// e-mail address cannot be one: it is a pseudonymous reference and stays
/// readable in the log after erasure.
pub fn check_subject_id(id: &str) -> Result<(), MemoryError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MemoryError::Invalid {
            field: "subject_id",
            message: "must be 1 to 64 characters of A-Z a-z 0-9 _ - (a pseudonymous id, never an \
                      e-mail address or a name)"
                .into(),
        })
    }
}

/// Checks a working-state key: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn check_working_key(key: &str) -> Result<(), MemoryError> {
    let ok = (1..=64).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(MemoryError::Invalid {
            field: "key",
            message: "must be 1 to 64 characters of A-Z a-z 0-9 _ - .".into(),
        })
    }
}

/// Why a subject is erased (a code, never free text: it is stored in
/// plaintext).
pub const ERASE_REASONS: [&str; 3] = ["data_subject_request", "retention", "legal"];

/// Why an episode's facts could not be extracted (a code, never text: it is
/// stored in plaintext in `EpisodeExtractionFailed`).
pub const EXTRACTION_FAILURES: [&str; 7] = [
    "timeout",
    "unreachable",
    "status",
    "bad_answer",
    "api_key",
    "unreadable_turn",
    "too_large",
];

/// Where a fact came from: given in a writeback.
pub const SOURCE_COMMAND: &str = "command";

/// Where a fact came from: the configured extractor (`[memory.extractor]`).
pub const SOURCE_EXTRACTOR: &str = "extractor";

/// A fact as the aggregate tracks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactState {
    /// Its latest version.
    pub version: u32,
    /// The latest version's sealed value.
    pub value_seal: Sealed,
    /// Whether the latest version is valid (not forgotten).
    pub active: bool,
    /// The latest version's confidence.
    pub confidence: f64,
    /// When the latest version became valid: a later version or a
    /// forgetting is never dated before it (clocks of two instances may
    /// differ), so validity intervals never run backwards.
    pub valid_from: DateTime<Utc>,
}

/// One subject's memory, as the decisions need it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// The owning client; `None` until opened.
    pub owner: Option<String>,
    /// The client's id for the person.
    pub subject_id: String,
    /// The subject's key id.
    pub key_id: String,
    /// Episodes recorded.
    pub episodes: BTreeSet<String>,
    /// Facts by id.
    pub facts: BTreeMap<String, FactState>,
    /// Working-state keys and their expiry.
    pub working: BTreeMap<String, DateTime<Utc>>,
    /// Whether the profile was ever set.
    pub has_profile: bool,
    /// Erased: final, every command is refused.
    pub erased: bool,
    /// Episode id -> its chunk count, for the episodes recorded.
    #[serde(default)]
    pub episode_chunks: BTreeMap<String, u32>,
    /// Episode id -> the vector spaces ([`vector_space`]) its embeddings
    /// (or their failure) are recorded in: one per model and dimensions,
    /// so a change of either embeds the episode again.
    #[serde(default)]
    pub embedded: BTreeMap<String, BTreeSet<String>>,
    /// Episode id -> the time of its turn, for the episodes recorded.
    #[serde(default)]
    pub episode_turn_at: BTreeMap<String, DateTime<Utc>>,
    /// Episodes retired by the retention (no longer in `episodes`; their
    /// ids are never recorded again).
    #[serde(default)]
    pub retired: BTreeSet<String>,
    /// Episodes that asked for extraction and have no outcome yet.
    #[serde(default)]
    pub to_extract: BTreeSet<String>,
    /// Episodes whose extraction (or its failure) is recorded.
    #[serde(default)]
    pub extracted: BTreeSet<String>,
}

/// Whose subject a command is for; the key that sealed its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRef {
    /// The verified caller's client id.
    pub owner: String,
    /// The subject id (checked by [`check_subject_id`]).
    pub subject_id: String,
    /// The id of the key the content is sealed with.
    pub key_id: String,
}

/// A sealed episode.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeInput {
    /// Made by the service from the command id.
    pub episode_id: String,
    /// The turn's time.
    pub turn_at: DateTime<Utc>,
    /// The sealed turn JSON.
    pub turn: Sealed,
    /// Its chunks.
    pub chunks: Vec<ChunkSpan>,
    /// Messages in it.
    pub messages: u32,
    /// Its facts are to be extracted by the configured extractor.
    pub extract: bool,
}

/// A sealed fact to upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct FactInput {
    /// The keyed id of (subject, key).
    pub fact_id: String,
    /// Sealed `{"subject","key","value"}`.
    pub fact: Sealed,
    /// The sealed value alone.
    pub value_seal: Sealed,
    /// 0 to 1.
    pub confidence: f64,
    /// `command` or `extractor`.
    pub source: String,
}

/// The commands of a subject's memory. `at` is the service's clock.
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryCommand {
    /// `memory.writeback`: an episode and/or facts.
    Writeback {
        /// Whose.
        subject: SubjectRef,
        /// The turn, if any.
        episode: Option<EpisodeInput>,
        /// Facts to upsert (unchanged ones record nothing).
        facts: Vec<FactInput>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// `memory.profile`: profile fields merged over the earlier ones.
    UpsertProfile {
        /// Whose.
        subject: SubjectRef,
        /// The sealed JSON object of fields.
        fields: Sealed,
    },
    /// `memory.working_state.set`.
    SetWorkingState {
        /// Whose.
        subject: SubjectRef,
        /// Its name.
        key: String,
        /// The sealed value.
        value: Sealed,
        /// Expiry: after `at`, at most 366 days later.
        expires_at: DateTime<Utc>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// `memory.working_state.delete` (`expired`: the cleanup's, only for a
    /// value past its expiry at `at`).
    DeleteWorkingState {
        /// Whose.
        subject: SubjectRef,
        /// Its name.
        key: String,
        /// Expired (the cleanup) rather than deleted (the client).
        expired: bool,
        /// Now.
        at: DateTime<Utc>,
    },
    /// `memory.forget`: the fact's current version stops being valid.
    ForgetFact {
        /// Whose.
        subject: SubjectRef,
        /// The fact.
        fact_id: String,
        /// Now.
        at: DateTime<Utc>,
    },
    /// `memory.record_embeddings` (the embedding handler): the sealed
    /// vectors of an episode's chunks, one per chunk.
    RecordEmbeddings {
        /// Whose.
        subject: SubjectRef,
        /// The episode.
        episode_id: String,
        /// The embedder's model.
        model: String,
        /// Every vector's length.
        dimensions: u32,
        /// One sealed vector per chunk, in order.
        vectors: Vec<Sealed>,
    },
    /// `memory.record_embedding_failure` (the embedding handler): the
    /// embedder could not embed the episode.
    RecordEmbeddingFailure {
        /// Whose.
        subject: SubjectRef,
        /// The episode.
        episode_id: String,
        /// The embedder's model.
        model: String,
        /// The dimensions asked of it.
        dimensions: u32,
        /// What went wrong (no conversation text).
        reason: String,
    },
    /// `memory.expire_working_state` (the cleanup): the values of `keys`
    /// that have expired at `at` leave the subject in one event; a key no
    /// longer there or set anew since (not expired) is left out.
    ExpireWorkingState {
        /// Whose.
        subject: SubjectRef,
        /// The due values' names, at most
        /// [`MAX_CLEANUP_ITEMS`](crate::commands::limits::MAX_CLEANUP_ITEMS).
        keys: Vec<String>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// `memory.retire_episodes` (the cleanup): the episodes of
    /// `episode_ids` whose turn was before `before` leave the read models
    /// in one event; one no longer there or not older is left out.
    RetireEpisodes {
        /// Whose.
        subject: SubjectRef,
        /// The due episodes, at most
        /// [`MAX_CLEANUP_ITEMS`](crate::commands::limits::MAX_CLEANUP_ITEMS).
        episode_ids: Vec<String>,
        /// The retention cut-off.
        before: DateTime<Utc>,
    },
    /// `memory.record_extracted_facts` (the extraction handler): the
    /// extractor's facts for an episode that asked for extraction, sealed
    /// (source `extractor`); unchanged ones record nothing, the outcome is
    /// recorded all the same.
    RecordExtractedFacts {
        /// Whose.
        subject: SubjectRef,
        /// The episode.
        episode_id: String,
        /// The model the extractor named, if any.
        model: Option<String>,
        /// The facts, checked and sealed by the memory service.
        facts: Vec<FactInput>,
        /// Now.
        at: DateTime<Utc>,
    },
    /// `memory.record_extraction_failure` (the extraction handler): the
    /// extractor could not extract facts from the episode.
    RecordExtractionFailure {
        /// Whose.
        subject: SubjectRef,
        /// The episode.
        episode_id: String,
        /// One of [`EXTRACTION_FAILURES`].
        reason: String,
        /// The extractor's HTTP status, for `status`.
        status: Option<u16>,
        /// The calls made (0: the turn could not be read).
        attempts: u32,
    },
    /// `memory.erase`: recorded after the subject's key was destroyed.
    Erase {
        /// Whose.
        subject: SubjectRef,
        /// One of [`ERASE_REASONS`].
        reason: String,
    },
}

impl SubjectRef {
    /// The same subject, its content sealed with the key `key_id`.
    pub fn sealed_with(self, key_id: &str) -> Self {
        SubjectRef {
            key_id: key_id.to_string(),
            ..self
        }
    }
}

impl MemoryCommand {
    fn subject(&self) -> &SubjectRef {
        match self {
            MemoryCommand::Writeback { subject, .. }
            | MemoryCommand::UpsertProfile { subject, .. }
            | MemoryCommand::SetWorkingState { subject, .. }
            | MemoryCommand::DeleteWorkingState { subject, .. }
            | MemoryCommand::ForgetFact { subject, .. }
            | MemoryCommand::RecordEmbeddings { subject, .. }
            | MemoryCommand::RecordEmbeddingFailure { subject, .. }
            | MemoryCommand::ExpireWorkingState { subject, .. }
            | MemoryCommand::RetireEpisodes { subject, .. }
            | MemoryCommand::RecordExtractedFacts { subject, .. }
            | MemoryCommand::RecordExtractionFailure { subject, .. }
            | MemoryCommand::Erase { subject, .. } => subject,
        }
    }
}

/// Why a memory command was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemoryError {
    /// A field is malformed (`validation`).
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The subject, fact or working-state key does not exist (`not_found`).
    #[error("{0}")]
    NotFound(String),
    /// The subject was erased; nothing more is recorded for it
    /// (`rejected`). Use a new subject id for a new relationship.
    #[error("subject {0:?} was erased; nothing more is recorded for it (a returning person gets a new subject id)")]
    Erased(String),
    /// The aggregate belongs to another client (`forbidden`); cannot
    /// happen through the bus, whose ids are per client.
    #[error("this subject belongs to another client")]
    NotOwner,
    /// A writeback whose facts all have their values already and no turn:
    /// nothing to record (mem0's NONE). The service answers it as success
    /// with no event.
    #[error("nothing changed: every fact already has that value")]
    NothingChanged,
    /// The command's key is not the subject's (`conflict`): the service
    /// sealed with a key the subject does not use; retry.
    #[error("the content was sealed with key {given:?}, the subject's key is {expected:?}; retry")]
    WrongKey {
        /// The key the command used.
        given: String,
        /// The subject's key.
        expected: String,
    },
    /// The episode's embeddings (or their failure) are already recorded
    /// (`conflict`): an episode is embedded once.
    #[error("the embeddings of episode {0:?} are already recorded")]
    AlreadyEmbedded(String),
    /// The episode's extraction (or its failure) is already recorded
    /// (`conflict`): an episode is extracted once.
    #[error("the extraction of episode {0:?} is already recorded")]
    AlreadyExtracted(String),
    /// A cleanup command none of whose items is due any more (removed, or
    /// set anew, since the read model was read): nothing to record
    /// (`rejected`).
    #[error("none of the {0} items is due any more (removed or set anew since they were read)")]
    NothingDue(usize),
}

impl DomainError for MemoryError {
    fn code(&self) -> ErrorCode {
        match self {
            MemoryError::Invalid { .. } => ErrorCode::Validation,
            MemoryError::NotFound(_) => ErrorCode::NotFound,
            MemoryError::Erased(_) => ErrorCode::Rejected,
            MemoryError::NotOwner => ErrorCode::Forbidden,
            MemoryError::WrongKey { .. } => ErrorCode::Conflict,
            MemoryError::NothingChanged | MemoryError::NothingDue(_) => ErrorCode::Rejected,
            MemoryError::AlreadyEmbedded(_) | MemoryError::AlreadyExtracted(_) => {
                ErrorCode::Conflict
            }
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            MemoryError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Whether `name` may be recorded as a model's name: 1 to 200 characters
/// of `A-Z a-z 0-9 . _ : / @ + -` (an identifier such as
/// `openai/text-embedding-3-small` or `llama-3.1-8b@q4`). It is stored in
/// plaintext and outlives an erasure, so it can hold no free text.
pub fn is_model_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/@+-".contains(c))
}

fn invalid(field: &'static str, message: impl Into<String>) -> MemoryError {
    MemoryError::Invalid {
        field,
        message: message.into(),
    }
}

/// The name of the vector space of embeddings by `model` in `dimensions`:
/// vectors of two spaces are not comparable. `None`: every dimension of
/// the model (a failure recorded before failures named their dimensions).
pub fn vector_space(model: &str, dimensions: Option<u32>) -> String {
    match dimensions {
        Some(d) => format!("{model}/{d}"),
        None => format!("{model}/*"),
    }
}

/// Checks a cleanup command's items: 1 to [`MAX_CLEANUP_ITEMS`]; their
/// count.
fn cleanup_items(field: &'static str, items: &[String]) -> Result<usize, MemoryError> {
    if items.is_empty() || items.len() > MAX_CLEANUP_ITEMS {
        return Err(invalid(
            field,
            format!("a cleanup command carries 1 to {MAX_CLEANUP_ITEMS} items"),
        ));
    }
    Ok(items.len())
}

/// `items` in their order, each once.
fn dedup(items: Vec<String>) -> impl Iterator<Item = String> {
    let mut seen = BTreeSet::new();
    items.into_iter().filter(move |i| seen.insert(i.clone()))
}

impl Memory {
    /// Whether the subject exists (was opened and not erased).
    pub fn exists(&self) -> bool {
        self.owner.is_some() && !self.erased
    }

    /// Whether episode `episode_id`'s embeddings by `model` in `dimensions`
    /// (or their failure) are recorded.
    pub fn is_embedded(&self, episode_id: &str, model: &str, dimensions: u32) -> bool {
        self.embedded.get(episode_id).is_some_and(|spaces| {
            spaces.contains(&vector_space(model, Some(dimensions)))
                || spaces.contains(&vector_space(model, None))
        })
    }

    /// The chunk count of episode `episode_id`, when its embeddings by
    /// `model` in `dimensions` may be recorded: the episode exists and has
    /// none in that space yet.
    fn embeddable(
        &self,
        subject: &SubjectRef,
        episode_id: &str,
        model: &str,
        dimensions: u32,
    ) -> Result<u32, MemoryError> {
        if !self.episodes.contains(episode_id) {
            return Err(MemoryError::NotFound(format!(
                "subject {:?} has no episode {episode_id:?}",
                subject.subject_id
            )));
        }
        if self.is_embedded(episode_id, model, dimensions) {
            return Err(MemoryError::AlreadyEmbedded(episode_id.to_string()));
        }
        Ok(self.episode_chunks.get(episode_id).copied().unwrap_or(0))
    }

    /// Whether the outcome of episode `episode_id`'s extraction may be
    /// recorded: the episode exists, asked for extraction, and has none yet.
    fn extractable(&self, subject: &SubjectRef, episode_id: &str) -> Result<(), MemoryError> {
        if self.extracted.contains(episode_id) {
            return Err(MemoryError::AlreadyExtracted(episode_id.to_string()));
        }
        if !self.episodes.contains(episode_id) {
            return Err(MemoryError::NotFound(format!(
                "subject {:?} has no episode {episode_id:?}",
                subject.subject_id
            )));
        }
        if !self.to_extract.contains(episode_id) {
            return Err(invalid(
                "episode_id",
                format!("episode {episode_id:?} did not ask for extraction"),
            ));
        }
        Ok(())
    }

    /// The `FactRecorded` events of `facts` learnt at `at` (from
    /// `episode_id`), onto `out`: a new fact is version 1, a changed value
    /// or confidence the next version, an unchanged one nothing.
    fn upsert_facts(
        &self,
        facts: Vec<FactInput>,
        episode_id: Option<&str>,
        at: DateTime<Utc>,
        out: &mut Vec<MemoryEvent>,
    ) -> Result<(), MemoryError> {
        if facts.len() > MAX_MEMORY_FACTS {
            return Err(invalid(
                "facts",
                format!("at most {MAX_MEMORY_FACTS} facts per writeback"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, f) in facts.into_iter().enumerate() {
            if !seen.insert(f.fact_id.clone()) {
                return Err(invalid(
                    "facts",
                    format!(
                        "fact {i} has the subject and key of an earlier fact of this writeback"
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&f.confidence) {
                return Err(invalid(
                    "facts",
                    format!("fact {i}: confidence must be 0 to 1"),
                ));
            }
            let (version, valid_from) = match self.facts.get(&f.fact_id) {
                // the same value with the same confidence: NONE
                Some(s)
                    if s.active && s.value_seal == f.value_seal && s.confidence == f.confidence =>
                {
                    continue
                }
                Some(s) => (s.version + 1, at.max(s.valid_from)),
                None => (1, at),
            };
            out.push(MemoryEvent::FactRecorded(FactRecorded {
                fact_id: f.fact_id,
                version,
                fact: f.fact,
                value_seal: f.value_seal,
                confidence: f.confidence,
                source: f.source,
                episode_id: episode_id.map(str::to_string),
                valid_from,
            }));
        }
        Ok(())
    }

    /// Pure decision over a subject's memory.
    pub fn decide(&self, c: MemoryCommand) -> Result<Vec<MemoryEvent>, MemoryError> {
        let subject = c.subject().clone();
        check_subject_id(&subject.subject_id)?;
        if self.erased {
            return Err(MemoryError::Erased(subject.subject_id));
        }
        let mut out = Vec::new();
        match &self.owner {
            Some(owner) if *owner != subject.owner => return Err(MemoryError::NotOwner),
            Some(_) if subject.key_id != self.key_id => {
                return Err(MemoryError::WrongKey {
                    given: subject.key_id,
                    expected: self.key_id.clone(),
                })
            }
            Some(_) => {}
            None => match &c {
                MemoryCommand::Writeback { .. }
                | MemoryCommand::UpsertProfile { .. }
                | MemoryCommand::SetWorkingState { .. } => {
                    out.push(MemoryEvent::MemorySubjectOpened(MemorySubjectOpened {
                        owner: subject.owner.clone(),
                        subject_id: subject.subject_id.clone(),
                        key_id: subject.key_id.clone(),
                    }))
                }
                _ => {
                    return Err(MemoryError::NotFound(format!(
                        "no memory for subject {:?}",
                        subject.subject_id
                    )))
                }
            },
        }
        match c {
            MemoryCommand::Writeback {
                episode, facts, at, ..
            } => {
                if episode.is_none() && facts.is_empty() {
                    return Err(invalid(
                        "messages",
                        "a writeback needs a turn (messages and response) or facts",
                    ));
                }
                if episode
                    .as_ref()
                    .is_some_and(|e| e.extract && e.chunks.is_empty())
                {
                    return Err(invalid("extract", "extraction needs a turn with some text"));
                }
                let episode_id = episode.as_ref().map(|e| e.episode_id.clone());
                if let Some(e) = episode {
                    if self.episodes.contains(&e.episode_id) || self.retired.contains(&e.episode_id)
                    {
                        return Err(invalid(
                            "episode_id",
                            format!("episode {:?} is already recorded", e.episode_id),
                        ));
                    }
                    out.push(MemoryEvent::EpisodeRecorded(EpisodeRecorded {
                        episode_id: e.episode_id,
                        turn_at: e.turn_at,
                        turn: e.turn,
                        chunks: e.chunks,
                        messages: e.messages,
                        extract: e.extract,
                    }));
                }
                self.upsert_facts(facts, episode_id.as_deref(), at, &mut out)?;
                if out.is_empty() {
                    return Err(MemoryError::NothingChanged);
                }
            }
            MemoryCommand::UpsertProfile { fields, .. } => {
                // (a writeback that changed nothing was answered above)
                out.push(MemoryEvent::ProfileUpdated(ProfileUpdated { fields }));
            }
            MemoryCommand::SetWorkingState {
                key,
                value,
                expires_at,
                at,
                ..
            } => {
                check_working_key(&key)?;
                if expires_at <= at
                    || expires_at - at > TimeDelta::seconds(MAX_APPROVAL_WINDOW_SECONDS)
                {
                    return Err(invalid(
                        "ttl_seconds",
                        "must expire after now and at most 366 days from now",
                    ));
                }
                out.push(MemoryEvent::WorkingStateSet(WorkingStateSet {
                    key,
                    value,
                    expires_at,
                }));
            }
            MemoryCommand::DeleteWorkingState {
                key, expired, at, ..
            } => {
                check_working_key(&key)?;
                match self.working.get(&key) {
                    None => {
                        return Err(MemoryError::NotFound(format!(
                            "no working state {key:?} for subject {:?}",
                            subject.subject_id
                        )))
                    }
                    Some(exp) if expired && *exp > at => {
                        return Err(invalid(
                            "key",
                            format!("working state {key:?} has not expired yet"),
                        ))
                    }
                    Some(_) => {}
                }
                out.push(MemoryEvent::WorkingStateDeleted(WorkingStateDeleted {
                    key,
                    reason: if expired { "expired" } else { "deleted" }.into(),
                }));
            }
            MemoryCommand::ForgetFact { fact_id, at, .. } => match self.facts.get(&fact_id) {
                Some(s) if s.active => out.push(MemoryEvent::FactForgotten(FactForgotten {
                    fact_id,
                    version: s.version,
                    invalid_at: at.max(s.valid_from),
                })),
                _ => {
                    return Err(MemoryError::NotFound(format!(
                        "subject {:?} has no valid fact with that subject and key",
                        subject.subject_id
                    )))
                }
            },
            MemoryCommand::RecordEmbeddings {
                episode_id,
                model,
                dimensions,
                vectors,
                ..
            } => {
                let chunks = self.embeddable(&subject, &episode_id, &model, dimensions)?;
                if vectors.len() != chunks as usize {
                    return Err(invalid(
                        "vectors",
                        format!(
                            "episode {episode_id:?} has {chunks} chunks, {} vectors were given",
                            vectors.len()
                        ),
                    ));
                }
                if dimensions == 0 || model.is_empty() {
                    return Err(invalid(
                        "dimensions",
                        "embeddings need a model and at least one dimension",
                    ));
                }
                out.push(MemoryEvent::EpisodeEmbedded(EpisodeEmbedded {
                    episode_id,
                    model,
                    dimensions,
                    vectors,
                }));
            }
            MemoryCommand::RecordEmbeddingFailure {
                episode_id,
                model,
                dimensions,
                reason,
                ..
            } => {
                self.embeddable(&subject, &episode_id, &model, dimensions)?;
                out.push(MemoryEvent::EpisodeEmbeddingFailed(
                    EpisodeEmbeddingFailed {
                        episode_id,
                        model,
                        dimensions: Some(dimensions),
                        reason,
                    },
                ));
            }
            MemoryCommand::ExpireWorkingState { keys, at, .. } => {
                let sent = cleanup_items("keys", &keys)?;
                let due: Vec<String> = dedup(keys)
                    .filter(|k| self.working.get(k).is_some_and(|exp| *exp <= at))
                    .collect();
                if due.is_empty() {
                    return Err(MemoryError::NothingDue(sent));
                }
                out.push(MemoryEvent::WorkingStateExpired(WorkingStateExpired {
                    keys: due,
                    expired_at: at,
                }));
            }
            MemoryCommand::RetireEpisodes {
                episode_ids,
                before,
                ..
            } => {
                let sent = cleanup_items("episode_ids", &episode_ids)?;
                // an episode recorded before its turn time was tracked has
                // none here: it is not known to be old, so it stays
                let due: Vec<String> = dedup(episode_ids)
                    .filter(|e| {
                        self.episodes.contains(e)
                            && self.episode_turn_at.get(e).is_some_and(|t| *t < before)
                    })
                    .collect();
                if due.is_empty() {
                    return Err(MemoryError::NothingDue(sent));
                }
                out.push(MemoryEvent::EpisodesRetired(EpisodesRetired {
                    episode_ids: due,
                    reason: "retention".into(),
                    before,
                }));
            }
            MemoryCommand::RecordExtractedFacts {
                episode_id,
                model,
                facts,
                at,
                ..
            } => {
                self.extractable(&subject, &episode_id)?;
                if model.as_deref().is_some_and(|m| !is_model_name(m)) {
                    return Err(invalid(
                        "model",
                        "a model name is 1 to 200 characters of A-Z a-z 0-9 . _ : / @ + -",
                    ));
                }
                if facts.iter().any(|f| f.source != SOURCE_EXTRACTOR) {
                    return Err(invalid(
                        "facts",
                        "extracted facts have the source extractor",
                    ));
                }
                out.push(MemoryEvent::EpisodeExtracted(EpisodeExtracted {
                    episode_id: episode_id.clone(),
                    model,
                    facts: u32::try_from(facts.len()).unwrap_or(u32::MAX),
                }));
                self.upsert_facts(facts, Some(&episode_id), at, &mut out)?;
            }
            MemoryCommand::RecordExtractionFailure {
                episode_id,
                reason,
                status,
                attempts,
                ..
            } => {
                self.extractable(&subject, &episode_id)?;
                if !EXTRACTION_FAILURES.contains(&reason.as_str()) {
                    return Err(invalid(
                        "reason",
                        format!("must be one of {}", EXTRACTION_FAILURES.join(", ")),
                    ));
                }
                out.push(MemoryEvent::EpisodeExtractionFailed(
                    EpisodeExtractionFailed {
                        episode_id,
                        reason,
                        status,
                        attempts,
                    },
                ));
            }
            MemoryCommand::Erase { reason, .. } => {
                if !ERASE_REASONS.contains(&reason.as_str()) {
                    return Err(invalid(
                        "reason",
                        format!("must be one of {}", ERASE_REASONS.join(", ")),
                    ));
                }
                out.push(MemoryEvent::MemorySubjectErased(MemorySubjectErased {
                    key_id: self.key_id.clone(),
                    reason,
                }));
            }
        }
        Ok(out)
    }
}

crate::commands::aggregate!(Memory, "memory", MemoryCommand, MemoryEvent, MemoryError);

impl Memory {
    /// Episode `id` leaves the state; its id stays taken.
    fn retire(&mut self, id: String) {
        self.episodes.remove(&id);
        self.episode_chunks.remove(&id);
        self.episode_turn_at.remove(&id);
        self.embedded.remove(&id);
        self.to_extract.remove(&id);
        self.extracted.remove(&id);
        self.retired.insert(id);
    }

    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, event: MemoryEvent) {
        match event {
            MemoryEvent::MemorySubjectOpened(e) => {
                self.owner = Some(e.owner);
                self.subject_id = e.subject_id;
                self.key_id = e.key_id;
            }
            MemoryEvent::EpisodeRecorded(e) => {
                let chunks = u32::try_from(e.chunks.len()).unwrap_or(u32::MAX);
                self.episode_chunks.insert(e.episode_id.clone(), chunks);
                self.episode_turn_at.insert(e.episode_id.clone(), e.turn_at);
                if e.extract {
                    self.to_extract.insert(e.episode_id.clone());
                }
                self.episodes.insert(e.episode_id);
            }
            MemoryEvent::EpisodeEmbedded(e) => {
                self.embedded
                    .entry(e.episode_id)
                    .or_default()
                    .insert(vector_space(&e.model, Some(e.dimensions)));
            }
            MemoryEvent::EpisodeEmbeddingFailed(e) => {
                self.embedded
                    .entry(e.episode_id)
                    .or_default()
                    .insert(vector_space(&e.model, e.dimensions));
            }
            MemoryEvent::EpisodeExtracted(EpisodeExtracted { episode_id, .. })
            | MemoryEvent::EpisodeExtractionFailed(EpisodeExtractionFailed {
                episode_id, ..
            }) => {
                self.to_extract.remove(&episode_id);
                self.extracted.insert(episode_id);
            }
            MemoryEvent::FactRecorded(e) => {
                self.facts.insert(
                    e.fact_id,
                    FactState {
                        version: e.version,
                        value_seal: e.value_seal,
                        active: true,
                        confidence: e.confidence,
                        valid_from: e.valid_from,
                    },
                );
            }
            MemoryEvent::FactForgotten(e) => {
                if let Some(f) = self.facts.get_mut(&e.fact_id) {
                    f.active = false;
                }
            }
            MemoryEvent::ProfileUpdated(_) => self.has_profile = true,
            MemoryEvent::WorkingStateSet(e) => {
                self.working.insert(e.key, e.expires_at);
            }
            MemoryEvent::WorkingStateDeleted(e) => {
                self.working.remove(&e.key);
            }
            MemoryEvent::WorkingStateExpired(e) => {
                for k in &e.keys {
                    self.working.remove(k);
                }
            }
            MemoryEvent::EpisodeRetired(e) => self.retire(e.episode_id),
            MemoryEvent::EpisodesRetired(e) => {
                for id in e.episode_ids {
                    self.retire(id);
                }
            }
            MemoryEvent::MemorySubjectErased(_) => {
                self.erased = true;
                self.episodes.clear();
                self.episode_turn_at.clear();
                self.episode_chunks.clear();
                self.embedded.clear();
                self.to_extract.clear();
                self.extracted.clear();
                self.facts.clear();
                self.working.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(t: &str) -> Sealed {
        Sealed {
            key_id: "m1".into(),
            nonce: "00".repeat(24),
            ciphertext: hex::encode(t),
        }
    }

    fn who() -> SubjectRef {
        SubjectRef {
            owner: "acme".into(),
            subject_id: "u-1".into(),
            key_id: "m1".into(),
        }
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn fact(id: &str, v: &str) -> FactInput {
        FactInput {
            fact_id: id.into(),
            fact: sealed(&format!("{id}={v}")),
            value_seal: sealed(v),
            confidence: 0.9,
            source: "command".into(),
        }
    }

    fn run(m: &mut Memory, c: MemoryCommand) -> Result<Vec<MemoryEvent>, MemoryError> {
        let evs = m.decide(c)?;
        for e in evs.clone() {
            m.fold(e);
        }
        Ok(evs)
    }

    fn writeback(facts: Vec<FactInput>, t: i64) -> MemoryCommand {
        MemoryCommand::Writeback {
            subject: who(),
            episode: None,
            facts,
            at: at(t),
        }
    }

    #[test]
    fn ids_differ_by_owner_and_subject() {
        let a = aggregate_id("acme", "u-1");
        assert_eq!(a.len(), 32);
        assert_ne!(a, aggregate_id("other", "u-1"));
        assert_ne!(a, aggregate_id("acme", "u-2"));
        // the separator keeps ("ab","c") and ("a","bc") apart
        assert_ne!(aggregate_id("ab", "c"), aggregate_id("a", "bc"));
    }

    #[test]
    fn subject_ids_cannot_be_addresses_or_names() {
        for bad in ["", "a@b.example", "Jane Doe", "a.b", &"x".repeat(65)] {
            assert!(check_subject_id(bad).is_err(), "{bad}");
        }
        check_subject_id("cust_42-a").unwrap();
    }

    #[test]
    fn a_changed_fact_gets_a_new_version_an_unchanged_one_nothing() {
        let mut m = Memory::default();
        let evs = run(&mut m, writeback(vec![fact("f1", "blue")], 0)).unwrap();
        assert!(matches!(evs[0], MemoryEvent::MemorySubjectOpened(_)));
        assert!(matches!(&evs[1], MemoryEvent::FactRecorded(f) if f.version == 1));
        // the same value: NONE
        assert_eq!(
            m.decide(writeback(vec![fact("f1", "blue")], 1)),
            Err(MemoryError::NothingChanged)
        );
        let evs = run(&mut m, writeback(vec![fact("f1", "green")], 2)).unwrap();
        assert!(
            matches!(&evs[0], MemoryEvent::FactRecorded(f) if f.version == 2 && f.valid_from == at(2))
        );
        let evs = run(
            &mut m,
            MemoryCommand::ForgetFact {
                subject: who(),
                fact_id: "f1".into(),
                at: at(3),
            },
        )
        .unwrap();
        assert!(matches!(&evs[0], MemoryEvent::FactForgotten(f) if f.version == 2));
        // forgotten, then the same value again: a new version
        let evs = run(&mut m, writeback(vec![fact("f1", "green")], 4)).unwrap();
        assert!(matches!(&evs[0], MemoryEvent::FactRecorded(f) if f.version == 3));
        // a new confidence for the same value is a new version
        let mut surer = fact("f1", "green");
        surer.confidence = 0.5;
        let evs = run(&mut m, writeback(vec![surer], 5)).unwrap();
        assert!(matches!(&evs[0], MemoryEvent::FactRecorded(f) if f.version == 4));
        // an instance whose clock is behind never dates a change before the last one
        let evs = run(&mut m, writeback(vec![fact("f1", "blue")], 1)).unwrap();
        assert!(
            matches!(&evs[0], MemoryEvent::FactRecorded(f) if f.version == 5 && f.valid_from == at(5))
        );
        let evs = run(
            &mut m,
            MemoryCommand::ForgetFact {
                subject: who(),
                fact_id: "f1".into(),
                at: at(0),
            },
        )
        .unwrap();
        assert!(matches!(&evs[0], MemoryEvent::FactForgotten(f) if f.invalid_at == at(5)));
        let dup = writeback(vec![fact("f2", "a"), fact("f2", "b")], 5);
        assert_eq!(m.decide(dup).unwrap_err().field(), Some("facts"));
    }

    #[test]
    fn commands_on_a_missing_subject_are_not_found_and_erasure_is_final() {
        let mut m = Memory::default();
        let forget = MemoryCommand::ForgetFact {
            subject: who(),
            fact_id: "f1".into(),
            at: at(0),
        };
        assert_eq!(
            m.decide(forget.clone()).unwrap_err().code(),
            ErrorCode::NotFound
        );
        let erase = MemoryCommand::Erase {
            subject: who(),
            reason: "data_subject_request".into(),
        };
        assert_eq!(
            m.decide(erase.clone()).unwrap_err().code(),
            ErrorCode::NotFound
        );
        run(&mut m, writeback(vec![fact("f1", "x")], 0)).unwrap();
        let bad = MemoryCommand::Erase {
            subject: who(),
            reason: "because Jane asked".into(),
        };
        assert_eq!(m.decide(bad).unwrap_err().field(), Some("reason"));
        let evs = run(&mut m, erase.clone()).unwrap();
        assert!(matches!(&evs[0], MemoryEvent::MemorySubjectErased(e) if e.key_id == "m1"));
        for c in [erase, forget, writeback(vec![fact("f1", "y")], 1)] {
            assert_eq!(m.decide(c).unwrap_err().code(), ErrorCode::Rejected);
        }
    }

    #[test]
    fn embeddings_only_for_a_known_episode_once_and_never_after_erasure() {
        let mut m = Memory::default();
        let episode = EpisodeInput {
            episode_id: "e1".into(),
            turn_at: at(0),
            turn: sealed("{}"),
            chunks: vec![
                ChunkSpan {
                    message: 0,
                    start: 0,
                    end: 3,
                },
                ChunkSpan {
                    message: 0,
                    start: 4,
                    end: 9,
                },
            ],
            messages: 1,
            extract: false,
        };
        run(
            &mut m,
            MemoryCommand::Writeback {
                subject: who(),
                episode: Some(episode),
                facts: vec![],
                at: at(0),
            },
        )
        .unwrap();
        let embed = |episode: &str, n: usize| MemoryCommand::RecordEmbeddings {
            subject: who(),
            episode_id: episode.into(),
            model: "m".into(),
            dimensions: 4,
            vectors: (0..n).map(|i| sealed(&format!("v{i}"))).collect(),
        };
        assert_eq!(
            m.decide(embed("e2", 2)).unwrap_err().code(),
            ErrorCode::NotFound
        );
        assert_eq!(
            m.decide(embed("e1", 1)).unwrap_err().field(),
            Some("vectors")
        );
        let evs = run(&mut m, embed("e1", 2)).unwrap();
        assert!(
            matches!(&evs[..], [MemoryEvent::EpisodeEmbedded(e)] if e.vectors.len() == 2 && e.dimensions == 4)
        );
        assert_eq!(
            m.decide(embed("e1", 2)).unwrap_err(),
            MemoryError::AlreadyEmbedded("e1".into())
        );
        let failed = |model: &str, dimensions| MemoryCommand::RecordEmbeddingFailure {
            subject: who(),
            episode_id: "e1".into(),
            model: model.into(),
            dimensions,
            reason: "status 500".into(),
        };
        assert_eq!(
            m.decide(failed("m", 4)).unwrap_err().code(),
            ErrorCode::Conflict
        );
        // another model, or other dimensions, is another space: the episode
        // is embedded again there, once
        let mut other = embed("e1", 2);
        if let MemoryCommand::RecordEmbeddings { dimensions, .. } = &mut other {
            *dimensions = 8;
        }
        let evs = run(&mut m, other.clone()).unwrap();
        assert!(matches!(&evs[..], [MemoryEvent::EpisodeEmbedded(e)] if e.dimensions == 8));
        assert_eq!(
            m.decide(other).unwrap_err(),
            MemoryError::AlreadyEmbedded("e1".into())
        );
        assert!(m.is_embedded("e1", "m", 4) && m.is_embedded("e1", "m", 8));
        assert!(!m.is_embedded("e1", "m2", 4));
        let evs = run(&mut m, failed("m2", 4)).unwrap();
        assert!(
            matches!(&evs[..], [MemoryEvent::EpisodeEmbeddingFailed(e)] if e.dimensions == Some(4))
        );
        assert!(m.is_embedded("e1", "m2", 4) && !m.is_embedded("e1", "m2", 8));
        // a failure recorded before failures named dimensions covers them all
        m.fold(MemoryEvent::EpisodeEmbeddingFailed(
            EpisodeEmbeddingFailed {
                episode_id: "e1".into(),
                model: "m3".into(),
                dimensions: None,
                reason: "status 500".into(),
            },
        ));
        assert!(m.is_embedded("e1", "m3", 4) && m.is_embedded("e1", "m3", 1536));
        run(
            &mut m,
            MemoryCommand::Erase {
                subject: who(),
                reason: "retention".into(),
            },
        )
        .unwrap();
        assert_eq!(
            m.decide(embed("e1", 2)).unwrap_err().code(),
            ErrorCode::Rejected
        );
    }

    fn turn(id: &str, extract: bool) -> MemoryCommand {
        MemoryCommand::Writeback {
            subject: who(),
            episode: Some(EpisodeInput {
                episode_id: id.into(),
                turn_at: at(0),
                turn: sealed("{}"),
                chunks: vec![ChunkSpan {
                    message: 0,
                    start: 0,
                    end: 3,
                }],
                messages: 1,
                extract,
            }),
            facts: vec![],
            at: at(0),
        }
    }

    fn extracted(episode: &str, facts: Vec<FactInput>, t: i64) -> MemoryCommand {
        MemoryCommand::RecordExtractedFacts {
            subject: who(),
            episode_id: episode.into(),
            model: Some("extract-1".into()),
            facts: facts
                .into_iter()
                .map(|mut f| {
                    f.source = SOURCE_EXTRACTOR.into();
                    f
                })
                .collect(),
            at: at(t),
        }
    }

    fn extraction_failed(episode: &str, reason: &str) -> MemoryCommand {
        MemoryCommand::RecordExtractionFailure {
            subject: who(),
            episode_id: episode.into(),
            reason: reason.into(),
            status: None,
            attempts: 3,
        }
    }

    #[test]
    fn extracted_facts_only_for_an_episode_that_asked_once_and_never_after_erasure() {
        let mut m = Memory::default();
        let evs = run(&mut m, turn("e1", true)).unwrap();
        assert!(matches!(&evs[1], MemoryEvent::EpisodeRecorded(e) if e.extract));
        run(&mut m, turn("e2", false)).unwrap();
        run(&mut m, writeback(vec![fact("f1", "blue")], 0)).unwrap();
        assert_eq!(
            m.decide(extracted("e9", vec![], 1)).unwrap_err().code(),
            ErrorCode::NotFound
        );
        assert_eq!(
            m.decide(extracted("e2", vec![], 1)).unwrap_err().field(),
            Some("episode_id"),
            "e2 did not ask for extraction"
        );
        // a fact given with another source is not the extractor's
        let mut wrong = extracted("e1", vec![fact("f2", "x")], 1);
        if let MemoryCommand::RecordExtractedFacts { facts, .. } = &mut wrong {
            facts[0].source = SOURCE_COMMAND.into();
        }
        assert_eq!(m.decide(wrong).unwrap_err().field(), Some("facts"));
        // f1 unchanged records nothing, f3 is new: the outcome is recorded
        // with the one new fact, from its episode
        let evs = run(
            &mut m,
            extracted("e1", vec![fact("f1", "blue"), fact("f3", "Lyon")], 2),
        )
        .unwrap();
        assert!(
            matches!(&evs[..], [MemoryEvent::EpisodeExtracted(x), MemoryEvent::FactRecorded(f)]
                if x.facts == 2 && x.model.as_deref() == Some("extract-1")
                    && f.fact_id == "f3" && f.version == 1 && f.source == SOURCE_EXTRACTOR
                    && f.episode_id.as_deref() == Some("e1")),
            "{evs:?}"
        );
        assert!(m.to_extract.is_empty());
        assert_eq!(
            m.decide(extracted("e1", vec![], 3)).unwrap_err(),
            MemoryError::AlreadyExtracted("e1".into())
        );
        assert_eq!(
            m.decide(extraction_failed("e1", "timeout"))
                .unwrap_err()
                .code(),
            ErrorCode::Conflict
        );
        // a failure: a reason code only
        run(&mut m, turn("e3", true)).unwrap();
        assert_eq!(
            m.decide(extraction_failed("e3", "the model said: Jane"))
                .unwrap_err()
                .field(),
            Some("reason")
        );
        let evs = run(&mut m, extraction_failed("e3", "bad_answer")).unwrap();
        assert!(
            matches!(&evs[..], [MemoryEvent::EpisodeExtractionFailed(x)] if x.reason == "bad_answer" && x.attempts == 3)
        );
        assert!(m.extracted.contains("e3"));
        // an episode without text cannot ask for extraction
        let mut empty = turn("e4", true);
        if let MemoryCommand::Writeback {
            episode: Some(e), ..
        } = &mut empty
        {
            e.chunks.clear();
        }
        assert_eq!(m.decide(empty).unwrap_err().field(), Some("extract"));
        run(&mut m, turn("e5", true)).unwrap();
        run(
            &mut m,
            MemoryCommand::Erase {
                subject: who(),
                reason: "retention".into(),
            },
        )
        .unwrap();
        for c in [
            extracted("e5", vec![], 4),
            extraction_failed("e5", "timeout"),
        ] {
            assert_eq!(m.decide(c).unwrap_err().code(), ErrorCode::Rejected);
        }
    }

    fn episode_at(id: &str, t: i64) -> MemoryCommand {
        MemoryCommand::Writeback {
            subject: who(),
            episode: Some(EpisodeInput {
                episode_id: id.into(),
                turn_at: at(t),
                turn: sealed("{}"),
                chunks: vec![],
                messages: 1,
                extract: false,
            }),
            facts: vec![],
            at: at(t),
        }
    }

    fn retire(ids: &[&str], before: i64) -> MemoryCommand {
        MemoryCommand::RetireEpisodes {
            subject: who(),
            episode_ids: ids.iter().map(|i| i.to_string()).collect(),
            before: at(before),
        }
    }

    #[test]
    fn only_episodes_older_than_the_cut_off_are_retired_once_in_one_event_and_their_ids_stay_taken()
    {
        let mut m = Memory::default();
        for (id, t) in [("old", 0), ("older", -10), ("new", 100)] {
            run(&mut m, episode_at(id, t)).unwrap();
        }
        // not older than the cut-off (a turn at the cut-off included), or
        // unknown: left out; nothing left: nothing recorded
        assert_eq!(
            m.decide(retire(&["new", "none"], 100)).unwrap_err(),
            MemoryError::NothingDue(2)
        );
        assert_eq!(
            m.decide(retire(&["new"], 100)).unwrap_err().code(),
            ErrorCode::Rejected
        );
        let evs = run(&mut m, retire(&["old", "new", "none", "older", "old"], 50)).unwrap();
        assert!(
            matches!(&evs[..], [MemoryEvent::EpisodesRetired(e)]
                if e.episode_ids == ["old", "older"] && e.reason == "retention" && e.before == at(50)),
            "{evs:?}"
        );
        // once; no embeddings for them after; their ids are not recorded again
        assert_eq!(
            m.decide(retire(&["old", "older"], 50)).unwrap_err(),
            MemoryError::NothingDue(2)
        );
        let embed = MemoryCommand::RecordEmbeddings {
            subject: who(),
            episode_id: "old".into(),
            model: "m".into(),
            dimensions: 4,
            vectors: vec![],
        };
        assert_eq!(m.decide(embed).unwrap_err().code(), ErrorCode::NotFound);
        assert_eq!(
            m.decide(episode_at("older", 200)).unwrap_err().field(),
            Some("episode_id")
        );
        assert!(m.episodes.contains("new") && !m.episodes.contains("old"));
        assert!(m.episode_turn_at.len() == 1 && m.retired.len() == 2);
        // an empty command, or one over the bound, is malformed
        assert_eq!(
            m.decide(retire(&[], 500)).unwrap_err().field(),
            Some("episode_ids")
        );
        let many: Vec<String> = (0..=MAX_CLEANUP_ITEMS).map(|i| format!("e{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            m.decide(retire(&many, 500)).unwrap_err().field(),
            Some("episode_ids")
        );
    }

    #[test]
    fn an_episode_retired_by_the_earlier_single_event_still_leaves_the_state() {
        let mut m = Memory::default();
        run(&mut m, episode_at("old", 0)).unwrap();
        run(&mut m, episode_at("new", 100)).unwrap();
        m.fold(MemoryEvent::EpisodeRetired(
            crate::commands::memory::events::EpisodeRetired {
                episode_id: "old".into(),
                reason: "retention".into(),
                before: at(50),
            },
        ));
        assert!(!m.episodes.contains("old") && m.retired.contains("old"));
        assert_eq!(
            m.decide(retire(&["old"], 50)).unwrap_err(),
            MemoryError::NothingDue(1)
        );
        assert_eq!(
            m.decide(episode_at("old", 200)).unwrap_err().field(),
            Some("episode_id")
        );
    }

    #[test]
    fn another_key_or_owner_is_refused() {
        let mut m = Memory::default();
        run(&mut m, writeback(vec![fact("f1", "x")], 0)).unwrap();
        let mut s = who();
        s.key_id = "m2".into();
        let c = MemoryCommand::UpsertProfile {
            subject: s,
            fields: sealed("{}"),
        };
        assert_eq!(m.decide(c).unwrap_err().code(), ErrorCode::Conflict);
        let mut s = who();
        s.owner = "other".into();
        let c = MemoryCommand::UpsertProfile {
            subject: s,
            fields: sealed("{}"),
        };
        assert_eq!(m.decide(c).unwrap_err().code(), ErrorCode::Forbidden);
    }

    #[test]
    fn working_state_needs_a_future_expiry_and_expires_only_when_due() {
        let mut m = Memory::default();
        let set = |exp: i64| MemoryCommand::SetWorkingState {
            subject: who(),
            key: "intent".into(),
            value: sealed("\"buy\""),
            expires_at: at(exp),
            at: at(0),
        };
        assert_eq!(m.decide(set(0)).unwrap_err().field(), Some("ttl_seconds"));
        assert_eq!(
            m.decide(set(MAX_APPROVAL_WINDOW_SECONDS + 1))
                .unwrap_err()
                .field(),
            Some("ttl_seconds")
        );
        run(&mut m, set(60)).unwrap();
        let expire = |t: i64| MemoryCommand::DeleteWorkingState {
            subject: who(),
            key: "intent".into(),
            expired: true,
            at: at(t),
        };
        assert!(m.decide(expire(59)).is_err());
        let evs = run(&mut m, expire(60)).unwrap();
        assert!(matches!(&evs[0], MemoryEvent::WorkingStateDeleted(d) if d.reason == "expired"));
        assert_eq!(
            m.decide(expire(61)).unwrap_err().code(),
            ErrorCode::NotFound
        );
    }

    fn set_working(key: &str, exp: i64, t: i64) -> MemoryCommand {
        MemoryCommand::SetWorkingState {
            subject: who(),
            key: key.into(),
            value: sealed("1"),
            expires_at: at(exp),
            at: at(t),
        }
    }

    fn expire(keys: &[&str], t: i64) -> MemoryCommand {
        MemoryCommand::ExpireWorkingState {
            subject: who(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            at: at(t),
        }
    }

    #[test]
    fn the_due_values_expire_in_one_event_and_a_value_set_anew_is_left_out() {
        let mut m = Memory::default();
        assert_eq!(
            m.decide(expire(&["a"], 10)).unwrap_err().code(),
            ErrorCode::NotFound,
            "no subject"
        );
        for (k, exp) in [("a", 5), ("b", 10), ("c", 60), ("d", 5)] {
            run(&mut m, set_working(k, exp, 0)).unwrap();
        }
        // "d" was read as due, then set anew (to expire later)
        run(&mut m, set_working("d", 100, 8)).unwrap();
        let evs = run(&mut m, expire(&["b", "a", "c", "d", "gone", "a"], 10)).unwrap();
        assert!(
            matches!(&evs[..], [MemoryEvent::WorkingStateExpired(e)]
                if e.keys == ["b", "a"] && e.expired_at == at(10)),
            "{evs:?}"
        );
        assert_eq!(
            m.working.keys().collect::<Vec<_>>(),
            ["c", "d"],
            "the values not due stay"
        );
        // all left out: nothing recorded
        assert_eq!(
            m.decide(expire(&["a", "b", "c", "d"], 10)).unwrap_err(),
            MemoryError::NothingDue(4)
        );
        assert_eq!(m.decide(expire(&[], 10)).unwrap_err().field(), Some("keys"));
        let many: Vec<String> = (0..=MAX_CLEANUP_ITEMS).map(|i| format!("k{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            m.decide(expire(&many, 10)).unwrap_err().field(),
            Some("keys")
        );
        // the earlier single event still removes a value
        m.fold(MemoryEvent::WorkingStateDeleted(WorkingStateDeleted {
            key: "c".into(),
            reason: "expired".into(),
        }));
        assert_eq!(m.working.keys().collect::<Vec<_>>(), ["d"]);
        let evs = run(&mut m, expire(&["d"], 100)).unwrap();
        assert!(matches!(&evs[..], [MemoryEvent::WorkingStateExpired(e)] if e.keys == ["d"]));
        // after erasure: refused
        run(
            &mut m,
            MemoryCommand::Erase {
                subject: who(),
                reason: "retention".into(),
            },
        )
        .unwrap();
        assert_eq!(
            m.decide(expire(&["d"], 100)).unwrap_err().code(),
            ErrorCode::Rejected
        );
    }
}
