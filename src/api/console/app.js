// The flowledger web console: a static page over the HTTP API (/v1/...),
// with the caller's bearer token kept in this tab's sessionStorage. Every
// value from the API is put in the page as text (textContent), never as
// HTML: job inputs and reasons are other people's data.
"use strict";

const TOKEN_KEY = "flowledger.token";
const VIEWS = ["login", "executions", "job", "approvals", "projections"];
let me = null;            // {client_id, role} of the logged-in caller
let live = null;          // the AbortController of the open live stream
let execCursor = null;    // next_cursor of the executions list
let notice = null;        // a message for the next view (after a retry)

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function flash(text, ok) {
  const f = $("flash");
  f.textContent = text;
  f.className = ok ? "ok" : "";
  f.hidden = !text;
}

// One API call: JSON in and out; an error answer becomes an Error whose
// message is the envelope's code and message.
async function api(path, opts = {}) {
  const headers = { Authorization: "Bearer " + token() };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
    signal: opts.signal,
  });
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!res.ok) {
    const e = body && body.error;
    const err = new Error(e ? `${e.code}: ${e.message}` : `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function statusCell(tr, status) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "status " + status;
  span.textContent = status;
  td.appendChild(span);
  tr.appendChild(td);
}

function show(view) {
  for (const v of VIEWS) $(v).hidden = v !== view;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === view || (view === "job" && a.dataset.view === "executions"));
  }
}

function stopLive() {
  if (live) { live.abort(); live = null; }
}

// ---- log in ----------------------------------------------------------

async function login(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
  try {
    me = await api("/v1/me");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    throw e;
  }
  $("who-name").textContent = `${me.client_id} (${me.role})`;
  $("who").hidden = false;
  $("nav").hidden = false;
  $("nav-approvals").hidden = me.role !== "operator";
}

function logout() {
  stopLive();
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  $("who").hidden = true;
  $("nav").hidden = true;
  location.hash = "#/login";
}

// ---- executions ------------------------------------------------------

function execQuery(cursor) {
  const f = new FormData($("exec-filters"));
  const q = new URLSearchParams({ limit: "50" });
  for (const k of ["status", "workflow_id"]) if (f.get(k)) q.set(k, f.get(k));
  if (cursor) q.set("cursor", cursor);
  return q;
}

async function loadExecutions(append) {
  const page = await api("/v1/executions?" + execQuery(append ? execCursor : null));
  const tbody = $("exec-table").tBodies[0];
  if (!append) tbody.replaceChildren();
  for (const x of page.items) {
    const tr = document.createElement("tr");
    tr.className = "link";
    tr.dataset.job = x.execution_id;
    cell(tr, x.execution_id);
    cell(tr, x.workflow_id);
    statusCell(tr, x.status);
    cell(tr, x.client_id);
    cell(tr, x.created_at);
    cell(tr, x.duration_ms === null ? "" : x.duration_ms + " ms");
    tr.addEventListener("click", () => { location.hash = "#/jobs/" + encodeURIComponent(x.execution_id); });
    tbody.appendChild(tr);
  }
  execCursor = page.next_cursor;
  $("exec-more").hidden = !execCursor;
}

// ---- one job ---------------------------------------------------------

function field(dl, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = typeof value === "object" && value !== null ? JSON.stringify(value, null, 2) : (value ?? "");
  dl.append(dt, dd);
}

function jobLink(dl, name, id) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  const a = document.createElement("a");
  a.href = "#/jobs/" + encodeURIComponent(id);
  a.textContent = id;
  a.dataset.job = id;
  dd.appendChild(a);
  dl.append(dt, dd);
}

// `POST /v1/jobs/{id}/retry`: a new job linked to this one; then shows it.
async function retryJob() {
  const id = $("job-id").textContent;
  $("job-retry").disabled = true;
  try {
    const r = await api(`/v1/jobs/${encodeURIComponent(id)}/retry`, { method: "POST", body: {} });
    // shown by the route to the new job (a route clears older messages)
    notice = `job ${id}: retried as ${r.job_id}`;
    location.hash = "#/jobs/" + encodeURIComponent(r.job_id);
  } catch (e) {
    flash(`job ${id}: ${e.message}`);
  } finally {
    $("job-retry").disabled = false;
  }
}

async function loadJob(id) {
  let x;
  try {
    x = await api("/v1/jobs/" + encodeURIComponent(id));
  } catch (e) {
    if (e.status !== 404) throw e;
    x = null; // not in the read model yet: the live stream still shows it
  }
  $("job-id").textContent = id;
  const st = $("job-status");
  st.textContent = x ? x.status : "not in the read model yet";
  st.className = "status " + (x ? x.status : "");
  const dl = $("job-fields");
  dl.replaceChildren();
  if (x) {
    field(dl, "workflow", x.workflow_id);
    field(dl, "client", x.client_id);
    field(dl, "created", x.created_at);
    field(dl, "started", x.started_at);
    field(dl, "completed", x.completed_at);
    if (x.error_code) field(dl, "error", `${x.error_code}: ${x.error_message ?? ""}`);
    field(dl, "inputs", x.input_data);
    if (x.output_data) field(dl, "outputs", x.output_data);
    if (x.retry_of) jobLink(dl, "retry of", x.retry_of);
    if (x.retried_by) jobLink(dl, "retried by", x.retried_by);
  }
  // a failed or cancelled job not yet retried can be, by its client or an
  // operator (the API refuses anyone else)
  $("job-retry").hidden = !(x && ["failed", "cancelled"].includes(x.status) && !x.retried_by);
  const audit = await api("/v1/audit?limit=200&job_id=" + encodeURIComponent(id));
  const tbody = $("job-audit").tBodies[0];
  tbody.replaceChildren();
  for (const r of audit.items) {
    const tr = document.createElement("tr");
    cell(tr, r.stream_seq);
    cell(tr, r.occurred_at);
    cell(tr, r.action);
    cell(tr, r.step);
    cell(tr, r.status);
    cell(tr, r.client_id);
    tbody.appendChild(tr);
  }
  return x;
}

// Reads `GET /v1/jobs/{id}/events` (Server-Sent Events) with the bearer
// token (EventSource cannot send one) and calls `on(name, data)` per event.
async function readEvents(path, signal, on) {
  const res = await fetch(path, { headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" }, signal });
  if (!res.ok) {
    let msg = `HTTP ${res.status}`;
    try { const b = await res.json(); msg = `${b.error.code}: ${b.error.message}`; } catch (_) { /* keep the status */ }
    throw new Error(msg);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) on(name, JSON.parse(data.join("\n")));
    }
  }
}

function describe(ev) {
  let s = `${ev.occurred_at}  ${ev.event_type}`;
  if (ev.step) s += `  ${ev.step}`;
  if (ev.attempt) s += ` #${ev.attempt}`;
  if (ev.status) s += `  ${ev.status}`;
  if (ev.error_code) s += `  ${ev.error_code}`;
  if (ev.duration_ms !== undefined) s += `  ${ev.duration_ms} ms`;
  if (ev.n8n_execution_id) s += `  n8n execution ${ev.n8n_execution_id}`;
  return s;
}

async function openJob(id) {
  show("job");
  stopLive();
  $("job-timeline").replaceChildren();
  $("job-live").textContent = "connecting";
  await loadJob(id);
  const ctl = new AbortController();
  live = ctl;
  let refresh = null;
  const refreshSoon = () => {
    clearTimeout(refresh);
    refresh = setTimeout(() => loadJob(id).catch((e) => flash(e.message)), 300);
  };
  readEvents("/v1/jobs/" + encodeURIComponent(id) + "/events", ctl.signal, (name, data) => {
    if (name === "job_event") {
      const li = document.createElement("li");
      li.textContent = describe(data);
      li.dataset.eventType = data.event_type;
      $("job-timeline").appendChild(li);
      $("job-live").textContent = "live";
      refreshSoon();
    } else if (name === "end") {
      $("job-live").textContent = data.reason === "final" ? "ended: " + data.event_type : "stream ended: " + data.reason;
      ctl.abort();
      // the read model follows the log: look again until it shows the end
      waitForReadModel(id);
    }
  }).catch((e) => {
    if (!ctl.signal.aborted) $("job-live").textContent = "not live: " + e.message;
  });
}

async function waitForReadModel(id) {
  for (let i = 0; i < 40; i++) {
    const x = await loadJob(id).catch(() => null);
    if (x && ["completed", "failed", "cancelled"].includes(x.status)) return;
    await new Promise((r) => setTimeout(r, 250));
  }
}

// ---- approvals -------------------------------------------------------

async function loadApprovals() {
  const page = await api("/v1/approvals?status=pending&limit=100");
  const tbody = $("approvals-table").tBodies[0];
  tbody.replaceChildren();
  $("approvals-empty").hidden = page.items.length > 0;
  for (const a of page.items) {
    const tr = document.createElement("tr");
    tr.dataset.approval = a.approval_id;
    const idCell = cell(tr, a.approval_id);
    idCell.className = "link";
    idCell.addEventListener("click", () => { location.hash = "#/jobs/" + encodeURIComponent(a.job_id); });
    cell(tr, a.workflow_key);
    cell(tr, a.requested_by);
    cell(tr, a.expires_at);
    const td = document.createElement("td");
    const reason = document.createElement("input");
    reason.className = "reason";
    reason.placeholder = "reason (required to reject)";
    reason.setAttribute("aria-label", "reason for " + a.approval_id);
    td.appendChild(reason);
    tr.appendChild(td);
    const act = document.createElement("td");
    for (const [label, verb] of [["Approve", "approve"], ["Reject", "reject"]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.dataset.verb = verb;
      b.addEventListener("click", () => decide(a.approval_id, verb, reason.value));
      act.appendChild(b);
    }
    tr.appendChild(act);
    tbody.appendChild(tr);
  }
}

async function decide(id, verb, reason) {
  const body = reason ? { reason } : {};
  try {
    const r = await api(`/v1/approvals/${encodeURIComponent(id)}/${verb}`, { method: "POST", body });
    flash(`approval ${id}: ${r.status}`, true);
  } catch (e) {
    flash(`approval ${id}: ${e.message}`);
  }
  await loadApprovals().catch((e) => flash(e.message));
}

// ---- projections -----------------------------------------------------

async function loadProjections() {
  const res = await fetch("/healthz");
  const h = await res.json();
  $("health-summary").textContent =
    `ready: ${h.ok}; NATS ${h.nats}; PostgreSQL ${h.postgres}; stream last seq ${h.stream_last_seq ?? "?"}` +
    (h.handler ? `; job handler ${h.handler.state}` : "") + (h.draining ? "; draining" : "");
  const tbody = $("projections-table").tBodies[0];
  tbody.replaceChildren();
  for (const p of h.projections || []) {
    const tr = document.createElement("tr");
    tr.dataset.projection = p.name;
    cell(tr, p.name);
    cell(tr, p.version);
    cell(tr, p.active);
    statusCell(tr, p.state);
    cell(tr, p.checkpoint);
    cell(tr, p.lag);
    cell(tr, p.error ? `at ${p.stopped_at}: ${p.error}` : "");
    tbody.appendChild(tr);
  }
}

// ---- routing ---------------------------------------------------------

let poll = null;

async function route() {
  clearInterval(poll);
  flash(notice || "", true);
  notice = null;
  const hash = location.hash || "#/executions";
  if (!token() || !me) {
    if (token() && !me) {
      try { await login(token()); } catch (e) { flash(e.message); show("login"); return; }
    } else {
      stopLive();
      show("login");
      return;
    }
  }
  try {
    if (hash.startsWith("#/jobs/")) {
      await openJob(decodeURIComponent(hash.slice(7)));
      return;
    }
    stopLive();
    if (hash === "#/approvals") {
      show("approvals");
      await loadApprovals();
      poll = setInterval(() => loadApprovals().catch((e) => flash(e.message)), 3000);
    } else if (hash === "#/projections") {
      show("projections");
      await loadProjections();
      poll = setInterval(() => loadProjections().catch((e) => flash(e.message)), 3000);
    } else {
      show("executions");
      await loadExecutions(false);
      poll = setInterval(() => loadExecutions(false).catch((e) => flash(e.message)), 3000);
    }
  } catch (e) {
    flash(e.message);
    if (e.status === 401) logout();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await login($("token").value);
      $("token").value = "";
      if (location.hash === "#/login" || !location.hash) location.hash = "#/executions";
      else route();
    } catch (e) {
      flash("log in refused: " + e.message);
    }
  });
  $("logout").addEventListener("click", logout);
  $("exec-filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const job = new FormData($("exec-filters")).get("job");
    if (job) { location.hash = "#/jobs/" + encodeURIComponent(job); return; }
    loadExecutions(false).catch((e) => flash(e.message));
  });
  $("job-retry").addEventListener("click", retryJob);
  $("exec-more").addEventListener("click", () => loadExecutions(true).catch((e) => flash(e.message)));
  window.addEventListener("hashchange", route);
  route();
});
