#!/usr/bin/env bash
# One device call for issue 3's "what limits it": the GPU tests, per-kernel GPU time (torch profiler) of
# every anchor under fuse and Inductor, ncu sections for the row kernels, and the SASS/resource usage of our
# cubins. Usage (GPU machine, repo root): bash bench/profile_h100.sh OUTDIR [TEST_S]
set -u
out=${1:-/tmp/fb-prof}; mkdir -p "$out/sass"
export PYTHONUNBUFFERED=1 FUSEBACKEND_CACHE_DIR=/tmp/fb-prof-cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
if [ "${2:-0}" != 0 ]; then
  timeout "$2" python3 -m pytest -q -m gpu tests -p no:cacheprovider -W ignore -x 2>&1 | tail -8 | tee "$out/gpu_tests.txt"
fi
timeout 150 python3 bench/profile_gpu.py --torch-profiler > "$out/kernels.txt" 2>&1
FUSEBACKEND_DUMP_DIR="$out/dump" timeout 240 ncu --clock-control none --kernel-name regex:'fb_|triton' \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
  --metrics dram__bytes_read.sum,dram__bytes_write.sum,smsp__inst_executed.sum \
  python3 bench/profile_gpu.py --only "${ONLY:-_16k}" > "$out/ncu.txt" 2>&1
for f in $(find "$FUSEBACKEND_CACHE_DIR" -name '*.cubin' | head -40); do
  b=$(basename "$f" .cubin); cuobjdump -res-usage "$f" > "$out/sass/$b.res" 2>&1; cuobjdump -sass "$f" > "$out/sass/$b.sass" 2>&1
done
grep -E "^== " "$out/kernels.txt"
grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Block Size|Grid Size" "$out/ncu.txt" | head -120
echo done
