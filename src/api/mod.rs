//! Entry points other services use: command intake over NATS request/reply,
//! and the HTTP API (reads over the projections, commands, n8n callbacks).

pub mod auth;
mod body;
pub mod http;
pub mod n8n;
pub mod nats;
#[cfg(test)]
mod proptests;
pub mod read;
pub mod write;
