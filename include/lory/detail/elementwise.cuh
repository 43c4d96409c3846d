// lory (private): the launch shape shared by the elementwise kernels over [rows, cols] views
// (SwiGLU, round_to_storage): rows over grid.y, V-element chunks of a row over grid.x, 16-byte
// vectors where every view allows them.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lory/detail/cuda.cuh"
#include "lory/math.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

constexpr int kElementwiseThreads = 256;

// A view can use 16-byte accesses when its base is 16-byte aligned and every
// row starts 16-byte aligned as well.
template <class T>
inline bool view_is_vec16(const T* p, int64_t rows, int64_t stride) {
  return is_aligned16(p) && (rows == 1 || (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

inline dim3 elementwise_grid(int64_t rows, int64_t cols, int vec) {
  const int64_t chunks = ceil_div(cols, static_cast<int64_t>(vec));
  const int64_t bx = std::min<int64_t>(ceil_div<int64_t>(chunks, kElementwiseThreads), int64_t(1) << 20);
  const int64_t by = std::min<int64_t>(rows, 65535);
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
}

// Launches the 16-byte-vector kernel (V elements per thread) or the scalar one on the rows x cols grid.
template <class Args>
Status launch_elementwise(void (*vec_kernel)(Args), void (*scalar_kernel)(Args), const Args& p, bool vec, int V,
                          cudaStream_t stream) {
  launch_kernel(vec ? vec_kernel : scalar_kernel, elementwise_grid(p.rows, p.cols, vec ? V : 1),
                dim3(kElementwiseThreads), 0, stream, p);
  return check_launch();
}

}  // namespace detail
LORY_NAMESPACE_END
