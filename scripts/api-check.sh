#!/usr/bin/env bash
# Checks the HTTP API against its OpenAPI document on a running `serve`:
# starts throw-away nats-server, PostgreSQL and OpenBao (scripts/nats.sh,
# pg.sh, bao.sh), runs `flowledger serve` with secrets, memory and the n8n
# key on (the job handler off: no peer runs here) and the clients of
# config/example.toml, fetches /openapi.json, validates it with
# openapi-spec-validator, then runs schemathesis against the service with
# the operator's bearer token, bounded, failing on any 5xx and on any
# answer that its schema, status list or content type does not describe.
# Everything it starts is stopped at the end, pass or fail.
# Part of scripts/test.sh. Run from anywhere: scripts/api-check.sh
#   API_CHECK_MAX_EXAMPLES  test cases per operation and phase (default 20)
#   API_CHECK_SEED          schemathesis's seed (default: a new one, printed)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-deps.sh)"
cargo build --quiet --bin flowledger
FL="${CARGO_TARGET_DIR:-$PWD/target}/debug/flowledger"

. scripts/lib.sh
work_dir fl-api

# the servers serve needs, as the demo starts them (nats/dev.conf's accounts)
export FLOWLEDGER_NATS_URL FLOWLEDGER_NATS_USER=flowledger FLOWLEDGER_NATS_PASSWORD=dev-flowledger-password
FLOWLEDGER_NATS_URL=$(NATS_EXTRA_ARGS="-c $PWD/nats/dev.conf" scripts/nats.sh start "$WORK" "$NATS_SERVER_DEBIAN")
export DATABASE_URL
DATABASE_URL=$(PG_BIN=$PG_BIN scripts/pg.sh start "$WORK")
BAO_ADDR=$(scripts/bao.sh start "$WORK" "$BAO_BIN")
export FLOWLEDGER_VAULT_TOKEN=${BAO_ROOT_TOKEN:-dev-root-token}
export FLOWLEDGER_N8N_KEY FLOWLEDGER_CALLBACK_KEY
FLOWLEDGER_N8N_KEY=$(openssl rand -hex 32)
FLOWLEDGER_CALLBACK_KEY=$(openssl rand -hex 32)

# config/example.toml's clients (dev-operator-token), the handler off,
# secret access (ops reads secret/data/ops/*) and memory on
config_with_secrets "$WORK/api.toml" "$BAO_ADDR" ops 'secret/data/ops/*'
export FLOWLEDGER_HANDLER__ENABLED=false
# a live job stream ends within a second: api-job-2 waits for an approval
# that never comes, and schemathesis reads each answer to its end
export FLOWLEDGER_CONSOLE__STREAM_MAX_SECONDS=1
"$FL" init >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; exit 1; }
API="http://127.0.0.1:$(free_port)"
"$FL" serve --config "$WORK/api.toml" --http "${API#http://}" --checkpoint-every-secs 0 >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!; PIDS+=("$SERVE_PID")
for _ in $(seq 1 100); do
  curl -sf "$API/readyz" >/dev/null 2>&1 && break
  kill -0 "$SERVE_PID" 2>/dev/null || { tail -20 "$WORK/serve.log" >&2; echo "api-check: serve stopped" >&2; exit 1; }
  sleep 0.2
done
curl -sf "$API/readyz" >/dev/null || { tail -20 "$WORK/serve.log" >&2; echo "api-check: serve is not ready" >&2; exit 1; }

# data for the cases to find (else every id is unknown and answers 404):
# jobs (one with an approval), a memory subject with a turn, facts, a
# profile and working state, a secret the operator may read
OPS=(-H "Authorization: Bearer dev-operator-token" -H "Content-Type: application/json")
BILLING=(-H "Authorization: Bearer dev-billing-token" -H "Content-Type: application/json")
post() { curl -fsS -o /dev/null "$@"; }
post "${BILLING[@]}" -d '{"job_id": "api-job-1", "workflow_key": "invoice.extract", "inputs": {"invoice_id": 1}}' "$API/v1/jobs"
post "${BILLING[@]}" -d '{"job_id": "api-job-2", "workflow_key": "payment.release", "inputs": {"amount": 12}}' "$API/v1/jobs"
FLOWLEDGER_NATS_USER=ops FLOWLEDGER_NATS_PASSWORD=dev-ops-password "$FL" send approval.request \
  "{\"job_id\":\"api-job-2\",\"workflow_key\":\"payment.release\",\"requested_by\":\"billing\",\"expires_at\":\"$(date -u -d '+1 hour' +%FT%TZ)\"}" >/dev/null
