//! Process managers that turn events into actions: the job execution
//! handler (`manager` feeds typed events to one `executor` driver per job),
//! the HTTP calls to solver and n8n peers (`peer`), their headers filled
//! from secrets (`step_secrets`), the delivery of a job's signed result
//! callback (`delivery`), and the handler's view of a job (`view`).
//!
//! Handlers never write to the read models; they act only through the
//! command bus, with ids derived from the causing job, step and attempt
//! (`bus::ids`); a secret read for a step header is the one exception: a
//! new request (UUID v7) at every attempt.

pub mod delivery;
pub mod executor;
pub mod lease;
pub mod manager;
pub mod peer;
pub mod step_secrets;
pub mod view;

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::backoff::Backoff;
use crate::bus::CommandBus;
use crate::commands::approval::{ApprovalCommand, ApprovalError};
use crate::commands::job::{JobCommand, JobError};
use crate::commands::registry::SharedRegistry;
use crate::config::{Config, ConfigError, HandlerSection};
use crate::crypto::{SealKeys, SigningKey};
use crate::events::chain;
use crate::events::envelope::{decode_commit, Actor, CommandMeta};
use crate::events::log::{subject_for, LogError};
use crate::events::store::ExecuteError;
use crate::secrets::service::SecretService;
use lease::Leases;
use view::{JobView, StoryRecord};

/// The identity on every command a handler issues.
pub const HANDLER_ACTOR: &str = "flowledger-handler";

/// How much longer than the grace period a drain waits for the lease
/// keeper to give its partitions away (a keeper that cannot reach NATS).
const DRAIN_SLACK: Duration = Duration::from_secs(3);

/// The step retry policy of the configuration's `[handler]` (seed 002's
/// defaults: 5 s, then 15 s).
pub fn retry_policy(h: &HandlerSection) -> Backoff {
    Backoff {
        base: Duration::from_millis(h.retry_base_ms),
        multiplier: h.retry_multiplier,
        max: Duration::from_millis(h.retry_max_ms),
        jitter: h.retry_jitter,
    }
}

/// The job handler's settings (the configuration's `[handler]` and
/// `[callbacks]`).
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Jobs running steps at once; more wait, the highest priority first.
    pub max_concurrent_jobs: usize,
    /// The backoff between a step's attempts and between deliveries of a
    /// result callback.
    pub retry: Backoff,
    /// Base URL peers reach this service on (n8n callbacks).
    pub public_url: Option<String>,
    /// Signs outgoing callbacks; without it none is sent.
    pub callback_key: Option<SigningKey>,
    /// Deliveries of a result callback before it is recorded as failed
    /// (`callbacks.max_attempts`).
    pub callback_max_attempts: u32,
    /// The time a receiver has to answer one delivery
    /// (`callbacks.timeout_ms`).
    pub callback_timeout: Duration,
    /// Opens the sealed credentials of a job's `callback_url`
    /// (`callbacks.seal_keys_env`).
    pub callback_sealer: Option<Arc<SealKeys>>,
    /// How long a stopping `serve` waits for the step calls in flight to
    /// end and be recorded (`handler.drain_grace_seconds`); zero: it stops
    /// them at once.
    pub drain_grace: Duration,
}

impl HandlerConfig {
    /// The handler's settings from the configuration, with the callback
    /// signing key read from the variable it names.
    pub fn from_config(c: &Config) -> Result<Self, ConfigError> {
        let h = &c.handler;
        Ok(HandlerConfig {
            max_concurrent_jobs: h.max_concurrent_jobs,
            retry: retry_policy(h),
            public_url: h
                .public_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_string()),
            callback_key: Config::key(&c.callbacks.signing_key_env, "callbacks.signing_key_env")?,
            callback_max_attempts: c.callbacks.max_attempts,
            callback_timeout: Duration::from_millis(c.callbacks.timeout_ms),
            callback_sealer: c.seal_keys()?,
            drain_grace: Duration::from_secs(h.drain_grace_seconds),
        })
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            max_concurrent_jobs: 1000,
            retry: retry_policy(&HandlerSection::default()),
            public_url: None,
            callback_key: None,
            callback_max_attempts: 5,
            callback_timeout: delivery::DEFAULT_TIMEOUT,
            callback_sealer: None,
            drain_grace: Duration::from_secs(HandlerSection::default().drain_grace_seconds),
        }
    }
}

