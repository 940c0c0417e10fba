//! Applying a batch of messages to a read model inside one transaction.
//! Rows are written with `UNNEST` array parameters: one statement per table
//! per batch, whatever the batch size. Every value comes from the events
//! (times are `occurred_at`, ids are stream sequences), so a rebuild from the
//! log produces the same rows.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, Transaction};

use crate::events::envelope::EventRecord;
use crate::projections::{ApplyError, Msg, ReadModel};

type Tx<'a> = Transaction<'a, Postgres>;

fn time_of(seq: u64, r: &EventRecord) -> Result<DateTime<Utc>, ApplyError> {
    DateTime::parse_from_rfc3339(&r.occurred_at)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ApplyError::Poison {
            seq,
            reason: format!("occurred_at {:?}: {e}", r.occurred_at),
        })
}

fn str_field(data: &Value, key: &str) -> Option<String> {
    data.get(key).and_then(Value::as_str).map(str::to_string)
}

fn json_text(v: Option<&Value>) -> Option<String> {
    v.filter(|v| !v.is_null()).map(Value::to_string)
}

fn required(seq: u64, data: &Value, key: &str, event: &str) -> Result<String, ApplyError> {
    str_field(data, key).ok_or_else(|| ApplyError::Poison {
        seq,
        reason: format!("{event} has no string field {key:?}"),
    })
}

/// Applies `batch` to version `v` of `model`. The caller owns the
/// transaction and the checkpoint.
pub async fn apply(
    model: ReadModel,
    tx: &mut Tx<'_>,
    v: i32,
    batch: &[Msg],
) -> Result<(), ApplyError> {
    let last = batch.last().map_or(0, |m| m.seq);
    let res = match model {
        ReadModel::Executions => executions(tx, v, batch).await,
        ReadModel::Audit => audit(tx, v, batch).await,
        ReadModel::Approvals => approvals(tx, v, batch).await,
    };
    res.map_err(|e| match e {
        Failure::Apply(a) => a,
        Failure::Sql(e) => ApplyError::from_sqlx(if batch.len() == 1 { last } else { 0 }, e),
    })
}

enum Failure {
    Apply(ApplyError),
    Sql(sqlx::Error),
}

impl From<ApplyError> for Failure {
    fn from(e: ApplyError) -> Self {
        Failure::Apply(e)
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Sql(e)
    }
}

/// Column arrays of the execution updates of one batch.
#[derive(Default)]
struct ExecUpdates {
    exec: Vec<String>,
    status: Vec<Option<String>>,
    started_at: Vec<Option<DateTime<Utc>>>,
    completed_at: Vec<Option<DateTime<Utc>>>,
    output: Vec<Option<String>>,
    error_code: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    updated_at: Vec<Option<DateTime<Utc>>>,
    last_seq: Vec<i64>,
}

/// Column arrays of the audit rows of one batch.
#[derive(Default)]
struct AuditRows {
    stream_seq: Vec<i64>,
    event_index: Vec<i16>,
    event_id: Vec<uuid::Uuid>,
    occurred_at: Vec<DateTime<Utc>>,
    client_id: Vec<String>,
    user_id: Vec<Option<String>>,
    aggregate_type: Vec<String>,
    aggregate_id: Vec<String>,
    job_id: Vec<Option<String>>,
    workflow_key: Vec<Option<String>>,
    action: Vec<String>,
    step: Vec<Option<String>>,
    status: Vec<Option<String>>,
    error_code: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    duration_ms: Vec<Option<i64>>,
    event_hash: Vec<String>,
}

#[derive(Default)]
struct ExecDelta {
    status: Option<&'static str>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    output: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    updated_at: Option<DateTime<Utc>>,
    last_seq: i64,
}

