//! Signed checkpoints: `(stream, seq, D_seq)` with HMAC-SHA256
//! (docs/EVENTS.md, "Checkpoints"; docs/adr/0003 says why HMAC).

use std::fmt;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::audit::read::for_each_message;
use crate::events::chain::{self, Hash, GENESIS};
use crate::events::envelope;
use crate::events::log::{EventLog, LogConfig, LogError, CHECKPOINT_SUBJECT, EVENT_SUBJECT_PREFIX};

/// The `format` of the checkpoints this version writes.
pub const CHECKPOINT_FORMAT: &str = "flowledger-checkpoint-v1";

/// The HMAC key. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct CheckpointKey {
    /// The key's name (`FLOWLEDGER_CHECKPOINT_KEY_ID`), written as a
    /// checkpoint's `key_id` so a verifier knows which key signed it.
    pub id: String,
    secret: Vec<u8>,
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CheckpointKey {{ id: {:?}, secret: <redacted> }}",
            self.id
        )
    }
}

/// Why a configured checkpoint key was refused; the operator fixes the
/// setting (a usage error).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    /// The secret is not hex digits.
    #[error("checkpoint key must be hex (64 or more hex digits = 32 or more bytes); generate one with `openssl rand -hex 32`")]
    NotHex,
    /// The secret decodes to this many bytes, fewer than 32.
    #[error("checkpoint key is {0} bytes; it must be at least 32 bytes (64 hex digits)")]
    TooShort(usize),
    /// The key id is empty, longer than 64 or has other characters.
    #[error("checkpoint key id must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadId,
}

impl CheckpointKey {
    /// The key named `id` with the secret `hex_secret` (hex, at least 32
    /// bytes; surrounding whitespace ignored).
    pub fn from_hex(id: &str, hex_secret: &str) -> Result<Self, KeyError> {
        let secret = hex::decode(hex_secret.trim()).map_err(|_| KeyError::NotHex)?;
        if secret.len() < 32 {
            return Err(KeyError::TooShort(secret.len()));
        }
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(KeyError::BadId);
        }
        Ok(CheckpointKey {
            id: id.to_string(),
            secret,
        })
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret)
            .expect("HMAC-SHA256 accepts keys of any length")
    }
}

/// A signed statement: "after message `seq`, the stream digest was `digest`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The format name, covered by the MAC: [`CHECKPOINT_FORMAT`] when
    /// written by this version.
    pub format: String,
    /// The event stream the digest is of (`FLOW_EVENTS`).
    pub stream: String,
    /// The stream sequence of the last message the digest covers.
    pub seq: u64,
    /// The stream digest `D_seq`, 64 hex digits (docs/EVENTS.md section 4).
    pub digest: String,
    /// When it was signed (RFC 3339 UTC, microseconds).
    pub created_at: String,
    /// The [`CheckpointKey::id`] of the key that signed it.
    pub key_id: String,
    /// HMAC-SHA256 over [`Checkpoint::signing_input`], 64 hex digits.
    pub mac: String,
}

impl Checkpoint {
    /// The exact bytes the MAC covers.
    pub fn signing_input(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n",
            self.format, self.stream, self.seq, self.digest, self.created_at, self.key_id
        )
    }

    /// Signs "after message `seq` of `stream`, the digest was `digest`",
    /// dated now.
    pub fn sign(key: &CheckpointKey, stream: &str, seq: u64, digest: &Hash) -> Self {
        let mut cp = Checkpoint {
            format: CHECKPOINT_FORMAT.into(),
            stream: stream.into(),
            seq,
            digest: chain::to_hex(digest),
            created_at: envelope::format_time(Utc::now()),
            key_id: key.id.clone(),
            mac: String::new(),
        };
        let mut mac = key.mac();
        mac.update(cp.signing_input().as_bytes());
        cp.mac = hex::encode(mac.finalize().into_bytes());
        cp
    }

    /// Constant-time check of the MAC.
    pub fn mac_valid(&self, key: &CheckpointKey) -> bool {
        let Ok(tag) = hex::decode(&self.mac) else {
            return false;
        };
        let mut mac = key.mac();
        mac.update(self.signing_input().as_bytes());
        mac.verify_slice(&tag).is_ok()
    }
}

/// `SEQ:HEX`, the digest an auditor keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// The stream sequence of the last message folded in (0: none).
    pub seq: u64,
    /// The stream digest `D_seq` after that message.
    pub digest: Hash,
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, chain::to_hex(&self.digest))
    }
}

impl std::str::FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("digest {s:?} is not SEQ:HEX as printed by `flowledger audit digest`");
        let (seq, hex) = s.trim().split_once(':').ok_or_else(bad)?;
        Ok(Digest {
            seq: seq.parse().map_err(|_| bad())?,
            digest: chain::from_hex(hex).ok_or_else(bad)?,
        })
    }
}

