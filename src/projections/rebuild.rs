//! Zero-downtime rebuild: build version N+1 beside N from stream sequence 1,
//! catch up to live, switch the reader views in one transaction, drop N.
//! The old version keeps serving (and keeps being updated by `serve`) until
//! the switch; after it, `serve` continues the new version from its
//! checkpoint.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use futures::StreamExt;
use sqlx::PgPool;

use crate::events::log::{EventLog, EVENT_SUBJECT_PREFIX};
use crate::projections::db::{self, DbError};
use crate::projections::runner::{decode, Projector, REBUILD_BATCH};
use crate::projections::{ApplyError, ContextError, Keys, ReadModel};

/// Why a rebuild did not switch readers; running it again resumes it.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Creating, switching or dropping the versioned tables failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The read model cannot be built here (the memory read model without
    /// `[memory]`): nothing was written.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// An event cannot be applied to the new version: fix the cause and run
    /// again, or skip it.
    #[error("rebuild of {name} v{version} stopped at stream sequence {seq}: {reason}; fix the cause and run the rebuild again (it resumes), or skip with `flowledger projections resume {name} --skip {seq}`")]
    Poison {
        /// The read model rebuilt.
        name: String,
        /// The version being built.
        version: i32,
        /// The stream sequence it could not apply.
        seq: u64,
        /// The database's reason.
        reason: String,
    },
    /// The new version's chunk vectors cannot be set up (pgvector missing).
    #[error(transparent)]
    Vectors(#[from] db::VectorSetupError),
    /// The stream or the database stayed unavailable (the reason, then the
    /// read model's name): run it again to resume.
    #[error("rebuild of {name} interrupted: {0}; run it again to resume", name = .1)]
    Unavailable(String, String),
}

/// What `flowledger projections rebuild` prints when readers switched.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    /// The read model rebuilt.
    pub name: String,
    /// The version readers used before (its tables are dropped).
    pub old_version: i32,
    /// The version readers use now.
    pub new_version: i32,
    /// The new version's checkpoint at the switch.
    pub last_seq: u64,
    /// Wall-clock time of the whole rebuild, in seconds.
    pub seconds: f64,
}

/// Reports progress: a bar with ETA on a terminal, a line every few seconds
/// otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Instant,
    label: String,
    unit: &'static str,
}

impl Progress {
    /// A progress report named `label` (e.g. `rebuild executions v2`), in
    /// stream sequences.
    pub fn new(label: String) -> Self {
        Self::counting(label, "seq")
    }

    /// A progress report named `label` that counts `unit`s (e.g. `items`).
    pub fn counting(label: String, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}"
                ))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(label.clone());
            b
        });
        Progress {
            bar,
            started: Instant::now(),
            last_line: Instant::now(),
            label,
            unit,
        }
    }

    /// Reports the checkpoint `done` of `target`; the rate counts from
    /// `from`, where this run started.
    pub fn update(&mut self, done: u64, target: u64, from: u64) {
        if let Some(b) = &self.bar {
            b.set_length(target);
            b.set_position(done);
            return;
        }
        if self.last_line.elapsed() < Duration::from_secs(5) && done < target {
            return;
        }
        self.last_line = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done.saturating_sub(from) as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", target.saturating_sub(done) as f64 / rate)
        } else {
            "?".into()
        };
        eprintln!(
            "flowledger: {}: {done}/{target} ({:.0}%), {rate:.0} {}/s, ETA {eta}",
            self.label,
            self.unit,
            100.0 * done as f64 / target.max(1) as f64
        );
    }

    /// Completes the bar (a terminal only).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// Applies everything from the checkpoint up to `target` at full speed.
