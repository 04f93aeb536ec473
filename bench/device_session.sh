#!/usr/bin/env bash
# One call on the lent GPU machine (H200): install, then time-boxed steps; a short table of steps last.
#   bash bench/device_session.sh A|B|C|D|E
#     A: GPU tests + placed execution; B: offload, optimizer, fuzz, soak (2026-12-01)
#     C: GPU tests, a fresh hardware profile, cost check, offload; D: placed (hybrid vs simple), decode attention,
#     HF generate, optimizer, per-call overhead; E: GPU fuzz for FUZZ_S seconds; F: GPU tests + a short placed run
#     (2026-12-02); G: GPU tests (interpreted and generated CUDA programs) beside 4 GPU fuzzers, then fuse vs
#     all-GPU at the full budget with and without the per-call trace; H: GPU tests beside 4 fuzzers (after the
#     --fmad=false fix), HF generate with a budget vs accelerate, per-call and optimizer with generated CUDA
#     programs off and on; I: the last call -- GPU tests beside 2 fuzzers, then the MoE and horizontal anchors,
#     the optimizer step and dump --profile (2026-12-02); J: GPU tests beside 2 fuzzers, the optimizer steps
#     (GPU time, cold compile), the loop-form MoE op, dump --profile (2026-12-02, session 3); K: GPU tests beside
#     2 fuzzers (after the placed-transfer and frac fixes), the zoo table, HF generate with a budget; L: the
#     session's last call -- GPU tests beside 2 fuzzers, channels-last small_cnn, hf_bert, HF generate with a
#     budget, the horizontal_100_small breakdown, the optimizer's cold compile, a gpt2 eager-attention profile;
#     O: (s5) GPU tests beside a fuzzer, HF generate with --profile; P: (s6) launch-knob tuning, horizontal;
#     Q: offload, HF generate, decode attention; R: GPU tests + fuzzer, optimizer, full-budget offload;
#     S: GPU tests alone, the fmad cost, AdamW fuse-only (next session's first call);
#     T: (s7) GPU tests alone, then offload at 25%/50% with the link backlog known (gated prefetch, and the old
#     one-expert prefetch), the fixed strategies beside; U: GPU tests, fuzzer, bench/gpu.py after --fmad=true;
#     V: GPU tests, masked_softmax, AdamW step; W: zoo; X: (next session) GPU tests, fuzz, transpose, zoo rows;
#     Y: (next session) offload at 100% and with accelerate, HF generate; Z, Z2, Z3: (s8) the last calls;
#     A9: (s9) the grouped all-resident MoE path and the pool+mean row kernel; B9: (s9) GPU tests after the
#     column reductions, small_cnn; C9: (s9) conv_layout auto by default;
#     D9: (s9) the tests C9's box cut, MoE and decode anchors; E9: (s9) NHWC vectors
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
tests_beside_fuzzer() {   # tests_beside_fuzzer SEED: pytest -m gpu in 285 s while a GPU fuzzer runs 240 s beside it
  timeout 265 python3 bench/fuzz_gpu.py --seconds 240 --seed "$1" --log "$OUT/fuzz_$1.cases.txt" \
    > "$OUT/fuzz_$1.log" 2>&1 &
  step gpu_tests 285 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  tail -n 1 "$OUT/fuzz_$1.log"
}
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
C)
  step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  TAIL=30 step profile 60 python3 -c "import json; from fusebackend.runtime import hardware as h; \
p = h.cached_profile(refresh=True); print(json.dumps(p.to_dict(), indent=1))"
  TAIL=40 step cost_check 150 python3 bench/cost_model_check.py --out "$OUT/cost_model.json"
  TAIL=70 step offload 240 python3 bench/offload.py --out "$OUT/offload"
  ;;
D)
  TAIL=40 step placed 150 python3 bench/placed.py --tokens 1 16 --out "$OUT/placed.json"
  have bench/decode_attention.py && TAIL=30 step decode_attention 100 python3 bench/decode_attention.py \
    --out "$OUT/decode_attention"
  have bench/hf_generate.py && TAIL=30 step hf_generate 150 python3 bench/hf_generate.py --out "$OUT/hf_generate"
  have bench/optimizer.py && TAIL=20 step optimizer 100 python3 bench/optimizer.py --device cuda --n 200 \
    --opt adamw --max-s 15
  have bench/per_call.py && TAIL=20 step per_call 60 python3 bench/per_call.py --device cuda
  ;;
