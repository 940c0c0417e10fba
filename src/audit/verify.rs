//! Verification of the live stream or of an export (docs/EVENTS.md section
//! 9). Fails closed: it reports the first broken stream sequence and why,
//! and a range no valid signature covers is a failure unless the caller
//! accepts an unsigned tail.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::Path;

use serde::Serialize;

use crate::audit::checkpoint::{self, Checkpoint, Digest, KeyRing};
use crate::audit::export::{
    manifest_signing_input, IndexEntry, Manifest, ManifestSignature, CHECKPOINTS_FILE,
    EXPORT_FORMAT, INDEX_FILE, MANIFEST_FILE, MANIFEST_SIG_FILE, MESSAGES_FILE,
};
use crate::audit::read::{for_each_message, RawMessage};
use crate::events::chain::{self, Hash, Leaf, GENESIS};
use crate::events::envelope::{
    self, FORMAT_VERSION, HDR_CHAIN_HEAD, HDR_COMMAND_HASH, HDR_EXPECTED_LAST_SUBJECT_SEQ,
    HDR_FORMAT, HDR_MSG_ID,
};
use crate::events::log::{subject_for, EventLog, LogError, EVENT_SUBJECT_PREFIX};

/// The headers a commit carries (docs/EVENTS.md section 2); any other is
/// refused, but for an optional `traceparent` in the form flowledger writes
/// (covered by no hash: trace ids are not history).
pub const COMMIT_HEADERS: [&str; 5] = [
    HDR_MSG_ID,
    HDR_EXPECTED_LAST_SUBJECT_SEQ,
    HDR_CHAIN_HEAD,
    HDR_COMMAND_HASH,
    HDR_FORMAT,
];

/// Where and why verification failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("verification failed at stream sequence {seq}: {reason}")]
pub struct Broken {
    /// The first stream sequence where history does not hold; 0 for the
    /// export's manifest as a whole.
    pub seq: u64,
    /// What is wrong there, for the auditor.
    pub reason: String,
}

impl Broken {
    /// The line for a person: `broken at 1,234: <reason>`.
    pub fn sentence(&self) -> String {
        if self.seq == 0 {
            format!("broken: the manifest: {}", self.reason)
        } else {
            format!("broken at {}: {}", thousands(self.seq), self.reason)
        }
    }
}

fn broken(seq: u64, reason: impl Into<String>) -> Broken {
    // a reason quotes what an export holds (subjects, times, ids): control
    // characters are escaped, so a crafted export cannot rewrite the
    // terminal line a person reads
    let reason: String = reason
        .into()
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    Broken { seq, reason }
}

/// `12345` as `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Why verification did not end with a [`Summary`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// History is not intact, or not covered by a signature: the verdict
    /// (`audit verify` exits 1).
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

/// What the auditor brings to a verification.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The keys signatures are checked with; none: no signature is checked
    /// and none covers anything.
    pub ring: Option<KeyRing>,
    /// A digest kept earlier, `SEQ:HEX`: it must be met, and it covers the
    /// range up to `SEQ`.
    pub expect: Option<Digest>,
    /// Accept what no valid signature covers (an unsigned tail, an unsigned
    /// manifest); the summary says what.
    pub allow_unsigned: bool,
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
    /// Checkpoints in the range: the checkpoint stream's, or the export's
    /// `checkpoints.jsonl`.
    pub checkpoints_present: usize,
    /// Checkpoints whose digest matched the stream and whose signature was
    /// checked and holds.
    pub checkpoints_verified: usize,
    /// `checked` when a key ring was given (every checkpoint in range was
    /// then checked), else why not.
    pub signatures: String,
    /// The highest sequence a valid checkpoint signature covers.
    pub signed_up_to: Option<u64>,
    /// The key id of the checkpoint that covers `signed_up_to`.
    pub signed_by: Option<String>,
    /// The first sequence no signature nor kept digest covers (accepted
    /// with `allow_unsigned`).
    pub unsigned_from: Option<u64>,
    /// For an export: `signed by <key id>`, `unsigned`, or `not checked:
    /// no key ring given`; none live.
    pub manifest: Option<String>,
}

