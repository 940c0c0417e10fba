//! The workflow registry: which `workflow_key`s exist and what they run.
//!
//! A workflow is a set of steps called in parallel (solver services over
//! HTTP and/or n8n webhooks), an optional approval gate with an auto-approval
//! rule, and a policy saying how many steps must succeed. The file is
//! checked whole at start; every error names the key and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default location, relative to the working directory.
pub const DEFAULT_REGISTRY_PATH: &str = "workflows/registry.json";

/// A step's `timeout_ms` when the registry leaves it out: 30 s per attempt.
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 30_000;
/// A step's `max_attempts` when the registry leaves it out.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// A workflow's `approval_timeout_seconds` when left out: one day.
pub const DEFAULT_APPROVAL_TIMEOUT_SECONDS: u64 = 24 * 3600;
use crate::commands::limits::{
    MAX_APPROVAL_WINDOW_SECONDS, MAX_ATTEMPTS, MAX_RETRY_DELAY_MS, MAX_STEP_HEADERS,
    MAX_STEP_HEADER_NAME_LEN, MAX_STEP_HEADER_TEMPLATE_LEN, MAX_STEP_TIMEOUT_MS,
};
use crate::commands::redact;
use crate::commands::secret_access::events::AccessRequest;
use crate::commands::secret_access::{check_path, check_request};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// The workflow registry file (JSON), as loaded and checked by
/// [`Registry::parse`].
pub struct Registry {
    /// File format version; only 1 is read.
    pub version: u32,
    /// Each workflow by its `workflow_key` (1-128 of `a-z 0-9 . _ -`).
    pub workflows: BTreeMap<String, WorkflowDefinition>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// What one `workflow_key` runs: its steps, approval gate and success policy.
pub struct WorkflowDefinition {
    /// Free text for people (shown by `GET /v1/meta`).
    #[serde(default)]
    pub description: String,
    /// Called in parallel when the job runs.
    pub steps: Vec<StepDefinition>,
    /// A job waits for an approval (human or auto) before its steps run.
    #[serde(default)]
    pub requires_approval: bool,
    /// How long an approval stays open before it expires and fails the job:
    /// 1 to [`MAX_APPROVAL_WINDOW_SECONDS`] seconds.
    #[serde(default = "default_approval_timeout")]
    pub approval_timeout_seconds: u64,
    /// Approve without a human when the job's confidence is high enough;
    /// only with `requires_approval`.
    #[serde(default)]
    pub auto_approval: Option<AutoApproval>,
    /// How many steps must succeed for the job to complete.
    #[serde(default)]
    pub success: SuccessPolicy,
}

fn default_approval_timeout() -> u64 {
    DEFAULT_APPROVAL_TIMEOUT_SECONDS
}

/// How a step is called (`kind`: `solver` or `n8n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A solver service: POST the job, the answer is the result.
    Solver,
    /// An n8n webhook: answers the result, or 202 and calls back later.
    N8n,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// One step of a workflow: a peer called once per attempt.
pub struct StepDefinition {
    /// Unique within the workflow: 1-128 of `a-z 0-9 _ -`; named in step
    /// events and idempotency keys.
    pub name: String,
    /// How the peer is called.
    pub kind: StepKind,
    /// The peer's `http://` or `https://` URL, with a host and no credentials.
    pub url: String,
    /// Per attempt, in ms: 1 to [`MAX_STEP_TIMEOUT_MS`].
    #[serde(default = "default_step_timeout")]
    pub timeout_ms: u64,
    /// Attempts in all, the first included: 1 to [`MAX_ATTEMPTS`].
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay in ms, at most [`MAX_RETRY_DELAY_MS`]; overrides
    /// the handler's `retry_base_ms`.
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    /// Headers added to every attempt's request, by name; each value is a
    /// template of text and `{<path>#<field>}` secret placeholders (see
    /// [`HeaderTemplate`]), filled by the handler through the secret
    /// access service at each attempt.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// An n8n step only: the importable n8n workflow that serves its
    /// webhook, a path relative to the registry file's directory (e.g.
    /// `n8n/payment-release.json`, docs/CALLBACKS.md "The n8n kit").
    /// [`Registry::load`] checks that the file exists; the handler never
    /// reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// Headers flowledger sets itself (or that belong to the connection): a
/// step may not name them in `headers`.
pub const RESERVED_STEP_HEADERS: [&str; 13] = [
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-connection",
    "idempotency-key",
];

/// One header of a step, checked: its name and its value's template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepHeader {
    /// The header's name (lower case, as HTTP/2 sends it).
    pub name: reqwest::header::HeaderName,
    /// Its value: text and secret placeholders.
    pub template: HeaderTemplate,
}

/// A step header's value: literal text and secret placeholders, in order.
///
/// Written as text with `{<path>#<field>}` placeholders, e.g.
/// `Bearer {secret/data/external_apis/ocr#api_key}`: `path` a KV v2 path
/// (`<mount>/data/<name>`), `field` the field of the secret whose string
/// value goes there. `{{` and `}}` stand for `{` and `}`. A template holds
/// at least one placeholder (a header of plain text would put its value in
/// the registry), no CR, LF or other control character, only ASCII text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTemplate {
    /// The template's parts, in order.
    pub parts: Vec<TemplatePart>,
}

