//! Peers outside the system, played by small HTTP servers that behave like
//! real ones: they take time to answer, fail with 5xx or 4xx, hang past a
//! timeout, answer n8n-style "202 accepted", and record what they were sent
//! (idempotency keys, how many calls were in flight at once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{json, Value};

/// One answer: wait `delay_ms`, then answer `status` with `body`; then,
/// like an n8n workflow that answered 202, post a signed result later.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) delay_ms: u64,
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) then: Option<LaterResult>,
    /// Headers of the answer (an n8n execution id).
    pub(crate) headers: Vec<(&'static str, String)>,
}

/// A result an n8n peer posts to the request's `callback_url`.
#[derive(Debug, Clone)]
pub(crate) struct LaterResult {
    pub(crate) after_ms: u64,
    pub(crate) key: Vec<u8>,
    pub(crate) output: Value,
    /// `succeeded`, or a failure (`failed`, `timed_out`, with an error code).
    pub(crate) status: &'static str,
}

/// n8n answering "accepted", then posting `output` as a signed result to
/// the `callback_url` it was sent, `after_ms` later.
pub(crate) fn n8n_accepts(after_ms: u64, key: &[u8], output: Value) -> Reply {
    Reply {
        delay_ms: 5,
        status: 202,
        body: json!({"message": "Workflow was started"}),
        then: Some(LaterResult {
            after_ms,
            key: key.to_vec(),
            output,
            status: "succeeded",
        }),
        headers: vec![],
    }
}

/// n8n answering synchronously (the Respond to Webhook node), naming its
/// execution in the `X-N8n-Execution-Id` header as the kit's templates do.
pub(crate) fn n8n_answers(body: Value, execution_id: &str) -> Reply {
    Reply {
        headers: vec![("x-n8n-execution-id", execution_id.to_string())],
        ..ok(5, body)
    }
}

/// n8n answering "accepted", then posting, `after_ms` later, that its
/// workflow ended with `status` (`failed` or `timed_out`).
pub(crate) fn n8n_accepts_then_reports(after_ms: u64, key: &[u8], status: &'static str) -> Reply {
    let mut reply = n8n_accepts(after_ms, key, Value::Null);
    if let Some(later) = reply.then.as_mut() {
        later.status = status;
    }
    reply
}

/// A request a peer sent (an n8n result callback), as it went out.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub(crate) url: String,
    pub(crate) timestamp: String,
    pub(crate) body: String,
    pub(crate) status: u16,
}

/// Signs and posts an n8n result, as n8n's HTTP Request node would.
pub(crate) async fn post_signed(url: &str, key: &[u8], timestamp: i64, body: &str) -> Sent {
    use flowledger::crypto::{SigningKey, HDR_SIGNATURE, HDR_TIMESTAMP};
    let signature = SigningKey::new(key)
        .expect("a test key of 16+ bytes")
        .sign(timestamp, body.as_bytes());
    let status = flowledger::handlers::http_client_builder()
        .build()
        .expect("an HTTP client")
        .post(url)
        .header("content-type", "application/json")
        .header(HDR_TIMESTAMP, timestamp.to_string())
        .header(HDR_SIGNATURE, &signature)
        .body(body.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    Sent {
        url: url.into(),
        timestamp: timestamp.to_string(),
        body: body.into(),
        status,
    }
}

pub(crate) fn ok(delay_ms: u64, body: Value) -> Reply {
    Reply {
        delay_ms,
        status: 200,
        body,
        then: None,
        headers: vec![],
    }
}

pub(crate) fn status(delay_ms: u64, status: u16) -> Reply {
    Reply {
        body: json!({"error": format!("peer says {status}")}),
        status,
        ..ok(delay_ms, json!(null))
    }
}

/// Never answers in time.
pub(crate) fn hang() -> Reply {
    ok(60_000, json!({}))
}

#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) path: String,
    /// The query string as received, if any.
    pub(crate) query: Option<String>,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: Value,
    pub(crate) raw: Bytes,
}

#[derive(Default)]
struct PeerState {
    /// Per path: answers given in order; the last one repeats.
    scripts: Mutex<HashMap<String, (Vec<Reply>, usize)>>,
    received: Mutex<Vec<Received>>,
    sent: Mutex<Vec<Sent>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) url: String,
    state: Arc<PeerState>,
}

async fn answer(
    State(s): State<Arc<PeerState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let path = uri.path().to_string();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.received.lock().unwrap().push(Received {
        path: path.clone(),
        query: uri.query().map(str::to_string),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_lowercase(),
                    v.to_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw: body.clone(),
    });
    let reply = {
        let mut scripts = s.scripts.lock().unwrap();
        match scripts.get_mut(&path) {
            Some((replies, next)) => {
                let r = replies[(*next).min(replies.len() - 1)].clone();
                *next += 1;
                r
            }
            None => status(0, 404),
        }
    };
    struct Leave(Arc<PeerState>);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _leave = Leave(s.clone());
    tokio::time::sleep(Duration::from_millis(reply.delay_ms)).await;
    if let (Some(later), Some(url)) = (reply.then.clone(), request["callback_url"].as_str()) {
        let (s, url) = (s.clone(), url.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(later.after_ms)).await;
            let mut result = json!({
                "job_id": request["job_id"], "step": request["step"],
                "attempt": request["attempt"], "nonce": uuid::Uuid::new_v4().to_string(),
                "status": later.status, "output": later.output, "duration_ms": later.after_ms,
            });
            if later.status != "succeeded" {
                result["error_code"] = json!(format!("n8n_{}", later.status));
                result["error_message"] = json!("the n8n workflow reported a failure");
            }
            let now = chrono::Utc::now().timestamp();
            let sent = post_signed(&url, &later.key, now, &result.to_string()).await;
            s.sent.lock().unwrap().push(sent);
        });
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &reply.headers {
        headers.insert(*name, value.parse().expect("a header value"));
    }
    (
        StatusCode::from_u16(reply.status).unwrap(),
        headers,
        axum::Json(reply.body),
    )
}

impl Peer {
    pub(crate) async fn start() -> Peer {
        let state = Arc::new(PeerState::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a peer");
        let url = format!("http://{}", listener.local_addr().expect("peer address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Peer { url, state }
    }

    /// Sets the answers of `path`.
    pub(crate) fn script(&self, path: &str, replies: Vec<Reply>) -> String {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_string(), (replies, 0));
        format!("{}{path}", self.url)
    }

    pub(crate) fn received(&self, path: &str) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// The result callbacks this peer posted, in order.
    pub(crate) fn sent(&self) -> Vec<Sent> {
        self.state.sent.lock().unwrap().clone()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}
