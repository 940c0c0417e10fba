//! Several job handler instances on one NATS (issue 12, item 3): they share
//! the partitions, a killed instance's jobs move to the other, a
//! PostgreSQL restart changes nothing about who drives what, and every
//! fact is checked from the log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flowledger::handlers::lease::PARTITIONS;
use serde_json::{json, Value};

use crate::fault_checks::{
    all_ended, audit_verifies, called_back_twice, read_models_equal_a_rebuild, sent_twice, Facts,
};
use crate::helpers::*;
use crate::peers::{self, Peer};

fn callback_config() -> flowledger::handlers::HandlerConfig {
    let mut c = test_handler_config();
    c.callback_key = Some(
        flowledger::crypto::SigningKey::new(b"test-callback-secret-0123").expect("a long key"),
    );
    c
}

/// Waits until the two instances hold half the partitions each. `held`
/// counts draining partitions too, so "both hold some and together all"
/// is also true while the first rebalancing is still under way, and jobs
/// submitted then change hands.
async fn both_hold_partitions(a: &HandlerSide, b: &HandlerSide) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (x, y) = (a.ctx.leases.held(), b.ctx.leases.held());
        if x == PARTITIONS / 2 && y == PARTITIONS / 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the instances did not share the partitions: {x} and {y} of {PARTITIONS}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_instances_share_the_jobs_and_send_each_attempt_once() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(30, json!("done"))]);
    peer.script("/cb", vec![peers::ok(0, json!({}))]);
    let registry = parse_registry(one_workflow(
        json!([solver("s", &step, 5000, 2)]),
        json!({}),
    ));
    let a = start_handler(&app, registry.clone(), callback_config()).await;
    let b = start_handler(&app, registry, callback_config()).await;
    both_hold_partitions(&a, &b).await;
    let n = 200;
    for i in 0..n {
        let cb = format!("{}/cb", peer.url);
        let r = a
            .submit(&format!("share-{i}"), "w", json!({"callback_url": cb}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let facts = all_ended(&app, "share-", n, Duration::from_secs(120)).await;
    assert_eq!(facts.completed(), n);
    // each job was driven by one instance, both instances drove jobs
    let mut per_holder: HashMap<String, usize> = HashMap::new();
    for (job, h) in &facts.holders {
        assert_eq!(h.len(), 1, "{job} changed hands without a failover: {h:?}");
        *per_holder.entry(h[0].clone()).or_default() += 1;
    }
    assert_eq!(per_holder.len(), 2, "{per_holder:?}");
    assert!(per_holder.contains_key(a.ctx.leases.holder()));
    assert!(per_holder.contains_key(b.ctx.leases.holder()));
    assert_eq!(sent_twice(&peer, "/s"), vec![]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.received("/cb").len() < n {
        assert!(Instant::now() < deadline, "not every job was called back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(called_back_twice(&peer), vec![]);
}

#[tokio::test]
async fn a_partition_given_away_finishes_its_running_jobs_first() {
    // one instance holds everything; a second joins while jobs run
    let app = spawn_app().await;
    let peer = Peer::start().await;
    // long enough that every job is still in flight when the second joins
    let step = peer.script("/s", vec![peers::ok(2500, json!("done"))]);
    let registry = parse_registry(one_workflow(
        json!([solver("s", &step, 9000, 1)]),
        json!({}),
    ));
    let a = start_handler(&app, registry.clone(), test_handler_config()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.ctx.leases.held() < PARTITIONS {
        assert!(
            Instant::now() < deadline,
            "the first instance took no partition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = 120;
    for i in 0..n {
        let r = a.submit(&format!("join-{i}"), "w", json!({})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let b = start_handler(&app, registry, test_handler_config()).await;
    assert_eq!(
        Facts::read(&app, "join-").await.ended.len(),
        0,
        "jobs ended too early"
    );
    both_hold_partitions(&a, &b).await;
    let facts = all_ended(&app, "join-", n, Duration::from_secs(120)).await;
    assert_eq!(facts.completed(), n);
    // the hand-over waited for calls in flight: none was sent twice
    assert_eq!(sent_twice(&peer, "/s"), vec![]);
}

// multi-threaded: stopping and starting PostgreSQL blocks its thread
// (block_in_place), and the handlers' lease renewals must go on meanwhile
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_while_postgresql_restarts_and_nothing_is_done_twice() {
    let app = spawn_app().await;
    let mut pg = OwnPg::start();
    let url = pg.database().await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(40, json!("done"))]);
    peer.script("/cb", vec![peers::ok(0, json!({}))]);
    let registry = parse_registry(one_workflow(
        json!([solver("s", &step, 5000, 2)]),
        json!({}),
    ));
    let a = start_handler_on(&app, registry.clone(), callback_config(), url.clone()).await;
    let b = start_handler_on(&app, registry, callback_config(), url).await;
    both_hold_partitions(&a, &b).await;
    let cb = format!("{}/cb", peer.url);
    let n = 300;
    let submit_all = async {
        for i in 0..n {
            let r = a
                .submit(&format!("pg-{i}"), "w", json!({"callback_url": cb}))
                .await;
            assert_eq!(r["ok"], true, "{r}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let restart = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| pg.kill());
        let before = Facts::read(&app, "pg-").await.ended.len();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let during = Facts::read(&app, "pg-").await.ended.len() - before;
        tokio::task::block_in_place(|| pg.start_again());
        during
    };
    let ((), during) = tokio::join!(submit_all, restart);
    assert!(during > 0, "no job ended while PostgreSQL was down");
    let facts = all_ended(&app, "pg-", n, Duration::from_secs(120)).await;
    assert_eq!(facts.completed(), n);
    for (job, h) in &facts.holders {
        assert_eq!(h.len(), 1, "{job} changed hands: {h:?}");
    }
    assert_eq!(sent_twice(&peer, "/s"), vec![], "a solver was called twice");
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.received("/cb").len() < n {
        assert!(Instant::now() < deadline, "not every job was called back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(called_back_twice(&peer), vec![]);
    // and the instances kept their partitions
    assert_eq!(a.ctx.leases.held() + b.ctx.leases.held(), PARTITIONS);
}

/// Starts `serve` with its handler on `registry`, its HTTP API on a free
/// port, stderr kept.
fn serve_instance(app: &TestApp, url: &str, registry: &std::path::Path) -> std::process::Child {
    start_serve(app, url, registry, None)
}

#[tokio::test]
async fn killing_either_instance_under_load_completes_every_job() {
    let app = spawn_app().await;
    let read = spawn_read_side(&app, false).await;
    let peer = Peer::start().await;
    let step = peer.script("/s", vec![peers::ok(150, json!("done"))]);
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.json");
    std::fs::write(
        &registry,
        one_workflow(json!([solver("s", &step, 5000, 2)]), json!({})).to_string(),
    )
    .unwrap();
    let mut first = serve_instance(&app, &read.url, &registry);
    let mut second = serve_instance(&app, &read.url, &registry);
    let n = 240;
    let submit = |i: usize| {
        let body =
            json!({"job_id": format!("kill-{i}"), "workflow_key": "w", "client_id": "billing"});
        let client = app.nats_as(Who::Billing).clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(m) = client
                    .request("flow.cmd.job.submit", body.to_string().into())
                    .await
                {
                    let v: Value = serde_json::from_slice(&m.payload).unwrap();
                    // a retry after a lost reply finds the job submitted
                    if v["ok"] == true || v["error"]["code"] == "conflict" {
                        return;
                    }
                }
                assert!(Instant::now() < deadline, "job {i} was not taken");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 0..n / 2 {
        submit(i).await;
    }
    // both instances drive jobs before one dies
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let facts = Facts::read(&app, "kill-").await;
        let holders: std::collections::HashSet<_> = facts.holders.values().flatten().collect();
        if holders.len() == 2 && facts.ended.len() >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two instances did not both drive jobs: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    let _ = first.wait();
    for i in n / 2..n {
        submit(i).await;
    }
    let facts = all_ended(&app, "kill-", n, Duration::from_secs(120)).await;
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(facts.completed(), n);
    // jobs that changed hands went to the survivor, under a newer lease
    let moved: Vec<_> = facts.holders.values().filter(|h| h.len() > 1).collect();
    let takers: std::collections::HashSet<_> = moved.iter().map(|h| h.last()).collect();
    assert!(
        takers.len() <= 1,
        "jobs moved to more than one instance: {takers:?}"
    );
    for h in &moved {
        assert_ne!(h.first(), h.last(), "{h:?}");
    }
    eprintln!(
        "{} of {n} jobs moved to the surviving instance",
        moved.len()
    );
    read_models_equal_a_rebuild(&app, &read.url).await;
    audit_verifies(&app).await;
}

/// The projection consumers and when each was (re)created.
async fn projection_consumers(app: &TestApp) -> Vec<(String, String)> {
    use futures::StreamExt;
    let stream = app.log.stream().clone();
    let mut names = stream.consumer_names();
    let mut out = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.expect("consumer names");
        if !name.starts_with("flowledger-proj-") {
            continue;
        }
        if let Ok(info) = stream.consumer_info(&name).await {
            out.push((name, info.created.to_string()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgresql_restart_one_process_runs_each_projection() {
    let app = spawn_app().await;
    let mut pg = OwnPg::start();
    let url = pg.database().await;
    let a = spawn_api_on(&app, true, registry(), url.clone()).await;
    let _b = spawn_api_on(&app, true, registry(), url).await;
    for i in 0..20 {
        assert_eq!(
            app.submit(&format!("pr-{i}"), &format!("c-pr-{i}")).await["ok"],
            true
        );
    }
    a.caught_up(&app.log).await;
    tokio::task::block_in_place(|| pg.kill());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| pg.start_again());
    for i in 20..40 {
        assert_eq!(
            app.submit(&format!("pr-{i}"), &format!("c-pr-{i}")).await["ok"],
            true
        );
    }
    // a new pool connects once PostgreSQL answers again
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = app.last_seq().await as i64;
        let rows = flowledger::projections::db::checkpoints(&a.pool).await;
        if let Ok(rows) = rows {
            if rows.iter().filter(|r| r.active).all(|r| r.last_seq >= last) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "projections did not catch up after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // settled: the consumers are no longer recreated by two processes in turn
    let before = projection_consumers(&app).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = projection_consumers(&app).await;
    assert!(!before.is_empty());
    assert_eq!(
        before, after,
        "a projection's consumer keeps being recreated"
    );
    let (_, rows) = a.get("/v1/executions?limit=100").await;
    assert_eq!(rows["items"].as_array().map(Vec::len), Some(40), "{rows}");
    read_models_equal_a_rebuild(&app, &a.url).await;
    audit_verifies(&app).await;
}

#[tokio::test]
async fn one_instance_leads_a_singleton_and_another_takes_over_when_it_stops() {
    use flowledger::handlers::lease::Singleton;
    let app = spawn_app().await;
    let js = app.log.jetstream();
    let (stop_a, rx_a) = tokio::sync::watch::channel(false);
    let (stop_b, rx_b) = tokio::sync::watch::channel(false);
    let a = Singleton::start(js, "test", "a".into(), rx_a)
        .await
        .unwrap();
    let b = Singleton::start(js, "test", "b".into(), rx_b)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(a.is_leader() || b.is_leader()) {
        assert!(Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // never two leaders, over several rounds
    for _ in 0..100 {
        assert!(!(a.is_leader() && b.is_leader()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (leader, other, stop) = if a.is_leader() {
        (a, b, stop_a)
    } else {
        (b, a, stop_b)
    };
    let _ = stop.send(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !other.is_leader() || leader.is_leader() {
        assert!(Instant::now() < deadline, "leadership did not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_instance_whose_handler_loop_fails_or_stalls_gives_its_partitions_away() {
    use flowledger::handlers::lease::{Keeper, Leases};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let app = spawn_app().await;
    let js = app.log.jetstream();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    // two instances' keepers, each with a stand-in for its handler loop that
    // says it runs every 200 ms while `beating`
    let mut instances = Vec::new();
    for name in ["a", "b"] {
        let leases = Arc::new(Leases::new(name.into()));
        let beating = Arc::new(AtomicBool::new(true));
        let keeper = Keeper::open(js, leases.clone()).await.unwrap();
        let (changes, _) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(keeper.run(changes, stop.clone()));
        let (l, on) = (leases.clone(), beating.clone());
        tokio::spawn(async move {
            loop {
                if on.load(Ordering::SeqCst) {
                    l.handler_running();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        instances.push((leases, beating));
    }
    let (a, a_beats) = &instances[0];
    let (b, _) = &instances[1];
    held_until("both share the partitions", a, b, &|| {
        a.held() > 0 && b.held() > 0 && a.held() + b.held() == PARTITIONS
    })
    .await;
    // a's loop fails: its leases go to b, which is then the only member
    a_beats.store(false, Ordering::SeqCst);
    a.handler_failed();
    held_until(
        "the failing instance gave its partitions away",
        a,
        b,
        &|| a.held() == 0 && b.held() == PARTITIONS,
    )
    .await;
    // it runs again: it takes its share back
    a_beats.store(true, Ordering::SeqCst);
    held_until("the instance took partitions again", a, b, &|| {
        a.held() > 0 && a.held() + b.held() == PARTITIONS
    })
    .await;
    // its loop stalls without failing (it no longer says it runs)
    a_beats.store(false, Ordering::SeqCst);
    held_until(
        "the stalled instance gave its partitions away",
        a,
        b,
        &|| a.held() == 0 && b.held() == PARTITIONS,
    )
    .await;
}

/// Waits until `done` (30 s at most), naming what is awaited and who holds
/// how many partitions when it does not come.
async fn held_until(
    what: &str,
    a: &flowledger::handlers::lease::Leases,
    b: &flowledger::handlers::lease::Leases,
    done: &dyn Fn() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: a holds {}, b holds {}",
            a.held(),
            b.held()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
