#!/usr/bin/env bash
# Start or stop a throw-away OpenBao dev server (in memory, KV v2 at
# secret/) on a free loopback port, with a file audit device in DIR, as
# the integration tests run it (tests/integration/openbao.rs).
#   scripts/bao.sh start DIR [BINARY]   prints the address; pid in DIR/bao.pid
#   scripts/bao.sh stop DIR
# The root token is BAO_ROOT_TOKEN (default flowledger-bench-root). BINARY
# defaults to FLOWLEDGER_BAO, else `bao` on PATH (scripts/install-deps.sh
# prints BAO_BIN). Right after a start the dev server upgrades secret/ to
# KV v2 and answers writes 400 for a moment: the first writer waits it out.
set -euo pipefail
cmd=${1:?usage: bao.sh start|stop DIR [BINARY]}
dir=${2:?usage: bao.sh start|stop DIR [BINARY]}
case "$cmd" in
  start)
    bin=${3:-${FLOWLEDGER_BAO:-bao}}
    token=${BAO_ROOT_TOKEN:-flowledger-bench-root}
    mkdir -p "$dir/bao/audit"
    # OpenBao 2.x enables audit devices only from its configuration
    printf 'audit "file" "file" {\n  options {\n    file_path = "%s"\n  }\n}\n' \
      "$dir/bao/audit/audit.log" >"$dir/bao/bao.hcl"
    # a port free now may be taken before bao binds it: try others
    for _ in 1 2 3 4 5; do
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      addr="http://127.0.0.1:$port"
      # dev mode writes the root token to ~/.vault-token: not ours
      env -u VAULT_ADDR -u BAO_ADDR -u VAULT_TOKEN -u BAO_TOKEN HOME="$dir/bao" \
        "$bin" server -dev -dev-root-token-id="$token" -dev-listen-address="127.0.0.1:$port" \
        -config="$dir/bao/bao.hcl" </dev/null >"$dir/bao/bao.log" 2>&1 &
      pid=$!
      echo "$pid" >"$dir/bao.pid"
      for _ in $(seq 1 200); do
        if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/v1/sys/health", timeout=1)' "$addr" 2>/dev/null; then
          echo "$addr"
          exit 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill "$pid" 2>/dev/null || true
      rm -f "$dir/bao.pid"
    done
    echo "bao.sh: $bin did not start; see $dir/bao/bao.log" >&2
    tail -n 15 "$dir/bao/bao.log" >&2 || true
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
