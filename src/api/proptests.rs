//! Property tests at the edges where outside input arrives: arbitrary bytes,
//! arbitrary JSON and extreme numbers thrown at every command's parser and
//! aggregate, at the n8n endpoint's signature headers, at the handler's
//! fold and its backoff. Each property asserts a clear error (or bounded
//! values on success), never a panic.
//!
//! Case counts are bounded and nothing is written to disk (no failure
//! persistence), so they run with the unit tests in CI. A failure prints
//! the shrunk input; paste it into a plain `#[test]` to keep it.

use std::collections::BTreeMap;

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use cqrs_es::Aggregate;
use proptest::prelude::*;
use proptest::sample::{self, Index};
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use proptest::{collection, option};
use serde_json::{json, Map, Number, Value};

use super::body::parse_object;
use super::caller::{Caller, Role};
use super::nats::{Parsed, KNOWN_COMMANDS};
use crate::backoff::Backoff as RetryPolicy;
use crate::bus::ids;
use crate::commands::approval::events::{
    ApprovalDecided, ApprovalEvent, ApprovalExpired, ApprovalRequested,
};
use crate::commands::approval::{
    Approval, ApprovalCommand, ApprovalStatus, Decide, RequestApproval,
};
use crate::commands::job::events::{
    CallbackDelivered, CallbackFailed, JobCancelled, JobCompleted, JobEvent, JobFailed, JobStarted,
    JobSubmitted, StepAttemptStarted, StepResultRecorded, StepRetryScheduled, StepStatus,
};
use crate::commands::job::{
    CancelJob, CompleteJob, FailJob, Job, JobCommand, JobError, JobServices, JobStatus, NewAttempt,
    RecordCallback, RecordStepResult, StartAttempt, StartJob, SubmitJob,
};
use crate::commands::limits::{
    MAX_APPROVAL_WINDOW_SECONDS, MAX_ATTEMPTS, MAX_CALLBACK_ATTEMPTS, MAX_DURATION_MS,
    MAX_JOB_TIMEOUT_SECONDS, MAX_RETRY_DELAY_MS, MAX_STEP_TIMEOUT_MS, PRIORITY_RANGE,
};
use crate::commands::registry::Registry;
use crate::commands::workflow::events::{AutoApprovalCounted, WorkflowEvent};
use crate::commands::workflow::{Workflow, WorkflowCommand};
use crate::commands::{DomainError, ErrorCode};
use crate::crypto::{SignatureError, SigningKey, HDR_SIGNATURE, HDR_TIMESTAMP};
use crate::events::envelope::{Actor, CommandMeta};
use crate::events::log::valid_aggregate_id;
use crate::handlers::view::{ApprovalState, FoldError, JobView, StoryEvent, StoryRecord};

/// Bounded and diskless: 256 cases, no failure files.
fn config() -> ProptestConfig {
    with_cases(256)
}

fn with_cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Independent oracles (deliberately not the code under test)
// ---------------------------------------------------------------------------

/// True when a string or a key anywhere in `v` holds a NUL.
fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// `at + delay_ms`, or `None` when that is past the end of chrono's range;
/// computed in i128 nanoseconds.
fn due(at: DateTime<Utc>, delay_ms: u64) -> Option<DateTime<Utc>> {
    let nanos = |t: DateTime<Utc>| {
        i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos())
    };
    let d = nanos(at) + i128::from(delay_ms) * 1_000_000;
    if d > nanos(DateTime::<Utc>::MAX_UTC) {
        return None;
    }
    let secs = i64::try_from(d.div_euclid(1_000_000_000)).ok()?;
    let sub = u32::try_from(d.rem_euclid(1_000_000_000)).ok()?;
    DateTime::from_timestamp(secs, sub)
}

/// The approval window, exactly.
fn window() -> TimeDelta {
    TimeDelta::seconds(MAX_APPROVAL_WINDOW_SECONDS)
}

// ---------------------------------------------------------------------------
// Strategies: strings, numbers, JSON
// ---------------------------------------------------------------------------

/// Strings people, fuzzers and other services actually send.
const WORDS: &[&str] = &[
    "",
    " ",
    "\t",
    "\u{0}",
    "a\u{0}b",
    "\u{1}\u{1f}\u{7f}",
    "\r\n",
    "\u{1b}[31m",
    "\u{feff}",
    "\u{200b}",
    "\u{10ffff}",
    "é",
    "😀",
    "`",
    "a`b",
    "a.b",
    "a:b",
    "a[0]",
    "\\u0000",
    "null",
    "0",
    "-1",
    "1e999",
    "succeeded",
    "failed",
    "timed_out",
    "ocr",
    "llm",
    "invoice.extract",
    "job-1",
    "billing",
    "http://receiver/cb",
    "https://receiver.example/cb?token=t",
    "ftp://x/y",
    "http://",
    "2026-11-23T12:00:00Z",
    "+262143-12-31T23:59:59.999999999Z",
    "-262144-01-01T00:00:00Z",
    "+262144-01-01T00:00:00Z",
    "9999-12-31T23:59:60Z",
    "0000-01-01T00:00:00Z",
];

fn arb_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => collection::vec(any::<char>(), 0..16).prop_map(|c| c.into_iter().collect()),
        4 => sample::select(WORDS).prop_map(str::to_string),
        1 => "[\\x00-\\x1f\\x7f]{1,4}",
        // around the 128-character limit of ids and meta strings
        1 => (126usize..=130).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

const EDGE_U64: &[u64] = &[
    0,
    1,
    2,
    9,
    10,
    11,
    19,
    20,
    21,
    99,
    100,
    101,
    255,
    256,
    599,
    600,
    65_535,
    65_536,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    MAX_RETRY_DELAY_MS,
    MAX_RETRY_DELAY_MS + 1,
    MAX_DURATION_MS,
    MAX_DURATION_MS + 1,
    MAX_JOB_TIMEOUT_SECONDS as u64,
    MAX_JOB_TIMEOUT_SECONDS as u64 + 1,
    MAX_STEP_TIMEOUT_MS,
    i64::MAX as u64,
    i64::MAX as u64 + 1,
    u64::MAX - 1,
    u64::MAX,
];

const EDGE_I64: &[i64] = &[i64::MIN, i64::MIN + 1, -1, -20, -(u32::MAX as i64)];

const EDGE_F64: &[f64] = &[
    0.0,
    -0.0,
    0.5,
    1.0,
    1.5,
    20.0,
    -1.0,
    1e19,
    1.844_674_407_370_955_2e19,
    9.3e18,
    1e308,
    -1e308,
    f64::MAX,
    f64::MIN,
    f64::MIN_POSITIVE,
    5e-324,
    f64::EPSILON,
];

/// JSON has no NaN or infinity: those become `null`.
fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn arb_u64() -> BoxedStrategy<u64> {
    prop_oneof![
        3 => sample::select(EDGE_U64),
        2 => 0u64..=25,
        2 => any::<u64>(),
    ]
    .boxed()
}

fn arb_u32() -> BoxedStrategy<u32> {
    prop_oneof![
        3 => sample::select(EDGE_U64).prop_map(|n| n.min(u64::from(u32::MAX)) as u32),
        3 => 1u32..=3,
        3 => 0u32..=25,
        2 => any::<u32>(),
    ]
    .boxed()
}

fn arb_number() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => sample::select(EDGE_U64).prop_map(Value::from),
        2 => (0u64..=30).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => sample::select(EDGE_I64).prop_map(Value::from),
        1 => sample::select(EDGE_F64).prop_map(float),
        1 => any::<f64>().prop_map(float),
    ]
    .boxed()
}

/// Every field name a command knows, so arbitrary objects hit them.
fn all_field_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = COMMANDS
        .iter()
        .flat_map(|(_, _, fields)| fields.iter().map(|(k, _)| *k))
        .chain(META.iter().map(|(k, _)| *k))
        .chain(STEP_RESULT.iter().map(|(k, _)| *k))
        .chain(["client_id", "user_id", "idempotency_key", "nonce"])
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

fn arb_key() -> BoxedStrategy<String> {
    prop_oneof![
        2 => sample::select(all_field_names()).prop_map(str::to_string),
        1 => arb_text(),
    ]
    .boxed()
}

/// Any JSON value: strings with NUL and control characters, huge, negative
/// and fractional numbers, nested up to 8 levels.
fn arb_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number(),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(8, 64, 6, |inner| {
        prop_oneof![
            collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            collection::vec((arb_key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A JSON object of arbitrary fields.
fn arb_json_object() -> BoxedStrategy<Value> {
    collection::vec((arb_key(), arb_json()), 0..8)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
        .boxed()
}

/// A value nested `depth` deep (arrays and objects alternating), around
/// serde_json's recursion limit of 128.
fn nested(depth: usize, leaf: Value) -> Value {
    (0..depth).fold(leaf, |v, i| {
        if i % 2 == 0 {
            Value::Array(vec![v])
        } else {
            Value::Object(Map::from_iter([("k".to_string(), v)]))
        }
    })
}

const SPECIAL_BODIES: &[&str] = &[
    "",
    " ",
    "\n\t ",
    "{}",
    "[]",
    "null",
    "0",
    "\"{}\"",
    "{} {}",
    "{}x",
    "\u{feff}{}",
    "{\"a\":\"\\u0000\"}",
    "{\"a\\u0000\":1}",
    "{\"a\":\"\\ud800\"}",
    "{\"a\":1e999}",
    "{\"a\":-0}",
    "{\"a\":NaN}",
    "{\"job_id\":\"j\",\"job_id\":\"k\"}",
    "{\"job_id\":\"j\"",
    "{'job_id':'j'}",
    "{\"job_id\":\"j\"}\u{0}",
];

/// Bytes: random, damaged JSON (truncated or one byte replaced), JSON
/// nested around the recursion limit, and known-awkward bodies.
fn arb_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => collection::vec(any::<u8>(), 0..64),
        3 => (arb_json_object(), any::<Index>(), any::<u8>(), any::<bool>()).prop_map(
            |(v, i, b, truncate)| {
                let mut bytes = v.to_string().into_bytes();
                let at = i.index(bytes.len());
                if truncate {
                    bytes.truncate(at);
                } else {
                    bytes[at] = b;
                }
                bytes
            }
        ),
        1 => (100usize..=200).prop_map(|d| {
            Value::Object(Map::from_iter([("input".to_string(), nested(d, json!(1)))]))
                .to_string()
                .into_bytes()
        }),
        2 => sample::select(SPECIAL_BODIES).prop_map(|s| s.as_bytes().to_vec()),
    ]
    .boxed()
}

fn arb_time() -> BoxedStrategy<DateTime<Utc>> {
    let (min, max) = (
        DateTime::<Utc>::MIN_UTC.timestamp(),
        DateTime::<Utc>::MAX_UTC.timestamp(),
    );
    prop_oneof![
        1 => Just(DateTime::<Utc>::MIN_UTC),
        1 => Just(DateTime::<Utc>::MAX_UTC),
        1 => Just(DateTime::<Utc>::UNIX_EPOCH),
        3 => (min..=max, 0u32..1_000_000_000)
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).expect("inside chrono's range")),
        // 1970 to 2286, where real clocks are
        3 => (0i64..10_000_000_000, 0u32..1_000_000_000)
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).expect("inside chrono's range")),
    ]
    .boxed()
}

