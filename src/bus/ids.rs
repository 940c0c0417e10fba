//! Every command id flowledger derives itself, in one place.
//!
//! A derived id names the command and what caused it, so the same cause
//! always gives the same id: a handler restarted after a crash re-issues
//! its commands with the same ids and the log answers the first receipts
//! (docs/adr/0002). Each id is `<kind>:<parts>` joined by `:`; no part can
//! hold a `:` (job ids and projection names are subject tokens, step names
//! are registry keys without `:`, attempts and sequences are numbers), and
//! the kinds differ, so two different inputs never give the same id (a test
//! below checks it). Ids that callers choose may not contain `:`
//! ([`caller_chosen_is_valid`]), so they never collide with a derived one.

/// The command id of `POST /v1/jobs` for `job_id`: the same job id and body
/// answer the original receipt; another body is a reused command id (409).
pub fn http_submit(job_id: &str) -> String {
    format!("http-submit:{job_id}")
}

/// The command id of an HTTP command sent with `Idempotency-Key: key` by
/// the client `client_id`: the same client and key name the same command
/// (the store answers its first receipt; another body is a reused id, 409),
/// and two clients' keys never meet (the client id is hex-encoded, so it
/// holds no `:`). `key` is valid ([`idempotency_key_is_valid`]: no `:`).
pub fn http_idempotent(client_id: &str, key: &str) -> String {
    format!("idem:{}:{key}", hex::encode(client_id))
}

/// [`http_idempotent`] for one of the aggregates one request commands
/// (each approval of a bulk decision), `part` its aggregate id.
pub fn http_idempotent_part(client_id: &str, key: &str, part: &str) -> String {
    format!("{}:{part}", http_idempotent(client_id, key))
}

/// 16 bytes naming what the client `client_id` sent with `Idempotency-Key:
/// key` for `purpose` (`job-id`, `turn-id`): the first half of SHA-256 over
/// `<purpose>:<hex client id>:<key>`, for an id a keyed request without
/// one gets, the same on every repeat.
pub fn keyed_digest(purpose: &str, client_id: &str, key: &str) -> [u8; 16] {
    let digest = crate::events::chain::sha256(
        format!("{purpose}:{}:{key}", hex::encode(client_id)).as_bytes(),
    );
    let mut half = [0u8; 16];
    half.copy_from_slice(&digest[..16]);
    half
}

