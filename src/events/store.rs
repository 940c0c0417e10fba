//! The event store: cqrs-es aggregates on the JetStream log.
//!
//! [`AggregateStore`] implements cqrs-es's `EventStore`, so a
//! `CqrsFramework` can run on it, and adds [`AggregateStore::execute`], the
//! executor the intake uses: it answers with a [`Receipt`] (event ids, stream
//! sequence) and handles idempotency and conflicts (docs/adr/0002).
//!
//! * One command = one JetStream message (all its events, atomically).
//! * Concurrency: `Nats-Expected-Last-Subject-Sequence` = the sequence of the
//!   aggregate's last message we know (0 for a new aggregate).
//! * Idempotency: `Nats-Msg-Id` = command id inside the broker's window; the
//!   log itself beyond it (every commit names its command id, and loading an
//!   aggregate indexes them).
//! * Cache: the loaded state of each aggregate is kept between commands; a
//!   stale cache is caught by the concurrency check and reloaded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use async_nats::jetstream::message::StreamMessage;
use chrono::Utc;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::SerializedEvent;
use cqrs_es::{Aggregate, AggregateContext, AggregateError, DomainEvent, EventEnvelope};
use serde::Serialize;
use uuid::Uuid;

use crate::events::chain::{self, Hash};
use crate::events::envelope::{self, CommandMeta, EventRecord, OutgoingRecord};
use crate::events::log::{subject_for, valid_aggregate_id, AppendError, EventLog, LogError};
use crate::events::upcasters;

/// What a successful (or repeated) command answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receipt {
    /// The aggregate's type, e.g. `job`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The command's id; the same id answers this receipt again.
    pub command_id: String,
    /// Stream sequence of the commit message.
    pub stream_seq: u64,
    /// Aggregate version after the commit.
    pub aggregate_version: u64,
    /// The commit's events, in order.
    pub events: Vec<ReceiptEvent>,
    /// When the commit was written (RFC 3339, the events' `occurred_at`);
    /// a repeated command answers the original time.
    pub occurred_at: String,
    /// True when this command id had already been committed: nothing new was appended.
    pub duplicate: bool,
    /// The commit's `Flowledger-Command-Hash`: a repeated id with another
    /// hash is a reused id. Not part of the reply.
    #[serde(skip)]
    pub command_hash: String,
}

/// One event of a [`Receipt`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiptEvent {
    /// The event's id (UUID v7).
    pub event_id: Uuid,
    /// Its stable name, e.g. `JobSubmitted`.
    pub event_type: String,
    /// The aggregate's version after this event.
    pub aggregate_version: u64,
    /// Hex chain hash of the event (docs/EVENTS.md, section 3).
    pub hash: String,
}

impl Receipt {
    fn new(
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: &str,
        stream_seq: u64,
        events: Vec<ReceiptEvent>,
        occurred_at: String,
        command_hash: &str,
    ) -> Self {
        Receipt {
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: aggregate_id.to_string(),
            command_id: command_id.to_string(),
            stream_seq,
            aggregate_version: events.last().map_or(0, |e| e.aggregate_version),
            events,
            occurred_at,
            duplicate: false,
            command_hash: command_hash.to_string(),
        }
    }
}

/// The state of one aggregate as of its last known commit.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The aggregate folded from its events (`A::default()` when none).
    pub state: A,
    /// Events applied; 0: the aggregate does not exist.
    pub version: u64,
    /// Stream sequence of the aggregate's last message (0: none).
    pub subject_seq: u64,
    /// Chain hash of the last event ([`chain::GENESIS`] when none).
    pub head: Hash,
    /// Every command id committed on this aggregate, with its receipt.
    pub commits: HashMap<String, Arc<Receipt>>,
}

impl<A: Default> Loaded<A> {
    fn empty(aggregate_id: &str) -> Self {
        Loaded {
            aggregate_id: aggregate_id.to_string(),
            state: A::default(),
            version: 0,
            subject_seq: 0,
            head: chain::GENESIS,
            commits: HashMap::new(),
        }
    }
}

impl<A: Aggregate> AggregateContext<A> for Loaded<A> {
    fn aggregate(&mut self) -> &mut A {
        &mut self.state
    }
}

