//! `audit export`: a self-contained directory an auditor verifies offline
//! (docs/EVENTS.md section 8).
//!
//! * `manifest.json`: range, start and end digest, filter, counts.
//! * `manifest.sig`: the manifest signed with the checkpoint key (when the
//!   exporter has it).
//! * `index.jsonl`: every message of the range as a leaf (seq, subject,
//!   body hash, included), so the stream digest can be recomputed and the
//!   selection checked even for a filtered export.
//! * `messages.jsonl`: the selected messages, bodies byte-exact.
//! * `checkpoints.jsonl`: stored checkpoints inside the range; the export
//!   ends at one.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::audit::checkpoint::{self, CheckpointKey, Digest};
use crate::audit::read::{for_each_message, Filter};
use crate::events::chain::{self, Leaf, GENESIS};
use crate::events::envelope;
use crate::events::log::{EventLog, LogError, EVENT_SUBJECT_PREFIX};

/// The manifest's `format`; verification refuses any other.
pub const EXPORT_FORMAT: &str = "flowledger-export-v2";
/// File name of the [`Manifest`] in an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the manifest's signature ([`ManifestSignature`]).
pub const MANIFEST_SIG_FILE: &str = "manifest.sig";
/// File name of the index: one [`IndexEntry`] per line.
pub const INDEX_FILE: &str = "index.jsonl";
/// File name of the included messages, one stored message per line.
pub const MESSAGES_FILE: &str = "messages.jsonl";
/// File name of the checkpoints inside the range, one per line.
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
/// What precedes the manifest's bytes in the signed message.
pub const MANIFEST_SIGNING_PREFIX: &[u8] = b"flowledger-export-manifest-v2\n";

/// What an export selects: whole messages by aggregate and by sequence
/// range, both of which a verifier checks from the index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFilter {
    /// Only messages of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this aggregate of `aggregate_type`.
    pub aggregate_id: Option<String>,
    /// First stream sequence asked for (default 1).
    pub from_seq: Option<u64>,
    /// Last stream sequence asked for (default: the stream's end).
    pub to_seq: Option<u64>,
}

impl ExportFilter {
    /// Whether the filter selects a message on `subject` (docs/EVENTS.md
    /// section 8).
    pub fn selects(&self, subject: &str) -> bool {
        match (&self.aggregate_type, &self.aggregate_id) {
            (None, _) => true,
            (Some(t), None) => subject
                .strip_prefix(EVENT_SUBJECT_PREFIX)
                .and_then(|r| r.strip_prefix('.'))
                .and_then(|r| r.strip_prefix(t.as_str()))
                .is_some_and(|r| r.starts_with('.')),
            (Some(t), Some(id)) => subject == format!("{EVENT_SUBJECT_PREFIX}.{t}.{id}"),
        }
    }

    /// The export filter of an auditor's filter; `None` when it also
    /// selects by event type or time, which a verifier could not check.
    pub fn of(f: &Filter) -> Option<Self> {
        if f.event_type.is_some() || f.since.is_some() || f.until.is_some() {
            return None;
        }
        Some(ExportFilter {
            aggregate_type: f.aggregate_type.clone(),
            aggregate_id: f.aggregate_id.clone(),
            from_seq: f.from_seq,
            to_seq: f.to_seq,
        })
    }
}

/// `manifest.json`: what an export covers and the digests that bound it
/// (docs/EVENTS.md section 8). Every claim is recomputed by verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`EXPORT_FORMAT`] for exports this version writes.
    pub format: String,
    /// The event stream exported (`FLOW_EVENTS`).
    pub stream: String,
    /// First stream sequence of the range (the filter's `from_seq`, at least 1).
    pub from_seq: u64,
    /// Last stream sequence of the range: a signed checkpoint's, when one
    /// could be signed or found.
    pub to_seq: u64,
    /// Stream digest after message `from_seq - 1` (zeros when `from_seq` is 1).
    pub start_digest: String,
    /// Stream digest after message `to_seq`.
    pub end_digest: String,
    /// The selection asked for.
    pub filter: ExportFilter,
    /// When the export was written (RFC 3339 UTC, microseconds).
    pub created_at: String,
    /// Messages from `from_seq` to `to_seq` (lines of `index.jsonl`).
    pub messages_in_range: u64,
    /// Messages the filter selected (lines of `messages.jsonl`).
    pub messages_included: u64,
    /// Events in the included messages.
    pub events_included: u64,
}

