#!/usr/bin/env bash
# End-to-end deployment test on a machine with Debian's Docker engine and no registry access.
# Not part of CI (it needs root, a Docker engine and 5.5 to 7.5 minutes; see docs/operations.md).
#
#   sudo deploy/test-deployment.sh            # from the repository root
#
# What it does, in order, and fails on the first thing that is wrong:
#  1. starts dockerd if no engine answers (and stops it again at the end);
#  2. builds local stand-ins for python:3.11-slim, postgres:16 and nginx (build-base-images.sh);
#  3. builds the image with BuildKit (the host's CA bundle as the optional build secret "pip-ca"),
#     checks it has no pip and runs as non-root; prints its size;
#  4. runs it alone with a read-only root file system (--read-only --tmpfs /tmp plus the data
#     volume), prints start-to-ready time, waits for Docker's health status, and runs the README
#     walkthrough (tests/test_readme.py's runner) against it;
#  5. brings up docker-compose.yml (PostgreSQL, two replicas, nginx) with secrets in an env file;
#  6. takes a backup with `exec -T postgres pg_dump` and checks it lists the runs table;
#  7. disconnects one replica from the database network while traffic runs through nginx: no
#     request may fail, and that replica must stop being routed to; reconnects it and checks it
#     recovers by itself and serves again;
#  8. kills PostgreSQL: every answer must be 503 (never a 500 or a hang); starts it again and
#     checks that both replicas recover by themselves;
#  9. restores the backup into a fresh stack (new volume) and finds the runs there;
# 10. removes everything it created (containers, volumes, networks; the images stay cached).
#
# Environment: LRSERVE_DEPLOY_WORK (cache folder, default /var/tmp/lrserve-deploy), KEEP=1 (leave
# the stack up for a look), OUTAGE_SECONDS (default 20), PYTHON (default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${LRSERVE_DEPLOY_WORK:-/var/tmp/lrserve-deploy}
OUTAGE_SECONDS=${OUTAGE_SECONDS:-20}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
PROJECT=lrserve-deploytest
IMAGE=lrserve:deploytest
mkdir -p "$WORK"
T_START=$(date +%s)

