//! Operator actions on projections, recorded in the log like any command:
//! skipping an event a projection cannot apply is itself an audited event.

pub mod events;

use serde::{Deserialize, Serialize};

use crate::commands::{DomainError, ErrorCode};
use events::{ProjectionEvent, ProjectionEventSkipped};

/// The `ProjectionOps` aggregate (type `projection`, id = the read model's
/// name): the operator actions recorded for one read model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectionOps {
    /// Stream sequences skipped so far, any schema version, in order.
    pub skipped: Vec<u64>,
}

/// An operator's command on a read model.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectionCommand {
    /// Record that the stopped read model passes the event at `seq`.
    SkipEvent {
        /// The read model's schema version that stopped.
        version: i32,
        /// Stream sequence the read model stopped at.
        seq: u64,
        /// Why (`--reason`); not blank.
        reason: String,
        /// Who decides (`--by`); not blank.
        skipped_by: String,
    },
}

/// Why a projection command was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProjectionOpsError {
    /// `reason` or `skipped_by` is blank (`validation`); give both.
    #[error("a skip needs a reason (--reason) and who decided it (--by)")]
    MissingReason,
    /// This sequence (the value) was already skipped in this read model (`rejected`).
    #[error("stream sequence {0} was already skipped")]
    AlreadySkipped(u64),
}

impl DomainError for ProjectionOpsError {
    fn code(&self) -> ErrorCode {
        match self {
            ProjectionOpsError::MissingReason => ErrorCode::Validation,
            ProjectionOpsError::AlreadySkipped(_) => ErrorCode::Rejected,
        }
    }
}

impl ProjectionOps {
    /// Pure decision: the events a command produces, or why it is refused.
    pub fn decide(
        &self,
        command: ProjectionCommand,
    ) -> Result<Vec<ProjectionEvent>, ProjectionOpsError> {
        let ProjectionCommand::SkipEvent {
            version,
            seq,
            reason,
            skipped_by,
        } = command;
        if reason.trim().is_empty() || skipped_by.trim().is_empty() {
            return Err(ProjectionOpsError::MissingReason);
        }
        if self.skipped.contains(&seq) {
            return Err(ProjectionOpsError::AlreadySkipped(seq));
        }
        Ok(vec![ProjectionEvent::ProjectionEventSkipped(
            ProjectionEventSkipped {
                version,
                seq,
                reason,
                skipped_by,
            },
        )])
    }
}

crate::commands::aggregate!(
    ProjectionOps,
    "projection",
    ProjectionCommand,
    ProjectionEvent,
    ProjectionOpsError
);

impl ProjectionOps {
    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, event: ProjectionEvent) {
        let ProjectionEvent::ProjectionEventSkipped(e) = event;
        self.skipped.push(e.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn skip(seq: u64, reason: &str) -> ProjectionCommand {
        ProjectionCommand::SkipEvent {
            version: 1,
            seq,
            reason: reason.into(),
            skipped_by: "ops".into(),
        }
    }

    #[test]
    fn a_skip_is_recorded_with_its_reason() {
        TestFramework::<ProjectionOps>::with(())
            .given_no_previous_events()
            .when(skip(7, "bad input data"))
            .then_expect_events(vec![ProjectionEvent::ProjectionEventSkipped(
                ProjectionEventSkipped {
                    version: 1,
                    seq: 7,
                    reason: "bad input data".into(),
                    skipped_by: "ops".into(),
                },
            )]);
    }

    #[test]
    fn a_skip_needs_a_reason_and_happens_once() {
        TestFramework::<ProjectionOps>::with(())
            .given_no_previous_events()
            .when(skip(7, " "))
            .then_expect_error(ProjectionOpsError::MissingReason);
        TestFramework::<ProjectionOps>::with(())
            .given(vec![ProjectionEvent::ProjectionEventSkipped(
                ProjectionEventSkipped {
                    version: 1,
                    seq: 7,
                    reason: "r".into(),
                    skipped_by: "ops".into(),
                },
            )])
            .when(skip(7, "again"))
            .then_expect_error(ProjectionOpsError::AlreadySkipped(7));
    }
}
