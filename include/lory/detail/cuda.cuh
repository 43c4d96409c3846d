// lory: CUDA helpers shared by the kernels and launchers (private).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/dtype.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// Launches kernel<<<grid, block, smem, stream>>>(args...) (under the test suite's CPU emulator, the
// emulator runs it: LORY_LAUNCH_KERNEL, lory/detail/emulation.hpp).
template <class... Params, class... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          const Args&... args) {
  LORY_LAUNCH_KERNEL(kernel, grid, block, smem, stream, args);
}

// A kernel's dynamic shared memory, 16-byte aligned, as `unsigned char name[]`: LORY_DYNAMIC_SMEM(name)
// (lory/detail/emulation.hpp).

// A statically sized shared-memory variable of the block: LORY_BLOCK_SHARED(float[32], buf);
template <class T>
using shared_t = T;
// (lory/detail/emulation.hpp defines LORY_BLOCK_SHARED over it.)

// Collect the launch error (and only that: a sticky error from elsewhere is
// also reported, since the stream is then unusable anyway).
inline Status check_launch() {
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kErrorCudaLaunch;
}

// A 16-byte vector of N elements of T (N = 16 / sizeof(T)).
template <class T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// A 16-byte access must be 16-byte aligned on the GPU; the CPU emulator checks it
// (LORY_CHECK_VEC16_ALIGNED, lory/detail/emulation.hpp).

template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_vec16(const T* p) {
  LORY_CHECK_VEC16_ALIGNED(p);
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <class T>
LORY_DEVICE LORY_FORCEINLINE void store_vec16(T* p, const Vec16<T>& r) {
  LORY_CHECK_VEC16_ALIGNED(p);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}
// Streaming store, evict-first (st.global.cs: the data is not read again soon).
template <class T>
LORY_DEVICE LORY_FORCEINLINE void store_vec16_stream(T* p, const Vec16<T>& r) {
  LORY_CHECK_VEC16_ALIGNED(p);
  __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&r));
}
// Streaming load that bypasses L1 (each element is read once).
template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_vec16_stream(const T* p) {
  LORY_CHECK_VEC16_ALIGNED(p);
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
  return r;
}

// What the launchers ask of a device, asked once per device (by ordinal) and cached for the
// process: a device's attributes do not change while it runs. Thread-safe. The answer for the
// current device (cudaGetDevice, itself cheap); a failed query is not cached.
struct DeviceInfo {
  int major = 0, minor = 0;       // compute capability
  int sms = 0;                    // multiprocessors
  size_t smem_optin = 0;          // the most dynamic + static shared memory a block may opt in to
  size_t smem_per_sm = 0;         // shared memory per multiprocessor (the runtime's reserve included)
};
inline Status current_device_info(DeviceInfo& info) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return Status::kErrorNoDevice;
  constexpr int kSlots = 64;  // device ordinals cached; beyond, every call asks
  static std::mutex mutex;
  static DeviceInfo cache[kSlots];
  static bool known[kSlots] = {};
  const bool cached = dev >= 0 && dev < kSlots;
  if (cached) {
    std::lock_guard<std::mutex> lock(mutex);
    if (known[dev]) {
      info = cache[dev];
      return Status::kSuccess;
    }
  }
  int major = 0, minor = 0, sms = 0, optin = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
    return Status::kErrorCudaLaunch;
  info = DeviceInfo{major, minor, sms, size_t(optin), size_t(per_sm)};
  if (cached) {
    std::lock_guard<std::mutex> lock(mutex);
    cache[dev] = info;
    known[dev] = true;
  }
  return Status::kSuccess;
}

// Lets a kernel take more than the default 48 KB of dynamic shared memory when it needs to, and
// reports how many of its blocks (threads each, smem bytes of dynamic shared memory) the device
// holds at once: the size of a persistent grid. A kernel that does not fit at all is an error,
// reported before anything is launched.
// The limit is raised to the most the device allows the kernel, never to this call's size: calls
// from several host threads then all set the same value, and none can lower the limit between
// another's check and its launch.
template <class Kernel>
inline Status max_resident_blocks(Kernel kernel, int threads, size_t smem, int64_t& resident) {
  const void* func = reinterpret_cast<const void*>(kernel);  // the runtime's C entry points take it so
  DeviceInfo dev;
  if (current_device_info(dev) != Status::kSuccess) return Status::kErrorCudaLaunch;
  int per_sm = 0;
  if (smem > 48 * 1024) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, func) != cudaSuccess) return Status::kErrorCudaLaunch;
    const int64_t cap = int64_t(dev.smem_optin) - int64_t(attr.sharedSizeBytes);  // dynamic + static <= opt-in
    if (int64_t(smem) > cap) return Status::kErrorInvalidArgument;   // does not fit on this device
    if (attr.maxDynamicSharedSizeBytes < cap &&
        cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cap)) != cudaSuccess)
      return Status::kErrorCudaLaunch;
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, func, threads, smem) != cudaSuccess)
    return Status::kErrorCudaLaunch;
  if (per_sm < 1) return Status::kErrorInvalidArgument;  // does not fit on this device
  resident = int64_t(dev.sms) * per_sm;
  return Status::kSuccess;
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The GPU storage dtypes.
template <class T> struct is_gpu_storage { static constexpr bool value = false; };
template <> struct is_gpu_storage<float> { static constexpr bool value = true; };
template <> struct is_gpu_storage<__half> { static constexpr bool value = true; };
template <> struct is_gpu_storage<__nv_bfloat16> { static constexpr bool value = true; };

}  // namespace detail
LORY_NAMESPACE_END
