//! Job handler benchmark: what the handler adds on top of its steps, and
//! how many jobs a second it sustains with 1,000 in flight.
//!
//! Solver peers run in this process: one HTTP server whose `/a`, `/b`, `/c`
//! answer after the delay the job's inputs give for that step (drawn
//! uniformly from 50-240 ms per step and job), so the slowest step of every
//! job is known. The job handler runs as in `serve` (manager, dispatcher,
//! drivers, the same HTTP client) on the real event log and PostgreSQL.
//!
//! * **overhead**: jobs at a steady, light rate; per job, the time from
//!   sending the submit command to seeing its `JobCompleted` in the stream,
//!   minus its slowest step's delay.
//! * **throughput**: a closed loop that keeps `--in-flight` jobs running
//!   (a new job is submitted as each one completes) for `--throughput-secs`;
//!   jobs completed per second, against what the steps' latency allows
//!   (in-flight / mean slowest-step delay), and side by side with a
//!   baseline that calls the same three steps directly (same HTTP client,
//!   no flowledger), which shows what this machine allows with the peers
//!   sharing its CPU. Rounds alternate baseline and flowledger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use flowledger::bus::CommandBus;
use flowledger::commands::job::{JobCommand, JobServices, SubmitJob};
use flowledger::commands::registry::{Registry, SharedRegistry};
use flowledger::events::envelope::{decode_commit, Actor, CommandMeta};
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::handlers::{lease, manager, Ctx, HandlerConfig};
use flowledger::projections::db;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long, env = "FLOWLEDGER_NATS_URL")]
    nats_url: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Jobs of the overhead run.
    #[arg(long, default_value_t = 400)]
    overhead_jobs: usize,
    /// Their submission rate, jobs per second (light: the handler is idle
    /// between jobs).
    #[arg(long, default_value_t = 20)]
    overhead_rate: u64,
    /// Jobs kept in flight during the throughput run.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    #[arg(long, default_value_t = 15)]
    throughput_secs: u64,
    /// Throughput rounds (each: baseline, then flowledger).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Shortest and longest step delay, ms.
    #[arg(long, default_value_t = 50)]
    min_step_ms: u64,
    #[arg(long, default_value_t = 240)]
    max_step_ms: u64,
    /// Instead of overhead and baseline: jobs/s and CPU per job on one
    /// handler instance, then on two (in this process, each with its own
    /// leases), then the failover time when one of two dies.
    #[arg(long)]
    scale: bool,
}

const STEPS: [&str; 3] = ["a", "b", "c"];
const WORKFLOW: &str = "bench.three-steps";

/// Job id -> who waits for its end, and when the job was seen starting.
#[derive(Default)]
struct Watch {
    ends: HashMap<String, oneshot::Sender<(Instant, bool)>>,
    starts: HashMap<String, Instant>,
    /// Every job end seen, by the job's handler partition (`--scale`).
    ended: Vec<(usize, Instant)>,
}
type Waiters = Arc<Mutex<Watch>>;

