//! What the memory peers (the embedder, the extractor) share: the HTTP
//! client that POSTs JSON with the API key read through the secrets
//! capability ([`PeerClient`]), the errors and which of them are retried
//! ([`PeerError`]), the retry loop with its backoff ([`with_retries`]), and
//! the durable JetStream consumer that hands each recorded episode to a
//! handler ([`run_episode_consumer`]).
//!
//! The API key is read as the handler (`flowledger-handler`, role
//! `handler`), kept in memory, sent only as `Authorization: Bearer`, read
//! again once after a 401. Nothing here logs or returns a request, an
//! answer or the key: errors name the kind of failure and the peer's
//! status only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, AckKind};
use backon::{BackoffBuilder, Retryable};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{watch, Mutex};
use zeroize::Zeroizing;

use crate::backoff::Backoff;
use crate::bus::CommandBus;
use crate::commands::memory::events::{EpisodeRecorded, MemoryEvent};
use crate::commands::memory::{Memory, SubjectRef};
use crate::commands::registry::SecretRef;
use crate::commands::secret_access::events::AccessRequest;
use crate::events::envelope::{decode_commit, Actor, CommandMeta};
use crate::events::log::{EventLog, EVENT_SUBJECT_PREFIX};
use crate::events::store::decode_event;
use crate::handlers::HANDLER_ACTOR;
use crate::memory::keys::{KeyError, SubjectKey, SubjectKeys};
use crate::secrets::service::SecretService;

/// The role a peer's API key is read with (as step headers' secrets are).
pub const KEY_ROLE: &str = "handler";

/// Why a peer gave no usable answer. No request, answer or key in it; the
/// message reads after the peer's name ("the embedder ...").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// No answer within the time limit.
    #[error("did not answer within {0} ms")]
    Timeout(u64),
    /// The peer could not be reached (connection refused, reset, DNS).
    #[error("could not be reached")]
    Connect,
    /// The peer answered with an error status.
    #[error("answered status {0}")]
    Status(u16),
    /// The answer does not have the shape the contract says.
    #[error("gave an answer that is refused: {0}")]
    BadAnswer(String),
    /// The API key could not be read (refused, missing, not a string).
    #[error("could not have its API key: {0}")]
    Key(String),
    /// The API key could not be read now (Vault or the log unavailable).
    #[error("could not have its API key now: {0}")]
    KeyUnavailable(String),
}

impl PeerError {
    /// Whether the same request may succeed later (timeouts, connection
    /// errors, 429 and 5xx, the key unreadable for now).
    pub fn is_retryable(&self) -> bool {
        match self {
            PeerError::Timeout(_) | PeerError::Connect | PeerError::KeyUnavailable(_) => true,
            PeerError::Status(s) => *s == 429 || *s >= 500,
            PeerError::BadAnswer(_) | PeerError::Key(_) => false,
        }
    }
}

/// Where an API key comes from.
struct KeySource {
    secret: SecretRef,
    secrets: Arc<SecretService>,
    /// The access event's purpose: the setting that names the key.
    purpose: &'static str,
    held: Mutex<Option<Zeroizing<String>>>,
}

impl KeySource {
    async fn get(&self, bus: &CommandBus, fresh: bool) -> Result<Zeroizing<String>, PeerError> {
        let mut held = self.held.lock().await;
        if !fresh {
            if let Some(k) = held.as_ref() {
                return Ok(k.clone());
            }
        }
        let request = AccessRequest {
            path: self.secret.path.clone(),
            field: Some(self.secret.field.clone()),
            version: None,
            purpose: self.purpose.into(),
            job_id: None,
            step: None,
        };
        let id = uuid::Uuid::now_v7().to_string();
        let meta = CommandMeta::originating(
            id.clone(),
            Actor {
                client_id: HANDLER_ACTOR.into(),
                user_id: None,
            },
            crate::events::chain::to_hex(&crate::events::chain::sha256(id.as_bytes())),
        );
        let served = self
            .secrets
            .read(bus, request, KEY_ROLE, &meta)
            .await
            .map_err(|e| {
                let why = format!("{}: {}", self.secret, e.message);
                if e.code == crate::commands::ErrorCode::Unavailable {
                    PeerError::KeyUnavailable(why)
                } else {
                    PeerError::Key(why)
                }
            })?;
        let key = served
            .value
            .expose_str()
            .map(|s| Zeroizing::new(s.to_string()))
            .ok_or_else(|| PeerError::Key(format!("{} is not a string", self.secret)))?;
        *held = Some(key.clone());
        Ok(key)
    }
}

