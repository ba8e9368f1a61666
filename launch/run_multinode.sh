#!/usr/bin/env bash
# Several nodes with c10d rendezvous. Run the same command on every node; the node that gets
# global rank 0 hosts the parameter server. WORKERS counts workers over all nodes, and
# NNODES * NPROC_PER_NODE must equal WORKERS + 1 (e.g. 2 nodes x 5 processes = 9 workers + server).
#   RDZV_HOST=node0.cluster NNODES=2 NPROC_PER_NODE=5 WORKERS=9 ./launch/run_multinode.sh
# torch.distributed traffic is unauthenticated: use a trusted network (see README, Security).
set -euo pipefail
: "${RDZV_HOST:?set RDZV_HOST to the host name of the rendezvous node}"
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-5}
WORKERS=${WORKERS:-$((NNODES * NPROC_PER_NODE - 1))}
RDZV_PORT=${RDZV_PORT:-29400}
# the run id names the run directory on every node and survives restarts (resume)
RUN_ID=${RUN_ID:-easgd-$(date +%Y%m%d)}
# a node restarted from scratch (a replacement) hangs in torch 2.13's shared rendezvous store;
# opting out of it makes the restarted job re-form (docs/reliability.md, Node replacement)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RUN_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m easgd.train workers="$WORKERS" "$@"
