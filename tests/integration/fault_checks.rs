//! The checks every fault test makes (issue 12, item 7), from the log and
//! the read side: every acknowledged command stored once, every job ended
//! exactly once, no step succeeded twice, no attempt recorded twice, no
//! step call or callback sent twice where no instance died mid-call, the
//! read models equal a rebuild, and the chain verifies.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use flowledger::projections::{rebuild, ReadModel};
use serde_json::Value;

use crate::helpers::*;
use crate::peers::Peer;

/// What the log says about a set of jobs. Reading it checks that each job
/// ended exactly once, no step succeeded twice and no attempt was recorded
/// twice.
pub(crate) struct Facts {
    /// Per job: its end events (one, checked).
    pub(crate) ended: HashMap<String, Vec<String>>,
    /// Per job: the holders of its handler lease, in order.
    pub(crate) holders: HashMap<String, Vec<String>>,
    /// Per job: how its result callback went (`CallbackDelivered`,
    /// `CallbackFailed`).
    pub(crate) called_back: HashMap<String, Vec<String>>,
    /// Per job: the status of each step result recorded, in order.
    pub(crate) results: HashMap<String, Vec<String>>,
}

impl Facts {
    pub(crate) async fn read<N>(app: &TestApp<N>, prefix: &str) -> Facts {
        let mut ended: HashMap<String, Vec<String>> = HashMap::new();
        let mut holders: HashMap<String, Vec<String>> = HashMap::new();
        let mut called_back: HashMap<String, Vec<String>> = HashMap::new();
        let mut succeeded: HashMap<(String, String), usize> = HashMap::new();
        let mut results: HashMap<(String, String, u64), usize> = HashMap::new();
        let mut statuses: HashMap<String, Vec<String>> = HashMap::new();
        for r in log_events(app).await {
            if r.aggregate_type != "job" || !r.aggregate_id.starts_with(prefix) {
                continue;
            }
            let id = r.aggregate_id.clone();
            match r.event_type.as_str() {
                "JobCompleted" | "JobFailed" | "JobCancelled" => {
                    ended.entry(id).or_default().push(r.event_type.clone())
                }
                "CallbackDelivered" | "CallbackFailed" => called_back
                    .entry(id)
                    .or_default()
                    .push(r.event_type.clone()),
                "JobHandlerChanged" => holders
                    .entry(id)
                    .or_default()
                    .push(r.data["holder"].as_str().unwrap_or("?").to_string()),
                "StepResultRecorded" => {
                    let step = r.data["step"].as_str().unwrap_or("?").to_string();
                    let attempt = r.data["attempt"].as_u64().unwrap_or(0);
                    let status = r.data["status"].as_str().unwrap_or("?").to_string();
                    statuses.entry(id.clone()).or_default().push(status);
                    *results
                        .entry((id.clone(), step.clone(), attempt))
                        .or_default() += 1;
                    if r.data["status"] == "succeeded" {
                        *succeeded.entry((id, step)).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        let twice: Vec<_> = succeeded.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "steps that succeeded twice: {twice:?}");
        let twice: Vec<_> = results.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "attempts recorded twice: {twice:?}");
        let twice: Vec<_> = ended.iter().filter(|(_, e)| e.len() > 1).collect();
        assert!(twice.is_empty(), "jobs that ended twice: {twice:?}");
        let twice: Vec<_> = called_back.iter().filter(|(_, e)| e.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "callback outcomes recorded twice: {twice:?}"
        );
        Facts {
            ended,
            holders,
            called_back,
            results: statuses,
        }
    }

    pub(crate) fn completed(&self) -> usize {
        self.ended
            .values()
            .filter(|e| e[0] == "JobCompleted")
            .count()
    }
}

/// Waits until `n` jobs named `<prefix><i>` have ended (per the log).
pub(crate) async fn all_ended<N>(
    app: &TestApp<N>,
    prefix: &str,
    n: usize,
    within: Duration,
) -> Facts {
    let deadline = Instant::now() + within;
    loop {
        let facts = Facts::read(app, prefix).await;
        if facts.ended.len() >= n {
            return facts;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} jobs ended within {} s",
            facts.ended.len(),
            within.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The requests to `path` per `Idempotency-Key`, for keys sent more than once.
pub(crate) fn sent_twice(peer: &Peer, path: &str) -> Vec<(String, usize)> {
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for r in peer.received(path) {
        let key = r
            .headers
            .get("idempotency-key")
            .cloned()
            .unwrap_or_default();
        *per_key.entry(key).or_default() += 1;
    }
    per_key.into_iter().filter(|(_, n)| *n > 1).collect()
}

/// Callbacks per job id, for jobs called back more than once.
pub(crate) fn called_back_twice(peer: &Peer) -> Vec<(String, usize)> {
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for r in peer.received("/cb") {
        let id = r.body["job_id"].as_str().unwrap_or("?").to_string();
        *per_job.entry(id).or_default() += 1;
    }
    per_job.into_iter().filter(|(_, n)| *n > 1).collect()
}

/// A request sent again (after its sender died mid-call) is the same
/// request: per `Idempotency-Key` (step calls) or job (callbacks), every
/// copy the peer got on `path` has the same body. Returns how many were
/// sent more than once.
pub(crate) fn repeats_are_identical(
    peer: &Peer,
    path: &str,
    key: &dyn Fn(&Value) -> String,
) -> usize {
    let mut per_key: HashMap<String, Vec<Value>> = HashMap::new();
    for r in peer.received(path) {
        let k = match r.headers.get("idempotency-key") {
            Some(k) => k.clone(),
            None => key(&r.body),
        };
        per_key.entry(k).or_default().push(r.body);
    }
    let mut repeated = 0;
    for (k, bodies) in &per_key {
        if bodies.len() > 1 {
            repeated += 1;
            assert!(
                bodies.iter().all(|b| b == &bodies[0]),
                "{path} {k} was sent again with another body: {bodies:?}"
            );
        }
    }
    repeated
}

/// Every command in the log is stored in one commit only (a command sent
/// again is answered from the first), and each acknowledged one of
/// `acked` (command ids) is there.
pub(crate) async fn stored_once<N>(app: &TestApp<N>, acked: &[String]) {
    let mut commits: HashMap<String, Vec<u64>> = HashMap::new();
    for seq in 1..=app.last_seq().await {
        let Some(m) = app.log.get(seq).await.expect("read the log") else {
            continue;
        };
        let records = flowledger::events::envelope::decode_commit(&m.payload).expect("a commit");
        if let Some((_, r)) = records.first() {
            commits.entry(r.command_id.clone()).or_default().push(seq);
        }
    }
    let twice: Vec<_> = commits.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "commands stored twice: {twice:?}");
    let lost: Vec<_> = acked.iter().filter(|c| !commits.contains_key(*c)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged commands not in the log: {lost:?}"
    );
}

/// Rows of every table of the read models, each table's rows sorted.
async fn read_models(pool: &sqlx::PgPool) -> BTreeMap<&'static str, Vec<Value>> {
    let mut out = BTreeMap::new();
    for model in ReadModel::ALL {
        for table in model.tables() {
            let rows: Vec<Value> = sqlx::query_scalar(&format!(
                "SELECT to_jsonb(t) FROM {table} t ORDER BY to_jsonb(t)::text"
            ))
            .fetch_all(pool)
            .await
            .expect("read a read model");
            out.insert(*table, rows);
        }
    }
    out
}

/// The read models at `url`, built live through the faults (and brought up
/// to the end of the log by a runner started here, the `serve` processes
/// being gone), equal a rebuild from the log, row for row. Nothing may
/// write to the log meanwhile.
pub(crate) async fn read_models_equal_a_rebuild<N>(app: &TestApp<N>, url: &str) {
    let read = spawn_api_on(app, true, registry(), url.to_string()).await;
    let rows = read.caught_up(&app.log).await;
    assert!(
        rows.iter().all(|r| r.state == "running"),
        "a projection stopped during the faults: {rows:?}"
    );
    let live = read_models(&read.pool).await;
    assert!(
        !live["workflows_executions"].is_empty(),
        "no job in the read model"
    );
    for model in ReadModel::ALL {
        rebuild::rebuild(&read.pool, &app.log, model)
            .await
            .expect("rebuild a read model");
    }
    let rebuilt = read_models(&read.pool).await;
    for (table, rows) in &live {
        assert_eq!(
            rows.len(),
            rebuilt[table].len(),
            "{table}: {} rows live, {} rebuilt",
            rows.len(),
            rebuilt[table].len()
        );
        assert!(rows == &rebuilt[table], "{table} differs from its rebuild");
    }
}

/// The live log's hash chain verifies from its first event to its last
/// (`audit verify`; the fault tests sign no checkpoint).
pub(crate) async fn audit_verifies<N>(app: &TestApp<N>) {
    use flowledger::audit::verify::{self, Options};
    let options = Options {
        allow_unsigned: true,
        ..Default::default()
    };
    let summary = verify::verify_live(&app.client, &app.log, None, &options)
        .await
        .unwrap_or_else(|e| panic!("audit verify fails after the faults: {e}"));
    assert_eq!(summary.to_seq, app.last_seq().await, "{summary:?}");
}
