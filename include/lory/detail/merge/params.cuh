// lory (private), merge layer "parameters": what the kernels take (MergeForwardParams,
// MergeBackwardParams), and the public argument checks (merge_*_can_implement). The one conversion
// from the user's arguments to these is make_merge_*_params in dispatch.cuh.
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge/view.cuh"
#include "lory/detail/validate.hpp"
#include "lory/merge.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// Forward: one kernel launch's parameters (both forward kernels).
template <class T>
struct MergeForwardParams {
  int64_t S;
  int E;
  int64_t P;
  const T* W;
  int64_t w_stride;
  const float* weights;
  T* out;
  int64_t out_stride;
  int col_vecs;            // 16-byte column vectors per tile (SIMT: cg; tensor core: fixed)
  int64_t tiles;           // ceil(P / tile width)
  int64_t segs_per_slice;  // S range of one blockIdx.y
  unsigned long long* tile_counters = nullptr;  // one per slice, zeroed (tensor cores, dynamic tiles)
  MergeRowView w_view, out_view;  // P = rows * cols of each expert / segment (detail/merge/view.cuh)
};

// Backward: one kernel launch's parameters (every backward kernel).
template <class T>
struct MergeBackwardParams {
  int64_t S;
  int E;
  int64_t P;
  const T* G;
  int64_t g_stride;
  const T* W;  // null when d_weights is skipped
  int64_t w_stride;
  const float* weights;
  T* dW;  // null: skip dW
  int64_t dw_stride;
  bool accumulate_dW;
  bool want_de;           // compute the d_weights partials
  bool partial_in_smem;   // the block's [S, E] partial lives in shared memory
  float* partials;        // workspace [gridDim.x][S][E], or null (fast mode with a shared-memory partial)
  float* d_weights_atomic;  // fast mode: atomicAdd target, else null
  int col_vecs;
  int64_t tiles;
  // Tensor cores, with dW: the routing weights split into hi and lo operands and transposed,
  // [2][EP][a_stride] (hi, then lo; EP = E rounded up to 16, a_stride = S rounded up to 64, a
  // multiple of either kernel's chunk; zero past E and past S), made by
  // merge_backward_split_weights_kernel.
  const T* a_split;
  int64_t a_stride;
  MergeRowView g_view, w_view, dw_view;  // P = rows * cols of each segment / expert (detail/merge/view.cuh)
};


}  // namespace detail

template <class T>
Status merge_forward_can_implement(const MergeForwardArgs<T, float>& a) {
  static_assert(detail::is_gpu_storage<T>::value, "merge_forward: T must be float, __half or __nv_bfloat16");
  LORY_RETURN_IF_ERROR(validate(a));
  if (!detail::is_aligned(a.W, alignof(T)) || !detail::is_aligned(a.Wbar, alignof(T)) ||
      !detail::is_aligned(a.weights, alignof(float)))
    return Status::kErrorMisalignedPointer;
  return Status::kSuccess;
}

template <class T>
Status merge_backward_can_implement(const MergeBackwardArgs<T, float>& a) {
  static_assert(detail::is_gpu_storage<T>::value, "merge_backward: T must be float, __half or __nv_bfloat16");
  LORY_RETURN_IF_ERROR(validate(a));
  if (!detail::is_aligned(a.G, alignof(T)) || !detail::is_aligned(a.weights, alignof(float)) ||
      (a.dW && !detail::is_aligned(a.dW, alignof(T))) || (a.d_weights && !detail::is_aligned(a.W, alignof(T))) ||
      (a.d_weights && !detail::is_aligned(a.d_weights, alignof(float))))
    return Status::kErrorMisalignedPointer;
  return Status::kSuccess;
}

LORY_NAMESPACE_END