F)   # the last few minutes: GPU tests, then the hybrid placed execution briefly
  step gpu_tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -3; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -20
  TAIL=12 step placed 100 python3 bench/placed.py --tokens 1 16 --shares 0.25 1.0 --executions hybrid simple
  ;;
G)   # everything since the last GPU run at once: tests twice (the CUDA generated wrapper on) beside 4 fuzzers
  for s in 41 42 43 44; do
    timeout "${FUZZ_S:-250}" python3 bench/fuzz_gpu.py --seconds $(( ${FUZZ_S:-250} - 25 )) --seed $s \
      --log "$OUT/fuzz_$s.cases.txt" > "$OUT/fuzz_$s.log" 2>&1 &
  done
  step gpu_tests 330 python3 -m pytest -q -m gpu -p no:cacheprovider tests &
  FUSEBACKEND_GENERATED_CUDA=1 step gpu_tests_generated 330 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests --ignore=tests/test_hybrid_moe.py &
  wait
  for f in gpu_tests gpu_tests_generated; do echo "== $f"; grep -E "^FAILED|^ERROR" "$OUT/$f.log" | head -25; done
  for s in 41 42 43 44; do tail -n 1 "$OUT/fuzz_$s.log"; done
  TAIL=14 step offload_full 100 python3 bench/offload.py --out "$OUT/offload_full" --budgets 1 --batches 1,16 \
    --prefill 64 --strategies gpu_all,pinned,fuse --trace 0 --time-limit 60
  TAIL=14 step offload_full_trace 80 python3 bench/offload.py --out "$OUT/offload_full_trace" --budgets 1 \
    --batches 1,16 --prefill 64 --strategies gpu_all,fuse --trace 1 --time-limit 50
  ;;
H)
  for s in 51 52 53 54; do
    timeout "${FUZZ_S:-240}" python3 bench/fuzz_gpu.py --seconds $(( ${FUZZ_S:-240} - 25 )) --seed $s \
      --log "$OUT/fuzz_$s.cases.txt" > "$OUT/fuzz_$s.log" 2>&1 &
  done
  step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -25
  for s in 51 52 53 54; do tail -n 1 "$OUT/fuzz_$s.log"; done
  TAIL=30 step hf_generate 150 python3 bench/hf_generate.py --models mixtral --shares 0.25 --new 16 --reps 2 \
    --time-box 35 --out "$OUT/hf_generate"
  TAIL=12 step per_call 45 python3 bench/per_call.py --device cuda --rounds 2
  FUSEBACKEND_GENERATED_CUDA=1 TAIL=12 step per_call_generated 45 python3 bench/per_call.py --device cuda --rounds 2
  TAIL=8 step optimizer 60 python3 bench/optimizer.py --device cuda --n 200 --opt adamw --backends fuse --max-s 8
  FUSEBACKEND_GENERATED_CUDA=1 TAIL=8 step optimizer_generated 60 python3 bench/optimizer.py --device cuda \
    --n 200 --opt adamw --backends fuse --max-s 8
  ;;
I)   # the last call: GPU tests beside 2 fuzzers, the program cache on CUDA (a second run hits), the anchors
  for s in 61 62; do
    timeout 250 python3 bench/fuzz_gpu.py --seconds 225 --seed $s --log "$OUT/fuzz_$s.cases.txt" \
      > "$OUT/fuzz_$s.log" 2>&1 &
  done
  step gpu_tests 290 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  for s in 61 62; do tail -n 1 "$OUT/fuzz_$s.log"; done
  export PC=$(mktemp -d)
  for r in cold warm; do
    FUSEBACKEND_PROGRAM_CACHE=1 FUSEBACKEND_CACHE_DIR=$PC TAIL=3 step program_cache_$r 35 python3 -m pytest -q -m gpu \
      -p no:cacheprovider tests/test_cuda.py tests/test_wrapper.py
  done
  ls "$PC/programs" 2>/dev/null | wc -l
  TAIL=14 step moe_op 55 python3 bench/moe_op.py --device cuda --rounds 3
  TAIL=6 step gpu_horizontal 45 python3 bench/gpu.py --only horizontal_100 --out "$OUT/gpu_horizontal.json"
  TAIL=8 step optimizer 45 python3 bench/optimizer.py --device cuda --n 200 --opt adamw --backends fuse --max-s 6
  TAIL=8 step profile 40 python3 -m fusebackend dump llama_layer --device cuda --dtype bf16 --size bench \
    --profile -q
  ;;
