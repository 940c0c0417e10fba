//! `GET /v1/jobs/{id}/events`: a job's events as Server-Sent Events, read
//! from the event log itself (not the read model, which may lag), from the
//! job's first event on, until its final event (`JobCompleted`,
//! `JobFailed`, `JobCancelled`), `[console] stream_max_seconds`, or the
//! instance's drain before it stops. The web
//! console's live view reads it; any client may.
//!
//! Each event says what happened and when (type, stream sequence, version,
//! time, and for step events the step, attempt and outcome), never the
//! event's data: inputs, outputs and messages are read with
//! `GET /v1/jobs/{id}` and `GET /v1/audit`, which the same caller may read.
//! A caller sees the jobs `GET /v1/jobs/{id}` shows it (another client's
//! job answers 404), and holds at most `[console] streams_per_client`
//! streams at once (429 beyond).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::caller::Caller;
use super::http::{ApiError, AppState};
use crate::events::envelope::{decode_commit, EventRecord};
use crate::events::log::subject_for;

/// The job events after which a job changes no more: its stream ends.
const FINAL_EVENTS: [&str; 3] = ["JobCompleted", "JobFailed", "JobCancelled"];

/// The fields of an event's data a live event repeats: what step, which
/// attempt, its outcome. Nothing a client sent or a peer answered.
/// (`n8n_execution_id`: which n8n execution answered, to find it in n8n.)
const SUMMARY_FIELDS: [&str; 6] = [
    "step",
    "attempt",
    "status",
    "error_code",
    "duration_ms",
    "n8n_execution_id",
];

/// How often a comment is sent on a quiet stream, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The live streams open now, per client, against a per-client maximum.
#[derive(Debug)]
pub struct LiveStreams {
    open: Mutex<HashMap<String, usize>>,
    per_client: usize,
    max_duration: Duration,
}

impl LiveStreams {
    /// At most `per_client` streams per client at once, each open at most
    /// `max_duration`.
    pub fn new(per_client: usize, max_duration: Duration) -> Self {
        LiveStreams {
            open: Mutex::new(HashMap::new()),
            per_client,
            max_duration,
        }
    }

    /// Takes one of `client_id`'s streams; `None` when all are in use. The
    /// stream is given back when the guard drops (its stream ends or the
    /// client goes away).
    fn take(self: &Arc<Self>, client_id: &str) -> Option<StreamGuard> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(client_id.to_string()).or_default();
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(StreamGuard {
            streams: Arc::clone(self),
            client_id: client_id.to_string(),
        })
    }
}

/// One stream taken from [`LiveStreams`], given back on drop.
struct StreamGuard {
    streams: Arc<LiveStreams>,
    client_id: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.client_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client_id);
            }
        }
    }
}

/// What one stored event shows in a live stream.
fn summary(seq: u64, index: usize, e: &EventRecord) -> Value {
    let mut out = Map::new();
    out.insert("seq".into(), json!(seq));
    out.insert("index".into(), json!(index));
    out.insert("event_type".into(), json!(e.event_type));
    out.insert("version".into(), json!(e.aggregate_version));
    out.insert("occurred_at".into(), json!(e.occurred_at));
    for field in SUMMARY_FIELDS {
        if let Some(v) = e.data.get(field) {
            if v.is_string() || v.is_number() {
                out.insert(field.into(), v.clone());
            }
        }
    }
    Value::Object(out)
}

fn sse(name: &str, id: Option<String>, data: &Value) -> Event {
    let e = Event::default().event(name).data(data.to_string());
    match id {
        Some(id) => e.id(id),
        None => e,
    }
}

#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = String, Path, description = "job id")),
    security(("bearer" = [])),
    responses((status = 200, description = "Server-Sent Events: `job_event` per stored event of the job (data: seq, index, event_type, version, occurred_at, and step, attempt, status, error_code, duration_ms, n8n_execution_id where the event has them; id: `<seq>-<index>`), from its first event; then `end` (data: reason `final` with the final event_type, `time_limit`, `draining` (this instance stops: connect again), or `log_unavailable`) and the stream closes", body = super::openapi::LiveEvent, content_type = "text/event-stream"),
              (status = 404, description = "no such job"), (status = 400, description = "bad id"),
              (status = 429, description = "this client has [console] streams_per_client streams open"),
              (status = 503, description = "the event log cannot be read")))]
