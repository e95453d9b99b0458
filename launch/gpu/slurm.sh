#!/usr/bin/env bash
# Several nodes under SLURM: bash launch/gpu/slurm.sh [--dry-run]
# Submits one job of $NODES nodes × $GPUS_PER_NODE GPUs with one task per node. Each task runs
# distill.main --multihost: jax.distributed.initialize() reads SLURM's environment (the node
# list, SLURM_NTASKS, SLURM_PROCID) to find the coordinator on the first node and its peers, and
# each process drives its node's GPUs. SLURM sends SIGTERM two minutes before the time limit or
# on preemption: every process saves the same step and exits 143, and --requeue resubmits the
# job, which resumes from that checkpoint.
source "$(dirname "$0")/common.sh"
require WORKDIR
mapfile -t args < <(main_args)
quoted="$(printf ' %q' "${args[@]}")"
sbatch_args=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1
             --gpus-per-node="$GPUS_PER_NODE" --time="$TIME" --requeue --signal=TERM@120
             --output="$JOB_NAME-%j.log")
if [[ -n "$PARTITION" ]]; then sbatch_args+=(--partition="$PARTITION"); fi
if [[ -n "$ACCOUNT" ]]; then sbatch_args+=(--account="$ACCOUNT"); fi
run sbatch "${sbatch_args[@]}" \
  --wrap="srun $(printf %q "$VENV/bin/python") -m distill.main --multihost$quoted"