J)
  for s in 71 72; do
    timeout 280 python3 bench/fuzz_gpu.py --seconds 255 --seed $s --log "$OUT/fuzz_$s.cases.txt" \
      > "$OUT/fuzz_$s.log" 2>&1 &
  done
  step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  for s in 71 72; do tail -n 1 "$OUT/fuzz_$s.log"; done
  TAIL=30 step optimizer 80 python3 bench/optimizer.py --device cuda --n 200 --opt adamw,adam,sgd --backends fuse \
    --max-s 4 --steps-check 10 --json "$OUT/optimizer.json"
  TAIL=8 step moe_op_loop 70 python3 bench/moe_op.py --device cuda --only loop --rounds 2
  TAIL=10 step profile 45 python3 -m fusebackend dump llama_layer --device cuda --dtype bf16 --size bench \
    --profile -q
  ;;
K)
  for s in 81 82; do
    timeout 270 python3 bench/fuzz_gpu.py --seconds 245 --seed $s --log "$OUT/fuzz_$s.cases.txt" \
      > "$OUT/fuzz_$s.log" 2>&1 &
  done
  step gpu_tests 290 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  for s in 81 82; do tail -n 1 "$OUT/fuzz_$s.log"; done
  TAIL=16 step zoo 150 python3 bench/zoo.py --size bench --dtype bfloat16 --out "$OUT/zoo.json"
  TAIL=24 step hf_generate 110 python3 bench/hf_generate.py --models mixtral --shares 0.25 --new 8 --reps 2 \
    --time-box 25 --out "$OUT/hf_generate"
  ;;
L)
  for s in 91 92; do
    timeout 265 python3 bench/fuzz_gpu.py --seconds 240 --seed $s --log "$OUT/fuzz_$s.cases.txt" \
      > "$OUT/fuzz_$s.log" 2>&1 &
  done
  step gpu_tests 285 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  for s in 91 92; do tail -n 1 "$OUT/fuzz_$s.log"; done
  TAIL=4 step zoo_cnn 40 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn
  TAIL=4 step zoo_bert 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only hf_bert
  TAIL=12 step horizontal_breakdown 30 python3 bench/horizontal_breakdown.py --device cuda
  TAIL=24 step hf_generate 100 python3 bench/hf_generate.py --models mixtral --shares 0.25 --new 8 --reps 2 \
    --time-box 25 --strategies eager accelerate fuse_budget --out "$OUT/hf_generate"
  TAIL=8 step optimizer 35 python3 bench/optimizer.py --device cuda --n 200 --opt adamw --backends fuse --max-s 2 \
    --steps-check 3
  TAIL=40 step profile_cnn 30 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn
  ;;
M)   # 2026-12-02 s4 call 1: the intermittent hybrid placed-execution failure looped with tracebacks, beside
     # the GPU tests and a fuzzer; HF generate with the hybrid layers' per-call trace
  T=tests/test_placement.py::test_placed_execution_matches_eager_within_the_budget
  ( for i in $(seq 1 12); do
      FUSEBACKEND_MOE_TRACE=8 timeout 60 python3 -m pytest -q -p no:cacheprovider --tb=long -rf \
        "$T[0.0-mixtral_moe_captured-1]" "$T[0.0-mixtral_moe-1]" "$T[0.5-mixtral_moe_captured-1]"
    done > "$OUT/flaky.log" 2>&1 ) &
  timeout 265 python3 bench/fuzz_gpu.py --seconds 240 --seed 101 --log "$OUT/fuzz_101.cases.txt" \
    > "$OUT/fuzz_101.log" 2>&1 &
  step gpu_tests 285 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  wait
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  tail -n 1 "$OUT/fuzz_101.log"
  grep -cE "passed|failed" "$OUT/flaky.log"; grep -E "passed|failed" "$OUT/flaky.log" | sort | uniq -c
  FUSEBACKEND_MOE_TRACE=8 TAIL=60 step hf_generate 120 python3 bench/hf_generate.py --models mixtral --shares 0.25 \
    --new 8 --reps 1 --time-box 40 --strategies eager fuse_budget --out "$OUT/hf_generate"
  ;;
