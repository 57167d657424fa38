#!/usr/bin/env bash
# Starts or stops a moto server (SQS and S3 emulator) on a free loopback port.
#
#   scripts/moto.sh start STATE_DIR   prints the endpoint URL on stdout
#   scripts/moto.sh stop  STATE_DIR
set -euo pipefail
source "$(dirname "$0")/env.sh"

command="${1:-}"
state="${2:?usage: $0 start|stop STATE_DIR}"

case "$command" in
  start)
    ensure_moto
    mkdir -p "$state"
    port="$(free_port)"
    setsid "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$state/moto.log" 2>&1 </dev/null &
    echo $! >"$state/moto.pid"
    for _ in $(seq 1 60); do
      if curl -fsS "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
        echo "http://127.0.0.1:$port"
        exit 0
      fi
      sleep 0.5
    done
    log "moto did not answer on port $port within 30 s; see $state/moto.log"
    exit 1
    ;;
  stop)
    if [ -f "$state/moto.pid" ]; then
      kill -TERM -- "-$(cat "$state/moto.pid")" 2>/dev/null || true
      rm -f "$state/moto.pid"
    fi
    ;;
  *)
    echo "usage: $0 start|stop STATE_DIR" >&2
    exit 2
    ;;
esac