/// The solver peer: sleeps `inputs.delays_ms.<step>` then answers.
async fn start_peer() -> anyhow::Result<String> {
    async fn step(
        axum::extract::Path(name): axum::extract::Path<String>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::Json<Value> {
        let ms = body["inputs"]["delays_ms"][&name].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        axum::Json(json!({"step": name, "took_ms": ms}))
    }
    let app = axum::Router::new().route("/{name}", axum::routing::post(step));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// Watches the stream for job ends and wakes their waiters.
async fn watch_ends(log: &EventLog, waiters: Waiters) -> anyhow::Result<()> {
    let consumer = log
        .stream()
        .create_consumer(pull::OrderedConfig {
            filter_subject: "flow.ev.job.>".into(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let now = Instant::now();
            let Ok(lines) = decode_commit(&m.payload) else {
                continue;
            };
            for (_, r) in lines {
                let ok = match r.event_type.as_str() {
                    "JobCompleted" => true,
                    "JobFailed" | "JobCancelled" => false,
                    "JobStarted" => {
                        let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                        w.starts.insert(r.aggregate_id, now);
                        continue;
                    }
                    _ => continue,
                };
                let waiter = {
                    let mut w = waiters.lock().unwrap_or_else(|p| p.into_inner());
                    w.ended.push((lease::partition(&r.aggregate_id), now));
                    w.ends.remove(&r.aggregate_id)
                };
                if let Some(w) = waiter {
                    let _ = w.send((now, ok));
                }
            }
        }
    });
    Ok(())
}

struct Bench {
    bus: Arc<CommandBus>,
    waiters: Waiters,
    http: reqwest::Client,
    peer: String,
    min_ms: u64,
    max_ms: u64,
}

/// One job's result: end-to-end time, its slowest step, success, and
/// the time from submit to seeing `JobStarted`.
struct Run {
    total: Duration,
    slowest: Duration,
    ok: bool,
    to_start: Option<Duration>,
}

impl Bench {
    fn delays(&self) -> (Vec<u64>, Duration) {
        let delays: Vec<u64> = STEPS
            .iter()
            .map(|_| fastrand::u64(self.min_ms..=self.max_ms))
            .collect();
        let slowest = Duration::from_millis(delays.iter().copied().max().unwrap_or(0));
        (delays, slowest)
    }

    /// The baseline: the three step calls a job makes, sent directly.
    async fn run_direct(&self, job_id: String) -> anyhow::Result<Run> {
        let (delays, slowest) = self.delays();
        let inputs = json!({"delays_ms": {"a": delays[0], "b": delays[1], "c": delays[2]}});
        let t0 = Instant::now();
        let calls = STEPS.iter().map(|step| {
            let body = json!({"job_id": job_id, "workflow_key": WORKFLOW, "step": step,
                              "attempt": 1, "inputs": inputs});
            self.http
                .post(format!("{}/{step}", self.peer))
                .header("Idempotency-Key", format!("{job_id}:{step}:1"))
                .json(&body)
                .send()
        });
        let mut ok = true;
        for r in futures::future::join_all(calls).await {
            let r = r?;
            ok &= r.status().is_success();
            r.bytes().await?;
        }
        Ok(Run {
            total: t0.elapsed(),
            slowest,
            ok,
            to_start: None,
        })
    }

    async fn run_job(&self, job_id: String) -> anyhow::Result<Run> {
        let (delays, slowest) = self.delays();
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ends
            .insert(job_id.clone(), tx);
        let submit = SubmitJob {
            workflow_key: WORKFLOW.into(),
            client_id: "bench".into(),
            input: json!({"delays_ms": {"a": delays[0], "b": delays[1], "c": delays[2]}}),
            priority: None,
            timeout_seconds: Some(120),
            callback_url: None,
            metadata: json!({}),
        };
        let meta = CommandMeta {
            command_id: format!("submit:{job_id}"),
            actor: Actor {
                client_id: "bench".into(),
                user_id: None,
            },
            correlation_id: job_id.clone(),
            causation_id: job_id.clone(),
            command_hash: String::new(),
        };
        let t0 = Instant::now();
        self.bus
            .job(&job_id, JobCommand::Submit(submit), &meta)
            .await
            .map_err(|e| anyhow::anyhow!("submit {job_id}: {e}"))?;
        let (end, ok) = tokio::time::timeout(Duration::from_secs(120), rx)
            .await
            .with_context(|| format!("job {job_id} did not end within 120 s"))?
            .context("the end watcher stopped")?;
        let started = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .starts
            .remove(&job_id);
        Ok(Run {
            total: end - t0,
            slowest,
            ok,
            to_start: started.map(|s| s.saturating_duration_since(t0)),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Submit to `JobStarted` (intake, handler's read of the log, dispatch), sorted.
fn to_start(runs: &[Run]) -> Vec<f64> {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| r.to_start.map(ms)).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn overheads(runs: &[Run]) -> Vec<f64> {
    let mut v: Vec<f64> = runs.iter().map(|r| ms(r.total) - ms(r.slowest)).collect();
    v.sort_by(f64::total_cmp);
    v
}

const RAMP_UP: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Handler,
}

/// Keeps `in_flight` jobs going for `secs`; returns the runs that ended
/// after the ramp-up and before the end.
async fn closed_loop(
    bench: &Arc<Bench>,
    in_flight: usize,
    secs: u64,
    mode: Mode,
    run_id: &str,
    round: usize,
) -> anyhow::Result<Vec<Run>> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..in_flight {
        let b = bench.clone();
        let prefix = format!("t{round}-{run_id}-{w}");
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                let id = format!("{prefix}-{n}");
                let r = match mode {
                    Mode::Direct => b.run_direct(id).await?,
                    Mode::Handler => b.run_job(id).await?,
                };
                n += 1;
                done.push((Instant::now(), r));
            }
            anyhow::Ok(done)
        }));
    }
    let mut counted = Vec::new();
    for w in workers {
        for (t, r) in w.await?? {
            if t >= started + RAMP_UP && t <= deadline {
                counted.push(r);
            }
        }
    }
    Ok(counted)
}

/// Prints one throughput run; returns its jobs per second.
fn report(name: &str, runs: &[Run], in_flight: usize, secs: u64) -> f64 {
    let window = secs.saturating_sub(RAMP_UP.as_secs()).max(1) as f64;
    let rate = runs.len() as f64 / window;
    let mean_slowest = runs.iter().map(|r| ms(r.slowest)).sum::<f64>() / runs.len().max(1) as f64;
    let allowed = in_flight as f64 / (mean_slowest / 1000.0);
    let failed = runs.iter().filter(|r| !r.ok).count();
    let mut lat: Vec<f64> = runs.iter().map(|r| ms(r.total)).collect();
    lat.sort_by(f64::total_cmp);
    println!(
        "  {name:<24} {rate:>6.0} jobs/s = {:>3.0}% of what the steps allow ({allowed:.0}/s: \
         {in_flight} / {mean_slowest:.0} ms mean slowest step); latency p50 {:.0} ms, \
         p99 {:.0} ms; {failed} failed",
        100.0 * rate / allowed,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    );
    rate
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = crate::connect_service(&args.nats_url).await?;
    let config = LogConfig::default();
    log::init(&client, &config).await?;
    let event_log = EventLog::open(client.clone(), config).await?;
    let pool = db::connect(&args.database_url, 16).await?;
    db::migrate(&pool).await?;
    let peer = start_peer().await?;
    let steps: Vec<Value> = STEPS
        .iter()
        .map(|s| {
            let url = format!("{peer}/{s}");
            json!({"name": s, "kind": "solver", "url": url,
                   "timeout_ms": 10_000, "max_attempts": 1})
        })
        .collect();
    let registry = SharedRegistry::from(Registry::parse(
        std::path::Path::new("bench-registry.json"),
        &json!({"version": 1, "workflows": {WORKFLOW: {"steps": steps}}}).to_string(),
    )?);
    let bus = Arc::new(CommandBus::new(
        event_log.clone(),
        JobServices {
            registry: registry.clone(),
            max_timeout_seconds: 3600,
            callback_sealer: None,
        },
    ));
    let handler_config = HandlerConfig {
        max_concurrent_jobs: args.in_flight.max(1),
        ..Default::default()
    };
    let ctx = Ctx::new(bus.clone(), registry.clone(), handler_config.clone(), None);
    let http = ctx.http.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let first = ctx.clone();
    let handler = tokio::spawn(manager::run(ctx, pool.clone(), stop_rx.clone()));
    let waiters: Waiters = Arc::default();
    watch_ends(&event_log, waiters.clone()).await?;
    let bench = Arc::new(Bench {
        bus,
        waiters,
        http,
        peer,
        min_ms: args.min_step_ms,
        max_ms: args.max_step_ms,
    });
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    println!(
        "job handler benchmark: 3 solver steps of {}-{} ms each, nats {}",
        args.min_step_ms,
        args.max_step_ms,
        client.server_info().version
    );
    // warm up connections and caches
    for i in 0..20 {
        bench.run_job(format!("warm-{run_id}-{i}")).await?;
    }
    if args.scale {
        let second = Ctx::new(
            Arc::new(CommandBus::new(
                event_log.clone(),
                JobServices {
                    registry: registry.clone(),
                    max_timeout_seconds: 3600,
                    callback_sealer: None,
                },
            )),
            registry,
            handler_config,
            None,
        );
        scale(&bench, &args, &run_id, &first, second, pool).await?;
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), handler).await;
        return Ok(());
    }

    // overhead: a light, steady rate
    let every = Duration::from_secs_f64(1.0 / args.overhead_rate.max(1) as f64);
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(every);
    for i in 0..args.overhead_jobs {
        tick.tick().await;
        let b = bench.clone();
        let id = format!("o-{run_id}-{i}");
        tasks.push(tokio::spawn(async move { b.run_job(id).await }));
    }
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(t.await??);
    }
    let failed = runs.iter().filter(|r| !r.ok).count();
    let o = overheads(&runs);
    println!(
        "\noverhead at {} jobs/s ({} jobs, {failed} failed): end-to-end minus the slowest step",
        args.overhead_rate,
        runs.len()
    );
    println!(
        "  p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        percentile(&o, 0.5),
        percentile(&o, 0.9),
        percentile(&o, 0.99),
        o.last().copied().unwrap_or(f64::NAN)
    );
    let st = to_start(&runs);
    println!(
        "  of which submit -> JobStarted: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&st, 0.5),
        percentile(&st, 0.99)
    );

    // throughput: keep `in_flight` jobs running, baseline and flowledger
    // alternating
    println!(
        "\nthroughput with {} jobs in flight, {} s per run ({} s ramp-up not counted)",
        args.in_flight,
        args.throughput_secs,
        RAMP_UP.as_secs()
    );
    let mut ratios = Vec::new();
    for round in 1..=args.rounds {
        let direct = closed_loop(
            &bench,
            args.in_flight,
            args.throughput_secs,
            Mode::Direct,
            &run_id,
            round,
        )
        .await?;
        let direct_rate = report(
            "baseline (direct calls)",
            &direct,
            args.in_flight,
            args.throughput_secs,
        );
        let handled = closed_loop(
            &bench,
            args.in_flight,
            args.throughput_secs,
            Mode::Handler,
            &run_id,
            round,
        )
        .await?;
        let rate = report("flowledger", &handled, args.in_flight, args.throughput_secs);
        let st = to_start(&handled);
        println!(
            "    flowledger: submit -> JobStarted p50 {:.0} ms, p99 {:.0} ms",
            percentile(&st, 0.5),
            percentile(&st, 0.99)
        );
        println!(
            "  round {round}: flowledger / baseline = {:.0}%",
            100.0 * rate / direct_rate
        );
        ratios.push(rate / direct_rate);
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    println!(
        "\nflowledger / baseline, median of {n} rounds: {:.0}%",
        100.0 * median
    );
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), handler).await;
    Ok(())
}

