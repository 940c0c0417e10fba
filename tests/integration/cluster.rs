//! A 3-node cluster is a first-class deployment (issue 12, item 4): `init
//! --replicas 3` waits for the cluster to form, commands wait through a
//! stream leader election instead of failing, and a restarted node rejoins
//! its stream. Every node runs nats/production.conf; the nats-server
//! version is the suite's (FLOWLEDGER_NATS_SERVER: `scripts/test.sh` runs
//! this on 2.9.10 and 2.15).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowledger::events::log::{self, LogConfig};
use serde_json::{json, Value};

use crate::cluster_harness::{node_of, NatsCluster, NODES};
use crate::helpers::*;

const STREAM: &str = "FLOW_EVENTS";

fn r3() -> LogConfig {
    LogConfig {
        replicas: 3,
        ..Default::default()
    }
}

/// Runs `cmd` to its end off the test's runtime.
async fn output(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run flowledger"))
        .await
        .expect("the command's thread")
}

#[tokio::test]
async fn init_with_three_replicas_waits_for_the_cluster_to_form() {
    let mut cluster = NatsCluster::prepare(&nats_binary());
    cluster.start_again(0);
    let mut cmd = cluster.cli(Who::Service);
    cmd.args(["init", "--replicas", "3", "--wait-secs", "60"])
        .env_remove("DATABASE_URL")
        .env("FLOWLEDGER_LOG", "info");
    let mut init = tokio::task::spawn_blocking(move || cmd.output().expect("run flowledger init"));
    // one node of three cannot place three replicas: init waits
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !init.is_finished(),
        "init waits while one node of three runs"
    );
    cluster.start_again(1);
    cluster.start_again(2);
    let out = (&mut init).await.expect("init's thread");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("stream {STREAM}: created")),
        "{stdout}"
    );
    assert!(
        stderr.contains("waiting for JetStream to place the streams"),
        "it says what it waits for: {stderr}"
    );
    for stream in [STREAM, "FLOW_CHECKPOINTS"] {
        let info = cluster.stream_info(stream).await;
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let c = info.cluster.expect("a clustered stream has cluster info");
        assert!(c.leader.is_some(), "{stream} has a leader");
        assert_eq!(c.replicas.len(), 2, "{stream}: the leader and two peers");
    }
    // idempotent: a second run changes nothing
    let mut again = cluster.cli(Who::Service);
    again
        .args(["init", "--replicas", "3"])
        .env_remove("DATABASE_URL");
    let out = output(again).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("stream {STREAM}: unchanged")),
        "{stdout}"
    );
}

#[tokio::test]
async fn init_gives_up_on_a_cluster_that_does_not_form_and_says_why() {
    let mut cluster = NatsCluster::prepare(&nats_binary());
    cluster.start_again(0);
    let mut cmd = cluster.cli(Who::Service);
    cmd.args(["init", "--replicas", "3", "--wait-secs", "3"])
        .env_remove("DATABASE_URL");
    let out = output(cmd).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "unreachable: exit 3\n{stderr}");
    assert!(stderr.contains("gave up (--wait-secs)"), "{stderr}");
    assert!(
        stderr.contains("could not place the streams (3 replicas)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn replicas_on_a_single_server_fail_at_once() {
    // a server that is not clustered cannot ever hold 3 replicas: init does
    // not wait for it (exit 1, the server's reason), even with a long wait
    let nats = NatsServer::start();
    let out = output({
        let mut c = nats.cli(Who::Service);
        c.args(["init", "--replicas", "3", "--wait-secs", "120"])
            .env_remove("DATABASE_URL");
        c
    })
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("replicas > 1"), "{stderr}");
}

/// What one command sent during the load got.
struct Outcome {
    job_id: String,
    reply: Result<Value, String>,
    /// From the first send to the reply (or the last error).
    latency: Duration,
    /// Sends after the first (same command id).
    resent: u32,
    /// When it was first sent.
    sent_at: Instant,
}

