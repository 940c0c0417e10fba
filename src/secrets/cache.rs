//! The in-memory cache of secret values (never written to disk): per path,
//! the latest version read and each explicitly asked-for version, with the
//! time each was read from Vault. Fresh within the TTL; usable as
//! last-known-good up to the maximum staleness; dropped past it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::secrets::vault::SecretValue;

/// Entries kept at most; past it the oldest path is dropped.
const MAX_PATHS: usize = 10_000;

/// One value as read from Vault.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The whole data map of the version (fields are taken on serving).
    pub value: Arc<SecretValue>,
    /// Its KV version.
    pub version: u64,
    /// When it was read from Vault (monotonic clock).
    pub read_at: Instant,
    /// The same time, RFC 3339 UTC, for the access record.
    pub read_at_utc: String,
}

#[derive(Debug, Default)]
struct PathEntry {
    latest: Option<Cached>,
    versions: HashMap<u64, Cached>,
}

/// How fresh a cached value is.
#[derive(Debug)]
pub enum Lookup {
    /// Within the TTL: serve it.
    Fresh(Cached),
    /// Past the TTL, within the maximum staleness: serve it only if Vault
    /// cannot be read.
    Stale(Cached),
    /// Nothing usable.
    Miss,
}

/// The cache; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SecretCache {
    ttl: Duration,
    max_staleness: Duration,
    paths: Mutex<HashMap<String, PathEntry>>,
}

impl SecretCache {
    /// A cache serving values for `ttl` and as last-known-good up to
    /// `max_staleness`.
    pub fn new(ttl: Duration, max_staleness: Duration) -> Self {
        SecretCache {
            ttl,
            max_staleness,
            paths: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PathEntry>> {
        // a panic while holding the lock leaves a map that is still valid
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value for `path` at `version` (`None`: the latest read).
    pub fn lookup(&self, path: &str, version: Option<u64>) -> Lookup {
        let mut paths = self.lock();
        let Some(entry) = paths.get_mut(path) else {
            return Lookup::Miss;
        };
        let slot = match version {
            None => entry.latest.as_ref(),
            Some(v) => entry.versions.get(&v),
        };
        let Some(c) = slot.cloned() else {
            return Lookup::Miss;
        };
        let age = c.read_at.elapsed();
        if age < self.ttl {
            Lookup::Fresh(c)
        } else if age < self.max_staleness {
            Lookup::Stale(c)
        } else {
            // past the maximum staleness: no longer kept
            match version {
                None => entry.latest = None,
                Some(v) => {
                    entry.versions.remove(&v);
                }
            }
            Lookup::Miss
        }
    }

    /// Keeps a value just read from Vault: as that version, and as the
    /// latest when `latest` (a read without a version). A newer version
    /// replaces the latest one (rotation).
    pub fn insert(&self, path: &str, latest: bool, c: Cached) {
        let mut paths = self.lock();
        if paths.len() >= MAX_PATHS && !paths.contains_key(path) {
            let oldest = paths
                .iter()
                .filter_map(|(p, e)| e.latest.as_ref().map(|c| (c.read_at, p.clone())))
                .min();
            match oldest {
                Some((_, p)) => paths.remove(&p),
                None => paths.keys().next().cloned().and_then(|p| paths.remove(&p)),
            };
        }
        let entry = paths.entry(path.to_string()).or_default();
        if latest {
            entry.latest = Some(c.clone());
        }
        entry.versions.insert(c.version, c);
    }

    /// Drops every value of `path`; whether any was held.
    pub fn invalidate(&self, path: &str) -> bool {
        self.lock().remove(path).is_some()
    }

    /// Drops the values of every path whose `secret_cache` aggregate id is
    /// `id` (an invalidation seen on the event subject names only that).
    pub fn invalidate_id(&self, id: &str) -> usize {
        let mut paths = self.lock();
        let before = paths.len();
        paths.retain(|p, _| crate::commands::secret_cache::aggregate_id(p) != id);
        before - paths.len()
    }
}
