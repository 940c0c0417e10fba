//! Applying a batch of messages to a read model inside one transaction.
//! New rows go in with one binary `COPY` per table per batch; changes to
//! rows of earlier batches with one `UPDATE ... FROM UNNEST`, whatever the
//! batch size. A job submitted and finished within one batch is written
//! once, in its final state. Every value comes from the events
//! (times are `occurred_at`, ids are stream sequences), so a rebuild from the
//! log produces the same rows.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use crate::memory::keys::SubjectKeys;
use crate::projections::copy::CopyRows;
use crate::projections::event::{Fields, ProjectedEvent};
use crate::projections::{memory, ApplyError, Msg, ReadModel};

type Tx<'a> = Transaction<'a, Postgres>;

pub(crate) fn time_of(seq: u64, r: &ProjectedEvent) -> Result<DateTime<Utc>, ApplyError> {
    DateTime::parse_from_rfc3339(&r.occurred_at)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ApplyError::Poison {
            seq,
            reason: format!("occurred_at {:?}: {e}", r.occurred_at),
        })
}

fn required<'a>(
    seq: u64,
    field: &'a Option<String>,
    key: &str,
    event: &str,
) -> Result<&'a str, ApplyError> {
    field.as_deref().ok_or_else(|| ApplyError::Poison {
        seq,
        reason: format!("{event} has no string field {key:?}"),
    })
}

/// Applies `batch` to version `v` of `model`. The caller owns the
/// transaction and the checkpoint.
/// `keys`: the data subjects' keys, which only the memory read model uses.
pub async fn apply(
    model: ReadModel,
    tx: &mut Tx<'_>,
    v: i32,
    batch: &[Msg],
    keys: Option<&SubjectKeys>,
) -> Result<(), ApplyError> {
    let last = batch.last().map_or(0, |m| m.seq);
    let res = match model {
        ReadModel::Executions => executions(tx, v, batch).await,
        ReadModel::Audit => audit(tx, v, batch).await,
        ReadModel::Approvals => approvals(tx, v, batch).await,
        ReadModel::SecretAccesses => secret_accesses(tx, v, batch).await,
        ReadModel::Memory => memory::apply(tx, v, batch, keys).await,
    };
    res.map_err(|e| match e {
        Failure::Apply(a) => a,
        Failure::Sql(e) => ApplyError::from_sqlx(if batch.len() == 1 { last } else { 0 }, e),
    })
}

/// A read model's failure: its own, or the database's (classified by
/// [`ApplyError::from_sqlx`]).
pub(crate) enum Failure {
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
    retried_by: Vec<Option<String>>,
}

/// What the events of one batch change in one execution row.
#[derive(Default)]
struct ExecDelta<'a> {
    status: Option<&'static str>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    output: Option<&'a str>,
    error_code: Option<&'a str>,
    error_message: Option<Cow<'a, str>>,
    updated_at: Option<DateTime<Utc>>,
    last_seq: i64,
    retried_by: Option<&'a str>,
}

impl<'a> ExecDelta<'a> {
    /// Folds one event after `JobSubmitted` into the delta.
    fn fold(&mut self, r: &'a ProjectedEvent, at: DateTime<Utc>, seq: u64) {
        let d = &r.data;
        self.updated_at = Some(at);
        self.last_seq = seq as i64;
        match r.event_type.as_str() {
            "JobStarted" => {
                self.status = Some("running");
                self.started_at = Some(at);
            }
            "JobCompleted" => {
                self.status = Some("completed");
                self.completed_at = Some(at);
                self.output = d.outputs.as_deref().map(|o| o.get());
            }
            "JobFailed" => {
                self.status = Some("failed");
                self.completed_at = Some(at);
                self.error_code = d.error_code.as_deref();
                self.error_message = d.error_message.as_deref().map(Cow::Borrowed);
            }
            "JobCancelled" => {
                self.status = Some("cancelled");
                self.completed_at = Some(at);
                self.error_message = d
                    .reason
                    .as_deref()
                    .map(|r| Cow::Owned(format!("cancelled: {r}")));
            }
            "JobRetried" => self.retried_by = d.retry_job_id.as_deref(),
            _ => {} // step results only touch updated_at / last_seq
        }
    }

