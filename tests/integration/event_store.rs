//! The event store's contracts: concurrency, idempotency, atomic commits,
//! replay, immutability.

use std::collections::HashMap;
use std::time::Duration;

use cqrs_es::{AggregateError, CqrsFramework, EventStore};
use flowledger::audit::read::{self, Filter};
use flowledger::commands::job::{Job, JobCommand, JobStatus};
use flowledger::events::envelope::{self, EventRecord};
use flowledger::events::log::{AppendError, LogConfig};
use flowledger::events::store::AggregateStore;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn init_is_idempotent_and_the_stream_is_immutable() {
    let app = spawn_app().await;
    let again = flowledger::events::log::init(&app.client, &app.config)
        .await
        .unwrap();
    assert!(again.iter().all(|r| r.action == "unchanged"), "{again:?}");
    let info = app.log.stream().get_info().await.unwrap();
    assert!(info.config.deny_delete && info.config.deny_purge && info.config.allow_direct);
    assert_eq!(info.config.subjects, vec!["flow.ev.>".to_string()]);
    // the broker itself refuses deletes and purges
    app.submit("j-immutable", "c1").await;
    let js = app.log.jetstream();
    assert!(js
        .get_stream("FLOW_EVENTS")
        .await
        .unwrap()
        .delete_message(1)
        .await
        .is_err());
    assert!(js
        .get_stream("FLOW_EVENTS")
        .await
        .unwrap()
        .purge()
        .await
        .is_err());
    assert_eq!(app.last_seq().await, 1);
}

#[tokio::test]
async fn concurrent_creates_of_one_aggregate_let_exactly_one_win() {
    let app = spawn_app().await;
    let other = app.second_bus().await;
    for round in 0..20 {
        let job = format!("race-{round}");
        let body = |cmd: &str| {
            json!({"job_id": job, "command_id": cmd, "workflow_key": "invoice.extract", "client_id": "billing"}).to_string()
        };
        let (body_a, body_b) = (body(&format!("a-{round}")), body(&format!("b-{round}")));
        let billing = Who::Billing.caller();
        let (a, b) = tokio::join!(
            app.handle("flow.cmd.job.submit", body_a.as_bytes()),
            handle(&other, &billing, "flow.cmd.job.submit", body_b.as_bytes()),
        );
        let wins = [a.is_ok(), b.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "round {round}: {a:?} / {b:?}");
        let loser = a.err().or(b.err()).unwrap();
        assert_eq!(loser.code.as_str(), "conflict", "{}", loser.message);
        assert_eq!(app.messages_on(&format!("flow.ev.job.{job}")).await, 1);
    }
}

