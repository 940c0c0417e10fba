//! The caller the broker vouches for (docs/adr/0008-nats-identity.md).
//!
//! Commands reach the intake through a service import marked
//! `share: true` (nats/production.conf): nats-server then sets the header
//! `Nats-Request-Info` on every message that crosses the import, naming
//! the account and the user the sender authenticated as, and replaces any
//! such header the sender wrote. [`Accounts::caller`] turns that header
//! into a [`Caller`]: the user name is the client id, the account gives
//! the role (`[nats]` in the configuration). Anything else (no header,
//! two of them, unreadable JSON, no user, an account no list names) is
//! refused `unauthenticated`: a check that cannot be completed fails.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::caller::{Caller, Role};
use crate::bus::CommandError;
use crate::commands::ErrorCode;
use crate::config::NatsSection;

/// The header nats-server sets on messages that cross a shared service
/// import.
pub const REQUEST_INFO_HEADER: &str = "Nats-Request-Info";

/// Longest user name accepted as a client id.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// The role of each NATS account's users; replaced whole by
/// [`Accounts::replace`] (SIGHUP), so a command sees the old roles or the
/// new ones, never a mix.
#[derive(Debug)]
pub struct Accounts {
    roles: RwLock<Arc<HashMap<String, Role>>>,
}

/// The fields of `Nats-Request-Info` the intake reads; the others (host,
/// connection name, client library, ...) are the sender's own claims or
/// irrelevant, and are ignored.
#[derive(Deserialize)]
struct RequestInfo {
    #[serde(default)]
    acc: String,
    #[serde(default)]
    user: String,
}

fn unauthenticated(message: String) -> CommandError {
    CommandError {
        code: ErrorCode::Unauthenticated,
        message,
        field: None,
    }
}

impl Accounts {
    /// The roles `[nats]` gives (checked by [`NatsSection::check`]: no
    /// account has two roles).
    pub fn new(section: &NatsSection) -> Self {
        Accounts {
            roles: RwLock::new(Arc::new(Self::roles_of(section))),
        }
    }

    fn roles_of(section: &NatsSection) -> HashMap<String, Role> {
        let mut roles = HashMap::new();
        for (role, accounts) in [
            (Role::Client, &section.client_accounts),
            (Role::Operator, &section.operator_accounts),
            (Role::Handler, &section.handler_accounts),
        ] {
            for a in accounts {
                roles.insert(a.clone(), role);
            }
        }
        roles
    }

