//! Secrets flowledger reads at run time from a secret store, never from the
//! event log or its configuration files: `vault` is the client of a Vault
//! API (HashiCorp Vault or OpenBao), KV v2 reads with a token or AppRole
//! login that it renews itself.
//!
//! A secret value is held as a [`vault::SecretValue`], which prints as
//! `<redacted>` and is wiped when dropped; no error, log line or `Debug`
//! output of this room carries a value or a token.

pub mod cache;
pub mod service;
pub mod vault;
