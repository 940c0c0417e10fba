//! Secret-access benchmark (issue 13): what a secret read through
//! flowledger costs beside a direct read of the same path from Vault, and
//! beside one command round trip through the NATS intake.
//!
//! Needs a running Vault API server (scripts/bench.sh starts an OpenBao dev
//! server for `secrets`, scripts/bao.sh) given by
//! `FLOWLEDGER_BENCH_VAULT_ADDR` and a root token in
//! `FLOWLEDGER_BENCH_VAULT_TOKEN`. It writes one secret, then, in this one
//! process on the same servers:
//!
//! * **latency**: one caller, `--reads` reads of each kind, the kinds
//!   interleaved (each iteration runs every kind once, in a rotating order)
//!   so machine noise hits all alike; p50/p99 of each and the ratios the
//!   issue's target names;
//! * **throughput**: `--callers` concurrent tokio tasks, each reading in a
//!   closed loop for `--secs`, every kind in turn per round, `--rounds`
//!   rounds; the median round is reported.
//!
//! The kinds: `VaultClient::read` (flowledger's client, the direct read),
//! `vaultrs::kv2::read` (the library without flowledger's wrapper),
//! `SecretService::read` served from the cache (hit) and with a TTL of 0
//! (miss: a Vault read every time), a job submit through the NATS intake
//! as a CLIENTS user (the command round trip), and `flow.cmd.secret.read`
//! through the same intake, served from the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde_json::{json, Value};

use flowledger::bus::{CommandBus, CommandError};
use flowledger::commands::job::JobServices;
use flowledger::commands::registry::Registry;
use flowledger::commands::secret_access::events::{AccessRequest, ValueSource};
use flowledger::commands::secret_access::policy::{PolicyRule, SecretPolicy};
use flowledger::events::envelope::{Actor, CommandMeta};
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::secrets::service::{SecretRules, SecretService};
use flowledger::secrets::vault::{VaultAuth, VaultClient, VaultConfig};

use crate::{connect, connect_service, ms, percentile};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[arg(long, env = "FLOWLEDGER_NATS_URL")]
    nats_url: String,
    /// The Vault (OpenBao) server, e.g. http://127.0.0.1:8200.
    #[arg(long, env = "FLOWLEDGER_BENCH_VAULT_ADDR")]
    vault_addr: String,
    /// A token that may write and read `secret/` (the dev server's root).
    #[arg(long, env = "FLOWLEDGER_BENCH_VAULT_TOKEN", hide_env_values = true)]
    vault_token: String,
    /// Reads of each kind in the latency run (one caller, interleaved).
    #[arg(long, default_value_t = 2000)]
    reads: usize,
    /// Concurrent callers in the throughput run.
    #[arg(long, default_value_t = 100)]
    callers: usize,
    /// Seconds each kind runs per throughput round.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Throughput rounds (every kind in turn); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The secret read: KV v2 at `secret/`, its API path and field.
const MOUNT: &str = "secret";
const NAME: &str = "bench/ocr";
const PATH: &str = "secret/data/bench/ocr";
const FIELD: &str = "api_key";
/// The role and client id of in-process reads (the intake's caller is the
/// CLIENTS user `billing` of nats/dev.conf, role client).
const ROLE: &str = "client";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Vaultrs,
    Hit,
    Miss,
    RoundTrip,
    IntakeHit,
}

const KINDS: [Kind; 6] = [
    Kind::Direct,
    Kind::Vaultrs,
    Kind::Hit,
    Kind::Miss,
    Kind::RoundTrip,
    Kind::IntakeHit,
];

impl Kind {
    fn index(self) -> usize {
        KINDS
            .iter()
            .position(|k| *k == self)
            .unwrap_or_else(|| unreachable!("every kind is in KINDS"))
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Direct => "(a) direct read, VaultClient::read",
            Kind::Vaultrs => "(a') direct read, vaultrs::kv2::read (no flowledger wrapper)",
            Kind::Hit => "(b) SecretService::read, cache hit (+ 1 append)",
            Kind::Miss => "(c) SecretService::read, cache miss (Vault read + 1 append)",
            Kind::RoundTrip => "(d) command round trip: job submit via NATS intake",
            Kind::IntakeHit => "(e) flow.cmd.secret.read via NATS intake, cache hit",
        }
    }
}

