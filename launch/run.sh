#!/usr/bin/env bash
# Runs the pipeline on all workers at once: bash launch/run.sh [--dry-run]
# Each worker runs `python -m distill.main` with DISTILL_MULTIHOST=1 (jax.distributed.initialize
# finds its peers on Cloud TPU), in the background with its log in ~/distill.log. Rerunning the
# same command after a preemption resumes from the newest checkpoint in $WORKDIR.
source "$(dirname "$0")/common.sh"
require WORKDIR
require DATA_DIR
main="cd ~/distill && DISTILL_MULTIHOST=1 nohup ~/distill-venv/bin/python -m distill.main \
--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR") \
--config.data.data_dir=$(printf %q "$DATA_DIR") $EXTRA_FLAGS > ~/distill.log 2>&1 &"
on_all_workers "$main"
