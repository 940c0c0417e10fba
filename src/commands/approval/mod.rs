//! The `Approval` aggregate (seed 003): request, approve, reject, expire.
//! Decided once; an expired approval cannot be approved. The current time
//! arrives inside each command (`at`), so the aggregate reads no clock.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

pub mod events;

use crate::commands::limits::MAX_APPROVAL_WINDOW_SECONDS;
use crate::commands::{DomainError, ErrorCode};
use events::{ApprovalDecided, ApprovalEvent, ApprovalExpired, ApprovalRequested};

/// Where an approval is, as its events leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// No event yet: the approval does not exist.
    #[default]
    None,
    /// Requested, waiting for a decision until its expiry.
    Pending,
    /// Final: `ApprovalGranted`.
    Approved,
    /// Final: `ApprovalRejected`.
    Rejected,
    /// Final: `ApprovalExpired`.
    Expired,
}

impl ApprovalStatus {
    /// The lowercase name (`none`, `pending`, `approved`, ...), as errors quote it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::None => "none",
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Rejected => "rejected",
            ApprovalStatus::Expired => "expired",
        }
    }
}

/// The `Approval` aggregate (type `approval`, id = the job's id): one
/// job's approval gate, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Where the approval is; [`ApprovalStatus::None`] until requested.
    pub status: ApprovalStatus,
    /// The job it is for.
    pub job_id: String,
    /// The job's workflow key.
    pub workflow_key: String,
    /// When it expires; `None` until requested.
    pub expires_at: Option<DateTime<Utc>>,
    /// Who approved or rejected it, and when; `None` until decided (and
    /// for an expired one).
    #[serde(default)]
    pub decided: Option<(String, DateTime<Utc>)>,
}

/// `approval.request`: open a job's approval (its id must be the job's id,
/// checked by the bus).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestApproval {
    /// The job waiting for it: a submitted job; not blank.
    pub job_id: String,
    /// The job's workflow key; not blank.
    pub workflow_key: String,
    /// Who asks; not blank.
    pub requested_by: String,
    /// Why, optionally.
    pub reason: Option<String>,
    /// After the request time, at most [`MAX_APPROVAL_WINDOW_SECONDS`] later.
    pub expires_at: DateTime<Utc>,
}

/// The body of `approval.approve` and `approval.reject`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decide {
    /// Who decides; not blank.
    pub decided_by: String,
    /// Why.
    pub reason: String,
}

/// A command on an approval. `at` is the time the command is decided at,
/// set by the adapter that received it (the aggregate reads no clock).
#[derive(Debug, Clone, PartialEq)]
pub enum ApprovalCommand {
    /// `request`: open the approval.
    Request {
        /// The request body.
        request: RequestApproval,
        /// The request time; `expires_at` must be after it.
        at: DateTime<Utc>,
    },
    /// `approve`: grant a pending approval before it expires.
    Approve {
        /// Who and why.
        decision: Decide,
        /// The decision time (`decided_at`); must be before the expiry.
        at: DateTime<Utc>,
    },
    /// `reject`: refuse a pending approval before it expires.
    Reject {
        /// Who and why.
        decision: Decide,
        /// The decision time (`decided_at`); must be before the expiry.
        at: DateTime<Utc>,
    },
    /// `expire`: close a pending approval whose expiry has come.
    Expire {
        /// The time now (`expired_at`); at or after the expiry.
        at: DateTime<Utc>,
    },
}

