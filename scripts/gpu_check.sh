#!/usr/bin/env bash
# The one-shot GPU check: build, every test, compute-sanitizer, benchmarks, in
# one call on a lent GPU machine (no network; about 15 minutes of device time
# including start-up, so the whole script keeps to a 7-minute wall budget).
#
# Usage (from anywhere; it works in the repository root):
#   bash scripts/gpu_check.sh           everything
#   bash scripts/gpu_check.sh --quick   build + tests only
#   bash scripts/gpu_check.sh --plan    print the steps, check .deps/ and the tools;
#                                       needs no GPU (CI runs it); non-zero if .deps/ is missing
# Before: bash scripts/stage_gpu_deps.sh on a networked machine, then carry .deps/.
#
# Environment:
#   OUT                    folder for the logs (default ./out); at most 6 files are written:
#                          build.log tests.log sanitizer.log bench.log bench.json summary.txt
#   LORY_COMMIT            commit to report when the tree has no .git (the device copy has none)
#   LORY_BUILD_DIR         build folder (default build-gpu; reused when present)
#   LORY_CHECK_BUDGET_S    wall budget in seconds (default 420); late steps shrink their
#                          timeouts to fit and are reported NOT RUN when no time is left
#
# Ends with the summary table (markdown, also $OUT/summary.txt) and one line:
# "GPU CHECK PASSED", or "GPU CHECK FAILED: <why>" with a non-zero exit on a
# build failure, a failed test, a sanitizer error or a crashed benchmark.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

MODE=full
case "${1:-}" in
  ""|--full) ;;
  --quick) MODE=quick ;;
  --plan) MODE=plan ;;
  -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
  *) echo "gpu_check: unknown argument '$1' (use --quick, --plan or nothing)" >&2; exit 2 ;;
esac

QUICK=0; [[ $MODE == quick ]] && QUICK=1
BUILD_DIR=${LORY_BUILD_DIR:-build-gpu}
OUT=${OUT:-$REPO/out}
BUDGET=${LORY_CHECK_BUDGET_S:-420}
DEPS_PREFIX=$REPO/.deps/root/usr
STAGED=$REPO/.deps/STAGED.txt
NPROC=$(nproc 2>/dev/null || echo 4)

# The toolkit's tools are not always on PATH on a fresh machine.
for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
  if [[ -d $d && ":$PATH:" != *":$d:"* ]]; then PATH=$PATH:$d; fi
done
export PATH

# ---- the steps (shared by --plan and the real run) -----------------------------------
CMAKE_ARGS=(-S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
            -DCMAKE_CUDA_ARCHITECTURES=90a-real "-DCMAKE_PREFIX_PATH=$DEPS_PREFIX")
TEST_EXES=(lory_cpu_tests lory_launch_tests lory_gpu_tests)
SAN_TOOLS=(memcheck racecheck initcheck synccheck)
# Seconds each step may take at most (shrunk further to fit the budget).
CAP_CONFIGURE=150 CAP_CTEST=120 CAP_DIRECT=90 CAP_BENCH=150 CAP_TORCH=60
declare -A CAP_SAN=([memcheck]=90 [racecheck]=90 [initcheck]=60 [synccheck]=45)
BENCH_RESERVE=100  # kept free for the benchmarks while the sanitizers run
# Google Benchmark 1.7.1 parses --benchmark_min_time as a double (seconds); the
# "0.05s" form only arrived in 1.8, and 1.7.1 would silently ignore it.
BENCH_ARGS=(--benchmark_format=console "--benchmark_out=$OUT/bench.json"
            --benchmark_out_format=json --benchmark_min_time=0.05)

san_cmd() {  # the sanitizer command line for one tool
  echo "compute-sanitizer --tool $1 --error-exitcode 99 --print-limit 50 $BUILD_DIR/tests/lory_gpu_tests \"~[large]\""
}