/// An HTTP client builder for calls to peers (solvers, n8n, callback
/// receivers), with TLS for `https` URLs: rustls on the `ring` provider,
/// the platform's trusted roots. Use it for every outgoing client.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    install_tls_provider();
    reqwest::Client::builder()
}

/// Makes rustls's `ring` provider the process's default (the TLS stack of
/// every outgoing client: reqwest is built without one); installs once
/// per process, a second call finds it installed.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What the drivers share.
pub struct Ctx {
    /// The command bus every command of the handler goes through.
    pub bus: Arc<CommandBus>,
    /// The workflow registry: each job's steps, approval rule and success
    /// policy.
    pub registry: SharedRegistry,
    /// One client (one connection pool) for peer calls and result callbacks.
    pub http: reqwest::Client,
    /// The handler's settings.
    pub config: HandlerConfig,
    /// Admits drivers to run their steps, `max_concurrent_jobs` at a time.
    pub dispatcher: Dispatcher,
    /// The job partitions this instance holds leases on.
    pub leases: Arc<Leases>,
    /// Reads the secrets of step headers (`[secrets]`); none: a step
    /// whose headers name secrets fails its attempts `secret_unavailable`
    /// (the service refuses to start so, see `app`).
    pub secrets: Option<Arc<SecretService>>,
    status: Mutex<HandlerStatus>,
}

/// Why a handler command on a job was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum FencedError {
    /// This instance does not hold the job's partition (any more): it stops
    /// driving the job, the partition's holder drives it.
    #[error("this handler instance does not hold the job's partition (any more)")]
    NotHeld,
    /// The command bus refused or failed the command.
    #[error(transparent)]
    Execute(#[from] ExecuteError<JobError>),
}

/// Where the job handler stands, as `/healthz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerStatus {
    /// Not started yet.
    Starting,
    /// Following the log, holding no partition lease (other instances
    /// hold them all, or none could be taken yet).
    NoLease,
    /// Following the log and driving the jobs of the partitions it holds.
    Running,
    /// Its loop failed and restarts shortly; the reason says why.
    Restarting(String),
    /// The instance is stopping: it starts nothing new and waits for the
    /// step calls in flight to end (`handler.drain_grace_seconds`).
    Draining,
}

impl HandlerStatus {
    /// `starting`, `no_lease`, `running`, `restarting` or `draining`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HandlerStatus::Starting => "starting",
            HandlerStatus::NoLease => "no_lease",
            HandlerStatus::Running => "running",
            HandlerStatus::Restarting(_) => "restarting",
            HandlerStatus::Draining => "draining",
        }
    }
}

