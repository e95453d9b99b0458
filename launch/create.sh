#!/usr/bin/env bash
# Creates the TPU VM slice: bash launch/create.sh [--dry-run]
source "$(dirname "$0")/common.sh"
SPOT_FLAG=()
if [[ "$SPOT" == 1 ]]; then SPOT_FLAG=(--spot); fi
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${SPOT_FLAG[@]}"