/// Offsets (s, ns) around the edges of the approval window.
fn arb_offset() -> BoxedStrategy<TimeDelta> {
    let w = MAX_APPROVAL_WINDOW_SECONDS;
    prop_oneof![
        (-5i64..=5, 0u32..1_000_000_000),
        (w - 2..=w + 1, 0u32..1_000_000_000),
        sample::select(vec![
            (0, 1),
            (w, 0),
            (w, 1),
            (w - 1, 999_999_999),
            (3600, 0)
        ]),
        (-(w * 3)..=w * 3, 0u32..1_000_000_000),
    ]
    .prop_map(|(s, n)| TimeDelta::new(s, n).expect("a small delta"))
    .boxed()
}

/// `expires_at` as sent: RFC 3339 near the real clock (so some requests
/// pass), anywhere in chrono's range, or not a time at all.
fn arb_time_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => arb_offset().prop_map(|o| json!((Utc::now() + o).to_rfc3339())),
        2 => arb_time().prop_map(|t| json!(t.to_rfc3339())),
        1 => arb_text().prop_map(Value::String),
        1 => arb_json(),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------
// Command bodies carrying each command's real fields
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Kind {
    Id,
    Key,
    Text,
    Count,
    Status,
    Json,
    Time,
    Url,
    NewAttempts,
    StepResults,
    Who,
}

use Kind::*;

const META: &[(&str, Kind)] = &[
    ("command_id", Text),
    ("correlation_id", Text),
    ("causation_id", Text),
    ("actor", Who),
];

const STEP_RESULT: &[(&str, Kind)] = &[
    ("step", Text),
    ("attempt", Count),
    ("status", Status),
    ("output", Json),
    ("error_code", Text),
    ("error_message", Text),
    ("duration_ms", Count),
    ("retry_in_ms", Count),
];

const NEW_ATTEMPT: &[(&str, Kind)] = &[("step", Text), ("idempotency_key", Text)];

const ACTOR: &[(&str, Kind)] = &[("client_id", Text), ("user_id", Text)];

type Fields = &'static [(&'static str, Kind)];

/// Every command the intake knows with the fields of its body.
const COMMANDS: &[(&str, &str, Fields)] = &[
    (
        "job",
        "submit",
        &[
            ("job_id", Id),
            ("workflow_key", Key),
            ("client_id", Text),
            ("input", Json),
            ("priority", Count),
            ("timeout_seconds", Count),
            ("callback_url", Url),
            ("metadata", Json),
        ],
    ),
    ("job", "start", &[("job_id", Id), ("attempts", NewAttempts)]),
    (
        "job",
        "start_attempt",
        &[
            ("job_id", Id),
            ("step", Text),
            ("attempt", Count),
            ("idempotency_key", Text),
        ],
    ),
    (
        "job",
        "record_step_result",
        &[
            ("job_id", Id),
            ("step", Text),
            ("attempt", Count),
            ("status", Status),
            ("output", Json),
            ("error_code", Text),
            ("error_message", Text),
            ("duration_ms", Count),
            ("retry_in_ms", Count),
        ],
    ),
    (
        "job",
        "complete",
        &[
            ("job_id", Id),
            ("outputs", Json),
            ("step_results", StepResults),
        ],
    ),
    (
        "job",
        "fail",
        &[
            ("job_id", Id),
            ("error_code", Text),
            ("error_message", Text),
            ("step_results", StepResults),
        ],
    ),
    ("job", "cancel", &[("job_id", Id), ("reason", Text)]),
    ("job", "retry", &[("job_id", Id)]),
    (
        "job",
        "record_callback",
        &[
            ("job_id", Id),
            ("target", Url),
            ("attempts", Count),
            ("status_code", Count),
            ("error_message", Text),
        ],
    ),
    (
        "approval",
        "request",
        &[
            ("approval_id", Id),
            ("job_id", Id),
            ("workflow_key", Key),
            ("requested_by", Text),
            ("reason", Text),
            ("expires_at", Time),
        ],
    ),
    (
        "approval",
        "approve",
        &[("approval_id", Id), ("decided_by", Text), ("reason", Text)],
    ),
    (
        "approval",
        "reject",
        &[("approval_id", Id), ("decided_by", Text), ("reason", Text)],
    ),
    ("approval", "expire", &[("approval_id", Id)]),
];

fn fields_of(aggregate_type: &str, command: &str) -> Fields {
    COMMANDS
        .iter()
        .find(|(t, c, _)| *t == aggregate_type && *c == command)
        .map(|(_, _, f)| *f)
        .unwrap_or_default()
}

/// Mostly well-typed values (so commands get through to the aggregate),
/// sometimes extreme or of the wrong type.
fn value_of(kind: Kind) -> BoxedStrategy<Value> {
    let s = |words: &'static [&'static str]| sample::select(words).prop_map(|w| json!(w));
    match kind {
        Id => prop_oneof![
            6 => "[A-Za-z0-9_-]{1,8}".prop_map(Value::String),
            1 => arb_text().prop_map(Value::String),
            1 => arb_json(),
        ]
        .boxed(),
        Key => prop_oneof![
            6 => s(&["invoice.extract", "report.daily"]),
            1 => arb_text().prop_map(Value::String),
            1 => arb_json(),
        ]
        .boxed(),
        Text => prop_oneof![
            6 => s(&["ocr", "llm", "billing", "E", "checked"]),
            1 => Just(Value::Null),
            2 => arb_text().prop_map(Value::String),
            1 => arb_json(),
        ]
        .boxed(),
        Count => prop_oneof![
            4 => (0u64..=3).prop_map(Value::from),
            3 => (0u64..=25).prop_map(Value::from),
            2 => (100u64..=600).prop_map(Value::from),
            4 => arb_number(),
            1 => Just(Value::Null),
            1 => arb_json(),
        ]
        .boxed(),
        Status => prop_oneof![
            6 => s(&["succeeded", "failed", "timed_out"]),
            1 => arb_text().prop_map(Value::String),
            1 => arb_json(),
        ]
        .boxed(),
        Json => arb_json(),
        Time => arb_time_value(),
        Url => prop_oneof![
            6 => s(&["http://receiver/cb", "https://receiver.example/cb?token=t"]),
            1 => Just(Value::Null),
            2 => arb_text().prop_map(Value::String),
            1 => arb_json(),
        ]
        .boxed(),
        NewAttempts => prop_oneof![
            6 => collection::vec(object_of(NEW_ATTEMPT, 0.95), 0..4).prop_map(Value::Array),
            1 => arb_json(),
        ]
        .boxed(),
        StepResults => prop_oneof![
            6 => collection::vec(object_of(STEP_RESULT, 0.85), 0..4).prop_map(Value::Array),
            1 => arb_json(),
        ]
        .boxed(),
        Who => prop_oneof![
            6 => object_of(ACTOR, 0.7),
            1 => arb_json(),
        ]
        .boxed(),
    }
}

/// An object with each of `fields` present with probability `p`, and now
/// and then one arbitrary extra key.
fn object_of(fields: Fields, p: f64) -> BoxedStrategy<Value> {
    let parts: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .iter()
        .map(|&(k, kind)| {
            option::weighted(p, value_of(kind))
                .prop_map(move |v| v.map(|v| (k.to_string(), v)))
                .boxed()
        })
        .collect();
    (parts, option::weighted(0.05, (arb_key(), arb_json())))
        .prop_map(|(parts, extra)| {
            Value::Object(parts.into_iter().flatten().chain(extra).collect())
        })
        .boxed()
}

/// A body for `(aggregate_type, command)`: its fields, sometimes the meta
/// fields every command takes.
fn command_body(fields: Fields) -> BoxedStrategy<Value> {
    (object_of(fields, 0.9), object_of(META, 0.25))
        .prop_map(|(body, meta)| {
            let (Value::Object(mut body), Value::Object(meta)) = (body, meta) else {
                unreachable!("object_of makes objects")
            };
            body.extend(meta);
            Value::Object(body)
        })
        .boxed()
}

/// One body for every known command.
fn all_command_bodies() -> BoxedStrategy<Vec<Value>> {
    COMMANDS
        .iter()
        .map(|(_, _, fields)| command_body(fields))
        .collect::<Vec<_>>()
        .boxed()
}

