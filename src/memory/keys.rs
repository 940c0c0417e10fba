//! Data subjects' keys: one 32-byte key per subject, kept in Vault (KV v2,
//! under `[memory] key_path`), never in the log. Every personal value a
//! memory event holds is sealed with it (XChaCha20-Poly1305, see
//! [`SealKeys`]). Erasure writes a tombstone over the key and destroys
//! every version that held it: from then on nobody can open the subject's
//! events, while the hash chain over their ciphertext still verifies.
//!
//! Keys are cached in memory for a short time (`[memory] key_cache_seconds`);
//! the instance that erases a subject drops its key at once, the others
//! when their cache time runs out (docs/MEMORY.md, "Limits").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::{OpenError, SealKeys, Sealed};
use crate::secrets::service::SecretService;
use crate::secrets::vault::VaultError;

/// Keys one instance holds in memory at most.
const MAX_CACHED_KEYS: usize = 10_000;

/// One subject's key. `Debug` shows its id only.
pub struct SubjectKey {
    id: String,
    raw: Zeroizing<[u8; 32]>,
    ring: SealKeys,
}

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectKey({})", self.id)
    }
}

impl SubjectKey {
    fn new(id: String, raw: [u8; 32]) -> Self {
        SubjectKey {
            ring: SealKeys::single(&id, raw),
            id,
            raw: Zeroizing::new(raw),
        }
    }

    /// The key's id (`m-` and 16 random hex digits, made with the key): the
    /// subject's events name it, so content sealed with any other key (one
    /// made anew after the first was lost) is refused, never mixed in.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext` (deterministically: equal values seal equally).
    pub fn seal(&self, plaintext: &[u8]) -> Sealed {
        self.ring.seal(plaintext)
    }

    /// Seals a JSON value's compact text.
    pub fn seal_json(&self, value: &Value) -> Sealed {
        self.seal(value.to_string().as_bytes())
    }

    /// Opens a value this key sealed.
    pub fn open(&self, sealed: &Sealed) -> Result<Vec<u8>, OpenError> {
        self.ring.open(sealed)
    }

    /// Opens a sealed JSON value.
    pub fn open_json(&self, sealed: &Sealed) -> Result<Value, OpenError> {
        let bytes = self.open(sealed)?;
        serde_json::from_slice(&bytes).map_err(|_| OpenError::Damaged(sealed.key_id.clone()))
    }

    /// A keyed id (32 hex digits) of `parts` under this key, for `domain`:
    /// stable while the key lives, meaningless once it is destroyed.
    pub fn keyed_id(&self, domain: &str, parts: &[&str]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&*self.raw)
            .expect("HMAC-SHA256 takes keys of any length");
        mac.update(domain.as_bytes());
        for p in parts {
            mac.update(&[0]);
            mac.update(p.as_bytes());
        }
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

/// Why a subject's key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The subject was erased: its key is destroyed for good.
    #[error("the subject's key was destroyed (erased)")]
    Erased,
    /// No key was ever made for the subject (nothing of it can be opened).
    #[error("no key for this subject in Vault at {0}; was it deleted outside flowledger?")]
    Missing(String),
    /// What Vault holds there is not a key flowledger wrote.
    #[error("the key at {0} in Vault is not a flowledger data key")]
    Damaged(String),
    /// Vault could not be asked (unreachable, refusing, failing).
    #[error("the subject's key could not be read from Vault: {0}")]
    Vault(#[from] VaultError),
}

impl KeyError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KeyError::Vault(e) if e.is_retryable())
    }
}

/// What Vault holds for a subject.
enum Stored {
    Key(Arc<SubjectKey>),
    Erased,
}

/// The subjects' keys, through flowledger's Vault client.
pub struct SubjectKeys {
    secrets: Arc<SecretService>,
    base: String,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Arc<SubjectKey>)>>,
}

impl std::fmt::Debug for SubjectKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectKeys({})", self.base)
    }
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    // the OS's generator; without one nothing can be sealed safely
    getrandom::fill(&mut k).expect("the operating system's random generator is available");
    k
}

