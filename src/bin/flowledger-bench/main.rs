//! Benchmark program (not a test): event-log appends side by side, in one
//! run, on the same servers. Run it with `scripts/bench.sh`; figures and
//! how to read them are in docs/BENCHMARKS.md.
//!
//! Each measurement round runs, in turn: raw JetStream publishes, flowledger
//! commands through the event store, and the same aggregates on postgres-es.
//! Rounds are interleaved so machine noise hits all three alike; the median
//! round is reported with ratios to raw JetStream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use bytes::Bytes;
use clap::Parser;
use cqrs_es::AggregateError;
use flowledger::bus::CommandBus;
use flowledger::commands::job::events::StepStatus;
use flowledger::commands::job::{
    Job, JobCommand, JobServices, RecordStepResult, StartAttempt, SubmitJob,
};
use flowledger::commands::registry::Registry;
use flowledger::events::envelope::{Actor, CommandMeta};
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::events::store::AggregateStore;
use postgres_es::PostgresCqrs;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "flowledger benchmarks (figures in docs/BENCHMARKS.md)")]
enum Bench {
    /// Appends: raw JetStream vs flowledger vs postgres-es.
    EventLog(Args),
    /// Projections: rebuild vs COPY, live lag, query latency.
    Projections(projections_bench::Args),
    /// Job handler: overhead over the slowest step, jobs/s with 1,000 in flight.
    Handlers(handlers_bench::Args),
    /// Verification speed: live and export verify beside hashing the same bytes.
    Verify(verify_bench::Args),
    /// Secret reads: cache hit and miss beside a direct Vault read and a
    /// command round trip; reads/s with 100 concurrent callers.
    Secrets(secrets_bench::Args),
    /// Memory: assemble's queries with HNSW beside an exact pgvector scan,
    /// writeback to visible in assemble, the cleanup.
    Memory(memory_bench::Args),
}

mod handlers_bench;
mod memory_bench;
mod projections_bench;
mod secrets_bench;
mod verify_bench;

/// A connection to NATS as the user and password in the environment
/// variables `user_var` and `password_var` when both are set (with that
/// user's inbox prefix `_INBOX_<user>`, as nats/dev.conf allows), else
/// without a credential. scripts/bench.sh runs nats/dev.conf and sets
/// `FLOWLEDGER_NATS_USER`/`_PASSWORD` (the service) and
/// `FLOWLEDGER_BENCH_CLIENT_USER`/`_PASSWORD` (the client that sends
/// commands through the intake).
pub(crate) async fn connect(
    url: &str,
    user_var: &str,
    password_var: &str,
) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new();
    if let (Ok(user), Ok(password)) = (std::env::var(user_var), std::env::var(password_var)) {
        options = options
            .custom_inbox_prefix(format!("_INBOX_{user}"))
            .user_and_password(user, password);
    }
    options
        .connect(url)
        .await
        .with_context(|| format!("connect to {url}"))
}

/// The service's connection (JetStream).
pub(crate) async fn connect_service(url: &str) -> anyhow::Result<async_nats::Client> {
    connect(url, "FLOWLEDGER_NATS_USER", "FLOWLEDGER_NATS_PASSWORD").await
}

#[derive(clap::Args, Debug)]
struct Args {
    #[arg(long, env = "FLOWLEDGER_NATS_URL")]
    nats_url: String,
    /// PostgreSQL for the postgres-es baseline; skipped when absent.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Concurrent aggregates (one task each).
    #[arg(long, default_value_t = 1000)]
    aggregates: usize,
    /// Aggregates each task writes in turn per round (raw: subjects per
    /// writer), so a round is long enough to measure: 1,000 tasks x 10 x 6
    /// commands = 60,000 appends, 1,000 aggregates in flight at any time.
    /// postgres-es rounds write one aggregate per task (it is 15x slower).
    #[arg(long, default_value_t = 10)]
    in_turn: usize,
    /// Commands per aggregate per round (submit, start, then attempts of a
    /// step, each sent and then failed).
    #[arg(long, default_value_t = 6)]
    commands_per_aggregate: usize,
    /// Interleaved measurement rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Hot aggregate: concurrent writers to one aggregate.
    #[arg(long, default_value_t = 50)]
    hot_writers: usize,
    /// Hot aggregate: commands per writer.
    #[arg(long, default_value_t = 20)]
    hot_commands: usize,
    /// Fixed request rate for the latency run (commands per second).
    #[arg(long, default_value_t = 200)]
    latency_rate: u64,
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
}