impl Ctx {
    /// The context the drivers share, with its HTTP client and dispatcher
    /// (whose task it spawns: call it inside a Tokio runtime); `secrets`
    /// reads the secrets step headers name.
    pub fn new(
        bus: Arc<CommandBus>,
        registry: SharedRegistry,
        config: HandlerConfig,
        secrets: Option<Arc<SecretService>>,
    ) -> Arc<Self> {
        // idle connections are kept (90 s) without a count limit: with many
        // jobs in flight, a capped pool closes and reopens connections to
        // the same peers on every call
        let http = http_client_builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "HTTP client settings refused; using the defaults");
                http_client_builder().build().unwrap_or_default()
            });
        Arc::new(Ctx {
            dispatcher: Dispatcher::new(config.max_concurrent_jobs),
            bus,
            registry,
            http,
            config,
            leases: Arc::new(Leases::new(Leases::instance_name())),
            secrets,
            status: Mutex::new(HandlerStatus::Starting),
        })
    }

    /// Where the handler stands now: running only while it holds a lease.
    pub fn status(&self) -> HandlerStatus {
        if self.leases.draining() {
            return HandlerStatus::Draining;
        }
        let s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match s {
            HandlerStatus::Running if self.leases.held() == 0 => HandlerStatus::NoLease,
            other => other,
        }
    }

    /// Drains the handler (`serve` told to stop): no new driver, attempt,
    /// retry wait or callback starts, and the step calls in flight are
    /// awaited until their results are recorded, at most
    /// `config.drain_grace`; their partitions are given away as they end.
    /// Logs the start, each job that finishes and the end; returns which
    /// jobs finished and which were abandoned (their calls are sent again,
    /// with the same `Idempotency-Key`, by the partition's next holder).
    pub async fn drain(&self) -> lease::DrainReport {
        let grace = self.config.drain_grace;
        let (steps, jobs) = self.leases.begin_drain(grace);
        tracing::info!(
            steps_in_flight = steps,
            jobs_in_flight = jobs,
            grace_s = grace.as_secs(),
            "draining: {steps} step calls in flight, grace {} s",
            grace.as_secs()
        );
        // the keeper lets the partitions go by the grace period; a keeper
        // that cannot (NATS gone) is not waited for much longer
        let report = match tokio::time::timeout(grace + DRAIN_SLACK, self.leases.drained()).await {
            Ok(r) => r,
            Err(_) => self.leases.give_up_drain(),
        };
        if report.abandoned.is_empty() {
            tracing::info!(
                finished = report.finished.len(),
                abandoned = 0,
                "drained: {} jobs finished their step calls, none abandoned",
                report.finished.len()
            );
        } else {
            tracing::warn!(
                finished = report.finished.len(),
                abandoned = report.abandoned.len(),
                job_ids = ?report.abandoned,
                "drained: {} jobs finished their step calls, {} abandoned at the end of the \
                 grace period (their calls are sent again by the next holder)",
                report.finished.len(),
                report.abandoned.len()
            );
        }
        report
    }

    pub(crate) fn set_status(&self, s: HandlerStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Metadata of a command the handler issues: the id is derived from
    /// what caused it, and names the command (same id, same command).
    pub fn meta(&self, command_id: &str, job_id: &str) -> CommandMeta {
        CommandMeta {
            command_id: command_id.to_string(),
            actor: Actor {
                client_id: HANDLER_ACTOR.into(),
                user_id: None,
            },
            correlation_id: job_id.to_string(),
            causation_id: job_id.to_string(),
            command_hash: chain::to_hex(&chain::sha256(command_id.as_bytes())),
        }
    }

    /// A job command issued as the handler, under `command_id` (derived by
    /// `bus::ids`, so a repeat is a duplicate), fenced with the lease on the
    /// job's partition: refused here without one, and by the job when a
    /// newer lease drove it.
    pub async fn job(
        &self,
        job_id: &str,
        cmd: JobCommand,
        command_id: &str,
    ) -> Result<(), FencedError> {
        let lease = self.leases.lease(job_id).ok_or(FencedError::NotHeld)?;
        let fenced = JobCommand::Fenced {
            lease,
            command: Box::new(cmd),
        };
        match self
            .bus
            .job(job_id, fenced, &self.meta(command_id, job_id))
            .await
        {
            Ok(_) => Ok(()),
            Err(ExecuteError::Rejected(JobError::StaleLease { .. })) => Err(FencedError::NotHeld),
            Err(e) => Err(FencedError::Execute(e)),
        }
    }

    /// A command on the approval of `job_id` (its approval id is the job id).
    pub async fn approval(
        &self,
        job_id: &str,
        cmd: ApprovalCommand,
        command_id: &str,
    ) -> Result<(), ExecuteError<ApprovalError>> {
        self.bus
            .approval(job_id, cmd, &self.meta(command_id, job_id))
            .await
            .map(|_| ())
    }

    /// The job's view read from the log (its events and its approval's).
    pub async fn load_view(&self, job_id: &str) -> Result<Option<JobView>, LoadError> {
        let log = self.bus.log();
        let mut view: Option<JobView> = None;
        for subject in [subject_for("job", job_id), subject_for("approval", job_id)] {
            let mut from = 1;
            while let Some(m) = log.next_for_subject(&subject, from).await? {
                from = m.sequence + 1;
                let lines = decode_commit(&m.payload).map_err(|e| LoadError::Fold {
                    seq: m.sequence,
                    reason: format!("not a commit: {e}"),
                })?;
                for (_, r) in lines {
                    let Some(decoded) = StoryRecord::decode(r) else {
                        continue;
                    };
                    let r = decoded.map_err(|e| LoadError::Fold {
                        seq: m.sequence,
                        reason: e.to_string(),
                    })?;
                    match &mut view {
                        None => {
                            view = JobView::submitted(m.sequence, &r).map(|mut v| {
                                v.traceparent = crate::telemetry::header_of(Some(&m.headers));
                                v
                            })
                        }
                        Some(v) => v.apply(&r).map_err(|e| LoadError::Fold {
                            seq: m.sequence,
                            reason: e.to_string(),
                        })?,
                    }
                }
            }
            if view.is_none() {
                return Ok(None);
            }
        }
        Ok(view)
    }
}

