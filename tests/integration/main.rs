//! Integration tests against a real nats-server started per test on a free
//! loopback port (binary from FLOWLEDGER_NATS_SERVER, else `nats-server`).
//! `scripts/test.sh` runs them on nats-server 2.9.10 and 2.15. The secrets
//! tests start OpenBao (FLOWLEDGER_BAO, else `bao`; see openbao.rs).
//! PostgreSQL: Debian's 15 (PG_BIN); pgvector.rs runs on PostgreSQL 18
//! with pgvector (FLOWLEDGER_PG18_BIN; see helpers::pgvector_database).

mod audit;
mod cli;
mod cluster;
mod cluster_harness;
mod console;
mod drain;
mod event_store;
mod fault_checks;
mod faults;
mod handlers;
mod hardening;
mod helpers;
mod http_api;
mod http_conventions;
mod memory;
mod memory_embeddings;
mod memory_extractor;
mod memory_projection;
mod memory_retrieval;
mod n8n_kit;
mod nats_identity;
mod openbao;
mod peers;
mod pgvector;
mod projections;
mod reload;
mod scale_out;
mod secret_access;
mod secret_audit;
mod secrets;
mod secrets_vault;
mod step_secrets;
mod survival;
mod tracing;
