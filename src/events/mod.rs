//! The ledger: the envelope, the hash chain, the JetStream log, the
//! aggregate store (cqrs-es `EventStore` on the log) and the upcasters.
//! It knows aggregates only through cqrs-es traits; the domain's event
//! types live beside their aggregates in `crate::commands`.

pub mod chain;
pub mod envelope;
pub mod log;
pub mod store;
pub mod upcasters;
