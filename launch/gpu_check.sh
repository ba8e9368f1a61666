#!/usr/bin/env bash
# The CUDA path, checked on a real GPU machine in one go (not part of CI, which has no GPU):
#  1. environment: torch, CUDA device;
#  2. the main job with CUDA workers (9,610 parameters: small messages, framed copy path);
#  3. a ~1M-parameter model (large messages staged through pinned buffers), CUDA vs CPU workers;
#  4. the math and protocol tests on that machine;
#  5. speed (issue 9, docs/performance.md): our worker against torch's Nesterov SGD on the GPU
#     (step rate, end to end with tau = 10, CUDA allocator peak per parameter), then the server's
#     capacity with cores to spare (p + 1 processes <= cores there, unlike the 2-core CI machine).
# Results land in $OUT (or /tmp/easgd-gpu-check).
# SPEED_ONLY=1 runs step 5 alone; DEVICE=cpu QUICK=--quick SPEED_ONLY=1 is the CPU dry run.
set -uo pipefail
OUT=${OUT:-/tmp/easgd-gpu-check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
PYEOF
speed() {  # step 5
  timeout 600 $PY benchmarks/speed.py ${QUICK:-} --device "${DEVICE:-cuda}" --out "$OUT/speed" \
    > "$OUT/speed.log" 2>&1
  echo "speed rc=$?"; grep -v INFO "$OUT/speed.log" | tail -8
  timeout 600 $PY benchmarks/server_capacity.py ${QUICK:-} --out "$OUT/capacity" \
    > "$OUT/capacity.log" 2>&1
  echo "server_capacity rc=$?"; grep -v INFO "$OUT/capacity.log" | tail -12
}
if [ "${SPEED_ONLY:-0}" = 1 ]; then speed; exit 0; fi
run() {  # name, overrides...
  local name=$1; shift
  timeout 300 $PY -m torch.distributed.run --standalone --nproc_per_node=5 -m easgd.train \
    workers=4 progress=false hydra.run.dir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
  $PY -c "import json,sys; s=json.load(open('$OUT/$name/summary.json')); print({k: s[k] for k in ('test_error','wall_time_s','exchanges','worker_steps','worker_steps_per_s')})" 2>&1 | tail -1
}
run main_cuda device=cuda
run big_cuda device=cuda data=synthetic data.num_features=256 'model.hidden=[1024,704]' steps_per_worker=400
run big_cpu device=cpu data=synthetic data.num_features=256 'model.hidden=[1024,704]' steps_per_worker=400
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_algorithms.py tests/test_simulator.py tests/test_protocol.py 2>&1 | tail -3

# ---- reliability (issue 11): GPU hygiene --------------------------------------------------------
# R1. The CPU-only server (rank 0) must hold no CUDA context: during a CUDA run, the processes that
#    nvidia-smi lists must not include the server's pid (it no longer pins its buffers).
# R2. A checkpoint written by CUDA workers loads where CUDA is hidden (map_location="cpu").
# R3. A sequential baseline honours device=cuda.
# Without nvidia-smi (a CPU machine) each step says "skipped", so the script can be dry-run here.
if command -v nvidia-smi > /dev/null 2>&1; then
  HYG="$OUT/hygiene"
  timeout 300 $PY -m torch.distributed.run --standalone --nproc_per_node=3 -m easgd.train \
    workers=2 device=cuda progress=false steps_per_worker=100000 max_wall_s=25 \
    checkpoint.every_s=2 hydra.run.dir="$HYG" > "$OUT/hygiene.log" 2>&1 &
  AGENT=$!
  sleep 15
  SERVER=""
  for child in $(pgrep -P "$AGENT"); do
    if tr '\0' '\n' < "/proc/$child/environ" 2>/dev/null | grep -qx "RANK=0"; then SERVER=$child; fi
  done
  GPU_PIDS=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr -d ' ' | tr '\n' ' ')
  if [ -n "$SERVER" ] && ! echo " $GPU_PIDS " | grep -q " $SERVER "; then
    echo "hygiene: server pid $SERVER has no CUDA context (GPU pids: $GPU_PIDS) PASS"
  else
    echo "hygiene: server pid '$SERVER' among GPU pids '$GPU_PIDS' FAIL"
  fi
  wait "$AGENT"; echo "hygiene run rc=$?"
  CUDA_VISIBLE_DEVICES="" $PY -c "
import sys
from pathlib import Path
from easgd.recovery.checkpoint import Checkpointer
paths = sorted(Path('$HYG/checkpoints').glob('worker1-*.pt'))
state = Checkpointer.read(paths[-1])
print('hygiene: CUDA-written checkpoint loads without CUDA:', paths[-1].name, state['role']['params'].device, 'PASS')
" 2>&1 | tail -1
  timeout 120 $PY -m easgd.train algorithm=msgd device=cuda steps_per_worker=300 progress=false \
    hydra.run.dir="$OUT/hygiene_seq" > "$OUT/hygiene_seq.log" 2>&1
  echo "hygiene: sequential baseline on device=cuda rc=$?"
else
  echo "hygiene: skipped (no nvidia-smi on this machine)"
fi
# ---- end of the reliability block ---------------------------------------------------------------
speed
