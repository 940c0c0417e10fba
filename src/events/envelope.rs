//! The event envelope: one JSON line per event, several lines per commit
//! message. docs/EVENTS.md is the specification; this is its implementation.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::events::chain::{self, Hash};

/// Header: the command id; JetStream de-duplicates on it.
pub const HDR_MSG_ID: &str = "Nats-Msg-Id";
/// Header: optimistic concurrency on the aggregate's subject.
pub const HDR_EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
/// Header: hex SHA-256 of the last event of this commit (the aggregate's chain head).
pub const HDR_CHAIN_HEAD: &str = "Flowledger-Chain-Head";
/// Header: hex SHA-256 of the command as received (to tell a retry from a reuse).
pub const HDR_COMMAND_HASH: &str = "Flowledger-Command-Hash";
/// Header: envelope format version.
pub const HDR_FORMAT: &str = "Flowledger-Format";
/// The [`HDR_FORMAT`] value of every commit this version writes.
pub const FORMAT_VERSION: &str = "1";

/// Who asked for the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Actor {
    /// The calling client: over HTTP the authenticated one, over NATS the
    /// user the broker vouches for; `n8n`,
    /// `flowledger-handler` and `operator` for n8n results, the job handler
    /// and the command line.
    pub client_id: String,
    /// The person behind the client, when the caller names one; omitted
    /// from the JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// One stored event line, decoded (docs/EVENTS.md, section 3). The store
/// writes new events as [`OutgoingRecord`], which puts `event_type` and
/// `data` last; readers take fields by name, and verifiers hash the stored
/// bytes and never re-serialize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Unique id of the event (UUID v7).
    pub event_id: Uuid,
    /// The aggregate's type: `job`, `approval`, `workflow`, `callback`, `projection`.
    pub aggregate_type: String,
    /// The aggregate's id, one subject token.
    pub aggregate_id: String,
    /// 1 for the aggregate's first event, +1 per event.
    pub aggregate_version: u64,
    /// The event's stable name, e.g. `JobSubmitted`; never renamed.
    pub event_type: String,
    /// Version of `data`'s shape, e.g. `1.0`; older ones are upcast on read.
    pub schema_version: String,
    /// Commit time, RFC 3339 UTC with microseconds (see [`format_time`]).
    pub occurred_at: String,
    /// Who sent the command.
    pub actor: Actor,
    /// The command that produced the event.
    pub command_id: String,
    /// The conversation the command belongs to (defaults to `command_id`).
    pub correlation_id: String,
    /// What caused the command (defaults to `command_id`).
    pub causation_id: String,
    /// The commit's `Flowledger-Command-Hash`, so the chain covers that
    /// header; absent on events written before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_hash: Option<String>,
    /// Hex hash of the aggregate's previous event; 64 zeros for version 1.
    pub prev_hash: String,
    /// The event's fields, by `event_type` and `schema_version`.
    pub data: Value,
}

/// The command-level facts copied into every event of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandMeta {
    /// The command's id (`Nats-Msg-Id`); the same id answers the first receipt.
    pub command_id: String,
    /// Who sent the command.
    pub actor: Actor,
    /// The conversation the command belongs to.
    pub correlation_id: String,
    /// What caused the command (the job handler puts the job's id).
    pub causation_id: String,
    /// `Flowledger-Command-Hash`, which tells a retry from a reused id: hex
    /// SHA-256 of the request as the intake read it (the job handler hashes
    /// the command id; the projection skip leaves it empty).
    pub command_hash: String,
}

impl CommandMeta {
    /// A command that starts its own story: its correlation and causation
    /// ids are its own id.
    pub fn originating(command_id: String, actor: Actor, command_hash: String) -> Self {
        CommandMeta {
            correlation_id: command_id.clone(),
            causation_id: command_id.clone(),
            command_id,
            actor,
            command_hash,
        }
    }
}

