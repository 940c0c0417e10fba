//! Running a projection: a named durable JetStream pull consumer feeding
//! batches into PostgreSQL; each batch and the checkpoint commit in one
//! transaction, so a crash or a redelivery has no effect on the result.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, Stream, StreamExt};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::events::chain;
use crate::events::envelope::decode_commit_as;
use crate::events::log::{EventLog, EVENT_SUBJECT_PREFIX};
use crate::projections::db::{self, DbError};
use crate::projections::event::ProjectedEvent;
use crate::projections::{apply, memory, ApplyError, Keys, Msg, ReadModel};

/// Most messages a live projection pulls and applies in one transaction.
pub const LIVE_BATCH: usize = 500;
/// Most messages a rebuild applies in one transaction (also the size a run
/// of good messages is split at in [`Projector::apply_all`]).
pub const REBUILD_BATCH: usize = 10_000;

/// One projection version, bound to its database and log.
#[derive(Clone)]
pub struct Projector {
    /// The read-model database the rows and the checkpoint are written to.
    pub pool: PgPool,
    /// The event stream it consumes.
    pub log: EventLog,
    /// The read model it maintains.
    pub model: ReadModel,
    /// The schema version it writes (tables `<table>_v<version>`).
    pub version: i32,
    /// The data subjects' keys (the memory read model opens sealed values
    /// with them; the others do not use them).
    pub keys: Keys,
}

/// Turns a JetStream message into what projections read; a message that is
/// not a valid commit is a poison at its sequence. Event hashes are computed
/// only for read models that store them; `memory` events are decoded whole
/// only for the memory read model.
pub fn decode(m: &jetstream::Message, model: ReadModel) -> Result<Msg, ApplyError> {
    let info = m
        .info()
        .map_err(|e| ApplyError::Unavailable(format!("message info: {e}")))?;
    let seq = info.stream_sequence;
    let poison = |reason: String| ApplyError::Poison { seq, reason };
    let lines =
        decode_commit_as::<ProjectedEvent>(&m.payload).map_err(|e| poison(e.to_string()))?;
    let events = lines
        .into_iter()
        .map(|(line, mut r)| {
            if model == ReadModel::Memory && r.aggregate_type == "memory" {
                r.memory = memory::decode(seq, line, &r)?;
            }
            let hash = if model.needs_hash(&r.aggregate_type) {
                let prev = chain::from_hex(&r.prev_hash).ok_or_else(|| {
                    poison(format!("prev_hash {:?} is not 64 hex digits", r.prev_hash))
                })?;
                chain::to_hex(&chain::event_hash(&prev, line))
            } else {
                String::new()
            };
            Ok((hash, r))
        })
        .collect::<Result<_, ApplyError>>()?;
    Ok(Msg { seq, events })
}

/// Waits for at least one message (up to `idle`), then takes what has
/// already arrived, up to `max`: live consumption applies what is there at
/// once, for low lag (a rebuild reads with `fetch`, see `rebuild::catch_up`).
pub async fn next_batch<S, E>(
    messages: &mut S,
    max: usize,
    idle: Duration,
) -> Result<Vec<jetstream::Message>, String>
where
    S: Stream<Item = Result<jetstream::Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut batch = Vec::new();
    match tokio::time::timeout(idle, messages.next()).await {
        Err(_) | Ok(None) => return Ok(batch),
        Ok(Some(m)) => batch.push(m.map_err(|e| e.to_string())?),
    }
    while batch.len() < max {
        match messages.next().now_or_never() {
            Some(Some(m)) => batch.push(m.map_err(|e| e.to_string())?),
            _ => break,
        }
    }
    Ok(batch)
}

impl Projector {
    /// The durable consumer's name: `flowledger-proj-<name>-v<version>`.
    pub fn consumer_name(&self) -> String {
        format!("flowledger-proj-{}-v{}", self.model.name(), self.version)
    }

    fn label(&self) -> String {
        self.model.name().to_string()
    }

    /// The last stream sequence applied (`projection_checkpoints.last_seq`).
    pub async fn checkpoint(&self) -> Result<u64, DbError> {
        let v: i64 = sqlx::query_scalar(
            "SELECT last_seq FROM projection_checkpoints WHERE name = $1 AND version = $2",
        )
        .bind(self.model.name())
        .bind(self.version)
        .fetch_one(&self.pool)
        .await?;
        Ok(v as u64)
    }

