#!/usr/bin/env bash
# SLURM: one torchrun per node (one task per node), which starts that node's processes; global
# rank 0 hosts the parameter server. NNODES x NPROC_PER_NODE = WORKERS + 1.
#   sbatch --nodes=2 launch/run_slurm.sh algorithm=eamsgd comm.period=10
#
# Preemption and the time limit end the run cleanly and requeue it:
# - SLURM sends SIGTERM to this script 120 s before the time limit (--signal=B:TERM@120) and on
#   preemption; the trap below requeues the job and passes SIGTERM on to torchrun, whose processes
#   stop at their next exchange, commit a final snapshot and write summary.json with
#   stop_reason=interrupted (easgd/parts/interrupt.py);
# - the requeued job keeps its job id, so its run folder, runs/slurm-<job id>, is the same, and the
#   run resumes from that snapshot (a folder holding an interrupted run is resumed, never a
#   finished one).
#   Requeue by hand: scontrol requeue <job id>.
#SBATCH --job-name=easgd
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=easgd-%j.out
# torch.distributed traffic is unauthenticated: use a trusted network (see README, Security).
set -euo pipefail
NPROC_PER_NODE=${NPROC_PER_NODE:-5}
WORKERS=${WORKERS:-$((SLURM_NNODES * NPROC_PER_NODE - 1))}
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29400}
# a node restarted from scratch hangs in torch 2.13's shared rendezvous store (docs/reliability.md)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="slurm-$SLURM_JOB_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" -m easgd.train workers="$WORKERS" "$@" &
SRUN=$!

stop_and_requeue() {
  echo "easgd: SIGTERM; stopping the run cleanly and requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  kill -TERM "$SRUN" 2>/dev/null || true
  wait "$SRUN" || true
  exit 0
}
trap stop_and_requeue TERM
wait "$SRUN"
