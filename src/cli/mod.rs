//! The `flowledger` command line. Exit codes: 0 success, 1 verification
//! failed or a command was refused, 2 usage or configuration error,
//! 3 NATS, 4 PostgreSQL, 5 Vault, 6 the HTTP API could not be reached.
//! The commands that call a running `serve` over HTTP are in [`api`], the
//! output formats in [`output`], completions and the man page in [`docs`].

mod api;
mod docs;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::Retryable;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use crate::api::nats::COMMAND_SUBJECT_PREFIX;
use crate::app::{Application, BuildError, DatabaseSettings, HttpSettings, Settings};
use crate::audit::checkpoint::{self, CheckpointKey, Digest, KeyRing};
use crate::audit::export;
use crate::audit::read::{self, Filter};
use crate::audit::verify::{self, VerifyError};
use crate::backoff::Backoff;
use crate::bus::CommandBus;
use crate::commands::job::JobServices;
use crate::commands::limits::MAX_JOB_TIMEOUT_SECONDS;
use crate::commands::registry::{Registry, DEFAULT_REGISTRY_PATH};
use crate::commands::secret_access::events::AccessRequest;
use crate::commands::ErrorCode;
use crate::config::{Config, Environment, OwnKeys};
use crate::crypto::{SealKeys, SigningKey};
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::log::{self, EventLog, LogConfig};
use crate::handlers::HandlerConfig;
use crate::secrets::service::{SecretRules, SecretService};
use crate::secrets::vault::{VaultClient, VaultError};

/// The command line: global options and one subcommand.
#[derive(Parser, Debug)]
#[command(
    name = "flowledger",
    version,
    about = "Event-sourced command backbone for workflow automation on NATS JetStream"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

impl Cli {
    /// Fills each secret the command line takes from the environment
    /// (`FLOWLEDGER_NATS_PASSWORD`, `FLOWLEDGER_CHECKPOINT_SIGNING_KEY`,
    /// `FLOWLEDGER_CHECKPOINT_KEY`, `DATABASE_URL`) from the file its
    /// `_FILE` variant names, when that is set; the value given twice (the
    /// flag or the variable, and the file) is a usage error naming both.
    pub(crate) fn read_secret_files(&mut self, env: &Environment) -> anyhow::Result<()> {
        let auth = &mut self.global.nats_auth;
        let mut password = auth.password.take().map(|p| p.expose_secret().to_string());
        from_secret_file(env, &mut password, "FLOWLEDGER_NATS_PASSWORD", "--password")?;
        auth.password = password.map(SecretString::from);
        if let Some(key) = self.command.key_mut() {
            from_secret_file(
                env,
                &mut key.signing_key,
                "FLOWLEDGER_CHECKPOINT_SIGNING_KEY",
                "--checkpoint-signing-key",
            )?;
            from_secret_file(
                env,
                &mut key.legacy_hmac_key,
                "FLOWLEDGER_CHECKPOINT_KEY",
                "--checkpoint-key",
            )?;
        }
        if let Some(db) = self.command.db_mut() {
            from_secret_file(env, &mut db.database_url, "DATABASE_URL", "--database-url")?;
        }
        Ok(())
    }
}

/// Reads `slot` from the file `<var>_FILE` names when that is set and
/// neither `flag` nor `var` gave it (both: a usage error naming them).
fn from_secret_file(
    env: &Environment,
    slot: &mut Option<String>,
    var: &str,
    flag: &str,
) -> anyhow::Result<()> {
    let file_var = format!("{var}_FILE");
    if !env.is_set(&file_var) {
        return Ok(());
    }
    if slot.is_some() && !env.is_set(var) {
        return Err(anyhow::anyhow!(
            "{flag} and {file_var} are both given: give the secret one way"
        )
        .context(UsageError));
    }
    *slot = env
        .secret(var)
        .map_err(|e| anyhow::Error::new(e).context(UsageError))?;
    Ok(())
}

/// Options every subcommand takes: where NATS and the streams are.
#[derive(Args, Debug, Clone)]
pub(crate) struct Global {
    /// How long a command's append keeps retrying while JetStream does not
    /// answer (a leader election, a reconnect) before it is `unavailable`.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_APPEND_WAIT_SECS",
        default_value_t = 10
    )]
    pub(crate) append_wait_secs: u64,
    /// NATS server URL, or several separated by commas (a cluster).
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub(crate) nats_url: String,
    /// Name of the domain-event stream.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_STREAM",
        default_value = "FLOW_EVENTS"
    )]
    pub(crate) stream: String,
    /// Name of the checkpoint stream.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_CHECKPOINT_STREAM",
        default_value = "FLOW_CHECKPOINTS"
    )]
    pub(crate) checkpoint_stream: String,
    #[command(flatten)]
    pub(crate) nats_auth: NatsAuth,
}

/// How to authenticate to NATS, in the conventions of the `nats` command
/// line (docs/CONFIGURATION.md, "NATS credentials"). At most one of
/// `--creds`, `--nkey`, `--user`; none: connect without a credential.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct NatsAuth {
    /// NATS credentials file (user JWT and seed).
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_NATS_CREDS",
        value_name = "FILE"
    )]
    pub(crate) creds: Option<PathBuf>,
    /// File holding a NATS NKey seed (`SU...`).
    #[arg(long, global = true, env = "FLOWLEDGER_NATS_NKEY", value_name = "FILE")]
    pub(crate) nkey: Option<PathBuf>,
    /// NATS user name (with --password).
    #[arg(long, global = true, env = "FLOWLEDGER_NATS_USER")]
    pub(crate) user: Option<String>,
    /// NATS password; prefer the environment variable (a flag shows in `ps`).
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_NATS_PASSWORD",
        hide_env_values = true,
        value_parser = secret_arg
    )]
    pub(crate) password: Option<SecretString>,
    /// CA certificate (PEM) the NATS server's certificate must chain to;
    /// TLS is then required.
    #[arg(long, global = true, env = "FLOWLEDGER_NATS_CA", value_name = "FILE")]
    pub(crate) tlscacert: Option<PathBuf>,
    /// Prefix of the reply subjects this connection subscribes to; default
    /// `_INBOX_<user>` with --user (what nats/production.conf allows each
    /// user), `_INBOX` otherwise.
    #[arg(long, global = true, env = "FLOWLEDGER_NATS_INBOX_PREFIX")]
    pub(crate) inbox_prefix: Option<String>,
}

/// A secret flag's value: redacted by `Debug`, zeroed when dropped.
fn secret_arg(s: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(s))
}

