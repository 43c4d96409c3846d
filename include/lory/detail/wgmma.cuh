// lory (private): Hopper warpgroup MMA (wgmma.mma_async, sm_90a) building blocks, used by the merge
// backward's wgmma variant (merge_backward_wgmma_kernel in lory/merge.cuh, docs/merge-backward-sm90.md).
// The GPU test tests/gpu/test_wgmma.cu (also run under the CPU emulator) checks them against a plain loop.
//
// What is covered: m64nNk16 with fp32 accumulators and f16/bf16 operands, N in {8, 16, 24, 32, 48,
// 64, 96, 128}; A from a shared-memory descriptor or from registers, B from a descriptor; both
// K-major (the K dimension contiguous) in the canonical layout without swizzling:
//   element (r, k) of an operand (r < 64 rows of A, or < N rows of B = columns of the product;
//   k < 16) lies at start + (r / 8) * SBO + (k / 8) * LBO + (r % 8) * 16 + (k % 8) * 2 bytes:
//   8 x 8 "core matrices" of 128 contiguous bytes, LBO the step between the two core matrices
//   along K, SBO the step between groups of 8 rows (PTX ISA, "Shared Memory Matrix Layout").
// Register fragments (PTX ISA figures for m64nNk16), with warp w = 0..3 of the warpgroup,
// g = lane / 4, t = lane % 4:
//   A: as mma.sync m16n8k16's A for rows 16w..16w+15: a0 (16w+g, 2t..2t+1), a1 (16w+g+8, 2t..),
//      a2 (16w+g, 2t+8..), a3 (16w+g+8, 2t+8..);
//   D: d[4j + 0, 1] = (16w+g, 8j+2t, 8j+2t+1), d[4j + 2, 3] = (16w+g+8, 8j+2t, 8j+2t+1), j < N/8.
// Order of use: operands written to shared memory -> wgmma_fence_operands() (generic -> async
// proxy) and a barrier -> wgmma_pin(accumulators) -> wgmma_fence() -> wgmma_ss/rs ... ->
// wgmma_commit() -> wgmma_wait<n>() -> wgmma_pin(accumulators): the accumulators may be read (or
// written) only after the wait that covers their group, and the pins keep the compiler from moving
// such a read or write across the wgmmas.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge_mma.cuh"
#include "lory/detail/wgmma_asm.cuh"
#include "lory/dtype.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// The N values wgmma_ss / wgmma_rs are instantiated for.
LORY_HOST_DEVICE constexpr bool wgmma_supports_n(int n) {
  return n == 8 || n == 16 || n == 24 || n == 32 || n == 48 || n == 64 || n == 96 || n == 128;
}

// Whether the current device runs sm_90a code: compute capability 9.0 exactly (H100, H200).
inline Status device_has_wgmma(bool& has) {
  has = false;
  DeviceInfo dev;
  LORY_RETURN_IF_ERROR(current_device_info(dev));
  has = dev.major == 9 && dev.minor == 0;
  return Status::kSuccess;
}

// A matrix descriptor (no swizzling, base offset 0) of a K-major operand at `smem` (16-byte
// aligned, in dynamic shared memory), with the byte steps between core matrices along K (lbo) and
// between groups of 8 rows (sbo), both multiples of 16 below 256 KiB.
LORY_HOST_DEVICE constexpr uint64_t wgmma_desc_bits(uint32_t smem_offset, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_offset >> 4) & 0x3fffu) | (uint64_t((lbo >> 4) & 0x3fffu) << 16) |
         (uint64_t((sbo >> 4) & 0x3fffu) << 32);
}

#if defined(__CUDACC__)  // the hardware intrinsics (the emulator's: lory/detail/emulation.hpp)

LORY_DEVICE LORY_FORCEINLINE uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  return wgmma_desc_bits(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), lbo, sbo);
}
// Makes this thread's earlier generic-proxy writes to shared memory (stores, completed cp.async)
// visible to the async proxy that wgmma reads through; then a barrier for the other threads' writes.
LORY_DEVICE LORY_FORCEINLINE void wgmma_fence_operands() {
#if LORY_WGMMA_AVAILABLE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Pins accumulator registers in place for the compiler (CUTLASS's warpgroup_fence_operand): no
// read or write of them moves across this point. Called before wgmma_fence() and after the
// wgmma_wait() that covers them, so that nothing touches them while a wgmma is in flight.
template <int N>
LORY_DEVICE LORY_FORCEINLINE void wgmma_pin(float (&r)[N]) {
#if LORY_WGMMA_AVAILABLE
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
LORY_DEVICE LORY_FORCEINLINE void wgmma_fence() {
#if LORY_WGMMA_AVAILABLE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
LORY_DEVICE LORY_FORCEINLINE void wgmma_commit() {
#if LORY_WGMMA_AVAILABLE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
LORY_DEVICE LORY_FORCEINLINE void wgmma_wait() {
#if LORY_WGMMA_AVAILABLE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
template <class T, int N>
LORY_DEVICE LORY_FORCEINLINE void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(is_mma_b16<T>::value && wgmma_supports_n(N), "wgmma_ss: f16/bf16, N in wgmma_supports_n");
#if LORY_WGMMA_AVAILABLE
  WgmmaAsm<T, N>::ss(d, desc_a, desc_b, accumulate ? 1 : 0);
#endif
}
template <class T, int N>
LORY_DEVICE LORY_FORCEINLINE void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(is_mma_b16<T>::value && wgmma_supports_n(N), "wgmma_rs: f16/bf16, N in wgmma_supports_n");
#if LORY_WGMMA_AVAILABLE
  WgmmaAsm<T, N>::rs(d, a, desc_b, accumulate ? 1 : 0);
#endif
}

#endif  // __CUDACC__

}  // namespace detail
LORY_NAMESPACE_END
