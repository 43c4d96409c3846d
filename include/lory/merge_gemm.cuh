// lory: the merge backward with a choice of method -- lory's fused one-pass kernel
// (merge.cuh) or two cuBLAS GEMMs -- and the rule kAuto follows. The math and the
// arguments are the merge backward's (lory/merge.hpp); the CPU twin is
// reference::merge_backward whichever method runs on the GPU.
//
//   size_t bytes = 0;
//   lory::merge_backward(args, lory::MergeBackwardMethod::kAuto, nullptr, bytes, handle, stream);  // size
//   lory::merge_backward(args, lory::MergeBackwardMethod::kAuto, ws, bytes, handle, stream);
//
// The GEMM method, with row-major tensors seen as cuBLAS' column-major transposes:
//   dW^T [P, E]        = G^T [P, S] x weights [S, E]      (m = P, n = E, k = S; beta 1 to accumulate)
//   d_weights^T [E, S] = W [E, P] x G^T [P, S]            (m = E, n = S, k = P; fp32 output)
// For 16-bit storage the weights are first rounded to the storage dtype into the workspace (the
// GEMMs take one dtype for both inputs; fp16 needs |weights| < 65504, as the fused tensor-core
// kernels do). The handle is the caller's, bound to `stream` and in host
// pointer mode (checked before any launch); a kFused call does not need one (it may be null).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/cublas.cuh"
#include "lory/detail/cuda.cuh"
#include "lory/dtype.hpp"
#include "lory/merge.cuh"
#include "lory/merge.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