/// Everything the reads need, shared by the callers.
struct Ctx {
    bus: Arc<CommandBus>,
    /// The direct read: flowledger's Vault client, no service around it.
    vault: VaultClient,
    /// The same read with vaultrs alone.
    raw: vaultrs::client::VaultClient,
    /// TTL one hour: every read after the first is a hit.
    hit: SecretService,
    /// TTL 0: every read goes to Vault.
    miss: SecretService,
    /// A CLIENTS user of nats/dev.conf (the broker vouches for it).
    client: async_nats::Client,
    submit_body: Bytes,
    read_body: Bytes,
}

fn refused(e: CommandError) -> anyhow::Error {
    anyhow::anyhow!("refused {}: {}", e.code.as_str(), e.message)
}

fn request() -> AccessRequest {
    AccessRequest {
        path: PATH.into(),
        field: Some(FIELD.into()),
        version: None,
        purpose: "secret-access benchmark".into(),
        job_id: None,
        step: None,
    }
}

fn meta() -> CommandMeta {
    // a fresh request id per read, as the doors make them
    let actor = Actor {
        client_id: "bench".into(),
        user_id: None,
    };
    CommandMeta::originating(uuid::Uuid::now_v7().to_string(), actor, String::new())
}

/// A door's JSON reply: an error reply is an error here.
fn ok_reply(subject: &str, payload: &[u8]) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_slice(payload)
        .with_context(|| format!("{subject}: the reply is not JSON"))?;
    anyhow::ensure!(v["ok"] == json!(true), "{subject} refused: {v}");
    Ok(v)
}

impl Ctx {
    async fn one(&self, kind: Kind) -> anyhow::Result<()> {
        match kind {
            Kind::Direct => {
                let r = self.vault.read(PATH, Some(FIELD), None).await?;
                anyhow::ensure!(r.value.expose_str().is_some(), "{PATH}: no {FIELD}");
            }
            Kind::Vaultrs => {
                let v: Value = vaultrs::kv2::read(&self.raw, MOUNT, NAME).await?;
                anyhow::ensure!(v[FIELD].is_string(), "{PATH}: no {FIELD}");
            }
            Kind::Hit | Kind::Miss => {
                let (service, want) = if kind == Kind::Hit {
                    (&self.hit, ValueSource::Cache)
                } else {
                    (&self.miss, ValueSource::Vault)
                };
                let served = service
                    .read(&self.bus, request(), ROLE, &meta())
                    .await
                    .map_err(refused)?;
                anyhow::ensure!(
                    served.source == want,
                    "{kind:?}: served from {:?}, not {want:?}",
                    served.source
                );
            }
            Kind::RoundTrip => {
                let subject = "flow.cmd.job.submit";
                let reply = self
                    .client
                    .request(subject, self.submit_body.clone())
                    .await?;
                ok_reply(subject, &reply.payload)?;
            }
            Kind::IntakeHit => {
                let subject = flowledger::api::nats::SECRET_READ_SUBJECT;
                let reply = self.client.request(subject, self.read_body.clone()).await?;
                let v = ok_reply(subject, &reply.payload)?;
                anyhow::ensure!(v["source"] == "cache", "{subject}: not a hit: {v}");
            }
        }
        Ok(())
    }
}

/// Writes the secret as root; waits out the dev server's KV v2 upgrade
/// ("Upgrading from non-versioned to versioned data", 400) after a start.
async fn put_secret(addr: &str, token: &str) -> anyhow::Result<()> {
    let http = flowledger::handlers::http_client_builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let body = json!({"data": {
        FIELD: format!("bench-{:032x}", fastrand::u128(..)),
        "endpoint": "https://ocr.example/v1",
    }});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http
            .post(format!("{addr}/v1/{PATH}"))
            .header("X-Vault-Token", token)
            .json(&body)
            .send()
            .await;
        let why = match answer {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "cannot write {PATH} at {addr} within 30 s: {why}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn vault_version(addr: &str) -> String {
    let answer = async {
        let http = flowledger::handlers::http_client_builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let v: Value = http
            .get(format!("{addr}/v1/sys/health"))
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v["version"].as_str().unwrap_or("?").to_string())
    };
    answer.await.unwrap_or_else(|_| "?".into())
}