/// Why the store could not read or write an aggregate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The log could not be read or written (reply code `unavailable`); retry.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A stored commit does not decode, chain or follow the versions; run
    /// `flowledger audit verify`. (With `seq` 0: a command decided no event,
    /// a bug.)
    #[error("event log is inconsistent at stream sequence {seq}: {reason}; run `flowledger audit verify`")]
    Corrupt {
        /// Stream sequence of the message at fault.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// An event could not be written as JSON (a bug).
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
    /// Refused before any read: the id would not be one subject token.
    #[error("{aggregate_type} id {id:?} is not a valid id (1-128 of A-Z a-z 0-9 _ -)")]
    InvalidAggregateId {
        /// The aggregate type the id was meant for.
        aggregate_type: &'static str,
        /// The id as given, cut to 140 characters.
        id: String,
    },
}

/// Why [`AggregateStore::execute`] appended nothing.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error> {
    /// The aggregate refused the command; the domain error says why.
    #[error("{0}")]
    Rejected(E),
    /// Other writers committed first on every try; retry the command.
    #[error("aggregate {aggregate_id} kept changing under {attempts} attempts; retry the command")]
    Conflict {
        /// The aggregate's id.
        aggregate_id: String,
        /// How many times the command was decided and appended.
        attempts: usize,
    },
    /// The command id was already committed with another command hash (or
    /// on another subject); use a new command id.
    #[error(
        "command id {command_id} was already used for a different command; use a new command id"
    )]
    CommandIdReused {
        /// The reused id.
        command_id: String,
    },
    /// The commit is larger than the server accepts; the text gives its size.
    /// Send smaller inputs.
    #[error("commit too large: {0}")]
    TooLarge(String),
    /// The events hold a value no read model can store (a NUL character).
    #[error("the command holds a NUL character (\\u0000), which cannot be stored; remove it")]
    Unstorable,
    /// Reading or writing the log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<E: std::error::Error> From<LogError> for ExecuteError<E> {
    fn from(e: LogError) -> Self {
        ExecuteError::Store(StoreError::Log(e))
    }
}

/// A stored event that does not decode into its aggregate's event type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// An envelope field the reader needs is not valid (e.g. `occurred_at`).
    #[error("the envelope is not valid: {0}")]
    Envelope(String),
    /// `data` (after upcasting) does not fit the event type.
    #[error("{event_type} v{schema_version} does not decode: {message}")]
    Event {
        /// The stored `event_type`.
        event_type: String,
        /// The stored `schema_version`.
        schema_version: String,
        /// The JSON parser's complaint.
        message: String,
    },
}

/// Decodes a stored record into its typed event, upcasting older schema
/// versions first (`events::upcasters`). Every reader of typed events (the
/// aggregate store, the job handler) decodes through here.
pub fn decode_event<E: serde::de::DeserializeOwned>(
    record: &EventRecord,
) -> Result<E, DecodeError> {
    let serialized = upcasters::upcast(
        SerializedEvent::new(
            record.aggregate_id.clone(),
            record.aggregate_version as usize,
            record.aggregate_type.clone(),
            record.event_type.clone(),
            record.schema_version.clone(),
            record.data.clone(),
            serde_json::Value::Null,
        ),
        upcasters::all(),
    );
    envelope::join_event(&serialized.event_type, serialized.payload).map_err(|e| {
        DecodeError::Event {
            event_type: record.event_type.clone(),
            schema_version: record.schema_version.clone(),
            message: e.to_string(),
        }
    })
}

type Slot<A> = Arc<tokio::sync::Mutex<Option<Loaded<A>>>>;

/// cqrs-es aggregates of one type on the JetStream log.
pub struct AggregateStore<A: Aggregate> {
    log: EventLog,
    services: A::Services,
    slots: Mutex<HashMap<String, Slot<A>>>,
    max_cached: usize,
    max_attempts: usize,
}

enum Appended {
    New(Arc<Receipt>),
    /// The broker recognised the command id (inside its duplicate window).
    Duplicate(Arc<Receipt>),
}

