//! Calls to the peers a job runs on: solver services and n8n webhooks.
//! Each attempt is one POST with its own timeout and an `Idempotency-Key`
//! header; the answer is classified for the retry policy.

use std::time::Duration;

use serde_json::{json, Value};

use crate::bus::ids;
use crate::commands::registry::{StepDefinition, StepKind};
use crate::events::envelope::holds_nul;
use crate::events::log::valid_aggregate_id;

/// The header carrying `<job>:<step>:<attempt>` (a result callback:
/// `<job>:callback`), the same on every resend of one attempt.
pub const HDR_IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// The header an n8n step's synchronous answer may name its execution in
/// (the templates in workflows/n8n/ set it to `{{ $execution.id }}`).
pub const HDR_N8N_EXECUTION_ID: &str = "X-N8n-Execution-Id";
/// Longest peer text quoted in an error message.
const MAX_QUOTED: usize = 200;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    /// A 2xx answer with a JSON body (or none).
    Succeeded {
        /// The peer's JSON answer; null for an empty body.
        output: Value,
        /// An n8n step's execution, from its [`HDR_N8N_EXECUTION_ID`]
        /// header (ignored unless 1-128 of `A-Z a-z 0-9 _ -`).
        n8n_execution_id: Option<String>,
    },
    /// n8n answered 202: the result comes later on `POST /v1/callbacks/n8n`.
    Accepted,
    /// An error answer, an unusable body (not JSON, or holding a NUL), or
    /// no connection.
    Failed {
        /// The step result's `error_code` (`http_<status>`, `bad_response`,
        /// `connection_failed`, `transport_error`).
        code: String,
        /// What happened, naming the step, with the peer's text cut short.
        message: String,
        /// Whether another attempt may succeed (408, 425, 429, 5xx,
        /// transport errors).
        retryable: bool,
    },
    /// No answer within the step's `timeout_ms`.
    TimedOut,
}

/// What a step is sent.
#[derive(Debug, Clone)]
pub struct StepCall<'a> {
    /// The job the attempt is for.
    pub job_id: &'a str,
    /// The job's workflow key.
    pub workflow_key: &'a str,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// The job's input, sent as `inputs`.
    pub inputs: &'a Value,
    /// Where n8n posts an asynchronous result.
    pub callback_url: Option<&'a str>,
    /// The step's headers, filled from secrets for this attempt (sensitive
    /// values: they print as `Sensitive`).
    pub headers: reqwest::header::HeaderMap,
}

/// An error and its causes, `: `-separated (the causes say why a
/// connection failed; none of them names the URL).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A peer's text as quoted in an error message: cut short, NUL (which no
/// read model stores) replaced.
fn quote(text: &str) -> String {
    let t: String = text
        .chars()
        .take(MAX_QUOTED)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}

impl CallOutcome {
    /// The outcome's name in a trace: `succeeded`, `accepted`, `failed`,
    /// `timed_out`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CallOutcome::Succeeded { .. } => "succeeded",
            CallOutcome::Accepted => "accepted",
            CallOutcome::Failed { .. } => "failed",
            CallOutcome::TimedOut => "timed_out",
        }
    }
}

/// Sends one attempt of `step` (with a `traceparent` header when traces
/// are on).
pub async fn call(
    client: &reqwest::Client,
    step: &StepDefinition,
    c: &StepCall<'_>,
) -> CallOutcome {
    let key = ids::idempotency_key(c.job_id, &step.name, c.attempt);
    let mut body = json!({
        "job_id": c.job_id,
        "workflow_key": c.workflow_key,
        "step": step.name,
        "attempt": c.attempt,
        "inputs": c.inputs,
    });
    if let (StepKind::N8n, Some(url)) = (step.kind, c.callback_url) {
        body["callback_url"] = json!(url);
    }
    let mut request = client
        .post(&step.url)
        .headers(c.headers.clone())
        .header(HDR_IDEMPOTENCY_KEY, &key);
    // traces on: the attempt's span, so the peer's spans join the job's trace
    if let Some(t) = crate::telemetry::current_traceparent() {
        request = request.header(crate::telemetry::TRACEPARENT, t);
    }
    let send = async {
        let r = request.json(&body).send().await?;
        let status = r.status();
        let execution = r
            .headers()
            .get(HDR_N8N_EXECUTION_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| valid_aggregate_id(id))
            .map(str::to_string);
        let text = r.text().await?;
        Ok::<_, reqwest::Error>((status, execution, text))
    };
    match tokio::time::timeout(Duration::from_millis(step.timeout_ms), send).await {
        Err(_) => CallOutcome::TimedOut,
        Ok(Err(e)) => CallOutcome::Failed {
            code: if e.is_connect() {
                "connection_failed"
            } else {
                "transport_error"
            }
            .into(),
            // without the URL: its query may carry the peer's key
            message: format!("{}: {}", step.name, causes(&e.without_url())),
            retryable: true,
        },
        Ok(Ok((status, execution, text))) => match classify(step, status.as_u16(), &text) {
            CallOutcome::Succeeded { output, .. } if step.kind == StepKind::N8n => {
                CallOutcome::Succeeded {
                    output,
                    n8n_execution_id: execution,
                }
            }
            outcome => outcome,
        },
    }
}

/// What n8n answers on every webhook while it starts (plain text, 200).
const N8N_STARTING: &str = "n8n is starting up";

