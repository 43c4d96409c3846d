#!/usr/bin/env bash
# Builds the PyTorch extension (python/lory_torch/csrc) ahead of time, on a CPU machine, against the
# exact torch version a GPU machine has, so a short GPU lease spends no time compiling it there.
# The result is a plain shared library of torch ops (no Python module: it includes only
# <torch/library.h> and ATen), which lory_torch.load() loads when LORY_TORCH_PREBUILT names it.
#   usage: scripts/build_torch_prebuilt.sh TORCH_VERSION OUT_SO [CUDA_ARCH]
#   e.g.   scripts/build_torch_prebuilt.sh 2.11.0 .gpucarry/lory_torch_cuda.so 90a
# Downloads that torch wheel from PyPI (no dependencies) into build-torch-prebuilt/ and unpacks
# its headers and libraries; compiles with this machine's nvcc, whose major CUDA version must match
# the wheel's (torch.version.cuda). The wheel's Python tag does not matter: nothing here links
# Python.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ver=${1:?torch version, e.g. 2.11.0}
out=${2:?output .so path}
arch=${3:-90a}
export PATH="/usr/local/cuda/bin:$PATH"
work="$root/build-torch-prebuilt/torch-$ver"
mkdir -p "$work"
if [ ! -f "$work/torch/version.py" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheel" "torch==$ver"
  (cd "$work" && unzip -q -o wheel/torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py')
fi
tcuda=$(sed -n "s/^cuda: Optional\[str\] = '\([0-9.]*\)'/\1/p" "$work/torch/version.py")
ncuda=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
echo "torch $ver (CUDA ${tcuda:-none}), nvcc $ncuda, sm_$arch"
if [ "${tcuda%%.*}" != "${ncuda%%.*}" ]; then
  echo "error: torch $ver was built for CUDA ${tcuda:-none}, nvcc is $ncuda (major versions must match)" >&2
  exit 1
fi
tinc=("-isystem" "$work/torch/include" "-isystem" "$work/torch/include/torch/csrc/api/include")
inc=("-I$root/include" "-I$root/python/lory_torch/csrc")
defs=(-DTORCH_EXTENSION_NAME=lory_torch_cuda -D_GLIBCXX_USE_CXX11_ABI=1)
obj="$work/obj-sm$arch"
mkdir -p "$obj" "$(dirname "$out")"
src="$root/python/lory_torch/csrc"
# The flags lory_torch.load() passes to torch.utils.cpp_extension, spelled out.
# Every C++ source in csrc/ (ops register themselves), as the package build does, then the CUDA ones.
objs=(); pids=()
for cpp in "$src"/*.cpp; do
  o="$obj/$(basename "$cpp" .cpp).o"; objs+=("$o")
  g++ -std=c++17 -O2 -fPIC -Wno-unused-parameter "${defs[@]}" "${tinc[@]}" "${inc[@]}" -isystem /usr/local/cuda/include \
    -c "$cpp" -o "$o" & pids+=($!)
done
for cu in "$src"/*.cu; do
  o="$obj/$(basename "$cu" .cu).cu.o"; objs+=("$o")
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC "${defs[@]}" "${tinc[@]}" "${inc[@]}" \
    -gencode "arch=compute_$arch,code=sm_$arch" -c "$cu" -o "$o"
done
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed compile stops the script
g++ -shared "${objs[@]}" -o "$out" -L"$work/torch/lib" -lc10 -lc10_cuda -ltorch_cpu -ltorch_cuda -ltorch \
  -L/usr/local/cuda/lib64 -lcudart -lcublas -Wl,--no-as-needed
echo "built $out ($(du -h "$out" | cut -f1))"
