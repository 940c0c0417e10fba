#!/usr/bin/env bash
# Benchmarks on local defaults: `scripts/bench.sh event-log [...]`,
# `scripts/bench.sh projections [...]`, `scripts/bench.sh handlers [...]`,
# `scripts/bench.sh secrets [...]` or `scripts/bench.sh memory [...]`.
# Starts a throw-away nats-server (Debian 2.9.10 by default; NATS=current
# for the pip build) and PostgreSQL (for `memory`, PostgreSQL 18 with
# pgvector from PG18_BIN; for `secrets` and `memory`, an OpenBao dev
# server: scripts/bao.sh), runs
# flowledger-bench (release build), prints the figures, stops them.
# SYNC=always runs nats-server with `sync_interval: always` (strict
# durability: fsync before every ack; needs NATS=current, 2.10 or later).
# Extra arguments go to flowledger-bench (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-deps.sh)"
cargo build --release --quiet --features bench --bin flowledger-bench
WORK=$(mktemp -d -t flowledger-bench.XXXXXX)
cleanup() { scripts/bao.sh stop "$WORK"; scripts/nats.sh stop "$WORK"; scripts/pg.sh stop "$WORK"; rm -rf "$WORK"; }
trap cleanup EXIT
case "${NATS:-debian}" in
  debian) NATS_BIN=$NATS_SERVER_DEBIAN ;;
  current) NATS_BIN=$NATS_SERVER_CURRENT ;;
  *) echo "NATS must be debian or current" >&2; exit 2 ;;
esac
# the accounts of nats/dev.conf: the broker vouches for the client whose
# commands go through the intake
if [ "${SYNC:-default}" = always ]; then
  sed 's/^jetstream {}$/jetstream {\n  sync_interval: always\n}/' nats/dev.conf >"$WORK/strict.conf"
  export NATS_EXTRA_ARGS="-c $WORK/strict.conf"
  echo "nats-server durability: sync_interval always (fsync before every ack)"
else
  export NATS_EXTRA_ARGS="-c $PWD/nats/dev.conf"
  echo "nats-server durability: default sync_interval (2 minutes)"
fi
export FLOWLEDGER_NATS_USER=flowledger FLOWLEDGER_NATS_PASSWORD=dev-flowledger-password
export FLOWLEDGER_BENCH_CLIENT_USER=billing FLOWLEDGER_BENCH_CLIENT_PASSWORD=dev-billing-password
export FLOWLEDGER_NATS_URL DATABASE_URL
FLOWLEDGER_NATS_URL=$(scripts/nats.sh start "$WORK" "$NATS_BIN")
if [ "${1:-}" = memory ]; then PG_BIN=$PG18_BIN; fi
DATABASE_URL=$(PG_BIN=$PG_BIN scripts/pg.sh start "$WORK")
if [ "${1:-}" = secrets ] || [ "${1:-}" = memory ]; then
  # the secret-access bench reads an OpenBao dev server as its root (the
  # memory bench keeps the subjects' keys in it)
  export FLOWLEDGER_BENCH_VAULT_ADDR FLOWLEDGER_BENCH_VAULT_TOKEN=flowledger-bench-root
  FLOWLEDGER_BENCH_VAULT_ADDR=$(BAO_ROOT_TOKEN=$FLOWLEDGER_BENCH_VAULT_TOKEN scripts/bao.sh start "$WORK" "$BAO_BIN")
fi
target/release/flowledger-bench "$@"
