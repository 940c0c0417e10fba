//! Signed checkpoints: `(stream, seq, D_seq)` signed with Ed25519
//! (version 2), and the key ring verifiers check them with, which also
//! holds the HMAC keys of version 1 checkpoints written before
//! (docs/EVENTS.md, "Checkpoints"; docs/adr/0008 says why Ed25519).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use std::future::Future;

use async_nats::jetstream::{
    self, context::PublishErrorKind, message::PublishMessage, stream::DirectGetErrorKind,
};
use chrono::Utc;
use ed25519_dalek::{Signer, Verifier};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::audit::read::for_each_message;
use crate::events::chain::{self, Hash, GENESIS};
use crate::events::envelope;
use crate::events::log::{EventLog, LogConfig, LogError, CHECKPOINT_SUBJECT, EVENT_SUBJECT_PREFIX};

/// The `format` of the checkpoints this version writes (Ed25519).
pub const CHECKPOINT_FORMAT: &str = "flowledger-checkpoint-v2";
/// The `format` of the HMAC-SHA256 checkpoints written before version 2;
/// verified, never written.
pub const CHECKPOINT_FORMAT_V1: &str = "flowledger-checkpoint-v1";
/// What a key ring entry's `algorithm` says for an Ed25519 public key.
pub const ALGORITHM_ED25519: &str = "ed25519";
/// What a key ring entry's `algorithm` says for a v1 HMAC secret.
pub const ALGORITHM_HMAC: &str = "hmac-sha256";

/// Whether `id` is a valid key id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The Ed25519 private key that signs checkpoints and export manifests,
/// with its id. Its `Debug` never shows the seed.
#[derive(Clone)]
pub struct CheckpointKey {
    /// The key's name (`FLOWLEDGER_CHECKPOINT_KEY_ID`), written as a
    /// checkpoint's `key_id` so a verifier knows which key signed it.
    pub id: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CheckpointKey {{ id: {:?}, public_key: {}, seed: <redacted> }}",
            self.id,
            self.public_hex()
        )
    }
}

/// Why a configured key or key ring was refused; the operator fixes the
/// setting (a usage error). Never shows key material.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeyError {
    /// The seed is not 64 hex digits.
    #[error("the checkpoint signing key must be an Ed25519 seed of 64 hex digits (32 bytes); make one with `flowledger audit keygen`")]
    BadSeed,
    /// The key id is empty, longer than 64 or has other characters.
    #[error("checkpoint key id {0:?} must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadId(String),
    /// The key ring file cannot be read.
    #[error("cannot read the key ring {path}: {message}")]
    RingUnreadable {
        /// The file given.
        path: String,
        /// Why.
        message: String,
    },
    /// The key ring is not what docs/EVENTS.md section 5 describes.
    #[error("key ring {path}: {message}")]
    RingInvalid {
        /// The file given.
        path: String,
        /// What is wrong, naming the entry.
        message: String,
    },
}

impl CheckpointKey {
    /// The key named `id` from its 32-byte Ed25519 seed in hex (surrounding
    /// whitespace ignored).
    pub fn from_hex(id: &str, hex_seed: &str) -> Result<Self, KeyError> {
        let seed: [u8; 32] = hex::decode(hex_seed.trim())
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(KeyError::BadSeed)?;
        if !valid_key_id(id) {
            return Err(KeyError::BadId(id.to_string()));
        }
        Ok(CheckpointKey {
            id: id.to_string(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// A new key from the operating system's random source, and its seed
    /// in hex (to store; it is the private key).
    pub fn generate(id: &str) -> Result<(Self, String), KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|_| KeyError::BadSeed)?;
        let hex_seed = hex::encode(seed);
        Ok((Self::from_hex(id, &hex_seed)?, hex_seed))
    }

    /// The public key, 64 hex digits.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// This key's entry for a verifier's key ring (public part only).
    pub fn ring_entry(&self) -> serde_json::Value {
        serde_json::json!({
            "key_id": self.id,
            "algorithm": ALGORITHM_ED25519,
            "public_key": self.public_hex(),
        })
    }

    /// A ring holding only this key's public half.
    pub fn ring(&self) -> KeyRing {
        let mut keys = BTreeMap::new();
        keys.insert(self.id.clone(), RingKey::Ed25519(self.key.verifying_key()));
        KeyRing { keys }
    }

    /// The Ed25519 signature of `message`, 128 hex digits.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }
}

/// A key a verifier holds.
#[derive(Clone)]
enum RingKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    Hmac(Vec<u8>),
}

impl RingKey {
    fn algorithm(&self) -> &'static str {
        match self {
            RingKey::Ed25519(_) => ALGORITHM_ED25519,
            RingKey::Hmac(_) => ALGORITHM_HMAC,
        }
    }
}