/// CPU time this process used so far (user + system), from /proc (clock
/// ticks of 10 ms, the Linux default).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // the fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "waited 60 s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `--scale`: one instance, two instances, then one of two killed.
async fn scale(
    bench: &Arc<Bench>,
    args: &Args,
    run_id: &str,
    first: &Arc<Ctx>,
    second: Arc<Ctx>,
    pool: sqlx::PgPool,
) -> anyhow::Result<()> {
    let secs = args.throughput_secs;
    println!(
        "\nscale-out: {} jobs in flight, {secs} s per run ({} s ramp-up not counted); \
         CPU is this whole process (peers and load generator included)",
        args.in_flight,
        RAMP_UP.as_secs()
    );
    wait_for("the first instance to hold every partition", || {
        first.leases.held() == lease::PARTITIONS
    })
    .await?;
    let mut rates = Vec::new();
    for (instances, round) in [(1, 101), (2, 102)] {
        if instances == 2 {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            // runs until the process ends (or the failover run kills it)
            std::mem::forget(_tx);
            let h = tokio::spawn(manager::run(second.clone(), pool.clone(), rx));
            SECOND.with(|s| *s.borrow_mut() = Some(h.abort_handle()));
            wait_for("the two instances to share the partitions", || {
                first.leases.held() > 0
                    && second.leases.held() > 0
                    && first.leases.held() + second.leases.held() == lease::PARTITIONS
            })
            .await?;
        }
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        let runs = closed_loop(bench, args.in_flight, secs, Mode::Handler, run_id, round).await?;
        let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
        let name = format!(
            "{instances} instance{}",
            if instances == 1 { "" } else { "s" }
        );
        let rate = report(&name, &runs, args.in_flight, secs);
        // every job that ended during the run, ramp-up included, used the CPU
        let all = (rate * wall.as_secs_f64()).max(1.0);
        println!(
            "    CPU {:.2} ms per job ({:.0}% of one core over {:.0} s)",
            cpu.as_secs_f64() * 1000.0 / all,
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
            wall.as_secs_f64()
        );
        rates.push(rate);
    }
    println!("  two instances / one = {:.2}", rates[1] / rates[0]);

    // failover: load on both, then the second dies (its task aborted: no
    // lease is released, they lapse)
    let b = bench.clone();
    let (n, id) = (args.in_flight, run_id.to_string());
    let load = tokio::spawn(async move { closed_loop(&b, n, 25, Mode::Handler, &id, 103).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lost: Vec<usize> = (0..lease::PARTITIONS)
        .filter(|&p| second.leases.lease(&job_in(p)).is_some())
        .collect();
    let killed = Instant::now();
    SECOND.with(|s| {
        if let Some(h) = s.borrow_mut().take() {
            h.abort();
        }
    });
    wait_for("the survivor to hold every partition", || {
        first.leases.held() == lease::PARTITIONS
    })
    .await?;
    let taken = killed.elapsed();
    // ends in the first second after the kill are commits the dead
    // instance had in flight; the survivor's come after it took over
    let after = killed + Duration::from_secs(1);
    let first_end = || {
        bench
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ended
            .iter()
            .filter(|(p, t)| *t > after && lost.contains(p))
            .map(|(_, t)| *t - killed)
            .min()
    };
    wait_for("a job of a lost partition to end", || first_end().is_some()).await?;
    let first_end = first_end().unwrap_or_default();
    println!(
        "\nfailover: the second instance held {} partitions when killed; the survivor held \
         all {} after {:.1} s; the first job of a lost partition completed {:.1} s after the kill",
        lost.len(),
        lease::PARTITIONS,
        taken.as_secs_f64(),
        first_end.as_secs_f64()
    );
    let runs = load.await??;
    let failed = runs.iter().filter(|r| !r.ok).count();
    println!(
        "  {} jobs ended during the failover run, {failed} failed",
        runs.len()
    );
    Ok(())
}

thread_local! {
    static SECOND: std::cell::RefCell<Option<tokio::task::AbortHandle>> =
        const { std::cell::RefCell::new(None) };
}

/// A job id that falls in partition `p`.
fn job_in(p: usize) -> String {
    (0..)
        .map(|i| format!("probe-{i}"))
        .find(|id| lease::partition(id) == p)
        .unwrap_or_default()
}
