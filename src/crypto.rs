//! Shared crypto: HMAC-SHA256 signatures on callbacks, both ways
//! (docs/CALLBACKS.md): the job's result callbacks flowledger sends and the
//! n8n results it receives; and [`SealKeys`], which seal the credentials a
//! `callback_url` carries before it is written to the immutable log.
//!
//! The signed text is `<timestamp>.<body>`: the Unix time in seconds as
//! decimal digits, a dot, then the body bytes exactly as sent. The signature
//! header is `sha256=<64 lowercase hex digits>`. A receiver recomputes it,
//! compares in constant time, and refuses timestamps outside its window.

use hmac::{Hmac, Mac};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretBox, SecretSlice};
use sha2::Sha256;

/// HTTP header carrying the signing time: Unix seconds as decimal digits.
pub const HDR_TIMESTAMP: &str = "X-Flowledger-Timestamp";
/// HTTP header carrying the signature, `sha256=<64 lowercase hex digits>`.
pub const HDR_SIGNATURE: &str = "X-Flowledger-Signature";

/// A shared secret: `Debug` shows its length only, and its bytes are
/// zeroed when dropped.
#[derive(Clone)]
pub struct SigningKey(SecretSlice<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(<{} bytes>)", self.0.expose_secret().len())
    }
}

impl SigningKey {
    /// At least 16 bytes; shorter secrets are refused as guessable.
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < 16 {
            return Err(format!(
                "a signing secret needs at least 16 bytes, this one has {}",
                secret.len()
            ));
        }
        Ok(SigningKey(secret.to_vec().into()))
    }

    fn mac(&self, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // Hmac accepts keys of any length: this cannot fail
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.expose_secret())
            .expect("HMAC-SHA256 takes keys of any length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `X-Flowledger-Signature` value for `body` sent at `timestamp`.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        format!(
            "sha256={}",
            hex::encode(self.mac(timestamp, body).finalize().into_bytes())
        )
    }

    /// Checks a received signature; the comparison is constant-time.
    pub fn verify(
        &self,
        timestamp_header: Option<&str>,
        signature_header: Option<&str>,
        body: &[u8],
        now: i64,
        window_secs: i64,
    ) -> Result<i64, SignatureError> {
        let ts_text = timestamp_header.ok_or(SignatureError::Missing(HDR_TIMESTAMP))?;
        let sig = signature_header.ok_or(SignatureError::Missing(HDR_SIGNATURE))?;
        let ts: i64 = ts_text.parse().map_err(|_| SignatureError::BadTimestamp)?;
        // any i64 may arrive: compare without overflowing (`now - ts` can
        // exceed i64; its absolute value always fits in a u64). A negative
        // window (a wrapped setting) admits nothing.
        if !u64::try_from(window_secs).is_ok_and(|w| now.abs_diff(ts) <= w) {
            return Err(SignatureError::Stale {
                age: now.saturating_sub(ts),
                window: window_secs,
            });
        }
        let hex_sig = sig
            .strip_prefix("sha256=")
            .ok_or(SignatureError::Malformed)?;
        if hex_sig.len() != 64 {
            return Err(SignatureError::Malformed);
        }
        let raw = hex::decode(hex_sig).map_err(|_| SignatureError::Malformed)?;
        self.mac(ts, body)
            .verify_slice(&raw)
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(ts)
    }
}

/// Why a signature was refused; safe to show to the sender (no secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The named header (timestamp or signature) is absent; the sender must sign.
    #[error("missing header {0}")]
    Missing(&'static str),
    /// The timestamp header is not an integer number of Unix seconds.
    #[error("{HDR_TIMESTAMP} is not a Unix time in seconds")]
    BadTimestamp,
    /// The timestamp is further from now than the window allows; the
    /// sender's clock is off or the message is old.
    #[error(
        "timestamp is {age} s from now, outside the {window} s window; check the sender's clock"
    )]
    Stale {
        /// Seconds from the timestamp to now (negative: in the future), saturated.
        age: i64,
        /// The accepted distance in seconds, either way.
        window: i64,
    },
    /// The signature header is not `sha256=` followed by 64 hex digits.
    #[error("{HDR_SIGNATURE} is not sha256=<64 hex digits>")]
    Malformed,
    /// Well-formed but wrong: another key, or the body or timestamp changed.
    #[error("signature does not match the body and timestamp; check the shared secret")]
    Mismatch,
    /// The callback's nonce was seen before (raised by the n8n endpoint, not by
    /// [`SigningKey::verify`]); a signed callback is accepted once.
    #[error("nonce was already used; a callback is accepted once")]
    Replayed,
}

impl SignatureError {
    /// A short stable code for events and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing(_) => "missing_signature",
            SignatureError::BadTimestamp | SignatureError::Malformed => "malformed_signature",
            SignatureError::Stale { .. } => "stale_timestamp",
            SignatureError::Mismatch => "bad_signature",
            SignatureError::Replayed => "replayed_nonce",
        }
    }
}

