//! Verification of the live stream or of an export (docs/EVENTS.md,
//! "Verifying"). Reports the first broken stream sequence and why.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::Path;

use serde::Serialize;

use crate::audit::checkpoint::{self, Checkpoint, CheckpointKey, Digest};
use crate::audit::export::{
    IndexEntry, Manifest, CHECKPOINTS_FILE, INDEX_FILE, MANIFEST_FILE, MESSAGES_FILE,
};
use crate::audit::read::{for_each_message, RawMessage};
use crate::events::chain::{self, Hash, Leaf, GENESIS};
use crate::events::envelope::{self, HDR_CHAIN_HEAD};
use crate::events::log::{subject_for, EventLog, LogError, EVENT_SUBJECT_PREFIX};

/// Where and why verification failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("verification failed at stream sequence {seq}: {reason}")]
pub struct Broken {
    /// The first stream sequence where history does not hold.
    pub seq: u64,
    /// What is wrong there, for the auditor.
    pub reason: String,
}

fn broken(seq: u64, reason: impl Into<String>) -> Broken {
    Broken {
        seq,
        reason: reason.into(),
    }
}

/// Why verification did not end with a [`Summary`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// History is not intact: the verdict (`audit verify` exits 1).
    #[error(transparent)]
    Broken(#[from] Broken),
    /// The stream or its checkpoints could not be read: no verdict.
    #[error(transparent)]
    Log(#[from] LogError),
    /// An export file is missing or unreadable, or a line is not what the
    /// format says: no verdict on the history.
    #[error("export {path}: {message}")]
    Export {
        /// The export file concerned.
        path: String,
        /// What could not be read, and on which line.
        message: String,
    },
}

/// The JSON summary `audit verify` prints when history is intact.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Always true: a failure is a [`VerifyError`] instead.
    pub ok: bool,
    /// The stream verified (for an export, the manifest's).
    pub stream: String,
    /// First stream sequence verified.
    pub from_seq: u64,
    /// Last stream sequence verified.
    pub to_seq: u64,
    /// Messages (commits) folded into the digest.
    pub messages: u64,
    /// Events whose chain was checked (those of the included messages).
    pub events: u64,
    /// Distinct aggregates (subjects) among those events.
    pub aggregates: usize,
    /// The stream digest at `to_seq`, `SEQ:HEX`.
    pub digest: String,
    /// Checkpoints read: the checkpoint stream's, or the export's
    /// `checkpoints.jsonl`.
    pub checkpoints_present: usize,
    /// Checkpoints whose digest matched the stream (and their MAC, when the
    /// key given has their key id).
    pub checkpoints_verified: usize,
    /// `checked`, or why signatures were not checked (no key given).
    pub signatures: &'static str,
    /// The highest sequence covered by a verified, signed checkpoint.
    pub signed_up_to: Option<u64>,
}

/// The checks shared by live and export verification.
pub struct ChainCheck {
    digest: Digest,
    from: u64,
    heads: HashMap<String, (u64, Hash)>,
    /// Whether every message of every aggregate seen is present (no filter
    /// that skips some of them): then versions must be contiguous.
    complete: bool,
    checkpoints: BTreeMap<u64, Vec<Checkpoint>>,
    checkpoints_present: usize,
    checkpoints_verified: usize,
    signed_up_to: Option<u64>,
    key: Option<CheckpointKey>,
    expect: Option<Digest>,
    expect_seen: bool,
    messages: u64,
    events: u64,
}

impl ChainCheck {
    /// A check that continues from `start` (`D(from-1)`), with the
    /// checkpoints to match on the way, the key to check their MACs and a
    /// digest the auditor kept; `complete`: versions must be contiguous.
    pub fn new(
        start: Digest,
        complete: bool,
        checkpoints: Vec<Checkpoint>,
        key: Option<CheckpointKey>,
        expect: Option<Digest>,
    ) -> Self {
        let checkpoints_present = checkpoints.len();
        let mut by_seq: BTreeMap<u64, Vec<Checkpoint>> = BTreeMap::new();
        for c in checkpoints {
            by_seq.entry(c.seq).or_default().push(c);
        }
        let expect_seen = expect.is_some_and(|e| e == start);
        ChainCheck {
            digest: start,
            from: start.seq + 1,
            heads: HashMap::new(),
            complete,
            checkpoints: by_seq,
            checkpoints_present,
            checkpoints_verified: 0,
            signed_up_to: None,
            key,
            expect,
            expect_seen,
            messages: 0,
            events: 0,
        }
    }