say() { printf '\n== %s\n' "$*"; }
info() { printf '   %s\n' "$*"; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

# ---------------------------------------------------------------- 1. the engine
STARTED_DOCKERD=""
SINGLE=""
WATCHER=""
cleanup() {
    local rc=$?
    set +e
    if [ "${KEEP:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
        info "KEEP=1: stack $PROJECT left running (env file $ENV_FILE)"
        return
    fi
    [ -n "$WATCHER" ] && kill "$WATCHER" 2>/dev/null
    [ -n "$SINGLE" ] && docker rm -f "$SINGLE" >/dev/null 2>&1
    docker volume rm -f "$PROJECT-single" >/dev/null 2>&1
    if [ -n "${COMPOSE_READY:-}" ]; then compose down -v --remove-orphans >/dev/null 2>&1; fi
    if [ -n "$STARTED_DOCKERD" ]; then
        kill "$STARTED_DOCKERD" 2>/dev/null && wait "$STARTED_DOCKERD" 2>/dev/null
        info "stopped the dockerd this script started"
    fi
    printf '\ntotal time: %ss\n' "$(($(date +%s) - T_START))"
}
trap cleanup EXIT

say "Docker engine"
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || fail "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start: $(tail -n 5 "$WORK/dockerd.log")"
    info "started dockerd (pid $STARTED_DOCKERD)"
fi
info "engine $(docker version -f '{{.Server.Version}}' 2>/dev/null)"

# A client that builds with BuildKit: Docker >= 23 does through buildx; an older client (Debian's
# 20.10) does with DOCKER_BUILDKIT=1. A newer client without the buildx plugin cannot.
BUILD_DOCKER=""
if docker buildx version >/dev/null 2>&1; then
    BUILD_DOCKER=docker
else
    for c in docker /usr/bin/docker; do
        v=$("$c" version -f '{{.Client.Version}}' 2>/dev/null || true)
        if [ -n "$v" ] && [ "${v%%.*}" -lt 23 ] 2>/dev/null; then BUILD_DOCKER=$c; break; fi
    done
fi
[ -n "$BUILD_DOCKER" ] || fail "no BuildKit-capable docker client (install the buildx plugin)"

if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE_CMD=(docker-compose)
else
    fail "neither 'docker compose' nor docker-compose is installed (apt-get install docker-compose)"
fi
info "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?'))"

# ---------------------------------------------------------------- 2. base images
say "Base images (local stand-ins built with debootstrap)"
t=$(now)
DOCKER=docker LRSERVE_DEPLOY_WORK="$WORK" deploy/build-base-images.sh
info "base images ready in $(since "$t")s"

# ---------------------------------------------------------------- 3. the image
say "Image"
build_args=(--build-arg PYTHON_IMAGE=lrserve-base/python:3.11)
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    [ -n "${!v:-}" ] && build_args+=(--build-arg "$v")
done
CA=${LRSERVE_BUILD_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
[ -s "$CA" ] && build_args+=(--secret "id=pip-ca,src=$CA")
t=$(now)
DOCKER_BUILDKIT=1 "$BUILD_DOCKER" build --progress=plain "${build_args[@]}" -t "$IMAGE" . \
    >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log"; fail "docker build"; }
BUILD_S=$(since "$t")
info "built $IMAGE in ${BUILD_S}s (log: $WORK/build.log)"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' lrserve-base/python:3.11)
SIZE="$((size / 1000000)) MB (base $((base_size / 1000000)) MB + lrserve $(((size - base_size) / 1000000)) MB)"
info "image size: $SIZE"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[ -n "$user" ] && [ "${user%%:*}" != root ] && [ "${user%%:*}" != 0 ] || fail "image runs as '$user'"
docker run --rm "$IMAGE" python -c '
import importlib.util, sys
found = [m for m in ("pip", "setuptools", "wheel", "ensurepip") if importlib.util.find_spec(m)]
sys.exit("unused in the runtime image: %s" % found if found else 0)' || fail "pip/setuptools in the image"
info "user $user; no pip, setuptools, wheel or ensurepip in the image"

# ---------------------------------------------------------------- 4. one container, read-only
say "One container: read-only root file system, README walkthrough"
port=$(free_port)
docker volume create "$PROJECT-single" >/dev/null
t=$(now)
# No token: the walkthrough uses none. Published on loopback only.
SINGLE=$(docker run -d --read-only --tmpfs /tmp -v "$PROJECT-single:/var/lib/lrserve" \
    -e LRSERVE_ALLOW_UNAUTHENTICATED=1 -p "127.0.0.1:$port:8000" "$IMAGE")
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { docker logs "$SINGLE" | tail; fail "not ready after 30 s"; }
READY_S=$(since "$t")
info "start-to-ready (docker run to /readyz 200): ${READY_S}s"
for _ in $(seq 1 60); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$SINGLE")" = healthy ] && break
    sleep 0.5
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$SINGLE")" = healthy ] || fail "HEALTHCHECK never healthy"
HEALTHY_S=$(since "$t")
info "docker run to HEALTHCHECK healthy: ${HEALTHY_S}s"
"$PYTHON" - "http://127.0.0.1:$port" <<'PY' || fail "README walkthrough against the container"
import sys, types
sys.path.insert(0, ".")
from tests.test_readme import test_walkthrough_runs_against_a_live_server as walkthrough
walkthrough(lambda **_: types.SimpleNamespace(url=sys.argv[1]))
print("   README walkthrough: every command answered, rates and events checked")
PY
docker exec "$SINGLE" sh -c 'touch /opt/lrserve/x 2>/dev/null' && fail "the root file system is writable"
info "root file system is read-only; the database is in the volume: $(docker exec "$SINGLE" ls /var/lib/lrserve | tr '\n' ' ')"
# The SQLite backup of docs/operations.md, in the running read-only container.
docker exec "$SINGLE" python -c "import sqlite3; sqlite3.connect('/var/lib/lrserve/lrserve.db').backup(sqlite3.connect('/var/lib/lrserve/backup.db'))" \
    || fail "SQLite backup in the container"
rm -f "$WORK/sqlite-backup.db"
docker cp "$SINGLE:/var/lib/lrserve/backup.db" "$WORK/sqlite-backup.db"
n=$("$PYTHON" -c "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT count(*) FROM runs WHERE id = 'demo'\").fetchone()[0])" "$WORK/sqlite-backup.db")
[ "$n" = 1 ] || fail "the SQLite backup has no run 'demo'"
info "SQLite backup (python's backup API in the container, docker cp): $(stat -c %s "$WORK/sqlite-backup.db") bytes, has the walkthrough's run"
docker rm -f "$SINGLE" >/dev/null
SINGLE=""
docker volume rm "$PROJECT-single" >/dev/null

# ---------------------------------------------------------------- 5. the compose stack
say "docker compose: PostgreSQL, two replicas, nginx"
ENV_FILE="$WORK/deploytest.env"
LB_PORT=$(free_port)
TOKEN=$(secret)
umask 077
cat >"$ENV_FILE" <<EOF
LRSERVE_TOKEN=$TOKEN
POSTGRES_PASSWORD=$(secret)
LRSERVE_PUBLISH=127.0.0.1:$LB_PORT
LRSERVE_IMAGE=$IMAGE
LRSERVE_POSTGRES_IMAGE=lrserve-base/postgres:15
LRSERVE_NGINX_IMAGE=lrserve-base/nginx:light
EOF
umask 022
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$ENV_FILE" -f "$ROOT/docker-compose.yml" "$@"; }
COMPOSE_READY=1
LB="http://127.0.0.1:$LB_PORT"
AUTH=(-H "Authorization: Bearer $TOKEN")
cid() { compose ps -q "$1"; }
health() { docker inspect -f '{{.State.Health.Status}}' "$(cid "$1")"; }
wait_health() { # SERVICE STATUS SECONDS
    local end=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$end" ]; do
        [ "$(health "$1")" = "$2" ] && return 0
        sleep 0.5
    done
    return 1
}
watch_health() { # SERVICE FILE: "seconds status" on every change of its health, until killed
    local id last="" s t0
    id=$(cid "$1")
    t0=$(now)
    while :; do
        s=$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo gone)
        if [ "$s" != "$last" ]; then
            echo "$(since "$t0")s $s" >>"$2"
            last=$s
        fi
        sleep 0.5
    done
}
front_ip() { docker inspect -f "{{(index .NetworkSettings.Networks \"${PROJECT}_front\").IPAddress}}" "$(cid "$1")"; }