N)   # 2026-12-02 s4 call 2: one hybrid layer per MoE layer across the model's graphs (decode reuses the
     # prefill graph's resident experts); the placed-execution test alone; HF generate against accelerate
  T=tests/test_placement.py::test_placed_execution_matches_eager_within_the_budget
  step placed_alone 90 python3 -m pytest -q -p no:cacheprovider --tb=short -rf "$T[0.0-mixtral_moe_captured-1]" \
    tests/test_placement.py tests/test_hybrid_moe.py tests/test_moe_resident.py
  FUSEBACKEND_MOE_TRACE=4 TAIL=50 step hf_generate 150 python3 bench/hf_generate.py --models mixtral \
    --shares 0.25 --new 8 --reps 2 --time-box 40 --strategies eager accelerate fuse_budget --out "$OUT/hf_generate"
  ;;
O)   # 2026-12-03 s5 call 1: GPU tests beside a fuzzer after the staging-vs-resident fix; HF generate against
     # accelerate with the per-call trace and a profiled warm generate (where decode's host time goes)
  tests_beside_fuzzer 111
  FUSEBACKEND_MOE_TRACE=4 TAIL=120 step hf_generate 170 python3 bench/hf_generate.py --models mixtral \
    --shares 0.25 --new 16 --reps 2 --time-box 50 --strategies eager accelerate fuse_budget --profile 6 \
    --out "$OUT/hf_generate"
  ;;
P)   # 2026-12-03 s6 call 1: launch knobs on the H200 (batch grid-stride steps on the AdamW step, pointwise vector
     # bytes and waves, the row kernels' variants), where horizontal_100_small's per-call time goes
  TAIL=30 step tune_batch 170 python3 bench/tune_batch.py --max-s 130
  TAIL=25 step tune_rows 120 python3 bench/tune_rows.py
  TAIL=40 step horizontal 90 python3 bench/horizontal_breakdown.py --device cuda --cprofile 18
  TAIL=40 step offload_full 120 python3 bench/offload.py --budgets 1 --strategies gpu_all,pinned,fuse \
    --time-limit 95 --cell-limit 8 --out "$OUT/offload_full"
  ;;
Q)   # s6 call 2: the offload table (3 budgets), Qwen2-MoE and Mixtral generate against accelerate, decode attention
  TAIL=75 step offload 300 python3 bench/offload.py --time-limit 270 --cell-limit 10 --out "$OUT/offload"
  FUSEBACKEND_MOE_TRACE=2 TAIL=40 step hf_generate 170 python3 bench/hf_generate.py --models qwen2_moe mixtral \
    --shares 0.25 --new 16 --reps 2 --time-box 38 --strategies eager accelerate fuse_budget --out "$OUT/hf_generate"
  have bench/decode_attention.py && TAIL=30 step decode_attention 90 python3 bench/decode_attention.py \
    --out "$OUT/decode_attention"
  ;;
R)   # s6 last call: GPU tests beside a fuzzer on the final code (285 s was 3 tests short beside the fuzzer), the
     # AdamW step fuse-only (with Inductor's 50 s compile it ran out of its box), the full-budget offload untraced
  tests_beside_fuzzer 121
  TAIL=12 step optimizer 100 python3 bench/optimizer.py --device cuda --n 200 --opt adamw --backends fuse \
    --max-s 10 --steps-check 10
  TAIL=30 step offload_full 80 python3 bench/offload.py --budgets 1 --strategies gpu_all,pinned,fuse \
    --time-limit 60 --cell-limit 6 --out "$OUT/offload_full"
  ;;
