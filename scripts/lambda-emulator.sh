#!/usr/bin/env bash
# Starts or stops the Lambda emulator of cargo-lambda on a free loopback port, with `cloudml-worker`
# (release build) serving it as the function `_`, in N processes.
#
#   scripts/lambda-emulator.sh start STATE_DIR [N]   prints the Invoke endpoint URL on stdout
#   scripts/lambda-emulator.sh stop  STATE_DIR
#
# `cargo lambda watch --only-lambda-apis` serves the Runtime API and the Invoke API
# (POST /2015-03-31/functions/_/invocations); the worker processes poll the Runtime API exactly as
# they do on AWS Lambda. The worker's own environment (MLFLOW_TRACKING_URI, ...) passes through.
set -euo pipefail
source "$(dirname "$0")/env.sh"

command="${1:-}"
state="${2:?usage: $0 start|stop STATE_DIR [N]}"
instances="${3:-2}"

case "$command" in
  start)
    ensure_cargo_lambda
    mkdir -p "$state"
    port="$(free_port)"
    # cargo-lambda reads the workspace's Cargo.toml, so it starts in the repository root.
    cd "$CLOUDML_ROOT"
    setsid cargo lambda watch --only-lambda-apis --timeout 300 -A 127.0.0.1 -P "$port" \
      >"$state/lambda-emulator.log" 2>&1 </dev/null &
    echo $! >"$state/lambda-emulator.pid"
    for _ in $(seq 1 60); do
      if grep -q "starting Runtime server" "$state/lambda-emulator.log" 2>/dev/null; then
        break
      fi
      sleep 0.5
    done
    grep -q "starting Runtime server" "$state/lambda-emulator.log" || {
      log "cargo lambda watch did not start; see $state/lambda-emulator.log"
      exit 1
    }
    for index in $(seq 1 "$instances"); do
      AWS_LAMBDA_RUNTIME_API="http://127.0.0.1:$port/.rt" AWS_LAMBDA_FUNCTION_NAME=_ \
        AWS_LAMBDA_FUNCTION_VERSION=1 AWS_LAMBDA_FUNCTION_MEMORY_SIZE=512 \
        setsid "$CARGO_TARGET_DIR/release/cloudml-worker" >"$state/function-$index.log" 2>&1 </dev/null &
      echo $! >"$state/function-$index.pid"
    done
    echo "http://127.0.0.1:$port"
    ;;
  stop)
    for pid_file in "$state"/function-*.pid "$state/lambda-emulator.pid"; do
      [ -f "$pid_file" ] || continue
      kill -TERM -- "-$(cat "$pid_file")" 2>/dev/null || true
      rm -f "$pid_file"
    done
    ;;
  *)
    echo "usage: $0 start|stop STATE_DIR [N]" >&2
    exit 2
    ;;
esac
