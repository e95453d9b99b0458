#!/usr/bin/env bash
# One node, all its GPUs, one process: bash launch/gpu/run_node.sh [--dry-run]
# JAX sees every GPU of the node (CUDA_VISIBLE_DEVICES narrows them); the mesh spans them all.
# Rerunning the same command after an interruption resumes from the newest checkpoint.
source "$(dirname "$0")/common.sh"
require WORKDIR
mapfile -t args < <(main_args)
run "$VENV/bin/python" -m distill.main "${args[@]}"
