//! OpenTelemetry traces: the whole service (HTTP API, projections, job
//! handler) in one process on real nats-server and PostgreSQL, its spans
//! exported by the real OTLP/HTTP exporter to a collector stand-in (an HTTP
//! server taking `POST /v1/traces` in protobuf and writing each span it
//! decodes to a file). One job submitted with a client `traceparent` is one
//! trace from the intake to each step call, and the step peers receive it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use flowledger::config::TelemetrySection;
use flowledger::logging::{self, Format};
use flowledger::telemetry::Traces;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

/// The client's trace: its trace id and the span id of its own call.
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// One span as the stand-in decoded it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    service: String,
}

/// The collector stand-in: answers `POST /v1/traces` like an OTLP/HTTP
/// receiver (protobuf in, an empty `ExportTraceServiceResponse` out) and
/// appends one JSON line per span to its file.
struct Collector {
    url: String,
    file: PathBuf,
}

async fn receive(
    State(file): State<Arc<PathBuf>>,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut lines = String::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| text(&v.value))
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            let attributes: serde_json::Map<String, Value> = span
                .attributes
                .iter()
                .map(|kv| {
                    let v = kv
                        .value
                        .as_ref()
                        .map(|v| text(&v.value))
                        .unwrap_or_default();
                    (kv.key.clone(), json!(v))
                })
                .collect();
            let line = json!({
                "trace_id": hex::encode(&span.trace_id),
                "span_id": hex::encode(&span.span_id),
                "parent": hex::encode(&span.parent_span_id),
                "name": span.name,
                "attributes": attributes,
                "service": service,
            });
            lines.push_str(&format!("{line}\n"));
        }
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&*file)
        .expect("the collector's file opens");
    f.write_all(lines.as_bytes())
        .expect("the collector writes its file");
    (
        axum::http::StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// An attribute's value as text.
fn text(v: &Option<AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl Collector {
    async fn start(dir: &Path) -> Collector {
        let file = dir.join("spans.jsonl");
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(Arc::new(file.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Collector { url, file }
    }

    fn spans(&self) -> Vec<Span> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("a span line");
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                Span {
                    trace_id: s("trace_id"),
                    span_id: s("span_id"),
                    parent: s("parent"),
                    name: s("name"),
                    attributes: v["attributes"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect(),
                    service: s("service"),
                }
            })
            .collect()
    }
}

/// Polls the job's status until it is final (30 s at most).
async fn settled_status(api: &ReadSide, job_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = api.get(&format!("/v1/jobs/{job_id}/status")).await;
        let status = body["status"].as_str().unwrap_or_default().to_string();
        if code == 200 && matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} not final in 30 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One job's trace; in its own process ([`ran_alone`]: beside
/// `handlers::` the commit and step spans went missing).
#[tokio::test]
async fn one_job_is_one_trace_from_the_client_through_intake_commit_handler_and_each_step_call() {
    if ran_alone("tracing::one_job_is_one_trace_from_the_client_through_intake_commit_handler_and_each_step_call").await {
        return;
    }
    one_job_traced().await
}

async fn one_job_traced() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let collector = Collector::start(dir.path()).await;
    let traces = Traces::start(&TelemetrySection {
        otlp_endpoint: Some(collector.url.clone()),
        service_name: Some("flowledger-under-test".into()),
    })
    .expect("the exporter starts")
    .expect("an endpoint starts an exporter");
    // the subscriber `serve` installs, on this test's (single) thread
    let subscriber = logging::subscriber(
        // no log line at all: the traces do not depend on the log filter
        logging::filter(Some("off")).expect("a filter"),
        Format::Text { ansi: false },
        Some(&traces),
    );
    tracing::subscriber::set_global_default(subscriber)
        .expect("the child process has no subscriber yet");

    let app = spawn_app().await;
    let peer = Peer::start().await;
    let price = peer.script(
        "/price",
        vec![peers::ok(20, json!({"price": "planted-77"}))],
    );
    let stock = peer.script("/stock", vec![peers::ok(20, json!({"stock": 3}))]);
    let registry = parse_registry(one_workflow(
        json!([
            solver("price", &price, 5000, 1),
            solver("stock", &stock, 5000, 1)
        ]),
        json!({}),
    ));
    let receiver = peer.script("/cb", vec![peers::ok(5, json!({}))]);
    let mut config = test_handler_config();
    config.callback_key = Some(
        flowledger::crypto::SigningKey::new(b"test-callback-secret-0123").expect("a long key"),
    );
    let api = spawn_service(&app, registry, config).await;
    let client_traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let body = json!({"job_id": "traced-1", "workflow_key": "w",
                      "inputs": {"card": "planted-4111"}, "callback_url": receiver});
    let a = api
        .send(
            "POST",
            "/v1/jobs",
            Some(BILLING_TOKEN),
            Some(body.to_string().into_bytes()),
            &[
                ("content-type", "application/json"),
                ("traceparent", &client_traceparent),
            ],
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(settled_status(&api, "traced-1").await, "completed");
    eventually("the result callback", || peer.received("/cb").len() == 1).await;
    // another write route in the same trace: a cancel of the finished job
    // (refused: it is final) still has its intake span, with the job's id
    let cancel = api
        .send(
            "POST",
            "/v1/jobs/traced-1/cancel",
            Some(BILLING_TOKEN),
            Some(br#"{"reason":"late"}"#.to_vec()),
            &[
                ("content-type", "application/json"),
                ("traceparent", &client_traceparent),
            ],
        )
        .await;
    assert_eq!(cancel.status, 409, "{}", cancel.body);
    // a secret read and a memory command: this service has neither
    // capability (an error answer), but each route opens its intake
    for path in ["/v1/secrets/read", "/v1/memory/writeback"] {
        let a = api
            .send(
                "POST",
                path,
                Some(BILLING_TOKEN),
                Some(br#"{}"#.to_vec()),
                &[
                    ("content-type", "application/json"),
                    ("traceparent", &client_traceparent),
                ],
            )
            .await;
        assert!(a.status >= 400, "{path}: {} {}", a.status, a.body);
    }

    // every span still batched is exported on shutdown, as `serve` stops
    traces.shutdown().await;
    let spans = collector.spans();
    assert!(!spans.is_empty(), "the collector received no span");
    // the status polls above are requests of their own, with no traceparent
    let polls = "GET /v1/jobs/{id}/status";
    let strays: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id != CLIENT_TRACE && s.name != polls)
        .collect();
    assert!(
        strays.is_empty(),
        "spans outside the client's trace: {strays:#?}"
    );
    assert!(spans.iter().all(|s| s.service == "flowledger-under-test"));
    assert!(spans
        .iter()
        .any(|s| s.name == polls && s.trace_id != CLIENT_TRACE));
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.name != polls).collect();
    let named = |name: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == name).collect() };
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &Span| by_id.get(s.parent.as_str()).copied();

    // the HTTP request continues the client's call
    let request = spans
        .iter()
        .find(|s| s.name == "POST /v1/jobs")
        .expect("the request's span");
    assert_eq!(request.parent, CLIENT_SPAN);
    // each write route's request has one intake span of its command, its
    // child: (route, command) -> the intake
    let intake_of = |route: &str, command: &str| -> &Span {
        let request = spans
            .iter()
            .find(|s| s.name == route)
            .unwrap_or_else(|| panic!("the span of {route}: {spans:#?}"));
        assert_eq!(request.parent, CLIENT_SPAN, "{route}");
        let theirs: Vec<&Span> = named("intake")
            .into_iter()
            .filter(|s| s.attributes.get("command").is_some_and(|c| c == command))
            .collect();
        assert_eq!(theirs.len(), 1, "{command}: {spans:#?}");
        assert_eq!(theirs[0].parent, request.span_id, "{command}");
        assert_eq!(theirs[0].attributes["door"], "http", "{command}");
        theirs[0]
    };
    // the submission's intake, its commit in the intake
    let intake = intake_of("POST /v1/jobs", "job.submit");
    assert_eq!(intake.attributes["job_id"], "traced-1");
    let submitted = named("commit")
        .into_iter()
        .find(|c| c.parent == intake.span_id)
        .unwrap_or_else(|| panic!("the submission's commit span: {spans:#?}"));
    assert_eq!(submitted.attributes["aggregate_id"], "traced-1");
    // the cancel's, with the job's id from its path
    let cancel = intake_of("POST /v1/jobs/{id}/cancel", "job.cancel");
    assert_eq!(cancel.attributes["job_id"], "traced-1");
    // the secret read's and the memory command's
    intake_of("POST /v1/secrets/read", "secret.read");
    intake_of("POST /v1/memory/{command}", "memory.writeback");
    // across JetStream: the handler continues from the commit's header
    let handler = named("handler");
    assert!(!handler.is_empty(), "no handler span in {spans:#?}");
    assert!(
        handler.iter().all(|h| h.parent == submitted.span_id),
        "{handler:#?}"
    );
    assert_eq!(handler[0].attributes["workflow_key"], "w");
    // the handler's own commands commit in its trace
    assert!(named("commit")
        .iter()
        .any(|c| parent_of(c).is_some_and(|p| p.name == "handler" || p.name == "step_call")));
    // one step call per step, in the handler's span
    let calls = named("step_call");
    let mut steps: Vec<&str> = calls
        .iter()
        .map(|c| c.attributes["step"].as_str())
        .collect();
    steps.sort();
    assert_eq!(steps, ["price", "stock"], "{calls:#?}");
    for c in &calls {
        assert_eq!(parent_of(c).map(|p| p.name.as_str()), Some("handler"));
        assert_eq!(c.attributes["outcome"], "succeeded");
        assert_eq!(c.attributes["attempt"], "1");
    }
    // what the client sent and the peers answered is in no span
    let all = format!("{spans:?}");
    assert!(
        !all.contains("planted-4111") && !all.contains("planted-77"),
        "{all}"
    );

    // each peer got a traceparent of the same trace, naming its step call
    for (path, step) in [("/price", "price"), ("/stock", "stock")] {
        let got = peer.received(path);
        assert_eq!(got.len(), 1, "{path}");
        let tp = got[0]
            .headers
            .get("traceparent")
            .unwrap_or_else(|| panic!("{path} received no traceparent: {:?}", got[0].headers));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], CLIENT_TRACE, "{tp}");
        let call = by_id.get(parts[2]).expect("the peer's parent is exported");
        assert_eq!(
            (call.name.as_str(), call.attributes["step"].as_str()),
            ("step_call", step)
        );
    }

    // the result callback too, from its own span in the handler's
    let got = peer.received("/cb");
    let tp = got[0]
        .headers
        .get("traceparent")
        .unwrap_or_else(|| panic!("the callback has no traceparent: {:?}", got[0].headers));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.get(1), Some(&CLIENT_TRACE), "{tp}");
    let callback = by_id
        .get(parts[2])
        .expect("the callback's span is exported");
    assert_eq!(callback.name, "callback");
    assert_eq!(callback.attributes["outcome"], "delivered");
    assert_eq!(
        parent_of(callback).map(|p| p.name.as_str()),
        Some("handler")
    );

    // the context rode in the commit's header, outside the chained body:
    // the log still verifies, with the Rust verifier and the Python one
    let first = app.log.get(1).await.expect("read").expect("a message");
    let stored = flowledger::telemetry::header_of(Some(&first.headers));
    assert!(stored.is_some_and(|t| t.contains(CLIENT_TRACE)));
    assert!(!String::from_utf8_lossy(&first.payload).contains(CLIENT_TRACE));
    let (_d, out, ring) =
        crate::audit::export_to(&app, &flowledger::audit::read::Filter::default()).await;
    crate::audit::verify_both(&out, Some(&ring), false).expect("history verifies");
}