/// An `Idempotency-Key` header value: 1-128 of `A-Z a-z 0-9 _ - .` (a UUID
/// fits), so it joins a command id as one part.
pub fn idempotency_key_is_valid(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The result of `attempt` of `step` posted by n8n to `/v1/callbacks/n8n`.
pub fn n8n_result(job_id: &str, step: &str, attempt: u32) -> String {
    format!("n8n:{job_id}:{step}:{attempt}")
}

/// An operator's skip of stream sequence `seq` in projection `projection`.
pub fn projection_skip(projection: &str, seq: u64) -> String {
    format!("skip:{projection}:{seq}")
}

/// The idempotency key sent with `attempt` of `step` (header
/// `Idempotency-Key`): the same for an attempt sent again after a restart.
pub fn idempotency_key(job_id: &str, step: &str, attempt: u32) -> String {
    format!("{job_id}:{step}:{attempt}")
}

/// The handler starts the job (and the first attempt of every step).
pub fn job_start(job_id: &str) -> String {
    format!("start:{job_id}")
}

/// The handler starts `attempt` (2 and later) of `step`.
pub fn attempt_start(job_id: &str, step: &str, attempt: u32) -> String {
    format!("attempt:{}", idempotency_key(job_id, step, attempt))
}

/// The handler records the result of `attempt` of `step`.
pub fn attempt_result(job_id: &str, step: &str, attempt: u32) -> String {
    format!("result:{}", idempotency_key(job_id, step, attempt))
}

/// The handler schedules the retry of `attempt` of `step` after a failed
/// result it did not record (an n8n callback's).
pub fn attempt_retry(job_id: &str, step: &str, attempt: u32) -> String {
    format!("retry:{}", idempotency_key(job_id, step, attempt))
}

/// The handler ends the job (completes or fails it).
pub fn job_end(job_id: &str) -> String {
    format!("end:{job_id}")
}

/// The id of a job's retry: a random UUID (v4), chosen once; the old
/// job's `JobRetried` records it, and every repeat of the retry reads it
/// from there. Not derived from the old id, so no one who knows that id can
/// submit a job under the retry's id first.
pub fn retry_job_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The retry of job `job_id` recorded on it (`JobRetried`), when the caller
/// sent no `Idempotency-Key`.
pub fn job_retry(job_id: &str) -> String {
    format!("job-retry:{job_id}")
}

/// The submission of the job that retries job `job_id` (its `JobSubmitted`
/// with `retry_of`): once per retried job.
pub fn retry_submit(job_id: &str) -> String {
    format!("retry-submit:{job_id}")
}

/// The handler records how the job's result callback went.
pub fn callback_outcome(job_id: &str) -> String {
    format!("callback:{job_id}")
}

/// The handler requests the job's approval.
pub fn approval_request(job_id: &str) -> String {
    format!("approval-request:{job_id}")
}

/// The handler expires the job's approval.
pub fn approval_expire(job_id: &str) -> String {
    format!("approval-expire:{job_id}")
}

/// The handler counts the job's auto-approval against the daily limit.
pub fn auto_approval_count(job_id: &str) -> String {
    format!("auto-approval-count:{job_id}")
}

/// The handler approves the job without a human (auto-approval rule).
pub fn auto_approve(job_id: &str) -> String {
    format!("auto-approve:{job_id}")
}

/// A writeback of turn `turn_id` to the memory subject `subject` (its
/// aggregate id): the same turn id and body answer the first receipt.
pub fn memory_writeback(subject: &str, turn_id: &str) -> String {
    format!("memory-writeback:{subject}:{turn_id}")
}

/// The erasure of the memory subject `subject` (its aggregate id): once.
pub fn memory_erase(subject: &str) -> String {
    format!("memory-erase:{subject}")
}

/// The embedding handler's outcome (embeddings or their failure) for
/// episode `episode_id` of the memory subject `subject` in vector space
/// `space` (`commands::memory::vector_space`: model and dimensions): once
/// per episode and space. The space is named by 16 hex digits of its
/// SHA-256 (a model name may hold a `:`).
pub fn memory_embeddings(subject: &str, episode_id: &str, space: &str) -> String {
    let digest = crate::events::chain::sha256(space.as_bytes());
    format!(
        "memory-embeddings:{subject}:{episode_id}:{}",
        hex::encode(&digest[..8])
    )
}

/// The extraction handler's outcome (extracted facts or their failure)
/// for episode `episode_id` of the memory subject `subject`: once per
/// episode.
pub fn memory_extraction(subject: &str, episode_id: &str) -> String {
    format!("memory-extraction:{subject}:{episode_id}")
}

/// A command id a caller chooses: 1-128 characters, no `:` (reserved for
/// the ids above) and no control character.
pub fn caller_chosen_is_valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.contains(':') && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Every derived id for a grid of inputs, with the inputs that made it.
    fn all_ids() -> Vec<(String, String)> {
        let jobs = ["j", "j-1", "j_1", "1", "a-b"];
        let steps = ["s", "s-1", "ocr", "1", "a_b"];
        let mut out = Vec::new();
        for j in jobs {
            for (kind, f) in [
                ("http_submit", http_submit as fn(&str) -> String),
                ("job_start", job_start),
                ("job_end", job_end),
                ("callback_outcome", callback_outcome),
                ("approval_request", approval_request),
                ("approval_expire", approval_expire),
                ("auto_approval_count", auto_approval_count),
                ("auto_approve", auto_approve),
                ("memory_erase", memory_erase),
                ("job_retry", job_retry),
                ("retry_submit", retry_submit),
            ] {
                out.push((f(j), format!("{kind}({j})")));
            }
            for s in steps {
                for a in [1u32, 2, 11, u32::MAX] {
                    for (kind, f) in [
                        ("n8n_result", n8n_result as fn(&str, &str, u32) -> String),
                        ("attempt_start", attempt_start),
                        ("attempt_result", attempt_result),
                        ("attempt_retry", attempt_retry),
                    ] {
                        out.push((f(j, s, a), format!("{kind}({j},{s},{a})")));
                    }
                }
            }
            for t in steps {
                out.push((memory_writeback(j, t), format!("memory_writeback({j},{t})")));
                for space in ["m/4", "m/8", "a:b/4"] {
                    out.push((
                        memory_embeddings(j, t, space),
                        format!("memory_embeddings({j},{t},{space})"),
                    ));
                }
                out.push((
                    memory_extraction(j, t),
                    format!("memory_extraction({j},{t})"),
                ));
            }
            for k in ["k", "k-1", "0193a0f2-7c1e-7000-8000-000000000000", "a.b"] {
                out.push((http_idempotent(j, k), format!("http_idempotent({j},{k})")));
                for p in steps {
                    out.push((
                        http_idempotent_part(j, k, p),
                        format!("http_idempotent_part({j},{k},{p})"),
                    ));
                }
            }
            for seq in [1u64, 12, u64::MAX] {
                out.push((projection_skip(j, seq), format!("skip({j},{seq})")));
            }
        }
        out
    }

    #[test]
    fn two_different_inputs_never_give_the_same_id() {
        let mut seen: HashMap<String, String> = HashMap::new();
        for (id, made_by) in all_ids() {
            if let Some(other) = seen.insert(id.clone(), made_by.clone()) {
                panic!("{id:?} is made by both {other} and {made_by}");
            }
        }
    }

    #[test]
    fn idempotency_keys_are_checked_and_scoped_per_client() {
        assert!(idempotency_key_is_valid(
            "0193a0f2-7c1e-7000-8000-000000000000"
        ));
        assert!(idempotency_key_is_valid("order_42.v2"));
        for bad in ["", "a:b", "a b", "é", "a\n", &"k".repeat(129)] {
            assert!(!idempotency_key_is_valid(bad), "{bad:?}");
        }
        // a client id holding `:` cannot pass for another client's key
        assert_ne!(http_idempotent("a:b", "c"), http_idempotent("a", "b:c"));
        assert_ne!(http_idempotent("a", "k"), http_idempotent("b", "k"));
    }

    #[test]
    fn a_retry_id_is_a_valid_job_id_and_never_the_same_twice() {
        let a = retry_job_id();
        assert!(crate::events::log::valid_aggregate_id(&a), "{a}");
        assert_ne!(a, retry_job_id());
    }

    #[test]
    fn no_derived_id_is_a_valid_caller_chosen_id() {
        for (id, made_by) in all_ids() {
            assert!(!caller_chosen_is_valid(&id), "{made_by} gives {id:?}");
        }
        assert!(caller_chosen_is_valid(
            "0193a0f2-7c1e-7000-8000-000000000000"
        ));
        assert!(!caller_chosen_is_valid(""));
        assert!(!caller_chosen_is_valid("a\u{0}b"));
    }
}
