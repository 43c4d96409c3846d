#!/usr/bin/env bash
# Tests lory's PyTorch integration (python/lory_torch): installs PyTorch and pytest from PyPI when
# `import torch` fails, the test dependencies of python/requirements-test.txt (numpy, tqdm,
# faiss-cpu, transformers) when one of them is missing, builds the extension (JIT,
# torch.utils.cpp_extension) and runs pytest.
# Without a GPU (or with LORY_TORCH_CPU_ONLY=1) the extension is built C++-only and the GPU
# tests are reported as skipped. Prints pytest's summary line last.
#   usage: scripts/test_torch.sh [extra pytest arguments]
# Environment: LORY_TORCH_BUILD_DIR (extension build folder, default build-torch/ in the repo),
#              LORY_TEST_SEED (reproduce a run), LORY_TORCH_CPU_ONLY=1, LORY_TORCH_FORCE_CUDA_BUILD=1.
# Note: PyPI's default Linux torch wheel is the CUDA build: ~0.54 GB for the wheel and ~2.9 GB of
# downloads with its nvidia-* dependencies (about 2 minutes on a fast link, 5.8 GB installed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="/usr/local/cuda/bin:$PATH"
py=${PYTHON:-python3}
start=$(date +%s)

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "== installing torch and pytest from PyPI (versions pinned in python/requirements.txt)"
  "$py" -m pip install --quiet -r python/requirements.txt
elif ! "$py" -c "import pytest" >/dev/null 2>&1; then
  "$py" -m pip install --quiet pytest
fi
if ! "$py" -c "import numpy, tqdm, faiss, transformers" >/dev/null 2>&1; then
  echo "== installing the test dependencies (python/requirements-test.txt)"
  "$py" -m pip install --quiet -r python/requirements-test.txt
fi
"$py" -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"

export LORY_TORCH_BUILD_DIR=${LORY_TORCH_BUILD_DIR:-$root/build-torch}
mkdir -p "$LORY_TORCH_BUILD_DIR"
echo "== building the extension in $LORY_TORCH_BUILD_DIR"
build_start=$(date +%s)
(cd python && "$py" -c "import lory_torch; print('extension build:', lory_torch.load())")
echo "build: $(( $(date +%s) - build_start )) s"

echo "== pytest"
log="$LORY_TORCH_BUILD_DIR/pytest.log"
set +e
(cd python && "$py" -m pytest -q -rs tests "$@") 2>&1 | tee "$log" | tail -n 25
rc=${PIPESTATUS[0]}
set -e
echo "total: $(( $(date +%s) - start )) s"
summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|no tests ran' "$log" | tail -n 1 || true)
echo "pytest: ${summary:-no summary line (see $log)}"
exit "$rc"
