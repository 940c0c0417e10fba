// The web console in headless Chromium, as an operator uses it: run by
// tests/integration/console.rs against a real `serve` (its HTTP API, job
// handler and projections on real nats-server and PostgreSQL), which then
// checks in the log and read models what this did.
//
//   CONSOLE_URL      the service, e.g. http://127.0.0.1:8080
//   OPERATOR_TOKEN   an operator's bearer token (logs in to the console)
//   CLIENT_TOKEN     a client's token: submits the jobs, as a service would
//   WORKFLOW         a workflow that completes on its own
//   GATED_WORKFLOW   one that waits for an approval
//   FLAKY_WORKFLOW   one whose first job fails and whose retry completes
//   RUN              a suffix for the job ids
//   CHROMIUM         the browser (default /usr/bin/chromium)
//   PLAYWRIGHT_DIR   where playwright-core is installed (default
//                    /opt/flowledger/console-check, by scripts/install-deps.sh)
// Exits 0 when every step passed; otherwise prints the step that failed.
import { createRequire } from "node:module";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) { console.error(`console-check: ${k} is not set`); process.exit(2); }
  return v;
};
const URL_ = env("CONSOLE_URL");
const OPERATOR = env("OPERATOR_TOKEN");
const CLIENT = env("CLIENT_TOKEN");
const WORKFLOW = env("WORKFLOW");
const GATED = env("GATED_WORKFLOW");
const FLAKY = env("FLAKY_WORKFLOW");
const RUN = env("RUN", String(Date.now()));
const require = createRequire(env("PLAYWRIGHT_DIR", "/opt/flowledger/console-check") + "/");
const { chromium } = require("playwright-core");

const WAIT = 30_000;
let step = "start";
const problems = [];