# No secret is needed to parse the file (no ${VAR:?}): ps, exec and down work without them.
: >"$WORK/empty.env"
"${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$WORK/empty.env" -f "$ROOT/docker-compose.yml" config -q \
    || fail "the compose file does not parse without secrets"
"${COMPOSE_CMD[@]}" -p "$PROJECT" --env-file "$WORK/empty.env" -f "$ROOT/docker-compose.yml" ps >/dev/null \
    || fail "compose ps needs secrets"
info "compose config and ps work with no secret set"
compose down -v --remove-orphans >/dev/null 2>&1 || true
t=$(now)
compose up -d --no-build >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; fail "compose up"; }
wait_health lb healthy 120 || { compose ps; compose logs --tail 20; fail "the stack never became healthy"; }
UP_S=$(since "$t")
info "compose up to balancer healthy: ${UP_S}s"
compose ps
R1_IP=$(front_ip lrserve-1)
R2_IP=$(front_ip lrserve-2)
replicas=("lrserve-1=$R1_IP" "lrserve-2=$R2_IP")
curl -sf "${AUTH[@]}" -X PUT "$LB/v1/runs/backup-me" -H 'Content-Type: application/json' \
    -d '{"groups": [{"name": "a", "lr": 0.1}], "schedule": {"type": "StepLR", "step_size": 10}}' >/dev/null \
    || fail "PUT through the balancer"
code=$(curl -s -o /dev/null -w '%{http_code}' "$LB/metrics")
[ "$code" = 403 ] || fail "/metrics through the balancer answered $code, not 403"
info "PUT through nginx ok; /metrics through nginx: $code"
"$PYTHON" deploy/traffic.py send "$LB" "$TOKEN" 5 warmup >/dev/null