print_plan() {
  echo "gpu_check plan (mode: ${MODE/plan/full}; budget ${BUDGET}s; logs into $OUT):"
  echo "  1. nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"
  echo "  2. cmake ${CMAKE_ARGS[*]} [-DLORY_BUILD_BENCHMARKS=OFF with --quick or an incompatible libbenchmark]"
  printf '     %-56s (timeout: what the budget leaves)\n' "ninja -C $BUILD_DIR -j$NPROC -k 0"
  printf '  3. %-56s (timeout %ss)\n' "ctest --test-dir $BUILD_DIR --output-on-failure -j4 -LE emu" "$CAP_CTEST"
  for t in "${TEST_EXES[@]}"; do
    printf '     %-56s (timeout %ss)\n' "$BUILD_DIR/tests/$t --durations yes" "$CAP_DIRECT"
  done
  echo "  4. [not with --quick] sanitizers over the GPU tests, [large] excluded:"
  for t in "${SAN_TOOLS[@]}"; do echo "     $(san_cmd "$t")   (timeout ${CAP_SAN[$t]}s)"; done
  echo "  5. [not with --quick] $BUILD_DIR/bench/lory_bench ${BENCH_ARGS[*]}   (timeout ${CAP_BENCH}s)"
  echo "     python3 bench/compare_torch.py (only if it exists; timeout ${CAP_TORCH}s)"
  echo "  6. python3 bench/summarize.py $OUT/bench.json --checks <results>  -> $OUT/summary.txt"
}

# ---- helpers ------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lory_gpu_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
CHECKS=$TMP/checks.txt
: >"$CHECKS"
FAILS=()

join() { local out="" x; for x in "$@"; do out+="${out:+; }$x"; done; echo "$out"; }
check() { printf '%s=%s\n' "$1" "$2" >>"$CHECKS"; }           # one row of the summary table
fail() { FAILS+=("$1"); }
say() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*"; }
left() { echo $((BUDGET - SECONDS)); }
# cap CAP RESERVE: the seconds a step may use, keeping RESERVE for later steps.
cap() { local l=$(($(left) - $2)); if ((l < $1)); then echo "$l"; else echo "$1"; fi; }
# capf CAP RESERVE FLOOR: the same, but never under FLOOR (for steps that must run).
capf() { local c; c=$(cap "$1" "$2"); if ((c < $3)); then echo "$3"; else echo "$c"; fi; }

# run_logged LOG SECONDS CMD...: appends the command and its output to LOG; sets RC.
RC=0
run_logged() {
  local log=$1 t=$2 t0=$SECONDS
  shift 2
  printf '\n### %s $ %s   (timeout %ss)\n' "$(date -u +%H:%M:%S)" "$*" "$t" >>"$log"
  RC=0
  timeout -k 10 "$t" "$@" >>"$log" 2>&1 || RC=$?
  printf '### exit %s after %ss%s\n' "$RC" $((SECONDS - t0)) "$( ((RC == 124 || RC == 137)) && echo ' (TIMEOUT)')" >>"$log"
}

version_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]; }  # $1 >= $2

staged_value() { sed -n "s/^$1=//p" "$STAGED" 2>/dev/null | head -1; }

# Can the staged Debian libbenchmark.so load here? Prints the reason when not.
bench_lib_problem() {
  local need_c need_cxx have_c cxxlib
  need_c=$(staged_value libbenchmark_needs_glibc)
  need_cxx=$(staged_value libbenchmark_needs_glibcxx)
  have_c=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
  if [[ -n $need_c && $need_c != unknown && -n $have_c ]] && ! version_ge "$have_c" "$need_c"; then
    echo "glibc $have_c < $need_c needed by the staged libbenchmark"; return
  fi
  cxxlib=$("${CXX:-c++}" -print-file-name=libstdc++.so.6 2>/dev/null || true)
  if [[ -n $need_cxx && $need_cxx != unknown && -f $cxxlib ]] && ! grep -aq "GLIBCXX_$need_cxx" "$cxxlib"; then
    echo "libstdc++ ($cxxlib) lacks GLIBCXX_$need_cxx needed by the staged libbenchmark"
  fi
}

