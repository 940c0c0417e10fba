//! Schema evolution: old event versions are upcast on read, the log is never
//! rewritten. Every event type is at version 1.0 today, so the list is empty;
//! a new version adds a `SemanticVersionEventUpcaster` here (docs/EVENTS.md,
//! "Schema evolution").

use std::sync::OnceLock;

use cqrs_es::persist::{EventUpcaster, SerializedEvent};

/// Every upcaster, oldest first; built once per process.
pub fn all() -> &'static [Box<dyn EventUpcaster>] {
    static ALL: OnceLock<Vec<Box<dyn EventUpcaster>>> = OnceLock::new();
    ALL.get_or_init(Vec::new)
}

/// Applies the upcasters in order, as cqrs-es does for its own stores.
pub fn upcast(event: SerializedEvent, upcasters: &[Box<dyn EventUpcaster>]) -> SerializedEvent {
    upcasters.iter().fold(event, |event, u| {
        if u.can_upcast(&event.event_type, &event.event_version) {
            u.upcast(event)
        } else {
            event
        }
    })
}