/// Sends job submissions as the client over NATS request/reply, one after
/// another, until `stop`; each has its own job id. With `resend`, a
/// request nobody answered (no responders: no intake subscribed; a time
/// out: the request or its reply was lost with a node) is sent again with
/// the same command id, as a careful client does, for up to 30 s. Counts
/// each new command in `sent` as it is first sent.
async fn submit_until(
    client: async_nats::Client,
    sender: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    resend: bool,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut n = 0;
    // bounded in count as well as by `stop`
    while !stop.load(Ordering::Relaxed) && n < 2_000 {
        n += 1;
        let job_id = format!("load-{sender}-{n}");
        let body = json!({"job_id": job_id, "command_id": job_id,
                          "workflow_key": "invoice.extract", "input": {"n": n}});
        let started = Instant::now();
        sent.fetch_add(1, Ordering::Relaxed);
        let mut resent = 0;
        let reply = loop {
            let r = client
                .request("flow.cmd.job.submit", body.to_string().into())
                .await;
            match r {
                Err(e)
                    if resend
                        && started.elapsed() < Duration::from_secs(30)
                        && matches!(
                            e.kind(),
                            async_nats::RequestErrorKind::NoResponders
                                | async_nats::RequestErrorKind::TimedOut
                        ) =>
                {
                    resent += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => {
                    break r
                        .map_err(|e| format!("{e} ({:?})", e.kind()))
                        .and_then(|m| {
                            serde_json::from_slice(&m.payload).map_err(|e| e.to_string())
                        })
                }
            }
        };
        out.push(Outcome {
            job_id,
            reply,
            latency: started.elapsed(),
            resent,
            sent_at: started,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// Runs four senders on `client` for a second, kills node `kill`, waits
/// for `stream` to have another leader, goes on for two seconds more and
/// until the senders have sent new commands after the kill (a sender
/// whose request was lost with the node waits out its request timeout
/// first), and checks every command: an `ok` reply, stored exactly once.
/// Returns the outcomes and the new leader.
async fn load_through_a_kill(
    app: &mut TestApp<NatsCluster>,
    client: &async_nats::Client,
    kill: usize,
    resend: bool,
    what: &str,
) -> (Vec<Outcome>, usize) {
    const SENDERS: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            tokio::spawn(submit_until(
                client.clone(),
                s,
                stop.clone(),
                sent.clone(),
                resend,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored_before_kill = app.last_seq().await;
    let sent_at_kill = sent.load(Ordering::Relaxed);
    app.nats.kill(kill);
    let killed_at = Instant::now();
    let new_leader = app.nats.stream_leader(STREAM).await;
    let election = killed_at.elapsed();
    // go on past the election, and until each sender could have sent two
    // commands of its own after the kill: those in flight at the kill may
    // have been stored before it (their replies lost with the node)
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.load(Ordering::Relaxed) < sent_at_kill + 3 * SENDERS {
        assert!(
            Instant::now() < deadline,
            "{what}: no new commands sent within 60 s of the kill ({} before it, {} now)",
            sent_at_kill,
            sent.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for s in senders {
        outcomes.extend(s.await.expect("a sender"));
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !matches!(&o.reply, Ok(v) if v["ok"] == json!(true)))
        .map(|o| format!("{}: {:?} after {:?}", o.job_id, o.reply, o.latency))
        .collect();
    let max = outcomes.iter().map(|o| o.latency).max().unwrap_or_default();
    let resent: u32 = outcomes.iter().map(|o| o.resent).sum();
    eprintln!(
        "{what} ({}): {} commands sent, {} succeeded, {resent} resends, max latency \
         {max:?}; {stored_before_kill} stored before the kill, a new leader seen after \
         {election:?}",
        nats_binary(),
        outcomes.len(),
        outcomes.len() - failed.len(),
    );
    assert!(
        outcomes.iter().any(|o| o.sent_at > killed_at),
        "commands were sent after the kill"
    );
    assert!(failed.is_empty(), "commands failed: {failed:#?}");
    // each acknowledged command is stored exactly once
    assert_eq!(app.last_seq().await, outcomes.len() as u64);
    for o in &outcomes {
        let subject = format!("flow.ev.job.{}", o.job_id);
        assert_eq!(app.messages_on(&subject).await, 1, "{subject}");
    }
    (outcomes, new_leader)
}

/// A cluster with R3 streams and the index of FLOW_EVENTS's leader.
async fn r3_cluster() -> (NatsCluster, usize) {
    let cluster = NatsCluster::start(&nats_binary()).await;
    let c = cluster.connect(Who::Service).await;
    log::init_patiently(&c, &r3(), Duration::from_secs(60))
        .await
        .expect("init R3 streams");
    let leader = cluster.stream_leader(STREAM).await;
    (cluster, leader)
}

#[tokio::test]
async fn commands_wait_through_a_stream_leader_election() {
    let (mut cluster, leader) = r3_cluster().await;
    // the service and its callers on the other nodes: what is measured is
    // the wait for a new stream leader, not a lost connection
    let others: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
    cluster.clients_on(&others);
    let mut app = spawn_app_on(cluster, r3()).await;
    let client = app.nats_as(Who::Billing).clone();
    for c in [&app.client, &client] {
        assert_ne!(node_of(&app.nats, c), Some(leader), "off the leader");
    }
    assert_eq!(app.nats.stream_leader(STREAM).await, leader, "still leads");
    let (outcomes, new_leader) =
        load_through_a_kill(&mut app, &client, leader, false, "leader kill").await;
    assert_ne!(new_leader, leader, "the leader moved");
    assert!(outcomes.iter().all(|o| o.resent == 0));
}

#[tokio::test]
async fn when_the_service_node_dies_with_the_leader_a_resent_command_is_stored_once() {
    let (mut cluster, leader) = r3_cluster().await;
    // the service on the leader's node (it fails over to the others it
    // learns from the cluster), the client on another node
    cluster.clients_on(&[leader]);
    let mut app = spawn_app_on(cluster, r3()).await;
    assert_eq!(node_of(&app.nats, &app.client), Some(leader));
    let other = (0..NODES).find(|&i| i != leader).expect("another node");
    let client = app
        .nats
        .connect_to(Who::Billing, &[app.nats.url(other)])
        .await;
    let (_, new_leader) = load_through_a_kill(
        &mut app,
        &client,
        leader,
        true,
        "service node and leader kill",
    )
    .await;
    assert_ne!(new_leader, leader, "the leader moved");
    assert_ne!(
        node_of(&app.nats, &app.client),
        Some(leader),
        "the service moved"
    );
}

/// Waits until `stream` has a leader and two current peers, none offline.
async fn three_current_replicas(cluster: &NatsCluster, stream: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = cluster.stream_info(stream).await;
        let c = info.cluster.clone().unwrap_or_default();
        let peers: Vec<Value> = c
            .replicas
            .iter()
            .map(|p| json!({"name": p.name, "current": p.current, "offline": p.offline}))
            .collect();
        if c.leader.is_some()
            && c.replicas.len() == 2
            && c.replicas.iter().all(|p| p.current && !p.offline)
        {
            return json!({"leader": c.leader, "peers": peers});
        }
        assert!(
            Instant::now() < deadline,
            "{stream} not back to 3 current replicas within 60 s: leader {:?}, peers {peers:?}",
            c.leader
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_restarted_node_rejoins_and_its_stream_is_whole_again() {
    let (mut cluster, leader) = r3_cluster().await;
    let followers: Vec<usize> = (0..NODES).filter(|&i| i != leader).collect();
    // connections on the leader: killing followers does not touch them
    cluster.clients_on(&[leader]);
    let mut app = spawn_app_on(cluster, r3()).await;
    let submit = |app: &TestApp<NatsCluster>, id: String| {
        let body = json!({"job_id": id, "command_id": id, "workflow_key": "invoice.extract"});
        let c = app.nats_as(Who::Billing).clone();
        async move {
            let m = c
                .request("flow.cmd.job.submit", body.to_string().into())
                .await
                .expect("a reply");
            serde_json::from_slice::<Value>(&m.payload).expect("JSON")
        }
    };
    let (down, other) = (followers[0], followers[1]);
    for n in 0..5 {
        let r = submit(&app, format!("before-{n}")).await;
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    // one follower down: the other two go on, and it misses these
    app.nats.kill(down);
    for n in 0..20 {
        let r = submit(&app, format!("while-down-{n}")).await;
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    app.nats.start_again(down);
    let back = three_current_replicas(&app.nats, STREAM).await;
    assert!(
        back["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == app.nats.name(down))),
        "the restarted node is a current peer again: {back}"
    );
    // it holds the stream: with the other follower down, it and the leader
    // are the quorum, and every message is there
    app.nats.kill(other);
    for n in 0..5 {
        let r = submit(&app, format!("after-rejoin-{n}")).await;
        assert_eq!(
            r["ok"],
            json!(true),
            "{r} (log of the restarted node: {})",
            app.nats.log_of(down)
        );
    }
    assert_eq!(app.last_seq().await, 30);
    for id in ["before-0", "while-down-19", "after-rejoin-4"] {
        assert_eq!(
            app.messages_on(&format!("flow.ev.job.{id}")).await,
            1,
            "{id}"
        );
    }
}

#[tokio::test]
async fn submit_waits_for_an_intake_that_is_not_subscribed_yet() {
    // as while `serve` moves to another node: for a moment no intake is
    // subscribed and a request has no responders (2.15) or is dropped
    // (2.9.10 says nothing across an account import); nobody received it,
    // so `flowledger submit` sends it again within its wait
    let nats = NatsServer::start();
    let client = nats.connect(Who::Service).await;
    log::init(&client, &LogConfig::default())
        .await
        .expect("init streams");
    let log = flowledger::events::log::EventLog::open(client.clone(), LogConfig::default())
        .await
        .expect("open the log");
    let mut cmd = nats.cli(Who::Billing);
    cmd.args([
        "submit",
        "--workflow",
        "invoice.extract",
        "--job-id",
        "late-intake",
        "--command-id",
        "late-intake",
    ])
    .env("FLOWLEDGER_LOG", "flowledger=debug");
    let submit = tokio::process::Command::from(cmd).output();
    let submit = tokio::spawn(submit);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _intake = flowledger::app::Application::build(intake_settings(client, log.clone()))
        .await
        .expect("build the intake");
    let out = submit.await.expect("the task").expect("run flowledger");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("sending again"),
        "it was sent before the intake listened: {stderr}"
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("the reply");
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(log.last_seq().await.expect("stream info"), 1, "stored once");
}