async fn service(addr: &str, token: &str, cache_ttl: Duration) -> anyhow::Result<SecretService> {
    let policy = SecretPolicy::new(vec![PolicyRule {
        name: "bench".into(),
        clients: vec![],
        roles: vec![ROLE.into()],
        paths: vec!["secret/data/bench/**".into()],
    }])
    .map_err(|e| anyhow::anyhow!("the bench policy: {e}"))?;
    let rules = SecretRules {
        cache_ttl,
        max_staleness: Duration::from_secs(3600),
        retry_attempts: 3,
        retry_base: Duration::from_millis(50),
    };
    Ok(SecretService::new(
        vault_client(addr, token).await?,
        policy,
        rules,
    ))
}

async fn vault_client(addr: &str, token: &str) -> anyhow::Result<VaultClient> {
    VaultClient::connect(VaultConfig {
        addr: addr.into(),
        auth: VaultAuth::Token(token.into()),
        timeout: Duration::from_secs(10),
    })
    .await
    .with_context(|| format!("connect to Vault at {addr}"))
}

fn raw_client(addr: &str, token: &str) -> anyhow::Result<vaultrs::client::VaultClient> {
    let settings = vaultrs::client::VaultClientSettingsBuilder::default()
        .address(addr)
        .token(token)
        .timeout(Some(Duration::from_secs(10)))
        .ca_certs(Vec::new())
        .identity(None)
        .verify(true)
        .build()
        .map_err(|e| anyhow::anyhow!("vaultrs settings for {addr}: {e}"))?;
    Ok(vaultrs::client::VaultClient::new(settings)?)
}

