#!/usr/bin/env bash
# Starts or stops a local MLflow tracking server (SQLite backend, proxied artifacts) on loopback.
#
#   scripts/mlflow.sh start [STATE_DIR]   prints the tracking URI on stdout
#   scripts/mlflow.sh stop  [STATE_DIR]
#   scripts/mlflow.sh uri   [STATE_DIR]   prints the URI of a running server
#
# STATE_DIR (default .cloudml/mlflow in the repository) keeps the database, artifacts, log, pid
# and port. The server runs in its own process group, so stop ends its web workers too.
set -euo pipefail
source "$(dirname "$0")/env.sh"

command="${1:-}"
state="${2:-$CLOUDML_ROOT/.cloudml/mlflow}"

running_pid() {
  [ -f "$state/pid" ] || return 1
  local pid
  pid="$(cat "$state/pid")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

case "$command" in
  start)
    if running_pid >/dev/null; then
      echo "http://127.0.0.1:$(cat "$state/port")"
      exit 0
    fi
    ensure_mlflow
    mkdir -p "$state/artifacts"
    port="$(free_port)"
    log "starting MLflow on 127.0.0.1:$port (state in $state)"
    setsid "$MLFLOW_VENV/bin/mlflow" server \
      --backend-store-uri "sqlite:///$state/mlflow.db" \
      --artifacts-destination "$state/artifacts" \
      --host 127.0.0.1 --port "$port" --workers 2 \
      >"$state/server.log" 2>&1 < /dev/null &
    echo $! >"$state/pid"
    echo "$port" >"$state/port"
    for _ in $(seq 1 120); do
      if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
        echo "http://127.0.0.1:$port"
        exit 0
      fi
      if ! running_pid >/dev/null; then
        log "MLflow exited during start; its log follows"
        tail -n 40 "$state/server.log" >&2
        exit 1
      fi
      sleep 0.5
    done
    log "MLflow did not answer on port $port within 60 s; see $state/server.log"
    exit 1
    ;;
  stop)
    if pid="$(running_pid)"; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
      done
      kill -KILL -- "-$pid" 2>/dev/null || true
      log "MLflow stopped"
    fi
    rm -f "$state/pid"
    ;;
  uri)
    running_pid >/dev/null || { log "no MLflow server running for $state"; exit 1; }
    echo "http://127.0.0.1:$(cat "$state/port")"
    ;;
  *)
    echo "usage: $0 start|stop|uri [STATE_DIR]" >&2
    exit 2
    ;;
esac
