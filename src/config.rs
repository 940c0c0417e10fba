//! The service configuration file (`--config FILE`, env `FLOWLEDGER_CONFIG`),
//! TOML, in layers: the file (or the defaults without one), then the
//! `FLOWLEDGER_<SECTION>__<KEY>` environment variables, each overriding one
//! setting ([`Environment`]). Every setting is documented in
//! docs/CONFIGURATION.md. Secrets are never in the file: it names the
//! environment variables that hold them (each also readable from a file
//! named by `<VAR>_FILE`), and clients' tokens appear only as SHA-256
//! hashes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::commands::limits::{MAX_CALLBACK_ATTEMPTS, MAX_RETRY_DELAY_MS};
use crate::commands::secret_access::check_path;
use crate::commands::secret_access::policy::{PolicyRule, SecretPolicy};
use crate::crypto::{SealKeys, SigningKey};
use crate::secrets::vault::{VaultAuth, VaultConfig};

/// The whole configuration file, checked by [`Config::parse`]; a missing
/// file section takes its defaults.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[handler]`: the job handler.
    #[serde(default)]
    pub handler: HandlerSection,
    /// `[callbacks]`: signing keys and delivery of callbacks, both ways.
    #[serde(default)]
    pub callbacks: CallbackSection,
    /// `[[clients]]`: who may call the HTTP API; none: every `/v1` call but
    /// the n8n endpoint gets 401.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
    /// `[nats]`: which NATS accounts' users have which role on the command
    /// subjects.
    #[serde(default)]
    pub nats: NatsSection,
    /// `[secrets]`: where Vault is, how flowledger logs in, the cache and
    /// outage rules, and who may read which path (docs/SECRETS.md).
    #[serde(default)]
    pub secrets: SecretsSection,
    /// `[memory]`: conversation memory (docs/MEMORY.md); needs `[secrets]`
    /// for the data subjects' keys.
    #[serde(default)]
    pub memory: MemorySection,
    /// `[console]`: the web console at `/console` and the live job streams
    /// it reads.
    #[serde(default)]
    pub console: ConsoleSection,
    /// `[http]`: conventions of the HTTP API (CORS).
    #[serde(default)]
    pub http: HttpSection,
    /// `[telemetry]`: OpenTelemetry traces over OTLP (off by default).
    #[serde(default)]
    pub telemetry: TelemetrySection,
}

/// `[telemetry]`: where `serve` sends its OpenTelemetry traces
/// (docs/OPERATIONS.md "Traces"). Without an endpoint no exporter runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// The OTLP/HTTP collector's base URL, e.g. `http://127.0.0.1:4318`
    /// (spans are POSTed to `<it>/v1/traces`, protobuf); none (the
    /// default): no traces. When unset, the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable is used.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the traces; none: `OTEL_SERVICE_NAME`, else
    /// `flowledger`.
    pub service_name: Option<String>,
}

/// The standard variable naming the OTLP collector's base URL.
pub const OTEL_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard variable naming the service in traces.
pub const OTEL_SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";

impl TelemetrySection {
    /// Fills what the file and its overrides leave unset from the standard
    /// OpenTelemetry variables (an empty one counts as unset).
    fn with_standard_vars(mut self, env: &Environment) -> Self {
        let var = |name: &str| {
            env.get(name)
                .and_then(|v| v.into_string().ok())
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if self.otlp_endpoint.is_none() {
            self.otlp_endpoint = var(OTEL_ENDPOINT_VAR);
        }
        if self.service_name.is_none() {
            self.service_name = var(OTEL_SERVICE_NAME_VAR);
        }
        self
    }

    /// The service name the traces carry.
    pub fn service_name(&self) -> &str {
        self.service_name.as_deref().unwrap_or("flowledger")
    }

    /// The URL spans are POSTed to: the endpoint with `/v1/traces`.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?;
        Some(format!("{}/v1/traces", base.trim_end_matches('/')))
    }

    /// Refuses an endpoint that is not an `http(s)` URL without a query,
    /// and an empty service name.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.otlp_endpoint {
            let shown = crate::commands::redact::display(e);
            let url = url::Url::parse(e).map_err(|why| {
                format!(
                    "telemetry.otlp_endpoint {shown:?} is not a URL ({why}); write the \
                     collector's base URL, e.g. \"http://127.0.0.1:4318\""
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(format!(
                    "telemetry.otlp_endpoint {shown:?} must be an http or https URL with a \
                     host, e.g. \"http://127.0.0.1:4318\" (OTLP/HTTP)"
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(format!(
                    "telemetry.otlp_endpoint {shown:?} must not hold credentials: give the \
                     collector's headers (e.g. authorization) in OTEL_EXPORTER_OTLP_HEADERS"
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!(
                    "telemetry.otlp_endpoint {shown:?} must have no query or fragment: give \
                     the base URL, /v1/traces is appended"
                ));
            }
        }
        if self
            .service_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return Err(
                "telemetry.service_name must not be empty; leave it out for \
                        \"flowledger\""
                    .into(),
            );
        }
        Ok(())
    }
}

/// `[console]`: the web console `serve` answers at `/console`, and the
/// live job streams (`GET /v1/jobs/{id}/events`) it and other clients read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSection {
    /// Serve the console's page at `/console` (the `/v1` API it uses is
    /// there either way).
    pub enabled: bool,
    /// Live job streams one client may hold open at once, 1 to 1000;
    /// past it, 429.
    pub streams_per_client: usize,
    /// Seconds a live stream stays open at most, 1 to 86400; it then ends
    /// with `end` `time_limit` and the viewer connects again.
    pub stream_max_seconds: u64,
}

impl Default for ConsoleSection {
    fn default() -> Self {
        ConsoleSection {
            enabled: true,
            streams_per_client: 4,
            stream_max_seconds: 900,
        }
    }
}

impl ConsoleSection {
    fn check(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.streams_per_client) {
            return Err(format!(
                "console.streams_per_client must be 1 to 1000, got {}",
                self.streams_per_client
            ));
        }
        if !(1..=86_400).contains(&self.stream_max_seconds) {
            return Err(format!(
                "console.stream_max_seconds must be 1 to 86400 (a day), got {}",
                self.stream_max_seconds
            ));
        }
        Ok(())
    }
}

/// `[http]`: how the HTTP API answers browsers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// The origins (`scheme://host[:port]`) a browser may call the API
    /// from (CORS); `["*"]`: any origin. Empty (the default): no CORS
    /// header at all, so browsers refuse cross-origin calls.
    pub cors_allowed_origins: Vec<String>,
}

impl HttpSection {
    /// Refuses an origin that is not `http(s)://host[:port]` as a browser
    /// sends it, and `"*"` together with other origins.
    pub fn check(&self) -> Result<(), String> {
        let origins = &self.cors_allowed_origins;
        if origins.iter().any(|o| o == "*") {
            if origins.len() > 1 {
                return Err(
                    "http.cors_allowed_origins: \"*\" (any origin) must be alone in the list; \
                     remove it or the other origins"
                        .into(),
                );
            }
            return Ok(());
        }
        for o in origins {
            check_origin(o).map_err(|why| {
                let o = crate::commands::redact::display(o);
                format!(
                    "http.cors_allowed_origins: {o:?} is not an origin ({why}); write it as \
                     scheme://host[:port] without a path, e.g. \"https://app.example.com\", \
                     or use [\"*\"] alone"
                )
            })?;
        }
        Ok(())
    }
}

/// `o` is an origin as a browser's `Origin` header names it: `http` or
/// `https`, a host, a port only when not the scheme's default, nothing else.
fn check_origin(o: &str) -> Result<(), &'static str> {
    let url = url::Url::parse(o).map_err(|_| "not a URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host");
    }
    let serialized = url.origin().ascii_serialization();
    if serialized != o {
        return Err("it differs from its origin as browsers send it (lower case, no path, no trailing slash, no default port, no credentials)");
    }
    Ok(())
}