/// An HTTP client for one peer: JSON POSTs with its API key, if it has one.
pub struct PeerClient {
    http: reqwest::Client,
    key: Option<KeySource>,
}

impl PeerClient {
    /// A client for the peer configured at `setting` (e.g.
    /// `memory.embedder`), whose API key is `api_key` (parsed from
    /// `<setting>.api_key_secret`), read through `secrets`.
    pub fn new(
        setting: &'static str,
        purpose: &'static str,
        api_key: Option<Result<SecretRef, String>>,
        secrets: Option<Arc<SecretService>>,
    ) -> Result<Self, String> {
        let key = match api_key {
            None => None,
            Some(r) => {
                let secret = r.map_err(|e| format!("{setting}.api_key_secret: {e}"))?;
                let secrets = secrets.ok_or_else(|| {
                    format!(
                        "{setting}.api_key_secret needs [secrets] (the key is read through the \
                         secrets capability)"
                    )
                })?;
                Some(KeySource {
                    secret,
                    secrets,
                    purpose,
                    held: Mutex::new(None),
                })
            }
        };
        // the bearer key is never replayed to another address
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("{setting}: the HTTP client: {e}"))?;
        Ok(PeerClient { http, key })
    }

    /// The key's secret, for `Debug` (never the key).
    pub fn key_name(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.secret.to_string())
    }

    /// POSTs `body` to `url` within `limit` and returns the answer's bytes
    /// (a 2xx of at most `max_bytes`); a read of the API key is recorded on
    /// `bus`.
    pub async fn post_json(
        &self,
        bus: &CommandBus,
        url: &str,
        body: &Value,
        limit: Duration,
        max_bytes: usize,
    ) -> Result<bytes::Bytes, PeerError> {
        let too_large = || PeerError::BadAnswer(format!("larger than {max_bytes} bytes"));
        let mut fresh_key = false;
        loop {
            let mut req = self.http.post(url).timeout(limit).json(body);
            if let Some(k) = &self.key {
                let key = k.get(bus, fresh_key).await?;
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", *key))
                    .map_err(|_| PeerError::Key("not a valid header value".into()))?;
                value.set_sensitive(true);
                req = req.header(reqwest::header::AUTHORIZATION, value);
            }
            let resp = req.send().await.map_err(|e| transport(&e, limit))?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && self.key.is_some() && !fresh_key {
                // the key may have been rotated: read it again, once
                fresh_key = true;
                continue;
            }
            if !status.is_success() {
                return Err(PeerError::Status(status.as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > max_bytes as u64) {
                return Err(too_large());
            }
            let bytes = resp.bytes().await.map_err(|e| transport(&e, limit))?;
            if bytes.len() > max_bytes {
                return Err(too_large());
            }
            return Ok(bytes);
        }
    }
}

fn transport(e: &reqwest::Error, limit: Duration) -> PeerError {
    if e.is_timeout() {
        PeerError::Timeout(limit.as_millis() as u64)
    } else {
        PeerError::Connect
    }
}

/// The pauses between attempts of a memory peer call: 200 ms doubling, at
/// most 5 s.
pub const PEER_RETRY: Backoff =
    Backoff::doubling(Duration::from_millis(200), Duration::from_secs(5));

/// Calls `call` until it succeeds, fails for good, or `max_attempts` were
/// made, pausing [`PEER_RETRY`] between attempts; the outcome and the
/// attempts made. `what` and `episode` name the work in the warnings.
pub async fn with_retries<T, F, Fut>(
    what: &'static str,
    episode: &str,
    max_attempts: u32,
    mut call: F,
) -> (Result<T, PeerError>, u32)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, PeerError>>,
{
    let mut attempt = 0;
    let outcome = (|| {
        attempt += 1;
        call()
    })
    .retry(
        PEER_RETRY
            .build()
            .take(max_attempts.saturating_sub(1) as usize),
    )
    .when(PeerError::is_retryable)
    .notify(|x, _| tracing::warn!(peer = what, episode, error = %x, "memory peer: retrying"))
    .await;
    (outcome, attempt)
}

/// Why an episode was not handled now; the message is redelivered.
#[derive(Debug, thiserror::Error)]
pub enum Later {
    /// Vault, the log or the store could not be used.
    #[error("{0}")]
    Unavailable(String),
}

/// A failure that outlasted the retries but is Vault's, not the peer's
/// (its API key could not be read): the episode is handled again later,
/// never recorded as failed for it.
pub fn key_outage<T>(r: &Result<T, PeerError>, peer: &str) -> Result<(), Later> {
    match r {
        Err(PeerError::KeyUnavailable(why)) => Err(Later::Unavailable(format!(
            "the {peer}'s API key cannot be read now ({why}); the episode is handled again later"
        ))),
        _ => Ok(()),
    }
}

/// The subject `aggregate_id` and its key, to handle its episode
/// `episode_id` when `wanted` holds for its state; `None` (skip the
/// episode): erased, never opened, not wanted, or a key that cannot be used
/// (logged: retrying will not help). Vault or the log unavailable: `Later`.
pub async fn episode_subject(
    bus: &CommandBus,
    keys: &SubjectKeys,
    aggregate_id: &str,
    episode_id: &str,
    wanted: impl Fn(&Memory) -> bool,
) -> Result<Option<(SubjectRef, Arc<SubjectKey>)>, Later> {
    let loaded = bus
        .load_memory(aggregate_id)
        .await
        .map_err(|x| Later::Unavailable(format!("load memory subject {aggregate_id}: {x}")))?;
    let state = loaded.state;
    let Some(owner) = state
        .owner
        .clone()
        .filter(|_| !state.erased && wanted(&state))
    else {
        return Ok(None);
    };
    let key = match keys.get(aggregate_id).await {
        Ok(k) => k,
        Err(KeyError::Erased) => return Ok(None),
        Err(x) if x.is_retryable() => {
            return Err(Later::Unavailable(format!(
                "the key of memory subject {aggregate_id}: {x}"
            )))
        }
        Err(x) => {
            tracing::error!(subject = aggregate_id, episode = episode_id, error = %x,
                "memory peer: the subject's key cannot be used; episode skipped");
            return Ok(None);
        }
    };
    let subject = SubjectRef {
        owner,
        subject_id: state.subject_id.clone(),
        key_id: state.key_id.clone(),
    };
    Ok(Some((subject, key)))
}

/// A handler of recorded episodes (the embedding and the extraction
/// handlers).
pub trait OnEpisode: Send + Sync {
    /// Handles episode `e` of the subject `aggregate_id`; `Later`: the
    /// commit is redelivered.
    fn on_episode(
        &self,
        aggregate_id: &str,
        e: &EpisodeRecorded,
    ) -> impl Future<Output = Result<(), Later>> + Send;
}

/// A durable consumer of the memory events.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Its durable name.
    pub name: String,
    /// Its description on the server.
    pub description: String,
    /// How long one commit may take before it is redelivered.
    pub ack_wait: Duration,
}

