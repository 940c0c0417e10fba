//! The `Workflow` aggregate, one per workflow key: the kill-switch
//! (disable / enable) and the count of auto-approvals per UTC day, so the
//! daily limit holds across handler restarts and concurrent handlers.

pub mod events;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::commands::{DomainError, ErrorCode};
use events::{AutoApprovalCounted, WorkflowEvent, WorkflowSwitched};

/// Workflow keys may hold '.', which aggregate ids (NATS subject tokens)
/// may not: '_' is written "__" and '.' is written "_d", reversibly.
pub fn aggregate_id(workflow_key: &str) -> String {
    workflow_key.replace('_', "__").replace('.', "_d")
}

/// The `Workflow` aggregate (type `workflow`, id = [`aggregate_id`] of the
/// key): the state its commands are decided on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    /// The kill-switch: new jobs of this workflow are refused while set.
    pub disabled: bool,
    /// The UTC day of the last counted auto-approval; `None`: none yet.
    pub day: Option<NaiveDate>,
    /// Auto-approvals counted on `day`.
    pub used_today: u32,
}

/// A command on a workflow (HTTP kill-switch endpoints, the job handler).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkflowCommand {
    /// Turn the kill-switch on.
    Disable {
        /// The registry key.
        workflow_key: String,
        /// Why; not blank.
        reason: String,
    },
    /// Turn the kill-switch off.
    Enable {
        /// The registry key.
        workflow_key: String,
        /// Why; not blank.
        reason: String,
    },
    /// Count one auto-approval on `day`, refused once `limit` are counted.
    CountAutoApproval {
        /// The registry key.
        workflow_key: String,
        /// The job being auto-approved.
        job_id: String,
        /// The UTC day to count on (a new day starts from 0).
        day: NaiveDate,
        /// The workflow's `auto_approval.daily_limit`.
        limit: u32,
    },
}

/// Why a workflow command was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkflowError {
    /// Disable while the kill-switch is already on (`rejected`).
    #[error("workflow is already disabled")]
    AlreadyDisabled,
    /// Enable while the kill-switch is off (`rejected`).
    #[error("workflow is not disabled")]
    NotDisabled,
    /// The day's auto-approvals reached the limit (`rejected`): the job
    /// waits for a human decision.
    #[error("daily auto-approval limit of {limit} reached for {day}")]
    DailyLimitReached {
        /// The UTC day.
        day: NaiveDate,
        /// The limit in force.
        limit: u32,
    },
    /// `reason` is blank (`validation`); say why.
    #[error("reason must not be empty: say why")]
    NoReason,
    /// The key is not in the registry (raised by the bus; `not_found`).
    #[error("workflow {key:?} is not in the registry")]
    UnknownWorkflow {
        /// The key sent.
        key: String,
    },
}

impl DomainError for WorkflowError {
    fn code(&self) -> ErrorCode {
        match self {
            WorkflowError::NoReason => ErrorCode::Validation,
            WorkflowError::UnknownWorkflow { .. } => ErrorCode::NotFound,
            _ => ErrorCode::Rejected,
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            WorkflowError::NoReason => Some("reason"),
            WorkflowError::UnknownWorkflow { .. } => Some("workflow_key"),
            _ => None,
        }
    }
}

