#!/usr/bin/env bash
# The closing device call: GPU tests, the seven anchors, the HF zoo models at bench size, each time-boxed,
# results under OUTDIR (gpu.json/.txt, zoo_hf.json, logs). Usage: bash bench/final_h100.sh OUTDIR [T B Z]
set -u
out=${1:-/tmp/fb-final}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 FUSEBACKEND_CACHE_DIR=/tmp/fb-cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv,noheader > "$out/gpu_state.txt"
timeout "${2:-150}" python3 -m pytest -q -m gpu tests -p no:cacheprovider -W ignore 2>&1 | tail -15 > "$out/gpu_tests.txt"
timeout "${3:-220}" python3 bench/gpu.py --out "$out/gpu.json" > "$out/gpu_bench.txt" 2>&1
timeout "${4:-140}" python3 bench/zoo.py --size bench --only hf_ --out "$out/zoo_hf.json" > "$out/zoo_bench.txt" 2>&1
cat "$out/gpu_tests.txt"; tail -12 "$out/gpu_bench.txt"; grep -v "^{" "$out/zoo_bench.txt" | tail -8; grep "^{" "$out/zoo_bench.txt" | cut -c1-400
