//! The n8n kit (workflows/n8n/, docs/CALLBACKS.md "The n8n kit") without
//! n8n: the templates the registry names exist and are n8n workflows whose
//! webhooks are the registry's URLs, and the 202 template's result, signed
//! the way its Crypto and HTTP Request nodes say, is accepted by
//! `POST /v1/callbacks/n8n` of a real API. Also: n8n's execution id, sent
//! in a synchronous answer's header or in a result callback, is recorded
//! with the step's result and shown in the job's timeline. scripts/n8n-try.sh
//! runs the same templates in a real n8n.

use std::collections::BTreeMap;
use std::path::Path;

use flowledger::commands::job::JobStatus;
use flowledger::commands::registry::{Registry, StepKind, DEFAULT_REGISTRY_PATH};
use hmac::Mac;
use serde_json::{json, Value};

use crate::console::{open_stream, read_to_end};
use crate::handlers::handler_with_api;
use crate::helpers::*;
use crate::peers::{self, Peer};

/// The shipped registry, loaded as `serve` loads it (every `template`
/// file must exist), and each n8n step's template as JSON.
fn shipped_templates() -> Vec<(String, String, Value)> {
    let path = Path::new(DEFAULT_REGISTRY_PATH);
    let registry = Registry::load(path).expect("the shipped registry loads");
    let dir = path.parent().expect("the registry is in a directory");
    let mut out = Vec::new();
    for (key, wf) in &registry.workflows {
        for step in wf.steps.iter().filter(|s| s.kind == StepKind::N8n) {
            let template = step
                .template
                .as_deref()
                .unwrap_or_else(|| panic!("{key}.{}: an n8n step names its template", step.name));
            let text = std::fs::read_to_string(dir.join(template)).expect("the template reads");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{template} is not JSON: {e}"));
            out.push((step.url.clone(), template.to_string(), json));
        }
    }
    out
}

/// The template's one node whose `field` is `value` (its `type`, its
/// `name`).
fn node_by<'a>(template: &'a Value, field: &str, value: &str) -> &'a Value {
    let nodes: Vec<&Value> = template["nodes"]
        .as_array()
        .expect("a workflow has nodes")
        .iter()
        .filter(|n| n[field] == value)
        .collect();
    assert_eq!(nodes.len(), 1, "one node of {field} {value}");
    nodes[0]
}

/// The parameters of the template's one node of `node_type`.
fn node<'a>(template: &'a Value, node_type: &str) -> &'a Value {
    &node_by(template, "type", node_type)["parameters"]
}

/// An n8n expression (`=` then text with `{{ $json.<field> }}`) with the
/// item's fields put in, as n8n renders it; anything else in braces fails
/// the test (it is not what the callback contract expects).
fn render(expression: &Value, item: &BTreeMap<&str, String>) -> String {
    let text = expression
        .as_str()
        .and_then(|t| t.strip_prefix('='))
        .unwrap_or_else(|| panic!("{expression} is not an n8n expression"));
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find("}}").expect("an expression closes") + at;
        let inner = rest[at + 2..end].trim();
        let field = inner
            .strip_prefix("$json.")
            .unwrap_or_else(|| panic!("{inner:?} is not $json.<field>"));
        out.push_str(
            item.get(field)
                .unwrap_or_else(|| panic!("the item has no field {field}")),
        );
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The names of the fields of the object a `JSON.stringify({ ... })`
/// expression builds, in order (the top level only).
fn stringified_fields(expression: &str) -> Vec<String> {
    let start = expression
        .find("JSON.stringify({")
        .expect("the body is JSON.stringify({...})")
        + "JSON.stringify({".len();
    let (mut depth, mut fields, mut word, mut words) = (0i32, Vec::new(), String::new(), true);
    for c in expression[start..].chars() {
        match c {
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' if depth == 0 => break,
            '}' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                words = true;
                word.clear();
                continue;
            }
            ':' if depth == 0 && words => {
                fields.push(word.trim().to_string());
                words = false;
            }
            _ => {}
        }
        if words {
            word.push(c);
        }
    }
    fields
}

#[test]
fn every_n8n_step_names_a_template_that_serves_its_webhook() {
    let templates = shipped_templates();
    assert_eq!(templates.len(), 2, "payment.release and report.daily");
    for (url, file, t) in &templates {
        let hook = node(t, "n8n-nodes-base.webhook");
        assert_eq!(hook["httpMethod"], "POST", "{file}");
        let path = hook["path"].as_str().expect("a webhook path");
        assert!(
            url.ends_with(&format!("/webhook/{path}")),
            "{file}: webhook path {path:?} is not the registry's URL {url}"
        );
        assert!(
            t["name"].is_string() && t["connections"].is_object(),
            "{file}"
        );
    }
}

