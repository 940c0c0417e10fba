//! The in-memory cache of secret values (never written to disk): per path,
//! the latest version read and each explicitly asked-for version, with the
//! time each was read from Vault. Fresh within the TTL; usable as
//! last-known-good up to the maximum staleness; dropped past it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::secrets::vault::SecretValue;

/// Paths kept at most; past it the path read longest ago is dropped.
const MAX_PATHS: usize = 10_000;

/// Explicitly asked-for versions kept per path; past it the lowest goes.
const MAX_VERSIONS_PER_PATH: usize = 16;

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
    paths: Mutex<Paths>,
}

#[derive(Debug, Default)]
struct Paths {
    entries: HashMap<String, PathEntry>,
    /// Raised by every invalidation: a value read from Vault before it
    /// (its read began at an older epoch) is not kept, so an invalidation
    /// is never undone by a read that was in flight.
    epoch: u64,
}

/// Where the cache stood when a Vault read began ([`SecretCache::epoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

impl SecretCache {
    /// A cache serving values for `ttl` and as last-known-good up to
    /// `max_staleness`.
    pub fn new(ttl: Duration, max_staleness: Duration) -> Self {
        SecretCache {
            ttl,
            max_staleness,
            paths: Mutex::new(Paths::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Paths> {
        // a panic while holding the lock leaves a map that is still valid
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken before a Vault read; [`insert`](Self::insert) keeps the value
    /// only if no invalidation came in between.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.lock().epoch)
    }

    /// Whether `c` may still be served as last-known-good now.
    pub fn within_staleness(&self, c: &Cached) -> bool {
        c.read_at.elapsed() < self.max_staleness
    }

    /// The value for `path` at `version` (`None`: the latest read).
    pub fn lookup(&self, path: &str, version: Option<u64>) -> Lookup {
        let mut paths = self.lock();
        let Some(entry) = paths.entries.get_mut(path) else {
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

    /// Keeps a value read from Vault by a read that began at `since`: as
    /// that version, and as the latest when `latest` (a read without a
    /// version) or when it is newer than the latest held (rotation). An
    /// older version never replaces a newer latest. Nothing is kept if an
    /// invalidation came after `since`.
    pub fn insert(&self, path: &str, since: Epoch, latest: bool, c: Cached) {
        let mut paths = self.lock();
        if paths.epoch != since.0 {
            return;
        }
        if paths.entries.len() >= MAX_PATHS && !paths.entries.contains_key(path) {
            // the path read longest ago goes first
            let oldest = paths
                .entries
                .iter()
                .filter_map(|(p, e)| {
                    let reads = e.latest.iter().chain(e.versions.values());
                    reads.map(|c| c.read_at).max().map(|t| (t, p.clone()))
                })
                .min();
            if let Some((_, p)) = oldest {
                paths.entries.remove(&p);
            }
        }
        let entry = paths.entries.entry(path.to_string()).or_default();
        let newer = entry.latest.as_ref().is_none_or(|l| c.version >= l.version);
        if (latest || entry.latest.is_some()) && newer {
            entry.latest = Some(c.clone());
        }
        if entry.versions.len() >= MAX_VERSIONS_PER_PATH && !entry.versions.contains_key(&c.version)
        {
            if let Some(&lowest) = entry.versions.keys().min() {
                entry.versions.remove(&lowest);
            }
        }
        entry.versions.insert(c.version, c);
    }

    /// Drops every value of `path`; whether any was held.
    pub fn invalidate(&self, path: &str) -> bool {
        let mut paths = self.lock();
        paths.epoch += 1;
        paths.entries.remove(path).is_some()
    }

    /// Drops the values of every path whose `secret_cache` aggregate id is
    /// `id` (an invalidation seen on the event subject names only that).
    pub fn invalidate_id(&self, id: &str) -> usize {
        let mut paths = self.lock();
        paths.epoch += 1;
        let before = paths.entries.len();
        paths
            .entries
            .retain(|p, _| crate::commands::secret_cache::aggregate_id(p) != id);
        before - paths.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(version: u64) -> Cached {
        Cached {
            value: Arc::new(SecretValue::new(json!({ "k": version }))),
            version,
            read_at: Instant::now(),
            read_at_utc: String::new(),
        }
    }

    fn latest_version(c: &SecretCache, path: &str) -> Option<u64> {
        match c.lookup(path, None) {
            Lookup::Fresh(c) | Lookup::Stale(c) => Some(c.version),
            Lookup::Miss => None,
        }
    }

    #[test]
    fn a_read_in_flight_does_not_undo_an_invalidation() {
        let c = SecretCache::new(Duration::from_secs(60), Duration::from_secs(600));
        let before = c.epoch();
        c.invalidate("secret/data/a");
        c.insert("secret/data/a", before, true, value(1));
        assert_eq!(latest_version(&c, "secret/data/a"), None);
        c.insert("secret/data/a", c.epoch(), true, value(1));
        assert_eq!(latest_version(&c, "secret/data/a"), Some(1));
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_latest() {
        let c = SecretCache::new(Duration::from_secs(60), Duration::from_secs(600));
        let e = c.epoch();
        c.insert("secret/data/a", e, true, value(2));
        c.insert("secret/data/a", e, true, value(1));
        assert_eq!(latest_version(&c, "secret/data/a"), Some(2));
        // an explicit read of a newer version moves the latest on
        c.insert("secret/data/a", e, false, value(3));
        assert_eq!(latest_version(&c, "secret/data/a"), Some(3));
        assert!(matches!(
            c.lookup("secret/data/a", Some(1)),
            Lookup::Fresh(_)
        ));
    }

    #[test]
    fn past_the_ttl_a_value_is_stale_and_past_the_staleness_gone() {
        let c = SecretCache::new(Duration::ZERO, Duration::from_millis(50));
        c.insert("secret/data/a", c.epoch(), true, value(1));
        assert!(matches!(c.lookup("secret/data/a", None), Lookup::Stale(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(c.lookup("secret/data/a", None), Lookup::Miss));
    }
}