/// A value sealed with XChaCha20-Poly1305 by one key of a [`SealKeys`]
/// ring: what events store in place of a secret. Hex fields; `key_id` names
/// the key that opens it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The id of the ring key that sealed it (`<id>:<hex>` in the setting).
    pub key_id: String,
    /// The 24-byte nonce, hex.
    pub nonce: String,
    /// Ciphertext with its 16-byte Poly1305 tag, hex.
    pub ciphertext: String,
}

/// A ring of 32-byte sealing keys with ids. The first seals; every one
/// opens, so a key can be rotated by putting the new one first and keeping
/// the old ones until nothing sealed with them is still needed. `Debug`
/// shows the ids only.
///
/// Sealing is deterministic (a synthetic nonce: HMAC-SHA256 of the
/// plaintext under a key derived from the sealing key), so the same
/// plaintext seals to the same value and a command decided twice writes the
/// same event. It reveals only whether two sealed values are equal.
#[derive(Clone)]
pub struct SealKeys {
    /// (id, key): the keys in a `SecretBox`, zeroed on drop, never in a
    /// `Debug`.
    keys: Vec<(String, Arc<SecretBox<[u8; 32]>>)>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "SealKeys({ids:?})")
    }
}

/// Why a sealed value cannot be opened; never shows key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The ring has no key with the value's `key_id`; add that key back.
    #[error("no sealing key with id {0:?} is configured; add it to the seal key ring")]
    UnknownKey(String),
    /// The value is not hex of the right lengths, or fails authentication
    /// (altered, or sealed by a different key with the same id).
    #[error("the sealed value with key id {0:?} is damaged or was sealed by another key")]
    Damaged(String),
}

/// What binds a sealed value to its use: a value sealed for one purpose
/// does not open for another.
const SEAL_AAD: &[u8] = b"flowledger sealed v1";

