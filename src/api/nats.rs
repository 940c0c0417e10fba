//! Command intake: `flow.cmd.<aggregate_type>.<command>` over NATS
//! request/reply. JSON in; JSON out: a receipt or `{code, message}`.
//! The caller is the one the broker vouches for (`broker_identity`), never
//! a body field; its role decides which commands it may send ([`roles`]).
//! Nothing is appended unless the caller may send the command and the
//! whole request is valid.

use std::sync::Arc;
use tracing::Instrument;

use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::body::{from_fields, parse_object};
use super::broker_identity::Accounts;
use super::caller::{Caller, Role};
use crate::bus::{ids, CommandBus, CommandError};
use crate::commands::approval::{ApprovalCommand, Decide, RequestApproval};
use crate::commands::job::{
    CancelJob, CompleteJob, FailJob, JobCommand, RecordCallback, RecordStepResult, StartAttempt,
    StartJob, SubmitJob,
};
use crate::commands::ErrorCode;
use crate::events::chain;
use crate::events::envelope::CommandMeta;
use crate::events::log::valid_aggregate_id;
use crate::events::store::Receipt;
use crate::memory::service::MemoryService;
use crate::secrets::service::SecretService;

/// The subject prefix commands are requested on:
/// `flow.cmd.<aggregate_type>.<command>`.
pub const COMMAND_SUBJECT_PREFIX: &str = "flow.cmd";
/// The queue group the intake subscribes in, so several `serve` processes
/// share the commands.
pub const INTAKE_QUEUE_GROUP: &str = "flowledger-intake";

/// A secret read (`api::secrets::read`); its reply holds the value.
pub const SECRET_READ_SUBJECT: &str = "flow.cmd.secret.read";
/// The memory commands and `assemble`: `flow.cmd.memory.<command>`
/// (`api::memory::COMMANDS`).
pub const MEMORY_SUBJECT_PREFIX: &str = "flow.cmd.memory.";
/// An operator's invalidation of a secret path's cache.
pub const SECRET_INVALIDATE_SUBJECT: &str = "flow.cmd.secret.invalidate";

/// The commands the intake knows, as `<aggregate_type>.<command>`.
pub const KNOWN_COMMANDS: &[&str] = &[
    "job.submit",
    "job.start",
    "job.start_attempt",
    "job.record_step_result",
    "job.complete",
    "job.fail",
    "job.cancel",
    "job.retry",
    "job.record_callback",
    "approval.request",
    "approval.approve",
    "approval.reject",
    "approval.expire",
];

/// Who may send `command` (`<aggregate_type>.<command>`) over NATS;
/// `None` for an unknown command. Clients and operators submit and cancel
/// jobs (a client only its own); approvals are the operators' (the handler
/// also requests and expires them); the handler's own commands are the
/// handler's alone.
pub fn roles(command: &str) -> Option<&'static [Role]> {
    Some(match command {
        "job.submit" | "job.cancel" | "job.retry" => &[Role::Client, Role::Operator],
        "job.start"
        | "job.start_attempt"
        | "job.record_step_result"
        | "job.complete"
        | "job.fail"
        | "job.record_callback" => &[Role::Handler],
        "approval.approve" | "approval.reject" => &[Role::Operator],
        "approval.request" | "approval.expire" => &[Role::Operator, Role::Handler],
        _ => return None,
    })
}

/// The reply to an accepted command: the receipt with `"ok": true`.
pub fn receipt_json(r: &Receipt) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["ok"] = json!(true);
    v
}

pub(super) enum Parsed {
    Job(String, JobCommand),
    Approval(String, ApprovalCommand),
    /// `job.retry` of the job: two commands, issued by
    /// [`CommandBus::retry_job`].
    Retry(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, CommandError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => Ok(Some(s)),
        Some(Value::String(_)) => Err(CommandError::validation(
            Some(key),
            format!("field `{key}`: must be 1-128 characters"),
        )),
        Some(other) => Err(CommandError::validation(
            Some(key),
            format!("field `{key}`: expected a string, got {other}"),
        )),
    }
}

