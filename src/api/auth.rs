//! Who is calling over HTTP: bearer tokens bound to client ids and their
//! roles (docs/CONFIGURATION.md, `[[clients]]`; the roles' checks are in
//! `caller`), and the per-client rate limit on job submission.
//!
//! The token is read from `Authorization: Bearer <token>` by axum-extra's
//! typed header (`headers::Authorization<Bearer>`; the scheme's case is
//! not significant). Tokens are never stored: the configuration holds
//! their SHA-256, and a request's token is hashed and looked up (by hash:
//! no comparison of the token's own bytes). SIGHUP replaces the table
//! ([`Clients::replace`]) without a restart. Neither a token nor its hash is
//! logged or echoed in an error.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use axum_extra::headers::authorization::Bearer;
use axum_extra::headers::Authorization;
use axum_extra::typed_header::{TypedHeader, TypedHeaderRejection};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::caller::Caller;
use super::http::{ApiError, AppState};
use super::request::RequestFacts;
use crate::config::ClientEntry;

/// A client's submission allowance: GCRA (governor), `rate_limit_per_minute`
/// submissions at once at most, one more every `60 / rate` seconds.
type Limiter = DefaultDirectRateLimiter<StateInformationMiddleware>;

/// `RateLimit-Limit`: submissions a client may make in a minute.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: submissions it may make now.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: seconds until its whole allowance is back.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// A client's submission allowance after a submission was taken from it
/// (or refused), as the `RateLimit-*` headers of `POST /v1/jobs` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// The client's `rate_limit_per_minute`: the most it may submit at once.
    pub limit: u32,
    /// Submissions it may make now without a 429.
    pub remaining: u32,
    /// Whole seconds (rounded up) until `remaining` is back at `limit` if it
    /// submits nothing more.
    pub reset_secs: u64,
}

impl Allowance {
    /// Writes the `RateLimit-Limit`, `RateLimit-Remaining` and
    /// `RateLimit-Reset` headers.
    pub fn put(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(self.reset_secs));
    }

    /// After an accepted submission: governor's remaining burst capacity;
    /// each missing unit comes back one replenish interval after the
    /// other, so the whole allowance is back at most `(limit - remaining)`
    /// intervals from now (the first unit may come back sooner).
    fn after_taken(quota: Quota, remaining: u32) -> Self {
        let limit = quota.burst_size().get();
        let missing = limit.saturating_sub(remaining);
        Allowance {
            limit,
            remaining,
            reset_secs: ceil_secs(quota.replenish_interval() * missing),
        }
    }

    /// After a refused one: nothing remains; the next unit comes back in
    /// `wait`, the other `limit - 1` one interval after the other.
    fn after_refused(quota: Quota, wait: Duration) -> Self {
        let limit = quota.burst_size().get();
        Allowance {
            limit,
            remaining: 0,
            reset_secs: ceil_secs(wait + quota.replenish_interval() * (limit - 1)),
        }
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

/// The configured clients, by token hash, and their submission allowances;
/// replaced whole by [`Clients::replace`] (SIGHUP), so a request sees the
/// old table or the new one, never a mix.
pub struct Clients {
    table: RwLock<Arc<Table>>,
}

/// One version of the `[[clients]]` table.
struct Table {
    by_hash: HashMap<[u8; 32], Caller>,
    /// By client id: the entry it was built from and its allowance.
    clients: HashMap<String, (ClientEntry, Arc<Limiter>)>,
}

/// What a [`Clients::replace`] changed, by client id (never a token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientChanges {
    /// Clients that are new.
    pub added: Vec<String>,
    /// Clients that are gone: their tokens are refused from now on.
    pub removed: Vec<String>,
    /// Clients whose token, role or rate limit changed.
    pub changed: Vec<String>,
}

