//! The `SecretAccess` aggregate (aggregate type `secret_access`, a public
//! contract): one request to read a secret, recorded once under the
//! request's id, whether granted, denied or failed. The decision itself is
//! made before the command (by [`policy`] and by Vault, in `crate::secrets`)
//! and arrives inside it; the aggregate checks the record is well formed
//! and written once. A value is handed out only after its
//! `SecretAccessGranted` is stored.

pub mod events;
pub mod policy;

use serde::{Deserialize, Serialize};

use crate::commands::limits::{
    MAX_SECRET_FIELD_LEN, MAX_SECRET_PATH_LEN, MAX_SECRET_PURPOSE_LEN, MAX_SECRET_VERSION,
};
use crate::commands::{DomainError, ErrorCode};
use events::{AccessRequest, SecretAccessEvent};

/// One secret access request, once recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretAccess {
    /// Its access event is stored.
    pub recorded: bool,
}

/// Record how a secret access request was decided (the event to write).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordAccess(pub SecretAccessEvent);

/// Why an access record was refused; nothing was written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecretAccessError {
    /// The request id already holds an access record (`conflict`): every
    /// read is its own request; send it under a new id.
    #[error("this secret access request id was used already; send the read under a new id")]
    AlreadyRecorded,
    /// A field of the request is malformed (`validation`).
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong and what it must be.
        message: String,
    },
}