fn take_id(
    map: &mut Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<String, CommandError> {
    match take_string(map, key)? {
        Some(id) if valid_aggregate_id(&id) => Ok(id),
        Some(id) => Err(CommandError::validation(
            Some(key),
            format!("field `{key}`: {id:?} is not a valid id (1-128 of A-Z a-z 0-9 _ -)"),
        )),
        None if required => Err(CommandError::validation(
            Some(key),
            format!("missing field `{key}`"),
        )),
        None => Ok(Uuid::now_v7().to_string()),
    }
}

/// Parses a request body for `aggregate_type.command` from `caller` into a
/// command and its metadata; the actor is `caller`. A field that names the
/// caller (`client_id` of `job.submit`, `decided_by`) is the caller's id
/// when absent ([`check_caller`] refuses another). Pure: no I/O; every
/// error is `validation`.
pub(super) fn parse(
    caller: &Caller,
    aggregate_type: &str,
    command: &str,
    body: &[u8],
) -> Result<(Parsed, CommandMeta), CommandError> {
    let value = parse_object(body, false)?;
    // the same command id and body from another caller is another command
    let command_hash = chain::to_hex(&chain::sha256(
        json!({"client_id": caller.client_id, "body": value})
            .to_string()
            .as_bytes(),
    ));
    let Value::Object(mut map) = value else {
        unreachable!("parse_object returns an object")
    };
    let command_id = match take_string(&mut map, "command_id")? {
        Some(id) if !ids::caller_chosen_is_valid(&id) => {
            return Err(CommandError::validation(
                Some("command_id"),
                "field `command_id`: must not contain `:` (reserved for ids flowledger derives) or control characters",
            ))
        }
        Some(id) => id,
        None => Uuid::now_v7().to_string(),
    };
    let correlation_id =
        take_string(&mut map, "correlation_id")?.unwrap_or_else(|| command_id.clone());
    let causation_id = take_string(&mut map, "causation_id")?.unwrap_or_else(|| command_id.clone());
    let user_id = take_string(&mut map, "user_id")?;
    // `actor` is what senders wrote before the broker vouched for them: its
    // client_id is ignored, its user_id kept
    let actor: Option<ActorIn> = match map.remove("actor") {
        None | Some(Value::Null) => None,
        Some(v) => Some(from_fields::<ActorIn>(v).map_err(|mut e| {
            e.field = Some(match e.field.take() {
                Some(f) if f.starts_with('[') => format!("actor{f}"),
                Some(f) => format!("actor.{f}"),
                // `actor` itself is wrong (not an object): name it
                None => {
                    e.message = format!("field `actor`: {}", e.message);
                    "actor".into()
                }
            });
            e
        })?),
    };
    let user_id = match (user_id, actor.and_then(|a| a.user_id)) {
        (Some(u), Some(a)) if u != a => {
            return Err(CommandError::validation(
                Some("user_id"),
                "field `user_id`: differs from `actor.user_id`; give one of them",
            ))
        }
        (u, a) => u.or(a),
    };
    // a field naming the caller is the caller when absent
    let default_to_caller = |key: &str, map: &mut Map<String, Value>| {
        if matches!(map.get(key), None | Some(Value::Null)) {
            map.insert(key.into(), json!(caller.client_id));
        }
    };
    match (aggregate_type, command) {
        ("job", "submit") => default_to_caller("client_id", &mut map),
        ("approval", "approve" | "reject") => default_to_caller("decided_by", &mut map),
        _ => {}
    }
    let now = Utc::now();
    let fields = Value::Object(map);
    let rest = |id_key: &str, required: bool| -> Result<(String, Value), CommandError> {
        let Value::Object(mut m) = fields.clone() else {
            unreachable!("fields is an object")
        };
        let id = take_id(&mut m, id_key, required)?;
        Ok((id, Value::Object(m)))
    };
    let parsed = match (aggregate_type, command) {
        ("job", "submit") => {
            let (id, v) = rest("job_id", false)?;
            Parsed::Job(id, JobCommand::Submit(from_fields::<SubmitJob>(v)?))
        }
        ("job", "start") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(id, JobCommand::Start(from_fields::<StartJob>(v)?))
        }
        ("job", "start_attempt") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(
                id,
                JobCommand::StartAttempt(from_fields::<StartAttempt>(v)?),
            )
        }
        ("job", "record_callback") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(
                id,
                JobCommand::RecordCallback(from_fields::<RecordCallback>(v)?),
            )
        }
        ("job", "record_step_result") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(
                id,
                JobCommand::RecordStepResult(from_fields::<RecordStepResult>(v)?),
            )
        }
        ("job", "complete") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(id, JobCommand::Complete(from_fields::<CompleteJob>(v)?))
        }
        ("job", "fail") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(id, JobCommand::Fail(from_fields::<FailJob>(v)?))
        }
        ("job", "cancel") => {
            let (id, v) = rest("job_id", true)?;
            Parsed::Job(id, JobCommand::Cancel(from_fields::<CancelJob>(v)?))
        }
        ("job", "retry") => {
            let (id, v) = rest("job_id", true)?;
            from_fields::<NoFields>(v)?;
            Parsed::Retry(id)
        }
        ("approval", "request") => {
            // a job's approval has the job's id: approval_id defaults to job_id
            let Value::Object(mut m) = fields.clone() else {
                unreachable!("fields is an object")
            };
            if !m.contains_key("approval_id") {
                if let Some(job_id) = m.get("job_id").cloned() {
                    m.insert("approval_id".into(), job_id);
                }
            }
            let id = take_id(&mut m, "approval_id", true)?;
            let v = Value::Object(m);
            Parsed::Approval(
                id,
                ApprovalCommand::Request {
                    request: from_fields::<RequestApproval>(v)?,
                    at: now,
                },
            )
        }
        ("approval", "approve") => {
            let (id, v) = rest("approval_id", true)?;
            Parsed::Approval(
                id,
                ApprovalCommand::Approve {
                    decision: from_fields::<Decide>(v)?,
                    at: now,
                },
            )
        }
        ("approval", "reject") => {
            let (id, v) = rest("approval_id", true)?;
            Parsed::Approval(
                id,
                ApprovalCommand::Reject {
                    decision: from_fields::<Decide>(v)?,
                    at: now,
                },
            )
        }
        ("approval", "expire") => {
            let (id, v) = rest("approval_id", true)?;
            from_fields::<NoFields>(v)?;
            Parsed::Approval(id, ApprovalCommand::Expire { at: now })
        }
        _ => return Err(unknown_command(aggregate_type, command)),
    };
    Ok((
        parsed,
        CommandMeta {
            command_id,
            actor: caller.actor(user_id),
            correlation_id,
            causation_id,
            command_hash,
        },
    ))
}

