//! Secret access: every door's read of a secret goes through
//! [`SecretService::read`], which decides by flowledger's policy, serves
//! from the cache or Vault (retrying, then last-known-good), records the
//! access as an event, and hands the value out only once that event is
//! stored. Nothing here logs, records or returns a value otherwise.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, Retryable};
use futures::StreamExt;

use crate::backoff::Backoff;
use crate::bus::{CommandBus, CommandError};
use crate::commands::secret_access::events::{
    AccessRequest, DecidedBy, SecretAccessDenied, SecretAccessEvent, SecretAccessFailed,
    SecretAccessGranted, ValueSource, VaultFailure,
};
use crate::commands::secret_access::policy::{Decision, SecretPolicy};
use crate::commands::secret_access::{check_request, RecordAccess};
use crate::commands::secret_cache::Invalidate;
use crate::commands::ErrorCode;
use crate::events::envelope::{format_time, CommandMeta};
use crate::events::log::EVENT_SUBJECT_PREFIX;
use crate::secrets::cache::{Cached, Lookup, SecretCache};
use crate::secrets::vault::{SecretValue, VaultClient, VaultError};

/// The cache and outage rules (`[secrets]`).
#[derive(Debug, Clone, Copy)]
pub struct SecretRules {
    /// Values are served from memory this long.
    pub cache_ttl: Duration,
    /// Last-known-good is served up to this age while Vault fails.
    pub max_staleness: Duration,
    /// Reads of Vault per request before last-known-good.
    pub retry_attempts: u32,
    /// The wait before the first retry, doubling.
    pub retry_base: Duration,
}

/// A secret handed to the caller, after its access event was stored.
#[derive(Debug)]
pub struct Served {
    /// The field asked for, or the whole data map.
    pub value: SecretValue,
    /// The KV version served.
    pub kv_version: u64,
    /// Where it came from.
    pub source: ValueSource,
    /// The stream sequence of the access event.
    pub event_seq: u64,
}

/// The secrets capability of one instance: policy, cache, Vault client.
/// Access events are recorded on the bus each call is given (the door's).
pub struct SecretService {
    vault: VaultClient,
    policy: SecretPolicy,
    cache: Arc<SecretCache>,
    rules: SecretRules,
}

/// What Vault's answer meant for this request.
enum Outcome {
    Value(Cached, ValueSource, Option<VaultFailure>),
    Denied(String, VaultFailure),
    Failed(ErrorCode, VaultFailure),
}

fn failure(e: &VaultError) -> VaultFailure {
    let (kind, status) = match e {
        VaultError::Unreachable { .. } => ("unreachable", None),
        VaultError::Failing { status, .. } => ("failing", Some(*status)),
        VaultError::Refused { status, .. } => ("refused", Some(*status)),
        VaultError::NotFound { .. } => ("not_found", Some(404)),
        VaultError::NoField { .. } => ("not_found", None),
        VaultError::Rejected { status, .. } => ("rejected", Some(*status)),
        VaultError::Auth { status, .. } => ("auth", Some(*status)),
        VaultError::BadAnswer { .. } => ("bad_answer", None),
        VaultError::BadAddress { .. } | VaultError::BadPath { .. } => ("bad_request", None),
    };
    // Vault's error texts and ours name paths and statuses, never values
    VaultFailure {
        kind: kind.into(),
        status,
        message: e.to_string(),
    }
}

/// The rule recorded on reads of flowledger's own keys (`[secrets.keys]`).
pub const OWN_KEYS_RULE: &str = "flowledger-own-keys";

fn check(request: &AccessRequest) -> Result<(), CommandError> {
    check_request(request).map_err(|e| {
        CommandError::validation(crate::commands::DomainError::field(&e), e.to_string())
    })
}

async fn fail(
    bus: &CommandBus,
    request: AccessRequest,
    rule: String,
    code: ErrorCode,
    vault_error: VaultFailure,
    meta: &CommandMeta,
) -> Result<Served, CommandError> {
    // the caller learns what to do, not Vault's address or internals (those
    // are in the event and the log)
    let message = match code {
        ErrorCode::Unavailable => format!(
            "{} cannot be read from Vault now ({}) and no value within the maximum \
             staleness is cached; retry later",
            request.path, vault_error.kind
        ),
        _ => vault_error.message.clone(),
    };
    let event = SecretAccessEvent::SecretAccessFailed(SecretAccessFailed {
        request,
        rule,
        code: code.as_str().into(),
        vault_error,
    });
    record(bus, event, meta).await?;
    metrics::counter!("flowledger_secret_reads_total", "decision" => "failed").increment(1);
    Err(refused(code, message))
}

