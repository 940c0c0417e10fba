//! A Vault API client (HashiCorp Vault, OpenBao) for KV v2 secrets, on
//! `vaultrs`.
//!
//! [`VaultClient::connect`] checks the server's health, then logs in with
//! AppRole or looks up the given token, so a wrong address, a wrong token
//! or a wrong AppRole credential is reported at start, each in its own
//! words. A background task renews the token (`auth/token/renew-self`) at
//! two thirds of its TTL; with AppRole it logs in again when the renewal
//! fails, the token is not renewable, or its TTL is capped by the token's
//! max TTL. The task ends with the client.
//!
//! Secret values come back as [`SecretValue`]: no `Display`, a `Debug`
//! that prints `SecretValue(<redacted>)`, its strings wiped on drop. Errors
//! carry paths, statuses and Vault's own error texts (which name no
//! values), never a value or a token. (The HTTP layers below keep their own
//! copies of a response body for a while; those are not wiped.)
//!
//! The health check is a plain GET of `/v1/sys/health`: `vaultrs`'s
//! `sys::health` cannot read OpenBao's answer (it has no
//! `performance_standby`).

use std::fmt;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use backon::Retryable;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use vaultrs::api::kv2::requests::ReadSecretRequest;
use vaultrs::client::{VaultClient as Api, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroize;

use crate::backoff::Backoff;

/// Where Vault is and how flowledger authenticates to it (`Debug` shows
/// no credential: they are `SecretString`s).
#[derive(Debug)]
pub struct VaultConfig {
    /// The server's base URL, e.g. `https://vault.example:8200`.
    pub addr: String,
    /// The credential.
    pub auth: VaultAuth,
    /// The timeout of each request to Vault (connect and answer).
    pub timeout: Duration,
}

/// How flowledger authenticates to Vault. The credentials are
/// `SecretString`s: redacted by `Debug`, zeroed when dropped.
#[derive(Debug)]
pub enum VaultAuth {
    /// A token given as is (looked up at start, renewed while renewable).
    Token(SecretString),
    /// An AppRole login at `auth/<mount>/login`; logged in again whenever
    /// the token cannot be renewed.
    AppRole {
        /// The AppRole auth mount, usually `approle`.
        mount: String,
        /// The role's role_id.
        role_id: SecretString,
        /// A secret_id of the role.
        secret_id: SecretString,
    },
}

/// Which credential Vault refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKind {
    /// The token of [`VaultAuth::Token`] (its lookup or renewal).
    Token,
    /// The role_id/secret_id of [`VaultAuth::AppRole`], at this mount.
    AppRole {
        /// The AppRole auth mount logged in at.
        mount: String,
    },
}

