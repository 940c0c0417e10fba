//! The bounds every number a command carries is checked against, in one
//! place. Each is far above what a sane caller sends and well inside what
//! the arithmetic and the read models hold (a `DateTime` plus a delay,
//! PostgreSQL `integer`/`bigint` columns), so no accepted value can panic a
//! fold or stop a projection. The registry and the configuration are
//! checked against the same bounds at start.

/// Attempts of one step (the registry's `max_attempts` is at most this).
pub const MAX_ATTEMPTS: u32 = 20;

/// A step's attempt timeout (registry `timeout_ms`): one hour.
pub const MAX_STEP_TIMEOUT_MS: u64 = 3_600_000;

/// The wait before a retry (`retry_in_ms`, registry `backoff_ms`,
/// `handler.retry_max_ms`): one day.
pub const MAX_RETRY_DELAY_MS: u64 = 86_400_000;

/// How long one attempt or delivery is reported to have taken
/// (`duration_ms`): one week.
pub const MAX_DURATION_MS: u64 = 7 * 86_400_000;

/// A job's `timeout_seconds` (and the configured maximum): 30 days.
pub const MAX_JOB_TIMEOUT_SECONDS: u32 = 30 * 86_400;

/// How far ahead an approval may expire (`expires_at` after the request,
/// registry `approval_timeout_seconds`): 366 days.
pub const MAX_APPROVAL_WINDOW_SECONDS: i64 = 366 * 86_400;

/// Delivery attempts of a job's result callback.
pub const MAX_CALLBACK_ATTEMPTS: u32 = 100;

/// Job priority: 1 (lowest) to 10.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<u8> = 1..=10;

/// A secret's KV v2 path (`secret/data/...`), in bytes.
pub const MAX_SECRET_PATH_LEN: usize = 512;

/// A secret's field name, in bytes.
pub const MAX_SECRET_FIELD_LEN: usize = 128;

/// The purpose stated for a secret read, in characters.
pub const MAX_SECRET_PURPOSE_LEN: usize = 256;

/// A KV version asked for (Vault's versions start at 1).
pub const MAX_SECRET_VERSION: u64 = 1_000_000_000;

/// Headers a registry step may fill from secrets (`headers`).
pub const MAX_STEP_HEADERS: usize = 16;

/// A step header's name, in bytes.
pub const MAX_STEP_HEADER_NAME_LEN: usize = 64;

/// A step header's template (its text and placeholders), in bytes.
pub const MAX_STEP_HEADER_TEMPLATE_LEN: usize = 2048;

/// Facts one writeback may upsert.
pub const MAX_MEMORY_FACTS: usize = 100;

/// Messages in one conversation turn.
pub const MAX_MEMORY_MESSAGES: usize = 200;

/// One message's (or the response's) text, in characters.
pub const MAX_MEMORY_TEXT_CHARS: usize = 32_768;

/// A fact's subject and key, in characters (each).
pub const MAX_MEMORY_FACT_KEY_CHARS: usize = 256;

/// A fact's value, in characters.
pub const MAX_MEMORY_FACT_VALUE_CHARS: usize = 4096;

/// Items (working-state keys, episode ids) one cleanup command and its
/// event carry: at most 64 bytes a key and 128 an episode id, so an event
/// stays near 170 KB, well inside the stream's maximum message size
/// (1 MiB, NATS's default `max_payload`); a subject with more due items
/// gets one event per this many.
pub const MAX_CLEANUP_ITEMS: usize = 1_000;
