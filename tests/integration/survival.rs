//! `serve` outlives its dependencies: it waits for NATS at start, rides
//! through a nats-server restart, and exits non-zero with the reason when
//! it gives up (issue 12, item 2).

use std::time::{Duration, Instant};

use flowledger::events::log::{self, LogConfig};
use serde_json::{json, Value};

use crate::helpers::*;

fn serve(nats: &NatsServer, extra: &[&str]) -> std::process::Child {
    nats.cli(Who::Service)
        .args(["serve", "--checkpoint-every-secs", "0"])
        .args(extra)
        .env_remove("DATABASE_URL")
        .env_remove("FLOWLEDGER_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start flowledger serve")
}

/// Submits job `id` as a client until the intake answers (a fresh
/// connection each try: the test's own client need not survive restarts).
async fn submitted(nats: &NatsServer, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = json!({"job_id": id, "workflow_key": "invoice.extract", "client_id": "billing"});
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(2),
            nats.options(Who::Billing).connect(&nats.url),
        )
        .await
        {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.request("flow.cmd.job.submit", body.to_string().into()),
            )
            .await;
            if let Ok(Ok(m)) = r {
                return serde_json::from_slice(&m.payload).expect("replies are JSON");
            }
        }
        assert!(Instant::now() < deadline, "no answer to {id} within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn still_running(child: &mut std::process::Child, what: &str) {
    if let Some(status) = child.try_wait().expect("poll serve") {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("serve exited {what}: {status}\n{err}");
    }
}

