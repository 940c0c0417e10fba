//! Entry points other services use: command intake over NATS request/reply.
//! The HTTP read API over the projections.

pub mod http;
pub mod intake;
