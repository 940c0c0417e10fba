//! Events as the projections read them: the envelope fields they use and
//! the `data` fields any read model takes, parsed straight from the stored
//! line. Everything else in `data` is skipped while parsing instead of being
//! built into a `serde_json::Value` (a rebuild decodes every event in the
//! stream, so this is most of its client-side CPU; docs/BENCHMARKS.md).
//!
//! The data fields are lenient: a field with an unexpected JSON type reads
//! as absent, exactly as `Value::as_str` / `as_i64` treated it, so an event
//! type added later with, say, a structured `status` does not stop a
//! projection that does not use it.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::commands::memory::events::MemoryEvent;
use crate::events::envelope::Actor;

/// One event of a commit, as projections read it (see docs/EVENTS.md for
/// the envelope).
#[derive(Debug, Clone, Deserialize)]
pub struct ProjectedEvent {
    /// The event's id (`audit_trail.event_id`).
    pub event_id: Uuid,
    /// `job`, `approval`, `workflow`, `callback`, `projection`: which read
    /// model rows it touches.
    pub aggregate_type: String,
    /// The aggregate's id (for a job: the `execution_id`; for an approval:
    /// the `approval_id`).
    pub aggregate_id: String,
    /// The stored `event_type` (`audit_trail.action`).
    pub event_type: String,
    /// When it happened, RFC 3339: every time a read model stores.
    pub occurred_at: String,
    /// Who sent the command (`audit_trail.client_id`, `user_id`).
    pub actor: Actor,
    /// The hash of the aggregate's previous event, hex; the event's own hash
    /// (`audit_trail.event_hash`) is computed from it.
    pub prev_hash: String,
    /// The `data` fields the read models use; absent or `null`: all none.
    #[serde(default, deserialize_with = "fields")]
    pub data: Fields,
    /// The typed event of a `memory` aggregate, decoded whole (upcasters
    /// applied) for the memory read model only ([`crate::projections::memory`]);
    /// `None` for every other read model and event.
    #[serde(skip)]
    pub memory: Option<Box<MemoryEvent>>,
}

/// The `data` fields the read models use. Absent, `null` or of another
/// JSON type: `None`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Fields {
    /// The job's workflow key (`workflow_id`, `workflow_key` columns).
    #[serde(deserialize_with = "string")]
    pub workflow_key: Option<String>,
    /// The submitting client (`JobSubmitted`).
    #[serde(deserialize_with = "string")]
    pub client_id: Option<String>,
    /// The job an approval or rejected callback is about.
    #[serde(deserialize_with = "string")]
    pub job_id: Option<String>,
    /// The step a step event is about (`audit_trail.step`).
    #[serde(deserialize_with = "string")]
    pub step: Option<String>,
    /// A step result's status (`succeeded`, `failed`, `timed_out`).
    #[serde(deserialize_with = "string")]
    pub status: Option<String>,
    /// A failure's code.
    #[serde(deserialize_with = "string")]
    pub error_code: Option<String>,
    /// A failure's message.
    #[serde(deserialize_with = "string")]
    pub error_message: Option<String>,
    /// A cancellation's, approval request's or decision's reason.
    #[serde(deserialize_with = "string")]
    pub reason: Option<String>,
    /// Who asked for an approval (`approvals.requested_by`).
    #[serde(deserialize_with = "string")]
    pub requested_by: Option<String>,
    /// Who decided it (`approvals.decided_by`).
    #[serde(deserialize_with = "string")]
    pub decided_by: Option<String>,
    /// When an approval expires, RFC 3339 (`approvals.expires_at`).
    #[serde(deserialize_with = "string")]
    pub expires_at: Option<String>,
    /// The job's priority (`workflows_executions.priority`).
    #[serde(deserialize_with = "int")]
    pub priority: Option<i64>,
    /// How long a step attempt took, in milliseconds
    /// (`audit_trail.duration_ms`).
    #[serde(deserialize_with = "int")]
    pub duration_ms: Option<i64>,
    /// The n8n execution that answered a step
    /// (`StepResultRecorded.n8n_execution_id`, `audit_trail.n8n_execution_id`).
    #[serde(deserialize_with = "string")]
    pub n8n_execution_id: Option<String>,
    /// JSON text as stored; `null` is `None`.
    pub input: Option<Box<RawValue>>,
    /// A completed job's outputs, JSON text as stored
    /// (`workflows_executions.output_data`).
    pub outputs: Option<Box<RawValue>>,
    /// The job a retry's submission retries (`JobSubmitted.retry_of`,
    /// `workflows_executions.retry_of`).
    #[serde(deserialize_with = "string")]
    pub retry_of: Option<String>,
    /// The new job of a retry (`JobRetried.retry_job_id`,
    /// `workflows_executions.retried_by`).
    #[serde(deserialize_with = "string")]
    pub retry_job_id: Option<String>,
    /// `metadata.user_id` (seed 002: the user a submitting service names).
    #[serde(rename = "metadata", deserialize_with = "metadata_user_id")]
    pub metadata_user_id: Option<String>,
    /// The secret's KV v2 path (`secret_accesses.path`).
    #[serde(deserialize_with = "string")]
    pub path: Option<String>,
    /// The one secret field asked for (`secret_accesses.field`).
    #[serde(deserialize_with = "string")]
    pub field: Option<String>,
    /// The KV version asked for (`secret_accesses.requested_version`).
    #[serde(deserialize_with = "int")]
    pub version: Option<i64>,
    /// Why the secret is read (`secret_accesses.purpose`).
    #[serde(deserialize_with = "string")]
    pub purpose: Option<String>,
    /// The secret policy rule that decided (`secret_accesses.rule`).
    #[serde(deserialize_with = "string")]
    pub rule: Option<String>,
    /// The KV version served (`secret_accesses.kv_version`).
    #[serde(deserialize_with = "int")]
    pub kv_version: Option<i64>,
    /// Where a granted value came from: `vault`, `cache`,
    /// `last_known_good` (`secret_accesses.source`).
    #[serde(deserialize_with = "string")]
    pub source: Option<String>,
    /// When the value served was read from Vault, RFC 3339
    /// (`secret_accesses.read_from_vault_at`).
    #[serde(deserialize_with = "string")]
    pub read_from_vault_at: Option<String>,
    /// The reply code of a failed secret access: `unavailable`,
    /// `not_found` (`secret_accesses.code`).
    #[serde(deserialize_with = "string")]
    pub code: Option<String>,
    /// What Vault answered, when it failed or refused
    /// (`secret_accesses.vault_error_*`).
    #[serde(deserialize_with = "vault_error")]
    pub vault_error: Option<VaultError>,
}

