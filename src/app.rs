//! The composition root: [`Application::build`] wires the service from its
//! [`Settings`]: the command bus, the NATS intake, the projections, the job
//! handler, the HTTP API and the checkpoint writer. `flowledger serve` and
//! the integration tests build the service through this one function.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::audit::checkpoint::{self, CheckpointKey};
use crate::bus::{ids, CommandBus, CommandError};
use crate::commands::job::JobServices;
use crate::commands::projection::ProjectionCommand;
use crate::commands::registry::{Registry, RegistryChanges, SharedRegistry};
use crate::commands::secret_access::policy::{Decision, SecretPolicy};
use crate::config::{ClientEntry, Config, NatsSection};
use crate::crypto::{SealKeys, SigningKey};
use crate::events::chain;
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::log::EventLog;
use crate::handlers::step_secrets::HANDLER_ROLE;
use crate::handlers::{self, HandlerConfig};
use crate::memory::service::MemoryService;
use crate::projections::{self, db};
use crate::secrets::service::SecretService;

/// What the service is built from. Each part can be left out: the tests
/// build only the parts they exercise, `serve` builds what its flags ask.
pub struct Settings {
    /// A connection to NATS and the opened event log (streams checked).
    pub nats: async_nats::Client,
    /// The event log every command is appended to and every reader reads.
    pub log: EventLog,
    /// The workflow registry: the keys jobs may name, their steps and rules.
    pub registry: Arc<Registry>,
    /// Largest `timeout_seconds` a job may ask for.
    pub max_timeout_seconds: u32,
    /// Seals the credentials of submitted `callback_url`s
    /// (`callbacks.seal_keys_env`); none: such URLs are refused.
    pub callback_sealer: Option<Arc<SealKeys>>,
    /// Answer commands on `flow.cmd.>` (queue group `flowledger-intake`).
    pub intake: bool,
    /// The role of each NATS account's users, for the intake (`[nats]`).
    pub nats_accounts: NatsSection,
    /// Sign a checkpoint with this key at this interval.
    pub checkpoints: Option<(CheckpointKey, Duration)>,
    /// PostgreSQL and what runs on it; none: no read side, no handler.
    pub database: Option<DatabaseSettings>,
    /// Secret access through Vault (`[secrets]`; its Vault client logged
    /// in); none: reads answer `unavailable`.
    pub secrets: Option<Arc<SecretService>>,
    /// Conversation memory (`[memory]`); none: memory commands answer
    /// `unavailable` and no memory read model is built.
    pub memory: Option<Arc<MemoryService>>,
    /// Without `database`: serve `/livez`, `/readyz` and `/metrics` on this
    /// address (port 0: a free port); with one, the HTTP API serves them.
    pub probes: Option<SocketAddr>,
}

/// The parts that need PostgreSQL.
pub struct DatabaseSettings {
    /// PostgreSQL connection URL (`--database-url`, `DATABASE_URL`).
    pub url: String,
    /// Size of the connection pool shared by every part below.
    pub max_connections: u32,
    /// Run the projection runners (one per read model).
    pub projections: bool,
    /// Run the job handler with these settings.
    pub handler: Option<HandlerConfig>,
    /// Serve the HTTP API on this address (port 0: a free port).
    pub http: Option<HttpSettings>,
}

/// The HTTP API: where it listens and who may call it.
pub struct HttpSettings {
    /// Listen address (`--http`); port 0 picks a free port, see
    /// [`Application::http_addr`].
    pub addr: SocketAddr,
    /// The callers and their bearer-token hashes (`[[clients]]`).
    pub clients: Vec<ClientEntry>,
    /// Verifies `POST /v1/callbacks/n8n`; none: that endpoint answers 503.
    pub n8n_key: Option<SigningKey>,
    /// Seconds an n8n callback's timestamp may be from now
    /// (`callbacks.timestamp_window_seconds`); nonces are kept twice as long.
    pub callback_window_secs: i64,
    /// Posts to the n8n endpoint per minute from one source address.
    pub callback_posts_per_minute: u32,
    /// Refused n8n posts per minute from one source address.
    pub callback_refusals_per_minute: u32,
    /// The web console and the live job streams (`[console]`).
    pub console: crate::config::ConsoleSection,
    /// The origins browsers may call the API from (`[http]
    /// cors_allowed_origins`, checked by the configuration); empty: no CORS.
    pub cors_allowed_origins: Vec<String>,
}

