//! `serve` told to stop (SIGTERM) drains first: it takes no new work, lets
//! the step calls in flight end and be recorded within
//! `handler.drain_grace_seconds`, then stops and exits 0. A step longer than
//! the grace period is stopped unrecorded and the next instance sends it
//! again with the same `Idempotency-Key`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

/// A registry of workflow `w` with the one solver step `slow` at `url`,
/// and a configuration with `drain_grace_seconds` and billing's token.
fn files(dir: &Path, url: &str, grace: u64) -> (PathBuf, PathBuf) {
    let registry = dir.join("registry.json");
    std::fs::write(
        &registry,
        one_workflow(json!([solver("slow", url, 30_000, 1)]), json!({})).to_string(),
    )
    .unwrap();
    let config = dir.join("flowledger.toml");
    let token = hex::encode(flowledger::events::chain::sha256(BILLING_TOKEN.as_bytes()));
    std::fs::write(
        &config,
        format!(
            "[handler]\ndrain_grace_seconds = {grace}\n\n\
             [[clients]]\nid = \"billing\"\ntoken_sha256 = \"{token}\"\n"
        ),
    )
    .unwrap();
    (registry, config)
}

/// Submits job `id` over NATS until the intake takes it.
async fn submit(app: &TestApp, id: &str) {
    let body = json!({"job_id": id, "workflow_key": "w", "client_id": "billing"});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app
            .nats_as(Who::Billing)
            .request("flow.cmd.job.submit", body.to_string().into())
            .await;
        if let Ok(m) = r {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["ok"] == true {
                return;
            }
        }
        assert!(Instant::now() < deadline, "serve did not take job {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the peer received `n` calls on `path`.
async fn called(peer: &Peer, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.received(path).len() < n {
        assert!(
            Instant::now() < deadline,
            "the peer got {} calls on {path}, not {n}",
            peer.received(path).len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The event types of `job_id` in the log, with the step results' status.
async fn job_events(app: &TestApp, job_id: &str) -> Vec<(String, Value)> {
    log_events(app)
        .await
        .into_iter()
        .filter(|r| r.aggregate_id == job_id)
        .map(|r| (r.event_type, r.data))
        .collect()
}

#[tokio::test]
async fn sigterm_lets_the_step_in_flight_finish_and_be_recorded_then_exits_0() {
    let app = spawn_app().await;
    let db = fresh_database().await;
    let peer = Peer::start().await;
    let slow = peer.script("/slow", vec![peers::ok(4_000, json!({"total": 7}))]);
    let dir = tempfile::tempdir().unwrap();
    let (registry, config) = files(dir.path(), &slow, 30);
    let mut serve = Serve::start(&app, &db, &registry, &config);
    let http = serve.http().await;
    submit(&app, "drain-1").await;
    called(&peer, "/slow", 1).await;
    serve.term();

    // while it drains: not ready, no new job over HTTP, none taken over NATS
    serve
        .logged("draining: 1 step calls in flight, grace 30 s")
        .await;
    let client = reqwest::Client::new();
    let health = client.get(format!("{http}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["draining"], json!(true), "{body}");
    assert_eq!(body["handler"]["state"], "draining", "{body}");
    let ready = client.get(format!("{http}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(
        (body["draining"].clone(), body["nats"].clone()),
        (json!(true), json!("ok")),
        "{body}"
    );
    let live = client.get(format!("{http}/livez")).send().await.unwrap();
    assert_eq!(live.status().as_u16(), 200);
    let refused = client
        .post(format!("{http}/v1/jobs"))
        .bearer_auth(BILLING_TOKEN)
        .json(&json!({"job_id": "drain-late-http", "workflow_key": "w"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("draining")),
        "{body}"
    );
    serve
        .logged("the command intake takes no new command")
        .await;

    let status = serve.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", serve.log());
    let events = job_events(&app, "drain-1").await;
    let results: Vec<&Value> = events
        .iter()
        .filter(|(t, _)| t == "StepResultRecorded")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0]["step"], "slow");
    assert_eq!(results[0]["status"], "succeeded", "{events:?}");
    assert!(
        events.iter().any(|(t, _)| t == "JobCompleted"),
        "{events:?}"
    );
    assert_eq!(peer.received("/slow").len(), 1, "called exactly once");
    assert!(
        job_events(&app, "drain-late-http").await.is_empty(),
        "a job refused while draining was taken"
    );
    let log = serve.log();
    assert!(
        log.contains("drained: 1 jobs finished their step calls, none abandoned"),
        "{log}"
    );
}

#[tokio::test]
async fn a_step_longer_than_the_grace_is_stopped_unrecorded_and_sent_again_after_a_restart() {
    let app = spawn_app().await;
    let db = fresh_database().await;
    let peer = Peer::start().await;
    // the first call outlasts the grace period; the one sent again answers
    let slow = peer.script(
        "/slow",
        vec![
            peers::ok(10_000, json!("late")),
            peers::ok(100, json!("done")),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let (registry, config) = files(dir.path(), &slow, 1);
    let mut first = Serve::start(&app, &db, &registry, &config);
    submit(&app, "drain-2").await;
    called(&peer, "/slow", 1).await;
    first.term();
    let status = first.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", first.log());
    let events = job_events(&app, "drain-2").await;
    assert!(
        !events.iter().any(|(t, _)| t == "StepResultRecorded"),
        "the abandoned call's result was recorded: {events:?}"
    );
    let log = first.log();
    assert!(
        log.contains("0 jobs finished their step calls, 1 abandoned") && log.contains("drain-2"),
        "{log}"
    );

    let second = Serve::start(&app, &db, &registry, &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = job_events(&app, "drain-2").await;
        if events.iter().any(|(t, _)| t == "JobCompleted") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted serve did not finish the job: {events:?}\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Vec<String> = peer
        .received("/slow")
        .iter()
        .map(|r| r.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys, vec!["drain-2:slow:1".to_string(); 2]);
    let events = job_events(&app, "drain-2").await;
    let results: Vec<&Value> = events
        .iter()
        .filter(|(t, _)| t == "StepResultRecorded")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0]["output"], json!("done"));
}

/// `serve` alone on a NATS server of its own (a [`TestApp`] brings an
/// intake of its own, and a command must find serve's or none), with the
/// registry of [`files`] and a 30 s grace; without `database`, `serve`
/// runs its intake only (no handler, no projections, no HTTP API).
struct Lone {
    _nats: NatsServer,
    events: flowledger::events::log::EventLog,
    serve: Serve,
    billing: async_nats::Client,
}

impl Lone {
    async fn start(dir: &Path, url: &str, database: bool) -> Lone {
        use flowledger::events::log::{self, EventLog, LogConfig};
        let nats = NatsServer::start();
        let service = nats.connect(Who::Service).await;
        log::init(&service, &LogConfig::default())
            .await
            .expect("init streams");
        let events = EventLog::open(service, LogConfig::default())
            .await
            .expect("open the log");
        let (registry, config) = files(dir, url, 30);
        let db = if database {
            Some(fresh_database().await)
        } else {
            None
        };
        let cmd = serve_command_on(&nats, db.as_deref(), &registry, Some(&config));
        let serve = Serve::spawn(cmd);
        let billing = nats.connect(Who::Billing).await;
        Lone {
            _nats: nats,
            events,
            serve,
            billing,
        }
    }
}

/// (aggregate id, event type) of every event in `events`.
async fn stored(events: &flowledger::events::log::EventLog) -> Vec<(String, String)> {
    let mut stored = Vec::new();
    for seq in 1..=events.last_seq().await.expect("last sequence") {
        if let Some(m) = events.get(seq).await.expect("read the log") {
            for (_, r) in flowledger::events::envelope::decode_commit(&m.payload).expect("a commit")
            {
                stored.push((r.aggregate_id, r.event_type));
            }
        }
    }
    stored
}

/// Sends the submission of job `id` (workflow `w`) once as `billing`;
/// `None`: no answer within `wait`.
async fn submit_once(
    billing: &async_nats::Client,
    id: &str,
    wait: Duration,
) -> Option<Result<async_nats::Message, async_nats::RequestError>> {
    let body = json!({"job_id": id, "workflow_key": "w", "client_id": "billing"});
    tokio::time::timeout(
        wait,
        billing.request("flow.cmd.job.submit", body.to_string().into()),
    )
    .await
    .ok()
}

/// Submits job `id` until the intake takes it (30 s at most).
async fn submit_until_taken(billing: &async_nats::Client, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(Ok(m)) = submit_once(billing, id, Duration::from_secs(2)).await {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            if v["ok"] == true {
                return;
            }
        }
        assert!(Instant::now() < deadline, "serve did not take {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_command_delivered_before_the_drain_is_answered_before_the_exit() {
    // no handler runs: the step is never called
    let dir = tempfile::tempdir().unwrap();
    let Lone {
        _nats,
        events,
        mut serve,
        billing,
    } = Lone::start(dir.path(), "http://127.0.0.1:9/never", false).await;
    submit_until_taken(&billing, "burst-first").await;
    // a burst, and the stop while the intake works through it
    let n = 1000;
    let before = events.last_seq().await.expect("last sequence");
    let burst = tokio::spawn(futures::future::join_all((0..n).map(|i| {
        let (billing, id) = (billing.clone(), format!("burst-{i}"));
        async move {
            let r = submit_once(&billing, &id, Duration::from_secs(10)).await;
            (id, r)
        }
    })));
    // the stop once the intake has stored the burst's first commands
    while events.last_seq().await.expect("last sequence") == before {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    serve.term();
    let answers = burst.await.unwrap();
    let status = serve.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", serve.log());
    let mut acked = Vec::new();
    for (id, r) in answers {
        // the others: no intake left, refused at once or (across the
        // accounts' import) no answer; either way the sender sends it again
        if let Some(Ok(m)) = r {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["ok"], true, "{id}: {v}");
            acked.push(id);
        }
    }
    let stored = stored(&events).await;
    let submitted: Vec<&String> = stored
        .iter()
        .filter(|(a, t)| a.starts_with("burst-") && a != "burst-first" && t == "JobSubmitted")
        .map(|(a, _)| a)
        .collect();
    // a command stored is a command answered: the intake's tasks and the
    // replies in the client's buffer outlive the drain
    let unanswered: Vec<_> = submitted.iter().filter(|id| !acked.contains(id)).collect();
    assert_eq!(
        unanswered,
        Vec::<&&String>::new(),
        "stored, but the sender got no answer before serve exited"
    );
    assert!(!acked.is_empty(), "the stop came before any command");
    for id in &acked {
        let times = submitted.iter().filter(|a| *a == &id).count();
        assert_eq!(times, 1, "{id} was acknowledged; stored {times} times");
    }
    eprintln!(
        "{} of {n} acknowledged before the exit, the rest refused at once",
        acked.len()
    );
}

#[tokio::test]
async fn a_draining_intake_leaves_new_commands_to_the_other_instances() {
    let peer = Peer::start().await;
    let slow = peer.script("/slow", vec![peers::ok(4_000, json!("slow"))]);
    let dir = tempfile::tempdir().unwrap();
    let Lone {
        _nats,
        events,
        mut serve,
        billing,
    } = Lone::start(dir.path(), &slow, true).await;
    submit_until_taken(&billing, "drain-3").await;
    called(&peer, "/slow", 1).await;
    serve.term();
    serve
        .logged("the command intake takes no new command")
        .await;
    // the queue group has no member left: nobody answers
    let answer = submit_once(&billing, "drain-late", Duration::from_secs(2)).await;
    assert!(
        !matches!(answer, Some(Ok(_))),
        "a draining intake answered a new command"
    );
    let status = serve.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", serve.log());
    let stored = stored(&events).await;
    assert!(
        !stored.iter().any(|(id, _)| id == "drain-late"),
        "a command sent while draining was taken: {stored:?}"
    );
    // the job in flight still ended, recorded before the exit
    assert!(
        stored.contains(&("drain-3".to_string(), "JobCompleted".to_string())),
        "{stored:?}"
    );
}

#[tokio::test]
async fn a_retry_wait_does_not_hold_the_drain_but_the_other_step_in_flight_is_recorded() {
    let app = spawn_app().await;
    let db = fresh_database().await;
    let peer = Peer::start().await;
    let slow = peer.script("/slow", vec![peers::ok(3_000, json!("slow"))]);
    // fails at once, retried only after a long backoff
    let flaky = peer.script(
        "/flaky",
        vec![peers::status(5, 503), peers::ok(5, json!("ok"))],
    );
    let dir = tempfile::tempdir().unwrap();
    let (registry, config) = files(dir.path(), &slow, 30);
    let mut retried = solver("flaky", &flaky, 30_000, 2);
    retried["backoff_ms"] = json!(600_000);
    std::fs::write(
        &registry,
        one_workflow(
            json!([solver("slow", &slow, 30_000, 1), retried]),
            json!({}),
        )
        .to_string(),
    )
    .unwrap();
    let mut serve = Serve::start(&app, &db, &registry, &config);
    submit(&app, "drain-4").await;
    called(&peer, "/slow", 1).await;
    // the failed attempt is recorded with its retry: flaky waits
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = job_events(&app, "drain-4").await;
        let waiting = events.iter().any(|(t, d)| {
            t == "StepResultRecorded" && d["step"] == "flaky" && d["status"] == "failed"
        });
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "flaky's failure: {events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve.term();
    let status = serve.exited(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", serve.log());
    let events = job_events(&app, "drain-4").await;
    let slow_results: Vec<&Value> = events
        .iter()
        .filter(|(t, d)| t == "StepResultRecorded" && d["step"] == "slow")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(slow_results.len(), 1, "{events:?}");
    assert_eq!(slow_results[0]["status"], "succeeded");
    assert!(
        !events
            .iter()
            .any(|(t, _)| t == "JobCompleted" || t == "JobFailed"),
        "the job ends after flaky's retry, elsewhere: {events:?}"
    );
    assert_eq!(peer.received("/slow").len(), 1);
    assert_eq!(
        peer.received("/flaky").len(),
        1,
        "no new attempt while draining"
    );
    let log = serve.log();
    assert!(
        log.contains("drained: 1 jobs finished their step calls, none abandoned"),
        "{log}"
    );
}