fn services() -> JobServices {
    JobServices {
        registry: Registry::with_keys(["bench.workflow"]).into(),
        max_timeout_seconds: 3600,
        callback_sealer: None,
    }
}

fn submit() -> JobCommand {
    JobCommand::Submit(SubmitJob {
        workflow_key: "bench.workflow".into(),
        client_id: "bench".into(),
        input: json!({"document": "invoice-000123.pdf", "pages": 3, "language": "de"}),
        priority: Some(5),
        timeout_seconds: Some(300),
        callback_url: Some("http://127.0.0.1:9/callback".into()),
        metadata: json!({"tenant": "acme"}),
    })
}

fn step(attempt: u32) -> JobCommand {
    JobCommand::RecordStepResult(RecordStepResult {
        step: "ocr".into(),
        attempt,
        // failed attempts: a step that succeeded is never recorded again
        status: StepStatus::Failed,
        output: json!({"text_chars": 5123, "confidence": 0.97}),
        error_code: None,
        error_message: None,
        duration_ms: 2300,
        retry_in_ms: None,
        n8n_execution_id: None,
    })
}

/// Sends attempt `attempt` of `step` (a result needs its attempt started).
fn attempt(step: &str, attempt: u32) -> JobCommand {
    JobCommand::StartAttempt(StartAttempt {
        step: step.into(),
        attempt,
        idempotency_key: format!("bench:{step}:{attempt}"),
    })
}

/// The i-th command of an aggregate's script (one event each): submit,
/// start, then attempts of the `ocr` step, each sent and then failed.
fn script(i: usize) -> JobCommand {
    match i {
        0 => submit(),
        1 => JobCommand::Start(Default::default()),
        n if n % 2 == 0 => attempt("ocr", (n as u32 - 2) / 2 + 1),
        n => step((n as u32 - 3) / 2 + 1),
    }
}

/// The i-th command on the one hot aggregate: the first attempt of its own
/// step, so any number of them is valid (attempts per step are bounded).
fn hot(i: usize) -> JobCommand {
    attempt(&format!("s{i}"), 1)
}

fn meta(command_id: String) -> CommandMeta {
    let actor = Actor {
        client_id: "bench".into(),
        user_id: None,
    };
    CommandMeta::originating(command_id, actor, String::new())
}

/// Which of flowledger's headers a raw publish carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Headers {
    None,
    MsgId,
    Expected,
    /// The two the broker acts on: message id and expected subject sequence.
    Broker,
    Custom,
    All,
}

const HEX64: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Rate {
    ops: usize,
    elapsed: Duration,
    /// CPU time of this (client) process during the run.
    cpu: Duration,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn cpu_us_per_op(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.ops as f64
    }
}

/// This process's CPU time (user + system) so far, from /proc.
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Runs `f(0)..f(tasks-1)` concurrently, one tokio task each, and measures
/// the whole: `ops` operations in the elapsed time.
async fn measure<F, Fut>(tasks: usize, ops: usize, f: F) -> anyhow::Result<Rate>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let cpu0 = cpu_time();
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks).map(|t| tokio::spawn(f(t))).collect();
    for h in handles {
        h.await??;
    }
    Ok(Rate {
        ops,
        elapsed: start.elapsed(),
        cpu: cpu_time() - cpu0,
    })
}

/// Where raw writers publish.
#[derive(Debug, Clone, Copy)]
enum Subjects {
    /// All writers on one subject.
    One,
    /// Each writer on its own subjects, this many in turn.
    InTurn(usize),
}

