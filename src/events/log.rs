//! The JetStream side of the event log: stream definitions, `init`, append
//! with optimistic concurrency, and reads by sequence or subject.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::PublishErrorKind,
    message::PublishMessage,
    message::StreamMessage,
    stream::{DirectGetErrorKind, StorageType},
};
use backon::{BackoffBuilder, Retryable};
use bytes::Bytes;

use crate::backoff::Backoff;

/// Where the log lives and how the stream is configured.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// The domain-event stream (subjects `flow.ev.>`).
    pub stream: String,
    /// The stream that holds signed checkpoints (subject `flow.checkpoint`).
    pub checkpoint_stream: String,
    /// Copies JetStream keeps of each stream (`--replicas`: 1 in development,
    /// 3 in production).
    pub replicas: usize,
    /// JetStream's de-duplication window on `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// How long an append keeps retrying a publish whose outcome is unknown
    /// (no responders during a stream leader election, a lost connection,
    /// a timeout) before it reports `Unavailable`. The same message id is
    /// sent each time, so JetStream stores it once; never more than half
    /// the duplicate window.
    pub append_wait: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            stream: "FLOW_EVENTS".into(),
            checkpoint_stream: "FLOW_CHECKPOINTS".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            append_wait: Duration::from_secs(10),
        }
    }
}

/// The event stream's subjects are `flow.ev.<aggregate_type>.<aggregate_id>`.
pub const EVENT_SUBJECT_PREFIX: &str = "flow.ev";
/// The one subject of the checkpoint stream.
pub const CHECKPOINT_SUBJECT: &str = "flow.checkpoint";

/// The subject an aggregate's commits are stored on; check the id with
/// [`valid_aggregate_id`] first.
pub fn subject_for(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("{EVENT_SUBJECT_PREFIX}.{aggregate_type}.{aggregate_id}")
}

/// An aggregate id is one NATS subject token: 1-128 of `A-Z a-z 0-9 _ -`.
pub fn valid_aggregate_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why the log could not be opened, set up or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// [`EventLog::open`] could not look up the named stream (any failure of
    /// the lookup is reported so); run `flowledger init` or fix `--stream`.
    #[error("stream {0} does not exist: run `flowledger init` first")]
    NoStream(String),
    /// A read or a stream operation failed (NATS unreachable, or the server
    /// refused a create or update); the message says which; retry later.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// [`init`] found a stream whose storage is not `file`; it cannot be
    /// changed in place, so recreate the stream or use another name.
    #[error("stream {stream} exists with settings flowledger cannot change in place: {what}")]
    Incompatible {
        /// The stream's name.
        stream: String,
        /// Which setting differs.
        what: String,
    },
    /// [`init_patiently`] waited as long as it was told and JetStream still
    /// could not place the streams; start the missing servers (a stream of
    /// N replicas needs N JetStream servers in the cluster), check that they
    /// route to each other, or wait longer.
    #[error(
        "JetStream could not place the streams ({replicas} replicas) within {waited_secs} s: \
         {cause} (are {replicas} JetStream servers up and routed to each other?)"
    )]
    NotReady {
        /// How long it waited.
        waited_secs: u64,
        /// The replicas asked for.
        replicas: usize,
        /// The last error seen.
        cause: String,
    },
}

/// Why [`EventLog::append`] wrote nothing (or may not have).
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The subject's last sequence is not the expected one: another writer
    /// committed first; reload the aggregate and decide again.
    #[error("another writer appended to {subject} first")]
    WrongLastSequence {
        /// The aggregate's subject.
        subject: String,
    },
    /// The commit exceeds the server's maximum payload; send smaller inputs.
    #[error("commit of {size} bytes is larger than the server accepts")]
    TooLarge {
        /// Size of the commit body in bytes.
        size: usize,
    },
    /// The publish or its acknowledgement failed: the outcome is unknown,
    /// so retry with the same command id (JetStream drops a duplicate).
    #[error("append to the event log failed: {0}")]
    Unavailable(String),
}

/// Handle on the event stream.
#[derive(Clone)]
pub struct EventLog {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    config: LogConfig,
}

fn stream_config(config: &LogConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: config.stream.clone(),
        description: Some("flowledger domain events (immutable, hash-chained)".into()),
        subjects: vec![format!("{EVENT_SUBJECT_PREFIX}.>")],
        storage: StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        ..Default::default()
    }
}