/// Appends the access event; its stream sequence once stored.
async fn record(
    bus: &CommandBus,
    event: SecretAccessEvent,
    meta: &CommandMeta,
) -> Result<u64, CommandError> {
    let receipt = bus
        .secret_access(&meta.command_id, RecordAccess(event), meta)
        .await
        .map_err(CommandError::from)?;
    if receipt.duplicate {
        // the id answered an earlier read: no event of this read's own
        // was stored, so no value may leave
        return Err(refused(
            ErrorCode::Conflict,
            format!(
                "secret read {} was recorded before; every read needs its own request id",
                meta.command_id
            ),
        ));
    }
    Ok(receipt.stream_seq)
}

fn refused(code: ErrorCode, message: String) -> CommandError {
    CommandError {
        code,
        message,
        field: None,
    }
}

impl SecretService {
    /// The service reading Vault through `vault`, deciding by `policy`.
    pub fn new(vault: VaultClient, policy: SecretPolicy, rules: SecretRules) -> Self {
        SecretService {
            vault,
            policy,
            cache: Arc::new(SecretCache::new(rules.cache_ttl, rules.max_staleness)),
            rules,
        }
    }

    /// flowledger's policy, for checks at start.
    pub fn policy(&self) -> &SecretPolicy {
        &self.policy
    }

    /// The Vault client, for flowledger's own keys (memory's data keys).
    pub fn vault(&self) -> &VaultClient {
        &self.vault
    }

    /// Reads the secret `request` asks for, for the caller in `meta` with
    /// `role`, under the request id `meta.command_id`, recording on `bus`.
    /// Granted: the value, once `SecretAccessGranted` is stored. Otherwise
    /// the refusal, once its event is stored. Malformed requests are
    /// refused `validation` and not recorded. If the access event cannot be
    /// stored, the caller gets `unavailable` and no value.
    pub async fn read(
        &self,
        bus: &CommandBus,
        request: AccessRequest,
        role: &str,
        meta: &CommandMeta,
    ) -> Result<Served, CommandError> {
        check(&request)?;
        match self
            .policy
            .decide(&meta.actor.client_id, role, &request.path)
        {
            Decision::Allowed { rule } => self.serve(bus, request, rule, meta).await,
            Decision::Denied { reason } => {
                let event = SecretAccessEvent::SecretAccessDenied(SecretAccessDenied {
                    request,
                    decided_by: DecidedBy::Policy,
                    rule: None,
                    reason: reason.clone(),
                    vault_error: None,
                });
                record(bus, event, meta).await?;
                metrics::counter!("flowledger_secret_reads_total", "decision" => "denied")
                    .increment(1);
                Err(refused(ErrorCode::Forbidden, reason))
            }
        }
    }

    /// Reads one of flowledger's own keys (`[secrets.keys]`), named by
    /// flowledger's configuration rather than a caller: no caller rule
    /// applies (recorded as rule [`OWN_KEYS_RULE`]); Vault's policy does.
    pub async fn read_own_key(
        &self,
        bus: &CommandBus,
        request: AccessRequest,
        meta: &CommandMeta,
    ) -> Result<Served, CommandError> {
        check(&request)?;
        self.serve(bus, request, OWN_KEYS_RULE.into(), meta).await
    }

    /// Serves an allowed request: cache, Vault or last-known-good, then the
    /// record, then the value.
    async fn serve(
        &self,
        bus: &CommandBus,
        request: AccessRequest,
        rule: String,
        meta: &CommandMeta,
    ) -> Result<Served, CommandError> {
        let outcome = self.fetch(&request).await;
        match outcome {
            Outcome::Value(cached, source, vault_error) => {
                let value = match &request.field {
                    None => SecretValue::new(cached.value.expose().clone()),
                    Some(f) => match cached.value.expose().get(f) {
                        Some(v) => SecretValue::new(v.clone()),
                        None => {
                            let e = VaultError::NoField {
                                path: request.path.clone(),
                                field: f.clone(),
                                version: cached.version,
                            };
                            let failed = failure(&e);
                            return fail(bus, request, rule, ErrorCode::NotFound, failed, meta)
                                .await;
                        }
                    },
                };
                let path = request.path.clone();
                let event = SecretAccessEvent::SecretAccessGranted(SecretAccessGranted {
                    request,
                    rule,
                    kv_version: cached.version,
                    source,
                    read_from_vault_at: cached.read_at_utc.clone(),
                    vault_error,
                });
                let event_seq = record(bus, event, meta).await?;
                if source == ValueSource::LastKnownGood {
                    tracing::warn!(
                        path = %path,
                        kv_version = cached.version,
                        age_seconds = cached.read_at.elapsed().as_secs(),
                        "Vault cannot be read: served the last-known-good value"
                    );
                    metrics::counter!("flowledger_secret_last_known_good_total").increment(1);
                }
                let label = match source {
                    ValueSource::Vault => "vault",
                    ValueSource::Cache => "cache",
                    ValueSource::LastKnownGood => "last_known_good",
                };
                metrics::counter!(
                    "flowledger_secret_reads_total",
                    "decision" => "granted",
                    "source" => label
                )
                .increment(1);
                Ok(Served {
                    value,
                    kv_version: cached.version,
                    source,
                    event_seq,
                })
            }
            Outcome::Denied(reason, vault_error) => {
                let event = SecretAccessEvent::SecretAccessDenied(SecretAccessDenied {
                    request,
                    decided_by: DecidedBy::Vault,
                    rule: Some(rule),
                    reason: reason.clone(),
                    vault_error: Some(vault_error),
                });
                record(bus, event, meta).await?;
                metrics::counter!("flowledger_secret_reads_total", "decision" => "denied")
                    .increment(1);
                Err(refused(ErrorCode::Forbidden, reason))
            }
            Outcome::Failed(code, vault_error) => {
                fail(bus, request, rule, code, vault_error, meta).await
            }
        }
    }