async fn raw_round(
    js: &jetstream::Context,
    tag: &str,
    writers: usize,
    per_subject: usize,
    payload: Bytes,
    subjects: Subjects,
    headers: Headers,
) -> anyhow::Result<Rate> {
    let turns = match subjects {
        Subjects::One => 1,
        Subjects::InTurn(n) => n,
    };
    measure(writers, writers * turns * per_subject, |w| {
        let (js, payload) = (js.clone(), payload.clone());
        let tag = tag.to_string();
        async move {
            for turn in 0..turns {
                let subject = match subjects {
                    Subjects::One => format!("bench.raw.{tag}.hot"),
                    Subjects::InTurn(_) => format!("bench.raw.{tag}.{w}.{turn}"),
                };
                let mut last = 0u64;
                for i in 0..per_subject {
                    if headers == Headers::None {
                        js.publish(subject.clone(), payload.clone()).await?.await?;
                        continue;
                    }
                    let mut msg = async_nats::jetstream::message::PublishMessage::build()
                        .payload(payload.clone());
                    if matches!(headers, Headers::MsgId | Headers::Broker | Headers::All) {
                        msg = msg.message_id(format!("{subject}-{i}"));
                    }
                    if matches!(headers, Headers::Expected | Headers::Broker | Headers::All) {
                        msg = msg.expected_last_subject_sequence(last);
                    }
                    if matches!(headers, Headers::Custom | Headers::All) {
                        msg = msg
                            .header("Flowledger-Chain-Head", HEX64)
                            .header("Flowledger-Command-Hash", HEX64)
                            .header("Flowledger-Format", "1");
                    }
                    last = js.send_publish(subject.clone(), msg).await?.await?.sequence;
                }
            }
            Ok(())
        }
    })
    .await
}

/// `tasks` tasks, each writing `in_turn` aggregates one after the other.
async fn flowledger_round(
    store: &Arc<AggregateStore<Job>>,
    tag: &str,
    tasks: usize,
    in_turn: usize,
    per_aggregate: usize,
) -> anyhow::Result<Rate> {
    measure(tasks, tasks * in_turn * per_aggregate, |t| {
        let (store, tag) = (store.clone(), tag.to_string());
        async move {
            for turn in 0..in_turn {
                let id = format!("{tag}-{t}-{turn}");
                for i in 0..per_aggregate {
                    store
                        .execute(&id, script(i), &meta(format!("{id}-{i}")))
                        .await
                        .map_err(|e| anyhow::anyhow!("{id} command {i}: {e}"))?;
                }
            }
            Ok(())
        }
    })
    .await
}

async fn postgres_round(
    cqrs: &Arc<PostgresCqrs<Job>>,
    tag: &str,
    aggregates: usize,
    per_aggregate: usize,
) -> anyhow::Result<Rate> {
    measure(aggregates, aggregates * per_aggregate, |a| {
        let (cqrs, id) = (cqrs.clone(), format!("{tag}-{a}"));
        async move {
            for i in 0..per_aggregate {
                cqrs.execute(&id, script(i))
                    .await
                    .map_err(|e| anyhow::anyhow!("{id} command {i}: {e}"))?;
            }
            Ok(())
        }
    })
    .await
}

/// Many writers, one aggregate: flowledger serialises them in-process.
async fn flowledger_hot(
    store: &Arc<AggregateStore<Job>>,
    id: &str,
    writers: usize,
    per_writer: usize,
) -> anyhow::Result<Rate> {
    store
        .execute(id, submit(), &meta(format!("{id}-s")))
        .await?;
    store
        .execute(
            id,
            JobCommand::Start(Default::default()),
            &meta(format!("{id}-st")),
        )
        .await?;
    measure(writers, writers * per_writer, |w| {
        let (store, id) = (store.clone(), id.to_string());
        async move {
            for i in 0..per_writer {
                let n = w * per_writer + i + 1;
                store
                    .execute(&id, hot(n), &meta(format!("{id}-{n}")))
                    .await
                    .map_err(|e| anyhow::anyhow!("hot {n}: {e}"))?;
            }
            Ok(())
        }
    })
    .await
}

