//! Typed query parameters: the lists' `*Query` types (`api::openapi`,
//! `#[derive(Deserialize, IntoParams)]`, `deny_unknown_fields`) are what a
//! handler receives through [`ApiQuery`], and what the OpenAPI document
//! declares; one type, so the two cannot drift.
//!
//! The query string is decoded as `application/x-www-form-urlencoded`
//! (serde_urlencoded, `serde_path_to_error` naming the field at fault). A
//! refusal is a 400 `validation` naming the parameter in `error.param`:
//! a NUL character anywhere (PostgreSQL takes none in text), an unknown
//! parameter (the accepted ones listed), then the first bad value in the
//! order the type declares its fields. A repeated parameter counts once:
//! its last value.
//!
//! The value checks the fields name in `#[serde(deserialize_with)]` are
//! here: text of 1-255 characters, RFC 3339 times, a page size of 1 to
//! 1000, secret paths, cursors, booleans.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use url::form_urlencoded;

use super::http::{bad, ApiError};

/// The page size of a list when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: i64 = 100;

/// Extractor: the query string as `T`, or a 400 [`ApiError::BadParam`]
/// naming the parameter at fault. A handler that checks something first
/// (the caller's role, ...) takes `Result<ApiQuery<T>, ApiError>` and
/// answers the error after its own check.
#[derive(Debug)]
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// `query` (without the `?`) as `T`; see the module's documentation.
pub(crate) fn parse<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let fields = accepted::<T>();
    // a repeated parameter: its last value, in its first place; only the
    // accepted names are kept (so at most as many pairs as fields, however
    // long the query), the first NUL and the first unknown name noted
    let mut pairs: Vec<(String, String)> = Vec::new();
    let (mut nul, mut unknown_name) = (None, None);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if nul.is_none() && (k.contains('\0') || v.contains('\0')) {
            nul = Some(k.replace('\0', "\\u0000"));
        }
        if !fields.contains(&k.as_ref()) {
            unknown_name.get_or_insert_with(|| k.into_owned());
            continue;
        }
        match pairs.iter_mut().find(|(name, _)| *name == k) {
            Some(pair) => pair.1 = v.into_owned(),
            None => pairs.push((k.into_owned(), v.into_owned())),
        }
    }
    if let Some(k) = nul {
        return Err(bad(&k, "contains a NUL character"));
    }
    if let Some(k) = unknown_name {
        return Err(unknown(&k, fields));
    }
    // the first bad value in declaration order, whatever the query's order
    pairs.sort_by_key(|(k, _)| fields.iter().position(|f| f == k));
    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&pairs)
        .finish();
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(encoded.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        match (path.as_str(), unknown_field(&message)) {
            // the check above names it first; kept for a type whose fields
            // the probe cannot see
            (".", Some(k)) => unknown(k, fields),
            (".", None) => bad("query", message),
            _ => bad(&path, rephrase(&message)),
        }
    })
}

fn unknown(name: &str, fields: &[&str]) -> ApiError {
    bad(
        name,
        format!("unknown parameter; accepted: {}", fields.join(", ")),
    )
}

/// The field an "unknown field `f`, expected ..." error names.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.strip_suffix("`, there are no fields")
        .or_else(|| rest.rsplit_once("`, expected ").map(|(f, _)| f))
}

/// serde's "unknown variant `v`, expected one of `a`, `b`" as
/// `"v" is not one of a, b`; any other message as it is.
fn rephrase(message: &str) -> String {
    let Some((value, expected)) = message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.rsplit_once("`, expected "))
    else {
        return message.to_string();
    };
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    format!("{value:?} is not one of {}", names.join(", "))
}

/// The field names `T` (a struct deriving `Deserialize`) declares, as
/// serde passes them to `deserialize_struct`; empty for any other type.
pub(crate) fn accepted<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields = None;
    let _probed = T::deserialize(FieldsProbe(&mut fields));
    fields.unwrap_or_default()
}

/// A deserializer that only records the fields of the struct asked for.
struct FieldsProbe<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for FieldsProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("probed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

// ---- value checks (`#[serde(default, deserialize_with = "...")]`) ---------

/// Text of 1 to 255 characters.
pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(d)?;
    if v.is_empty() || v.len() > 255 {
        return Err(de::Error::custom("must be 1-255 characters"));
    }
    Ok(Some(v))
}

/// An RFC 3339 time.
pub(crate) fn time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let v = String::deserialize(d)?;
    DateTime::parse_from_rfc3339(&v)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|e| {
            de::Error::custom(format!(
                "{v:?} is not an RFC 3339 time ({e}), e.g. 2026-11-23T12:00:00Z"
            ))
        })
}

/// A page size, 1 to 1000 (none: [`DEFAULT_LIMIT`]).
pub(crate) fn limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = String::deserialize(d)?;
    match v.parse::<i64>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(Some(n)),
        _ => Err(de::Error::custom(format!(
            "{v:?} is not a number from 1 to 1000"
        ))),
    }
}

/// `true` or `false`.
pub(crate) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let v = String::deserialize(d)?;
    match v.as_str() {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        _ => Err(de::Error::custom(format!(
            "{v:?} is not one of true, false"
        ))),
    }
}

