//! Outgoing callbacks: when a job ends, its result is POSTed to the job's
//! `callback_url`, signed (see `crate::crypto`), retried with backoff; the
//! outcome is a `CallbackDelivered` or `CallbackFailed` event on the job.

use std::time::Duration;

use tracing::Instrument;

use crate::commands::job::RecordCallback;
use crate::crypto::{HDR_SIGNATURE, HDR_TIMESTAMP};
use crate::handlers::executor::{callback_body, record_callback};
use crate::handlers::peer::HDR_IDEMPOTENCY_KEY;
use crate::handlers::view::JobView;
use crate::handlers::Ctx;

/// The URL as recorded in events: without userinfo, query and fragment,
/// which may carry a receiver's credentials.
pub fn target_of(url: &str) -> String {
    crate::commands::redact::strip(url)
}

/// The URL to deliver to: the recorded one, or, when the submission's
/// credentials were sealed, the whole submitted URL opened with the
/// configured ring. The error says why it cannot be opened (no secret).
fn open_url(ctx: &Ctx, view: &JobView) -> Result<String, String> {
    let recorded = view.callback_url.clone().unwrap_or_default();
    let Some(sealed) = &view.callback_url_sealed else {
        return Ok(recorded);
    };
    let Some(keys) = ctx.config.callback_sealer.as_ref() else {
        return Err(format!(
            "the callback_url's credentials are sealed with key {:?} and no seal key ring \
             is configured (callbacks.seal_keys_env); not delivered",
            sealed.key_id
        ));
    };
    let opened = keys.open(sealed).map_err(|e| {
        format!("the callback_url's credentials cannot be opened: {e}; not delivered")
    })?;
    String::from_utf8(opened)
        .map_err(|_| "the callback_url's sealed credentials are not UTF-8; not delivered".into())
}

/// Delivers the ended job's result to its `callback_url` (if any), up to
/// `callback_max_attempts` times, and records the outcome on the job;
/// without a signing key nothing is sent and that is recorded.
pub async fn deliver(ctx: &Ctx, view: &JobView) {
    let Some(recorded) = view.callback_url.as_deref() else {
        return;
    };
    let target = target_of(recorded);
    let url = match open_url(ctx, view) {
        Ok(url) => url,
        Err(why) => {
            // a check that cannot be completed fails: the job's callback is
            // recorded as failed, not sent to the URL without its credentials
            tracing::error!(job_id = %view.job_id, %target, "{why}");
            let outcome = RecordCallback {
                target,
                attempts: 0,
                status_code: None,
                error_message: Some(why),
            };
            record_callback(ctx, &view.job_id, outcome).await;
            return;
        }
    };
    let url = url.as_str();
    let Some(key) = ctx.config.callback_key.as_ref() else {
        let outcome = RecordCallback {
            target,
            attempts: 0,
            status_code: None,
            error_message: Some(
                "no callback signing key is configured (FLOWLEDGER_CALLBACK_KEY); \
                 unsigned callbacks are never sent"
                    .into(),
            ),
        };
        record_callback(ctx, &view.job_id, outcome).await;
        return;
    };
    let body = callback_body(view).to_string();
    let max = ctx.config.callback_max_attempts.max(1);
    let mut last_error = String::new();
    // the delivery's span, in the job's trace; the receiver is sent its
    // `traceparent` (ids and the outcome only: no URL, no body)
    let span = tracing::info_span!(
        "callback",
        job_id = %view.job_id,
        attempts = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let trace = crate::telemetry::traceparent(&span);
    for attempt in 1..=max {
        span.record("attempts", attempt);
        let ts = chrono::Utc::now().timestamp();
        let mut request = ctx.http.post(url);
        if let Some(t) = &trace {
            request = request.header(crate::telemetry::TRACEPARENT, t);
        }
        let sent = request
            .header("Content-Type", "application/json")
            .header(HDR_TIMESTAMP, ts.to_string())
            .header(HDR_SIGNATURE, key.sign(ts, body.as_bytes()))
            .header(HDR_IDEMPOTENCY_KEY, format!("{}:callback", view.job_id))
            .timeout(ctx.config.callback_timeout)
            .body(body.clone())
            .send()
            .instrument(span.clone())
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                span.record("outcome", "delivered");
                metrics::counter!("flowledger_callbacks_total", "outcome" => "delivered")
                    .increment(1);
                let outcome = RecordCallback {
                    target,
                    attempts: attempt,
                    status_code: Some(r.status().as_u16()),
                    error_message: None,
                };
                record_callback(ctx, &view.job_id, outcome).await;
                return;
            }
            Ok(r) => last_error = format!("receiver answered {}", r.status()),
            Err(e) if e.is_timeout() => {
                last_error = format!(
                    "no answer within {} ms",
                    ctx.config.callback_timeout.as_millis()
                )
            }
            Err(e) => last_error = format!("cannot reach the receiver: {}", e.without_url()),
        }
        tracing::info!(
            job_id = view.job_id,
            attempt,
            error = last_error,
            "callback not delivered"
        );
        if attempt < max {
            let wait = ctx.config.retry.delay(attempt);
            // a drain does not wait for a backoff: the partition's next
            // holder delivers again (same Idempotency-Key)
            if super::executor::pause_unless_given_away(ctx, &view.job_id, wait)
                .await
                .is_err()
            {
                return;
            }
        }
    }
    span.record("outcome", "failed");
    metrics::counter!("flowledger_callbacks_total", "outcome" => "failed").increment(1);
    let outcome = RecordCallback {
        target,
        attempts: max,
        status_code: None,
        error_message: Some(format!("{max} attempts failed; last: {last_error}")),
    };
    record_callback(ctx, &view.job_id, outcome).await;
}

/// Default time a receiver has to answer one delivery.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    #[test]
    fn target_drops_the_query() {
        assert_eq!(
            super::target_of("https://r.example/cb?token=abc"),
            "https://r.example/cb"
        );
    }
}
