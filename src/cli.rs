//! The `flowledger` command line. Exit codes: 0 success, 1 verification
//! failed or a command was refused, 2 usage or configuration error,
//! 3 a server (NATS) could not be reached.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::api::intake::{Intake, COMMAND_SUBJECT_PREFIX};
use crate::audit::checkpoint::{self, CheckpointKey, Digest};
use crate::audit::export;
use crate::audit::read::{self, Filter};
use crate::audit::verify::{self, VerifyError};
use crate::commands::job::JobServices;
use crate::events::log::{self, EventLog, LogConfig};
use crate::registry::{Registry, DEFAULT_REGISTRY_PATH};

#[derive(Parser, Debug)]
#[command(
    name = "flowledger",
    version,
    about = "Event-sourced command backbone for workflow automation on NATS JetStream"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Name of the domain-event stream.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_STREAM",
        default_value = "FLOW_EVENTS"
    )]
    pub stream: String,
    /// Name of the checkpoint stream.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_CHECKPOINT_STREAM",
        default_value = "FLOW_CHECKPOINTS"
    )]
    pub checkpoint_stream: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or update the JetStream streams (idempotent).
    Init {
        /// Stream replicas: 1 for development, 3 for production clusters.
        #[arg(long, env = "FLOWLEDGER_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// JetStream de-duplication window for command ids, in seconds.
        #[arg(long, env = "FLOWLEDGER_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
        duplicate_window_secs: u64,
    },
    /// Run the command service (NATS intake, periodic checkpoints).
    Serve(ServeArgs),
    /// Submit a job over NATS and print the reply.
    Submit {
        #[arg(long)]
        workflow: String,
        #[arg(long)]
        client: String,
        /// Job input as JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        #[arg(long)]
        priority: Option<u8>,
        #[arg(long)]
        job_id: Option<String>,
        /// Command id (makes a retry safe); a fresh one by default.
        #[arg(long)]
        command_id: Option<String>,
    },
    /// Send any command: `flowledger send job.start '{"job_id":"..."}'`.
    Send {
        /// `<aggregate_type>.<command>`
        command: String,
        /// The command body as JSON.
        body: String,
    },
    /// Auditor tools: replay, digest, checkpoint, export, verify.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Workflow registry file.
    #[arg(long, env = "FLOWLEDGER_REGISTRY", default_value = DEFAULT_REGISTRY_PATH)]
    pub registry: PathBuf,
    /// Largest `timeout_seconds` a job may ask for.
    #[arg(long, env = "FLOWLEDGER_MAX_TIMEOUT_SECONDS", default_value_t = 3600)]
    pub max_timeout_seconds: u32,
    /// Seconds between signed checkpoints (needs a checkpoint key); 0 turns them off.
    #[arg(long, env = "FLOWLEDGER_CHECKPOINT_EVERY_SECS", default_value_t = 60)]
    pub checkpoint_every_secs: u64,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// HMAC key for checkpoints, hex, 32 bytes or more. Prefer the env variable.
    #[arg(
        long = "checkpoint-key",
        env = "FLOWLEDGER_CHECKPOINT_KEY",
        hide_env_values = true
    )]
    pub checkpoint_key: Option<String>,
    #[arg(long, env = "FLOWLEDGER_CHECKPOINT_KEY_ID", default_value = "default")]
    pub checkpoint_key_id: String,
}

