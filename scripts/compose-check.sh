#!/usr/bin/env bash
# Checks docker-compose.yml without a Docker engine: `docker-compose config
# -q` (the file parses, matches the Compose schema, and its variables
# resolve), then the rules below on the resolved file:
#   - every long-running service has a healthcheck (one-shots, the services
#     another depends on with service_completed_successfully, are exempt)
#   - init depends on nats and postgres being healthy, and flowledger on
#     init having completed successfully
# The validator is docker-compose 1.29.2 from PyPI, in its own venv (made
# once, remade when the pins change; offline afterwards): under
# /opt/flowledger when writable, else ~/.cache/flowledger. docker-compose
# 1.29.2 asks for PyYAML<6, which does not build on Python 3.11: it is
# installed without its dependencies, and those pinned here, PyYAML 6.
# Part of scripts/test.sh. Usage: scripts/compose-check.sh [FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-docker-compose.yml}
[ -f "$FILE" ] || { echo "compose-check: $FILE not found" >&2; exit 1; }

log() { echo "compose-check: $*" >&2; }
if mkdir -p /opt/flowledger 2>/dev/null && [ -w /opt/flowledger ]; then
  VENV=/opt/flowledger/compose-check
else
  VENV="${XDG_CACHE_HOME:-$HOME/.cache}/flowledger/compose-check"
fi
PINS="docker-compose==1.29.2 PyYAML==6.0.2 distro==1.9.0 docker==6.1.3 dockerpty==0.4.1 docopt==0.6.2 jsonschema==3.2.0 python-dotenv==0.21.1 requests==2.32.3 texttable==1.7.0 websocket-client==0.59.0"
if [ "$(cat "$VENV/PINS" 2>/dev/null)" != "$PINS" ] || ! "$VENV/bin/docker-compose" version >/dev/null 2>&1; then
  log "make $VENV: pip install $PINS"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps ${PINS%% *} >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check ${PINS#* } 2>&1 \
    | grep -v "docker-compose 1.29.2 requires PyYAML<6\|dependency resolver does not currently" >&2 || true
  "$VENV/bin/docker-compose" version >/dev/null \
    || { log "docker-compose is installed in $VENV, but does not run"; exit 1; }
  echo "$PINS" >"$VENV/PINS"
fi

# no engine is asked: config only reads the file (and the environment for
# its ${VARIABLES}); DOCKER_HOST is cleared so that none is reached either
DC=(env -u DOCKER_HOST -u DOCKER_CONTEXT "$VENV/bin/docker-compose" -f "$FILE")
"${DC[@]}" config -q || { log "$FILE is not a valid compose file (above)"; exit 1; }
"${DC[@]}" config | "$VENV/bin/python" -c '
import sys, yaml

doc = yaml.safe_load(sys.stdin)
services = doc.get("services") or {}
problems = []

def depends(name):
    d = services.get(name, {}).get("depends_on") or {}
    # the resolved form is a mapping to {condition: ...}; a list means started
    return d if isinstance(d, dict) else {n: {"condition": "service_started"} for n in d}

one_shots = {dep for name in services for dep, c in depends(name).items()
             if c.get("condition") == "service_completed_successfully"}
for name, svc in sorted(services.items()):
    if name in one_shots:
        continue
    hc = svc.get("healthcheck")
    test = (hc or {}).get("test")
    if not hc or hc.get("disable") or not test or test == ["NONE"]:
        problems.append(f"service {name} runs for long and has no healthcheck")

def want(name, dep, condition):
    if name not in services:
        problems.append(f"no service {name}")
        return
    got = depends(name).get(dep, {}).get("condition")
    if got != condition:
        problems.append(f"service {name} must depend on {dep} with condition {condition}, has {got}")

want("init", "nats", "service_healthy")
want("init", "postgres", "service_healthy")
want("flowledger", "init", "service_completed_successfully")
if problems:
    for p in problems:
        print("compose-check: " + p, file=sys.stderr)
    sys.exit(1)
shots = ", ".join(sorted(one_shots))
print(f"compose-check: {len(services)} services, one-shot: {shots}; every other has a healthcheck; flowledger waits for init")
'
