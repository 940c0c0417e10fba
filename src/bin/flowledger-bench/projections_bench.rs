//! Projection benchmark: rebuild of ~1M events vs a plain COPY of the same
//! rows, live lag under a steady load, and server-side query latency on
//! 1M execution rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use flowledger::commands::job::{CompleteJob, FailJob, Job, JobCommand, JobServices, SubmitJob};
use flowledger::commands::registry::Registry;
use flowledger::events::envelope::{Actor, CommandMeta};
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::events::store::AggregateStore;
use flowledger::projections::{db, rebuild, runner, ReadModel};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long, env = "FLOWLEDGER_NATS_URL")]
    nats_url: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Jobs to create; each is one JobSubmitted, and every 10th also gets
    /// started and completed or failed (about 1.2 events per job).
    #[arg(long, default_value_t = 1_000_000)]
    jobs: usize,
    /// Commands per second for the live-lag run.
    #[arg(long, default_value_t = 300)]
    lag_rate: u64,
    #[arg(long, default_value_t = 10)]
    lag_secs: u64,
    /// Queries per latency measurement.
    #[arg(long, default_value_t = 300)]
    queries: usize,
}

const KEYS: usize = 20;

fn key(i: usize) -> String {
    format!("bench.workflow-{:02}", i % KEYS)
}

fn meta(id: String) -> CommandMeta {
    let actor = Actor {
        client_id: "bench".into(),
        user_id: None,
    };
    CommandMeta::originating(id, actor, String::new())
}

fn submit(i: usize) -> JobCommand {
    JobCommand::Submit(SubmitJob {
        workflow_key: key(i),
        client_id: format!("client-{}", i % 50),
        input: json!({"document": format!("doc-{i}.pdf"), "pages": i % 9}),
        priority: Some((i % 10) as u8 + 1),
        timeout_seconds: Some(300),
        callback_url: None,
        metadata: json!({"user_id": format!("user-{}", i % 200)}),
    })
}

async fn generate(store: &Arc<AggregateStore<Job>>, jobs: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= jobs {
                    return anyhow::Ok(());
                }
                let id = format!("job-{i}");
                store
                    .execute(&id, submit(i), &meta(format!("{id}-s")))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if i % 10 < 2 {
                    store
                        .execute(
                            &id,
                            JobCommand::Start(Default::default()),
                            &meta(format!("{id}-st")),
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let end = if i % 10 == 0 {
                        JobCommand::Complete(CompleteJob {
                            outputs: json!({"fields": 12}),
                            step_results: vec![],
                        })
                    } else {
                        JobCommand::Fail(FailJob {
                            error_code: "SOLVER_TIMEOUT".into(),
                            error_message: "ocr timed out".into(),
                            step_results: vec![],
                        })
                    };
                    store
                        .execute(&id, end, &meta(format!("{id}-e")))
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                if i % 100_000 == 99_999 {
                    eprintln!(
                        "  generated {} jobs in {:.0} s",
                        i + 1,
                        started.elapsed().as_secs_f64()
                    );
                }
                // keep the cache small: these aggregates are done
                if i % 10_000 == 0 {
                    store.clear_cache();
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Copies `table`'s rows out, then times COPY of those rows into an empty
/// table with the same columns and indexes.
async fn copy_baseline(pool: &sqlx::PgPool, table: &str) -> anyhow::Result<(usize, Duration)> {
    let mut conn = pool.acquire().await?;
    let mut out = conn
        .copy_out_raw(&format!("COPY {table} TO STDOUT (FORMAT binary)"))
        .await?;
    let mut data = Vec::new();
    while let Some(chunk) = out.next().await {
        data.extend_from_slice(&chunk?);
    }
    drop(out);
    let target = format!("bench_copy_{table}");
    sqlx::query(&format!("DROP TABLE IF EXISTS {target}"))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE {target} (LIKE {table} INCLUDING ALL)"
    ))
    .execute(&mut *conn)
    .await?;
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *conn)
        .await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!("COPY {target} FROM STDIN (FORMAT binary)"))
        .await?;
    copy.send(data).await?;
    copy.finish().await?;
    let took = started.elapsed();
    sqlx::query(&format!("DROP TABLE {target}"))
        .execute(&mut *conn)
        .await?;
    Ok((rows as usize, took))
}

