//! The commands that talk to a running `serve` over its HTTP API (jobs,
//! approvals, the kill-switch), with one HTTP client helper ([`Api`]).
//!
//! The bearer token comes from `--token-file PATH` or `FLOWLEDGER_TOKEN`
//! (or the file `FLOWLEDGER_TOKEN_FILE` names), never from a flag's value
//! (it would show in `ps`), and is never printed. An error answer is
//! printed once as `error: <code>: <message>`; exit codes: 1 refused by
//! the server (4xx) or failing (5xx), 2 unauthenticated (401: the token is
//! the user's to fix), 6 the API unreachable ([`Down::Api`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::output::{self, Format, OutputArgs};
use super::{Down, UsageError};
use crate::config::Environment;

/// Where the API is and the token to call it with.
#[derive(Args, Debug, Clone)]
pub(crate) struct ApiArgs {
    /// Base URL of a running `flowledger serve`'s HTTP API.
    #[arg(
        long,
        global = true,
        env = "FLOWLEDGER_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub(crate) api_url: String,
    /// File holding the bearer token (trailing newline trimmed); without
    /// it, FLOWLEDGER_TOKEN (or the file FLOWLEDGER_TOKEN_FILE names).
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
}

/// `flowledger jobs ...`.
#[derive(Args, Debug)]
pub(crate) struct Jobs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: JobsCommand,
}

use crate::api::read::JOB_STATUSES;

