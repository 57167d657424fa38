#!/usr/bin/env bash
# The main job: builds CloudML, starts a local MLflow unless MLFLOW_TRACKING_URI is set, and runs
# a sweep locally (default: examples/sweeps/main.toml, the original workload and the bundled
# datasets). Extra arguments go to `cloudml run`, for example `--workers 4`.
#
#   scripts/main-job.sh [SWEEP_FILE] [cloudml run options]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$CLOUDML_ROOT"

sweep="examples/sweeps/main.toml"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  sweep="$1"
  shift
fi

ensure_libtorch
log "building (release)"
cargo build --release --workspace --quiet

if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
  MLFLOW_TRACKING_URI="$("$CLOUDML_ROOT/scripts/mlflow.sh" start)"
  export MLFLOW_TRACKING_URI
  started_here=1
fi

status=0
"$CARGO_TARGET_DIR/release/cloudml" run "$sweep" "$@" || status=$?

if [ -n "${started_here:-}" ]; then
  log "MLflow keeps running at $MLFLOW_TRACKING_URI for browsing; stop it with scripts/mlflow.sh stop"
fi
exit "$status"
