//! Who is calling, whichever door the command came through: a [`Caller`]
//! the door has verified (a bearer token over HTTP, see `auth`; the
//! broker's `Nats-Request-Info` over NATS, see `broker_identity`), its
//! [`Role`], and the checks both doors apply before a command reaches the
//! bus. A refusal is a [`CommandError`] with code `forbidden` or
//! `not_found`, the same over NATS and HTTP.

use crate::bus::{CommandBus, CommandError};
use crate::commands::ErrorCode;
use crate::config;
use crate::events::envelope::Actor;

/// What a verified caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submits, reads and cancels its own jobs.
    Client,
    /// Also decides approvals, flips the kill-switch, acts on any job.
    Operator,
    /// The job handler: only its own commands (`job.start`,
    /// `job.complete`, ...; over NATS only).
    Handler,
    /// Reads every client's jobs, executions, audit trail and approvals,
    /// and the secret-access list; sends no command at all (over HTTP
    /// only: the NATS door takes only commands).
    Auditor,
}

impl Role {
    /// The role's name in messages: `client`, `operator`, `handler`,
    /// `auditor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Handler => "handler",
            Role::Auditor => "auditor",
        }
    }

    /// Whether the role may send commands at all (every role but
    /// `auditor`, which only reads).
    pub fn may_command(self) -> bool {
        match self {
            Role::Client | Role::Operator | Role::Handler => true,
            Role::Auditor => false,
        }
    }
}

impl From<config::Role> for Role {
    fn from(r: config::Role) -> Self {
        match r {
            config::Role::Client => Role::Client,
            config::Role::Operator => Role::Operator,
            config::Role::Auditor => Role::Auditor,
        }
    }
}

/// A verified caller: over HTTP the `[[clients]]` entry its token belongs
/// to, over NATS the user the broker vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's id: the actor's `client_id` on the events its commands
    /// write, matched against jobs' `client_id`.
    pub client_id: String,
    /// What the caller may do.
    pub role: Role,
}

impl Caller {
    /// A caller with this id and role, once the door has verified them.
    pub fn new(client_id: impl Into<String>, role: Role) -> Self {
        Caller {
            client_id: client_id.into(),
            role,
        }
    }

    /// The identity recorded on the events this caller's commands write;
    /// `user_id` is the person behind the caller, as the caller names it.
    pub fn actor(&self, user_id: Option<String>) -> Actor {
        Actor {
            client_id: self.client_id.clone(),
            user_id,
        }
    }

    fn forbidden(&self, message: String) -> CommandError {
        CommandError {
            code: ErrorCode::Forbidden,
            message,
            field: None,
        }
    }

    /// Refuses callers that may send no command (auditors: read-only);
    /// `what` names the command. Every command path calls this (or
    /// [`Caller::require`] with a list of roles that has no auditor).
    pub fn require_may_command(&self, what: &str) -> Result<(), CommandError> {
        if self.role.may_command() {
            return Ok(());
        }
        Err(self.forbidden(format!(
            "{what} is a command; {:?} has the {} role, which only reads",
            self.client_id,
            self.role.as_str()
        )))
    }

    /// Refuses callers without the operator role; `what` names the action.
    pub fn require_operator(&self, what: &str) -> Result<(), CommandError> {
        self.require(&[Role::Operator], what)
    }

