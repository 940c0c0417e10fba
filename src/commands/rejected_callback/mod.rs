//! The `RejectedCallback` aggregate (aggregate type `callback`, a public
//! contract): one incoming callback that was refused (bad, stale or
//! replayed signature), recorded under a fresh id. The job it named is not
//! changed.

pub mod events;

use serde::{Deserialize, Serialize};

use crate::commands::{DomainError, ErrorCode};
use events::{CallbackEvent, CallbackRejected};

/// One refused incoming callback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RejectedCallback {
    /// Its `CallbackRejected` is recorded.
    pub rejected: bool,
}

/// Why a rejection could not be recorded; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RejectedCallbackError {
    /// The id already holds a rejection (`conflict`); record under a fresh id.
    #[error("this callback record already exists; use a new id")]
    AlreadyRecorded,
}

impl DomainError for RejectedCallbackError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Conflict
    }
}

impl RejectedCallback {
    /// Pure decision: a rejection is recorded once, under its fresh id.
    pub fn decide(
        &self,
        command: CallbackRejected,
    ) -> Result<Vec<CallbackEvent>, RejectedCallbackError> {
        if self.rejected {
            return Err(RejectedCallbackError::AlreadyRecorded);
        }
        Ok(vec![CallbackEvent::CallbackRejected(command)])
    }
}

crate::commands::aggregate!(
    RejectedCallback,
    "callback",
    CallbackRejected,
    CallbackEvent,
    RejectedCallbackError
);

impl RejectedCallback {
    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, _: CallbackEvent) {
        self.rejected = true;
    }
}