/// One kind with `callers` tasks in a closed loop for `secs`: reads/s.
async fn throughput(ctx: &Arc<Ctx>, kind: Kind, callers: usize, secs: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    ctx.one(kind).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

fn verdict(ratio: f64) -> &'static str {
    if ratio <= 1.0 {
        "met"
    } else {
        "NOT met"
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let (addr, token) = (args.vault_addr.trim_end_matches('/'), &args.vault_token);
    put_secret(addr, token).await?;

    let service_nats = connect_service(&args.nats_url).await?;
    let config = LogConfig::default();
    log::init(&service_nats, &config).await?;
    let event_log = EventLog::open(service_nats.clone(), config).await?;
    let services = JobServices {
        registry: Registry::with_keys(["bench.workflow"]).into(),
        max_timeout_seconds: 3600,
        callback_sealer: None,
    };
    let bus = Arc::new(CommandBus::new(event_log, services));

    // the intake, as `serve` runs it, with the cache-hit service
    let intake_service = Arc::new(service(addr, token, Duration::from_secs(3600)).await?);
    let sub = flowledger::api::nats::subscribe(&service_nats).await?;
    let accounts = flowledger::api::broker_identity::Accounts::new(&Default::default());
    tokio::spawn(flowledger::api::nats::serve(
        bus.clone(),
        Some(intake_service),
        None,
        None,
        service_nats.clone(),
        sub,
        Arc::new(accounts),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = connect(
        &args.nats_url,
        "FLOWLEDGER_BENCH_CLIENT_USER",
        "FLOWLEDGER_BENCH_CLIENT_PASSWORD",
    )
    .await?;

    let ctx = Arc::new(Ctx {
        bus,
        vault: vault_client(addr, token).await?,
        raw: raw_client(addr, token)?,
        hit: service(addr, token, Duration::from_secs(3600)).await?,
        miss: service(addr, token, Duration::ZERO).await?,
        client,
        submit_body: Bytes::from(
            json!({
                "workflow_key": "bench.workflow",
                "input": {"document": "invoice-000123.pdf"},
            })
            .to_string(),
        ),
        read_body: Bytes::from(
            json!({"path": PATH, "field": FIELD, "purpose": "secret-access benchmark"}).to_string(),
        ),
    });

    println!(
        "flowledger-bench secrets: nats-server {} | Vault API {} (OpenBao dev server, \
         in memory, file audit device) at {addr} | {} reads of each kind, one caller, \
         interleaved | {} cores",
        service_nats.server_info().version,
        vault_version(addr).await,
        args.reads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // warm-up: connections, the hit caches (the first read of each is a miss)
    for i in 0..200 {
        for kind in KINDS {
            // the first hit reads are misses: fill the caches untimed
            match kind {
                Kind::Hit if i == 0 => {
                    ctx.hit
                        .read(&ctx.bus, request(), ROLE, &meta())
                        .await
                        .map_err(refused)?;
                }
                Kind::IntakeHit if i == 0 => {
                    let subject = flowledger::api::nats::SECRET_READ_SUBJECT;
                    let r = ctx.client.request(subject, ctx.read_body.clone()).await?;
                    ok_reply(subject, &r.payload)?;
                }
                _ => ctx.one(kind).await?,
            }
        }
    }

    let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(args.reads); KINDS.len()];
    for i in 0..args.reads {
        for j in 0..KINDS.len() {
            let kind = KINDS[(i + j) % KINDS.len()];
            let t = Instant::now();
            ctx.one(kind).await?;
            lat[kind.index()].push(t.elapsed());
        }
    }
    for l in &mut lat {
        l.sort();
    }
    let p = |kind: Kind, q: f64| ms(percentile(&lat[kind.index()], q));

    println!("\n## Latency, one caller ({} reads each)\n", args.reads);
    println!("| read | p50 ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|");
    for kind in KINDS {
        let l = &lat[kind.index()];
        let mean = ms(l.iter().sum::<Duration>()) / l.len().max(1) as f64;
        println!(
            "| {} | {:.3} | {:.3} | {:.3} |",
            kind.label(),
            p(kind, 0.5),
            p(kind, 0.99),
            mean
        );
    }

    println!("\n## Against the target (same run)\n");
    println!("| ratio | p50 | p99 | target (<= 1.00) |");
    println!("|---|---:|---:|---|");
    let rows = [
        (
            "hit (b) / round trip (d)",
            p(Kind::Hit, 0.5) / p(Kind::RoundTrip, 0.5),
            p(Kind::Hit, 0.99) / p(Kind::RoundTrip, 0.99),
        ),
        (
            "hit through the intake (e) / round trip (d)",
            p(Kind::IntakeHit, 0.5) / p(Kind::RoundTrip, 0.5),
            p(Kind::IntakeHit, 0.99) / p(Kind::RoundTrip, 0.99),
        ),
        (
            "miss (c) / (round trip (d) + direct (a))",
            p(Kind::Miss, 0.5) / (p(Kind::RoundTrip, 0.5) + p(Kind::Direct, 0.5)),
            p(Kind::Miss, 0.99) / (p(Kind::RoundTrip, 0.99) + p(Kind::Direct, 0.99)),
        ),
    ];
    for (name, r50, r99) in rows {
        println!(
            "| {name} | {r50:.2} | {r99:.2} | p50 {}, p99 {} |",
            verdict(r50),
            verdict(r99)
        );
    }
    println!(
        "\nfor scale: direct read (a) / round trip (d) at p50: {:.2}; flowledger's Vault \
         client over vaultrs alone (a)/(a'): {:.2}",
        p(Kind::Direct, 0.5) / p(Kind::RoundTrip, 0.5),
        p(Kind::Direct, 0.5) / p(Kind::Vaultrs, 0.5)
    );

    println!(
        "\n## Throughput, {} concurrent callers, {} s per kind per round, {} rounds\n",
        args.callers, args.secs, args.rounds
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    for round in 0..args.rounds {
        let mut line = Vec::new();
        for j in 0..KINDS.len() {
            let kind = KINDS[(round + j) % KINDS.len()];
            let r = throughput(&ctx, kind, args.callers, args.secs).await?;
            rates[kind.index()].push(r);
            line.push(format!("{kind:?} {r:.0}/s"));
        }
        println!("round {}: {}", round + 1, line.join(", "));
    }
    let median = |kind: Kind| -> f64 {
        let mut v = rates[kind.index()].clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "\n| read, {} callers | reads/s (median) | / round trip (d) |",
        args.callers
    );
    println!("|---|---:|---:|");
    for kind in KINDS {
        println!(
            "| {} | {:.0} | {:.2} |",
            kind.label(),
            median(kind),
            median(kind) / median(Kind::RoundTrip).max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}
