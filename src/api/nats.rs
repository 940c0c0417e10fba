//! Command intake: `flow.cmd.<aggregate_type>.<command>` over NATS
//! request/reply. JSON in; JSON out: a receipt or `{code, message}`.
//! Nothing is appended unless the whole request is valid.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::body::{from_fields, parse_object};
use crate::bus::{ids, CommandBus, CommandError};
use crate::commands::approval::{ApprovalCommand, Decide, RequestApproval};
use crate::commands::job::{
    CancelJob, CompleteJob, FailJob, JobCommand, RecordCallback, RecordStepResult, StartAttempt,
    StartJob, SubmitJob,
};
use crate::events::chain;
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::log::valid_aggregate_id;
use crate::events::store::Receipt;

/// The subject prefix commands are requested on:
/// `flow.cmd.<aggregate_type>.<command>`.
pub const COMMAND_SUBJECT_PREFIX: &str = "flow.cmd";
/// The queue group the intake subscribes in, so several `serve` processes
/// share the commands.
pub const INTAKE_QUEUE_GROUP: &str = "flowledger-intake";

/// The commands the intake knows, as `<aggregate_type>.<command>`.
pub const KNOWN_COMMANDS: &[&str] = &[
    "job.submit",
    "job.start",
    "job.start_attempt",
    "job.record_step_result",
    "job.complete",
    "job.fail",
    "job.cancel",
    "job.record_callback",
    "approval.request",
    "approval.approve",
    "approval.reject",
    "approval.expire",
];

/// The reply to an accepted command: the receipt with `"ok": true`.
pub fn receipt_json(r: &Receipt) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["ok"] = json!(true);
    v
}

pub(super) enum Parsed {
    Job(String, JobCommand),
    Approval(String, ApprovalCommand),
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

/// Parses a request body for `aggregate_type.command` into a command and
/// its metadata. Pure: no I/O.
pub(super) fn parse(
    aggregate_type: &str,
    command: &str,
    body: &[u8],
) -> Result<(Parsed, CommandMeta), CommandError> {
    let value = parse_object(body, false)?;
    let command_hash = chain::to_hex(&chain::sha256(value.to_string().as_bytes()));
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
    let actor: Option<Actor> = match map.remove("actor") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            from_fields::<ActorIn>(v)
                .map_err(|mut e| {
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
                })?
                .into(),
        ),
    };
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
        _ => {
            let known = KNOWN_COMMANDS.join(", ");
            let message = format!("unknown command {aggregate_type}.{command}: known are {known}");
            return Err(CommandError::validation(None, message));
        }
    };
    let actor = match (actor, &parsed) {
        (Some(a), _) => a,
        (None, Parsed::Job(_, JobCommand::Submit(s))) => Actor {
            client_id: s.client_id.clone(),
            user_id: None,
        },
        (None, _) => Actor {
            client_id: "anonymous".into(),
            user_id: None,
        },
    };
    Ok((
        parsed,
        CommandMeta {
            command_id,
            actor,
            correlation_id,
            causation_id,
            command_hash,
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorIn {
    client_id: String,
    user_id: Option<String>,
}

impl From<ActorIn> for Actor {
    fn from(a: ActorIn) -> Self {
        Actor {
            client_id: a.client_id,
            user_id: a.user_id,
        }
    }
}

/// Handles one request addressed to `subject`; never panics on input.
pub async fn handle(
    bus: &CommandBus,
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
    let (parsed, meta) = parse(aggregate_type, command, body)?;
    match parsed {
        Parsed::Job(id, c) => bus.job(&id, c, &meta).await.map_err(Into::into),
        Parsed::Approval(id, c) => bus.approval(&id, c, &meta).await.map_err(Into::into),
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
/// runs in its own task.
pub async fn serve(
    bus: Arc<CommandBus>,
    client: async_nats::Client,
    mut sub: async_nats::Subscriber,
) {
    while let Some(msg) = sub.next().await {
        let bus = bus.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let reply = match handle(&bus, msg.subject.as_str(), &msg.payload).await {
                Ok(r) => receipt_json(&r),
                Err(e) => e.to_json(),
            };
            if let Some(to) = msg.reply {
                if let Err(e) = client.publish(to, reply.to_string().into()).await {
                    tracing::warn!(error = %e, "could not send a command reply");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::ErrorCode;

    fn err(t: &str, c: &str, body: &str) -> CommandError {
        match parse(t, c, body.as_bytes()) {
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
    fn same_body_same_hash_regardless_of_spacing() {
        let (_, a) = parse("job", "start", br#"{"job_id":"j","command_id":"c"}"#).unwrap();
        let (_, b) = parse("job", "start", br#"{ "command_id": "c",  "job_id": "j" }"#).unwrap();
        assert_eq!(a.command_hash, b.command_hash);
        assert_eq!(a.command_id, "c");
    }
}