    /// Advances the stream digest by one message.
    pub fn leaf(&mut self, leaf: &Leaf) -> Result<(), Broken> {
        let want = self.digest.seq + 1;
        if leaf.seq > want {
            return Err(broken(
                want,
                format!(
                    "message {want} is missing (the next one present is {})",
                    leaf.seq
                ),
            ));
        }
        if leaf.seq < want {
            return Err(broken(
                leaf.seq,
                format!(
                    "message {} is out of order (it comes after {})",
                    leaf.seq,
                    want - 1
                ),
            ));
        }
        self.digest = Digest {
            seq: leaf.seq,
            digest: chain::digest_step(&self.digest.digest, leaf),
        };
        self.messages += 1;
        if let Some(cps) = self.checkpoints.remove(&leaf.seq) {
            for cp in cps {
                if cp.digest != chain::to_hex(&self.digest.digest) {
                    return Err(broken(
                        leaf.seq,
                        format!(
                            "the stream digest here differs from the checkpoint created {} \
                             (history before this point was changed, removed or reordered)",
                            cp.created_at
                        ),
                    ));
                }
                if let Some(key) = &self.key {
                    if cp.key_id == key.id {
                        if !cp.mac_valid(key) {
                            return Err(broken(
                                leaf.seq,
                                format!(
                                    "checkpoint created {} has an invalid signature",
                                    cp.created_at
                                ),
                            ));
                        }
                        self.signed_up_to = Some(leaf.seq);
                    }
                }
                self.checkpoints_verified += 1;
            }
        }
        if let Some(e) = self.expect {
            if e.seq == leaf.seq {
                if e.digest != self.digest.digest {
                    return Err(broken(
                        leaf.seq,
                        "the digest you kept for this sequence no longer matches: \
                         history up to here was changed",
                    ));
                }
                self.expect_seen = true;
            }
        }
        Ok(())
    }

    /// Checks the per-aggregate chains of one message's events.
    pub fn body(&mut self, m: &RawMessage) -> Result<(), Broken> {
        let seq = m.seq;
        let lines =
            envelope::decode_commit(m.body.as_bytes()).map_err(|e| broken(seq, e.to_string()))?;
        let mut last = None;
        for (line, r) in lines {
            if m.subject != subject_for(&r.aggregate_type, &r.aggregate_id) {
                return Err(broken(
                    seq,
                    format!(
                        "event {} of {}:{} is stored under subject {}",
                        r.event_id, r.aggregate_type, r.aggregate_id, m.subject
                    ),
                ));
            }
            let prev = chain::from_hex(&r.prev_hash)
                .ok_or_else(|| broken(seq, "prev_hash is not 64 hex digits"))?;
            match self.heads.get(&m.subject) {
                Some(&(version, head)) => {
                    let contiguous = r.aggregate_version == version + 1;
                    if contiguous && prev != head {
                        return Err(broken(
                            seq,
                            format!(
                                "event version {} of {} does not chain to version {}",
                                r.aggregate_version, m.subject, version
                            ),
                        ));
                    }
                    if !contiguous && self.complete {
                        return Err(broken(
                            seq,
                            format!(
                                "event version {} of {} follows version {}",
                                r.aggregate_version, m.subject, version
                            ),
                        ));
                    }
                }
                None if self.from == 1
                    && self.complete
                    && (r.aggregate_version != 1 || prev != GENESIS) =>
                {
                    return Err(broken(
                        seq,
                        format!(
                            "first event of {} has version {} and does not start the chain",
                            m.subject, r.aggregate_version
                        ),
                    ));
                }
                None => {}
            }
            let h = chain::event_hash(&prev, line);
            self.heads
                .insert(m.subject.clone(), (r.aggregate_version, h));
            self.events += 1;
            last = Some(h);
        }
        let header = m.headers.get(HDR_CHAIN_HEAD).map(String::as_str);
        if header != last.map(|h| chain::to_hex(&h)).as_deref() {
            return Err(broken(
                seq,
                format!("{HDR_CHAIN_HEAD} header does not match the events (altered)"),
            ));
        }
        Ok(())
    }

    /// Ends the check after the last message: no checkpoint may lie beyond
    /// it, and the kept digest must have been met.
    pub fn finish(self, stream: &str) -> Result<Summary, Broken> {
        if let Some((&seq, cps)) = self.checkpoints.iter().find(|(s, _)| **s > self.digest.seq) {
            return Err(broken(
                seq,
                format!(
                    "a checkpoint created {} covers sequence {seq}, \
                     but history ends at {} (truncated)",
                    cps[0].created_at, self.digest.seq
                ),
            ));
        }
        if let Some(e) = self.expect {
            if !self.expect_seen {
                return Err(broken(
                    e.seq,
                    format!(
                        "the digest you kept is for sequence {}, \
                         outside the verified range {}..={}",
                        e.seq, self.from, self.digest.seq
                    ),
                ));
            }
        }
        Ok(Summary {
            ok: true,
            stream: stream.to_string(),
            from_seq: self.from,
            to_seq: self.digest.seq,
            messages: self.messages,
            events: self.events,
            aggregates: self.heads.len(),
            digest: self.digest.to_string(),
            checkpoints_present: self.checkpoints_present,
            checkpoints_verified: self.checkpoints_verified,
            signatures: if self.key.is_some() {
                "checked"
            } else {
                "not checked: no checkpoint key given"
            },
            signed_up_to: self.signed_up_to,
        })
    }
}