/// `[memory]`: conversation memory. Off unless `enabled`; needs
/// `[secrets] vault_addr`, where each data subject's key is kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySection {
    /// Accept memory commands and build the memory read model.
    pub enabled: bool,
    /// The KV v2 path under which each subject's key is kept, one secret
    /// per subject. flowledger's Vault token needs create, read and update
    /// on `<path>/*` and update on the matching `destroy` path.
    pub key_path: String,
    /// How long a subject's key stays in an instance's memory, seconds.
    pub key_cache_seconds: u64,
    /// A chunk's most characters (search indexes chunks of each turn).
    pub chunk_chars: usize,
    /// Recent episodes `assemble` returns by default.
    pub recent_episodes: u32,
    /// Similar chunks `assemble` returns by default.
    pub top_k: u32,
    /// `assemble`'s time budget by default, milliseconds.
    pub assemble_budget_ms: u64,
    /// When `serve` runs the cleanup (expired working state), a cron
    /// expression in UTC; one instance runs it at a time. Empty: never.
    pub cleanup_cron: String,
    /// The cleanup retires episodes whose turn is older than this many
    /// days (`EpisodeRetired`); 0: episodes are kept.
    pub episode_retention_days: u32,
    /// pgvector's `hnsw.ef_search` for assemble's similarity search (1 to
    /// 1000): the candidates the HNSW scan keeps; more find more of the
    /// true nearest chunks, slower. Raised to the request's `top_k` when
    /// lower.
    pub hnsw_ef_search: u32,
    /// pgvector's `hnsw.iterative_scan` for assemble's similarity search:
    /// `relaxed_order` (default), `strict_order` or `off`. On, a scan that
    /// found too few of the subject's chunks among its candidates goes on
    /// scanning (needs pgvector 0.8).
    pub hnsw_iterative_scan: IterativeScan,
    /// `[memory.embedder]`: similarity search by embeddings; without it,
    /// assemble ranks chunks by full text.
    pub embedder: Option<EmbedderSection>,
    /// `[memory.extractor]`: facts extracted from the turns by an HTTP
    /// peer; without it, facts come only in writebacks.
    pub extractor: Option<ExtractorSection>,
}

/// pgvector's `hnsw.iterative_scan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IterativeScan {
    /// One scan of `ef_search` candidates (pgvector's default).
    Off,
    /// Scans on until enough rows pass the filter; results may be slightly
    /// out of distance order (assemble orders them again).
    #[default]
    RelaxedOrder,
    /// Scans on, results in exact distance order.
    StrictOrder,
}

impl IterativeScan {
    /// The setting's value as pgvector names it.
    pub fn as_str(self) -> &'static str {
        match self {
            IterativeScan::Off => "off",
            IterativeScan::RelaxedOrder => "relaxed_order",
            IterativeScan::StrictOrder => "strict_order",
        }
    }
}

/// How assemble's similarity search scans the HNSW index (`[memory]
/// hnsw_ef_search`, `hnsw_iterative_scan`), set per snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswSearch {
    /// `hnsw.ef_search`, 1 to [`MAX_HNSW_EF_SEARCH`].
    pub ef_search: u32,
    /// `hnsw.iterative_scan`.
    pub iterative_scan: IterativeScan,
}

/// pgvector's bound on `hnsw.ef_search`.
pub const MAX_HNSW_EF_SEARCH: u32 = 1_000;

impl Default for HnswSearch {
    fn default() -> Self {
        HnswSearch {
            ef_search: 100,
            iterative_scan: IterativeScan::RelaxedOrder,
        }
    }
}

impl HnswSearch {
    /// pgvector's own defaults (ef_search 40, no iterative scan): what
    /// assemble had before the settings existed.
    pub const PGVECTOR_DEFAULTS: HnswSearch = HnswSearch {
        ef_search: 40,
        iterative_scan: IterativeScan::Off,
    };
}

/// Which episodes the extractor is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExtractMode {
    /// Only a writeback with `"extract": true`.
    #[default]
    OnRequest,
    /// Every writeback with a turn, unless it says `"extract": false`.
    Always,
}

/// `[memory.extractor]`: the fact extractor, an HTTP peer (`POST <url>`,
/// docs/MEMORY.md "Extraction") where the language model lives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractorSection {
    /// The endpoint, POSTed as is, e.g. `http://extractor:8000/v1/extract`.
    pub url: String,
    /// One request's time limit, milliseconds (10 to 120000).
    #[serde(default = "default_extractor_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts the extraction handler makes per episode before recording
    /// `EpisodeExtractionFailed` (1 to 20).
    #[serde(default = "default_embedder_attempts")]
    pub max_attempts: u32,
    /// The API key, `<kv path>#<field>`, read through the secrets
    /// capability as `flowledger-handler` (role `handler`); sent only as
    /// `Authorization: Bearer`.
    pub api_key_secret: Option<String>,
    /// `on_request` (default: a writeback with `"extract": true`) or
    /// `always` (every turn, unless the writeback says `"extract": false`).
    #[serde(default)]
    pub extract: ExtractMode,
}

fn default_extractor_timeout_ms() -> u64 {
    30_000
}

/// Checks the settings every memory peer has (`setting` names its
/// section): an http(s) URL with a host and no credentials, query or
/// fragment; the time limit; the attempts; the API key's reference.
fn check_peer(
    setting: &str,
    url: &str,
    timeout_ms: u64,
    max_attempts: u32,
    api_key_secret: Option<&str>,
) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("{setting}.url is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "{setting}.url must be an http or https URL with a host"
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "{setting}.url must hold no credentials: give the key as {setting}.api_key_secret"
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{setting}.url must have no query or fragment"));
    }
    if !(10..=120_000).contains(&timeout_ms) {
        return Err(format!("{setting}.timeout_ms must be 10 to 120000"));
    }
    if !(1..=20).contains(&max_attempts) {
        return Err(format!("{setting}.max_attempts must be 1 to 20"));
    }
    if let Some(s) = api_key_secret {
        crate::commands::registry::SecretRef::parse(s)
            .map_err(|e| format!("{setting}.api_key_secret {s:?}: {e}"))?;
    }
    Ok(())
}

impl ExtractorSection {
    /// Checks every setting; the message names it.
    pub fn check(&self) -> Result<(), String> {
        check_peer(
            "memory.extractor",
            &self.url,
            self.timeout_ms,
            self.max_attempts,
            self.api_key_secret.as_deref(),
        )
    }

    /// The API key's secret, parsed.
    pub fn api_key_ref(&self) -> Option<Result<crate::commands::registry::SecretRef, String>> {
        self.api_key_secret
            .as_deref()
            .map(crate::commands::registry::SecretRef::parse)
    }
}

/// What `assemble` does when the embedder cannot embed its query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmbedderFallback {
    /// Rank by full text instead (`retrieval: "full_text_fallback"`).
    #[default]
    FullText,
    /// Answer `embeddings_failed` (503).
    Error,
}

/// How assemble ranks chunks with an embedder (`[memory.embedder] ranking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ranking {
    /// By cosine distance to the query's vector (`retrieval: "vector"`).
    #[default]
    Vector,
    /// The vector ranking and the full-text ranking fused by reciprocal
    /// rank (`retrieval: "hybrid"`): a chunk either finds near the top
    /// comes first, one both find before either alone.
    Hybrid,
}

/// `[memory.embedder]`: an OpenAI-compatible embeddings endpoint
/// (`POST <url>/embeddings`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedderSection {
    /// The API's base URL, e.g. `https://openrouter.ai/api/v1` or
    /// `http://localhost:11434/v1`.
    pub url: String,
    /// The model asked for.
    pub model: String,
    /// Every vector's length (1 to 2000: pgvector's HNSW index takes at
    /// most 2000 dimensions); an answer with another length
    /// is refused. Sent as `dimensions` when `send_dimensions`.
    pub dimensions: u32,
    /// Send `dimensions` in the request (models that can shorten their
    /// vectors accept it; others may refuse it).
    #[serde(default)]
    pub send_dimensions: bool,
    /// One request's time limit, milliseconds (10 to 120000).
    #[serde(default = "default_embedder_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts the embedding handler makes per episode before recording
    /// `EpisodeEmbeddingFailed` (1 to 20).
    #[serde(default = "default_embedder_attempts")]
    pub max_attempts: u32,
    /// The API key, `<kv path>#<field>`, read through the secrets
    /// capability as `flowledger-handler` (role `handler`); sent only as
    /// `Authorization: Bearer`.
    pub api_key_secret: Option<String>,
    /// assemble when the query cannot be embedded: `full_text` (default)
    /// or `error`.
    #[serde(default)]
    pub on_failure: EmbedderFallback,
    /// How assemble ranks chunks: `vector` (default) or `hybrid`.
    #[serde(default)]
    pub ranking: Ranking,
}

fn default_embedder_timeout_ms() -> u64 {
    5_000
}

fn default_embedder_attempts() -> u32 {
    5
}

/// The most dimensions of a vector (pgvector's `vector` type).
pub const MAX_EMBEDDING_DIMENSIONS: u32 = 2_000;

