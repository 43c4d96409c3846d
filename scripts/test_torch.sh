#!/usr/bin/env bash
# Tests lory's PyTorch package (python/lory_torch) as a user gets it: installs the pinned test
# requirements (python/requirements.txt) when torch or pytest is missing, installs the package from
# this clone with `pip install --no-build-isolation .` (the extension compiled ahead of time against
# the installed torch) and runs pytest against the INSTALLED package, from a folder where python/
# is not on sys.path. Prints pytest's summary line last.
# The batching tests also need python/requirements-test.txt (numpy, tqdm, faiss-cpu, transformers),
# installed when one of them is missing.
#   usage: scripts/test_torch.sh [extra pytest arguments]
# Environment: LORY_TORCH_BUILD_DIR (build folder and pytest.log, default build-torch/ in the repo),
#              LORY_TEST_SEED (reproduce a run), LORY_TORCH_FORCE_CUDA_BUILD=1 (build the CUDA ops).
# CUDA: the extension is built C++-only (LORY_TORCH_CPU_ONLY=1) unless a GPU is visible or
# LORY_TORCH_FORCE_CUDA_BUILD=1: CI has nvcc but no GPU, and compiling the CUDA sources for two
# GPU generations on 2 cores would take a large share of CI's time to test nothing that runs.
# Note: PyPI's default Linux torch wheel is the CUDA build: ~0.54 GB for the wheel and ~2.9 GB of
# downloads with its nvidia-* dependencies (about 2 minutes on a fast link, 5.8 GB installed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="/usr/local/cuda/bin:$PATH"
py=${PYTHON:-python3}
start=$(date +%s)

if ! "$py" -c "import torch, pytest" >/dev/null 2>&1; then
  echo "== installing torch and pytest from PyPI (versions pinned in python/requirements.txt)"
  "$py" -m pip install --quiet -r python/requirements.txt
fi
if ! "$py" -c "import numpy, tqdm, faiss, transformers" >/dev/null 2>&1; then
  echo "== installing the test dependencies (python/requirements-test.txt)"
  "$py" -m pip install --quiet -r python/requirements-test.txt
fi
"$py" -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"

export LORY_TORCH_BUILD_DIR=${LORY_TORCH_BUILD_DIR:-$root/build-torch}
mkdir -p "$LORY_TORCH_BUILD_DIR"
if [[ "${LORY_TORCH_FORCE_CUDA_BUILD:-0}" == "0" ]] && ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export LORY_TORCH_CPU_ONLY=1
fi
echo "== pip install --no-build-isolation . (build folder $LORY_TORCH_BUILD_DIR/setuptools, $([[ ${LORY_TORCH_CPU_ONLY:-0} == 1 ]] && echo C++ only || echo with CUDA))"
build_start=$(date +%s)
set +e
MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install --no-build-isolation --no-deps --progress-bar off . 2>&1 \
  | tee "$LORY_TORCH_BUILD_DIR/pip-install.log" | grep -vE "WARNING: Running pip as"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc != 0 ]]; then echo "error: pip install failed (rc $rc, log $LORY_TORCH_BUILD_DIR/pip-install.log)" >&2; exit "$rc"; fi
echo "build + install: $(( $(date +%s) - build_start )) s"

echo "== pytest (the installed package)"
log="$LORY_TORCH_BUILD_DIR/pytest.log"
set +e
(cd "$LORY_TORCH_BUILD_DIR" && LORY_TORCH_FROM_SOURCE=0 "$py" -m pytest -q -rs -p no:cacheprovider "$root/python/tests" "$@") \
  2>&1 | tee "$log" | tail -n 25
rc=${PIPESTATUS[0]}
set -e
echo "total: $(( $(date +%s) - start )) s"
summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|no tests ran' "$log" | tail -n 1 || true)
echo "pytest: ${summary:-no summary line (see $log)}"
exit "$rc"
