//! Callers the broker vouches for (docs/adr/0008-nats-identity.md): every
//! test sends real requests over real connections to a nats-server running
//! nats/production.conf (or nats/dev.conf), never through the in-process
//! `handle()`.

use std::sync::{Arc, Mutex};

use flowledger::api::broker_identity::REQUEST_INFO_HEADER;
use flowledger::events::envelope::{self, EventRecord};
use flowledger::events::log::LogConfig;
use serde_json::{json, Value};

use crate::helpers::*;

/// The stored event at `seq` (the first of its commit).
async fn event_at(app: &TestApp, seq: u64) -> EventRecord {
    let msg = app.log.get(seq).await.expect("read").expect("a message");
    envelope::decode_commit(&msg.payload)
        .expect("a commit")
        .remove(0)
        .1
}

/// A job submitted by billing with a pending approval requested by ops.
async fn pending_approval(app: &TestApp, job: &str) {
    let r = app.submit(job, &format!("submit-{job}")).await;
    assert_eq!(r["ok"], true, "{r}");
    let expires = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let r = app
        .send(
            "approval.request",
            json!({"job_id": job, "workflow_key": "invoice.extract", "requested_by": "billing", "expires_at": expires}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

/// A request with headers, as `who`.
async fn send_with_headers(
    app: &TestApp,
    who: Who,
    command: &str,
    headers: async_nats::HeaderMap,
    body: Value,
) -> Value {
    let reply = app
        .nats_as(who)
        .request_with_headers(
            format!("flow.cmd.{command}"),
            headers,
            body.to_string().into(),
        )
        .await
        .expect("a reply from the intake");
    serde_json::from_slice(&reply.payload).expect("replies are JSON")
}

fn forged(acc: &str, user: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        REQUEST_INFO_HEADER,
        json!({"acc": acc, "user": user, "kind": "Client"})
            .to_string()
            .as_str(),
    );
    h
}

#[tokio::test]
async fn an_approval_from_a_client_is_forbidden_and_appends_nothing() {
    let app = spawn_app().await;
    pending_approval(&app, "pay-1").await;
    let before = app.last_seq().await;
    for command in ["approval.approve", "approval.reject"] {
        let r = app
            .send_as(
                Who::Billing,
                command,
                json!({"approval_id": "pay-1", "reason": "looks fine", "actor": {"client_id": "ops"}}),
            )
            .await;
        assert_eq!(code(&r), "forbidden", "{command}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("operator role"),
            "{r}"
        );
    }
    // a forged Nats-Request-Info is replaced by the broker's
    let r = send_with_headers(
        &app,
        Who::Billing,
        "approval.approve",
        forged("OPERATORS", "ops"),
        json!({"approval_id": "pay-1", "reason": "forged"}),
    )
    .await;
    assert_eq!(code(&r), "forbidden", "{r}");
    assert_eq!(app.last_seq().await, before, "nothing appended");
}

#[tokio::test]
async fn an_operators_approval_is_attributed_to_the_operator_whatever_the_body_says() {
    let app = spawn_app().await;
    pending_approval(&app, "pay-2").await;
    let r = send_with_headers(
        &app,
        Who::Ops,
        "approval.approve",
        forged("CLIENTS", "mallory"),
        json!({"approval_id": "pay-2", "reason": "invoice checked",
               "actor": {"client_id": "mallory", "user_id": "alice"}}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let seq = r["stream_seq"].as_u64().expect("a sequence");
    let event = event_at(&app, seq).await;
    assert_eq!(event.event_type, "ApprovalGranted");
    assert_eq!(
        event.actor.client_id, "ops",
        "the broker's user, not the body's"
    );
    assert_eq!(event.actor.user_id.as_deref(), Some("alice"));
    assert_eq!(event.data["decided_by"], "ops");
    // the approval request was attributed to its sender too
    let requested = event_at(&app, seq - 1).await;
    assert_eq!(
        (
            requested.event_type.as_str(),
            requested.actor.client_id.as_str()
        ),
        ("ApprovalRequested", "ops")
    );
}

#[tokio::test]
async fn a_decision_naming_another_decider_is_forbidden() {
    let app = spawn_app().await;
    pending_approval(&app, "pay-3").await;
    let before = app.last_seq().await;
    let r = app
        .send(
            "approval.approve",
            json!({"approval_id": "pay-3", "reason": "ok", "decided_by": "alice"}),
        )
        .await;
    assert_eq!(code(&r), "forbidden", "{r}");
    assert_eq!(app.last_seq().await, before);
}

#[tokio::test]
async fn the_handlers_commands_are_accepted_only_from_the_handler() {
    let app = spawn_app().await;
    app.submit("h-1", "submit-h-1").await;
    let before = app.last_seq().await;
    for who in [Who::Billing, Who::Ops] {
        for (command, body) in [
            ("job.start", json!({"job_id": "h-1"})),
            (
                "job.complete",
                json!({"job_id": "h-1", "outputs": {"total": 1}}),
            ),
            (
                "job.fail",
                json!({"job_id": "h-1", "error_code": "E", "error_message": "m"}),
            ),
        ] {
            let r = app.send_as(who, command, body).await;
            assert_eq!(code(&r), "forbidden", "{command} from {who:?}: {r}");
            assert!(
                r["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("handler role"),
                "{r}"
            );
        }
    }
    assert_eq!(app.last_seq().await, before, "nothing appended");
    let r = app
        .send_as(Who::Handler, "job.start", json!({"job_id": "h-1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = app
        .send_as(Who::Handler, "job.complete", json!({"job_id": "h-1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let done = event_at(&app, r["stream_seq"].as_u64().expect("a sequence")).await;
    assert_eq!(
        (done.event_type.as_str(), done.actor.client_id.as_str()),
        ("JobCompleted", "handler")
    );
    // and the handler submits no jobs, decides no approvals
    let r = app
        .send_as(
            Who::Handler,
            "job.submit",
            json!({"workflow_key": "invoice.extract"}),
        )
        .await;
    assert_eq!(code(&r), "forbidden", "{r}");
}

#[tokio::test]
async fn a_client_submits_and_cancels_only_its_own_jobs() {
    let app = spawn_app().await;
    // client_id is the caller's when left out; another one is refused
    let r = app
        .send(
            "job.submit",
            json!({"job_id": "own-1", "workflow_key": "invoice.extract"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let submitted = event_at(&app, r["stream_seq"].as_u64().expect("a sequence")).await;
    assert_eq!(submitted.data["client_id"], "billing");
    assert_eq!(submitted.actor.client_id, "billing");
    let r = app
        .send(
            "job.submit",
            json!({"job_id": "own-2", "workflow_key": "invoice.extract", "client_id": "ops"}),
        )
        .await;
    assert_eq!(code(&r), "forbidden", "{r}");
    // an operator's job: billing's cancel answers as for a missing job
    let r = app
        .send_as(
            Who::Ops,
            "job.submit",
            json!({"job_id": "ops-1", "workflow_key": "report.daily"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let before = app.last_seq().await;
    let others = app
        .send("job.cancel", json!({"job_id": "ops-1", "reason": "mine?"}))
        .await;
    let missing = app
        .send("job.cancel", json!({"job_id": "nobody", "reason": "x"}))
        .await;
    assert_eq!(code(&others), "not_found", "{others}");
    assert_eq!(code(&missing), "not_found", "{missing}");
    assert_eq!(
        others["error"]["message"]
            .as_str()
            .map(|m| m.replace("ops-1", "<id>")),
        missing["error"]["message"]
            .as_str()
            .map(|m| m.replace("nobody", "<id>")),
        "another client's job and a missing one answer alike"
    );
    assert_eq!(app.last_seq().await, before, "nothing appended");
    let r = app
        .send(
            "job.cancel",
            json!({"job_id": "own-1", "reason": "changed my mind"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    // an operator cancels any job
    let r = app
        .send_as(
            Who::Ops,
            "job.cancel",
            json!({"job_id": "ops-1", "reason": "done"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

/// Server errors a connection reports (permission violations).
fn violations_of(
    options: async_nats::ConnectOptions,
) -> (async_nats::ConnectOptions, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let options = options.event_callback(move |event| {
        let s = s.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                s.lock()
                    .expect("not poisoned")
                    .push(e.to_string().to_lowercase());
            }
        }
    });
    (options, seen)
}

async fn wait_for_violation(seen: &Arc<Mutex<Vec<String>>>, subject: &str) {
    let subject = subject.to_lowercase();
    let found = || {
        seen.lock()
            .expect("not poisoned")
            .iter()
            .any(|e| e.contains("permissions violation") && e.contains(&subject))
    };
    eventually(&format!("a permissions violation for {subject}"), found).await;
}

#[tokio::test]
async fn the_service_account_cannot_send_commands_so_no_header_can_be_forged_inside_it() {
    let app = spawn_app().await;
    pending_approval(&app, "pay-4").await;
    let before = app.last_seq().await;
    let (options, seen) = violations_of(app.nats.options(Who::Service));
    let service = options.connect(&app.nats.url).await.expect("connect");
    service
        .publish_with_headers(
            "flow.cmd.approval.approve",
            forged("OPERATORS", "ops"),
            json!({"approval_id": "pay-4", "reason": "forged inside"})
                .to_string()
                .into(),
        )
        .await
        .expect("handed to the connection");
    wait_for_violation(&seen, "flow.cmd.approval.approve").await;
    // a command sent after it is answered, and only it is appended
    let r = app
        .send(
            "approval.reject",
            json!({"approval_id": "pay-4", "reason": "no"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(app.last_seq().await, before + 1);
    assert_eq!(
        event_at(&app, before + 1).await.event_type,
        "ApprovalRejected"
    );
}

#[tokio::test]
async fn a_client_reads_neither_the_commands_nor_the_replies_of_others() {
    let app = spawn_app().await;
    let (options, seen) = violations_of(app.nats.options(Who::Billing));
    let billing = options.connect(&app.nats.url).await.expect("connect");
    for subject in ["flow.cmd.>", "_INBOX_ops.>", "_INBOX.>", "$JS.API.>"] {
        let _sub = billing
            .subscribe(subject.to_string())
            .await
            .expect("handed to the connection");
        wait_for_violation(&seen, subject).await;
    }
    // nor uses JetStream: its account has none
    billing
        .publish("$JS.API.STREAM.INFO.FLOW_EVENTS", "".into())
        .await
        .expect("handed to the connection");
    wait_for_violation(&seen, "$JS.API.STREAM.INFO.FLOW_EVENTS").await;
}

#[tokio::test]
async fn a_connection_without_a_known_credential_gets_nothing_through() {
    let app = spawn_app().await;
    let before = app.last_seq().await;
    let ca = app.nats.ca.clone().expect("the production config has TLS");
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(&app.nats.url)
        .await;
    assert!(anonymous.is_err(), "a connection without a credential");
    let wrong = async_nats::ConnectOptions::new()
        .user_and_password("billing".into(), "not-the-password".into())
        .add_root_certificates(ca)
        .require_tls(true)
        .connect(&app.nats.url)
        .await;
    assert!(wrong.is_err(), "a wrong password");
    // without TLS the server does not even take the password
    let plain = async_nats::ConnectOptions::new()
        .user_and_password(
            "billing".into(),
            password(ServerConf::Production, Who::Billing),
        )
        .connect(&app.nats.url)
        .await;
    assert!(plain.is_err(), "a plaintext connection to a TLS server");
    assert_eq!(app.last_seq().await, before, "nothing appended");
}

#[tokio::test]
async fn the_intake_does_not_start_on_a_server_that_cannot_vouch_for_senders() {
    // no accounts: any connection could write Nats-Request-Info itself
    let nats = NatsServer::start_with(ServerConf::Open);
    let client = nats.connect(Who::Service).await;
    let config = LogConfig::default();
    flowledger::events::log::init(&client, &config)
        .await
        .expect("init streams");
    let log = flowledger::events::log::EventLog::open(client.clone(), config)
        .await
        .expect("open the log");
    match flowledger::app::Application::build(intake_settings(client, log.clone())).await {
        Err(e @ flowledger::app::BuildError::CommandsNotVouched) => {
            assert!(e.to_string().contains("nats/production.conf"), "{e}")
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("the intake started on a server without accounts"),
    }
    // nobody answers commands, nothing is appended
    let r = nats
        .connect(Who::Billing)
        .await
        .request(
            "flow.cmd.job.submit",
            r#"{"workflow_key":"invoice.extract"}"#.into(),
        )
        .await;
    assert!(r.is_err(), "{:?}", r.map(|m| m.payload));
    assert_eq!(log.last_seq().await.expect("stream info"), 0);
}

#[tokio::test]
async fn the_development_config_vouches_like_the_production_one() {
    let app = spawn_app_on(
        NatsServer::start_with(ServerConf::Dev),
        LogConfig::default(),
    )
    .await;
    pending_approval(&app, "dev-1").await;
    let r = app
        .send_as(
            Who::Billing,
            "approval.approve",
            json!({"approval_id": "dev-1", "reason": "ok"}),
        )
        .await;
    assert_eq!(code(&r), "forbidden", "{r}");
    let r = app
        .send(
            "approval.approve",
            json!({"approval_id": "dev-1", "reason": "ok"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let event = event_at(&app, r["stream_seq"].as_u64().expect("a sequence")).await;
    assert_eq!(event.actor.client_id, "ops");
}

#[tokio::test]
async fn the_cli_sends_as_its_credential_and_never_shows_a_password() {
    let app = spawn_app().await;
    pending_approval(&app, "cli-1").await;
    let before = app.last_seq().await;
    // run without blocking: this test's runtime also runs the intake
    let send = |who: Who| {
        let mut cmd = app.nats.cli(who);
        cmd.args([
            "send",
            "approval.approve",
            r#"{"approval_id":"cli-1","reason":"ok"}"#,
        ]);
        async move {
            tokio::process::Command::from(cmd)
                .output()
                .await
                .expect("run flowledger")
        }
    };
    let as_client = send(Who::Billing).await;
    assert_eq!(as_client.status.code(), Some(1), "refused");
    let reply: Value = serde_json::from_slice(&as_client.stdout).expect("the reply");
    assert_eq!(code(&reply), "forbidden", "{reply}");
    assert_eq!(app.last_seq().await, before);
    let as_operator = send(Who::Ops).await;
    assert_eq!(
        as_operator.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&as_operator.stderr)
    );
    let reply: Value = serde_json::from_slice(&as_operator.stdout).expect("the reply");
    let event = event_at(&app, reply["stream_seq"].as_u64().expect("a sequence")).await;
    assert_eq!(event.actor.client_id, "ops");
    // a wrong password: refused (exit 2), and the password is not shown
    let wrong = app
        .nats
        .cli(Who::Ops)
        .env("FLOWLEDGER_NATS_PASSWORD", "wr0ng-s3cret")
        .args(["audit", "digest"])
        .output()
        .expect("run flowledger");
    assert_eq!(wrong.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("authorization violation"), "{stderr}");
    assert!(!stderr.contains("wr0ng-s3cret"), "{stderr}");
    // the service's credential reads the log
    let digest = app
        .nats
        .cli(Who::Service)
        .args(["audit", "digest"])
        .output()
        .expect("run flowledger");
    assert_eq!(digest.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&digest.stdout).starts_with(&format!("{}:", before + 1)));
}
