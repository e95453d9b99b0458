#!/usr/bin/env bash
# Deletes the slice: bash launch/delete.sh [--dry-run]
source "$(dirname "$0")/common.sh"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
