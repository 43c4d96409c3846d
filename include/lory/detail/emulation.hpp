// lory (private): the one header that knows about the test suite's CPU emulator of the kernels
// (tests/emu/cuda_emu.hpp, which defines LORY_CUDA_EMULATION and is included first). Every macro
// whose meaning differs under the emulator is defined here, and under the emulator the device
// intrinsics the kernels use (ldmatrix, mma.sync, cp.async, wgmma) are the emulator's; the other
// headers only use these names. Included by lory/config.hpp.
//   LORY_HAS_DEVICE_CODE      kernels, device functions and launchers are compiled (nvcc, or the emulator)
//   LORY_KERNEL               a kernel's declaration specifiers
//   LORY_LAUNCH_KERNEL        kernel<<<grid, block, smem, stream>>>(args...), or the emulator's launch
//   LORY_DYNAMIC_SMEM(name)   the block's dynamic shared memory as `unsigned char name[]`, 16-byte aligned
//   LORY_BLOCK_SHARED(T, n)   a statically sized shared-memory variable of the block
//   LORY_CHECK_VEC16_ALIGNED  a 16-byte access's alignment (checked by the emulator only)
//   LORY_BLOCK_REDUCE(T, n)   cub::BlockReduce<T, n>, or the emulator's stand-in with its contract
//   LORY_MMA_AVAILABLE        mma.sync / ldmatrix / cp.async exist (sm_80+, or the emulator)
//   LORY_WGMMA_AVAILABLE      wgmma exists (sm_90a, or the emulator)
#pragma once

#if defined(LORY_CUDA_EMULATION)

#include <cstdint>
#include <type_traits>

#define LORY_HAS_DEVICE_CODE 1
#define LORY_KERNEL
#define LORY_LAUNCH_KERNEL(kernel, grid, block, smem, stream, args) ::lory_emu::launch(kernel, grid, block, smem, stream, args...)
#define LORY_DYNAMIC_SMEM(name) unsigned char* const name = ::lory_emu::dynamic_smem()
#define LORY_BLOCK_SHARED(type, name)                                   \
  LORY_NS_QUALIFIER::detail::shared_t<type>& name =                   \
      ::lory_emu::block_shared<LORY_NS_QUALIFIER::detail::shared_t<type>>([] { \
        static const char key = 0;                                      \
        return static_cast<const void*>(&key);                          \
      }())
#define LORY_CHECK_VEC16_ALIGNED(p) \
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::lory_emu::fail("a 16-byte vector access is not 16-byte aligned")
#define LORY_BLOCK_REDUCE(type, threads) ::lory_emu::BlockReduce<type, threads>
#define LORY_MMA_AVAILABLE 1
#define LORY_WGMMA_AVAILABLE 1

// The emulator's device intrinsics (the hardware's are in detail/merge_mma.cuh and detail/wgmma.cuh,
// compiled by nvcc only). Declared there, used here inside templates: defined by the time these are
// instantiated.
LORY_NAMESPACE_BEGIN
namespace detail {
template <class T>
struct is_mma_b16;
LORY_HOST_DEVICE constexpr bool wgmma_supports_n(int n);
LORY_HOST_DEVICE constexpr uint64_t wgmma_desc_bits(uint32_t smem_offset, uint32_t lbo, uint32_t sbo);

LORY_FORCEINLINE void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  const ::lory_emu::LdmatrixIn in{row_addr};
  ::lory_emu::Regs4 out;
  ::lory_emu::warp_collective(&in, &out, &::lory_emu::ldmatrix_x4_combine<false>);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}
LORY_FORCEINLINE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  const ::lory_emu::LdmatrixIn in{row_addr};
  ::lory_emu::Regs4 out;
  ::lory_emu::warp_collective(&in, &out, &::lory_emu::ldmatrix_x4_combine<true>);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}
