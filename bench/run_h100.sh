#!/usr/bin/env bash
# One device call: the GPU test suite, then the anchor workloads and the zoo, each under its own time limit.
# Usage (on the GPU machine, from the repo root): bash bench/run_h100.sh OUTDIR [TEST_S BENCH_S ZOO_S]
set -u
out=${1:-/tmp/fb-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 FUSEBACKEND_CACHE_DIR=/tmp/fb-cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv,noheader | tee "$out/gpu_state.txt"
timeout "${2:-200}" python3 -m pytest -q -m gpu tests -p no:cacheprovider -W ignore -x 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
timeout "${3:-240}" python3 bench/gpu.py --save 2>&1 | tail -30 | tee "$out/gpu_bench.txt"
timeout "${4:-150}" python3 bench/zoo.py --size bench --skip-hf --save 2>&1 | tail -14 | tee "$out/zoo_bench.txt"
cp bench/results/*nvidia* "$out/" 2>/dev/null
echo done