    /// Folds an event of the job's approval (same id): `awaiting_approval`
    /// while it is requested and undecided, `pending` again once decided
    /// or expired (until the job starts or fails); never over a status the
    /// job's own events set after `pending`.
    fn fold_approval(&mut self, status: &'static str, at: DateTime<Utc>, seq: u64) {
        self.updated_at = Some(at);
        self.last_seq = seq as i64;
        if matches!(self.status, None | Some(PENDING | AWAITING_APPROVAL)) {
            self.status = Some(status);
        }
    }
}

/// A job's status before it starts.
const PENDING: &str = "pending";
/// A job's status while its approval is requested and undecided.
const AWAITING_APPROVAL: &str = "awaiting_approval";

/// The job status an event of its approval leaves, if any.
fn status_of_approval_event(event_type: &str) -> Option<&'static str> {
    match event_type {
        "ApprovalRequested" => Some(AWAITING_APPROVAL),
        "ApprovalGranted" | "ApprovalRejected" | "ApprovalExpired" => Some(PENDING),
        _ => None,
    }
}

/// A job submitted in this batch, with whatever later events of the same
/// batch did to it: it is written once, in its state at the end of the batch.
struct NewExec<'a> {
    id: i64,
    workflow_id: &'a str,
    execution_id: &'a str,
    input: Option<&'a str>,
    client_id: &'a str,
    priority: i16,
    created_at: DateTime<Utc>,
    retry_of: Option<&'a str>,
    delta: ExecDelta<'a>,
}

/// Milliseconds from `from` to `to`, rounded half away from zero: what
/// PostgreSQL's `(EXTRACT(EPOCH FROM to - from) * 1000)::int` gives.
fn duration_ms(from: DateTime<Utc>, to: DateTime<Utc>) -> Option<i32> {
    let us = to.timestamp_micros() - from.timestamp_micros();
    let ms = if us >= 0 {
        (us + 500) / 1000
    } else {
        -((-us + 500) / 1000)
    };
    i32::try_from(ms).ok()
}

const EXEC_COLUMNS: &str =
    "id, workflow_id, execution_id, status, input_data, output_data, error_code, error_message, \
     client_id, priority, started_at, completed_at, duration_ms, created_at, updated_at, last_seq";

/// The columns of the retry links, last in the table: a table made by a
/// build before retries has none and is kept without them (a rebuild adds
/// them, docs/PROJECTIONS.md).
const EXEC_COLUMNS_WITH_LINKS: &str =
    "id, workflow_id, execution_id, status, input_data, output_data, error_code, error_message, \
     client_id, priority, started_at, completed_at, duration_ms, created_at, updated_at, last_seq, \
     retry_of, retried_by";

