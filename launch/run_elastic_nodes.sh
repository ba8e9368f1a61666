#!/usr/bin/env bash
# Nodes that come and go (elastic membership, docs/reliability.md): the first node runs the
# server and its own workers and leaves OPEN_SLOTS of the WORKERS slots to other nodes; other
# nodes join them while it runs, and a node that dies takes only its own workers (its slots wait
# membership.slot_wait_s for a replacement node).
#   first node:  RDZV_HOST=node0 WORKERS=8 NPROC_PER_NODE=5 OPEN_SLOTS=4 ./launch/run_elastic_nodes.sh server
#   other nodes: RDZV_HOST=node0 WORKERS=8 NPROC_PER_NODE=4 ./launch/run_elastic_nodes.sh join
# The first node has WORKERS - OPEN_SLOTS + 1 processes (the server is one). With a shared file
# system the run directory (runs/RUN_ID) is one for all nodes, which keeps replaced workers'
# step markers. torch.distributed traffic is unauthenticated: use a trusted network.
set -euo pipefail
ROLE=${1:?usage: run_elastic_nodes.sh server|join [overrides...]}
shift
: "${RDZV_HOST:?set RDZV_HOST to the host name of the first node}"
: "${WORKERS:?set WORKERS to the number of worker slots over all nodes}"
RDZV_PORT=${RDZV_PORT:-29400}
RUN_ID=${RUN_ID:-easgd-elastic}
case "$ROLE" in
  server)
    OPEN_SLOTS=${OPEN_SLOTS:?set OPEN_SLOTS to the slots left to other nodes}
    exec torchrun --nnodes=1 --nproc_per_node="${NPROC_PER_NODE:-$((WORKERS - OPEN_SLOTS + 1))}" \
      --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RUN_ID" \
      -m easgd.train workers="$WORKERS" membership.open_slots="$OPEN_SLOTS" \
      hydra.run.dir="runs/$RUN_ID" "$@" ;;
  join)
    exec torchrun --standalone --nproc_per_node="${NPROC_PER_NODE:?set NPROC_PER_NODE}" \
      -m easgd.train workers="$WORKERS" membership.join="$RDZV_HOST:$RDZV_PORT" \
      membership.join_id="$RUN_ID" hydra.run.dir="runs/$RUN_ID" hydra.output_subdir=null "$@" ;;
  *) echo "run_elastic_nodes.sh: ROLE must be server or join, got $ROLE" >&2; exit 2 ;;
esac
