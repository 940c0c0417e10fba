#!/usr/bin/env bash
# Start or stop a throw-away nats-server with JetStream on a free loopback
# port (the server picks it: no race), its store in DIR.
#   scripts/nats.sh start DIR [BINARY]   prints the URL; pid in DIR/nats.pid
#   scripts/nats.sh stop DIR
# Extra server flags (e.g. a config file) can be given in NATS_EXTRA_ARGS.
set -euo pipefail
cmd=${1:?usage: nats.sh start|stop DIR [BINARY]}
dir=${2:?usage: nats.sh start|stop DIR [BINARY]}
case "$cmd" in
  start)
    bin=${3:-${FLOWLEDGER_NATS_SERVER:-nats-server}}
    mkdir -p "$dir/store"
    # shellcheck disable=SC2086
    "$bin" -a 127.0.0.1 -p -1 -js -sd "$dir/store" --ports_file_dir "$dir" ${NATS_EXTRA_ARGS:-} >"$dir/nats.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/nats.pid"
    for _ in $(seq 1 100); do
      if [ -s "$dir/nats-server_$pid.ports" ]; then
        python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nats"][0])' "$dir/nats-server_$pid.ports"
        exit 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    echo "nats.sh: nats-server did not start; see $dir/nats.log" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
    ;;
  stop)
    if [ -f "$dir/nats.pid" ]; then
      kill "$(cat "$dir/nats.pid")" 2>/dev/null || true
      rm -f "$dir/nats.pid"
    fi
    ;;
  *) echo "usage: nats.sh start|stop DIR [BINARY]" >&2; exit 2 ;;
esac