/// Why a job's view could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The log could not be read; retry.
    #[error(transparent)]
    Log(#[from] LogError),
    /// An event of the job cannot be folded: the job is parked.
    #[error("stream sequence {seq}: {reason}")]
    Fold {
        /// The stream sequence of the message holding the event.
        seq: u64,
        /// Why the event cannot be decoded or folded.
        reason: String,
    },
}

/// Admits jobs to run their steps, at most `limit` at once; waiting jobs
/// go in priority order (10 first), then in submission order.
pub struct Dispatcher {
    queue: Arc<Mutex<BinaryHeap<Ticket>>>,
    notify: Arc<Notify>,
    slots: Arc<Semaphore>,
}

struct Ticket {
    priority: u8,
    seq: u64,
    tx: oneshot::Sender<OwnedSemaphorePermit>,
}

impl PartialEq for Ticket {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Ticket {}
impl PartialOrd for Ticket {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ticket {
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority
            .cmp(&o.priority)
            .then_with(|| o.seq.cmp(&self.seq))
    }
}

impl Dispatcher {
    /// A dispatcher with `limit` slots (at least 1); it spawns its task, so
    /// call it inside a Tokio runtime.
    pub fn new(limit: usize) -> Self {
        let d = Dispatcher {
            queue: Arc::default(),
            notify: Arc::new(Notify::new()),
            slots: Arc::new(Semaphore::new(limit.max(1))),
        };
        let (queue, notify, slots) = (d.queue.clone(), d.notify.clone(), d.slots.clone());
        tokio::spawn(async move {
            loop {
                let Ok(mut permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    match next {
                        None => notify.notified().await,
                        Some(t) => match t.tx.send(permit) {
                            Ok(()) => break,
                            // that job went away (cancelled): next one
                            Err(p) => permit = p,
                        },
                    }
                }
                metrics::gauge!("flowledger_handler_queued_jobs")
                    .set(queue.lock().unwrap_or_else(|p| p.into_inner()).len() as f64);
            }
        });
        d
    }

    /// Waits for a slot; the slot is free again when the permit drops.
    pub async fn admit(&self, priority: u8, seq: u64) -> OwnedSemaphorePermit {
        let (tx, rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Ticket { priority, seq, tx });
        self.notify.notify_one();
        match rx.await {
            Ok(p) => p,
            // the dispatcher task ended: the runtime is shutting down
            Err(_) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_retry_policy_is_seed_002s() {
        let p = retry_policy(&HandlerSection::default());
        for _ in 0..100 {
            let d1 = p.delay(1).as_secs_f64();
            let d2 = p.delay(2).as_secs_f64();
            assert!((4.0..=6.0).contains(&d1), "{d1}");
            assert!((12.0..=18.0).contains(&d2), "{d2}");
        }
        assert!(p.delay(30) <= Duration::from_secs(360));
    }

    #[tokio::test]
    async fn dispatcher_admits_by_priority_then_order() {
        let d = Arc::new(Dispatcher::new(1));
        let first = d.admit(1, 1).await; // takes the only slot
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (prio, seq) in [(3u8, 2u64), (9, 3), (3, 4), (9, 5)] {
            let (d, tx) = (d.clone(), tx.clone());
            tokio::spawn(async move {
                let _p = d.admit(prio, seq).await;
                let _ = tx.send(seq);
            });
        }
        // let all four queue up
        while d.queue.lock().unwrap().len() < 4 {
            tokio::task::yield_now().await;
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rx.recv().await.expect("each job is admitted"));
        }
        assert_eq!(order, vec![3, 5, 2, 4]);
    }
}
