//! The fault suite (issue 12, item 7): real `serve` processes under load
//! while what they depend on, or they themselves, die. `serve` SIGKILLed
//! again and again; nats-server SIGKILLed (in strict durability mode where
//! the server knows it) and restarted; three instances losing two; `serve`
//! on a 3-node cluster losing its stream leader. Each test then checks from
//! the log (tests/integration/fault_checks.rs): every acknowledged command
//! stored once, every job ended exactly once, no step succeeded twice, no
//! attempt recorded twice, a request sent again only after its sender died
//! and then identical; the read models equal a rebuild and `audit verify`
//! passes. The counts are in docs/RELIABILITY.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster_harness::{NatsCluster, NODES};
use crate::fault_checks::*;
use crate::helpers::*;
use crate::peers::{self, Peer};

/// The workflow the fault tests' jobs run.
const WORKFLOW: &str = "invoice.extract";

/// The key `serve` signs result callbacks with.
const CALLBACK_KEY: &str = "fault-suite-callback-key-0123";

/// What the `serve` processes of a test share: a database, a registry of
/// workflow [`WORKFLOW`] (one solver step `s` on the peer, 2 attempts, every fifth
/// call answered 503 first so retries happen under the faults), a
/// configuration with a 1 s drain grace, and the peer that plays the
/// solver and the callback receiver.
struct Fleet {
    db: String,
    registry: PathBuf,
    config: PathBuf,
    peer: Peer,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(jobs: usize) -> Fleet {
        let peer = Peer::start().await;
        let replies = (0..2 * jobs)
            .map(|i| {
                if i % 5 == 0 {
                    peers::status(10, 503)
                } else {
                    peers::ok(60, json!("done"))
                }
            })
            .collect();
        let step = peer.script("/s", replies);
        peer.script("/cb", vec![peers::ok(0, json!({}))]);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let registry = dir.path().join("registry.json");
        let mut s = solver("s", &step, 5_000, 2);
        s["backoff_ms"] = json!(50);
        // the workflow key the test's own intake knows too (it answers a
        // share of the submissions)
        let workflows = json!({"version": 1, "workflows": {WORKFLOW: {"steps": [s]}}});
        std::fs::write(&registry, workflows.to_string()).expect("write the registry");
        let config = dir.path().join("flowledger.toml");
        std::fs::write(&config, "[handler]\ndrain_grace_seconds = 1\n").expect("write the config");
        Fleet {
            db: fresh_database().await,
            registry,
            config,
            peer,
            _dir: dir,
        }
    }

    /// A `serve` process of this fleet on `app`'s NATS.
    fn serve<N: Broker>(&self, app: &TestApp<N>) -> Serve {
        let mut cmd = serve_command(app, &self.db, &self.registry, Some(&self.config));
        cmd.env("FLOWLEDGER_CALLBACK_KEY", CALLBACK_KEY);
        Serve::spawn(cmd)
    }