/// A secret path or path prefix: 1 to 512 of `A-Z a-z 0-9 _ - . /`.
pub(crate) fn secret_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use crate::commands::limits::MAX_SECRET_PATH_LEN;
    let v = String::deserialize(d)?;
    if v.is_empty() || v.len() > MAX_SECRET_PATH_LEN {
        return Err(de::Error::custom(format!(
            "must be 1-{MAX_SECRET_PATH_LEN} characters"
        )));
    }
    if !v.chars().all(path_char) {
        return Err(de::Error::custom(
            "holds a character a secret path has not (A-Z a-z 0-9 _ - . and /)",
        ));
    }
    Ok(Some(v))
}

/// [`secret_path`], and a path a secret read may name
/// ([`check_path`](crate::commands::secret_access::check_path)).
pub(crate) fn secret_read_path<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let v = secret_path(d)?;
    if let Some(p) = &v {
        crate::commands::secret_access::check_path(p).map_err(de::Error::custom)?;
    }
    Ok(v)
}

/// The characters of a secret path (`A-Z a-z 0-9 _ - .` and `/`).
pub(crate) fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

const NOT_A_CURSOR: &str = "not a cursor returned by this endpoint (pass next_cursor unchanged)";

/// A stream cursor `<seq>_<index>` as returned in `next_cursor` (lists in
/// stream order).
pub(crate) fn seq_cursor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(i64, i16)>, D::Error> {
    let v = String::deserialize(d)?;
    v.split_once('_')
        .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i16>().ok()?)))
        .map(Some)
        .ok_or_else(|| de::Error::custom(NOT_A_CURSOR))
}

/// A keyset cursor `<micros>_<key>` as returned in `next_cursor` (lists
/// newest first), the key not empty.
pub(crate) fn time_cursor<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<(DateTime<Utc>, String)>, D::Error> {
    let v = String::deserialize(d)?;
    let (micros, key) = v
        .split_once('_')
        .ok_or_else(|| de::Error::custom(NOT_A_CURSOR))?;
    let t = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| de::Error::custom(NOT_A_CURSOR))?;
    if key.is_empty() {
        return Err(de::Error::custom(NOT_A_CURSOR));
    }
    Ok(Some((t, key.to_string())))
}