impl KeyArgs {
    fn key(&self) -> anyhow::Result<Option<CheckpointKey>> {
        self.checkpoint_key
            .as_deref()
            .map(|k| CheckpointKey::from_hex(&self.checkpoint_key_id, k))
            .transpose()
            .map_err(|e| anyhow::Error::new(e).context(UsageError))
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// `TYPE` or `TYPE:ID`, e.g. `job` or `job:0193...`.
    #[arg(long)]
    pub aggregate: Option<String>,
    /// Only this event type, e.g. `JobSubmitted`.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Messages stored at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Messages stored at or before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    #[arg(long)]
    pub from_seq: Option<u64>,
    #[arg(long)]
    pub to_seq: Option<u64>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        let mut f = Filter {
            event_type: self.event_type.clone(),
            since: self.since,
            until: self.until,
            from_seq: self.from_seq,
            to_seq: self.to_seq,
            ..Default::default()
        };
        if let Some(a) = &self.aggregate {
            f.set_aggregate(a).context(UsageError)?;
        }
        f.check().context(UsageError)?;
        Ok(f)
    }
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Print events as JSON lines, in stream order, with their envelope.
    Replay(FilterArgs),
    /// Print the current stream digest (`SEQ:HEX`); keep it to check later.
    Digest,
    /// Sign and store a checkpoint at the current end of the stream.
    Checkpoint(KeyArgs),
    /// Write a self-contained export for offline verification.
    Export {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Verify the live stream, or an export with --export DIR.
    Verify {
        #[arg(long)]
        export: Option<PathBuf>,
        /// A digest kept earlier (`SEQ:HEX`) that history must still contain.
        #[arg(long)]
        digest: Option<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
}

/// Marks an error as the user's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("invalid usage")]
struct UsageError;

/// Marks a server that could not be reached (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("server unreachable")]
struct Unreachable;

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWLEDGER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            let markers = [UsageError.to_string(), Unreachable.to_string()];
            let chain: Vec<String> = e
                .chain()
                .map(|c| c.to_string())
                .filter(|m| !markers.contains(m))
                .collect();
            eprintln!("flowledger: {}", chain.join(": "));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else if e.downcast_ref::<Unreachable>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn log_config(g: &Global, replicas: usize, duplicate_window: Duration) -> LogConfig {
    LogConfig {
        stream: g.stream.clone(),
        checkpoint_stream: g.checkpoint_stream.clone(),
        replicas,
        duplicate_window,
    }
}

async fn connect(g: &Global) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("flowledger")
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(Some(3))
        .connect(&g.nats_url)
        .await
        .map_err(|e| anyhow::Error::new(e).context(Unreachable))
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} (start nats-server, or set --nats-url)",
                g.nats_url
            )
        })
}