impl EmbedderSection {
    /// Checks every setting; the message names it.
    pub fn check(&self) -> Result<(), String> {
        check_peer(
            "memory.embedder",
            &self.url,
            self.timeout_ms,
            self.max_attempts,
            self.api_key_secret.as_deref(),
        )?;
        if !crate::commands::memory::is_model_name(&self.model) {
            return Err(
                "memory.embedder.model must be 1 to 200 characters of A-Z a-z 0-9 . _ : / @ + - (it is recorded in every EpisodeEmbedded)"
                    .into(),
            );
        }
        if !(1..=MAX_EMBEDDING_DIMENSIONS).contains(&self.dimensions) {
            return Err(format!(
                "memory.embedder.dimensions must be 1 to {MAX_EMBEDDING_DIMENSIONS}"
            ));
        }
        Ok(())
    }

    /// The API key's secret, parsed.
    pub fn api_key_ref(&self) -> Option<Result<crate::commands::registry::SecretRef, String>> {
        self.api_key_secret
            .as_deref()
            .map(crate::commands::registry::SecretRef::parse)
    }

    /// `<url>/embeddings`.
    pub fn endpoint(&self) -> String {
        format!("{}/embeddings", self.url.trim_end_matches('/'))
    }
}

/// The longest retention period, days.
const MAX_RETENTION_DAYS: u32 = 36_600;

impl Default for MemorySection {
    fn default() -> Self {
        MemorySection {
            enabled: false,
            key_path: "secret/data/flowledger/memory-keys".into(),
            key_cache_seconds: 300,
            chunk_chars: 800,
            recent_episodes: 5,
            top_k: 5,
            assemble_budget_ms: 2_000,
            cleanup_cron: "0 2 * * *".into(),
            episode_retention_days: 0,
            hnsw_ef_search: HnswSearch::default().ef_search,
            hnsw_iterative_scan: HnswSearch::default().iterative_scan,
            embedder: None,
            extractor: None,
        }
    }
}

impl MemorySection {
    /// assemble's HNSW scan settings.
    pub fn hnsw(&self) -> HnswSearch {
        HnswSearch {
            ef_search: self.hnsw_ef_search,
            iterative_scan: self.hnsw_iterative_scan,
        }
    }

    /// Checks every bound; the message names the setting.
    pub fn check(&self, secrets: &SecretsSection) -> Result<(), String> {
        if self.enabled && secrets.vault_addr.is_none() {
            return Err(
                "memory.enabled needs secrets.vault_addr: each data subject's key is kept in Vault"
                    .into(),
            );
        }
        if self.key_cache_seconds > 3_600 {
            return Err("memory.key_cache_seconds must be at most 3600".into());
        }
        if !(50..=8_000).contains(&self.chunk_chars) {
            return Err("memory.chunk_chars must be 50 to 8000".into());
        }
        if self.recent_episodes > 100 || !(1..=100).contains(&self.top_k) {
            return Err(
                "memory.recent_episodes must be at most 100 and memory.top_k 1 to 100".into(),
            );
        }
        if !(10..=60_000).contains(&self.assemble_budget_ms) {
            return Err("memory.assemble_budget_ms must be 10 to 60000".into());
        }
        if !self.cleanup_cron.is_empty() {
            crate::memory::cleanup::parse_schedule(&self.cleanup_cron)
                .map_err(|e| format!("memory.cleanup_cron: {e}"))?;
        }
        if self.episode_retention_days > MAX_RETENTION_DAYS {
            return Err(format!(
                "memory.episode_retention_days must be at most {MAX_RETENTION_DAYS} (100 years); 0 keeps episodes"
            ));
        }
        if !(1..=MAX_HNSW_EF_SEARCH).contains(&self.hnsw_ef_search) {
            return Err(format!(
                "memory.hnsw_ef_search must be 1 to {MAX_HNSW_EF_SEARCH} (pgvector's bounds)"
            ));
        }
        if let Some(e) = &self.embedder {
            e.check()?;
        }
        if let Some(e) = &self.extractor {
            e.check()?;
        }
        Ok(())
    }
}

/// How flowledger logs in to Vault (`secrets.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VaultAuthKind {
    /// A token from the variable `secrets.token_env` names.
    #[default]
    Token,
    /// AppRole: role_id and secret_id from the variables
    /// `secrets.role_id_env` and `secrets.secret_id_env` name.
    Approle,
}

/// `[secrets]`: secret access through Vault (OpenBao). Without
/// `vault_addr`, secret access is off: reads answer `unavailable` and no
/// step may use a secret.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSection {
    /// Vault's base URL, e.g. `https://vault.internal:8200`.
    pub vault_addr: Option<String>,
    /// `token` (default) or `approle`.
    pub auth: VaultAuthKind,
    /// Environment variable holding the Vault token (`auth = "token"`).
    pub token_env: String,
    /// The AppRole auth mount (`auth = "approle"`).
    pub approle_mount: String,
    /// Environment variable holding the AppRole role_id.
    pub role_id_env: String,
    /// Environment variable holding the AppRole secret_id.
    pub secret_id_env: String,
    /// Timeout of one request to Vault, in ms (100 to 60,000).
    pub timeout_ms: u64,
    /// How long a value read from Vault is served from memory, in seconds
    /// (0: every read goes to Vault; at most a day).
    pub cache_ttl_seconds: u64,
    /// How old a value may be and still be served as last-known-good while
    /// Vault cannot be read, in seconds (at least the TTL; at most 30 days).
    pub max_staleness_seconds: u64,
    /// Reads of Vault per request before last-known-good (1 to 10).
    pub retry_attempts: u32,
    /// The wait before the first retry, in ms, doubling (at most 10,000).
    pub retry_base_ms: u64,
    /// `[[secrets.rules]]`: who may read which paths; none: every read is
    /// denied.
    pub rules: Vec<PolicyRule>,
    /// `[secrets.keys]`: flowledger's own keys read from Vault at start
    /// instead of environment variables.
    pub keys: OwnKeys,
}

/// `[secrets.keys]`: where in Vault each of flowledger's own keys is, as
/// `<path>#<field>` (e.g. `secret/data/flowledger/keys#callback`). A key
/// named here is read from Vault when `serve` starts (recorded as a secret
/// access); its environment variable must then be unset.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OwnKeys {
    /// Signs outgoing job callbacks (instead of `callbacks.signing_key_env`).
    pub callback_signing: Option<String>,
    /// Verifies n8n's callbacks (instead of `callbacks.n8n_key_env`).
    pub n8n: Option<String>,
    /// The seal key ring (instead of `callbacks.seal_keys_env`).
    pub seal_keys: Option<String>,
    /// The Ed25519 seed, 64 hex digits, that signs checkpoints (instead of
    /// FLOWLEDGER_CHECKPOINT_SIGNING_KEY).
    pub checkpoint_signing: Option<String>,
}

impl OwnKeys {
    /// Each configured key: its setting name and its `(path, field)`.
    pub fn sources(&self) -> Vec<(&'static str, &str)> {
        [
            ("callback_signing", &self.callback_signing),
            ("n8n", &self.n8n),
            ("seal_keys", &self.seal_keys),
            ("checkpoint_signing", &self.checkpoint_signing),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_deref().map(|v| (name, v)))
        .collect()
    }

    /// Splits `<path>#<field>`, checking both.
    pub fn split(value: &str) -> Result<(String, String), String> {
        let (path, field) = value
            .split_once('#')
            .ok_or_else(|| format!("{value:?} must be <path>#<field>"))?;
        check_path(path).map_err(|e| format!("{value:?}: {e}"))?;
        if field.is_empty()
            || !field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return Err(format!("{value:?}: the field must be A-Z a-z 0-9 _ - ."));
        }
        Ok((path.to_string(), field.to_string()))
    }
}

impl Default for SecretsSection {
    fn default() -> Self {
        SecretsSection {
            vault_addr: None,
            auth: VaultAuthKind::Token,
            token_env: "FLOWLEDGER_VAULT_TOKEN".into(),
            approle_mount: "approle".into(),
            role_id_env: "FLOWLEDGER_VAULT_ROLE_ID".into(),
            secret_id_env: "FLOWLEDGER_VAULT_SECRET_ID".into(),
            timeout_ms: 5_000,
            cache_ttl_seconds: 300,
            max_staleness_seconds: 3_600,
            retry_attempts: 3,
            retry_base_ms: 200,
            rules: Vec::new(),
            keys: OwnKeys::default(),
        }
    }
}