template <class T>
LORY_FORCEINLINE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(is_mma_b16<T>::value, "mma_16816: 16-bit operands only");
  ::lory_emu::MmaIn in{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {d[0], d[1], d[2], d[3]}};
  ::lory_emu::MmaOut out;
  ::lory_emu::warp_collective(&in, &out, &::lory_emu::mma_16816_combine<std::is_same<T, __nv_bfloat16>::value>);
  for (int i = 0; i < 4; ++i) d[i] = out.d[i];
}
// cp.async: the emulator queues the copy and performs it at the thread's matching wait_group
// (a legal schedule: global memory does not change meanwhile), so a read before the wait and the
// barrier after it sees stale shared memory.
LORY_FORCEINLINE void cp_async_16(void* smem_dst, const void* src, int src_bytes) {
  ::lory_emu::cp_async(smem_dst, src, 16, src_bytes);
}
LORY_FORCEINLINE void cp_async_commit() { ::lory_emu::cp_async_commit(); }
template <int N>
LORY_FORCEINLINE void cp_async_wait() {
  ::lory_emu::cp_async_wait(N);
}

// Shared-memory addresses are offsets into the block's dynamic shared memory.
LORY_FORCEINLINE uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  return wgmma_desc_bits(::lory_emu::smem_offset(smem), lbo, sbo);
}
LORY_FORCEINLINE void wgmma_fence_operands() {}
template <int N>
LORY_FORCEINLINE void wgmma_pin(float (&)[N]) {}
LORY_FORCEINLINE void wgmma_fence() {}
LORY_FORCEINLINE void wgmma_commit() { ::lory_emu::wgmma_commit(); }
template <int N>
LORY_FORCEINLINE void wgmma_wait() {
  ::lory_emu::wgmma_wait(N);
}
// D (+)= A B. The emulator computes the product at issue and writes it to the accumulators at the
// wait that covers its group; until then they hold NaN, so an early read shows.
template <class T, int N>
LORY_FORCEINLINE void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(is_mma_b16<T>::value && wgmma_supports_n(N), "wgmma_ss: f16/bf16, N in wgmma_supports_n");
  ::lory_emu::wgmma_issue(d, N, std::is_same<T, __nv_bfloat16>::value, desc_a, nullptr, desc_b, accumulate);
}
template <class T, int N>
LORY_FORCEINLINE void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(is_mma_b16<T>::value && wgmma_supports_n(N), "wgmma_rs: f16/bf16, N in wgmma_supports_n");
  ::lory_emu::wgmma_issue(d, N, std::is_same<T, __nv_bfloat16>::value, 0, a, desc_b, accumulate);
}

}  // namespace detail
LORY_NAMESPACE_END

#else  // !LORY_CUDA_EMULATION

#if defined(__CUDACC__)
#define LORY_HAS_DEVICE_CODE 1
#else
#define LORY_HAS_DEVICE_CODE 0
#endif
// Kernels get hidden visibility so that a shared object embedding lory (a PyTorch extension, say)
// does not export or collide on kernel symbols.
#if defined(__CUDACC__)
#if defined(_WIN32)
#define LORY_KERNEL __global__
#else
#define LORY_KERNEL __global__ __attribute__((visibility("hidden")))
#endif
#endif
#define LORY_LAUNCH_KERNEL(kernel, grid, block, smem, stream, args) kernel<<<grid, block, smem, stream>>>(args...)
#define LORY_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define LORY_BLOCK_SHARED(type, name) __shared__ LORY_NS_QUALIFIER::detail::shared_t<type> name
#define LORY_CHECK_VEC16_ALIGNED(p) ((void)0)
#define LORY_BLOCK_REDUCE(type, threads) LORY_CUB::BlockReduce<type, threads>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LORY_MMA_AVAILABLE 1
#else
#define LORY_MMA_AVAILABLE 0
#endif
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LORY_WGMMA_AVAILABLE 1
#else
#define LORY_WGMMA_AVAILABLE 0
#endif

#endif  // LORY_CUDA_EMULATION