/// Reading and decoding run in their own task, so the next batch is ready
/// while PostgreSQL applies the current one.
///
/// The reader pulls batches from an ephemeral pull consumer without acks,
/// one `fetch` per batch. It does not use an ordered push-style consumer:
/// while the applier is the slower side the reader waits on it, and an
/// ordered consumer that is not polled for a while takes its own silence
/// for missed heartbeats and stalls (measured: 11 s lost in a 1,000,000-job
/// rebuild). A fetch has nothing to miss.
pub async fn catch_up(
    p: &Projector,
    target: u64,
    progress: &mut Progress,
) -> Result<u64, ApplyError> {
    let mut cp = p
        .checkpoint()
        .await
        .map_err(|e| ApplyError::Unavailable(e.to_string()))?;
    let from = cp;
    if cp >= target {
        return Ok(cp);
    }
    let unavailable = |e: &dyn std::fmt::Display| ApplyError::Unavailable(e.to_string());
    let consumer = p
        .log
        .stream()
        .create_consumer(pull::Config {
            filter_subject: format!("{EVENT_SUBJECT_PREFIX}.>"),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: cp + 1,
            },
            ack_policy: AckPolicy::None,
            // removed by the server if this process dies mid-rebuild
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let consumer_name = consumer.cached_info().name.clone();
    let model = p.model;
    type Decoded = Vec<Result<crate::projections::Msg, ApplyError>>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(Decoded, u64), ApplyError>>(4);
    let reader = tokio::spawn(async move {
        loop {
            let batch = fetch_batch(&consumer).await;
            let item = batch.map(|batch| {
                // nothing left for this consumer: every event up to the
                // stream's end (and so up to `target`) has been read
                let last = batch
                    .last()
                    .map_or(target, |m| m.info().map_or(0, |i| i.stream_sequence));
                let items: Decoded = batch
                    .iter()
                    .map(|m| decode(m, model))
                    .filter(|m| !matches!(m, Ok(m) if m.seq > target))
                    .collect();
                (items, last)
            });
            let done = match &item {
                Ok((_, last)) => *last >= target,
                Err(_) => true,
            };
            if tx.send(item).await.is_err() || done {
                return;
            }
        }
    });
    let result = async {
        while cp < target {
            let (items, last) = rx
                .recv()
                .await
                .ok_or_else(|| ApplyError::Unavailable("the stream reader stopped".into()))??;
            cp = cp.max(p.apply_all(items).await?).max(last.min(target));
            progress.update(cp, target, from);
        }
        Ok(cp)
    }
    .await;
    reader.abort();
    let _ = p.log.stream().delete_consumer(&consumer_name).await;
    result
}

/// The next batch of up to [`REBUILD_BATCH`] messages; empty when the
/// consumer has delivered everything stored. A batch takes about 0.1 s; one
/// that has not arrived within [`FETCH_TIMEOUT`] (broker or connection
/// trouble) is an `Unavailable`, and the rebuild restarts from its
/// checkpoint.
async fn fetch_batch(
    consumer: &PullConsumer,
) -> Result<Vec<async_nats::jetstream::Message>, ApplyError> {
    let unavailable =
        |e: &dyn std::fmt::Display| ApplyError::Unavailable(format!("read the stream: {e}"));
    let fetch = async {
        let mut messages = consumer
            .fetch()
            .max_messages(REBUILD_BATCH)
            .messages()
            .await
            .map_err(|e| unavailable(&e))?;
        let mut batch = Vec::with_capacity(REBUILD_BATCH);
        while let Some(m) = messages.next().await {
            batch.push(m.map_err(|e| unavailable(&e))?);
        }
        Ok(batch)
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| {
            unavailable(&format_args!(
                "no complete batch within {} s",
                FETCH_TIMEOUT.as_secs()
            ))
        })?
}

const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// [`catch_up`], restarted from the checkpoint (with a fresh consumer) when
/// the stream or the database is briefly unavailable; a poison is final.
async fn catch_up_retrying(
    p: &Projector,
    target: u64,
    progress: &mut Progress,
) -> Result<u64, ApplyError> {
    let mut attempt = 0;
    loop {
        match catch_up(p, target, progress).await {
            Err(ApplyError::Unavailable(e)) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(
                    projection = p.model.name(),
                    error = %e,
                    attempt,
                    "rebuild reader interrupted; resuming from the checkpoint"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Rebuilds `model` into a new version and switches readers to it. A read
/// model that needs the subjects' keys is refused
/// ([`RebuildError::Context`]): use [`rebuild_with_keys`].
pub async fn rebuild(
    pool: &PgPool,
    log: &EventLog,
    model: ReadModel,
) -> Result<RebuildReport, RebuildError> {
    rebuild_with_keys(pool, log, model, None).await
}

/// [`rebuild`] with the data subjects' keys (`[memory]`), which the memory
/// read model opens its events with; it is refused without them, before
/// anything is written. The memory read model's new version keeps the
/// active one's vector space ([`rebuild_in_space`] to change it).
pub async fn rebuild_with_keys(
    pool: &PgPool,
    log: &EventLog,
    model: ReadModel,
    keys: Keys,
) -> Result<RebuildReport, RebuildError> {
    rebuild_in_space(pool, log, model, keys, None).await
}

/// [`rebuild_with_keys`] whose new memory version indexes the vectors of
/// `space` (`[memory.embedder]`'s model and dimensions) when given, else
/// those of the active version's space: the way to change the embedder's
/// model or dimensions (docs/MEMORY.md).
pub async fn rebuild_in_space(
    pool: &PgPool,
    log: &EventLog,
    model: ReadModel,
    keys: Keys,
    space: Option<db::VectorSpace>,
) -> Result<RebuildReport, RebuildError> {
    model.check_keys(&keys)?;
    let started = Instant::now();
    let name = model.name().to_string();
    if model.needs_subject_keys() {
        // set up where `[memory]` runs, not by `migrate`: maybe never yet
        db::migrate_model(pool, model).await?;
    }
    let old = db::active_version(pool, model)
        .await?
        .ok_or_else(|| DbError::NotInitialised { name: name.clone() })?;
    // Resume an interrupted rebuild (an inactive version above the active
    // one), or start the next version.
    let pending: Option<i32> = sqlx::query_scalar(
        "SELECT max(version) FROM projection_checkpoints WHERE name = $1 \
         AND NOT active AND version > $2",
    )
    .bind(&name)
    .bind(old)
    .fetch_one(pool)
    .await
    .map_err(DbError::from)?;
    let new = pending.unwrap_or(old + 1);
    for stmt in db::ddl(model, new) {
        sqlx::query(&stmt)
            .execute(pool)
            .await
            .map_err(DbError::from)?;
    }
    // the memory read model's chunk vectors ([memory.embedder]): the new
    // version has them in `space` or when the active one has, in its
    // space; they come from the EpisodeEmbedded events of that space,
    // never from the embedder
    let vectors = match model {
        ReadModel::Memory => match (
            space,
            db::table_space(pool, old).await.map_err(DbError::from)?,
        ) {
            (Some(s), _) => Some(Ok(s)),
            (None, Some(t)) => Some(t.space().ok_or(t.dimensions)),
            (None, None) => None,
        },
        _ => None,
    };
    match &vectors {
        Some(Ok(space)) => db::setup_vectors(pool, new, space, false).await?,
        // a table made before spaces were recorded: its dimensions
        Some(Err(dims)) => {
            for stmt in db::vector_ddl(new, (*dims).max(1) as u32) {
                sqlx::query(&stmt)
                    .execute(pool)
                    .await
                    .map_err(DbError::from)?;
            }
        }
        None => {}
    }
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, version, state, active) \
         VALUES ($1, $2, 'building', FALSE)
         ON CONFLICT (name, version) \
         DO UPDATE SET state = 'building', error = NULL, error_seq = NULL",
    )
    .bind(&name)
    .bind(new)
    .execute(pool)
    .await
    .map_err(DbError::from)?;
    let p = Projector {
        pool: pool.clone(),
        log: log.clone(),
        model,
        version: new,
        keys,
    };
    let mut progress = Progress::new(format!("rebuild {name} v{new}"));
    let fail = |e: ApplyError| match e {
        ApplyError::Poison { seq, reason } => RebuildError::Poison {
            name: name.clone(),
            version: new,
            seq,
            reason,
        },
        ApplyError::Unavailable(m) => RebuildError::Unavailable(m, name.clone()),
    };
    // Bulk load up to the end of the stream as it is now; then indexes and
    // statistics; then catch up until the remaining distance is small, and
    // switch.
    let target = log
        .last_seq()
        .await
        .map_err(|e| RebuildError::Unavailable(e.to_string(), name.clone()))?;
    catch_up_retrying(&p, target, &mut progress)
        .await
        .map_err(fail)?;
    for stmt in db::ddl(model, new)
        .iter()
        .filter(|s| db::is_index(s))
        .chain(&db::analyze(model, new))
    {
        sqlx::query(stmt)
            .execute(pool)
            .await
            .map_err(DbError::from)?;
    }
    let mut last;
    loop {
        let target = log
            .last_seq()
            .await
            .map_err(|e| RebuildError::Unavailable(e.to_string(), name.clone()))?;
        last = catch_up_retrying(&p, target, &mut progress)
            .await
            .map_err(fail)?;
        let now = log
            .last_seq()
            .await
            .map_err(|e| RebuildError::Unavailable(e.to_string(), name.clone()))?;
        if now.saturating_sub(last) <= REBUILD_BATCH as u64 {
            break;
        }
    }
    progress.finish();
    let mut tx = pool.begin().await.map_err(DbError::from)?;
    sqlx::query("SELECT 1 FROM projection_checkpoints WHERE name = $1 FOR UPDATE")
        .bind(&name)
        .execute(&mut *tx)
        .await
        .map_err(DbError::from)?;
    for stmt in db::switch_views(model, new) {
        sqlx::query(&stmt)
            .execute(&mut *tx)
            .await
            .map_err(DbError::from)?;
    }
    if vectors.is_some() {
        for stmt in db::vectors_view(new) {
            sqlx::query(&stmt)
                .execute(&mut *tx)
                .await
                .map_err(DbError::from)?;
        }
    }
    sqlx::query(
        "UPDATE projection_checkpoints SET active = (version = $2),
            state = CASE WHEN version = $2 THEN 'running' ELSE state END, updated_at = now()
         WHERE name = $1",
    )
    .bind(&name)
    .bind(new)
    .execute(&mut *tx)
    .await
    .map_err(DbError::from)?;
    tx.commit().await.map_err(DbError::from)?;
    // The old version is no longer read; drop it (waits for readers still
    // inside a query on it). Its checkpoint row goes first: a runner that
    // has not yet noticed the switch locks that row before it writes the
    // table, so taking the row first and the tables second is the same
    // order, and cannot deadlock with it (the other order did, in a test).
    let mut tx = pool.begin().await.map_err(DbError::from)?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1 AND version = $2")
        .bind(&name)
        .bind(old)
        .execute(&mut *tx)
        .await
        .map_err(DbError::from)?;
    for stmt in db::drop_tables(model, old) {
        sqlx::query(&stmt)
            .execute(&mut *tx)
            .await
            .map_err(DbError::from)?;
    }
    tx.commit().await.map_err(DbError::from)?;
    let _ = log
        .stream()
        .delete_consumer(&format!("flowledger-proj-{name}-v{old}"))
        .await;
    Ok(RebuildReport {
        name,
        old_version: old,
        new_version: new,
        last_seq: last,
        seconds: started.elapsed().as_secs_f64(),
    })
}
