#!/usr/bin/env bash
# The n8n kit against a real n8n (docs/CALLBACKS.md, "The n8n kit"): installs
# n8n@2.8.4 if it is missing (~6 minutes, 2.3 GB, in N8N_DIR, default
# /opt/n8n-try), starts it on loopback with a throw-away user folder, imports
# the templates of workflows/n8n/ and the Crypto credential holding the n8n
# key, publishes them, then runs flowledger (throw-away nats-server and
# PostgreSQL, as scripts/demo.sh) with the shipped registry pointed at that
# n8n, and runs one job of each kind through it:
#   payment.release  synchronous: n8n answers the result (and its execution id)
#   report.daily     202: n8n answers at once, then posts the signed result
# Each job must complete, with n8n's execution id in its timeline. Not part
# of scripts/test.sh (it needs the n8n install). Stops and removes
# everything it started at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
N8N_VERSION=2.8.4
N8N_DIR=${N8N_DIR:-/opt/n8n-try}
eval "$(scripts/install-deps.sh)"
cargo build --quiet
FL="${CARGO_TARGET_DIR:-$PWD/target}/debug/flowledger"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ ! -x "$N8N_DIR/node_modules/.bin/n8n" ]; then
  say "installing n8n@$N8N_VERSION in $N8N_DIR (about 6 minutes, 2.3 GB)"
  mkdir -p "$N8N_DIR"
  # n8n's xlsx dependency points off the registry: take the registry's
  (cd "$N8N_DIR" && npm init -y >/dev/null && npm pkg set overrides.xlsx=0.18.5 \
    && npm install --no-audit --no-fund "n8n@$N8N_VERSION")
fi
N8N="$N8N_DIR/node_modules/.bin/n8n"

. scripts/lib.sh
work_dir flowledger-n8n

# the key n8n signs its results with: flowledger's FLOWLEDGER_N8N_KEY and
# the Hmac Secret of n8n's Crypto credential
export FLOWLEDGER_N8N_KEY
FLOWLEDGER_N8N_KEY=$(python3 -c 'import secrets; print("n8n-try-" + secrets.token_hex(16))')
export FLOWLEDGER_CALLBACK_KEY=n8n-try-callback-key-0123456789

say "n8n $N8N_VERSION on loopback, user folder $WORK/n8n-home"
N8N_PORT=$(free_port)
export N8N_USER_FOLDER="$WORK/n8n-home" N8N_PORT N8N_LISTEN_ADDRESS=127.0.0.1 N8N_HOST=127.0.0.1 \
  N8N_PROTOCOL=http N8N_DIAGNOSTICS_ENABLED=false N8N_VERSION_NOTIFICATIONS_ENABLED=false \
  N8N_PERSONALIZATION_ENABLED=false N8N_TEMPLATES_ENABLED=false \
  N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS=true DB_SQLITE_POOL_SIZE=2
mkdir -p "$N8N_USER_FOLDER"
"$N8N" --version
python3 - "$WORK/credential.json" <<'PY'
import json, os, sys
json.dump([{"id": "flKitN8nKeyCred1", "name": "flowledger n8n key", "type": "crypto",
            "data": {"hmacSecret": os.environ["FLOWLEDGER_N8N_KEY"]}}], open(sys.argv[1], "w"))
