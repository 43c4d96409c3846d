// lory (private), merge layer "device helpers": a zero vector and conversions of a 16-byte vector to and
// from fp32 (the vector I/O over an operand's view, with tails: view.cuh).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge_mma.cuh"
#include "lory/detail/merge/view.cuh"
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

}  // namespace detail
LORY_NAMESPACE_END
