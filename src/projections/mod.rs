//! PostgreSQL read models built from the log.
//!
//! Each read model ([`ReadModel`]) is a projection with a schema version.
//! Its tables are `<table>_v<N>`; readers use the view `<table>`, which
//! points at the active version. A rebuild builds version N+1 beside N and
//! switches the views in one transaction (docs/PROJECTIONS.md).
//!
//! **Architecture invariant:** projections never publish commands and never
//! append to the log (except the audit record of an operator's `--skip`,
//! written by the CLI, not by a projection).

pub mod apply;
pub mod copy;
pub mod db;
pub mod event;
#[cfg(test)]
mod event_contract;
pub mod memory;
pub mod rebuild;
pub mod runner;

use std::sync::Arc;

use crate::memory::keys::SubjectKeys;
use crate::projections::event::ProjectedEvent;

/// The read models flowledger maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadModel {
    /// `workflows_executions`: one row per job (seed 000).
    Executions,
    /// `audit_trail`: one row per event (seed 002, "Audit / Trace").
    Audit,
    /// `approvals`: one row per approval (seed 003).
    Approvals,
    /// `secret_accesses`: one row per secret access request (granted,
    /// denied or failed), for auditors.
    SecretAccesses,
    /// `memory_*`: conversation memory in plaintext (subjects, profiles,
    /// episodes and their chunks, facts with their versions, working
    /// state), opened with each data subject's key. Runs only where
    /// `[memory]` is configured ([`ReadModel::needs_subject_keys`]).
    Memory,
}

impl ReadModel {
    /// The read models that need nothing but PostgreSQL and the log:
    /// `migrate` sets them all up and `serve` runs them all. The memory read
    /// model is apart ([`ReadModel::needs_subject_keys`]): it is set up and
    /// run only where `[memory]` is configured.
    pub const ALL: [ReadModel; 4] = [
        ReadModel::Executions,
        ReadModel::Audit,
        ReadModel::Approvals,
        ReadModel::SecretAccesses,
    ];

    /// Every read model, for names on the command line.
    pub const KNOWN: [ReadModel; 5] = [
        ReadModel::Executions,
        ReadModel::Audit,
        ReadModel::Approvals,
        ReadModel::SecretAccesses,
        ReadModel::Memory,
    ];

    /// The projection's name: in `projection_checkpoints`, its consumer's
    /// name and metric labels, and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ReadModel::Executions => "executions",
            ReadModel::Audit => "audit",
            ReadModel::Approvals => "approvals",
            ReadModel::SecretAccesses => "secret_accesses",
            ReadModel::Memory => "memory",
        }
    }

    /// Whether applying events needs the data subjects' keys
    /// ([`SubjectKeys`]): only the memory read model, which opens sealed
    /// values. Without them it is neither run nor rebuilt.
    pub fn needs_subject_keys(self) -> bool {
        matches!(self, ReadModel::Memory)
    }

    /// The read model called `name` (as [`ReadModel::name`] spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::KNOWN.into_iter().find(|m| m.name() == name)
    }

    /// The names, comma-separated, for error messages.
    pub fn known_names() -> String {
        Self::KNOWN.map(|m| m.name()).join(", ")
    }

    /// Whether the read model stores the hash of an event of
    /// `aggregate_type` (decoding skips the SHA-256 otherwise): the audit
    /// trail every event's, `secret_accesses` those of `secret_access`.
    pub fn needs_hash(self, aggregate_type: &str) -> bool {
        match self {
            ReadModel::Audit => true,
            ReadModel::SecretAccesses => aggregate_type == "secret_access",
            ReadModel::Executions | ReadModel::Approvals | ReadModel::Memory => false,
        }
    }

    /// The tables readers see (each a view over `<table>_v<N>`).
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            ReadModel::Executions => &["workflows_executions"],
            ReadModel::Audit => &["audit_trail"],
            ReadModel::Approvals => &["approvals"],
            ReadModel::SecretAccesses => &["secret_accesses"],
            ReadModel::Memory => &[
                "memory_subjects",
                "memory_profiles",
                "memory_episodes",
                "memory_chunks",
                "memory_facts",
                "memory_working_state",
            ],
        }
    }
}

/// One stream message as a projection sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The message's stream sequence (the checkpoint after it is applied).
    pub seq: u64,
    /// `(hash hex, event)` per event, in commit order; the hash is empty
    /// where the read model does not store it ([`ReadModel::needs_hash`]).
    pub events: Vec<(String, ProjectedEvent)>,
}

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event itself cannot be applied: stop here until fixed or skipped.
    #[error("cannot apply stream sequence {seq}: {reason}")]
    Poison {
        /// The stream sequence of the message that cannot be applied.
        seq: u64,
        /// Why (the database's message, or what the event lacks).
        reason: String,
    },
    /// PostgreSQL (or, for the memory read model, Vault) is unreachable or
    /// timed out: retry.
    #[error("read-model database unavailable: {0}")]
    Unavailable(String),
}

