#!/usr/bin/env bash
# Builds lory's tests (CPU tests, launcher tests, GPU tests, benchmarks, examples; CUDA code for
# sm_80 and sm_90a) and runs them. Without a GPU the GPU tests are reported as skipped.
# Also checks the kernels' resource report (no spills, no stack frames) on a clean build.
#   usage: scripts/test.sh [--clean]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install_deps.sh
export PATH="/usr/local/cuda/bin:$PATH"
[ "${1:-}" = "--clean" ] && rm -rf build
fresh=0; [ -f build/build.ninja ] || fresh=1
cmake --preset default >/dev/null
jobs=$(nproc)
set -o pipefail
cmake --build build -j"$jobs" 2>&1 | tee build/build.log | { grep -v "ptxas info\|bytes stack frame\|^ptxas\|^$" || true; } | tail -n 20
if [ $fresh = 1 ]; then
  bash scripts/check_kernel_resources.sh build/build.log
else
  echo "resource check: skipped (incremental build; run scripts/test.sh --clean for it)"
fi
# One seed for the whole run (each test derives its own from it and its name), printed with the
# summary so a failure seen in a log can be reproduced.
export LORY_TEST_SEED="${LORY_TEST_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
rc=0
ctest --test-dir build --output-on-failure -j"$jobs" 2>&1 | tee build/ctest.log | tail -n 40 || rc=$?
total=$(grep -oE 'tests failed out of [0-9]+' build/ctest.log | grep -oE '[0-9]+$' || echo 0)
failed=$(grep -oE '[0-9]+ tests failed out of' build/ctest.log | grep -oE '^[0-9]+' || echo 0)
skipped=$(grep -c '(Skipped)' build/ctest.log || true)
passed=$((total - failed - skipped))
[ "$total" -gt 0 ] || { echo "no tests ran"; exit 1; }
emulated=$(grep -cE 'Test +#[0-9]+: emu[^ ]*:.* Passed' build/ctest.log || true)
echo "tests: $passed passed, $failed failed, $skipped skipped ($emulated of the passed are GPU tests run under the CPU emulator of the kernels, not on a GPU; seed $LORY_TEST_SEED, LORY_TEST_SEED=$LORY_TEST_SEED scripts/test.sh reproduces it)" | tee build/tests-summary.txt
exit $rc