/// The `actor` field senders wrote before the broker vouched for them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorIn {
    /// Ignored: the caller is who the broker says.
    #[serde(rename = "client_id")]
    _client_id: Option<String>,
    user_id: Option<String>,
}

/// Refuses a parsed command whose body names another party than `caller`
/// where only the caller may stand: a submission's `client_id` (a caller
/// submits only its own jobs, as over HTTP) and a decision's `decided_by`
/// (the person goes in `user_id`). Code `forbidden`.
pub(super) fn check_caller(caller: &Caller, parsed: &Parsed) -> Result<(), CommandError> {
    match parsed {
        Parsed::Job(_, JobCommand::Submit(s)) => {
            caller.check_names_self("client_id", Some(&s.client_id))
        }
        Parsed::Approval(
            _,
            ApprovalCommand::Approve { decision, .. } | ApprovalCommand::Reject { decision, .. },
        ) => caller.check_names_self("decided_by", Some(&decision.decided_by)),
        _ => Ok(()),
    }
}

fn unknown_command(aggregate_type: &str, command: &str) -> CommandError {
    let known = KNOWN_COMMANDS.join(", ");
    let message = format!("unknown command {aggregate_type}.{command}: known are {known}");
    CommandError::validation(None, message)
}

/// Handles one request from `caller` addressed to `subject`: checks the
/// caller's role for the command, parses, checks the body names no one
/// else, and for `job.cancel` and `job.retry` that the job is the caller's
/// (another client's job answers `not_found`, like a missing one), then
/// executes. A retry answers the receipt of the new job's submission (its
/// `aggregate_id` is the new job's id).
/// Never panics on input.
pub async fn handle(
    bus: &CommandBus,
    caller: &Caller,
    subject: &str,
    body: &[u8],
) -> Result<Arc<Receipt>, CommandError> {
    let rest = subject
        .strip_prefix(COMMAND_SUBJECT_PREFIX)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or("");
    let mut parts = rest.split('.');
    let (Some(aggregate_type), Some(command), None) = (parts.next(), parts.next(), parts.next())
    else {
        let message = format!(
            "subject {subject:?} is not {COMMAND_SUBJECT_PREFIX}.<aggregate_type>.<command>"
        );
        return Err(CommandError::validation(None, message));
    };
    let name = format!("{aggregate_type}.{command}");
    let roles = roles(&name).ok_or_else(|| unknown_command(aggregate_type, command))?;
    // no command list names the auditor; refused here too, whatever the list
    caller.require_may_command(&name)?;
    caller.require(roles, &name).map_err(|mut e| {
        e.message
            .push_str(" (a NATS user's role is its account's: [nats] in the configuration)");
        e
    })?;
    let (parsed, meta) = parse(caller, aggregate_type, command, body)?;
    check_caller(caller, &parsed)?;
    if let Parsed::Job(id, JobCommand::Cancel(_)) | Parsed::Retry(id) = &parsed {
        caller.check_job(bus, id).await?;
    }
    // a job's approval has the job's id; a retry names the job retried
    let (Parsed::Job(id, _) | Parsed::Approval(id, _) | Parsed::Retry(id)) = &parsed;
    tracing::Span::current().record("job_id", id.as_str());
    match parsed {
        Parsed::Job(id, c) => bus.job(&id, c, &meta).await.map_err(Into::into),
        Parsed::Approval(id, c) => bus.approval(&id, c, &meta).await.map_err(Into::into),
        Parsed::Retry(id) => match bus.retry_job(&id, &meta).await {
            Ok(r) => Ok(r.receipt),
            Err(e) => Err(e.into()),
        },
    }
}

