// lory (private), merge layer "device": what the merge asks of the device -- its shared-memory limits
// (from the process-wide cache, detail::current_device_info), whether its tensor-core kernels run
// there (device_runs_mma) and whether the wgmma kernel does (check_wgmma_kernel).
#pragma once
#include <cuda_runtime.h>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/wgmma.cuh"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// A device's shared-memory limits as the merge plans use them: the opt-in maximum per block, and
// per SM less 4 KiB (1 KiB per block the runtime reserves, for up to four blocks).
inline MergeSmemLimits merge_smem_limits(const DeviceInfo& dev) {
  return {dev.smem_optin, dev.smem_per_sm > 4096 ? dev.smem_per_sm - 4096 : 0};
}

// The current device's shared-memory limits.
inline Status device_smem_limits(MergeSmemLimits& limits) {
  DeviceInfo dev;
  LORY_RETURN_IF_ERROR(current_device_info(dev));
  limits = merge_smem_limits(dev);
  return Status::kSuccess;
}

inline Status device_compute_major(int& major) {
  DeviceInfo dev;
  LORY_RETURN_IF_ERROR(current_device_info(dev));
  major = dev.major;
  return Status::kSuccess;
}

// Whether `kernel`, a tensor-core (mma.sync) kernel, can run on `dev`: an sm_80 or newer device, and
// the kernel compiled for sm_80 or newer. Code JIT-compiled for this device from older PTX (a
// build with compute_75 PTX only, say) has those kernels' bodies empty (LORY_MMA_AVAILABLE), so
// they would do nothing and report success. The kernels of one translation unit are built for the
// same architectures, so one stands for all. (The kernel's attributes are asked per call: they are
// the build's, not the device's.)
inline Status device_runs_mma(const DeviceInfo& dev, const void* kernel, bool& runs) {
  runs = false;
  if (dev.major < 8) return Status::kSuccess;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return Status::kErrorCudaLaunch;
  runs = attr.ptxVersion >= 80;
  return Status::kSuccess;
}
inline Status device_runs_mma(const void* kernel, bool& runs) {
  runs = false;
  DeviceInfo dev;
  LORY_RETURN_IF_ERROR(current_device_info(dev));
  return device_runs_mma(dev, kernel, runs);
}

// The wgmma kernel runs where the device is sm_90 (compute capability 9.0, what sm_90a code needs)
// and the kernel was compiled for sm_90a: a build without it has an empty body that a static
// shared-memory marker gives away.
inline Status check_wgmma_kernel(const void* kernel) {
  bool has = false;
  LORY_RETURN_IF_ERROR(device_has_wgmma(has));
  if (!has) return Status::kErrorInvalidArgument;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return Status::kErrorCudaLaunch;
  if (attr.sharedSizeBytes != 0) return Status::kErrorInvalidArgument;
  return Status::kSuccess;
}

}  // namespace detail
LORY_NAMESPACE_END