impl NatsAuth {
    /// The connection options these flags ask for. Errors name the flag or
    /// file, never a password or seed.
    pub(crate) async fn options(&self) -> anyhow::Result<async_nats::ConnectOptions> {
        let usage = |m: String| anyhow::anyhow!(m).context(UsageError);
        let given = [
            self.creds.as_ref().map(|_| "--creds"),
            self.nkey.as_ref().map(|_| "--nkey"),
            self.user.as_ref().map(|_| "--user"),
        ];
        let given: Vec<&str> = given.into_iter().flatten().collect();
        if given.len() > 1 {
            return Err(usage(format!(
                "give one NATS credential, not {} (or their FLOWLEDGER_NATS_* variables)",
                given.join(" and ")
            )));
        }
        let mut o = async_nats::ConnectOptions::new();
        if let Some(path) = &self.creds {
            o = o.credentials_file(path).await.map_err(|e| {
                usage(format!(
                    "--creds {}: not a readable NATS credentials file: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
        }
        if let Some(path) = &self.nkey {
            o = o.nkey(read_nkey_seed(path).map_err(usage)?);
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                if user.is_empty() {
                    return Err(usage("--user: the NATS user name is empty".into()));
                }
                o = o.user_and_password(user.clone(), password.expose_secret().to_string());
            }
            (Some(_), None) => {
                return Err(usage(
                    "--user needs --password (or FLOWLEDGER_NATS_PASSWORD)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(usage(
                    "--password needs --user (or FLOWLEDGER_NATS_USER)".into(),
                ))
            }
            (None, None) => {}
        }
        let prefix = match (&self.inbox_prefix, &self.user) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(user)) => Some(format!("_INBOX_{user}")),
            (None, None) => None,
        };
        if let Some(p) = prefix {
            let token_ok = |t: &str| !t.is_empty() && !t.contains(['*', '>']);
            if !p.split('.').all(token_ok) || p.contains(char::is_whitespace) {
                return Err(usage(format!(
                    "--inbox-prefix {p:?} is not a subject prefix (tokens without spaces or wildcards)"
                )));
            }
            o = o.custom_inbox_prefix(p);
        }
        if let Some(ca) = &self.tlscacert {
            if !ca.is_file() {
                return Err(usage(format!("--tlscacert {}: no such file", ca.display())));
            }
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(o)
    }
}

/// The seed in an NKey seed file: its first line that starts with `S`
/// (a seed file may hold comments). Errors never quote the file.
fn read_nkey_seed(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--nkey {}: cannot read it: {}", path.display(), e.kind()))?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with('S') && l.len() > 2)
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "--nkey {}: holds no NKey seed (a line starting with `S`, e.g. `SU...`)",
                path.display()
            )
        })
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create or update the JetStream streams, and with --database-url the
    /// read-model schema (idempotent).
    Init {
        #[command(flatten)]
        db: DbArgs,
        /// Stream replicas: 1 for development, 3 for production clusters.
        #[arg(long, env = "FLOWLEDGER_REPLICAS", default_value_t = 1)]
        replicas: usize,
        /// JetStream de-duplication window for command ids, in seconds.
        #[arg(long, env = "FLOWLEDGER_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
        duplicate_window_secs: u64,
        /// How long to wait for NATS and for JetStream to place the streams
        /// (a cluster still forming: no meta leader yet, fewer servers up
        /// than --replicas), logging what it waits for, before exiting 3
        /// with the cause.
        #[arg(long, env = "FLOWLEDGER_INIT_WAIT_SECS", default_value_t = 60)]
        wait_secs: u64,
    },
    /// Run the service: NATS command intake, periodic checkpoints, and with
    /// --database-url the projections, the job handler and the HTTP API.
    Serve(ServeArgs),
    /// Apply the read-model database migrations (idempotent).
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Read-model projections: status, resume, rebuild.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Submit a job over NATS and print the reply.
    Submit {
        /// The workflow key (a key of the registry), e.g. invoice.extract.
        #[arg(long)]
        workflow: String,
        /// The job's client: the NATS user's own id (its default); another
        /// is refused.
        #[arg(long)]
        client: Option<String>,
        /// Job input as JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        /// 1 to 10 (5 when not given).
        #[arg(long)]
        priority: Option<u8>,
        /// The job id; a fresh one by default.
        #[arg(long)]
        job_id: Option<String>,
        /// Command id (makes a retry safe); a fresh one by default.
        #[arg(long)]
        command_id: Option<String>,
    },
    /// Send any command as the NATS user, e.g. `flowledger send job.cancel
    /// '{"job_id":"j-1","reason":"duplicate"}'` (docs/EVENTS.md lists them;
    /// the handler's own commands, such as `job.start`, are refused to
    /// other users).
    Send {
        /// `<aggregate_type>.<command>`
        command: String,
        /// The command body as JSON.
        body: String,
    },
    /// Auditor tools: replay, digest, checkpoint, export, verify.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Conversation memory (docs/MEMORY.md).
    #[command(subcommand)]
    Memory(MemoryCommand),
    /// Jobs over a running serve's HTTP API: list, show, watch, cancel, retry.
    Jobs(api::Jobs),
    /// Approvals over the HTTP API: list, approve, reject.
    Approvals(api::Approvals),
    /// The kill-switch over the HTTP API: disable, enable a workflow.
    Workflows(api::Workflows),
    /// Print a shell completion script, e.g. `flowledger completions bash
    /// > /etc/bash_completion.d/flowledger`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `flowledger man | man -l -`.
    Man,
}

impl Command {
    /// The read-model database options, for the subcommands that take them.
    /// The checkpoint keys of the commands that sign (`serve`, `audit
    /// checkpoint`, `audit export`).
    fn key_mut(&mut self) -> Option<&mut KeyArgs> {
        match self {
            Command::Serve(args) => Some(&mut args.key),
            Command::Audit(
                AuditCommand::Checkpoint { key, .. } | AuditCommand::Export { key, .. },
            ) => Some(key),
            _ => None,
        }
    }

    fn db_mut(&mut self) -> Option<&mut DbArgs> {
        match self {
            Command::Init { db, .. } | Command::Migrate { db } => Some(db),
            Command::Serve(args) => Some(&mut args.db),
            Command::Memory(MemoryCommand::Cleanup { db, .. }) => Some(db),
            Command::Projections(
                ProjectionsCommand::Status { db, .. }
                | ProjectionsCommand::Resume { db, .. }
                | ProjectionsCommand::Rebuild { db, .. },
            ) => Some(db),
            Command::Submit { .. }
            | Command::Send { .. }
            | Command::Audit(_)
            | Command::Jobs(_)
            | Command::Approvals(_)
            | Command::Workflows(_)
            | Command::Completions { .. }
            | Command::Man => None,
        }
    }
}

/// `flowledger memory ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum MemoryCommand {
    /// Record the expiry of every working-state value past its expiry now
    /// (what `serve` does at `[memory] cleanup_cron`); prints the counts as
    /// JSON. Needs `[memory]` with `[secrets]` in the configuration file.
    Cleanup {
        #[command(flatten)]
        db: DbArgs,
        /// The configuration file (TOML) with `[memory]` and `[secrets]`.
        #[arg(long, env = "FLOWLEDGER_CONFIG")]
        config: PathBuf,
    },
}

/// Where the read-model database is.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct DbArgs {
    /// PostgreSQL for the read models, e.g. postgres://user:pass@127.0.0.1:5432/flowledger
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,
}

impl DbArgs {
    fn require(&self) -> anyhow::Result<&str> {
        self.database_url.as_deref().ok_or_else(|| {
            anyhow::anyhow!("a PostgreSQL URL is needed: pass --database-url or set DATABASE_URL")
                .context(UsageError)
        })
    }
}

/// `flowledger projections ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum ProjectionsCommand {
    /// Each projection's version, checkpoint, lag and state.
    Status {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        out: output::OutputArgs,
    },
    /// Continue a projection stopped on an event it could not apply.
    Resume {
        /// executions, audit, approvals, secret_accesses or memory
        name: String,
        /// Skip the event at this stream sequence (recorded as an event).
        #[arg(long, requires_all = ["reason", "by"])]
        skip: Option<u64>,
        /// Why the event is skipped (with --skip).
        #[arg(long)]
        reason: Option<String>,
        /// Who decides the skip (with --skip).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Build a new version of a read model beside the old one from stream
    /// sequence 1, catch up, and switch readers atomically.
    Rebuild {
        /// executions, audit, approvals, secret_accesses or memory
        name: String,
        #[command(flatten)]
        db: DbArgs,
        /// Service configuration (TOML): `memory` opens its events with the
        /// data subjects' keys, so its rebuild needs `[memory]` enabled and
        /// `[secrets]` (Vault); with `[memory.embedder]`, the new version
        /// indexes the vectors of its model and dimensions (the way to
        /// change them); the other read models do not read it.
        #[arg(long, env = "FLOWLEDGER_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// `flowledger serve`'s options.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) db: DbArgs,
    /// How long to keep trying the first NATS connection before giving up
    /// (exit 3); once connected, reconnects are retried without limit.
    #[arg(long, env = "FLOWLEDGER_NATS_CONNECT_WAIT_SECS", default_value_t = 60)]
    pub(crate) nats_connect_wait_secs: u64,
    /// Listen address of the HTTP API (with --database-url; default
    /// 127.0.0.1:8080). Without a database, given: /livez, /readyz and
    /// /metrics only; not given: no HTTP listener.
    #[arg(long = "http", env = "FLOWLEDGER_HTTP_ADDR")]
    pub(crate) http: Option<std::net::SocketAddr>,
    /// Workflow registry file.
    #[arg(long, env = "FLOWLEDGER_REGISTRY", default_value = DEFAULT_REGISTRY_PATH)]
    pub(crate) registry: PathBuf,
    /// Service configuration (TOML; docs/CONFIGURATION.md). Without it:
    /// defaults, and no client is known: every /v1 endpoint answers 401.
    #[arg(long, env = "FLOWLEDGER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Largest `timeout_seconds` a job may ask for.
    #[arg(long, env = "FLOWLEDGER_MAX_TIMEOUT_SECONDS", default_value_t = 3600)]
    pub(crate) max_timeout_seconds: u32,
    /// Seconds between signed checkpoints (needs a checkpoint key); 0 turns them off.
    #[arg(long, env = "FLOWLEDGER_CHECKPOINT_EVERY_SECS", default_value_t = 60)]
    pub(crate) checkpoint_every_secs: u64,
    #[command(flatten)]
    pub(crate) key: KeyArgs,
    /// Check the configuration, the registry and the keys in the
    /// environment, print what would run, and exit (0: fine, 2: the first
    /// error) without connecting to anything.
    #[arg(long)]
    pub(crate) check_config: bool,
}

/// The Ed25519 key that signs checkpoints and export manifests, and its id.
#[derive(Args, Debug, Clone)]
pub(crate) struct KeyArgs {
    /// Ed25519 seed that signs checkpoints, 64 hex digits (make one with
    /// `flowledger audit keygen`). Prefer the env variable.
    #[arg(
        long = "checkpoint-signing-key",
        env = "FLOWLEDGER_CHECKPOINT_SIGNING_KEY",
        hide_env_values = true
    )]
    pub(crate) signing_key: Option<String>,
    /// The signing key's id, written into every checkpoint.
    #[arg(long, env = "FLOWLEDGER_CHECKPOINT_KEY_ID", default_value = "default")]
    pub(crate) checkpoint_key_id: String,
    /// The HMAC key of earlier versions; refused (it signs nothing now).
    #[arg(
        long = "checkpoint-key",
        env = "FLOWLEDGER_CHECKPOINT_KEY",
        hide_env_values = true,
        hide = true
    )]
    pub(crate) legacy_hmac_key: Option<String>,
}

