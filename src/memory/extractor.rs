//! The extractor: an HTTP peer (`POST <url>`, `[memory.extractor]`) where
//! the language model lives, which reads a conversation turn and answers
//! the facts it holds (docs/MEMORY.md "Extraction").
//!
//! A request is `{"episode_id", "occurred_at", "messages": [{"role",
//! "content"}], "response"}`: the turn and nothing about whose it is (no
//! owner, no subject id). The answer is `{"facts": [{"subject"?, "key",
//! "value", "confidence", "source"?}], "model"?}`, checked strictly
//! ([`parse_answer`]): at most [`MAX_MEMORY_FACTS`] facts, each with the
//! bounds of a writeback's facts, a confidence from 0 to 1, no two with the
//! same subject and key. The API key is read as the embedder's is
//! ([`crate::memory::peer`]). Nothing here logs or returns a text, a fact
//! or the key.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::bus::CommandBus;
use crate::commands::limits::MAX_MEMORY_FACTS;
use crate::config::ExtractorSection;
use crate::memory::peer::{PeerClient, PeerError};
use crate::memory::service::{checked_fact, CheckedFact};
use crate::secrets::service::SecretService;

/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A fact's subject when the extractor names none.
pub const DEFAULT_SUBJECT: &str = "user";

/// The configured extractor.
pub struct Extractor {
    cfg: ExtractorSection,
    client: PeerClient,
}

impl std::fmt::Debug for Extractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extractor")
            .field("url", &crate::commands::redact::display(&self.cfg.url))
            .field("extract", &self.cfg.extract)
            .field("api_key", &self.client.key_name())
            .finish()
    }
}

/// What the extractor answered, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The facts, normalised as a writeback's are.
    pub facts: Vec<CheckedFact>,
    /// The model it named, if any.
    pub model: Option<String>,
}

#[derive(Deserialize)]
struct Answer {
    facts: Vec<Value>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fact {
    #[serde(default)]
    subject: Option<String>,
    key: String,
    value: Value,
    confidence: f64,
    /// The peer's own note of where it found the fact: checked, not
    /// recorded (it may quote the turn).
    #[serde(default)]
    source: Option<String>,
}

impl Extractor {
    /// An extractor for `cfg` (checked); `secrets` reads its API key, when
    /// it has one.
    pub fn new(cfg: ExtractorSection, secrets: Option<Arc<SecretService>>) -> Result<Self, String> {
        cfg.check()?;
        let client = PeerClient::new(
            "memory.extractor",
            "memory.extractor.api_key_secret",
            cfg.api_key_ref(),
            secrets,
        )?;
        Ok(Extractor { cfg, client })
    }

    /// The configuration.
    pub fn config(&self) -> &ExtractorSection {
        &self.cfg
    }