#[tokio::test]
async fn a_stale_write_gets_conflict() {
    let app = spawn_app().await;
    app.submit("stale", "c1").await;
    let seq_after_submit = app.last_seq().await;
    ok(app
        .handle("flow.cmd.job.start", br#"{"job_id":"stale"}"#)
        .await);
    // the log itself refuses an append that expects an older last sequence
    let err = app
        .log
        .append(
            "flow.ev.job.stale".into(),
            b"{}\n".to_vec(),
            "raw-1",
            seq_after_submit,
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, AppendError::WrongLastSequence { .. }),
        "{err:?}"
    );
    // and through cqrs-es: a context loaded before another writer's commit
    let store = AggregateStore::<Job>::new(app.log.clone(), services());
    let mut ctx = store.load_aggregate("stale").await.unwrap();
    ok(app
        .handle("flow.cmd.job.cancel", br#"{"job_id":"stale","reason":"x"}"#)
        .await);
    ctx.state.status = JobStatus::Running; // what this stale writer believes
    let events = ctx
        .state
        .decide(
            JobCommand::Fail(flowledger::commands::job::FailJob {
                error_code: "E".into(),
                error_message: "m".into(),
                step_results: vec![],
            }),
            &services(),
        )
        .unwrap();
    let r = store.commit(events, ctx, HashMap::new()).await;
    assert!(matches!(r, Err(AggregateError::AggregateConflict)), "{r:?}");
    assert_eq!(app.messages_on("flow.ev.job.stale").await, 3);
}

#[tokio::test]
async fn a_command_retried_after_another_writer_sees_the_new_state() {
    // Two services with their own caches: the second one's cache is stale
    // after the first one's commit; the concurrency check catches that and
    // the command is decided on the fresh state.
    let app = spawn_app().await;
    let other = app.second_bus().await;
    app.submit("two-writers", "c1").await;
    ok(handle(
        &other,
        &caller_for("flow.cmd.job.start"),
        "flow.cmd.job.start",
        br#"{"job_id":"two-writers","command_id":"s"}"#,
    )
    .await);
    let r = app
        .handle(
            "flow.cmd.job.start",
            br#"{"job_id":"two-writers","command_id":"s2"}"#,
        )
        .await;
    let e = r.unwrap_err();
    assert_eq!(e.code.as_str(), "rejected", "{}", e.message);
    assert!(e.message.contains("running"), "{}", e.message);
}

#[tokio::test]
async fn current_brings_a_cached_aggregate_up_to_the_log_another_writer_extended() {
    // a reader with its own cache (as the memory handlers read subjects):
    // after another writer's commit, `current` answers what a whole load
    // does, from the cache plus the commits since
    let app = spawn_app().await;
    let reader = AggregateStore::<Job>::new(app.log.clone(), services());
    app.submit("current-1", "c1").await;
    let first = reader.current("current-1").await.expect("loaded whole");
    assert_eq!((first.version, first.state.status), (1, JobStatus::Pending));
    app.handle(
        "flow.cmd.job.start",
        br#"{"job_id":"current-1","command_id":"s"}"#,
    )
    .await
    .expect("started by the other writer");
    for _ in 0..2 {
        // the second time nothing is newer: the same answer
        let now = reader.current("current-1").await.expect("caught up");
        let whole = reader.load("current-1").await.expect("a whole load");
        assert_eq!(now.state.status, JobStatus::Running);
        assert_eq!(
            (now.version, now.subject_seq, now.head, now.commits.len()),
            (
                whole.version,
                whole.subject_seq,
                whole.head,
                whole.commits.len()
            )
        );
        assert!(now.version > first.version && now.subject_seq > first.subject_seq);
    }
    // an aggregate the log does not have: empty, as a whole load says
    let unknown = reader.current("current-none").await.expect("no such job");
    assert_eq!((unknown.version, unknown.subject_seq), (0, 0));
}

#[tokio::test]
async fn a_duplicate_command_id_gives_the_same_reply_and_one_event() {
    let app = spawn_app().await;
    let first = app.submit("dup", "cmd-1").await;
    assert_eq!(first["ok"], json!(true), "{first}");
    // same service (cache), a fresh service (broker de-duplication)
    let again = app.submit("dup", "cmd-1").await;
    let fresh = app.second_bus().await;
    let body = json!({"job_id": "dup", "command_id": "cmd-1", "workflow_key": "invoice.extract", "client_id": "billing", "input": {"n": 1}});
    let from_fresh = crate::helpers::ok(
        handle(
            &fresh,
            &caller_for("flow.cmd.job.submit"),
            "flow.cmd.job.submit",
            body.to_string().as_bytes(),
        )
        .await,
    );
    for r in [&again, &serde_json::to_value(&from_fresh).unwrap()] {
        assert_eq!(r["duplicate"], json!(true));
        assert_eq!(r["stream_seq"], first["stream_seq"]);
        assert_eq!(r["events"], first["events"]);
    }
    assert_eq!(app.messages_on("flow.ev.job.dup").await, 1);
    // the same id with a different body is a conflict, not a silent success
    let reused = app.send("job.submit", json!({"job_id": "dup", "command_id": "cmd-1", "workflow_key": "report.daily", "client_id": "billing"})).await;
    assert_eq!(code(&reused), "conflict", "{reused}");
    assert_eq!(app.last_seq().await, 1);
}

#[tokio::test]
async fn a_duplicate_command_id_is_recognised_after_the_broker_window() {
    let app = spawn_app_with(LogConfig {
        duplicate_window: Duration::from_secs(1),
        ..LogConfig::default()
    })
    .await;
    let first = app.submit("late-dup", "cmd-late").await;
    assert_eq!(first["ok"], json!(true), "{first}");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // a service that never saw the command: the broker no longer remembers it
    let fresh = app.second_bus().await;
    let body = json!({"job_id": "late-dup", "command_id": "cmd-late", "workflow_key": "invoice.extract", "client_id": "billing", "input": {"n": 1}});
    let r = crate::helpers::ok(
        handle(
            &fresh,
            &caller_for("flow.cmd.job.submit"),
            "flow.cmd.job.submit",
            body.to_string().as_bytes(),
        )
        .await,
    );
    assert!(r.duplicate);
    assert_eq!(json!(r.stream_seq), first["stream_seq"]);
    assert_eq!(serde_json::to_value(&r.events).unwrap(), first["events"]);
    // also for a command that is not the aggregate's first
    let start = app
        .send(
            "job.start",
            json!({"job_id": "late-dup", "command_id": "start-1"}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let fresh = app.second_bus().await;
    let r = crate::helpers::ok(
        handle(
            &fresh,
            &caller_for("flow.cmd.job.start"),
            "flow.cmd.job.start",
            br#"{"job_id":"late-dup","command_id":"start-1"}"#,
        )
        .await,
    );
    assert!(r.duplicate);
    assert_eq!(json!(r.stream_seq), start["stream_seq"]);
    assert_eq!(app.messages_on("flow.ev.job.late-dup").await, 2);
}

#[tokio::test]
async fn a_multi_event_command_commits_all_or_nothing() {
    let app = spawn_app().await;
    app.submit("multi", "c1").await;
    let attempts = json!([{"step": "ocr", "idempotency_key": "multi:ocr:1"},
                          {"step": "llm", "idempotency_key": "multi:llm:1"}]);
    app.send(
        "job.start",
        json!({"job_id": "multi", "attempts": attempts}),
    )
    .await;
    let second =
        json!({"job_id": "multi", "step": "llm", "attempt": 2, "idempotency_key": "multi:llm:2"});
    app.send("job.start_attempt", second).await;
    let before = app.last_seq().await;
    // refused as a whole: the second step result repeats the first
    let refused = app
        .send(
            "job.complete",
            json!({"job_id": "multi", "outputs": {}, "step_results": [
            {"step": "ocr", "attempt": 1, "status": "succeeded", "duration_ms": 3},
            {"step": "ocr", "attempt": 1, "status": "succeeded", "duration_ms": 3}]}),
        )
        .await;
    assert_eq!(code(&refused), "rejected", "{refused}");
    assert_eq!(
        app.last_seq().await,
        before,
        "nothing of a refused command is appended"
    );
    // accepted as a whole: three events in one message
    let done = app
        .send(
            "job.complete",
            json!({"job_id": "multi", "outputs": {"total": 3}, "step_results": [
            {"step": "ocr", "attempt": 1, "status": "succeeded", "duration_ms": 3},
            {"step": "llm", "attempt": 2, "status": "succeeded", "duration_ms": 9}]}),
        )
        .await;
    assert_eq!(done["events"].as_array().map(Vec::len), Some(3), "{done}");
    assert_eq!(app.last_seq().await, before + 1, "one message per command");
    let msg = app.log.get(before + 1).await.unwrap().unwrap();
    let lines = envelope::decode_commit(&msg.payload).unwrap();
    let types: Vec<_> = lines.iter().map(|(_, r)| r.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["StepResultRecorded", "StepResultRecorded", "JobCompleted"]
    );
    // a commit larger than the server accepts is refused whole
    let huge = "x".repeat(2 * 1024 * 1024);
    let body = json!({"job_id": "huge", "workflow_key": "invoice.extract", "client_id": "billing", "input": {"blob": huge}});
    let big = app
        .handle("flow.cmd.job.submit", body.to_string().as_bytes())
        .await
        .unwrap_err();
    assert_eq!(big.code.as_str(), "validation", "{}", big.message);
    assert_eq!(app.last_seq().await, before + 1);
}

#[tokio::test]
async fn replay_rebuilds_the_same_aggregate_state() {
    let app = spawn_app().await;
    for i in 0..5 {
        let id = format!("replay-{i}");
        app.submit(&id, &format!("s-{i}")).await;
        let first = json!([{"step": "ocr", "idempotency_key": format!("{id}:ocr:1")}]);
        app.send("job.start", json!({"job_id": id, "attempts": first}))
            .await;
        app.send("job.record_step_result", json!({"job_id": id, "step": "ocr", "attempt": 1, "status": "failed", "error_code": "HTTP_503", "duration_ms": 20})).await;
        if i % 2 == 0 {
            app.send(
                "job.fail",
                json!({"job_id": id, "error_code": "E", "error_message": "gave up"}),
            )
            .await;
        }
    }
    // state from the cache of the running service vs. a fresh load
    let fresh = AggregateStore::<Job>::new(app.log.clone(), services());
    let mut replayed: HashMap<String, Job> = HashMap::new();
    let mut out = Vec::new();
    let n = read::replay(
        &app.log,
        &Filter {
            aggregate_type: Some("job".into()),
            ..Default::default()
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(n, 23);
    for line in String::from_utf8(out).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let r: EventRecord = serde_json::from_value(v.clone()).unwrap();
        let e = envelope::join_event(&r.event_type, r.data).unwrap();
        cqrs_es::Aggregate::apply(replayed.entry(r.aggregate_id).or_default(), e);
    }
    for i in 0..5 {
        let id = format!("replay-{i}");
        let loaded = fresh.load(&id).await.unwrap();
        let cached = app.bus.load_job_cached(&id).await.unwrap();
        assert_eq!(loaded.state, cached.state, "{id}");
        assert_eq!(loaded.state, replayed[&id], "{id}");
        assert_eq!(
            loaded.state.status,
            if i % 2 == 0 {
                JobStatus::Failed
            } else {
                JobStatus::Running
            }
        );
        assert_eq!(loaded.version, if i % 2 == 0 { 5 } else { 4 });
    }
}

#[tokio::test]
async fn cqrs_framework_runs_on_the_jetstream_store() {
    let app = spawn_app().await;
    let cqrs = CqrsFramework::new(
        AggregateStore::<Job>::new(app.log.clone(), services()),
        vec![],
        services(),
    );
    let submit: flowledger::commands::job::SubmitJob =
        serde_json::from_value(json!({"workflow_key": "report.daily", "client_id": "ops"}))
            .unwrap();
    cqrs.execute_with_metadata(
        "fw-1",
        JobCommand::Submit(submit),
        HashMap::from([("command_id".to_string(), "fw-c1".to_string())]),
    )
    .await
    .unwrap();
    cqrs.execute("fw-1", JobCommand::Start(Default::default()))
        .await
        .unwrap();
    let store = AggregateStore::<Job>::new(app.log.clone(), services());
    let events = store.load_events("fw-1").await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].metadata["command_id"], "fw-c1");
    // cqrs-es applies events once in its sink and the store must not apply them again
    let loaded = store.load("fw-1").await.unwrap();
    assert_eq!(loaded.state.status, JobStatus::Running);
    assert_eq!(loaded.version, 2);
    let err = cqrs
        .execute("fw-1", JobCommand::Start(Default::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, AggregateError::UserError(_)), "{err:?}");
}

#[tokio::test]
async fn bad_requests_append_nothing_and_name_the_field() {
    let app = spawn_app().await;
    for (command, body, field) in [
        (
            "job.submit",
            json!({"workflow_key": "invoice.extract", "client_id": "billing", "priority": 11}),
            None,
        ),
        (
            "job.submit",
            json!({"workflow_key": "invoice.extract", "client_id": "billing", "priority": "high"}),
            Some("priority"),
        ),
        (
            "job.submit",
            json!({"workflow_key": "invoice.extract", "client_id": "billing", "extra": 1}),
            Some("extra"),
        ),
        (
            "job.submit",
            json!({"client_id": "billing"}),
            Some("workflow_key"),
        ),
        (
            "job.submit",
            json!({"workflow_key": "unknown", "client_id": "billing"}),
            None,
        ),
        ("job.start", json!({}), Some("job_id")),
        (
            "approval.approve",
            json!({"approval_id": "a1", "decided_by": "x"}),
            Some("reason"),
        ),
    ] {
        let r = app.send(command, body.clone()).await;
        assert_eq!(code(&r), "validation", "{command} {body}: {r}");
        if let Some(f) = field {
            assert_eq!(r["error"]["field"], json!(f), "{command} {body}: {r}");
        }
    }
    let raw = app
        .nats_as(Who::Billing)
        .request("flow.cmd.job.submit", "{not json".into())
        .await
        .unwrap();
    let r: Value = serde_json::from_slice(&raw.payload).unwrap();
    assert_eq!(code(&r), "validation");
    let missing = app.send("job.start", json!({"job_id": "nobody"})).await;
    assert_eq!(code(&missing), "not_found", "{missing}");
    assert_eq!(app.last_seq().await, 0);
}

#[tokio::test]
async fn approvals_are_decided_once() {
    let app = spawn_app().await;
    let expires = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    app.submit("j", "submit-j").await;
    let r = app.send("approval.request", json!({"approval_id": "j", "job_id": "j", "workflow_key": "invoice.extract", "requested_by": "billing", "expires_at": expires})).await;
    assert_eq!(r["ok"], json!(true), "{r}");
    let a = app
        .send(
            "approval.approve",
            json!({"approval_id": "j", "reason": "ok", "user_id": "alice"}),
        )
        .await;
    assert_eq!(a["ok"], json!(true), "{a}");
    let b = app
        .send(
            "approval.reject",
            json!({"approval_id": "j", "reason": "no"}),
        )
        .await;
    assert_eq!(code(&b), "rejected", "{b}");
    let early = app
        .send("approval.expire", json!({"approval_id": "j"}))
        .await;
    assert_eq!(code(&early), "rejected");
    let msg = app.log.get(3).await.unwrap().unwrap();
    let (_, rec) = envelope::decode_commit(&msg.payload).unwrap().remove(0);
    assert_eq!(rec.actor.user_id.as_deref(), Some("alice"));
    assert_eq!(rec.event_type, "ApprovalGranted");
}