/// Subscribes to `flow.cmd.>` in the queue group `flowledger-intake`, so
/// several `serve` processes share the load.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
    let sub = client
        .queue_subscribe(
            format!("{COMMAND_SUBJECT_PREFIX}.>"),
            INTAKE_QUEUE_GROUP.to_string(),
        )
        .await?;
    tracing::info!("command intake listening on {COMMAND_SUBJECT_PREFIX}.>");
    Ok(sub)
}

/// Answers the requests of `sub` until the subscription ends; each request
/// runs in its own task. The caller of each is the one the broker names in
/// its `Nats-Request-Info` header, its role given by `accounts`; a request
/// without one is refused `unauthenticated`. Refusals for who the caller
/// is are counted in `flowledger_nats_commands_refused_total{code}`.
pub async fn serve(
    bus: Arc<CommandBus>,
    secrets: Option<Arc<SecretService>>,
    memory: Option<Arc<MemoryService>>,
    pool: Option<sqlx::PgPool>,
    client: async_nats::Client,
    sub: async_nats::Subscriber,
    accounts: Arc<Accounts>,
) {
    serve_until_drained(bus, secrets, memory, pool, client, sub, accounts, None).await
}

/// [`serve`], and when `drain` turns true (the service is stopping), the
/// subscription is drained: the server sends this queue group's next
/// commands to the other instances (none left: the sender gets "no
/// responders" at once), the ones already delivered here are still
/// answered, and the function returns once every reply is sent.
#[allow(clippy::too_many_arguments)]
pub async fn serve_until_drained(
    bus: Arc<CommandBus>,
    secrets: Option<Arc<SecretService>>,
    memory: Option<Arc<MemoryService>>,
    pool: Option<sqlx::PgPool>,
    client: async_nats::Client,
    mut sub: async_nats::Subscriber,
    accounts: Arc<Accounts>,
    mut drain: Option<tokio::sync::watch::Receiver<bool>>,
) {
    // every command delivered here is answered before the loop returns,
    // a drain's included: the stop awaits this function
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let drained = async {
            match drain.as_mut() {
                Some(d) => {
                    let _ = d.wait_for(|d| *d).await;
                }
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            m = sub.next() => match m {
                Some(m) => m,
                None => break,
            },
            () = drained => {
                drain = None;
                match sub.drain().await {
                    Ok(()) => {
                        // said once the server has the unsubscribe: an echo
                        // sent after it comes back after it was processed
                        let _ = echo(&client).await;
                        tracing::info!("draining: the command intake takes no new command \
                            (the other instances of its queue group do)");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot drain the command \
                        subscription; the intake stops with the service"),
                }
                continue;
            }
        };
        let bus = bus.clone();
        let secrets = secrets.clone();
        let memory = memory.clone();
        let pool = pool.clone();
        let client = client.clone();
        let accounts = accounts.clone();
        // the command's span, a child of a valid `traceparent` header
        let span = crate::telemetry::intake_span(
            "nats",
            msg.subject
                .as_str()
                .strip_prefix(COMMAND_SUBJECT_PREFIX)
                .map_or("", |s| s.trim_start_matches('.')),
        );
        let parent = crate::telemetry::header_of(msg.headers.as_ref());
        crate::telemetry::adopt(&span, parent.as_deref());
        running.spawn(async move {
            let subject = msg.subject.as_str();
            let handled = match accounts.caller(msg.headers.as_ref()) {
                // the secrets door answers with the value, not a receipt
                Ok(caller) if subject == SECRET_READ_SUBJECT => {
                    super::secrets::read(&bus, secrets.as_deref(), &caller, &msg.payload).await
                }
                Ok(caller) if subject == SECRET_INVALIDATE_SUBJECT => {
                    super::secrets::invalidate(&bus, secrets.as_deref(), &caller, &msg.payload)
                        .await
                }
                Ok(caller) if subject.starts_with(MEMORY_SUBJECT_PREFIX) => {
                    let name = &subject[MEMORY_SUBJECT_PREFIX.len()..];
                    let service = memory.as_deref();
                    if name == "assemble" {
                        super::memory::assemble(&bus, pool.as_ref(), service, &caller, &msg.payload)
                            .await
                            .or_else(|e| Ok(e.to_json()))
                    } else {
                        // header names as HTTP's: in any case
                        let values = msg.headers.iter().flat_map(|h| h.iter()).flat_map(
                            |(name, values)| {
                                let ours = AsRef::<str>::as_ref(name)
                                    .eq_ignore_ascii_case(super::write::IDEMPOTENCY_KEY);
                                values
                                    .iter()
                                    .filter(move |_| ours)
                                    .map(|v| Some(v.as_str()))
                            },
                        );
                        match super::write::checked_idempotency_key(values) {
                            Ok(key) => {
                                super::memory::command(
                                    &bus,
                                    service,
                                    &caller,
                                    name,
                                    &msg.payload,
                                    key.as_deref(),
                                )
                                .await
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
                Ok(caller) => handle(&bus, &caller, subject, &msg.payload)
                    .await
                    .map(|r| receipt_json(&r)),
                Err(e) => Err(e),
            };
            let reply = match handled {
                Ok(r) => r,
                Err(e) => {
                    if matches!(e.code, ErrorCode::Unauthenticated | ErrorCode::Forbidden) {
                        metrics::counter!(
                            "flowledger_nats_commands_refused_total",
                            "code" => e.code.as_str()
                        )
                        .increment(1);
                        tracing::debug!(subject = %msg.subject, code = e.code.as_str(), error = %e, "command refused");
                    }
                    e.to_json()
                }
            };
            if let Some(to) = msg.reply {
                if let Err(e) = client.publish(to, reply.to_string().into()).await {
                    tracing::warn!(error = %e, "could not send a command reply");
                }
            }
        }.instrument(span));
    }
    while running.join_next().await.is_some() {}
    // the replies are in the client's buffer: out before the process ends
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not send the last command replies");
    }
}

/// Returns once the server has processed what `client` sent before (or
/// after 10 s): a message to its own inbox comes back only after them.
async fn echo(client: &async_nats::Client) -> Result<(), async_nats::Error> {
    let inbox = client.new_inbox();
    let mut back = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, bytes::Bytes::new()).await?;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), back.next()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: &str, role: Role) -> Caller {
        Caller::new(id, role)
    }

    fn billing() -> Caller {
        caller("billing", Role::Client)
    }

    fn err(t: &str, c: &str, body: &str) -> CommandError {
        match parse(&billing(), t, c, body.as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("{t}.{c} {body} should be refused"),
        }
    }

    #[test]
    fn malformed_json_is_validation() {
        let e = err("job", "submit", "{not json");
        assert_eq!(e.code, ErrorCode::Validation);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err(
            "job",
            "submit",
            r#"{"workflow_key":"a","client_id":"c","colour":"red"}"#,
        );
        assert_eq!(e.field.as_deref(), Some("colour"));
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err(
            "job",
            "submit",
            r#"{"workflow_key":"a","client_id":"c","priority":300}"#,
        );
        assert_eq!(e.field.as_deref(), Some("priority"));
        let e = err(
            "job",
            "record_step_result",
            r#"{"job_id":"j","step":"s","attempt":1,"status":"weird","duration_ms":1}"#,
        );
        assert_eq!(e.field.as_deref(), Some("status"));
    }

    #[test]
    fn missing_field_is_named() {
        let e = err("job", "submit", r#"{"client_id":"c"}"#);
        assert_eq!(e.field.as_deref(), Some("workflow_key"));
        let e = err("job", "start", r#"{}"#);
        assert_eq!(e.field.as_deref(), Some("job_id"));
    }

    #[test]
    fn bad_ids_and_unknown_commands_are_refused() {
        assert_eq!(
            err("job", "start", r#"{"job_id":"a.b"}"#).field.as_deref(),
            Some("job_id")
        );
        assert_eq!(err("job", "explode", "{}").code, ErrorCode::Validation);
        assert_eq!(err("job", "submit", "[1]").code, ErrorCode::Validation);
        assert_eq!(
            err("job", "submit", r#"{"command_id":7}"#).field.as_deref(),
            Some("command_id")
        );
        assert_eq!(
            err(
                "job",
                "submit",
                r#"{"workflow_key":"a","client_id":"c","actor":{"client":"x"}}"#
            )
            .field
            .as_deref(),
            Some("actor.client")
        );
    }

    #[test]
    fn same_body_same_hash_regardless_of_spacing_another_caller_another_hash() {
        let h = caller("handler", Role::Handler);
        let (_, a) = parse(&h, "job", "start", br#"{"job_id":"j","command_id":"c"}"#).unwrap();
        let (_, b) = parse(
            &h,
            "job",
            "start",
            br#"{ "command_id": "c",  "job_id": "j" }"#,
        )
        .unwrap();
        assert_eq!(a.command_hash, b.command_hash);
        assert_eq!(a.command_id, "c");
        let other = caller("handler-2", Role::Handler);
        let (_, c) = parse(
            &other,
            "job",
            "start",
            br#"{"job_id":"j","command_id":"c"}"#,
        )
        .unwrap();
        assert_ne!(a.command_hash, c.command_hash);
    }

    #[test]
    fn the_actor_is_the_caller_whatever_the_body_says() {
        let ops = caller("ops", Role::Operator);
        let body = br#"{"approval_id":"j","reason":"ok","actor":{"client_id":"mallory","user_id":"alice"}}"#;
        let (parsed, meta) = parse(&ops, "approval", "approve", body).unwrap();
        assert_eq!(meta.actor, ops.actor(Some("alice".into())));
        let Parsed::Approval(_, ApprovalCommand::Approve { decision, .. }) = &parsed else {
            panic!("an approval")
        };
        assert_eq!(
            decision.decided_by, "ops",
            "decided_by defaults to the caller"
        );
        let (_, meta) = parse(
            &ops,
            "approval",
            "expire",
            br#"{"approval_id":"j","user_id":"alice"}"#,
        )
        .unwrap();
        assert_eq!(meta.actor, ops.actor(Some("alice".into())));
        let e = err(
            "job",
            "cancel",
            r#"{"job_id":"j","user_id":"a","actor":{"user_id":"b"}}"#,
        );
        assert_eq!(e.field.as_deref(), Some("user_id"));
    }

    #[test]
    fn a_body_naming_another_party_is_forbidden() {
        let submit = |client: &str| {
            let body = format!(r#"{{"workflow_key":"a","client_id":"{client}"}}"#);
            let (parsed, _) = parse(&billing(), "job", "submit", body.as_bytes()).unwrap();
            check_caller(&billing(), &parsed)
        };
        assert!(submit("billing").is_ok());
        assert_eq!(submit("ops").unwrap_err().code, ErrorCode::Forbidden);
        let (parsed, _) = parse(&billing(), "job", "submit", br#"{"workflow_key":"a"}"#).unwrap();
        let Parsed::Job(_, JobCommand::Submit(s)) = &parsed else {
            panic!("a submission")
        };
        assert_eq!(s.client_id, "billing", "client_id defaults to the caller");
        let ops = caller("ops", Role::Operator);
        let (parsed, _) = parse(
            &ops,
            "approval",
            "reject",
            br#"{"approval_id":"j","reason":"no","decided_by":"alice"}"#,
        )
        .unwrap();
        assert_eq!(
            check_caller(&ops, &parsed).unwrap_err().code,
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn every_known_command_has_roles_and_only_the_handler_sends_its_own() {
        for name in KNOWN_COMMANDS {
            assert!(roles(name).is_some(), "{name}");
        }
        assert_eq!(roles("job.explode"), None);
        for name in [
            "job.start",
            "job.start_attempt",
            "job.record_step_result",
            "job.complete",
            "job.fail",
            "job.record_callback",
        ] {
            assert_eq!(roles(name), Some(&[Role::Handler][..]), "{name}");
        }
        for name in ["approval.approve", "approval.reject"] {
            assert_eq!(roles(name), Some(&[Role::Operator][..]), "{name}");
        }
    }

    #[test]
    fn no_command_is_an_auditors() {
        let a = caller("audit", Role::Auditor);
        for name in KNOWN_COMMANDS {
            let roles = roles(name).unwrap_or(&[]);
            assert!(!roles.contains(&Role::Auditor), "{name}");
            assert_eq!(
                a.require(roles, name).unwrap_err().code,
                ErrorCode::Forbidden
            );
            assert!(a.require_may_command(name).is_err(), "{name}");
        }
    }
}
