//! `audit export`: a self-contained directory an auditor verifies offline.
//!
//! * `manifest.json`: range, start and end digest, filter.
//! * `index.jsonl`: every message of the range as a leaf (seq, hashes),
//!   so the stream digest can be recomputed even for a filtered export.
//! * `messages.jsonl`: the selected messages, bodies byte-exact.
//! * `checkpoints.jsonl`: signed checkpoints inside the range.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::audit::checkpoint::{self, CheckpointKey, Digest};
use crate::audit::read::{events_of, for_each_message, Filter};
use crate::events::chain::{self, Leaf, GENESIS};
use crate::events::envelope;
use crate::events::log::{EventLog, LogError, EVENT_SUBJECT_PREFIX};

/// The manifest's `format`; verification refuses any other.
pub const EXPORT_FORMAT: &str = "flowledger-export-v1";
/// File name of the [`Manifest`] in an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the index: one [`IndexEntry`] per line.
pub const INDEX_FILE: &str = "index.jsonl";
/// File name of the included messages, one stored message per line.
pub const MESSAGES_FILE: &str = "messages.jsonl";
/// File name of the checkpoints inside the range, one per line.
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";

/// `manifest.json`: what an export covers and the digests that bound it
/// (docs/EVENTS.md section 8).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`EXPORT_FORMAT`] for exports this version writes.
    pub format: String,
    /// The event stream exported (`FLOW_EVENTS`).
    pub stream: String,
    /// First stream sequence of the range (the filter's `from_seq`, at least 1).
    pub from_seq: u64,
    /// Last stream sequence of the range, the last message read.
    pub to_seq: u64,
    /// Stream digest after message `from_seq - 1` (zeros when `from_seq` is 1).
    pub start_digest: String,
    /// Stream digest after message `to_seq`.
    pub end_digest: String,
    /// True when no filter skipped a message of an included aggregate.
    pub chain_complete: bool,
    /// The filter that chose the included messages.
    pub filter: Filter,
    /// When the export was written (RFC 3339 UTC, microseconds).
    pub created_at: String,
    /// Messages from `from_seq` to `to_seq` (lines of `index.jsonl`).
    pub messages_in_range: u64,
    /// Messages the filter kept (lines of `messages.jsonl`).
    pub messages_included: u64,
    /// Events in the included messages that match the filter.
    pub events_included: u64,
}

/// One line of `index.jsonl`: a message of the range as a digest leaf,
/// written also for messages the filter left out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The message's stream sequence.
    pub seq: u64,
    /// SHA-256 of its subject, hex.
    pub subject_sha256: String,
    /// SHA-256 of its exact body, hex.
    pub body_sha256: String,
    /// Whether the message is in `messages.jsonl`.
    pub included: bool,
}

impl IndexEntry {
    /// The leaf the stream digest folds in; none when a hash is not 64 hex
    /// digits.
    pub fn leaf(&self) -> Option<Leaf> {
        Some(Leaf {
            seq: self.seq,
            subject_sha256: chain::from_hex(&self.subject_sha256)?,
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
/// at the end). With a key, a fresh checkpoint is signed first so the export
/// ends on a signed digest.
pub async fn export(
    client: &async_nats::Client,
    log: &EventLog,
    filter: &Filter,
    out: &Path,
    key: Option<&CheckpointKey>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, ExportError> {
    if out.exists() {
        return Err(ExportError::Exists(out.to_owned()));
    }
    if let Some(key) = key {
        checkpoint::write_checkpoint(client, log, key).await?;
    }
    let last = log.last_seq().await?;
    let from = filter.from_seq.unwrap_or(1).max(1);
    let to = filter.to_seq.map_or(last, |t| t.min(last));
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
    let result = write_into(client, log, filter, &tmp, from, to, start, progress).await;
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
    client: &async_nats::Client,
    log: &EventLog,
    filter: &Filter,
    dir: &Path,
    from: u64,
    to: u64,
    start: Digest,
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
                    let mut take = false;
                    if filter.message_matches(&m) {
                        let evs = events_of(&m)
                            .map_err(|reason| ExportError::BadMessage { seq: m.seq, reason })?;
                        let n = evs.iter().filter(|(r, _)| filter.event_matches(r)).count() as u64;
                        if n > 0 {
                            take = true;
                            events += n;
                        }
                    }
                    let entry = IndexEntry {
                        seq: m.seq,
                        subject_sha256: chain::to_hex(&leaf.subject_sha256),
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
    for cp in checkpoint::load_all(client, log.config()).await? {
        if cp.seq >= from && cp.seq <= to {
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
        chain_complete: filter.event_type.is_none()
            && filter.since.is_none()
            && filter.until.is_none(),
        filter: filter.clone(),
        created_at: envelope::format_time(Utc::now()),
        messages_in_range: in_range,
        messages_included: included,
        events_included: events,
    };
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::from)?,
    )?;
    // Make the files durable before the rename publishes the directory.
    for name in [INDEX_FILE, MESSAGES_FILE, CHECKPOINTS_FILE, MANIFEST_FILE] {
        std::fs::File::open(dir.join(name))?.sync_all()?;
    }
    Ok(manifest)
}