/// A time as the envelope writes it: RFC 3339 UTC with microseconds and
/// `Z`, e.g. `2026-11-23T12:00:00.123456Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An event as written: the envelope around a borrowed domain event. The
/// event enum is adjacently tagged (`event_type`, `data`) and flattened in
/// last, so `data` is serialized straight from the event, with no
/// intermediate `serde_json::Value`.
#[derive(Debug, Serialize)]
pub struct OutgoingRecord<'a, E: Serialize> {
    /// Unique id of the event (UUID v7).
    pub event_id: Uuid,
    /// The aggregate's type (cqrs-es `Aggregate::TYPE`).
    pub aggregate_type: &'a str,
    /// The aggregate's id, one subject token.
    pub aggregate_id: &'a str,
    /// The version this event gives the aggregate.
    pub aggregate_version: u64,
    /// The event's `event_version()`, e.g. `1.0`.
    pub schema_version: String,
    /// Commit time (see [`format_time`]), the same for every event of a commit.
    pub occurred_at: &'a str,
    /// Who sent the command.
    pub actor: &'a Actor,
    /// The command that produced the event.
    pub command_id: &'a str,
    /// The conversation the command belongs to.
    pub correlation_id: &'a str,
    /// What caused the command.
    pub causation_id: &'a str,
    /// The commit's `Flowledger-Command-Hash` (docs/EVENTS.md section 3).
    pub command_hash: &'a str,
    /// Hex hash of the previous event; filled in by [`encode_commit`].
    pub prev_hash: String,
    /// The domain event; written as the `event_type` and `data` fields.
    #[serde(flatten)]
    pub event: &'a E,
}

/// Something encodable as one line of a commit.
pub trait Chained: Serialize {
    /// Sets the hex hash of the previous event, before the line is written.
    fn set_prev_hash(&mut self, prev_hash: String);
}

impl Chained for EventRecord {
    fn set_prev_hash(&mut self, prev_hash: String) {
        self.prev_hash = prev_hash;
    }
}

impl<E: Serialize> Chained for OutgoingRecord<'_, E> {
    fn set_prev_hash(&mut self, prev_hash: String) {
        self.prev_hash = prev_hash;
    }
}

/// A commit ready to publish: the message body and each event's hash.
pub struct EncodedCommit {
    /// The message payload: one JSON line per event, each ending in `\n`.
    pub body: Vec<u8>,
    /// Each event's chain hash, in order.
    pub hashes: Vec<Hash>,
}

impl EncodedCommit {
    /// The hash of the last event (`Flowledger-Chain-Head`); `None` for an
    /// empty commit.
    pub fn head(&self) -> Option<&Hash> {
        self.hashes.last()
    }
}

/// Encodes records into a commit body, chaining each from `prev`;
/// each record's `prev_hash` is filled in here.
pub fn encode_commit<R: Chained>(
    records: &mut [R],
    mut prev: Hash,
) -> Result<EncodedCommit, serde_json::Error> {
    let mut body = Vec::with_capacity(768 * records.len());
    let mut hashes = Vec::with_capacity(records.len());
    for r in records.iter_mut() {
        r.set_prev_hash(chain::to_hex(&prev));
        let start = body.len();
        serde_json::to_writer(&mut body, r)?;
        prev = chain::event_hash(&prev, &body[start..]);
        hashes.push(prev);
        body.push(b'\n');
    }
    Ok(EncodedCommit { body, hashes })
}

/// Whether an encoded commit holds a NUL character: JSON writes it as the
/// escape `\u0000` (a backslash that is not itself escaped, then `u0000`).
/// PostgreSQL stores no NUL in `text` or `jsonb`, so the ledger refuses such
/// a commit rather than stop every read model at it.
pub fn holds_nul(body: &[u8]) -> bool {
    // backslashes are rare in JSON: jump from one to the next
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\\', &body[from..]).map(|i| from + i) {
        // an escape: the next byte says which; skipping it also skips the
        // second backslash of an escaped backslash
        if body[i + 1..].starts_with(b"u0000") {
            return true;
        }
        from = (i + 2).min(body.len());
    }
    false
}

/// Why a message body is not a commit (docs/EVENTS.md, section 2); on the
/// event stream this means the log is damaged.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommitFormatError {
    /// The body has no bytes.
    #[error("commit body is empty")]
    Empty,
    /// The last line lacks its `\n`: the body was cut or is not a commit.
    #[error("commit body does not end with a newline")]
    NoTrailingNewline,
    /// A line does not parse as the envelope asked for.
    #[error("event {index} of the commit is not a valid envelope: {message}")]
    BadEnvelope {
        /// 0-based position of the line in the commit.
        index: usize,
        /// The JSON parser's complaint.
        message: String,
    },
}

/// Splits a commit body into `(line bytes, record)` pairs.
pub fn decode_commit(body: &[u8]) -> Result<Vec<(&[u8], EventRecord)>, CommitFormatError> {
    decode_commit_as(body)
}