impl SecretsSection {
    /// Checks every bound and compiles the rules; the message names the
    /// setting.
    pub fn check(&self) -> Result<SecretPolicy, String> {
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err("secrets.timeout_ms must be 100 to 60000".into());
        }
        if self.cache_ttl_seconds > 86_400 {
            return Err("secrets.cache_ttl_seconds must be at most 86400 (a day)".into());
        }
        if self.max_staleness_seconds < self.cache_ttl_seconds
            || self.max_staleness_seconds > 30 * 86_400
        {
            return Err(
                "secrets.max_staleness_seconds must be at least secrets.cache_ttl_seconds \
                 and at most 2592000 (30 days)"
                    .into(),
            );
        }
        if !(1..=10).contains(&self.retry_attempts) || self.retry_base_ms > 10_000 {
            return Err(
                "secrets.retry_attempts must be 1 to 10 and secrets.retry_base_ms at most 10000"
                    .into(),
            );
        }
        for (name, v) in self.keys.sources() {
            OwnKeys::split(v).map_err(|e| format!("secrets.keys.{name}: {e}"))?;
        }
        if self.vault_addr.is_none() && !self.keys.sources().is_empty() {
            return Err(
                "secrets.keys needs secrets.vault_addr: the keys are read from Vault".into(),
            );
        }
        SecretPolicy::new(self.rules.clone())
    }

    /// The Vault client's settings, credentials read from the variables
    /// named (or the files their `_FILE` variants name); `None` when
    /// `vault_addr` is unset. A variable that is unset or empty is an error
    /// naming it.
    pub fn vault_config(&self) -> Result<Option<VaultConfig>, ConfigError> {
        let Some(addr) = &self.vault_addr else {
            return Ok(None);
        };
        let env = Environment::process();
        let var = |name: &String, field: &'static str| match env.secret(name)? {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(ConfigError::Secret {
                var: name.clone(),
                field,
                message: format!(
                    "is unset or empty; set it (or {name}_FILE) to flowledger's Vault credential"
                ),
            }),
        };
        let auth = match self.auth {
            VaultAuthKind::Token => {
                VaultAuth::Token(var(&self.token_env, "secrets.token_env")?.into())
            }
            VaultAuthKind::Approle => VaultAuth::AppRole {
                mount: self.approle_mount.clone(),
                role_id: var(&self.role_id_env, "secrets.role_id_env")?.into(),
                secret_id: var(&self.secret_id_env, "secrets.secret_id_env")?.into(),
            },
        };
        Ok(Some(VaultConfig {
            addr: addr.clone(),
            auth,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
        }))
    }
}

/// `[nats]`: the role of a NATS command's sender, by the account the
/// broker says it belongs to (its `Nats-Request-Info` header,
/// docs/adr/0008-nats-identity.md). A command from an account in none of
/// the lists is refused `unauthenticated`. The defaults are the accounts
/// of nats/production.conf.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// Accounts whose users are clients (the user name is the client id).
    pub client_accounts: Vec<String>,
    /// Accounts whose users are operators.
    pub operator_accounts: Vec<String>,
    /// Accounts whose users are the job handler.
    pub handler_accounts: Vec<String>,
}

impl Default for NatsSection {
    fn default() -> Self {
        NatsSection {
            client_accounts: vec!["CLIENTS".into()],
            operator_accounts: vec!["OPERATORS".into()],
            handler_accounts: vec!["HANDLER".into()],
        }
    }
}