/// Why a call to Vault failed, named for what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The configured address is not a usable URL: fix the configuration.
    #[error("the Vault address {addr:?} is not usable: {reason} (give an http:// or https:// URL, e.g. https://vault.example:8200)")]
    BadAddress {
        /// The address as configured.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The secret path is not a KV v2 path this client reads: fix it.
    #[error("{path:?} is not a KV v2 secret path: {reason} (give <mount>/data/<path> or <mount>/<path>, e.g. secret/data/external_apis/ocr)")]
    BadPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No answer (connection refused, reset, timeout): retry later.
    #[error("Vault at {addr} cannot be reached ({what}): check the address and that Vault runs; retrying later may succeed")]
    Unreachable {
        /// The server's address.
        addr: String,
        /// The request that got no answer.
        what: String,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Vault refused the credential at start (or at a renewal/login): fix
    /// the credential; retrying does not help.
    #[error("{}", auth_message(kind, *status, reason))]
    Auth {
        /// Which credential.
        kind: AuthKind,
        /// Vault's HTTP status (400 or 403).
        status: u16,
        /// Vault's error text.
        reason: String,
    },
    /// Vault answered 403 to a read: the token's policies do not allow the
    /// path (or the token has expired). Grant it in Vault's policy.
    #[error("Vault refused {path} ({status}: {reason}): the token's policies do not allow it (or the token has expired); grant the path in the token's policy")]
    Refused {
        /// The path read.
        path: String,
        /// Vault's HTTP status (403).
        status: u16,
        /// Vault's error text, e.g. `permission denied`.
        reason: String,
    },
    /// No such secret, or no such version of it (or it was deleted).
    #[error("no secret at {path}{} in Vault (or it was deleted): write it, or fix the path", version_text(*version))]
    NotFound {
        /// The path read.
        path: String,
        /// The version asked for (none: the latest).
        version: Option<u64>,
    },
    /// The secret exists but has no such field.
    #[error("the secret at {path} (version {version}) has no field {field:?}: add it in Vault, or fix the field name")]
    NoField {
        /// The path read.
        path: String,
        /// The field asked for.
        field: String,
        /// The version read.
        version: u64,
    },
    /// Vault rejected the request itself (4xx other than 403/404, e.g. the
    /// mount is not KV v2): fix the request or Vault's setup.
    #[error("Vault rejected the request for {path} ({status}: {reason}): check that the mount is a KV v2 secrets engine")]
    Rejected {
        /// The path of the request.
        path: String,
        /// Vault's HTTP status.
        status: u16,
        /// Vault's error text.
        reason: String,
    },
    /// Vault answers but cannot serve (5xx: e.g. an audit device that
    /// cannot write, sealed, not initialized; or 429, a rate limit quota):
    /// see Vault's log; retry later.
    #[error("Vault failed on {path} ({status}: {reason}): it answers but cannot serve (sealed, or an audit device that cannot write?); see Vault's log, retry later")]
    Failing {
        /// The path of the request.
        path: String,
        /// Vault's HTTP status (5xx or 429).
        status: u16,
        /// Vault's error text, if any.
        reason: String,
    },
    /// Vault's answer is not what a Vault server sends (a proxy? another
    /// service at that address?).
    #[error("the answer to {path} is not a Vault answer: {reason} (is the address a Vault server, not a proxy or another service?)")]
    BadAnswer {
        /// The path of the request.
        path: String,
        /// What is wrong with it (never the body).
        reason: String,
    },
}

fn auth_message(kind: &AuthKind, status: u16, reason: &str) -> String {
    match kind {
        AuthKind::Token => format!(
            "the Vault token was refused ({status} {reason}): it is wrong, expired or revoked; give a valid token"
        ),
        AuthKind::AppRole { mount } => format!(
            "the AppRole role_id/secret_id was refused by auth/{mount}/login ({status} {reason}): check the role_id and secret_id (a secret_id can expire or be used up) and that AppRole is enabled at {mount}"
        ),
    }
}

fn version_text(version: Option<u64>) -> String {
    version
        .map(|v| format!(" (version {v})"))
        .unwrap_or_default()
}

impl VaultError {
    /// Whether the same call may succeed later unchanged (Vault
    /// unreachable, or answering but failing).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. } | VaultError::Failing { .. }
        )
    }
}

/// A secret value (a JSON value: the whole data map or one field). Prints
/// as `SecretValue(<redacted>)`; its strings are wiped when dropped.
pub struct SecretValue(Value);

impl SecretValue {
    /// Wraps a value taken out of another `SecretValue` (a field of a
    /// cached data map).
    pub(crate) fn new(value: Value) -> Self {
        SecretValue(value)
    }

    /// The value. Do not log it.
    pub fn expose(&self) -> &Value {
        &self.0
    }

    /// The value if it is a JSON string (a field such as an API key).
    pub fn expose_str(&self) -> Option<&str> {
        self.0.as_str()
    }