/// Why an approval command was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApprovalError {
    /// The approval was never requested (`not_found`); check the id.
    #[error("approval does not exist; request it first")]
    NotFound,
    /// A request for an approval that exists, in the given status (`conflict`).
    #[error("approval already exists (status {0}); use a new approval_id")]
    AlreadyExists(&'static str),
    /// `expires_at` is not after the request time; send a later one.
    #[error("expires_at {expires_at} is not after the request time {at}")]
    ExpiryInPast {
        /// The expiry sent.
        expires_at: DateTime<Utc>,
        /// The request time.
        at: DateTime<Utc>,
    },
    /// `expires_at` is more than [`MAX_APPROVAL_WINDOW_SECONDS`] after the
    /// request time; send an earlier one.
    #[error("expires_at {expires_at} is more than {MAX_APPROVAL_WINDOW_SECONDS} s (366 days) after the request time {at}")]
    ExpiryTooFar {
        /// The expiry sent.
        expires_at: DateTime<Utc>,
        /// The request time.
        at: DateTime<Utc>,
    },
    /// A text field that must say something is blank.
    #[error("{field} must not be empty")]
    EmptyField {
        /// `job_id`, `workflow_key`, `requested_by` or `decided_by`.
        field: &'static str,
    },
    /// A request whose `approval_id` is not its `job_id` (raised by the bus);
    /// a job's approval has the job's id.
    #[error(
        "a job's approval has the job's id: approval_id {approval_id:?} is not job_id {job_id:?}"
    )]
    NotTheJobsId {
        /// The approval id sent.
        approval_id: String,
        /// The job id sent.
        job_id: String,
    },
    /// A request for a job (the id given) that was never submitted (raised by
    /// the bus; `not_found`).
    #[error("job {0:?} does not exist; an approval is requested for a submitted job")]
    NoSuchJob(String),

    /// The approval is final already (`rejected`): its status, and who
    /// decided it when someone did.
    #[error("approval was already decided: it is {status}{}", by(decided))]
    AlreadyDecided {
        /// `approved`, `rejected` or `expired`.
        status: &'static str,
        /// Who decided and when (none for an expired approval).
        decided: Option<(String, DateTime<Utc>)>,
    },
    /// A decision at or after the expiry (the time given); it can no longer
    /// be approved or rejected.
    #[error("approval expired at {0}; it can no longer be approved")]
    Expired(DateTime<Utc>),
    /// `expire` before the expiry (the time given); try again then.
    #[error("approval does not expire before {0}")]
    NotYetDue(DateTime<Utc>),
}