impl NatsSection {
    /// Each list with its setting's name.
    pub fn lists(&self) -> [(&'static str, &[String]); 3] {
        [
            ("client_accounts", &self.client_accounts),
            ("operator_accounts", &self.operator_accounts),
            ("handler_accounts", &self.handler_accounts),
        ]
    }

    /// Refuses a blank account name and an account in two lists (its
    /// users' role would be ambiguous).
    pub fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeMap::new();
        for (setting, accounts) in self.lists() {
            for a in accounts {
                if a.trim().is_empty() || a.chars().any(char::is_control) {
                    return Err(format!(
                        "nats.{setting}: account names must be non-blank, without control characters, got {a:?}"
                    ));
                }
                if let Some(other) = seen.insert(a.as_str(), setting) {
                    return Err(format!(
                        "nats: account {a:?} is in both nats.{other} and nats.{setting}; \
                         give each account one role"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `[handler]`: how the job handler runs and retries failed attempts
/// (every key optional, defaults below).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerSection {
    /// Run the job handler in this process (it also needs a database).
    pub enabled: bool,
    /// Jobs whose steps run at once, at least 1; more wait, highest priority first.
    pub max_concurrent_jobs: usize,
    /// First retry delay in ms (a step's `backoff_ms` overrides it); at most
    /// [`MAX_RETRY_DELAY_MS`].
    pub retry_base_ms: u64,
    /// Factor from one retry delay to the next, 1 to 1000.
    pub retry_multiplier: f64,
    /// Cap in ms on a retry delay before jitter; at most [`MAX_RETRY_DELAY_MS`].
    pub retry_max_ms: u64,
    /// Fraction (0 to 1) each delay is moved by at random, either way.
    pub retry_jitter: f64,
    /// Base URL n8n calls back on, e.g. `https://flowledger.internal`; n8n
    /// steps are told `<public_url>/v1/callbacks/n8n`.
    pub public_url: Option<String>,
    /// Seconds a stopping `serve` (SIGTERM, Ctrl-C) waits for the step
    /// calls in flight to end and be recorded before it stops them, 0 to
    /// [`MAX_DRAIN_GRACE_SECONDS`]; 0: stop them at once.
    pub drain_grace_seconds: u64,
}

/// The longest `handler.drain_grace_seconds`: an hour.
pub const MAX_DRAIN_GRACE_SECONDS: u64 = 3_600;

impl Default for HandlerSection {
    /// Retries as seed 002 has them: 5 s, then 15 s, ... at most 5 min, ±20%.
    fn default() -> Self {
        HandlerSection {
            enabled: true,
            max_concurrent_jobs: 1000,
            retry_base_ms: 5_000,
            retry_multiplier: 3.0,
            retry_max_ms: 300_000,
            retry_jitter: 0.2,
            public_url: None,
            drain_grace_seconds: 30,
        }
    }
}

/// `[callbacks]`: the keys (by environment variable) and limits of signed
/// callbacks, outgoing and from n8n (docs/CALLBACKS.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackSection {
    /// Environment variable holding the key that signs outgoing callbacks.
    pub signing_key_env: String,
    /// Environment variable holding the key n8n signs its callbacks with.
    pub n8n_key_env: String,
    /// Environment variable holding the ring of keys that seal a
    /// `callback_url`'s credentials: `<id>:<64 hex>[,<id>:<64 hex>...]`, the
    /// first seals, all open. Unset: URLs with credentials are refused.
    pub seal_keys_env: String,
    /// Deliveries of one job's result callback before `CallbackFailed`, 1 to
    /// [`MAX_CALLBACK_ATTEMPTS`].
    pub max_attempts: u32,
    /// Timeout of one callback delivery attempt, in ms.
    pub timeout_ms: u64,
    /// How far (seconds, 1 to 86,400) an incoming n8n callback's timestamp
    /// may be from now; its nonce is kept twice as long.
    pub timestamp_window_seconds: u64,
    /// Posts to `POST /v1/callbacks/n8n` per minute from one source address.
    pub rate_limit_per_minute: u32,
    /// Refused posts (bad, stale, replayed signatures) per minute from one
    /// source address; past it, 429 and no log line.
    pub refusals_per_minute: u32,
}

impl Default for CallbackSection {
    fn default() -> Self {
        CallbackSection {
            signing_key_env: "FLOWLEDGER_CALLBACK_KEY".into(),
            n8n_key_env: "FLOWLEDGER_N8N_KEY".into(),
            seal_keys_env: "FLOWLEDGER_CALLBACK_SEAL_KEYS".into(),
            max_attempts: 5,
            timeout_ms: 10_000,
            timestamp_window_seconds: 300,
            rate_limit_per_minute: 600,
            refusals_per_minute: 60,
        }
    }
}

/// What a client may do over HTTP (`role` in `[[clients]]`: `client`,
/// `operator` or `auditor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Submits, reads and cancels its own jobs.
    #[default]
    Client,
    /// Also decides approvals and flips the kill-switch.
    Operator,
    /// Reads everything (every client's jobs, executions, audit trail,
    /// approvals, the secret-access list) and sends no command.
    Auditor,
}

/// One `[[clients]]` table: a caller of the HTTP API and its bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// The client id (non-empty, unique): the actor on its events, matched
    /// against jobs' `client_id`.
    pub id: String,
    /// Hex SHA-256 of the bearer token (`printf %s TOKEN | sha256sum`).
    pub token_sha256: String,
    /// What the client may do; default `client`.
    #[serde(default)]
    pub role: Role,
    /// Job submissions per minute (`POST /v1/jobs`), bursts included.
    #[serde(default = "default_rate")]
    pub rate_limit_per_minute: u32,
}

fn default_rate() -> u32 {
    600
}

/// Why the configuration cannot be used; each message names the file, the
/// setting or the environment variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read; fix the path or its permissions.
    #[error("cannot read configuration {path}: {source} (pass another file with --config or FLOWLEDGER_CONFIG)")]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value is out of
    /// range; fix the setting the message names.
    #[error("configuration {path} is not valid: {message}")]
    Invalid {
        /// The file that was read.
        path: PathBuf,
        /// The setting at fault and what it must be.
        message: String,
    },
    /// A `FLOWLEDGER_<SECTION>__<KEY>` variable names no setting, or holds
    /// a value of the wrong type; fix or unset the variable.
    #[error("environment variable {var} (setting {setting}): {message}")]
    Override {
        /// The variable.
        var: String,
        /// The setting it overrides, dotted (`handler.drain_grace_seconds`).
        setting: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The environment variable a `callbacks.*_env` or `secrets.*_env`
    /// setting names holds an unusable key (shorter than 16 bytes), or is
    /// unset where a credential is required; set it.
    #[error("environment variable {var} (named by {field} in the configuration): {message}")]
    Secret {
        /// The environment variable.
        var: String,
        /// The setting that names it (`callbacks.signing_key_env`, ...,
        /// `secrets.token_env`).
        field: &'static str,
        /// Why the key is refused (never the key itself).
        message: String,
    },
    /// A secret's variable, or the file its `_FILE` variant names, cannot
    /// be used (see [`SecretVarError`]).
    #[error(transparent)]
    SecretVar(#[from] SecretVarError),
}

/// Why a secret given in the environment (`VAR`, or `VAR_FILE` naming a
/// file that holds it) cannot be read; never says the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretVarError {
    /// Both `VAR` and `VAR_FILE` are set: unset one of them.
    #[error("both {var} and {file_var} are set: give the secret one way, unset one of them")]
    Both {
        /// The variable holding the value.
        var: String,
        /// The variable naming a file that holds it.
        file_var: String,
    },
    /// The file `VAR_FILE` names cannot be read, or is not UTF-8 text.
    #[error("{file_var}={path}: cannot read the secret from the file: {reason} (point {file_var} at a readable UTF-8 text file, or unset it)")]
    File {
        /// The variable naming the file.
        file_var: String,
        /// The file.
        path: PathBuf,
        /// What failed (the operating system's reason; never the content).
        reason: String,
    },
    /// The variable's value is not UTF-8.
    #[error("{var} is not UTF-8 text: set it to the value as text")]
    NotUnicode {
        /// The variable.
        var: String,
    },
}

/// Where settings and secrets are read from: the process's environment, or
/// a fixed set of variables (tests, a reload that must see what the start
/// saw).
///
/// Two rules (docs/CONFIGURATION.md, "Layers"):
/// - `FLOWLEDGER_<SECTION>__<KEY>` (a double underscore between the
///   levels, any case) overrides the setting `<section>.<key>` of the file,
///   e.g. `FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS=10` for `[handler]
///   drain_grace_seconds`, `FLOWLEDGER_MEMORY__EMBEDDER__URL` for
///   `[memory.embedder] url`. The value is read as a TOML value (`10`,
///   `true`, `["A", "B"]`, `"quoted"`), or as a string when it is not one
///   (`https://x`, `0 2 * * *`).
/// - every secret given in a variable `VAR` may instead be in a file named
///   by `VAR_FILE` (trailing newlines trimmed); both set is refused.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `None`: the process's environment, read when asked.
    fixed: Option<BTreeMap<String, OsString>>,
}

/// The prefix of the variables that override settings of the file.
pub const OVERRIDE_PREFIX: &str = "FLOWLEDGER_";

/// What separates the levels in an override's name (`SECTION__KEY`).
pub const OVERRIDE_SEPARATOR: &str = "__";

/// One `FLOWLEDGER_<SECTION>__<KEY>` variable, parsed.
#[derive(Debug, Clone)]
struct Override {
    var: String,
    path: Vec<String>,
    value: toml::Value,
}

impl Override {
    fn setting(&self) -> String {
        self.path.join(".")
    }
}

impl Environment {
    /// The process's environment.
    pub fn process() -> Self {
        Environment { fixed: None }
    }

    /// Exactly these variables (and no other).
    pub fn from_vars<K: Into<String>, V: Into<OsString>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Environment {
            fixed: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    fn get(&self, name: &str) -> Option<OsString> {
        match &self.fixed {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var_os(name),
        }
    }

    fn names(&self) -> Vec<String> {
        match &self.fixed {
            Some(vars) => vars.keys().cloned().collect(),
            // a variable whose name is not Unicode is no flowledger setting
            None => std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .collect(),
        }
    }

    /// Whether `name` is set (to anything).
    pub fn is_set(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The secret in `var`, or in the file `<var>_FILE` names (trailing
    /// `\n`/`\r\n` trimmed); `None` when neither is set. Both set, an
    /// unreadable file and a value that is not UTF-8 are errors naming the
    /// variables, never the value.
    pub fn secret(&self, var: &str) -> Result<Option<String>, SecretVarError> {
        let file_var = format!("{var}_FILE");
        match (self.get(var), self.get(&file_var)) {
            (Some(_), Some(_)) => Err(SecretVarError::Both {
                var: var.into(),
                file_var,
            }),
            (Some(v), None) => v
                .into_string()
                .map(Some)
                .map_err(|_| SecretVarError::NotUnicode { var: var.into() }),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let file = |reason: String| SecretVarError::File {
                    file_var: file_var.clone(),
                    path: path.clone(),
                    reason,
                };
                let bytes = std::fs::read(&path).map_err(|e| file(e.to_string()))?;
                let text = String::from_utf8(bytes).map_err(|_| file("not UTF-8 text".into()))?;
                Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
            }
            (None, None) => Ok(None),
        }
    }

    /// The names of the variables that override settings, sorted.
    pub fn override_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| is_override(n))
            .collect();
        names.sort();
        names
    }

    /// Every override, parsed, in name order.
    fn overrides(&self) -> Result<Vec<Override>, ConfigError> {
        let mut out = Vec::new();
        for var in self.override_names() {
            let rest = &var[OVERRIDE_PREFIX.len()..];
            let path: Vec<String> = rest
                .split(OVERRIDE_SEPARATOR)
                .map(str::to_ascii_lowercase)
                .collect();
            let refuse = |message: String| ConfigError::Override {
                var: var.clone(),
                setting: path.join("."),
                message,
            };
            if path.iter().any(|p| p.is_empty()) {
                return Err(refuse(
                    "a level of the name is empty; the rule is FLOWLEDGER_<SECTION>__<KEY> \
                     with one double underscore between levels"
                        .into(),
                ));
            }
            let raw = self
                .get(&var)
                .unwrap_or_default()
                .into_string()
                .map_err(|_| refuse("the value is not UTF-8 text".into()))?;
            // a TOML value when it is one, else the text as a string
            let value = raw
                .trim()
                .parse::<toml::Value>()
                .unwrap_or(toml::Value::String(raw));
            out.push(Override { var, path, value });
        }
        Ok(out)
    }
}

/// `FLOWLEDGER_<SECTION>__<KEY>`: the prefix and at least one separator
/// (`FLOWLEDGER_NATS_URL` and the other flags' variables have none).
fn is_override(name: &str) -> bool {
    name.strip_prefix(OVERRIDE_PREFIX)
        .is_some_and(|rest| rest.contains(OVERRIDE_SEPARATOR))
}

/// Sets `value` at `path` in `table`, making the tables on the way; a
/// level that is there and is no table (a list, a value) is an error.
fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("names no setting".into());
    };
    let mut at = table;
    for (i, p) in parents.iter().enumerate() {
        let entry = at
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "{} is not a section (it is a list or a value): set it in the file",
                    path[..=i].join(".")
                ))
            }
        };
    }
    at.insert(last.clone(), value);
    Ok(())
}

/// Where an override's value is refused: what serde says, without the
/// position in a document that does not exist.
fn override_message(e: toml::de::Error) -> String {
    let m = e.message().trim().to_string();
    if m.starts_with("invalid type") || m.starts_with("invalid value") {
        format!(
            "{m}; the value is read as TOML (10, true, [\"A\", \"B\"], \"text\") or else as text"
        )
    } else if m.starts_with("missing field") {
        format!(
            "{m}: the section it makes needs that setting too (in the file, or its own variable)"
        )
    } else {
        m
    }
}

