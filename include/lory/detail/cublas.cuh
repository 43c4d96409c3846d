// lory: cuBLAS helpers shared by the launchers that call cuBLAS (private): the
// dtype tags, the int limits of its sizes, and the checks of a caller's handle.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/dtype.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

template <class T> struct cublas_dtype;
template <> struct cublas_dtype<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct cublas_dtype<__half> { static constexpr cudaDataType_t value = CUDA_R_16F; };
template <> struct cublas_dtype<__nv_bfloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

// cuBLAS takes m, n, k, leading dimensions and batch counts as int.
inline bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// A caller's handle, checked before anything is launched: lory neither creates nor reconfigures
// it, so it must be non-null, bound to the call's stream (another stream would race) and in host
// pointer mode (alpha and beta are host values). Its math mode and workspace are the caller's
// choice and are used as they are (lory/merge.hpp, MergeBackwardMethod).
inline Status check_cublas_handle(cublasHandle_t handle, cudaStream_t stream) {
  if (!handle) return fail(Status::kErrorNullPointer, "cublas", "null cuBLAS handle");
  cudaStream_t bound = nullptr;
  if (cublasGetStream(handle, &bound) != CUBLAS_STATUS_SUCCESS) return Status::kErrorCublas;
  if (bound != stream) return fail(Status::kErrorInvalidArgument, "cublas", "handle bound to another stream");
  cublasPointerMode_t mode = CUBLAS_POINTER_MODE_HOST;
  if (cublasGetPointerMode(handle, &mode) != CUBLAS_STATUS_SUCCESS) return Status::kErrorCublas;
  if (mode != CUBLAS_POINTER_MODE_HOST)
    return fail(Status::kErrorInvalidArgument, "cublas", "handle not in host pointer mode");
  return Status::kSuccess;
}

}  // namespace detail
LORY_NAMESPACE_END
