//! JSON bodies of commands, shared by the NATS intake, the HTTP commands
//! and the n8n endpoint: parsed into typed commands with the offending field
//! named, and checked storable before anything is decided.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bus::CommandError;

/// Parses `bytes` as a JSON object that every read model can store (see
/// [`check_storable`]). `empty_is_object`: an empty body is `{}`.
pub(crate) fn parse_object(bytes: &[u8], empty_is_object: bool) -> Result<Value, CommandError> {
    if empty_is_object && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Default::default()));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        CommandError::validation(None, format!("request body is not valid JSON: {e}"))
    })?;
    if !value.is_object() {
        return Err(CommandError::validation(
            None,
            "request body must be a JSON object",
        ));
    }
    check_storable(&value)?;
    Ok(value)
}

/// Deserializes `value` into `T`, naming the offending field on error.
pub(crate) fn from_fields<T: DeserializeOwned>(value: Value) -> Result<T, CommandError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let field = if path == "." {
            // unknown / missing fields carry the name in the message
            field_in_message(&inner).map(str::to_string)
        } else {
            Some(path)
        };
        CommandError {
            code: crate::commands::ErrorCode::Validation,
            message: match &field {
                Some(f) => format!("field `{f}`: {inner}"),
                None => inner,
            },
            field,
        }
    })
}

/// The field serde names in an error at the top of a value: only "missing
/// field `f`" and "unknown field `f`, ..." name one (any other message may
/// quote a value in backticks, e.g. "invalid type: boolean `false`"); `f`
/// may itself hold backticks.
fn field_in_message(message: &str) -> Option<&str> {
    if let Some(rest) = message.strip_prefix("missing field `") {
        return rest.strip_suffix('`');
    }
    let rest = message.strip_prefix("unknown field `")?;
    rest.strip_suffix("`, there are no fields")
        .or_else(|| rest.rsplit_once("`, expected ").map(|(field, _)| field))
}

/// Refuses a body with a NUL character in any string or key: PostgreSQL
/// stores no NUL in `text` or `jsonb`, so such an event would stop every
/// read model that holds the field. The error names the field's path.
pub(crate) fn check_storable(value: &Value) -> Result<(), CommandError> {
    match find_nul(value) {
        None => Ok(()),
        Some(path) => {
            let field = if path.is_empty() { None } else { Some(path) };
            Err(CommandError {
                code: crate::commands::ErrorCode::Validation,
                message: format!(
                    "field `{}`: contains a NUL character (\\u0000), which cannot be stored",
                    field.as_deref().unwrap_or(".")
                ),
                field,
            })
        }
    }
}

/// The path (`a.b[2]`) of the first string or key holding a NUL.
pub(crate) fn find_nul(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v).map(|rest| format!("[{i}]{}", dotted(&rest)))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                return Some(k.replace('\0', "\\u0000"));
            }
            find_nul(v).map(|rest| format!("{k}{}", dotted(&rest)))
        }),
        _ => None,
    }
}

fn dotted(rest: &str) -> String {
    if rest.is_empty() || rest.starts_with('[') {
        rest.to_string()
    } else {
        format!(".{rest}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_is_found_with_its_path() {
        assert_eq!(find_nul(&json!({"a": "x"})), None);
        assert_eq!(
            find_nul(&json!({"inputs": {"a": "x\u{0}y"}})).as_deref(),
            Some("inputs.a")
        );
        assert_eq!(
            find_nul(&json!({"l": [1, "ok", ["\u{0}"]]})).as_deref(),
            Some("l[2][0]")
        );
        assert!(find_nul(&json!({"k\u{0}": 1})).is_some());
        let e = parse_object(br#"{"metadata": {"user_id": "u\u0000"}}"#, false).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("metadata.user_id"));
    }
}
