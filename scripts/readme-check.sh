#!/usr/bin/env bash
# Runs the README's "Using it" block as written, command by command, on
# throw-away servers: the block's /tmp/fl becomes a fresh temporary
# directory; everything it starts is stopped at the end, pass or fail.
# Part of scripts/test.sh. Run from anywhere: scripts/readme-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
work_dir fl-readme
BLOCK="$WORK/using-it.sh"
# the first ```sh block after the "## Using it" heading
awk '/^## Using it/ {inside=1; next}
     inside && /^```sh/ {code=1; next}
     code && /^```/ {exit}
     code {print}' README.md | sed "s#/tmp/fl#$WORK#g" > "$BLOCK"
[ -s "$BLOCK" ] || { echo "readme-check: no sh block under '## Using it' in README.md" >&2; exit 1; }
# the block binds fixed ports: another flowledger or peer there would be
# tested instead of this one
for port in 8080 9101 9102 5678; do
  if ! python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    echo "readme-check: 127.0.0.1:$port is in use; the README's block needs it free" >&2
    exit 1
  fi
done
echo "== README 'Using it' ($(wc -l < "$BLOCK") lines), in $WORK"
# in its own process group (setsid), each command echoed before it runs;
# the first failure stops it, and a wait that never ends (a job that never
# completes) fails it after 10 min (its `cargo build` may build from scratch)
setsid bash -euo pipefail -x "$BLOCK" > "$WORK.log" 2>&1 &
BLOCK_PID=$!
# at the end, whatever the block left running (its process group)
PGIDS+=("$BLOCK_PID")
# the watchdog holds no output open (a reader of ours would wait for it)
( sleep 600 && kill -- "-$BLOCK_PID" ) >/dev/null 2>&1 & WATCHDOG=$!
status=0
wait "$BLOCK_PID" || status=$?
pkill -P "$WATCHDOG" 2>/dev/null || true
kill "$WATCHDOG" 2>/dev/null || true
if [ "$status" != 0 ]; then
  tail -40 "$WORK.log" >&2
  echo "readme-check: the README's 'Using it' block failed (exit $status); the log above ends at the failing command" >&2
  rm -f "$WORK.log"
  exit 1
fi
rm -f "$WORK.log"
echo "readme-check: the README's 'Using it' block ran through"