#[tokio::test]
async fn without_an_endpoint_no_exporter_starts_and_check_config_says_so() {
    assert!(Traces::start(&TelemetrySection::default())
        .expect("no error")
        .is_none());
    let run = |envs: &[(&str, &str)]| {
        let mut c = check_config_command();
        c.env("FLOWLEDGER_CALLBACK_KEY", "ab".repeat(32))
            .env_remove("FLOWLEDGER_CONFIG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("FLOWLEDGER_TELEMETRY__OTLP_ENDPOINT");
        output_with(c, envs)
    };
    let (code, stdout, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("traces (OTLP): off (no [telemetry] otlp_endpoint, no exporter started)"),
        "{stdout}"
    );
    // the standard variable turns them on; the setting of ours wins over it
    let (code, stdout, stderr) = run(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_SERVICE_NAME", "billing-backbone"),
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(
            "traces (OTLP): on, OTLP/HTTP protobuf to http://127.0.0.1:4318/v1/traces as service \"billing-backbone\""
        ),
        "{stdout}"
    );
    let (code, stdout, stderr) = run(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        (
            "FLOWLEDGER_TELEMETRY__OTLP_ENDPOINT",
            "https://collector.example:4318/",
        ),
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("to https://collector.example:4318/v1/traces as service \"flowledger\""),
        "{stdout}"
    );
    // a bad endpoint is refused, naming the setting (and no credential)
    for bad in ["grpc://x:4317", "https://user:planted-pw@x:4318"] {
        let (code, _, stderr) = run(&[("FLOWLEDGER_TELEMETRY__OTLP_ENDPOINT", bad)]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("telemetry.otlp_endpoint"), "{stderr}");
        assert!(!stderr.contains("planted-pw"), "{stderr}");
    }
}