async fn open_log(g: &Global) -> anyhow::Result<(async_nats::Client, EventLog)> {
    let client = connect(g).await?;
    let log = EventLog::open(client.clone(), log_config(g, 1, Duration::from_secs(120))).await?;
    Ok((client, log))
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn request(
    client: &async_nats::Client,
    subject: String,
    body: Vec<u8>,
) -> anyhow::Result<ExitCode> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.clone(), body.into()),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("no reply on {subject} within 10 s: is `flowledger serve` running?")
    })?
    .map_err(|e| {
        anyhow::anyhow!("request on {subject} failed: {e} (is `flowledger serve` running?)")
    })?;
    let v: Value = serde_json::from_slice(&reply.payload).context("reply is not JSON")?;
    print_json(&v);
    Ok(if v["ok"] == json!(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init {
            replicas,
            duplicate_window_secs,
        } => {
            if replicas == 0 || replicas > 5 {
                return Err(
                    anyhow::anyhow!("--replicas must be 1..=5, got {replicas}").context(UsageError)
                );
            }
            let client = connect(g).await?;
            let reports = log::init(
                &client,
                &log_config(g, replicas, Duration::from_secs(duplicate_window_secs)),
            )
            .await?;
            for r in &reports {
                println!("stream {}: {}", r.stream, r.action);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve(g, args).await,
        Command::Submit {
            workflow,
            client: client_id,
            input,
            priority,
            job_id,
            command_id,
        } => {
            let input: Value = serde_json::from_str(&input).map_err(|e| {
                anyhow::anyhow!("--input is not valid JSON: {e}").context(UsageError)
            })?;
            let mut body =
                json!({"workflow_key": workflow, "client_id": client_id, "input": input});
            if let Some(p) = priority {
                body["priority"] = json!(p);
            }
            if let Some(j) = job_id {
                body["job_id"] = json!(j);
            }
            body["command_id"] =
                json!(command_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()));
            let client = connect(g).await?;
            request(
                &client,
                format!("{COMMAND_SUBJECT_PREFIX}.job.submit"),
                body.to_string().into_bytes(),
            )
            .await
        }
        Command::Send { command, body } => {
            serde_json::from_str::<Value>(&body)
                .map_err(|e| anyhow::anyhow!("body is not valid JSON: {e}").context(UsageError))?;
            if command.split('.').count() != 2 {
                return Err(anyhow::anyhow!(
                    "command {command:?} is not <aggregate_type>.<command>, e.g. job.start"
                )
                .context(UsageError));
            }
            let client = connect(g).await?;
            request(
                &client,
                format!("{COMMAND_SUBJECT_PREFIX}.{command}"),
                body.into_bytes(),
            )
            .await
        }
        Command::Audit(a) => audit(g, a).await,
    }
}

async fn serve(g: &Global, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let registry = Registry::load(&args.registry).context(UsageError)?;
    let key = args.key.key()?;
    let (client, log) = open_log(g).await?;
    let intake = Arc::new(Intake::new(
        log.clone(),
        JobServices {
            registry: Arc::new(registry),
            max_timeout_seconds: args.max_timeout_seconds,
        },
    ));
    if let (Some(key), true) = (key, args.checkpoint_every_secs > 0) {
        let (client, log) = (client.clone(), log.clone());
        let every = Duration::from_secs(args.checkpoint_every_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match checkpoint::write_checkpoint(&client, &log, &key).await {
                    Ok(Some(cp)) => tracing::info!(seq = cp.seq, "checkpoint signed"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "checkpoint failed; will retry"),
                }
            }
        });
    } else {
        tracing::warn!(
            "no checkpoint key (FLOWLEDGER_CHECKPOINT_KEY): no signed checkpoints are written"
        );
    }
    let serve = intake.serve(client);
    tokio::select! {
        r = serve => { r.context("command intake stopped")?; }
        _ = tokio::signal::ctrl_c() => { tracing::info!("shutting down"); }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(g: &Global, a: AuditCommand) -> anyhow::Result<ExitCode> {
    match a {
        AuditCommand::Replay(f) => {
            let filter = f.filter()?;
            let (_client, log) = open_log(g).await?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let n = read::replay(&log, &filter, &mut out).await?;
            std::io::Write::flush(&mut out)?;
            eprintln!("flowledger: replayed {n} events");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Digest => {
            let (_client, log) = open_log(g).await?;
            let d = checkpoint::stream_digest(&log, None, None).await?;
            println!("{d}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checkpoint(k) => {
            let key = k.key()?.ok_or_else(|| {
                anyhow::anyhow!("a checkpoint key is needed: set FLOWLEDGER_CHECKPOINT_KEY")
                    .context(UsageError)
            })?;
            let (client, log) = open_log(g).await?;
            match checkpoint::write_checkpoint(&client, &log, &key).await? {
                Some(cp) => print_json(&serde_json::to_value(&cp)?),
                None => eprintln!("flowledger: nothing new since the last checkpoint"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { out, filter, key } => {
            let filter = filter.filter()?;
            let key = key.key()?;
            if key.is_none() {
                eprintln!("flowledger: warning: no checkpoint key: the export ends at the last stored checkpoint, not a fresh one");
            }
            let (client, log) = open_log(g).await?;
            let mut progress = |seq: u64, to: u64| eprintln!("flowledger: export at {seq}/{to}");
            let m =
                export::export(&client, &log, &filter, &out, key.as_ref(), &mut progress).await?;
            print_json(&json!({
                "out": out, "from_seq": m.from_seq, "to_seq": m.to_seq,
                "messages_included": m.messages_included, "events_included": m.events_included,
                "digest": format!("{}:{}", m.to_seq, m.end_digest),
            }));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            export,
            digest,
            key,
        } => {
            let key = key.key()?;
            let expect = digest
                .map(|d| {
                    d.parse::<Digest>()
                        .map_err(|e| anyhow::anyhow!(e).context(UsageError))
                })
                .transpose()?;
            let result = match export {
                Some(dir) => verify::verify_export(&dir, key, expect),
                None => {
                    let (client, log) = open_log(g).await?;
                    verify::verify_live(&client, &log, key, expect).await
                }
            };
            match result {
                Ok(summary) => {
                    print_json(&serde_json::to_value(&summary)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(VerifyError::Broken(b)) => {
                    print_json(&json!({"ok": false, "seq": b.seq, "reason": b.reason}));
                    eprintln!("flowledger: {b}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}
