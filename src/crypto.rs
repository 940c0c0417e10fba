//! Shared crypto: HMAC-SHA256 signatures on callbacks, both ways
//! (docs/CALLBACKS.md): the job's result callbacks flowledger sends and the
//! n8n results it receives.
//!
//! The signed text is `<timestamp>.<body>`: the Unix time in seconds as
//! decimal digits, a dot, then the body bytes exactly as sent. The signature
//! header is `sha256=<64 lowercase hex digits>`. A receiver recomputes it,
//! compares in constant time, and refuses timestamps outside its window.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HTTP header carrying the signing time: Unix seconds as decimal digits.
pub const HDR_TIMESTAMP: &str = "X-Flowledger-Timestamp";
/// HTTP header carrying the signature, `sha256=<64 lowercase hex digits>`.
pub const HDR_SIGNATURE: &str = "X-Flowledger-Signature";

/// A shared secret. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(<{} bytes>)", self.0.len())
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
        Ok(SigningKey(secret.to_vec()))
    }

    fn mac(&self, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // Hmac accepts keys of any length: this cannot fail
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
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

#[cfg(test)]
mod tests {
    use super::*;

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