async fn executions(tx: &mut Tx<'_>, v: i32, batch: &[Msg]) -> Result<(), Failure> {
    let table = format!("workflows_executions_v{v}");
    let links = crate::projections::db::has_column(&mut **tx, &table, "retried_by").await?;
    let mut new: Vec<NewExec> = Vec::new();
    let mut new_index: HashMap<&str, usize> = HashMap::new();
    // changes to rows written by earlier batches, in first-seen order
    let mut deltas: HashMap<&str, ExecDelta> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for m in batch {
        for (_, r) in &m.events {
            // a job's approval has the job's id
            let approval = match r.aggregate_type.as_str() {
                "job" => None,
                "approval" => match status_of_approval_event(&r.event_type) {
                    Some(status) => Some(status),
                    None => continue,
                },
                _ => continue,
            };
            let at = time_of(m.seq, r)?;
            let d = &r.data;
            if approval.is_none() && r.event_type == "JobSubmitted" {
                new_index.insert(&r.aggregate_id, new.len());
                new.push(NewExec {
                    id: m.seq as i64,
                    workflow_id: required(m.seq, &d.workflow_key, "workflow_key", "JobSubmitted")?,
                    execution_id: &r.aggregate_id,
                    input: d.input.as_deref().map(|i| i.get()),
                    client_id: required(m.seq, &d.client_id, "client_id", "JobSubmitted")?,
                    priority: d.priority.unwrap_or(5) as i16,
                    created_at: at,
                    retry_of: d.retry_of.as_deref(),
                    delta: ExecDelta {
                        last_seq: m.seq as i64,
                        ..Default::default()
                    },
                });
                continue;
            }
            let delta = match new_index.get(r.aggregate_id.as_str()) {
                Some(&i) => &mut new[i].delta,
                None => deltas.entry(&r.aggregate_id).or_insert_with(|| {
                    order.push(&r.aggregate_id);
                    ExecDelta::default()
                }),
            };
            match approval {
                Some(status) => delta.fold_approval(status, at, m.seq),
                None => delta.fold(r, at, m.seq),
            }
        }
    }
    if !new.is_empty() {
        let mut rows = CopyRows::new(if links {
            EXEC_COLUMNS_WITH_LINKS
        } else {
            EXEC_COLUMNS
        });
        for n in &new {
            let d = &n.delta;
            let duration = d
                .completed_at
                .and_then(|end| duration_ms(d.started_at.unwrap_or(n.created_at), end));
            rows.row()
                .i64(Some(n.id))
                .text(Some(n.workflow_id))
                .text(Some(n.execution_id))
                .text(Some(d.status.unwrap_or("pending")))
                .jsonb(n.input)
                .jsonb(d.output)
                .text(d.error_code)
                .text(d.error_message.as_deref())
                .text(Some(n.client_id))
                .i16(n.priority)
                .timestamptz(d.started_at)
                .timestamptz(d.completed_at)
                .i32(duration)
                .timestamptz(Some(n.created_at))
                .timestamptz(Some(d.updated_at.unwrap_or(n.created_at)))
                .i64(Some(d.last_seq));
            if links {
                rows.text(n.retry_of).text(d.retried_by);
            }
        }
        rows.copy_into(tx, &table).await?;
    }
    if !order.is_empty() {
        let mut u = ExecUpdates::default();
        for key in order {
            let d = deltas.remove(key).unwrap_or_default();
            u.exec.push(key.to_string());
            u.status.push(d.status.map(str::to_string));
            u.started_at.push(d.started_at);
            u.completed_at.push(d.completed_at);
            u.output.push(d.output.map(str::to_string));
            u.error_code.push(d.error_code.map(str::to_string));
            u.error_message.push(d.error_message.map(Cow::into_owned));
            u.updated_at.push(d.updated_at);
            u.last_seq.push(d.last_seq);
            u.retried_by.push(d.retried_by.map(str::to_string));
        }
        let (set_link, link_param, link_column) = if links {
            (
                ",\n                retried_by    = COALESCE(d.retried_by, t.retried_by)",
                ", $10::text[]",
                ", retried_by",
            )
        } else {
            ("", "", "")
        };
        let sql = format!(
            "UPDATE workflows_executions_v{v} AS t SET
                status        = CASE WHEN d.status IN ('pending', 'awaiting_approval') \
                                AND t.status NOT IN ('pending', 'awaiting_approval') \
                                THEN t.status ELSE COALESCE(d.status, t.status) END,
                started_at    = COALESCE(d.started_at, t.started_at),
                completed_at  = COALESCE(d.completed_at, t.completed_at),
                output_data   = COALESCE(d.output::jsonb, t.output_data),
                error_code    = COALESCE(d.error_code, t.error_code),
                error_message = COALESCE(d.error_message, t.error_message),
                duration_ms   = CASE WHEN d.completed_at IS NOT NULL
                                THEN (EXTRACT(EPOCH FROM (d.completed_at - \
                                COALESCE(d.started_at, t.started_at, t.created_at))) * 1000)::int
                                ELSE t.duration_ms END,
                updated_at    = COALESCE(d.updated_at, t.updated_at),
                last_seq      = d.last_seq{set_link}
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
                         $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::bigint[]\
                         {link_param})
               AS d(exec, status, started_at, completed_at, output, error_code, \
                    error_message, updated_at, last_seq{link_column})
             WHERE t.execution_id = d.exec"
        );
        let mut query = sqlx::query(&sql)
            .bind(&u.exec)
            .bind(&u.status)
            .bind(&u.started_at)
            .bind(&u.completed_at)
            .bind(&u.output)
            .bind(&u.error_code)
            .bind(&u.error_message)
            .bind(&u.updated_at)
            .bind(&u.last_seq);
        if links {
            query = query.bind(&u.retried_by);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Status a job or approval has after an event, for the audit row.
fn status_after<'a>(event_type: &str, data: &'a Fields) -> Option<&'a str> {
    Some(match event_type {
        "JobSubmitted" => "pending",
        "JobStarted" => "running",
        "JobCompleted" => "completed",
        "JobFailed" => "failed",
        "JobCancelled" => "cancelled",
        "JobRetried" => "retried",
        "StepResultRecorded" => return data.status.as_deref(),
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
        "SecretAccessGranted" => "granted",
        "SecretAccessDenied" => "denied",
        "SecretAccessFailed" => "failed",
        _ => return None,
    })
}

