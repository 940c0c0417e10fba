//! The embedder: an OpenAI-compatible embeddings endpoint
//! (`POST <url>/embeddings`, `[memory.embedder]`), and the encoding of its
//! vectors in events.
//!
//! A request is `{"model", "input": [texts], "dimensions"?}`; the answer's
//! `data[i].embedding`, ordered by `data[i].index`, must hold exactly
//! `dimensions` finite numbers each, one per text, or the answer is
//! refused. The API key (`api_key_secret`) is read through the secrets
//! capability as the handler (`flowledger-handler`, role `handler`), kept
//! in memory, sent only as `Authorization: Bearer`, read again after a 401.
//! Nothing here logs or returns a text, a vector or the key: errors name
//! the kind of failure and the peer's status only.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::bus::CommandBus;
use crate::config::EmbedderSection;
use crate::memory::peer::PeerClient;
pub use crate::memory::peer::{PeerError as EmbedError, KEY_ROLE};
use crate::projections::db::VectorSpace;
use crate::secrets::service::SecretService;

/// Texts sent in one request; more are sent in several.
const MAX_INPUTS_PER_REQUEST: usize = 32;

/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The configured embedder.
pub struct Embedder {
    cfg: EmbedderSection,
    client: PeerClient,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("endpoint", &self.cfg.endpoint())
            .field("model", &self.cfg.model)
            .field("dimensions", &self.cfg.dimensions)
            .field("api_key", &self.client.key_name())
            .finish()
    }
}

#[derive(Deserialize)]
struct Answer {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    index: Option<usize>,
    embedding: Vec<f64>,
}

impl Embedder {
    /// An embedder for `cfg` (checked); `secrets` reads its API key, when
    /// it has one.
    pub fn new(cfg: EmbedderSection, secrets: Option<Arc<SecretService>>) -> Result<Self, String> {
        cfg.check()?;
        let client = PeerClient::new(
            "memory.embedder",
            "memory.embedder.api_key_secret",
            cfg.api_key_ref(),
            secrets,
        )?;
        Ok(Embedder { cfg, client })
    }

    /// The configuration.
    pub fn config(&self) -> &EmbedderSection {
        &self.cfg
    }

    /// The vector space its vectors are of ([`space_of`]).
    pub fn space(&self) -> VectorSpace {
        space_of(self.config())
    }

    /// One vector per text, within `limit` (at most the configured
    /// `timeout_ms`); a read of the API key is recorded on `bus`.
    pub async fn embed(
        &self,
        bus: &CommandBus,
        texts: &[String],
        limit: Option<Duration>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let configured = Duration::from_millis(self.cfg.timeout_ms);
        let limit = limit.map_or(configured, |l| l.min(configured));
        // servers cap the inputs of one request (TEI: 32 by default)
        let all = async {
            let mut out = Vec::with_capacity(texts.len());
            for batch in texts.chunks(MAX_INPUTS_PER_REQUEST) {
                out.extend(self.embed_once(bus, batch, limit).await?);
            }
            Ok(out)
        };
        match tokio::time::timeout(limit, all).await {
            Ok(r) => r,
            Err(_) => Err(EmbedError::Timeout(limit.as_millis() as u64)),
        }
    }

    async fn embed_once(
        &self,
        bus: &CommandBus,
        texts: &[String],
        limit: Duration,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut body = json!({"model": self.cfg.model, "input": texts});
        if self.cfg.send_dimensions {
            body["dimensions"] = json!(self.cfg.dimensions);
        }
        let bytes = self
            .client
            .post_json(bus, &self.cfg.endpoint(), &body, limit, MAX_ANSWER_BYTES)
            .await?;
        parse_answer(&bytes, texts.len(), self.cfg.dimensions)
    }
}

