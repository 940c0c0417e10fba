//! The embedding handler: embeds each recorded episode's chunks with the
//! configured embedder and records the vectors on the subject's aggregate
//! (`RecordEmbeddings` -> `EpisodeEmbedded`), so read models rebuild
//! without the embedder.
//!
//! One durable JetStream pull consumer ([`CONSUMER`], filter
//! `flow.ev.memory.*`, explicit acks) shared by every `serve` instance:
//! each commit is handled by one of them. For each `EpisodeRecorded` it
//! opens the turn with the subject's key, cuts the chunk texts as the read
//! model does ([`chunk_texts`]), calls the embedder (retrying timeouts,
//! connection errors, 429 and 5xx with backoff) and records, as
//! `flowledger-handler` under the command id
//! [`crate::bus::ids::memory_embeddings`], either the sealed vectors or,
//! retries exhausted, `EpisodeEmbeddingFailed` (its reason names the kind
//! of failure only). An erased subject, or an episode already embedded, is
//! acked and skipped. Vault or the log unavailable: the message is
//! redelivered later. No text, vector or key is logged.

use std::sync::Arc;

use tokio::sync::watch;

use crate::bus::CommandBus;
use crate::commands::memory::events::EpisodeRecorded;
use crate::commands::memory::{vector_space, Memory, MemoryCommand, MemoryError};
use crate::crypto::Sealed;
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::log::EventLog;
use crate::events::store::ExecuteError;
use crate::handlers::HANDLER_ACTOR;
use crate::memory::embedder::{failure_reason, vector_bytes, Embedder};
use crate::memory::keys::SubjectKeys;
pub use crate::memory::peer::Later;
use crate::memory::peer::{
    ack_wait, episode_subject, key_outage, run_episode_consumer, with_retries, ConsumerSpec,
    OnEpisode,
};
use crate::projections::memory::chunk_texts;

/// The durable consumers' names begin with this.
pub const CONSUMER: &str = "flowledger-memory-embedder";

/// The durable consumer of vector space `space` ([`vector_space`]):
/// [`CONSUMER`], `-` and 16 hex digits of the space's SHA-256. One per
/// model and dimensions, so a new one (a change of either) reads the log
/// from its start and embeds every episode again in the new space;
/// episodes already embedded in it are skipped without calling the peer.
pub fn consumer_name(space: &str) -> String {
    let digest = crate::events::chain::sha256(space.as_bytes());
    format!("{CONSUMER}-{}", hex::encode(&digest[..8]))
}

/// What became of one episode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `EpisodeEmbedded` recorded (or already was, under this command id).
    Embedded,
    /// `EpisodeEmbeddingFailed` recorded.
    Failed,
    /// Nothing to do: erased subject, episode already embedded or unknown.
    Skipped,
}

/// The handler's parts.
pub struct EmbeddingHandler {
    /// Records the outcomes.
    pub bus: Arc<CommandBus>,
    /// Opens the turns, seals the vectors.
    pub keys: Arc<SubjectKeys>,
    /// The peer.
    pub embedder: Arc<Embedder>,
}