/// Many writers, one aggregate on postgres-es: optimistic-lock conflicts are
/// retried by the caller, as a user of postgres-es would have to.
async fn postgres_hot(
    cqrs: &Arc<PostgresCqrs<Job>>,
    id: &str,
    writers: usize,
    per_writer: usize,
) -> anyhow::Result<(Rate, usize)> {
    cqrs.execute(id, submit()).await?;
    cqrs.execute(id, JobCommand::Start(Default::default()))
        .await?;
    let cpu0 = cpu_time();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let cqrs = cqrs.clone();
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0usize;
            for i in 0..per_writer {
                let n = w * per_writer + i + 1;
                loop {
                    match cqrs.execute(&id, hot(n)).await {
                        Ok(()) => break,
                        Err(AggregateError::AggregateConflict) => conflicts += 1,
                        Err(e) => return Err(anyhow::anyhow!("hot {n}: {e}")),
                    }
                }
            }
            anyhow::Ok(conflicts)
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await??;
    }
    Ok((
        Rate {
            ops: writers * per_writer,
            elapsed: start.elapsed(),
            cpu: cpu_time() - cpu0,
        },
        conflicts,
    ))
}

/// Open-loop requests at a fixed rate; returns sorted latencies.
async fn latency_run<F, Fut>(rate: u64, secs: u64, f: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let total = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let fut = f(i);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            fut.await?;
            anyhow::Ok(t.elapsed())
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    out.sort();
    Ok(out)
}

