#!/usr/bin/env bash
# N Cog predictors on this machine (one per GPU, or one CPU thread each without GPUs) behind HAProxy, loopback only.
#   SDXL_WEIGHTS_DIR=/path/to/weights bash scripts/cluster.sh start 2    # predictors, then the balancer
#   bash scripts/cluster.sh stop                                        # balancer drains, then predictors drain
#   bash scripts/cluster.sh status
# Clients use http://127.0.0.1:$CLUSTER_PORT/predictions (default 8080); /metrics and /stats on $CLUSTER_MONITOR_PORT.
# Settings (environment): CLUSTER_DIR (pids, logs, config; default /tmp/sdxl-cluster), CLUSTER_PORT,
# CLUSTER_MONITOR_PORT (8404), CLUSTER_BACKEND_PORT (first predictor's port, 5001), CLUSTER_GPUS (GPU ids, one per
# predictor; default all that nvidia-smi lists), CLUSTER_START_TIMEOUT_S (600), CLUSTER_STOP_TIMEOUT_S (620: longer
# than the longest prediction), CLUSTER_REQUEST_TIMEOUT_S (600), CLUSTER_CHECK_INTERVAL_MS (1000),
# CLUSTER_BODY_TIMEOUT_S (30: the longest a client may take to send a request, body included).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=${CLUSTER_DIR:-/tmp/sdxl-cluster}
PORT=${CLUSTER_PORT:-8080}
MONITOR_PORT=${CLUSTER_MONITOR_PORT:-8404}
BACKEND_PORT=${CLUSTER_BACKEND_PORT:-5001}
HOST=127.0.0.1
export PATH="$ROOT/.venv/bin:$PATH"  # the server starts its worker through `python` on PATH

die() { echo "cluster.sh: $*" >&2; exit 1; }

health_status() {  # the `status` in a predictor's /health-check body, or nothing
    python - "$1" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
print(json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health-check", timeout=2))["status"])
PY
}

ports_free() {  # $@: ports that must be free on 127.0.0.1
    python - "$@" <<'PY'
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", int(port)))
        except OSError:
            sys.exit(f"cluster.sh: port {port} is in use")
PY
}

gpu_ids() {
    if [ -n "${CLUSTER_GPUS:-}" ]; then echo "$CLUSTER_GPUS"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' '
    fi
}

start_predictor() {  # $1: index from 1, $2: port, $3: GPU id or empty
    local device_env=(SDXL_CPU_THREADS="${SDXL_CPU_THREADS:-1}")
    [ -n "$3" ] && device_env=(CUDA_VISIBLE_DEVICES="$3")
    env "${device_env[@]}" PORT="$2" COG_PREDICT_TYPE_STUB="${COG_PREDICT_TYPE_STUB:-predict.py:Runner}" \
        setsid python -m cog.server.http --host "$HOST" >"$DIR/predictor$1.log" 2>&1 &
    echo $! >"$DIR/predictor$1.pid"
    echo "$2" >"$DIR/predictor$1.port"
}

wait_ready() {  # $1: index, $2: port
    local deadline=$((SECONDS + ${CLUSTER_START_TIMEOUT_S:-600})) status
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$(cat "$DIR/predictor$1.pid")" 2>/dev/null || die "predictor$1 exited; see $DIR/predictor$1.log"
        status=$(health_status "$2")
        case "$status" in
            READY) return 0 ;;
            SETUP_FAILED | DEFUNCT | UNHEALTHY) tail -20 "$DIR/predictor$1.log" >&2; die "predictor$1 is $status" ;;
        esac
        sleep 0.5
    done
    die "predictor$1 not READY within ${CLUSTER_START_TIMEOUT_S:-600}s; see $DIR/predictor$1.log"
}

start_balancer() {  # $@: the predictors' HOST:PORT
    local servers=()
    for address in "$@"; do servers+=(--server "$address"); done
    python deploy/haproxy/render_config.py "${servers[@]}" --bind "$HOST:$PORT" \
        --monitor-bind "$HOST:$MONITOR_PORT" --request-timeout-s "${CLUSTER_REQUEST_TIMEOUT_S:-600}" \
        --check-interval-ms "${CLUSTER_CHECK_INTERVAL_MS:-1000}" --body-timeout-s "${CLUSTER_BODY_TIMEOUT_S:-30}" \
        >"$DIR/haproxy.cfg"
    haproxy -c -q -f "$DIR/haproxy.cfg" || die "HAProxy rejected $DIR/haproxy.cfg"
    setsid haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 &
    echo $! >"$DIR/haproxy.pid"
    for _ in $(seq 1 50); do
        python -c "import urllib.request; urllib.request.urlopen('http://$HOST:$MONITOR_PORT/stats', timeout=1)" \
            2>/dev/null && return 0
        sleep 0.2
    done
    die "HAProxy did not come up; see $DIR/haproxy.log"
}

start() {
    local count=${1:?usage: cluster.sh start N} gpus addresses=() i
    command -v haproxy >/dev/null || die "haproxy is not installed (bash scripts/setup_env.sh installs it as root)"
    [ -e "$DIR/haproxy.pid" ] && die "a cluster already runs from $DIR (cluster.sh stop first)"
    ports_free "$PORT" "$MONITOR_PORT" $(seq "$BACKEND_PORT" $((BACKEND_PORT + count - 1))) || exit 1
    mkdir -p "$DIR"
    trap 'echo "cluster.sh: start failed; stopping what was started" >&2; stop >&2' EXIT
    read -r -a gpus <<<"$(gpu_ids)"
    [ "${#gpus[@]}" -eq 0 ] || [ "${#gpus[@]}" -ge "$count" ] || die "$count predictors but GPUs ${gpus[*]}"
    for i in $(seq 1 "$count"); do
        start_predictor "$i" $((BACKEND_PORT + i - 1)) "${gpus[$((i - 1))]:-}"
        addresses+=("$HOST:$((BACKEND_PORT + i - 1))")
    done
    for i in $(seq 1 "$count"); do wait_ready "$i" $((BACKEND_PORT + i - 1)); done
    start_balancer "${addresses[@]}"
    trap - EXIT
    echo "cluster: $count predictors behind http://$HOST:$PORT (metrics http://$HOST:$MONITOR_PORT/metrics)"
}

stop_group() {  # $1: pid file, $2: signal for the leader; waits for its group to exit, then kills what is left
    [ -e "$1" ] || return 0
    local pid deadline=$((SECONDS + ${CLUSTER_STOP_TIMEOUT_S:-620}))
    pid=$(cat "$1")
    # The leader only, as a container runtime signals PID 1: coglet then drains and ends its worker itself.
    kill -"$2" "$pid" 2>/dev/null || true
    while kill -0 -- -"$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL -- -"$pid" 2>/dev/null || true
    rm -f "$1"
}

stop() {
    stop_group "$DIR/haproxy.pid" USR1  # soft stop: stops listening, finishes the requests it holds
    for pidfile in "$DIR"/predictor*.pid; do stop_group "$pidfile" TERM & done  # coglet finishes its prediction
    wait
    rm -f "$DIR"/predictor*.port
    echo "cluster: stopped"
}

status() {
    [ -e "$DIR/haproxy.pid" ] && kill -0 "$(cat "$DIR/haproxy.pid")" 2>/dev/null \
        && echo "balancer: http://$HOST:$PORT" || echo "balancer: not running"
    for portfile in "$DIR"/predictor*.port; do
        [ -e "$portfile" ] && echo "$(basename "$portfile" .port): $(health_status "$(cat "$portfile")")"
    done
    return 0
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: cluster.sh start N | stop | status" ;;
esac