/// Why the service could not be built; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// PostgreSQL could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] db::DbError),
    /// `[memory.embedder]` is configured and the chunk vectors cannot be
    /// set up (no pgvector, or vectors of other dimensions).
    #[error(transparent)]
    Vectors(#[from] db::VectorSetupError),
    /// The HTTP address cannot be bound (in use, not local, no permission);
    /// choose another `--http` address.
    #[error("cannot listen on {addr}: {source} (choose another --http address)")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding it failed.
        source: std::io::Error,
    },
    /// Subscribing to `flow.cmd.>` failed (the NATS connection is unusable);
    /// check NATS.
    #[error("cannot subscribe to the command subjects: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The server did not confirm the subscription to `flow.cmd.>` (the
    /// NATS connection is unusable, or this user may not use its inbox);
    /// check NATS.
    #[error("the NATS server did not confirm the command subscription: {0}")]
    Unconfirmed(#[source] async_nats::Error),
    /// This service's own NATS user may publish on `flow.cmd.>`: a sender
    /// inside its account could then write the `Nats-Request-Info` header
    /// the intake trusts. Run nats-server with the accounts of
    /// nats/production.conf (the service's users may not publish commands).
    #[error(
        "the NATS user of this service may publish on flow.cmd.>, so the broker cannot vouch \
         for who sends a command (any connection of its account could forge the \
         Nats-Request-Info header); run nats-server with accounts that deny it \
         (nats/production.conf, nats/dev.conf): the intake does not start"
    )]
    CommandsNotVouched,
    /// A registry step's headers read secrets, and secret access is not
    /// configured: every attempt of it would fail. Configure `[secrets]`
    /// or remove the step's headers.
    #[error(
        "step {step:?} of workflow {workflow:?} has headers read from secrets, and no [secrets] \
         vault_addr is configured: configure [secrets] (docs/SECRETS.md) or remove the \
         step's headers"
    )]
    StepSecretsNotConfigured {
        /// The workflow key.
        workflow: String,
        /// The step's name.
        step: String,
    },
}

/// Why the running service stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command intake stopped: its NATS subscription ended or its task
    /// failed; commands are no longer answered, restart the service.
    #[error("the command intake stopped: the NATS subscription ended")]
    IntakeEnded,
}

/// A built, running service.
pub struct Application {
    bus: Arc<CommandBus>,
    pool: Option<PgPool>,
    handler: Option<Arc<handlers::Ctx>>,
    http_addr: Option<SocketAddr>,
    /// True once the service drains (the first phase of a stop).
    drain: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    intake: Option<JoinHandle<()>>,
    reloader: Reloader,
}

/// Replaces, in the running service, what a reload of the configuration
/// may change without a restart (SIGHUP, docs/OPERATIONS.md "Reload"): the
/// HTTP API's `[[clients]]` and the intake's `[nats]` account roles. Each
/// is swapped whole: a request sees the old table or the new one.
#[derive(Clone, Default)]
pub struct Reloader {
    clients: Option<Arc<api::auth::Clients>>,
    accounts: Option<Arc<api::broker_identity::Accounts>>,
    /// The registry the bus, the handler and the HTTP API share.
    registry: Option<SharedRegistry>,
    /// The secret policy a new registry's step headers are checked with.
    secrets: Option<Arc<SecretService>>,
    /// True when a job handler runs here: a new registry's steps are
    /// checked as at start, and their outcome counters are created.
    handler: bool,
}

/// Why [`Reloader::replace_registry`] kept the running registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryReloadError {
    /// The file does not load or is not a valid registry.
    #[error(transparent)]
    Invalid(#[from] crate::commands::registry::RegistryError),
    /// A step header of the new registry reads secrets and this instance
    /// has no `[secrets]` (as at start, every attempt would fail).
    #[error(transparent)]
    Steps(#[from] BuildError),
}

/// What [`Reloader::apply`] changed; `None`: that part does not run here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The HTTP clients added, removed and changed, by id.
    pub clients: Option<api::auth::ClientChanges>,
    /// The NATS accounts whose role changed.
    pub accounts: Option<Vec<String>>,
}

impl Reloader {
    /// Applies the clients and the NATS accounts of `config` (a whole,
    /// checked configuration: [`Config::parse`] refused anything less).
    pub fn apply(&self, config: &Config) -> Reloaded {
        Reloaded {
            clients: self.clients.as_ref().map(|c| c.replace(&config.clients)),
            accounts: self.accounts.as_ref().map(|a| a.replace(&config.nats)),
        }
    }

