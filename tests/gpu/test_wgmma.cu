// The Hopper warpgroup MMA building blocks (lory/detail/wgmma.cuh) against a plain loop in double:
// D[64 x N] = (C +) A[64 x 32] B^T with K = 32 as two chained k16 MMAs in one commit group, A from
// a shared-memory descriptor or from registers, B from a descriptor, three placements of the core
// matrices (K-adjacent, row-adjacent, padded), every N the wrappers have, bf16 and fp16.
//
// This is the test that decides whether docs/merge-backward-sm90.md's reading of the PTX ISA
// (descriptor fields, the canonical no-swizzle layout, the A and D fragment layouts) is right:
// under the CPU emulator it checks the emulator against the same reading; on an sm_90 GPU it
// checks both against the hardware. It needs sm_90a: on another device it exits with 77 (CTest:
// skipped), and a run of the whole suite leaves it out ("[sm90]"; tests/common/gpu_main.cu).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/wgmma.cuh"

namespace {

using lory_test::DeviceBuffer;
namespace ld = lory::detail;

constexpr int kM = 64, kK = 32;
constexpr size_t kSmem = 32 * 1024;  // A at 0, B at 16 KiB
constexpr size_t kBOffset = 16 * 1024;

// Byte offset of element (r, k) of a K-major operand: core matrices of 8 rows x 8 elements.
LORY_HOST_DEVICE inline uint32_t core_offset(int r, int k, uint32_t lbo, uint32_t sbo) {
  return uint32_t(r / 8) * sbo + uint32_t(k / 8) * lbo + uint32_t(r % 8) * 16 + uint32_t(k % 8) * 2;
}

struct Placement {
  const char* name;
  uint32_t lbo_a, sbo_a, lbo_b, sbo_b;
};

}  // namespace

namespace lory_test_wgmma {
// a: [64][32], b: [N][32] (row n holds column n of the product's B), c and d: [64][N], row-major.
// accumulate: D = C + A B^T, else D = A B^T (the accumulators start as NaN then, which the first
// MMA must ignore). Built for every architecture (the wgmma calls are empty below sm_90a); launched
// on sm_90 devices and under the emulator only.
template <class T, int N, bool kARegs>
LORY_KERNEL void wgmma_probe_kernel(const T* a, const T* b, const float* c, float* d, Placement pl, bool accumulate) {
  LORY_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x;
  for (int i = tid; i < kM * kK; i += 128)
    *reinterpret_cast<T*>(smem + core_offset(i / kK, i % kK, pl.lbo_a, pl.sbo_a)) = a[i];
  for (int i = tid; i < N * kK; i += 128)
    *reinterpret_cast<T*>(smem + kBOffset + core_offset(i / kK, i % kK, pl.lbo_b, pl.sbo_b)) = b[i];
  ld::wgmma_fence_operands();
  __syncthreads();

  const int w = tid / 32, g = (tid % 32) / 4, t = tid % 4;
  float acc[N / 2];
  for (int j = 0; j < N / 8; ++j)
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * w + g + 8 * (i / 2), col = 8 * j + 2 * t + i % 2;
      acc[4 * j + i] = accumulate ? c[row * N + col] : std::numeric_limits<float>::quiet_NaN();
    }
  ld::wgmma_pin(acc);
  ld::wgmma_fence();
#pragma unroll
  for (int kc = 0; kc < kK / 16; ++kc) {
    // The chunk's first core-matrix column along K is 2 kc.
    const uint64_t db = ld::wgmma_desc(smem + kBOffset + 2 * kc * pl.lbo_b, pl.lbo_b, pl.sbo_b);
    if constexpr (kARegs) {
      uint32_t ar[4];
      for (int h = 0; h < 2; ++h)
        for (int v = 0; v < 2; ++v) {
          const T* p = a + (16 * w + g + 8 * v) * kK + 16 * kc + 2 * t + 8 * h;
          uint16_t lo, hi;
          memcpy(&lo, p, 2);
          memcpy(&hi, p + 1, 2);
          ar[2 * h + v] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
      ld::wgmma_rs<T, N>(acc, ar, db, accumulate || kc > 0);
    } else {
      const uint64_t da = ld::wgmma_desc(smem + 2 * kc * pl.lbo_a, pl.lbo_a, pl.sbo_a);
      ld::wgmma_ss<T, N>(acc, da, db, accumulate || kc > 0);
    }
  }
  ld::wgmma_commit();
  ld::wgmma_wait<0>();
  ld::wgmma_pin(acc);
  for (int j = 0; j < N / 8; ++j)
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * w + g + 8 * (i / 2), col = 8 * j + 2 * t + i % 2;
      d[row * N + col] = acc[4 * j + i];
    }
}
}  // namespace lory_test_wgmma

