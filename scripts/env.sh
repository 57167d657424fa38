# Shared settings for the scripts; source it, do not run it.
#
# Everything downloaded or built is cached under CLOUDML_CACHE (default ~/.cache/cloudml) so a
# fresh clone reuses it: the libtorch and MLflow virtual environments and the cargo target dir.

CLOUDML_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLOUDML_CACHE="${CLOUDML_CACHE:-$HOME/.cache/cloudml}"
export CLOUDML_ROOT CLOUDML_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLOUDML_CACHE/target}"

# libtorch for tch 0.26 is PyTorch 2.13.0. The two CUDA runtime wheels are needed because
# libtorch_cpu.so links them even on CPU; without them pip would pull 4.7 GB of CUDA.
TORCH_VERSION=2.13.0
TORCH_VENV="$CLOUDML_CACHE/torch-$TORCH_VERSION"
export LIBTORCH="${LIBTORCH:-$TORCH_VENV/lib/python3.11/site-packages/torch}"
export LIBTORCH_BYPASS_VERSION_CHECK=1
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

MLFLOW_VERSION_SPEC='mlflow>=3.17,<3.18'
MLFLOW_VENV="$CLOUDML_CACHE/mlflow-3.17"

log() { printf '==> %s\n' "$*" >&2; }

# Creates the virtual environment VENV with pip packages, unless FILE inside it already exists.
#   ensure_venv VENV FILE PACKAGE...   (pip options such as --no-deps may come first)
ensure_venv() {
  local venv="$1" marker="$2"
  shift 2
  if [ -e "$venv/$marker" ]; then
    return
  fi
  log "installing $* into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
}

# libtorch (CPU); its marker is the library tch links.
ensure_libtorch() {
  if [ -f "$LIBTORCH/lib/libtorch_cpu.so" ]; then
    return
  fi
  ensure_venv "$TORCH_VENV" "lib/python3.11/site-packages/torch/lib/libtorch_cpu.so" --no-deps \
    "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
}

# The MLflow tracking server.
ensure_mlflow() {
  ensure_venv "$MLFLOW_VENV" bin/mlflow "$MLFLOW_VERSION_SPEC"
}

MOTO_VERSION_SPEC='moto[server]>=5.1,<5.3'
MOTO_VENV="$CLOUDML_CACHE/moto-5.1"

# moto, an AWS emulator serving SQS and S3 on loopback.
ensure_moto() {
  ensure_venv "$MOTO_VENV" bin/moto_server "$MOTO_VERSION_SPEC"
}

CARGO_LAMBDA_VERSION_SPEC='cargo-lambda>=1.9,<1.10'
CARGO_LAMBDA_VENV="$CLOUDML_CACHE/cargo-lambda-1.9"

# cargo-lambda (Lambda Runtime API emulator and builder), put on PATH where cargo finds it as
# `cargo lambda`.
ensure_cargo_lambda() {
  ensure_venv "$CARGO_LAMBDA_VENV" bin/cargo-lambda "$CARGO_LAMBDA_VERSION_SPEC"
  export PATH="$CARGO_LAMBDA_VENV/bin:$PATH"
}

# Settings that keep the AWS SDK on the emulator: dummy credentials and region from the
# environment, and no instance metadata lookups.
use_aws_emulator() {
  export AWS_ENDPOINT_URL="$1"
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=testing
  export AWS_SECRET_ACCESS_KEY=testing
  export AWS_EC2_METADATA_DISABLED=true
  unset AWS_PROFILE AWS_SESSION_TOKEN
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