// ---------------------------------------------------------------------------
// What a parse must satisfy
// ---------------------------------------------------------------------------

/// Every string a parsed command and its metadata carry, as JSON.
fn texts_of(parsed: &Parsed, meta: &CommandMeta) -> Value {
    fn result(r: &RecordStepResult) -> Value {
        let RecordStepResult {
            step,
            attempt: _,
            status: _,
            output,
            error_code,
            error_message,
            duration_ms: _,
            retry_in_ms: _,
            n8n_execution_id,
        } = r;
        json!([step, output, error_code, error_message, n8n_execution_id])
    }
    let CommandMeta {
        command_id,
        actor: Actor { client_id, user_id },
        correlation_id,
        causation_id,
        command_hash,
    } = meta;
    let meta = json!([
        command_id,
        client_id,
        user_id,
        correlation_id,
        causation_id,
        command_hash
    ]);
    let command = match parsed {
        Parsed::Job(id, c) => {
            let c = match c {
                JobCommand::Submit(SubmitJob {
                    workflow_key,
                    client_id,
                    input,
                    priority: _,
                    timeout_seconds: _,
                    callback_url,
                    metadata,
                }) => json!([workflow_key, client_id, input, callback_url, metadata]),
                JobCommand::Start(StartJob { attempts }) => Value::Array(
                    attempts
                        .iter()
                        .map(
                            |NewAttempt {
                                 step,
                                 idempotency_key,
                             }| json!([step, idempotency_key]),
                        )
                        .collect(),
                ),
                JobCommand::StartAttempt(StartAttempt {
                    step,
                    attempt: _,
                    idempotency_key,
                }) => json!([step, idempotency_key]),
                JobCommand::RecordStepResult(r) => result(r),
                JobCommand::Complete(CompleteJob {
                    outputs,
                    step_results,
                }) => json!([outputs, step_results.iter().map(result).collect::<Vec<_>>()]),
                JobCommand::Fail(FailJob {
                    error_code,
                    error_message,
                    step_results,
                }) => json!([
                    error_code,
                    error_message,
                    step_results.iter().map(result).collect::<Vec<_>>()
                ]),
                JobCommand::Cancel(CancelJob { reason }) => json!([reason]),
                JobCommand::RecordCallback(RecordCallback {
                    target,
                    attempts: _,
                    status_code: _,
                    error_message,
                }) => json!([target, error_message]),
                // not NATS commands: the parser never yields them
                JobCommand::Fenced { .. } => json!("fenced"),
                JobCommand::ScheduleRetry(_) => json!("schedule_retry"),
                JobCommand::Retry(_) | JobCommand::SubmitRetry(_) => json!("bus"),
            };
            json!([id, c])
        }
        Parsed::Approval(id, c) => {
            let c = match c {
                ApprovalCommand::Request {
                    request:
                        RequestApproval {
                            job_id,
                            workflow_key,
                            requested_by,
                            reason,
                            expires_at: _,
                        },
                    at: _,
                } => json!([job_id, workflow_key, requested_by, reason]),
                ApprovalCommand::Approve {
                    decision: Decide { decided_by, reason },
                    at: _,
                }
                | ApprovalCommand::Reject {
                    decision: Decide { decided_by, reason },
                    at: _,
                } => json!([decided_by, reason]),
                ApprovalCommand::Expire { at: _ } => json!([]),
            };
            json!([id, c])
        }
        Parsed::Retry(id) => json!([id]),
    };
    json!([meta, command])
}

/// A field named by an error must point into the body or be a field the
/// command has: `k`, or `k.sub...` / `k[i]...` with `k` an object or an
/// array. (Only the first step is checked: with keys such as `""` or `"["`
/// the dotted notation is ambiguous.)
fn names_a_field(field: &str, body: Option<&Map<String, Value>>, known: &[&str]) -> bool {
    let meta = META.iter().map(|(k, _)| *k);
    if known.contains(&field) || meta.clone().any(|k| k == field) {
        return true;
    }
    let Some(body) = body else {
        return false;
    };
    body.iter().any(|(k, v)| {
        let k = k.replace('\0', "\\u0000");
        match field.strip_prefix(k.as_str()) {
            Some("") => true,
            Some(rest) => {
                (rest.starts_with('.') || rest.starts_with('[')) && (v.is_object() || v.is_array())
            }
            None => false,
        }
    })
}

/// The caller of every parsed command here (the parser takes its roles as
/// given: `handle` checks them before it parses).
const CALLER: &str = "prop-caller";

/// The NATS parser, as called by `handle` for [`CALLER`].
fn parse(
    aggregate_type: &str,
    command: &str,
    bytes: &[u8],
) -> Result<(Parsed, CommandMeta), crate::bus::CommandError> {
    let caller = Caller::new(CALLER, Role::Operator);
    super::nats::parse(&caller, aggregate_type, command, bytes)
}

/// Parses and checks what every outcome must satisfy. `Ok(Some(..))`: the
/// command was accepted.
fn check_parse(
    aggregate_type: &str,
    command: &str,
    bytes: &[u8],
) -> Result<Option<(Parsed, CommandMeta)>, TestCaseError> {
    let known = KNOWN_COMMANDS.contains(&format!("{aggregate_type}.{command}").as_str());
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let body_map = body.as_ref().and_then(Value::as_object);
    match parse(aggregate_type, command, bytes) {
        Err(e) => {
            prop_assert_eq!(e.code, ErrorCode::Validation, "{:?}", e);
            prop_assert!(!e.message.trim().is_empty(), "{:?}", e);
            if let Some(f) = &e.field {
                let fields: Vec<&str> = fields_of(aggregate_type, command)
                    .iter()
                    .map(|(k, _)| *k)
                    .collect();
                prop_assert!(
                    names_a_field(f, body_map, &fields),
                    "field {:?} names nothing in the body {:?} ({})",
                    f,
                    body,
                    e.message
                );
            }
            Ok(None)
        }
        Ok((parsed, meta)) => {
            prop_assert!(known, "{}.{} accepted", aggregate_type, command);
            let body = body.expect("an accepted body is JSON");
            prop_assert!(body.is_object(), "accepted a non-object {}", body);
            prop_assert!(!contains_nul(&body), "accepted a NUL in {:?}", body);
            let texts = texts_of(&parsed, &meta);
            prop_assert!(!contains_nul(&texts), "a NUL got through: {:?}", texts);
            let id = match &parsed {
                Parsed::Job(id, _) | Parsed::Approval(id, _) | Parsed::Retry(id) => id,
            };
            prop_assert!(valid_aggregate_id(id), "id {:?}", id);
            prop_assert!(ids::caller_chosen_is_valid(&meta.command_id));
            prop_assert_eq!(
                &meta.actor.client_id,
                CALLER,
                "the actor is the caller, whatever the body says"
            );
            for s in [&meta.correlation_id, &meta.causation_id] {
                prop_assert!(!s.is_empty() && s.len() <= 128, "{:?}", s);
            }
            prop_assert!(
                meta.command_hash.len() == 64
                    && meta
                        .command_hash
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{:?}",
                meta.command_hash
            );
            Ok(Some((parsed, meta)))
        }
    }
}

// ---------------------------------------------------------------------------
// What an aggregate's decision must satisfy
// ---------------------------------------------------------------------------

fn services(max_timeout_seconds: u32) -> JobServices {
    JobServices {
        registry: Registry::with_keys(["invoice.extract", "report.daily"]).into(),
        max_timeout_seconds,
        callback_sealer: None,
    }
}

/// Checks the events `before.decide(..)` returned, applying them one after
/// another: every number within the bounds of `commands::limits`, every
/// result for an attempt that was started.
fn check_job_events(
    before: &Job,
    services: &JobServices,
    events: &[JobEvent],
) -> Result<(), TestCaseError> {
    prop_assert!(!events.is_empty(), "an accepted command records something");
    let attempts = 1..=MAX_ATTEMPTS;
    let mut scratch = before.clone();
    for e in events {
        match e {
            JobEvent::JobSubmitted(s) => {
                prop_assert!(PRIORITY_RANGE.contains(&s.priority), "{:?}", s);
                prop_assert!(
                    (1..=MAX_JOB_TIMEOUT_SECONDS.min(services.max_timeout_seconds))
                        .contains(&s.timeout_seconds),
                    "{:?}",
                    s
                );
            }
            JobEvent::StepAttemptStarted(a) => {
                prop_assert!(attempts.contains(&a.attempt), "{:?}", a);
                let started = scratch.started.get(&a.step).copied().unwrap_or(0);
                prop_assert_eq!(u64::from(a.attempt), u64::from(started) + 1, "{:?}", a);
                prop_assert!(!a.step.is_empty() && !a.idempotency_key.is_empty());
            }
            JobEvent::StepResultRecorded(r) => {
                prop_assert!(attempts.contains(&r.attempt), "{:?}", r);
                prop_assert!(r.duration_ms <= MAX_DURATION_MS, "{:?}", r);
                let started = scratch.started.get(&r.step).copied().unwrap_or(0);
                prop_assert!(r.attempt <= started, "never started: {:?}", r);
            }
            JobEvent::StepRetryScheduled(r) => {
                prop_assert!(attempts.contains(&r.attempt), "{:?}", r);
                prop_assert!(r.delay_ms <= MAX_RETRY_DELAY_MS, "{:?}", r);
            }
            JobEvent::CallbackDelivered(c) => {
                prop_assert!(c.attempts <= MAX_CALLBACK_ATTEMPTS, "{:?}", c);
                prop_assert!((100..=599).contains(&c.status_code), "{:?}", c);
            }
            JobEvent::JobHandlerChanged(h) => {
                prop_assert!(h.fence > before.fence, "{:?}", h);
            }
            JobEvent::CallbackFailed(c) => {
                prop_assert!(c.attempts <= MAX_CALLBACK_ATTEMPTS, "{:?}", c);
            }
            JobEvent::JobRetried(r) => {
                prop_assert!(before.status.is_final(), "{:?} of {:?}", r, before.status);
                prop_assert!(!r.retry_job_id.is_empty(), "{:?}", r);
            }
            JobEvent::JobStarted(_)
            | JobEvent::JobCompleted(_)
            | JobEvent::JobFailed(_)
            | JobEvent::JobCancelled(_) => {}
        }
        scratch.apply(e.clone());
    }
    Ok(())
}

