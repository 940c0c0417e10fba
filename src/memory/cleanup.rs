//! The memory cleanup (seed 001's nightly job): expired working state is
//! removed by recording `WorkingStateExpired` for each subject with values
//! past their expiry, and, with `[memory] episode_retention_days`, the
//! episodes whose turn is older are retired by recording `EpisodesRetired`
//! for each subject: one event per subject (per [`MAX_CLEANUP_ITEMS`] of
//! its items), so the log stays the truth and the read model follows.
//! `serve` runs it on a cron schedule (`[memory] cleanup_cron`, default
//! `0 2 * * *`, UTC), one instance at a time (a JetStream KV leadership,
//! as the checkpoint signer's); `flowledger memory cleanup` runs it once.
//!
//! What is due is read from the memory read model in keyset pages ordered
//! by subject; each subject's items go in one command, [`CONCURRENCY`]
//! subjects at a time. The aggregate decides again (a value set anew since
//! is not expired and is left out), so a stale read model or two runners
//! at once remove nothing they should not.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::bus::CommandBus;
use crate::commands::limits::MAX_CLEANUP_ITEMS;
use crate::commands::ErrorCode;
use crate::events::log::EventLog;
use crate::memory::service::{MemoryService, Swept};

/// How many due items one query reads.
const PAGE: i64 = 10_000;

/// Subjects whose command is under way at once (each: a Vault key read,
/// the aggregate's load, a JetStream append).
pub const CONCURRENCY: usize = 16;