/// [`decode_commit`] into another view of the envelope (projections read
/// only the fields they use).
pub fn decode_commit_as<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<Vec<(&[u8], T)>, CommitFormatError> {
    if body.is_empty() {
        return Err(CommitFormatError::Empty);
    }
    let Some(without_last) = body.strip_suffix(b"\n") else {
        return Err(CommitFormatError::NoTrailingNewline);
    };
    without_last
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(index, line)| {
            serde_json::from_slice::<T>(line)
                .map(|r| (line, r))
                .map_err(|e| CommitFormatError::BadEnvelope {
                    index,
                    message: e.to_string(),
                })
        })
        .collect()
}

/// Rebuilds an event of a `#[serde(tag = "event_type", content = "data")]`
/// enum from the envelope's `event_type` and `data`.
pub fn join_event<E: serde::de::DeserializeOwned>(
    event_type: &str,
    data: Value,
) -> Result<E, serde_json::Error> {
    serde_json::from_value(serde_json::json!({ "event_type": event_type, "data": data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(v: u64) -> EventRecord {
        EventRecord {
            event_id: Uuid::nil(),
            aggregate_type: "job".into(),
            aggregate_id: "j1".into(),
            aggregate_version: v,
            event_type: "JobStarted".into(),
            schema_version: "1.0".into(),
            occurred_at: "2026-11-23T12:00:00.000000Z".into(),
            actor: Actor {
                client_id: "c".into(),
                user_id: None,
            },
            command_id: "cmd".into(),
            correlation_id: "cmd".into(),
            causation_id: "cmd".into(),
            command_hash: None,
            prev_hash: String::new(),
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn commit_round_trips_and_chains() {
        let mut records = vec![record(1), record(2)];
        let c = encode_commit(&mut records, chain::GENESIS).unwrap();
        let decoded = decode_commit(&c.body).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].1.prev_hash, chain::to_hex(&chain::GENESIS));
        assert_eq!(decoded[1].1.prev_hash, chain::to_hex(&c.hashes[0]));
        assert_eq!(chain::event_hash(&c.hashes[0], decoded[1].0), c.hashes[1]);
    }

    #[test]
    fn outgoing_records_read_back_as_envelopes() {
        use crate::commands::job::events::{JobCancelled, JobEvent};
        let event = JobEvent::JobCancelled(JobCancelled {
            workflow_key: "k".into(),
            reason: "r".into(),
        });
        let actor = Actor {
            client_id: "c".into(),
            user_id: None,
        };
        let mut out = [OutgoingRecord {
            event_id: Uuid::nil(),
            aggregate_type: "job",
            aggregate_id: "j1",
            aggregate_version: 1,
            schema_version: "1.0".into(),
            occurred_at: "2026-11-23T12:00:00.000000Z",
            actor: &actor,
            command_id: "cmd",
            correlation_id: "cmd",
            causation_id: "cmd",
            command_hash: "",
            prev_hash: String::new(),
            event: &event,
        }];
        let c = encode_commit(&mut out, chain::GENESIS).unwrap();
        let (line, r) = decode_commit(&c.body).unwrap().remove(0);
        assert_eq!(r.event_type, "JobCancelled");
        assert_eq!(
            r.data,
            serde_json::json!({"workflow_key": "k", "reason": "r"})
        );
        assert_eq!(chain::event_hash(&chain::GENESIS, line), c.hashes[0]);
        assert_eq!(
            join_event::<JobEvent>(&r.event_type, r.data).unwrap(),
            event
        );
    }

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        let enc = |s: &str| serde_json::to_vec(&serde_json::json!({ "a": s })).unwrap();
        assert!(holds_nul(&enc("x\u{0}y")));
        assert!(holds_nul(&enc("\\\u{0}")));
        assert!(!holds_nul(&enc("\\u0000")));
        assert!(!holds_nul(&enc("\\\\u0000")));
        assert!(!holds_nul(&enc("plain")));
        // not JSON, still no panic
        assert!(!holds_nul(b"\\"));
        assert!(!holds_nul(b"a\\u000"));
    }

    #[test]
    fn malformed_commits_are_named() {
        assert_eq!(decode_commit(b""), Err(CommitFormatError::Empty));
        assert_eq!(
            decode_commit(b"{}"),
            Err(CommitFormatError::NoTrailingNewline)
        );
        assert!(matches!(
            decode_commit(b"{}\n"),
            Err(CommitFormatError::BadEnvelope { index: 0, .. })
        ));
    }
}
