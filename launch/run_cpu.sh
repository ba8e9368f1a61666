#!/usr/bin/env bash
# One node, CPU: p workers + the parameter server (rank 0) over gloo.
#   WORKERS=4 ./launch/run_cpu.sh algorithm=eamsgd comm.period=10
# Extra arguments are Hydra overrides (python -m easgd.train --help lists them).
set -euo pipefail
WORKERS=${WORKERS:-4}
# one intra-op thread per process: 5 processes oversubscribing 2 cores run 6-10x slower otherwise
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node=$((WORKERS + 1)) -m easgd.train \
  workers="$WORKERS" device=cpu "$@"
