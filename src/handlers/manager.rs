//! The job handler's event loop. It reads the log from its low-water mark
//! (the submission of the oldest job it still owes an action), folds each
//! such job's events into a view, starts one driver per job once it has
//! caught up, and forwards later events of that job to its driver.
//!
//! Restart safety: the low-water mark is saved every second and only moves
//! past a job once the handler owes it nothing (ended, callback recorded).
//! After a crash the jobs at or after the mark are folded again and their
//! drivers resume from what the log says; their commands repeat no event.
//! One handler is active per database (an advisory lock); others wait.
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
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use futures::FutureExt;

use crate::events::envelope::{decode_commit, EventRecord};
use crate::handlers::executor;
use crate::handlers::view::{JobView, StoryRecord};
use crate::handlers::Ctx;

const POSITION_NAME: &str = "jobs";

struct Job {
    view: JobView,
    driver: Option<mpsc::UnboundedSender<Arc<StoryRecord>>>,
    /// The driver's task, aborted when the job is parked.
    task: Option<tokio::task::AbortHandle>,
}

/// The jobs the handler follows, and those it parked.
#[derive(Default)]
struct Jobs {
    live: HashMap<String, Job>,
    /// Parked jobs and why, with the stream sequence of the submission.
    parked: HashMap<String, (u64, String)>,
    /// Parked since the last save.
    unsaved: Vec<(String, u64, String)>,
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

/// Runs the job handler until `stop` changes: waits for the advisory lock,
/// then follows the log; restarts after 1 s when the loop fails.
pub async fn run(ctx: Arc<Ctx>, pool: PgPool, mut stop: watch::Receiver<bool>) {
    loop {
        match run_once(&ctx, &pool, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "job handler stopped; restarting in 1 s");
                ctx.set_status(super::HandlerStatus::Restarting(e.clone()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

async fn run_once(
    ctx: &Arc<Ctx>,
    pool: &PgPool,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    // one active handler: hold an advisory lock on a dedicated connection
    let mut lock = pool.acquire().await.map_err(|e| e.to_string())?;
    loop {
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('flowledger-job-handler'))")
                .fetch_one(&mut *lock)
                .await
                .map_err(|e| e.to_string())?;
        if got {
            break;
        }
        ctx.set_status(super::HandlerStatus::NoLease);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
    let from: i64 = sqlx::query_scalar("SELECT next_seq FROM handler_positions WHERE name = $1")
        .bind(POSITION_NAME)
        .fetch_optional(pool)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or(1);
    ctx.set_status(super::HandlerStatus::Running);
    let log = ctx.bus.log().clone();
    let caught_up_at = log.last_seq().await.map_err(|e| e.to_string())?;
    tracing::info!(from, caught_up_at, "job handler reading the log");
    let consumer = log
        .stream()
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1) as u64,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot read the log: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Option<String>)>();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let spawn = |job_id: &str, job: &mut Job| {
        let (tx, rx) = mpsc::unbounded_channel();
        job.driver = Some(tx);
        // the folded view is the log up to here; later records follow on `rx`
        let view = job.view.clone();
        let (ctx, id, done) = (ctx.clone(), job_id.to_string(), done_tx.clone());
        let task = tokio::spawn(async move {
            let driven = AssertUnwindSafe(executor::drive(ctx, id.clone(), Some(view), rx));
            let parked = match driven.catch_unwind().await {
                Ok(parked) => parked,
                Err(panic) => Some(format!(
                    "the job's driver panicked: {}",
                    panic_text(&*panic)
                )),
            };
            let _ = done.send((id, parked));
        });
        job.task = Some(task.abort_handle());
    };
    let mut follow = Follow {
        pool,
        spawn,
        jobs: Jobs::default(),
        caught_up_at,
        caught_up: caught_up_at < from as u64,
        last_seq: (from as u64).saturating_sub(1),
        saved: from,
    };
    if follow.caught_up {
        tracing::info!("job handler caught up");
    }
    loop {
        tokio::select! {
            m = messages.next() => follow.on_message(m)?,
            Some((id, parked)) = done_rx.recv() => follow.on_done(&id, parked),
            _ = tick.tick() => follow.save().await?,
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// The state of `run_once`'s event loop: the jobs it follows, how far it
/// read the log, and the low-water mark it saved last.
struct Follow<'a, S: Fn(&str, &mut Job)> {
    pool: &'a PgPool,
    /// Starts a job's driver.
    spawn: S,
    jobs: Jobs,
    /// The last stream sequence when the handler started reading.
    caught_up_at: u64,
    caught_up: bool,
    last_seq: u64,
    saved: i64,
}

impl<S: Fn(&str, &mut Job)> Follow<'_, S> {
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
            match decode_commit(&m.payload) {
                Ok(lines) => {
                    for (_, r) in lines {
                        fold(&mut self.jobs, seq, r, self.caught_up, &self.spawn);
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
                .filter(|(_, j)| j.view.needs_handler())
                .map(|(k, _)| k.clone())
                .collect();
            tracing::info!(jobs = owed.len(), "job handler caught up; resuming jobs");
            for id in owed {
                if let Some(job) = self.jobs.live.get_mut(&id) {
                    (self.spawn)(&id, job);
                }
            }
        }
        Ok(())
    }

    /// A driver ended; `parked` says why the job is parked, if it is.
    fn on_done(&mut self, id: &str, parked: Option<String>) {
        if let Some(reason) = parked {
            self.jobs.park(id, self.last_seq, reason);
        } else if let Some(job) = self.jobs.live.get_mut(id) {
            job.driver = None;
            if !job.view.needs_handler() {
                self.jobs.live.remove(id);
            }
            // otherwise the view has not seen the driver's last
            // events yet; they remove it when they arrive
        }
    }

    /// Saves the jobs parked since the last save and the low-water mark.
    async fn save(&mut self) -> Result<(), String> {
        let low = self
            .jobs
            .live
            .values()
            .map(|j| j.view.submitted_seq)
            .min()
            .unwrap_or(self.last_seq + 1) as i64;
        metrics::gauge!("flowledger_handler_jobs").set(self.jobs.live.len() as f64);
        for (job_id, seq, reason) in std::mem::take(&mut self.jobs.unsaved) {
            sqlx::query(
                "INSERT INTO handler_parked_jobs (job_id, seq, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (job_id) \
                 DO UPDATE SET seq = EXCLUDED.seq, reason = EXCLUDED.reason, parked_at = now()",
            )
            .bind(&job_id)
            .bind(seq as i64)
            .bind(&reason)
            .execute(self.pool)
            .await
            .map_err(|e| e.to_string())?;
        }
        if low != self.saved {
            sqlx::query(
                "INSERT INTO handler_positions (name, next_seq) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET next_seq = EXCLUDED.next_seq, updated_at = now()",
            )
            .bind(POSITION_NAME)
            .bind(low)
            .execute(self.pool)
            .await
            .map_err(|e| e.to_string())?;
            self.saved = low;
        }
        Ok(())
    }
}

/// Folds one record into the job it belongs to and routes it; a record
/// that cannot be decoded or folded parks its job (and only that job).
fn fold(
    jobs: &mut Jobs,
    seq: u64,
    r: EventRecord,
    caught_up: bool,
    spawn: &impl Fn(&str, &mut Job),
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
        fold_one(&mut jobs.live, seq, r, caught_up, spawn)
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
    seq: u64,
    r: StoryRecord,
    caught_up: bool,
    spawn: &impl Fn(&str, &mut Job),
) -> Result<(), String> {
    let job_id = r.job_id.clone();
    if let Some(view) = JobView::submitted(seq, &r) {
        let job = jobs.entry(job_id.clone()).or_insert(Job {
            view,
            driver: None,
            task: None,
        });
        if caught_up && job.driver.is_none() {
            spawn(&job_id, job);
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