fn checkpoint_stream_config(config: &LogConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: config.checkpoint_stream.clone(),
        description: Some("flowledger signed checkpoints over the event stream".into()),
        subjects: vec![CHECKPOINT_SUBJECT.into()],
        storage: StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// What `init` did to each stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InitReport {
    /// The stream's name.
    pub stream: String,
    /// `created`, `updated` or `unchanged`.
    pub action: &'static str,
}

/// Creates or updates both streams; running it again changes nothing.
/// One attempt: a cluster that is still forming fails it (see
/// [`init_patiently`]).
pub async fn init(
    client: &async_nats::Client,
    config: &LogConfig,
) -> Result<Vec<InitReport>, LogError> {
    try_init(&jetstream::new(client.clone()), config)
        .await
        .map_err(|f| f.error)
}

/// [`init`] that waits for JetStream to be able to place the streams: while
/// a cluster forms (no meta leader yet, fewer servers than replicas up,
/// JetStream temporarily unavailable, requests timing out) it logs what it
/// waits for and tries again with backoff (up to 2 s between tries) for up
/// to `wait` (each request bounded to 5 s), then fails with
/// [`LogError::NotReady`] naming the last cause. Errors that waiting cannot
/// fix (an incompatible stream, replicas on a server that is not
/// clustered, a refused permission) fail at once. Each try starts from the
/// streams' current state, so it stays idempotent.
pub async fn init_patiently(
    client: &async_nats::Client,
    config: &LogConfig,
    wait: Duration,
) -> Result<Vec<InitReport>, LogError> {
    let started = std::time::Instant::now();
    let until = started + wait;
    let mut attempt: u32 = 0;
    let tried = (|| async {
        // each request of a try bounded by what is left of the wait (1-5 s):
        // a server without a meta leader does not answer at all
        let left = until.saturating_duration_since(std::time::Instant::now());
        let js = jetstream::ContextBuilder::new()
            .timeout(left.clamp(Duration::from_secs(1), INIT_REQUEST_TIMEOUT))
            .build(client.clone());
        try_init(&js, config).await
    })
    .retry(INIT_BACKOFF.until(until))
    .when(|f| f.transient)
    .notify(|f, delay| {
        attempt = attempt.saturating_add(1);
        tracing::warn!(
            attempt,
            retry_in_ms = delay.as_millis() as u64,
            replicas = config.replicas,
            "waiting for JetStream to place the streams: {}",
            cause(&f.error)
        );
    })
    .await;
    match tried {
        Ok(reports) => Ok(reports),
        Err(InitFailure {
            error,
            transient: true,
        }) => Err(LogError::NotReady {
            waited_secs: started.elapsed().as_secs(),
            replicas: config.replicas,
            cause: cause(&error),
        }),
        Err(InitFailure { error, .. }) => Err(error),
    }
}

/// What went wrong, without the prefix of [`LogError::Unavailable`].
fn cause(error: &LogError) -> String {
    match error {
        LogError::Unavailable(why) => why.clone(),
        other => other.to_string(),
    }
}

/// The longest one JetStream request of [`init_patiently`] may take.
const INIT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The pauses between tries of [`init_patiently`]: 250 ms doubling to 2 s.
const INIT_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(250), Duration::from_secs(2));

/// Why one try of [`init`] failed, and whether another may succeed.
struct InitFailure {
    error: LogError,
    /// The cluster may still be forming: try again.
    transient: bool,
}

impl InitFailure {
    fn transient(what: String) -> Self {
        InitFailure {
            error: LogError::Unavailable(what),
            transient: true,
        }
    }

    fn permanent(error: LogError) -> Self {
        InitFailure {
            error,
            transient: false,
        }
    }

    /// A JetStream API error: transient when it says the cluster cannot
    /// answer or place the stream yet.
    fn api(what: String, e: &jetstream::Error) -> Self {
        if transient_api_error(e.error_code()) {
            Self::transient(format!("{what}: {e}"))
        } else {
            Self::permanent(LogError::Unavailable(format!("{what}: {e}")))
        }
    }

