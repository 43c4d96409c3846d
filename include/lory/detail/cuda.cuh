// lory: CUDA helpers shared by the kernels and launchers (private).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/config.hpp"
#include "lory/dtype.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// Collect the launch error (and only that: a sticky error from elsewhere is
// also reported, since the stream is then unusable anyway).
inline Status check_launch() {
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kErrorCudaLaunch;
}

// Two-phase workspace protocol shared by every launcher: a null workspace asks
// for the size (written to workspace_bytes); otherwise the size is checked.
inline Status workspace_protocol(void* workspace, size_t& workspace_bytes, size_t needed, bool& size_query) {
  size_query = (workspace == nullptr);
  if (size_query) {
    workspace_bytes = needed;
    return Status::kSuccess;
  }
  if (workspace_bytes < needed) return Status::kErrorWorkspaceTooSmall;
  return Status::kSuccess;
}

// A 16-byte vector of N elements of T (N = 16 / sizeof(T)).
template <class T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_vec16(const T* p) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <class T>
LORY_DEVICE LORY_FORCEINLINE void store_vec16(T* p, const Vec16<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}
// Streaming load that bypasses L1 (each element is read once).
template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_vec16_stream(const T* p) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
  return r;
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The GPU storage dtypes.
template <class T> struct is_gpu_storage { static constexpr bool value = false; };
template <> struct is_gpu_storage<float> { static constexpr bool value = true; };
template <> struct is_gpu_storage<__half> { static constexpr bool value = true; };
template <> struct is_gpu_storage<__nv_bfloat16> { static constexpr bool value = true; };

}  // namespace detail
LORY_NAMESPACE_END