S)   # for the next session's first call: GPU tests alone on HEAD (231 s in s5), what --fmad=false costs the row
     # kernels, the AdamW step fuse-only with its 10-step state check
  step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=30 step tune_rows 120 python3 bench/tune_rows.py
  TAIL=12 step optimizer 90 python3 bench/optimizer.py --device cuda --n 200 --opt adamw --backends fuse \
    --max-s 10 --steps-check 10
  ;;
T)
  step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=40 step offload 130 python3 bench/offload.py --budgets 0.25,0.5 \
    --strategies gpu_all,pinned,cpu_nonres,static_split,fuse --time-limit 110 --cell-limit 8 --out "$OUT/offload"
  TAIL=22 step offload_prefetch1 60 python3 bench/offload.py --budgets 0.25,0.5 --strategies fuse \
    --prefetch 1 --prefetch-gate 0 --time-limit 50 --cell-limit 6 --out "$OUT/offload_prefetch1"
  ;;
U)   # s7 call 3: GPU tests alone after --fmad=true with rounded products (fb::mul_rn) and the CPU row kernels'
     # shared driver change, a GPU fuzzer after them, then the whole GPU anchor table (issue 15 has none on the H200)
  step gpu_tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=8 step fuzz_gpu 100 python3 bench/fuzz_gpu.py --seconds 80 --seed 141 --log "$OUT/fuzz_141.cases.txt"
  TAIL=30 step gpu_bench 170 python3 bench/gpu.py --out "$OUT/gpu.json"
  ;;
V)   # s7 call 4: GPU tests on the final code (MulExact, the compile-time work), masked_softmax with MulExact,
     # the AdamW step (cold compile after this session's compile-time work)
  step gpu_tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=4 step gpu_softmax 40 python3 bench/gpu.py --only masked_softmax --out "$OUT/gpu_softmax.json"
  TAIL=12 step optimizer 70 python3 bench/optimizer.py --device cuda --n 200 --opt adamw --backends fuse \
    --max-s 10 --steps-check 10
  ;;
W)   # s7 call 5, right after V (warm): the zoo at bench size, bf16, time-boxed
  TAIL=30 step zoo ${ZOO_S:-250} python3 bench/zoo.py --size bench --dtype bfloat16 --out "$OUT/zoo.json"
  ;;
X)   # next session's first call: GPU tests on 2e36696+ (the tiled transpose kernels and the per-call path have not run
     # on a GPU), a fuzzer, the transpose anchors, the two zoo models they target, the zoo models s7 did not reach
  step gpu_tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=8 step fuzz_gpu 70 python3 bench/fuzz_gpu.py --seconds 45 --seed 151 --log "$OUT/fuzz_151.cases.txt"
  TAIL=12 step transpose 40 python3 bench/transpose.py
  TAIL=6 step zoo_cnn 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn --out "$OUT/zoo_cnn.json"
  TAIL=6 step zoo_attn 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only eager_attn --out "$OUT/zoo_attn.json"
  TAIL=40 step ncu_rows 80 ncu --clock-control none --kernel-name regex:'fb_|triton' --section SpeedOfLight \
    --section LaunchStats --section Occupancy --metrics dram__bytes_read.sum,dram__bytes_write.sum \
    python3 bench/profile_gpu.py --only bf16_16k
  grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Block Size|Grid Size" \
    "$OUT/ncu_rows.log" | head -80
  ;;
Y)   # next session's second call (issue 13): the 100% budget beside all-GPU, accelerate in the 25% table,
     # Mixtral and Qwen2-MoE generate with a budget against accelerate
  TAIL=30 step offload_full 110 python3 bench/offload.py --budgets 1 --strategies gpu_all,pinned,fuse \
    --time-limit 95 --cell-limit 8 --out "$OUT/offload_full"
  TAIL=40 step offload_acc 200 python3 bench/offload.py --budgets 0.25 \
    --strategies gpu_all,accelerate,pinned,cpu_nonres,static_split,fuse --time-limit 180 --cell-limit 10 \
    --out "$OUT/offload_acc"
  FUSEBACKEND_MOE_TRACE=2 TAIL=40 step hf_generate 170 python3 bench/hf_generate.py --models qwen2_moe mixtral \
    --shares 0.25 --new 16 --reps 2 --time-box 38 --strategies eager accelerate fuse_budget --out "$OUT/hf_generate"
  ;;
