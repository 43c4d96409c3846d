// lory (private), merge layer "pipeline piece": the backward's d_weights partial [S, E] -- its on-chip
// layout (MergePartialLayout), whether it fits on chip, the flush at a kernel's end, and the ordered
// reduction of per-block partials (merge_backward_reduce_kernel) -- shared by every backward kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// of the kernel's other shared-memory accesses.
struct MergePartialLayout {
  int E = 0, stride = 0, shift = 0, mask = 0;
  LORY_HOST_DEVICE static int swizzled_stride(int E) { return E > 8 ? (E + 7) / 8 * 8 : E; }
  LORY_HOST_DEVICE static MergePartialLayout make(int E, bool swizzle) {
    MergePartialLayout l;
    l.E = E;
    l.stride = swizzle ? swizzled_stride(E) : E;
    if (swizzle && l.stride % 32 == 0) l.mask = 3;
    else if (swizzle && l.stride % 16 == 0) l.shift = 1, l.mask = 1;
    return l;
  }
  LORY_HOST_DEVICE bool plain() const { return stride == E && mask == 0; }
  LORY_HOST_DEVICE int64_t size(int64_t S) const { return S * stride; }
  // The XOR of row s depends on s % 8 only, so a row index split as (multiple of 8) + r
  // takes xor_of(r): the kernel computes it once per thread.
  LORY_HOST_DEVICE int xor_of(int s_mod8) const { return ((s_mod8 >> shift) & mask) << 3; }
  LORY_HOST_DEVICE int64_t index(int64_t s, int e) const { return s * stride + (e ^ xor_of(int(s & 7))); }
};

// Whether a backward kernel keeps its d_weights partial on chip (the tensor-core kernel's has
// padded rows, MergePartialLayout).
inline bool merge_backward_partial_fits(int64_t S, int E, bool tensor_core) {
  return MergePartialLayout::make(E, tensor_core).size(S) <= kMergeBackwardSmemPartial;
}

#if LORY_HAS_DEVICE_CODE
// The end of either backward kernel: a d_weights partial [S, E] kept in shared
// memory goes to the fast mode's atomic target, or to the block's slice of the
// workspace for the ordered reduction. (A partial in the workspace is already there.)
template <class T>
LORY_DEVICE LORY_FORCEINLINE void flush_backward_partial(const MergeBackwardParams<T>& p, const float* part,
                                                         int64_t SE, const MergePartialLayout& layout) {
  if (!p.want_de || !p.partial_in_smem) return;
  __syncthreads();
  // An on-chip partial has at most kMergeBackwardSmemPartial elements: 32-bit index math.
  auto at = [&](int64_t i) {
    if (layout.plain()) return part[i];
    const int s = static_cast<int>(i) / p.E;
    return part[layout.index(s, static_cast<int>(i) - s * p.E)];
  };
  if (p.d_weights_atomic) {
    for (int64_t i = threadIdx.x; i < SE; i += kMergeThreads) atomicAdd(p.d_weights_atomic + i, at(i));
  } else {
    float* dst = p.partials + blockIdx.x * SE;
    for (int64_t i = threadIdx.x; i < SE; i += kMergeThreads) dst[i] = at(i);
  }
}


// d_weights[i] (+)= sum over blocks b of partials[b][i], always in the order b = 0, 1, ...
// (A template, so that a header-defined kernel is not a duplicate symbol across translation units.)
template <int kThreads>
LORY_KERNEL void __launch_bounds__(kThreads)
    merge_backward_reduce_kernel(const float* partials, int blocks, int64_t n, float* d_weights, bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t(kMergeThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kMergeThreads) {
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += partials[b * n + i];
    d_weights[i] = accumulate ? d_weights[i] + sum : sum;
  }
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