async fn executions(tx: &mut Tx<'_>, v: i32, batch: &[Msg]) -> Result<(), Failure> {
    // new rows
    let (mut id, mut wf, mut exec, mut input, mut client, mut prio, mut created) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut deltas: HashMap<String, ExecDelta> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for m in batch {
        for (_, r) in &m.events {
            if r.aggregate_type != "job" {
                continue;
            }
            let at = time_of(m.seq, r)?;
            let d = &r.data;
            if r.event_type == "JobSubmitted" {
                id.push(m.seq as i64);
                wf.push(required(m.seq, d, "workflow_key", "JobSubmitted")?);
                exec.push(r.aggregate_id.clone());
                input.push(json_text(d.get("input")));
                client.push(required(m.seq, d, "client_id", "JobSubmitted")?);
                prio.push(d.get("priority").and_then(Value::as_i64).unwrap_or(5) as i16);
                created.push(at);
                continue;
            }
            let delta = deltas.entry(r.aggregate_id.clone()).or_insert_with(|| {
                order.push(r.aggregate_id.clone());
                ExecDelta::default()
            });
            delta.updated_at = Some(at);
            delta.last_seq = m.seq as i64;
            match r.event_type.as_str() {
                "JobStarted" => {
                    delta.status = Some("running");
                    delta.started_at = Some(at);
                }
                "JobCompleted" => {
                    delta.status = Some("completed");
                    delta.completed_at = Some(at);
                    delta.output = json_text(d.get("outputs"));
                }
                "JobFailed" => {
                    delta.status = Some("failed");
                    delta.completed_at = Some(at);
                    delta.error_code = str_field(d, "error_code");
                    delta.error_message = str_field(d, "error_message");
                }
                "JobCancelled" => {
                    delta.status = Some("cancelled");
                    delta.completed_at = Some(at);
                    delta.error_message = str_field(d, "reason").map(|r| format!("cancelled: {r}"));
                }
                _ => {} // step results only touch updated_at / last_seq
            }
        }
    }
    if !id.is_empty() {
        let last: Vec<i64> = id.clone();
        sqlx::query(&format!(
            "INSERT INTO workflows_executions_v{v}
               (id, workflow_id, execution_id, status, input_data, client_id, priority, created_at, updated_at, last_seq)
             SELECT u.id, u.wf, u.exec, 'pending', u.input::jsonb, u.client, u.prio, u.created, u.created, u.last
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::smallint[], $7::timestamptz[], $8::bigint[])
               AS u(id, wf, exec, input, client, prio, created, last)"
        ))
        .bind(&id).bind(&wf).bind(&exec).bind(&input).bind(&client).bind(&prio).bind(&created).bind(&last)
        .execute(&mut **tx)
        .await?;
    }
    if !order.is_empty() {
        let mut u = ExecUpdates::default();
        for key in order {
            let d = deltas.remove(&key).unwrap_or_default();
            u.exec.push(key);
            u.status.push(d.status.map(str::to_string));
            u.started_at.push(d.started_at);
            u.completed_at.push(d.completed_at);
            u.output.push(d.output);
            u.error_code.push(d.error_code);
            u.error_message.push(d.error_message);
            u.updated_at.push(d.updated_at);
            u.last_seq.push(d.last_seq);
        }
        sqlx::query(&format!(
            "UPDATE workflows_executions_v{v} AS t SET
                status        = COALESCE(d.status, t.status),
                started_at    = COALESCE(d.started_at, t.started_at),
                completed_at  = COALESCE(d.completed_at, t.completed_at),
                output_data   = COALESCE(d.output::jsonb, t.output_data),
                error_code    = COALESCE(d.error_code, t.error_code),
                error_message = COALESCE(d.error_message, t.error_message),
                duration_ms   = CASE WHEN d.completed_at IS NOT NULL
                                THEN (EXTRACT(EPOCH FROM (d.completed_at - COALESCE(d.started_at, t.started_at, t.created_at))) * 1000)::int
                                ELSE t.duration_ms END,
                updated_at    = COALESCE(d.updated_at, t.updated_at),
                last_seq      = d.last_seq
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::bigint[])
               AS d(exec, status, started_at, completed_at, output, error_code, error_message, updated_at, last_seq)
             WHERE t.execution_id = d.exec"
        ))
        .bind(&u.exec)
        .bind(&u.status)
        .bind(&u.started_at)
        .bind(&u.completed_at)
        .bind(&u.output)
        .bind(&u.error_code)
        .bind(&u.error_message)
        .bind(&u.updated_at)
        .bind(&u.last_seq)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Status a job or approval has after an event, for the audit row.
fn status_after(event_type: &str, data: &Value) -> Option<String> {
    Some(
        match event_type {
            "JobSubmitted" => "pending",
            "JobStarted" => "running",
            "JobCompleted" => "completed",
            "JobFailed" => "failed",
            "JobCancelled" => "cancelled",
            "StepResultRecorded" => return str_field(data, "status"),
            "ApprovalRequested" => "pending",
            "ApprovalGranted" => "approved",
            "ApprovalRejected" => "rejected",
            "ApprovalExpired" => "expired",
            "StepAttemptStarted" => "sent",
            "StepRetryScheduled" => "retry_scheduled",
            "CallbackDelivered" => "delivered",
            "CallbackFailed" => "failed",
            "CallbackRejected" => "rejected",
            "WorkflowDisabled" => "disabled",
            "WorkflowEnabled" => "enabled",
            _ => return None,
        }
        .to_string(),
    )
}

