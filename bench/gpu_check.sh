#!/usr/bin/env bash
# A first check of a machine with one GPU (bench/gpu_check.py): train-step time and memory of
# stage one and two for configs/imagenet64.py and configs/sd15.py, and the 4-step sampler's
# images/s. Needs the cuda extra (pip install -e '.[cuda]'). Without a GPU it says so and exits 0.
#   bash bench/gpu_check.sh [flags of bench/gpu_check.py, e.g. --batches=imagenet64:16,sd15:1]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" \
    2>/dev/null; then
  echo "gpu_check: skipped: JAX sees no GPU (install the cuda extra on a machine with one)."
  exit 0
fi
exec "$PYTHON" bench/gpu_check.py "$@"
