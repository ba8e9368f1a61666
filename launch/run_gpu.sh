#!/usr/bin/env bash
# One node, GPUs: one worker per GPU (round robin if there are fewer GPUs than workers) plus the
# parameter server on rank 0, which keeps the center on the CPU. Messages go over gloo, staged
# through pinned CPU buffers (the NCCL path is not offered yet).
#   WORKERS=8 ./launch/run_gpu.sh model=cifar7 data=cifar10 data.root=/data/cifar-10-batches-py
set -euo pipefail
WORKERS=${WORKERS:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc_per_node=$((WORKERS + 1)) -m easgd.train \
  workers="$WORKERS" device=cuda "$@"