/// `manifest.sig`: the Ed25519 signature of [`MANIFEST_SIGNING_PREFIX`]
/// followed by the exact bytes of `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// The checkpoint key that signed.
    pub key_id: String,
    /// 128 hex digits.
    pub signature: String,
}

/// The bytes a manifest signature covers.
pub fn manifest_signing_input(manifest_bytes: &[u8]) -> Vec<u8> {
    let mut m = MANIFEST_SIGNING_PREFIX.to_vec();
    m.extend_from_slice(manifest_bytes);
    m
}

/// One line of `index.jsonl`: a message of the range as a digest leaf,
/// written also for messages the filter left out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// The message's stream sequence.
    pub seq: u64,
    /// Its subject (`flow.ev.<aggregate_type>.<aggregate_id>`).
    pub subject: String,
    /// SHA-256 of its exact body, hex.
    pub body_sha256: String,
    /// Whether the message is in `messages.jsonl`: exactly when the
    /// filter selects its subject.
    pub included: bool,
}

impl IndexEntry {
    /// The leaf the stream digest folds in; none when the body hash is not
    /// 64 hex digits.
    pub fn leaf(&self) -> Option<Leaf> {
        Some(Leaf {
            seq: self.seq,
            subject_sha256: chain::sha256(self.subject.as_bytes()),
            body_sha256: chain::from_hex(&self.body_sha256)?,
        })
    }
}

