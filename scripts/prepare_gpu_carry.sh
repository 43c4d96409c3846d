#!/usr/bin/env bash
# Builds, on this (CPU) machine, everything the short-lease GPU check runs, into .gpucarry/, so
# that a GPU loan goes to running, not compiling (docs/gpu-check.md, "The short-lease variant"):
# the test binaries, the benchmarks, the training demo, optionally the PyTorch extension for the
# GPU machine's torch and A/B timing drivers of the merge kernels at given revisions.
#   usage: scripts/prepare_gpu_carry.sh [--torch VERSION] [--ab REV...]
#   e.g.   scripts/prepare_gpu_carry.sh --torch 2.11.0 --ab 6890d71 HEAD
# Then one device call: carry [".gpucarry", ".deps"],
#   LORY_COMMIT=<hash> LORY_BENCH_FILTER='merge_|lory_layer|dense_ffn' bash scripts/gpu_check_prebuilt.sh .gpucarry
set -euo pipefail
cd "$(dirname "$0")/.."
torch=""
ab=()
while [ $# -gt 0 ]; do
  case $1 in
    --torch) torch=${2:?--torch needs a version}; shift 2 ;;
    --ab) shift; ab=("$@"); break ;;
    *) echo "usage: $0 [--torch VERSION] [--ab REV...]" >&2; exit 2 ;;
  esac
done
bash scripts/stage_gpu_deps.sh
# The GPU machine is an H200: its own build dir, sm_90a only (half the size of the default
# preset's sm_80 + sm_90a binaries, so more A/B drivers fit in the carry).
bdir=build-carry
[ -f $bdir/CMakeCache.txt ] || cmake -S . -B $bdir -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a-real
cmake --build $bdir --target lory_cpu_tests lory_launch_tests lory_gpu_tests lory_bench lory_train_demo
rm -rf .gpucarry  # nothing stale (a torch extension or driver of another commit) rides along
mkdir -p .gpucarry
cp $bdir/tests/lory_cpu_tests $bdir/tests/lory_launch_tests $bdir/tests/lory_gpu_tests $bdir/bench/lory_bench \
  $bdir/examples/lory_train_demo .gpucarry/
[ -z "$torch" ] || bash scripts/build_torch_prebuilt.sh "$torch" .gpucarry/lory_torch_cuda.so 90a
[ ${#ab[@]} -eq 0 ] || bash scripts/build_ab_drivers.sh "${ab[@]}"
du -sh .gpucarry .deps
# The device tool carries at most 64 MiB in all (each A/B driver is about 2 MB).
total=$(du -sk .gpucarry .deps | awk '{s += $1} END {print s}')
if [ "$total" -gt 65536 ]; then
  echo "ERROR: .gpucarry + .deps = ${total} KiB, past the 64 MiB carry limit: fewer A/B revisions"; exit 1
fi
[ "$total" -le 60000 ] || echo "WARNING: .gpucarry + .deps = ${total} KiB, near the 64 MiB carry limit"
echo "carry .gpucarry and .deps; LORY_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- include tests bench examples || echo '+uncommitted')"