    /// One call: the facts of the turn `request`, within `timeout_ms`; a
    /// read of the API key is recorded on `bus`.
    pub async fn extract(&self, bus: &CommandBus, request: &Value) -> Result<Extracted, PeerError> {
        let limit = Duration::from_millis(self.cfg.timeout_ms);
        let call = self
            .client
            .post_json(bus, &self.cfg.url, request, limit, MAX_ANSWER_BYTES);
        let bytes = match tokio::time::timeout(limit, call).await {
            Ok(r) => r?,
            Err(_) => return Err(PeerError::Timeout(self.cfg.timeout_ms)),
        };
        parse_answer(&bytes)
    }
}

/// The facts of an answer, checked: at most [`MAX_MEMORY_FACTS`], each
/// `{subject?, key, value, confidence, source?}` with a writeback fact's
/// bounds, a confidence from 0 to 1, no repeated subject and key; `model`
/// 1 to 200 printable characters. The reason of a refusal names the field,
/// never a value.
pub fn parse_answer(bytes: &[u8]) -> Result<Extracted, PeerError> {
    let bad = PeerError::BadAnswer;
    // serde's messages may quote the answer: only the shape is said
    let answer: Answer = serde_json::from_slice(bytes)
        .map_err(|_| bad("not {\"facts\": [...], \"model\"?: string}".into()))?;
    if answer.facts.len() > MAX_MEMORY_FACTS {
        return Err(bad(format!(
            "{} facts, at most {MAX_MEMORY_FACTS} are taken",
            answer.facts.len()
        )));
    }
    if answer
        .model
        .as_deref()
        .is_some_and(|m| !crate::commands::memory::is_model_name(m))
    {
        return Err(bad(
            "model must be 1 to 200 characters of A-Z a-z 0-9 . _ : / @ + -".into(),
        ));
    }
    let mut facts: Vec<CheckedFact> = Vec::with_capacity(answer.facts.len());
    for (i, raw) in answer.facts.into_iter().enumerate() {
        let f: Fact = serde_json::from_value(raw).map_err(|_| {
            bad(format!(
                "facts[{i}] is not {{\"subject\"?, \"key\", \"value\", \"confidence\", \"source\"?}}"
            ))
        })?;
        if f.source.as_ref().is_some_and(|s| s.chars().count() > 256) {
            return Err(bad(format!(
                "facts[{i}].source is longer than 256 characters"
            )));
        }
        if !f.confidence.is_finite() {
            return Err(bad(format!("facts[{i}].confidence is not a number")));
        }
        let subject = f.subject.as_deref().unwrap_or(DEFAULT_SUBJECT);
        let fact = checked_fact(
            &format!("facts[{i}]"),
            subject,
            &f.key,
            &f.value,
            f.confidence,
        )
        .map_err(|e| {
            bad(format!(
                "{}: {}",
                e.field.as_deref().unwrap_or("facts"),
                e.message
            ))
        })?;
        if facts
            .iter()
            .any(|g| g.subject == fact.subject && g.key == fact.key)
        {
            return Err(bad(format!(
                "facts[{i}] has the subject and key of an earlier fact"
            )));
        }
        facts.push(fact);
    }
    Ok(Extracted {
        facts,
        model: answer.model,
    })
}

/// The request for a turn: the opened `EpisodeRecorded.turn` (`{"messages",
/// "response"}`) with the episode's id and time; `None` when the turn does
/// not have that shape.
pub fn request(episode_id: &str, occurred_at: &str, turn: &Value) -> Option<Value> {
    let messages = turn.get("messages").filter(|m| m.is_array())?;
    let response = match turn.get("response") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(_) => return None,
    };
    let mut out = Map::new();
    out.insert("episode_id".into(), Value::String(episode_id.into()));
    out.insert("occurred_at".into(), Value::String(occurred_at.into()));
    out.insert("messages".into(), messages.clone());
    out.insert("response".into(), response);
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_normalised_and_checked_without_their_values() {
        let a = json!({"model": "llm-1", "usage": {"tokens": 3}, "facts": [
            {"key": " City ", "value": "Lyon", "confidence": 0.8},
            {"subject": "User.Car", "key": "colour", "value": {"name": "red"}, "confidence": 1, "source": "message 0"},
        ]});
        let got = parse_answer(a.to_string().as_bytes()).expect("a good answer");
        assert_eq!(got.model.as_deref(), Some("llm-1"));
        assert_eq!(
            (got.facts[0].subject.as_str(), got.facts[0].key.as_str()),
            ("user", "city")
        );
        assert_eq!(got.facts[1].subject, "user.car");
        assert_eq!(got.facts[1].value, json!({"name": "red"}));
        assert!(parse_answer(br#"{"facts": []}"#)
            .expect("no facts")
            .facts
            .is_empty());
        let many: Vec<Value> = (0..=MAX_MEMORY_FACTS)
            .map(|i| json!({"key": format!("k{i}"), "value": 1, "confidence": 1}))
            .collect();
        for (bad, why) in [
            (json!({"error": "the secret words"}), "not {"),
            (json!("the secret words"), "not {"),
            (json!({"facts": "the secret words"}), "not {"),
            (
                json!({"facts": [{"key": "k", "value": "the secret words", "confidence": 1.5}]}),
                "facts[0].confidence",
            ),
            (
                json!({"facts": [{"key": "k", "value": "the secret words", "confidence": -0.1}]}),
                "facts[0].confidence",
            ),
            (
                json!({"facts": [{"key": "k", "value": "the secret words"}]}),
                "facts[0] is not",
            ),
            (
                json!({"facts": [{"key": "k", "value": null, "confidence": 1}]}),
                "facts[0].value",
            ),
            (
                json!({"facts": [{"key": " ", "value": "the secret words", "confidence": 1}]}),
                "facts[0].key",
            ),
            (
                json!({"facts": [{"key": "k".repeat(257), "value": 1, "confidence": 1}]}),
                "facts[0].key",
            ),
            (
                json!({"facts": [{"key": "k", "value": "x".repeat(5000), "confidence": 1}]}),
                "facts[0].value",
            ),
            (
                json!({"facts": [{"key": "k", "value": 1, "confidence": 1, "opinion": "the secret words"}]}),
                "facts[0] is not",
            ),
            (
                json!({"facts": [{"key": "K", "value": 1, "confidence": 1}, {"key": "k ", "value": 2, "confidence": 1}]}),
                "facts[1] has the subject and key",
            ),
            (json!({"facts": many}), "at most 100"),
            (json!({"facts": [], "model": ""}), "model"),
            (json!({"facts": [], "model": 7}), "not {"),
        ] {
            let e = parse_answer(bad.to_string().as_bytes()).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(!e.to_string().contains("secret words"), "{e}");
            assert!(!e.is_retryable(), "{e}");
        }
        assert!(parse_answer(b"<html>502 Bad Gateway</html>").is_err());
    }

    #[test]
    fn the_request_holds_the_turn_and_nothing_about_its_owner() {
        let turn = json!({"messages": [{"role": "user", "content": "I moved to Lyon"}], "response": "Noted."});
        let r = request("t1", "2026-12-01T10:00:00Z", &turn).expect("a turn");
        assert_eq!(
            r,
            json!({"episode_id": "t1", "occurred_at": "2026-12-01T10:00:00Z",
                   "messages": [{"role": "user", "content": "I moved to Lyon"}], "response": "Noted."})
        );
        assert!(request("t1", "x", &json!({"messages": "no"})).is_none());
        assert!(request("t1", "x", &json!({"messages": [], "response": 3})).is_none());
    }
}
