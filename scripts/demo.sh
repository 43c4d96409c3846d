#!/usr/bin/env bash
# The project's main job: builds and runs the Lory layer demo (see README).
#   usage: scripts/demo.sh [demo flags, e.g. --seed 7]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install_deps.sh >/dev/null
export PATH="/usr/local/cuda/bin:$PATH"
cmake --preset default >/dev/null
cmake --build build --target lory_demo -j"$(nproc)" | grep -v "ptxas\|bytes stack frame" | tail -n 3
./build/examples/lory_demo "$@"
