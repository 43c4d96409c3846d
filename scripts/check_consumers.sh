#!/usr/bin/env bash
# Builds and runs tiny consumer projects, one per way into lory: add_subdirectory, FetchContent
# (from this source tree) and find_package (from an install prefix); then a CPU-only consumer
# (lory::lory_cpu) through add_subdirectory and through find_package(COMPONENTS cpu), configured
# with the CUDA toolkit out of CMake's reach, whose compile commands and header dependencies must
# name nothing of CUDA's. Also checks that a consumer sees none of lory's tests or options leak in.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
gen=(-G Ninja)

echo "== consumer: add_subdirectory"
cmake -S "$root/tests/consumers/add_subdirectory" -B "$work/add_subdirectory" "${gen[@]}" -DLORY_SOURCE_DIR="$root" >/dev/null
cmake --build "$work/add_subdirectory" >/dev/null
"$work/add_subdirectory/consumer"
# Nothing of lory's own (tests, benchmarks, CUDA language) may be configured for a consumer.
if grep -q "lory_cpu_tests\|lory_bench" "$work/add_subdirectory/build.ninja"; then
  echo "FAIL: lory's tests or benchmarks leaked into an add_subdirectory consumer"; exit 1
fi

echo "== consumer: FetchContent"
cmake -S "$root/tests/consumers/fetchcontent" -B "$work/fetchcontent" "${gen[@]}" -DLORY_SOURCE_DIR="$root" >/dev/null
cmake --build "$work/fetchcontent" >/dev/null
"$work/fetchcontent/consumer"

echo "== consumer: find_package from an install prefix"
cmake -S "$root" -B "$work/lory-build" "${gen[@]}" -DLORY_BUILD_TESTS=OFF -DLORY_BUILD_BENCHMARKS=OFF \
  -DLORY_BUILD_EXAMPLES=OFF -DLORY_ENABLE_CUDA=OFF -DCMAKE_INSTALL_PREFIX="$work/prefix" >/dev/null
cmake --install "$work/lory-build" >/dev/null
test -f "$work/prefix/include/lory/lory.hpp"
cmake -S "$root/tests/consumers/find_package" -B "$work/find_package" "${gen[@]}" \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/find_package" >/dev/null
"$work/find_package/consumer"

# No CUDA include folder on the command line, and no CUDA header among the ones the compiler read.
check_no_cuda() {
  local dir=$1
  if grep -E -- "-I[^ ]*cuda|-isystem [^ ]*cuda|targets/[^ ]*-linux" "$dir/compile_commands.json"; then
    echo "FAIL: a CUDA include folder reached the CPU-only consumer's compile command ($dir)"; exit 1
  fi
  local deps
  deps=$(cd "$dir" && ninja -t deps)
  echo "$deps" | grep -q "lory/dtype.hpp" || { echo "FAIL: no header dependencies recorded in $dir"; exit 1; }
  if echo "$deps" | grep -E "cuda_(fp16|bf16|runtime)|/cuda[-/]|crt/host_defines"; then
    echo "FAIL: the CPU-only consumer read a CUDA header ($dir)"; exit 1
  fi
}
no_cuda=(-DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=TRUE)

echo "== consumer: CPU only, add_subdirectory, no CUDA toolkit"
cmake -S "$root/tests/consumers/cpu_only" -B "$work/cpu_only" "${gen[@]}" "${no_cuda[@]}" -DLORY_SOURCE_DIR="$root" >/dev/null
cmake --build "$work/cpu_only" >/dev/null
check_no_cuda "$work/cpu_only"
"$work/cpu_only/consumer_cpu"

echo "== consumer: CPU only, find_package(lory COMPONENTS cpu), no CUDA toolkit"
cmake -S "$root/tests/consumers/cpu_only" -B "$work/cpu_only_find_package" "${gen[@]}" "${no_cuda[@]}" --no-warn-unused-cli \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/cpu_only_find_package" >/dev/null
check_no_cuda "$work/cpu_only_find_package"
"$work/cpu_only_find_package/consumer_cpu"
echo "consumers: 5 passed, 0 failed"