    /// Loads the registry at `path` and, when it is valid (and, with a
    /// handler here, its steps' secrets can be read as at start), puts it
    /// in use for the jobs decided and started from now on; a job whose
    /// driver runs keeps the definition it started with. `Ok(None)`: no
    /// part that uses a registry runs here.
    pub fn replace_registry(
        &self,
        path: &std::path::Path,
    ) -> Result<Option<RegistryChanges>, RegistryReloadError> {
        let Some(shared) = &self.registry else {
            return Ok(None);
        };
        let new = Registry::load(path)?;
        if self.handler {
            check_step_secrets(&new, self.secrets.as_ref().map(|s| s.policy()))?;
            crate::metrics::register_workflows(&new);
        }
        Ok(Some(shared.replace(new)))
    }
}

/// Checks the steps whose headers read secrets before the handler starts
/// and says loudly what cannot work: without `[secrets]` every attempt of
/// such a step fails `secret_unavailable`; a secret no rule of `policy`
/// lets the handler read fails `secret_denied`.
fn check_step_secrets(
    registry: &Registry,
    policy: Option<&SecretPolicy>,
) -> Result<(), BuildError> {
    for (workflow, step, refs) in registry.secret_steps() {
        let Some(policy) = policy else {
            // every attempt would fail: refuse to start instead
            return Err(BuildError::StepSecretsNotConfigured {
                workflow: workflow.to_string(),
                step: step.name.clone(),
            });
        };
        for r in &refs {
            if let Decision::Denied { reason } =
                policy.decide(handlers::HANDLER_ACTOR, HANDLER_ROLE, &r.path)
            {
                tracing::warn!(
                    workflow,
                    step = %step.name,
                    secret = %r,
                    "a step header reads a secret the handler may not read: {reason}; \
                     its attempts fail secret_denied until a [[secrets.rules]] rule \
                     allows it"
                );
            }
        }
    }
    Ok(())
}