#[tokio::test]
async fn serve_waits_for_nats_and_rides_through_a_restart() {
    let mut nats = NatsServer::start();
    {
        let c = nats.connect(Who::Service).await;
        log::init(&c, &LogConfig::default())
            .await
            .expect("init streams");
    }
    // NATS down at start: serve keeps trying
    nats.kill();
    let mut child = serve(&nats, &["--registry", "workflows/registry.json"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    still_running(&mut child, "while NATS was down at its start");
    nats.start_again();
    let r = submitted(&nats, "survive-1").await;
    assert_eq!(r["ok"], json!(true), "{r}");
    // a restart of nats-server while serving
    nats.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    still_running(&mut child, "while nats-server was restarting");
    nats.start_again();
    let r = submitted(&nats, "survive-2").await;
    assert_eq!(r["ok"], json!(true), "{r}");
    // told to stop: exit 0
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test]
async fn serve_gives_up_on_nats_as_configured_and_says_why() {
    let mut nats = NatsServer::start();
    nats.kill();
    let child = serve(
        &nats,
        &[
            "--registry",
            "workflows/registry.json",
            "--nats-connect-wait-secs",
            "1",
        ],
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "unreachable: exit 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gave up after 1 s"), "{err}");
    assert!(err.contains("cannot connect to NATS"), "{err}");
}

/// A service with the job handler and the HTTP API on `database_url`.
async fn handler_with_health(
    app: &TestApp,
    database_url: &str,
) -> (flowledger::app::Application, String) {
    use flowledger::app::{Application, DatabaseSettings, HttpSettings};
    let mut s = settings(app, registry());
    s.database = Some(DatabaseSettings {
        url: database_url.to_string(),
        max_connections: 5,
        projections: false,
        handler: Some(test_handler_config()),
        http: Some(HttpSettings {
            addr: "127.0.0.1:0".parse().expect("an address"),
            clients: test_clients(),
            n8n_key: None,
            callback_window_secs: 300,
            callback_posts_per_minute: 100,
            callback_refusals_per_minute: 10,
            console: Default::default(),
            cors_allowed_origins: vec![],
        }),
    });
    let service = Application::build(s).await.expect("build the service");
    let http = format!(
        "http://{}/healthz",
        service.http_addr().expect("the API listens")
    );
    (service, http)
}

async fn health(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("GET /healthz");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}

#[tokio::test]
async fn healthz_reports_the_handler_and_an_unreachable_nats() {
    let mut app = spawn_app().await;
    let db = fresh_database().await;
    let (_first, first) = handler_with_health(&app, &db).await;
    let (_second, second) = handler_with_health(&app, &db).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (health(&first).await.1, health(&second).await.1);
        let states = [
            a["handler"]["state"].as_str().unwrap_or("").to_string(),
            b["handler"]["state"].as_str().unwrap_or("").to_string(),
        ];
        // both drive jobs: they share the 32 partitions
        let held = |v: &Value| {
            v["handler"]["reason"]
                .as_str()
                .and_then(|r| r.strip_prefix("holds "))
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        };
        if states == ["running", "running"] && held(&a) + held(&b) == 32 {
            assert_eq!(
                (a["ok"].clone(), b["ok"].clone()),
                (json!(true), json!(true))
            );
            let ready = health(&first.replace("/healthz", "/readyz")).await;
            assert_eq!(ready.0, 200, "{}", ready.1);
            break;
        }
        assert!(Instant::now() < deadline, "handler states: {a} {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // NATS gone: both say so, with 503
    app.nats.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = health(&first).await;
        if status == 503 {
            assert_eq!(body["nats"], "unreachable", "{body}");
            assert_eq!(body["ok"], false);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy without NATS: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // not ready to take commands, yet alive: a liveness probe leaves it be
    let (status, body) = health(&first.replace("/healthz", "/readyz")).await;
    assert_eq!((status, body["ok"].clone()), (503, json!(false)), "{body}");
    assert_ne!(body["nats"], "ok", "{body}");
    let (status, body) = health(&first.replace("/healthz", "/livez")).await;
    assert_eq!((status, body["ok"].clone()), (200, json!(true)), "{body}");
}

#[tokio::test]
async fn several_nats_urls_are_taken_as_the_nats_cli_takes_them() {
    let app = spawn_app().await;
    app.submit("multi-url", "multi-url").await;
    let urls = format!("nats://127.0.0.1:1, {}", app.nats.url);
    let out = app
        .nats
        .cli(Who::Service)
        .args(["audit", "digest"])
        .env("FLOWLEDGER_NATS_URL", &urls)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1:"));
    let bad = app
        .nats
        .cli(Who::Service)
        .args(["audit", "digest"])
        .env(
            "FLOWLEDGER_NATS_URL",
            "nats://u:s3cret@127.0.0.1:4222,nats://[bad",
        )
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("[bad") && !err.contains("s3cret"), "{err}");
}

#[tokio::test]
async fn a_command_waits_through_a_short_nats_outage_instead_of_failing() {
    let mut app = spawn_app().await;
    app.submit("before-outage", "before-outage").await;
    app.nats.kill();
    let bus = app.bus.clone();
    let pending = tokio::spawn(async move {
        let body = json!({"job_id": "during-outage", "workflow_key": "invoice.extract",
                          "client_id": "billing"});
        reply(
            handle(
                &bus,
                &client("billing"),
                "flow.cmd.job.submit",
                body.to_string().as_bytes(),
            )
            .await,
        )
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!pending.is_finished(), "the command waits for the stream");
    app.nats.start_again();
    let answer = pending.await.unwrap();
    assert_eq!(answer["ok"], json!(true), "{answer}");
    assert_eq!(app.last_seq().await, 2, "stored once");
}

#[tokio::test]
async fn serve_without_a_database_answers_its_probes_and_metrics() {
    let mut nats = NatsServer::start();
    let service = nats.connect(Who::Service).await;
    log::init(&service, &LogConfig::default())
        .await
        .expect("init streams");
    let mut cmd = nats.cli(Who::Service);
    cmd.args([
        "serve",
        "--checkpoint-every-secs",
        "0",
        "--http",
        "127.0.0.1:0",
    ])
    .env_remove("DATABASE_URL")
    .env_remove("FLOWLEDGER_CONFIG");
    let serve = Serve::spawn(cmd);
    let url = serve.http().await;
    let get = |path: &str| {
        let url = format!("{url}{path}");
        async move {
            let r = reqwest::get(&url).await.expect("GET");
            let status = r.status().as_u16();
            (status, r.text().await.expect("a body"))
        }
    };
    assert_eq!(get("/livez").await.0, 200);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["nats"], "ok", "{ready}");
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# HELP flowledger_build_info"),
        "{metrics}"
    );
    crate::projections::promtool_accepts(&metrics);
    // nothing else here: the error envelope says why
    let (status, body) = get("/v1/jobs").await;
    assert_eq!(status, 404, "{body}");
    let refused: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(refused["error"]["code"], "not_found", "{refused}");
    // here too every answer has its request id, quoted by the envelope
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/jobs"))
        .header("x-request-id", "probe-check-1")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.headers()["x-request-id"], "probe-check-1");
    let refused: Value = r.json().await.expect("JSON");
    assert_eq!(refused["error"]["request_id"], "probe-check-1", "{refused}");
    let r = reqwest::get(format!("{url}/livez")).await.expect("GET");
    assert!(
        r.headers().get("x-request-id").is_some(),
        "{:?}",
        r.headers()
    );
    // NATS gone: not ready, and still alive
    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get("/readyz").await;
        if status == 503 {
            let ready: Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(ready["nats"], "disconnected", "{ready}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready without NATS: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get("/livez").await.0, 200);
}