    /// This version's `state` (`running`, `stopped`, `building`) and
    /// whether it is the active one.
    pub async fn state(&self) -> Result<(String, bool), DbError> {
        let row: (String, bool) = sqlx::query_as(
            "SELECT state, active FROM projection_checkpoints WHERE name = $1 AND version = $2",
        )
        .bind(self.model.name())
        .bind(self.version)
        .fetch_one(&self.pool)
        .await?;
        Ok(row)
    }

    /// Applies messages after the checkpoint, in one transaction with the
    /// new checkpoint. Messages at or before the checkpoint are ignored.
    pub async fn apply_batch(&self, batch: &[Msg]) -> Result<u64, ApplyError> {
        let unavailable = |e: sqlx::Error| ApplyError::Unavailable(e.to_string());
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let last: i64 = sqlx::query_scalar(
            "SELECT last_seq FROM projection_checkpoints WHERE name = $1 \
             AND version = $2 FOR UPDATE",
        )
        .bind(self.model.name())
        .bind(self.version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ApplyError::Unavailable(format!(
                "version {} was replaced by a rebuild (its checkpoint is gone); \
                 taking up the active version",
                self.version
            ))
        })?;
        // Redelivered messages (at or below the checkpoint) are dropped; the
        // common case borrows the batch as it is.
        let fresh: std::borrow::Cow<'_, [Msg]> =
            if batch.first().is_none_or(|m| m.seq as i64 > last) {
                std::borrow::Cow::Borrowed(batch)
            } else {
                std::borrow::Cow::Owned(
                    batch
                        .iter()
                        .filter(|m| m.seq as i64 > last)
                        .cloned()
                        .collect(),
                )
            };
        let Some(end) = fresh.last().map(|m| m.seq) else {
            return Ok(last as u64);
        };
        apply::apply(
            self.model,
            &mut tx,
            self.version,
            &fresh,
            self.keys.as_deref(),
        )
        .await?;
        sqlx::query(
            "UPDATE projection_checkpoints SET last_seq = $3, \
             updated_at = now() WHERE name = $1 AND version = $2",
        )
        .bind(self.model.name())
        .bind(self.version)
        .bind(end as i64)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let applied = "flowledger_projection_events_applied_total";
        metrics::counter!(applied, "projection" => self.label())
            .increment(fresh.iter().map(|m| m.events.len() as u64).sum());
        metrics::gauge!("flowledger_projection_checkpoint_seq", "projection" => self.label())
            .set(end as f64);
        Ok(end)
    }

    async fn skipped(&self, seq: u64) -> Result<bool, ApplyError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_skips WHERE name = $1 AND seq = $2",
        )
        .bind(self.model.name())
        .bind(seq as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| ApplyError::Unavailable(e.to_string()))?;
        Ok(n > 0)
    }

    /// Moves the checkpoint past `seq` without applying it (an operator's
    /// recorded skip).
    async fn pass(&self, seq: u64) -> Result<(), ApplyError> {
        sqlx::query(
            "UPDATE projection_checkpoints SET last_seq = GREATEST(last_seq, $3), \
             updated_at = now() WHERE name = $1 AND version = $2",
        )
        .bind(self.model.name())
        .bind(self.version)
        .bind(seq as i64)
        .execute(&self.pool)
        .await
        .map_err(|e| ApplyError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Applies decoded messages; a failing batch is retried message by
    /// message to find the exact poison, everything before it is kept.
    /// Returns the new checkpoint or the poison (sequence, reason).
    pub async fn apply_all(&self, items: Vec<Result<Msg, ApplyError>>) -> Result<u64, ApplyError> {
        let mut checkpoint = 0;
        let mut run: Vec<Msg> = Vec::new();
        let mut items = items.into_iter().peekable();
        loop {
            let next = items.next();
            let flush = !matches!(next, Some(Ok(_)));
            match next {
                Some(Ok(m)) => run.push(m),
                Some(Err(e)) => {
                    checkpoint = checkpoint.max(self.apply_run(std::mem::take(&mut run)).await?);
                    match e {
                        ApplyError::Poison { seq, .. } if self.skipped(seq).await? => {
                            self.pass(seq).await?
                        }
                        e => return Err(e),
                    }
                    continue;
                }
                None => {}
            }
            if flush {
                checkpoint = checkpoint.max(self.apply_run(std::mem::take(&mut run)).await?);
                return Ok(checkpoint);
            }
            if run.len() >= REBUILD_BATCH && items.peek().is_some() {
                checkpoint = checkpoint.max(self.apply_run(std::mem::take(&mut run)).await?);
            }
        }
    }

    async fn apply_run(&self, run: Vec<Msg>) -> Result<u64, ApplyError> {
        if run.is_empty() {
            return Ok(0);
        }
        match self.apply_batch(&run).await {
            Err(ApplyError::Poison { .. }) if run.len() > 1 => {
                let mut cp = 0;
                for m in run {
                    match self.apply_batch(std::slice::from_ref(&m)).await {
                        Ok(c) => cp = c,
                        Err(ApplyError::Poison { seq, .. }) if self.skipped(seq).await? => {
                            self.pass(seq).await?
                        }
                        Err(ApplyError::Poison { reason, .. }) => {
                            return Err(ApplyError::Poison { seq: m.seq, reason })
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(cp)
            }
            Err(ApplyError::Poison { reason, .. }) if run.len() == 1 => {
                let seq = run[0].seq;
                if self.skipped(seq).await? {
                    self.pass(seq).await?;
                    return Ok(seq);
                }
                Err(ApplyError::Poison { seq, reason })
            }
            other => other,
        }
    }

    async fn mark_stopped(&self, seq: u64, reason: &str) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE projection_checkpoints \
             SET state = 'stopped', error_seq = $3, error = $4, updated_at = now()
             WHERE name = $1 AND version = $2",
        )
        .bind(self.model.name())
        .bind(self.version)
        .bind(seq as i64)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (Re)creates the durable consumer at the checkpoint: the checkpoint
    /// in PostgreSQL, not the consumer's ack floor, is the truth.
    async fn consumer(&self, from: u64) -> Result<pull::Stream, String> {
        let stream = self.log.stream();
        let name = self.consumer_name();
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "flowledger projection {} v{}",
                    self.model.name(),
                    self.version
                )),
                filter_subject: format!("{EVENT_SUBJECT_PREFIX}.>"),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: AckPolicy::All,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create consumer {name}: {e}"))?;
        consumer
            .stream()
            .max_messages_per_batch(LIVE_BATCH)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| format!("consume {name}: {e}"))
    }

    /// Consumes live until `shutdown`, this version stops being active, or
    /// the projection stops on a poison event.
    async fn consume(&self, shutdown: &mut watch::Receiver<bool>) -> Result<Exit, String> {
        let from = self.checkpoint().await.map_err(|e| e.to_string())? + 1;
        let mut messages = self.consumer(from).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let idle = Duration::from_millis(200);
        loop {
            let exit = tokio::select! {
                _ = shutdown.changed() => Some(Exit::Shutdown),
                _ = tick.tick() => self.still_running().await?,
                batch = next_batch(&mut messages, LIVE_BATCH, idle) => self.on_batch(batch?).await?,
            };
            if let Some(exit) = exit {
                return Ok(exit);
            }
        }
    }

    /// Why to stop consuming, if this version is no longer the active,
    /// running one; else reports the lag.
    async fn still_running(&self) -> Result<Option<Exit>, String> {
        let (state, active) = self.state().await.map_err(|e| e.to_string())?;
        if !active {
            return Ok(Some(Exit::Inactive));
        }
        if state != "running" {
            return Ok(Some(Exit::Stopped));
        }
        self.report_lag().await;
        Ok(None)
    }

    /// Applies and acks a batch of live messages; a poison event stops the
    /// projection.
    async fn on_batch(&self, batch: Vec<jetstream::Message>) -> Result<Option<Exit>, String> {
        let Some(last) = batch.last() else {
            return Ok(None);
        };
        let pending = last.info().map(|i| i.pending).unwrap_or(0);
        let items = batch.iter().map(|m| decode(m, self.model)).collect();
        match self.apply_all(items).await {
            Ok(_) => {
                let _ = last.ack_with(AckKind::Ack).await;
                metrics::gauge!("flowledger_projection_lag_events", "projection" => self.label())
                    .set(pending as f64);
                Ok(None)
            }
            Err(ApplyError::Poison { seq, reason }) => {
                tracing::error!(
                    projection = self.model.name(),
                    version = self.version,
                    seq,
                    %reason,
                    "projection stopped: cannot apply this event; fix the cause, \
                     then `flowledger projections resume {}` (or --skip {seq})",
                    self.model.name()
                );
                self.mark_stopped(seq, &reason)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Some(Exit::Stopped))
            }
            Err(ApplyError::Unavailable(e)) => Err(e),
        }
    }

    async fn report_lag(&self) {
        if let (Ok(last), Ok(cp)) = (self.log.last_seq().await, self.checkpoint().await) {
            metrics::gauge!("flowledger_projection_lag_events", "projection" => self.label())
                .set(last.saturating_sub(cp) as f64);
            metrics::gauge!("flowledger_projection_checkpoint_seq", "projection" => self.label())
                .set(cp as f64);
        }
    }
}