/// Server-side execution time (EXPLAIN ANALYZE) of `sql` with one text
/// parameter per run; returns (p50, p99) in ms.
async fn latency(pool: &sqlx::PgPool, sql: &str, params: &[String]) -> anyhow::Result<(f64, f64)> {
    let mut times = Vec::with_capacity(params.len());
    for p in params {
        let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}"))
            .bind(p)
            .fetch_one(pool)
            .await?;
        let exec = plan[0]["Execution Time"].as_f64().unwrap_or(f64::NAN);
        let planning = plan[0]["Planning Time"].as_f64().unwrap_or(0.0);
        times.push(exec + planning);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok((pick(0.5), pick(0.99)))
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = crate::connect_service(&args.nats_url).await?;
    log::init(&client, &LogConfig::default()).await?;
    let event_log = EventLog::open(client.clone(), LogConfig::default()).await?;
    let pool = db::connect(&args.database_url, 8).await?;
    db::migrate(&pool).await?;
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let services = JobServices {
        registry: Registry::with_keys(keys.iter().map(String::as_str)).into(),
        max_timeout_seconds: 3600,
        callback_sealer: None,
    };
    let store = Arc::new(AggregateStore::<Job>::new(event_log.clone(), services));

    println!(
        "flowledger-bench projections: {} jobs, PostgreSQL and nats-server on this machine",
        args.jobs
    );
    let t = Instant::now();
    generate(&store, args.jobs).await?;
    let messages = event_log.last_seq().await?;
    println!(
        "generated {messages} commits in {:.0} s",
        t.elapsed().as_secs_f64()
    );

    println!("\n## Rebuild from stream sequence 1 vs COPY of the same rows\n");
    println!("| read model | events | rebuild s | events/s | rows | COPY s | rebuild/COPY speed |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut events_total = 0i64;
    for (model, table) in [
        (ReadModel::Executions, "workflows_executions"),
        (ReadModel::Audit, "audit_trail"),
    ] {
        let report = rebuild::rebuild(&pool, &event_log, model).await?;
        if events_total == 0 {
            events_total = sqlx::query_scalar("SELECT count(*) FROM audit_trail")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
        }
        let physical = format!("{table}_v{}", report.new_version);
        let (rows, copy) = copy_baseline(&pool, &physical).await?;
        let events = if events_total > 0 {
            events_total as f64
        } else {
            messages as f64
        };
        println!(
            "| {table} | {events:.0} | {:.1} | {:.0} | {rows} | {:.1} | {:.0}% |",
            report.seconds,
            events / report.seconds,
            copy.as_secs_f64(),
            100.0 * copy.as_secs_f64() / report.seconds
        );
    }

    println!(
        "\n## Query latency with {} execution rows \
         (server side: EXPLAIN ANALYZE execution + planning)\n",
        args.jobs
    );
    println!("| query | p50 ms | p99 ms | seed 000 target |");
    println!("|---|---:|---:|---|");
    let n = args.queries;
    let ids: Vec<String> = (0..n)
        .map(|i| format!("job-{}", (i * 7919) % args.jobs))
        .collect();
    let wf: Vec<String> = (0..n).map(key).collect();
    let none: Vec<String> = vec![String::new(); n];
    let windows: Vec<String> = (0..n).map(|i| format!("{}", 5 + i % 50)).collect();
    for (name, sql, params, target) in [
        (
            "lookup by id",
            "SELECT to_jsonb(e) FROM workflows_executions e WHERE execution_id = $1",
            &ids,
            "< 1 ms",
        ),
        (
            "by workflow_id, last 24 h, limit 100",
            "SELECT to_jsonb(e) FROM workflows_executions e WHERE workflow_id = $1 \
             AND created_at >= now() - interval '24 hours' \
             ORDER BY created_at DESC, id DESC LIMIT 100",
            &wf,
            "< 10 ms",
        ),
        (
            "pending executions, limit 100",
            "SELECT to_jsonb(e) FROM workflows_executions e WHERE status = 'pending' AND $1 = '' \
             ORDER BY created_at DESC, id DESC LIMIT 100",
            &none,
            "< 5 ms",
        ),
        (
            "time range (a window of 5-55 s), limit 100",
            "SELECT to_jsonb(e) FROM workflows_executions e \
             WHERE created_at >= (SELECT min(created_at) FROM workflows_executions) \
             AND created_at < (SELECT min(created_at) FROM workflows_executions) \
             + ($1 || ' seconds')::interval \
             ORDER BY created_at DESC, id DESC LIMIT 100",
            &windows,
            "< 50 ms",
        ),
    ] {
        let (p50, p99) = latency(&pool, sql, params).await?;
        println!("| {name} | {p50:.3} | {p99:.3} | {target} |");
    }

    println!(
        "\n## Live projection lag at {} commands/s for {} s\n",
        args.lag_rate, args.lag_secs
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for model in ReadModel::ALL {
        tokio::spawn(runner::run(
            pool.clone(),
            event_log.clone(),
            model,
            stop_rx.clone(),
        ));
    }
    // let the projections reach the live end first
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = event_log.last_seq().await? as i64;
        let rows = db::checkpoints(&pool).await?;
        if rows.iter().filter(|r| r.active).all(|r| r.last_seq >= last) || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acks: Arc<tokio::sync::Mutex<Vec<(u64, Instant)>>> = Default::default();
    let total = (args.lag_rate * args.lag_secs) as usize;
    let sampler = {
        let (pool, acks) = (pool.clone(), acks.clone());
        tokio::spawn(async move {
            let mut lags = Vec::new();
            let mut seen = 0usize;
            while seen < total {
                let cp: i64 = sqlx::query_scalar(
                    "SELECT min(last_seq) FROM projection_checkpoints WHERE active",
                )
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                let now = Instant::now();
                let mut a = acks.lock().await;
                a.retain(|(seq, at)| {
                    if *seq as i64 <= cp {
                        lags.push(now - *at);
                        seen += 1;
                        false
                    } else {
                        true
                    }
                });
                drop(a);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lags
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.lag_rate as f64));
    for i in 0..total {
        tick.tick().await;
        let (store, acks) = (store.clone(), acks.clone());
        let n = args.jobs + i;
        tokio::spawn(async move {
            let id = format!("job-{n}");
            if let Ok(r) = store
                .execute(&id, submit(n), &meta(format!("{id}-s")))
                .await
            {
                acks.lock().await.push((r.stream_seq, Instant::now()));
            }
        });
    }
    let mut lags = tokio::time::timeout(Duration::from_secs(120), sampler).await??;
    let _ = stop_tx.send(true);
    lags.sort();
    let pick =
        |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    println!("| commands | lag p50 ms | lag p99 ms |");
    println!("|---:|---:|---:|");
    println!("| {} | {:.1} | {:.1} |", lags.len(), pick(0.5), pick(0.99));
    println!(
        "\n(lag: from the append's ack to the moment every projection's checkpoint \
         covers it; sampled every 2 ms)"
    );
    Ok(())
}