/// `vault_error` of a secret-access event: what Vault answered. Lenient
/// like the other fields; never holds a value or a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaultError {
    /// `unreachable`, `failing`, `refused`, `not_found`, `bad_answer`.
    pub kind: Option<String>,
    /// The HTTP status Vault answered, if it answered.
    pub status: Option<i64>,
    /// What failed, for people.
    pub message: Option<String>,
}

fn fields<'de, D: Deserializer<'de>>(d: D) -> Result<Fields, D::Error> {
    Ok(Option::<Fields>::deserialize(d)?.unwrap_or_default())
}

/// What a lenient field keeps of a JSON value.
trait Keep: Sized {
    fn str(_: &str) -> Option<Self> {
        None
    }
    fn i64(_: i64) -> Option<Self> {
        None
    }
    fn u64(_: u64) -> Option<Self> {
        None
    }
}

impl Keep for String {
    fn str(v: &str) -> Option<Self> {
        Some(v.to_owned())
    }
}

impl Keep for i64 {
    fn i64(v: i64) -> Option<Self> {
        Some(v)
    }
    fn u64(v: u64) -> Option<Self> {
        i64::try_from(v).ok()
    }
}

/// Accepts any JSON value; keeps it when it has the wanted type. With
/// `user_id` set, an object is searched for that key instead.
struct Lenient<T> {
    user_id: bool,
    _t: std::marker::PhantomData<T>,
}

impl<T> Lenient<T> {
    fn new(user_id: bool) -> Self {
        Lenient {
            user_id,
            _t: std::marker::PhantomData,
        }
    }
}

impl<'de, T: Keep> Visitor<'de> for Lenient<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(if self.user_id { None } else { T::str(v) })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(if self.user_id { None } else { T::i64(v) })
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(if self.user_id { None } else { T::u64(v) })
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.user_id && key == "user_id" {
                found = map.next_value_seed(Seed::<T>(Lenient::new(false)))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

struct Seed<T>(Lenient<T>);

impl<'de, T: Keep> de::DeserializeSeed<'de> for Seed<T> {
    type Value = Option<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self.0)
    }
}

fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(Lenient::<String>::new(false))
}

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    d.deserialize_any(Lenient::<i64>::new(false))
}