deps_missing() {  # prints what is missing from the stage
  local f
  for f in "$DEPS_PREFIX/lib/cmake/Catch2/Catch2Config.cmake" \
           "$DEPS_PREFIX/include/catch2/catch.hpp" \
           "$DEPS_PREFIX/lib/x86_64-linux-gnu/cmake/benchmark/benchmarkConfig.cmake" \
           "$DEPS_PREFIX/include/benchmark/benchmark.h" \
           "$DEPS_PREFIX/lib/x86_64-linux-gnu/libbenchmark.so.1debian"; do
    [[ -e $f ]] || echo "${f#"$REPO"/}"
  done
}

# ---- --plan -------------------------------------------------------------------------
if [[ $MODE == plan ]]; then
  print_plan
  echo
  echo "staged dependencies (.deps/):"
  missing=$(deps_missing)
  if [[ -n $missing ]]; then
    while read -r m; do echo "  MISSING $m"; done <<<"$missing"
  else
    echo "  ok: Catch2 $(staged_value catch2_version), Google Benchmark $(staged_value benchmark_version) under .deps/root/usr"
    problem=$(bench_lib_problem)
    echo "  libbenchmark on this machine: ${problem:-loadable (glibc / libstdc++ new enough)}"
  fi
  echo "tools (PATH includes /usr/local/cuda/bin when present):"
  for tool in cmake ctest ninja nvcc c++ python3 timeout git nvidia-smi compute-sanitizer; do
    if p=$(command -v "$tool"); then
      printf '  ok       %-18s %s\n' "$tool" "$p"
    else
      case $tool in
        nvidia-smi|compute-sanitizer) printf '  MISSING  %-18s (needed on the GPU machine only)\n' "$tool" ;;
        git) printf '  MISSING  %-18s (optional: set LORY_COMMIT)\n' "$tool" ;;
        *) printf '  MISSING  %-18s\n' "$tool" ;;
      esac
    fi
  done
  if command -v cmake >/dev/null; then
    v=$(cmake --version | awk 'NR==1{print $3}')
    version_ge "$v" 3.24 || echo "  WARNING: cmake $v < 3.24 (the project needs 3.24)"
  fi
  if [[ -n $missing ]]; then
    echo "gpu_check --plan: .deps is missing or incomplete; run: bash scripts/stage_gpu_deps.sh" >&2
    exit 1
  fi
  echo "gpu_check --plan: ok"
  exit 0
fi

# ---- the real run -------------------------------------------------------------------
mkdir -p "$OUT"
BUILD_LOG=$OUT/build.log TESTS_LOG=$OUT/tests.log SAN_LOG=$OUT/sanitizer.log
BENCH_LOG=$OUT/bench.log BENCH_JSON=$OUT/bench.json SUMMARY=$OUT/summary.txt
rm -f "$BUILD_LOG" "$TESTS_LOG" "$SAN_LOG" "$BENCH_LOG" "$BENCH_JSON" "$SUMMARY"

# 1. the machine
if command -v nvidia-smi >/dev/null; then
  GPU_LINE=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1 || true)
else
  GPU_LINE="nvidia-smi not found"
fi
say "GPU: ${GPU_LINE:-unknown}"
commit=${LORY_COMMIT:-}
if [[ -z $commit ]] && git rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  [[ -z $(git status --porcelain --untracked-files=no 2>/dev/null) ]] || commit="$commit (uncommitted changes)"
fi
check commit "${commit:-unknown (no .git; set LORY_COMMIT)}"
check date "$(date -u '+%Y-%m-%d %H:%M UTC')"
check GPU "${GPU_LINE:-unknown}"
check mode "$MODE (budget ${BUDGET}s)"

missing=$(deps_missing)
if [[ -n $missing ]]; then
  say "staged dependencies missing: ${missing//$'\n'/ }"
  fail ".deps missing (run scripts/stage_gpu_deps.sh here and carry .deps)"
fi

