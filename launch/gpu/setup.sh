#!/usr/bin/env bash
# Sets up this node (or, on a cluster, the shared home every node sees), idempotently:
#   bash launch/gpu/setup.sh [--dry-run]
# The virtual environment $VENV is made only if missing; the package with its cuda extra
# (jax[cuda12] in the tested jax range) is (re)installed from this checkout.
source "$(dirname "$0")/common.sh"
if [[ ! -x "$VENV/bin/python" ]]; then run python3 -m venv "$VENV"; fi
run "$VENV/bin/pip" install --quiet --upgrade pip
run "$VENV/bin/pip" install --quiet -e "$REPO_DIR[cuda]"
run "$VENV/bin/python" -c "import jax; print(jax.devices())"