impl Config {
    /// Reads and checks the file at `path` with the overrides in the
    /// process's environment (see [`Config::load_layered`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_layered(Some(path), &Environment::process())
    }

    /// The layered configuration: the file at `path` (none: the defaults),
    /// then the `FLOWLEDGER_<SECTION>__<KEY>` overrides in `env`; every
    /// bound checked.
    pub fn load_layered(path: Option<&Path>, env: &Environment) -> Result<Self, ConfigError> {
        let (path, text) = match path {
            Some(path) => (
                path.to_owned(),
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
            ),
            None => (PathBuf::from("(no file: the defaults)"), String::new()),
        };
        Self::parse_layered(&path, &text, env)
    }

    /// Parses TOML `text` and checks every bound; `path` only names the file
    /// in errors. No environment variable is read.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_layered(path, text, &Environment::from_vars::<String, OsString>([]))
    }

    /// Parses TOML `text`, applies the overrides in `env`, and checks every
    /// bound; an error a variable causes names it.
    pub fn parse_layered(path: &Path, text: &str, env: &Environment) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        // the file alone first: its errors point into it
        let mut c: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let overrides = env.overrides()?;
        if overrides.is_empty() {
            c.telemetry = c.telemetry.with_standard_vars(env);
            return c.check().map(|()| c).map_err(invalid);
        }
        let file: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let with = |skip: Option<usize>| -> Result<Config, toml::de::Error> {
            let mut t = file.clone();
            for (i, o) in overrides.iter().enumerate() {
                if Some(i) != skip {
                    // checked to apply below
                    let _ = set_path(&mut t, &o.path, o.value.clone());
                }
            }
            toml::Value::Table(t).try_into::<Config>()
        };
        for o in &overrides {
            set_path(&mut file.clone(), &o.path, o.value.clone()).map_err(|message| {
                ConfigError::Override {
                    var: o.var.clone(),
                    setting: o.setting(),
                    message,
                }
            })?;
        }
        let mut c = match with(None) {
            Ok(c) => c,
            Err(e) => {
                // the variable without which the rest is fine is at fault
                let culprit = (0..overrides.len()).find(|&i| with(Some(i)).is_ok());
                return Err(match culprit {
                    Some(i) => ConfigError::Override {
                        var: overrides[i].var.clone(),
                        setting: overrides[i].setting(),
                        message: override_message(e),
                    },
                    None => invalid(format!(
                        "{} (with the overrides {})",
                        override_message(e),
                        overrides
                            .iter()
                            .map(|o| o.var.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                });
            }
        };
        c.telemetry = c.telemetry.with_standard_vars(env);
        c.check().map(|()| c).map_err(|message| {
            // a bound broken by an override: say which variable set it
            let set_by: Vec<String> = overrides
                .iter()
                .filter(|o| message.contains(&o.setting()))
                .map(|o| format!("{} sets {}", o.var, o.setting()))
                .collect();
            if set_by.is_empty() {
                invalid(message)
            } else {
                invalid(format!("{message} ({})", set_by.join(", ")))
            }
        })
    }

    /// Checks every bound; the message names the setting.
    fn check(&self) -> Result<(), String> {
        let c = self;
        let h = &c.handler;
        if !(1..=100_000).contains(&h.max_concurrent_jobs) {
            return Err("handler.max_concurrent_jobs must be 1 to 100000".into());
        }
        if !(1.0..=1000.0).contains(&h.retry_multiplier) || !(0.0..=1.0).contains(&h.retry_jitter) {
            return Err(
                "handler.retry_multiplier must be 1 to 1000 and handler.retry_jitter 0 to 1".into(),
            );
        }
        if h.retry_base_ms > MAX_RETRY_DELAY_MS || h.retry_max_ms > MAX_RETRY_DELAY_MS {
            return Err(format!(
                "handler.retry_base_ms and handler.retry_max_ms must be at most \
                 {MAX_RETRY_DELAY_MS} (one day)"
            ));
        }
        if h.drain_grace_seconds > MAX_DRAIN_GRACE_SECONDS {
            return Err(format!(
                "handler.drain_grace_seconds must be 0 to {MAX_DRAIN_GRACE_SECONDS} (an hour), \
                 got {}",
                h.drain_grace_seconds
            ));
        }
        if c.callbacks.max_attempts == 0 || c.callbacks.max_attempts > MAX_CALLBACK_ATTEMPTS {
            return Err(format!(
                "callbacks.max_attempts must be 1 to {MAX_CALLBACK_ATTEMPTS}, got {}",
                c.callbacks.max_attempts
            ));
        }
        if c.callbacks.rate_limit_per_minute == 0 || c.callbacks.refusals_per_minute == 0 {
            return Err(
                "callbacks.rate_limit_per_minute and callbacks.refusals_per_minute must be at least 1"
                    .into(),
            );
        }
        if !(1..=86_400).contains(&c.callbacks.timestamp_window_seconds) {
            return Err("callbacks.timestamp_window_seconds must be 1 to 86400 (a day)".into());
        }
        c.nats.check()?;
        c.secrets.check()?;
        c.memory.check(&c.secrets)?;
        c.console.check()?;
        c.http.check()?;
        c.telemetry.check()?;
        let mut ids = std::collections::BTreeSet::new();
        for (i, client) in c.clients.iter().enumerate() {
            // the actors flowledger itself records under
            if ["flowledger", "flowledger-handler", "operator", "n8n"].contains(&client.id.as_str())
            {
                return Err(format!(
                    "clients[{i}].id {:?} is the actor flowledger records its own commands \
                     under; choose another id",
                    client.id
                ));
            }
            if client.id.trim().is_empty() || !ids.insert(client.id.as_str()) {
                return Err(format!(
                    "clients[{i}].id must be non-empty and unique, got {:?}",
                    client.id
                ));
            }
            if client.token_sha256.len() != 64 || hex::decode(&client.token_sha256).is_err() {
                return Err(format!(
                    "clients[{i}].token_sha256 must be 64 hex digits (printf %s TOKEN | sha256sum)"
                ));
            }
            if client.rate_limit_per_minute == 0 {
                return Err(format!(
                    "clients[{i}].rate_limit_per_minute must be at least 1"
                ));
            }
        }
        Ok(())
    }

    /// The key in the environment variable `var` (named by `callbacks.<field>`),
    /// or in the file `<var>_FILE` names.
    pub fn key(var: &str, field: &'static str) -> Result<Option<SigningKey>, ConfigError> {
        Self::key_in(&Environment::process(), var, field)
    }

    /// [`Config::key`] from `env`.
    pub fn key_in(
        env: &Environment,
        var: &str,
        field: &'static str,
    ) -> Result<Option<SigningKey>, ConfigError> {
        match env.secret(var)? {
            None => Ok(None),
            Some(v) => {
                SigningKey::new(v.as_bytes())
                    .map(Some)
                    .map_err(|message| ConfigError::Secret {
                        var: var.into(),
                        field,
                        message,
                    })
            }
        }
    }

    /// The ring of keys that seal and open a `callback_url`'s credentials,
    /// from the variable `callbacks.seal_keys_env` names (or its `_FILE`);
    /// `None` when unset.
    pub fn seal_keys(&self) -> Result<Option<std::sync::Arc<SealKeys>>, ConfigError> {
        let var = &self.callbacks.seal_keys_env;
        match Environment::process().secret(var)? {
            None => Ok(None),
            Some(v) => SealKeys::parse(&v)
                .map(|k| Some(std::sync::Arc::new(k)))
                .map_err(|message| ConfigError::Secret {
                    var: var.clone(),
                    field: "callbacks.seal_keys_env",
                    message,
                }),
        }
    }

    /// The key n8n signs its results with, from the variable
    /// `callbacks.n8n_key_env` names (or its `_FILE`); `None` when unset.
    pub fn n8n_key(&self) -> Result<Option<SigningKey>, ConfigError> {
        Self::key(&self.callbacks.n8n_key_env, "callbacks.n8n_key_env")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configuration_parses() {
        let c = Config::load(Path::new("config/example.toml")).expect("config/example.toml");
        assert!(c.clients.iter().any(|c| c.role == Role::Operator));
    }

    #[test]
    fn the_auditor_role_parses() {
        let hash = "a".repeat(64);
        let c = Config::parse(
            Path::new("c.toml"),
            &format!(
                "[[clients]]\nid = \"audit\"\ntoken_sha256 = \"{hash}\"\nrole = \"auditor\"\n"
            ),
        )
        .expect("role auditor");
        assert_eq!(c.clients[0].role, Role::Auditor);
        let e = Config::parse(
            Path::new("c.toml"),
            &format!("[[clients]]\nid = \"a\"\ntoken_sha256 = \"{hash}\"\nrole = \"admin\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("auditor"), "the known roles are listed: {e}");
    }

    #[test]
    fn errors_name_the_setting() {
        let e = Config::parse(Path::new("c.toml"), "[handler]\nmax_concurent_jobs = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_concurent_jobs"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "[[clients]]\nid = \"a\"\ntoken_sha256 = \"abc\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("clients[0].token_sha256"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "[handler]\nmax_concurrent_jobs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("handler.max_concurrent_jobs"), "{e}");
        let e = Config::parse(
            Path::new("c.toml"),
            "[handler]\ndrain_grace_seconds = 3601\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("handler.drain_grace_seconds") && e.contains("3601"),
            "{e}"
        );
        let c = Config::parse(Path::new("c.toml"), "[handler]\ndrain_grace_seconds = 0\n")
            .expect("0 stops at once");
        assert_eq!(c.handler.drain_grace_seconds, 0);
        assert_eq!(Config::default().handler.drain_grace_seconds, 30);
        let e = Config::parse(
            Path::new("c.toml"),
            "[nats]\nclient_accounts = [\"A\"]\noperator_accounts = [\"A\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nats.client_accounts") && e.contains("nats.operator_accounts"),
            "{e}"
        );
        let e = Config::parse(Path::new("c.toml"), "[nats]\nhandler_accounts = [\" \"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.handler_accounts"), "{e}");
    }

    #[test]
    fn the_hnsw_search_settings_parse_and_are_bounded() {
        let d = Config::parse(Path::new("c.toml"), "").expect("defaults");
        assert_eq!(
            d.memory.hnsw(),
            HnswSearch {
                ef_search: 100,
                iterative_scan: IterativeScan::RelaxedOrder
            }
        );
        let c = Config::parse(
            Path::new("c.toml"),
            "[memory]\nhnsw_ef_search = 1000\nhnsw_iterative_scan = \"strict_order\"\n",
        )
        .expect("in bounds");
        assert_eq!(c.memory.hnsw().ef_search, 1000);
        assert_eq!(c.memory.hnsw().iterative_scan.as_str(), "strict_order");
        let off = Config::parse(
            Path::new("c.toml"),
            "[memory]\nhnsw_iterative_scan = \"off\"\n",
        )
        .expect("off");
        assert_eq!(off.memory.hnsw().iterative_scan, IterativeScan::Off);
        for (bad, says) in [
            (
                "hnsw_ef_search = 0",
                "memory.hnsw_ef_search must be 1 to 1000",
            ),
            (
                "hnsw_ef_search = 1001",
                "memory.hnsw_ef_search must be 1 to 1000",
            ),
            ("hnsw_iterative_scan = \"relaxed\"", "hnsw_iterative_scan"),
        ] {
            let err = Config::parse(Path::new("c.toml"), &format!("[memory]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_embedder_is_checked_naming_the_setting() {
        let base = "[memory]\n[memory.embedder]\nurl = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n";
        let c = Config::parse(Path::new("c.toml"), &format!("{base}dimensions = 8\n"))
            .expect("a minimal embedder");
        let e = c.memory.embedder.expect("configured");
        assert_eq!(e.on_failure, EmbedderFallback::FullText);
        assert_eq!(e.ranking, Ranking::Vector);
        assert_eq!(e.endpoint(), "http://127.0.0.1:9/v1/embeddings");
        assert_eq!(e.timeout_ms, 5_000);
        assert!(Config::parse(Path::new("c.toml"), "")
            .expect("defaults")
            .memory
            .embedder
            .is_none());
        for (extra, setting) in [
            ("dimensions = 0\n", "memory.embedder.dimensions"),
            ("dimensions = 2001\n", "memory.embedder.dimensions"),
            (
                "dimensions = 8\ntimeout_ms = 1\n",
                "memory.embedder.timeout_ms",
            ),
            (
                "dimensions = 8\nmax_attempts = 0\n",
                "memory.embedder.max_attempts",
            ),
            ("dimensions = 8\non_failure = \"maybe\"\n", "on_failure"),
            ("dimensions = 8\nranking = \"fused\"\n", "ranking"),
            (
                "dimensions = 8\napi_key_secret = \"secret/data/x\"\n",
                "memory.embedder.api_key_secret",
            ),
            ("dimensions = 8\nmodle = \"x\"\n", "modle"),
        ] {
            let err = Config::parse(Path::new("c.toml"), &format!("{base}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(setting), "{extra}: {err}");
        }
        let err = Config::parse(
            Path::new("c.toml"),
            "[memory.embedder]\nurl = \"ftp://x\"\nmodel = \"m\"\ndimensions = 8\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("memory.embedder.url"), "{err}");
        let ok = Config::parse(
            Path::new("c.toml"),
            &format!("{base}dimensions = 8\non_failure = \"error\"\nranking = \"hybrid\"\napi_key_secret = \"secret/data/embed#api_key\"\n"),
        )
        .expect("with a key, on_failure = error and ranking = hybrid");
        let e = ok.memory.embedder.expect("configured");
        assert_eq!(e.on_failure, EmbedderFallback::Error);
        assert_eq!(e.ranking, Ranking::Hybrid);
        let r = e.api_key_ref().expect("named").expect("parses");
        assert_eq!(
            (r.path.as_str(), r.field.as_str()),
            ("secret/data/embed", "api_key")
        );
    }

    #[test]
    fn the_extractor_is_checked_naming_the_setting() {
        let base = "[memory.extractor]\nurl = \"http://127.0.0.1:9/v1/extract\"\n";
        let c = Config::parse(Path::new("c.toml"), base).expect("a minimal extractor");
        let e = c.memory.extractor.expect("configured");
        assert_eq!(e.extract, ExtractMode::OnRequest);
        assert_eq!((e.timeout_ms, e.max_attempts), (30_000, 5));
        assert!(e.api_key_ref().is_none());
        assert!(Config::parse(Path::new("c.toml"), "")
            .expect("defaults")
            .memory
            .extractor
            .is_none());
        for (extra, setting) in [
            ("timeout_ms = 5\n", "memory.extractor.timeout_ms"),
            ("max_attempts = 21\n", "memory.extractor.max_attempts"),
            ("extract = \"sometimes\"\n", "extract"),
            (
                "api_key_secret = \"secret/data/x\"\n",
                "memory.extractor.api_key_secret",
            ),
            ("model = \"x\"\n", "model"),
        ] {
            let err = Config::parse(Path::new("c.toml"), &format!("{base}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(setting), "{extra}: {err}");
        }
        for url in [
            "ftp://x/extract",
            "http://user:pw@x/extract",
            "http://x/extract?key=1",
            "not a url",
        ] {
            let err = Config::parse(
                Path::new("c.toml"),
                &format!("[memory.extractor]\nurl = \"{url}\"\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("memory.extractor.url"), "{url}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
        let ok = Config::parse(
            Path::new("c.toml"),
            &format!("{base}extract = \"always\"\napi_key_secret = \"secret/data/llm#key\"\n"),
        )
        .expect("always, with a key");
        let e = ok.memory.extractor.expect("configured");
        assert_eq!(e.extract, ExtractMode::Always);
        let r = e.api_key_ref().expect("named").expect("parses");
        assert_eq!(
            (r.path.as_str(), r.field.as_str()),
            ("secret/data/llm", "key")
        );
    }

    fn env(vars: &[(&str, &str)]) -> Environment {
        Environment::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn an_override_sets_the_setting_its_name_says_over_the_file() {
        let file = "[handler]\ndrain_grace_seconds = 5\nmax_concurrent_jobs = 7\n";
        let c = Config::parse_layered(
            Path::new("c.toml"),
            file,
            &env(&[
                ("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS", "10"),
                (
                    "FLOWLEDGER_HANDLER__PUBLIC_URL",
                    "https://flowledger.internal",
                ),
                ("flowledger_ignored", "x"),
                ("FLOWLEDGER_MEMORY__EMBEDDER__URL", "http://127.0.0.1:9/v1"),
                ("FLOWLEDGER_MEMORY__EMBEDDER__MODEL", "m"),
                ("FLOWLEDGER_MEMORY__EMBEDDER__DIMENSIONS", "8"),
                ("FLOWLEDGER_NATS__CLIENT_ACCOUNTS", "[\"ACME\", \"GLOBEX\"]"),
                ("FLOWLEDGER_MEMORY__CLEANUP_CRON", "0 3 * * *"),
                ("FLOWLEDGER_CALLBACKS__SIGNING_KEY_ENV", "\"MY_KEY\""),
                // the flags' variables have no double underscore: not overrides
                ("FLOWLEDGER_NATS_URL", "nats://x:4222"),
            ]),
        )
        .expect("overrides apply");
        assert_eq!(c.handler.drain_grace_seconds, 10, "the variable wins");
        assert_eq!(
            c.handler.max_concurrent_jobs, 7,
            "the file's other keys stay"
        );
        assert_eq!(
            c.handler.public_url.as_deref(),
            Some("https://flowledger.internal")
        );
        assert_eq!(c.memory.embedder.expect("made by variables").dimensions, 8);
        assert_eq!(c.nats.client_accounts, ["ACME", "GLOBEX"]);
        assert_eq!(c.memory.cleanup_cron, "0 3 * * *");
        assert_eq!(c.callbacks.signing_key_env, "MY_KEY");
        let no_file = Config::parse_layered(
            Path::new("(none)"),
            "",
            &env(&[("flowledger_handler__enabled", "false")]),
        )
        .expect("defaults");
        assert!(no_file.handler.enabled, "only the upper-case prefix counts");
        let no_file = Config::parse_layered(
            Path::new("(none)"),
            "",
            &env(&[("FLOWLEDGER_handler__Enabled", "false")]),
        )
        .expect("the levels' case does not matter");
        assert!(!no_file.handler.enabled);
    }

    #[test]
    fn a_bad_override_names_its_variable_and_what_is_expected() {
        let refused = |vars: &[(&str, &str)]| {
            Config::parse_layered(
                Path::new("c.toml"),
                "[handler]\nenabled = true\n",
                &env(vars),
            )
            .expect_err("refused")
            .to_string()
        };
        let e = refused(&[("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS", "soon")]);
        assert!(
            e.contains("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS")
                && e.contains("handler.drain_grace_seconds")
                && e.contains("u64"),
            "{e}"
        );
        let e = refused(&[("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECOND", "5")]);
        assert!(
            e.contains("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECOND") && e.contains("unknown field"),
            "{e}"
        );
        let e = refused(&[("FLOWLEDGER_HANDLR__ENABLED", "true")]);
        assert!(
            e.contains("FLOWLEDGER_HANDLR__ENABLED") && e.contains("handlr"),
            "{e}"
        );
        // a bound: the file's message, and which variable set the value
        let e = refused(&[("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS", "4000")]);
        assert!(
            e.contains("handler.drain_grace_seconds must be 0 to 3600")
                && e.contains("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS sets"),
            "{e}"
        );
        let e = refused(&[("FLOWLEDGER_CLIENTS__ID", "x")]);
        assert!(e.contains("FLOWLEDGER_CLIENTS__ID"), "{e}");
        let e = Config::parse_layered(
            Path::new("c.toml"),
            "[[clients]]\nid = \"a\"\ntoken_sha256 = \"{}\"\n",
            &env(&[("FLOWLEDGER_CLIENTS__ID", "x")]),
        )
        .expect_err("a list of tables")
        .to_string();
        assert!(e.contains("clients is not a section"), "{e}");
        let e = refused(&[("FLOWLEDGER_MEMORY__EMBEDDER__URL", "http://x/v1")]);
        assert!(
            e.contains("FLOWLEDGER_MEMORY__EMBEDDER__URL") && e.contains("missing field `model`"),
            "{e}"
        );
        let e = refused(&[("FLOWLEDGER_HANDLER____ENABLED", "true")]);
        assert!(e.contains("empty"), "{e}");
        // the file's own errors still point into the file
        let e = Config::parse_layered(
            Path::new("c.toml"),
            "[handler]\nenabeld = true\n",
            &env(&[("FLOWLEDGER_HANDLER__ENABLED", "true")]),
        )
        .expect_err("the file is wrong")
        .to_string();
        assert!(e.contains("c.toml") && e.contains("enabeld"), "{e}");
    }

    #[test]
    fn a_secret_comes_from_its_variable_or_the_file_its_file_variant_names() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("key");
        std::fs::write(&file, "0123456789abcdef0123\n").expect("write");
        let path = file.to_str().expect("a UTF-8 path");
        let key =
            |vars: &[(&str, &str)]| Config::key_in(&env(vars), "K", "callbacks.signing_key_env");
        assert!(key(&[]).expect("unset").is_none());
        let from_file = key(&[("K_FILE", path)]).expect("read").expect("set");
        let direct = key(&[("K", "0123456789abcdef0123")])
            .expect("read")
            .expect("set");
        let (a, b) = (from_file.sign(1, b"m"), direct.sign(1, b"m"));
        assert_eq!(a, b, "the trailing newline is not part of the key");
        let e = key(&[("K", "0123456789abcdef0123"), ("K_FILE", path)])
            .expect_err("both")
            .to_string();
        assert!(e.contains("K_FILE") && e.contains("both"), "{e}");
        assert!(!e.contains("0123456789"), "{e}");
        let e = key(&[("K_FILE", "/nonexistent/key")])
            .expect_err("no file")
            .to_string();
        assert!(e.contains("K_FILE=/nonexistent/key"), "{e}");
        std::fs::write(&file, "short\r\n").expect("write");
        let e = key(&[("K_FILE", path)]).expect_err("too short").to_string();
        assert!(
            e.contains("callbacks.signing_key_env") && !e.contains("short\r"),
            "{e}"
        );
        std::fs::write(&file, [0xff, 0xfe]).expect("write");
        let e = env(&[("K_FILE", path)])
            .secret("K")
            .expect_err("not UTF-8")
            .to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        std::fs::write(&file, "line one\nline two\n\n").expect("write");
        assert_eq!(
            env(&[("K_FILE", path)])
                .secret("K")
                .expect("read")
                .as_deref(),
            Some("line one\nline two"),
            "only the trailing newlines are trimmed"
        );
    }

    #[test]
    fn the_nats_accounts_default_to_those_of_the_production_server_config() {
        let c = Config::parse(Path::new("c.toml"), "").expect("empty is all defaults");
        let conf = std::fs::read_to_string("nats/production.conf").expect("nats/production.conf");
        for (_, accounts) in c.nats.lists() {
            for a in accounts {
                assert!(
                    conf.contains(&format!("  {a}: {{")),
                    "{a} not in nats/production.conf"
                );
            }
        }
    }

    #[test]
    fn cors_origins_are_browser_origins_and_the_wildcard_stands_alone() {
        let c = Config::parse(Path::new("c.toml"), "").expect("defaults");
        assert!(c.http.cors_allowed_origins.is_empty(), "no CORS by default");
        let c = Config::parse(
            Path::new("c.toml"),
            "[http]\ncors_allowed_origins = [\"https://app.example.com\", \"http://localhost:3000\"]\n",
        )
        .expect("two origins");
        assert_eq!(c.http.cors_allowed_origins.len(), 2);
        Config::parse(
            Path::new("c.toml"),
            "[http]\ncors_allowed_origins = [\"*\"]\n",
        )
        .expect("the wildcard alone");
        for bad in [
            "[\"*\", \"https://a.example\"]",
            "[\"https://a.example/\"]",
            "[\"https://a.example/app\"]",
            "[\"ftp://a.example\"]",
            "[\"a.example\"]",
            "[\"https://A.example\"]",
            "[\"https://a.example:443\"]",
            "[\"https://u:p@a.example\"]",
        ] {
            let e = Config::parse(
                Path::new("c.toml"),
                &format!("[http]\ncors_allowed_origins = {bad}\n"),
            )
            .expect_err(bad)
            .to_string();
            assert!(e.contains("http.cors_allowed_origins"), "{bad}: {e}");
            assert!(!e.contains("u:p@"), "no credentials echoed: {e}");
        }
    }

    #[test]
    fn cors_origins_are_overridden_by_their_variable_as_a_list() {
        let c = Config::parse_layered(
            Path::new("c.toml"),
            "[http]\ncors_allowed_origins = [\"https://a.example\"]\n",
            &env(&[(
                "FLOWLEDGER_HTTP__CORS_ALLOWED_ORIGINS",
                "[\"https://b.example\", \"https://c.example\"]",
            )]),
        )
        .expect("a list in the variable");
        assert_eq!(
            c.http.cors_allowed_origins,
            ["https://b.example", "https://c.example"]
        );
        let e = Config::parse_layered(
            Path::new("(none)"),
            "",
            &env(&[("FLOWLEDGER_HTTP__CORS_ALLOWED_ORIGINS", "[\"b.example\"]")]),
        )
        .expect_err("not an origin")
        .to_string();
        assert!(
            e.contains("http.cors_allowed_origins")
                && e.contains("FLOWLEDGER_HTTP__CORS_ALLOWED_ORIGINS"),
            "{e}"
        );
    }
}
