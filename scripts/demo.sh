#!/usr/bin/env bash
# The project's main job: builds and runs the training demo (see README): a Lory MoE FFN layer
# trained on synthetic multi-domain data; experts specialise without any auxiliary loss.
#   usage: scripts/demo.sh [--device cpu|gpu|auto] [--seed N] [--steps N] [--experts E]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install_deps.sh >/dev/null
export PATH="/usr/local/cuda/bin:$PATH"
cmake --preset default >/dev/null
cmake --build build --target lory_train_demo -j"$(nproc)" | { grep -v "ptxas\|bytes stack frame" || true; } | tail -n 3
./build/examples/lory_train_demo "$@"
