//! flowledger: an event-sourced command backbone for workflow automation on
//! NATS JetStream. See docs/ARCHITECTURE.md for the map.

pub mod api;
pub mod app;
pub mod audit;
pub mod backoff;
pub mod bus;
pub mod cli;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod events;
pub mod handlers;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod projections;
pub mod secrets;
pub mod telemetry;