Z)   # s8's last call: GPU tests after the tiled kernel's batched loads, the batch-norm decomposition and the pool
     # rewrite; the transpose anchors; small_cnn both layouts; where small_cnn and the eager-attention block spend
     # GPU time; what limits the layer norm + GELU row kernel (ncu pipes, instruction mix, stalls)
  step gpu_tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=6 step transpose 40 python3 bench/transpose.py
  TAIL=3 step zoo_cnn 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn --out "$OUT/zoo_cnn.json"
  TAIL=3 step zoo_cnn_auto 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn \
    --options '{"conv_layout": "auto"}' --out "$OUT/zoo_cnn_auto.json"
  TAIL=30 step prof_cnn 45 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn
  TAIL=30 step prof_attn 45 python3 bench/profile_gpu.py --torch-profiler --zoo gpt2_block_eager_attn
  TAIL=10 step ncu_ln 70 ncu --clock-control none --kernel-name regex:fb_cu_red --launch-count 1 \
    --section ComputeWorkloadAnalysis --section InstructionStats --section WarpStateStats --section SpeedOfLight \
    python3 bench/profile_gpu.py --only add_layernorm_gelu_bf16
  grep -E "Pipe|Issue|Executed Ipc|Stall|Warp Cycles|Instructions|Duration|Throughput" "$OUT/ncu_ln.log" | head -40
  ;;
Z2)  # right after Z (warm): the whole zoo at bench size in bf16 on the final code
  TAIL=30 step zoo ${ZOO_S:-300} python3 bench/zoo.py --size bench --dtype bfloat16 --out "$OUT/zoo.json"
  ;;
Z3)  # s8's final call: GPU tests after the softmax reciprocal and the 64-row bf16 tiles; the transpose anchors;
     # masked_softmax; the zoo rows they target; small_cnn channels-last, where its time goes; fuse at 25% with
     # the learned CPU overhead; ncu of the eager-attention block's row kernels
  step gpu_tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=8 step fuzz_gpu 50 python3 bench/fuzz_gpu.py --seconds 38 --seed 161 --log "$OUT/fuzz_161.cases.txt"
  TAIL=6 step transpose 40 python3 bench/transpose.py
  TAIL=4 step gpu_softmax 40 python3 bench/gpu.py --only masked_softmax --out "$OUT/gpu_softmax.json"
  TAIL=3 step zoo_attn 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only eager_attn --out "$OUT/zoo_attn.json"
  TAIL=3 step zoo_cnn_auto 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn \
    --options '{"conv_layout": "auto"}' --out "$OUT/zoo_cnn_auto.json"
  TAIL=16 step prof_cnn_auto 40 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn --fuse-only \
    --options '{"conv_layout": "auto"}'
  TAIL=30 step offload 60 python3 bench/offload.py --budgets 0.25 --strategies fuse --time-limit 45 --cell-limit 6 \
    --out "$OUT/offload"
  TAIL=4 step ncu_attn 60 ncu --clock-control none --kernel-name regex:fb_cu_red --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python3 bench/profile_gpu.py --zoo gpt2_block_eager_attn --fuse-only
  grep -E "^  fb_|Duration|Compute \(SM\)|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued" \
    "$OUT/ncu_attn.log" | head -40
  ;;