fn by(decided: &Option<(String, DateTime<Utc>)>) -> String {
    match decided {
        Some((who, at)) => format!(
            " (by {who} at {}); only the same decision by the same caller with the same body answers its first answer again",
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        None => String::new(),
    }
}

impl DomainError for ApprovalError {
    fn code(&self) -> ErrorCode {
        match self {
            ApprovalError::NotFound => ErrorCode::NotFound,
            ApprovalError::AlreadyExists(_) => ErrorCode::Conflict,
            ApprovalError::ExpiryInPast { .. }
            | ApprovalError::ExpiryTooFar { .. }
            | ApprovalError::EmptyField { .. }
            | ApprovalError::NotTheJobsId { .. } => ErrorCode::Validation,
            ApprovalError::NoSuchJob(_) => ErrorCode::NotFound,
            ApprovalError::AlreadyDecided { .. }
            | ApprovalError::Expired(_)
            | ApprovalError::NotYetDue(_) => ErrorCode::Rejected,
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            ApprovalError::ExpiryInPast { .. } | ApprovalError::ExpiryTooFar { .. } => {
                Some("expires_at")
            }
            ApprovalError::EmptyField { field } => Some(field),
            ApprovalError::NotTheJobsId { .. } | ApprovalError::NoSuchJob(_) => Some("job_id"),
            _ => None,
        }
    }
}

impl Approval {
    fn open(&self) -> Result<DateTime<Utc>, ApprovalError> {
        match (self.status, self.expires_at) {
            (ApprovalStatus::None, _) | (_, None) => Err(ApprovalError::NotFound),
            (ApprovalStatus::Pending, Some(exp)) => Ok(exp),
            (ApprovalStatus::Expired, Some(exp)) => Err(ApprovalError::Expired(exp)),
            (s, _) => Err(ApprovalError::AlreadyDecided {
                status: s.as_str(),
                decided: self.decided.clone(),
            }),
        }
    }

    fn decision(&self, d: Decide, at: DateTime<Utc>) -> Result<ApprovalDecided, ApprovalError> {
        let expires_at = self.open()?;
        if d.decided_by.trim().is_empty() {
            return Err(ApprovalError::EmptyField {
                field: "decided_by",
            });
        }
        if at >= expires_at {
            return Err(ApprovalError::Expired(expires_at));
        }
        Ok(ApprovalDecided {
            job_id: self.job_id.clone(),
            workflow_key: self.workflow_key.clone(),
            decided_by: d.decided_by,
            reason: d.reason,
            decided_at: at,
        })
    }

    /// Pure decision: the events a command produces, or why it is refused.
    pub fn decide(&self, command: ApprovalCommand) -> Result<Vec<ApprovalEvent>, ApprovalError> {
        match command {
            ApprovalCommand::Request { request: r, at } => {
                if self.status != ApprovalStatus::None {
                    return Err(ApprovalError::AlreadyExists(self.status.as_str()));
                }
                for (field, value) in [
                    ("job_id", &r.job_id),
                    ("workflow_key", &r.workflow_key),
                    ("requested_by", &r.requested_by),
                ] {
                    if value.trim().is_empty() {
                        return Err(ApprovalError::EmptyField { field });
                    }
                }
                if r.expires_at <= at {
                    return Err(ApprovalError::ExpiryInPast {
                        expires_at: r.expires_at,
                        at,
                    });
                }
                // compared exactly: `num_seconds` truncates, which let an
                // expiry up to a second past the window through
                if r.expires_at - at > TimeDelta::seconds(MAX_APPROVAL_WINDOW_SECONDS) {
                    return Err(ApprovalError::ExpiryTooFar {
                        expires_at: r.expires_at,
                        at,
                    });
                }
                Ok(vec![ApprovalEvent::ApprovalRequested(ApprovalRequested {
                    job_id: r.job_id,
                    workflow_key: r.workflow_key,
                    requested_by: r.requested_by,
                    reason: r.reason,
                    expires_at: r.expires_at,
                })])
            }
            ApprovalCommand::Approve { decision, at } => Ok(vec![ApprovalEvent::ApprovalGranted(
                self.decision(decision, at)?,
            )]),
            ApprovalCommand::Reject { decision, at } => {
                // A reject after expiry is refused too: the approval already expired.
                Ok(vec![ApprovalEvent::ApprovalRejected(
                    self.decision(decision, at)?,
                )])
            }
            ApprovalCommand::Expire { at } => {
                let expires_at = match self.open() {
                    Err(ApprovalError::Expired(_)) => {
                        return Err(ApprovalError::AlreadyDecided {
                            status: "expired",
                            decided: None,
                        })
                    }
                    other => other?,
                };
                if at < expires_at {
                    return Err(ApprovalError::NotYetDue(expires_at));
                }
                Ok(vec![ApprovalEvent::ApprovalExpired(ApprovalExpired {
                    job_id: self.job_id.clone(),
                    workflow_key: self.workflow_key.clone(),
                    expired_at: at,
                })])
            }
        }
    }
}

crate::commands::aggregate!(
    Approval,
    "approval",
    ApprovalCommand,
    ApprovalEvent,
    ApprovalError
);

impl Approval {
    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, event: ApprovalEvent) {
        match event {
            ApprovalEvent::ApprovalRequested(e) => {
                self.status = ApprovalStatus::Pending;
                self.job_id = e.job_id;
                self.workflow_key = e.workflow_key;
                self.expires_at = Some(e.expires_at);
            }
            ApprovalEvent::ApprovalGranted(e) => {
                self.status = ApprovalStatus::Approved;
                self.decided = Some((e.decided_by, e.decided_at));
            }
            ApprovalEvent::ApprovalRejected(e) => {
                self.status = ApprovalStatus::Rejected;
                self.decided = Some((e.decided_by, e.decided_at));
            }
            ApprovalEvent::ApprovalExpired(_) => self.status = ApprovalStatus::Expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use cqrs_es::test::TestFramework;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, minute, 0).unwrap()
    }

    fn framework() -> TestFramework<Approval> {
        TestFramework::with(())
    }

    fn requested() -> ApprovalEvent {
        ApprovalEvent::ApprovalRequested(ApprovalRequested {
            job_id: "job-1".into(),
            workflow_key: "payment.release".into(),
            requested_by: "billing".into(),
            reason: Some("amount over limit".into()),
            expires_at: t(30),
        })
    }

    fn request(at: DateTime<Utc>) -> ApprovalCommand {
        ApprovalCommand::Request {
            request: RequestApproval {
                job_id: "job-1".into(),
                workflow_key: "payment.release".into(),
                requested_by: "billing".into(),
                reason: Some("amount over limit".into()),
                expires_at: t(30),
            },
            at,
        }
    }

    fn decide(by: &str) -> Decide {
        Decide {
            decided_by: by.into(),
            reason: "checked the invoice".into(),
        }
    }

    fn granted(at: DateTime<Utc>) -> ApprovalEvent {
        ApprovalEvent::ApprovalGranted(ApprovalDecided {
            job_id: "job-1".into(),
            workflow_key: "payment.release".into(),
            decided_by: "alice".into(),
            reason: "checked the invoice".into(),
            decided_at: at,
        })
    }

    #[test]
    fn request_an_approval() {
        framework()
            .given_no_previous_events()
            .when(request(t(0)))
            .then_expect_events(vec![requested()]);
    }

    #[test]
    fn request_with_expiry_in_the_past_is_refused() {
        framework()
            .given_no_previous_events()
            .when(request(t(31)))
            .then_expect_error(ApprovalError::ExpiryInPast {
                expires_at: t(30),
                at: t(31),
            });
    }

    #[test]
    fn approve_records_who_and_why() {
        framework()
            .given(vec![requested()])
            .when(ApprovalCommand::Approve {
                decision: decide("alice"),
                at: t(5),
            })
            .then_expect_events(vec![granted(t(5))]);
    }

    #[test]
    fn reject_records_who_and_why() {
        framework()
            .given(vec![requested()])
            .when(ApprovalCommand::Reject {
                decision: decide("bob"),
                at: t(6),
            })
            .then_expect_events(vec![ApprovalEvent::ApprovalRejected(ApprovalDecided {
                job_id: "job-1".into(),
                workflow_key: "payment.release".into(),
                decided_by: "bob".into(),
                reason: "checked the invoice".into(),
                decided_at: t(6),
            })]);
    }

    #[test]
    fn an_approval_is_decided_once() {
        framework()
            .given(vec![requested(), granted(t(5))])
            .when(ApprovalCommand::Reject {
                decision: decide("bob"),
                at: t(6),
            })
            .then_expect_error(ApprovalError::AlreadyDecided {
                status: "approved",
                decided: Some(("alice".into(), t(5))),
            });
        framework()
            .given(vec![requested(), granted(t(5))])
            .when(ApprovalCommand::Approve {
                decision: decide("alice"),
                at: t(6),
            })
            .then_expect_error(ApprovalError::AlreadyDecided {
                status: "approved",
                decided: Some(("alice".into(), t(5))),
            });
    }

    #[test]
    fn an_expired_approval_cannot_be_approved() {
        framework()
            .given(vec![
                requested(),
                ApprovalEvent::ApprovalExpired(ApprovalExpired {
                    job_id: "job-1".into(),
                    workflow_key: "payment.release".into(),
                    expired_at: t(30),
                }),
            ])
            .when(ApprovalCommand::Approve {
                decision: decide("alice"),
                at: t(31),
            })
            .then_expect_error(ApprovalError::Expired(t(30)));
    }

    #[test]
    fn approving_after_the_deadline_is_refused_even_before_expire_ran() {
        framework()
            .given(vec![requested()])
            .when(ApprovalCommand::Approve {
                decision: decide("alice"),
                at: t(30),
            })
            .then_expect_error(ApprovalError::Expired(t(30)));
    }

    #[test]
    fn expire_after_the_deadline() {
        framework()
            .given(vec![requested()])
            .when(ApprovalCommand::Expire { at: t(31) })
            .then_expect_events(vec![ApprovalEvent::ApprovalExpired(ApprovalExpired {
                job_id: "job-1".into(),
                workflow_key: "payment.release".into(),
                expired_at: t(31),
            })]);
    }

    #[test]
    fn expire_before_the_deadline_is_refused() {
        framework()
            .given(vec![requested()])
            .when(ApprovalCommand::Expire { at: t(10) })
            .then_expect_error(ApprovalError::NotYetDue(t(30)));
    }

    #[test]
    fn a_decided_approval_does_not_expire() {
        framework()
            .given(vec![requested(), granted(t(5))])
            .when(ApprovalCommand::Expire { at: t(31) })
            .then_expect_error(ApprovalError::AlreadyDecided {
                status: "approved",
                decided: Some(("alice".into(), t(5))),
            });
    }

    #[test]
    fn deciding_a_missing_approval_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(ApprovalCommand::Approve {
                decision: decide("alice"),
                at: t(1),
            })
            .then_expect_error(ApprovalError::NotFound);
    }
}