async function submit(jobId, workflow) {
  const res = await fetch(`${URL_}/v1/jobs`, {
    method: "POST",
    headers: { Authorization: `Bearer ${CLIENT}`, "Content-Type": "application/json" },
    body: JSON.stringify({ job_id: jobId, workflow_key: workflow, inputs: { note: "<img src=x onerror=alert(1)>" } }),
  });
  if (res.status !== 202) throw new Error(`submit ${jobId}: HTTP ${res.status} ${await res.text()}`);
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(WAIT);
  // a script error or a refused resource (the CSP) is a failure
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  // but one: Chromium logs every 404 answer as a console error, and the
  // page asks for a job just submitted or retried before the read model
  // may have it (it then shows "not in the read model yet" and the live
  // stream); only that 404, of GET /v1/jobs/<id>, is expected
  let notYetProjected = 0;
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const url = m.location()?.url ?? "";
    if (/status of 404/.test(m.text()) && /\/v1\/jobs\/[^/?#]+$/.test(url)) {
      notYetProjected += 1;
      return;
    }
    problems.push(`console error: ${m.text()} (${url})`);
  });
  page.on("dialog", (d) => { problems.push(`a dialog opened: ${d.message()}`); d.dismiss(); });

  step = "open the console";
  await page.goto(`${URL_}/console`);
  await page.waitForSelector("#login:not([hidden])");

  step = "a wrong token is refused";
  await page.fill("#token", "not-a-token");
  await page.click("#login-form button");
  await page.waitForFunction(() => document.querySelector("#flash").textContent.includes("unauthenticated"));
  // the 401 answer is logged by Chromium as a failed resource: expected here
  problems.length = 0;

  step = "log in as the operator";
  await page.fill("#token", OPERATOR);
  await page.click("#login-form button");
  await page.waitForSelector("#who:not([hidden])");
  const who = await page.textContent("#who-name");
  if (!who.includes("(operator)")) throw new Error(`logged in as ${who}`);
  await page.waitForSelector("#executions:not([hidden])");

  step = "a submitted job appears in the executions and completes";
  const job = `ui-${RUN}`;
  await submit(job, WORKFLOW);
  await page.waitForSelector(`#exec-table tr[data-job="${job}"]`);
  await page.waitForFunction((id) => {
    const row = document.querySelector(`#exec-table tr[data-job="${id}"]`);
    return row && row.textContent.includes("completed");
  }, job);

  step = "the job's timeline and audit trail";
  await page.click(`#exec-table tr[data-job="${job}"]`);
  await page.waitForSelector("#job:not([hidden])");
  await page.waitForSelector('#job-timeline li[data-event-type="JobCompleted"]');
  await page.waitForSelector('#job-timeline li[data-event-type="StepResultRecorded"]');
  await page.waitForFunction(() => document.querySelectorAll("#job-audit tbody tr").length >= 2);
  const inputs = await page.textContent("#job-fields");
  // the client's markup is shown as text, not run
  if (!inputs.includes("<img src=x onerror=alert(1)>")) throw new Error("the job's inputs are not shown as text");
  if (await page.$("#job-fields img")) throw new Error("the job's inputs were put in the page as HTML");

  step = "the approvals inbox: approve one";
  const gated = `ui-gated-${RUN}`;
  await submit(gated, GATED);
  await page.goto(`${URL_}/console#/approvals`);
  await page.waitForSelector(`#approvals-table tr[data-approval="${gated}"]`);
  const row = `#approvals-table tr[data-approval="${gated}"]`;
  await page.fill(`${row} input.reason`, "checked in the console");
  await page.click(`${row} button[data-verb="approve"]`);
  await page.waitForFunction((id) => document.querySelector("#flash").textContent.includes(`approval ${id}: approved`), gated);
  await page.waitForFunction((id) => !document.querySelector(`#approvals-table tr[data-approval="${id}"]`), gated);

  step = "the approved job runs to its end, live";
  await page.goto(`${URL_}/console#/jobs/${gated}`);
  await page.waitForSelector('#job-timeline li[data-event-type="JobCompleted"]');
  await page.waitForFunction(() => document.querySelector("#job-status").textContent === "completed");

  step = "a failed job is retried from its page";
  const flaky = `ui-flaky-${RUN}`;
  await submit(flaky, FLAKY);
  await page.goto(`${URL_}/console#/jobs/${flaky}`);
  await page.waitForFunction(() => document.querySelector("#job-status").textContent === "failed");
  await page.waitForSelector("#job-retry:not([hidden])");
  await page.click("#job-retry");
  await page.waitForFunction((id) => document.querySelector("#flash").textContent.includes(`job ${id}: retried as `), flaky);
  const retried = (await page.textContent("#flash")).split("retried as ")[1].trim();
  await page.waitForFunction((id) => document.querySelector("#job-id").textContent === id, retried);
  await page.waitForSelector(`#job-fields a[data-job="${flaky}"]`);
  await page.waitForFunction(() => document.querySelector("#job-status").textContent === "completed");
  step = "the retried job links to its retry and offers no second one";
  await page.click(`#job-fields a[data-job="${flaky}"]`);
  await page.waitForSelector(`#job-fields a[data-job="${retried}"]`);
  if (!(await page.$("#job-retry[hidden]"))) throw new Error("a retried job still offers Retry");

  step = "the projections' state";
  await page.goto(`${URL_}/console#/projections`);
  await page.waitForFunction(() => document.querySelectorAll("#projections-table tbody tr").length >= 1);
  await page.waitForFunction(() => document.querySelector("#health-summary").textContent.includes("ready: true"));

  if (problems.length) throw new Error(problems.join("; "));
  console.log(`console-check: passed (jobs ${job}, ${gated}, ${flaky} retried as ${retried}; ` +
    `${notYetProjected} job read(s) before the read model had the job)`);
} catch (e) {
  console.error(`console-check: failed at "${step}": ${e.message}`);
  if (problems.length) console.error(`console-check: also: ${problems.join("; ")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