impl Workflow {
    /// Pure decision: the events a command produces, or why it is refused.
    pub fn decide(&self, c: WorkflowCommand) -> Result<Vec<WorkflowEvent>, WorkflowError> {
        match c {
            WorkflowCommand::Disable {
                workflow_key,
                reason,
            } => {
                if reason.trim().is_empty() {
                    return Err(WorkflowError::NoReason);
                }
                if self.disabled {
                    return Err(WorkflowError::AlreadyDisabled);
                }
                Ok(vec![WorkflowEvent::WorkflowDisabled(WorkflowSwitched {
                    workflow_key,
                    reason,
                })])
            }
            WorkflowCommand::Enable {
                workflow_key,
                reason,
            } => {
                if reason.trim().is_empty() {
                    return Err(WorkflowError::NoReason);
                }
                if !self.disabled {
                    return Err(WorkflowError::NotDisabled);
                }
                Ok(vec![WorkflowEvent::WorkflowEnabled(WorkflowSwitched {
                    workflow_key,
                    reason,
                })])
            }
            WorkflowCommand::CountAutoApproval {
                workflow_key,
                job_id,
                day,
                limit,
            } => {
                let used = if self.day == Some(day) {
                    self.used_today
                } else {
                    0
                };
                if used >= limit {
                    return Err(WorkflowError::DailyLimitReached { day, limit });
                }
                Ok(vec![WorkflowEvent::AutoApprovalCounted(
                    AutoApprovalCounted {
                        workflow_key,
                        job_id,
                        day,
                        used: used + 1,
                        limit,
                    },
                )])
            }
        }
    }
}

crate::commands::aggregate!(
    Workflow,
    "workflow",
    WorkflowCommand,
    WorkflowEvent,
    WorkflowError
);

impl Workflow {
    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, event: WorkflowEvent) {
        match event {
            WorkflowEvent::WorkflowDisabled(_) => self.disabled = true,
            WorkflowEvent::WorkflowEnabled(_) => self.disabled = false,
            WorkflowEvent::AutoApprovalCounted(e) => {
                self.day = Some(e.day);
                self.used_today = e.used;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, d).expect("a valid date")
    }

    fn count(job: &str, d: u32) -> WorkflowCommand {
        WorkflowCommand::CountAutoApproval {
            workflow_key: "w".into(),
            job_id: job.into(),
            day: day(d),
            limit: 2,
        }
    }

    fn counted(job: &str, d: u32, used: u32) -> WorkflowEvent {
        WorkflowEvent::AutoApprovalCounted(AutoApprovalCounted {
            workflow_key: "w".into(),
            job_id: job.into(),
            day: day(d),
            used,
            limit: 2,
        })
    }

    #[test]
    fn daily_limit_holds_and_resets_next_day() {
        TestFramework::<Workflow>::with(())
            .given(vec![counted("a", 23, 1)])
            .when(count("b", 23))
            .then_expect_events(vec![counted("b", 23, 2)]);
        TestFramework::<Workflow>::with(())
            .given(vec![counted("a", 23, 1), counted("b", 23, 2)])
            .when(count("c", 23))
            .then_expect_error(WorkflowError::DailyLimitReached {
                day: day(23),
                limit: 2,
            });
        TestFramework::<Workflow>::with(())
            .given(vec![counted("a", 23, 1), counted("b", 23, 2)])
            .when(count("c", 24))
            .then_expect_events(vec![counted("c", 24, 1)]);
    }

    #[test]
    fn kill_switch_toggles() {
        let off = |r: &str| WorkflowCommand::Disable {
            workflow_key: "w".into(),
            reason: r.into(),
        };
        TestFramework::<Workflow>::with(())
            .given_no_previous_events()
            .when(off(""))
            .then_expect_error(WorkflowError::NoReason);
        TestFramework::<Workflow>::with(())
            .given(vec![WorkflowEvent::WorkflowDisabled(WorkflowSwitched {
                workflow_key: "w".into(),
                reason: "incident".into(),
            })])
            .when(off("again"))
            .then_expect_error(WorkflowError::AlreadyDisabled);
    }

    #[test]
    fn workflow_ids_are_reversible_and_distinct() {
        assert_eq!(aggregate_id("invoice.extract"), "invoice_dextract");
        assert_ne!(aggregate_id("a.b"), aggregate_id("a_b"));
        assert_ne!(aggregate_id("a_d"), aggregate_id("a.d"));
        assert!(crate::events::log::valid_aggregate_id(&aggregate_id(
            "x.y_z-1"
        )));
    }
}