fn classify(step: &StepDefinition, status: u16, text: &str) -> CallOutcome {
    let n8n = step.kind == StepKind::N8n;
    match status {
        202 if n8n => CallOutcome::Accepted,
        // n8n restarting: it answers 200 with this text, then 404 until the
        // workflow's webhook is registered again; both are retried
        200..=299 if n8n && text.to_ascii_lowercase().contains(N8N_STARTING) => {
            CallOutcome::Failed {
                code: "peer_starting".into(),
                message: format!("{} is starting up: {}", step.name, quote(text)),
                retryable: true,
            }
        }
        404 if n8n => CallOutcome::Failed {
            code: "http_404".into(),
            message: format!(
                "{} answered 404 (retried: an n8n webhook is unregistered while n8n starts): {}",
                step.name,
                quote(text)
            ),
            retryable: true,
        },
        200..=299 => {
            if text.trim().is_empty() {
                return CallOutcome::Succeeded {
                    output: Value::Null,
                    n8n_execution_id: None,
                };
            }
            match serde_json::from_str::<Value>(text) {
                // no read model stores a NUL: refuse it here, naming the peer
                Ok(_) if holds_nul(text.as_bytes()) => CallOutcome::Failed {
                    code: "bad_response".into(),
                    message: format!(
                        "{} answered {status} with JSON holding a NUL character (\\u0000)",
                        step.name
                    ),
                    retryable: false,
                },
                Ok(output) => CallOutcome::Succeeded {
                    output,
                    n8n_execution_id: None,
                },
                Err(e) => CallOutcome::Failed {
                    code: "bad_response".into(),
                    message: format!(
                        "{} answered {status} with a body that is not JSON ({e}): {}",
                        step.name,
                        quote(text)
                    ),
                    retryable: false,
                },
            }
        }
        408 | 425 | 429 | 500..=599 => CallOutcome::Failed {
            code: format!("http_{status}"),
            message: format!("{} answered {status}: {}", step.name, quote(text)),
            retryable: true,
        },
        _ => CallOutcome::Failed {
            code: format!("http_{status}"),
            message: format!(
                "{} answered {status} (not retried): {}",
                step.name,
                quote(text)
            ),
            retryable: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: StepKind) -> StepDefinition {
        StepDefinition {
            name: "s".into(),
            kind,
            url: "http://h/x".into(),
            timeout_ms: 10,
            max_attempts: 3,
            backoff_ms: None,
            headers: Default::default(),
            template: None,
        }
    }

    #[test]
    fn answers_are_classified_for_retry() {
        let solver = step(StepKind::Solver);
        assert_eq!(
            classify(&solver, 200, r#"{"a":1}"#),
            CallOutcome::Succeeded {
                output: json!({"a":1}),
                n8n_execution_id: None,
            }
        );
        assert!(matches!(
            classify(&solver, 503, ""),
            CallOutcome::Failed {
                retryable: true,
                ..
            }
        ));
        assert!(matches!(
            classify(&solver, 429, ""),
            CallOutcome::Failed {
                retryable: true,
                ..
            }
        ));
        assert!(matches!(
            classify(&solver, 400, ""),
            CallOutcome::Failed {
                retryable: false,
                ..
            }
        ));
        let html = classify(&solver, 200, "<html>");
        assert!(matches!(html, CallOutcome::Failed { ref code, .. } if code == "bad_response"));
        // a solver's 202 is a success with a body; only n8n defers
        assert!(matches!(
            classify(&solver, 202, "{}"),
            CallOutcome::Succeeded { .. }
        ));
        assert_eq!(
            classify(&step(StepKind::N8n), 202, ""),
            CallOutcome::Accepted
        );
    }

    #[test]
    fn an_n8n_start_up_is_retried_and_a_solver_404_is_not() {
        let n8n = step(StepKind::N8n);
        for (status, text) in [(200, "n8n is starting up. Please wait"), (404, "")] {
            assert!(
                matches!(
                    classify(&n8n, status, text),
                    CallOutcome::Failed {
                        retryable: true,
                        ..
                    }
                ),
                "{status} {text}"
            );
        }
        assert!(matches!(
            classify(&step(StepKind::Solver), 404, ""),
            CallOutcome::Failed {
                retryable: false,
                ..
            }
        ));
        assert!(matches!(
            classify(&step(StepKind::Solver), 200, "n8n is starting up. Please wait"),
            CallOutcome::Failed { ref code, retryable: false, .. } if code == "bad_response"
        ));
    }

    #[test]
    fn nul_in_a_peer_answer_is_a_bad_response() {
        let solver = step(StepKind::Solver);
        let r = classify(&solver, 200, r#"{"a":"x\u0000"}"#);
        assert!(
            matches!(r, CallOutcome::Failed { ref code, .. } if code == "bad_response"),
            "{r:?}"
        );
        let CallOutcome::Failed { message, .. } = classify(&solver, 500, "a\0b") else {
            panic!("500 is a failure");
        };
        assert!(!message.contains('\0'), "{message:?}");
        assert_eq!(
            classify(&solver, 200, r#"{"a":"\\u0000"}"#),
            CallOutcome::Succeeded {
                output: json!({"a": "\\u0000"}),
                n8n_execution_id: None,
            }
        );
    }

    #[test]
    fn long_peer_text_is_cut() {
        let long = "x".repeat(1000);
        let CallOutcome::Failed { message, .. } = classify(&step(StepKind::Solver), 500, &long)
        else {
            panic!("500 is a failure");
        };
        assert!(message.len() < 300, "{message}");
    }
}
