# Shared by the launch scripts: settings (environment variables with defaults) and --dry-run.
#
#   TPU_NAME     the slice's name                       (default distill-v5e-64)
#   ZONE         its zone                               (default us-west4-a)
#   PROJECT      GCP project                            (default: gcloud's configured one)
#   ACCELERATOR  v4-32, v5litepod-64, ...              (default v5litepod-64)
#   RUNTIME      TPU VM software version               (default v2-alpha-tpuv5-lite)
#   REPO_URL     git URL to clone on the workers; empty: copy this checkout (git archive)
#   REF          branch, tag or commit to run          (default main)
#   CONFIG       config file                           (default configs/imagenet64.py)
#   EXTRA_FLAGS  more flags for distill.main, e.g. "--config.stages=stage_one,stage_two"
#   WORKDIR      gs:// directory for checkpoints and reports (required by run.sh)
#   DATA_DIR     gs:// tfds data_dir with imagenet_resized/64x64 prepared (required by run.sh)
#   SPOT         1: create a spot (preemptible) slice
#
# Every script takes --dry-run: it prints each gcloud command (one per line, prefixed "+ ")
# instead of running it.
set -euo pipefail

TPU_NAME="${TPU_NAME:-distill-v5e-64}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5litepod-64}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
REPO_URL="${REPO_URL:-}"
REF="${REF:-main}"
CONFIG="${CONFIG:-configs/imagenet64.py}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
SPOT="${SPOT:-0}"

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SETTINGS_FILE=launch/common.sh
source "$LAUNCH_DIR/dry_run.sh"
REPO_DIR="$(cd "$LAUNCH_DIR/.." && pwd)"

PROJECT_FLAG=()
if [[ -n "$PROJECT" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

# on_all_workers 'shell command': the command on every worker of the slice at once.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

require() {
  local name="$1"
  if [[ -z "${!name}" ]]; then
    echo "$name is not set: export $name=gs://... (see launch/README.md)" >&2
    exit 2
  fi
}