impl Application {
    /// Builds and starts every part `settings` asks for.
    pub async fn build(settings: Settings) -> Result<Self, BuildError> {
        let Settings {
            nats,
            log,
            registry,
            max_timeout_seconds,
            callback_sealer,
            intake,
            nats_accounts,
            checkpoints,
            database,
            secrets,
            memory,
            probes,
        } = settings;
        if database.as_ref().is_some_and(|d| d.handler.is_some()) {
            check_step_secrets(&registry, secrets.as_ref().map(|s| s.policy()))?;
        }
        let registry = SharedRegistry::from(registry);
        let mut reloader = Reloader {
            registry: Some(registry.clone()),
            secrets: secrets.clone(),
            ..Reloader::default()
        };
        let bus = Arc::new(CommandBus::new(
            log.clone(),
            JobServices {
                registry: registry.clone(),
                max_timeout_seconds,
                callback_sealer,
            },
        ));
        let (stop, stop_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(service) = &secrets {
            tasks.push(tokio::spawn(
                service
                    .clone()
                    .listen_for_invalidations(nats.clone(), stop_rx.clone()),
            ));
        }
        if let Some((key, every)) = checkpoints {
            tasks.push(tokio::spawn(write_checkpoints(
                nats.clone(),
                log.clone(),
                key,
                every,
                stop_rx.clone(),
            )));
        }
        let (mut pool, mut handler, mut http_addr) = (None, None, None);
        if let Some(d) = database {
            let p = db::connect(&d.url, d.max_connections).await?;
            db::migrate(&p).await?;
            if let (true, Some(m)) = (d.projections, &memory) {
                if let Some(schedule) = m.cleanup_schedule() {
                    tasks.push(tokio::spawn(crate::memory::cleanup::run_scheduled(
                        bus.clone(),
                        m.clone(),
                        p.clone(),
                        log.clone(),
                        schedule.clone(),
                        stop_rx.clone(),
                    )));
                }
            }
            if memory.is_some() {
                // its views exist before the HTTP API reads them
                db::migrate_model(&p, projections::ReadModel::Memory).await?;
                if let Some(e) = memory.as_ref().and_then(|m| m.embedder()) {
                    db::setup_active_vectors(&p, &e.space()).await?;
                }
            }
            if let (true, Some(m)) = (d.projections, &memory) {
                if let Some(embedder) = m.embedder() {
                    let handler = crate::memory::embedding::EmbeddingHandler {
                        bus: bus.clone(),
                        keys: m.keys().clone(),
                        embedder: embedder.clone(),
                    };
                    tasks.push(tokio::spawn(handler.run(log.clone(), stop_rx.clone())));
                }
                if let Some(extractor) = m.extractor() {
                    let handler = crate::memory::extraction::ExtractionHandler {
                        bus: bus.clone(),
                        memory: m.clone(),
                        extractor: extractor.clone(),
                    };
                    tasks.push(tokio::spawn(handler.run(log.clone(), stop_rx.clone())));
                }
            }
            if d.projections {
                for model in projections::ReadModel::ALL {
                    let run =
                        projections::runner::run(p.clone(), log.clone(), model, stop_rx.clone());
                    tasks.push(tokio::spawn(run));
                }
                // the memory read model opens sealed events with the
                // subjects' keys: it runs only where [memory] is on
                if let Some(m) = &memory {
                    let run = projections::runner::run_with_keys(
                        p.clone(),
                        log.clone(),
                        projections::ReadModel::Memory,
                        Some(m.keys().clone()),
                        stop_rx.clone(),
                    );
                    tasks.push(tokio::spawn(run));
                }
            }
            if let Some(config) = d.handler {
                if config.callback_key.is_none() {
                    tracing::warn!(
                        "no callback signing key: job callbacks are recorded as failed, \
                         never sent unsigned"
                    );
                }
                // the per-workflow outcome counters exist (at 0) from the start
                crate::metrics::register_workflows(&registry.current());
                reloader.handler = true;
                let ctx =
                    handlers::Ctx::new(bus.clone(), registry.clone(), config, secrets.clone());
                let run = handlers::manager::run(ctx.clone(), p.clone(), stop_rx.clone());
                tasks.push(tokio::spawn(run));
                handler = Some(ctx);
            }
            if let Some(h) = d.http {
                let listener = tokio::net::TcpListener::bind(h.addr)
                    .await
                    .map_err(|source| BuildError::Listen {
                        addr: h.addr,
                        source,
                    })?;
                let addr = listener.local_addr().map_err(|source| BuildError::Listen {
                    addr: h.addr,
                    source,
                })?;
                tracing::info!("HTTP API on http://{addr}");
                let clients = Arc::new(api::auth::Clients::new(&h.clients));
                reloader.clients = Some(clients.clone());
                let state = api::http::AppState {
                    pool: p.clone(),
                    nats: nats.clone(),
                    log: log.clone(),
                    metrics: crate::metrics::handle(),
                    bus: bus.clone(),
                    registry: registry.clone(),
                    clients: clients.clone(),
                    n8n_key: h.n8n_key,
                    callback_window_secs: h.callback_window_secs,
                    callback_limits: Arc::new(api::n8n::CallbackLimits::new(
                        h.callback_posts_per_minute,
                        h.callback_refusals_per_minute,
                    )),
                    handler_status: handler.clone().map(|ctx| {
                        let f: api::http::HandlerStatusFn = Arc::new(move || {
                            let s = ctx.status();
                            let reason = match &s {
                                handlers::HandlerStatus::Restarting(r) => Some(r.clone()),
                                _ => Some(format!(
                                    "holds {} of {} job partitions",
                                    ctx.leases.held(),
                                    handlers::lease::PARTITIONS
                                )),
                            };
                            (s.as_str(), reason)
                        });
                        f
                    }),
                    secrets: secrets.clone(),
                    memory: memory.clone(),
                    draining: drain_rx.clone(),
                    live: Arc::new(api::live::LiveStreams::new(
                        h.console.streams_per_client,
                        std::time::Duration::from_secs(h.console.stream_max_seconds),
                    )),
                    console: h.console.enabled,
                    cors_allowed_origins: h.cors_allowed_origins,
                };
                let mut stop = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    // the peer's address keys the n8n endpoint's rate limits
                    let app =
                        api::http::app(state).into_make_service_with_connect_info::<SocketAddr>();
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop.changed().await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "the HTTP API stopped");
                    }
                }));
                http_addr = Some(addr);
            }
            pool = Some(p);
        } else if let Some(at) = probes {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| BuildError::Listen { addr: at, source })?;
            let addr = listener
                .local_addr()
                .map_err(|source| BuildError::Listen { addr: at, source })?;
            tracing::info!(
                "HTTP API on http://{addr} (no database: /livez, /readyz and /metrics only)"
            );
            let state = api::http::ProbeState {
                nats: nats.clone(),
                log: log.clone(),
                metrics: crate::metrics::handle(),
                draining: drain_rx.clone(),
            };
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, api::http::probes(state))
                    .with_graceful_shutdown(async move {
                        let _ = stop.changed().await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the probes' HTTP server stopped");
                }
            }));
            http_addr = Some(addr);
        }
        let intake = if intake {
            let accounts = Arc::new(api::broker_identity::Accounts::new(&nats_accounts));
            reloader.accounts = Some(accounts.clone());
            Some(
                start_intake(
                    bus.clone(),
                    secrets.clone(),
                    memory.clone(),
                    pool.clone(),
                    nats,
                    accounts,
                    drain_rx.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        Ok(Application {
            bus,
            pool,
            handler,
            http_addr,
            drain,
            stop,
            tasks,
            intake,
            reloader,
        })
    }

    /// What replaces the reloadable parts of the running service (see
    /// [`Reloader`]); usable while [`Self::run_until`] runs.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The command bus every part issues commands through.
    pub fn bus(&self) -> &Arc<CommandBus> {
        &self.bus
    }

    /// The read-model database, if one was configured.
    pub fn pool(&self) -> Option<&PgPool> {
        self.pool.as_ref()
    }

    /// The job handler's context, if the handler runs.
    pub fn handler(&self) -> Option<&Arc<handlers::Ctx>> {
        self.handler.as_ref()
    }

    /// Where the HTTP API listens, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Runs until `shutdown` resolves or the intake stops on its own (an
    /// error), then stops in two phases. First it drains (after
    /// `shutdown` only, and with a handler whose `drain_grace` is not
    /// zero): the intake takes no new command, `POST /v1/jobs` answers 503
    /// and `/healthz` 503 `draining`, the handler starts nothing new and
    /// waits for the step calls in flight to end and be recorded, at most
    /// the grace period, or until `again` resolves (a second signal). Then
    /// it stops every part, waiting up to 5 s each.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        again: impl std::future::Future<Output = ()>,
    ) -> Result<(), RunError> {
        let mut intake = self.intake.take();
        let result = {
            let ended = async {
                match intake.as_mut() {
                    Some(t) => {
                        let _ = t.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ended => Err(RunError::IntakeEnded),
                _ = shutdown => Ok(()),
            }
        };
        if result.is_ok() {
            self.drain(again).await;
            // the commands delivered before the drain are answered (the
            // intake returns once its replies are sent)
            if let Some(t) = intake {
                if tokio::time::timeout(Duration::from_secs(5), t)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the command intake did not answer every command it \
                        had within 5 s; their senders retry them"
                    );
                }
            }
        }
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        result
    }
}

