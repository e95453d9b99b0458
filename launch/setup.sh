#!/usr/bin/env bash
# Sets up every worker, idempotently: bash launch/setup.sh [--dry-run]
# Code: cloned from $REPO_URL at $REF, or (REPO_URL empty) this checkout's $REF copied as a git
# archive. The virtual environment ~/distill-venv is made only if missing; jax[tpu] and the
# package are (re)installed into it, which is a no-op when nothing changed.
source "$(dirname "$0")/common.sh"

if [[ -n "$REPO_URL" ]]; then
  fetch="if [ -d ~/distill/.git ]; then git -C ~/distill fetch --quiet origin; \
else git clone --quiet $(printf %q "$REPO_URL") ~/distill; fi; \
git -C ~/distill checkout --quiet --force $(printf %q "$REF")"
else
  archive="/tmp/distill-$(printf %s "$REF" | tr '/' '_').tar.gz"
  run git -C "$REPO_DIR" archive --format=tar.gz --output="$archive" "$REF"
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":distill.tar.gz --zone="$ZONE" \
    "${PROJECT_FLAG[@]}" --worker=all
  fetch="rm -rf ~/distill && mkdir -p ~/distill && tar -xzf ~/distill.tar.gz -C ~/distill"
fi

on_all_workers "set -e; $fetch; \
[ -x ~/distill-venv/bin/python ] || python3 -m venv ~/distill-venv; \
~/distill-venv/bin/pip install --quiet --upgrade pip; \
~/distill-venv/bin/pip install --quiet 'jax[tpu]>=0.10.0,<0.11' -e ~/distill"
