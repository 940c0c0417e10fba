//! Auditor tools: replay, stream digests, signed checkpoints, export and
//! verification (docs/EVENTS.md is the specification they implement).

pub mod checkpoint;
pub mod export;
pub mod read;
pub mod verify;