PY
"$N8N" import:credentials --input="$WORK/credential.json"
for t in workflows/n8n/*.json; do
  "$N8N" import:workflow --input="$t"
  "$N8N" publish:workflow --id="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$t")"
done
"$N8N" start >"$WORK/n8n.log" 2>&1 &
N8N_PID=$!; PIDS+=("$N8N_PID")
# /healthz/readiness answers before the published workflows' webhooks are
# registered (a call then gets 404, which flowledger retries): wait for
# the line n8n logs after activating them
for _ in $(seq 1 600); do
  grep -q "Editor is now accessible" "$WORK/n8n.log" && break
  kill -0 "$N8N_PID" 2>/dev/null || { cat "$WORK/n8n.log"; echo "n8n stopped"; exit 1; }
  sleep 0.5
done
grep "Activated workflow" "$WORK/n8n.log"

say "flowledger serve (nats-server, PostgreSQL 15 in $WORK) with the shipped registry pointed at n8n"
export FLOWLEDGER_NATS_URL FLOWLEDGER_NATS_USER=flowledger FLOWLEDGER_NATS_PASSWORD=dev-flowledger-password
FLOWLEDGER_NATS_URL=$(NATS_EXTRA_ARGS="-c $PWD/nats/dev.conf" scripts/nats.sh start "$WORK" "$NATS_SERVER_DEBIAN")
export DATABASE_URL
DATABASE_URL=$(PG_BIN=$PG_BIN scripts/pg.sh start "$WORK")
"$FL" init >/dev/null
HTTP_ADDR=127.0.0.1:$(free_port)
API="http://$HTTP_ADDR"
sed "s#http://127.0.0.1:5678/#http://127.0.0.1:$N8N_PORT/#" workflows/registry.json >"$WORK/registry.json"
# the templates beside it: loading the registry checks its template paths
cp -r workflows/n8n "$WORK/n8n"
sed "s#^public_url = .*#public_url = \"$API\"#" config/example.toml >"$WORK/config.toml"
"$FL" serve --checkpoint-every-secs 0 --http "$HTTP_ADDR" --registry "$WORK/registry.json" \
  --config "$WORK/config.toml" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!; PIDS+=("$SERVE_PID")
for _ in $(seq 1 100); do grep -q "listening" "$WORK/serve.log" && break; sleep 0.1; done

BILLING=(-H "Authorization: Bearer dev-billing-token" -H "Content-Type: application/json")
OPS=(-H "Authorization: Bearer dev-operator-token")
run_job() { # job_id body
  curl -fsS "${BILLING[@]}" -d "$2" "$API/v1/jobs"; echo
  for _ in $(seq 1 300); do
    curl -fsS "${OPS[@]}" "$API/v1/jobs/$1/status" | grep -qE '"(completed|failed|cancelled)"' && break
    sleep 0.2
  done
  curl -fsS "${OPS[@]}" "$API/v1/jobs/$1" | python3 -c '
import json, sys
j = json.load(sys.stdin)
print("  status %s, outputs %s, error %s" % (j["status"], json.dumps(j["outputs"]), j["error_message"]))
sys.exit(0 if j["status"] == "completed" else 1)'
  say "$1: its timeline (GET /v1/jobs/$1/events)"
  curl -sS -N --max-time 10 "${OPS[@]}" "$API/v1/jobs/$1/events" | sed -n 's/^data: //p' | tee "$WORK/$1.events"
  grep -q '"n8n_execution_id"' "$WORK/$1.events" || { echo "no n8n_execution_id in the timeline of $1"; exit 1; }
}

say "payment.release: a synchronous n8n step (auto-approved at confidence 90)"
run_job try-sync '{"job_id": "try-sync", "workflow_key": "payment.release", "inputs": {"payment_id": "pay-1", "amount": 120}, "metadata": {"confidence": 90}}'
say "report.daily: a 202 n8n step; n8n posts the signed result to $API/v1/callbacks/n8n"
run_job try-202 '{"job_id": "try-202", "workflow_key": "report.daily", "inputs": {"day": "2026-12-07"}}'

say "refused n8n callbacks while the jobs ran (0 expected)"
curl -fsS "$API/metrics" | grep '^flowledger_callbacks_rejected_total' || echo "  none"
say "n8n's own record (its SQLite database): the executions flowledger recorded ran and succeeded"
python3 - "$N8N_USER_FOLDER/.n8n/database.sqlite" "$WORK/try-sync.events" "$WORK/try-202.events" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = {str(r[0]): r[1:] for r in db.execute(
    "SELECT e.id, w.name, e.status, e.mode FROM execution_entity e JOIN workflow_entity w ON w.id = e.workflowId")}
for id_, row in sorted(rows.items()):
    print("  execution %s: %s, %s (%s)" % (id_, row[0], row[1], row[2]))
for path in sys.argv[2:]:
    ids = [e["n8n_execution_id"] for e in map(json.loads, open(path)) if "n8n_execution_id" in e]
    for i in ids:
        assert i in rows and rows[i][1] == "success", (path, i, rows.get(i))
PY
echo
echo "both jobs completed through n8n $N8N_VERSION; the execution ids recorded are n8n's"
