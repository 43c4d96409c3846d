// lory (private): warp-level tensor-core building blocks for the expert merge.
//
// Only what merge.cuh needs: ldmatrix loads of 8x8 b16 tiles from shared
// memory, the m16n8k16 mma with fp32 accumulation for bf16 and fp16 operands,
// cp.async copies into shared memory, and the hi + lo split that keeps ~16 bits of a routing weight in two
// 16-bit operands. Fragment layouts are the PTX ISA's for m16n8k16:
//   A (16x16, row-major)  a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..)
//   B (16x8, "col")       b0:(k=2t..2t+1, n=g)  b1:(k=2t+8..2t+9, n=g)
//   C (16x8, fp32)        c0,c1:(g, 2t..2t+1)   c2,c3:(g+8, 2t..2t+1)
// with g = lane / 4 and t = lane % 4.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/dtype.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

template <class T> struct is_mma_b16 { static constexpr bool value = false; };
template <> struct is_mma_b16<__half> { static constexpr bool value = true; };
template <> struct is_mma_b16<__nv_bfloat16> { static constexpr bool value = true; };


#if defined(__CUDACC__)  // the hardware intrinsics (the emulator's: lory/detail/emulation.hpp)

LORY_DEVICE LORY_FORCEINLINE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8q..8q+7 give the 16-byte row addresses of matrix q.
LORY_DEVICE LORY_FORCEINLINE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
#if LORY_MMA_AVAILABLE
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
#endif
}
// The same, transposed: lane l receives (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4).
LORY_DEVICE LORY_FORCEINLINE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
#if LORY_MMA_AVAILABLE
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
#endif
}

// d += a * b on tensor cores, fp32 accumulation.
template <class T>
LORY_DEVICE LORY_FORCEINLINE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
LORY_DEVICE LORY_FORCEINLINE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                          const uint32_t (&b)[2]) {
#if LORY_MMA_AVAILABLE
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
LORY_DEVICE LORY_FORCEINLINE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
#if LORY_MMA_AVAILABLE
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// cp.async (sm_80+): copies global -> shared without a register round trip; src_bytes of the
// 16 are read and the rest of the destination is zero-filled (0: nothing is read). Cached in L2
// only (streamed data). The copies a thread issued are complete once it
// has passed the wait_group that covers their commit group; others see them after a barrier.
LORY_DEVICE LORY_FORCEINLINE void cp_async_16(void* smem_dst, const void* src, int src_bytes) {
#if LORY_MMA_AVAILABLE
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}
LORY_DEVICE LORY_FORCEINLINE void cp_async_commit() {
#if LORY_MMA_AVAILABLE
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's most recent commit groups are pending.
template <int N>
LORY_DEVICE LORY_FORCEINLINE void cp_async_wait() {
#if LORY_MMA_AVAILABLE
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

#endif  // __CUDACC__

#if LORY_HAS_DEVICE_CODE

// w ~= hi + lo with both in T: a 16-bit operand alone keeps 8 (bf16) or 11
// (fp16) bits of a routing weight; the residual recovers about as many again.
template <class T>
LORY_DEVICE LORY_FORCEINLINE void split_hi_lo(float w, T& hi, T& lo) {
  hi = from_float<T>(w);
  lo = from_float<T>(w - to_float(hi));
}

// Two floats rounded to T and packed into one 32-bit register (first in the low half).
template <class T>
LORY_DEVICE LORY_FORCEINLINE uint32_t pack2(float x, float y) {
  const T lo = from_float<T>(x), hi = from_float<T>(y);
  const uint32_t l = *reinterpret_cast<const uint16_t*>(&lo);
  const uint32_t h = *reinterpret_cast<const uint16_t*>(&hi);
  return l | (h << 16);
}

#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