    /// Refuses callers whose role is not one of `roles`; `what` names the
    /// action.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), CommandError> {
        if roles.contains(&self.role) {
            return Ok(());
        }
        let needed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(self.forbidden(format!(
            "{what} needs the {} role; {:?} has the {} role",
            needed.join(" or "),
            self.client_id,
            self.role.as_str()
        )))
    }

    /// A field of the body that names a party the caller speaks for
    /// (`client_id` of a submission, `decided_by` of a decision) may only
    /// restate the caller's id: it is the caller's id when absent.
    pub fn check_names_self(&self, field: &str, named: Option<&str>) -> Result<(), CommandError> {
        match named {
            Some(n) if n != self.client_id => Err(self.forbidden(format!(
                "{field} {n:?} is not the caller's id {:?}; a caller acts only as itself \
                 (leave {field} out, or name the person behind the caller as user_id)",
                self.client_id
            ))),
            _ => Ok(()),
        }
    }

    /// The client whose jobs the caller may see; `None`: every client's
    /// (operators and auditors).
    pub fn job_scope(&self) -> Option<&str> {
        match self.role {
            Role::Operator | Role::Auditor => None,
            Role::Client | Role::Handler => Some(&self.client_id),
        }
    }

    /// Whether the caller may act on (send a command about) a job of
    /// `job_client_id`: never for an auditor, who sees every job.
    pub fn may_act_on(&self, job_client_id: &str) -> bool {
        self.role.may_command() && self.job_scope().is_none_or(|own| own == job_client_id)
    }

    /// Refuses a job that does not exist or that the caller may not act on,
    /// alike (`not_found`): another client's job is not the caller's to
    /// learn of. An auditor is refused `forbidden` before the job is
    /// looked up.
    pub async fn check_job(&self, bus: &CommandBus, job_id: &str) -> Result<(), CommandError> {
        self.require_may_command("acting on a job")?;
        let loaded = bus.load_job(job_id).await.map_err(CommandError::from)?;
        if loaded.version == 0 || !self.may_act_on(&loaded.state.client_id) {
            return Err(CommandError {
                code: ErrorCode::NotFound,
                message: format!("job {job_id} not found"),
                field: None,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: &str, role: Role) -> Caller {
        Caller::new(id, role)
    }

    #[test]
    fn roles_are_checked_and_named_in_the_refusal() {
        let b = caller("billing", Role::Client);
        let e = b.require_operator("deciding an approval").unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("operator role"), "{}", e.message);
        assert!(e.message.contains("client role"), "{}", e.message);
        assert!(caller("ops", Role::Operator)
            .require_operator("deciding an approval")
            .is_ok());
        let h = caller("handler", Role::Handler);
        assert!(h.require(&[Role::Handler], "job.complete").is_ok());
        assert!(h.require_operator("approving").is_err());
        assert!(b.require(&[Role::Handler], "job.complete").is_err());
    }

    #[test]
    fn a_caller_names_only_itself() {
        let b = caller("billing", Role::Client);
        assert!(b.check_names_self("client_id", None).is_ok());
        assert!(b.check_names_self("client_id", Some("billing")).is_ok());
        let e = b.check_names_self("client_id", Some("ops")).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        let o = caller("ops", Role::Operator);
        assert!(
            o.check_names_self("client_id", Some("billing")).is_err(),
            "an operator does not submit in another client's name either"
        );
    }

    #[test]
    fn clients_and_the_handler_see_their_own_jobs_operators_all() {
        assert!(caller("billing", Role::Client).may_act_on("billing"));
        assert!(!caller("billing", Role::Client).may_act_on("other"));
        assert!(caller("ops", Role::Operator).may_act_on("other"));
        assert!(!caller("handler", Role::Handler).may_act_on("billing"));
    }

    #[test]
    fn an_auditor_sees_every_job_and_sends_no_command() {
        let a = caller("audit", Role::Auditor);
        assert_eq!(a.job_scope(), None, "an auditor reads every client's jobs");
        assert!(!a.may_act_on("billing") && !a.may_act_on("audit"));
        let e = a.require_may_command("submitting a job").unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("auditor role"), "{}", e.message);
        assert!(a.require_operator("deciding an approval").is_err());
        assert!(a
            .require(&[Role::Client, Role::Operator], "job.submit")
            .is_err());
        for r in [Role::Client, Role::Operator, Role::Handler] {
            assert!(caller("x", r).require_may_command("x").is_ok(), "{r:?}");
        }
        assert_eq!(Role::from(config::Role::Auditor), Role::Auditor);
    }
}
