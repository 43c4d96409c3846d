#!/usr/bin/env bash
# Installs what lory's build, tests and benchmarks need on a Debian machine, from Debian's packages:
# CMake, Ninja, a C++ compiler, Catch2 (v2.13) and Google Benchmark. The CUDA toolkit (nvcc, cuBLAS,
# CCCL) is expected to be present already (no GPU is needed to build). Idempotent: installs only
# what is missing.
set -euo pipefail
need=()
for pkg in cmake ninja-build g++ catch2 libbenchmark-dev python3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "install_deps: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do [ -x "$d/nvcc" ] && export PATH="$d:$PATH"; done
fi
command -v nvcc >/dev/null 2>&1 || { echo "install_deps: nvcc not found (install the CUDA toolkit)"; exit 1; }
echo "install_deps: ok ($(nvcc --version | tail -1), $(cmake --version | head -1))"