impl EmbeddingHandler {
    /// Embeds episode `e` of subject `aggregate_id` and records the outcome.
    pub async fn handle(&self, aggregate_id: &str, e: &EpisodeRecorded) -> Result<Outcome, Later> {
        let cfg = self.embedder.config();
        let wanted = |m: &Memory| {
            m.episodes.contains(&e.episode_id)
                && !m.is_embedded(&e.episode_id, &cfg.model, cfg.dimensions)
        };
        let found = episode_subject(&self.bus, &self.keys, aggregate_id, &e.episode_id, wanted);
        let Some((subject, key)) = found.await? else {
            return Ok(Outcome::Skipped);
        };
        let failed_subject = subject.clone();
        let texts = key
            .open_json(&e.turn)
            .map_err(|x| x.to_string())
            .and_then(|turn| chunk_texts(&turn, e.messages, &e.chunks).map_err(|x| x.to_string()));
        let outcome = match texts {
            Err(why) => Err(format!("the turn cannot be cut into its chunks: {why}")),
            Ok(texts) => {
                let (r, attempts) =
                    with_retries("embedder", &e.episode_id, cfg.max_attempts, || {
                        self.embedder.embed(&self.bus, &texts, None)
                    })
                    .await;
                key_outage(&r, "embedder")?;
                r.map_err(|x| failure_reason(&x, attempts))
            }
        };
        let space = vector_space(&cfg.model, Some(cfg.dimensions));
        let command_id = crate::bus::ids::memory_embeddings(aggregate_id, &e.episode_id, &space);
        let meta = CommandMeta::originating(
            command_id,
            Actor {
                client_id: HANDLER_ACTOR.into(),
                user_id: None,
            },
            key.keyed_id("command", &["embeddings", &e.episode_id, &space]),
        );
        let (command, done) = match outcome {
            Ok(vectors) => {
                let sealed: Vec<Sealed> =
                    vectors.iter().map(|v| key.seal(&vector_bytes(v))).collect();
                (
                    MemoryCommand::RecordEmbeddings {
                        subject,
                        episode_id: e.episode_id.clone(),
                        model: cfg.model.clone(),
                        dimensions: cfg.dimensions,
                        vectors: sealed,
                    },
                    Outcome::Embedded,
                )
            }
            Err(reason) => {
                tracing::warn!(subject = aggregate_id, episode = %e.episode_id, %reason,
                    "memory embeddings: recording the failure");
                (
                    MemoryCommand::RecordEmbeddingFailure {
                        subject,
                        episode_id: e.episode_id.clone(),
                        model: cfg.model.clone(),
                        dimensions: cfg.dimensions,
                        reason,
                    },
                    Outcome::Failed,
                )
            }
        };
        match self.bus.memory(aggregate_id, command, &meta).await {
            Ok(_) => Ok(done),
            Err(ExecuteError::Rejected(
                MemoryError::AlreadyEmbedded(_) | MemoryError::Erased(_) | MemoryError::NotFound(_),
            )) => Ok(Outcome::Skipped),
            Err(ExecuteError::Rejected(x)) => {
                tracing::error!(subject = aggregate_id, episode = %e.episode_id, error = %x,
                    "memory embeddings: refused; episode skipped");
                Ok(Outcome::Skipped)
            }
            Err(ExecuteError::Conflict { .. }) | Err(ExecuteError::Store(_)) => Err(
                Later::Unavailable(format!("record the embeddings of subject {aggregate_id}")),
            ),
            // too many chunks for one event: recorded as a failure, not lost
            Err(ExecuteError::TooLarge(_)) if matches!(done, Outcome::Embedded) => {
                let reason = format!(
                    "the vectors of {} chunks of {} dimensions are too large for one event",
                    e.chunks.len(),
                    cfg.dimensions
                );
                tracing::warn!(subject = aggregate_id, episode = %e.episode_id, %reason,
                    "memory embeddings: recording the failure");
                let failure = MemoryCommand::RecordEmbeddingFailure {
                    subject: failed_subject,
                    episode_id: e.episode_id.clone(),
                    model: cfg.model.clone(),
                    dimensions: cfg.dimensions,
                    reason,
                };
                match self.bus.memory(aggregate_id, failure, &meta).await {
                    Ok(_) => Ok(Outcome::Failed),
                    Err(ExecuteError::Rejected(_)) => Ok(Outcome::Skipped),
                    Err(_) => Err(Later::Unavailable(format!(
                        "record the embedding failure of subject {aggregate_id}"
                    ))),
                }
            }
            Err(x) => {
                tracing::error!(subject = aggregate_id, episode = %e.episode_id, error = %x,
                    "memory embeddings: not recorded; episode skipped");
                Ok(Outcome::Skipped)
            }
        }
    }

    /// Consumes the memory events until `stop`.
    pub async fn run(self, log: EventLog, stop: watch::Receiver<bool>) {
        let cfg = self.embedder.config();
        let space = vector_space(&cfg.model, Some(cfg.dimensions));
        let spec = ConsumerSpec {
            name: consumer_name(&space),
            description: format!("flowledger memory embeddings, {space}"),
            ack_wait: ack_wait(cfg.timeout_ms, cfg.max_attempts),
        };
        run_episode_consumer(self, spec, log, stop).await
    }
}

impl OnEpisode for EmbeddingHandler {
    async fn on_episode(&self, aggregate_id: &str, e: &EpisodeRecorded) -> Result<(), Later> {
        self.handle(aggregate_id, e).await.map(|_| ())
    }
}