/// A part of a [`HeaderTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Text sent as written.
    Text(String),
    /// Replaced by the string value of a secret's field.
    Secret(SecretRef),
}

/// A secret's field named by a placeholder, `{<path>#<field>}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    /// The KV v2 path, `<mount>/data/<name>`.
    pub path: String,
    /// The field whose value is used.
    pub field: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.path, self.field)
    }
}

impl HeaderTemplate {
    /// Parses and checks a template; the error says what to fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_STEP_HEADER_TEMPLATE_LEN {
            return Err(format!(
                "is longer than {MAX_STEP_HEADER_TEMPLATE_LEN} bytes"
            ));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(
                        "has a '}' that closes no placeholder (write '}}' for a '}')".into(),
                    )
                }
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => inner.push(c),
                            None => {
                                return Err(
                                    "has a '{' that is never closed (write '{{' for a '{')".into()
                                )
                            }
                        }
                    }
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(TemplatePart::Secret(SecretRef::parse(&inner)?));
                }
                '\r' | '\n' => return Err("holds a CR or LF".into()),
                c if c.is_control() || !c.is_ascii() => {
                    return Err(format!(
                        "holds {c:?}: header text is printable ASCII, spaces and tabs"
                    ))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Text(literal));
        }
        if !parts.iter().any(|p| matches!(p, TemplatePart::Secret(_))) {
            return Err(
                "has no {<path>#<field>} placeholder: step headers carry secrets read from \
                 Vault, never text written in the registry"
                    .into(),
            );
        }
        Ok(HeaderTemplate { parts })
    }

    /// The secrets the template names, in order (a repeated one again).
    pub fn secrets(&self) -> impl Iterator<Item = &SecretRef> {
        self.parts.iter().filter_map(|p| match p {
            TemplatePart::Secret(r) => Some(r),
            TemplatePart::Text(_) => None,
        })
    }
}

impl SecretRef {
    /// Parses the inside of a placeholder, `<path>#<field>` (also the form
    /// of a secret named in configuration).
    pub fn parse(inner: &str) -> Result<Self, String> {
        let Some((path, field)) = inner.split_once('#') else {
            return Err(format!(
                "placeholder {{{inner}}} names no field: write {{<path>#<field>}}, e.g. \
                 {{secret/data/external_apis/ocr#api_key}}"
            ));
        };
        check_path(path).map_err(|e| format!("placeholder {{{inner}}}: {e}"))?;
        // the field by the same rules as a read's
        let probe = AccessRequest {
            path: path.into(),
            field: Some(field.into()),
            version: None,
            purpose: "registry check".into(),
            job_id: None,
            step: None,
        };
        check_request(&probe).map_err(|e| format!("placeholder {{{inner}}}: {e}"))?;
        Ok(SecretRef {
            path: path.into(),
            field: field.into(),
        })
    }
}

