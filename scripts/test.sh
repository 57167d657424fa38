#!/usr/bin/env bash
# The test command. It installs what the tests need (libtorch, MLflow, moto, cargo-lambda), cached
# under ~/.cache/cloudml. It starts MLflow, moto and the Lambda emulator on free loopback ports and
# uses the local RabbitMQ. Then it checks formatting and lints, runs every test, and stops the services.
#
#   scripts/test.sh [extra arguments for the test runner, such as a test name filter]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$CLOUDML_ROOT"

log "cargo fmt --check"
cargo fmt --all -- --check

ensure_libtorch
ensure_mlflow
ensure_moto
ensure_cargo_lambda

state="$(mktemp -d)"
cleanup() {
  "$CLOUDML_ROOT/scripts/mlflow.sh" stop "$state" || true
  "$CLOUDML_ROOT/scripts/moto.sh" stop "$state" || true
  "$CLOUDML_ROOT/scripts/lambda-emulator.sh" stop "$state" || true
  rm -rf "$state"
}
trap cleanup EXIT
CLOUDML_TEST_TRACKING_URI="$("$CLOUDML_ROOT/scripts/mlflow.sh" start "$state")"
export CLOUDML_TEST_TRACKING_URI
log "MLflow for tests at $CLOUDML_TEST_TRACKING_URI"
use_aws_emulator "$("$CLOUDML_ROOT/scripts/moto.sh" start "$state")"
log "moto (SQS) for tests at $AWS_ENDPOINT_URL"

# `cloudml status` reads unacknowledged counts from RabbitMQ's management API; the plugin is off by
# default on Debian's RabbitMQ, and enabling it is idempotent.
log "enabling rabbitmq_management"
rabbitmq-plugins enable rabbitmq_management >/dev/null

# The Lambda emulator's function processes run the release worker binary, so build it first.
log "cargo build --release"
cargo build --release --workspace
CLOUDML_TEST_LAMBDA_ENDPOINT="$(MLFLOW_TRACKING_URI="$CLOUDML_TEST_TRACKING_URI" \
  "$CLOUDML_ROOT/scripts/lambda-emulator.sh" start "$state" 2)"
export CLOUDML_TEST_LAMBDA_ENDPOINT
log "Lambda emulator for tests at $CLOUDML_TEST_LAMBDA_ENDPOINT"

# Tests build in release mode: training real models in debug builds is slow, and the main job and
# the benchmark reuse the same artifacts.
log "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --release --no-fail-fast "$@"
else
  cargo test --workspace --release --no-fail-fast "$@"
fi