/// Computes the stream digest up to `upto` (default: the last message now),
/// continuing from `start` when given.
pub async fn stream_digest(
    log: &EventLog,
    start: Option<Digest>,
    upto: Option<u64>,
) -> Result<Digest, LogError> {
    let mut d = start.unwrap_or(Digest {
        seq: 0,
        digest: GENESIS,
    });
    let mut gap: Option<(u64, u64)> = None;
    for_each_message::<LogError>(
        log,
        &format!("{EVENT_SUBJECT_PREFIX}.>"),
        d.seq + 1,
        upto,
        |m| {
            if gap.is_none() && m.seq != d.seq + 1 {
                gap = Some((d.seq + 1, m.seq));
            }
            d.digest = chain::digest_step(&d.digest, &m.leaf());
            d.seq = m.seq;
            Ok(())
        },
    )
    .await?;
    if let Some((want, got)) = gap {
        return Err(LogError::Unavailable(format!(
            "stream sequence {want} is missing (next message is {got})"
        )));
    }
    Ok(d)
}

/// Reads every checkpoint stored in the checkpoint stream, in order.
pub async fn load_all(
    client: &async_nats::Client,
    config: &LogConfig,
) -> Result<Vec<Checkpoint>, LogError> {
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream(&config.checkpoint_stream)
        .await
        .map_err(|_| LogError::NoStream(config.checkpoint_stream.clone()))?;
    let mut out = Vec::new();
    let mut seq = 1;
    loop {
        match stream
            .direct_get_next_for_subject(CHECKPOINT_SUBJECT, Some(seq))
            .await
        {
            Ok(m) => {
                seq = m.sequence + 1;
                let cp: Checkpoint = serde_json::from_slice(&m.payload).map_err(|e| {
                    LogError::Unavailable(format!(
                        "checkpoint at {} seq {} is not valid: {e}",
                        config.checkpoint_stream, m.sequence
                    ))
                })?;
                out.push(cp);
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(out),
            Err(e) => return Err(LogError::Unavailable(format!("read checkpoints: {e}"))),
        }
    }
}

/// Signs the digest at the stream's current end and stores the checkpoint.
/// Continues from the newest valid stored checkpoint, so each call reads
/// only what was appended since.
pub async fn write_checkpoint(
    client: &async_nats::Client,
    log: &EventLog,
    key: &CheckpointKey,
) -> Result<Option<Checkpoint>, LogError> {
    let existing = load_all(client, log.config()).await?;
    let start = existing
        .iter()
        .rev()
        .find(|c| c.key_id == key.id && c.mac_valid(key))
        .and_then(|c| {
            Some(Digest {
                seq: c.seq,
                digest: chain::from_hex(&c.digest)?,
            })
        });
    let d = stream_digest(log, start, None).await?;
    if d.seq == 0 || start.is_some_and(|s| s.seq == d.seq) {
        return Ok(None);
    }
    let cp = Checkpoint::sign(key, &log.config().stream, d.seq, &d.digest);
    let body = serde_json::to_vec(&cp).map_err(|e| LogError::Unavailable(e.to_string()))?;
    log.jetstream()
        .publish(CHECKPOINT_SUBJECT, body.into())
        .await
        .map_err(|e| LogError::Unavailable(format!("store checkpoint: {e}")))?
        .await
        .map_err(|e| LogError::Unavailable(format!("store checkpoint: {e}")))?;
    Ok(Some(cp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CheckpointKey {
        CheckpointKey::from_hex("k1", &"ab".repeat(32)).unwrap()
    }

    #[test]
    fn signed_checkpoint_verifies_and_detects_changes() {
        let cp = Checkpoint::sign(&key(), "FLOW_EVENTS", 42, &chain::sha256(b"x"));
        assert!(cp.mac_valid(&key()));
        let mut moved = cp.clone();
        moved.seq = 41;
        assert!(!moved.mac_valid(&key()));
        let other = CheckpointKey::from_hex("k1", &"cd".repeat(32)).unwrap();
        assert!(!cp.mac_valid(&other));
    }

    // The worked example of docs/EVENTS.md, "Checkpoints".
    #[test]
    fn checkpoint_mac_vector() {
        let cp = Checkpoint {
            format: CHECKPOINT_FORMAT.into(),
            stream: "FLOW_EVENTS".into(),
            seq: 1,
            digest: "53a64cc31147e5bffc69bc712e9842224acd158dea32383f29c8dd3fb1d24455".into(),
            created_at: "2026-11-23T12:00:00.000000Z".into(),
            key_id: "k1".into(),
            mac: "675c28821565a02d04b10493581533f2caeb98db714e0bf96c3b5fb92a0d4fee".into(),
        };
        let key = CheckpointKey::from_hex("k1", &"ab".repeat(32)).unwrap();
        assert!(cp.mac_valid(&key));
    }

    #[test]
    fn key_debug_hides_the_secret() {
        let dbg = format!("{:?}", key());
        assert!(!dbg.contains("abab"), "{dbg}");
    }

    #[test]
    fn weak_keys_are_refused() {
        assert_eq!(
            CheckpointKey::from_hex("k", "abcd").unwrap_err(),
            KeyError::TooShort(2)
        );
        assert_eq!(
            CheckpointKey::from_hex("k", "zz").unwrap_err(),
            KeyError::NotHex
        );
    }

    #[test]
    fn digest_round_trips() {
        let d = Digest {
            seq: 7,
            digest: chain::sha256(b"y"),
        };
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!("7".parse::<Digest>().is_err());
    }
}