    /// The roles now; the lock is held only to clone the `Arc`.
    fn roles(&self) -> Arc<HashMap<String, Role>> {
        // the only write is one assignment: a poisoned lock holds a whole map
        self.roles
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the roles by those `section` gives (checked by
    /// [`NatsSection::check`]); returns the accounts whose role changed
    /// (added, removed or moved), sorted.
    pub fn replace(&self, section: &NatsSection) -> Vec<String> {
        let old = self.roles();
        let new = Self::roles_of(section);
        let mut changed: Vec<String> = old
            .keys()
            .chain(new.keys())
            .filter(|a| old.get(*a) != new.get(*a))
            .cloned()
            .collect();
        changed.sort();
        changed.dedup();
        *self
            .roles
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        changed
    }

    /// The caller the broker names in a command's headers.
    pub fn caller(&self, headers: Option<&async_nats::HeaderMap>) -> Result<Caller, CommandError> {
        let values: Vec<&str> = headers
            .map(|h| h.get_all(REQUEST_INFO_HEADER).map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let info = match values.as_slice() {
            [one] => *one,
            [] => {
                return Err(unauthenticated(format!(
                    "the command carries no {REQUEST_INFO_HEADER} header, so the broker \
                     vouches for no sender; connect as a user of an account that imports \
                     flow.cmd.> with `share: true` (nats/production.conf)"
                )))
            }
            _ => {
                return Err(unauthenticated(format!(
                    "the command carries {} {REQUEST_INFO_HEADER} headers; the broker sets one",
                    values.len()
                )))
            }
        };
        let info: RequestInfo = serde_json::from_str(info).map_err(|e| {
            unauthenticated(format!(
                "the {REQUEST_INFO_HEADER} header is not the broker's JSON: {e}"
            ))
        })?;
        let roles = self.roles();
        let Some(role) = roles.get(&info.acc).copied() else {
            let mut known: Vec<&str> = roles.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(unauthenticated(format!(
                "NATS account {:?} has no role here (known: {}); list it in [nats] of the \
                 configuration, or connect as a user of a known account",
                info.acc,
                known.join(", ")
            )));
        };
        let user = info.user;
        let usable = !user.trim().is_empty()
            && user.len() <= MAX_CLIENT_ID_LEN
            && !user.chars().any(char::is_control);
        if !usable {
            return Err(unauthenticated(format!(
                "the broker names no usable user in account {:?} (a user name of 1 to \
                 {MAX_CLIENT_ID_LEN} characters, without control characters, is the client id)",
                info.acc
            )));
        }
        Ok(Caller::new(user, role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        for v in values {
            h.append(REQUEST_INFO_HEADER, *v);
        }
        h
    }

    fn accounts() -> Accounts {
        Accounts::new(&NatsSection::default())
    }

    #[test]
    fn the_user_is_the_client_id_and_the_account_the_role() {
        let info = r#"{"start":"2026-01-01T00:00:00Z","host":"127.0.0.1","id":7,"acc":"OPERATORS","user":"ops","name":"billing","lang":"rust","kind":"Client"}"#;
        let c = accounts().caller(Some(&headers(&[info]))).expect("vouched");
        assert_eq!(
            c,
            Caller::new("ops", Role::Operator),
            "the connection name is the sender's claim, never the id"
        );
        for (acc, role) in [("CLIENTS", Role::Client), ("HANDLER", Role::Handler)] {
            let info = format!(r#"{{"acc":"{acc}","user":"u"}}"#);
            let c = accounts()
                .caller(Some(&headers(&[&info])))
                .expect("vouched");
            assert_eq!(c.role, role);
        }
    }

    #[test]
    fn anything_but_one_readable_header_from_a_known_account_is_unauthenticated() {
        let a = accounts();
        let refused = |h: Option<&async_nats::HeaderMap>| {
            let e = a.caller(h).expect_err("refused");
            assert_eq!(e.code, ErrorCode::Unauthenticated, "{}", e.message);
            e.message
        };
        assert!(refused(None).contains("no Nats-Request-Info"));
        refused(Some(&async_nats::HeaderMap::new()));
        let ok = r#"{"acc":"CLIENTS","user":"billing"}"#;
        refused(Some(&headers(&[ok, ok])));
        refused(Some(&headers(&["not json"])));
        refused(Some(&headers(&["[1]"])));
        let m = refused(Some(&headers(&[
            r#"{"acc":"FLOWLEDGER","user":"flowledger"}"#,
        ])));
        assert!(m.contains("FLOWLEDGER") && m.contains("CLIENTS"), "{m}");
        refused(Some(&headers(&[r#"{"user":"billing"}"#])));
        refused(Some(&headers(&[r#"{"acc":"CLIENTS"}"#])));
        refused(Some(&headers(&[r#"{"acc":"CLIENTS","user":" "}"#])));
        refused(Some(&headers(&[r#"{"acc":"CLIENTS","user":"a\u0000b"}"#])));
        let long = format!(r#"{{"acc":"CLIENTS","user":"{}"}}"#, "u".repeat(129));
        refused(Some(&headers(&[&long])));
    }

    #[test]
    fn replaced_accounts_take_effect_and_say_which_changed() {
        let a = accounts();
        let globex = headers(&[r#"{"acc":"GLOBEX","user":"globex"}"#]);
        assert!(a.caller(Some(&globex)).is_err(), "GLOBEX is not listed yet");
        let changed = a.replace(&NatsSection {
            client_accounts: vec!["CLIENTS".into(), "GLOBEX".into()],
            operator_accounts: vec![],
            handler_accounts: vec!["HANDLER".into(), "OPERATORS".into()],
        });
        assert_eq!(changed, ["GLOBEX", "OPERATORS"]);
        assert_eq!(a.caller(Some(&globex)).expect("vouched").role, Role::Client);
        let ops = headers(&[r#"{"acc":"OPERATORS","user":"ops"}"#]);
        assert_eq!(a.caller(Some(&ops)).expect("vouched").role, Role::Handler);
        assert!(a
            .replace(&NatsSection {
                client_accounts: vec!["CLIENTS".into(), "GLOBEX".into()],
                operator_accounts: vec![],
                handler_accounts: vec!["HANDLER".into(), "OPERATORS".into()],
            })
            .is_empty());
    }

    #[test]
    fn accounts_are_configurable() {
        let a = Accounts::new(&NatsSection {
            client_accounts: vec!["ACME".into(), "GLOBEX".into()],
            operator_accounts: vec![],
            handler_accounts: vec!["HANDLER".into()],
        });
        let h = headers(&[r#"{"acc":"GLOBEX","user":"globex"}"#]);
        assert_eq!(a.caller(Some(&h)).expect("vouched").role, Role::Client);
        let h = headers(&[r#"{"acc":"OPERATORS","user":"ops"}"#]);
        assert!(a.caller(Some(&h)).is_err(), "OPERATORS is not listed");
    }
}
