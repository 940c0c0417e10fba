//! Events of the `ProjectionOps` aggregate (one per projection name).
//! `event_type` strings are a public contract and never renamed.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Every event of aggregate type `projection` (id = the read model's name);
/// the variant name is the stored `event_type`, its struct the `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum ProjectionEvent {
    /// `ProjectionEventSkipped`: an operator let a read model pass an event.
    ProjectionEventSkipped(ProjectionEventSkipped),
}

/// An operator skipped, in one read model, the event it stopped at
/// (`flowledger projections resume --skip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionEventSkipped {
    /// The read model's schema version that stopped.
    pub version: i32,
    /// Stream sequence of the skipped message.
    pub seq: u64,
    /// Why it was skipped (`--reason`); never blank.
    pub reason: String,
    /// Who decided it (`--by`); never blank.
    pub skipped_by: String,
}

impl DomainEvent for ProjectionEvent {
    fn event_type(&self) -> String {
        "ProjectionEventSkipped".to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}
