//! Entry points other services use: command intake over NATS request/reply,
//! and the HTTP API (reads over the projections, commands, n8n callbacks).
//! Both identify the caller (`auth` over HTTP, `broker_identity` over NATS)
//! and apply the same role checks (`caller`).

pub mod auth;
mod body;
pub mod broker_identity;
pub mod caller;
mod console;
pub mod http;
pub mod live;
pub mod memory;
pub mod n8n;
pub mod nats;
pub mod openapi;
#[cfg(test)]
mod proptests;
mod query;
pub mod read;
pub mod request;
pub mod secrets;
mod time;
pub mod write;
