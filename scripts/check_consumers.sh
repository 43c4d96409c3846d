#!/usr/bin/env bash
# Builds and runs three tiny consumer projects, one per way into lory:
# add_subdirectory, FetchContent (from this source tree) and find_package (from an install prefix).
# Also checks that a consumer sees none of lory's tests or options leak in.
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
echo "consumers: 3 passed, 0 failed"