fn metadata_user_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(Lenient::<String>::new(true))
}

/// Reads an object's `kind`, `status` and `message` leniently; anything
/// but an object is `None`.
struct VaultErrorVisitor;

impl<'de> Visitor<'de> for VaultErrorVisitor {
    type Value = Option<VaultError>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut e = VaultError::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "kind" => e.kind = map.next_value_seed(Seed::<String>(Lenient::new(false)))?,
                "status" => e.status = map.next_value_seed(Seed::<i64>(Lenient::new(false)))?,
                "message" => {
                    e.message = map.next_value_seed(Seed::<String>(Lenient::new(false)))?
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(e))
    }
}

fn vault_error<'de, D: Deserializer<'de>>(d: D) -> Result<Option<VaultError>, D::Error> {
    d.deserialize_any(VaultErrorVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields_of(data: serde_json::Value) -> Fields {
        let line = json!({
            "event_id": Uuid::nil(), "aggregate_type": "job", "aggregate_id": "j1",
            "aggregate_version": 1, "event_type": "JobSubmitted", "schema_version": "1",
            "occurred_at": "2026-11-24T10:00:00.000000Z",
            "actor": {"client_id": "billing", "user_id": null},
            "command_id": "c", "correlation_id": "c", "causation_id": "c",
            "prev_hash": "00", "data": data,
        });
        // a RawValue is read from JSON text, as projections do
        serde_json::from_str::<ProjectedEvent>(&line.to_string())
            .expect("a well-formed envelope")
            .data
    }

    #[test]
    fn reads_the_fields_the_read_models_use_and_skips_the_rest() {
        let f = fields_of(json!({
            "workflow_key": "invoice.extract", "client_id": "billing", "priority": 7,
            "input": {"a": [1, 2, {"b": null}]}, "unknown": {"deep": [1, {"x": "y"}]},
            "metadata": {"trace": {"id": 1}, "user_id": "alice"}, "duration_ms": 12,
        }));
        assert_eq!(f.workflow_key.as_deref(), Some("invoice.extract"));
        assert_eq!(f.client_id.as_deref(), Some("billing"));
        assert_eq!(f.priority, Some(7));
        assert_eq!(f.duration_ms, Some(12));
        assert_eq!(f.metadata_user_id.as_deref(), Some("alice"));
        assert_eq!(
            f.input.as_ref().map(|r| r.get()),
            Some(r#"{"a":[1,2,{"b":null}]}"#)
        );
        assert!(f.outputs.is_none() && f.status.is_none());
    }

    #[test]
    fn a_field_of_another_type_reads_as_absent() {
        let f = fields_of(json!({
            "status": {"code": 3}, "priority": "high", "step": ["a"], "reason": 5,
            "metadata": "not an object", "outputs": null, "error_code": true,
            "duration_ms": 1.5,
        }));
        assert!(f.status.is_none() && f.priority.is_none() && f.step.is_none());
        assert!(f.reason.is_none() && f.metadata_user_id.is_none());
        assert!(f.outputs.is_none() && f.error_code.is_none() && f.duration_ms.is_none());
    }

    #[test]
    fn reads_a_secret_access_and_its_vault_error_leniently() {
        let f = fields_of(json!({
            "path": "secret/data/ocr", "field": "api_key", "version": 3, "purpose": "ocr",
            "job_id": "j-1", "step": "ocr", "rule": "ocr-handler", "code": "unavailable",
            "vault_error": {"kind": "failing", "status": 503, "message": "sealed", "x": [1]},
        }));
        assert_eq!(f.path.as_deref(), Some("secret/data/ocr"));
        assert_eq!((f.field.as_deref(), f.version), (Some("api_key"), Some(3)));
        assert_eq!(f.code.as_deref(), Some("unavailable"));
        let e = f.vault_error.expect("an object");
        assert_eq!(e.kind.as_deref(), Some("failing"));
        assert_eq!(
            (e.status, e.message.as_deref()),
            (Some(503), Some("sealed"))
        );
        for odd in [json!(null), json!("down"), json!([1]), json!(5)] {
            assert!(fields_of(json!({"vault_error": odd})).vault_error.is_none());
        }
        let e = fields_of(json!({"vault_error": {"kind": 1, "status": "503"}})).vault_error;
        assert_eq!(e, Some(VaultError::default()));
    }

    #[test]
    fn data_null_or_absent_is_empty() {
        assert!(fields_of(serde_json::Value::Null).workflow_key.is_none());
    }
}