#if LORY_HAS_DEVICE_CODE
namespace detail {

// kAuto runs the fused kernel up to this many experts on its tensor-core path, the GEMMs above.
// From the H200 runs in docs/gpu-results.md (bf16, d = 1536 / 1024, f = 4096 / 2816, P = 3 d f):
// the GEMMs took 0.42-0.49x the fused kernel's time at E = 32, S = 128 and 0.27x at S = 512
// (6a20a9a benchmark; 0.49x at E = 32, S = 128 for e089aee), 0.85x at E = 16 (e089aee); at E = 8
// the two were within 4-7% (e089aee: 0.93-0.96x), where the fused kernel also reads G only once.
constexpr int kMergeBackwardFusedMaxExperts = 8;

template <class T>
LORY_KERNEL void __launch_bounds__(kMergeThreads) merge_weights_to_storage_kernel(const float* in, int64_t n, T* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(in[i]);
}

// Workspace of the GEMM method: the weights in the storage dtype (none for fp32 storage).
template <class T>
size_t merge_backward_gemm_workspace(const MergeBackwardArgs<T, float>& a) {
  const size_t converted = std::is_same<T, float>::value ? 0 : size_t(a.num_segments) * size_t(a.experts) * sizeof(T);
  return converted > kMergeMinWorkspaceBytes ? converted : kMergeMinWorkspaceBytes;
}

// cuBLAS' int limits: every size and leading dimension of the two GEMMs (P <= each stride).
template <class T>
bool merge_backward_gemm_fits(const MergeBackwardArgs<T, float>& a) {
  return fits_int(a.num_segments) && fits_int(a.params) && fits_int(a.grad_segment_stride) &&
         (!a.dW || fits_int(a.dW_expert_stride)) && (!a.d_weights || fits_int(a.expert_stride));
}

template <class T>
Status merge_backward_gemm_can_implement(const MergeBackwardArgs<T, float>& a) {
  LORY_RETURN_IF_ERROR(merge_backward_can_implement(a));
  return merge_backward_gemm_fits(a) ? Status::kSuccess : Status::kErrorInvalidSize;
}

template <class T>
Status merge_backward_gemm(const MergeBackwardArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                           cublasHandle_t cublas, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(merge_backward_gemm_can_implement(a));
  bool size_query = false;
  // The weights rounded to T are the workspace's only use: T's alignment, no more (a workspace that
  // suits the fused kernel's fp32 partials suits this too).
  const bool rounds = !std::is_same<T, float>::value && a.dW;
  LORY_RETURN_IF_ERROR(workspace_protocol(workspace, workspace_bytes, merge_backward_gemm_workspace(a), size_query,
                                          rounds ? alignof(T) : 1));
  if (size_query) return Status::kSuccess;
  LORY_RETURN_IF_ERROR(check_cublas_handle(cublas, stream));

  constexpr cudaDataType_t type = cublas_dtype<T>::value;
  const int S = static_cast<int>(a.num_segments), E = a.experts, P = static_cast<int>(a.params);
  const float one = 1.f, zero = 0.f;
  if (a.dW) {
    const void* weights = a.weights;  // fp32 storage: the caller's weights as they are
    if constexpr (!std::is_same<T, float>::value) {
      const int64_t n = a.num_segments * a.experts;
      T* converted = static_cast<T*>(workspace);
      const int64_t grid = std::min<int64_t>((n + kMergeThreads - 1) / kMergeThreads, 1024);
      launch_kernel(merge_weights_to_storage_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kMergeThreads), 0,
                    stream, a.weights, n, converted);
      LORY_RETURN_IF_ERROR(check_launch());
      weights = converted;
    }
    if (cublasGemmEx(cublas, CUBLAS_OP_N, CUBLAS_OP_T, P, E, S, &one, a.G, type, static_cast<int>(a.grad_segment_stride),
                     weights, type, E, a.accumulate_dW ? &one : &zero, a.dW, type,
                     static_cast<int>(a.dW_expert_stride), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return Status::kErrorCublas;
  }
  if (a.d_weights) {
    if (cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, E, S, P, &one, a.W, type, static_cast<int>(a.expert_stride), a.G,
                     type, static_cast<int>(a.grad_segment_stride), a.accumulate_d_weights ? &one : &zero, a.d_weights,
                     CUDA_R_32F, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return Status::kErrorCublas;
  }
  return Status::kSuccess;
}

}  // namespace detail

// The method a call with `method` runs: kFused or kGemm as given; kAuto resolves to the fused
// kernel where it runs on tensor cores (16-bit storage, 16-byte aligned views) with E <= 8, or
// where the GEMMs' sizes do not fit cuBLAS' int limits; to the GEMMs otherwise
// (detail::kMergeBackwardFusedMaxExperts says which measurements set the bound; off the
// tensor-core path the fused kernel runs on CUDA cores, measured at 2-8% of copy bandwidth).
// Depends on the arguments only, so a size query and the call it sizes agree (and not on the
// device: before sm_80, kAuto at E <= 8 runs the fused kernel on CUDA cores).
template <class T>
MergeBackwardMethod resolve_merge_backward_method(const MergeBackwardArgs<T, float>& a, MergeBackwardMethod method) {
  if (method != MergeBackwardMethod::kAuto) return method;
  const bool fused = !detail::merge_backward_gemm_fits(a) ||
                     (detail::merge_backward_uses_tc(a, detail::MergePath::kAuto) &&
                      a.experts <= detail::kMergeBackwardFusedMaxExperts);
  return fused ? MergeBackwardMethod::kFused : MergeBackwardMethod::kGemm;
}

// dW (+)= weights^T x G and d_weights (+)= G x W^T by `method` (see above). Workspace: the
// method's (the fused kernel's partials, or the converted weights; a null workspace asks).
// Errors as merge_backward's, plus: an invalid method (kErrorInvalidArgument); for the GEMMs a
// size or stride past INT_MAX (kErrorInvalidSize), a workspace not aligned to T
// (kErrorMisalignedPointer), a null handle, or one bound to another stream or in device pointer
// mode (kErrorNullPointer / kErrorInvalidArgument), all before any launch. A cuBLAS call that
// fails at run time gives kErrorCublas; if it is the d_weights GEMM, dW is already written.
template <class T>
Status merge_backward(const MergeBackwardArgs<T, float>& args, MergeBackwardMethod method, void* workspace,
                      size_t& workspace_bytes, cublasHandle_t cublas, cudaStream_t stream) {
  if (!is_valid(method)) return Status::kErrorInvalidArgument;
  if (resolve_merge_backward_method(args, method) == MergeBackwardMethod::kFused)
    return merge_backward(args, workspace, workspace_bytes, stream);
  return detail::merge_backward_gemm(args, workspace, workspace_bytes, cublas, stream);
}
#endif  // LORY_HAS_DEVICE_CODE

LORY_NAMESPACE_END
