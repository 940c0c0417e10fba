//! One timestamp format in every answer: RFC 3339 UTC with microseconds
//! and `Z` (`2026-12-05T14:03:31.202655Z`), the format the event envelope
//! writes ([`format_time`]). PostgreSQL renders `timestamptz` as
//! `+00:00` with as many digits as it has, chrono as `Z` with up to nine:
//! the [`one_time_format`] middleware puts every time field of a JSON
//! answer in the one format.
//!
//! A time field is one named `*_at`, `valid_from`, `valid_to` or
//! `estimated_completion`, holding an RFC 3339 string. What a client or a
//! peer sent (`inputs`, `outputs`, a memory `value`, ...) is never
//! touched, whatever its keys: the walk does not enter those fields.

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::events::envelope::format_time;

/// Fields that hold what callers or peers sent: kept as sent.
const OPAQUE: &[&str] = &[
    "inputs",
    "outputs",
    "input_data",
    "output_data",
    "input",
    "output",
    "metadata",
    "value",
    "fields",
    "messages",
    "response",
    "data",
];

/// The largest answer the middleware rewrites; a larger one passes as it
/// is (no list answer comes near it: 1,000 rows at most).
const MAX_REWRITE_BYTES: usize = 64 * 1024 * 1024;

fn is_time_field(key: &str) -> bool {
    key.ends_with("_at") || matches!(key, "valid_from" | "valid_to" | "estimated_completion")
}

/// Puts every time field of `v` in the one format; true when one changed.
pub(crate) fn normalize(v: &mut Value) -> bool {
    let mut changed = false;
    match v {
        Value::Object(map) => {
            for (k, field) in map.iter_mut() {
                if OPAQUE.contains(&k.as_str()) {
                    continue;
                }
                if let (true, Value::String(s)) = (is_time_field(k), &*field) {
                    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                        let one = format_time(t.with_timezone(&Utc));
                        if one != *s {
                            *field = Value::String(one);
                            changed = true;
                        }
                    }
                } else {
                    changed |= normalize(field);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                changed |= normalize(item);
            }
        }
        _ => {}
    }
    changed
}

/// Rewrites the time fields of every JSON answer (see the module docs).
pub(crate) async fn one_time_format(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_REWRITE_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            // the handler's body failed or is too large to hold: say so
            // rather than send half of it
            tracing::error!(error = %e, "an answer could not be read to put its times in one format");
            return axum::response::IntoResponse::into_response(super::http::ApiError::Request {
                status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                message: "the answer could not be completed; retry".into(),
            });
        }
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if !normalize(&mut v) {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let out = match serde_json::to_vec(&v) {
        Ok(out) => out,
        Err(_) => return Response::from_parts(parts, Body::from(bytes)),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_time_field_gets_the_one_format_and_sent_data_is_kept() {
        let mut v = json!({
            "created_at": "2026-12-05T14:03:31.2026+00:00",
            "updated_at": "2026-12-05T15:03:31+01:00",
            "decided_at": "2026-12-05T14:03:31.202655123Z",
            "valid_from": "2026-12-05T14:03:31Z",
            "items": [{"expires_at": "2026-12-05T14:03:31.5+00:00", "valid_to": null}],
            "inputs": {"due_at": "2026-12-05T14:03:31+00:00"},
            "job": {"created_at": "2026-12-05T14:03:31.000001+00:00",
                    "inputs": {"paid_at": "2026-12-05T14:03:31+00:00"}},
            "note_at": "not a time",
        });
        assert!(normalize(&mut v));
        assert_eq!(v["created_at"], "2026-12-05T14:03:31.202600Z");
        assert_eq!(v["updated_at"], "2026-12-05T14:03:31.000000Z");
        assert_eq!(v["decided_at"], "2026-12-05T14:03:31.202655Z");
        assert_eq!(v["valid_from"], "2026-12-05T14:03:31.000000Z");
        assert_eq!(v["items"][0]["expires_at"], "2026-12-05T14:03:31.500000Z");
        assert_eq!(v["job"]["created_at"], "2026-12-05T14:03:31.000001Z");
        // what the client sent stays as sent
        assert_eq!(v["inputs"]["due_at"], "2026-12-05T14:03:31+00:00");
        assert_eq!(v["job"]["inputs"]["paid_at"], "2026-12-05T14:03:31+00:00");
        assert_eq!(v["note_at"], "not a time");
        // once in the format, nothing changes
        assert!(!normalize(&mut v));
    }
}
