//! The job handler's event loop. It reads the log from its low-water mark
//! (the submission of the oldest job it still owes an action), folds each
//! such job's events into a view, starts one driver per job once it has
//! caught up, and forwards later events of that job to its driver.
//!
//! Every instance folds every job; it drives only the jobs of the
//! partitions it holds a lease on (`lease`), and starts or stops drivers as
//! it gains or loses partitions.
//!
//! Restart safety: the low-water mark is saved every second (in NATS, the
//! `flow_handler_state` bucket) and only moves past a job once the handler
//! owes it nothing (ended, callback recorded). After a crash the jobs at or
//! after the mark are folded again and their drivers resume from what the
//! log says; their commands repeat no event. Any instance may save the mark:
//! each one's is a lower bound of the oldest job still owed.
//!
//! One bad job never stops the others: a job with an event the handler
//! cannot decode or fold, or whose driver cannot go on, is parked (left
//! alone, with the reason in the log, the `flowledger_handler_parked_jobs`
//! gauge and the table `handler_parked_jobs`); every other job goes on.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use futures::FutureExt;
use tracing::Instrument;

use crate::events::envelope::{decode_commit, EventRecord};
use crate::handlers::executor;
use crate::handlers::lease::{self, Change, Keeper, Leases, Positions};
use crate::handlers::view::{JobView, StoryRecord};
use crate::handlers::Ctx;

const POSITION_NAME: &str = "jobs";

/// A driver ended: which job, which task, and why the job is parked, if
/// it is.
struct Done {
    job_id: String,
    task: tokio::task::Id,
    parked: Option<String>,
}

struct Job {
    view: JobView,
    driver: Option<mpsc::UnboundedSender<Arc<StoryRecord>>>,
    /// The driver's task, aborted when the job is parked.
    task: Option<tokio::task::AbortHandle>,
}

/// The jobs the handler follows, and those it parked; their drivers stop
/// when it is dropped.
#[derive(Default)]
struct Jobs {
    live: HashMap<String, Job>,
    /// Parked jobs and why, with the stream sequence of the submission.
    parked: HashMap<String, (u64, String)>,
    /// Parked since the last save.
    unsaved: Vec<(String, u64, String)>,
}

impl Drop for Jobs {
    fn drop(&mut self) {
        for job in self.live.values() {
            if let Some(task) = &job.task {
                task.abort();
            }
        }
    }
}

impl Jobs {
    /// Leaves `job_id` alone from now on; `seq` is the stream sequence the
    /// reason was found at.
    fn park(&mut self, job_id: &str, seq: u64, reason: String) {
        let job = self.live.remove(job_id);
        // a parked job gets no more commands: stop its driver, if any
        if let Some(task) = job.as_ref().and_then(|j| j.task.as_ref()) {
            task.abort();
        }
        let submitted = job.map_or(seq, |j| j.view.submitted_seq);
        tracing::error!(
            job_id,
            seq,
            reason = %reason,
            "job parked: the handler leaves it alone until an operator acts; other jobs go on"
        );
        self.unsaved.push((job_id.to_string(), seq, reason.clone()));
        self.parked.insert(job_id.to_string(), (submitted, reason));
        metrics::gauge!("flowledger_handler_parked_jobs").set(self.parked.len() as f64);
    }
}

/// Runs the job handler until `stop` changes: follows the log and drives
/// the jobs of the partitions this instance holds leases on (`lease`);
/// restarts after 1 s when the loop fails. PostgreSQL holds only the parked
/// jobs: while it is down, jobs still run.
pub async fn run(ctx: Arc<Ctx>, pool: PgPool, mut stop: watch::Receiver<bool>) {
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let mut keeper_task = None;
    let positions = loop {
        match Keeper::open(ctx.bus.log().jetstream(), ctx.leases.clone()).await {
            Ok(k) => {
                let positions = k.positions();
                keeper_task = Some(KeeperTask(tokio::spawn(k.run(changes_tx, stop.clone()))));
                break Some(positions);
            }
            Err(e) => {
                tracing::warn!(error = %e, "job handler cannot open its leases; retrying in 1 s");
                ctx.set_status(super::HandlerStatus::Restarting(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => break None,
                }
            }
        }
    };
    if let Some(positions) = positions {
        loop {
            match run_once(&ctx, &pool, &positions, &mut changes, &mut stop).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "job handler stopped; restarting in 1 s");
                    // its drivers stopped with the loop: the partitions go to
                    // an instance whose loop runs until this one runs again
                    ctx.leases.handler_failed();
                    ctx.set_status(super::HandlerStatus::Restarting(e.clone()));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => break,
                    }
                }
            }
        }
    }
    // the drivers stopped with the loop; the keeper hands the partitions over
    if let Some(mut t) = keeper_task {
        let _ = (&mut t.0).await;
    }
}

