//! Events of the `ProjectionOps` aggregate (one per projection name).
//! `event_type` strings are a public contract and never renamed.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum ProjectionEvent {
    ProjectionEventSkipped(ProjectionEventSkipped),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionEventSkipped {
    pub version: i32,
    pub seq: u64,
    pub reason: String,
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