impl ClientChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Table {
    /// `entries` were validated by [`crate::config::Config::parse`]; an
    /// unchanged client (same id and rate) keeps its allowance from `old`.
    fn new(entries: &[ClientEntry], old: Option<&Table>) -> Self {
        let (mut by_hash, mut clients) = (HashMap::new(), HashMap::new());
        for e in entries {
            let Some(hash) = hex::decode(&e.token_sha256)
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
            else {
                tracing::error!(
                    client_id = %e.id,
                    "token_sha256 is not 64 hex digits; client ignored"
                );
                continue;
            };
            by_hash.insert(
                hash,
                Caller {
                    client_id: e.id.clone(),
                    role: e.role.into(),
                },
            );
            let kept = old
                .and_then(|t| t.clients.get(&e.id))
                .filter(|(was, _)| was.rate_limit_per_minute == e.rate_limit_per_minute)
                .map(|(_, limiter)| limiter.clone());
            let limiter = kept.unwrap_or_else(|| {
                let per_minute =
                    NonZeroU32::new(e.rate_limit_per_minute).unwrap_or(NonZeroU32::MIN);
                Arc::new(
                    RateLimiter::direct(Quota::per_minute(per_minute))
                        .with_middleware::<StateInformationMiddleware>(),
                )
            });
            clients.insert(e.id.clone(), (e.clone(), limiter));
        }
        if by_hash.is_empty() {
            tracing::warn!(
                "no [[clients]] configured: every /v1 request except n8n callbacks gets 401"
            );
        }
        Table { by_hash, clients }
    }
}

impl Clients {
    /// `entries` were validated by [`crate::config::Config::parse`]
    /// (64 hex digits, a positive rate).
    pub fn new(entries: &[ClientEntry]) -> Self {
        Clients {
            table: RwLock::new(Arc::new(Table::new(entries, None))),
        }
    }

    /// The table now; the lock is held only to clone the `Arc`.
    fn table(&self) -> Arc<Table> {
        // a panic while holding the lock cannot leave a half-written table:
        // the only write is one assignment
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the whole table by `entries` (validated by
    /// [`crate::config::Config::parse`]); a client whose id and rate limit
    /// are unchanged keeps its allowance used so far. Requests already
    /// identified finish as they were.
    pub fn replace(&self, entries: &[ClientEntry]) -> ClientChanges {
        let old = self.table();
        let new = Arc::new(Table::new(entries, Some(&old)));
        let mut changes = ClientChanges::default();
        for (id, (entry, _)) in &new.clients {
            match old.clients.get(id) {
                None => changes.added.push(id.clone()),
                Some((was, _))
                    if was.token_sha256 != entry.token_sha256
                        || was.role != entry.role
                        || was.rate_limit_per_minute != entry.rate_limit_per_minute =>
                {
                    changes.changed.push(id.clone())
                }
                Some(_) => {}
            }
        }
        changes.removed = old
            .clients
            .keys()
            .filter(|id| !new.clients.contains_key(*id))
            .cloned()
            .collect();
        for v in [
            &mut changes.added,
            &mut changes.removed,
            &mut changes.changed,
        ] {
            v.sort();
        }
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
        changes
    }

    /// The caller whose bearer token `authorization` holds: the
    /// `Authorization` header as the typed-header extractor read it. 401
    /// when it is missing, is not `Bearer <token>` (another scheme, no
    /// token, not visible ASCII) or holds an unknown token.
    pub fn identify(&self, authorization: &BearerHeader) -> Result<Caller, ApiError> {
        let token = match authorization {
            Ok(TypedHeader(bearer)) => bearer.token().trim(),
            Err(rejection) if rejection.is_missing() => {
                return Err(ApiError::Unauthenticated(
                    "missing Authorization header; send `Authorization: Bearer <token>`".into(),
                ))
            }
            Err(_) => "",
        };
        if token.is_empty() {
            return Err(ApiError::Unauthenticated(
                "Authorization header is not `Bearer <token>`".into(),
            ));
        }
        let hash: [u8; 32] = crate::events::chain::sha256(token.as_bytes());
        self.table().by_hash.get(&hash).cloned().ok_or_else(|| {
            ApiError::Unauthenticated(
                "unknown bearer token; ask an operator for a token listed in [[clients]]".into(),
            )
        })
    }

    /// Takes one job submission from `caller`'s allowance and says what is
    /// left of it, or says when the next one is allowed. None: the caller
    /// is in no table (it was removed by a reload while its request ran).
    pub fn take_submission(&self, caller: &Caller) -> Result<Option<Allowance>, ApiError> {
        let table = self.table();
        let Some((_, limiter)) = table.clients.get(&caller.client_id) else {
            return Ok(None);
        };
        match limiter.check() {
            Ok(state) => Ok(Some(Allowance::after_taken(
                state.quota(),
                state.remaining_burst_capacity(),
            ))),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::RateLimited {
                    client_id: caller.client_id.clone(),
                    retry_after: retry_after_secs(wait),
                    allowance: Allowance::after_refused(not_until.quota(), wait),
                })
            }
        }
    }
}

