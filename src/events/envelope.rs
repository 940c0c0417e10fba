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
pub const FORMAT_VERSION: &str = "1";

/// Who asked for the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Actor {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// One event as stored. Field order here is the order written; verifiers
/// hash the stored bytes and never re-serialize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub aggregate_version: u64,
    pub event_type: String,
    pub schema_version: String,
    pub occurred_at: String,
    pub actor: Actor,
    pub command_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub prev_hash: String,
    pub data: Value,
}

/// The command-level facts copied into every event of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandMeta {
    pub command_id: String,
    pub actor: Actor,
    pub correlation_id: String,
    pub causation_id: String,
    /// Hex SHA-256 of the command body as received.
    pub command_hash: String,
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A commit ready to publish: the message body and the new chain head.
pub struct EncodedCommit {
    pub body: Vec<u8>,
    pub records: Vec<EventRecord>,
    pub hashes: Vec<Hash>,
}

impl EncodedCommit {
    pub fn head(&self) -> Option<&Hash> {
        self.hashes.last()
    }
}

/// Encodes records into a commit body, chaining each from `prev`.
/// `records[i].prev_hash` is filled in here.
pub fn encode_commit(
    mut records: Vec<EventRecord>,
    mut prev: Hash,
) -> Result<EncodedCommit, serde_json::Error> {
    let mut body = Vec::with_capacity(512 * records.len());
    let mut hashes = Vec::with_capacity(records.len());
    for r in &mut records {
        r.prev_hash = chain::to_hex(&prev);
        let line = serde_json::to_vec(r)?;
        prev = chain::event_hash(&prev, &line);
        hashes.push(prev);
        body.extend_from_slice(&line);
        body.push(b'\n');
    }
    Ok(EncodedCommit {
        body,
        records,
        hashes,
    })
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommitFormatError {
    #[error("commit body is empty")]
    Empty,
    #[error("commit body does not end with a newline")]
    NoTrailingNewline,
    #[error("event {index} of the commit is not a valid envelope: {message}")]
    BadEnvelope { index: usize, message: String },
}

/// Splits a commit body into `(line bytes, record)` pairs.
pub fn decode_commit(body: &[u8]) -> Result<Vec<(&[u8], EventRecord)>, CommitFormatError> {
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
            serde_json::from_slice::<EventRecord>(line)
                .map(|r| (line, r))
                .map_err(|e| CommitFormatError::BadEnvelope {
                    index,
                    message: e.to_string(),
                })
        })
        .collect()
}

/// The `data` of a `#[serde(tag = "type", content = "data")]` event enum.
pub fn split_event<E: Serialize>(event: &E) -> Result<(String, Value), serde_json::Error> {
    let v = serde_json::to_value(event)?;
    let Value::Object(mut m) = v else {
        return Err(serde::ser::Error::custom(
            "event did not serialize to an object",
        ));
    };
    let t = match m.remove("type") {
        Some(Value::String(s)) => s,
        _ => return Err(serde::ser::Error::custom("event has no type tag")),
    };
    Ok((t, m.remove("data").unwrap_or(Value::Null)))
}

/// The inverse of [`split_event`].
pub fn join_event<E: serde::de::DeserializeOwned>(
    event_type: &str,
    data: Value,
) -> Result<E, serde_json::Error> {
    serde_json::from_value(serde_json::json!({ "type": event_type, "data": data }))
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
            prev_hash: String::new(),
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn commit_round_trips_and_chains() {
        let c = encode_commit(vec![record(1), record(2)], chain::GENESIS).unwrap();
        let decoded = decode_commit(&c.body).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].1.prev_hash, chain::to_hex(&chain::GENESIS));
        assert_eq!(decoded[1].1.prev_hash, chain::to_hex(&c.hashes[0]));
        assert_eq!(chain::event_hash(&c.hashes[0], decoded[1].0), c.hashes[1]);
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
