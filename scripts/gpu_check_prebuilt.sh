#!/usr/bin/env bash
# The short-lease variant of the one-shot GPU check: runs test and benchmark binaries that were
# built on a CPU machine (for sm_90a) and carried along, so no device time goes to compiling.
# Runs: the GPU tests (all), the CPU and launcher tests, the training demo on the GPU (if carried),
# compute-sanitizer memcheck and racecheck over the small GPU tests, the benchmarks, the PyTorch
# extension's GPU tests and comparison (if carried); prints the summary table last (bench/summarize.py).
#   on the CPU machine:  scripts/stage_gpu_deps.sh && cmake --preset default && cmake --build build
#                        mkdir -p .gpucarry && cp build/tests/lory_{cpu,launch,gpu}_tests build/bench/lory_bench .gpucarry/
#                        (optional: cp build/examples/lory_train_demo .gpucarry/ runs the demo's CUDA backend)
#   optional, the PyTorch extension for the GPU machine's torch (2.11.0 in 2026-11):
#                        scripts/build_torch_prebuilt.sh 2.11.0 .gpucarry/lory_torch_cuda.so 90a
#   optional, A/B timing of the merge kernels at several revisions (e.g. before and after a change):
#                        scripts/build_ab_drivers.sh <old rev> HEAD      (-> .gpucarry/ab/)
#   on the GPU machine:  LORY_COMMIT=<hash> bash scripts/gpu_check_prebuilt.sh .gpucarry  (carry .gpucarry and .deps)
# Environment: LORY_BENCH_FILTER (regex, default all), LORY_BENCH_TIMEOUT_S (default 120),
#              LORY_SAN_TIMEOUT_S (per tool, default 60), LORY_TORCH_TIMEOUT_S (default 240),
#              LORY_TORCH_BENCH_TIMEOUT_S (default 180), LORY_AB_TIMEOUT_S (per driver, default 60),
#              LORY_AB_REPS (default 5), LORY_AB_NCU (cases for Nsight Compute on the newest A/B
#              driver, ';'-separated), LORY_AB_NCU_TIMEOUT_S (per case, default 90).
set -uo pipefail
bin=${1:-.gpucarry}
out=${OUT:-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
checks="$out/checks.txt"; : > "$checks"
fail=()
echo "commit=${LORY_COMMIT:-unknown}" >> "$checks"
echo "date=$(date -u +%Y-%m-%dT%H:%MZ)" >> "$checks"
echo "gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)" >> "$checks"

# Catch2 prints "All tests passed (N assertions in M test cases)" or "test cases: M | P passed | F failed".
run_tests() {  # name, binary, args...
  local name=$1; shift
  local log="$out/tests.log"
  echo "### $name: $*" >> "$log"
  timeout -k 5 150 "$@" >> "$log" 2>&1; local rc=$?
  local line; line=$(grep -E "All tests passed|test cases:" "$log" | tail -1)
  echo "$name=rc $rc; ${line:-no summary}" >> "$checks"
  echo "$name: rc $rc; ${line:-no summary}"
  [ $rc -eq 0 ] || fail+=("$name")
}
run_tests cpu_tests "$bin/lory_cpu_tests"
run_tests launch_tests "$bin/lory_launch_tests"
run_tests gpu_tests "$bin/lory_gpu_tests" "~[sm90]" --durations yes
# The Hopper-only wgmma probe (tests/gpu/test_wgmma.cu) in a process of its own: its layouts have
# not met hardware before, and a fault there must not take the other tests' context with it.
run_tests gpu_tests_sm90 "$bin/lory_gpu_tests" "[sm90]" --durations yes

# The training demo's CUDA backend (examples/train_demo.cu), when its binary was carried.
if [ -x "$bin/lory_train_demo" ]; then
  echo "### lory_train_demo --device gpu" >> "$out/tests.log"
  timeout -k 5 120 "$bin/lory_train_demo" --device gpu >> "$out/tests.log" 2>&1; rc=$?
  line=$(grep -E "final training loss" "$out/tests.log" | tail -1)
  echo "train_demo_gpu=rc $rc; ${line:-no summary}" >> "$checks"
  echo "train demo (GPU): rc $rc; ${line:-no summary}"
  [ $rc -eq 0 ] || fail+=("train_demo_gpu")
fi

san_total=0
# Small, representative subsets (the sanitizers slow kernels down 10-100x; the lease is short).
san_spec() {
  case $1 in
    memcheck) echo "merge_backward (tensor cores) matches the CPU twin in every mode - __nv_bfloat16,CUDA inference matches the double twin: bfloat16,merge_forward (tensor cores) matches the CPU twin - __nv_bfloat16,merge_forward (CUDA cores) matches the CPU twin - float,swiglu_backward matches the CPU twin - __half,router_backward matches the CPU twin in every mode - __nv_bfloat16,router_forward matches the CPU twin in every mode - float";;
    racecheck) echo "merge_backward (tensor cores) matches the CPU twin in every mode - __half,merge_forward (tensor cores) matches the CPU twin - __nv_bfloat16,merge_forward (tensor-core variants) matches the CPU twin - __nv_bfloat16,router_forward matches the CPU twin in every mode - __nv_bfloat16,router_backward matches the CPU twin in every mode - float";;
    memcheck_sm90) echo "merge_backward (wgmma variant) matches the CPU twin - __nv_bfloat16";;
  esac
}
# memcheck_sm90: the wgmma kernel under memcheck, in a process of its own, where its tests passed.
for run in memcheck racecheck memcheck_sm90; do
  tool=${run%_sm90}
  if [ "$run" = memcheck_sm90 ] && ! grep -q "^gpu_tests_sm90=rc 0;" "$checks"; then
    echo "sanitizer_$run=NOT RUN (the [sm90] tests did not pass here)" >> "$checks"
    continue
  fi
  log="$out/sanitizer.log"
  echo "### compute-sanitizer --tool $tool ($run)" >> "$log"
  timeout -k 5 "${LORY_SAN_TIMEOUT_S:-60}" compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
    "$bin/lory_gpu_tests" "$(san_spec $run)" >> "$log" 2>&1; rc=$?
  errs=$(grep -cE "^========= (Invalid|Error|Race|.*hazard)" "$log" || true)
  case $rc in
    0) state="clean";;
    99) state="ERRORS"; fail+=("$run");;
    124|137) state="timed out (partial run, ${errs} error lines so far)";;
    *) if grep -q "Device not supported\|Unable to find\|not supported" "$log"; then state="NOT RUN (unsupported)"; else state="rc $rc (see log)"; fail+=("$run"); fi;;
  esac
  echo "sanitizer_$run=$state" >> "$checks"
  echo "sanitizer $run: $state"
