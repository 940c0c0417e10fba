#!/usr/bin/env bash
# Runs every ```sh block of docs/*.md as written, on throw-away servers
# (nats-server, PostgreSQL, OpenBao) with `serve` running as config/example.toml
# plus [secrets] and [memory], the way scripts/demo.sh sets them up.
# Part of scripts/test.sh (the README's own block: scripts/readme-check.sh).
#
# Each block runs on its own in `bash -euo pipefail`, `flowledger` on the
# PATH, 127.0.0.1:8080 / localhost:8080 rewritten to this serve's address,
# and `curl` failing on an HTTP error (--fail-with-body), so a command the
# docs show answering 4xx fails the check. The variables the docs use are
# set: TOKEN and BILLING_TOKEN (client billing), OPERATOR_TOKEN,
# DATABASE_URL, FLOWLEDGER_CONFIG (flowledger.toml in the working directory).
#
# A block that cannot run here says so on the line before it:
#   <!-- docs-check: skip: <the reason> -->
# The reasons are printed; a block without a marker that fails, fails the
# check. Run from anywhere: scripts/docs-check.sh [docs/FILE.md ...]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
eval "$(scripts/install-deps.sh)"
cargo build --quiet
export PATH="$ROOT/target/debug:$PATH"

. scripts/lib.sh
work_dir fl-docs

export FLOWLEDGER_NATS_URL FLOWLEDGER_NATS_USER=flowledger FLOWLEDGER_NATS_PASSWORD=dev-flowledger-password
FLOWLEDGER_NATS_URL=$(NATS_EXTRA_ARGS="-c $ROOT/nats/dev.conf" scripts/nats.sh start "$WORK" "$NATS_SERVER_DEBIAN")
export DATABASE_URL
DATABASE_URL=$(PG_BIN=$PG_BIN scripts/pg.sh start "$WORK")
BAO_ADDR=$(scripts/bao.sh start "$WORK" "$BAO_BIN")
# what docs/SECRETS.md reads, and the policy scripts/demo.sh gives flowledger
bao_api -X POST -d '{"data": {"api_key": "sk_docs_4242"}}' "$BAO_ADDR/v1/secret/data/billing/stripe" >/dev/null
export FLOWLEDGER_VAULT_TOKEN
FLOWLEDGER_VAULT_TOKEN=$(bao_flowledger_token "$BAO_ADDR")

# the working directory of every block: flowledger.toml is the docs' config
RUN="$WORK/run"
mkdir -p "$RUN"
export FLOWLEDGER_CONFIG="$RUN/flowledger.toml"
config_with_secrets "$FLOWLEDGER_CONFIG" "$BAO_ADDR"
export FLOWLEDGER_CALLBACK_KEY
FLOWLEDGER_CALLBACK_KEY=$(openssl rand -hex 32)
HTTP_ADDR=127.0.0.1:$(free_port)
flowledger init >/dev/null
flowledger serve --http "$HTTP_ADDR" --registry "$ROOT/workflows/registry.json" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -sf "http://$HTTP_ADDR/readyz" >/dev/null && break; sleep 0.2; done
curl -sf "http://$HTTP_ADDR/readyz" >/dev/null || { tail -20 "$WORK/serve.log" >&2; echo "docs-check: serve did not get ready" >&2; exit 1; }
export TOKEN=dev-billing-token BILLING_TOKEN=dev-billing-token OPERATOR_TOKEN=dev-operator-token

cat >"$WORK/prelude.sh" <<'SH'
# an HTTP error fails the block (the docs show commands that succeed)
curl() { command curl --fail-with-body "$@"; }
SH

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(docs/*.md)
ran=0 skipped=0 failed=0
for f in "${files[@]}"; do
  # blocks as files: NAME.N.sh, and NAME.N.skip holding the reason
  rm -rf "$WORK/blocks" && mkdir -p "$WORK/blocks"
  awk -v out="$WORK/blocks/b" '
    /^<!-- docs-check: skip: / { reason = $0; sub(/^<!-- docs-check: skip: /, "", reason); sub(/ *-->$/, "", reason); next }
    /^```(sh|bash)$/ { n++; code = 1; file = out "." n ".sh"; printf "" > file
                       if (reason != "") { print reason > (out "." n ".skip") }
                       reason = ""; next }
    code && /^```/ { code = 0; close(file); next }
    code { print >> file; next }
    /[^ \t]/ { reason = "" }' "$f"
  for b in $(ls "$WORK/blocks"/b.*.sh 2>/dev/null | sort -t. -k2 -n); do
    n=${b%.sh}; n=${n##*.}
    where="$f, block $n (line $(awk -v n="$n" '/^```(sh|bash)$/ { if (++k == n) { print NR; exit } }' "$f"))"
    if [ -f "${b%.sh}.skip" ]; then
      echo "skipped $where: $(cat "${b%.sh}.skip")"
      skipped=$((skipped + 1))
      continue
    fi
    sed -e "s#localhost:8080#$HTTP_ADDR#g" -e "s#127\.0\.0\.1:8080#$HTTP_ADDR#g" "$b" >"$b.run"
    if (cd "$RUN" && bash -euo pipefail -c 'source "$1"; source "$2"' docs-check "$WORK/prelude.sh" "$b.run") >"$b.log" 2>&1; then
      echo "ran     $where ($(grep -cv '^\s*\(#.*\)\?$' "$b") lines)"
      ran=$((ran + 1))
    else
      status=$?
      echo "FAILED  $where (exit $status):" >&2
      sed 's/^/    /' "$b" >&2
      echo "  its output:" >&2
      tail -20 "$b.log" | sed 's/^/    /' >&2
      failed=$((failed + 1))
    fi
  done
done
echo "docs-check: $ran blocks ran, $skipped skipped (reason above), $failed failed"
if [ "$failed" != 0 ]; then
  echo "docs-check: the serve log ends with:" >&2
  tail -20 "$WORK/serve.log" >&2
  exit 1
fi