pub(crate) async fn jobs_events(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    super::read::valid_id("id", &id)?;
    let unavailable = |what: String| ApiError::Request {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("the event log cannot be read ({what}); retry later"),
    };
    let job = s
        .bus
        .load_job(&id)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let visible = job.version > 0
        && caller
            .job_scope()
            .is_none_or(|own| own == job.state.client_id);
    if !visible {
        return Err(ApiError::NotFound(format!("job {id}")));
    }
    let guard = s
        .live
        .take(&caller.client_id)
        .ok_or_else(|| ApiError::TooManyStreams {
            client_id: caller.client_id.clone(),
            max: s.live.per_client,
        })?;
    let consumer = s
        .log
        .ordered_consumer(&subject_for("job", &id), 1)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + s.live.max_duration;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let mut draining = s.draining.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let mut messages = messages;
        let end = loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                // a stopping instance ends its streams: the viewer reconnects elsewhere
                _ = draining.wait_for(|d| *d) => break json!({"reason": "draining"}),
                _ = tokio::time::sleep_until(deadline) => break json!({"reason": "time_limit"}),
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(job_id = %id, error = %e, "live stream: the log read failed");
                    break json!({"reason": "log_unavailable"});
                }
                None => break json!({"reason": "log_unavailable"}),
            };
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            let records = match decode_commit(&msg.payload) {
                Ok(r) => r,
                Err(e) => {
                    // the projections park such a commit; a viewer skips it
                    tracing::warn!(job_id = %id, seq, error = %e, "live stream: a commit does not decode");
                    continue;
                }
            };
            let mut last = None;
            for (index, (_, record)) in records.iter().enumerate() {
                let data = summary(seq, index, record);
                if tx
                    .send(sse("job_event", Some(format!("{seq}-{index}")), &data))
                    .await
                    .is_err()
                {
                    return;
                }
                if FINAL_EVENTS.contains(&record.event_type.as_str()) {
                    last = Some(record.event_type.clone());
                }
            }
            if let Some(event_type) = last {
                break json!({"reason": "final", "event_type": event_type});
            }
        };
        // the viewer may be gone already: nothing to do then
        let _ = tx.send(sse("end", None, &end)).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_its_streams_and_gets_them_back() {
        let streams = Arc::new(LiveStreams::new(2, Duration::from_secs(1)));
        let a = streams.take("billing").expect("first of two");
        let b = streams.take("billing").expect("second of two");
        assert!(streams.take("billing").is_none(), "a third is refused");
        assert!(streams.take("ops").is_some(), "another client has its own");
        drop(a);
        let c = streams.take("billing").expect("one was given back");
        drop((b, c));
        assert!(streams.open.lock().unwrap().is_empty());
    }

    #[test]
    fn a_summary_names_the_step_but_not_what_was_sent_or_answered() {
        let record: EventRecord = serde_json::from_value(json!({
            "event_id": "0190f1a0-0000-7000-8000-000000000000",
            "aggregate_type": "job", "aggregate_id": "j-1", "aggregate_version": 3,
            "event_type": "StepResultRecorded", "schema_version": "1.0",
            "occurred_at": "2026-12-05T10:00:00.000001Z",
            "actor": {"client_id": "flowledger-handler"},
            "command_id": "c", "correlation_id": "c", "causation_id": "c",
            "prev_hash": "00",
            "data": {"step": "ocr", "attempt": 1, "status": "failed", "duration_ms": 12,
                     "error_code": "peer_error", "error_message": "the card 4111 was refused",
                     "output": {"secret": "planted"}}
        }))
        .unwrap();
        let s = summary(7, 0, &record);
        assert_eq!(s["step"], "ocr");
        assert_eq!(s["status"], "failed");
        assert_eq!(s["seq"], 7);
        let text = s.to_string();
        assert!(
            !text.contains("planted") && !text.contains("4111"),
            "{text}"
        );
    }
}