/// [`time_cursor`] whose key is a row id (the executions list).
pub(crate) fn id_cursor<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<(DateTime<Utc>, i64)>, D::Error> {
    match time_cursor(d)? {
        None => Ok(None),
        Some((t, key)) => key
            .parse::<i64>()
            .map(|id| Some((t, id)))
            .map_err(|_| de::Error::custom("not a cursor returned by this endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openapi::{
        ApprovalsQuery, AuditQuery, EpisodesQuery, ExecutionStatus, ExecutionsQuery, FactsQuery,
        SecretAccessesQuery,
    };

    /// `(param, message)` of a refusal.
    fn refused<T: DeserializeOwned + std::fmt::Debug>(query: &str) -> (String, String) {
        match parse::<T>(query) {
            Err(ApiError::BadParam { param, message }) => (param, message),
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn the_probe_sees_the_declared_fields() {
        assert_eq!(
            accepted::<ExecutionsQuery>(),
            [
                "workflow_key",
                "workflow_id",
                "status",
                "since",
                "until",
                "limit",
                "cursor"
            ]
        );
        assert_eq!(accepted::<EpisodesQuery>(), ["limit"]);
        assert!(accepted::<String>().is_empty());
    }

    #[test]
    fn an_empty_query_is_all_defaults() {
        for q in ["", "&", "&&"] {
            let e = parse::<ExecutionsQuery>(q).expect("no parameter");
            assert!(e.workflow_key.is_none() && e.status.is_none() && e.cursor.is_none());
            assert_eq!(e.limit, None);
        }
        let f = parse::<FactsQuery>("").expect("no parameter");
        assert_eq!((f.history, f.q), (None, None));
    }

    #[test]
    fn values_are_typed() {
        let e = parse::<ExecutionsQuery>(
            "status=awaiting_approval&since=2026-11-23T12:00:00%2B01:00&limit=7&cursor=1000000_42",
        )
        .expect("good values");
        assert_eq!(e.status, Some(ExecutionStatus::AwaitingApproval));
        assert_eq!(
            e.since.map(|t| t.to_rfc3339()),
            Some("2026-11-23T11:00:00+00:00".into())
        );
        assert_eq!(e.limit, Some(7));
        assert_eq!(
            e.cursor,
            Some((
                DateTime::from_timestamp_micros(1_000_000).expect("a time"),
                42
            ))
        );
        let a = parse::<AuditQuery>("job_id=j+1&cursor=12_3").expect("good values");
        assert_eq!(a.job_id.as_deref(), Some("j 1"));
        assert_eq!(a.cursor, Some((12, 3)));
        let f = parse::<FactsQuery>("history=true&q=green%20tea").expect("good values");
        assert_eq!((f.history, f.q.as_deref()), (Some(true), Some("green tea")));
        let ap = parse::<ApprovalsQuery>("cursor=5_a-1").expect("good values");
        assert_eq!(ap.cursor.map(|(_, k)| k).as_deref(), Some("a-1"));
    }

    #[test]
    fn a_repeated_parameter_counts_once_with_its_last_value() {
        let e = parse::<ExecutionsQuery>("limit=5&limit=7").expect("repeated");
        assert_eq!(e.limit, Some(7));
        let e = parse::<ExecutionsQuery>("limit=0&limit=7").expect("the last one counts");
        assert_eq!(e.limit, Some(7));
        assert_eq!(refused::<ExecutionsQuery>("limit=7&limit=0").0, "limit");
    }

    #[test]
    fn an_unknown_parameter_is_named_with_the_accepted_ones() {
        let (param, message) = refused::<ApprovalsQuery>("status=pending&colour=red");
        assert_eq!(param, "colour");
        assert_eq!(
            message,
            "unknown parameter; accepted: status, limit, cursor"
        );
        // named before any bad value, wherever it is
        assert_eq!(refused::<ExecutionsQuery>("limit=0&colour=red").0, "colour");
        assert_eq!(refused::<EpisodesQuery>("limits=1").0, "limits");
        // a field's Rust name is the parameter; no alias
        assert_eq!(refused::<FactsQuery>("histroy=true").0, "histroy");
    }

    #[test]
    fn a_nul_is_refused_by_name_before_anything_else() {
        let (param, message) = refused::<AuditQuery>("colour=1&action=%00");
        assert_eq!(
            (param.as_str(), message.as_str()),
            ("action", "contains a NUL character")
        );
        assert_eq!(refused::<AuditQuery>("a%00b=1").0, "a\\u0000b");
    }

    #[test]
    fn bad_values_are_named_in_declaration_order() {
        for (query, param, message) in [
            ("limit=0", "limit", "\"0\" is not a number from 1 to 1000"),
            ("limit=1001", "limit", "\"1001\" is not a number from 1 to 1000"),
            ("limit=x", "limit", "\"x\" is not a number from 1 to 1000"),
            ("limit=", "limit", "\"\" is not a number from 1 to 1000"),
            (
                "status=done",
                "status",
                "\"done\" is not one of pending, awaiting_approval, running, completed, failed, cancelled",
            ),
            ("workflow_key=", "workflow_key", "must be 1-255 characters"),
            ("cursor=xyz", "cursor", NOT_A_CURSOR),
            ("cursor=1_x", "cursor", "not a cursor returned by this endpoint"),
            ("cursor=1_", "cursor", NOT_A_CURSOR),
            // the declared order: status before limit
            ("limit=0&status=done", "status", ""),
        ] {
            let (p, m) = refused::<ExecutionsQuery>(query);
            assert_eq!(p, param, "{query}: {m}");
            if !message.is_empty() {
                assert_eq!(m, message, "{query}");
            }
        }
        let (p, m) = refused::<ExecutionsQuery>("since=yesterday");
        assert_eq!(p, "since");
        assert!(
            m.contains("is not an RFC 3339 time") && m.contains("yesterday"),
            "{m}"
        );
        assert_eq!(refused::<AuditQuery>("until=2026-13-01").0, "until");
        assert_eq!(refused::<AuditQuery>("cursor=1").0, "cursor");
        assert_eq!(refused::<AuditQuery>("cursor=1_40000").0, "cursor");
        assert_eq!(
            refused::<FactsQuery>("history=yes"),
            ("history".into(), "\"yes\" is not one of true, false".into())
        );
        assert_eq!(refused::<FactsQuery>("q=").0, "q");
        assert_eq!(refused::<ApprovalsQuery>("status=maybe").0, "status");
        assert_eq!(refused::<ApprovalsQuery>("cursor=1_").0, "cursor");
    }

    #[test]
    fn secret_paths_are_checked() {
        for (query, param) in [
            ("decision=maybe", "decision"),
            ("path=secret/ocr", "path"),
            ("path_prefix=secret/data/a%25", "path_prefix"),
            ("path_prefix=", "path_prefix"),
            ("client_id=", "client_id"),
            ("value=1", "value"),
        ] {
            assert_eq!(refused::<SecretAccessesQuery>(query).0, param, "{query}");
        }
        let s = parse::<SecretAccessesQuery>(
            "path=secret/data/external_apis/ocr&path_prefix=secret/data/&decision=denied",
        )
        .expect("good values");
        assert_eq!(s.path.as_deref(), Some("secret/data/external_apis/ocr"));
        assert_eq!(s.decision.map(|d| d.as_str()), Some("denied"));
    }

    #[test]
    fn rephrasing_keeps_other_messages() {
        assert_eq!(
            rephrase("must be 1-255 characters"),
            "must be 1-255 characters"
        );
        assert_eq!(
            rephrase("unknown variant `x`, expected `a` or `b`"),
            "\"x\" is not one of a, b"
        );
        assert_eq!(unknown_field("unknown field `a`, expected `b`"), Some("a"));
        assert_eq!(
            unknown_field("unknown field `a`, there are no fields"),
            Some("a")
        );
        assert_eq!(unknown_field("invalid type: string `a`"), None);
    }
}