impl DomainError for SecretAccessError {
    fn code(&self) -> ErrorCode {
        match self {
            SecretAccessError::AlreadyRecorded => ErrorCode::Conflict,
            SecretAccessError::Invalid { .. } => ErrorCode::Validation,
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            SecretAccessError::Invalid { field, .. } => Some(field),
            SecretAccessError::AlreadyRecorded => None,
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> SecretAccessError {
    SecretAccessError::Invalid {
        field,
        message: message.into(),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Checks a KV v2 path: `<mount>/data/<name>[/<name>...]`, each part 1-128
/// of `A-Z a-z 0-9 _ - .` (not `.` or `..`), at most 512 bytes. The
/// `data/` segment is required so a path names exactly one KV v2 secret
/// (`secret/data/ocr`, not `secret/ocr`).
pub fn check_path(path: &str) -> Result<(), SecretAccessError> {
    const FORM: &str =
        "must be a KV v2 path <mount>/data/<name>, e.g. secret/data/external_apis/ocr";
    if path.len() > MAX_SECRET_PATH_LEN {
        return Err(invalid(
            "path",
            format!("is longer than {MAX_SECRET_PATH_LEN} bytes"),
        ));
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() < 3 || parts[1] != "data" {
        return Err(invalid("path", FORM));
    }
    for part in &parts {
        if part.is_empty() || part.len() > 128 || *part == "." || *part == ".." {
            return Err(invalid(
                "path",
                format!("has an empty, '.' or '..' or over-long part; {FORM}"),
            ));
        }
        if let Some(c) = part.chars().find(|c| !is_name_char(*c)) {
            return Err(invalid(
                "path",
                format!("holds {c:?}; parts are A-Z a-z 0-9 _ - . separated by /"),
            ));
        }
    }
    Ok(())
}

/// Checks every field of a request (path, field, version, purpose, job).
pub fn check_request(r: &AccessRequest) -> Result<(), SecretAccessError> {
    check_path(&r.path)?;
    if let Some(f) = &r.field {
        if f.is_empty() || f.len() > MAX_SECRET_FIELD_LEN || !f.chars().all(is_name_char) {
            return Err(invalid(
                "field",
                format!("must be 1-{MAX_SECRET_FIELD_LEN} of A-Z a-z 0-9 _ - ."),
            ));
        }
    }
    if let Some(v) = r.version {
        if !(1..=MAX_SECRET_VERSION).contains(&v) {
            return Err(invalid(
                "version",
                format!("must be 1 to {MAX_SECRET_VERSION} (KV versions start at 1)"),
            ));
        }
    }
    if r.purpose.trim().is_empty()
        || r.purpose.chars().count() > MAX_SECRET_PURPOSE_LEN
        || r.purpose.chars().any(char::is_control)
    {
        return Err(invalid(
            "purpose",
            format!(
                "must say why the secret is read: 1-{MAX_SECRET_PURPOSE_LEN} characters, \
                 no control characters"
            ),
        ));
    }
    match (&r.job_id, &r.step) {
        (None, None) => {}
        (Some(j), Some(s)) if !j.is_empty() && !s.is_empty() => {}
        _ => {
            return Err(invalid(
                "job_id",
                "a read on behalf of a job names the job and the step",
            ))
        }
    }
    Ok(())
}

impl SecretAccess {
    /// Pure decision: a well-formed access record is written once per
    /// request id.
    pub fn decide(
        &self,
        command: RecordAccess,
    ) -> Result<Vec<SecretAccessEvent>, SecretAccessError> {
        if self.recorded {
            return Err(SecretAccessError::AlreadyRecorded);
        }
        let event = command.0;
        check_request(event.request())?;
        match &event {
            SecretAccessEvent::SecretAccessGranted(g) => {
                if g.rule.is_empty() {
                    return Err(invalid(
                        "rule",
                        "a granted read names the rule that allowed it",
                    ));
                }
                if !(1..=MAX_SECRET_VERSION).contains(&g.kv_version) {
                    return Err(invalid(
                        "kv_version",
                        "a granted read names the version served",
                    ));
                }
            }
            SecretAccessEvent::SecretAccessFailed(f) => {
                if !matches!(f.code.as_str(), "unavailable" | "not_found") {
                    return Err(invalid("code", "a failed read is unavailable or not_found"));
                }
            }
            SecretAccessEvent::SecretAccessDenied(_) => {}
        }
        Ok(vec![event])
    }
}

crate::commands::aggregate!(
    SecretAccess,
    "secret_access",
    RecordAccess,
    SecretAccessEvent,
    SecretAccessError
);

impl SecretAccess {
    /// Folds one stored event into the state (cqrs-es `apply`).
    fn fold(&mut self, _: SecretAccessEvent) {
        self.recorded = true;
    }
}

#[cfg(test)]
mod tests {
    use super::events::*;
    use super::*;

    fn request(path: &str) -> AccessRequest {
        AccessRequest {
            path: path.into(),
            field: Some("api_key".into()),
            version: None,
            purpose: "call the OCR service".into(),
            job_id: None,
            step: None,
        }
    }

    fn granted(path: &str) -> RecordAccess {
        RecordAccess(SecretAccessEvent::SecretAccessGranted(
            SecretAccessGranted {
                request: request(path),
                rule: "ocr".into(),
                kv_version: 3,
                source: ValueSource::Vault,
                read_from_vault_at: "2026-12-02T00:00:00.000000Z".into(),
                vault_error: None,
            },
        ))
    }

    #[test]
    fn an_access_is_recorded_once() {
        let mut a = SecretAccess::default();
        let events = a.decide(granted("secret/data/ocr")).unwrap();
        assert_eq!(events.len(), 1);
        a.fold(events[0].clone());
        assert_eq!(
            a.decide(granted("secret/data/ocr")),
            Err(SecretAccessError::AlreadyRecorded)
        );
    }

    #[test]
    fn paths_are_kv_v2_data_paths() {
        for ok in ["secret/data/ocr", "kv/data/a/b-c_d.e"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "secret/ocr",
            "secret/data",
            "secret/data/",
            "/secret/data/x",
            "secret/data/../sys",
            "secret/data/a b",
            "secret/data/a*",
            "secret/data/x\u{0}",
            "sys/data/x//y",
        ] {
            let e = check_path(bad).unwrap_err();
            assert_eq!(e.field(), Some("path"), "{bad}");
        }
        assert!(check_path(&format!("secret/data/{}", "a/".repeat(300))).is_err());
    }

    #[test]
    fn a_request_says_why_and_names_a_version_from_one() {
        let mut r = request("secret/data/ocr");
        r.purpose = "  ".into();
        assert_eq!(check_request(&r).unwrap_err().field(), Some("purpose"));
        let mut r = request("secret/data/ocr");
        r.version = Some(0);
        assert_eq!(check_request(&r).unwrap_err().field(), Some("version"));
        let mut r = request("secret/data/ocr");
        r.field = Some("a#b".into());
        assert_eq!(check_request(&r).unwrap_err().field(), Some("field"));
    }

    #[test]
    fn a_grant_names_its_rule_and_version() {
        let mut g = granted("secret/data/ocr");
        if let SecretAccessEvent::SecretAccessGranted(e) = &mut g.0 {
            e.rule.clear();
        }
        assert_eq!(
            SecretAccess::default().decide(g).unwrap_err().field(),
            Some("rule")
        );
    }

    #[test]
    fn no_access_event_has_a_place_for_a_value() {
        // the stored form of each event: only the request, the decision and
        // the source; a field called value or token would be a defect
        let g = serde_json::to_value(granted("secret/data/ocr").0).unwrap();
        let keys: Vec<&String> = g["data"].as_object().unwrap().keys().collect();
        for k in keys {
            assert!(
                !["value", "data", "token", "secret"].contains(&k.as_str()),
                "{k}"
            );
        }
    }
}
