//! The two hash chains of docs/EVENTS.md.
//!
//! * Event chain (per aggregate): `h_i = SHA-256(h_{i-1} || line_i)` with
//!   `h_0` = 32 zero bytes, where `line_i` is the exact stored bytes of the
//!   event's JSON line (without its trailing `\n`).
//! * Stream digest (whole stream, in sequence order):
//!   `D_n = SHA-256(D_{n-1} || u64be(n) || SHA-256(subject) || SHA-256(body))`
//!   with `D_0` = 32 zero bytes.

use sha2::{Digest, Sha256};

/// A SHA-256 value: an event hash, a chain head or a stream digest.
pub type Hash = [u8; 32];

/// The chain value before the first event (and the digest before seq 1).
pub const GENESIS: Hash = [0u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Hash of one event given the previous hash of the same aggregate.
pub fn event_hash(prev: &Hash, line: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(line);
    h.finalize().into()
}

/// The leaf of one stream message: hashes of its subject and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The message's stream sequence (`n` of `u64be(n)`).
    pub seq: u64,
    /// SHA-256 of the subject as UTF-8.
    pub subject_sha256: Hash,
    /// SHA-256 of the exact payload bytes.
    pub body_sha256: Hash,
}

impl Leaf {
    /// The leaf of the message at `seq` on `subject` with payload `body`.
    pub fn of(seq: u64, subject: &str, body: &[u8]) -> Self {
        Leaf {
            seq,
            subject_sha256: sha256(subject.as_bytes()),
            body_sha256: sha256(body),
        }
    }
}

/// One step of the stream digest.
pub fn digest_step(prev: &Hash, leaf: &Leaf) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(leaf.seq.to_be_bytes());
    h.update(leaf.subject_sha256);
    h.update(leaf.body_sha256);
    h.finalize().into()
}

/// Lowercase hex of a hash (a lookup table: this runs several times per
/// command).
pub fn to_hex(h: &Hash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(64);
    for b in h {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 0x0f) as usize]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Parses 64 hex digits (either case) into a hash; `None` for anything else.
pub fn from_hex(s: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors written into docs/EVENTS.md; an independent verifier checks
    // itself against the same numbers.
    #[test]
    fn event_hash_vector() {
        assert_eq!(
            to_hex(&event_hash(&GENESIS, br#"{"a":1}"#)),
            "b06a229070741292512e8760f470dd7a4c46ccfdf253df781d88dabe58c1ccb1"
        );
    }

    #[test]
    fn digest_step_vector() {
        let leaf = Leaf::of(1, "flow.ev.job.j1", b"{\"a\":1}\n");
        assert_eq!(
            to_hex(&digest_step(&GENESIS, &leaf)),
            "53a64cc31147e5bffc69bc712e9842224acd158dea32383f29c8dd3fb1d24455"
        );
    }

    #[test]
    fn digest_step_covers_sequence_subject_and_body() {
        let a = digest_step(&GENESIS, &Leaf::of(1, "flow.ev.job.x", b"body\n"));
        assert_ne!(
            a,
            digest_step(&GENESIS, &Leaf::of(2, "flow.ev.job.x", b"body\n"))
        );
        assert_ne!(
            a,
            digest_step(&GENESIS, &Leaf::of(1, "flow.ev.job.y", b"body\n"))
        );
        assert_ne!(
            a,
            digest_step(&GENESIS, &Leaf::of(1, "flow.ev.job.x", b"bodz\n"))
        );
    }

    #[test]
    fn hex_round_trip() {
        let h = sha256(b"x");
        assert_eq!(to_hex(&h), hex::encode(h));
        assert_eq!(from_hex(&to_hex(&h)), Some(h));
        assert_eq!(from_hex("zz"), None);
    }
}
