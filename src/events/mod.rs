//! Event types, the envelope, the hash chain and the JetStream event store.

pub mod approval;
pub mod chain;
pub mod envelope;
pub mod job;
pub mod log;
pub mod store;
pub mod upcasters;
pub mod workflow;