    fn create_or_update(what: String, e: jetstream::context::CreateStreamError) -> Self {
        use jetstream::context::CreateStreamErrorKind as K;
        match e.kind() {
            K::JetStream(api) => Self::api(what, &api),
            K::JetStreamUnavailable | K::TimedOut | K::Response | K::NotFound => {
                Self::transient(format!("{what}: {e}"))
            }
            _ => Self::permanent(LogError::Unavailable(format!("{what}: {e}"))),
        }
    }
}

/// The JetStream API errors a forming cluster answers: 10008 (JetStream
/// temporarily unavailable: no meta leader yet), 10005 (no suitable peers
/// for placement: fewer servers up than replicas), 10023 (insufficient
/// resources), and the stream being created or led elsewhere meanwhile
/// (10058, name already in use: the next try finds it).
fn transient_api_error(code: jetstream::ErrorCode) -> bool {
    use jetstream::ErrorCode as C;
    [
        C::CLUSTER_NOT_AVAILABLE,
        C::CLUSTER_NO_PEERS,
        C::INSUFFICIENT_RESOURCES,
        C::STREAM_NAME_EXIST,
    ]
    .contains(&code)
}

async fn try_init(
    js: &jetstream::Context,
    config: &LogConfig,
) -> Result<Vec<InitReport>, InitFailure> {
    use jetstream::context::GetStreamErrorKind;
    let mut reports = Vec::new();
    for wanted in [stream_config(config), checkpoint_stream_config(config)] {
        let name = wanted.name.clone();
        let action = match js.get_stream(&name).await {
            Ok(s) => {
                let have = &s.cached_info().config;
                if have.storage != wanted.storage {
                    return Err(InitFailure::permanent(LogError::Incompatible {
                        stream: name,
                        what: "storage type differs (file is required)".into(),
                    }));
                }
                let same = have.subjects == wanted.subjects
                    && have.num_replicas == wanted.num_replicas
                    && have.duplicate_window == wanted.duplicate_window
                    && have.deny_delete
                    && have.deny_purge
                    && have.allow_direct;
                if same {
                    "unchanged"
                } else {
                    js.update_stream(&wanted)
                        .await
                        .map_err(|e| InitFailure::create_or_update(format!("update {name}"), e))?;
                    "updated"
                }
            }
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(api)
                    if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    js.create_stream(wanted)
                        .await
                        .map_err(|e| InitFailure::create_or_update(format!("create {name}"), e))?;
                    "created"
                }
                GetStreamErrorKind::JetStream(api) => {
                    return Err(InitFailure::api(format!("look up {name}"), &api))
                }
                GetStreamErrorKind::Request => {
                    return Err(InitFailure::transient(format!("look up {name}: {e}")))
                }
                _ => {
                    return Err(InitFailure::permanent(LogError::Unavailable(format!(
                        "look up {name}: {e}"
                    ))))
                }
            },
        };
        reports.push(InitReport {
            stream: name,
            action,
        });
    }
    Ok(reports)
}

