#!/usr/bin/env bash
# Follows worker 0's log: bash launch/logs.sh [--dry-run]
source "$(dirname "$0")/common.sh"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=0 \
  --command="tail -n 100 -f ~/distill.log"