const AUDIT_COLUMNS: &str =
    "stream_seq, event_index, event_id, occurred_at, client_id, user_id, aggregate_type, \
     aggregate_id, job_id, workflow_key, action, step, status, error_code, error_message, \
     duration_ms, event_hash";

/// [`AUDIT_COLUMNS`] and the n8n execution id, last in the table: a table
/// made by a build before it has none and is kept without it (a rebuild
/// adds it, docs/PROJECTIONS.md).
const AUDIT_COLUMNS_WITH_N8N: &str =
    "stream_seq, event_index, event_id, occurred_at, client_id, user_id, aggregate_type, \
     aggregate_id, job_id, workflow_key, action, step, status, error_code, error_message, \
     duration_ms, event_hash, n8n_execution_id";

async fn audit(tx: &mut Tx<'_>, v: i32, batch: &[Msg]) -> Result<(), Failure> {
    // Every job and approval event names its job and workflow key, so each
    // row comes from its own event alone.
    let table = format!("audit_trail_v{v}");
    let n8n = crate::projections::db::has_column(&mut **tx, &table, "n8n_execution_id").await?;
    let mut rows = CopyRows::new(if n8n {
        AUDIT_COLUMNS_WITH_N8N
    } else {
        AUDIT_COLUMNS
    });
    for m in batch {
        for (i, (hash, r)) in m.events.iter().enumerate() {
            let d = &r.data;
            let job_id = match r.aggregate_type.as_str() {
                "job" => Some(r.aggregate_id.as_str()),
                _ => d.job_id.as_deref(),
            };
            let workflow_key = d.workflow_key.as_deref().filter(|k| !k.is_empty());
            // who: the acting user, or for a submission the user the
            // submitting service names in metadata.user_id (seed 002)
            let user_id = r.actor.user_id.as_deref().or(d.metadata_user_id.as_deref());
            rows.row()
                .i64(Some(m.seq as i64))
                .i16(i as i16)
                .uuid(&r.event_id)
                .timestamptz(Some(time_of(m.seq, r)?))
                .text(Some(&r.actor.client_id))
                .text(user_id)
                .text(Some(&r.aggregate_type))
                .text(Some(&r.aggregate_id))
                .text(job_id)
                .text(workflow_key)
                .text(Some(&r.event_type))
                .text(d.step.as_deref())
                .text(status_after(&r.event_type, d))
                .text(d.error_code.as_deref())
                .text(d.error_message.as_deref())
                .i64(d.duration_ms)
                .text(Some(hash));
            if n8n {
                rows.text(d.n8n_execution_id.as_deref());
            }
        }
    }
    rows.copy_into(tx, &table).await?;
    Ok(())
}

const SECRET_COLUMNS: &str =
    "stream_seq, event_index, event_id, occurred_at, request_id, client_id, user_id, path, \
     field, requested_version, kv_version, purpose, job_id, step, decision, decided_by, rule, \
     source, code, reason, vault_error_kind, vault_error_status, vault_error_message, \
     read_from_vault_at, event_hash";

/// The decision a secret-access event records (`secret_accesses.decision`).
fn secret_decision(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        "SecretAccessGranted" => "granted",
        "SecretAccessDenied" => "denied",
        "SecretAccessFailed" => "failed",
        _ => return None,
    })
}