/// The ack wait of a consumer whose episode makes up to `max_attempts`
/// calls of at most `timeout_ms`: every attempt, its backoff, the record.
pub fn ack_wait(timeout_ms: u64, max_attempts: u32) -> Duration {
    Duration::from_millis(timeout_ms + 5_000) * max_attempts + Duration::from_secs(30)
}

/// Hands every `EpisodeRecorded` of one commit message to `h`.
async fn on_message<H: OnEpisode>(h: &H, spec: &ConsumerSpec, payload: &[u8]) -> Result<(), Later> {
    let Ok(records) = decode_commit(payload) else {
        return Ok(()); // not a commit: the projections report it
    };
    for (_, r) in records {
        if r.aggregate_type != "memory" || r.event_type != "EpisodeRecorded" {
            continue;
        }
        match decode_event::<MemoryEvent>(&r) {
            Ok(MemoryEvent::EpisodeRecorded(e)) => h.on_episode(&r.aggregate_id, &e).await?,
            Ok(_) => {}
            Err(x) => tracing::error!(consumer = %spec.name, subject = %r.aggregate_id, error = %x,
                "memory peer: an EpisodeRecorded does not decode; skipped"),
        }
    }
    Ok(())
}

/// Consumes the memory events with the durable pull consumer `spec`
/// (filter `flow.ev.memory.*`, explicit acks, shared by every `serve`
/// instance) until `stop`, handing each recorded episode to `h`.
pub async fn run_episode_consumer<H: OnEpisode>(
    h: H,
    spec: ConsumerSpec,
    log: EventLog,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let consumer = log
            .stream()
            .get_or_create_consumer(
                spec.name.as_str(),
                pull::Config {
                    durable_name: Some(spec.name.clone()),
                    description: Some(spec.description.clone()),
                    filter_subject: format!("{EVENT_SUBJECT_PREFIX}.memory.*"),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: spec.ack_wait,
                    // one at a time, as they are handled: a message waiting
                    // in this instance's buffer would pass its ack wait and
                    // be sent (with its personal text) to the peer twice
                    max_ack_pending: 1,
                    ..Default::default()
                },
            )
            .await;
        let messages = match consumer {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = %spec.name, error = %e, "memory peer: the consumer; retrying");
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
                    tracing::warn!(consumer = %spec.name, error = %e, "memory peer: a message; reconnecting");
                    break;
                }
                None => break,
            };
            let kind = match on_message(&h, &spec, &m.payload).await {
                Ok(()) => AckKind::Ack,
                Err(Later::Unavailable(why)) => {
                    tracing::warn!(consumer = %spec.name, %why, "memory peer: later");
                    AckKind::Nak(Some(Duration::from_secs(2)))
                }
            };
            if let Err(e) = m.ack_with(kind).await {
                tracing::warn!(consumer = %spec.name, error = %e, "memory peer: ack");
            }
        }
        if sleep_or_stop(&mut stop, Duration::from_millis(500)).await {
            return;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_connections_429_and_5xx_are_retried_bad_answers_not() {
        assert!(PeerError::Status(503).is_retryable());
        assert!(PeerError::Status(429).is_retryable());
        assert!(!PeerError::Status(400).is_retryable());
        assert!(PeerError::Timeout(5).is_retryable());
        assert!(PeerError::Connect.is_retryable());
        assert!(PeerError::KeyUnavailable("x".into()).is_retryable());
        assert!(!PeerError::BadAnswer("x".into()).is_retryable());
        assert!(!PeerError::Key("x".into()).is_retryable());
        let waits: Vec<_> = PEER_RETRY.build().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000]);
    }

    #[tokio::test]
    async fn retries_stop_at_success_a_permanent_error_or_the_attempts() {
        let mut n = 0;
        let (r, attempts) = with_retries("test", "e1", 5, || {
            n += 1;
            let this = n;
            async move {
                if this < 2 {
                    Err(PeerError::Status(503))
                } else {
                    Ok(this)
                }
            }
        })
        .await;
        assert_eq!((r, attempts), (Ok(2), 2));
        let (r, attempts) =
            with_retries::<(), _, _>("test", "e1", 5, || async { Err(PeerError::Status(400)) })
                .await;
        assert_eq!((r, attempts), (Err(PeerError::Status(400)), 1));
        let (r, attempts) =
            with_retries::<(), _, _>("test", "e1", 2, || async { Err(PeerError::Connect) }).await;
        assert_eq!((r, attempts), (Err(PeerError::Connect), 2));
    }
}