    /// Takes one field out of a data map, wiping nothing else early.
    fn take_field(&mut self, field: &str) -> Option<SecretValue> {
        self.0
            .as_object_mut()
            .and_then(|m| m.remove(field))
            .map(SecretValue)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

fn wipe(v: &mut Value) {
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe),
        Value::Object(m) => m.values_mut().for_each(wipe),
        Value::Number(n) => *n = 0.into(),
        Value::Bool(_) | Value::Null => {}
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// What [`VaultClient::read`] read.
#[derive(Debug)]
pub struct SecretRead {
    /// The whole data map, or the field asked for.
    pub value: SecretValue,
    /// The KV version read.
    pub version: u64,
}

/// A KV v2 path: its mount (the first segment) and the path in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KvPath {
    mount: String,
    path: String,
}

impl KvPath {
    /// `secret/data/a/b` (the API path) and `secret/a/b` (the logical
    /// path) are both `a/b` in the mount `secret`: a second segment `data`
    /// is always the API form's.
    fn parse(given: &str) -> Result<KvPath, VaultError> {
        let bad = |reason| VaultError::BadPath {
            path: given.to_string(),
            reason,
        };
        let trimmed = given.trim_matches('/');
        if trimmed
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '?' | '#' | '%'))
        {
            return Err(bad("it holds a space, a control character, ?, # or %"));
        }
        let segments: Vec<&str> = trimmed.split('/').collect();
        if segments
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == "..")
        {
            return Err(bad("it has an empty, . or .. segment"));
        }
        let rest = match segments.as_slice() {
            [_, "data", rest @ ..] | [_, rest @ ..] => rest,
            [] => &[][..],
        };
        if rest.is_empty() {
            return Err(bad("it names a mount but no secret in it"));
        }
        Ok(KvPath {
            mount: segments[0].to_string(),
            path: rest.join("/"),
        })
    }

    fn data(&self) -> String {
        format!("{}/data/{}", self.mount, self.path)
    }

    fn metadata(&self) -> String {
        format!("{}/metadata/{}", self.mount, self.path)
    }
}

/// The token's lease as Vault last told it.
#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    renewable: bool,
}

struct Shared {
    addr: String,
    timeout: Duration,
    auth: VaultAuth,
    /// The API client with the current token; replaced after a new login.
    api: RwLock<Arc<Api>>,
}

/// A connected Vault client. Reads go through the current token; a task
/// renews it (or logs in again, for AppRole) until the client is dropped.
pub struct VaultClient {
    shared: Arc<Shared>,
    renewer: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultClient")
            .field("addr", &self.shared.addr)
            .field("auth", &self.shared.auth)
            .finish()
    }
}

