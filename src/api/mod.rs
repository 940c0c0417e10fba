//! Entry points other services use: command intake over NATS request/reply.
//! (The HTTP API arrives with the read models, issue 3.)

pub mod intake;
