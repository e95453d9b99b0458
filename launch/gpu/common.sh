# Shared by the GPU launch scripts: settings (environment variables with defaults) and --dry-run.
#
#   CONFIG         config file                  (default: this checkout's configs/imagenet64.py)
#   WORKDIR        checkpoints and reports: a shared filesystem path or gs:// (required by the
#                  run scripts; every node must see the same directory)
#   DATA_DIR       tfds data_dir (empty: the config's own; set it for imagenet64)
#   EXTRA_FLAGS    more flags for distill.main, e.g. "--config.mesh.fsdp=8"
#   VENV           the virtual environment                       (default ~/distill-venv)
#   NODES          SLURM nodes                                   (default 2)
#   GPUS_PER_NODE  GPUs per node                                 (default 8)
#   PARTITION, ACCOUNT   SLURM partition and account             (default: the cluster's)
#   TIME           SLURM time limit                              (default 24:00:00)
#   JOB_NAME       SLURM job name                                (default distill)
#
# Every script takes --dry-run: it prints each command (one per line, prefixed "+ ") instead of
# running it.
set -euo pipefail

GPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$GPU_DIR/../.." && pwd)"

CONFIG="${CONFIG:-$REPO_DIR/configs/imagenet64.py}"
WORKDIR="${WORKDIR:-}"
DATA_DIR="${DATA_DIR:-}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
VENV="${VENV:-$HOME/distill-venv}"
NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PARTITION="${PARTITION:-}"
ACCOUNT="${ACCOUNT:-}"
TIME="${TIME:-24:00:00}"
JOB_NAME="${JOB_NAME:-distill}"

SETTINGS_FILE=launch/gpu/common.sh
source "$GPU_DIR/../dry_run.sh"

# Relative paths (CONFIG, WORKDIR, DATA_DIR) are taken from the directory the script is run in,
# as distill.main takes them; under SLURM that is the directory sbatch was called from.

require() {
  local name="$1"
  if [[ -z "${!name}" ]]; then
    echo "$name is not set: export $name=/shared/path/... (see launch/README.md)" >&2
    exit 2
  fi
}

# The distill.main arguments of every run script.
main_args() {
  local args=("--config=$CONFIG" "--workdir=$WORKDIR")
  if [[ -n "$DATA_DIR" ]]; then args+=("--config.data.data_dir=$DATA_DIR"); fi
  # EXTRA_FLAGS: whitespace-separated flags.
  # shellcheck disable=SC2206
  args+=($EXTRA_FLAGS)
  printf '%s\n' "${args[@]}"
}
