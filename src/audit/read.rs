//! Reading the stream in order, with filters.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::events::chain::{self, Leaf};
use crate::events::envelope::{self, EventRecord};
use crate::events::log::{EventLog, LogError, EVENT_SUBJECT_PREFIX};

/// One stream message as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawMessage {
    /// The stream sequence.
    pub seq: u64,
    /// `flow.ev.<aggregate_type>.<aggregate_id>`.
    pub subject: String,
    /// When JetStream stored the message.
    pub time: DateTime<Utc>,
    /// The NATS headers, several values of one name joined by `,`.
    pub headers: BTreeMap<String, String>,
    /// The exact stored body (a commit: JSON lines, UTF-8).
    pub body: String,
}

impl RawMessage {
    /// The message as a stream-digest leaf: its sequence and the SHA-256 of
    /// its subject and of its body.
    pub fn leaf(&self) -> Leaf {
        Leaf::of(self.seq, &self.subject, self.body.as_bytes())
    }
}

/// Which events an auditor asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Filter {
    /// Only messages of this aggregate type (`--aggregate TYPE`).
    pub aggregate_type: Option<String>,
    /// Only this aggregate of `aggregate_type` (`--aggregate TYPE:ID`).
    pub aggregate_id: Option<String>,
    /// Only events of this `event_type` (`--type`).
    pub event_type: Option<String>,
    /// Only events that occurred at or after this time (`--since`; the
    /// events' `occurred_at`, which the chain covers, not JetStream's time).
    pub since: Option<DateTime<Utc>>,
    /// Only events that occurred at or before this time (`--until`).
    pub until: Option<DateTime<Utc>>,
    /// First stream sequence to read (`--from-seq`; default 1).
    pub from_seq: Option<u64>,
    /// Last stream sequence to read (`--to-seq`; default the stream's end).
    pub to_seq: Option<u64>,
}

/// A filter the auditor must correct (a usage error, exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// `--aggregate` is not `TYPE` or `TYPE:ID` of subject tokens.
    #[error("--aggregate {0:?}: expected TYPE or TYPE:ID, e.g. job or job:0193...")]
    Aggregate(String),
    /// The sequence range is empty.
    #[error("--from-seq {from} is after --to-seq {to}")]
    SeqRange {
        /// The `--from-seq` given.
        from: u64,
        /// The `--to-seq` given.
        to: u64,
    },
    /// The time range is empty.
    #[error("--since {since} is after --until {until}")]
    TimeRange {
        /// The `--since` given, RFC 3339.
        since: String,
        /// The `--until` given, RFC 3339.
        until: String,
    },
}

impl Filter {
    /// Parses `TYPE` or `TYPE:ID`.
    pub fn set_aggregate(&mut self, spec: &str) -> Result<(), FilterError> {
        let (t, id) = match spec.split_once(':') {
            Some((t, id)) => (t, Some(id)),
            None => (spec, None),
        };
        let token_ok = |s: &str| crate::events::log::valid_aggregate_id(s);
        if !token_ok(t) || id.is_some_and(|i| !token_ok(i)) {
            return Err(FilterError::Aggregate(spec.to_string()));
        }
        self.aggregate_type = Some(t.to_string());
        self.aggregate_id = id.map(str::to_string);
        Ok(())
    }

    /// Refuses an empty sequence or time range.
    pub fn check(&self) -> Result<(), FilterError> {
        if let (Some(from), Some(to)) = (self.from_seq, self.to_seq) {
            if from > to {
                return Err(FilterError::SeqRange { from, to });
            }
        }
        if let (Some(s), Some(u)) = (self.since, self.until) {
            if s > u {
                return Err(FilterError::TimeRange {
                    since: s.to_rfc3339(),
                    until: u.to_rfc3339(),
                });
            }
        }
        Ok(())
    }

    /// The subject filter that reads the filter's aggregates
    /// (`flow.ev.>` when it names none).
    pub fn subject(&self) -> String {
        match (&self.aggregate_type, &self.aggregate_id) {
            (Some(t), Some(id)) => format!("{EVENT_SUBJECT_PREFIX}.{t}.{id}"),
            (Some(t), None) => format!("{EVENT_SUBJECT_PREFIX}.{t}.*"),
            _ => format!("{EVENT_SUBJECT_PREFIX}.>"),
        }
    }