enum Exit {
    Shutdown,
    Inactive,
    Stopped,
}

/// Runs the active version of `model` for as long as the process lives:
/// follows version switches (rebuilds), waits while stopped, retries when
/// PostgreSQL or NATS are unavailable. One process runs a projection at a
/// time (a PostgreSQL advisory lock); others wait as hot standbys. A read
/// model that needs the subjects' keys ([`ReadModel::needs_subject_keys`])
/// does not run here: use [`run_with_keys`].
pub async fn run(pool: PgPool, log: EventLog, model: ReadModel, shutdown: watch::Receiver<bool>) {
    run_with_keys(pool, log, model, None, shutdown).await
}

/// [`run`] with the data subjects' keys (`[memory]`), which the memory read
/// model needs; without them it logs why and returns at once.
pub async fn run_with_keys(
    pool: PgPool,
    log: EventLog,
    model: ReadModel,
    keys: Keys,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = model.check_keys(&keys) {
        tracing::error!(projection = model.name(), error = %e, "projection not started");
        return;
    }
    let label = model.name().to_string();
    let mut lock_conn = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let step = async {
            if lock_conn.is_none() {
                let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                    .bind(format!("flowledger-projection-{}", model.name()))
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                if !got {
                    return Ok::<_, String>(Some(Duration::from_secs(2)));
                }
                lock_conn = Some(conn.detach());
            }
            let version = db::active_version(&pool, model)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!(
                        "projection {} has no active version; run `flowledger migrate`",
                        model.name()
                    )
                })?;
            let p = Projector {
                pool: pool.clone(),
                log: log.clone(),
                model,
                version,
                keys: keys.clone(),
            };
            // Create what this version's DDL adds (idempotent), holding its
            // checkpoint row: a rebuild that switched away from it meanwhile
            // deletes that row before dropping the tables, so it either waits
            // for this or this finds the row gone and does not re-create
            // tables that were just dropped.
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            let still_active: Option<bool> = sqlx::query_scalar(
                "SELECT active FROM projection_checkpoints WHERE name = $1 \
                 AND version = $2 FOR SHARE",
            )
            .bind(model.name())
            .bind(version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
            if still_active != Some(true) {
                return Ok(Some(Duration::from_millis(200)));
            }
            for stmt in db::ddl(model, version) {
                sqlx::query(&stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())?;
            let (state, _) = p.state().await.map_err(|e| e.to_string())?;
            metrics::gauge!("flowledger_projection_stopped", "projection" => label.clone())
                .set(if state == "stopped" { 1.0 } else { 0.0 });
            if state == "stopped" {
                p.report_lag().await;
                return Ok(Some(Duration::from_secs(1)));
            }
            tracing::info!(projection = model.name(), version, "projection running");
            // The lock lives as long as its session: a PostgreSQL restart
            // ends it, and another process may take it. Check the session
            // every second and stop consuming the moment it is gone.
            let Some(conn) = lock_conn.as_mut() else {
                return Ok(Some(Duration::ZERO));
            };
            let session_lost = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // a half-open connection never answers: that is lost too
                    let ping = sqlx::query("SELECT 1").execute(&mut *conn);
                    match tokio::time::timeout(Duration::from_secs(2), ping).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.to_string(),
                        Err(_) => return "no answer within 2 s".to_string(),
                    }
                }
            };
            let consumed = tokio::select! {
                r = p.consume(&mut shutdown) => r?,
                e = session_lost => {
                    return Err(format!(
                        "lost the projection's lock (its PostgreSQL session ended: {e}); \
                         it runs wherever the lock is taken next"
                    ));
                }
            };
            match consumed {
                Exit::Shutdown => Ok(None),
                Exit::Inactive | Exit::Stopped => Ok(Some(Duration::ZERO)),
            }
        };
        match step.await {
            Ok(None) => return,
            Ok(Some(wait)) => tokio::time::sleep(wait).await,
            Err(e) => {
                // a broken lock session holds no lock: take it again later
                if let Some(conn) = lock_conn.as_mut() {
                    let ping = sqlx::query("SELECT 1").execute(&mut *conn);
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(2), ping).await,
                        Ok(Ok(_))
                    ) {
                        lock_conn = None;
                    }
                }
                tracing::warn!(
                    projection = model.name(),
                    error = %e,
                    "projection paused; retrying in 2 s"
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}