/// The vectors of an answer to `n` texts, each of `dimensions` finite
/// numbers, in `index` order.
pub fn parse_answer(bytes: &[u8], n: usize, dimensions: u32) -> Result<Vec<Vec<f32>>, EmbedError> {
    // serde's messages may quote the answer, which may echo the input:
    // only the shape is said
    let answer: Answer = serde_json::from_slice(bytes).map_err(|_| {
        EmbedError::BadAnswer("not {\"data\": [{\"index\", \"embedding\": [numbers]}]}".into())
    })?;
    if answer.data.len() != n {
        return Err(EmbedError::BadAnswer(format!(
            "{} embeddings for {n} texts",
            answer.data.len()
        )));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for (pos, item) in answer.data.into_iter().enumerate() {
        let i = item.index.unwrap_or(pos);
        if i >= n || out[i].is_some() {
            return Err(EmbedError::BadAnswer(format!(
                "index {i} is out of range or repeated"
            )));
        }
        if item.embedding.len() != dimensions as usize {
            return Err(EmbedError::BadAnswer(format!(
                "an embedding of {} dimensions, {dimensions} are configured",
                item.embedding.len()
            )));
        }
        let v: Vec<f32> = item.embedding.iter().map(|x| *x as f32).collect();
        if v.iter().any(|x| !x.is_finite()) {
            return Err(EmbedError::BadAnswer(
                "a value is not a finite number".into(),
            ));
        }
        // no direction: its cosine distance to anything is undefined (NaN)
        if v.iter().all(|x| *x == 0.0) {
            return Err(EmbedError::BadAnswer("an embedding is all zeros".into()));
        }
        out[i] = Some(v);
    }
    // n items, n distinct indexes below n: every slot is filled
    Ok(out.into_iter().flatten().collect())
}

/// A vector as the bytes that are sealed in `EpisodeEmbedded`: its `f32`
/// values little-endian, one after the other.
pub fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Why sealed vector bytes are not a vector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VectorError {
    /// Not `4 * dimensions` bytes.
    #[error("{len} bytes are not a vector of {dimensions} f32 values")]
    Length {
        /// The bytes' length.
        len: usize,
        /// The dimensions expected.
        dimensions: u32,
    },
    /// A value is NaN or infinite.
    #[error("a value is not a finite number")]
    NotFinite,
}

/// The vector of `bytes` ([`vector_bytes`]), which must hold `dimensions`
/// finite values.
pub fn vector_from_bytes(bytes: &[u8], dimensions: u32) -> Result<Vec<f32>, VectorError> {
    if bytes.len() != dimensions as usize * 4 {
        return Err(VectorError::Length {
            len: bytes.len(),
            dimensions,
        });
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(VectorError::NotFinite);
    }
    Ok(v)
}

/// A reason for `EpisodeEmbeddingFailed`: the error's kind and status.
pub fn failure_reason(e: &EmbedError, attempts: u32) -> String {
    format!("the embedder {e} (after {attempts} attempts)")
}

/// The JSON an embeddings answer has (for tests and tools).
pub fn answer_json(vectors: &[Vec<f32>], model: &str) -> Value {
    json!({
        "object": "list",
        "model": model,
        "data": vectors.iter().enumerate().map(|(i, v)| json!({
            "object": "embedding", "index": i, "embedding": v,
        })).collect::<Vec<_>>(),
    })
}

/// The vector space of the embeddings `cfg` makes: its model and
/// dimensions.
pub fn space_of(cfg: &EmbedderSection) -> VectorSpace {
    VectorSpace {
        model: cfg.model.clone(),
        dimensions: cfg.dimensions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_through_their_bytes() {
        let v = vec![0.0f32, -1.5, 3.25e-8, f32::MAX, f32::MIN_POSITIVE];
        let b = vector_bytes(&v);
        assert_eq!(b.len(), 20);
        assert_eq!(&b[4..8], &(-1.5f32).to_le_bytes());
        assert_eq!(vector_from_bytes(&b, 5).expect("5 values"), v);
        assert_eq!(
            vector_from_bytes(&b, 4),
            Err(VectorError::Length {
                len: 20,
                dimensions: 4
            })
        );
        assert_eq!(
            vector_from_bytes(&b[..19], 5),
            Err(VectorError::Length {
                len: 19,
                dimensions: 5
            })
        );
        let nan = vector_bytes(&[1.0, f32::NAN]);
        assert_eq!(vector_from_bytes(&nan, 2), Err(VectorError::NotFinite));
    }

    #[test]
    fn answers_are_ordered_by_index_and_checked() {
        let a = json!({"data": [
            {"index": 1, "embedding": [0.0, 1.0]},
            {"index": 0, "embedding": [1.0, 0.0]},
        ]});
        let v = parse_answer(a.to_string().as_bytes(), 2, 2).expect("two vectors");
        assert_eq!(v, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        let back = answer_json(&v, "m");
        assert_eq!(
            parse_answer(back.to_string().as_bytes(), 2, 2).expect("own shape"),
            v
        );
        for (bad, why) in [
            (
                json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0]}]}),
                "dimensions",
            ),
            (
                json!({"data": [{"index": 0, "embedding": [1.0, 0.0]}]}),
                "for 2 texts",
            ),
            (
                json!({"data": [{"index": 0, "embedding": [1.0, 0.0]}, {"index": 0, "embedding": [1.0, 0.0]}]}),
                "repeated",
            ),
            (json!({"error": "the secret words"}), "not {"),
            (
                json!({"data": [{"index": 0, "embedding": [1.0, 0.0]}, {"index": 1, "embedding": [0.0, 0.0]}]}),
                "all zeros",
            ),
        ] {
            let e = parse_answer(bad.to_string().as_bytes(), 2, 2).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(!e.to_string().contains("secret words"), "{e}");
            assert!(!e.is_retryable());
        }
        assert!(EmbedError::Status(503).is_retryable());
        assert!(EmbedError::Status(429).is_retryable());
        assert!(!EmbedError::Status(400).is_retryable());
        assert!(EmbedError::Timeout(5).is_retryable());
    }
}
