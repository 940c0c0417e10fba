#!/usr/bin/env bash
# Start or stop a throw-away PostgreSQL on a free loopback port, its data
# in DIR (run as the `postgres` user when invoked as root: initdb and
# postgres refuse root; DIR/pg is chowned to postgres).
#   PG_BIN   the server's bin directory; default Debian's PostgreSQL 15.
#            PostgreSQL 18 with pgvector and pg_trgm: PG_BIN="$PG18_BIN"
#            (from scripts/install-deps.sh).
#   scripts/pg.sh start DIR   prints a DATABASE_URL
#   scripts/pg.sh stop DIR
set -euo pipefail
cmd=${1:?usage: pg.sh start|stop DIR}
dir=${2:?usage: pg.sh start|stop DIR}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$cmd" in
  start)
    mkdir -p "$dir/pg"
    if [ "$(id -u)" = 0 ]; then chmod o+x "$dir"; chown -R postgres:postgres "$dir/pg"; fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_owner "$PG_BIN/initdb" -D "$dir/pg/data" -U postgres -A trust --no-sync >"$dir/pg/initdb.log" 2>&1 \
      || { echo "pg.sh: initdb failed; see $dir/pg/initdb.log" >&2; exit 1; }
    as_owner "$PG_BIN/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/pg -c max_connections=200 -c fsync=on" start >/dev/null \
      || { echo "pg.sh: postgres did not start; see $dir/pg/server.log" >&2; exit 1; }
    echo "$port" >"$dir/pg/port"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    if [ -f "$dir/pg/data/postmaster.pid" ]; then
      as_owner "$PG_BIN/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
  *) echo "usage: pg.sh start|stop DIR" >&2; exit 2 ;;
esac