async fn audit(tx: &mut Tx<'_>, v: i32, batch: &[Msg]) -> Result<(), Failure> {
    // Every job and approval event names its job and workflow key, so each
    // row comes from its own event alone.
    let mut a = AuditRows::default();
    for m in batch {
        for (i, (hash, r)) in m.events.iter().enumerate() {
            let job_id = match r.aggregate_type.as_str() {
                "job" => Some(r.aggregate_id.clone()),
                _ => str_field(&r.data, "job_id"),
            };
            let workflow_key = str_field(&r.data, "workflow_key").filter(|k| !k.is_empty());
            // who: the acting user, or for a submission the user the
            // submitting service names in metadata.user_id (seed 002)
            let submitter = r
                .data
                .get("metadata")
                .and_then(|md| str_field(md, "user_id"));
            a.stream_seq.push(m.seq as i64);
            a.event_index.push(i as i16);
            a.event_id.push(r.event_id);
            a.occurred_at.push(time_of(m.seq, r)?);
            a.client_id.push(r.actor.client_id.clone());
            a.user_id.push(r.actor.user_id.clone().or(submitter));
            a.aggregate_type.push(r.aggregate_type.clone());
            a.aggregate_id.push(r.aggregate_id.clone());
            a.job_id.push(job_id);
            a.workflow_key.push(workflow_key);
            a.action.push(r.event_type.clone());
            a.step.push(str_field(&r.data, "step"));
            a.status.push(status_after(&r.event_type, &r.data));
            a.error_code.push(str_field(&r.data, "error_code"));
            a.error_message.push(str_field(&r.data, "error_message"));
            a.duration_ms
                .push(r.data.get("duration_ms").and_then(Value::as_i64));
            a.event_hash.push(hash.clone());
        }
    }
    if a.stream_seq.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO audit_trail_v{v}
           (stream_seq, event_index, event_id, occurred_at, client_id, user_id, aggregate_type, aggregate_id,
            job_id, workflow_key, action, step, status, error_code, error_message, duration_ms, event_hash)
         SELECT * FROM UNNEST($1::bigint[], $2::smallint[], $3::uuid[], $4::timestamptz[], $5::text[], $6::text[], $7::text[], $8::text[],
                              $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::bigint[], $17::text[])
         ON CONFLICT (stream_seq, event_index) DO NOTHING"
    ))
    .bind(&a.stream_seq)
    .bind(&a.event_index)
    .bind(&a.event_id)
    .bind(&a.occurred_at)
    .bind(&a.client_id)
    .bind(&a.user_id)
    .bind(&a.aggregate_type)
    .bind(&a.aggregate_id)
    .bind(&a.job_id)
    .bind(&a.workflow_key)
    .bind(&a.action)
    .bind(&a.step)
    .bind(&a.status)
    .bind(&a.error_code)
    .bind(&a.error_message)
    .bind(&a.duration_ms)
    .bind(&a.event_hash)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn approvals(tx: &mut Tx<'_>, v: i32, batch: &[Msg]) -> Result<(), Failure> {
    // approvals are rare: one statement per event keeps this simple
    for m in batch {
        for (_, r) in &m.events {
            if r.aggregate_type != "approval" {
                continue;
            }
            let at = time_of(m.seq, r)?;
            let d = &r.data;
            let sql: String;
            let q = match r.event_type.as_str() {
                "ApprovalRequested" => {
                    let expires = d
                        .get("expires_at")
                        .and_then(Value::as_str)
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                        .ok_or_else(|| ApplyError::Poison {
                            seq: m.seq,
                            reason: "ApprovalRequested has no valid expires_at".into(),
                        })?;
                    sql = format!(
                        "INSERT INTO approvals_v{v} (approval_id, job_id, workflow_key, status, requested_by, request_reason, expires_at, created_at, updated_at, last_seq)
                         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $7, $8) ON CONFLICT (approval_id) DO NOTHING"
                    );
                    sqlx::query(&sql)
                        .bind(&r.aggregate_id)
                        .bind(required(m.seq, d, "job_id", "ApprovalRequested")?)
                        .bind(required(m.seq, d, "workflow_key", "ApprovalRequested")?)
                        .bind(required(m.seq, d, "requested_by", "ApprovalRequested")?)
                        .bind(str_field(d, "reason"))
                        .bind(expires.with_timezone(&Utc))
                        .bind(at)
                        .bind(m.seq as i64)
                }
                "ApprovalGranted" | "ApprovalRejected" => {
                    sql = format!(
                    "UPDATE approvals_v{v} SET status = $2, decided_by = $3, decision_reason = $4, decided_at = $5, updated_at = $5, last_seq = $6
                     WHERE approval_id = $1"
                    );
                    sqlx::query(&sql)
                        .bind(&r.aggregate_id)
                        .bind(if r.event_type == "ApprovalGranted" {
                            "approved"
                        } else {
                            "rejected"
                        })
                        .bind(str_field(d, "decided_by"))
                        .bind(str_field(d, "reason"))
                        .bind(at)
                        .bind(m.seq as i64)
                }
                "ApprovalExpired" => {
                    sql = format!(
                    "UPDATE approvals_v{v} SET status = 'expired', updated_at = $2, last_seq = $3 WHERE approval_id = $1"
                    );
                    sqlx::query(&sql)
                        .bind(&r.aggregate_id)
                        .bind(at)
                        .bind(m.seq as i64)
                }
                _ => continue,
            };
            q.execute(&mut **tx).await?;
        }
    }
    Ok(())
}