/// What one cleanup did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// Working-state values recorded as expired.
    pub expired: u64,
    /// Episodes recorded as retired (`[memory] episode_retention_days`).
    pub retired: u64,
    /// Due items the aggregate no longer had or did not find due (removed
    /// or set anew meanwhile, or the subject erased): nothing recorded for
    /// them.
    pub skipped: u64,
    /// Items whose subject's command failed (Vault or the log
    /// unavailable): tried again next run.
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

    /// How many items are due at `$1`.
    fn count(self) -> &'static str {
        match self {
            Sweep::Expire => {
                "SELECT count(*) FROM memory_working_state w JOIN memory_subjects s \
                 USING (aggregate_id) WHERE w.expires_at <= $1 AND s.erased_at IS NULL"
            }
            Sweep::Retire(_) => {
                "SELECT count(*) FROM memory_episodes e JOIN memory_subjects s \
                 USING (aggregate_id) WHERE e.turn_at < $1 AND s.erased_at IS NULL"
            }
        }
    }

    /// The sweeps of a run at `now`: the expiry, and the retention if any.
    fn of(memory: &MemoryService, now: DateTime<Utc>) -> Vec<Sweep> {
        let mut sweeps = vec![Sweep::Expire];
        if let Some(keep) = memory.retention().episodes {
            sweeps.push(Sweep::Retire(now - keep));
        }
        sweeps
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

/// How many items a run at `now` would find due (working-state values and,
/// with a retention, episodes), for a progress bar.
pub async fn due(
    memory: &MemoryService,
    pool: &PgPool,
    now: DateTime<Utc>,
) -> Result<u64, CleanupError> {
    let mut n = 0;
    for sweep in Sweep::of(memory, now) {
        let c: i64 = sqlx::query_scalar(sweep.count())
            .bind(sweep.due_at(now))
            .fetch_one(pool)
            .await?;
        n += c.max(0) as u64;
    }
    Ok(n)
}

/// The due items of one subject, for one command.
struct Group {
    owner: String,
    subject_id: String,
    items: Vec<String>,
}

/// Splits `rows` (aggregate_id, item, owner, subject_id; ordered by
/// subject) into groups of one subject's items, at most
/// [`MAX_CLEANUP_ITEMS`] each, onto `groups`; the last subject's group is
/// left in `open` (its next items may be on the next page).
fn group(
    rows: Vec<(String, String, String, String)>,
    open: &mut Option<(String, Group)>,
    groups: &mut Vec<Group>,
) {
    for (id, item, owner, subject_id) in rows {
        match open {
            Some((open_id, g)) if *open_id == id && g.items.len() < MAX_CLEANUP_ITEMS => {
                g.items.push(item)
            }
            _ => {
                let next = Group {
                    owner,
                    subject_id,
                    items: vec![item],
                };
                if let Some((_, g)) = open.replace((id, next)) {
                    groups.push(g);
                }
            }
        }
    }
}

/// Records the expiry of every working-state value due at `now` and, with
/// an episode retention, the retirement of every episode older than it.
/// `progress` is told the counts after each page.
pub async fn run_once(
    bus: &CommandBus,
    memory: &MemoryService,
    pool: &PgPool,
    now: DateTime<Utc>,
    progress: &mut (dyn FnMut(&CleanupReport) + Send),
) -> Result<CleanupReport, CleanupError> {
    let started = Instant::now();
    let mut report = CleanupReport::default();
    for sweep in Sweep::of(memory, now) {
        // keyset paging: rows whose command failed stay due, so the cursor moves
        let mut after = (String::new(), String::new());
        let mut open = None;
        loop {
            let rows: Vec<(String, String, String, String)> = sqlx::query(sweep.query())
                .bind(sweep.due_at(now))
                .bind(&after.0)
                .bind(&after.1)
                .bind(PAGE)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get("aggregate_id")?,
                        r.try_get("item")?,
                        r.try_get("owner")?,
                        r.try_get("subject_id")?,
                    ))
                })
                .collect::<Result<_, sqlx::Error>>()?;
            let last_page = rows.len() < PAGE as usize;
            if let Some((id, item, ..)) = rows.last() {
                after = (id.clone(), item.clone());
            }
            let mut groups = Vec::new();
            group(rows, &mut open, &mut groups);
            if last_page {
                groups.extend(open.take().map(|(_, g)| g));
            }
            let mut done = futures::stream::iter(groups)
                .map(|g| async move {
                    let n = g.items.len();
                    let swept = match sweep {
                        Sweep::Expire => {
                            memory
                                .expire_working_state(bus, &g.owner, &g.subject_id, g.items, now)
                                .await
                        }
                        Sweep::Retire(before) => {
                            memory
                                .retire_episodes(bus, &g.owner, &g.subject_id, g.items, before)
                                .await
                        }
                    };
                    (n, swept)
                })
                .buffer_unordered(CONCURRENCY);
            while let Some((n, swept)) = done.next().await {
                match swept {
                    Ok(Swept { recorded, skipped }) => {
                        *sweep.done(&mut report) += recorded as u64;
                        report.skipped += skipped as u64;
                    }
                    Err(e)
                        if matches!(
                            e.code,
                            ErrorCode::NotFound | ErrorCode::Validation | ErrorCode::Rejected
                        ) =>
                    {
                        report.skipped += n as u64
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, ?sweep, items = n, "memory cleanup: a subject's items could not be removed; next run");
                        report.failed += n as u64;
                    }
                }
            }
            report.took_ms = started.elapsed().as_millis() as u64;
            progress(&report);
            if last_page {
                break;
            }
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

    fn rows(subject: &str, n: usize) -> Vec<(String, String, String, String)> {
        (0..n)
            .map(|i| {
                let id = format!("id-{subject}");
                (id, format!("k{i:05}"), "acme".into(), subject.into())
            })
            .collect()
    }

    #[test]
    fn due_rows_group_by_subject_in_bounded_groups_and_the_last_waits_for_the_next_page() {
        let (mut open, mut groups) = (None, Vec::new());
        let mut page = rows("a", 3);
        page.extend(rows("b", MAX_CLEANUP_ITEMS + 2));
        page.extend(rows("c", 2));
        group(page, &mut open, &mut groups);
        let sizes: Vec<(&str, usize)> = groups
            .iter()
            .map(|g| (g.subject_id.as_str(), g.items.len()))
            .collect();
        assert_eq!(sizes, [("a", 3), ("b", MAX_CLEANUP_ITEMS), ("b", 2)]);
        assert_eq!(groups[2].items, ["k01000", "k01001"]);
        // "c" goes on with the next page's rows
        let (_, g) = open.as_ref().expect("the last subject stays open");
        assert_eq!((g.subject_id.as_str(), g.items.len()), ("c", 2));
        let mut next = rows("c", 5).split_off(2);
        next.extend(rows("d", 1));
        group(next, &mut open, &mut groups);
        assert_eq!(groups.len(), 4);
        assert_eq!(
            groups[3].items,
            ["k00000", "k00001", "k00002", "k00003", "k00004"]
        );
        assert!(groups.iter().all(|g| g.owner == "acme"));
        assert_eq!(
            open.map(|(id, g)| (id, g.items.len())),
            Some(("id-d".into(), 1))
        );
    }

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