# ---------------------------------------------------------------- 6. backup
say "Backup: compose exec -T postgres pg_dump"
DUMP="$WORK/lrserve-backup.dump"
compose exec -T postgres pg_dump -U lrserve -Fc lrserve >"$DUMP" || fail "pg_dump exited $?"
[ -s "$DUMP" ] || fail "the dump is empty"
compose exec -T postgres pg_restore -l <"$DUMP" | grep -q 'TABLE DATA public runs' || fail "the dump has no runs table"
info "dump: $(stat -c %s "$DUMP") bytes, lists the runs table"

lb_window() { # SINCE: nginx access lines since then, per status and replica
    docker logs --since "$1" "$(cid lb)" 2>/dev/null | "$PYTHON" deploy/traffic.py lblog "${replicas[@]}"
}
traffic() { "$PYTHON" deploy/traffic.py send "$LB" "$TOKEN" "$1" "$2"; }

# ---------------------------------------------------------------- 7. one replica loses its database
say "Outage 1: lrserve-1 loses its database (disconnected from the db network) for ${OUTAGE_SECONDS}s"
since_ts=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
: >"$WORK/health-outage1.txt"
watch_health lrserve-1 "$WORK/health-outage1.txt" &
WATCHER=$!
docker network disconnect "${PROJECT}_db" "$(cid lrserve-1)"
client=$(traffic "$OUTAGE_SECONDS" outage1)
O1_CLIENT=$client
info "clients: $client"
info "lrserve-1 /readyz: $(docker exec "$(cid lrserve-1)" python -c '
import urllib.request, urllib.error
try:
    print(urllib.request.urlopen("http://127.0.0.1:8000/readyz", timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode()[:160])
except Exception as e:
    print(type(e).__name__)')"
window=$(lb_window "$since_ts")
O1_NGINX=$window
info "nginx:   $window"
"$PYTHON" - "$client" "$window" <<'PY' || fail "while one replica had no database"
import json, sys
c, w = json.loads(sys.argv[1]), json.loads(sys.argv[2])
bad = {k: v for k, v in c["statuses"].items() if not k.startswith("2")}
if bad or c["timeouts"] or c["errors"]:
    sys.exit(f"non-2xx answers: {bad}, timeouts {c['timeouts']}, errors {c['errors']}")
# Passive checks: nginx tries the broken replica again once its fail_timeout (5 s) is over, so a
# few requests still reach it (and are resent); all the others go to the healthy one.
tried = w["attempts"].get("lrserve-1", 0)
if tried > 0.1 * w["requests"]:
    sys.exit(f"{tried} of {w['requests']} requests still went to lrserve-1")
PY
info "every request through nginx succeeded; lrserve-1 was only probed"
say "Recovery 1: lrserve-1 reconnected"
docker network connect "${PROJECT}_db" "$(cid lrserve-1)"
t=$(now)
wait_health lrserve-1 healthy 60 || { compose logs --tail 30 lrserve-1; fail "lrserve-1 did not recover by itself"; }
R1_S=$(since "$t")
info "lrserve-1 healthy again ${R1_S}s after the reconnect"
kill "$WATCHER" 2>/dev/null
wait "$WATCHER" 2>/dev/null || true
O1_HEALTH=$(tr '\n' ',' <"$WORK/health-outage1.txt" | sed 's/,$//; s/,/, /g')
info "lrserve-1 health from the disconnect on: $O1_HEALTH"
sleep 6 # nginx's fail_timeout: the replica is tried again after at most 5 s
since_ts=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
client=$(traffic 10 recovery1)
window=$(lb_window "$since_ts")
R1_NGINX=$window
info "clients: $client"
info "nginx:   $window"
"$PYTHON" - "$client" "$window" <<'PY' || fail "after recovery"
import json, sys
c, w = json.loads(sys.argv[1]), json.loads(sys.argv[2])
bad = {k: v for k, v in c["statuses"].items() if not k.startswith("2")}
if bad or c["timeouts"] or c["errors"]:
    sys.exit(f"non-2xx answers after recovery: {bad}")
if w["served_by"].get("lrserve-1", 0) == 0:
    sys.exit("lrserve-1 serves no request after it recovered")
PY
info "lrserve-1 serves again"

# ---------------------------------------------------------------- 8. the database goes away
say "Outage 2: PostgreSQL killed for ${OUTAGE_SECONDS}s"
since_ts=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
: >"$WORK/health-outage2.txt"
watch_health lrserve-2 "$WORK/health-outage2.txt" &
WATCHER=$!
compose kill postgres >/dev/null 2>&1
t=$(now)
client=$(traffic "$OUTAGE_SECONDS" outage2)
O2_CLIENT=$client
O2_NGINX=$(lb_window "$since_ts")
info "clients: $client"
info "nginx:   $O2_NGINX"
info "health: lrserve-1 $(health lrserve-1), lrserve-2 $(health lrserve-2), lb $(health lb)"
"$PYTHON" - "$client" <<'PY' || fail "during the database outage"
import json, sys
c = json.loads(sys.argv[1])
other = {k: v for k, v in c["statuses"].items() if k != "503"}
if "500" in c["statuses"]:
    sys.exit(f"500 answers: {c['statuses']['500']}")
if other or c["timeouts"] or c["errors"]:
    sys.exit(f"answers other than 503: {other}, timeouts {c['timeouts']}, errors {c['errors']}")
PY
info "no 500, no timeout: every answer was 503 with Retry-After"
say "Recovery 2: PostgreSQL started again"
compose start postgres >/dev/null 2>&1
t=$(now)
wait_health lrserve-1 healthy 90 && wait_health lrserve-2 healthy 90 \
    || { compose logs --tail 30 lrserve-1 lrserve-2; fail "the replicas did not recover by themselves"; }
R2_S=$(since "$t")
info "both replicas healthy again ${R2_S}s after postgres start"
kill "$WATCHER" 2>/dev/null
wait "$WATCHER" 2>/dev/null || true
info "lrserve-2 health from the kill on: $(tr '\n' ',' <"$WORK/health-outage2.txt" | sed 's/,$//; s/,/, /g')"
sleep 6
since_ts=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
client=$(traffic 10 recovery2)
info "clients: $client"
info "nginx:   $(lb_window "$since_ts")"
"$PYTHON" - "$client" <<'PY' || fail "after the database came back"
import json, sys
c = json.loads(sys.argv[1])
bad = {k: v for k, v in c["statuses"].items() if not k.startswith("2")}
sys.exit(f"non-2xx answers: {bad}" if bad or c["timeouts"] or c["errors"] else 0)
PY
info "every request succeeded again"

# ---------------------------------------------------------------- 9. restore into a fresh stack
say "Restore the backup into a fresh stack"
compose down -v >/dev/null 2>&1
compose up -d --no-build postgres >/dev/null 2>&1
wait_health postgres healthy 60 || fail "fresh postgres not healthy"
compose exec -T postgres pg_restore -U lrserve -d lrserve --no-owner --exit-on-error <"$DUMP" \
    || fail "pg_restore exited $?"
compose up -d --no-build >/dev/null 2>&1
wait_health lb healthy 120 || fail "the restored stack never became healthy"
for run in backup-me deploytest-warmup-0 deploytest-warmup-3; do
    curl -sf "${AUTH[@]}" "$LB/v1/runs/$run" >/dev/null || fail "run $run not found after the restore"
done
info "restored: runs backup-me, deploytest-warmup-0..3 found through nginx"

say "All deployment checks passed"
cat <<EOF
   image size:            $SIZE, built in ${BUILD_S}s
   start-to-ready:        ${READY_S}s (docker run to /readyz 200), HEALTHCHECK healthy at ${HEALTHY_S}s
   compose up:            ${UP_S}s to the balancer healthy
   outage 1 (lrserve-1 cut off its database for ${OUTAGE_SECONDS}s):
     clients:             $O1_CLIENT
     nginx:               $O1_NGINX
     lrserve-1 health:    $O1_HEALTH
     after reconnect:     healthy in ${R1_S}s; nginx $R1_NGINX
   outage 2 (PostgreSQL killed for ${OUTAGE_SECONDS}s):
     clients:             $O2_CLIENT
     nginx:               $O2_NGINX
     after restart:       both replicas healthy in ${R2_S}s
EOF