/// Whether `before.decide(c)` must succeed, worked out from the rules.
fn approval_allowed(before: &Approval, c: &ApprovalCommand) -> bool {
    let pending = |at: &DateTime<Utc>| match (before.status, before.expires_at) {
        (ApprovalStatus::Pending, Some(exp)) => Some(*at < exp),
        _ => None,
    };
    match c {
        ApprovalCommand::Request { request: r, at } => {
            before.status == ApprovalStatus::None
                && [&r.job_id, &r.workflow_key, &r.requested_by]
                    .iter()
                    .all(|s| !s.trim().is_empty())
                && r.expires_at > *at
                && r.expires_at - *at <= window()
        }
        ApprovalCommand::Approve { decision, at } | ApprovalCommand::Reject { decision, at } => {
            pending(at) == Some(true) && !decision.decided_by.trim().is_empty()
        }
        ApprovalCommand::Expire { at } => pending(at) == Some(false),
    }
}

fn check_approval(
    before: &Approval,
    c: &ApprovalCommand,
    r: &Result<Vec<ApprovalEvent>, crate::commands::approval::ApprovalError>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        r.is_ok(),
        approval_allowed(before, c),
        "{:?} on {:?}: {:?}",
        c,
        before,
        r
    );
    match r {
        Err(e) => prop_assert!(!e.to_string().is_empty()),
        Ok(events) => {
            prop_assert_eq!(events.len(), 1);
            match (&events[0], c) {
                (ApprovalEvent::ApprovalRequested(e), ApprovalCommand::Request { at, .. }) => {
                    prop_assert!(e.expires_at > *at && e.expires_at - *at <= window());
                }
                (ApprovalEvent::ApprovalGranted(d), ApprovalCommand::Approve { at, .. })
                | (ApprovalEvent::ApprovalRejected(d), ApprovalCommand::Reject { at, .. }) => {
                    prop_assert_eq!(d.decided_at, *at);
                    prop_assert!(Some(*at) < before.expires_at);
                }
                (ApprovalEvent::ApprovalExpired(e), ApprovalCommand::Expire { at }) => {
                    prop_assert_eq!(e.expired_at, *at);
                }
                (e, c) => prop_assert!(false, "{:?} from {:?}", e, c),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Aggregate states and typed commands
// ---------------------------------------------------------------------------

const STEPS: &[&str] = &["ocr", "llm", "x", ""];

fn arb_step() -> BoxedStrategy<String> {
    prop_oneof![
        6 => sample::select(STEPS).prop_map(str::to_string),
        1 => arb_text(),
    ]
    .boxed()
}

fn arb_status() -> BoxedStrategy<StepStatus> {
    sample::select(vec![
        StepStatus::Succeeded,
        StepStatus::Failed,
        StepStatus::TimedOut,
    ])
    .boxed()
}

/// A running job whose step `ocr` has had attempts 1..=`started` sent.
fn running_with_attempts(started: u32) -> Job {
    let mut job = Job::default();
    job.apply(submitted_event(5, 300, false));
    job.apply(JobEvent::JobStarted(JobStarted::default()));
    for n in 1..=started {
        job.apply(JobEvent::StepAttemptStarted(StepAttemptStarted {
            workflow_key: "invoice.extract".into(),
            step: "ocr".into(),
            attempt: n,
            idempotency_key: "k".into(),
        }));
    }
    job
}

fn submitted_event(priority: u8, timeout_seconds: u32, callback: bool) -> JobEvent {
    JobEvent::JobSubmitted(JobSubmitted {
        workflow_key: "invoice.extract".into(),
        client_id: "billing".into(),
        input: json!({}),
        priority,
        timeout_seconds,
        callback_url: callback.then(|| "http://receiver/cb".to_string()),
        callback_url_sealed: None,
        metadata: Value::Null,
        retry_of: None,
    })
}

/// A job as the log may hold it: missing, pending, running with attempts
/// started and results recorded (now and then with an extreme attempt
/// number from history), ended, with or without its callback.
fn arb_job() -> BoxedStrategy<Job> {
    let script = collection::vec(
        (sample::select(STEPS), 0u8..4, arb_u32(), arb_status()),
        0..10,
    );
    (
        0u8..=5,
        any::<u8>(),
        any::<u32>(),
        any::<bool>(),
        script,
        0u8..8,
        any::<bool>(),
    )
        .prop_map(
            |(stage, priority, timeout, callback, script, end, callback_done)| {
                let mut job = Job::default();
                if stage == 0 {
                    return job;
                }
                job.apply(submitted_event(priority, timeout, callback));
                if stage == 1 {
                    return job;
                }
                job.apply(JobEvent::JobStarted(JobStarted::default()));
                for (step, what, n, status) in script {
                    let step = step.to_string();
                    let last = job.started.get(&step).copied().unwrap_or(0);
                    let e = match what {
                        0 | 1 if last < MAX_ATTEMPTS => {
                            JobEvent::StepAttemptStarted(StepAttemptStarted {
                                workflow_key: "invoice.extract".into(),
                                step,
                                attempt: last + 1,
                                idempotency_key: "k".into(),
                            })
                        }
                        2 if last > 0 => JobEvent::StepResultRecorded(StepResultRecorded {
                            workflow_key: "invoice.extract".into(),
                            step,
                            attempt: last,
                            status,
                            output: Value::Null,
                            error_code: None,
                            error_message: None,
                            duration_ms: 1,
                            n8n_execution_id: None,
                        }),
                        // a value an older version may have written
                        3 => JobEvent::StepAttemptStarted(StepAttemptStarted {
                            workflow_key: "invoice.extract".into(),
                            step,
                            attempt: n,
                            idempotency_key: "k".into(),
                        }),
                        _ => continue,
                    };
                    job.apply(e);
                }
                let wk = String::from("invoice.extract");
                match end {
                    0 => job.apply(JobEvent::JobCompleted(JobCompleted {
                        workflow_key: wk,
                        outputs: json!({}),
                    })),
                    1 => job.apply(JobEvent::JobFailed(JobFailed {
                        workflow_key: wk,
                        error_code: "E".into(),
                        error_message: "e".into(),
                    })),
                    2 => job.apply(JobEvent::JobCancelled(JobCancelled {
                        workflow_key: wk,
                        reason: "r".into(),
                    })),
                    _ => return job,
                }
                if callback && callback_done {
                    job.apply(JobEvent::CallbackDelivered(CallbackDelivered {
                        workflow_key: "invoice.extract".into(),
                        target: "http://receiver/cb".into(),
                        attempts: 1,
                        status_code: 200,
                    }));
                }
                job
            },
        )
        .boxed()
}

fn arb_step_result() -> BoxedStrategy<RecordStepResult> {
    // mostly plausible durations and delays, so results get recorded
    let ms = || prop_oneof![2 => 0u64..=60_000, 1 => arb_u64()];
    (
        arb_step(),
        arb_u32(),
        arb_status(),
        ms(),
        option::of(ms()),
        option::of(sample::select(vec!["HTTP_503", ""])),
    )
        .prop_map(
            |(step, attempt, status, duration_ms, retry_in_ms, code)| RecordStepResult {
                step,
                attempt,
                status,
                output: Value::Null,
                error_code: code.map(str::to_string),
                error_message: None,
                duration_ms,
                retry_in_ms,
                n8n_execution_id: None,
            },
        )
        .boxed()
}

fn arb_job_command() -> BoxedStrategy<JobCommand> {
    let text = || sample::select(vec!["E", "", " ", "reason"]).prop_map(str::to_string);
    prop_oneof![
        1 => (
            sample::select(vec!["invoice.extract", "nope"]),
            sample::select(vec!["billing", "", " "]),
            option::of(any::<u8>()),
            option::of(arb_u32()),
            option::of(sample::select(vec![
                "http://receiver/cb",
                "ftp://x",
                "http://",
                "not a url"
            ])),
        )
            .prop_map(|(k, c, priority, timeout_seconds, url)| {
                JobCommand::Submit(SubmitJob {
                    workflow_key: k.into(),
                    client_id: c.into(),
                    input: Value::Null,
                    priority,
                    timeout_seconds,
                    callback_url: url.map(str::to_string),
                    metadata: Value::Null,
                })
            }),
        1 => collection::vec((arb_step(), text()), 0..4).prop_map(|a| {
            JobCommand::Start(StartJob {
                attempts: a
                    .into_iter()
                    .map(|(step, idempotency_key)| NewAttempt {
                        step,
                        idempotency_key,
                    })
                    .collect(),
            })
        }),
        1 => (arb_step(), arb_u32(), text()).prop_map(|(step, attempt, idempotency_key)| {
            JobCommand::StartAttempt(StartAttempt {
                step,
                attempt,
                idempotency_key,
            })
        }),
        3 => arb_step_result().prop_map(JobCommand::RecordStepResult),
        1 => collection::vec(arb_step_result(), 0..4).prop_map(|step_results| {
            JobCommand::Complete(CompleteJob {
                outputs: Value::Null,
                step_results,
            })
        }),
        1 => (text(), collection::vec(arb_step_result(), 0..4)).prop_map(|(error_code, step_results)| {
            JobCommand::Fail(FailJob {
                error_code,
                error_message: "e".into(),
                step_results,
            })
        }),
        1 => text().prop_map(|reason| JobCommand::Cancel(CancelJob { reason })),
        1 => (
            arb_u32(),
            option::of(prop_oneof![any::<u16>(), 99u16..=600]),
            option::of(text()),
        )
            .prop_map(|(attempts, status_code, error_message)| {
                JobCommand::RecordCallback(RecordCallback {
                    target: "http://receiver/cb".into(),
                    attempts,
                    status_code,
                    error_message,
                })
            }),
    ]
    .boxed()
}

fn arb_approval() -> BoxedStrategy<Approval> {
    (0u8..5, arb_time())
        .prop_map(|(stage, expires_at)| {
            let mut a = Approval::default();
            if stage == 0 {
                return a;
            }
            a.apply(ApprovalEvent::ApprovalRequested(ApprovalRequested {
                job_id: "job-1".into(),
                workflow_key: "payment.release".into(),
                requested_by: "billing".into(),
                reason: None,
                expires_at,
            }));
            let decided = ApprovalDecided {
                job_id: "job-1".into(),
                workflow_key: "payment.release".into(),
                decided_by: "alice".into(),
                reason: "ok".into(),
                decided_at: expires_at,
            };
            match stage {
                2 => a.apply(ApprovalEvent::ApprovalGranted(decided)),
                3 => a.apply(ApprovalEvent::ApprovalRejected(decided)),
                4 => a.apply(ApprovalEvent::ApprovalExpired(ApprovalExpired {
                    job_id: "job-1".into(),
                    workflow_key: "payment.release".into(),
                    expired_at: expires_at,
                })),
                _ => {}
            }
            a
        })
        .boxed()
}

/// `(state, command)`: times are arbitrary, and often just around the
/// state's deadline or the request's window.
fn arb_approval_case() -> BoxedStrategy<(Approval, ApprovalCommand)> {
    let who = || sample::select(vec!["alice", "", " "]).prop_map(str::to_string);
    (
        arb_approval(),
        arb_time(),
        arb_time(),
        arb_offset(),
        0u8..3,
        who(),
        0u8..4,
    )
        .prop_map(|(state, t1, t2, offset, how, who, which)| {
            // `near`: a time just around `base`, when it can be represented
            let near = |base: DateTime<Utc>| base.checked_add_signed(offset).unwrap_or(base);
            let deadline = state.expires_at.unwrap_or(t1);
            let at = if how == 0 { t1 } else { near(deadline) };
            let command = match which {
                0 => {
                    let expires_at = if how == 2 { t2 } else { near(at) };
                    ApprovalCommand::Request {
                        request: RequestApproval {
                            job_id: "job-1".into(),
                            workflow_key: if who.is_empty() { "" } else { "w" }.into(),
                            requested_by: who,
                            reason: None,
                            expires_at,
                        },
                        at,
                    }
                }
                1 => ApprovalCommand::Approve {
                    decision: Decide {
                        decided_by: who,
                        reason: String::new(),
                    },
                    at,
                },
                2 => ApprovalCommand::Reject {
                    decision: Decide {
                        decided_by: who,
                        reason: String::new(),
                    },
                    at,
                },
                _ => ApprovalCommand::Expire { at },
            };
            (state, command)
        })
        .boxed()
}

fn arb_date() -> BoxedStrategy<NaiveDate> {
    let (min, max) = (
        NaiveDate::MIN.num_days_from_ce(),
        NaiveDate::MAX.num_days_from_ce(),
    );
    prop_oneof![
        1 => Just(NaiveDate::MIN),
        1 => Just(NaiveDate::MAX),
        // a few days, so a count often lands on the state's day
        4 => (1u32..=3).prop_map(|d| NaiveDate::from_ymd_opt(2026, 11, d).expect("a date")),
        2 => (min..=max).prop_map(|d| NaiveDate::from_num_days_from_ce_opt(d).expect("in range")),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------
// The handler's fold
// ---------------------------------------------------------------------------

fn story(version: u64, at: DateTime<Utc>, event: StoryEvent) -> StoryRecord {
    StoryRecord {
        job_id: "j".into(),
        aggregate_version: version,
        event_type: "x".into(),
        occurred_at: at.to_rfc3339(),
        at,
        actor: Actor::default(),
        event,
    }
}

fn arb_story_event() -> BoxedStrategy<StoryEvent> {
    let wk = || String::from("w");
    prop_oneof![
        4 => (arb_step(), arb_u32(), arb_u64()).prop_map(move |(step, attempt, delay_ms)| {
            StoryEvent::Job(JobEvent::StepRetryScheduled(StepRetryScheduled {
                workflow_key: wk(),
                step,
                attempt,
                delay_ms,
            }))
        }),
        2 => (arb_step(), arb_u32()).prop_map(move |(step, attempt)| {
            StoryEvent::Job(JobEvent::StepAttemptStarted(StepAttemptStarted {
                workflow_key: wk(),
                step,
                attempt,
                idempotency_key: "k".into(),
            }))
        }),
        2 => (arb_step(), arb_u32(), arb_status(), arb_u64()).prop_map(
            move |(step, attempt, status, duration_ms)| {
                StoryEvent::Job(JobEvent::StepResultRecorded(StepResultRecorded {
                    workflow_key: wk(),
                    step,
                    attempt,
                    status,
                    output: Value::Null,
                    error_code: None,
                    error_message: None,
                    duration_ms,
                    n8n_execution_id: None,
                }))
            }
        ),
        2 => arb_time().prop_map(|expires_at| {
            StoryEvent::Approval(ApprovalEvent::ApprovalRequested(ApprovalRequested {
                job_id: "j".into(),
                workflow_key: "w".into(),
                requested_by: "c".into(),
                reason: None,
                expires_at,
            }))
        }),
        1 => (arb_time(), any::<bool>()).prop_map(|(decided_at, granted)| {
            let d = ApprovalDecided {
                job_id: "j".into(),
                workflow_key: "w".into(),
                decided_by: "alice".into(),
                reason: "r".into(),
                decided_at,
            };
            StoryEvent::Approval(if granted {
                ApprovalEvent::ApprovalGranted(d)
            } else {
                ApprovalEvent::ApprovalRejected(d)
            })
        }),
        1 => arb_time().prop_map(|expired_at| {
            StoryEvent::Approval(ApprovalEvent::ApprovalExpired(ApprovalExpired {
                job_id: "j".into(),
                workflow_key: "w".into(),
                expired_at,
            }))
        }),
        2 => (0u8..7, arb_u32(), any::<u16>()).prop_map(move |(which, attempts, status_code)| {
            StoryEvent::Job(match which {
                0 => JobEvent::JobStarted(JobStarted::default()),
                1 => JobEvent::JobCompleted(JobCompleted {
                    workflow_key: wk(),
                    outputs: json!({}),
                }),
                2 => JobEvent::JobFailed(JobFailed {
                    workflow_key: wk(),
                    error_code: "E".into(),
                    error_message: "e".into(),
                }),
                3 => JobEvent::JobCancelled(JobCancelled {
                    workflow_key: wk(),
                    reason: "r".into(),
                }),
                4 => JobEvent::CallbackDelivered(CallbackDelivered {
                    workflow_key: wk(),
                    target: "t".into(),
                    attempts,
                    status_code,
                }),
                5 => JobEvent::CallbackFailed(CallbackFailed {
                    workflow_key: wk(),
                    target: "t".into(),
                    attempts,
                    error_message: "e".into(),
                }),
                _ => submitted_event(5, 60, false),
            })
        }),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------
// The n8n endpoint's signature headers
// ---------------------------------------------------------------------------

fn n8n_key() -> SigningKey {
    SigningKey::new(b"n8n-proptest-key-0123456789").expect("a long enough key")
}

fn arb_i64() -> BoxedStrategy<i64> {
    prop_oneof![
        2 => sample::select(vec![i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX]),
        2 => any::<i64>(),
        3 => 1_700_000_000i64..1_900_000_000,
    ]
    .boxed()
}

/// Windows as configured (1 s to a day), extreme, and negative (which a
/// wrapped configuration value becomes).
fn arb_window() -> BoxedStrategy<i64> {
    prop_oneof![
        3 => 0i64..=86_400,
        1 => sample::select(vec![i64::MAX, i64::MIN, -1, -300]),
        1 => any::<i64>(),
    ]
    .boxed()
}

/// The timestamp header as sent: the real one, a non-canonical spelling of
/// it, garbage, or none.
fn timestamp_header(ts: i64, how: u8, junk: &str) -> Option<String> {
    match how {
        0 => None,
        1..=4 => Some(ts.to_string()),
        5 => Some(format!("+{ts}")),
        6 => Some(format!("0{ts}")),
        7 => Some(format!(" {ts}")),
        8 => Some(format!("{}0", i128::from(ts) * 10)),
        _ => Some(junk.to_string()),
    }
}

/// The signature header as sent: the right one, the right one for another
/// timestamp or body, damaged, garbage, or none.
fn signature_header(key: &SigningKey, ts: i64, body: &[u8], how: u8, junk: &str) -> Option<String> {
    let good = key.sign(ts, body);
    match how {
        0 => None,
        1..=4 => Some(good),
        5 => Some(key.sign(ts.wrapping_add(1), body)),
        6 => Some(key.sign(ts, b"{\"other\":1}")),
        7 => Some(good.to_ascii_uppercase()),
        8 => Some(format!(
            "sha256={}",
            &good["sha256=".len()..].to_ascii_uppercase()
        )),
        9 => Some(good["sha256=".len()..].to_string()),
        10 => Some(good[..good.len() - 2].to_string()),
        11 => Some(format!("{good}00")),
        12 => Some(format!("sha256={junk}")),
        13 => Some("sha256=".to_string()),
        14 => SigningKey::new(b"someone-elses-key-0123")
            .ok()
            .map(|k| k.sign(ts, body)),
        _ => Some(junk.to_string()),
    }
}

// ---------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------

proptest! {
    // cheap, and the accepted commands are a small share: more cases
    #![proptest_config(with_cases(1024))]

    // 2a. A job decides any command with extreme numbers in any state:
    // no panic, events within the limits, no result for an attempt that
    // was never started.
    #[test]
    fn job_decide_keeps_every_number_in_bounds(
        state in arb_job(),
        command in arb_job_command(),
        max_timeout in arb_u32(),
    ) {
        let services = services(max_timeout);
        let r = state.decide(command.clone(), &services);
        match &r {
            Ok(events) => check_job_events(&state, &services, events)?,
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(e.field().is_none_or(|f| !f.is_empty()), "{:?}", e);
            }
        }
        let results: Vec<&RecordStepResult> = match &command {
            JobCommand::RecordStepResult(r) => vec![r],
            JobCommand::Complete(c) => c.step_results.iter().collect(),
            JobCommand::Fail(f) => f.step_results.iter().collect(),
            _ => vec![],
        };
        for sr in &results {
            let started = state.started.get(&sr.step).copied().unwrap_or(0);
            if sr.attempt > started {
                prop_assert!(r.is_err(), "{:?} on {:?}: {:?}", sr, state, r);
            }
        }
        // the plain case names the reason
        if let JobCommand::RecordStepResult(sr) = &command {
            let started = state.started.get(&sr.step).copied().unwrap_or(0);
            let otherwise_fine = state.status == JobStatus::Running
                && !sr.step.is_empty()
                && (1..=MAX_ATTEMPTS).contains(&sr.attempt)
                && sr.duration_ms <= MAX_DURATION_MS
                && sr.retry_in_ms.is_none_or(|d| d <= MAX_RETRY_DELAY_MS)
                && !(sr.retry_in_ms.is_some()
                    && sr.status != StepStatus::Succeeded
                    && sr.attempt == MAX_ATTEMPTS);
            if otherwise_fine && sr.attempt > started {
                prop_assert_eq!(
                    r,
                    Err(JobError::AttemptNotStarted {
                        step: sr.step.clone(),
                        attempt: sr.attempt,
                        started,
                    })
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    // 1a. Any bytes, every known command (and a few unknown ones).
    #[test]
    fn nats_parse_survives_arbitrary_bytes(bytes in arb_bytes()) {
        for name in KNOWN_COMMANDS.iter().chain(&["job.explode", "approval.", ".submit"]) {
            let (t, c) = name.split_once('.').expect("type.command");
            check_parse(t, c, &bytes)?;
        }
    }

    // 1b. Any JSON value, every known command.
    #[test]
    fn nats_parse_survives_arbitrary_json(
        v in prop_oneof![1 => arb_json(), 3 => arb_json_object()],
        bytes_of_nested in (0usize..=140).prop_map(|d| nested(d, json!("\u{0}"))),
    ) {
        let body = v.to_string().into_bytes();
        let deep = json!({ "input": bytes_of_nested }).to_string().into_bytes();
        for name in KNOWN_COMMANDS {
            let (t, c) = name.split_once('.').expect("type.command");
            let accepted = check_parse(t, c, &body)?;
            prop_assert!(accepted.is_none() || v.is_object());
            // a NUL however deep is refused, and so is nesting past the limit
            prop_assert!(check_parse(t, c, &deep)?.is_none());
        }
    }

    // 1c. Each command's real field names with arbitrary values; what is
    // accepted is then decided by the aggregate, whose events must stay
    // within the limits.
    #[test]
    fn nats_parse_of_real_fields_then_decide(bodies in all_command_bodies()) {
        let job_states = [
            Job::default(),
            {
                let mut j = Job::default();
                j.apply(submitted_event(5, 300, true));
                j
            },
            {
                let mut j = Job::default();
                j.apply(submitted_event(5, 300, true));
                j.apply(JobEvent::JobStarted(JobStarted::default()));
                for (step, n) in [("ocr", 1), ("ocr", 2), ("llm", 1)] {
                    j.apply(JobEvent::StepAttemptStarted(StepAttemptStarted {
                        workflow_key: "invoice.extract".into(),
                        step: step.into(),
                        attempt: n,
                        idempotency_key: "k".into(),
                    }));
                }
                j
            },
            {
                let mut j = Job::default();
                j.apply(submitted_event(5, 300, true));
                j.apply(JobEvent::JobCompleted(JobCompleted {
                    workflow_key: "invoice.extract".into(),
                    outputs: json!({}),
                }));
                j
            },
        ];
        let pending = {
            let mut a = Approval::default();
            a.apply(ApprovalEvent::ApprovalRequested(ApprovalRequested {
                job_id: "job-1".into(),
                workflow_key: "w".into(),
                requested_by: "billing".into(),
                reason: None,
                expires_at: Utc::now() + TimeDelta::hours(1),
            }));
            a
        };
        let services = services(u32::MAX);
        for ((t, c, _), body) in COMMANDS.iter().zip(&bodies) {
            let Some((parsed, _)) = check_parse(t, c, body.to_string().as_bytes())? else {
                continue;
            };
            match parsed {
                Parsed::Job(_, command) => {
                    for state in &job_states {
                        if let Ok(events) = state.decide(command.clone(), &services) {
                            check_job_events(state, &services, &events)?;
                        }
                    }
                }
                Parsed::Approval(_, command) => {
                    for state in [Approval::default(), pending.clone()] {
                        check_approval(&state, &command, &state.decide(command.clone()))?;
                    }
                }
                // the bus decides a retry (its commands are decided above)
                Parsed::Retry(_) => {}
            }
        }
    }

    // 1d. Any subject parts: only the known commands are ever accepted.
    #[test]
    fn nats_parse_refuses_unknown_commands(t in arb_text(), c in arb_text()) {
        let known = KNOWN_COMMANDS.contains(&format!("{t}.{c}").as_str());
        let r = check_parse(&t, &c, br#"{"job_id":"j","approval_id":"j"}"#)?;
        prop_assert!(r.is_none() || known);
    }

    // 2b. A step result for a started attempt with any numbers: accepted
    // exactly when the numbers are within the limits.
    #[test]
    fn job_step_result_numbers_are_bounded(
        any_attempt in arb_u32(),
        the_last_started in any::<bool>(),
        started in prop_oneof![Just(MAX_ATTEMPTS), 1u32..=MAX_ATTEMPTS],
        duration_ms in arb_u64(),
        retry_in_ms in option::of(arb_u64()),
        status in arb_status(),
    ) {
        let attempt = if the_last_started { started } else { any_attempt };
        let state = running_with_attempts(started);
        let services = services(3600);
        let command = JobCommand::RecordStepResult(RecordStepResult {
            step: "ocr".into(),
            attempt,
            status,
            output: Value::Null,
            error_code: None,
            error_message: None,
            duration_ms,
            retry_in_ms,
            n8n_execution_id: None,
        });
        let r = state.decide(command, &services);
        let retries = retry_in_ms.is_some() && status != StepStatus::Succeeded;
        let fine = (1..=started).contains(&attempt)
            && duration_ms <= MAX_DURATION_MS
            && retry_in_ms.is_none_or(|d| d <= MAX_RETRY_DELAY_MS)
            && !(retries && attempt >= MAX_ATTEMPTS);
        prop_assert_eq!(r.is_ok(), fine, "{:?}", r);
        if let Ok(events) = &r {
            check_job_events(&state, &services, events)?;
            prop_assert_eq!(events.len(), if retries { 2 } else { 1 });
        }
    }

    // 2c. A submission with any priority and timeout, under any configured
    // maximum.
    #[test]
    fn job_submit_numbers_are_bounded(
        priority in option::of(any::<u8>()),
        timeout_seconds in option::of(arb_u32()),
        max_timeout in arb_u32(),
    ) {
        let services = services(max_timeout);
        let r = Job::default().decide(
            JobCommand::Submit(SubmitJob {
                workflow_key: "invoice.extract".into(),
                client_id: "billing".into(),
                input: Value::Null,
                priority,
                timeout_seconds,
                callback_url: None,
                metadata: Value::Null,
            }),
            &services,
        );
        let p = priority.unwrap_or(crate::commands::job::DEFAULT_PRIORITY);
        let t = timeout_seconds.unwrap_or(crate::commands::job::DEFAULT_TIMEOUT_SECONDS);
        let fine = PRIORITY_RANGE.contains(&p)
            && (1..=max_timeout.min(MAX_JOB_TIMEOUT_SECONDS)).contains(&t);
        prop_assert_eq!(r.is_ok(), fine, "{:?}", r);
        if let Ok(events) = &r {
            check_job_events(&Job::default(), &services, events)?;
        }
    }

    // 2d. An approval decides any command at any time, including the ends
    // of chrono's range: accepted exactly when the rules say so, and an
    // expiry is never further than the window.
    #[test]
    fn approval_decide_with_any_times((state, command) in arb_approval_case()) {
        let r = state.decide(command.clone());
        check_approval(&state, &command, &r)?;
    }

    // 2e. A request's expiry, just around the window's edges from any
    // request time: accepted exactly when 0 < expires_at - at <= window.
    #[test]
    fn approval_request_window_is_exact(at in arb_time(), offset in arb_offset()) {
        let Some(expires_at) = at.checked_add_signed(offset) else {
            return Ok(());
        };
        let command = ApprovalCommand::Request {
            request: RequestApproval {
                job_id: "job-1".into(),
                workflow_key: "w".into(),
                requested_by: "billing".into(),
                reason: None,
                expires_at,
            },
            at,
        };
        let r = Approval::default().decide(command.clone());
        prop_assert_eq!(r.is_ok(), offset > TimeDelta::zero() && offset <= window(), "{:?}", r);
        check_approval(&Approval::default(), &command, &r)?;
    }

    // 2f. The workflow's kill-switch and daily count with any numbers.
    #[test]
    fn workflow_decide_with_any_numbers(
        disabled in any::<bool>(),
        day in option::of(arb_date()),
        used_today in arb_u32(),
        which in 0u8..3,
        reason in sample::select(vec!["incident", "", " "]),
        count_day in arb_date(),
        limit in arb_u32(),
    ) {
        let state = Workflow { disabled, day, used_today };
        let command = match which {
            0 => WorkflowCommand::Disable { workflow_key: "w".into(), reason: reason.into() },
            1 => WorkflowCommand::Enable { workflow_key: "w".into(), reason: reason.into() },
            _ => WorkflowCommand::CountAutoApproval {
                workflow_key: "w".into(),
                job_id: "j".into(),
                day: count_day,
                limit,
            },
        };
        let r = state.decide(command.clone());
        let used = if day == Some(count_day) { used_today } else { 0 };
        let fine = match &command {
            WorkflowCommand::Disable { .. } => !reason.trim().is_empty() && !disabled,
            WorkflowCommand::Enable { .. } => !reason.trim().is_empty() && disabled,
            WorkflowCommand::CountAutoApproval { .. } => used < limit,
        };
        prop_assert_eq!(r.is_ok(), fine, "{:?} on {:?}: {:?}", command, state, r);
        if let Ok(events) = r {
            prop_assert_eq!(events.len(), 1);
            if let WorkflowEvent::AutoApprovalCounted(AutoApprovalCounted { used: u, limit: l, day: d, .. }) = &events[0] {
                prop_assert!(*u >= 1 && *u <= *l && u64::from(*u) == u64::from(used) + 1);
                prop_assert_eq!(*d, count_day);
            }
        }
    }

    // 2g. The limits leave room for the arithmetic: from any time a clock
    // can show (years 0 to 9999, what RFC 3339 holds), the longest retry and
    // the longest approval window are representable.
    #[test]
    fn limits_leave_room_for_the_arithmetic(
        secs in DateTime::parse_from_rfc3339("0000-01-01T00:00:00Z").expect("a time").timestamp()
            ..=DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z").expect("a time").timestamp(),
        nanos in 0u32..1_000_000_000,
        delay_ms in prop_oneof![Just(MAX_RETRY_DELAY_MS), 0..=MAX_RETRY_DELAY_MS],
    ) {
        let at = DateTime::from_timestamp(secs, nanos).expect("in range");
        prop_assert!(due(at, delay_ms).is_some());
        prop_assert!(at.checked_add_signed(window()).is_some());
        prop_assert!(at.checked_add_signed(TimeDelta::seconds(i64::from(MAX_JOB_TIMEOUT_SECONDS))).is_some());
        let retry = StoryEvent::Job(JobEvent::StepRetryScheduled(StepRetryScheduled {
            workflow_key: "w".into(),
            step: "s".into(),
            attempt: 2,
            delay_ms,
        }));
        let mut v = JobView::submitted(1, &story(1, at, StoryEvent::Job(submitted_event(5, 60, false))))
            .expect("a submission");
        prop_assert!(v.apply(&story(2, at, retry)).is_ok());
        // and they fit the read models' columns
        prop_assert!(i64::try_from(MAX_DURATION_MS).is_ok() && i64::try_from(MAX_RETRY_DELAY_MS).is_ok());
        prop_assert!(i32::try_from(MAX_JOB_TIMEOUT_SECONDS).is_ok() && i32::try_from(MAX_ATTEMPTS).is_ok());
        prop_assert!(i32::try_from(MAX_CALLBACK_ATTEMPTS).is_ok());
    }

    // 3a. The n8n signature check with any headers, any timestamps and any
    // clock: Ok only for the right signature inside the window.
    #[test]
    fn n8n_signature_check_with_any_headers(
        ts in arb_i64(),
        now_offset in prop_oneof![3 => -400i64..=400, 1 => any::<i64>()],
        absolute_now in option::weighted(0.2, arb_i64()),
        window in arb_window(),
        body in prop_oneof![
            Just(br#"{"job_id":"j","nonce":"n-12345678"}"#.to_vec()),
            collection::vec(any::<u8>(), 0..32),
        ],
        ts_how in 0u8..10,
        sig_how in 0u8..16,
        junk in arb_text(),
    ) {
        let key = n8n_key();
        let now = absolute_now.unwrap_or(ts.saturating_add(now_offset));
        let ts_header = timestamp_header(ts, ts_how, &junk);
        let sig_header = signature_header(&key, ts, &body, sig_how, &junk);
        let r = key.verify(ts_header.as_deref(), sig_header.as_deref(), &body, now, window);
        let fresh = |t: i64| u64::try_from(window).is_ok_and(|w| now.abs_diff(t) <= w);
        match &r {
            Ok(t) => {
                let sig = sig_header.as_deref().expect("verified with a signature");
                let parsed: Option<i64> = ts_header.as_deref().and_then(|h| h.parse().ok());
                prop_assert_eq!(parsed, Some(*t));
                prop_assert!(sig.len() == key.sign(*t, &body).len() && sig.starts_with("sha256="), "{}", sig);
                prop_assert!(sig.eq_ignore_ascii_case(&key.sign(*t, &body)), "{}", sig);
                prop_assert!(fresh(*t), "now {} ts {} window {}", now, t, window);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty() && !e.code().is_empty()),
        }
        // the refusal is the first thing wrong, in order
        let expected = match (&ts_header, &sig_header) {
            (None, _) => Some(SignatureError::Missing(HDR_TIMESTAMP)),
            (_, None) => Some(SignatureError::Missing(HDR_SIGNATURE)),
            (Some(h), Some(_)) => match h.parse::<i64>() {
                Err(_) => Some(SignatureError::BadTimestamp),
                Ok(t) if !fresh(t) => Some(SignatureError::Stale {
                    age: now.saturating_sub(t),
                    window,
                }),
                Ok(_) => None,
            },
        };
        if let Some(expected) = expected {
            prop_assert_eq!(r, Err(expected));
        } else if matches!(sig_how, 1..=4 | 8) && ts_header.as_deref().and_then(|h| h.parse::<i64>().ok()) == Some(ts) {
            prop_assert_eq!(r, Ok(ts));
        } else if !sig_header.as_deref().is_some_and(|s| s.starts_with("sha256=")) {
            prop_assert_eq!(r, Err(SignatureError::Malformed));
        }
    }

    // 3b. A correctly signed body outside the window is stale, whatever the
    // numbers.
    #[test]
    fn n8n_signature_outside_the_window_is_stale(
        ts in arb_i64(),
        now in arb_i64(),
        window in arb_window(),
        body in collection::vec(any::<u8>(), 0..32),
    ) {
        let key = n8n_key();
        let inside = u64::try_from(window).is_ok_and(|w| now.abs_diff(ts) <= w);
        let r = key.verify(Some(&ts.to_string()), Some(&key.sign(ts, &body)), &body, now, window);
        if inside {
            prop_assert_eq!(r, Ok(ts));
        } else {
            prop_assert_eq!(r, Err(SignatureError::Stale { age: now.saturating_sub(ts), window }));
        }
    }

    // 4. The handler's fold of any typed job and approval events at any
    // time: no panic; a retry due past the end of time is RetryOutOfRange
    // and changes nothing; a replayed job record changes nothing.
    #[test]
    fn job_view_folds_any_events(
        priority in any::<u8>(),
        timeout in any::<u32>(),
        submitted_at in arb_time(),
        records in collection::vec((arb_time(), arb_story_event(), 0u8..5), 0..12),
    ) {
        let first = story(1, submitted_at, StoryEvent::Job(submitted_event(priority, timeout, true)));
        let mut view = JobView::submitted(1, &first).expect("a submission");
        prop_assert!(PRIORITY_RANGE.contains(&view.priority) && view.timeout_seconds >= 1);
        // the job's and the approval's versions count apart, as their subjects do
        let (mut version, mut approval_version) = (1, 0);
        for (at, event, replay) in records {
            // now and then a record already folded arrives again
            let counter = match event {
                StoryEvent::Job(_) => &mut version,
                StoryEvent::Approval(_) => &mut approval_version,
            };
            if replay != 0 {
                *counter += 1;
            }
            let record = story(*counter, at, event);
            let before = view.clone();
            let r = view.apply(&record);
            match &record.event {
                StoryEvent::Job(_) if record.aggregate_version <= before.version => {
                    prop_assert_eq!(&r, &Ok(()));
                    prop_assert_eq!(&view, &before, "a replay changed the view");
                }
                StoryEvent::Approval(_) if record.aggregate_version <= before.approval_version => {
                    prop_assert_eq!(&r, &Ok(()));
                    prop_assert_eq!(&view, &before, "a replayed approval changed the view");
                }
                StoryEvent::Job(JobEvent::StepRetryScheduled(s)) => match due(at, s.delay_ms) {
                    None => {
                        prop_assert_eq!(&r, &Err(FoldError::RetryOutOfRange {
                            step: s.step.clone(),
                            at,
                            delay_ms: s.delay_ms,
                        }));
                        prop_assert_eq!(&view, &before, "a refused fold changed the view");
                    }
                    Some(due) => {
                        prop_assert_eq!(&r, &Ok(()));
                        prop_assert_eq!(view.steps[&s.step].retry, Some((s.attempt, due)));
                    }
                },
                StoryEvent::Job(_) => prop_assert_eq!(&r, &Ok(())),
                StoryEvent::Approval(a) => {
                    prop_assert_eq!(&r, &Ok(()));
                    if let ApprovalEvent::ApprovalRequested(q) = a {
                        prop_assert_eq!(&view.approval, &ApprovalState::Pending { expires_at: q.expires_at });
                    }
                }
            }
            if r.is_ok() && matches!(record.event, StoryEvent::Job(_)) {
                prop_assert_eq!(view.version, record.aggregate_version.max(before.version));
            }
        }
    }

    // 5. The handler's backoff for any attempt, any step base and extreme
    // policies: never above max * (1 + jitter), and (without jitter, with
    // a growing multiplier) never shorter for a later attempt.
    #[test]
    fn retry_delay_is_bounded_and_grows(
        a in arb_u32(),
        b in arb_u32(),
        base_ms in option::of(arb_u64()),
        policy_base in arb_u64(),
        multiplier in prop_oneof![
            3 => 1.0f64..=1000.0,
            2 => sample::select(vec![
                0.0, -0.0, -1.0, -2.5, 0.5, 1.0, 1e300, f64::MAX, f64::MIN, f64::MIN_POSITIVE,
                f64::INFINITY, f64::NEG_INFINITY, f64::NAN,
            ]),
            1 => any::<f64>(),
        ],
        max in prop_oneof![
            3 => arb_u64().prop_map(Duration::from_millis),
            1 => sample::select(vec![Duration::ZERO, Duration::MAX, Duration::new(u64::MAX, 0), Duration::from_nanos(1)]),
        ],
        jitter in prop_oneof![2 => 0.0f64..=1.0, 1 => sample::select(vec![0.0, 1.0])],
    ) {
        let p = RetryPolicy {
            base: Duration::from_millis(policy_base),
            multiplier,
            max,
            jitter,
        };
        let slack = |bound: f64| bound * (1.0 + 1e-9) + 1e-6;
        for attempt in [a, b, 0, 1, u32::MAX] {
            let d = p.with_base_ms(base_ms).delay(attempt).as_secs_f64();
            prop_assert!(d <= slack(max.as_secs_f64() * (1.0 + jitter)), "{:?}: {} s at attempt {}", p, d, attempt);
        }
        if multiplier >= 1.0 {
            let steady = RetryPolicy { jitter: 0.0, ..p };
            let (lo, hi) = (a.min(b), a.max(b));
            let (d_lo, d_hi) = (steady.with_base_ms(base_ms).delay(lo), steady.with_base_ms(base_ms).delay(hi));
            prop_assert!(d_lo <= d_hi, "{:?}: attempt {} waits {:?}, attempt {} only {:?}", steady, lo, d_lo, hi, d_hi);
            prop_assert!(d_hi.as_secs_f64() <= slack(max.as_secs_f64()));
        }
    }

    // 6. The body check shared by every intake: Ok exactly for a JSON
    // object with no NUL in any string or key.
    #[test]
    fn parse_object_accepts_only_storable_objects(bytes in arb_bytes(), empty_is_object in any::<bool>()) {
        let r = parse_object(&bytes, empty_is_object);
        let blank = bytes.iter().all(u8::is_ascii_whitespace);
        let expected: Option<Value> = if empty_is_object && blank {
            Some(json!({}))
        } else {
            serde_json::from_slice::<Value>(&bytes)
                .ok()
                .filter(|v| v.is_object() && !contains_nul(v))
        };
        match (&r, &expected) {
            (Ok(v), Some(e)) => prop_assert_eq!(v, e),
            (Err(e), None) => {
                prop_assert_eq!(e.code, ErrorCode::Validation);
                prop_assert!(!e.message.trim().is_empty());
                if let Some(f) = &e.field {
                    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
                    prop_assert!(names_a_field(f, body.as_ref().and_then(Value::as_object), &[]), "{:?}", f);
                }
            }
            _ => prop_assert!(false, "{:?}: got {:?}, expected {:?}", String::from_utf8_lossy(&bytes), r, expected),
        }
    }
}

/// The field table above covers exactly the commands the intake knows, so
/// a new command cannot escape the properties.
#[test]
fn the_field_table_covers_every_known_command() {
    let table: Vec<String> = COMMANDS
        .iter()
        .map(|(t, c, _)| format!("{t}.{c}"))
        .collect();
    assert_eq!(table, KNOWN_COMMANDS);
}

/// The body strategy is not vacuous: for every command, some generated
/// bodies are accepted (so the Ok-branch checks of 1c run).
#[test]
fn the_body_strategy_reaches_accepted_commands() {
    let mut runner = TestRunner::deterministic();
    let strategy = all_command_bodies();
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..128 {
        let bodies = strategy.new_tree(&mut runner).expect("a value").current();
        for ((t, c, _), body) in COMMANDS.iter().zip(&bodies) {
            if parse(t, c, body.to_string().as_bytes()).is_ok() {
                *accepted.entry(format!("{t}.{c}")).or_default() += 1;
            }
        }
    }
    for name in KNOWN_COMMANDS {
        assert!(
            accepted.get(*name).copied().unwrap_or(0) > 0,
            "{name} never accepted: {accepted:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The defects the properties found, kept as plain regressions
// ---------------------------------------------------------------------------

/// An expiry a nanosecond past the window used to pass (`num_seconds`
/// truncated the difference).
#[test]
fn an_expiry_just_past_the_window_is_refused() {
    let at = DateTime::from_timestamp(1_764_000_000, 0).expect("a time");
    let request = |expires_at| ApprovalCommand::Request {
        request: RequestApproval {
            job_id: "job-1".into(),
            workflow_key: "w".into(),
            requested_by: "billing".into(),
            reason: None,
            expires_at,
        },
        at,
    };
    let edge = at + window();
    assert!(Approval::default().decide(request(edge)).is_ok());
    for past in [
        edge + TimeDelta::nanoseconds(1),
        edge + TimeDelta::milliseconds(999),
    ] {
        let e = Approval::default().decide(request(past)).unwrap_err();
        assert_eq!(e.field(), Some("expires_at"), "{e}");
    }
}

/// A failed last attempt with `retry_in_ms` used to schedule attempt
/// MAX_ATTEMPTS + 1, which no command may start.
#[test]
fn no_retry_is_scheduled_after_the_last_attempt() {
    let job = running_with_attempts(MAX_ATTEMPTS);
    let result = |attempt, status| {
        JobCommand::RecordStepResult(RecordStepResult {
            step: "ocr".into(),
            attempt,
            status,
            output: Value::Null,
            error_code: None,
            error_message: None,
            duration_ms: 1,
            retry_in_ms: Some(1000),
            n8n_execution_id: None,
        })
    };
    let e = job
        .decide(result(MAX_ATTEMPTS, StepStatus::TimedOut), &services(3600))
        .unwrap_err();
    assert_eq!(e, JobError::RetryAfterLastAttempt(MAX_ATTEMPTS));
    assert_eq!(
        (e.code(), e.field()),
        (ErrorCode::Validation, Some("retry_in_ms"))
    );
    // the attempt before the last may still be retried, and a success
    // ignores retry_in_ms as before
    assert!(job
        .decide(
            result(MAX_ATTEMPTS - 1, StepStatus::Failed),
            &services(3600)
        )
        .is_ok());
    assert!(job
        .decide(result(MAX_ATTEMPTS, StepStatus::Succeeded), &services(3600))
        .is_ok());
}

/// A negative window (what `timestamp_window_seconds as i64` makes of a
/// value past i64::MAX) used to act as its absolute value.
#[test]
fn a_negative_window_admits_nothing() {
    let key = n8n_key();
    let sig = key.sign(1000, b"{}");
    for window in [-1, -300, i64::MIN] {
        assert!(matches!(
            key.verify(Some("1000"), Some(&sig), b"{}", 1000, window),
            Err(SignatureError::Stale { .. })
        ));
    }
    assert_eq!(
        key.verify(Some("1000"), Some(&sig), b"{}", 1000, 0),
        Ok(1000)
    );
}

/// Errors about `actor` used to name "actor.", "actor.5" or "actor.[0]",
/// and a top-level type error named the value quoted in backticks.
#[test]
fn errors_name_the_field_not_a_value() {
    let field = |body: &str| {
        parse("job", "start", body.as_bytes())
            .err()
            .and_then(|e| e.field)
    };
    let start = r#""job_id":"j""#;
    assert_eq!(
        field(&format!(r#"{{{start},"actor":5}}"#)).as_deref(),
        Some("actor")
    );
    assert_eq!(
        field(&format!(r#"{{{start},"actor":false}}"#)).as_deref(),
        Some("actor")
    );
    assert_eq!(
        field(&format!(r#"{{{start},"actor":[]}}"#)).as_deref(),
        Some("actor")
    );
    assert_eq!(
        field(&format!(r#"{{{start},"actor":[7]}}"#)).as_deref(),
        Some("actor[0]")
    );
    assert_eq!(
        field(&format!(r#"{{{start},"actor":{{"client":"x"}}}}"#)).as_deref(),
        Some("actor.client")
    );
    assert_eq!(
        field(&format!(r#"{{{start},"a`b":1}}"#)).as_deref(),
        Some("a`b")
    );
    assert_eq!(
        field(&format!(r#"{{{start},"x`, expected y":1}}"#)).as_deref(),
        Some("x`, expected y")
    );
    assert_eq!(
        parse("approval", "expire", br#"{"approval_id":"a","q`":1}"#)
            .err()
            .and_then(|e| e.field)
            .as_deref(),
        Some("q`")
    );
    let e = parse("job", "submit", br#"{"client_id":"c"}"#)
        .err()
        .expect("refused");
    assert_eq!(e.field.as_deref(), Some("workflow_key"));
}

/// Attempts past i32::MAX used to wrap to a negative exponent: a wait of
/// almost nothing instead of the maximum.
#[test]
fn a_huge_attempt_waits_the_maximum() {
    let p = RetryPolicy {
        base: Duration::from_secs(5),
        multiplier: 3.0,
        max: Duration::from_secs(300),
        jitter: 0.0,
    };
    for attempt in [40, i32::MAX as u32, i32::MAX as u32 + 2, u32::MAX] {
        assert_eq!(p.delay(attempt), Duration::from_secs(300), "{attempt}");
    }
}
