#!/bin/bash
# The compose deployment's chores, for `make up/down` and tests/compose (run from the checkout, as root or a
# docker group member):
#   deploy/compose.sh dockerd   start dockerd if no daemon answers (machines without systemd); prints its pid if started
#   deploy/compose.sh images    the wheelhouse (build/wheelhouse, from the host's PyPI access) and the Goldsmith
#                               image; with STAND_INS=1 first the local stand-ins of the upstream images
#   deploy/compose.sh seed      copy the host's Debian base images ($GOLDSMITH_CACHE/base, built as root on the
#                               host if missing) into the deployment's cache volume: workers are not root and
#                               cannot bootstrap one (loop devices, mount)
#   deploy/compose.sh up|down   up -d, then wait until every service is healthy (or done, airflow-init) / down -v
#                               (PROFILES=flower adds Flower)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STAND_INS=${STAND_INS:-}
STAND_IN_AIRFLOW=goldsmith-stand-in/airflow:3.3.2-python3.11
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-goldsmith}
if [ -n "$STAND_INS" ]; then export AIRFLOW_IMAGE=$STAND_IN_AIRFLOW; fi

files=(-f docker-compose.yaml)
[ -n "$STAND_INS" ] && files+=(-f deploy/stand-ins/docker-compose.yaml)
if [ -c /dev/kvm ]; then files+=(-f docker-compose.kvm.yaml); export KVM_GID=$(stat -c %g /dev/kvm); fi
profiles=()
for p in ${PROFILES:-}; do profiles+=(--profile "$p"); done
compose() { docker-compose "${files[@]}" "${profiles[@]}" "$@"; }

dockerd_start() {
    docker info >/dev/null 2>&1 && return 0
    command -v dockerd >/dev/null || { echo "dockerd is not installed (make apt installs docker.io)" >&2; exit 1; }
    local log=${DOCKERD_LOG:-/var/log/goldsmith-dockerd.log}
    setsid dockerd >"$log" 2>&1 < /dev/null &
    local pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && { echo "$pid"; return 0; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    echo "dockerd did not start: see $log" >&2; tail -5 "$log" >&2; exit 1
}

wheelhouse() {
    # Pins: the project's own resolution (uv, from pyproject.toml) plus what a Celery deployment adds.
    mkdir -p build/wheelhouse
    local stamp=build/.wheelhouse-pins
    # The versions the project's venv was tested with, so the images run what `make test` ran.
    uv pip freeze -q --python "$PY" --exclude-editable > build/constraints.txt
    printf '%s\n' . apache-airflow-providers-celery apache-airflow-providers-postgres flower > build/compose-reqs.in
    uv pip compile -q --python-version 3.11 --python-platform x86_64-manylinux_2_28 -c build/constraints.txt \
        build/compose-reqs.in -o build/compose-reqs.txt
    grep -E '^[A-Za-z0-9]' build/compose-reqs.txt | grep -v '^goldsmith' > build/compose-pins.txt
    if ! cmp -s build/compose-pins.txt "$stamp"; then
        # setuptools: the build backend of the image's editable install of Goldsmith.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d build/wheelhouse \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform linux_x86_64 -r build/compose-pins.txt 'setuptools==80.10.2'
        cp build/compose-pins.txt "$stamp"
    fi
}

images() {
    wheelhouse
    if [ -n "$STAND_INS" ]; then
        if ! docker image inspect goldsmith-base/debian:bookworm >/dev/null 2>&1; then
            mmdebstrap --variant=minbase --quiet bookworm - | docker import -c 'CMD ["bash"]' - goldsmith-base/debian:bookworm
        fi
        docker build -q -t goldsmith-stand-in/postgres:16 -f deploy/stand-ins/postgres.Dockerfile deploy/stand-ins
        docker build -q -t goldsmith-stand-in/redis:7.2 -f deploy/stand-ins/redis.Dockerfile deploy/stand-ins
        docker build -q -t "$STAND_IN_AIRFLOW" -f deploy/stand-ins/airflow.Dockerfile build
    fi
    compose build -q
}

seed() {
    local cache=${GOLDSMITH_CACHE:-$HOME/.cache/goldsmith}
    "$PY" -c 'from goldsmith.local import baseimage, catalog
for sku in ("12",):
    print(baseimage.ensure_base_image(catalog.resolve("Debian", "debian-12", sku, "latest")))'
    docker run --rm --user 0:0 --entrypoint /bin/bash -v "$cache/base:/src:ro" \
        -v "${COMPOSE_PROJECT_NAME}_goldsmith-cache:/cache" "${GOLDSMITH_IMAGE:-goldsmith:latest}" \
        -c 'mkdir -p /cache/base && for d in /src/*/; do [ -f "$d/disk.qcow2" ] && cp -an "${d%/}" /cache/base/; done; chown -R 50000:0 /cache'
}

compose_down() {
    profiles=(--profile flower --profile debug)
    compose down -v --remove-orphans
}

wait_healthy() {
    # docker-compose 1.29 has no `up --wait`: poll each container's health (or exit code, for airflow-init).
    local deadline=$((SECONDS + ${UP_TIMEOUT:-600})) pending
    while :; do
        pending=()
        for id in $(compose ps -q); do
            read -r name status health code < <(docker inspect -f \
                '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$id")
            case "$status/$health/$code" in
                running/healthy/*|running/none/*|exited/none/0) ;;
                exited/*) echo "${name#/} exited ($code):" >&2; docker logs --tail 30 "$id" >&2; exit 1 ;;
                *) pending+=("${name#/}:$health") ;;
            esac
        done
        [ ${#pending[@]} -eq 0 ] && return 0
        [ $SECONDS -ge $deadline ] && { echo "not healthy in time: ${pending[*]}" >&2; exit 1; }
        sleep 3
    done
}

case "${1:-}" in
    dockerd) dockerd_start ;;
    images) images ;;
    seed) compose up --no-start -q 2>/dev/null || compose up --no-start; seed ;;
    up) compose up -d && wait_healthy ;;
    down) compose_down ;;
    compose) shift; compose "$@" ;;
    *) echo "usage: $0 dockerd|images|seed|up|down|compose ARGS" >&2; exit 2 ;;
esac