/// Verifies the whole live stream against its checkpoints.
pub async fn verify_live(
    client: &async_nats::Client,
    log: &EventLog,
    key: Option<CheckpointKey>,
    expect: Option<Digest>,
) -> Result<Summary, VerifyError> {
    let checkpoints = checkpoint::load_all(client, log.config()).await?;
    let mut check = ChainCheck::new(
        Digest {
            seq: 0,
            digest: GENESIS,
        },
        true,
        checkpoints,
        key,
        expect,
    );
    let mut failure: Option<Broken> = None;
    for_each_message::<LogError>(log, &format!("{EVENT_SUBJECT_PREFIX}.>"), 1, None, |m| {
        if failure.is_none() {
            if let Err(b) = check.leaf(&m.leaf()).and_then(|_| check.body(&m)) {
                failure = Some(b);
            }
        }
        Ok(())
    })
    .await?;
    if let Some(b) = failure {
        return Err(b.into());
    }
    Ok(check.finish(&log.config().stream)?)
}

fn export_err(path: &Path, message: impl Into<String>) -> VerifyError {
    VerifyError::Export {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn open_lines(
    dir: &Path,
    name: &str,
) -> Result<std::io::Lines<std::io::BufReader<std::fs::File>>, VerifyError> {
    let p = dir.join(name);
    let f = std::fs::File::open(&p).map_err(|e| export_err(&p, format!("cannot open: {e}")))?;
    Ok(std::io::BufReader::new(f).lines())
}

/// Verifies an export directory offline: no server is consulted.
pub fn verify_export(
    dir: &Path,
    key: Option<CheckpointKey>,
    expect: Option<Digest>,
) -> Result<Summary, VerifyError> {
    let mp = dir.join(MANIFEST_FILE);
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(&mp).map_err(|e| export_err(&mp, format!("cannot read: {e}")))?,
    )
    .map_err(|e| export_err(&mp, format!("not a flowledger export manifest: {e}")))?;
    if manifest.format != crate::audit::export::EXPORT_FORMAT {
        return Err(export_err(
            &mp,
            format!("unknown format {:?}", manifest.format),
        ));
    }
    let start_digest = chain::from_hex(&manifest.start_digest)
        .ok_or_else(|| export_err(&mp, "start_digest is not 64 hex digits"))?;
    let mut checkpoints = Vec::new();
    for (i, line) in open_lines(dir, CHECKPOINTS_FILE)?.enumerate() {
        let line = line.map_err(|e| export_err(&dir.join(CHECKPOINTS_FILE), e.to_string()))?;
        let cp: Checkpoint = serde_json::from_str(&line)
            .map_err(|e| export_err(&dir.join(CHECKPOINTS_FILE), format!("line {}: {e}", i + 1)))?;
        checkpoints.push(cp);
    }
    let start = Digest {
        seq: manifest.from_seq.saturating_sub(1),
        digest: start_digest,
    };
    let mut check = ChainCheck::new(start, manifest.chain_complete, checkpoints, key, expect);
    let mut messages = open_lines(dir, MESSAGES_FILE)?.enumerate().peekable();
    let parse_message =
        |i: usize, line: std::io::Result<String>| -> Result<RawMessage, VerifyError> {
            let p = dir.join(MESSAGES_FILE);
            let line = line.map_err(|e| export_err(&p, e.to_string()))?;
            serde_json::from_str(&line).map_err(|e| export_err(&p, format!("line {}: {e}", i + 1)))
        };
    for (i, line) in open_lines(dir, INDEX_FILE)?.enumerate() {
        let ip = dir.join(INDEX_FILE);
        let line = line.map_err(|e| export_err(&ip, e.to_string()))?;
        let entry: IndexEntry = serde_json::from_str(&line)
            .map_err(|e| export_err(&ip, format!("line {}: {e}", i + 1)))?;
        let leaf = entry.leaf().ok_or_else(|| {
            export_err(&ip, format!("line {}: hashes must be 64 hex digits", i + 1))
        })?;
        check.leaf(&leaf)?;
        if entry.included {
            let Some((mi, mline)) = messages.next() else {
                return Err(broken(entry.seq, "message was removed from the export").into());
            };
            let m = parse_message(mi, mline)?;
            if m.seq != entry.seq {
                return Err(broken(
                    entry.seq,
                    format!(
                        "message is missing or out of order in the export (found {} in its place)",
                        m.seq
                    ),
                )
                .into());
            }
            if m.leaf() != leaf {
                return Err(
                    broken(entry.seq, "message differs from the stream index (altered)").into(),
                );
            }
            check.body(&m)?;
        }
    }
    if let Some((mi, mline)) = messages.next() {
        let m = parse_message(mi, mline)?;
        return Err(broken(
            m.seq,
            "message is in the export but not in its index (inserted or out of order)",
        )
        .into());
    }
    let summary = check.finish(&manifest.stream)?;
    if summary.to_seq != manifest.to_seq
        || summary.digest != format!("{}:{}", manifest.to_seq, manifest.end_digest)
    {
        return Err(broken(
            summary.to_seq,
            format!(
                "the export ends at {} but its manifest says \
                 it ends at {} with digest {} (truncated or altered)",
                summary.digest, manifest.to_seq, manifest.end_digest
            ),
        )
        .into());
    }
    Ok(summary)
}