async fn secret_accesses(tx: &mut Tx<'_>, v: i32, batch: &[Msg]) -> Result<(), Failure> {
    // one row per access event, from that event alone (like the audit trail)
    let mut rows = CopyRows::new(SECRET_COLUMNS);
    for m in batch {
        for (i, (hash, r)) in m.events.iter().enumerate() {
            if r.aggregate_type != "secret_access" {
                continue;
            }
            let Some(decision) = secret_decision(&r.event_type) else {
                continue; // a later event type: not an access decision
            };
            let d = &r.data;
            let vault = d.vault_error.as_ref();
            // only a Granted event's own field; an unreadable time is left out
            let read_at = d
                .read_from_vault_at
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            rows.row()
                .i64(Some(m.seq as i64))
                .i16(i as i16)
                .uuid(&r.event_id)
                .timestamptz(Some(time_of(m.seq, r)?))
                .text(Some(&r.aggregate_id))
                .text(Some(&r.actor.client_id))
                .text(r.actor.user_id.as_deref())
                .text(Some(required(m.seq, &d.path, "path", &r.event_type)?))
                .text(d.field.as_deref())
                .i64(d.version)
                .i64(d.kv_version)
                .text(Some(required(m.seq, &d.purpose, "purpose", &r.event_type)?))
                .text(d.job_id.as_deref())
                .text(d.step.as_deref())
                .text(Some(decision))
                .text(d.decided_by.as_deref())
                .text(d.rule.as_deref())
                .text(d.source.as_deref())
                .text(d.code.as_deref())
                .text(d.reason.as_deref())
                .text(vault.and_then(|e| e.kind.as_deref()))
                .i32(
                    vault
                        .and_then(|e| e.status)
                        .and_then(|s| i32::try_from(s).ok()),
                )
                .text(vault.and_then(|e| e.message.as_deref()))
                .timestamptz(read_at)
                .text(Some(hash));
        }
    }
    rows.copy_into(tx, &format!("secret_accesses_v{v}")).await?;
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
                        .expires_at
                        .as_deref()
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                        .ok_or_else(|| ApplyError::Poison {
                            seq: m.seq,
                            reason: "ApprovalRequested has no valid expires_at".into(),
                        })?;
                    sql = format!(
                        "INSERT INTO approvals_v{v} (approval_id, job_id, workflow_key, status, \
                         requested_by, request_reason, expires_at, created_at, updated_at, last_seq)
                         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $7, $8) \
                         ON CONFLICT (approval_id) DO NOTHING"
                    );
                    sqlx::query(&sql)
                        .bind(&r.aggregate_id)
                        .bind(required(m.seq, &d.job_id, "job_id", "ApprovalRequested")?)
                        .bind(required(
                            m.seq,
                            &d.workflow_key,
                            "workflow_key",
                            "ApprovalRequested",
                        )?)
                        .bind(required(
                            m.seq,
                            &d.requested_by,
                            "requested_by",
                            "ApprovalRequested",
                        )?)
                        .bind(d.reason.as_deref())
                        .bind(expires.with_timezone(&Utc))
                        .bind(at)
                        .bind(m.seq as i64)
                }
                "ApprovalGranted" | "ApprovalRejected" => {
                    sql = format!(
                        "UPDATE approvals_v{v} SET status = $2, decided_by = $3, \
                         decision_reason = $4, decided_at = $5, updated_at = $5, last_seq = $6
                         WHERE approval_id = $1"
                    );
                    sqlx::query(&sql)
                        .bind(&r.aggregate_id)
                        .bind(if r.event_type == "ApprovalGranted" {
                            "approved"
                        } else {
                            "rejected"
                        })
                        .bind(d.decided_by.as_deref())
                        .bind(d.reason.as_deref())
                        .bind(at)
                        .bind(m.seq as i64)
                }
                "ApprovalExpired" => {
                    sql = format!(
                        "UPDATE approvals_v{v} SET status = 'expired', \
                         updated_at = $2, last_seq = $3 WHERE approval_id = $1"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("a valid RFC 3339 literal")
            .with_timezone(&Utc)
    }

    #[test]
    fn durations_round_half_away_from_zero_like_postgres() {
        let t0 = at("2026-11-24T10:00:00.000000Z");
        assert_eq!(duration_ms(t0, at("2026-11-24T10:00:00.000499Z")), Some(0));
        assert_eq!(duration_ms(t0, at("2026-11-24T10:00:00.000500Z")), Some(1));
        assert_eq!(
            duration_ms(t0, at("2026-11-24T10:00:01.234567Z")),
            Some(1235)
        );
        assert_eq!(duration_ms(at("2026-11-24T10:00:00.000500Z"), t0), Some(-1));
    }
}