A9)  # s9's first call: the grouped all-resident MoE path and the BN+ReLU+pool+mean row kernel -- their GPU tests,
     # a fuzzer, the 100% budget (grouped against the sorted path), small_cnn in both layouts and its profile
  step gpu_tests_sel 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_resident_grouped.py \
    tests/test_hybrid_moe.py tests/test_pools.py tests/test_conv_layout.py tests/test_moe_resident.py tests/test_cuda.py
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests_sel.log" | head -30
  TAIL=8 step fuzz_gpu 50 python3 bench/fuzz_gpu.py --seconds 38 --seed 171 --log "$OUT/fuzz_171.cases.txt"
  TAIL=32 step offload_full 110 python3 bench/offload.py --budgets 1 --strategies gpu_all,pinned,fuse \
    --time-limit 95 --cell-limit 8 --out "$OUT/offload_full"
  TAIL=14 step offload_sorted 60 python3 bench/offload.py --budgets 1 --strategies fuse --fast-path sorted \
    --time-limit 45 --cell-limit 8 --out "$OUT/offload_sorted"
  TAIL=3 step zoo_cnn 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn --out "$OUT/zoo_cnn.json"
  TAIL=3 step zoo_cnn_auto 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn \
    --options '{"conv_layout": "auto"}' --out "$OUT/zoo_cnn_auto.json"
  TAIL=16 step prof_cnn_auto 40 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn --fuse-only \
    --options '{"conv_layout": "auto"}'
  ;;
B9)  # s9's second call: all GPU tests and a fuzzer after the column reductions (NHWC pool + mean) and the
     # softmax-check fix; small_cnn in both layouts and where its time goes
  step gpu_tests 290 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=8 step fuzz_gpu 50 python3 bench/fuzz_gpu.py --seconds 38 --seed 181 --log "$OUT/fuzz_181.cases.txt"
  TAIL=3 step zoo_cnn 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn --out "$OUT/zoo_cnn.json"
  TAIL=3 step zoo_cnn_auto 45 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn \
    --options '{"conv_layout": "auto"}' --out "$OUT/zoo_cnn_auto.json"
  TAIL=12 step prof_cnn_auto 40 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn --fuse-only \
    --options '{"conv_layout": "auto"}'
  ;;
C9)  # s9's last call: all GPU tests with conv_layout "auto" the default and 32-bit index division in strided
     # pointwise kernels; small_cnn's profile; a fuzzer; the zoo without the HF models (the rest of the box)
  step gpu_tests 235 python3 -m pytest -q -m gpu -p no:cacheprovider tests
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -30
  TAIL=12 step prof_cnn 35 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn --fuse-only
  TAIL=8 step fuzz_gpu 45 python3 bench/fuzz_gpu.py --seconds 33 --seed 191 --log "$OUT/fuzz_191.cases.txt"
  TAIL=14 step zoo 215 python3 bench/zoo.py --size bench --dtype bfloat16 --skip-hf --out "$OUT/zoo.json"
  ;;
D9)  # s9: the GPU tests C9's box cut (the zoo's, after test_wrapper), and the MoE / decode anchors
  step gpu_tests_rest 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/zoo tests/test_wrapper.py \
    tests/test_safe_softmax.py tests/test_wrapper_layouts.py tests/test_view_steps.py tests/test_takes.py
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests_rest.log" | head -30
  TAIL=8 step gpu_moe 90 python3 bench/gpu.py --only moe --out "$OUT/gpu_moe.json"
  TAIL=8 step gpu_decode 60 python3 bench/gpu.py --only decode --out "$OUT/gpu_decode.json"
  ;;
E9)  # s9's short last call: channels-last pointwise kernels vectorised along the channels -- their GPU tests,
     # small_cnn's time and profile
  step gpu_tests_cl 70 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_conv_layout.py tests/test_pools.py \
    tests/test_cuda.py
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests_cl.log" | head -30
  TAIL=3 step zoo_cnn 35 python3 bench/zoo.py --size bench --dtype bfloat16 --only small_cnn --out "$OUT/zoo_cnn.json"
  TAIL=10 step prof_cnn 25 python3 bench/profile_gpu.py --torch-profiler --zoo small_cnn --fuse-only
  ;;
E)
  step fuzz_gpu $(( ${FUZZ_S:-400} + 30 )) python3 bench/fuzz_gpu.py --seconds "${FUZZ_S:-400}" --seed 32 \
    --log "$OUT/fuzz_gpu.log.txt"
  ;;
esac
echo "== steps"; cat "$OUT/steps.txt"