impl Summary {
    /// The line for a person: `intact and signed up to 12,345 of 12,345 by
    /// key 2026-12`, saying in words what no signature covers.
    pub fn sentence(&self) -> String {
        let of = thousands(self.to_seq);
        let mut s = match (self.signed_up_to, &self.signed_by) {
            _ if self.to_seq < self.from_seq => "intact: the range is empty".to_string(),
            (Some(up), Some(by)) => format!(
                "intact and signed up to {} of {of} by key {by}",
                thousands(up)
            ),
            (Some(up), None) => format!("intact and signed up to {} of {of}", thousands(up)),
            (None, _) if self.unsigned_from.is_none() => {
                format!("intact up to {of}, covered by the digest you kept")
            }
            (None, _) => format!("intact up to {of}, but NOT SIGNED"),
        };
        if let Some(u) = self.unsigned_from {
            s.push_str(&format!(
                "; messages {} to {of} are covered by no valid signature (accepted with --allow-unsigned)",
                thousands(u)
            ));
        }
        if self.manifest.as_deref() == Some("unsigned") {
            s.push_str("; the manifest is not signed (accepted with --allow-unsigned)");
        }
        if self.signatures != "checked" {
            s.push_str(&format!("; signatures {}", self.signatures));
        }
        s
    }
}

/// The envelope fields verification reads; `data` and the rest are
/// skipped, not parsed (they are covered by the hashes).
#[derive(serde::Deserialize)]
struct Checked {
    event_id: uuid::Uuid,
    aggregate_type: String,
    aggregate_id: String,
    aggregate_version: u64,
    command_id: String,
    #[serde(default)]
    command_hash: Option<String>,
    prev_hash: String,
}

/// What the verifier last saw of one aggregate.
#[derive(Clone, Copy)]
struct Head {
    version: u64,
    hash: Hash,
    seq: u64,
}

/// The checks shared by live and export verification.
pub struct ChainCheck {
    digest: Digest,
    from: u64,
    heads: HashMap<String, Head>,
    checkpoints: BTreeMap<u64, Vec<Checkpoint>>,
    checkpoints_present: usize,
    checkpoints_verified: usize,
    signed: Option<(u64, String)>,
    options: Options,
    expect_seen: bool,
    expect_matched: bool,
    messages: u64,
    events: u64,
}

impl ChainCheck {
    /// A check that continues from `start` (`D(from-1)`), with the
    /// checkpoints to match on the way.
    pub fn new(start: Digest, checkpoints: Vec<Checkpoint>, options: Options) -> Self {
        let checkpoints_present = checkpoints.len();
        let mut by_seq: BTreeMap<u64, Vec<Checkpoint>> = BTreeMap::new();
        for c in checkpoints {
            by_seq.entry(c.seq).or_default().push(c);
        }
        ChainCheck {
            digest: start,
            from: start.seq + 1,
            heads: HashMap::new(),
            checkpoints: by_seq,
            checkpoints_present,
            checkpoints_verified: 0,
            signed: None,
            options,
            expect_seen: false,
            expect_matched: false,
            messages: 0,
            events: 0,
        }
    }