/// What a read model is applied with beyond its database and the log:
/// the data subjects' keys, for the memory read model
/// ([`ReadModel::needs_subject_keys`]); `None` where `[memory]` is not
/// configured.
pub type Keys = Option<Arc<SubjectKeys>>;

/// Why a read model cannot run or be rebuilt here.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The memory read model opens sealed events with the subjects' keys:
    /// without `[memory]` (and `[secrets]`) it has none.
    #[error("the {name} read model opens sealed events with the data subjects' keys in Vault: configure [memory] enabled = true and [secrets] (pass the configuration with --config / FLOWLEDGER_CONFIG)")]
    NoSubjectKeys {
        /// The read model's name.
        name: &'static str,
    },
}

impl ReadModel {
    /// Checks that `keys` has what this read model needs.
    pub fn check_keys(self, keys: &Keys) -> Result<(), ContextError> {
        if self.needs_subject_keys() && keys.is_none() {
            return Err(ContextError::NoSubjectKeys { name: self.name() });
        }
        Ok(())
    }
}

impl ApplyError {
    /// Classifies a database error: data and constraint errors are caused by
    /// the event (poison), I/O and pool errors are transient.
    pub fn from_sqlx(seq: u64, e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(d) => ApplyError::Poison {
                seq,
                reason: d.to_string(),
            },
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::Encode(_) => {
                ApplyError::Poison {
                    seq,
                    reason: e.to_string(),
                }
            }
            other => ApplyError::Unavailable(other.to_string()),
        }
    }
}

/// Where a stopped projection stands: the version that stopped and the
/// stream sequence it stopped at.
#[derive(Debug, Clone, PartialEq)]
pub struct Stopped {
    /// The read model's name.
    pub name: String,
    /// The version that stopped.
    pub version: i32,
    /// The stream sequence it could not apply (`error_seq`).
    pub stopped_at: u64,
}

impl Stopped {
    /// A skip must name the sequence the projection is stopped at.
    pub fn check_skip(&self, seq: u64) -> Result<(), ResumeError> {
        if seq == self.stopped_at {
            Ok(())
        } else {
            Err(ResumeError::WrongSeq {
                name: self.name.clone(),
                stopped_at: self.stopped_at,
                asked: seq,
            })
        }
    }
}

/// The stopped version of `model`, or why there is nothing to resume.
pub async fn stopped(
    pool: &sqlx::PgPool,
    model: ReadModel,
) -> Result<Result<Stopped, String>, ResumeError> {
    let rows = db::checkpoints(pool).await?;
    let row = rows
        .iter()
        .filter(|r| r.name == model.name())
        .max_by_key(|r| (r.state == "stopped", r.active, r.version))
        .ok_or_else(|| db::DbError::NotInitialised {
            name: model.name().into(),
        })?;
    if row.state != "stopped" {
        return Ok(Err(format!(
            "projection {} v{} is {}; nothing to resume",
            row.name, row.version, row.state
        )));
    }
    Ok(Ok(Stopped {
        name: row.name.clone(),
        version: row.version,
        stopped_at: row.error_seq.unwrap_or(0) as u64,
    }))
}

/// Resumes a stopped projection. With `skip` (sequence, reason, who), the
/// projection passes that sequence; the caller records the skip as an event
/// first, through the command bus, so the log says who skipped what and why.
pub async fn resume(
    pool: &sqlx::PgPool,
    stopped: &Stopped,
    skip: Option<(u64, String, String)>,
) -> Result<String, ResumeError> {
    if let Some((seq, reason, by)) = skip {
        stopped.check_skip(seq)?;
        sqlx::query(
            "INSERT INTO projection_skips (name, seq, reason, skipped_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(&stopped.name)
        .bind(seq as i64)
        .bind(&reason)
        .bind(&by)
        .execute(pool)
        .await
        .map_err(db::DbError::from)?;
    }
    sqlx::query(
        "UPDATE projection_checkpoints \
         SET state = CASE WHEN active THEN 'running' ELSE 'building' END,
            error = NULL, error_seq = NULL, updated_at = now()
         WHERE name = $1 AND version = $2",
    )
    .bind(&stopped.name)
    .bind(stopped.version)
    .execute(pool)
    .await
    .map_err(db::DbError::from)?;
    Ok(format!(
        "projection {} v{} resumes at stream sequence {}",
        stopped.name, stopped.version, stopped.stopped_at
    ))
}

/// Why a projection was not resumed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The read-model database could not be read or updated.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// `--skip` named another sequence than the one the projection is
    /// stopped at: nothing was recorded.
    #[error("projection {name} is stopped at stream sequence {stopped_at}, not {asked}: --skip takes the sequence it is stopped at (see `flowledger projections status`)")]
    WrongSeq {
        /// The read model's name.
        name: String,
        /// The sequence it is stopped at.
        stopped_at: u64,
        /// The sequence `--skip` named.
        asked: u64,
    },
    /// The skip's event could not be appended: the projection stays stopped.
    #[error("could not record the skip in the event log: {0}")]
    Record(#[source] Box<dyn std::error::Error + Send + Sync>),
}