namespace {
using lory_test_wgmma::wgmma_probe_kernel;

template <class T, int N, bool kARegs>
void probe(const Placement& pl, bool accumulate) {
  const std::string tag = std::string("wgmma/") + (std::is_same<T, __half>::value ? "f16" : "bf16") + "/n" +
                          std::to_string(N) + (kARegs ? "/rs/" : "/ss/") + pl.name + (accumulate ? "/acc" : "");
  INFO(tag);
  auto rng = lory_test::make_rng(tag);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const size_t n_b = static_cast<size_t>(N) * kK, n_d = static_cast<size_t>(kM) * N;
  std::vector<T> a(kM * kK), b(n_b);
  std::vector<float> c(n_d), d(n_d, std::numeric_limits<float>::quiet_NaN());
  for (auto& x : a) x = lory::from_float<T>(u(rng));
  for (auto& x : b) x = lory::from_float<T>(u(rng));
  for (auto& x : c) x = u(rng);
  DeviceBuffer<T> da(a), db(b);
  DeviceBuffer<float> dc(c), dd(d);
  auto kernel = wgmma_probe_kernel<T, N, kARegs>;
  LORY_TEST_CUDA(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  ld::launch_kernel(kernel, dim3(1), dim3(128), kSmem, nullptr, static_cast<const T*>(da.get()),
                    static_cast<const T*>(db.get()), static_cast<const float*>(dc.get()), dd.get(), pl, accumulate);
  LORY_TEST_SYNC();
  const std::vector<float> got = dd.download();
  std::vector<double> want(n_d);
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < N; ++n) {
      double s = accumulate ? double(c[size_t(m) * N + n]) : 0.0;
      for (int k = 0; k < kK; ++k) s += double(lory::to_float(a[m * kK + k])) * double(lory::to_float(b[size_t(n) * kK + k]));
      want[size_t(m) * N + n] = s;
    }
  CHECK(lory_test::count_nan(got) == 0);
  // Products of 16-bit values are exact in fp32: only the fp32 sums differ from the double loop.
  CHECK(lory_test::rel_error(got, want) <= 1e-5);
  // Also element by element, so that a fragment-layout mix-up of two similar values cannot hide.
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += std::fabs(got[i] - want[i]) > 1e-4 * (1.0 + std::fabs(want[i]));
  CHECK(bad == 0);
}

const Placement kPlacements[] = {
    {"k-adjacent", 128, 512, 128, 512},  // the two K core matrices of a row group side by side
    {"rows-adjacent", 1024, 128, 2048, 128},  // row groups side by side, K columns far apart
    {"padded", 144, 608, 144, 608},      // neither: 16-byte gaps between core matrices
};

template <class T, int N>
void probe_all() {
  for (const Placement& pl : kPlacements)
    for (bool acc : {false, true}) {
      probe<T, N, false>(pl, acc);
      probe<T, N, true>(pl, acc);
    }
}

}  // namespace

TEST_CASE("wgmma m64nNk16 (bf16) matches a plain loop for every N and operand placement", "[gpu][sm90][wgmma]") {
  lory_test::require_wgmma();
  probe_all<__nv_bfloat16, 8>();
  probe_all<__nv_bfloat16, 16>();
  probe_all<__nv_bfloat16, 24>();
  probe_all<__nv_bfloat16, 32>();
  probe_all<__nv_bfloat16, 48>();
  probe_all<__nv_bfloat16, 64>();
  probe_all<__nv_bfloat16, 96>();
  probe_all<__nv_bfloat16, 128>();
}

TEST_CASE("wgmma m64nNk16 (fp16) matches a plain loop", "[gpu][sm90][wgmma]") {
  lory_test::require_wgmma();
  probe_all<__half, 16>();
  probe_all<__half, 64>();
}