async fn postgres_setup(url: &str) -> anyhow::Result<Arc<PostgresCqrs<Job>>> {
    let pool = PgPoolOptions::new()
        .max_connections(32)
        .connect(url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS events (aggregate_type text NOT NULL, \
         aggregate_id text NOT NULL, sequence bigint CHECK (sequence >= 0) NOT NULL, \
         event_type text NOT NULL, event_version text NOT NULL, payload json NOT NULL, \
         metadata json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
        "CREATE TABLE IF NOT EXISTS snapshots (aggregate_type text NOT NULL, \
         aggregate_id text NOT NULL, last_sequence bigint CHECK (last_sequence >= 0) NOT NULL, \
         current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL, payload json NOT NULL, \
         PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
    ] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    Ok(Arc::new(postgres_es::postgres_cqrs(
        pool,
        vec![],
        services(),
    )))
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // the service's warnings (e.g. a handler that cannot take its leases)
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOWLEDGER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match Bench::parse() {
        Bench::EventLog(args) => event_log(args).await,
        Bench::Projections(args) => projections_bench::run(args).await,
        Bench::Handlers(args) => handlers_bench::run(args).await,
        Bench::Verify(args) => verify_bench::run(args).await,
        Bench::Secrets(args) => secrets_bench::run(args).await,
        Bench::Memory(args) => memory_bench::run(args).await,
    }
}

async fn event_log(args: Args) -> anyhow::Result<()> {
    let client = connect_service(&args.nats_url).await?;
    let config = LogConfig::default();
    log::init(&client, &config).await?;
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(jetstream::stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.>".into()],
        storage: jetstream::stream::StorageType::File,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        ..Default::default()
    })
    .await?;
    let event_log = EventLog::open(client.clone(), config.clone()).await?;
    let store = Arc::new(AggregateStore::<Job>::new(event_log.clone(), services()));
    let pg = match &args.database_url {
        Some(url) => Some(postgres_setup(url).await?),
        None => None,
    };
    let server = client.server_info();
    println!(
        "flowledger-bench: nats-server {} | {} concurrent aggregates, {} in turn per task, \
         {} commands each | {} rounds | {} cores",
        server.version,
        args.aggregates,
        args.in_turn,
        args.commands_per_aggregate,
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Warm-up, and the average stored commit size for the raw baseline.
    flowledger_round(&store, "warm", 100, 1, args.commands_per_aggregate).await?;
    let info = event_log.stream().get_info().await?;
    let payload_size = (info.state.bytes / info.state.messages.max(1)) as usize;
    let payload = Bytes::from(vec![b'x'; payload_size]);
    println!(
        "average stored commit (headers + body): {payload_size} bytes; raw publishes use that size"
    );
    raw_round(
        &js,
        "warm",
        100,
        args.commands_per_aggregate,
        payload.clone(),
        Subjects::InTurn(1),
        Headers::None,
    )
    .await?;
    if let Some(pg) = &pg {
        postgres_round(pg, "warm", 100, args.commands_per_aggregate).await?;
    }

    let (n, k, turns) = (args.aggregates, args.commands_per_aggregate, args.in_turn);
    let (mut raw, mut rawb, mut rawh, mut fl, mut pgr) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let tag = format!("r{round}");
        let in_turn = Subjects::InTurn(turns);
        let r = raw_round(&js, &tag, n, k, payload.clone(), in_turn, Headers::None).await?;
        let rb = raw_round(
            &js,
            &format!("{tag}b"),
            n,
            k,
            payload.clone(),
            in_turn,
            Headers::Broker,
        )
        .await?;
        let rh = raw_round(
            &js,
            &format!("{tag}h"),
            n,
            k,
            payload.clone(),
            in_turn,
            Headers::All,
        )
        .await?;
        // a cold cache each round: the first command of every aggregate is a create
        store.clear_cache();
        let f = flowledger_round(&store, &tag, n, turns, k).await?;
        let p = match &pg {
            Some(pg) => Some(postgres_round(pg, &tag, n, k).await?),
            None => None,
        };
        let pg_rate = p.as_ref().map_or("skipped".to_string(), |p| {
            format!(
                "{:>7.0}/s ({:.0}%)",
                p.per_sec(),
                100.0 * p.per_sec() / r.per_sec()
            )
        });
        println!(
            "round {}: raw {:>7.0}/s  raw+broker headers {:>7.0}/s  raw+all headers {:>7.0}/s  \
             flowledger {:>7.0}/s ({:.0}%)  postgres-es {}",
            round + 1,
            r.per_sec(),
            rb.per_sec(),
            rh.per_sec(),
            f.per_sec(),
            100.0 * f.per_sec() / r.per_sec(),
            pg_rate
        );
        raw.push(r);
        rawb.push(rb);
        rawh.push(rh);
        fl.push(f);
        if let Some(p) = p {
            pgr.push(p);
        }
    }
    let med = |v: &mut Vec<Rate>| -> Rate {
        v.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
        v.swap_remove(v.len() / 2)
    };
    let (raw_m, rawb_m, rawh_m, fl_m) =
        (med(&mut raw), med(&mut rawb), med(&mut rawh), med(&mut fl));
    let pg_m = if pgr.is_empty() {
        None
    } else {
        Some(med(&mut pgr))
    };

    println!("\nbroker cost of each header (one run each, {n} subjects)");
    let mut breakdown = Vec::new();
    for (name, h) in [
        ("Nats-Msg-Id only", Headers::MsgId),
        (
            "Nats-Expected-Last-Subject-Sequence only",
            Headers::Expected,
        ),
        ("the three Flowledger-* headers only", Headers::Custom),
    ] {
        breakdown.push((
            name,
            raw_round(
                &js,
                &format!("hb{}", breakdown.len()),
                n,
                k,
                payload.clone(),
                Subjects::InTurn(turns),
                h,
            )
            .await?,
        ));
    }

    println!(
        "\nhot aggregate: {} writers x {} commands on one aggregate",
        args.hot_writers, args.hot_commands
    );
    let raw_hot_c = raw_round(
        &js,
        "hot-c",
        args.hot_writers,
        args.hot_commands,
        payload.clone(),
        Subjects::One,
        Headers::None,
    )
    .await?;
    let raw_hot_1 = raw_round(
        &js,
        "hot-1",
        1,
        args.hot_writers * args.hot_commands / 4,
        payload.clone(),
        Subjects::One,
        Headers::None,
    )
    .await?;
    let fl_hot = flowledger_hot(&store, "hot-fl", args.hot_writers, args.hot_commands).await?;
    let pg_hot = match &pg {
        Some(pg) => Some(postgres_hot(pg, "hot-pg", args.hot_writers, args.hot_commands).await?),
        None => None,
    };

    println!(
        "\nlatency at a fixed {} commands/s for {} s (NATS request/reply through the intake; \
         raw = one JetStream publish + ack)",
        args.latency_rate, args.latency_secs
    );
    let bus = Arc::new(CommandBus::new(event_log.clone(), services()));
    let sub = flowledger::api::nats::subscribe(&client).await?;
    let accounts = flowledger::api::broker_identity::Accounts::new(&Default::default());
    tokio::spawn(flowledger::api::nats::serve(
        bus,
        None,
        None,
        None,
        client.clone(),
        sub,
        Arc::new(accounts),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // a client of the CLIENTS account: the broker vouches for it
    let c = connect(
        &args.nats_url,
        "FLOWLEDGER_BENCH_CLIENT_USER",
        "FLOWLEDGER_BENCH_CLIENT_PASSWORD",
    )
    .await?;
    let body = json!({
        "workflow_key": "bench.workflow",
        "input": {"document": "invoice-000123.pdf"},
    });
    let body = Bytes::from(body.to_string());
    let lat_fl = latency_run(args.latency_rate, args.latency_secs, move |_| {
        let c = c.clone();
        let body = body.clone();
        async move {
            let reply = c.request("flow.cmd.job.submit", body).await?;
            anyhow::ensure!(
                reply.payload.starts_with(b"{")
                    && !reply.payload.windows(11).any(|w| w == b"\"ok\":false"),
                "refused: {:?}",
                reply.payload
            );
            Ok(())
        }
    })
    .await?;
    let js2 = js.clone();
    let p2 = payload.clone();
    let lat_raw = latency_run(args.latency_rate, args.latency_secs, move |i| {
        let js = js2.clone();
        let p = p2.clone();
        async move {
            js.publish(format!("bench.raw.lat.{i}"), p).await?.await?;
            Ok(())
        }
    })
    .await?;

    println!("\n## Results (median of {} rounds)\n", args.rounds);
    println!("| workload | appends/s | ratio to raw JetStream | client CPU µs/append |");
    println!("|---|---:|---:|---:|");
    let row = |name: String, r: &Rate, base: &Rate| {
        println!(
            "| {name} | {:.0} | {:.0}% | {:.1} |",
            r.per_sec(),
            100.0 * r.per_sec() / base.per_sec(),
            r.cpu_us_per_op()
        );
    };
    row(
        format!("raw JetStream publish, {n} concurrent subjects, {payload_size} B"),
        &raw_m,
        &raw_m,
    );
    row(
        format!(
            "raw JetStream + Nats-Msg-Id + Nats-Expected-Last-Subject-Sequence \
             (the two the design requires), {n} subjects"
        ),
        &rawb_m,
        &raw_m,
    );
    row(
        format!("raw JetStream + all five of flowledger's headers, {n} subjects"),
        &rawh_m,
        &raw_m,
    );
    for (name, r) in &breakdown {
        row(format!("raw JetStream + {name}"), r, &raw_m);
    }
    row(
        format!("flowledger, {n} concurrent aggregates"),
        &fl_m,
        &raw_m,
    );
    if let Some(p) = &pg_m {
        row(format!("postgres-es, {n} concurrent aggregates"), p, &raw_m);
    }
    row(
        format!(
            "raw JetStream, one subject, {} concurrent writers (hot baseline)",
            args.hot_writers
        ),
        &raw_hot_c,
        &raw_hot_c,
    );
    row(
        "raw JetStream, one subject, 1 writer".to_string(),
        &raw_hot_1,
        &raw_hot_c,
    );
    row(
        format!(
            "flowledger, one hot aggregate, {} writers",
            args.hot_writers
        ),
        &fl_hot,
        &raw_hot_c,
    );
    if let Some((p, conflicts)) = &pg_hot {
        row(
            format!(
                "postgres-es, one hot aggregate, {} writers ({conflicts} conflicts retried)",
                args.hot_writers
            ),
            p,
            &raw_hot_c,
        );
    }
    println!(
        "\n| latency at {} /s | p50 ms | p99 ms |",
        args.latency_rate
    );
    println!("|---|---:|---:|");
    println!(
        "| raw JetStream publish + ack | {:.2} | {:.2} |",
        ms(percentile(&lat_raw, 0.5)),
        ms(percentile(&lat_raw, 0.99))
    );
    println!(
        "| flowledger submit (NATS request/reply, intake, append) | {:.2} | {:.2} |",
        ms(percentile(&lat_fl, 0.5)),
        ms(percentile(&lat_fl, 0.99))
    );
    let target = 100.0 * fl_m.per_sec() / raw_m.per_sec();
    println!(
        "\ntarget: flowledger >= 70% of raw JetStream with {} aggregates: {:.0}% -> {} \
         (raw publishes with the two required broker headers: {:.0}%)",
        args.aggregates,
        target,
        if target >= 70.0 { "met" } else { "NOT met" },
        100.0 * rawb_m.per_sec() / raw_m.per_sec()
    );
    Ok(())
}