/// `flowledger jobs` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum JobsCommand {
    /// List jobs, newest first (GET /v1/executions).
    List {
        /// Only jobs in this status.
        #[arg(long, value_parser = JOB_STATUSES)]
        status: Option<String>,
        /// Only jobs of this workflow key, e.g. invoice.extract.
        #[arg(long)]
        workflow: Option<String>,
        /// At most this many jobs (1 to 1000; the server's default is 100).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: Option<u16>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Show one job's execution row (GET /v1/jobs/{id}).
    Show {
        /// The job id.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Follow a job until it ends, printing each status change; exits 0
    /// when it completed, 1 when it failed or was cancelled.
    Watch {
        /// The job id.
        id: String,
        /// How often to ask for the job's status, in milliseconds.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval_ms: u64,
        /// How long a job the read model does not show yet (404) is waited
        /// for, in seconds (a job just submitted), before the 404 is the
        /// answer.
        #[arg(long, default_value_t = 10)]
        not_found_wait_secs: u64,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Cancel a job (POST /v1/jobs/{id}/cancel); its calls in flight are
    /// aborted.
    Cancel {
        /// The job id.
        id: String,
        /// Why it is cancelled (recorded on the event).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Retry a failed or cancelled job (POST /v1/jobs/{id}/retry): a new
    /// job with the same workflow, inputs, priority, timeout and callback,
    /// linked to it; prints the new job. A repeat prints the same new job;
    /// to retry a retry that failed, retry the new job.
    Retry {
        /// The failed or cancelled job's id.
        id: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `flowledger approvals ...`.
#[derive(Args, Debug)]
pub(crate) struct Approvals {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: ApprovalsCommand,
}

/// `flowledger approvals` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum ApprovalsCommand {
    /// List approvals, newest first (GET /v1/approvals).
    List {
        /// Only approvals in this status.
        #[arg(long, value_parser = ["pending", "approved", "rejected", "expired"])]
        status: Option<String>,
        /// At most this many approvals (1 to 1000; the server's default is 100).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: Option<u16>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Approve a pending approval (its id is the job's); the job runs.
    Approve {
        /// The approval id (the job id).
        id: String,
        /// Why (recorded on the event).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Reject a pending approval; the job fails with approval_rejected.
    Reject {
        /// The approval id (the job id).
        id: String,
        /// Why (recorded on the event).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `flowledger workflows ...` (the kill-switch; needs the operator role).
#[derive(Args, Debug)]
pub(crate) struct Workflows {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) command: WorkflowsCommand,
}

/// `flowledger workflows` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum WorkflowsCommand {
    /// Refuse new jobs of a workflow; running ones continue.
    Disable {
        /// The workflow key, e.g. invoice.extract.
        key: String,
        /// Why (recorded on the event).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Take new jobs of a disabled workflow again.
    Enable {
        /// The workflow key.
        key: String,
        /// Why (recorded on the event; the server requires one).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// What a call to the API ended with, when not with an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiCallError {
    /// Nothing answered at the URL (refused, timed out, TLS failed).
    #[error(
        "cannot reach the flowledger API at {url}: {reason} (is `flowledger serve` running \
         with its HTTP API? set --api-url or FLOWLEDGER_API_URL)"
    )]
    Unreachable {
        /// The base URL, credentials hidden.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with its error envelope.
    #[error("error: {code}: {message}{}", .param.as_ref().map(|p| format!(" (param: {p})")).unwrap_or_default())]
    Refused {
        /// The HTTP status.
        status: u16,
        /// `error.code`.
        code: String,
        /// `error.message`.
        message: String,
        /// `error.param`, if any.
        param: Option<String>,
    },
    /// An answer that is not the API's (no envelope, not JSON).
    #[error(
        "HTTP {status} from {url} is not an answer of the flowledger API ({what}): \
         does --api-url name a `flowledger serve`?"
    )]
    Foreign {
        /// The HTTP status.
        status: u16,
        /// The URL called, credentials hidden.
        url: String,
        /// What is wrong with the answer.
        what: &'static str,
    },
}

impl ApiCallError {
    /// The error with the marker of its exit code: unreachable 6, 401 2,
    /// anything else 1.
    fn marked(self) -> anyhow::Error {
        match &self {
            ApiCallError::Unreachable { .. } => anyhow::Error::new(self).context(Down::Api),
            ApiCallError::Refused { status: 401, .. } => {
                anyhow::Error::new(self).context(UsageError)
            }
            _ => anyhow::Error::new(self),
        }
    }
}

/// The token from `--token-file` or `FLOWLEDGER_TOKEN[_FILE]`; errors name
/// the flag, variable or file, never the token.
fn token(args: &ApiArgs, env: &Environment) -> anyhow::Result<SecretString> {
    let usage = |m: String| anyhow::anyhow!(m).context(UsageError);
    let from_env = env
        .secret("FLOWLEDGER_TOKEN")
        .map_err(|e| anyhow::Error::new(e).context(UsageError))?;
    let (text, source) = match (&args.token_file, from_env) {
        (Some(_), Some(_)) => {
            return Err(usage(
                "--token-file and FLOWLEDGER_TOKEN (or FLOWLEDGER_TOKEN_FILE) are both given: \
                 give the token one way"
                    .into(),
            ))
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                usage(format!(
                    "--token-file {}: cannot read it: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
            let text = text.trim_end_matches(['\n', '\r']).to_string();
            (text, format!("--token-file {}", path.display()))
        }
        (None, Some(t)) => (t, "FLOWLEDGER_TOKEN".to_string()),
        (None, None) => {
            return Err(usage(
                "a bearer token is needed: pass --token-file PATH or set FLOWLEDGER_TOKEN \
                 (or FLOWLEDGER_TOKEN_FILE)"
                    .into(),
            ))
        }
    };
    if text.is_empty() {
        return Err(usage(format!("{source}: the token is empty")));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(usage(format!(
            "{source}: the token holds a space or a character a header cannot carry"
        )));
    }
    Ok(text.into())
}

/// The one HTTP client of these commands: the base URL, the token, a
/// reqwest client with timeouts.
pub(crate) struct Api {
    base: url::Url,
    shown: String,
    token: SecretString,
    http: reqwest::Client,
}

/// How long a connection may take to open, and a whole call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Api {
    /// The client for `args`; a bad URL or token is a usage error.
    pub(crate) fn new(args: &ApiArgs, env: &Environment) -> anyhow::Result<Api> {
        let shown = crate::commands::redact::display(&args.api_url).to_string();
        let base = url::Url::parse(&args.api_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--api-url {shown:?} is not an http(s) URL, e.g. http://127.0.0.1:8080"
                )
                .context(UsageError)
            })?;
        let token = token(args, env)?;
        let http = crate::handlers::http_client_builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .build()
            .context("cannot make the HTTP client")?;
        Ok(Api {
            base,
            shown,
            token,
            http,
        })
    }

    /// The URL of `segments` under the base (each segment percent-encoded:
    /// an id cannot name another route) with `query`.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> url::Url {
        let mut u = self.base.clone();
        if let Ok(mut path) = u.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            u.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        u
    }

    /// GETs `segments` with `query`.
    pub(crate) async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Value, ApiCallError> {
        let url = self.url(segments, query);
        self.call(self.http.get(url)).await
    }

    /// POSTs the JSON `body` to `segments`.
    pub(crate) async fn post(
        &self,
        segments: &[&str],
        body: &Value,
    ) -> Result<Value, ApiCallError> {
        let url = self.url(segments, &[]);
        self.call(
            self.http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string()),
        )
        .await
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value, ApiCallError> {
        let res = req
            .bearer_auth(self.token.expose_secret())
            .send()
            .await
            .map_err(|e| ApiCallError::Unreachable {
                url: self.shown.clone(),
                reason: reason(&e),
            })?;
        let status = res.status();
        let shown_url = crate::commands::redact::display(res.url().as_str()).to_string();
        let text = res.text().await.map_err(|e| ApiCallError::Unreachable {
            url: self.shown.clone(),
            reason: reason(&e),
        })?;
        let body: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return body.ok_or(ApiCallError::Foreign {
                status: status.as_u16(),
                url: shown_url,
                what: "the body is not JSON",
            });
        }
        let e = body.as_ref().and_then(|b| b.get("error"));
        match e.and_then(|e| Some((e.get("code")?.as_str()?, e.get("message")?.as_str()?))) {
            Some((code, message)) => Err(ApiCallError::Refused {
                status: status.as_u16(),
                code: code.to_string(),
                message: message.to_string(),
                param: e
                    .and_then(|e| e.get("param"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }),
            None => Err(ApiCallError::Foreign {
                status: status.as_u16(),
                url: shown_url,
                what: "no error envelope",
            }),
        }
    }
}

/// What failed in a call, without the URL (the message names it once).
fn reason(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "the call failed"
    };
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !causes.iter().any(|c: &String| c.contains(&text)) {
            causes.push(text);
        }
        source = s.source();
    }
    if causes.is_empty() {
        what.to_string()
    } else {
        format!("{what} ({})", causes.join(": "))
    }
}

/// The columns of `jobs list`.
const JOB_COLUMNS: &[&str] = &[
    "execution_id",
    "workflow_id",
    "status",
    "client_id",
    "priority",
    "created_at",
    "updated_at",
];

/// The columns of `approvals list`.
const APPROVAL_COLUMNS: &[&str] = &[
    "approval_id",
    "workflow_key",
    "status",
    "requested_by",
    "expires_at",
    "decided_by",
    "decision_reason",
];

fn query(pairs: [(&'static str, Option<String>); 3]) -> Vec<(&'static str, String)> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

fn reason_body(reason: Option<String>) -> Value {
    match reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    }
}

/// Runs `flowledger jobs ...`.
pub(crate) async fn jobs(j: Jobs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&j.api, &Environment::process())?;
    match j.command {
        JobsCommand::List {
            status,
            workflow,
            limit,
            out,
        } => {
            let q = query([
                ("status", status),
                ("workflow_id", workflow),
                ("limit", limit.map(|l| l.to_string())),
            ]);
            let page = api
                .get(&["v1", "executions"], &q)
                .await
                .map_err(ApiCallError::marked)?;
            output::list(out.format(), &page, JOB_COLUMNS);
        }
        JobsCommand::Show { id, out } => {
            let job = api
                .get(&["v1", "jobs", &id], &[])
                .await
                .map_err(ApiCallError::marked)?;
            output::object(out.format(), &job);
        }
        JobsCommand::Watch {
            id,
            interval_ms,
            not_found_wait_secs,
            out,
        } => {
            return watch(
                &api,
                &id,
                Duration::from_millis(interval_ms),
                Duration::from_secs(not_found_wait_secs),
                out.format(),
            )
            .await
        }
        JobsCommand::Cancel { id, reason, out } => {
            let answer = api
                .post(&["v1", "jobs", &id, "cancel"], &reason_body(reason))
                .await
                .map_err(ApiCallError::marked)?;
            output::object(out.format(), &answer);
        }
        JobsCommand::Retry { id, out } => {
            let answer = api
                .post(&["v1", "jobs", &id, "retry"], &json!({}))
                .await
                .map_err(ApiCallError::marked)?;
            output::object(out.format(), &answer);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the job's status until it ends: each change printed (table: one
/// line `job  status  updated_at  error`; jsonl: the status object a line;
/// json: only the last status, pretty).
async fn watch(
    api: &Api,
    id: &str,
    every: Duration,
    not_found_wait: Duration,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut last: Option<String> = None;
    loop {
        match api.get(&["v1", "jobs", id, "status"], &[]).await {
            Ok(v) => {
                let status = v["status"].as_str().unwrap_or("unknown").to_string();
                if last.as_deref() != Some(status.as_str()) {
                    match format {
                        Format::Table => {
                            let error = match (&v["error_code"], &v["error_message"]) {
                                (Value::Null, _) => String::new(),
                                (c, m) => format!("  {}: {}", output::cell(c), output::cell(m)),
                            };
                            super::write_out(format_args!(
                                "{}  {status}  {}{error}",
                                output::cell(&v["job_id"]),
                                output::cell(&v["updated_at"])
                            ));
                        }
                        Format::Jsonl => output::compact(&v),
                        Format::Json => {}
                    }
                    last = Some(status.clone());
                }
                let code = match status.as_str() {
                    "completed" => Some(ExitCode::SUCCESS),
                    "failed" | "cancelled" => Some(ExitCode::from(1)),
                    _ => None,
                };
                if let Some(code) = code {
                    if format == Format::Json {
                        output::pretty(&v);
                    }
                    return Ok(code);
                }
            }
            // the read model may not show a job just submitted yet
            Err(ApiCallError::Refused { status: 404, .. })
                if last.is_none() && started.elapsed() < not_found_wait => {}
            Err(e) => return Err(e.marked()),
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs `flowledger approvals ...`.
pub(crate) async fn approvals(a: Approvals) -> anyhow::Result<ExitCode> {
    let api = Api::new(&a.api, &Environment::process())?;
    let (answer, format, list) = match a.command {
        ApprovalsCommand::List { status, limit, out } => {
            let q = query([
                ("status", status),
                ("limit", limit.map(|l| l.to_string())),
                ("cursor", None),
            ]);
            (api.get(&["v1", "approvals"], &q).await, out.format(), true)
        }
        ApprovalsCommand::Approve { id, reason, out } => (
            api.post(
                &["v1", "approvals", &id, "approve"],
                &reason_body(Some(reason)),
            )
            .await,
            out.format(),
            false,
        ),
        ApprovalsCommand::Reject { id, reason, out } => (
            api.post(
                &["v1", "approvals", &id, "reject"],
                &reason_body(Some(reason)),
            )
            .await,
            out.format(),
            false,
        ),
    };
    let answer = answer.map_err(ApiCallError::marked)?;
    if list {
        output::list(format, &answer, APPROVAL_COLUMNS);
    } else {
        output::object(format, &answer);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `flowledger workflows ...`.
pub(crate) async fn workflows(w: Workflows) -> anyhow::Result<ExitCode> {
    let api = Api::new(&w.api, &Environment::process())?;
    let (key, verb, reason, out) = match w.command {
        WorkflowsCommand::Disable { key, reason, out } => (key, "disable", reason, out),
        WorkflowsCommand::Enable { key, reason, out } => (key, "enable", reason, out),
    };
    let answer = api
        .post(&["v1", "workflows", &key, verb], &reason_body(Some(reason)))
        .await
        .map_err(ApiCallError::marked)?;
    output::object(out.format(), &answer);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, file: Option<PathBuf>) -> ApiArgs {
        ApiArgs {
            api_url: url.into(),
            token_file: file,
        }
    }

    #[test]
    fn ids_are_path_segments_and_the_token_is_never_shown() {
        let env = Environment::from_vars([("FLOWLEDGER_TOKEN", "s3cret-token")]);
        let api = Api::new(&args("http://127.0.0.1:9/base/", None), &env).unwrap();
        let u = api.url(
            &["v1", "jobs", "../approvals?x", "status"],
            &[("status", "a&b".into())],
        );
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9/base/v1/jobs/..%2Fapprovals%3Fx/status?status=a%26b"
        );
        assert!(!format!("{:?}", api.token).contains("s3cret"));
    }

    #[test]
    fn the_token_comes_one_way_and_errors_never_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file-token\n").unwrap();
        let none = Environment::from_vars(Vec::<(String, String)>::new());
        let t = token(&args("http://x", Some(file.clone())), &none).unwrap();
        assert_eq!(t.expose_secret(), "from-file-token");
        let env = Environment::from_vars([("FLOWLEDGER_TOKEN", "env-token")]);
        let both = token(&args("http://x", Some(file)), &env).unwrap_err();
        assert!(both.downcast_ref::<UsageError>().is_some());
        assert!(
            !format!("{both:#}").contains("token\n") && !format!("{both:#}").contains("env-token")
        );
        let missing = token(&args("http://x", None), &none).unwrap_err();
        assert!(
            format!("{missing:#}").contains("--token-file"),
            "{missing:#}"
        );
        let spaced = Environment::from_vars([("FLOWLEDGER_TOKEN", "two words")]);
        let bad = token(&args("http://x", None), &spaced).unwrap_err();
        assert!(!format!("{bad:#}").contains("two words"), "{bad:#}");
        let bad_url = Api::new(&args("ftp://x", None), &env).err().unwrap();
        assert!(bad_url.downcast_ref::<UsageError>().is_some());
    }

    #[test]
    fn an_envelope_is_printed_once_with_its_param() {
        let e = ApiCallError::Refused {
            status: 400,
            code: "validation".into(),
            message: "query parameter `limit`: bad".into(),
            param: Some("limit".into()),
        };
        assert_eq!(
            e.to_string(),
            "error: validation: query parameter `limit`: bad (param: limit)"
        );
    }
}