/// A job on a 202 n8n step, its result posted by the test as the
/// report-daily template says: the body its "Callback body" node builds,
/// signed by its Crypto node, sent by its HTTP Request node.
#[tokio::test]
async fn the_202_templates_signed_result_is_accepted() {
    let (_, file, t) = shipped_templates()
        .into_iter()
        .find(|(_, _, t)| node(t, "n8n-nodes-base.webhook")["responseMode"] == "onReceived")
        .expect("a template that answers 202 at once");
    let hook = node(&t, "n8n-nodes-base.webhook");
    let code = &hook["options"]["responseCode"]["values"];
    assert_eq!(code["responseCode"], "customCode", "{file}");
    assert_eq!(code["customCode"], 202, "{file}: n8n answers 202 at once");
    let crypto = node(&t, "n8n-nodes-base.crypto");
    assert_eq!(crypto["action"], "hmac", "{file}");
    assert_eq!(crypto["type"], "SHA256", "{file}");
    assert_eq!(crypto["encoding"], "hex", "{file}");
    // the key is in n8n's Crypto credential (its Hmac Secret), not the file
    let sign = node_by(&t, "type", "n8n-nodes-base.crypto");
    assert!(sign["credentials"]["crypto"]["name"].is_string(), "{file}");
    let http = node(&t, "n8n-nodes-base.httpRequest");
    assert_eq!(http["method"], "POST", "{file}");
    assert_eq!(http["sendBody"], true, "{file}");
    assert_eq!(
        http["contentType"], "raw",
        "the signed bytes are the sent bytes"
    );
    assert_eq!(http["rawContentType"], "application/json", "{file}");
    let headers: BTreeMap<String, Value> = http["headerParameters"]["parameters"]
        .as_array()
        .expect("the HTTP Request node sends headers")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                h["value"].clone(),
            )
        })
        .collect();
    let mut names: Vec<&str> = headers.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["X-Flowledger-Signature", "X-Flowledger-Timestamp"],
        "{file}"
    );
    let set = &node_by(&t, "name", "Callback body")["parameters"];
    let assigned: BTreeMap<String, String> = set["assignments"]["assignments"]
        .as_array()
        .expect("the Set node assigns fields")
        .iter()
        .map(|a| {
            let v = a["value"].as_str().unwrap_or_default().to_string();
            (a["name"].as_str().unwrap_or_default().to_string(), v)
        })
        .collect();
    let fields = stringified_fields(&assigned["body"]);
    for required in [
        "job_id",
        "step",
        "attempt",
        "nonce",
        "status",
        "duration_ms",
    ] {
        assert!(
            fields.iter().any(|f| f == required),
            "{file} sends no {required}: {fields:?}"
        );
    }

    let app = spawn_app().await;
    let peer = Peer::start().await;
    let url = peer.script("/webhook/report-daily", vec![peers::status(5, 202)]);
    let registry = one_workflow(
        json!([{"name": "report", "kind": "n8n", "url": url, "timeout_ms": 30_000, "max_attempts": 1}]),
        json!({}),
    );
    let (h, api) = handler_with_api(&app, registry).await;
    h.submit("kit-202", "w", json!({"input": {"day": "2026-12-07"}}))
        .await;
    eventually("n8n to be called", || {
        peer.received("/webhook/report-daily").len() == 1
    })
    .await;
    let call = peer.received("/webhook/report-daily")[0].body.clone();

    // the item the Set node makes, its body with the fields it names
    let values = json!({
        "job_id": call["job_id"], "step": call["step"], "attempt": call["attempt"],
        "nonce": format!("n8n-4711-{}", uuid::Uuid::new_v4()), "status": "succeeded",
        "output": {"report": "12 jobs, 0 failed"}, "duration_ms": 20,
        "n8n_execution_id": "4711",
    });
    // an execution id that is no id: refused, nothing recorded
    let mut refused = values.clone();
    refused["n8n_execution_id"] = json!("not an id!");
    let now = chrono::Utc::now().timestamp();
    let callback_url = call["callback_url"].as_str().expect("a callback_url");
    let sent = peers::post_signed(callback_url, N8N_KEY, now, &refused.to_string()).await;
    assert_eq!(sent.status, 400, "{}", sent.body);

    let mut body = serde_json::Map::new();
    for f in &fields {
        let v = values
            .get(f.as_str())
            .unwrap_or_else(|| panic!("{file} sends {f}: not a callback field"));
        body.insert(f.clone(), v.clone());
    }
    let mut item = BTreeMap::new();
    item.insert("timestamp", chrono::Utc::now().timestamp().to_string());
    item.insert("body", Value::Object(body).to_string());
    item.insert(
        "callback_url",
        call["callback_url"]
            .as_str()
            .expect("a callback_url")
            .to_string(),
    );
    // the Crypto node: HMAC-SHA256 of its value, keyed with the n8n key, hex
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(N8N_KEY).expect("any key length");
    mac.update(render(&crypto["value"], &item).as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    item.insert(
        crypto["dataPropertyName"]
            .as_str()
            .expect("where the HMAC goes"),
        signature,
    );
    // the HTTP Request node
    let mut post = reqwest::Client::new()
        .post(render(&http["url"], &item))
        .header("content-type", "application/json")
        .body(render(&http["body"], &item));
    for (name, value) in &headers {
        post = post.header(name, render(value, &item));
    }
    let answer = post.send().await.expect("the API answers");
    let status = answer.status().as_u16();
    assert_eq!(
        status,
        200,
        "{file}: {}",
        answer.text().await.unwrap_or_default()
    );

    let v = h.settled("kit-202").await;
    assert_eq!(v.status, JobStatus::Completed, "{:?}", v.error_message);
    assert_eq!(
        v.outputs,
        json!({"report": {"report": "12 jobs, 0 failed"}})
    );
    let result = v
        .audit
        .iter()
        .find(|a| a.action == "StepResultRecorded")
        .expect("the result is recorded");
    assert_eq!(result.details["n8n_execution_id"], "4711");
    let (events, _, _) = read_to_end(open_stream(&api, "kit-202", OPERATOR_TOKEN).await).await;
    let recorded: Vec<&Value> = events
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["event_type"] == "StepResultRecorded")
        .collect();
    assert_eq!(recorded.len(), 1, "{events:?}");
    assert_eq!(
        recorded[0]["n8n_execution_id"], "4711",
        "the timeline shows it"
    );
    api.caught_up(&app.log).await;
    let (_, rows) = api
        .get("/v1/audit?job_id=kit-202&action=StepResultRecorded")
        .await;
    assert_eq!(
        rows["items"][0]["n8n_execution_id"], "4711",
        "the audit trail shows it: {rows}"
    );
}