    /// Waits until the `n` jobs `<prefix>i` ended and were called back;
    /// when they do not within 240 s, fails with the tail of each `serve`'s
    /// log.
    async fn all_done<N>(
        &self,
        app: &TestApp<N>,
        prefix: &str,
        n: usize,
        serves: &[&Serve],
    ) -> Facts {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let facts = Facts::read(app, prefix).await;
            if facts.ended.len() >= n && facts.called_back.len() >= n {
                return facts;
            }
            if Instant::now() > deadline {
                // the whole logs kept for a look, their ends shown
                let mut shown = Vec::new();
                for (i, s) in serves.iter().enumerate() {
                    let log = s.log();
                    let file =
                        std::env::temp_dir().join(format!("flowledger-{prefix}serve-{i}.log"));
                    let _ = std::fs::write(&file, &log);
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                    shown.push(format!("{} ends:\n{tail}", file.display()));
                }
                panic!(
                    "{} of {n} jobs ended, {} called back, within 240 s; the serve logs:\n{}",
                    facts.ended.len(),
                    facts.called_back.len(),
                    shown.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn callback_url(&self) -> String {
        format!("{}/cb", self.peer.url)
    }

    /// The checks after the faults, with every `serve` gone: jobs and
    /// callbacks, what was sent twice, stored once, read models, audit.
    async fn check<N>(&self, app: &TestApp<N>, facts: &Facts, acked: &[String], what: &str) {
        let n = acked.len();
        assert_eq!(facts.ended.len(), n, "{what}: every job ended");
        // a job fails only when the peer's 503s took both its attempts
        for (job, ends) in &facts.ended {
            if ends[0] != "JobCompleted" {
                assert_eq!(
                    (ends[0].as_str(), facts.results.get(job).map(Vec::as_slice)),
                    (
                        "JobFailed",
                        Some(&["failed".to_string(), "failed".to_string()][..])
                    ),
                    "{what}: {job} ended for another reason"
                );
            }
        }
        stored_once(app, acked).await;
        let calls = repeats_are_identical(&self.peer, "/s", &|_| String::new());
        let callbacks = repeats_are_identical(&self.peer, "/cb", &|b: &Value| {
            b["job_id"].as_str().unwrap_or("?").to_string()
        });
        let moved = facts.holders.values().filter(|h| h.len() > 1).count();
        eprintln!(
            "{what} ({}): {n} jobs ended ({} completed, the others failed on 503s), {moved} changed hands, {calls} step calls and \
             {callbacks} callbacks sent again by a new holder (same key, same body)",
            nats_binary(),
            facts.completed()
        );
        read_models_equal_a_rebuild(app, &self.db).await;
        audit_verifies(app).await;
    }
}

/// Submits jobs `<prefix>0..n` over NATS as billing, each with its own
/// command id, one after another every `gap`; a submission nobody answered
/// (no intake, a lost request or reply, `unavailable`) is sent again with
/// the same command id until it is acknowledged. Returns the acknowledged
/// command ids (all of them: a submission not acknowledged in 60 s fails
/// the test).
async fn submit_all(
    client: async_nats::Client,
    prefix: &'static str,
    n: usize,
    callback: String,
    gap: Duration,
) -> Vec<String> {
    let mut acked = Vec::new();
    for i in 0..n {
        let job_id = format!("{prefix}{i}");
        let command_id = format!("c-{job_id}");
        let body = json!({"job_id": job_id, "command_id": command_id, "workflow_key": WORKFLOW,
                          "client_id": "billing", "callback_url": callback});
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.request("flow.cmd.job.submit", body.to_string().into()),
            )
            .await;
            let last = match r {
                Ok(Ok(m)) => {
                    let v: Value = serde_json::from_slice(&m.payload).expect("replies are JSON");
                    if v["ok"] == true {
                        break;
                    }
                    // only "try again" answers are tried again
                    assert_eq!(v["error"]["code"], "unavailable", "{job_id}: {v}");
                    v.to_string()
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in 5 s".to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "{job_id} not acknowledged in 60 s: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acked.push(command_id);
        tokio::time::sleep(gap).await;
    }
    acked
}

#[tokio::test]
async fn serve_killed_again_and_again_under_load_loses_and_repeats_nothing() {
    let app = spawn_app().await;
    let n = 150;
    let fleet = Fleet::start(n).await;
    let mut serve = fleet.serve(&app);
    let load = tokio::spawn(submit_all(
        app.nats_as(Who::Billing).clone(),
        "again-",
        n,
        fleet.callback_url(),
        Duration::from_millis(40),
    ));
    // a supervisor restarts it at once, each time after a different while
    for kill in 0..5u64 {
        tokio::time::sleep(Duration::from_millis(1_200 + 600 * kill)).await;
        serve.kill();
        serve = fleet.serve(&app);
    }
    let acked = load.await.expect("the load");
    let facts = fleet.all_done(&app, "again-", n, &[&serve]).await;
    serve.kill();
    fleet
        .check(&app, &facts, &acked, "serve SIGKILLed 5 times")
        .await;
}

/// Whether the suite's nats-server knows strict durability
/// (`sync_interval: always`, 2.10 and later).
fn knows_strict_mode() -> bool {
    let out = std::process::Command::new(nats_binary())
        .arg("--version")
        .output()
        .expect("run nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.9.10"
    let version = text.trim().rsplit('v').next().unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

// multi-threaded: killing and starting nats-server blocks its thread
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_under_load_loses_and_repeats_nothing() {
    // strict: every write fsynced before it is acknowledged; on 2.9.10 the
    // default (a process crash loses nothing there either: the OS has it)
    let strict = knows_strict_mode();
    let conf = if strict {
        ServerConf::Strict
    } else {
        ServerConf::Production
    };
    let mut app = spawn_app_on(NatsServer::start_with(conf), Default::default()).await;
    let n = 150;
    let fleet = Fleet::start(n).await;
    let serves = [fleet.serve(&app), fleet.serve(&app)];
    let billing = app
        .nats
        .options(Who::Billing)
        .max_reconnects(None)
        .connect(&app.nats.url)
        .await
        .expect("connect as billing");
    let load = tokio::spawn(submit_all(
        billing,
        "natskill-",
        n,
        fleet.callback_url(),
        Duration::from_millis(40),
    ));
    for down in [1_500, 3_000] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| app.nats.kill());
        tokio::time::sleep(Duration::from_millis(down)).await;
        tokio::task::block_in_place(|| app.nats.start_again());
    }
    let acked = load.await.expect("the load");
    let facts = fleet
        .all_done(&app, "natskill-", n, &[&serves[0], &serves[1]])
        .await;
    for mut s in serves {
        assert!(
            s.running(),
            "serve exited through the NATS restarts:\n{}",
            s.log()
        );
        s.kill();
    }
    let what = if strict {
        "nats-server (strict) SIGKILLed twice"
    } else {
        "nats-server SIGKILLed twice"
    };
    fleet.check(&app, &facts, &acked, what).await;
}

#[tokio::test]
async fn three_instances_losing_two_under_load_complete_every_job() {
    let app = spawn_app().await;
    let n = 180;
    let fleet = Fleet::start(n).await;
    let mut serves = [fleet.serve(&app), fleet.serve(&app), fleet.serve(&app)];
    let load = tokio::spawn(submit_all(
        app.nats_as(Who::Billing).clone(),
        "three-",
        n,
        fleet.callback_url(),
        Duration::from_millis(40),
    ));
    // every instance drives jobs before the first dies
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let facts = Facts::read(&app, "three-").await;
        let holders: std::collections::HashSet<_> = facts.holders.values().flatten().collect();
        if holders.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three instances did not all drive jobs: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serves[0].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    serves[1].kill();
    let acked = load.await.expect("the load");
    let facts = fleet.all_done(&app, "three-", n, &[&serves[2]]).await;
    assert!(
        serves[2].running(),
        "the survivor exited:\n{}",
        serves[2].log()
    );
    serves[2].kill();
    // the jobs that changed hands ended with the survivor
    let holders: std::collections::HashSet<_> = facts.holders.values().flatten().collect();
    assert_eq!(holders.len(), 3, "{holders:?}");
    let lasts: std::collections::HashSet<_> = facts
        .holders
        .values()
        .filter(|h| h.len() > 1)
        .filter_map(|h| h.last())
        .collect();
    assert!(lasts.len() <= 2, "jobs moved to a dead instance? {lasts:?}");
    fleet
        .check(&app, &facts, &acked, "3 instances, 2 SIGKILLed")
        .await;
}

#[tokio::test]
async fn serve_on_a_three_node_cluster_rides_through_its_stream_leader_dying() {
    let cluster = NatsCluster::start(&nats_binary()).await;
    let config = flowledger::events::log::LogConfig {
        replicas: 3,
        ..Default::default()
    };
    // as an operator sets a cluster up: streams and buckets of 3 replicas
    // (a bucket `serve` makes itself has one, on one node)
    let mut init = cluster.cli(Who::Service);
    init.args(["init", "--replicas", "3", "--wait-secs", "60"])
        .env_remove("DATABASE_URL");
    let out = tokio::task::spawn_blocking(move || init.output().expect("run flowledger init"))
        .await
        .expect("init's thread");
    assert!(
        out.status.success(),
        "init --replicas 3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = cluster.stream_leader("FLOW_EVENTS").await;
    let mut cluster = cluster;
    // the test's own connections off the leader: what is tried is serve's
    let others: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
    cluster.clients_on(&others);
    let mut app = spawn_app_on(cluster, config).await;
    let n = 120;
    let fleet = Fleet::start(n).await;
    // serve is given every node (`--nats-url a,b,c` through the environment)
    let serves = [fleet.serve(&app), fleet.serve(&app)];
    let load = tokio::spawn(submit_all(
        app.nats_as(Who::Billing).clone(),
        "cluster-",
        n,
        fleet.callback_url(),
        Duration::from_millis(40),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.nats.kill(leader);
    let new_leader = app.nats.stream_leader("FLOW_EVENTS").await;
    assert_ne!(new_leader, leader, "the leader moved");
    let acked = load.await.expect("the load");
    let facts = fleet
        .all_done(&app, "cluster-", n, &[&serves[0], &serves[1]])
        .await;
    let stalled: usize = serves
        .iter()
        .map(|s| s.log().matches("reading the log again").count())
        .sum();
    eprintln!("the handlers read the log again {stalled} times after their reader stalled");
    // a stall is noticed once per dead reader, not in a loop
    assert!(
        stalled <= 4,
        "the handlers read the log again {stalled} times"
    );
    for mut s in serves {
        assert!(
            s.running(),
            "serve exited when the leader died:\n{}",
            s.log()
        );
        s.kill();
    }
    fleet
        .check(
            &app,
            &facts,
            &acked,
            "3-node cluster, stream leader SIGKILLed",
        )
        .await;
}