impl Application {
    /// The first phase of a stop: takes no new work and lets the handler's
    /// step calls in flight end and be recorded (see [`Self::run_until`]);
    /// returns what the handler drained (none: no handler, or no grace).
    pub async fn drain(
        &self,
        again: impl std::future::Future<Output = ()>,
    ) -> Option<handlers::lease::DrainReport> {
        let _ = self.drain.send(true);
        let ctx = self
            .handler
            .as_ref()
            .filter(|h| !h.config.drain_grace.is_zero())?;
        tokio::select! {
            r = ctx.drain() => Some(r),
            _ = again => {
                tracing::warn!("told again to stop: the drain ends now, the step calls \
                    in flight are stopped (the next holder sends them again)");
                None
            }
        }
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = &self.intake {
            t.abort();
        }
    }
}

/// Subscribes first (so a build that returns answers commands), then
/// serves in a task.
async fn start_intake(
    bus: Arc<CommandBus>,
    secrets: Option<Arc<SecretService>>,
    memory: Option<Arc<MemoryService>>,
    pool: Option<sqlx::PgPool>,
    nats: async_nats::Client,
    accounts: Arc<api::broker_identity::Accounts>,
    drain: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, BuildError> {
    check_commands_are_vouched(&nats).await?;
    let sub = api::nats::subscribe(&nats).await?;
    // once the server has the subscription, a command another connection
    // sends finds the intake
    round_trip(&nats).await.map_err(BuildError::Unconfirmed)?;
    Ok(tokio::spawn(api::nats::serve_until_drained(
        bus,
        secrets,
        memory,
        pool,
        nats,
        sub,
        accounts,
        Some(drain),
    )))
}

/// Fails closed unless this connection is refused publishing on the command
/// subjects: the intake trusts `Nats-Request-Info` only because every
/// command reaches it across a shared import (docs/adr/0008). A probe on a
/// subject of its own is published; if it comes back before an echo sent
/// after it, the server let it through.
async fn check_commands_are_vouched(nats: &async_nats::Client) -> Result<(), BuildError> {
    use futures::{FutureExt, StreamExt};
    let probe = format!(
        "{}.probe.{}",
        api::nats::COMMAND_SUBJECT_PREFIX,
        uuid::Uuid::new_v4().simple()
    );
    let mut heard = nats.subscribe(probe.clone()).await?;
    let published = nats.publish(probe, bytes::Bytes::new()).await;
    published.map_err(|e| BuildError::Unconfirmed(e.into()))?;
    round_trip(nats).await.map_err(BuildError::Unconfirmed)?;
    let leaked = heard.next().now_or_never().flatten().is_some();
    let _ = heard.unsubscribe().await;
    if leaked {
        return Err(BuildError::CommandsNotVouched);
    }
    Ok(())
}

/// Returns once the server has processed everything `nats` sent before: a
/// message to ourselves comes back only after the operations ahead of it
/// (a flush only empties the local buffer).
async fn round_trip(nats: &async_nats::Client) -> Result<(), async_nats::Error> {
    use futures::StreamExt;
    let inbox = nats.new_inbox();
    let mut echo = nats.subscribe(inbox.clone()).await?;
    nats.publish(inbox, bytes::Bytes::new()).await?;
    match tokio::time::timeout(Duration::from_secs(10), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the subscription ended".into()),
        Err(_) => Err("no echo within 10 s".into()),
    }
}

/// Resumes a stopped projection (`flowledger projections resume`). With
/// `skip` (stream sequence, reason, who), the skip is first recorded as an
/// event through the bus, so the log says who skipped what and why; then the
/// projection passes that sequence.
pub async fn resume_projection(
    bus: &CommandBus,
    pool: &PgPool,
    model: projections::ReadModel,
    skip: Option<(u64, String, String)>,
) -> Result<String, projections::ResumeError> {
    let stopped = match projections::stopped(pool, model).await? {
        Ok(stopped) => stopped,
        Err(nothing_to_resume) => return Ok(nothing_to_resume),
    };
    if let Some((seq, reason, by)) = &skip {
        stopped.check_skip(*seq)?;
        let actor = Actor {
            client_id: OPERATOR_ACTOR.into(),
            user_id: Some(by.clone()),
        };
        let command_id = ids::projection_skip(&stopped.name, *seq);
        // the same skip (version, sequence, reason, who) is the same command
        let what =
            serde_json::json!({"version": stopped.version, "seq": seq, "reason": reason, "by": by});
        let hash = chain::to_hex(&chain::sha256(what.to_string().as_bytes()));
        let meta = CommandMeta::originating(command_id, actor, hash);
        let command = ProjectionCommand::SkipEvent {
            version: stopped.version,
            seq: *seq,
            reason: reason.clone(),
            skipped_by: by.clone(),
        };
        bus.projection(&stopped.name, command, &meta)
            .await
            .map_err(|e| projections::ResumeError::Record(Box::new(CommandError::from(e))))?;
    }
    projections::resume(pool, &stopped, skip).await
}

/// The actor on commands an operator runs from the command line.
pub const OPERATOR_ACTOR: &str = "operator";

async fn write_checkpoints(
    nats: async_nats::Client,
    log: EventLog,
    key: CheckpointKey,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // one signer at a time across instances
    let leader = loop {
        let name = handlers::lease::Leases::instance_name();
        match handlers::lease::Singleton::start(log.jetstream(), "checkpoints", name, stop.clone())
            .await
        {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint signer cannot take part in leadership; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        // leadership is asked again right before the publish: another
        // instance signs when this one lost it meanwhile
        match checkpoint::checkpoint_as_leader(&nats, &log, &key, || leader.is_leader()).await {
            Ok(checkpoint::Signing::Stored(cp)) => {
                tracing::info!(seq = cp.seq, key_id = %cp.key_id, "checkpoint signed")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checkpoint failed; will retry"),
        }
    }
}