/// The keys a verifier checks signatures with, by key id: Ed25519 public
/// keys, and the HMAC secrets of old v1 checkpoints. `Debug` shows ids and
/// algorithms only.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, RingKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self
            .keys
            .iter()
            .map(|(id, k)| format!("{id} ({})", k.algorithm()))
            .collect();
        write!(f, "KeyRing({ids:?})")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RingFile {
    keys: Vec<RingEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RingEntry {
    key_id: String,
    algorithm: String,
    #[serde(default)]
    public_key: Option<String>,
    #[serde(default)]
    secret: Option<String>,
}

/// Why a checkpoint's or a manifest's signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    /// The ring has no key with this id.
    #[error("it is signed by key id {0:?}, which the key ring does not hold (add that key's entry to the ring)")]
    UnknownKey(String),
    /// The ring's key of that id is of the other algorithm.
    #[error("it needs an {want} key but the ring's key {id:?} is {have}")]
    WrongAlgorithm {
        /// The key id.
        id: String,
        /// What the format needs.
        want: &'static str,
        /// What the ring holds.
        have: &'static str,
    },
    /// The format is not one this version knows.
    #[error("its format {0:?} is unknown")]
    UnknownFormat(String),
    /// The signature does not verify: altered, or signed by another key.
    #[error("its signature is invalid (altered, or signed by another key with that id)")]
    Invalid,
}

