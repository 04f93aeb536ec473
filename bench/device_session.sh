#!/usr/bin/env bash
# One call on the lent GPU machine (H200): install, then time-boxed steps; a short table of steps last.
#   bash bench/device_session.sh A|B      A: GPU tests + placed execution; B: offload, optimizer, fuzz, soak
# Results under $OUT (the device tool's output folder; default bench/results/device).
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
step() {   # step NAME SECONDS CMD...: runs CMD with a time limit, keeps its log, prints its tail
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
  tail -n "${TAIL:-15}" "$OUT/$name.log"
}
have() { [[ -f $1 ]]; }
case ${1:-A} in
A)
  step gpu_tests 360 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  TAIL=40 step placed 150 python3 bench/placed.py --out "$OUT/placed.json"
  have bench/soak.py && step soak 60 python3 bench/soak.py --device cuda --steps 100000 --seconds 45
  ;;
B)
  TAIL=60 step offload 240 python3 bench/offload.py --out "$OUT/offload"
  have bench/optimizer.py && TAIL=20 step optimizer 170 python3 bench/optimizer.py --device cuda --n 200 \
    --opt adamw --max-s 20
  have bench/fuzz_gpu.py && step fuzz_gpu 120 python3 bench/fuzz_gpu.py --seconds 100 --seed 31 \
    --log "$OUT/fuzz_gpu.log.txt"
  ;;
esac
echo "== steps"; cat "$OUT/steps.txt"
