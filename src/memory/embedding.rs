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
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use futures::StreamExt;
use tokio::sync::watch;

use crate::bus::CommandBus;
use crate::commands::memory::events::{EpisodeRecorded, MemoryEvent};
use crate::commands::memory::{MemoryCommand, MemoryError, SubjectRef};
use crate::crypto::Sealed;
use crate::events::envelope::{decode_commit, Actor, CommandMeta};
use crate::events::log::{EventLog, EVENT_SUBJECT_PREFIX};
use crate::events::store::{decode_event, ExecuteError};
use crate::handlers::HANDLER_ACTOR;
use crate::memory::embedder::{failure_reason, vector_bytes, Embedder};
use crate::memory::keys::{KeyError, SubjectKeys};
use crate::projections::memory::chunk_texts;

/// The durable consumer's name.
pub const CONSUMER: &str = "flowledger-memory-embedder";

/// Why an episode was not handled now; the message is redelivered.
#[derive(Debug, thiserror::Error)]
pub enum Later {
    /// Vault, the log or the store could not be used.
    #[error("{0}")]
    Unavailable(String),
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

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(7)).min(5_000))
}

impl EmbeddingHandler {
    /// Embeds episode `e` of subject `aggregate_id` and records the outcome.
    pub async fn handle(&self, aggregate_id: &str, e: &EpisodeRecorded) -> Result<Outcome, Later> {
        let loaded =
            self.bus.load_memory(aggregate_id).await.map_err(|x| {
                Later::Unavailable(format!("load memory subject {aggregate_id}: {x}"))
            })?;
        let state = loaded.state;
        if state.erased
            || state.embedded.contains(&e.episode_id)
            || !state.episodes.contains(&e.episode_id)
        {
            return Ok(Outcome::Skipped);
        }
        let Some(owner) = state.owner.clone() else {
            return Ok(Outcome::Skipped);
        };
        let key = match self.keys.get(aggregate_id).await {
            Ok(k) => k,
            Err(KeyError::Erased) => return Ok(Outcome::Skipped),
            Err(x) if x.is_retryable() => {
                return Err(Later::Unavailable(format!(
                    "the key of memory subject {aggregate_id}: {x}"
                )))
            }
            Err(x) => {
                // cannot open: nothing can be embedded, and retrying will not help
                tracing::error!(subject = aggregate_id, episode = %e.episode_id, error = %x,
                    "memory embeddings: the subject's key cannot be used; episode skipped");
                return Ok(Outcome::Skipped);
            }
        };
        let subject = SubjectRef {
            owner,
            subject_id: state.subject_id.clone(),
            key_id: state.key_id.clone(),
        };
        let cfg = self.embedder.config();
        let failed_subject = subject.clone();
        let texts = key
            .open_json(&e.turn)
            .map_err(|x| x.to_string())
            .and_then(|turn| chunk_texts(&turn, e.messages, &e.chunks).map_err(|x| x.to_string()));
        let outcome = match texts {
            Err(why) => Err(format!("the turn cannot be cut into its chunks: {why}")),
            Ok(texts) => {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match self.embedder.embed(&self.bus, &texts, None).await {
                        Ok(v) => break Ok(v),
                        Err(x) if x.is_retryable() && attempt < cfg.max_attempts => {
                            tracing::warn!(subject = aggregate_id, episode = %e.episode_id,
                                attempt, error = %x, "memory embeddings: retrying");
                            tokio::time::sleep(backoff(attempt)).await;
                        }
                        Err(x) => break Err(failure_reason(&x, attempt)),
                    }
                }
            }
        };
        let command_id = crate::bus::ids::memory_embeddings(aggregate_id, &e.episode_id);
        let meta = CommandMeta::originating(
            command_id,
            Actor {
                client_id: HANDLER_ACTOR.into(),
                user_id: None,
            },
            key.keyed_id("command", &["embeddings", &e.episode_id]),
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

    /// Handles every `EpisodeRecorded` of one commit message.
    async fn on_message(&self, payload: &[u8]) -> Result<(), Later> {
        let Ok(records) = decode_commit(payload) else {
            return Ok(()); // not a commit: the projections report it
        };
        for (_, r) in records {
            if r.aggregate_type != "memory" || r.event_type != "EpisodeRecorded" {
                continue;
            }
            match decode_event::<MemoryEvent>(&r) {
                Ok(MemoryEvent::EpisodeRecorded(e)) => {
                    self.handle(&r.aggregate_id, &e).await?;
                }
                Ok(_) => {}
                Err(x) => tracing::error!(subject = %r.aggregate_id, error = %x,
                    "memory embeddings: an EpisodeRecorded does not decode; skipped"),
            }
        }
        Ok(())
    }

    /// Consumes the memory events until `stop`.
    pub async fn run(self, log: EventLog, mut stop: watch::Receiver<bool>) {
        let cfg = self.embedder.config();
        // an episode's whole handling fits: every attempt, its backoff, the record
        let ack_wait = Duration::from_millis(cfg.timeout_ms + 5_000) * cfg.max_attempts
            + Duration::from_secs(30);
        loop {
            if *stop.borrow() {
                return;
            }
            let consumer = log
                .stream()
                .get_or_create_consumer(
                    CONSUMER,
                    pull::Config {
                        durable_name: Some(CONSUMER.into()),
                        description: Some("flowledger memory embeddings".into()),
                        filter_subject: format!("{EVENT_SUBJECT_PREFIX}.memory.*"),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait,
                        max_ack_pending: 64,
                        ..Default::default()
                    },
                )
                .await;
            let messages = match consumer {
                Ok(c) => c.messages().await,
                Err(e) => {
                    tracing::warn!(error = %e, "memory embeddings: the consumer; retrying");
                    if sleep_or_stop(&mut stop, Duration::from_secs(2)).await {
                        return;
                    }
                    continue;
                }
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "memory embeddings: consume; retrying");
                    if sleep_or_stop(&mut stop, Duration::from_secs(2)).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.changed() => return,
                    n = messages.next() => n,
                };
                let m: jetstream::Message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "memory embeddings: a message; reconnecting");
                        break;
                    }
                    None => break,
                };
                let kind = match self.on_message(&m.payload).await {
                    Ok(()) => AckKind::Ack,
                    Err(Later::Unavailable(why)) => {
                        tracing::warn!(%why, "memory embeddings: later");
                        AckKind::Nak(Some(Duration::from_secs(2)))
                    }
                };
                if let Err(e) = m.ack_with(kind).await {
                    tracing::warn!(error = %e, "memory embeddings: ack");
                }
            }
            if sleep_or_stop(&mut stop, Duration::from_millis(500)).await {
                return;
            }
        }
    }
}

/// Sleeps `d`; true when `stop` came first.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(d) => *stop.borrow(),
    }
}