done

timeout -k 5 "${LORY_BENCH_TIMEOUT_S:-120}" "$bin/lory_bench" --benchmark_filter="${LORY_BENCH_FILTER:-.}" \
  --benchmark_min_time=0.05 --benchmark_out="$out/bench.json" --benchmark_out_format=json \
  > "$out/bench.log" 2>&1; rc=$?
echo "benchmarks=rc $rc" >> "$checks"
[ $rc -eq 0 ] || echo "benchmarks: rc $rc (124 = timed out; partial JSON is summarised)"

# A/B timing drivers (scripts/build_ab_drivers.sh), when carried: the merge kernels at several
# revisions of include/, one after the other in this run, so CPU-only changes get timed against
# their predecessors. (At most 8 files come back from $OUT, so the output goes into summary.txt
# and bench.log rather than a file of its own.)
ab_log=$(mktemp)
if compgen -G "$bin/ab/[0-9][0-9]_*" > /dev/null; then
  for drv in "$bin"/ab/[0-9][0-9]_*; do
    echo "### $(basename "$drv")" >> "$ab_log"
    timeout -k 5 "${LORY_AB_TIMEOUT_S:-60}" "$drv" "${LORY_AB_REPS:-5}" >> "$ab_log" 2>&1; rc=$?
    echo "ab_$(basename "$drv")=rc $rc" >> "$checks"
    [ $rc -eq 0 ] || fail+=("ab_$(basename "$drv")")
  done
fi

# The PyTorch extension, when a build made ahead of time for this machine's torch was carried
# (scripts/build_torch_prebuilt.sh): its GPU tests, then bench/compare_torch.py (issue #6's table).
if [ -f "$bin/lory_torch_cuda.so" ]; then
  export LORY_TORCH_PREBUILT="$PWD/$bin/lory_torch_cuda.so" LORY_TORCH_FROM_SOURCE=1 PYTHONUNBUFFERED=1
  (cd python && timeout -k 5 "${LORY_TORCH_TIMEOUT_S:-240}" python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests) \
    > "$out/torch_tests.log" 2>&1; rc=$?
  line=$(grep -E "passed|failed|error" "$out/torch_tests.log" | tail -1)
  echo "torch_gpu_tests=rc $rc; ${line:-no summary}" >> "$checks"
  echo "torch GPU tests: rc $rc; ${line:-no summary}"
  [ $rc -eq 0 ] || fail+=("torch_gpu_tests")
  timeout -k 5 "${LORY_TORCH_BENCH_TIMEOUT_S:-180}" python3 bench/compare_torch.py > "$out/compare_torch.md" 2>&1; rc=$?
  echo "compare_torch=rc $rc" >> "$checks"
  [ $rc -eq 0 ] || fail+=("compare_torch")
fi

python3 bench/summarize.py "$out/bench.json" --checks "$checks" | tee "$out/summary.txt"
[ -f "$out/compare_torch.md" ] && tee -a "$out/summary.txt" < "$out/compare_torch.md"
# Optional: Nsight Compute on the last A/B driver (the newest revision), one launch per case, e.g.
# LORY_AB_NCU="backward E32 S128;backward E8 S128" (labels as merge_ab prints them).
if [ -n "${LORY_AB_NCU:-}" ] && compgen -G "$bin/ab/[0-9][0-9]_*" > /dev/null; then
  drv=$(ls "$bin"/ab/[0-9][0-9]_* | tail -1)
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__occupancy_limit_shared_mem
  IFS=';' read -ra ncu_cases <<< "$LORY_AB_NCU"
  for c in "${ncu_cases[@]}"; do
    case $c in forward*) kern=merge_forward ;; *wgmma) kern=merge_backward_wgmma ;; *) kern=merge_backward_tc ;; esac
    echo "### ncu $(basename "$drv") \"$c\" (kernel $kern, second launch)" >> "$ab_log"
    timeout -k 5 "${LORY_AB_NCU_TIMEOUT_S:-90}" ncu --clock-control none --kernel-name "regex:$kern" --launch-skip 1 \
      --launch-count 1 --metrics "$metrics" "$drv" 1 "$c" >> "$ab_log" 2>&1; rc=$?
    echo "ab_ncu_${c// /_}=rc $rc" >> "$checks"
  done
fi
if [ -s "$ab_log" ]; then
  sed -i '1i # A/B: merge kernels per revision of include/ (bench/ab/merge_ab.cu)' "$ab_log"
  cat "$ab_log" >> "$out/bench.log"
  tee -a "$out/summary.txt" < "$ab_log"
fi
rm -f "$ab_log"
if [ ${#fail[@]} -gt 0 ]; then echo "GPU CHECK FAILED: ${fail[*]}"; exit 1; fi
echo "GPU CHECK PASSED"