impl KeyRing {
    /// Reads a key ring file (docs/EVENTS.md section 5).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::RingUnreadable {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        Self::parse(&text).map_err(|message| KeyError::RingInvalid {
            path: shown,
            message,
        })
    }

    /// Parses a key ring's JSON; the error names the entry and never shows
    /// a key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RingFile = serde_json::from_str(text).map_err(|e| {
            format!(
                "not a key ring ({{\"keys\": [{{\"key_id\", \"algorithm\", \"public_key\" | \"secret\"}}]}}): {e}"
            )
        })?;
        let mut keys = BTreeMap::new();
        for (i, e) in file.keys.into_iter().enumerate() {
            let at = format!("keys[{i}] (key id {:?})", e.key_id);
            if !valid_key_id(&e.key_id) {
                return Err(format!(
                    "{at}: a key id is 1-64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
            let key = match (e.algorithm.as_str(), e.public_key, e.secret) {
                (ALGORITHM_ED25519, Some(p), None) => {
                    let bytes: [u8; 32] = hex::decode(p.trim())
                        .ok()
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| format!("{at}: public_key must be 64 hex digits"))?;
                    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                        .map_err(|_| format!("{at}: public_key is not an Ed25519 point"))?;
                    RingKey::Ed25519(key)
                }
                (ALGORITHM_HMAC, None, Some(secret)) => {
                    let bytes = hex::decode(secret.trim())
                        .ok()
                        .filter(|b| b.len() >= 32)
                        .ok_or_else(|| format!("{at}: secret must be 64 or more hex digits"))?;
                    RingKey::Hmac(bytes)
                }
                (ALGORITHM_ED25519, _, _) => {
                    return Err(format!(
                        "{at}: an ed25519 entry has public_key and no secret"
                    ))
                }
                (ALGORITHM_HMAC, _, _) => {
                    return Err(format!(
                        "{at}: an hmac-sha256 entry has secret and no public_key"
                    ))
                }
                (other, _, _) => {
                    return Err(format!(
                    "{at}: algorithm {other:?} is not {ALGORITHM_ED25519:?} or {ALGORITHM_HMAC:?}"
                ))
                }
            };
            if keys.insert(e.key_id.clone(), key).is_some() {
                return Err(format!("{at}: this key id appears twice"));
            }
        }
        Ok(KeyRing { keys })
    }

    fn ed25519(&self, id: &str) -> Result<&ed25519_dalek::VerifyingKey, SignatureProblem> {
        match self.keys.get(id) {
            None => Err(SignatureProblem::UnknownKey(id.to_string())),
            Some(RingKey::Ed25519(k)) => Ok(k),
            Some(other) => Err(SignatureProblem::WrongAlgorithm {
                id: id.to_string(),
                want: ALGORITHM_ED25519,
                have: other.algorithm(),
            }),
        }
    }

    /// Checks an Ed25519 signature (hex) by key `id` over `message`.
    pub fn verify_ed25519(
        &self,
        id: &str,
        message: &[u8],
        signature_hex: &str,
    ) -> Result<(), SignatureProblem> {
        let key = self.ed25519(id)?;
        let sig: [u8; 64] = hex::decode(signature_hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(SignatureProblem::Invalid)?;
        key.verify(message, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| SignatureProblem::Invalid)
    }

    /// Checks a checkpoint's signature with the key its `key_id` names and
    /// the algorithm its `format` names.
    pub fn check(&self, cp: &Checkpoint) -> Result<(), SignatureProblem> {
        match cp.format.as_str() {
            CHECKPOINT_FORMAT => self.verify_ed25519(
                &cp.key_id,
                cp.signing_input().as_bytes(),
                cp.signature.as_deref().unwrap_or_default(),
            ),
            CHECKPOINT_FORMAT_V1 => {
                let secret = match self.keys.get(&cp.key_id) {
                    None => return Err(SignatureProblem::UnknownKey(cp.key_id.clone())),
                    Some(RingKey::Hmac(s)) => s,
                    Some(other) => {
                        return Err(SignatureProblem::WrongAlgorithm {
                            id: cp.key_id.clone(),
                            want: ALGORITHM_HMAC,
                            have: other.algorithm(),
                        })
                    }
                };
                let tag = cp
                    .mac
                    .as_deref()
                    .and_then(|m| hex::decode(m).ok())
                    .ok_or(SignatureProblem::Invalid)?;
                let mut mac = Hmac::<Sha256>::new_from_slice(secret)
                    .expect("HMAC-SHA256 accepts keys of any length");
                mac.update(cp.signing_input().as_bytes());
                mac.verify_slice(&tag)
                    .map_err(|_| SignatureProblem::Invalid)
            }
            other => Err(SignatureProblem::UnknownFormat(other.to_string())),
        }
    }
}

/// A signed statement: "after message `seq`, the stream digest was `digest`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`CHECKPOINT_FORMAT`] (Ed25519) when written by this version;
    /// [`CHECKPOINT_FORMAT_V1`] (HMAC) for older ones. Signed.
    pub format: String,
    /// The event stream the digest is of (`FLOW_EVENTS`).
    pub stream: String,
    /// The stream sequence of the last message the digest covers.
    pub seq: u64,
    /// The stream digest `D_seq`, 64 hex digits (docs/EVENTS.md section 4).
    pub digest: String,
    /// When it was signed (RFC 3339 UTC, microseconds).
    pub created_at: String,
    /// The id of the key that signed it.
    pub key_id: String,
    /// v2: Ed25519 over [`Checkpoint::signing_input`], 128 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// v1: HMAC-SHA256 over [`Checkpoint::signing_input`], 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Checkpoint {
    /// The exact bytes the signature (or v1 MAC) covers.
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
            signature: None,
            mac: None,
        };
        cp.signature = Some(key.sign_hex(cp.signing_input().as_bytes()));
        cp
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
                out.push(parse_stored(
                    &config.checkpoint_stream,
                    m.sequence,
                    &m.payload,
                )?);
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok(out),
            Err(e) => return Err(LogError::Unavailable(format!("read checkpoints: {e}"))),
        }
    }
}

/// What a signing did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    /// The event stream is empty: nothing to sign.
    Empty,
    /// This key's checkpoint at the target was stored already.
    Existing(Checkpoint),
    /// A new checkpoint, stored.
    Stored(Checkpoint),
    /// Nothing stored: the signer did not lead (any more) when it was about
    /// to publish.
    NotLeader,
    /// Nothing stored: another signer stored a checkpoint after this one
    /// read the checkpoint stream (the next signing starts from it).
    Raced,
}

