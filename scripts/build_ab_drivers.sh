#!/usr/bin/env bash
# Builds bench/ab/merge_ab.cu once per revision of include/ so that one GPU session can time a
# change made without a GPU against the revision before it (scripts/gpu_check_prebuilt.sh runs
# every driver it finds in <carry dir>/ab/, in the order given here, and logs them to $OUT/ab.log).
#   usage: scripts/build_ab_drivers.sh [-o DIR] [-a ARCH] REV...   (REV "worktree": the uncommitted include/)
#   e.g.   scripts/build_ab_drivers.sh 6890d71 HEAD          -> .gpucarry/ab/01_6890d71, 02_<HEAD's hash>
# The driver source is always this checkout's bench/ab/merge_ab.cu (it uses only the public API).
set -euo pipefail
out=.gpucarry/ab
arch=90a
while getopts "o:a:" opt; do
  case $opt in
    o) out=$OPTARG ;;
    a) arch=$OPTARG ;;
    *) echo "usage: $0 [-o DIR] [-a ARCH] REV..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-o DIR] [-a ARCH] REV..." >&2; exit 2; }
root=$(git rev-parse --show-toplevel)
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
mkdir -p "$out"
rm -f "$out"/[0-9][0-9]_*
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
n=0
for rev in "$@"; do
  n=$((n + 1))
  src="$tmp/$n"
  mkdir -p "$src"
  if [ "$rev" = worktree ]; then
    cp -r "$root/include" "$src/"
    name=worktree
  else
    git -C "$root" archive "$rev" include | tar -x -C "$src"
    name=$(git -C "$root" rev-parse --short "$rev")
  fi
  bin=$(printf "%s/%02d_%s" "$out" "$n" "$name")
  echo "building $bin (include/ at $rev, sm_$arch)"
  "$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -gencode "arch=compute_$arch,code=sm_$arch" \
    -I"$src/include" "$root/bench/ab/merge_ab.cu" -o "$bin" -lcublas
done
ls -l "$out"