    /// Whether a message passes the aggregate filter.
    pub fn message_matches(&self, m: &RawMessage) -> bool {
        let subject_ok = match (&self.aggregate_type, &self.aggregate_id) {
            (Some(t), Some(id)) => m.subject == format!("{EVENT_SUBJECT_PREFIX}.{t}.{id}"),
            (Some(t), None) => m
                .subject
                .strip_prefix(&format!("{EVENT_SUBJECT_PREFIX}.{t}."))
                .is_some(),
            _ => true,
        };
        subject_ok
    }

    /// Whether an event of a matching message passes the event-type and
    /// time filters (an `occurred_at` that does not parse matches no time
    /// filter).
    pub fn event_matches(&self, r: &EventRecord) -> bool {
        if self.event_type.as_ref().is_some_and(|t| *t != r.event_type) {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(at) = DateTime::parse_from_rfc3339(&r.occurred_at) else {
            return false;
        };
        let at = at.with_timezone(&Utc);
        self.since.is_none_or(|s| at >= s) && self.until.is_none_or(|u| at <= u)
    }
}

/// Calls `f` for each message on `subject_filter` with sequence in
/// `[from, to]`, in stream order. `to` defaults to the last sequence at the
/// time of the call, so the read ends even while writers keep appending.
pub async fn for_each_message<E: From<LogError>>(
    log: &EventLog,
    subject_filter: &str,
    from: u64,
    to: Option<u64>,
    mut f: impl FnMut(RawMessage) -> Result<(), E>,
) -> Result<u64, E> {
    let last = log.last_seq().await?;
    let to = to.map_or(last, |t| t.min(last));
    let from = from.max(1);
    if from > to {
        return Ok(to);
    }
    // Nothing matching in range: do not start a consumer that would wait.
    match log.next_for_subject(subject_filter, from).await? {
        Some(m) if m.sequence <= to => {}
        _ => return Ok(to),
    }
    let unavailable = |e: &dyn std::fmt::Display| LogError::Unavailable(format!("replay: {e}"));
    let consumer = log.ordered_consumer(subject_filter, from).await?;
    let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| unavailable(&e))?;
        let (seq, pending, time) = {
            let info = m.info().map_err(|e| unavailable(&e))?;
            (info.stream_sequence, info.pending, info.published)
        };
        if seq > to {
            break;
        }
        let headers = m
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        let v = v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",");
                        (k.to_string(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body = String::from_utf8(m.payload.to_vec()).map_err(|_| {
            LogError::Unavailable(format!(
                "message {seq} is not UTF-8: not a flowledger commit"
            ))
        })?;
        f(RawMessage {
            seq,
            subject: m.subject.to_string(),
            time,
            headers,
            body,
        })?;
        if seq >= to || pending == 0 {
            break;
        }
    }
    Ok(to)
}

/// One replayed event: the envelope plus where it sits in the stream.
#[derive(Debug, Serialize)]
pub struct ReplayedEvent<'a> {
    /// The stream sequence of the message (commit) holding the event.
    pub stream_seq: u64,
    /// That message's subject.
    pub subject: &'a str,
    /// When JetStream stored it (RFC 3339 UTC, microseconds).
    pub stream_time: String,
    /// The event's chain hash, hex (docs/EVENTS.md, "Event chain").
    pub hash: String,
    /// The event belongs to an erased memory subject: every sealed value
    /// in `data` is shown as `{"erased": true}` (the stored bytes, which
    /// the hash covers, keep the ciphertext nobody can open any more).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub erased: bool,
    /// The stored envelope, flattened into the line.
    #[serde(flatten)]
    pub record: &'a EventRecord,
}

/// Decodes a message's events with their hashes.
pub fn events_of(m: &RawMessage) -> Result<Vec<(EventRecord, chain::Hash)>, String> {
    let lines = envelope::decode_commit(m.body.as_bytes()).map_err(|e| e.to_string())?;
    lines
        .into_iter()
        .map(|(line, r)| {
            let prev = chain::from_hex(&r.prev_hash)
                .ok_or_else(|| format!("prev_hash {:?} is not 64 hex digits", r.prev_hash))?;
            Ok((r, chain::event_hash(&prev, line)))
        })
        .collect()
}

