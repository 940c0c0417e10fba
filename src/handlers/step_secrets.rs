//! Secrets in step requests: a registry step's `headers` name secrets
//! (`Authorization: Bearer {secret/data/external_apis/ocr#api_key}`), and
//! each attempt reads them through the secret access service like any
//! other caller: actor [`super::HANDLER_ACTOR`], role `handler`, on behalf
//! of the job (`job_id`) for the step (`step`), one request (a fresh
//! request id) per secret per attempt. Each read is recorded
//! (`SecretAccessGranted`/`Denied`/`Failed`, naming the job and the step)
//! before its value is handed over; the value then goes only into the
//! attempt's outgoing request, as a sensitive header.

use std::collections::BTreeMap;

use reqwest::header::{HeaderMap, HeaderValue};
use zeroize::Zeroizing;

use crate::bus::CommandError;
use crate::commands::registry::{SecretRef, StepDefinition, TemplatePart};
use crate::commands::secret_access::events::AccessRequest;
use crate::commands::ErrorCode;
use crate::handlers::Ctx;
use crate::secrets::vault::SecretValue;

/// The role the handler reads secrets with (`[[secrets.rules]]` `roles`).
pub const HANDLER_ROLE: &str = "handler";

/// Why an attempt's headers could not be filled; the attempt then fails
/// without being sent. No variant carries a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepSecretError {
    /// flowledger's policy or Vault refused the read (`secret_denied`,
    /// not retried: allow it in `[[secrets.rules]]` or Vault's policy).
    #[error("{0}")]
    Denied(String),
    /// No such secret, field or version (`secret_not_found`, not retried).
    #[error("{0}")]
    NotFound(String),
    /// Vault could not be read and no value within the maximum staleness
    /// was at hand, the access event could not be stored, or no
    /// `[secrets]` is configured (`secret_unavailable`, retried).
    #[error("{0}")]
    Unavailable(String),
    /// The secret's field is not a string, or holds characters a header
    /// cannot carry; or the step's headers are malformed
    /// (`secret_invalid`, not retried).
    #[error("{0}")]
    Invalid(String),
}

impl StepSecretError {
    /// The attempt's `error_code`.
    pub fn code(&self) -> &'static str {
        match self {
            StepSecretError::Denied(_) => "secret_denied",
            StepSecretError::NotFound(_) => "secret_not_found",
            StepSecretError::Unavailable(_) => "secret_unavailable",
            StepSecretError::Invalid(_) => "secret_invalid",
        }
    }

    /// Whether another attempt may get the secret (only an outage).
    pub fn retryable(&self) -> bool {
        matches!(self, StepSecretError::Unavailable(_))
    }

    fn from_refused(e: &CommandError, step: &str, r: &SecretRef) -> Self {
        // the service's messages name paths, rules and statuses, never values
        let message = format!("{step}: secret {r}: {}", e.message);
        match e.code {
            ErrorCode::Forbidden => StepSecretError::Denied(message),
            ErrorCode::NotFound => StepSecretError::NotFound(message),
            ErrorCode::Validation => StepSecretError::Invalid(message),
            _ => StepSecretError::Unavailable(message),
        }
    }
}

/// Why the handler reads: the request's `purpose`.
fn purpose(header: &str, step: &str) -> String {
    format!("header {header} of step {step}")
}

/// The headers of one attempt of `step` for job `job_id`, their secrets
/// read now (each its own access request). A step without headers reads
/// nothing and gets an empty map.
pub async fn resolve(
    ctx: &Ctx,
    job_id: &str,
    step: &StepDefinition,
) -> Result<HeaderMap, StepSecretError> {
    let mut out = HeaderMap::new();
    if !step.uses_secrets() {
        return Ok(out);
    }
    let headers = step
        .headers()
        .map_err(|(h, m)| StepSecretError::Invalid(format!("{}: header {h:?} {m}", step.name)))?;
    let Some(service) = &ctx.secrets else {
        return Err(StepSecretError::Unavailable(format!(
            "{}: its headers read secrets, and no [secrets] is configured",
            step.name
        )));
    };
    // one read per distinct secret per attempt, in header order
    let mut values: BTreeMap<SecretRef, SecretValue> = BTreeMap::new();
    for h in &headers {
        for r in h.template.secrets() {
            if values.contains_key(r) {
                continue;
            }
            let request = AccessRequest {
                path: r.path.clone(),
                field: Some(r.field.clone()),
                version: None,
                purpose: purpose(h.name.as_str(), &step.name),
                job_id: Some(job_id.to_string()),
                step: Some(step.name.clone()),
            };
            // a new request id for every read: each attempt's reads are
            // their own requests (a derived id would answer "already
            // recorded" on the next attempt)
            let id = uuid::Uuid::now_v7().to_string();
            let served = service
                .read(&ctx.bus, request, HANDLER_ROLE, &ctx.meta(&id, job_id))
                .await
                .map_err(|e| StepSecretError::from_refused(&e, &step.name, r))?;
            values.insert(r.clone(), served.value);
        }
    }
    for h in &headers {
        let mut text = Zeroizing::new(String::new());
        for part in &h.template.parts {
            match part {
                TemplatePart::Text(t) => text.push_str(t),
                TemplatePart::Secret(r) => {
                    let s = values
                        .get(r)
                        .and_then(SecretValue::expose_str)
                        .ok_or_else(|| {
                            StepSecretError::Invalid(format!(
                                "{}: secret {r}: the field is not a string",
                                step.name
                            ))
                        })?;
                    if HeaderValue::from_str(s).is_err() {
                        return Err(StepSecretError::Invalid(format!(
                            "{}: secret {r}: the value holds characters a header cannot \
                             carry (control characters or non-ASCII)",
                            step.name
                        )));
                    }
                    text.push_str(s);
                }
            }
        }
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            StepSecretError::Invalid(format!(
                "{}: header {} cannot be sent as filled",
                step.name, h.name
            ))
        })?;
        value.set_sensitive(true);
        out.insert(h.name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_outage_is_retried() {
        let r = SecretRef {
            path: "secret/data/a".into(),
            field: "k".into(),
        };
        let refused = |code| CommandError {
            code,
            message: "why".into(),
            field: None,
        };
        let e = StepSecretError::from_refused(&refused(ErrorCode::Forbidden), "s", &r);
        assert_eq!((e.code(), e.retryable()), ("secret_denied", false));
        assert_eq!(e.to_string(), "s: secret secret/data/a#k: why");
        let e = StepSecretError::from_refused(&refused(ErrorCode::NotFound), "s", &r);
        assert_eq!((e.code(), e.retryable()), ("secret_not_found", false));
        let e = StepSecretError::from_refused(&refused(ErrorCode::Unavailable), "s", &r);
        assert_eq!((e.code(), e.retryable()), ("secret_unavailable", true));
        assert!(purpose("authorization", "ocr").len() < 256);
    }
}
