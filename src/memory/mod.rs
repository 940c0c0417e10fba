//! Conversation memory (seed 001, docs/MEMORY.md): the service that seals a
//! client's memory commands with the data subject's key and sends them
//! over the bus ([`service`]), the subjects' keys in Vault ([`keys`]), the
//! embeddings peer and its vectors' encoding ([`embedder`]), the handler that
//! records the episodes' embeddings ([`embedding`]), the fact extractor peer
//! ([`extractor`]) and the handler that records the facts it extracts
//! ([`extraction`]), with what the two peers share ([`peer`]: the HTTP
//! client, retries, the episode consumer).
//! Depends on commands, events, bus, secrets and crypto; the API doors
//! depend on it.

pub mod cleanup;
pub mod embedder;
pub mod embedding;
pub mod extraction;
pub mod extractor;
pub mod keys;
pub mod peer;
pub mod service;