impl Drop for VaultClient {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl VaultClient {
    /// Checks Vault's health, logs in (AppRole) or looks up the token, and
    /// starts the renewal task (on the current tokio runtime). Fails naming
    /// what is wrong: the address, Vault's state, the token, or the
    /// AppRole credential.
    ///
    /// The token (given, or from the AppRole login) needs what Vault's
    /// `default` policy grants: `auth/token/lookup-self` and
    /// `auth/token/renew-self`; a token without them is reported as
    /// refused.
    pub async fn connect(cfg: VaultConfig) -> Result<VaultClient, VaultError> {
        // installs once per process; a second call finds it installed
        let _ = rustls::crypto::ring::default_provider().install_default();
        let addr = cfg.addr.trim_end_matches('/').to_string();
        let url = url::Url::parse(&addr).map_err(|e| VaultError::BadAddress {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(VaultError::BadAddress {
                addr,
                reason: format!("the scheme is {:?}", url.scheme()),
            });
        }
        check_health(&addr, cfg.timeout).await?;
        let mut shared = Shared {
            api: RwLock::new(Arc::new(build_api(&addr, cfg.timeout, "")?)),
            addr,
            timeout: cfg.timeout,
            auth: cfg.auth,
        };
        let lease = match &shared.auth {
            VaultAuth::Token(token) => {
                let api = build_api(&shared.addr, shared.timeout, token.expose_secret())?;
                let me = vaultrs::token::lookup_self(&api).await.map_err(|e| {
                    auth_error(e, &shared.addr, "auth/token/lookup-self", AuthKind::Token)
                })?;
                shared.api = RwLock::new(Arc::new(api));
                Lease {
                    ttl: Duration::from_secs(me.ttl),
                    renewable: me.renewable.unwrap_or(false),
                }
            }
            VaultAuth::AppRole { .. } => shared.login().await?,
        };
        let shared = Arc::new(shared);
        let renewer = tokio::spawn(keep_token(Arc::downgrade(&shared), lease));
        Ok(VaultClient { shared, renewer })
    }

    /// Reads a KV v2 secret: the whole data map, or `field` of it; the
    /// latest version, or `version`. `path` is the API path
    /// `<mount>/data/<path>` (e.g. `secret/data/external_apis/ocr`) or the
    /// logical `<mount>/<path>`; the mount is its first segment.
    pub async fn read(
        &self,
        path: &str,
        field: Option<&str>,
        version: Option<u64>,
    ) -> Result<SecretRead, VaultError> {
        let kv = KvPath::parse(path)?;
        let shown = kv.data();
        let request = ReadSecretRequest::builder()
            .mount(kv.mount.as_str())
            .path(kv.path.as_str())
            .version(version)
            .build()
            .map_err(|_| VaultError::BadPath {
                path: path.to_string(),
                reason: "no request can be built for it",
            })?;
        let api = self.shared.api();
        let answer = vaultrs::api::exec_with_result(&*api, request)
            .await
            .map_err(|e| read_error(e, &self.shared.addr, &shown, version))?;
        let read_version = answer.metadata.version;
        let mut whole = SecretValue(answer.data);
        let value = match field {
            None => whole,
            Some(f) => whole.take_field(f).ok_or_else(|| VaultError::NoField {
                path: shown.clone(),
                field: f.to_string(),
                version: read_version,
            })?,
        };
        Ok(SecretRead {
            value,
            version: read_version,
        })
    }

    /// The latest version of a KV v2 secret (from its metadata; `path` as
    /// for [`read`](Self::read)).
    pub async fn latest_version(&self, path: &str) -> Result<u64, VaultError> {
        let kv = KvPath::parse(path)?;
        let api = self.shared.api();
        let meta = vaultrs::kv2::read_metadata(&*api, &kv.mount, &kv.path)
            .await
            .map_err(|e| read_error(e, &self.shared.addr, &kv.metadata(), None))?;
        if meta.current_version == 0 {
            return Err(VaultError::NotFound {
                path: kv.metadata(),
                version: None,
            });
        }
        Ok(meta.current_version)
    }

    /// Writes a KV v2 secret's new version (`path` as for
    /// [`read`](Self::read)); with `cas`, only if its current version is
    /// that one (0: only if it does not exist yet: a lost race is
    /// [`VaultError::Rejected`] with status 400). Returns the version
    /// written. Used for flowledger's own data keys (docs/MEMORY.md).
    pub async fn write(
        &self,
        path: &str,
        data: &Value,
        cas: Option<u64>,
    ) -> Result<u64, VaultError> {
        let kv = KvPath::parse(path)?;
        let api = self.shared.api();
        let options = vaultrs::api::kv2::requests::SetSecretRequestOptions {
            cas: u32::try_from(cas.unwrap_or(0)).unwrap_or(u32::MAX),
        };
        let written = match cas {
            Some(_) => {
                vaultrs::kv2::set_with_options(&*api, &kv.mount, &kv.path, data, options).await
            }
            None => vaultrs::kv2::set(&*api, &kv.mount, &kv.path, data).await,
        }
        .map_err(|e| read_error(e, &self.shared.addr, &kv.data(), None))?;
        Ok(written.version)
    }

    /// Permanently destroys `versions` of a KV v2 secret: their data is
    /// gone from Vault's storage (the metadata stays).
    pub async fn destroy(&self, path: &str, versions: Vec<u64>) -> Result<(), VaultError> {
        let kv = KvPath::parse(path)?;
        let api = self.shared.api();
        vaultrs::kv2::destroy_versions(&*api, &kv.mount, &kv.path, versions)
            .await
            .map_err(|e| {
                read_error(
                    e,
                    &self.shared.addr,
                    &format!("{}/destroy/{}", kv.mount, kv.path),
                    None,
                )
            })
    }

    /// The server's base URL.
    pub fn addr(&self) -> &str {
        &self.shared.addr
    }
}

impl Shared {
    fn api(&self) -> Arc<Api> {
        self.api
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_api(&self, api: Api) {
        *self
            .api
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(api);
    }

    /// An AppRole login; the new token replaces the client's.
    async fn login(&self) -> Result<Lease, VaultError> {
        let VaultAuth::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.auth
        else {
            unreachable!("login is only called with AppRole credentials");
        };
        let anonymous = build_api(&self.addr, self.timeout, "")?;
        let what = format!("auth/{mount}/login");
        let kind = AuthKind::AppRole {
            mount: mount.clone(),
        };
        let info = vaultrs::auth::approle::login(
            &anonymous,
            mount,
            role_id.expose_secret(),
            secret_id.expose_secret(),
        )
        .await
        .map_err(|e| auth_error(e, &self.addr, &what, kind))?;
        let mut token = info.client_token;
        let api = build_api(&self.addr, self.timeout, &token);
        token.zeroize();
        self.set_api(api?);
        Ok(Lease {
            ttl: Duration::from_secs(info.lease_duration),
            renewable: info.renewable,
        })
    }

    /// Renews the token; AppRole logs in again instead when the renewal
    /// fails, the token is not renewable, or its TTL is capped below
    /// `base_ttl` (the max TTL is near).
    async fn refresh(&self, lease: Lease, base_ttl: Duration) -> Result<Lease, VaultError> {
        let approle = matches!(self.auth, VaultAuth::AppRole { .. });
        if lease.renewable {
            let api = self.api();
            match vaultrs::token::renew_self(&*api, None).await {
                Ok(info) => {
                    let renewed = Lease {
                        ttl: Duration::from_secs(info.lease_duration),
                        renewable: info.renewable,
                    };
                    if approle && renewed.ttl < base_ttl {
                        tracing::info!(
                            ttl_secs = renewed.ttl.as_secs(),
                            "the Vault token nears its max TTL; logging in again with AppRole"
                        );
                        return match self.login().await {
                            Ok(fresh) => Ok(fresh),
                            Err(e) => {
                                tracing::warn!(error = %e, "a new AppRole login failed; the renewed token is kept until it expires");
                                Ok(renewed)
                            }
                        };
                    }
                    return Ok(renewed);
                }
                Err(e) => {
                    let e = auth_error(e, &self.addr, "auth/token/renew-self", AuthKind::Token);
                    if !approle {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "renewing the Vault token failed; logging in again with AppRole");
                }
            }
        }
        if approle {
            self.login().await
        } else {
            Ok(lease)
        }
    }
}

/// The pauses between tries to keep the token after a failure: 1 s
/// doubling to 30 s, without end while the client lives.
const TOKEN_RETRY: Backoff = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(30));

/// Why one try to keep the token ended without a new lease.
enum KeepFailure {
    /// The client was dropped: nothing to keep.
    Gone,
    /// Vault refused a static token: it stays refused.
    Refused(VaultError),
    /// Worth another try after [`TOKEN_RETRY`].
    Failed(VaultError),
}

/// Renews the token at 2/3 of its TTL until the client is gone; after a
/// failure, tries again with [`TOKEN_RETRY`].
async fn keep_token(shared: Weak<Shared>, mut lease: Lease) {
    let mut base_ttl = lease.ttl;
    loop {
        {
            let Some(s) = shared.upgrade() else { return };
            let approle = matches!(s.auth, VaultAuth::AppRole { .. });
            if lease.ttl.is_zero() {
                // a token without expiry (e.g. a root token) needs nothing
                return;
            }
            if !lease.renewable && !approle {
                tracing::warn!(
                    ttl_secs = lease.ttl.as_secs(),
                    "the Vault token is not renewable: reads fail once it expires; give a renewable token or use AppRole"
                );
                return;
            }
        }
        tokio::time::sleep((lease.ttl * 2 / 3).max(Duration::from_millis(200))).await;
        let kept = (|| async {
            let s = shared.upgrade().ok_or(KeepFailure::Gone)?;
            s.refresh(lease, base_ttl).await.map_err(|e| {
                let static_token = matches!(s.auth, VaultAuth::Token(_));
                if static_token && matches!(e, VaultError::Auth { kind: AuthKind::Token, .. }) {
                    KeepFailure::Refused(e)
                } else {
                    KeepFailure::Failed(e)
                }
            })
        })
        .retry(TOKEN_RETRY)
        .when(|f| matches!(f, KeepFailure::Failed(_)))
        .notify(|f, wait| {
            if let KeepFailure::Failed(e) = f {
                tracing::warn!(error = %e, retry_in_secs = wait.as_secs(), "keeping the Vault token failed");
            }
        })
        .await;
        match kept {
            Ok(next) => {
                base_ttl = base_ttl.max(next.ttl);
                lease = next;
            }
            Err(KeepFailure::Refused(e)) => {
                tracing::warn!(error = %e, "keeping the Vault token failed: Vault refuses the token; give a valid one (reads fail until then)");
                return;
            }
            Err(KeepFailure::Gone | KeepFailure::Failed(_)) => return,
        }
    }
}

fn build_api(addr: &str, timeout: Duration, token: &str) -> Result<Api, VaultError> {
    let settings = VaultClientSettingsBuilder::default()
        .address(addr)
        .token(token)
        .timeout(Some(timeout))
        .ca_certs(Vec::new())
        .identity(None)
        .verify(true)
        .build()
        .map_err(|e| VaultError::BadAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    Api::new(settings).map_err(|e| VaultError::BadAddress {
        addr: addr.to_string(),
        reason: format!("no HTTP client can be made for it: {e}"),
    })
}

/// `GET /v1/sys/health` (a standby is healthy): 200, or why not.
async fn check_health(addr: &str, timeout: Duration) -> Result<(), VaultError> {
    let path = "sys/health";
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| VaultError::BadAddress {
            addr: addr.to_string(),
            reason: format!("no HTTP client can be made for it: {e}"),
        })?;
    let answer = http
        .get(format!(
            "{addr}/v1/{path}?standbyok=true&perfstandbyok=true"
        ))
        .send()
        .await
        .map_err(|e| VaultError::Unreachable {
            addr: addr.to_string(),
            what: path.to_string(),
            source: Box::new(e),
        })?;
    match answer.status().as_u16() {
        200 => Ok(()),
        status @ (501 | 503) => Err(VaultError::Failing {
            path: path.to_string(),
            status,
            reason: if status == 501 {
                "not initialized".into()
            } else {
                "sealed".into()
            },
        }),
        status => Err(VaultError::BadAnswer {
            path: path.to_string(),
            reason: format!("status {status}"),
        }),
    }
}

/// The transport's error out of rustify's (its `reqwest::Error` when it
/// is one; else the messages of its chain, which hold no body).
fn transport(source: anyhow::Error) -> Box<dyn std::error::Error + Send + Sync> {
    match source.downcast::<reqwest::Error>() {
        Ok(e) => Box::new(e),
        Err(other) => format!("{other:#}").into(),
    }
}

/// A failed read: by status, or the transport's error.
fn read_error(e: ClientError, addr: &str, path: &str, version: Option<u64>) -> VaultError {
    use rustify::errors::ClientError as Http;
    let (status, reason) = match e {
        ClientError::APIError { code, errors } => (code, errors.join("; ")),
        ClientError::RestClientError { source } => match source {
            Http::ServerResponseError { code, .. } => (code, String::new()),
            Http::RequestError { source, .. } | Http::ResponseError { source } => {
                return VaultError::Unreachable {
                    addr: addr.to_string(),
                    what: path.to_string(),
                    source: transport(source),
                }
            }
            Http::ResponseParseError { .. } | Http::ResponseConversionError { .. } => {
                return bad_answer(path, "the body is not the JSON expected")
            }
            other => return bad_answer(path, &other.to_string()),
        },
        ClientError::JsonParseError { .. } => {
            return bad_answer(path, "the body is not the JSON expected")
        }
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
            return bad_answer(path, "it has no data")
        }
        other => return bad_answer(path, &other.to_string()),
    };
    let path = path.to_string();
    match status {
        403 => VaultError::Refused {
            path,
            status,
            reason,
        },
        404 => VaultError::NotFound { path, version },
        429 | 500.. => VaultError::Failing {
            path,
            status,
            reason,
        },
        _ => VaultError::Rejected {
            path,
            status,
            reason,
        },
    }
}

/// A failed lookup, renewal or login: 400/401/403 name the credential.
fn auth_error(e: ClientError, addr: &str, path: &str, kind: AuthKind) -> VaultError {
    match read_error(e, addr, path, None) {
        VaultError::Refused { status, reason, .. }
        | VaultError::Rejected {
            status: status @ (400 | 401),
            reason,
            ..
        } => VaultError::Auth {
            kind,
            status,
            reason,
        },
        other => other,
    }
}

fn bad_answer(path: &str, reason: &str) -> VaultError {
    VaultError::BadAnswer {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_and_logical_paths_name_the_same_secret() {
        let want = KvPath {
            mount: "secret".into(),
            path: "external_apis/ocr".into(),
        };
        assert_eq!(
            KvPath::parse("secret/data/external_apis/ocr").ok(),
            Some(want.clone())
        );
        assert_eq!(
            KvPath::parse("secret/external_apis/ocr").ok(),
            Some(want.clone())
        );
        assert_eq!(KvPath::parse("/secret/external_apis/ocr/").ok(), Some(want));
        assert_eq!(
            KvPath::parse("kv/data/x").map(|p| p.data()).ok().as_deref(),
            Some("kv/data/x")
        );
    }

    #[test]
    fn bad_paths_are_refused_before_any_request() {
        for bad in [
            "",
            "secret",
            "secret/data",
            "secret//x",
            "secret/../x",
            "secret/x?version=2",
            "secret/a b",
            "secret/x#y",
        ] {
            assert!(
                matches!(KvPath::parse(bad), Err(VaultError::BadPath { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn nothing_secret_is_printed() {
        let v = SecretValue(serde_json::json!({"api_key": "hunter2"}));
        assert_eq!(format!("{v:?}"), "SecretValue(<redacted>)");
        let read = SecretRead {
            value: v,
            version: 3,
        };
        assert!(!format!("{read:?}").contains("hunter2"));
        let cfg = VaultConfig {
            addr: "http://127.0.0.1:1".into(),
            auth: VaultAuth::AppRole {
                mount: "approle".into(),
                role_id: "the-role-id".into(),
                secret_id: "the-secret-id".into(),
            },
            timeout: Duration::from_secs(1),
        };
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("the-role-id") && !shown.contains("the-secret-id"),
            "{shown}"
        );
        let token = VaultAuth::Token("s.the-token".into());
        assert!(!format!("{token:?}").contains("the-token"));
    }

    #[test]
    fn a_field_is_taken_out_of_the_data() {
        let mut v = SecretValue(serde_json::json!({"a": "1", "b": "2"}));
        assert_eq!(
            v.take_field("b")
                .and_then(|b| b.expose_str().map(str::to_string))
                .as_deref(),
            Some("2")
        );
        assert!(v.take_field("c").is_none());
        assert_eq!(v.expose(), &serde_json::json!({"a": "1"}));
    }

    #[test]
    fn the_two_refused_credentials_are_told_apart() {
        let token = VaultError::Auth {
            kind: AuthKind::Token,
            status: 403,
            reason: "permission denied".into(),
        };
        assert!(token
            .to_string()
            .starts_with("the Vault token was refused (403 permission denied)"));
        let approle = VaultError::Auth {
            kind: AuthKind::AppRole {
                mount: "approle".into(),
            },
            status: 400,
            reason: "invalid role or secret ID".into(),
        };
        assert!(approle
            .to_string()
            .starts_with("the AppRole role_id/secret_id was refused"));
    }

    #[test]
    fn vault_statuses_map_to_what_the_caller_does() {
        let api = |code| ClientError::APIError {
            code,
            errors: vec!["why".into()],
        };
        let read = |code| read_error(api(code), "http://v", "secret/data/x", Some(2));
        assert!(
            matches!(read(403), VaultError::Refused { status: 403, ref reason, .. } if reason == "why")
        );
        assert!(matches!(
            read(404),
            VaultError::NotFound {
                version: Some(2),
                ..
            }
        ));
        assert!(matches!(
            read(400),
            VaultError::Rejected { status: 400, .. }
        ));
        for code in [429, 500, 503] {
            let e = read(code);
            assert!(
                matches!(e, VaultError::Failing { .. }) && e.is_retryable(),
                "{code}: {e:?}"
            );
        }
        let login = auth_error(
            api(400),
            "http://v",
            "auth/approle/login",
            AuthKind::AppRole {
                mount: "approle".into(),
            },
        );
        assert!(matches!(login, VaultError::Auth { status: 400, .. }));
        let down = auth_error(
            api(500),
            "http://v",
            "auth/token/lookup-self",
            AuthKind::Token,
        );
        assert!(matches!(down, VaultError::Failing { status: 500, .. }));
    }
}