/// The lease keeper's task, aborted when the handler's task ends any other
/// way (aborted, panicked): leases without a manager must lapse, not be
/// renewed for drivers that no longer run.
struct KeeperTask(tokio::task::JoinHandle<()>);

impl Drop for KeeperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the handler starts reading: the low-water mark in NATS, else the
/// one an older version kept in PostgreSQL, else the beginning.
async fn start_position(positions: &Positions, pool: &PgPool) -> Result<u64, String> {
    if let Some(seq) = positions.position().await? {
        return Ok(seq.max(1));
    }
    let old: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT next_seq FROM handler_positions WHERE name = $1")
            .bind(POSITION_NAME)
            .fetch_optional(pool)
            .await;
    Ok(match old {
        Ok(Some(seq)) => u64::try_from(seq).unwrap_or(1).max(1),
        Ok(None) => 1,
        Err(e) => {
            tracing::warn!(error = %e, "no saved handler position in NATS and PostgreSQL \
                is unavailable; reading the log from its start");
            1
        }
    })
}

async fn run_once(
    ctx: &Arc<Ctx>,
    pool: &PgPool,
    positions: &Positions,
    changes: &mut mpsc::UnboundedReceiver<Change>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let from = start_position(positions, pool).await?;
    ctx.set_status(super::HandlerStatus::Running);
    let log = ctx.bus.log().clone();
    let caught_up_at = log.last_seq().await.map_err(|e| e.to_string())?;
    tracing::info!(
        from,
        caught_up_at,
        holder = ctx.leases.holder(),
        "job handler reading the log"
    );
    let consumer = log
        .ordered_consumer("", from)
        .await
        .map_err(|e| format!("cannot read the log: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    // the loop runs: the keeper may hold leases for it (said every turn)
    ctx.leases.handler_running();

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // `fresh`: the driver reads the job from the log (a restart of a driver
    // that stopped while the manager's view may lag behind it)
    let spawn = |job_id: &str, job: &mut Job, fresh: bool| {
        let (tx, rx) = mpsc::unbounded_channel();
        job.driver = Some(tx);
        // the folded view is the log up to here; later records follow on `rx`
        let view = (!fresh).then(|| job.view.clone());
        // the job's span continues the trace of its submission (traces on)
        let span = tracing::info_span!(
            parent: None,
            "handler",
            job_id,
            workflow_key = %job.view.workflow_key,
        );
        crate::telemetry::adopt(&span, job.view.traceparent.as_deref());
        let (ctx, id, done) = (ctx.clone(), job_id.to_string(), done_tx.clone());
        let task = tokio::spawn(async move {
            let driving = executor::drive(ctx, id.clone(), view, rx).instrument(span);
            let driven = AssertUnwindSafe(driving);
            let parked = match driven.catch_unwind().await {
                Ok(parked) => parked,
                Err(panic) => Some(format!(
                    "the job's driver panicked: {}",
                    panic_text(&*panic)
                )),
            };
            let _ = done.send(Done {
                job_id: id,
                task: tokio::task::id(),
                parked,
            });
        });
        job.task = Some(task.abort_handle());
    };
    let mut follow = Follow {
        pool,
        leases: ctx.leases.clone(),
        spawn,
        jobs: Jobs::default(),
        caught_up_at,
        caught_up: caught_up_at < from,
        last_seq: from.saturating_sub(1),
        saved: from,
        unsaved_warned: false,
    };
    if follow.caught_up {
        tracing::info!("job handler caught up");
    }
    let mut reader = ReaderWatch::new(follow.last_seq);
    loop {
        tokio::select! {
            m = messages.next() => follow.on_message(m)?,
            Some(done) = done_rx.recv() => follow.on_done(done),
            _ = tick.tick() => {
                ctx.leases.handler_running();
                follow.save(positions).await;
                follow.restart_stopped();
                reader.check(&log, follow.last_seq).await?;
            }
            Some(change) = changes.recv() => match change {
                Change::Acquired(p) => follow.start_partition(p),
                Change::Lost(p) => follow.stop_partition(p),
            },
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// How long the handler's reader of the log may make no progress while the
/// stream holds later messages before the handler reads the log again.
pub const READER_STALL: Duration = Duration::from_secs(10);

/// Notices a reader of the log that stopped delivering without an error:
/// an ordered consumer whose server died can stay silent (seen with
/// nats-server 2.9 on a cluster losing the stream leader), while the loop
/// around it still ticks and keeps its leases.
struct ReaderWatch {
    /// The last sequence read when the stream was last seen ahead of it.
    seen: u64,
    /// Since when the reader has been behind without moving.
    since: Option<tokio::time::Instant>,
    /// When the stream's end was last asked.
    asked: tokio::time::Instant,
}

impl ReaderWatch {
    fn new(read: u64) -> Self {
        ReaderWatch {
            seen: read,
            since: None,
            asked: tokio::time::Instant::now(),
        }
    }

    /// Fails when the reader has been at `read` for [`READER_STALL`] while
    /// the stream has later messages; asks the stream's end at most every
    /// few seconds, and an unanswered question proves nothing.
    async fn check(&mut self, log: &crate::events::log::EventLog, read: u64) -> Result<(), String> {
        if read != self.seen {
            self.seen = read;
            self.since = None;
            return Ok(());
        }
        if self.asked.elapsed() < READER_STALL / 4 {
            return Ok(());
        }
        self.asked = tokio::time::Instant::now();
        let last = match tokio::time::timeout(Duration::from_secs(2), log.last_seq()).await {
            Ok(Ok(last)) => last,
            _ => return Ok(()),
        };
        if last <= read {
            self.since = None;
            return Ok(());
        }
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= READER_STALL {
            return Err(format!(
                "the log's reader delivered nothing for {} s while the stream holds \
                 sequences {}..={last}: reading the log again",
                since.elapsed().as_secs(),
                read + 1
            ));
        }
        Ok(())
    }
}

/// The state of `run_once`'s event loop: the jobs it follows, how far it
/// read the log, and the low-water mark it saved last.
struct Follow<'a, S: Fn(&str, &mut Job, bool)> {
    pool: &'a PgPool,
    /// The partitions this instance drives.
    leases: Arc<Leases>,
    /// Starts a job's driver.
    spawn: S,
    jobs: Jobs,
    /// The last stream sequence when the handler started reading.
    caught_up_at: u64,
    caught_up: bool,
    last_seq: u64,
    saved: u64,
    /// A failed save of parked jobs was logged (once per outage).
    unsaved_warned: bool,
}

impl<S: Fn(&str, &mut Job, bool)> Follow<'_, S> {
    /// Folds a message of the log; on catching up, starts the drivers of
    /// every job the handler owes an action.
    fn on_message<E: std::fmt::Display>(
        &mut self,
        m: Option<Result<jetstream::Message, E>>,
    ) -> Result<(), String> {
        let Some(m) = m else {
            return Err("the log's consumer ended".into());
        };
        let m = m.map_err(|e| format!("reading the log: {e}"))?;
        let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
        self.last_seq = seq;
        let subject = m.subject.as_str();
        if subject.starts_with("flow.ev.job.") || subject.starts_with("flow.ev.approval.") {
            // a submission's trace goes on in the job's handler span
            let trace = crate::telemetry::header_of(m.headers.as_ref());
            match decode_commit(&m.payload) {
                Ok(lines) => {
                    for (_, r) in lines {
                        let drive = self.caught_up
                            && self.leases.may_start(lease::partition(&r.aggregate_id));
                        let at = (seq, trace.as_deref());
                        fold(&mut self.jobs, at, r, drive, &self.spawn);
                    }
                }
                Err(e) => {
                    let job_id = subject.rsplit('.').next().unwrap_or_default();
                    let reason =
                        format!("not a flowledger commit: {e}; run `flowledger audit verify`");
                    self.jobs.park(job_id, seq, reason);
                }
            }
        }
        if !self.caught_up && seq >= self.caught_up_at {
            self.caught_up = true;
            let owed: Vec<String> = self
                .jobs
                .live
                .iter()
                .filter(|(id, j)| {
                    j.view.needs_handler() && self.leases.may_start(lease::partition(id))
                })
                .map(|(k, _)| k.clone())
                .collect();
            tracing::info!(jobs = owed.len(), "job handler caught up; resuming jobs");
            for id in owed {
                if let Some(job) = self.jobs.live.get_mut(&id) {
                    (self.spawn)(&id, job, false);
                }
            }
        }
        Ok(())
    }

    /// A driver ended; `parked` says why the job is parked, if it is. The
    /// end of a driver that was replaced meanwhile changes nothing.
    fn on_done(&mut self, done: Done) {
        let Done {
            job_id,
            task,
            parked,
        } = done;
        let current = self
            .jobs
            .live
            .get(&job_id)
            .and_then(|j| j.task.as_ref())
            .map(|t| t.id());
        if current != Some(task) {
            return;
        }
        if let Some(reason) = parked {
            self.jobs.park(&job_id, self.last_seq, reason);
        } else if let Some(job) = self.jobs.live.get_mut(&job_id) {
            job.driver = None;
            job.task = None;
            if !job.view.needs_handler() {
                self.jobs.live.remove(&job_id);
            }
            // otherwise the view has not seen the driver's last events yet
            // (they remove it when they arrive), or the driver stopped
            // without its lease: `restart_stopped` starts it again
        }
    }

    /// Starts again, from the log, the drivers of jobs still owed an action
    /// in partitions this instance holds (a driver that stopped while its
    /// lease looked lapsed; one whose end the view has not seen yet finds
    /// the job done and ends).
    fn restart_stopped(&mut self) {
        if !self.caught_up {
            return;
        }
        let stopped: Vec<String> = self
            .jobs
            .live
            .iter()
            .filter(|(id, j)| {
                j.driver.is_none()
                    && j.view.needs_handler()
                    && self.leases.may_start(lease::partition(id))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in stopped {
            if let Some(job) = self.jobs.live.get_mut(&id) {
                (self.spawn)(&id, job, true);
            }
        }
    }

    /// Starts the drivers of partition `p`'s jobs (once caught up: until
    /// then the catch-up starts them).
    fn start_partition(&mut self, p: usize) {
        if !self.caught_up {
            return;
        }
        let owed: Vec<String> = self
            .jobs
            .live
            .iter()
            .filter(|(id, j)| {
                j.driver.is_none() && j.view.needs_handler() && lease::partition(id) == p
            })
            .map(|(k, _)| k.clone())
            .collect();
        tracing::info!(
            partition = p,
            jobs = owed.len(),
            "driving the jobs of a partition"
        );
        for id in owed {
            if let Some(job) = self.jobs.live.get_mut(&id) {
                (self.spawn)(&id, job, false);
            }
        }
    }

    /// Stops the drivers of partition `p`'s jobs: the partition was lost or
    /// given away.
    fn stop_partition(&mut self, p: usize) {
        for (id, job) in self.jobs.live.iter_mut() {
            if lease::partition(id) == p {
                if let Some(task) = job.task.take() {
                    task.abort();
                }
                job.driver = None;
            }
        }
    }

    /// Saves the jobs parked since the last save (PostgreSQL: kept for the
    /// next save while it is unavailable) and the low-water mark (NATS).
    async fn save(&mut self, positions: &Positions) {
        let low = self
            .jobs
            .live
            .values()
            .map(|j| j.view.submitted_seq)
            .min()
            .unwrap_or(self.last_seq + 1);
        // nor past a parked job PostgreSQL has not stored yet: after a
        // restart it is folded (and parked) again
        let low = self
            .jobs
            .unsaved
            .iter()
            .filter_map(|(id, _, _)| self.jobs.parked.get(id).map(|(submitted, _)| *submitted))
            .fold(low, u64::min);
        metrics::gauge!("flowledger_handler_jobs").set(self.jobs.live.len() as f64);
        metrics::gauge!("flowledger_handler_partitions").set(self.leases.held() as f64);
        while let Some((job_id, seq, reason)) = self.jobs.unsaved.first().cloned() {
            let saved = sqlx::query(
                "INSERT INTO handler_parked_jobs (job_id, seq, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (job_id) \
                 DO UPDATE SET seq = EXCLUDED.seq, reason = EXCLUDED.reason, parked_at = now()",
            )
            .bind(&job_id)
            .bind(i64::try_from(seq).unwrap_or(i64::MAX))
            .bind(&reason)
            .execute(self.pool);
            // the event loop waits for this: never long
            let saved = tokio::time::timeout(Duration::from_millis(500), saved)
                .await
                .map_err(|_| "PostgreSQL did not answer within 500 ms".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match saved {
                Ok(_) => {
                    self.jobs.unsaved.remove(0);
                    self.unsaved_warned = false;
                }
                Err(e) => {
                    if !self.unsaved_warned {
                        tracing::warn!(error = %e, parked = self.jobs.unsaved.len(),
                            "cannot save parked jobs to PostgreSQL; jobs keep running, \
                             the save is retried every second");
                        self.unsaved_warned = true;
                    }
                    break;
                }
            }
        }
        if low != self.saved {
            match positions.save_position(low).await {
                Ok(()) => self.saved = low,
                Err(e) => tracing::debug!(error = %e, "cannot save the handler position; retrying"),
            }
        }
    }
}

/// Folds one record into the job it belongs to and routes it; a record
/// that cannot be decoded or folded parks its job (and only that job).
fn fold(
    jobs: &mut Jobs,
    (seq, trace): (u64, Option<&str>),
    r: EventRecord,
    caught_up: bool,
    spawn: &impl Fn(&str, &mut Job, bool),
) {
    // a job's approval has the job's id
    let job_id = r.aggregate_id.clone();
    if jobs.parked.contains_key(&job_id) {
        return;
    }
    let r = match StoryRecord::decode(r) {
        None => return,
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            if jobs.live.contains_key(&job_id) {
                jobs.park(&job_id, seq, format!("cannot decode an event: {e}"));
            }
            return;
        }
    };
    // the fold is pure and checked; a panic would still be a bug, and it
    // parks this job rather than stop the handler for every job
    let folded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        fold_one(&mut jobs.live, (seq, trace), r, caught_up, spawn)
    }));
    match folded {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => jobs.park(&job_id, seq, reason),
        Err(panic) => {
            let reason = format!("folding panicked: {}", panic_text(&*panic));
            jobs.park(&job_id, seq, reason);
        }
    }
}

fn fold_one(
    jobs: &mut HashMap<String, Job>,
    (seq, trace): (u64, Option<&str>),
    r: StoryRecord,
    caught_up: bool,
    spawn: &impl Fn(&str, &mut Job, bool),
) -> Result<(), String> {
    let job_id = r.job_id.clone();
    if let Some(mut view) = JobView::submitted(seq, &r) {
        view.traceparent = trace.map(str::to_string);
        let job = jobs.entry(job_id.clone()).or_insert(Job {
            view,
            driver: None,
            task: None,
        });
        if caught_up && job.driver.is_none() {
            spawn(&job_id, job, false);
        }
        return Ok(());
    }
    let Some(job) = jobs.get_mut(&job_id) else {
        return Ok(()); // a job the handler owes nothing
    };
    job.view
        .apply(&r)
        .map_err(|e| format!("cannot fold {}: {e}", r.event_type))?;
    match &job.driver {
        Some(tx) => {
            let _ = tx.send(Arc::new(r));
        }
        None if !job.view.needs_handler() => {
            jobs.remove(&job_id);
        }
        None => {}
    }
    Ok(())
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
