# Shared by the scripts that run flowledger on throw-away servers
# (demo.sh, docs-check.sh, api-check.sh, readme-check.sh, n8n-try.sh).
# Source it from the repository root: `. scripts/lib.sh`.

# work_dir PREFIX: makes WORK, a new directory under /tmp, and on exit
# stops what the script started (each pid in PIDS, each process group in
# PGIDS, the nats-server, PostgreSQL and OpenBao started in WORK), then
# removes WORK (KEEP=1 keeps it and says where).
PIDS=()
PGIDS=()
work_dir() {
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  trap cleanup_work EXIT
}
cleanup_work() {
  local p s
  for p in "${PGIDS[@]}"; do kill -- "-$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for s in nats pg bao; do scripts/$s.sh stop "$WORK" >/dev/null 2>&1 || true; done
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

# free_port: a free loopback TCP port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# bao_api ARGS...: curl against the throw-away OpenBao as its root.
bao_api() { curl -fsS -H "X-Vault-Token: dev-root-token" "$@"; }

# bao_flowledger_token BAO_ADDR: gives the policy `flowledger` (read
# secret/data/billing/*, keep the memory subjects' keys under
# flowledger/memory-keys: docs/SECRETS.md, docs/MEMORY.md) and prints a
# new token that has it.
bao_flowledger_token() {
  local addr=$1
  python3 -c 'import json; print(json.dumps({"policy": """
path "secret/data/billing/*" { capabilities = ["read"] }
path "secret/data/flowledger/memory-keys/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/flowledger/memory-keys/*" { capabilities = ["read"] }
path "secret/destroy/flowledger/memory-keys/*" { capabilities = ["update"] }
"""}))' | bao_api -X PUT -d @- "$addr/v1/sys/policies/acl/flowledger" >/dev/null
  bao_api -X POST -d '{"policies": ["flowledger"]}' "$addr/v1/auth/token/create" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["auth"]["client_token"])'
}

# config_with_secrets FILE BAO_ADDR [CLIENT [PATHS]]: config/example.toml
# plus [secrets] (CLIENT, default billing, reads PATHS, default
# secret/data/billing/*) and [memory], in FILE.
config_with_secrets() {
  local client=${3:-billing} paths=${4:-secret/data/billing/*}
  cp config/example.toml "$1"
  cat >>"$1" <<TOML

[secrets]
vault_addr = "$2"

[[secrets.rules]]
name = "$client-reads-its-keys"
clients = ["$client"]
paths = ["$paths"]

[memory]
enabled = true
TOML
}