# 2. configure + build (a previous build folder is reused when it belongs to this tree)
if ((${#FAILS[@]} == 0)); then
  if [[ -f $BUILD_DIR/CMakeCache.txt ]]; then
    home=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt")
    gen=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt")
    if [[ $home != "$REPO" || $gen != Ninja ]]; then
      say "discarding $BUILD_DIR (configured for '$home' with '$gen')"
      rm -rf "$BUILD_DIR"
    fi
  fi
  extra=(-DLORY_BUILD_BENCHMARKS=ON)
  BENCH_SKIP=""
  if [[ $MODE == quick ]]; then
    extra=(-DLORY_BUILD_BENCHMARKS=OFF); BENCH_SKIP="NOT RUN (--quick)"
  else
    problem=$(bench_lib_problem)
    if [[ -n $problem ]]; then
      extra=(-DLORY_BUILD_BENCHMARKS=OFF); BENCH_SKIP="NOT RUN ($problem)"
      say "benchmarks disabled: $problem"
    fi
  fi
  say "configure"
  run_logged "$BUILD_LOG" "$(capf "$CAP_CONFIGURE" 60 30)" cmake "${CMAKE_ARGS[@]}" "${extra[@]}"
  if ((RC != 0)); then
    check build "FAILED: cmake configure (exit $RC)"
    fail "cmake configure failed (exit $RC; see build.log)"
    tail -n 25 "$BUILD_LOG"
  else
    say "build (ninja -j$NPROC)"
    t0=$SECONDS
    # Keep going past a broken target (-k 0): whatever did build is still tested.
    run_logged "$BUILD_LOG" "$(capf 100000 $((QUICK ? 60 : 150)) 60)" ninja -C "$BUILD_DIR" -j"$NPROC" -k 0
    if ((RC == 0)); then
      check build "ok ($((SECONDS - t0)) s, $(grep -c 'warning' "$BUILD_LOG" || true) warning lines)"
    else
      why="exit $RC"; ((RC == 124 || RC == 137)) && why="TIMEOUT"
      check build "FAILED ($why; $(grep -c 'error' "$BUILD_LOG" || true) error lines; see build.log)"
      fail "build failed ($why)"
      grep -E 'error|FAILED' "$BUILD_LOG" | awk '!seen[$0]++' | head -n 30 || true
    fi
  fi
  say "build: $(tail -n 1 "$CHECKS" | cut -d= -f2-)"
fi

# 3. tests: CTest (every test case its own test), then each executable directly
if [[ -f $BUILD_DIR/CTestTestfile.cmake ]]; then
  say "ctest -j4 -LE emu (the CPU emulator's tests ran in CI already)"
  t=$(capf "$CAP_CTEST" $((QUICK ? 20 : 100)) 30)
  run_logged "$TESTS_LOG" "$t" ctest --test-dir "$BUILD_DIR" --output-on-failure -j4 -LE emu
  ctest_rc=$RC
  # Result lines look like " 12/40 Test #12: cpu: softmax ...   Passed    0.01 sec".
  results=$(grep -E '^ *[0-9]+/[0-9]+ +Test +#[0-9]+:' "$TESTS_LOG" || true)
  n_total=$(grep -c . <<<"$results" || true)
  n_pass=$(grep -cE ' Passed +[0-9.]+ sec' <<<"$results" || true)
  n_skip=$(grep -cE '\*\*\*Skipped' <<<"$results" || true)
  n_fail=$((n_total - n_pass - n_skip))
  note=""
  ((ctest_rc == 124 || ctest_rc == 137)) && note="; ctest TIMEOUT after ${t}s"
  ((n_total == 0)) && note="$note; no tests found"
  check "tests (ctest)" "$n_pass passed, $n_fail failed, $n_skip skipped$note"
  if ((n_fail > 0 || (ctest_rc != 0 && n_total > 0))); then
    fail "$n_fail test(s) failed under ctest (exit $ctest_rc)"
    grep -E '\*\*\*(Failed|Timeout|Exception)|Not Run' <<<"$results" | head -n 20 || true
  fi
  ((n_skip > 0)) && grep -E '\*\*\*Skipped' <<<"$results" | head -n 5
  say "ctest: $n_pass passed, $n_fail failed, $n_skip skipped$note"

  direct=()
  for exe in "${TEST_EXES[@]}"; do
    bin=$BUILD_DIR/tests/$exe
    if [[ ! -x $bin ]]; then
      direct+=("$exe not built"); fail "$exe not built"; continue
    fi
    t=$(cap "$CAP_DIRECT" $((QUICK ? 10 : 100)))
    if ((t < 10)); then direct+=("$exe NOT RUN (out of time)"); continue; fi
    tmp=$TMP/$exe.out
    run_logged "$tmp" "$t" "$bin" --durations yes
    cat "$tmp" >>"$TESTS_LOG"
    last=$(grep -E '^(All tests passed|test cases:|No tests ran|SKIPPED:)' "$tmp" | tail -n 1 || true)
    case $RC in
      0) direct+=("$exe ok (${last:-?})") ;;
      77) direct+=("$exe SKIPPED (no usable CUDA device)")
          fail "$exe skipped: no usable CUDA device" ;;
      124|137) direct+=("$exe TIMEOUT after ${t}s"); fail "$exe timed out" ;;
      *) direct+=("$exe FAILED exit $RC (${last:-?})"); fail "$exe failed (exit $RC)" ;;
    esac
    say "${direct[-1]}"
  done
  check "tests (direct)" "$(join "${direct[@]}")"