post "${OPS[@]}" -d '{"subject_id": "api-subject-1", "messages": [{"role": "user", "content": "my car is a red Volvo"}], "response": "noted", "facts": [{"subject": "user.car", "key": "colour", "value": "red"}]}' "$API/v1/memory/writeback"
post "${OPS[@]}" -d '{"subject_id": "api-subject-1", "fields": {"full_name": "Ada Example"}}' "$API/v1/memory/profile"
post "${OPS[@]}" -d '{"subject_id": "api-subject-1", "key": "cart", "value": {"items": 2}, "ttl_seconds": 3600}' "$API/v1/memory/working-state-set"
curl -fsS -o /dev/null -H "X-Vault-Token: $FLOWLEDGER_VAULT_TOKEN" -d '{"data": {"api_key": "sk_api_check"}}' "$BAO_ADDR/v1/secret/data/ops/api"
post "${OPS[@]}" -d '{"path": "secret/data/ops/api", "field": "api_key", "purpose": "api-check"}' "$API/v1/secrets/read"
# the read models have them before the cases start
for _ in $(seq 1 100); do
  curl -fsS "${OPS[@]}" "$API/v1/approvals/api-job-2" 2>/dev/null | grep -q '"job":{' && break
  sleep 0.1
done
# half of the path ids and secret paths are these, the rest generated
cat >"$WORK/schemathesis.toml" <<'TOML'
[dictionaries.ids]
values = ["api-job-1", "api-job-2"]
[dictionaries.subjects]
values = ["api-subject-1"]
[dictionaries.workflows]
values = ["invoice.extract", "payment.release", "report.daily"]
[dictionaries.secrets]
values = ["secret/data/ops/api"]

[parameters]
"path.id" = { dictionary = "ids", probability = 0.5 }
"path.subject_id" = { dictionary = "subjects", probability = 0.5 }
"path.key" = { dictionary = "workflows", probability = 0.5 }
"body.path" = { dictionary = "secrets", probability = 0.5 }
"body.subject_id" = { dictionary = "subjects", probability = 0.5 }
TOML

echo "== openapi-spec-validator $("$OPENAPI_SPEC_VALIDATOR" --version 2>/dev/null | awk '{print $NF}') on $API/openapi.json"
curl -sf "$API/openapi.json" >"$WORK/openapi.json"
# its complaint quotes the whole document: the start of it says what is wrong
if ! "$OPENAPI_SPEC_VALIDATOR" "$WORK/openapi.json" >"$WORK/validator.log" 2>&1; then
  cut -c1-2000 "$WORK/validator.log" >&2
  echo "api-check: /openapi.json is not a valid OpenAPI document" >&2
  exit 1
fi
cat "$WORK/validator.log"

echo "== schemathesis $("$SCHEMATHESIS" --version | awk '{print $NF}') against serve"
seed=()
if [ -n "${API_CHECK_SEED:-}" ]; then seed=(--seed "$API_CHECK_SEED"); fi
status=0
"$SCHEMATHESIS" --config-file "$WORK/schemathesis.toml" run "$WORK/openapi.json" --url "$API" \
  -H "Authorization: Bearer dev-operator-token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "${API_CHECK_MAX_EXAMPLES:-20}" "${seed[@]}" \
  --request-timeout 10 --generation-database none --no-color \
  --report junit --report-dir "$WORK/report" || status=$?
if [ "$status" != 0 ]; then
  # what serve said while schemathesis ran: a panic or an error it logged
  grep -iE 'panick|error' "$WORK/serve.log" | tail -20 >&2 || true
  echo "api-check: schemathesis found answers the document does not describe (above)" >&2
  exit 1
fi
if grep -qi 'panicked' "$WORK/serve.log"; then
  grep -i -A5 'panicked' "$WORK/serve.log" >&2
  echo "api-check: serve panicked during the run" >&2
  exit 1
fi
echo "api-check: the document is valid and serve answered every case as it says"