impl EventLog {
    /// Opens the event stream `config.stream`, which must exist (see
    /// [`init`]); nothing is created here.
    pub async fn open(client: async_nats::Client, config: LogConfig) -> Result<Self, LogError> {
        let js = jetstream::new(client);
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|_| LogError::NoStream(config.stream.clone()))?;
        Ok(EventLog { js, stream, config })
    }

    /// The settings this log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The JetStream context (the checkpoint stream, consumers).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The event stream itself (info, consumers, direct reads).
    pub fn stream(&self) -> &jetstream::stream::Stream {
        &self.stream
    }

    /// Appends one commit. `expected` is the stream sequence of the last
    /// message on `subject` this writer saw (0: none). Its time is recorded
    /// in `flowledger_append_duration_seconds`. With traces on, the current
    /// span's context goes in a `traceparent` header (covered by no hash:
    /// not business data).
    pub async fn append(
        &self,
        subject: String,
        body: Vec<u8>,
        message_id: &str,
        expected: u64,
        extra_headers: &[(&'static str, String)],
    ) -> Result<jetstream::publish::PublishAck, AppendError> {
        let started = std::time::Instant::now();
        let size = body.len();
        let payload = Bytes::from(body);
        let wait = self
            .config
            .append_wait
            .min(self.config.duplicate_window / 2);
        let until = std::time::Instant::now() + wait;
        let mut attempt: u32 = 0;
        // with traces on, the span this append runs in: a reader of the
        // message (the job handler) continues the trace from it
        let trace = crate::telemetry::current_traceparent();
        let appended = (|| async {
            let mut msg = PublishMessage::build()
                .payload(payload.clone())
                .message_id(message_id)
                .expected_last_subject_sequence(expected);
            for (k, v) in extra_headers {
                msg = msg.header(*k, v.as_str());
            }
            if let Some(t) = &trace {
                msg = msg.header(crate::telemetry::TRACEPARENT, t.as_str());
            }
            let publish = async {
                match self.js.send_publish(subject.clone(), msg).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                }
                .map_err(|e| classify_publish(e, &subject, size))
            };
            bounded(until, publish)
                .await
                .map_err(|e| match e {
                    LogError::Unavailable(why) => AppendError::Unavailable(why),
                    other => AppendError::Unavailable(other.to_string()),
                })
                .and_then(|r| r)
        })
        .retry(LOG_RETRY.until(until))
        .when(|e| matches!(e, AppendError::Unavailable(_)))
        .notify(|e, _| {
            attempt = attempt.saturating_add(1);
            tracing::debug!(%subject, attempt, "append not acknowledged ({e}); retrying");
        })
        .await;
        let outcome = if appended.is_ok() { "ok" } else { "error" };
        metrics::histogram!("flowledger_append_duration_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        appended
    }

    /// The message at `seq`, or `None` past the end.
    pub async fn get(&self, seq: u64) -> Result<Option<StreamMessage>, LogError> {
        self.patiently(|| async {
            match self.stream.direct_get(seq).await {
                Ok(m) => Ok(Some(m)),
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
                Err(e) => Err(LogError::Unavailable(format!("read seq {seq}: {e}"))),
            }
        })
        .await
    }

    /// The first message on `subject` at or after `from`.
    pub async fn next_for_subject(
        &self,
        subject: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, LogError> {
        self.patiently(|| async {
            match self
                .stream
                .direct_get_next_for_subject(subject, Some(from))
                .await
            {
                Ok(m) => Ok(Some(m)),
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
                Err(e) => Err(LogError::Unavailable(format!("read {subject}: {e}"))),
            }
        })
        .await
    }

    /// Runs a read until it answers, retrying `Unavailable` (a reconnect, a
    /// leader election) with backoff for up to the append wait: reads are
    /// idempotent, and a command needs them before it can append.
    async fn patiently<T, F, Fut>(&self, read: F) -> Result<T, LogError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, LogError>>,
    {
        let until = std::time::Instant::now() + self.config.append_wait;
        let mut attempt: u32 = 0;
        (|| async { bounded(until, read()).await.and_then(|r| r) })
            .retry(LOG_RETRY.until(until))
            .when(|e| matches!(e, LogError::Unavailable(_)))
            .notify(|e, _| {
                attempt = attempt.saturating_add(1);
                tracing::debug!(attempt, "read not answered ({e}); retrying");
            })
            .await
    }

    /// An ordered consumer of the stream from `from`, on `filter` (empty:
    /// every subject). A create the server does not answer within
    /// [`CONSUMER_CREATE_WAIT`] is sent again, [`CONSUMER_CREATE_TRIES`]
    /// times in all: on a cluster with a node down, nats-server 2.9 places
    /// about every second such consumer on the missing node and never
    /// answers (the one left behind goes once inactive).
    pub async fn ordered_consumer(
        &self,
        filter: &str,
        from: u64,
    ) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig>, LogError>
    {
        let mut attempt: u32 = 0;
        (|| async {
            let config = jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            };
            match tokio::time::timeout(CONSUMER_CREATE_WAIT, self.stream.create_consumer(config))
                .await
            {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "no answer within {} s",
                    CONSUMER_CREATE_WAIT.as_secs()
                )),
            }
        })
        .retry(
            LOG_RETRY
                .build()
                .take(CONSUMER_CREATE_TRIES.saturating_sub(1) as usize),
        )
        .notify(|last, _| {
            attempt = attempt.saturating_add(1);
            tracing::debug!(attempt, error = %last, "creating a reader of the log again");
        })
        .await
        .map_err(|last| {
            LogError::Unavailable(format!(
                "cannot start a reader of stream {} ({CONSUMER_CREATE_TRIES} tries): {last}",
                self.config.stream
            ))
        })
    }

    /// The stream's last sequence right now (0 when empty).
    pub async fn last_seq(&self) -> Result<u64, LogError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        Ok(info.state.last_sequence)
    }
}

