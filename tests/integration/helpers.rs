//! The test harness: real servers on dynamic ports, typed helpers.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowledger::api::intake::{Intake, ReplyError};
use flowledger::commands::job::JobServices;
use flowledger::events::log::{self, EventLog, LogConfig};
use flowledger::events::store::Receipt;
use flowledger::registry::Registry;
use serde_json::{json, Value};
use tempfile::TempDir;

/// A nats-server with JetStream in a temporary directory; killed and
/// deleted on drop.
pub struct NatsServer {
    child: Child,
    pub url: String,
    _dir: TempDir,
}

pub fn nats_binary() -> String {
    std::env::var("FLOWLEDGER_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

impl NatsServer {
    /// Starts nats-server on a port it picks itself (`-p -1`) and reads the
    /// port from its ports file: no race with other tests for a port.
    pub fn start() -> Self {
        let bin = nats_binary();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(dir.path().join("store"))
            .arg("--ports_file_dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e} (run scripts/install-deps.sh, or set FLOWLEDGER_NATS_SERVER)"));
        let ports_file = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(url) = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["nats"][0].as_str().map(str::to_string))
            {
                return NatsServer {
                    child,
                    url,
                    _dir: dir,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{bin} exited at start: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{bin} did not start within 10 s");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TestApp {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub config: LogConfig,
    pub log: EventLog,
    pub intake: Arc<Intake>,
}

pub fn registry() -> Arc<Registry> {
    Arc::new(Registry::with_keys(["invoice.extract", "report.daily"]))
}

pub fn services() -> JobServices {
    JobServices {
        registry: registry(),
        max_timeout_seconds: 3600,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(LogConfig::default()).await
}

pub async fn spawn_app_with(config: LogConfig) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
    let nats = NatsServer::start();
    let client = async_nats::connect(&nats.url)
        .await
        .expect("connect to the test nats-server");
    log::init(&client, &config).await.expect("init streams");
    let log = EventLog::open(client.clone(), config.clone())
        .await
        .expect("open the log");
    let intake = Arc::new(Intake::new(log.clone(), services()));
    tokio::spawn(intake.clone().serve(client.clone()));
    // the intake subscribes asynchronously; wait until it answers
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let r = client.request("flow.cmd.job.start", "{\"job_id\":\"warmup\"}".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), r).await {
            break;
        }
    }
    TestApp {
        nats,
        client,
        config,
        log,
        intake,
    }
}

impl TestApp {
    /// A second, independent command service on the same server (its own cache).
    pub async fn second_intake(&self) -> Intake {
        let log = EventLog::open(self.client.clone(), self.config.clone())
            .await
            .expect("open the log");
        Intake::new(log, services())
    }

    /// Sends a command over NATS request/reply and returns the JSON reply.
    pub async fn send(&self, command: &str, body: Value) -> Value {
        let reply = self
            .client
            .request(format!("flow.cmd.{command}"), body.to_string().into())
            .await
            .expect("a reply from the intake");
        serde_json::from_slice(&reply.payload).expect("replies are JSON")
    }

    pub async fn submit(&self, job_id: &str, command_id: &str) -> Value {
        self.send(
            "job.submit",
            json!({"job_id": job_id, "command_id": command_id, "workflow_key": "invoice.extract", "client_id": "billing", "input": {"n": 1}}),
        )
        .await
    }

    pub async fn last_seq(&self) -> u64 {
        self.log.last_seq().await.expect("stream info")
    }

    /// Number of messages on one aggregate's subject.
    pub async fn messages_on(&self, subject: &str) -> usize {
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

pub fn code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("<ok>")
}

pub fn ok(r: Result<Arc<Receipt>, ReplyError>) -> Arc<Receipt> {
    r.unwrap_or_else(|e| panic!("command refused: {:?}: {}", e.code, e.message))
}
