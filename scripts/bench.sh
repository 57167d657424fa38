#!/usr/bin/env bash
# Benchmark of the original workload. Prints:
#   - per-task time in a warm worker, without and with MLflow (cargo bench);
#   - time from starting `cloudml-worker once` to a FINISHED run, and its peak RSS (10 cold starts).
# Starts its own MLflow server on a free loopback port and stops it afterwards.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$CLOUDML_ROOT"

ensure_libtorch
ensure_mlflow
cargo build --release --workspace --quiet

state="$(mktemp -d)"
cleanup() {
  "$CLOUDML_ROOT/scripts/mlflow.sh" stop "$state" || true
  rm -rf "$state"
}
trap cleanup EXIT
uri="$("$CLOUDML_ROOT/scripts/mlflow.sh" start "$state")"

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); MLflow $("$MLFLOW_VENV/bin/mlflow" --version 2>/dev/null | awk '{print $NF}') with SQLite"
echo "== warm worker (cargo bench -p cloudml-shared --bench original_workload)"
CLOUDML_BENCH_TRACKING_URI="$uri" cargo bench --quiet -p cloudml-shared --bench original_workload

echo "== cold start: cloudml-worker once examples/tasks/original.json, 10 runs"
# One run first, so the experiment exists and the page cache holds libtorch, as on a warm Lambda host.
MLFLOW_TRACKING_URI="$uri" "$CARGO_TARGET_DIR/release/cloudml-worker" --log-format json once examples/tasks/original.json >/dev/null 2>&1
for _ in $(seq 1 10); do
  MLFLOW_TRACKING_URI="$uri" /usr/bin/time -f '%e %M' -o "$state/time" \
    "$CARGO_TARGET_DIR/release/cloudml-worker" --log-format json once examples/tasks/original.json >/dev/null 2>&1
  cat "$state/time"
done | awk '{ seconds[NR] = $1; rss[NR] = $2 / 1024; total += $1; if (rss[NR] > peak) peak = rss[NR] }
  END {
    n = asort(seconds)
    printf "start to FINISHED run: n=%d mean=%.3f s p50=%.3f s max=%.3f s\n", n, total / n, seconds[int((n + 1) / 2)], seconds[n]
    printf "peak RSS: %.1f MB (max over runs)\n", peak
  }'