impl KeyArgs {
    fn key(&self) -> anyhow::Result<Option<CheckpointKey>> {
        if self.legacy_hmac_key.is_some() {
            return Err(anyhow::anyhow!(
                "FLOWLEDGER_CHECKPOINT_KEY (an HMAC key) no longer signs checkpoints: \
                 checkpoints are signed with Ed25519. Make a key with `flowledger audit keygen \
                 --key-id ID --seed-out FILE`, set FLOWLEDGER_CHECKPOINT_SIGNING_KEY to the \
                 file's content and unset FLOWLEDGER_CHECKPOINT_KEY; to verify checkpoints the \
                 HMAC key signed, add it to the verifiers' key ring as an hmac-sha256 entry \
                 (docs/EVENTS.md section 5)"
            )
            .context(UsageError));
        }
        self.signing_key
            .as_deref()
            .map(|k| CheckpointKey::from_hex(&self.checkpoint_key_id, k))
            .transpose()
            .map_err(|e| anyhow::Error::new(e).context(UsageError))
    }
}

/// The keys a verifier checks signatures with.
#[derive(Args, Debug, Clone)]
pub(crate) struct RingArgs {
    /// Key ring file (JSON, docs/EVENTS.md section 5): the Ed25519 public
    /// keys, and HMAC secrets of old checkpoints, to check signatures with.
    #[arg(long = "keys", env = "FLOWLEDGER_CHECKPOINT_KEYS")]
    pub(crate) keys: Option<PathBuf>,
}

impl RingArgs {
    fn ring(&self) -> anyhow::Result<Option<KeyRing>> {
        self.keys
            .as_deref()
            .map(KeyRing::load)
            .transpose()
            .map_err(|e| anyhow::Error::new(e).context(UsageError))
    }
}

/// The filters of `audit replay` and `audit export`.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct FilterArgs {
    /// `TYPE` or `TYPE:ID`, e.g. `job` or `job:0193...`.
    #[arg(long)]
    pub(crate) aggregate: Option<String>,
    /// Only this event type, e.g. `JobSubmitted`.
    #[arg(long = "type")]
    pub(crate) event_type: Option<String>,
    /// Events that occurred at or after this time (RFC 3339; `occurred_at`).
    #[arg(long)]
    pub(crate) since: Option<DateTime<Utc>>,
    /// Events that occurred at or before this time (RFC 3339; `occurred_at`).
    #[arg(long)]
    pub(crate) until: Option<DateTime<Utc>>,
    /// Only messages at or after this stream sequence.
    #[arg(long)]
    pub(crate) from_seq: Option<u64>,
    /// Only messages at or before this stream sequence.
    #[arg(long)]
    pub(crate) to_seq: Option<u64>,
}

impl FilterArgs {
    /// The filter of an export: aggregate and sequence range only, which a
    /// verifier can check (docs/EVENTS.md section 8).
    fn export_filter(&self) -> anyhow::Result<Filter> {
        let f = self.filter()?;
        if export::ExportFilter::of(&f).is_none() {
            return Err(
                anyhow::Error::new(export::ExportError::UncheckableFilter).context(UsageError)
            );
        }
        Ok(f)
    }

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

/// `flowledger audit ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Print events as JSON lines, in stream order, with their envelope.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// jsonl (the default: one event a line, streamed), json (one
        /// array, pretty) or table (sequence, time, aggregate, type).
        #[arg(long, value_enum, env = "FLOWLEDGER_OUTPUT")]
        output: Option<output::Format>,
    },
    /// Print the current stream digest (`SEQ:HEX`); keep it to check later.
    Digest,
    /// Sign and store a checkpoint at the current end of the stream (or at
    /// --seq).
    Checkpoint {
        /// Sign the digest after this message instead of the stream's end.
        #[arg(long)]
        seq: Option<u64>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Write a self-contained export for offline verification.
    Export {
        /// The directory to write the export into (it must not exist yet).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Verify the live stream, or an export with --export DIR. Fails
    /// unless a valid signature (or --digest) covers the whole range.
    Verify {
        /// Verify the export in this directory instead of the live stream.
        #[arg(long)]
        export: Option<PathBuf>,
        /// A digest kept earlier (`SEQ:HEX`) that history must still
        /// contain; it covers the range up to SEQ.
        #[arg(long)]
        digest: Option<String>,
        /// Live only: verify messages 1 to this sequence (default: the end).
        #[arg(long, conflicts_with = "export")]
        to_seq: Option<u64>,
        /// Accept messages no valid signature covers (an unsigned tail, an
        /// export's unsigned manifest); the summary says what they are.
        #[arg(long)]
        allow_unsigned: bool,
        #[command(flatten)]
        ring: RingArgs,
    },
    /// Make an Ed25519 checkpoint signing key: the seed goes to --seed-out
    /// (mode 0600, never overwritten), the key ring entry to stdout.
    Keygen {
        /// The new key's id, e.g. the month it starts signing: `2026-12`.
        #[arg(long)]
        key_id: String,
        /// Where to write the seed (the private key), 64 hex digits.
        #[arg(long)]
        seed_out: PathBuf,
    },
}

/// `println!` for the command's output: a reader that went away (`| head`)
/// ends the program with 0 (its work is done, the rest is not wanted); any
/// other failure to write ends it with 1 and says so.
macro_rules! outln {
    ($($t:tt)*) => { write_out(format_args!($($t)*)) };
}

pub(crate) fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("flowledger: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Marks an error as the user's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("invalid usage")]
struct UsageError;

/// Marks a server that could not be reached; each has its exit code
/// (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Down {
    /// NATS (exit code 3).
    #[error("NATS unreachable")]
    Nats,
    /// PostgreSQL (exit code 4).
    #[error("PostgreSQL unreachable")]
    Database,
    /// Vault / OpenBao (exit code 5).
    #[error("Vault unreachable")]
    Vault,
    /// The HTTP API of a `serve` (exit code 6).
    #[error("API unreachable")]
    Api,
}

/// The exit code of a failed command, by the markers its error carries
/// (a database error left unmarked is PostgreSQL's); a broken pipe (the
/// reader went away, as `| head` does) is success.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    // only a failed write of the output: a socket's broken pipe (NATS,
    // PostgreSQL) is a failure like any other
    let output_closed = e.chain().any(|c| {
        c.downcast_ref::<crate::audit::read::OutputError>()
            .is_some_and(|o| o.kind() == Some(std::io::ErrorKind::BrokenPipe))
    });
    if output_closed {
        return ExitCode::SUCCESS;
    }
    if e.downcast_ref::<UsageError>().is_some() {
        return ExitCode::from(2);
    }
    match e.downcast_ref::<Down>() {
        Some(Down::Nats) => ExitCode::from(3),
        Some(Down::Database) => ExitCode::from(4),
        Some(Down::Vault) => ExitCode::from(5),
        Some(Down::Api) => ExitCode::from(6),
        None if e.chain().any(|c| {
            c.downcast_ref::<sqlx::Error>().is_some()
                || c.downcast_ref::<crate::projections::db::DbError>()
                    .is_some()
        }) =>
        {
            ExitCode::from(4)
        }
        None => ExitCode::from(1),
    }
}

/// The error's causes, each once: the markers left out, and a cause
/// whose text the message before it already shows (an error that prints
/// its source) not repeated.
fn causes(e: &anyhow::Error) -> String {
    let markers = [
        UsageError.to_string(),
        Down::Nats.to_string(),
        Down::Database.to_string(),
        Down::Vault.to_string(),
        Down::Api.to_string(),
    ];
    let mut out: Vec<String> = Vec::new();
    for c in e.chain().map(|c| c.to_string()) {
        if markers.contains(&c) || c.is_empty() {
            continue;
        }
        if out.last().is_some_and(|prev| prev.contains(&c)) {
            continue;
        }
        out.push(c);
    }
    out.join(": ")
}

