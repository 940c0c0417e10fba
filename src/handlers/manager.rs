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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};

use crate::events::envelope::{decode_commit, EventRecord};
use crate::handlers::executor;
use crate::handlers::view::JobView;
use crate::handlers::Ctx;

const POSITION_NAME: &str = "jobs";

struct Job {
    view: JobView,
    driver: Option<mpsc::UnboundedSender<Arc<EventRecord>>>,
}

pub async fn run(ctx: Arc<Ctx>, pool: PgPool, mut stop: watch::Receiver<bool>) {
    loop {
        match run_once(&ctx, &pool, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "job handler stopped; restarting in 1 s");
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
    let log = ctx.intake.log().clone();
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

    let mut jobs: HashMap<String, Job> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut caught_up = caught_up_at < from as u64;
    let mut last_seq = (from as u64).saturating_sub(1);
    let mut saved = from;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let spawn = |job_id: &str, job: &mut Job| {
        let (tx, rx) = mpsc::unbounded_channel();
        job.driver = Some(tx);
        // the folded view is the log up to here; later records follow on `rx`
        let view = job.view.clone();
        let (ctx, id, done) = (ctx.clone(), job_id.to_string(), done_tx.clone());
        tokio::spawn(async move {
            executor::drive(ctx, id.clone(), Some(view), rx).await;
            let _ = done.send(id);
        });
    };
    if caught_up {
        tracing::info!("job handler caught up");
    }
    loop {
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { return Err("the log's consumer ended".into()) };
                let m = m.map_err(|e| format!("reading the log: {e}"))?;
                let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
                last_seq = seq;
                let subject = m.subject.as_str();
                if subject.starts_with("flow.ev.job.") || subject.starts_with("flow.ev.approval.") {
                    match decode_commit(&m.payload) {
                        Ok(lines) => for (_, r) in lines {
                            fold(&mut jobs, seq, r, caught_up, &spawn);
                        },
                        Err(e) => tracing::error!(seq, error = %e, "not a flowledger commit; the handler skips it (run `flowledger audit verify`)"),
                    }
                }
                if !caught_up && seq >= caught_up_at {
                    caught_up = true;
                    let owed: Vec<String> = jobs.iter().filter(|(_, j)| j.view.needs_handler()).map(|(k, _)| k.clone()).collect();
                    tracing::info!(jobs = owed.len(), "job handler caught up; resuming jobs");
                    for id in owed {
                        if let Some(job) = jobs.get_mut(&id) {
                            spawn(&id, job);
                        }
                    }
                }
            }
            Some(id) = done_rx.recv() => {
                if let Some(job) = jobs.get_mut(&id) {
                    job.driver = None;
                    if !job.view.needs_handler() {
                        jobs.remove(&id);
                    }
                    // otherwise the view has not seen the driver's last
                    // events yet; they remove it when they arrive
                }
            }
            _ = tick.tick() => {
                let low = jobs.values().map(|j| j.view.submitted_seq).min().unwrap_or(last_seq + 1) as i64;
                metrics::gauge!("flowledger_handler_jobs").set(jobs.len() as f64);
                if low != saved {
                    sqlx::query(
                        "INSERT INTO handler_positions (name, next_seq) VALUES ($1, $2)
                         ON CONFLICT (name) DO UPDATE SET next_seq = EXCLUDED.next_seq, updated_at = now()",
                    )
                    .bind(POSITION_NAME)
                    .bind(low)
                    .execute(pool)
                    .await
                    .map_err(|e| e.to_string())?;
                    saved = low;
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Folds one record into the job it belongs to and routes it.
fn fold(
    jobs: &mut HashMap<String, Job>,
    seq: u64,
    r: EventRecord,
    caught_up: bool,
    spawn: &impl Fn(&str, &mut Job),
) {
    let job_id = if r.aggregate_type == "job" {
        r.aggregate_id.clone()
    } else {
        match r.data.get("job_id").and_then(|v| v.as_str()) {
            Some(id) => id.to_string(),
            None => return,
        }
    };
    if r.event_type == "JobSubmitted" {
        if let Some(view) = JobView::submitted(seq, &r) {
            let job = jobs
                .entry(job_id.clone())
                .or_insert(Job { view, driver: None });
            if caught_up && job.driver.is_none() {
                spawn(&job_id, job);
            }
        }
        return;
    }
    let Some(job) = jobs.get_mut(&job_id) else {
        return; // a job the handler owes nothing
    };
    job.view.apply(&r);
    match &job.driver {
        Some(tx) => {
            let _ = tx.send(Arc::new(r));
        }
        None if !job.view.needs_handler() => {
            jobs.remove(&job_id);
        }
        None => {}
    }
}
