// lory (private), merge layer "device helpers": 16-byte vector loads / stores of a row with zero-filled or
// masked tails, cp.async of a row vector, and the host test for whether a pair of views takes vector I/O.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge_mma.cuh"
#include "lory/detail/validate.hpp"
#include "lory/dtype.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

#if LORY_HAS_DEVICE_CODE

template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> zero_vec16() {
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) r.v[i] = from_float<T>(0.f);
  return r;
}

// Elements [col, col + kSize) of a row; those at or past P read as zero.
template <class T, bool kVec>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_row_vec(const T* row, int64_t col, int64_t P) {
  constexpr int V = Vec16<T>::kSize;
  if (kVec && col + V <= P) return load_vec16(row + col);
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = (col + i < P) ? row[col + i] : from_float<T>(0.f);
  return r;
}

// The same into shared memory by cp.async (sm_80+; row 16-byte aligned): elements at or past P,
// and the whole vector when !row_valid (row is then only a valid address), are zero-filled.
template <class T>
LORY_DEVICE LORY_FORCEINLINE void cp_async_row_vec(T* smem_dst, const T* row, bool row_valid, int64_t col, int64_t P) {
  constexpr int V = Vec16<T>::kSize;
  const int bytes = (row_valid && col < P) ? int(sizeof(T)) * (P - col < V ? int(P - col) : V) : 0;
  cp_async_16(smem_dst, bytes ? row + col : row, bytes);
}

// Writes elements [col, min(col + kSize, P)) of a row; kStream: the vector store evict-first.
template <class T, bool kVec, bool kStream = false>
LORY_DEVICE LORY_FORCEINLINE void store_row_vec(T* row, int64_t col, int64_t P, const Vec16<T>& x) {
  constexpr int V = Vec16<T>::kSize;
  if (kVec && col + V <= P) {
    if constexpr (kStream) store_vec16_stream(row + col, x);
    else store_vec16(row + col, x);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (col + i < P) row[col + i] = x.v[i];
}

template <class T>
LORY_DEVICE LORY_FORCEINLINE void vec_to_float(const Vec16<T>& x, float (&f)[Vec16<T>::kSize]) {
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) f[i] = to_float(x.v[i]);
}
template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> float_to_vec(const float (&f)[Vec16<T>::kSize]) {
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) r.v[i] = from_float<T>(f[i]);
  return r;
}

#endif  // LORY_HAS_DEVICE_CODE

// Whether two views (base pointers and row strides) take the 16-byte vector path: both bases
// 16-byte aligned, both strides whole vectors.
template <class T>
inline bool merge_vec_io(const T* a, int64_t a_stride, const T* b, int64_t b_stride) {
  constexpr int64_t V = Vec16<T>::kSize;
  return is_aligned(a, 16) && is_aligned(b, 16) && a_stride % V == 0 && b_stride % V == 0;
}

}  // namespace detail
LORY_NAMESPACE_END