/// The `flowledger` program: parses the command line, sets up logging to
/// stderr (`crate::logging`: `FLOWLEDGER_LOG`, `FLOWLEDGER_LOG_FORMAT`), runs the subcommand and maps its
/// error to the exit code.
pub async fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // `serve` sets up logging itself, once its configuration says whether
    // its spans also go to a trace exporter
    let serving = matches!(cli.command, Command::Serve(_));
    if let Err(e) = (!serving).then(|| crate::logging::init(None)).transpose() {
        eprintln!("flowledger: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = cli.read_secret_files(&Environment::process()) {
        eprintln!("flowledger: {}", causes(&e));
        return exit_code(&e);
    }
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            let code = exit_code(&e);
            if code != ExitCode::SUCCESS {
                eprintln!("flowledger: {}", causes(&e));
            }
            code
        }
    }
}

/// Writes `text` to a new file readable by its owner only; never
/// overwrites.
fn write_secret_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))
        .context(UsageError)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn log_config(g: &Global, replicas: usize, duplicate_window: Duration) -> LogConfig {
    LogConfig {
        stream: g.stream.clone(),
        checkpoint_stream: g.checkpoint_stream.clone(),
        replicas,
        duplicate_window,
        append_wait: Duration::from_secs(g.append_wait_secs),
    }
}

async fn connect(g: &Global) -> anyhow::Result<async_nats::Client> {
    connect_as(g, false).await
}

/// The service's connection: reconnects without limit (backoff up to 5 s,
/// each loss and return logged), and keeps trying to make the first
/// connection for `--nats-connect-wait-secs`, so a supervisor's restart or a
/// NATS restart does not end `serve`.
async fn connect_service(g: &Global, wait: Duration) -> anyhow::Result<async_nats::Client> {
    connect_patiently(g, wait, "--nats-connect-wait-secs").await
}

/// The pauses between first connection tries: 250 ms doubling to 5 s.
const CONNECT_RETRY: Backoff =
    Backoff::doubling(Duration::from_millis(250), Duration::from_secs(5));

/// The service's connection (see [`connect_service`]), first made within
/// `wait`; `flag` names the setting in the error.
async fn connect_patiently(
    g: &Global,
    wait: Duration,
    flag: &str,
) -> anyhow::Result<async_nats::Client> {
    let until = std::time::Instant::now() + wait;
    let mut attempt: u32 = 0;
    (|| connect_as(g, true))
        .retry(CONNECT_RETRY.until(until))
        .when(|e| e.downcast_ref::<UsageError>().is_none())
        .notify(|e, delay| {
            attempt = attempt.saturating_add(1);
            tracing::warn!(
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                "NATS is not reachable yet: {e:#}"
            );
        })
        .await
        .map_err(|e| {
            if e.downcast_ref::<UsageError>().is_some() {
                e
            } else {
                e.context(format!("gave up after {} s ({flag})", wait.as_secs()))
            }
        })
}

/// The servers of `--nats-url`: one URL or several separated by commas,
/// as the `nats` CLI takes them (`nats://a:4222,nats://b:4222`); a server
/// without a scheme is `nats://`. The error names the bad entry with its
/// credentials hidden.
fn nats_servers(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>().map_err(|e| {
                anyhow::anyhow!(
                    "--nats-url: {:?} is not a NATS server URL ({e}); give one or more \
                     separated by commas, e.g. nats://a:4222,nats://b:4222",
                    crate::commands::redact::display(u)
                )
                .context(UsageError)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(anyhow::anyhow!("--nats-url is empty").context(UsageError))
            } else {
                Ok(v)
            }
        })
}

async fn connect_as(g: &Global, service: bool) -> anyhow::Result<async_nats::Client> {
    let servers = nats_servers(&g.nats_url)?;
    let url = g
        .nats_url
        .split(',')
        .map(|u| crate::commands::redact::display(u.trim()))
        .collect::<Vec<_>>()
        .join(",");
    let options = g.nats_auth.options().await?;
    let options = if service {
        options
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((250 * attempts as u64).min(5_000))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS connection lost; reconnecting (no limit)")
                    }
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connection (re)established")
                    }
                    other => tracing::info!("NATS: {other}"),
                }
            })
    } else {
        options.max_reconnects(Some(3))
    };
    options
        .name("flowledger")
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .map_err(|e| {
            let unreachable = !matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            );
            let e = anyhow::Error::new(e);
            // a refused credential is the caller's to fix (exit 2)
            if unreachable {
                e.context(Down::Nats)
            } else {
                e.context(UsageError)
            }
        })
        .with_context(|| {
            format!(
                "cannot connect to NATS at {url} (start nats-server, set --nats-url, \
                 or give a credential it knows: --user/--password, --creds, --nkey)"
            )
        })
}

async fn open_log(g: &Global) -> anyhow::Result<(async_nats::Client, EventLog)> {
    let client = connect(g).await?;
    let log = EventLog::open(client.clone(), log_config(g, 1, Duration::from_secs(120))).await?;
    Ok((client, log))
}