else
  check "tests" "NOT RUN (nothing configured)"
fi

# 4. compute-sanitizer over the GPU tests ([large] excluded)
sanitize() {
  local tool=$1 t out errs hz line
  t=$(cap "${CAP_SAN[$tool]}" "$BENCH_RESERVE")
  if ((t < 20)); then check "$tool" "NOT RUN (out of time)"; return; fi
  out=$TMP/$tool.out
  say "compute-sanitizer --tool $tool (timeout ${t}s)"
  run_logged "$out" "$t" compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
    "$BUILD_DIR/tests/lory_gpu_tests" "~[large]"
  cat "$out" >>"$SAN_LOG"
  # Summary lines: "========= ERROR SUMMARY: 3 errors" (memcheck, initcheck, synccheck),
  # "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)" (racecheck).
  errs=$(sed -n 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p' "$out" | tail -n 1)
  hz=$(sed -n 's/.*RACECHECK SUMMARY: .*(\([0-9][0-9]*\) error.*/\1/p' "$out" | tail -n 1)
  [[ -n $hz && ( -z $errs || $hz -gt $errs ) ]] && errs=$hz
  if grep -qiE 'device not supported|not supported on this (device|platform)|unable to (attach|launch|start)|failed to (initialize|launch)' "$out"; then
    line=$(grep -iE 'not supported|unable to|failed to' "$out" | head -n 1 | sed 's/^=* *//')
    if [[ -z $errs || $errs == 0 ]]; then check "$tool" "NOT RUN ($line)"; return; fi
  fi
  if grep -q '^SKIPPED: no CUDA device' "$out"; then check "$tool" "NOT RUN (no usable CUDA device)"; return; fi
  if grep -qE '^No test cases matched|^No tests ran' "$out"; then check "$tool" "NOT RUN (no GPU tests outside [large])"; return; fi
  if ((RC == 124 || RC == 137)); then
    # Killed before its summary: count the reports printed so far.
    errs=$(grep -cE '^========= (Invalid|Error|Uninitialized|Barrier|Race|Program hit)' "$out" || true)
    check "$tool" "TIMEOUT after ${t}s (incomplete; $errs error reports so far)"
    ((errs == 0)) || fail "$tool: $errs error report(s) before its timeout"
    return
  fi
  if [[ -z $errs ]]; then
    check "$tool" "NOT RUN (no sanitizer summary; exit $RC; see sanitizer.log)"
    return
  fi
  if ((errs > 0 || RC == 99)); then
    check "$tool" "$errs ERRORS"
    fail "$tool reported $errs error(s)"
    grep -E '^========= ' "$out" | head -n 12 || true
  elif ((RC != 0)); then
    check "$tool" "0 errors, but the tests failed under it (exit $RC)"
    fail "GPU tests failed under $tool (exit $RC)"
  else
    check "$tool" "0 errors"
  fi
}

if [[ $MODE == full ]]; then
  if [[ ! -x $BUILD_DIR/tests/lory_gpu_tests ]]; then
    for tool in "${SAN_TOOLS[@]}"; do check "$tool" "NOT RUN (lory_gpu_tests not built)"; done
  elif ! command -v compute-sanitizer >/dev/null; then
    for tool in "${SAN_TOOLS[@]}"; do check "$tool" "NOT RUN (compute-sanitizer not found)"; done
  else
    for tool in "${SAN_TOOLS[@]}"; do sanitize "$tool"; say "$tool: $(tail -n 1 "$CHECKS" | cut -d= -f2-)"; done
  fi
fi

# 5. benchmarks, then the PyTorch comparison when the project has one
if [[ $MODE == full ]]; then
  if [[ -n ${BENCH_SKIP:-} ]]; then
    check benchmarks "$BENCH_SKIP"
  elif [[ ! -x $BUILD_DIR/bench/lory_bench ]]; then
    check benchmarks "NOT RUN (lory_bench not built)"
  else
    t=$(cap "$CAP_BENCH" 15)
    if ((t < 30)); then
      check benchmarks "NOT RUN (out of time)"
    else
      say "lory_bench (timeout ${t}s)"
      run_logged "$BENCH_LOG" "$t" "$BUILD_DIR/bench/lory_bench" "${BENCH_ARGS[@]}"
      n=$(grep -c '"run_name"' "$BENCH_JSON" 2>/dev/null || true)
      n_err=$(grep -c '"error_occurred": *true' "$BENCH_JSON" 2>/dev/null || true)
      case $RC in
        0) if grep -q '^SKIPPED' "$BENCH_LOG"; then check benchmarks "NOT RUN (no usable CUDA device)"
           else check benchmarks "ok (${n:-0} entries, ${n_err:-0} with errors)"; fi ;;
        124|137) check benchmarks "TIMEOUT after ${t}s (${n:-0} entries kept; the table shows them)" ;;
        *) check benchmarks "FAILED exit $RC (${n:-0} entries before it; see bench.log)"
           fail "lory_bench exited $RC"; tail -n 15 "$BENCH_LOG" ;;
      esac
      # A benchmark that skipped with an error (a launcher refused its arguments) is a defect.
      ((${n_err:-0} == 0)) || fail "${n_err} benchmark(s) reported errors (see the table)"
    fi
  fi
  say "benchmarks: $(tail -n 1 "$CHECKS" | cut -d= -f2-)"
  if [[ -f bench/compare_torch.py ]]; then
    t=$(cap "$CAP_TORCH" 5)
    if ((t < 15)); then
      check "torch comparison" "NOT RUN (out of time)"
    else
      say "python3 bench/compare_torch.py (timeout ${t}s)"
      LORY_BUILD_DIR=$BUILD_DIR run_logged "$BENCH_LOG" "$t" python3 bench/compare_torch.py
      case $RC in
        0) check "torch comparison" "ok (see bench.log)" ;;
        124|137) check "torch comparison" "TIMEOUT after ${t}s" ;;
        *) check "torch comparison" "FAILED exit $RC"; fail "bench/compare_torch.py exited $RC" ;;
      esac
    fi
  fi
