// lory: SwiGLU activation on the GPU, m = silu(a) * u, and its backward pass.
// Arguments, semantics and validation: lory/swiglu.hpp; CPU twin:
// lory/reference/swiglu.hpp.
//
// Purely elementwise and memory-bound: each element is read and written once,
// so the kernels move 16-byte vectors whenever every pointer and row stride
// allows it (scalar otherwise, and for the tail of a row), and contiguous
// operands are processed as one flat row so that short rows waste no lanes.
// Math in fp32 through the host-and-device formulas of lory/math.hpp.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lory/detail/cuda.cuh"
#include "lory/detail/elementwise.cuh"
#include "lory/math.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// Element c of a row: V == 1 is the scalar path; otherwise a full vector of V
// elements starting at c when it fits, else the scalar tail.
template <class T, int V>
LORY_DEVICE LORY_FORCEINLINE void swiglu_forward_chunk(const T* a, const T* u, T* m, int64_t c,
                                                       int64_t cols) {
  if (V > 1 && c + V <= cols) {
    const Vec16<T> va = load_vec16_stream(a + c), vu = load_vec16_stream(u + c);
    Vec16<T> vm;
#pragma unroll
    for (int i = 0; i < Vec16<T>::kSize; ++i)
      vm.v[i] = from_float<T>(swiglu_forward(to_float(va.v[i]), to_float(vu.v[i])));
    store_vec16(m + c, vm);
  } else {
    for (int i = 0; i < V && c + i < cols; ++i)
      m[c + i] = from_float<T>(swiglu_forward(to_float(a[c + i]), to_float(u[c + i])));
  }
}

template <class T, int V>
LORY_DEVICE LORY_FORCEINLINE void swiglu_backward_chunk(const T* a, const T* u, const T* dm, T* da,
                                                        T* du, int64_t c, int64_t cols) {
  if (V > 1 && c + V <= cols) {
    const Vec16<T> va = load_vec16_stream(a + c), vu = load_vec16_stream(u + c),
                   vdm = load_vec16_stream(dm + c);
    Vec16<T> vda, vdu;
#pragma unroll
    for (int i = 0; i < Vec16<T>::kSize; ++i) {
      float ga, gu;
      swiglu_backward(to_float(va.v[i]), to_float(vu.v[i]), to_float(vdm.v[i]), ga, gu);
      vda.v[i] = from_float<T>(ga);
      vdu.v[i] = from_float<T>(gu);
    }
    store_vec16(da + c, vda);
    store_vec16(du + c, vdu);
  } else {
    for (int i = 0; i < V && c + i < cols; ++i) {
      float ga, gu;
      swiglu_backward(to_float(a[c + i]), to_float(u[c + i]), to_float(dm[c + i]), ga, gu);
      da[c + i] = from_float<T>(ga);
      du[c + i] = from_float<T>(gu);
    }
  }
}

}  // namespace detail

// Rows over grid.y, V-element chunks of a row over grid.x (both grid-strided,
// 64-bit offsets).
template <class T, int V>
LORY_KERNEL void __launch_bounds__(detail::kElementwiseThreads)
    swiglu_forward_kernel(SwigluForwardArgs<T> p) {
  const int64_t chunks = ceil_div(p.cols, static_cast<int64_t>(V));
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* a = p.a + r * p.a_stride;
    const T* u = p.u + r * p.u_stride;
    T* m = p.m + r * p.m_stride;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < chunks;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      detail::swiglu_forward_chunk<T, V>(a, u, m, j * V, p.cols);
  }
}

template <class T, int V>
LORY_KERNEL void __launch_bounds__(detail::kElementwiseThreads)
    swiglu_backward_kernel(SwigluBackwardArgs<T> p) {
  const int64_t chunks = ceil_div(p.cols, static_cast<int64_t>(V));
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* a = p.a + r * p.a_stride;
    const T* u = p.u + r * p.u_stride;
    const T* dm = p.dm + r * p.dm_stride;
    T* da = p.da + r * p.da_stride;
    T* du = p.du + r * p.du_stride;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < chunks;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      detail::swiglu_backward_chunk<T, V>(a, u, dm, da, du, j * V, p.cols);
  }
}

template <class T>
Status swiglu_forward_can_implement(const SwigluForwardArgs<T>& args) {
  static_assert(detail::is_gpu_storage<T>::value, "lory GPU kernels take float, __half or __nv_bfloat16");
  return validate(args);
}

template <class T>
Status swiglu_backward_can_implement(const SwigluBackwardArgs<T>& args) {
  static_assert(detail::is_gpu_storage<T>::value, "lory GPU kernels take float, __half or __nv_bfloat16");
  return validate(args);
}

// m = silu(a) * u over a [rows, cols] view. No workspace.
template <class T>
Status swiglu_forward(const SwigluForwardArgs<T>& args, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(swiglu_forward_can_implement(args));
  SwigluForwardArgs<T> p = args;
  // Contiguous operands are one long row: no lanes idle at short row ends.
  if (p.rows > 1 && p.a_stride == p.cols && p.u_stride == p.cols && p.m_stride == p.cols) {
    p.cols *= p.rows;
    p.rows = 1;
  }
  constexpr int V = detail::Vec16<T>::kSize;
  const bool vec = detail::view_is_vec16(p.a, p.rows, p.a_stride) &&
                   detail::view_is_vec16(p.u, p.rows, p.u_stride) &&
                   detail::view_is_vec16(p.m, p.rows, p.m_stride);
  return detail::launch_elementwise(swiglu_forward_kernel<T, V>, swiglu_forward_kernel<T, 1>, p, vec, V, stream);
}

// da = dm * u * silu'(a), du = dm * silu(a) over [rows, cols] views. No workspace.
template <class T>
Status swiglu_backward(const SwigluBackwardArgs<T>& args, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(swiglu_backward_can_implement(args));
  SwigluBackwardArgs<T> p = args;
  if (p.rows > 1 && p.a_stride == p.cols && p.u_stride == p.cols && p.dm_stride == p.cols &&
      p.da_stride == p.cols && p.du_stride == p.cols) {
    p.cols *= p.rows;
    p.rows = 1;
  }
  constexpr int V = detail::Vec16<T>::kSize;
  const bool vec = detail::view_is_vec16(p.a, p.rows, p.a_stride) &&
                   detail::view_is_vec16(p.u, p.rows, p.u_stride) &&
                   detail::view_is_vec16(p.dm, p.rows, p.dm_stride) &&
                   detail::view_is_vec16(p.da, p.rows, p.da_stride) &&
                   detail::view_is_vec16(p.du, p.rows, p.du_stride);
  return detail::launch_elementwise(swiglu_backward_kernel<T, V>, swiglu_backward_kernel<T, 1>, p, vec, V, stream);
}

LORY_NAMESPACE_END