impl SealKeys {
    /// Parses `<id>:<64 hex digits>[,<id>:<64 hex digits>...]`; the first key
    /// seals. Ids are 1 to 64 characters of `[A-Za-z0-9._-]`, unique. The
    /// error names the entry by position, never its key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, entry) in text.split(',').map(str::trim).enumerate() {
            let Some((id, hex_key)) = entry.split_once(':') else {
                return Err(format!("entry {} is not <key id>:<64 hex digits>", i + 1));
            };
            let id_ok = (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !id_ok {
                return Err(format!(
                    "entry {}: key id must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                    i + 1
                ));
            }
            let Some(key) = hex::decode(hex_key.trim())
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
            else {
                // named by position: a swapped `<key>:<id>` would otherwise
                // echo the key as an id
                return Err(format!(
                    "entry {}: the key after the ':' must be 64 hex digits (32 bytes)",
                    i + 1
                ));
            };
            if keys.iter().any(|(k, _)| k == id) {
                return Err(format!("entry {}: its key id appears twice", i + 1));
            }
            keys.push((id.to_string(), Arc::new(SecretBox::new(Box::new(key)))));
        }
        if keys.is_empty() {
            return Err("no key given".into());
        }
        Ok(SealKeys { keys })
    }

    /// A ring of the one key `key` with id `id` (a data subject's key,
    /// docs/MEMORY.md).
    pub fn single(id: &str, key: [u8; 32]) -> Self {
        SealKeys {
            keys: vec![(id.to_string(), Arc::new(SecretBox::new(Box::new(key))))],
        }
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    fn nonce_for(key: &[u8; 32], plaintext: &[u8]) -> [u8; 24] {
        let mut nonce_key = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .expect("HMAC-SHA256 takes keys of any length");
        nonce_key.update(b"flowledger seal nonce key");
        let derived = nonce_key.finalize().into_bytes();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&derived)
            .expect("HMAC-SHA256 takes keys of any length");
        mac.update(plaintext);
        let full = mac.finalize().into_bytes();
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&full[..24]);
        nonce
    }

    /// Seals `plaintext` with the first key.
    pub fn seal(&self, plaintext: &[u8]) -> Sealed {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let (id, key) = &self.keys[0];
        let key = key.expose_secret();
        let nonce = Self::nonce_for(key, plaintext);
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(key.into());
        let ciphertext = cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: SEAL_AAD,
                },
            )
            // the AEAD fails only for plaintexts beyond 2^38 bytes
            .expect("XChaCha20-Poly1305 seals any plaintext under 256 GiB");
        Sealed {
            key_id: id.clone(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ciphertext),
        }
    }

    /// Opens a value sealed by any key of the ring.
    pub fn open(&self, sealed: &Sealed) -> Result<Vec<u8>, OpenError> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == sealed.key_id) else {
            return Err(OpenError::UnknownKey(sealed.key_id.clone()));
        };
        let damaged = || OpenError::Damaged(sealed.key_id.clone());
        let nonce: [u8; 24] = hex::decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(damaged)?;
        let ciphertext = hex::decode(&sealed.ciphertext).map_err(|_| damaged())?;
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(key.expose_secret().into());
        cipher
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: &ciphertext,
                    aad: SEAL_AAD,
                },
            )
            .map_err(|_| damaged())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn sealed_values_open_after_rotation_and_not_with_another_key() {
        let old = SealKeys::parse(&format!("k1:{K1}")).unwrap();
        let sealed = old.seal(b"https://u:p@r.example/cb?token=t");
        assert_eq!(sealed.key_id, "k1");
        assert!(!sealed.ciphertext.contains(&hex::encode("token=t")));
        // deterministic: the same plaintext seals the same way
        assert_eq!(sealed, old.seal(b"https://u:p@r.example/cb?token=t"));
        assert_ne!(sealed, old.seal(b"https://u:p@r.example/cb?token=u"));
        let rotated = SealKeys::parse(&format!("k2:{K2}, k1:{K1}")).unwrap();
        assert_eq!(rotated.current_id(), "k2");
        assert_eq!(
            rotated.open(&sealed).unwrap(),
            b"https://u:p@r.example/cb?token=t"
        );
        assert_eq!(rotated.seal(b"x").key_id, "k2");
        let other = SealKeys::parse(&format!("k2:{K2}")).unwrap();
        assert_eq!(other.open(&sealed), Err(OpenError::UnknownKey("k1".into())));
        let impostor = SealKeys::parse(&format!("k1:{K2}")).unwrap();
        assert_eq!(impostor.open(&sealed), Err(OpenError::Damaged("k1".into())));
        let mut flipped = sealed.clone();
        flipped.ciphertext.replace_range(0..2, "00");
        if flipped != sealed {
            assert!(old.open(&flipped).is_err());
        }
    }

    #[test]
    fn seal_key_rings_are_checked_without_echoing_keys() {
        for bad in [
            "",
            "k1",
            "k1:abcd",
            &format!("bad id:{K1}"),
            &format!("k:{K1},k:{K2}"),
            &format!("{K1}:k1"),
        ] {
            let e = SealKeys::parse(bad).unwrap_err();
            assert!(!e.contains("1111") && !e.contains("abcd"), "{e}");
        }
        assert_eq!(
            format!("{:?}", SealKeys::parse(&format!("k1:{K1}")).unwrap()),
            "SealKeys([\"k1\"])"
        );
    }

    #[test]
    fn extreme_timestamps_are_stale_not_a_panic() {
        let key = SigningKey::new(b"0123456789abcdef").unwrap();
        let now = 1_764_000_000;
        for ts in [
            i64::MIN,
            i64::MIN + 1,
            -1,
            0,
            i64::MAX,
            now - 301,
            now + 301,
        ] {
            let body = b"{}";
            let sig = key.sign(ts, body);
            let r = key.verify(Some(&ts.to_string()), Some(&sig), body, now, 300);
            assert!(
                matches!(r, Err(SignatureError::Stale { .. })),
                "timestamp {ts}: {r:?}"
            );
        }
        let sig = key.sign(now - 300, b"{}");
        assert_eq!(
            key.verify(Some(&(now - 300).to_string()), Some(&sig), b"{}", now, 300),
            Ok(now - 300)
        );
    }

    /// The worked example of docs/CALLBACKS.md: a receiver in any language
    /// must produce the same signature from the same key, timestamp and body.
    #[test]
    fn worked_example() {
        let key = SigningKey::new(b"whsec_example_key_0123456789").unwrap();
        let body = br#"{"job_id":"job-42","status":"success"}"#;
        let sig = key.sign(1_795_000_000, body);
        assert_eq!(
            sig,
            "sha256=d111349411ec59770cfc5d709b3a4eee5cdd4f36fc59a37460e51db0cf21deaf"
        );
    }

    #[test]
    fn verify_accepts_own_signature_and_refuses_changes() {
        let key = SigningKey::new(b"0123456789abcdef").unwrap();
        let body = b"{}";
        let sig = key.sign(1000, body);
        assert_eq!(
            key.verify(Some("1000"), Some(&sig), body, 1010, 300),
            Ok(1000)
        );
        assert_eq!(
            key.verify(Some("1000"), Some(&sig), b"{ }", 1010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            key.verify(Some("1001"), Some(&sig), body, 1010, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            key.verify(Some("1000"), Some(&sig), body, 2000, 300),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            key.verify(None, Some(&sig), body, 1000, 300),
            Err(SignatureError::Missing(HDR_TIMESTAMP))
        );
        assert_eq!(
            key.verify(Some("1000"), Some("sha256=zz"), body, 1000, 300),
            Err(SignatureError::Malformed)
        );
        let other = SigningKey::new(b"fedcba9876543210").unwrap();
        assert_eq!(
            other.verify(Some("1000"), Some(&sig), body, 1000, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        assert!(SigningKey::new(b"short").is_err());
        let k = SigningKey::new(b"a-very-secret-value!").unwrap();
        assert!(!format!("{k:?}").contains("secret"));
    }
}