/// A checkpoint as stored: its sequence in the checkpoint stream, parsed.
fn parse_stored(stream: &str, seq: u64, payload: &[u8]) -> Result<Checkpoint, LogError> {
    serde_json::from_slice(payload).map_err(|e| {
        LogError::Unavailable(format!(
            "checkpoint at {stream} seq {seq} is not valid: {e}"
        ))
    })
}

/// The newest-stored checkpoint that `usable` accepts, reading the
/// checkpoint stream backwards from its message `last` (one read per
/// checkpoint stored after it); `fetch(seq)` reads one message (`None`:
/// there is none at `seq`).
async fn newest_usable<F, Fut>(
    last: u64,
    mut fetch: F,
    usable: impl Fn(&Checkpoint) -> bool,
) -> Result<Option<Checkpoint>, LogError>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Option<Checkpoint>, LogError>>,
{
    for seq in (1..=last).rev() {
        if let Some(cp) = fetch(seq).await? {
            if usable(&cp) {
                return Ok(Some(cp));
            }
        }
    }
    Ok(None)
}

/// Where a new checkpoint starts from: the sequence of the checkpoint
/// stream's last message (0: none), and this key's newest-stored
/// checkpoint of `stream` at or before `target` whose signature holds.
async fn starting_point(
    client: &async_nats::Client,
    config: &LogConfig,
    key: &CheckpointKey,
    target: u64,
) -> Result<(u64, Option<Checkpoint>), LogError> {
    let js = jetstream::new(client.clone());
    let name = &config.checkpoint_stream;
    let stream = js
        .get_stream(name)
        .await
        .map_err(|_| LogError::NoStream(name.clone()))?;
    let read = |e: jetstream::stream::DirectGetError| {
        LogError::Unavailable(format!("read checkpoints: {e}"))
    };
    let last = match stream.direct_get_last_for_subject(CHECKPOINT_SUBJECT).await {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => return Ok((0, None)),
        Err(e) => return Err(read(e)),
    };
    let own = key.ring();
    let usable = |c: &Checkpoint| {
        c.key_id == key.id && c.stream == config.stream && c.seq <= target && own.check(c).is_ok()
    };
    let newest = parse_stored(name, last.sequence, &last.payload)?;
    if usable(&newest) {
        return Ok((last.sequence, Some(newest)));
    }
    let stream = &stream;
    let found = newest_usable(
        last.sequence - 1,
        |seq| async move {
            match stream.direct_get(seq).await {
                Ok(m) if m.subject.as_str() == CHECKPOINT_SUBJECT => {
                    parse_stored(name, seq, &m.payload).map(Some)
                }
                Ok(_) => Ok(None),
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
                Err(e) => Err(read(e)),
            }
        },
        usable,
    )
    .await?;
    Ok((last.sequence, found))
}

/// A checkpoint signed by `key` at exactly `upto` (default: the stream's
/// last message now), stored; or the one already stored there by this key.
/// The digest continues from this key's most recently stored checkpoint at
/// or before `upto` whose signature holds, found by reading the checkpoint
/// stream backwards from its last message (one read when that is the one,
/// as for serve's periodic writer), so each call reads only the checkpoints
/// stored after it and the events appended since. When that checkpoint is
/// at `upto` itself it is the answer. (A checkpoint at `upto` stored
/// before a later-stored one at an earlier sequence is not looked for: a
/// second one, equally valid, is stored then.) `None` when the stream is
/// empty; the flag says whether the checkpoint is new.
pub async fn checkpoint_at(
    client: &async_nats::Client,
    log: &EventLog,
    key: &CheckpointKey,
    upto: Option<u64>,
) -> Result<Option<(Checkpoint, bool)>, LogError> {
    match sign_and_store(client, log, key, upto, None::<fn() -> bool>).await? {
        Signing::Empty => Ok(None),
        Signing::Existing(cp) => Ok(Some((cp, false))),
        Signing::Stored(cp) => Ok(Some((cp, true))),
        // `leads` above always says yes, and no race is checked
        Signing::NotLeader | Signing::Raced => Err(LogError::Unavailable(
            "the checkpoint was withheld for lack of leadership".into(),
        )),
    }
}