    /// Advances the stream digest by one message and checks the
    /// checkpoints at its sequence.
    pub fn leaf(&mut self, leaf: &Leaf) -> Result<(), Broken> {
        let Some(want) = self.digest.seq.checked_add(1) else {
            return Err(broken(leaf.seq, "a sequence beyond 2^64 - 1"));
        };
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
                want,
                format!(
                    "message {want} is missing or out of order (message {} comes after {})",
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
                self.checkpoint(leaf.seq, &cp)?;
            }
        }
        if let Some(e) = self.options.expect {
            if e.seq == leaf.seq {
                // judged at the end (step 5), after every message was checked
                self.expect_seen = true;
                self.expect_matched = e.digest == self.digest.digest;
            }
        }
        Ok(())
    }

    fn checkpoint(&mut self, seq: u64, cp: &Checkpoint) -> Result<(), Broken> {
        if cp.digest != chain::to_hex(&self.digest.digest) {
            return Err(broken(
                seq,
                format!(
                    "the stream digest here differs from the checkpoint created {} \
                     (history before this point was changed, removed or reordered)",
                    cp.created_at
                ),
            ));
        }
        if let Some(ring) = &self.options.ring {
            ring.check(cp).map_err(|problem| {
                broken(
                    seq,
                    format!(
                        "the checkpoint created {} (key id {:?}) does not verify: {problem}",
                        cp.created_at, cp.key_id
                    ),
                )
            })?;
            self.checkpoints_verified += 1;
            if self.signed.as_ref().is_none_or(|(s, _)| *s < seq) {
                self.signed = Some((seq, cp.key_id.clone()));
            }
        }
        Ok(())
    }

    /// Checks the per-aggregate chains and the headers of one message.
    pub fn body(&mut self, m: &RawMessage) -> Result<(), Broken> {
        let seq = m.seq;
        let lines = envelope::decode_commit_as::<Checked>(m.body.as_bytes())
            .map_err(|e| broken(seq, e.to_string()))?;
        let previous = self.heads.get(&m.subject).copied();
        let mut head = previous;
        let mut first_version = None;
        let mut command: Option<(String, Option<String>)> = None;
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
            match head {
                Some(h) => {
                    if Some(r.aggregate_version) != h.version.checked_add(1) {
                        return Err(broken(
                            seq,
                            format!(
                                "event version {} of {} follows version {}",
                                r.aggregate_version, m.subject, h.version
                            ),
                        ));
                    }
                    if prev != h.hash {
                        return Err(broken(
                            seq,
                            format!(
                                "event version {} of {} does not chain to version {}",
                                r.aggregate_version, m.subject, h.version
                            ),
                        ));
                    }
                }
                None if self.from == 1 && (r.aggregate_version != 1 || prev != GENESIS) => {
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
            match &command {
                None => command = Some((r.command_id.clone(), r.command_hash.clone())),
                Some((id, hash)) if *id != r.command_id || *hash != r.command_hash => {
                    return Err(broken(
                        seq,
                        "the events of this message name different commands (altered)",
                    ));
                }
                Some(_) => {}
            }
            first_version.get_or_insert(r.aggregate_version);
            let h = chain::event_hash(&prev, line);
            head = Some(Head {
                version: r.aggregate_version,
                hash: h,
                seq,
            });
            self.events += 1;
        }
        let (Some(last), Some(first_version), Some((command_id, command_hash))) =
            (head.filter(|h| h.seq == seq), first_version, command)
        else {
            return Err(broken(seq, "the message holds no event"));
        };
        check_headers(
            m,
            &last.hash,
            first_version,
            previous.map(|p| p.seq),
            &command_id,
            command_hash.as_deref(),
        )?;
        self.heads.insert(m.subject.clone(), last);
        Ok(())
    }

    /// Step 5 (part): no checkpoint may remain unmatched once the walk has
    /// ended (one beyond the end means history was truncated), and the kept
    /// digest must have been met.
    fn check_end(&self) -> Result<(), Broken> {
        if let Some((&seq, cps)) = self.checkpoints.iter().next() {
            if seq > self.digest.seq {
                return Err(broken(
                    seq,
                    format!(
                        "a checkpoint created {} covers sequence {seq}, \
                         but history ends at {} (truncated)",
                        cps[0].created_at, self.digest.seq
                    ),
                ));
            }
            if seq < self.from {
                return Err(broken(
                    seq,
                    format!(
                        "a checkpoint created {} is for sequence {seq}, before the range starts at {}",
                        cps[0].created_at, self.from
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_kept_digest(&self) -> Result<(), Broken> {
        if let Some(e) = self.options.expect {
            if self.expect_seen && !self.expect_matched {
                return Err(broken(
                    e.seq,
                    "the digest you kept for this sequence no longer matches: \
                     history up to here was changed",
                ));
            }
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
        Ok(())
    }

    /// Step 6: the highest covered sequence must be the range's last, or
    /// the caller accepts the unsigned rest. Returns the first uncovered
    /// sequence, if any.
    fn coverage(&self) -> Result<Option<u64>, Broken> {
        let last = self.digest.seq;
        if last < self.from {
            return Ok(None); // an empty range
        }
        let kept = self
            .options
            .expect
            .filter(|_| self.expect_seen && self.expect_matched)
            .map_or(0, |e| e.seq);
        let covered = self.signed.as_ref().map_or(0, |(s, _)| *s).max(kept);
        if covered >= last {
            return Ok(None);
        }
        let first = covered.max(self.from - 1) + 1;
        if self.options.allow_unsigned {
            return Ok(Some(first));
        }
        let why = if self.options.ring.is_none() && self.options.expect.is_none() {
            "no key ring was given (--keys), so no signature was checked".to_string()
        } else {
            match &self.signed {
                Some((s, _)) => format!("the last valid signature covers up to {s}"),
                None => "no valid signature lies in the range".to_string(),
            }
        };
        Err(broken(
            first,
            format!(
                "messages {first}..{last} are covered by no valid signature ({why}); \
                 verify up to a signed checkpoint, pass a key ring that holds its key \
                 or a digest you kept, or --allow-unsigned to accept them unsigned"
            ),
        ))
    }

    fn summary(
        self,
        stream: &str,
        unsigned_from: Option<u64>,
        manifest: Option<String>,
    ) -> Summary {
        let (signed_up_to, signed_by) = match self.signed {
            Some((s, by)) => (Some(s), Some(by)),
            None => (None, None),
        };
        Summary {
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
            signatures: if self.options.ring.is_some() {
                "checked".into()
            } else {
                "not checked: no key ring given".into()
            },
            signed_up_to,
            signed_by,
            unsigned_from,
            manifest,
        }
    }
}

/// Step 4's header rules: exactly the commit headers, each equal to what
/// the hash chain covers.
fn check_headers(
    m: &RawMessage,
    head: &Hash,
    first_version: u64,
    previous_seq: Option<u64>,
    command_id: &str,
    command_hash: Option<&str>,
) -> Result<(), Broken> {
    let seq = m.seq;
    if let Some(other) = m.headers.iter().find_map(|(k, v)| {
        let allowed = COMMIT_HEADERS.contains(&k.as_str())
            || (k == crate::telemetry::TRACEPARENT && crate::telemetry::is_written_form(v));
        (!allowed).then_some(k)
    }) {
        return Err(broken(
            seq,
            format!("header {other:?} is not one flowledger writes (added)"),
        ));
    }
    let get = |name: &str| m.headers.get(name).map(String::as_str);
    let altered = |name: &str, what: &str| {
        broken(
            seq,
            format!("header {name} does not match {what} (altered)"),
        )
    };
    if get(HDR_FORMAT) != Some(FORMAT_VERSION) {
        return Err(altered(HDR_FORMAT, "the format, 1"));
    }
    if get(HDR_MSG_ID) != Some(command_id) {
        return Err(altered(HDR_MSG_ID, "the events' command_id"));
    }
    if get(HDR_CHAIN_HEAD) != Some(chain::to_hex(head).as_str()) {
        return Err(altered(HDR_CHAIN_HEAD, "the last event's hash"));
    }
    if let Some(h) = command_hash {
        if get(HDR_COMMAND_HASH).unwrap_or_default() != h {
            return Err(altered(HDR_COMMAND_HASH, "the events' command_hash"));
        }
    }
    // compared as the text flowledger writes: decimal digits, no sign, no
    // leading zero
    let expected = get(HDR_EXPECTED_LAST_SUBJECT_SEQ)
        .filter(|v| {
            !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_digit())
                && (*v == "0" || !v.starts_with('0'))
        })
        .and_then(|v| v.parse::<u64>().ok());
    let ok = match (expected, previous_seq) {
        (None, _) => false,
        (Some(e), _) if first_version == 1 => e == 0,
        (Some(e), Some(p)) => e == p,
        (Some(e), None) => e < seq,
    };
    if !ok {
        return Err(altered(
            HDR_EXPECTED_LAST_SUBJECT_SEQ,
            "the aggregate's previous message",
        ));
    }
    Ok(())
}

/// Verifies the live stream from its first message to `to_seq` (default:
/// its end) against its checkpoints.
pub async fn verify_live(
    client: &async_nats::Client,
    log: &EventLog,
    to_seq: Option<u64>,
    options: &Options,
) -> Result<Summary, VerifyError> {
    // checkpoints first, then the end: a checkpoint signed meanwhile lies
    // at or before the end read after it, never beyond
    let stored = checkpoint::load_all(client, log.config()).await?;
    let last = log.last_seq().await?;
    let to = to_seq.map_or(last, |t| t.min(last));
    let to_end = to == last;
    let checkpoints: Vec<Checkpoint> = stored
        .into_iter()
        .filter(|c| c.stream == log.config().stream && (to_end || c.seq <= to))
        .collect();
    let mut check = ChainCheck::new(
        Digest {
            seq: 0,
            digest: GENESIS,
        },
        checkpoints,
        options.clone(),
    );
    let mut failure: Option<Broken> = None;
    for_each_message::<LogError>(
        log,
        &format!("{EVENT_SUBJECT_PREFIX}.>"),
        1,
        Some(to),
        |m| {
            if failure.is_none() {
                if let Err(b) = check.leaf(&m.leaf()).and_then(|_| check.body(&m)) {
                    failure = Some(b);
                }
            }
            Ok(())
        },
    )
    .await?;
    if let Some(b) = failure {
        return Err(b.into());
    }
    if check.digest.seq < to {
        // the walk stopped short: the stream holds fewer messages than it says
        return Err(broken(
            check.digest.seq + 1,
            format!("message {} is missing", check.digest.seq + 1),
        )
        .into());
    }
    check.check_end()?;
    check.check_kept_digest()?;
    let unsigned_from = check.coverage()?;
    Ok(check.summary(&log.config().stream, unsigned_from, None))
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
    Ok(std::io::BufReader::with_capacity(1 << 16, f).lines())
}

/// Step 1: the manifest, and its signature when present and a ring is
/// given. Returns the manifest and what its signature state is.
fn read_manifest(dir: &Path, options: &Options) -> Result<(Manifest, String), VerifyError> {
    let mp = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&mp).map_err(|e| export_err(&mp, format!("cannot read: {e}")))?;
    let format: Option<String> = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(str::to_string));
    match format.as_deref() {
        Some(EXPORT_FORMAT) => {}
        Some(f) if f.starts_with("flowledger-export-") => {
            return Err(broken(
                0,
                format!(
                    "export format {f:?} is older than {EXPORT_FORMAT:?}: its filter and tail \
                     are not checkable; export again with this version"
                ),
            )
            .into())
        }
        _ => {
            return Err(broken(
                0,
                format!("manifest.json is not a {EXPORT_FORMAT} manifest"),
            )
            .into())
        }
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        broken(
            0,
            format!("manifest.json is not as docs/EVENTS.md section 8 says: {e}"),
        )
    })?;
    let sp = dir.join(MANIFEST_SIG_FILE);
    let state = match std::fs::read(&sp) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "unsigned".to_string(),
        Err(e) => return Err(export_err(&sp, format!("cannot read: {e}"))),
        Ok(sig) => {
            let sig: ManifestSignature = serde_json::from_slice(&sig).map_err(|e| {
                broken(0, format!("manifest.sig is not {{key_id, signature}}: {e}"))
            })?;
            match &options.ring {
                None => "not checked: no key ring given".to_string(),
                Some(ring) => {
                    ring.verify_ed25519(
                        &sig.key_id,
                        &manifest_signing_input(&bytes),
                        &sig.signature,
                    )
                    .map_err(|problem| {
                        broken(
                            0,
                            format!("manifest.sig (key id {:?}): {problem}", sig.key_id),
                        )
                    })?;
                    format!("signed by {}", sig.key_id)
                }
            }
        }
    };
    if manifest.from_seq == 0 || manifest.to_seq < manifest.from_seq - 1 {
        return Err(broken(
            0,
            format!(
                "the range {}..{} is not a range of stream sequences",
                manifest.from_seq, manifest.to_seq
            ),
        )
        .into());
    }
    if manifest.filter.aggregate_id.is_some() && manifest.filter.aggregate_type.is_none() {
        return Err(broken(0, "the filter names an aggregate id without a type").into());
    }
    Ok((manifest, state))
}

/// Verifies an export directory offline: no server is consulted.
pub fn verify_export(dir: &Path, options: &Options) -> Result<Summary, VerifyError> {
    let (manifest, manifest_state) = read_manifest(dir, options)?;
    let start_digest = chain::from_hex(&manifest.start_digest)
        .ok_or_else(|| broken(0, "start_digest is not 64 hex digits"))?;
    let mut checkpoints = Vec::new();
    let cp_path = dir.join(CHECKPOINTS_FILE);
    for (i, line) in open_lines(dir, CHECKPOINTS_FILE)?.enumerate() {
        let line = line.map_err(|e| export_err(&cp_path, e.to_string()))?;
        let cp: Checkpoint = serde_json::from_str(&line)
            .map_err(|e| export_err(&cp_path, format!("line {}: {e}", i + 1)))?;
        checkpoints.push(cp);
    }
    let start = Digest {
        seq: manifest.from_seq - 1,
        digest: start_digest,
    };
    let mut check = ChainCheck::new(start, checkpoints, options.clone());
    let mp = dir.join(MESSAGES_FILE);
    let mut messages = open_lines(dir, MESSAGES_FILE)?.enumerate();
    let parse_message =
        |i: usize, line: std::io::Result<String>| -> Result<RawMessage, VerifyError> {
            let line = line.map_err(|e| export_err(&mp, e.to_string()))?;
            serde_json::from_str(&line).map_err(|e| export_err(&mp, format!("line {}: {e}", i + 1)))
        };
    let ip = dir.join(INDEX_FILE);
    let (mut in_range, mut included) = (0u64, 0u64);
    for (i, line) in open_lines(dir, INDEX_FILE)?.enumerate() {
        let line = line.map_err(|e| export_err(&ip, e.to_string()))?;
        let entry: IndexEntry = serde_json::from_str(&line)
            .map_err(|e| export_err(&ip, format!("line {}: {e}", i + 1)))?;
        let leaf = entry.leaf().ok_or_else(|| {
            export_err(
                &ip,
                format!("line {}: body_sha256 must be 64 hex digits", i + 1),
            )
        })?;
        check.leaf(&leaf)?;
        in_range += 1;
        let selected = manifest.filter.selects(&entry.subject);
        if entry.included != selected {
            let why = if selected {
                "is marked not included, but the filter selects it (hidden)"
            } else {
                "is included, but the filter does not select it (added)"
            };
            return Err(broken(entry.seq, format!("message on {} {why}", entry.subject)).into());
        }
        if entry.included {
            included += 1;
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
    check.check_end()?;
    let end = check.digest;
    if end.seq != manifest.to_seq || chain::to_hex(&end.digest) != manifest.end_digest {
        return Err(broken(
            manifest.to_seq,
            format!(
                "the export ends at {end} but its manifest says \
                 it ends at {}:{} (truncated or altered)",
                manifest.to_seq, manifest.end_digest
            ),
        )
        .into());
    }
    let counted = (in_range, included, check.events);
    let claimed = (
        manifest.messages_in_range,
        manifest.messages_included,
        manifest.events_included,
    );
    if counted != claimed {
        return Err(broken(
            manifest.to_seq,
            format!(
                "the manifest's counts (messages_in_range, messages_included, events_included) \
                 are {claimed:?} but the export holds {counted:?} (altered)"
            ),
        )
        .into());
    }
    check.check_kept_digest()?;
    let unsigned_from = check.coverage()?;
    if !manifest_state.starts_with("signed by ") && !options.allow_unsigned {
        let why = if manifest_state == "unsigned" {
            "manifest.json is not signed (no manifest.sig)"
        } else {
            "manifest.sig was not checked (no key ring given)"
        };
        return Err(broken(
            0,
            format!(
                "{why}: its range and filter are vouched for by no checked signature, and a \
                 tail dropped with its checkpoint would look the same; export with the signing \
                 key and verify with --keys, or pass --allow-unsigned"
            ),
        )
        .into());
    }
    Ok(check.summary(&manifest.stream, unsigned_from, Some(manifest_state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_escape_control_characters() {
        let b = broken(3, "subject flow.ev.job.x\r\u{1b}[2Kintact");
        assert!(!b.reason.chars().any(char::is_control), "{:?}", b.reason);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12345), "12,345");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
