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
speed
