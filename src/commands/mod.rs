//! The domain: aggregates with their commands, events and errors (one
//! folder per aggregate), the bounds on every number a command carries
//! (`limits`), and the workflow registry. Aggregates are plain data with
//! pure `decide`/`apply` (cqrs-es `Aggregate`): they do no I/O and read no
//! clock; anything time-dependent arrives inside the command. This room
//! depends on no other room of the crate.

pub mod approval;
pub mod job;
pub mod limits;
pub mod memory;
pub mod projection;
pub mod redact;
pub mod registry;
pub mod rejected_callback;
pub mod secret_access;
pub mod secret_cache;
pub mod workflow;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::Serialize;

/// Implements cqrs-es `Aggregate` for an aggregate of the one shape every
/// aggregate but `Job` (which decides with services) has: no services, a
/// pure `decide(&self, command)` and a `fold(&mut self, event)`.
macro_rules! aggregate {
    ($agg:ty, $type:literal, $cmd:ty, $event:ty, $err:ty) => {
        impl cqrs_es::Aggregate for $agg {
            const TYPE: &'static str = $type;
            type Command = $cmd;
            type Event = $event;
            type Error = $err;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                let decided = self.decide(command);
                $crate::commands::write_decided(self, decided, sink).await
            }

            fn apply(&mut self, event: Self::Event) {
                self.fold(event)
            }
        }
    };
}
pub(crate) use aggregate;

/// The body of every aggregate's cqrs-es `handle`: writes the events its
/// pure `decide` returned (applying each to the state), or the refusal.
pub(crate) async fn write_decided<A: Aggregate>(
    aggregate: &mut A,
    decided: Result<Vec<A::Event>, A::Error>,
    sink: &EventSink<A>,
) -> Result<(), A::Error> {
    for event in decided? {
        sink.write(event, aggregate).await;
    }
    Ok(())
}

/// The error codes a command reply can carry (docs/EVENTS.md, "Replies").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a field is out of range; fix the request.
    Validation,
    /// The caller could not be identified (no verified identity came with
    /// the command); connect with a credential the system knows.
    Unauthenticated,
    /// The caller is known but may not send this command (another client's
    /// job, or a command of another role).
    Forbidden,
    /// The addressed aggregate does not exist.
    NotFound,
    /// A concurrent writer won, or a command id was reused for another command.
    Conflict,
    /// A business rule said no (for example a transition out of a final state).
    Rejected,
    /// The event log could not be reached; retry later with the same command id.
    Unavailable,
    /// Something inside flowledger failed; see its log.
    Internal,
}

impl ErrorCode {
    /// The wire form, `error.code` in replies: `validation`, `not_found`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Validation => "validation",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Rejected => "rejected",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A domain error knows which reply code it maps to.
pub trait DomainError: std::error::Error {
    /// What the caller does about it.
    fn code(&self) -> ErrorCode;
    /// The command field at fault, for bad input.
    fn field(&self) -> Option<&'static str> {
        None
    }
}