impl SubjectKeys {
    /// Keys under the KV v2 path `base` (e.g.
    /// `secret/data/flowledger/memory-keys`), cached for `ttl`.
    pub fn new(secrets: Arc<SecretService>, base: &str, ttl: Duration) -> Self {
        SubjectKeys {
            secrets,
            base: base.trim_end_matches('/').to_string(),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, subject: &str) -> String {
        format!("{}/{subject}", self.base)
    }

    fn cached(&self, subject: &str) -> Option<Arc<SubjectKey>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(subject)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, k)| k.clone())
    }

    fn remember(&self, subject: &str, key: Arc<SubjectKey>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_KEYS {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            // still full of live keys (a rebuild over many subjects): start
            // over rather than scan a full cache at every insert
            if cache.len() >= MAX_CACHED_KEYS / 2 {
                cache.clear();
            }
        }
        cache.insert(subject.to_string(), (Instant::now(), key));
    }

    /// Drops a subject's key from this instance's cache.
    pub fn forget(&self, subject: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.remove(subject);
    }

    async fn read(&self, subject: &str) -> Result<Option<Stored>, KeyError> {
        let path = self.path(subject);
        let read = match self.secrets.vault().read(&path, None, None).await {
            Ok(r) => r,
            Err(VaultError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let v = read.value.expose();
        if v.get("erased").and_then(Value::as_bool) == Some(true) {
            return Ok(Some(Stored::Erased));
        }
        let raw = v
            .get("key")
            .and_then(Value::as_str)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| KeyError::Damaged(path.clone()))?;
        let id = v
            .get("key_id")
            .and_then(Value::as_str)
            .filter(|id| id.starts_with("m-"))
            .ok_or_else(|| KeyError::Damaged(path.clone()))?;
        Ok(Some(Stored::Key(Arc::new(SubjectKey::new(
            id.to_string(),
            raw,
        )))))
    }

    /// The subject's key, to open its events.
    pub async fn get(&self, subject: &str) -> Result<Arc<SubjectKey>, KeyError> {
        if let Some(k) = self.cached(subject) {
            return Ok(k);
        }
        match self.read(subject).await? {
            Some(Stored::Key(k)) => {
                self.remember(subject, k.clone());
                Ok(k)
            }
            Some(Stored::Erased) => Err(KeyError::Erased),
            None => Err(KeyError::Missing(self.path(subject))),
        }
    }

    /// The subject's key, made (and stored in Vault) if it has none yet. A
    /// key lost from Vault for a subject that exists is made anew here too,
    /// with a new id: the aggregate then refuses the command (the subject's
    /// events name the old id), so the loss shows instead of mixing keys.
    /// Two instances making one at once agree: Vault's check-and-set lets
    /// one write, the other reads it.
    pub async fn get_or_create(&self, subject: &str) -> Result<Arc<SubjectKey>, KeyError> {
        match self.get(subject).await {
            Err(KeyError::Missing(_)) => {}
            other => return other,
        }
        let raw = Zeroizing::new(random_key());
        let mut id_bytes = [0u8; 8];
        getrandom::fill(&mut id_bytes)
            .expect("the operating system's random generator is available");
        let id = format!("m-{}", hex::encode(id_bytes));
        let data = json!({"key": hex::encode(*raw), "key_id": id});
        match self
            .secrets
            .vault()
            .write(&self.path(subject), &data, Some(0))
            .await
        {
            Ok(_) => {
                let k = Arc::new(SubjectKey::new(id, *raw));
                self.remember(subject, k.clone());
                Ok(k)
            }
            // another writer won the check-and-set: use its key
            Err(VaultError::Rejected { status: 400, .. }) => self.get(subject).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Destroys the subject's key: a tombstone becomes the latest version
    /// and every version before it is destroyed. It always completes for a
    /// reachable Vault: an already erased key is destroyed again, and a key
    /// that is missing or damaged gets its tombstone all the same (so an
    /// erasure is never stuck on a broken key).
    pub async fn destroy(&self, subject: &str) -> Result<(), KeyError> {
        self.forget(subject);
        let path = self.path(subject);
        let vault = self.secrets.vault();
        let current = match vault.latest_version(&path).await {
            Ok(v) => v,
            Err(VaultError::NotFound { .. }) => 0,
            Err(e) => return Err(e.into()),
        };
        let erased = current > 0 && matches!(self.read(subject).await, Ok(Some(Stored::Erased)));
        let tomb = if erased {
            current
        } else {
            vault
                .write(&path, &json!({"erased": true}), Some(current))
                .await?
        };
        let versions: Vec<u64> = (1..tomb).collect();
        if !versions.is_empty() {
            vault.destroy(&path, versions).await?;
        }
        self.forget(subject);
        Ok(())
    }
}