/// A checkpoint at the stream's last message, as the one signer of several
/// instances (serve's periodic writer): like [`checkpoint_at`], but `leads`
/// (the signer's leadership) is asked before the work and again right
/// before the publish, so a signer that lost its lease meanwhile (a paused
/// process, a slow digest) stores nothing; and the publish expects the
/// checkpoint stream's last message to be the one it read, so a checkpoint
/// another signer stored meanwhile makes it store nothing either
/// ([`Signing::Raced`]).
pub async fn checkpoint_as_leader(
    client: &async_nats::Client,
    log: &EventLog,
    key: &CheckpointKey,
    leads: impl Fn() -> bool,
) -> Result<Signing, LogError> {
    if !leads() {
        return Ok(Signing::NotLeader);
    }
    sign_and_store(client, log, key, None, Some(leads)).await
}

async fn sign_and_store(
    client: &async_nats::Client,
    log: &EventLog,
    key: &CheckpointKey,
    upto: Option<u64>,
    leads: Option<impl Fn() -> bool>,
) -> Result<Signing, LogError> {
    let last = log.last_seq().await?;
    let target = upto.map_or(last, |u| u.min(last));
    if target == 0 {
        return Ok(Signing::Empty);
    }
    let (last_stored, newest) = starting_point(client, log.config(), key, target).await?;
    if let Some(n) = newest.as_ref().filter(|n| n.seq == target) {
        return Ok(Signing::Existing(n.clone()));
    }
    let start = newest.and_then(|c| {
        Some(Digest {
            seq: c.seq,
            digest: chain::from_hex(&c.digest)?,
        })
    });
    let d = stream_digest(log, start, Some(target)).await?;
    let cp = Checkpoint::sign(key, &log.config().stream, d.seq, &d.digest);
    let body = serde_json::to_vec(&cp).map_err(|e| LogError::Unavailable(e.to_string()))?;
    let mut msg = PublishMessage::build().payload(body.into());
    if let Some(leads) = leads {
        // the last moment to notice a lost leadership: nothing is stored yet
        if !leads() {
            return Ok(Signing::NotLeader);
        }
        msg = msg.expected_last_subject_sequence(last_stored);
    }
    let stored = match log.jetstream().send_publish(CHECKPOINT_SUBJECT, msg).await {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match stored {
        Ok(_) => Ok(Signing::Stored(cp)),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Signing::Raced),
        Err(e) => Err(LogError::Unavailable(format!("store checkpoint: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CheckpointKey {
        CheckpointKey::from_hex("k2", &"ab".repeat(32)).unwrap()
    }

    fn example(format: &str, key_id: &str) -> Checkpoint {
        Checkpoint {
            format: format.into(),
            stream: "FLOW_EVENTS".into(),
            seq: 1,
            digest: "53a64cc31147e5bffc69bc712e9842224acd158dea32383f29c8dd3fb1d24455".into(),
            created_at: "2026-11-23T12:00:00.000000Z".into(),
            key_id: key_id.into(),
            signature: None,
            mac: None,
        }
    }

    #[test]
    fn signed_checkpoint_verifies_and_detects_changes() {
        let cp = Checkpoint::sign(&key(), "FLOW_EVENTS", 42, &chain::sha256(b"x"));
        let ring = key().ring();
        assert_eq!(ring.check(&cp), Ok(()));
        let mut moved = cp.clone();
        moved.seq = 41;
        assert_eq!(ring.check(&moved), Err(SignatureProblem::Invalid));
        let mut relabelled = cp.clone();
        relabelled.key_id = "k3".into();
        assert_eq!(
            ring.check(&relabelled),
            Err(SignatureProblem::UnknownKey("k3".into()))
        );
        let other = CheckpointKey::from_hex("k2", &"cd".repeat(32)).unwrap();
        assert_eq!(other.ring().check(&cp), Err(SignatureProblem::Invalid));
    }

    // The worked examples of docs/EVENTS.md, "Checkpoints".
    #[test]
    fn checkpoint_vectors() {
        let k = key();
        assert_eq!(k.public_hex(), PUBKEY_V2);
        let mut v2 = example(CHECKPOINT_FORMAT, "k2");
        v2.signature = Some(k.sign_hex(v2.signing_input().as_bytes()));
        assert_eq!(v2.signature.as_deref(), Some(SIG_V2));
        let mut v1 = example(CHECKPOINT_FORMAT_V1, "k1");
        v1.mac = Some("675c28821565a02d04b10493581533f2caeb98db714e0bf96c3b5fb92a0d4fee".into());
        let ring = KeyRing::parse(&format!(
            r#"{{"keys": [{{"key_id": "k1", "algorithm": "hmac-sha256", "secret": "{}"}},
                         {{"key_id": "k2", "algorithm": "ed25519", "public_key": "{PUBKEY_V2}"}}]}}"#,
            "ab".repeat(32)
        ))
        .unwrap();
        assert_eq!(ring.check(&v1), Ok(()));
        assert_eq!(ring.check(&v2), Ok(()));
        // a v1 checkpoint relabelled to the Ed25519 key's id is refused
        let mut confused = v1.clone();
        confused.key_id = "k2".into();
        assert!(matches!(
            ring.check(&confused),
            Err(SignatureProblem::WrongAlgorithm { .. })
        ));
    }

    const PUBKEY_V2: &str = "248acbdbaf9e050196de704bea2d68770e519150d103b587dae2d9cad53dd930";
    const SIG_V2: &str = "877dc4df74953d72f60df5387f31b532d31fc5ff34d7caf98f950ae477cc295fb2e9512ac51ffdf4b8c39da631334e95f82b21a610f33ba7654ebf98d622ea0e";

    #[test]
    fn rings_are_checked_and_never_echo_keys() {
        for bad in [
            "{}",
            r#"{"keys": [{"key_id": "a b", "algorithm": "ed25519", "public_key": "00"}]}"#,
            r#"{"keys": [{"key_id": "a", "algorithm": "rsa", "public_key": "00"}]}"#,
            r#"{"keys": [{"key_id": "a", "algorithm": "hmac-sha256", "secret": "abcd"}]}"#,
            r#"{"keys": [{"key_id": "a", "algorithm": "ed25519", "secret": "abcd"}]}"#,
        ] {
            let e = KeyRing::parse(bad).unwrap_err();
            assert!(!e.contains("abcd"), "{e}");
        }
        let dbg = format!("{:?}", key());
        assert!(!dbg.contains("abab"), "{dbg}");
        assert_eq!(
            CheckpointKey::from_hex("k", "abcd").unwrap_err(),
            KeyError::BadSeed
        );
        assert!(matches!(
            CheckpointKey::from_hex("bad id", &"ab".repeat(32)),
            Err(KeyError::BadId(_))
        ));
    }

    /// The newest-stored checkpoint of key k2 at or before `target` in
    /// `stored` (checkpoint stream sequences 1, 2, ...), and the reads made.
    async fn search(stored: &[Checkpoint], target: u64) -> (Option<u64>, u32) {
        let own = key().ring();
        let reads = std::cell::Cell::new(0u32);
        let found = newest_usable(
            stored.len() as u64,
            |seq| {
                reads.set(reads.get() + 1);
                let cp = stored.get(seq as usize - 1).cloned();
                async move { Ok(cp) }
            },
            |c| c.key_id == "k2" && c.seq <= target && own.check(c).is_ok(),
        )
        .await
        .unwrap();
        (found.map(|c| c.seq), reads.get())
    }

    #[tokio::test]
    async fn the_search_reads_back_from_the_newest_only_as_far_as_it_needs() {
        let at = |seq: u64, by: &CheckpointKey| Checkpoint::sign(by, "FLOW_EVENTS", seq, &GENESIS);
        let (k, other) = (
            key(),
            CheckpointKey::from_hex("k3", &"cd".repeat(32)).unwrap(),
        );
        let mut stored = vec![at(5, &k), at(9, &k), at(12, &k), at(14, &other), at(20, &k)];
        // the newest stored fits: one read
        assert_eq!(search(&stored, 30).await, (Some(20), 1));
        // 20 (past the target) and the other key's 14 are passed over
        assert_eq!(search(&stored, 19).await, (Some(12), 3));
        assert_eq!(search(&stored, 4).await, (None, 5));
        // a forged one is never a starting point
        stored[4].digest = chain::to_hex(&chain::sha256(b"forged"));
        assert_eq!(search(&stored, 30).await, (Some(12), 3));
        // the most recently stored, not the highest: 3 was signed after 20
        stored[4] = at(20, &k);
        stored.push(at(3, &k));
        assert_eq!(search(&stored, 30).await, (Some(3), 1));
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
