//! Who is calling over HTTP: bearer tokens bound to client ids and their
//! roles (docs/CONFIGURATION.md, `[[clients]]`; the roles' checks are in
//! `caller`), and the per-client rate limit on job submission.
//!
//! Tokens are never stored: the configuration holds their SHA-256, and a
//! request's token is hashed and looked up. Neither a token nor its hash is
//! logged or echoed in an error.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::caller::Caller;
use super::http::{ApiError, AppState};
use crate::config::ClientEntry;

/// The configured clients, by token hash, and their submission allowances.
pub struct Clients {
    by_hash: HashMap<[u8; 32], Caller>,
    limiters: HashMap<String, DefaultDirectRateLimiter>,
}

impl Clients {
    /// `entries` were validated by [`crate::config::Config::parse`]
    /// (64 hex digits, a positive rate).
    pub fn new(entries: &[ClientEntry]) -> Self {
        let (mut by_hash, mut limiters) = (HashMap::new(), HashMap::new());
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
            let per_minute = NonZeroU32::new(e.rate_limit_per_minute).unwrap_or(NonZeroU32::MIN);
            by_hash.insert(
                hash,
                Caller {
                    client_id: e.id.clone(),
                    role: e.role.into(),
                },
            );
            limiters.insert(
                e.id.clone(),
                RateLimiter::direct(Quota::per_minute(per_minute)),
            );
        }
        if by_hash.is_empty() {
            tracing::warn!(
                "no [[clients]] configured: every /v1 request except n8n callbacks gets 401"
            );
        }
        Clients { by_hash, limiters }
    }

    /// The caller a bearer token belongs to.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let header = authorization.ok_or_else(|| {
            ApiError::Unauthenticated(
                "missing Authorization header; send `Authorization: Bearer <token>`".into(),
            )
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthenticated("Authorization header is not `Bearer <token>`".into())
            })?;
        let hash: [u8; 32] = crate::events::chain::sha256(token.as_bytes());
        self.by_hash.get(&hash).cloned().ok_or_else(|| {
            ApiError::Unauthenticated(
                "unknown bearer token; ask an operator for a token listed in [[clients]]".into(),
            )
        })
    }

    /// Takes one job submission from `caller`'s allowance, or says when
    /// the next one is allowed.
    pub fn take_submission(&self, caller: &Caller) -> Result<(), ApiError> {
        let Some(limiter) = self.limiters.get(&caller.client_id) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited {
                client_id: caller.client_id.clone(),
                retry_after: retry_after_secs(wait),
            }
        })
    }
}

/// Whole seconds to wait, rounded up, at least 1 (`Retry-After` has no
/// fractions).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

/// Middleware: identifies the caller of every route it wraps, or answers
/// 401 before the handler runs.
pub async fn authenticate(
    State(s): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    let caller = s.clients.identify(header)?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::caller::Role as CallerRole;
    use crate::config::Role;

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
        let b = c.identify(Some("Bearer tok-b")).expect("billing's token");
        assert_eq!(
            (b.client_id.as_str(), b.role),
            ("billing", CallerRole::Client)
        );
        let o = c.identify(Some("Bearer tok-o")).expect("ops' token");
        assert_eq!(o.role, CallerRole::Operator);
        assert!(b.require_operator("approving").is_err());
        assert!(o.require_operator("approving").is_ok());
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_refused_without_echo() {
        let c = clients();
        for h in [None, Some("tok-b"), Some("Bearer "), Some("Bearer tok-x")] {
            let e = c.identify(h).expect_err("refused");
            assert!(matches!(e, ApiError::Unauthenticated(_)), "{h:?}: {e}");
            assert!(!e.to_string().contains("tok-"), "{e}");
        }
    }

    #[test]
    fn the_rate_limit_is_per_client_and_says_when_to_retry() {
        let c = clients();
        let b = c.identify(Some("Bearer tok-b")).expect("billing");
        let o = c.identify(Some("Bearer tok-o")).expect("ops");
        c.take_submission(&b).expect("first");
        c.take_submission(&b).expect("second");
        match c.take_submission(&b) {
            Err(ApiError::RateLimited { retry_after, .. }) => {
                assert!((1..=30).contains(&retry_after), "{retry_after}")
            }
            other => panic!("third submission in a minute: {other:?}"),
        }
        c.take_submission(&o)
            .expect("another client's allowance is its own");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(29_001)), 30);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