/// How long [`EventLog::ordered_consumer`] waits for the server to answer
/// one create.
pub const CONSUMER_CREATE_WAIT: Duration = Duration::from_secs(3);

/// How many creates [`EventLog::ordered_consumer`] sends before it gives up.
pub const CONSUMER_CREATE_TRIES: u32 = 5;

/// The pauses between tries of a read or an append: 100 ms doubling to
/// 500 ms, so a command answers soon after a new stream leader is elected
/// (each waiting command then asks twice a second).
const LOG_RETRY: Backoff =
    Backoff::doubling(Duration::from_millis(100), Duration::from_millis(500));

/// How long one attempt of a retried read or append may take while the
/// wait allows another: a request sent just before a connection was lost
/// is never answered, and is sent again rather than awaited to its end.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `f`, bounded by [`ATTEMPT_TIMEOUT`] while `until` leaves time for
/// another attempt (an elapsed attempt is `Unavailable`); the last runs
/// unbounded.
async fn bounded<T>(
    until: std::time::Instant,
    f: impl std::future::Future<Output = T>,
) -> Result<T, LogError> {
    if until.saturating_duration_since(std::time::Instant::now()) > ATTEMPT_TIMEOUT {
        tokio::time::timeout(ATTEMPT_TIMEOUT, f).await.map_err(|_| {
            LogError::Unavailable(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()))
        })
    } else {
        Ok(f.await)
    }
}

fn classify_publish(
    e: async_nats::jetstream::context::PublishError,
    subject: &str,
    size: usize,
) -> AppendError {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => AppendError::WrongLastSequence {
            subject: subject.to_string(),
        },
        PublishErrorKind::MaxPayloadExceeded => AppendError::TooLarge { size },
        _ => AppendError::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_ids_are_single_subject_tokens() {
        assert!(valid_aggregate_id("0193a0b2-7f00-7abc-8def-0123456789ab"));
        assert!(valid_aggregate_id("job_1"));
        for bad in ["", "a.b", "a*", "a>", "a b", &"x".repeat(129)] {
            assert!(!valid_aggregate_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn init_waits_for_a_forming_cluster_and_not_for_what_waiting_cannot_fix() {
        use jetstream::ErrorCode as C;
        for code in [
            C::CLUSTER_NOT_AVAILABLE,
            C::CLUSTER_NO_PEERS,
            C::INSUFFICIENT_RESOURCES,
            C::STREAM_NAME_EXIST,
        ] {
            assert!(transient_api_error(code), "{code:?}");
        }
        for code in [
            C::STREAM_REPLICAS_NOT_SUPPORTED,
            C::STREAM_SUBJECT_OVERLAP,
            C::BAD_REQUEST,
            C::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
        ] {
            assert!(!transient_api_error(code), "{code:?}");
        }
        use jetstream::context::{CreateStreamError, CreateStreamErrorKind as K};
        for kind in [K::TimedOut, K::JetStreamUnavailable] {
            let f = InitFailure::create_or_update("create S".into(), CreateStreamError::new(kind));
            assert!(f.transient, "{}", f.error);
            assert!(f.error.to_string().contains("create S"), "{}", f.error);
        }
        let f = InitFailure::create_or_update(
            "create S".into(),
            CreateStreamError::new(K::InvalidStreamName),
        );
        assert!(!f.transient, "{}", f.error);
    }

    #[test]
    fn reads_and_appends_retry_from_100_ms_to_half_a_second_and_init_to_2_s() {
        let ms = |p: Backoff| -> Vec<u128> { p.build().take(5).map(|d| d.as_millis()).collect() };
        assert_eq!(ms(LOG_RETRY), [100, 200, 400, 500, 500]);
        assert_eq!(ms(INIT_BACKOFF), [250, 500, 1000, 2000, 2000]);
    }

    #[test]
    fn giving_up_names_the_cause_and_what_to_check() {
        let e = LogError::NotReady {
            waited_secs: 60,
            replicas: 3,
            cause: "create FLOW_EVENTS: no suitable peers for placement".into(),
        };
        let m = e.to_string();
        assert!(m.contains("within 60 s"), "{m}");
        assert!(m.contains("no suitable peers for placement"), "{m}");
        assert!(m.contains("3 JetStream servers"), "{m}");
    }
}
