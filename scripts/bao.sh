#!/usr/bin/env bash
# Start or stop a throw-away OpenBao dev server (in memory; `secret/` is a
# KV v2 mount) on a free loopback port, with a file audit device in DIR.
#   scripts/bao.sh start DIR [BINARY]   prints the address; pid in DIR/bao.pid
#   scripts/bao.sh stop DIR
# The root token is BAO_ROOT_TOKEN (default dev-root-token). BINARY defaults
# to FLOWLEDGER_BAO, then `bao` (scripts/install-deps.sh prints BAO_BIN).
set -euo pipefail
cmd=${1:?usage: bao.sh start|stop DIR [BINARY]}
dir=${2:?usage: bao.sh start|stop DIR [BINARY]}
token=${BAO_ROOT_TOKEN:-dev-root-token}
case "$cmd" in
  start)
    bin=${3:-${FLOWLEDGER_BAO:-bao}}
    mkdir -p "$dir/bao"
    # audit devices cannot be enabled through the API in OpenBao 2.x
    cat >"$dir/bao/bao.hcl" <<HCL
audit "file" "file" {
  options {
    file_path = "$dir/bao/audit.log"
  }
}
HCL
    for _ in 1 2 3 4 5; do
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      env -u VAULT_ADDR -u BAO_ADDR -u VAULT_TOKEN -u BAO_TOKEN HOME="$dir/bao" "$bin" server -dev -dev-root-token-id="$token" \
        -dev-listen-address="127.0.0.1:$port" -config="$dir/bao/bao.hcl" >"$dir/bao/bao.log" 2>&1 &
      pid=$!
      echo "$pid" >"$dir/bao.pid"
      addr="http://127.0.0.1:$port"
      for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        # ready once secret/ is KV v2 (a dev server upgrades it after start)
        code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Vault-Token: $token" \
          "$addr/v1/secret/config" || true)
        if [ "$code" = 200 ]; then echo "$addr"; exit 0; fi
        sleep 0.1
      done
      kill "$pid" 2>/dev/null || true
    done
    echo "bao.sh: OpenBao did not start; see $dir/bao/bao.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$dir/bao.pid" ]; then
      kill "$(cat "$dir/bao.pid")" 2>/dev/null || true
      rm -f "$dir/bao.pid"
    fi
    ;;
  *) echo "usage: bao.sh start|stop DIR [BINARY]" >&2; exit 2 ;;
esac