/// Why an export was not written; nothing is left at `--out`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The `--out` path exists: choose a new one.
    #[error("{0} already exists; choose a new --out directory (exports are never overwritten)")]
    Exists(PathBuf),
    /// Creating, writing or renaming a file failed.
    #[error("writing the export failed: {0}")]
    Io(#[from] std::io::Error),
    /// Reading the stream or the checkpoints failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The filter selects by event type or time, which a verifier could
    /// not check from an export; use `audit replay` for such selections.
    #[error("an export selects by aggregate and sequence range only (a verifier checks both); --type, --since and --until select events for `audit replay`")]
    UncheckableFilter,
    /// A stored message could not be split into events.
    #[error("message at stream sequence {seq} is not a valid commit: {reason}")]
    BadMessage {
        /// The message's stream sequence.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// Writes the export into `out` (atomically: a temporary directory renamed
/// at the end). The end is pinned to a signature: with a key, a checkpoint
/// is signed at exactly the export's last sequence (the stream's end now,
/// or the filter's `to_seq`) and the manifest is signed; without one, the
/// export ends at the newest stored checkpoint at or before that end (at
/// the end itself when there is none: then nothing signs it).
pub async fn export(
    client: &async_nats::Client,
    log: &EventLog,
    filter: &Filter,
    out: &Path,
    key: Option<&CheckpointKey>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, ExportError> {
    let filter = ExportFilter::of(filter).ok_or(ExportError::UncheckableFilter)?;
    if out.exists() {
        return Err(ExportError::Exists(out.to_owned()));
    }
    let last = log.last_seq().await?;
    let from = filter.from_seq.unwrap_or(1).max(1);
    let wanted = filter.to_seq.map_or(last, |t| t.min(last));
    let signed = match key {
        Some(key) if wanted >= from => checkpoint::checkpoint_at(client, log, key, Some(wanted))
            .await?
            .map(|(cp, _)| cp.seq),
        _ => None,
    };
    // read once: they pin the end (without a key) and fill checkpoints.jsonl
    let stored: Vec<checkpoint::Checkpoint> = checkpoint::load_all(client, log.config())
        .await?
        .into_iter()
        .filter(|c| c.stream == log.config().stream && c.seq >= from && c.seq <= wanted)
        .collect();
    let to = match (key, signed) {
        (_, Some(seq)) => seq,
        (Some(_), None) => wanted,
        (None, _) => stored.iter().map(|c| c.seq).max().unwrap_or(wanted),
    };
    let start = if from > 1 {
        checkpoint::stream_digest(log, None, Some(from - 1)).await?
    } else {
        Digest {
            seq: 0,
            digest: GENESIS,
        }
    };
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("export"),
        uuid::Uuid::now_v7()
    ));
    std::fs::create_dir(&tmp)?;
    let result = write_into(
        log,
        &filter,
        &tmp,
        (from, to),
        start,
        &stored,
        key,
        progress,
    )
    .await;
    match result {
        Ok(manifest) => {
            std::fs::rename(&tmp, out)?;
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_into(
    log: &EventLog,
    filter: &ExportFilter,
    dir: &Path,
    (from, to): (u64, u64),
    start: Digest,
    stored: &[checkpoint::Checkpoint],
    key: Option<&CheckpointKey>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, ExportError> {
    let create = |name: &str| -> std::io::Result<std::io::BufWriter<std::fs::File>> {
        Ok(std::io::BufWriter::new(std::fs::File::create(
            dir.join(name),
        )?))
    };
    let mut index = create(INDEX_FILE)?;
    let mut messages = create(MESSAGES_FILE)?;
    let mut digest = start;
    let (mut in_range, mut included, mut events) = (0u64, 0u64, 0u64);
    let mut failure: Option<ExportError> = None;
    if from <= to {
        for_each_message::<LogError>(
            log,
            &format!("{EVENT_SUBJECT_PREFIX}.>"),
            from,
            Some(to),
            |m| {
                if failure.is_some() {
                    return Ok(());
                }
                let mut step = || -> Result<(), ExportError> {
                    let leaf = m.leaf();
                    digest = Digest {
                        seq: m.seq,
                        digest: chain::digest_step(&digest.digest, &leaf),
                    };
                    in_range += 1;
                    let take = filter.selects(&m.subject);
                    if take {
                        let n = envelope::decode_commit(m.body.as_bytes())
                            .map_err(|e| ExportError::BadMessage {
                                seq: m.seq,
                                reason: e.to_string(),
                            })?
                            .len() as u64;
                        events += n;
                    }
                    let entry = IndexEntry {
                        seq: m.seq,
                        subject: m.subject.clone(),
                        body_sha256: chain::to_hex(&leaf.body_sha256),
                        included: take,
                    };
                    serde_json::to_writer(&mut index, &entry).map_err(std::io::Error::from)?;
                    index.write_all(b"\n")?;
                    if take {
                        included += 1;
                        serde_json::to_writer(&mut messages, &m).map_err(std::io::Error::from)?;
                        messages.write_all(b"\n")?;
                    }
                    if in_range % 10_000 == 0 {
                        progress(m.seq, to);
                    }
                    Ok(())
                };
                if let Err(e) = step() {
                    failure = Some(e);
                }
                Ok(())
            },
        )
        .await?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    progress(digest.seq, to);
    index.flush()?;
    messages.flush()?;
    let mut cps = create(CHECKPOINTS_FILE)?;
    for cp in stored {
        if cp.seq <= digest.seq {
            serde_json::to_writer(&mut cps, &cp).map_err(std::io::Error::from)?;
            cps.write_all(b"\n")?;
        }
    }
    cps.flush()?;
    let manifest = Manifest {
        format: EXPORT_FORMAT.into(),
        stream: log.config().stream.clone(),
        from_seq: from,
        to_seq: digest.seq,
        start_digest: chain::to_hex(&start.digest),
        end_digest: chain::to_hex(&digest.digest),
        filter: filter.clone(),
        created_at: envelope::format_time(Utc::now()),
        messages_in_range: in_range,
        messages_included: included,
        events_included: events,
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::from)?;
    std::fs::write(dir.join(MANIFEST_FILE), &manifest_bytes)?;
    let mut files = vec![INDEX_FILE, MESSAGES_FILE, CHECKPOINTS_FILE, MANIFEST_FILE];
    if let Some(key) = key {
        let sig = ManifestSignature {
            key_id: key.id.clone(),
            signature: key.sign_hex(&manifest_signing_input(&manifest_bytes)),
        };
        std::fs::write(
            dir.join(MANIFEST_SIG_FILE),
            serde_json::to_vec(&sig).map_err(std::io::Error::from)?,
        )?;
        files.push(MANIFEST_SIG_FILE);
    }
    // Make the files durable before the rename publishes the directory.
    for name in files {
        std::fs::File::open(dir.join(name))?.sync_all()?;
    }
    Ok(manifest)
}