/// The `Authorization` header as a bearer credential, or why it is none
/// (missing, or not `Bearer <token>`): what [`Clients::identify`] takes.
pub type BearerHeader = Result<TypedHeader<Authorization<Bearer>>, TypedHeaderRejection>;

/// Whole seconds to wait, rounded up, at least 1 (`Retry-After` has no
/// fractions).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

/// Middleware: identifies the caller of every route it wraps, or answers
/// 401 before the handler runs.
pub async fn authenticate(
    State(s): State<AppState>,
    authorization: BearerHeader,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = s.clients.identify(&authorization)?;
    // the request's log lines and its access line name the client
    tracing::Span::current().record("client_id", caller.client_id.as_str());
    if let Some(facts) = req.extensions().get::<RequestFacts>() {
        facts.set_client_id(&caller.client_id);
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::caller::Role as CallerRole;
    use crate::config::Role;

    /// The `Authorization` header `value` as the middleware's extractor
    /// reads it.
    fn header(value: Option<&[u8]>) -> BearerHeader {
        use axum::extract::FromRequestParts;
        let mut req = axum::http::Request::builder();
        if let Some(v) = value {
            req = req.header(
                axum::http::header::AUTHORIZATION,
                HeaderValue::from_bytes(v).expect("a header value"),
            );
        }
        let (mut parts, ()) = req.body(()).expect("a request").into_parts();
        futures::executor::block_on(<TypedHeader<Authorization<Bearer>> as FromRequestParts<
            (),
        >>::from_request_parts(&mut parts, &()))
    }

    /// `identify` with the header `value`.
    fn identify(c: &Clients, value: &str) -> Result<Caller, ApiError> {
        c.identify(&header(Some(value.as_bytes())))
    }

    fn clients() -> Clients {
        let hash = |t: &str| hex::encode(crate::events::chain::sha256(t.as_bytes()));
        Clients::new(&[
            ClientEntry {
                id: "billing".into(),
                token_sha256: hash("tok-b"),
                role: Role::Client,
                rate_limit_per_minute: 2,
            },
            ClientEntry {
                id: "ops".into(),
                token_sha256: hash("tok-o"),
                role: Role::Operator,
                rate_limit_per_minute: 60,
            },
        ])
    }

    #[test]
    fn tokens_map_to_their_client_and_role() {
        let c = clients();
        let b = identify(&c, "Bearer tok-b").expect("billing's token");
        assert_eq!(
            (b.client_id.as_str(), b.role),
            ("billing", CallerRole::Client)
        );
        let o = identify(&c, "Bearer tok-o").expect("ops' token");
        assert_eq!(o.role, CallerRole::Operator);
        assert!(b.require_operator("approving").is_err());
        assert!(o.require_operator("approving").is_ok());
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_refused_without_echo() {
        let c = clients();
        let cases: [(Option<&[u8]>, &str); 10] = [
            (None, "missing Authorization header"),
            (Some(b""), "is not `Bearer <token>`"),
            (Some(b"tok-b"), "is not `Bearer <token>`"),
            (Some(b"Bearer"), "is not `Bearer <token>`"),
            (Some(b"Bearer "), "is not `Bearer <token>`"),
            (Some(b"Bearer    "), "is not `Bearer <token>`"),
            (Some(b"Bearertok-b"), "is not `Bearer <token>`"),
            (Some(b"Basic dG9rLWI6"), "is not `Bearer <token>`"),
            (Some(b"Bearer tok-\xff"), "is not `Bearer <token>`"),
            (Some(b"Bearer tok-x"), "unknown bearer token"),
        ];
        for (h, message) in cases {
            let e = c.identify(&header(h)).expect_err("refused");
            let shown = h.map(String::from_utf8_lossy);
            assert!(matches!(e, ApiError::Unauthenticated(_)), "{shown:?}: {e}");
            assert!(e.to_string().contains(message), "{shown:?}: {e}");
            assert!(!e.to_string().contains("tok-"), "{e}");
        }
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_trimmed() {
        let c = clients();
        for h in [
            "Bearer tok-b",
            "bearer tok-b",
            "BEARER tok-b",
            "Bearer   tok-b  ",
        ] {
            let b = identify(&c, h).unwrap_or_else(|e| panic!("{h:?}: {e}"));
            assert_eq!(b.client_id, "billing", "{h:?}");
        }
        assert!(
            identify(&c, "Bearer tok-b2").is_err(),
            "a prefix is not the token"
        );
    }

    #[test]
    fn the_rate_limit_is_per_client_and_says_when_to_retry() {
        let c = clients();
        let b = identify(&c, "Bearer tok-b").expect("billing");
        let o = identify(&c, "Bearer tok-o").expect("ops");
        let first = c.take_submission(&b).expect("first").expect("a client");
        assert_eq!((first.limit, first.remaining), (2, 1));
        assert!((1..=30).contains(&first.reset_secs), "{first:?}");
        let second = c.take_submission(&b).expect("second").expect("a client");
        assert_eq!((second.limit, second.remaining), (2, 0));
        assert!(
            second.reset_secs > first.reset_secs && second.reset_secs <= 60,
            "{second:?}"
        );
        match c.take_submission(&b) {
            Err(ApiError::RateLimited {
                retry_after,
                allowance,
                ..
            }) => {
                assert!((1..=30).contains(&retry_after), "{retry_after}");
                assert_eq!((allowance.limit, allowance.remaining), (2, 0));
                assert!(
                    allowance.reset_secs >= retry_after && allowance.reset_secs <= 60,
                    "{allowance:?}"
                );
            }
            other => panic!("third submission in a minute: {other:?}"),
        }
        c.take_submission(&o)
            .expect("another client's allowance is its own");
    }

    #[test]
    fn a_replaced_table_takes_new_tokens_refuses_removed_ones_and_keeps_unchanged_allowances() {
        let hash = |t: &str| hex::encode(crate::events::chain::sha256(t.as_bytes()));
        let entry = |id: &str, token: &str, rate: u32| ClientEntry {
            id: id.into(),
            token_sha256: hash(token),
            role: Role::Client,
            rate_limit_per_minute: rate,
        };
        let c = clients();
        let b = identify(&c, "Bearer tok-b").expect("billing");
        c.take_submission(&b).expect("first");
        c.take_submission(&b).expect("second");
        let changes = c.replace(&[
            entry("billing", "tok-b", 2),
            entry("shop", "tok-s", 5),
            ClientEntry {
                role: Role::Auditor,
                ..entry("ops", "tok-o", 60)
            },
        ]);
        assert_eq!(
            changes,
            ClientChanges {
                added: vec!["shop".into()],
                removed: vec![],
                changed: vec!["ops".into()],
            }
        );
        let s = identify(&c, "Bearer tok-s").expect("the new client's token works");
        assert_eq!(s.client_id, "shop");
        assert_eq!(
            identify(&c, "Bearer tok-o").expect("ops").role,
            CallerRole::Auditor
        );
        assert!(
            matches!(c.take_submission(&b), Err(ApiError::RateLimited { .. })),
            "an unchanged client keeps the allowance it used"
        );
        let changes = c.replace(&[entry("billing", "tok-b2", 3)]);
        assert_eq!(changes.removed, ["ops", "shop"]);
        assert_eq!(changes.changed, ["billing"]);
        for gone in ["Bearer tok-s", "Bearer tok-o", "Bearer tok-b"] {
            assert!(
                matches!(identify(&c, gone), Err(ApiError::Unauthenticated(_))),
                "{gone} is refused"
            );
        }
        let b = identify(&c, "Bearer tok-b2").expect("the new token");
        c.take_submission(&b)
            .expect("a changed rate limit starts a fresh allowance");
        assert!(c.replace(&[entry("billing", "tok-b2", 3)]).is_empty());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(29_001)), 30);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