#[tokio::test]
async fn a_synchronous_answers_execution_id_is_recorded_and_a_bad_one_is_not() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let good = peer.script(
        "/webhook/good",
        vec![peers::n8n_answers(json!({"released": true}), "981")],
    );
    let bad = peer.script(
        "/webhook/bad",
        vec![peers::n8n_answers(json!({"released": true}), "not an id!")],
    );
    let step = |name: &str, url: &str| json!({"name": name, "kind": "n8n", "url": url, "timeout_ms": 5000, "max_attempts": 1});
    let registry = json!({"version": 1, "workflows": {
        "good": {"steps": [step("release", &good)]},
        "bad": {"steps": [step("release", &bad)]},
    }});
    let (h, api) = handler_with_api(&app, registry).await;
    for (job, key) in [("kit-sync-1", "good"), ("kit-sync-2", "bad")] {
        h.submit(job, key, json!({})).await;
        let v = h.settled(job).await;
        assert_eq!(
            v.status,
            JobStatus::Completed,
            "{job}: {:?}",
            v.error_message
        );
        assert_eq!(v.outputs, json!({"release": {"released": true}}), "{job}");
    }
    let events = log_events(&app).await;
    let recorded = |job: &str| {
        events
            .iter()
            .find(|e| e.aggregate_id == job && e.event_type == "StepResultRecorded")
            .map(|e| e.data.get("n8n_execution_id").cloned())
            .expect("the step's result is recorded")
    };
    assert_eq!(recorded("kit-sync-1"), Some(json!("981")));
    assert_eq!(
        recorded("kit-sync-2"),
        None,
        "a header that is no id is not recorded"
    );
    let (events, _, _) = read_to_end(open_stream(&api, "kit-sync-1", OPERATOR_TOKEN).await).await;
    assert!(
        events.iter().any(|(_, d)| d["n8n_execution_id"] == "981"),
        "the timeline shows it: {events:?}"
    );
}