fn print_json(v: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// How long `submit` and `send` wait for a reply: the service's append
/// wait (a command waits through a stream leader election that long) and
/// this much more for its last attempt and the reply.
const REPLY_MARGIN: Duration = Duration::from_secs(5);

/// How long before a request nobody received is sent again.
const NO_RESPONDERS_RETRY: Duration = Duration::from_millis(250);

/// How long one send of a command with a command id waits for its reply
/// before the command is sent again (a request or reply lost with a
/// server; nats-server 2.9 drops a request across an account import that
/// no one is subscribed to without saying "no responders").
const RESEND_AFTER: Duration = Duration::from_secs(5);

/// Sends a command and prints its reply, waiting up to `wait`. A request
/// nobody received (no responders) is sent again; with `resend` (the body
/// has a command id, so the service runs it once whatever the number of
/// sends) so is one unanswered within [`RESEND_AFTER`].
async fn request(
    client: &async_nats::Client,
    subject: String,
    body: Vec<u8>,
    wait: Duration,
    resend: bool,
) -> anyhow::Result<ExitCode> {
    let until = std::time::Instant::now() + wait;
    let body = bytes::Bytes::from(body);
    let reply = loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let attempt = if resend { left.min(RESEND_AFTER) } else { left };
        let asked = client.send_request(
            subject.clone(),
            async_nats::Request::new()
                .payload(body.clone())
                .timeout(Some(attempt)),
        );
        match asked.await {
            Ok(m) => break m,
            // nobody received it (no intake subscribed for a moment, e.g.
            // while `serve` moves to another node of a cluster): sending it
            // again cannot run it twice
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && left > NO_RESPONDERS_RETRY =>
            {
                tracing::debug!("no responders on {subject}; sending again");
                tokio::time::sleep(NO_RESPONDERS_RETRY).await;
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut && attempt < left => {
                tracing::debug!(
                    "no reply on {subject} within {} s; sending again with the same command id",
                    attempt.as_secs()
                );
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                return Err(anyhow::anyhow!(
                    "no reply on {subject} within {} s: is `flowledger serve` running, and may \
                     this NATS user publish commands and receive replies under its inbox \
                     prefix (--inbox-prefix)? A command with a command id may be sent again \
                     safely",
                    wait.as_secs()
                ))
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "request on {subject} failed: {e} (is `flowledger serve` running?)"
                ))
            }
        }
    };
    let v: Value = serde_json::from_slice(&reply.payload).context("reply is not JSON")?;
    print_json(&v);
    Ok(if v["ok"] == json!(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn migrate(url: &str) -> anyhow::Result<()> {
    let pool = crate::projections::db::connect(url, 2)
        .await
        .context(Down::Database)?;
    crate::projections::db::migrate(&pool).await?;
    outln!("read-model schema: up to date");
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Migrate { db } => {
            migrate(db.require()?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Projections(p) => projections(g, p).await,
        Command::Memory(MemoryCommand::Cleanup { db, config }) => {
            memory_cleanup(g, db, &config).await
        }
        Command::Init {
            db,
            replicas,
            duplicate_window_secs,
            wait_secs,
        } => {
            if replicas == 0 || replicas > 5 {
                return Err(
                    anyhow::anyhow!("--replicas must be 1..=5, got {replicas}").context(UsageError)
                );
            }
            let wait = Duration::from_secs(wait_secs);
            let started = std::time::Instant::now();
            let client = connect_patiently(g, wait, "--wait-secs").await?;
            let reports = log::init_patiently(
                &client,
                &log_config(g, replicas, Duration::from_secs(duplicate_window_secs)),
                wait.saturating_sub(started.elapsed()),
            )
            .await
            .map_err(|e| match e {
                log::LogError::NotReady { .. } => anyhow::Error::new(e)
                    .context(Down::Nats)
                    .context("flowledger init gave up (--wait-secs)"),
                other => anyhow::Error::new(other),
            })?;
            for r in &reports {
                outln!("stream {}: {}", r.stream, r.action);
            }
            let js = async_nats::jetstream::new(client.clone());
            crate::handlers::lease::init(&js, replicas).await?;
            outln!(
                "buckets {} and {}: ready",
                crate::handlers::lease::LEASE_BUCKET,
                crate::handlers::lease::STATE_BUCKET
            );
            if let Some(url) = &db.database_url {
                migrate(url).await?;
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
            let mut body = json!({"workflow_key": workflow, "input": input});
            if let Some(c) = client_id {
                body["client_id"] = json!(c);
            }
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
                Duration::from_secs(g.append_wait_secs) + REPLY_MARGIN,
                true,
            )
            .await
        }
        Command::Send { command, body } => {
            let parsed = serde_json::from_str::<Value>(&body)
                .map_err(|e| anyhow::anyhow!("body is not valid JSON: {e}").context(UsageError))?;
            let resend = parsed.get("command_id").is_some_and(Value::is_string);
            // two subject tokens, no wildcard or space
            let token =
                |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if command.split('.').count() != 2 || !command.split('.').all(token) {
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
                Duration::from_secs(g.append_wait_secs) + REPLY_MARGIN,
                resend,
            )
            .await
        }
        Command::Audit(a) => audit(g, a).await,
        Command::Jobs(j) => api::jobs(j).await,
        Command::Approvals(a) => api::approvals(a).await,
        Command::Workflows(w) => api::workflows(w).await,
        Command::Completions { shell } => {
            docs::print(&docs::completions(shell));
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            docs::print(&docs::man().context("cannot render the man page")?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Conversation memory from `[memory]` (checked with the configuration:
/// enabled only with `[secrets]`).
fn memory_service(
    config: &Config,
    secrets: Option<&Arc<SecretService>>,
) -> Option<Arc<crate::memory::service::MemoryService>> {
    use crate::memory::keys::SubjectKeys;
    use crate::memory::service::{AssembleDefaults, Chunking, MemoryService, Retention};
    let m = &config.memory;
    let secrets = secrets.filter(|_| m.enabled)?;
    let keys = SubjectKeys::new(
        secrets.clone(),
        &m.key_path,
        Duration::from_secs(m.key_cache_seconds),
    );
    let service = MemoryService::new(
        Arc::new(keys),
        Chunking {
            max_chars: m.chunk_chars,
        },
        AssembleDefaults {
            top_k: m.top_k,
            recent_episodes: m.recent_episodes,
            budget_ms: m.assemble_budget_ms,
        },
    )
    .with_retention(Retention::from_days(m.episode_retention_days))
    .with_hnsw(m.hnsw());
    // checked with the configuration: a set expression parses
    let service = match crate::memory::cleanup::parse_schedule(&m.cleanup_cron) {
        Ok(schedule) if !m.cleanup_cron.is_empty() => service.with_cleanup(schedule),
        _ => service,
    };
    // checked with the configuration: the embedder's settings hold
    let service = match m
        .embedder
        .clone()
        .map(|e| crate::memory::embedder::Embedder::new(e, Some(secrets.clone())))
    {
        Some(Ok(e)) => service.with_embedder(Arc::new(e)),
        Some(Err(why)) => {
            tracing::error!(%why, "memory: the embedder is not usable; assemble ranks by full text");
            service
        }
        None => service,
    };
    // checked with the configuration: the extractor's settings hold
    let service = match m
        .extractor
        .clone()
        .map(|e| crate::memory::extractor::Extractor::new(e, Some(secrets.clone())))
    {
        Some(Ok(e)) => service.with_extractor(Arc::new(e)),
        Some(Err(why)) => {
            tracing::error!(%why, "memory: the extractor is not usable; no facts are extracted");
            service
        }
        None => service,
    };
    Some(Arc::new(service))
}

/// The data subjects' keys for rebuilding `model` (the memory read model),
/// from the configuration at `config`: `[memory]` enabled and `[secrets]`
/// (logged in to Vault now). Refused, naming what is missing, otherwise.
/// The subjects' keys a rebuild of `model` opens its events with, and the
/// vector space of `[memory.embedder]` if configured, from `config`.
async fn rebuild_keys(
    model: crate::projections::ReadModel,
    config: Option<&std::path::Path>,
) -> anyhow::Result<(
    Arc<crate::memory::keys::SubjectKeys>,
    Option<crate::projections::db::VectorSpace>,
)> {
    let refuse = |why: &str| {
        anyhow::Error::new(crate::projections::ContextError::NoSubjectKeys { name: model.name() })
            .context(format!("cannot rebuild {}: {why}", model.name()))
            .context(UsageError)
    };
    let Some(path) = config else {
        return Err(refuse("no configuration given"));
    };
    let config = Config::load(path).context(UsageError)?;
    if !config.memory.enabled {
        return Err(refuse(&format!(
            "{} does not enable [memory]",
            path.display()
        )));
    }
    let secrets = secrets_service(&config).await?;
    let space = config
        .memory
        .embedder
        .as_ref()
        .map(crate::memory::embedder::space_of);
    match memory_service(&config, secrets.as_ref()) {
        Some(m) => Ok((m.keys().clone(), space)),
        None => Err(refuse(&format!(
            "{} configures no [secrets] vault_addr",
            path.display()
        ))),
    }
}

/// Secret access from `[secrets]`: logs in to Vault now, so a bad token or
/// AppRole credential stops `serve` at start with a message naming it
/// (exit 2), and an unreachable Vault exits 3.
async fn secrets_service(config: &Config) -> anyhow::Result<Option<Arc<SecretService>>> {
    let policy = config
        .secrets
        .check()
        .map_err(anyhow::Error::msg)
        .context(UsageError)?;
    let Some(vault) = config.secrets.vault_config().context(UsageError)? else {
        if !policy.is_empty() {
            tracing::warn!(
                "[[secrets.rules]] are set but [secrets] vault_addr is not: secret access is off"
            );
        }
        return Ok(None);
    };
    let vault = match VaultClient::connect(vault).await {
        Ok(v) => v,
        Err(e @ VaultError::Unreachable { .. }) => {
            return Err(anyhow::Error::new(e).context(Down::Vault))
        }
        Err(e) => return Err(anyhow::Error::new(e).context(UsageError)),
    };
    let s = &config.secrets;
    let rules = SecretRules {
        cache_ttl: Duration::from_secs(s.cache_ttl_seconds),
        max_staleness: Duration::from_secs(s.max_staleness_seconds),
        retry_attempts: s.retry_attempts,
        retry_base: Duration::from_millis(s.retry_base_ms),
    };
    Ok(Some(Arc::new(SecretService::new(vault, policy, rules))))
}

/// flowledger's own keys: from their environment variables, or from Vault
/// where `[secrets.keys]` names them (never both).
struct OwnKeyValues {
    checkpoint: Option<CheckpointKey>,
    callback_signing: Option<SigningKey>,
    n8n: Option<SigningKey>,
    seal: Option<Arc<SealKeys>>,
}

impl OwnKeyValues {
    /// Reads each key `own` names from Vault through `secrets` (recorded
    /// on `bus` as flowledger's own access). A key whose environment
    /// variable is set too is refused: which one is meant cannot be told.
    async fn read_from_vault(
        &mut self,
        secrets: &SecretService,
        bus: &CommandBus,
        own: &OwnKeys,
        checkpoint_key_id: &str,
    ) -> anyhow::Result<()> {
        for (name, source) in own.sources() {
            let setting = format!("secrets.keys.{name}");
            let already = match name {
                "callback_signing" => self.callback_signing.is_some(),
                "n8n" => self.n8n.is_some(),
                "seal_keys" => self.seal.is_some(),
                _ => self.checkpoint.is_some(),
            };
            if already {
                return Err(anyhow::anyhow!(
                    "{setting} names a Vault path, and the environment gives that key too: \
                     unset one of them"
                )
                .context(UsageError));
            }
            let (path, field) = OwnKeys::split(source)
                .map_err(|e| anyhow::anyhow!("{setting}: {e}"))
                .context(UsageError)?;
            let meta = CommandMeta::originating(
                uuid::Uuid::now_v7().to_string(),
                Actor {
                    client_id: "flowledger".into(),
                    user_id: None,
                },
                String::new(),
            );
            let request = AccessRequest {
                path,
                field: Some(field),
                version: None,
                purpose: format!("load flowledger's own key {name} at start"),
                job_id: None,
                step: None,
            };
            let served = match secrets.read_own_key(bus, request, &meta).await {
                Ok(s) => s,
                Err(e) if e.code == ErrorCode::Unavailable => {
                    return Err(anyhow::anyhow!("{setting}: {e}").context(Down::Vault))
                }
                Err(e) => return Err(anyhow::anyhow!("{setting}: {e}").context(UsageError)),
            };
            let text = served.value.expose_str().ok_or_else(|| {
                anyhow::anyhow!("{setting}: the field in Vault is not a string").context(UsageError)
            })?;
            let bad = |m: String| anyhow::anyhow!("{setting}: {m}").context(UsageError);
            match name {
                "callback_signing" => {
                    self.callback_signing = Some(SigningKey::new(text.as_bytes()).map_err(bad)?)
                }
                "n8n" => self.n8n = Some(SigningKey::new(text.as_bytes()).map_err(bad)?),
                "seal_keys" => self.seal = Some(Arc::new(SealKeys::parse(text).map_err(bad)?)),
                _ => {
                    let key = CheckpointKey::from_hex(checkpoint_key_id, text)
                        .map_err(|e| bad(e.to_string()))?;
                    self.checkpoint = Some(key);
                }
            }
            tracing::info!(
                key = name,
                kv_version = served.kv_version,
                "read flowledger's own key from Vault"
            );
        }
        Ok(())
    }
}

/// `flowledger memory cleanup`: one cleanup run, progress on stderr.
async fn memory_cleanup(
    g: &Global,
    db: DbArgs,
    path: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(path).context(UsageError)?;
    if !config.memory.enabled {
        return Err(anyhow::anyhow!(
            "memory is not enabled in {}: set [memory] enabled = true (docs/MEMORY.md)",
            path.display()
        )
        .context(UsageError));
    }
    let secrets = secrets_service(&config).await?;
    let memory = memory_service(&config, secrets.as_ref()).ok_or_else(|| {
        anyhow::anyhow!("[memory] needs [secrets] vault_addr: the subjects' keys are in Vault")
            .context(UsageError)
    })?;
    let pool = crate::projections::db::connect(db.require()?, 2)
        .await
        .context(Down::Database)?;
    let (_c, log) = open_log(g).await?;
    // this bus records memory commands only: no workflow is needed
    let bus = CommandBus::new(
        log,
        JobServices {
            registry: Registry::with_keys(std::iter::empty()).into(),
            max_timeout_seconds: 1,
            callback_sealer: None,
        },
    );
    let now = chrono::Utc::now();
    let due = crate::memory::cleanup::due(&memory, &pool, now)
        .await
        .context(Down::Database)?;
    let mut bar = crate::projections::rebuild::Progress::counting("memory cleanup".into(), "items");
    let report = crate::memory::cleanup::run_once(&bus, &memory, &pool, now, &mut |r| {
        bar.update(r.expired + r.retired + r.skipped + r.failed, due, 0)
    })
    .await
    .context(Down::Database)?;
    bar.finish();
    outln!("{}", serde_json::to_string(&report)?);
    Ok(if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// What `serve --check-config` prints: what would run, no secret.
fn check_config_summary(
    args: &ServeArgs,
    config: &Config,
    registry: &Registry,
    keys: &OwnKeyValues,
) -> String {
    let on = |b: bool| if b { "on" } else { "off" };
    let mut lines = vec![
        format!(
            "configuration ok: {}",
            args.config
                .as_ref()
                .map_or("(defaults, no file)".to_string(), |p| p
                    .display()
                    .to_string())
        ),
        format!(
            "registry: {} ({} workflows)",
            args.registry.display(),
            registry.keys().len()
        ),
        format!(
            "environment overrides: {}",
            match Environment::process().override_names() {
                names if names.is_empty() => "none".to_string(),
                names => names.join(", "),
            }
        ),
        format!("clients: {}", config.clients.len()),
        format!(
            "database: {}",
            if args.db.database_url.is_some() {
                format!("given (projections, HTTP API on {})", api_addr(args))
            } else {
                match args.http {
                    Some(at) => format!(
                        "none (projections, the job handler and the HTTP API are off; \
                         /livez, /readyz and /metrics on {at})"
                    ),
                    None => {
                        "none (projections, the job handler and the HTTP API are off)".to_string()
                    }
                }
            }
        ),
        format!(
            "job handler: {}",
            on(config.handler.enabled && args.db.database_url.is_some())
        ),
        format!("checkpoint signing key: {}", on(keys.checkpoint.is_some())),
        format!(
            "callback signing key: {}",
            on(keys.callback_signing.is_some())
        ),
        format!("n8n callback key: {}", on(keys.n8n.is_some())),
        format!(
            "secrets (Vault): {}",
            on(config.secrets.vault_addr.is_some())
        ),
        format!("memory: {}", on(config.memory.enabled)),
        format!(
            "traces (OTLP): {}",
            match config.telemetry.traces_url() {
                Some(url) => format!(
                    "on, OTLP/HTTP protobuf to {} as service {:?}",
                    crate::commands::redact::display(&url),
                    config.telemetry.service_name()
                ),
                None => "off (no [telemetry] otlp_endpoint, no exporter started)".to_string(),
            }
        ),
        format!(
            "web console (/console): {}; live job streams: {} per client, {} s at most",
            on(config.console.enabled),
            config.console.streams_per_client,
            config.console.stream_max_seconds
        ),
    ];
    if config.secrets.vault_addr.is_some() {
        lines.push(
            "not checked: Vault itself, and keys read from it (secrets.keys), which need a connection"
                .into(),
        );
    }
    lines.join("\n")
}

/// Where the HTTP API listens: `--http`, else 127.0.0.1:8080.
fn api_addr(args: &ServeArgs) -> std::net::SocketAddr {
    args.http
        .unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 8080)))
}

async fn serve(g: &Global, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let registry = Arc::new(Registry::load(&args.registry).context(UsageError)?);
    let env = Environment::process();
    let config = Config::load_layered(args.config.as_deref(), &env).context(UsageError)?;
    if args.max_timeout_seconds == 0 || args.max_timeout_seconds > MAX_JOB_TIMEOUT_SECONDS {
        return Err(anyhow::anyhow!(
            "--max-timeout-seconds must be 1 to {MAX_JOB_TIMEOUT_SECONDS} (30 days), got {}",
            args.max_timeout_seconds
        )
        .context(UsageError));
    }
    let mut keys = OwnKeyValues {
        checkpoint: args.key.key()?,
        callback_signing: Config::key(
            &config.callbacks.signing_key_env,
            "callbacks.signing_key_env",
        )
        .context(UsageError)?,
        n8n: config.n8n_key().context(UsageError)?,
        seal: config.seal_keys().context(UsageError)?,
    };
    if config.handler.enabled {
        HandlerConfig::from_config(&config).context(UsageError)?;
    }
    if config.secrets.vault_addr.is_none() {
        // what `Application::build` refuses without [secrets]: a step whose
        // headers read secrets (every attempt would fail)
        if let Some((workflow, step, _)) = registry.secret_steps().into_iter().next() {
            return Err(anyhow::anyhow!(
                "workflow {workflow:?}, step {:?}: its headers read secrets, and secret access is not configured ([secrets] vault_addr)",
                step.name
            )
            .context(UsageError));
        }
    }
    // the exporter starts only where spans are made (not for a check)
    let traces = match args.check_config {
        true => None,
        false => crate::telemetry::Traces::start(&config.telemetry).context(UsageError)?,
    };
    crate::logging::init(traces.as_ref()).context(UsageError)?;
    if args.check_config {
        outln!("{}", check_config_summary(&args, &config, &registry, &keys));
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(t) = &traces {
        tracing::info!(endpoint = t.endpoint(), "traces: OTLP/HTTP exporter on");
    }
    // from here a SIGHUP reloads, never stops, the process
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: the configuration cannot be reloaded");
            None
        }
    };
    let started = Started {
        config: config.clone(),
        registry_path: args.registry.clone(),
        registry_sha256: file_sha256(&args.registry),
    };
    let secrets = secrets_service(&config).await?;
    let client = connect_service(g, Duration::from_secs(args.nats_connect_wait_secs)).await?;
    let log = EventLog::open(client.clone(), log_config(g, 1, Duration::from_secs(120))).await?;
    if let Some(service) = &secrets {
        // the reads are recorded like any other secret access
        let bus = CommandBus::new(
            log.clone(),
            JobServices {
                registry: registry.clone().into(),
                max_timeout_seconds: args.max_timeout_seconds,
                callback_sealer: None,
            },
        );
        let id = &args.key.checkpoint_key_id;
        keys.read_from_vault(service, &bus, &config.secrets.keys, id)
            .await?;
    }
    let checkpoints = match (keys.checkpoint, args.checkpoint_every_secs) {
        (Some(key), secs) if secs > 0 => Some((key, Duration::from_secs(secs))),
        _ => {
            tracing::warn!(
                "no checkpoint signing key (FLOWLEDGER_CHECKPOINT_SIGNING_KEY or \
                 secrets.keys.checkpoint_signing): no signed checkpoints are written"
            );
            None
        }
    };
    let database = match &args.db.database_url {
        Some(url) => Some(DatabaseSettings {
            url: url.clone(),
            max_connections: 16,
            projections: true,
            handler: if config.handler.enabled {
                let mut h = HandlerConfig::from_config(&config).context(UsageError)?;
                h.callback_key = keys.callback_signing;
                Some(h)
            } else {
                None
            },
            http: Some(HttpSettings {
                addr: api_addr(&args),
                clients: config.clients.clone(),
                n8n_key: keys.n8n,
                callback_window_secs: config.callbacks.timestamp_window_seconds as i64,
                callback_posts_per_minute: config.callbacks.rate_limit_per_minute,
                callback_refusals_per_minute: config.callbacks.refusals_per_minute,
                console: config.console.clone(),
                cors_allowed_origins: config.http.cors_allowed_origins.clone(),
            }),
        }),
        None => {
            tracing::warn!(
                "no --database-url: projections, the job handler and the HTTP API are off"
            );
            None
        }
    };
    let settings = Settings {
        nats: client,
        log,
        registry,
        max_timeout_seconds: args.max_timeout_seconds,
        callback_sealer: keys.seal,
        intake: true,
        nats_accounts: config.nats.clone(),
        checkpoints,
        database,
        memory: memory_service(&config, secrets.as_ref()),
        secrets,
        probes: args.http,
    };
    let app = Application::build(settings).await.map_err(|e| match e {
        BuildError::Database(_) => anyhow::Error::new(e).context(Down::Database),
        BuildError::Listen { .. }
        | BuildError::Vectors(_)
        | BuildError::CommandsNotVouched
        | BuildError::StepSecretsNotConfigured { .. } => anyhow::Error::new(e).context(UsageError),
        BuildError::Subscribe(_) | BuildError::Unconfirmed(_) => {
            anyhow::Error::new(e).context(Down::Nats)
        }
    })?;
    let reloading = hangups.map(|h| {
        tokio::spawn(reload_on_hangup(
            h,
            args.config.clone(),
            started,
            app.reloader(),
        ))
    });
    let ran = app
        .run_until(
            async {
                shutdown_signal().await;
                tracing::info!("shutting down");
            },
            // a second signal while draining stops at once
            shutdown_signal(),
        )
        .await;
    if let Some(r) = reloading {
        r.abort();
    }
    // the spans of the drain are exported before the process ends
    if let Some(t) = traces {
        t.shutdown().await;
    }
    ran?;
    Ok(ExitCode::SUCCESS)
}

/// What `serve` started with, to say on a reload what needs a restart.
struct Started {
    config: Config,
    registry_path: PathBuf,
    /// `None`: the file could not be read again.
    registry_sha256: Option<[u8; 32]>,
}

/// The SHA-256 of the file at `path`, `None` when it cannot be read.
fn file_sha256(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|bytes| crate::events::chain::sha256(&bytes))
}

/// On each SIGHUP: loads the workflow registry file again when it changed
/// and, when it is valid, puts it in use ([`crate::app::Reloader::replace_registry`];
/// an invalid one is logged and the running one kept); then reads the
/// configuration again (the file at `path`, then the environment's
/// overrides) and, when the whole of it is valid, applies what changes
/// without a restart (the HTTP clients, the NATS accounts' roles),
/// logging the client ids and accounts changed; an invalid configuration
/// changes nothing and the reason is logged. Sections that need a restart
/// and changed (compared with `started`, what runs) are named in a warning.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    path: Option<PathBuf>,
    mut started: Started,
    reloader: crate::app::Reloader,
) {
    while hangups.recv().await.is_some() {
        let registry_sha256 = file_sha256(&started.registry_path);
        if registry_sha256 != started.registry_sha256 {
            let file = started.registry_path.display();
            match reloader.replace_registry(&started.registry_path) {
                Ok(Some(c)) => {
                    started.registry_sha256 = registry_sha256;
                    tracing::info!(
                        registry = %file,
                        added = ?c.added,
                        removed = ?c.removed,
                        changed = ?c.changed,
                        "SIGHUP: workflow registry reloaded"
                    );
                    if !c.removed.is_empty() {
                        tracing::warn!(
                            removed = ?c.removed,
                            "SIGHUP: workflows removed from the registry: their jobs that \
                             have not started running fail unknown_workflow"
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(
                    registry = %file,
                    "SIGHUP: workflow registry not reloaded, the running one is kept: {e}"
                ),
            }
        }
        let Some(path) = &path else {
            tracing::warn!(
                "SIGHUP: no configuration file (--config, FLOWLEDGER_CONFIG): nothing to reload"
            );
            continue;
        };
        let config = match Config::load_layered(Some(path), &Environment::process()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: configuration not reloaded, the running one is kept: {e}");
                continue;
            }
        };
        let done = reloader.apply(&config);
        match &done.clients {
            Some(c) if c.is_empty() => tracing::info!("SIGHUP: [[clients]] unchanged"),
            Some(c) => tracing::info!(
                added = ?c.added,
                removed = ?c.removed,
                changed = ?c.changed,
                "SIGHUP: [[clients]] reloaded"
            ),
            None => tracing::info!("SIGHUP: no HTTP API runs here: [[clients]] not used"),
        }
        match &done.accounts {
            Some(a) if !a.is_empty() => {
                tracing::info!(accounts = ?a, "SIGHUP: [nats] account roles reloaded")
            }
            _ => {}
        }
        let was = &started.config;
        let restart: Vec<&str> = [
            ("[handler]", config.handler != was.handler),
            ("[telemetry]", config.telemetry != was.telemetry),
            ("[callbacks]", config.callbacks != was.callbacks),
            ("[secrets]", config.secrets != was.secrets),
            ("[memory]", config.memory != was.memory),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect();
        if !restart.is_empty() {
            tracing::warn!(
                "SIGHUP: {} changed and not reloaded: they take effect at the next restart",
                restart.join(", ")
            );
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn projections(g: &Global, p: ProjectionsCommand) -> anyhow::Result<ExitCode> {
    use crate::projections::{db as pdb, ReadModel};
    let model_of = |name: &str| {
        ReadModel::from_name(name).ok_or_else(|| {
            anyhow::Error::new(pdb::DbError::UnknownProjection(name.to_string()))
                .context(UsageError)
        })
    };
    match p {
        ProjectionsCommand::Status { db, out } => {
            let pool = pdb::connect(db.require()?, 2)
                .await
                .context(Down::Database)?;
            let rows = pdb::checkpoints(&pool).await?;
            let last = match open_log(g).await {
                Ok((_c, log)) => log.last_seq().await.ok(),
                Err(_) => None,
            };
            let mut any_stopped = false;
            let items: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    let lag = last.map(|l| (l as i64 - r.last_seq).max(0));
                    let state = match (&r.state[..], r.error_seq) {
                        ("stopped", Some(seq)) => {
                            any_stopped = true;
                            format!(
                                "stopped at sequence {seq}: {}",
                                r.error.clone().unwrap_or_default()
                            )
                        }
                        (s, _) => s.to_string(),
                    };
                    json!({
                        "projection": r.name, "version": r.version, "active": r.active,
                        "checkpoint": r.last_seq, "lag": lag, "state": state,
                    })
                })
                .collect();
            output::list(
                out.format(),
                &Value::Array(items),
                &[
                    "projection",
                    "version",
                    "active",
                    "checkpoint",
                    "lag",
                    "state",
                ],
            );
            Ok(if any_stopped {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        ProjectionsCommand::Resume {
            name,
            skip,
            reason,
            by,
            db,
        } => {
            let model = model_of(&name)?;
            let pool = pdb::connect(db.require()?, 2)
                .await
                .context(Down::Database)?;
            let (_c, log) = open_log(g).await?;
            // this bus records projection operations only: no workflow is needed
            let services = JobServices {
                registry: Registry::with_keys(std::iter::empty()).into(),
                max_timeout_seconds: 1,
                callback_sealer: None,
            };
            let bus = CommandBus::new(log, services);
            let skip = skip.map(|s| (s, reason.unwrap_or_default(), by.unwrap_or_default()));
            let msg = crate::app::resume_projection(&bus, &pool, model, skip).await?;
            outln!("{msg}");
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Rebuild { name, db, config } => {
            let model = model_of(&name)?;
            let (keys, space) = if model.needs_subject_keys() {
                let (keys, space) = rebuild_keys(model, config.as_deref()).await?;
                (Some(keys), space)
            } else {
                (None, None)
            };
            let pool = pdb::connect(db.require()?, 4)
                .await
                .context(Down::Database)?;
            let (_c, log) = open_log(g).await?;
            let report =
                crate::projections::rebuild::rebuild_in_space(&pool, &log, model, keys, space)
                    .await?;
            print_json(&serde_json::to_value(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn audit(g: &Global, a: AuditCommand) -> anyhow::Result<ExitCode> {
    match a {
        AuditCommand::Replay {
            filter: f,
            output: format,
        } => {
            let filter = f.filter()?;
            let (_client, log) = open_log(g).await?;
            let n = match format.unwrap_or(output::Format::Jsonl) {
                output::Format::Jsonl => {
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    let n = read::replay(&log, &filter, &mut out).await?;
                    std::io::Write::flush(&mut out).map_err(read::OutputError::Io)?;
                    n
                }
                format => {
                    // the whole replay first: one document, or a table
                    // whose columns fit every row
                    let mut buf = Vec::new();
                    let n = read::replay(&log, &filter, &mut buf).await?;
                    let events = buf
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.is_empty())
                        .map(serde_json::from_slice::<Value>)
                        .collect::<Result<Vec<_>, _>>()
                        .context("a replayed line is not JSON")?;
                    let columns = [
                        "stream_seq",
                        "stream_time",
                        "aggregate_type",
                        "aggregate_id",
                        "event_type",
                    ];
                    output::list(format, &Value::Array(events), &columns);
                    n
                }
            };
            eprintln!("flowledger: replayed {n} events");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Digest => {
            let (_client, log) = open_log(g).await?;
            let d = checkpoint::stream_digest(&log, None, None).await?;
            outln!("{d}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checkpoint { seq, key } => {
            let key = key.key()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "a checkpoint signing key is needed: set FLOWLEDGER_CHECKPOINT_SIGNING_KEY"
                )
                .context(UsageError)
            })?;
            let (client, log) = open_log(g).await?;
            match checkpoint::checkpoint_at(&client, &log, &key, seq).await? {
                Some((cp, new)) => {
                    if !new {
                        eprintln!("flowledger: already signed there by this key");
                    }
                    print_json(&serde_json::to_value(&cp)?)
                }
                None => eprintln!("flowledger: the stream is empty: nothing to sign"),
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Keygen { key_id, seed_out } => {
            let (key, seed) = CheckpointKey::generate(&key_id)
                .map_err(|e| anyhow::Error::new(e).context(UsageError))?;
            write_secret_file(&seed_out, &seed)?;
            eprintln!(
                "flowledger: seed written to {}; give it to serve as FLOWLEDGER_CHECKPOINT_SIGNING_KEY \
                 (with FLOWLEDGER_CHECKPOINT_KEY_ID={key_id}) and add the entry below to every \
                 verifier's key ring",
                seed_out.display()
            );
            print_json(&key.ring_entry());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { out, filter, key } => {
            let filter = filter.export_filter()?;
            let key = key.key()?;
            let (client, log) = open_log(g).await?;
            let mut progress = |seq: u64, to: u64| eprintln!("flowledger: export at {seq}/{to}");
            let m =
                export::export(&client, &log, &filter, &out, key.as_ref(), &mut progress).await?;
            if key.is_none() {
                eprintln!(
                    "flowledger: warning: no signing key: the manifest is not signed and the \
                     export ends at the newest stored checkpoint ({}); verifiers need \
                     --allow-unsigned for what no signature covers",
                    m.to_seq
                );
            }
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
            to_seq,
            allow_unsigned,
            ring,
        } => {
            let options = verify::Options {
                ring: ring.ring()?,
                expect: digest
                    .map(|d| {
                        d.parse::<Digest>()
                            .map_err(|e| anyhow::anyhow!(e).context(UsageError))
                    })
                    .transpose()?,
                allow_unsigned,
            };
            let result = match export {
                Some(dir) => verify::verify_export(&dir, &options),
                None => {
                    let (client, log) = open_log(g).await?;
                    verify::verify_live(&client, &log, to_seq, &options).await
                }
            };
            match result {
                Ok(summary) => {
                    eprintln!("flowledger: {}", summary.sentence());
                    print_json(&serde_json::to_value(&summary)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(VerifyError::Broken(b)) => {
                    eprintln!("flowledger: {}", b.sentence());
                    print_json(&json!({"ok": false, "seq": b.seq, "reason": b.reason}));
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(args: &[&str]) -> NatsAuth {
        let mut argv = vec!["flowledger"];
        argv.extend_from_slice(args);
        argv.push("audit");
        argv.push("digest");
        Cli::try_parse_from(argv).expect("parses").global.nats_auth
    }

    async fn refused(a: &NatsAuth) -> String {
        let e = a.options().await.expect_err("refused");
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e:#}");
        format!("{e:#}")
    }

    #[tokio::test]
    async fn one_credential_at_most_and_a_user_needs_a_password() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let seed = dir.path().join("user.nk");
        std::fs::write(
            &seed,
            "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\n",
        )
        .expect("write");
        let seed = seed.to_str().expect("utf-8");
        let m = refused(&auth(&["--nkey", seed, "--user", "u", "--password", "p"])).await;
        assert!(m.contains("--nkey and --user"), "{m}");
        let m = refused(&auth(&["--user", "u"])).await;
        assert!(m.contains("--password"), "{m}");
        let m = refused(&auth(&["--password", "s3cret-pw"])).await;
        assert!(m.contains("--user") && !m.contains("s3cret-pw"), "{m}");
        auth(&["--nkey", seed])
            .options()
            .await
            .expect("a seed file");
        auth(&["--user", "u", "--password", "p"])
            .options()
            .await
            .expect("a user and password");
    }

    #[tokio::test]
    async fn errors_name_the_file_never_its_secret() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let not_a_seed = dir.path().join("bad.nk");
        std::fs::write(&not_a_seed, "topsecret-value\n").expect("write");
        let m = refused(&auth(&["--nkey", not_a_seed.to_str().expect("utf-8")])).await;
        assert!(m.contains("bad.nk") && !m.contains("topsecret"), "{m}");
        let creds = dir.path().join("bad.creds");
        std::fs::write(&creds, "topsecret-value\n").expect("write");
        let m = refused(&auth(&["--creds", creds.to_str().expect("utf-8")])).await;
        assert!(m.contains("bad.creds") && !m.contains("topsecret"), "{m}");
        let m = refused(&auth(&["--nkey", "/nonexistent/x.nk"])).await;
        assert!(m.contains("/nonexistent/x.nk"), "{m}");
        let m = refused(&auth(&["--tlscacert", "/nonexistent/ca.pem"])).await;
        assert!(m.contains("--tlscacert"), "{m}");
        let m = refused(&auth(&[
            "--user",
            "u",
            "--password",
            "p",
            "--inbox-prefix",
            "a.>",
        ]))
        .await;
        assert!(m.contains("--inbox-prefix"), "{m}");
    }

    #[test]
    fn a_password_is_never_shown_by_debug() {
        let a = auth(&["--user", "u", "--password", "s3cret-pw"]);
        let shown = format!("{a:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
    }

    #[tokio::test]
    async fn a_memory_rebuild_without_memory_configured_is_refused_clearly() {
        use crate::projections::ReadModel;
        let refused = |r: anyhow::Result<_>| {
            let e = r.expect_err("refused");
            assert!(e.downcast_ref::<UsageError>().is_some(), "{e:#}");
            format!("{e:#}")
        };
        let m = refused(rebuild_keys(ReadModel::Memory, None).await);
        assert!(
            m.contains("cannot rebuild memory") && m.contains("[memory]"),
            "{m}"
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("flowledger.toml");
        std::fs::write(&path, "[memory]\nenabled = false\n").expect("write");
        let m = refused(rebuild_keys(ReadModel::Memory, Some(&path)).await);
        assert!(m.contains("does not enable [memory]"), "{m}");
        // and the other read models are parsed without a configuration
        let cli =
            Cli::try_parse_from(["flowledger", "projections", "rebuild", "audit"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Projections(ProjectionsCommand::Rebuild { config: None, .. })
        ));
    }
}
