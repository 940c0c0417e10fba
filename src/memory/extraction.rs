//! The extraction handler: asks the configured extractor for the facts of
//! each recorded episode that asked for extraction and records them on the
//! subject's aggregate (`RecordExtractedFacts` -> `EpisodeExtracted` and
//! `FactRecorded`, source `extractor`), so read models rebuild without the
//! extractor.
//!
//! One durable JetStream pull consumer ([`CONSUMER`], filter
//! `flow.ev.memory.*`, explicit acks) shared by every `serve` instance, run
//! by the loop the embedding handler uses ([`run_episode_consumer`]). For
//! each `EpisodeRecorded` with `extract` it opens the turn with the
//! subject's key, sends it to the extractor (retrying timeouts, connection
//! errors, 429 and 5xx with backoff, up to `max_attempts`) and records,
//! through the memory service as `flowledger-handler` under the command id
//! [`crate::bus::ids::memory_extraction`], either the facts (sealed with
//! the subject's key) or `EpisodeExtractionFailed` with a reason code. An
//! erased subject, or an episode whose extraction is recorded already, is
//! acked and skipped. Vault or the log unavailable: redelivered later. No
//! text, fact or key is logged.

use std::sync::Arc;

use tokio::sync::watch;

use crate::bus::CommandBus;
use crate::commands::memory::events::EpisodeRecorded;
use crate::commands::memory::{Memory, MemoryError};
use crate::events::envelope::format_time;
use crate::events::log::EventLog;
use crate::events::store::ExecuteError;
use crate::memory::extractor::{request, Extractor};
use crate::memory::peer::{
    ack_wait, episode_subject, key_outage, run_episode_consumer, with_retries, ConsumerSpec, Later,
    OnEpisode, PeerError,
};
use crate::memory::service::{ExtractionOutcome, MemoryService};

/// The durable consumer's name.
pub const CONSUMER: &str = "flowledger-memory-extractor";

/// What became of one episode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `EpisodeExtracted` recorded (or already was, under this command id).
    Extracted,
    /// `EpisodeExtractionFailed` recorded.
    Failed,
    /// Nothing to do: not asked, erased subject, outcome already recorded.
    Skipped,
}

/// The handler's parts.
pub struct ExtractionHandler {
    /// Records the outcomes.
    pub bus: Arc<CommandBus>,
    /// Opens the turns, seals the facts.
    pub memory: Arc<MemoryService>,
    /// The peer.
    pub extractor: Arc<Extractor>,
}

/// The reason code and status of a failure of the extractor.
fn failure(e: &PeerError) -> (&'static str, Option<u16>) {
    match e {
        PeerError::Timeout(_) => ("timeout", None),
        PeerError::Connect => ("unreachable", None),
        PeerError::Status(s) => ("status", Some(*s)),
        PeerError::BadAnswer(_) => ("bad_answer", None),
        PeerError::Key(_) | PeerError::KeyUnavailable(_) => ("api_key", None),
    }
}

impl ExtractionHandler {
    /// Extracts the facts of episode `e` of subject `aggregate_id` and
    /// records the outcome.
    pub async fn handle(&self, aggregate_id: &str, e: &EpisodeRecorded) -> Result<Outcome, Later> {
        if !e.extract {
            return Ok(Outcome::Skipped);
        }
        let wanted = |m: &Memory| m.to_extract.contains(&e.episode_id);
        let keys = self.memory.keys();
        let found = episode_subject(&self.bus, keys, aggregate_id, &e.episode_id, wanted);
        let Some((subject, key)) = found.await? else {
            return Ok(Outcome::Skipped);
        };
        let turn = key
            .open_json(&e.turn)
            .ok()
            .and_then(|t| request(&e.episode_id, &format_time(e.turn_at), &t));
        let outcome = match turn {
            None => ExtractionOutcome::Failed {
                reason: "unreadable_turn",
                status: None,
                attempts: 0,
            },
            Some(body) => {
                let max = self.extractor.config().max_attempts;
                let (r, attempts) = with_retries("extractor", &e.episode_id, max, || {
                    self.extractor.extract(&self.bus, &body)
                })
                .await;
                key_outage(&r, "extractor")?;
                match r {
                    Ok(x) => ExtractionOutcome::Facts(x),
                    Err(x) => {
                        let (reason, status) = failure(&x);
                        tracing::warn!(subject = aggregate_id, episode = %e.episode_id,
                            attempts, error = %x, "memory extraction: recording the failure");
                        ExtractionOutcome::Failed {
                            reason,
                            status,
                            attempts,
                        }
                    }
                }
            }
        };
        let done = match outcome {
            ExtractionOutcome::Facts(_) => Outcome::Extracted,
            ExtractionOutcome::Failed { .. } => Outcome::Failed,
        };
        let now = chrono::Utc::now();
        let record = |outcome| {
            self.memory.record_extraction(
                &self.bus,
                subject.clone(),
                &key,
                &e.episode_id,
                outcome,
                now,
            )
        };
        match record(outcome).await {
            Ok(_) => Ok(done),
            Err(ExecuteError::Rejected(
                MemoryError::AlreadyExtracted(_)
                | MemoryError::Erased(_)
                | MemoryError::NotFound(_),
            )) => Ok(Outcome::Skipped),
            Err(ExecuteError::Conflict { .. }) | Err(ExecuteError::Store(_)) => Err(
                Later::Unavailable(format!("record the extraction of subject {aggregate_id}")),
            ),
            // too many facts for one event: recorded as a failure, not lost
            Err(ExecuteError::TooLarge(_)) if done == Outcome::Extracted => {
                let failed = ExtractionOutcome::Failed {
                    reason: "too_large",
                    status: None,
                    attempts: 1,
                };
                match record(failed).await {
                    Ok(_) => Ok(Outcome::Failed),
                    Err(ExecuteError::Rejected(_)) => Ok(Outcome::Skipped),
                    Err(_) => Err(Later::Unavailable(format!(
                        "record the extraction failure of subject {aggregate_id}"
                    ))),
                }
            }
            Err(x) => {
                tracing::error!(subject = aggregate_id, episode = %e.episode_id, error = %x,
                    "memory extraction: not recorded; episode skipped");
                Ok(Outcome::Skipped)
            }
        }
    }

    /// Consumes the memory events until `stop`.
    pub async fn run(self, log: EventLog, stop: watch::Receiver<bool>) {
        let cfg = self.extractor.config();
        let spec = ConsumerSpec {
            name: CONSUMER.into(),
            description: "flowledger memory fact extraction".into(),
            ack_wait: ack_wait(cfg.timeout_ms, cfg.max_attempts),
        };
        run_episode_consumer(self, spec, log, stop).await
    }
}

impl OnEpisode for ExtractionHandler {
    async fn on_episode(&self, aggregate_id: &str, e: &EpisodeRecorded) -> Result<(), Later> {
        self.handle(aggregate_id, e).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_a_recordable_code() {
        for e in [
            PeerError::Timeout(1),
            PeerError::Connect,
            PeerError::Status(503),
            PeerError::BadAnswer("x".into()),
            PeerError::Key("x".into()),
            PeerError::KeyUnavailable("x".into()),
        ] {
            let (reason, status) = failure(&e);
            assert!(
                crate::commands::memory::EXTRACTION_FAILURES.contains(&reason),
                "{reason}"
            );
            assert_eq!(status.is_some(), matches!(e, PeerError::Status(_)));
        }
    }
}
