#!/usr/bin/env bash
# Stage the test and benchmark frameworks for the one-shot GPU check.
#
# The lent GPU machine has the CUDA toolkit, CMake and ninja but no network and
# neither Catch2 nor Google Benchmark. This script, run on a networked CPU
# machine (Debian 12), unpacks Debian's packages into .deps/root (git-ignored);
# the GPU run carries .deps along and points CMake at it:
#   -DCMAKE_PREFIX_PATH=$PWD/.deps/root/usr
#
# Idempotent: an existing, complete stage is verified and reused; --force
# downloads and unpacks again.
#
# Usage: bash scripts/stage_gpu_deps.sh [--force]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEPS=.deps
ROOT=$DEPS/root
PKGS=(catch2 libbenchmark-dev libbenchmark1debian)
BENCH_CMAKE=$ROOT/usr/lib/x86_64-linux-gnu/cmake/benchmark
CATCH_CMAKE=$ROOT/usr/lib/cmake/Catch2
BENCH_SO=$ROOT/usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian

die() { echo "stage_gpu_deps: $*" >&2; exit 1; }

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
  *) die "unknown argument '$1' (use --force or nothing)" ;;
esac

staged() { [[ -f $CATCH_CMAKE/Catch2Config.cmake && -f $BENCH_CMAKE/benchmarkConfig.cmake && -e $BENCH_SO ]]; }

if [[ $force == 1 ]]; then rm -rf "$DEPS"; fi

if staged; then
  echo "stage_gpu_deps: $ROOT already staged; verifying (use --force to stage again)"
else
  command -v apt-get >/dev/null || die "apt-get not found: run this on the Debian CPU machine"
  command -v dpkg >/dev/null || die "dpkg not found"
  rm -rf "$ROOT" "$DEPS/debs"
  mkdir -p "$DEPS/debs" "$ROOT"
  # apt-get download writes into the current directory. Its warning about the
  # _apt sandbox user (when run as root) is harmless.
  if ! (cd "$DEPS/debs" && apt-get download "${PKGS[@]}"); then
    echo "stage_gpu_deps: download failed; running apt-get update and retrying"
    apt-get update -qq || die "apt-get update failed"
    (cd "$DEPS/debs" && apt-get download "${PKGS[@]}") || die "apt-get download ${PKGS[*]} failed"
  fi
  for deb in "$DEPS"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
  # The .deb files are not needed on the GPU machine; keep only the listing.
  (cd "$DEPS/debs" && ls -1 ./*.deb) >"$DEPS/packages.txt"
  rm -rf "$DEPS/debs"
  staged || die "unpacked packages do not contain the expected CMake configs / libbenchmark"
fi

# The CMake package files must be relocatable: every import location must be
# computed from the file's own directory. The only absolute /usr paths Debian
# ships are inside the harmless "/usr move" guard (it only fires when the file
# really sits under /usr); anything else would make CMake link the host's copy.
bad=$(awk '
  /^[ \t]*#/ { next }                                  # comments
  /_realOrig/ && /REALPATH/ { next }                    # the guard: where /usr really is
  /if\(_realCurr STREQUAL _realOrig\)/ { guard = 1; next }
  guard && /endif\(\)/ { guard = 0; next }
  guard { next }                                        # taken only for a real /usr install
  /"\/usr/ { print FILENAME ":" FNR ": " $0 }
' "$CATCH_CMAKE"/*.cmake "$BENCH_CMAKE"/*.cmake)
if [[ -n $bad ]]; then
  echo "$bad" >&2
  die "staged CMake configs hard-code /usr paths outside the /usr-move guard; patch them"
fi

# pkg-config files do hard-code /usr (prefix, libdir, includedir): make them relative to their own
# location so that they also point into the stage (relocatable by design).
# shellcheck disable=SC2016  # ${pcfiledir} / ${prefix} are pkg-config's, not ours
for pc in "$ROOT"/usr/share/pkgconfig/*.pc "$ROOT"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do
  [[ -f $pc ]] || continue
  case $pc in
    */usr/share/pkgconfig/*) rel='${pcfiledir}/../..' ;;
    *) rel='${pcfiledir}/../../..' ;;
  esac
  sed -i -e "s|^prefix=/usr\$|prefix=$rel|" -e 's|^\([a-z_]*dir\)=/usr/|\1=${prefix}/|' "$pc"
done

# The GPU machine links against the staged shared libbenchmark (Debian ships
# no static libbenchmark.a). Record the newest glibc / libstdc++ symbol
# versions it needs; scripts/gpu_check.sh compares them with the GPU machine.
need_glibc=unknown need_glibcxx=unknown
if command -v objdump >/dev/null; then
  syms=$(objdump -T "$BENCH_SO")
  need_glibc=$(grep -o 'GLIBC_[0-9.]*' <<<"$syms" | sed 's/GLIBC_//' | sort -uV | tail -1)
  need_glibcxx=$(grep -o 'GLIBCXX_[0-9.]*' <<<"$syms" | sed 's/GLIBCXX_//' | sort -uV | tail -1)
fi
version_of() {  # PACKAGE_VERSION from a CMake ...ConfigVersion.cmake
  sed -n 's/^ *set(PACKAGE_VERSION "\([^"]*\)").*/\1/p' "$1" | head -1
}
catch_ver=$(version_of "$CATCH_CMAKE/Catch2ConfigVersion.cmake")
bench_ver=$(version_of "$BENCH_CMAKE/benchmarkConfigVersion.cmake")

cat >"$DEPS/STAGED.txt" <<EOF
# Written by scripts/stage_gpu_deps.sh; read by scripts/gpu_check.sh.
catch2_version=$catch_ver
benchmark_version=$bench_ver
libbenchmark_needs_glibc=$need_glibc
libbenchmark_needs_glibcxx=$need_glibcxx
staged_on=$(uname -n 2>/dev/null || echo unknown) $(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

echo "stage_gpu_deps: staged into $ROOT"
echo "  Catch2            $catch_ver   ($CATCH_CMAKE)"
echo "  Google Benchmark  $bench_ver   ($BENCH_CMAKE, shared library)"
echo "  libbenchmark needs glibc >= $need_glibc, libstdc++ GLIBCXX_$need_glibcxx (g++ >= 12's runtime)"
echo "  size: $(du -sh "$DEPS" | cut -f1) in $(find "$DEPS" -type f | wc -l) files"
echo "  CMake: -DCMAKE_PREFIX_PATH=\$PWD/$ROOT/usr   (device run: carry '$DEPS')"