impl StepDefinition {
    /// The step's headers, checked (the registry was checked at load, so
    /// this fails only for a definition built by hand); the error is
    /// (header as written, what is wrong).
    pub fn headers(&self) -> Result<Vec<StepHeader>, (String, String)> {
        if self.headers.len() > MAX_STEP_HEADERS {
            return Err((
                String::new(),
                format!(
                    "at most {MAX_STEP_HEADERS} headers, got {}",
                    self.headers.len()
                ),
            ));
        }
        let mut out: Vec<StepHeader> = Vec::with_capacity(self.headers.len());
        for (name, text) in &self.headers {
            let bad = |m: String| (name.clone(), m);
            if name.len() > MAX_STEP_HEADER_NAME_LEN {
                return Err(bad(format!(
                    "a header name is at most {MAX_STEP_HEADER_NAME_LEN} bytes"
                )));
            }
            let parsed = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| bad("is not a valid HTTP header name".into()))?;
            let lower = parsed.as_str();
            if RESERVED_STEP_HEADERS.contains(&lower)
                || lower.starts_with("x-flowledger-")
                || lower.starts_with("flowledger-")
            {
                return Err(bad(
                    "is set by flowledger itself (or by the connection); a step may not set it"
                        .into(),
                ));
            }
            if out.iter().any(|h| h.name == parsed) {
                return Err(bad(
                    "is named twice (header names are case-insensitive)".into()
                ));
            }
            let template = HeaderTemplate::parse(text).map_err(bad)?;
            out.push(StepHeader {
                name: parsed,
                template,
            });
        }
        Ok(out)
    }

    /// Whether any header of the step reads a secret.
    pub fn uses_secrets(&self) -> bool {
        !self.headers.is_empty()
    }
}

impl Registry {
    /// Every step that reads secrets, as (workflow key, step, its
    /// secrets), for the checks at start.
    pub fn secret_steps(&self) -> Vec<(&str, &StepDefinition, Vec<SecretRef>)> {
        let mut out = Vec::new();
        for (key, wf) in &self.workflows {
            for step in wf.steps.iter().filter(|s| s.uses_secrets()) {
                let mut refs: Vec<SecretRef> = step
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .flat_map(|h| h.template.secrets().cloned())
                            .collect()
                    })
                    .unwrap_or_default();
                refs.sort();
                refs.dedup();
                out.push((key.as_str(), step, refs));
            }
        }
        out
    }
}

fn default_step_timeout() -> u64 {
    DEFAULT_STEP_TIMEOUT_MS
}
fn default_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

/// The rule that approves a job without a human (`auto_approval`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutoApproval {
    /// Auto-approve when `metadata.confidence` (0-100) is at least this.
    pub min_confidence: f64,
    /// At most this many auto-approvals per workflow per UTC day.
    pub daily_limit: u32,
}

/// How partial results count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SuccessPolicy {
    /// Every step must succeed.
    #[default]
    All,
    /// One success is enough.
    Any,
    /// At least N steps must succeed.
    AtLeast(u32),
}

impl SuccessPolicy {
    /// How many of `steps` steps must succeed.
    pub fn needed(self, steps: usize) -> usize {
        match self {
            SuccessPolicy::All => steps,
            SuccessPolicy::Any => 1.min(steps),
            SuccessPolicy::AtLeast(n) => n as usize,
        }
    }

    /// The policy in words, for a failed job's error message.
    pub fn describe(self) -> String {
        match self {
            SuccessPolicy::All => "all steps must succeed".into(),
            SuccessPolicy::Any => "at least one step must succeed".into(),
            SuccessPolicy::AtLeast(n) => format!("at least {n} steps must succeed"),
        }
    }
}

/// Why the registry cannot be used; each names the file and, where it
/// applies, the key and field to fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file cannot be read; fix the path (`--registry`) or its permissions.
    #[error("cannot read workflow registry {path}: {source} (pass another file with --registry or FLOWLEDGER_REGISTRY)")]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Not valid JSON, an unknown field, or a field of the wrong type.
    #[error("workflow registry {path} is not valid: {path_in_file}: {message}")]
    Invalid {
        /// The file that was read.
        path: PathBuf,
        /// Where in the file, e.g. `workflows.w.steps[0].kind`.
        path_in_file: String,
        /// The JSON parser's complaint.
        message: String,
    },
    /// The file's `version` is not 1, the only one this build reads.
    #[error(
        "workflow registry {path}: unsupported version {version} (this build reads version 1)"
    )]
    Version {
        /// The file that was read.
        path: PathBuf,
        /// The version the file declares.
        version: u32,
    },
    /// A workflow key is not 1-128 characters of `a-z 0-9 . _ -`; rename it.
    #[error("workflow registry {path}: workflow key {key:?} is not valid: keys are 1-128 characters of a-z, 0-9, '.', '_' and '-'")]
    BadKey {
        /// The file that was read.
        path: PathBuf,
        /// The key as written.
        key: String,
    },
    /// A workflow's field breaks a rule (bounds, unique step names, URL).
    #[error("workflow registry {path}: workflows.{key}.{field}: {message}")]
    BadField {
        /// The file that was read.
        path: PathBuf,
        /// The workflow key.
        key: String,
        /// The field inside the workflow, e.g. `steps[0].timeout_ms`.
        field: String,
        /// What the value must be.
        message: String,
    },
}