fi

# 6. the summary, last
check "wall time" "${SECONDS}s"
title="lory GPU check: ${commit:-unknown commit}, $(date -u +%Y-%m-%d), ${GPU_LINE%%,*}"
if command -v python3 >/dev/null && python3 bench/summarize.py "$BENCH_JSON" --checks "$CHECKS" --title "$title" >"$SUMMARY" 2>"$TMP/summarize.err"; then
  :
else
  { echo "### $title"; echo; echo "(bench/summarize.py unavailable: $(head -c 300 "$TMP/summarize.err" 2>/dev/null))"; echo
    sed 's/^\([^=]*\)=\(.*\)$/- \1: \2/' "$CHECKS"; } >"$SUMMARY"
fi
if ((${#FAILS[@]} == 0)); then
  final="GPU CHECK PASSED"
  # Passing is not the same as complete: name what did not run or was cut short.
  partial=$(grep -E '^[^=]*=(NOT RUN|TIMEOUT)' "$CHECKS" | cut -d= -f1 | paste -sd, - | sed 's/,/, /g' || true)
  [[ -z $partial ]] || final="$final (incomplete: $partial)"
else
  final="GPU CHECK FAILED: $(join "${FAILS[@]}")"
fi
{ echo; echo "$final"; } >>"$SUMMARY"
echo
cat "$SUMMARY"
((${#FAILS[@]} == 0))
