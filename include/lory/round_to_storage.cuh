// lory: dst = src rounded once to the storage dtype on the GPU (arguments and validation:
// lory/round_to_storage.hpp; CPU twin: lory/reference/round_to_storage.hpp). The layer plan rounds
// its fp32 accumulators of y and dx with it when the FFN runs in slices of f.
//
// Elementwise and memory-bound, laid out as the SwiGLU kernels (detail/elementwise.cuh): 16-byte stores of
// T (and 16-byte loads of the floats) when every pointer and row stride allows, scalar otherwise and
// for a row's tail; contiguous operands run as one flat row. Round to nearest even, as the twin.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/cuda.cuh"
#include "lory/detail/elementwise.cuh"
#include "lory/round_to_storage.hpp"

LORY_NAMESPACE_BEGIN

// Rows over grid.y, V-element chunks of a row over grid.x (both grid-strided, 64-bit offsets).
template <class T, int V>
LORY_KERNEL void __launch_bounds__(detail::kElementwiseThreads) round_to_storage_kernel(RoundToStorageArgs<T> p) {
  const int64_t chunks = ceil_div(p.cols, static_cast<int64_t>(V));
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const float* src = p.src + r * p.src_stride;
    T* dst = p.dst + r * p.dst_stride;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < chunks;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t c = j * V;
      if (V > 1 && c + V <= p.cols) {
        static_assert(V == 1 || V % 4 == 0, "a vector of T is a whole number of 4-float loads");
        detail::Vec16<T> out;
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const detail::Vec16<float> f = detail::load_vec16_stream(src + c + 4 * q);
#pragma unroll
          for (int i = 0; i < 4; ++i) out.v[4 * q + i] = from_float<T>(f.v[i]);
        }
        detail::store_vec16(dst + c, out);
      } else {
        for (int i = 0; i < V && c + i < p.cols; ++i) dst[c + i] = from_float<T>(src[c + i]);
      }
    }
  }
}

template <class T>
Status round_to_storage_can_implement(const RoundToStorageArgs<T>& args) {
  static_assert(detail::is_gpu_storage<T>::value, "lory GPU kernels take float, __half or __nv_bfloat16");
  return validate(args);
}

// dst [rows, cols] = src [rows, cols] rounded once to T. No workspace.
template <class T>
Status round_to_storage(const RoundToStorageArgs<T>& args, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(round_to_storage_can_implement(args));
  RoundToStorageArgs<T> p = args;
  if (p.rows > 1 && p.src_stride == p.cols && p.dst_stride == p.cols) {
    p.cols *= p.rows;
    p.rows = 1;
  }
  constexpr int V = detail::Vec16<T>::kSize;
  const bool vec = detail::view_is_vec16(p.src, p.rows, p.src_stride) && detail::view_is_vec16(p.dst, p.rows, p.dst_stride);
  return detail::launch_elementwise(round_to_storage_kernel<T, V>, round_to_storage_kernel<T, 1>, p, vec, V, stream);
}

LORY_NAMESPACE_END
