//! Verification speed: `audit verify` of the live stream and of an export,
//! in events per second, beside the floor of reading and hashing the same
//! bytes once (SHA-256 of every subject, body and event line), in one run.

use std::io::BufRead;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use flowledger::audit::checkpoint::{self, CheckpointKey};
use flowledger::audit::export::{self, MESSAGES_FILE};
use flowledger::audit::read::{Filter, RawMessage};
use flowledger::audit::verify::{self, Options};
use flowledger::commands::job::Job;
use flowledger::events::chain;
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::events::store::AggregateStore;

/// Arguments of `flowledger-bench verify`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long, env = "FLOWLEDGER_NATS_URL")]
    nats_url: String,
    /// Aggregates written (each gets `--commands` one-event commits).
    #[arg(long, default_value_t = 10_000)]
    aggregates: usize,
    #[arg(long, default_value_t = 10)]
    commands: usize,
    /// Measurement rounds (each: floor, export verify, live verify); the
    /// median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn floor(dir: &std::path::Path) -> anyhow::Result<u64> {
    // read every line, parse it, hash subject, body and each event line
    let f = std::fs::File::open(dir.join(MESSAGES_FILE))?;
    let mut events = 0u64;
    let mut acc = chain::GENESIS;
    for line in std::io::BufReader::with_capacity(1 << 16, f).lines() {
        let m: RawMessage = serde_json::from_str(&line?)?;
        let leaf = m.leaf();
        acc = chain::digest_step(&acc, &leaf);
        for l in m
            .body
            .as_bytes()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            acc = chain::event_hash(&acc, l);
            events += 1;
        }
    }
    std::hint::black_box(acc);
    Ok(events)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = async_nats::connect(&args.nats_url)
        .await
        .with_context(|| format!("connect to {}", args.nats_url))?;
    let config = LogConfig::default();
    log::init(&client, &config).await?;
    let event_log = EventLog::open(client.clone(), config).await?;
    let store = Arc::new(AggregateStore::<Job>::new(
        event_log.clone(),
        crate::services(),
    ));
    let t0 = Instant::now();
    let tasks = 200.min(args.aggregates.max(1));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (store, aggregates, commands) = (store.clone(), args.aggregates, args.commands);
        handles.push(tokio::spawn(async move {
            let mut a = t;
            while a < aggregates {
                let id = format!("verify-{a}");
                for i in 0..commands {
                    let meta = crate::meta(format!("{id}-{i}"));
                    store
                        .execute(&id, crate::script(i), &meta)
                        .await
                        .map_err(|e| anyhow::anyhow!("{id} command {i}: {e}"))?;
                }
                a += tasks;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let key = CheckpointKey::from_hex("bench", &"42".repeat(32))?;
    checkpoint::checkpoint_at(&client, &event_log, &key, None).await?;
    let total = event_log.last_seq().await?;
    println!(
        "flowledger-bench verify: {} events written in {:.1} s | {} rounds | {} cores",
        total,
        t0.elapsed().as_secs_f64(),
        args.rounds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let dir =
        std::env::temp_dir().join(format!("flowledger-bench-verify-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir(&dir)?;
    let out = dir.join("export");
    let t = Instant::now();
    export::export(
        &client,
        &event_log,
        &Filter::default(),
        &out,
        Some(&key),
        &mut |_, _| {},
    )
    .await?;
    println!(
        "export of {total} messages: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let options = Options {
        ring: Some(key.ring()),
        ..Default::default()
    };
    let (mut floors, mut exports, mut lives) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let t = Instant::now();
        let n = floor(&out)?;
        let f = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let s = verify::verify_export(&out, &options)?;
        let e = s.events as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let l = verify::verify_live(&client, &event_log, None, &options).await?;
        let v = l.events as f64 / t.elapsed().as_secs_f64();
        println!(
            "round {round}: floor {f:>9.0} events/s | export verify {e:>9.0} events/s ({:.0}% of floor) | live verify {v:>9.0} events/s",
            100.0 * e / f
        );
        floors.push(f);
        exports.push(e);
        lives.push(v);
    }
    let (f, e, v) = (median(floors), median(exports), median(lives));
    println!(
        "median: floor {f:.0} events/s | export verify {e:.0} events/s = {:.0}% of floor | live verify {v:.0} events/s = {:.0}% of floor",
        100.0 * e / f,
        100.0 * v / f
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