/// The memory subjects (aggregate ids) erased anywhere in the log: a
/// pass over the `memory` subjects only.
pub async fn erased_memory_subjects(log: &EventLog) -> Result<HashSet<String>, LogError> {
    let mut erased = HashSet::new();
    let subjects = format!("{EVENT_SUBJECT_PREFIX}.memory.*");
    for_each_message::<LogError>(log, &subjects, 1, None, |m| {
        // erasure is final: its event is the last of its subject's
        if m.body.contains("MemorySubjectErased") {
            if let Ok(events) = events_of(&m) {
                for (r, _) in events {
                    if r.event_type == "MemorySubjectErased" {
                        erased.insert(r.aggregate_id);
                    }
                }
            }
        }
        Ok(())
    })
    .await?;
    Ok(erased)
}

/// Replaces every sealed value (`{key_id, nonce, ciphertext}`) in `v` by
/// `{"erased": true}`.
fn show_erased(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            let sealed = o.len() == 3
                && ["key_id", "nonce", "ciphertext"]
                    .iter()
                    .all(|k| o.get(*k).is_some_and(serde_json::Value::is_string));
            if sealed {
                *v = serde_json::json!({"erased": true});
            } else {
                o.values_mut().for_each(show_erased);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(show_erased),
        _ => {}
    }
}

/// The replay's output could not be written (the caller tells a reader
/// that went away, `| head`, from a real failure by [`OutputError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Writing failed.
    #[error("cannot write the output: {0}")]
    Io(#[source] std::io::Error),
    /// Serialising to the output failed (serde_json's error hides its io
    /// error from `source`).
    #[error("cannot write the output: {0}")]
    Json(#[source] serde_json::Error),
}

impl OutputError {
    /// The io error's kind, if it was one.
    pub fn kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            OutputError::Io(e) => Some(e.kind()),
            OutputError::Json(e) => e.io_error_kind(),
        }
    }
}

/// Writes the filtered events as JSON lines; returns how many. Events of
/// an erased memory subject show their sealed fields as erased.
pub async fn replay(
    log: &EventLog,
    filter: &Filter,
    out: &mut impl std::io::Write,
) -> anyhow::Result<u64> {
    let erased = erased_memory_subjects(log).await?;
    let mut n = 0u64;
    let mut write_err: Option<anyhow::Error> = None;
    for_each_message::<LogError>(
        log,
        &filter.subject(),
        filter.from_seq.unwrap_or(1),
        filter.to_seq,
        |m| {
            if write_err.is_some() || !filter.message_matches(&m) {
                return Ok(());
            }
            match events_of(&m) {
                Ok(events) => {
                    for (record, hash) in events.iter().filter(|(r, _)| filter.event_matches(r)) {
                        let is_erased = record.aggregate_type == "memory"
                            && erased.contains(&record.aggregate_id);
                        let shown;
                        let record = if is_erased {
                            let mut r = record.clone();
                            show_erased(&mut r.data);
                            shown = r;
                            &shown
                        } else {
                            record
                        };
                        let line = ReplayedEvent {
                            stream_seq: m.seq,
                            subject: &m.subject,
                            stream_time: envelope::format_time(m.time),
                            hash: chain::to_hex(hash),
                            erased: is_erased,
                            record,
                        };
                        let res = serde_json::to_writer(&mut *out, &line)
                            .map_err(OutputError::Json)
                            .and_then(|_| out.write_all(b"\n").map_err(OutputError::Io))
                            .map_err(anyhow::Error::from);
                        if let Err(e) = res {
                            write_err = Some(e);
                            return Ok(());
                        }
                        n += 1;
                    }
                }
                Err(e) => {
                    write_err = Some(anyhow::anyhow!(
                        "message at stream sequence {} is not a valid commit: {e}",
                        m.seq
                    ))
                }
            }
            Ok(())
        },
    )
    .await?;
    match write_err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}
