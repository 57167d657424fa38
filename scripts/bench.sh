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
# One run first, so the experiment exists and libtorch is in the page cache, as on a warm Lambda host.
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

echo "== RabbitMQ at 127.0.0.1:5672: enqueue 1000 original tasks; one worker (concurrency 1) trains 200"
cloudml="$CARGO_TARGET_DIR/release/cloudml"
queue="amqp://guest:guest@127.0.0.1:5672/%2f/cloudml-bench-$$"
sed 's/^repeat = .*/repeat = 1000/' examples/sweeps/original.toml >"$state/original-1000.toml"
sed 's/^repeat = .*/repeat = 200/' examples/sweeps/original.toml >"$state/original-200.toml"
"$cloudml" enqueue "$state/original-1000.toml" --queue "$queue" 2>&1 >/dev/null | grep enqueued
"$cloudml" delete-queue --queue "$queue" 2>/dev/null
"$cloudml" enqueue "$state/original-200.toml" --queue "$queue" >/dev/null 2>&1
started=$(date +%s.%N)
MLFLOW_TRACKING_URI="$uri" "$CARGO_TARGET_DIR/release/cloudml-worker" --log-format json run --queue "$queue" --max-tasks 200 >/dev/null 2>&1
ended=$(date +%s.%N)
awk -v start="$started" -v end="$ended" 'BEGIN { printf "one worker: 200 tasks in %.1f s, %.1f tasks/s (each to a FINISHED MLflow run)\n", end - start, 200 / (end - start) }'
"$cloudml" delete-queue --queue "$queue" 2>/dev/null

echo "== SQS on moto (loopback): one worker (concurrency 1) trains 200 original tasks"
use_aws_emulator "$("$CLOUDML_ROOT/scripts/moto.sh" start "$state")"
trap '"$CLOUDML_ROOT/scripts/moto.sh" stop "$state" || true; cleanup' EXIT
"$MOTO_VENV/bin/python3" -c 'import boto3; boto3.client("sqs").create_queue(QueueName="cloudml-bench")'
"$cloudml" enqueue "$state/original-200.toml" --queue sqs://cloudml-bench 2>&1 >/dev/null | grep enqueued
started=$(date +%s.%N)
MLFLOW_TRACKING_URI="$uri" "$CARGO_TARGET_DIR/release/cloudml-worker" --log-format json run --queue sqs://cloudml-bench --max-tasks 200 >/dev/null 2>&1
ended=$(date +%s.%N)
awk -v start="$started" -v end="$ended" 'BEGIN { printf "one worker: 200 tasks in %.1f s, %.1f tasks/s (each to a FINISHED MLflow run)\n", end - start, 200 / (end - start) }'