    /// The value from the cache, Vault (with retries) or last-known-good.
    async fn fetch(&self, r: &AccessRequest) -> Outcome {
        let stale = match self.cache.lookup(&r.path, r.version) {
            Lookup::Fresh(c) => return Outcome::Value(c, ValueSource::Cache, None),
            Lookup::Stale(c) => Some(c),
            Lookup::Miss => None,
        };
        // an invalidation while this read is in flight wins over its value
        let epoch = self.cache.epoch();
        let mut attempt = 0;
        let read = (|| async { self.vault.read(&r.path, None, r.version).await })
            .retry(
                Backoff::doubling(self.rules.retry_base, Duration::MAX)
                    .build()
                    .take(self.rules.retry_attempts.saturating_sub(1) as usize),
            )
            .when(VaultError::is_retryable)
            .notify(|e, _| {
                attempt += 1;
                tracing::debug!(path = %r.path, attempt, error = %e, "Vault read failed; retrying");
            })
            .await;
        let error = match read {
            Ok(read) => {
                let cached = Cached {
                    value: Arc::new(read.value),
                    version: read.version,
                    read_at: std::time::Instant::now(),
                    read_at_utc: format_time(chrono::Utc::now()),
                };
                let latest = r.version.is_none();
                self.cache.insert(&r.path, epoch, latest, cached.clone());
                return Outcome::Value(cached, ValueSource::Vault, None);
            }
            Err(e) => e,
        };
        match &error {
            VaultError::Refused { reason, status, .. } => {
                // a value Vault now refuses is never served again
                self.cache.invalidate(&r.path);
                Outcome::Denied(
                    format!("Vault refused flowledger's token ({status}: {reason})"),
                    failure(&error),
                )
            }
            VaultError::NotFound { .. } | VaultError::NoField { .. } => {
                self.cache.invalidate(&r.path);
                Outcome::Failed(ErrorCode::NotFound, failure(&error))
            }
            // only an outage (unreachable, 5xx, 429) falls back on the last
            // known good value, and only while it is within the staleness
            _ if error.is_retryable() => match stale {
                Some(c) if self.cache.within_staleness(&c) => {
                    Outcome::Value(c, ValueSource::LastKnownGood, Some(failure(&error)))
                }
                _ => {
                    tracing::warn!(path = %r.path, error = %error, "Vault cannot be read and no value within the maximum staleness is cached");
                    Outcome::Failed(ErrorCode::Unavailable, failure(&error))
                }
            },
            _ => {
                tracing::warn!(path = %r.path, error = %error, "Vault's answer cannot be used");
                Outcome::Failed(ErrorCode::Unavailable, failure(&error))
            }
        }
    }

    /// An operator drops `path`'s cached values on every instance: records
    /// `SecretCacheInvalidated` (each instance's listener drops the path
    /// when it sees it), and drops it here at once.
    pub async fn invalidate(
        &self,
        bus: &CommandBus,
        path: String,
        reason: String,
        meta: &CommandMeta,
    ) -> Result<u64, CommandError> {
        let receipt = bus
            .secret_cache(
                Invalidate {
                    path: path.clone(),
                    reason,
                },
                meta,
            )
            .await
            .map_err(CommandError::from)?;
        self.cache.invalidate(&path);
        Ok(receipt.stream_seq)
    }

    /// Listens for invalidations recorded by any instance (core NATS on the
    /// `secret_cache` event subjects) and drops those paths here, until
    /// `stop`. A missed message (NATS reconnecting) is bounded by the TTL.
    pub async fn listen_for_invalidations(
        self: Arc<Self>,
        nats: async_nats::Client,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let subject = format!("{EVENT_SUBJECT_PREFIX}.secret_cache.*");
        let mut sub = match nats.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, %subject, "cannot listen for secret cache invalidations; cached values live out their TTL");
                return;
            }
        };
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => {
                        if let Some(id) = m.subject.rsplit('.').next() {
                            let n = self.cache.invalidate_id(id);
                            tracing::info!(aggregate_id = id, dropped = n, "secret cache invalidated");
                        }
                    }
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
    }
}
