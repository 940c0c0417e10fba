//! The memory cleanup (seed 001's nightly job): expired working state is
//! removed by recording `WorkingStateDeleted` (reason `expired`) for each
//! value past its expiry, and, with `[memory] episode_retention_days`,
//! each episode whose turn is older is retired by recording
//! `EpisodeRetired`, so the log stays the truth and the read model
//! follows. `serve` runs it on a cron schedule (`[memory] cleanup_cron`,
//! default `0 2 * * *`, UTC), one instance at a time (a JetStream KV
//! leadership, as the checkpoint signer's); `flowledger memory cleanup`
//! runs it once.
//!
//! What is due is read from the memory read model; the aggregate decides
//! again (a value set anew since is not expired and is refused), so a
//! stale read model or two runners at once remove nothing they should not.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::bus::CommandBus;
use crate::commands::ErrorCode;
use crate::events::log::EventLog;
use crate::memory::service::{MemoryService, WorkingDeleteBody};

/// How many due values one query reads.
const BATCH: i64 = 1_000;

/// What one cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// Working-state values recorded as expired.
    pub expired: u64,
    /// Episodes recorded as retired (`[memory] episode_retention_days`).
    pub retired: u64,
    /// Due items the aggregate no longer had or did not find due (removed
    /// or set anew meanwhile): nothing recorded.
    pub skipped: u64,
    /// Items whose command failed (Vault or the log unavailable): tried
    /// again next run.
    pub failed: u64,
    /// Wall time, milliseconds.
    pub took_ms: u64,
}

/// Why a cleanup stopped.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The memory read model could not be read.
    #[error("the memory read model could not be read: {0}; retry when PostgreSQL is back")]
    Database(#[from] sqlx::Error),
}

/// One kind of due item: how it is found in the read model and removed.
#[derive(Debug, Clone, Copy)]
enum Sweep {
    /// Working-state values past their expiry at `now`.
    Expire,
    /// Episodes whose turn was before the cut-off.
    Retire(DateTime<Utc>),
}

impl Sweep {
    /// Due items after the cursor (`$2`, `$3`), `$4` at a time, each as
    /// (aggregate_id, item, owner, subject_id); `$1` is the time they are
    /// due at. Erased subjects have no rows to find.
    fn query(self) -> &'static str {
        match self {
            Sweep::Expire => {
                "SELECT w.aggregate_id, w.key AS item, s.owner, s.subject_id \
                 FROM memory_working_state w JOIN memory_subjects s USING (aggregate_id) \
                 WHERE w.expires_at <= $1 AND s.erased_at IS NULL \
                   AND (w.aggregate_id, w.key) > ($2, $3) \
                 ORDER BY w.aggregate_id, w.key LIMIT $4"
            }
            Sweep::Retire(_) => {
                "SELECT e.aggregate_id, e.episode_id AS item, s.owner, s.subject_id \
                 FROM memory_episodes e JOIN memory_subjects s USING (aggregate_id) \
                 WHERE e.turn_at < $1 AND s.erased_at IS NULL \
                   AND (e.aggregate_id, e.episode_id) > ($2, $3) \
                 ORDER BY e.aggregate_id, e.episode_id LIMIT $4"
            }
        }
    }

    fn due_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Sweep::Expire => now,
            Sweep::Retire(before) => before,
        }
    }

    fn done(self, report: &mut CleanupReport) -> &mut u64 {
        match self {
            Sweep::Expire => &mut report.expired,
            Sweep::Retire(_) => &mut report.retired,
        }
    }
}

/// Records the expiry of every working-state value due at `now` and, with
/// an episode retention, the retirement of every episode older than it.
/// `progress` is told the counts after each batch.
pub async fn run_once(
    bus: &CommandBus,
    memory: &MemoryService,
    pool: &PgPool,
    now: DateTime<Utc>,
    progress: &mut (dyn FnMut(&CleanupReport) + Send),
) -> Result<CleanupReport, CleanupError> {
    let started = Instant::now();
    let mut report = CleanupReport::default();
    let mut sweeps = vec![Sweep::Expire];
    if let Some(keep) = memory.retention().episodes {
        sweeps.push(Sweep::Retire(now - keep));
    }
    for sweep in sweeps {
        // keyset paging: rows whose command failed stay due, so the cursor moves
        let mut after = (String::new(), String::new());
        loop {
            let rows = sqlx::query(sweep.query())
                .bind(sweep.due_at(now))
                .bind(&after.0)
                .bind(&after.1)
                .bind(BATCH)
                .fetch_all(pool)
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let (id, item): (String, String) = (r.try_get("aggregate_id")?, r.try_get("item")?);
                let (owner, subject_id): (String, String) =
                    (r.try_get("owner")?, r.try_get("subject_id")?);
                let done = match sweep {
                    Sweep::Expire => {
                        let body = WorkingDeleteBody {
                            subject_id,
                            key: item.clone(),
                        };
                        memory
                            .working_delete(bus, &owner, body, true, None, now)
                            .await
                    }
                    Sweep::Retire(before) => {
                        memory
                            .retire_episode(bus, &owner, &subject_id, item.clone(), before)
                            .await
                    }
                };
                match done {
                    Ok(_) => *sweep.done(&mut report) += 1,
                    Err(e)
                        if matches!(
                            e.code,
                            ErrorCode::NotFound | ErrorCode::Validation | ErrorCode::Rejected
                        ) =>
                    {
                        report.skipped += 1
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, ?sweep, "memory cleanup: an item could not be removed; next run");
                        report.failed += 1;
                    }
                }
                after = (id, item);
            }
            report.took_ms = started.elapsed().as_millis() as u64;
            progress(&report);
        }
    }
    report.took_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Parses a cron expression (five fields, UTC; `@daily` and the like).
pub fn parse_schedule(expr: &str) -> Result<croner::Cron, String> {
    croner::Cron::new(expr)
        .parse()
        .map_err(|e| format!("{expr:?} is not a cron expression: {e}"))
}

/// Runs the cleanup at each time `schedule` names, on the instance that
/// holds the `memory-cleanup` leadership, until `stop`.
pub async fn run_scheduled(
    bus: std::sync::Arc<CommandBus>,
    memory: std::sync::Arc<MemoryService>,
    pool: PgPool,
    log: EventLog,
    schedule: croner::Cron,
    mut stop: watch::Receiver<bool>,
) {
    let leader = loop {
        let name = crate::handlers::lease::Leases::instance_name();
        match crate::handlers::lease::Singleton::start(
            log.jetstream(),
            "memory-cleanup",
            name,
            stop.clone(),
        )
        .await
        {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(error = %e, "memory cleanup cannot take part in leadership; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    loop {
        let now = Utc::now();
        let next = match schedule.find_next_occurrence(&now, false) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "memory cleanup: the schedule names no next time; the cleanup stops");
                return;
            }
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if !leader.is_leader() {
            continue;
        }
        match run_once(&bus, &memory, &pool, Utc::now(), &mut |_| {}).await {
            Ok(r) => tracing::info!(
                expired = r.expired,
                retired = r.retired,
                skipped = r.skipped,
                failed = r.failed,
                took_ms = r.took_ms,
                "memory cleanup done"
            ),
            Err(e) => tracing::warn!(error = %e, "memory cleanup failed; next scheduled run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_name_the_next_time() {
        let s = parse_schedule("0 2 * * *").unwrap();
        let t = DateTime::parse_from_rfc3339("2026-12-02T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let next = s.find_next_occurrence(&t, false).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-12-03T02:00:00+00:00");
        let e = parse_schedule("every night").unwrap_err();
        assert!(e.contains("every night"), "{e}");
    }
}