impl Registry {
    /// Reads and checks the file at `path` (see [`Registry::parse`]), and
    /// that every step's `template` is a file next to it.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        let registry = Self::parse(path, &text)?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for (key, wf) in &registry.workflows {
            for (i, s) in wf.steps.iter().enumerate() {
                let Some(template) = &s.template else {
                    continue;
                };
                let file = dir.join(template);
                if !file.is_file() {
                    return Err(RegistryError::BadField {
                        path: path.to_owned(),
                        key: key.clone(),
                        field: format!("steps[{i}].template"),
                        message: format!(
                            "{} is not a file (the path is relative to the registry's directory)",
                            file.display()
                        ),
                    });
                }
            }
        }
        Ok(registry)
    }

    /// Every step's `template` as (workflow key, step, the file's path
    /// relative to the registry file's directory).
    pub fn templates(&self) -> Vec<(&str, &StepDefinition, &str)> {
        let mut out = Vec::new();
        for (key, wf) in &self.workflows {
            for s in &wf.steps {
                if let Some(t) = &s.template {
                    out.push((key.as_str(), s, t.as_str()));
                }
            }
        }
        out
    }

    /// Parses JSON `text` and checks every workflow whole; `path` only
    /// names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, RegistryError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let registry: Registry =
            serde_path_to_error::deserialize(de).map_err(|e| RegistryError::Invalid {
                path: path.to_owned(),
                path_in_file: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        if registry.version != 1 {
            return Err(RegistryError::Version {
                path: path.to_owned(),
                version: registry.version,
            });
        }
        for (key, wf) in &registry.workflows {
            if !valid_key(key) {
                return Err(RegistryError::BadKey {
                    path: path.to_owned(),
                    key: key.clone(),
                });
            }
            wf.check()
                .map_err(|(field, message)| RegistryError::BadField {
                    path: path.to_owned(),
                    key: key.clone(),
                    field,
                    message,
                })?;
        }
        Ok(registry)
    }

    /// A registry holding the given keys, each with one solver step that
    /// nothing listens on (for tests and tools that never run jobs).
    pub fn with_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Registry {
            version: 1,
            workflows: keys
                .into_iter()
                .map(|k| {
                    (
                        k.to_string(),
                        WorkflowDefinition {
                            description: String::new(),
                            steps: vec![StepDefinition {
                                name: "main".into(),
                                kind: StepKind::Solver,
                                url: "http://127.0.0.1:9/solve".into(),
                                timeout_ms: DEFAULT_STEP_TIMEOUT_MS,
                                max_attempts: DEFAULT_MAX_ATTEMPTS,
                                backoff_ms: None,
                                headers: BTreeMap::new(),
                                template: None,
                            }],
                            requires_approval: false,
                            approval_timeout_seconds: DEFAULT_APPROVAL_TIMEOUT_SECONDS,
                            auto_approval: None,
                            success: SuccessPolicy::All,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Whether `key` is a workflow of this registry.
    pub fn contains(&self, key: &str) -> bool {
        self.workflows.contains_key(key)
    }

    /// The definition of workflow `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<&WorkflowDefinition> {
        self.workflows.get(key)
    }

    /// Every workflow key, sorted.
    pub fn keys(&self) -> Vec<&str> {
        self.workflows.keys().map(String::as_str).collect()
    }
}

/// The registry a running service decides and runs jobs with, replaced
/// whole by a reload (SIGHUP, docs/OPERATIONS.md "Reload"): each reader
/// takes [`SharedRegistry::current`] once and sees the old registry or the
/// new one, never a mix. A job's driver keeps the definition it started
/// with until it next re-reads the job.
#[derive(Clone)]
pub struct SharedRegistry(std::sync::Arc<arc_swap::ArcSwap<Registry>>);

impl SharedRegistry {
    /// The registry now in use.
    pub fn current(&self) -> std::sync::Arc<Registry> {
        self.0.load_full()
    }

    /// Puts `new` in use and says what changed against the one before.
    pub fn replace(&self, new: Registry) -> RegistryChanges {
        let new = std::sync::Arc::new(new);
        let old = self.0.swap(new.clone());
        RegistryChanges::between(&old, &new)
    }
}

impl std::fmt::Debug for SharedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedRegistry")
            .field(&self.current())
            .finish()
    }
}

impl From<std::sync::Arc<Registry>> for SharedRegistry {
    fn from(registry: std::sync::Arc<Registry>) -> Self {
        SharedRegistry(std::sync::Arc::new(arc_swap::ArcSwap::new(registry)))
    }
}

impl From<Registry> for SharedRegistry {
    fn from(registry: Registry) -> Self {
        std::sync::Arc::new(registry).into()
    }
}

/// The workflow keys a reload added, removed and changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryChanges {
    /// Keys only the new registry has.
    pub added: Vec<String>,
    /// Keys only the old registry had: their jobs that have not started
    /// running fail `unknown_workflow`.
    pub removed: Vec<String>,
    /// Keys whose definition differs.
    pub changed: Vec<String>,
}

impl RegistryChanges {
    /// What differs from `old` to `new`, each list sorted.
    pub fn between(old: &Registry, new: &Registry) -> Self {
        let mut changes = RegistryChanges::default();
        for (key, def) in &new.workflows {
            match old.workflows.get(key) {
                None => changes.added.push(key.clone()),
                Some(was) if !same_definition(was, def) => changes.changed.push(key.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .workflows
            .keys()
            .filter(|k| !new.workflows.contains_key(*k))
            .cloned()
            .collect();
        changes
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Two definitions are the same when they serialize alike (the file's
/// fields, in their canonical order).
fn same_definition(a: &WorkflowDefinition, b: &WorkflowDefinition) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        // not serializable (cannot happen for parsed data): call it changed
        _ => false,
    }
}

impl WorkflowDefinition {
    /// The first problem found, as (field path, message).
    fn check(&self) -> Result<(), (String, String)> {
        if self.steps.is_empty() {
            return Err(("steps".into(), "a workflow needs at least one step".into()));
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = |f: &str| format!("steps[{i}].{f}");
            if !valid_key(&s.name) || s.name.contains('.') {
                return Err((
                    at("name"),
                    format!(
                        "{:?} is not valid: 1-128 characters of a-z, 0-9, '_' and '-'",
                        s.name
                    ),
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err((at("name"), format!("{:?} is used by two steps", s.name)));
            }
            check_url(&s.url).map_err(|m| (at("url"), m))?;
            if s.timeout_ms == 0 || s.timeout_ms > MAX_STEP_TIMEOUT_MS {
                return Err((
                    at("timeout_ms"),
                    format!("must be 1 to {MAX_STEP_TIMEOUT_MS}, got {}", s.timeout_ms),
                ));
            }
            if s.max_attempts == 0 || s.max_attempts > MAX_ATTEMPTS {
                return Err((
                    at("max_attempts"),
                    format!("must be 1 to {MAX_ATTEMPTS}, got {}", s.max_attempts),
                ));
            }
            if let Some(b) = s.backoff_ms.filter(|b| *b > MAX_RETRY_DELAY_MS) {
                return Err((
                    at("backoff_ms"),
                    format!("must be at most {MAX_RETRY_DELAY_MS}, got {b}"),
                ));
            }
            if let Some(t) = &s.template {
                check_template(s, t).map_err(|m| (at("template"), m))?;
            }
            s.headers().map_err(|(header, message)| {
                if header.is_empty() {
                    (at("headers"), format!("step {:?}: {message}", s.name))
                } else {
                    (
                        at(&format!("headers.{header:?}")),
                        format!("step {:?}: header {header:?} {message}", s.name),
                    )
                }
            })?;
        }
        if let SuccessPolicy::AtLeast(n) = self.success {
            if n == 0 || n as usize > self.steps.len() {
                return Err((
                    "success.at_least".into(),
                    format!(
                        "must be 1 to the number of steps ({}), got {n}",
                        self.steps.len()
                    ),
                ));
            }
        }
        if let Some(a) = &self.auto_approval {
            if !self.requires_approval {
                return Err((
                    "auto_approval".into(),
                    "set only on a workflow with requires_approval: true".into(),
                ));
            }
            if !(0.0..=100.0).contains(&a.min_confidence) {
                return Err((
                    "auto_approval.min_confidence".into(),
                    format!("must be 0 to 100, got {}", a.min_confidence),
                ));
            }
        }
        if self.approval_timeout_seconds == 0
            || self.approval_timeout_seconds > MAX_APPROVAL_WINDOW_SECONDS as u64
        {
            return Err((
                "approval_timeout_seconds".into(),
                format!(
                    "must be 1 to {MAX_APPROVAL_WINDOW_SECONDS}, got {}",
                    self.approval_timeout_seconds
                ),
            ));
        }
        Ok(())
    }
}

/// A step's `template`: on an n8n step, a relative `.json` path that
/// stays inside the registry's directory.
fn check_template(step: &StepDefinition, template: &str) -> Result<(), String> {
    if step.kind != StepKind::N8n {
        return Err(format!(
            "step {:?} is not an n8n step: only an n8n step names an n8n workflow template",
            step.name
        ));
    }
    let p = Path::new(template);
    let inside = p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if template.is_empty() || !inside || !template.ends_with(".json") {
        return Err(format!(
            "{template:?} is not a relative path to a .json file inside the registry's \
             directory (e.g. \"n8n/payment-release.json\"; no '..', no leading '/')"
        ));
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            format!(
                "{:?} is not an http:// or https:// URL",
                redact::display(url)
            )
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.contains('@') {
        return Err(format!(
            "{:?} carries credentials; put secrets in the configuration, not the registry",
            redact::display(url)
        ));
    }
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{:?} has no host", redact::display(url)));
    }
    Ok(())
}

/// Whether `key` is a valid workflow key: 1-128 bytes of `a-z 0-9 . _ -`
/// (step names use the same rule without `.`).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_registry_is_seen_whole_and_its_changes_are_named() {
        let parse =
            |text: &str| Registry::parse(Path::new("r.json"), text).expect("a valid registry");
        let step =
            |url: &str| format!(r#"{{"steps":[{{"name":"s","kind":"solver","url":"{url}"}}]}}"#);
        let old = parse(&format!(
            r#"{{"version":1,"workflows":{{"a":{},"b":{},"c":{}}}}}"#,
            step("http://h/a"),
            step("http://h/b"),
            step("http://h/c")
        ));
        let new = parse(&format!(
            r#"{{"version":1,"workflows":{{"a":{},"b":{},"d":{}}}}}"#,
            step("http://h/a"),
            step("http://h/b2"),
            step("http://h/d")
        ));
        let shared = SharedRegistry::from(old);
        let before = shared.current();
        let changes = shared.replace(new);
        assert_eq!(changes.added, ["d"]);
        assert_eq!(changes.removed, ["c"]);
        assert_eq!(changes.changed, ["b"]);
        assert!(!changes.is_empty());
        assert_eq!(shared.current().keys(), ["a", "b", "d"]);
        assert_eq!(
            before.keys(),
            ["a", "b", "c"],
            "a reader keeps what it took"
        );
        let same = (*shared.current()).clone();
        assert!(
            shared.replace(same).is_empty(),
            "the same registry changes nothing"
        );
    }

    #[test]
    fn a_step_url_with_credentials_is_refused_without_showing_them() {
        let text = r#"{"version":1,"workflows":{"w":{"steps":[{"name":"s","kind":"solver","url":"http://bob:pw-s3cret@h/x?key=k"}]}}}"#;
        let e = Registry::parse(Path::new("r.json"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("carries credentials"), "{e}");
        assert!(!e.contains("pw-s3cret") && !e.contains("key=k"), "{e}");
    }

    fn parse(text: &str) -> Result<Registry, String> {
        Registry::parse(Path::new("r.json"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn shipped_registry_parses() {
        let r = Registry::load(Path::new(DEFAULT_REGISTRY_PATH)).expect("shipped registry");
        assert!(r.contains("invoice.extract"));
        assert!(r
            .get("payment.release")
            .is_some_and(|w| w.requires_approval));
    }

    #[test]
    fn shipped_n8n_steps_name_their_templates() {
        let r = Registry::load(Path::new(DEFAULT_REGISTRY_PATH)).expect("shipped registry");
        let templates: Vec<_> = r.templates().iter().map(|(k, _, t)| (*k, *t)).collect();
        assert_eq!(
            templates,
            [
                ("payment.release", "n8n/payment-release.json"),
                ("report.daily", "n8n/report-daily.json")
            ]
        );
    }

    #[test]
    fn a_template_is_an_n8n_steps_file_next_to_the_registry() {
        let with = |kind: &str, template: &str| {
            format!(
                r#"{{"version":1,"workflows":{{"w":{{"steps":[{{"name":"s","kind":"{kind}","url":"http://h/x","template":"{template}"}}]}}}}}}"#
            )
        };
        let e = parse(&with("solver", "n8n/a.json")).unwrap_err();
        assert!(
            e.contains("steps[0].template") && e.contains("not an n8n step"),
            "{e}"
        );
        for bad in ["../a.json", "/etc/a.json", "n8n/a.txt", ""] {
            let e = parse(&with("n8n", bad)).unwrap_err();
            assert!(e.contains("steps[0].template"), "{bad}: {e}");
        }
        // parse checks the shape; load also finds the file
        assert!(parse(&with("n8n", "n8n/missing.json")).is_ok());
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("n8n")).expect("a directory for templates");
        let file = dir.join("registry.json");
        std::fs::write(&file, with("n8n", "n8n/missing.json")).expect("write the registry");
        let e = Registry::load(&file).unwrap_err().to_string();
        assert!(
            e.contains("steps[0].template") && e.contains("missing.json"),
            "{e}"
        );
        std::fs::write(dir.join("n8n/missing.json"), "{}").expect("write the template");
        assert!(Registry::load(&file).is_ok());
    }

    #[test]
    fn invalid_registry_names_the_field() {
        let err =
            parse(r#"{"version":1,"workflows":{"a":{"steps":[],"requires_approval":"yes"}}}"#)
                .unwrap_err();
        assert!(err.contains("workflows.a.requires_approval"), "{err}");
    }

    #[test]
    fn bad_key_is_refused() {
        let err = parse(r#"{"version":1,"workflows":{"A B":{"steps":[]}}}"#).unwrap_err();
        assert!(err.contains("\"A B\""), "{err}");
    }

    #[test]
    fn step_errors_name_key_and_field() {
        let step = |extra: &str| {
            format!(
                concat!(
                    r#"{{"version":1,"workflows":{{"w":{{"steps":[{{"name":"s","kind":"solver","#,
                    r#""url":"http://h/x"{extra}}}]}}}}}}"#
                ),
                extra = extra
            )
        };
        assert!(parse(&step("")).is_ok());
        let e = parse(&step(r#","timeout_ms":0"#)).unwrap_err();
        assert!(e.contains("workflows.w.steps[0].timeout_ms"), "{e}");
        let e = parse(&step(r#","max_attempts":0"#)).unwrap_err();
        assert!(e.contains("steps[0].max_attempts"), "{e}");
        let e = parse(&step(r#","kind":"ftp""#)).unwrap_err();
        assert!(e.contains("kind"), "{e}");
        let e = parse(concat!(
            r#"{"version":1,"workflows":{"w":{"steps":["#,
            r#"{"name":"s","kind":"solver","url":"ftp://h"}]}}}"#
        ))
        .unwrap_err();
        assert!(e.contains("steps[0].url") && e.contains("http://"), "{e}");
        let e = parse(r#"{"version":1,"workflows":{"w":{"steps":[]}}}"#).unwrap_err();
        assert!(e.contains("workflows.w.steps: a workflow needs"), "{e}");
        let two = r#"{"name":"s","kind":"solver","url":"http://h/x"}"#;
        let e = parse(&format!(
            r#"{{"version":1,"workflows":{{"w":{{"steps":[{two},{two}]}}}}}}"#
        ))
        .unwrap_err();
        assert!(
            e.contains("steps[1].name") && e.contains("two steps"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{{"version":1,"workflows":{{"w":{{"steps":[{two}],"success":{{"at_least":2}}}}}}}}"#
        ))
        .unwrap_err();
        assert!(e.contains("success.at_least"), "{e}");
        let e = parse(&format!(
            concat!(
                r#"{{"version":1,"workflows":{{"w":{{"steps":[{two}],"#,
                r#""auto_approval":{{"min_confidence":90,"daily_limit":5}}}}}}}}"#
            ),
            two = two
        ))
        .unwrap_err();
        assert!(
            e.contains("workflows.w.auto_approval") && e.contains("requires_approval"),
            "{e}"
        );
    }

    fn with_headers(headers: &str) -> Result<Registry, String> {
        parse(&format!(
            concat!(
                r#"{{"version":1,"workflows":{{"w":{{"steps":[{{"name":"ocr","kind":"solver","#,
                r#""url":"http://h/x","headers":{headers}}}]}}}}}}"#
            ),
            headers = headers
        ))
    }

    #[test]
    fn step_headers_parse_into_text_and_secrets() {
        let r = with_headers(
            r#"{"Authorization":"Bearer {secret/data/external_apis/ocr#api_key}","X-T":"{{{kv/data/a/b#k}}}"}"#,
        )
        .expect("valid headers");
        let step = &r.workflows["w"].steps[0];
        let hs = step.headers().expect("checked");
        assert_eq!(hs[0].name.as_str(), "authorization");
        assert_eq!(
            hs[0].template.parts,
            vec![
                TemplatePart::Text("Bearer ".into()),
                TemplatePart::Secret(SecretRef {
                    path: "secret/data/external_apis/ocr".into(),
                    field: "api_key".into(),
                }),
            ]
        );
        assert_eq!(
            hs[1].template.parts,
            vec![
                TemplatePart::Text("{".into()),
                TemplatePart::Secret(SecretRef {
                    path: "kv/data/a/b".into(),
                    field: "k".into(),
                }),
                TemplatePart::Text("}".into()),
            ]
        );
        let steps = r.secret_steps();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].2.len(), 2);
        // the registry serializes back with its headers
        let back = serde_json::to_value(&r).expect("serializes");
        assert!(back["workflows"]["w"]["steps"][0]["headers"]["Authorization"].is_string());
    }

    #[test]
    fn bad_step_headers_are_refused_naming_workflow_step_and_header() {
        for (headers, expect) in [
            (
                r#"{"Bad Name":"{secret/data/a#k}"}"#,
                "not a valid HTTP header name",
            ),
            (
                r#"{"Idempotency-Key":"{secret/data/a#k}"}"#,
                "set by flowledger",
            ),
            (
                r#"{"content-type":"{secret/data/a#k}"}"#,
                "set by flowledger",
            ),
            (r#"{"Host":"{secret/data/a#k}"}"#, "set by flowledger"),
            (
                r#"{"X-Flowledger-Signature":"{secret/data/a#k}"}"#,
                "set by flowledger",
            ),
            (r#"{"X-A":"Bearer {secret/data/a}"}"#, "names no field"),
            (r#"{"X-A":"{secret/a#k}"}"#, "KV v2 path"),
            (r#"{"X-A":"{secret/data/a#k k}"}"#, "field"),
            (r#"{"X-A":"{secret/data/a#}"}"#, "field"),
            (r#"{"X-A":"{secret/data/a#k"}"#, "never closed"),
            (r#"{"X-A":"x} {secret/data/a#k}"}"#, "closes no placeholder"),
            (r#"{"X-A":"a\r\nX-B: {secret/data/a#k}"}"#, "CR or LF"),
            (r#"{"X-A":"é {secret/data/a#k}"}"#, "printable ASCII"),
            (
                r#"{"Authorization":"Bearer sk-live-literal"}"#,
                "no {<path>#<field>} placeholder",
            ),
            (
                r#"{"X-A":"{secret/data/a#k}","x-a":"{secret/data/a#k}"}"#,
                "named twice",
            ),
        ] {
            let e = with_headers(headers).unwrap_err();
            assert!(
                e.contains("workflows.w.steps[0].headers") && e.contains("step \"ocr\""),
                "{headers}: {e}"
            );
            assert!(e.contains(expect), "{headers}: {e}");
        }
        // the literal secret written by mistake is not echoed
        let e = with_headers(r#"{"Authorization":"Bearer sk-live-literal"}"#).unwrap_err();
        assert!(!e.contains("sk-live-literal"), "{e}");
        let many: Vec<String> = (0..=MAX_STEP_HEADERS)
            .map(|i| format!(r#""X-{i}":"{{secret/data/a#k}}""#))
            .collect();
        let e = with_headers(&format!("{{{}}}", many.join(","))).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn policies_count() {
        assert_eq!(SuccessPolicy::All.needed(3), 3);
        assert_eq!(SuccessPolicy::Any.needed(3), 1);
        assert_eq!(SuccessPolicy::AtLeast(2).needed(3), 2);
    }
}
