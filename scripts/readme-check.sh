#!/usr/bin/env bash
# Runs the README's "Using it" block as written, command by command, on
# throw-away servers: the block's /tmp/fl becomes a fresh temporary
# directory; everything it starts is stopped at the end, pass or fail.
# Part of scripts/test.sh. Run from anywhere: scripts/readme-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/fl-readme.XXXXXX)
BLOCK="$WORK/using-it.sh"
# the first ```sh block after the "## Using it" heading
awk '/^## Using it/ {inside=1; next}
     inside && /^```sh/ {code=1; next}
     code && /^```/ {exit}
     code {print}' README.md | sed "s#/tmp/fl#$WORK#g" > "$BLOCK"
[ -s "$BLOCK" ] || { echo "readme-check: no sh block under '## Using it' in README.md" >&2; exit 1; }
cleanup() {
  # whatever the block left running: its jobs, then its servers
  pkill -f "flowledger serve --config config/example.toml" 2>/dev/null || true
  pkill -f "demo-peer.py --listen 9101" 2>/dev/null || true
  scripts/nats.sh stop "$WORK" >/dev/null 2>&1 || true
  scripts/pg.sh stop "$WORK" >/dev/null 2>&1 || true
  rm -rf "$WORK" "$WORK-export"
}
trap cleanup EXIT
echo "== README 'Using it' ($(wc -l < "$BLOCK") lines), in $WORK"
# each command echoed before it runs; the first failure stops the check, and
# a wait that never ends (a job that never completes) fails it after 10 min
# (the block's `cargo build` may build from scratch)
timeout 600 bash -euo pipefail -x "$BLOCK" > "$WORK.log" 2>&1 || {
  status=$?
  tail -40 "$WORK.log" >&2
  echo "readme-check: the README's 'Using it' block failed (exit $status); the log above ends at the failing command" >&2
  rm -f "$WORK.log"
  exit 1
}
rm -f "$WORK.log"
echo "readme-check: the README's 'Using it' block ran through"