impl<A> AggregateStore<A>
where
    A: Aggregate + Clone,
    A::Command: Clone,
{
    /// A store of `A`s on `log`, deciding with `services`. It caches loaded
    /// aggregates (at 100,000, the idle ones are dropped) and tries a
    /// conflicting command up to 5 times.
    pub fn new(log: EventLog, services: A::Services) -> Self {
        AggregateStore {
            log,
            services,
            slots: Mutex::new(HashMap::new()),
            max_cached: 100_000,
            max_attempts: 5,
        }
    }

    /// The event log this store reads and appends to.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The subject of `aggregate_id`, if it is one valid subject token.
    pub fn subject(&self, aggregate_id: &str) -> Result<String, StoreError> {
        if !valid_aggregate_id(aggregate_id) {
            return Err(StoreError::InvalidAggregateId {
                aggregate_type: A::TYPE,
                // quoted in errors: keep it short
                id: aggregate_id.chars().take(140).collect(),
            });
        }
        Ok(subject_for(A::TYPE, aggregate_id))
    }

    fn slot(&self, aggregate_id: &str) -> Slot<A> {
        // A poisoned lock means a panic while holding it; the map itself is
        // still a valid cache, so keep using it.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= self.max_cached && !slots.contains_key(aggregate_id) {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots.entry(aggregate_id.to_string()).or_default().clone()
    }

    /// Drops every cached aggregate (for tests and benchmarks).
    pub fn clear_cache(&self) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Reads an aggregate from the log, checking its hash chain.
    pub async fn load(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError> {
        let subject = self.subject(aggregate_id)?;
        let mut loaded = Loaded::empty(aggregate_id);
        let mut from = 1;
        while let Some(msg) = self.log.next_for_subject(&subject, from).await? {
            from = msg.sequence + 1;
            self.apply_message(&mut loaded, &msg, |_| {})?;
        }
        Ok(loaded)
    }

    /// The aggregate as the log has it now, read incrementally: the cached
    /// state brought up to the log's end (only the commits after its last
    /// sequence are read, and the cache keeps the result), or loaded whole
    /// when not cached. What [`load`](Self::load) answers, at the cost of
    /// the commits since the last read instead of the whole history (a
    /// handler that reads a subject per event). A cached state that does
    /// not continue into the log (a corrupt read) is dropped and the
    /// aggregate loaded whole.
    pub async fn current(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError> {
        let subject = self.subject(aggregate_id)?;
        let slot = self.slot(aggregate_id);
        let mut guard = slot.lock().await;
        let Some(mut loaded) = guard.take() else {
            let loaded = self.load(aggregate_id).await?;
            *guard = Some(loaded.clone());
            return Ok(loaded);
        };
        let mut from = loaded.subject_seq + 1;
        let caught_up: Result<(), StoreError> = async {
            while let Some(msg) = self.log.next_for_subject(&subject, from).await? {
                from = msg.sequence + 1;
                self.apply_message(&mut loaded, &msg, |_| {})?;
            }
            Ok(())
        }
        .await;
        // on an error the slot stays empty: the next command loads the
        // aggregate from the log (the partly advanced state is discarded)
        let loaded = match caught_up {
            Ok(()) => loaded,
            Err(StoreError::Corrupt { .. }) => self.load(aggregate_id).await?,
            Err(e) => return Err(e),
        };
        *guard = Some(loaded.clone());
        Ok(loaded)
    }

    /// The aggregate as the cache holds it (what the next command is decided
    /// on), or read from the log when it is not cached.
    pub async fn cached_or_load(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError> {
        let slot = self.slot(aggregate_id);
        let cached = slot.lock().await.clone();
        match cached {
            Some(l) => Ok(l),
            None => self.load(aggregate_id).await,
        }
    }

    /// Reads an aggregate's events as cqrs-es envelopes (upcast, in order).
    pub async fn load_envelopes(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, StoreError> {
        let subject = self.subject(aggregate_id)?;
        let mut loaded = Loaded::empty(aggregate_id);
        let mut out = Vec::new();
        let mut from = 1;
        while let Some(msg) = self.log.next_for_subject(&subject, from).await? {
            from = msg.sequence + 1;
            self.apply_message(&mut loaded, &msg, |e| out.push(e))?;
        }
        Ok(out)
    }

    fn apply_message(
        &self,
        loaded: &mut Loaded<A>,
        msg: &StreamMessage,
        mut on_event: impl FnMut(EventEnvelope<A>),
    ) -> Result<(), StoreError> {
        let seq = msg.sequence;
        let corrupt = |reason: String| StoreError::Corrupt { seq, reason };
        let lines = envelope::decode_commit(&msg.payload).map_err(|e| corrupt(e.to_string()))?;
        let mut receipt_events = Vec::with_capacity(lines.len());
        let mut command_id = None;
        let mut occurred_at = String::new();
        for (line, record) in lines {
            if record.prev_hash != chain::to_hex(&loaded.head) {
                return Err(corrupt(format!(
                    "event version {} does not chain to the previous event",
                    record.aggregate_version
                )));
            }
            if record.aggregate_version != loaded.version + 1 {
                return Err(corrupt(format!(
                    "expected aggregate version {}, found {}",
                    loaded.version + 1,
                    record.aggregate_version
                )));
            }
            loaded.head = chain::event_hash(&loaded.head, line);
            loaded.version = record.aggregate_version;
            let event: A::Event = decode_event(&record)
                .map_err(|e| corrupt(format!("event {}: {e}", record.event_type)))?;
            on_event(EventEnvelope {
                aggregate_id: loaded.aggregate_id.clone(),
                sequence: loaded.version as usize,
                payload: event.clone(),
                metadata: metadata_of(&record, seq),
            });
            loaded.state.apply(event);
            receipt_events.push(ReceiptEvent {
                event_id: record.event_id,
                event_type: record.event_type,
                aggregate_version: record.aggregate_version,
                hash: chain::to_hex(&loaded.head),
            });
            command_id.get_or_insert(record.command_id);
            occurred_at = record.occurred_at;
        }
        let Some(command_id) = command_id else {
            return Err(corrupt("commit holds no event".into()));
        };
        let command_hash = msg
            .headers
            .get(envelope::HDR_COMMAND_HASH)
            .map(|v| v.as_str())
            .unwrap_or_default();
        let receipt = Receipt::new(
            A::TYPE,
            &loaded.aggregate_id,
            &command_id,
            seq,
            receipt_events,
            occurred_at,
            command_hash,
        );
        loaded.commits.insert(command_id, Arc::new(receipt));
        loaded.subject_seq = seq;
        Ok(())
    }

    /// Appends `events` after `loaded`. `loaded.state` already has the
    /// events applied (by the `EventSink`); on success the rest of `loaded`
    /// is advanced, on failure the caller discards `loaded`.
    async fn append(
        &self,
        loaded: &mut Loaded<A>,
        events: &[A::Event],
        meta: &CommandMeta,
    ) -> Result<Appended, ExecuteError<A::Error>> {
        let now = envelope::format_time(Utc::now());
        let mut records: Vec<OutgoingRecord<'_, A::Event>> = events
            .iter()
            .enumerate()
            .map(|(i, event)| OutgoingRecord {
                event_id: Uuid::now_v7(),
                aggregate_type: A::TYPE,
                aggregate_id: &loaded.aggregate_id,
                aggregate_version: loaded.version + 1 + i as u64,
                schema_version: event.event_version(),
                occurred_at: &now,
                actor: &meta.actor,
                command_id: &meta.command_id,
                correlation_id: &meta.correlation_id,
                causation_id: &meta.causation_id,
                command_hash: &meta.command_hash,
                prev_hash: String::new(),
                event,
            })
            .collect();
        let commit =
            envelope::encode_commit(&mut records, loaded.head).map_err(StoreError::from)?;
        if envelope::holds_nul(&commit.body) {
            return Err(ExecuteError::Unstorable);
        }
        let head = *commit.head().expect("a commit with events has a head");
        let receipt_events: Vec<ReceiptEvent> = records
            .iter()
            .zip(&commit.hashes)
            .map(|(r, h)| ReceiptEvent {
                event_id: r.event_id,
                event_type: r.event.event_type(),
                aggregate_version: r.aggregate_version,
                hash: chain::to_hex(h),
            })
            .collect();
        drop(records);
        let subject = self.subject(&loaded.aggregate_id)?;
        let headers = [
            (envelope::HDR_CHAIN_HEAD, chain::to_hex(&head)),
            (envelope::HDR_COMMAND_HASH, meta.command_hash.clone()),
            (envelope::HDR_FORMAT, envelope::FORMAT_VERSION.to_string()),
        ];
        // the commit's span; the log puts its trace context in the
        // message's `traceparent` header, outside the chained body
        let span = tracing::info_span!(
            "commit",
            aggregate_type = A::TYPE,
            aggregate_id = %loaded.aggregate_id,
            events = events.len(),
            seq = tracing::field::Empty,
        );
        let ack = self
            .log
            .append(
                subject.clone(),
                commit.body,
                &meta.command_id,
                loaded.subject_seq,
                &headers,
            )
            .instrument(span.clone())
            .await;
        if let Ok(a) = &ack {
            span.record("seq", a.sequence);
        }
        drop(span);
        match ack {
            Ok(ack) if ack.duplicate => {
                let msg = self
                    .log
                    .get(ack.sequence)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt {
                        seq: ack.sequence,
                        reason: "the broker reported a duplicate at a sequence it cannot read"
                            .into(),
                    })?;
                if msg.subject.as_str() != subject {
                    return Err(ExecuteError::CommandIdReused {
                        command_id: meta.command_id.clone(),
                    });
                }
                // Read the original commit through a fresh load so the
                // receipt is exactly the stored one.
                let fresh = self.load(&loaded.aggregate_id).await?;
                let receipt = fresh
                    .commits
                    .get(&meta.command_id)
                    .cloned()
                    .ok_or_else(|| StoreError::Corrupt {
                        seq: ack.sequence,
                        reason: format!("commit does not carry command id {}", meta.command_id),
                    })?;
                *loaded = fresh;
                Ok(Appended::Duplicate(receipt))
            }
            Ok(ack) => {
                let receipt = Arc::new(Receipt::new(
                    A::TYPE,
                    &loaded.aggregate_id,
                    &meta.command_id,
                    ack.sequence,
                    receipt_events,
                    now.clone(),
                    &meta.command_hash,
                ));
                loaded.version += events.len() as u64;
                loaded.subject_seq = ack.sequence;
                loaded.head = head;
                loaded
                    .commits
                    .insert(meta.command_id.clone(), receipt.clone());
                Ok(Appended::New(receipt))
            }
            Err(AppendError::WrongLastSequence { .. }) => Err(ExecuteError::Conflict {
                aggregate_id: loaded.aggregate_id.clone(),
                attempts: 1,
            }),
            Err(AppendError::TooLarge { size }) => Err(ExecuteError::TooLarge(format!(
                "{size} bytes; send smaller inputs"
            ))),
            Err(AppendError::Unavailable(m)) => Err(LogError::Unavailable(m).into()),
        }
    }

    /// Runs one command: decide on the current state, append, answer.
    ///
    /// A command id that was already committed on this aggregate answers the
    /// original receipt with `duplicate: true` and appends nothing.
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<A::Error>> {
        Ok(self.run(aggregate_id, command, meta).await?.0)
    }

    /// [`execute`](Self::execute), answering the commit's events beside its
    /// receipt (those of the original commit for a repeated command id, read
    /// back from the log): for a caller whose command's decision leaves
    /// items out and needs to know which.
    pub async fn execute_with_events(
        &self,
        aggregate_id: &str,
        command: A::Command,
        meta: &CommandMeta,
    ) -> Result<(Arc<Receipt>, Vec<A::Event>), ExecuteError<A::Error>> {
        let (receipt, events) = self.run(aggregate_id, command, meta).await?;
        if let Some(events) = events {
            return Ok((receipt, events));
        }
        let seq = receipt.stream_seq;
        let msg = self
            .log
            .get(seq)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                seq,
                reason: "a committed command's message cannot be read".into(),
            })?;
        let corrupt = |reason: String| StoreError::Corrupt { seq, reason };
        let events = envelope::decode_commit(&msg.payload)
            .map_err(|e| corrupt(e.to_string()))?
            .into_iter()
            .map(|(_, record)| {
                decode_event(&record)
                    .map_err(|e| corrupt(format!("event {}: {e}", record.event_type)))
            })
            .collect::<Result<Vec<A::Event>, _>>()?;
        Ok((receipt, events))
    }

    /// Appends `events` to `aggregate_id` in one commit as if a command had
    /// decided them: applied to the cached (or loaded) state, chained,
    /// checked against the subject's last sequence, exactly as
    /// [`execute`](Self::execute) stores a decision. Nothing decides them:
    /// only the benchmark program's setups use it, to write in one commit
    /// what many commands would (the feature `bench`).
    #[cfg(feature = "bench")]
    pub async fn append_undecided(
        &self,
        aggregate_id: &str,
        events: Vec<A::Event>,
        meta: &CommandMeta,
    ) -> Result<Arc<Receipt>, ExecuteError<A::Error>> {
        let slot = self.slot(aggregate_id);
        let mut guard = slot.lock().await;
        let mut loaded = match guard.take() {
            Some(l) => l,
            None => self.load(aggregate_id).await?,
        };
        for e in &events {
            loaded.state.apply(e.clone());
        }
        let receipt = match self.append(&mut loaded, &events, meta).await? {
            Appended::New(r) | Appended::Duplicate(r) => r,
        };
        *guard = Some(loaded);
        Ok(receipt)
    }

    /// The receipt and, when this call appended them, the events.
    async fn run(
        &self,
        aggregate_id: &str,
        command: A::Command,
        meta: &CommandMeta,
    ) -> Result<(Arc<Receipt>, Option<Vec<A::Event>>), ExecuteError<A::Error>> {
        self.subject(aggregate_id)?;
        let slot = self.slot(aggregate_id);
        let mut guard = slot.lock().await;
        // No cached state: assume the aggregate is new. The concurrency check
        // (expected sequence 0) proves that assumption or sends us to reload;
        // a rejection on the assumed-empty state is re-decided after a load.
        let mut speculative = guard.is_none();
        // A cached state may be behind a commit another process made: a
        // refusal is final only once the log shows nothing newer.
        let mut verified = false;
        let mut loaded = guard.take().unwrap_or_else(|| Loaded::empty(aggregate_id));
        for _ in 0..self.max_attempts {
            if let Some(previous) = loaded.commits.get(&meta.command_id) {
                if previous.command_hash != meta.command_hash {
                    *guard = Some(loaded);
                    return Err(ExecuteError::CommandIdReused {
                        command_id: meta.command_id.clone(),
                    });
                }
                let receipt = Arc::new(Receipt {
                    duplicate: true,
                    ..Receipt::clone(previous)
                });
                *guard = Some(loaded);
                return Ok((receipt, None));
            }
            // The aggregate decides on the cached state itself (no copy):
            // events are applied to it through the sink, and whenever the
            // commit does not succeed that state is discarded.
            let sink = EventSink::default();
            let decided = loaded
                .state
                .handle(command.clone(), &self.services, &sink)
                .await;
            let events = sink.collect().await;
            match decided {
                Err(_) if speculative => {
                    loaded = self.load(aggregate_id).await?;
                    (speculative, verified) = (false, true);
                    continue;
                }
                Err(e) if !verified => {
                    let subject = self.subject(aggregate_id)?;
                    let newer = self
                        .log
                        .next_for_subject(&subject, loaded.subject_seq + 1)
                        .await?;
                    if newer.is_some() || !events.is_empty() {
                        loaded = self.load(aggregate_id).await?;
                        verified = true;
                        continue;
                    }
                    *guard = Some(loaded);
                    return Err(ExecuteError::Rejected(e));
                }
                Err(e) => {
                    // A refusal normally writes nothing; if it wrote part of
                    // its events the state is no longer the stored one.
                    if events.is_empty() {
                        *guard = Some(loaded);
                    }
                    return Err(ExecuteError::Rejected(e));
                }
                Ok(()) if events.is_empty() => {
                    *guard = Some(loaded);
                    return Err(ExecuteError::Store(StoreError::Corrupt {
                        seq: 0,
                        reason: "a command produced no event".into(),
                    }));
                }
                Ok(()) => {}
            }
            match self.append(&mut loaded, &events, meta).await {
                Ok(Appended::New(receipt)) => {
                    *guard = Some(loaded);
                    return Ok((receipt, Some(events)));
                }
                Ok(Appended::Duplicate(receipt)) => {
                    if receipt.command_hash != meta.command_hash {
                        *guard = Some(loaded);
                        return Err(ExecuteError::CommandIdReused {
                            command_id: meta.command_id.clone(),
                        });
                    }
                    *guard = Some(loaded);
                    return Ok((
                        Arc::new(Receipt {
                            duplicate: true,
                            ..Receipt::clone(&receipt)
                        }),
                        None,
                    ));
                }
                Err(ExecuteError::Conflict { .. }) => {
                    loaded = self.load(aggregate_id).await?;
                    (speculative, verified) = (false, true);
                }
                // Unknown outcome (timeout, connection): leave the cache
                // empty so the next command reloads.
                Err(e) => return Err(e),
            }
        }
        Err(ExecuteError::Conflict {
            aggregate_id: aggregate_id.to_string(),
            attempts: self.max_attempts,
        })
    }
}

fn metadata_of(record: &EventRecord, seq: u64) -> HashMap<String, String> {
    HashMap::from([
        ("event_id".to_string(), record.event_id.to_string()),
        ("command_id".to_string(), record.command_id.clone()),
        ("client_id".to_string(), record.actor.client_id.clone()),
        ("correlation_id".to_string(), record.correlation_id.clone()),
        ("causation_id".to_string(), record.causation_id.clone()),
        ("occurred_at".to_string(), record.occurred_at.clone()),
        ("stream_seq".to_string(), seq.to_string()),
    ])
}

fn to_aggregate_error<E: std::error::Error>(e: ExecuteError<E>) -> AggregateError<E> {
    match e {
        ExecuteError::Rejected(e) => AggregateError::UserError(e),
        ExecuteError::Conflict { .. } | ExecuteError::CommandIdReused { .. } => {
            AggregateError::AggregateConflict
        }
        ExecuteError::TooLarge(m) => AggregateError::UnexpectedError(m.into()),
        e @ ExecuteError::Unstorable => AggregateError::UnexpectedError(e.to_string().into()),
        ExecuteError::Store(StoreError::Log(e)) => {
            AggregateError::DatabaseConnectionError(Box::new(e))
        }
        ExecuteError::Store(e) => AggregateError::UnexpectedError(Box::new(e)),
    }
}

/// cqrs-es integration: `CqrsFramework::new(store, queries, services)` works
/// on this store. Metadata keys `command_id`, `client_id`, `user_id`,
/// `correlation_id` are read from the framework's metadata map.
impl<A> cqrs_es::EventStore<A> for AggregateStore<A>
where
    A: Aggregate + Clone,
    A::Command: Clone,
{
    type AC = Loaded<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.load_envelopes(aggregate_id)
            .await
            .map_err(|e| to_aggregate_error(ExecuteError::Store(e)))
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<Self::AC, AggregateError<A::Error>> {
        self.cached_or_load(aggregate_id)
            .await
            .map_err(|e| to_aggregate_error(ExecuteError::Store(e)))
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        mut context: Self::AC,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // cqrs-es has already applied `events` to `context.state` through
        // its EventSink, which is what `append` expects.
        let get = |k: &str| metadata.get(k).cloned().unwrap_or_default();
        let command_id = metadata
            .get("command_id")
            .cloned()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let meta = CommandMeta {
            command_id: command_id.clone(),
            actor: envelope::Actor {
                client_id: get("client_id"),
                user_id: metadata.get("user_id").cloned(),
            },
            correlation_id: metadata
                .get("correlation_id")
                .cloned()
                .unwrap_or_else(|| command_id.clone()),
            causation_id: command_id,
            command_hash: get("command_hash"),
        };
        let before = context.version;
        let receipt = match self
            .append(&mut context, &events, &meta)
            .await
            .map_err(to_aggregate_error)?
        {
            Appended::New(r) | Appended::Duplicate(r) => r,
        };
        let slot = self.slot(&context.aggregate_id);
        *slot.lock().await = Some(context);
        Ok(events
            .into_iter()
            .enumerate()
            .map(|(i, payload)| EventEnvelope {
                aggregate_id: receipt.aggregate_id.clone(),
                sequence: (before + 1 + i as u64) as usize,
                payload,
                metadata: HashMap::from([
                    ("stream_seq".to_string(), receipt.stream_seq.to_string()),
                    (
                        "event_id".to_string(),
                        receipt
                            .events
                            .get(i)
                            .map(|e| e.event_id.to_string())
                            .unwrap_or_default(),
                    ),
                ]),
            })
            .collect())
    }
}
