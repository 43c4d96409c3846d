// lory: inference with prompt-level routing on the GPU (contract, choice rule
// and the shared orchestration in lory/inference.hpp). Composed from existing
// launchers -- router_forward (prompt-level mode), merge_forward, swiglu_forward
// -- and cuBLAS GEMMs through MoeFfnCudaBackend::gemm; the one new kernel,
// expert_combine, weighs each sequence's E expert outputs with its p.
//
//   size_t bytes = 0;
//   lory::build_prompt_cache(pargs, nullptr, bytes, stream);      // size query
//   lory::build_prompt_cache(pargs, ws, bytes, stream);           // probs [B, E], cache [B, P]
//   lory::decode_step(dargs, nullptr, bytes, handle, stream);     // size query
//   lory::decode_step(dargs, ws, bytes, handle, stream);          // y [B, d]
//
// The cuBLAS handle is the caller's, already bound to the stream and in host
// pointer mode (checked before any launch); lory never creates or reconfigures it.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/dtype.hpp"
#include "lory/inference.hpp"
#include "lory/math.hpp"
#include "lory/merge.cuh"
#include "lory/moe_ffn.cuh"
#include "lory/router.cuh"
#include "lory/status.hpp"
#include "lory/swiglu.cuh"

LORY_NAMESPACE_BEGIN

// ---- kernel ------------------------------------------------------------------------------

// out[b, i] = sum_e weights[b, e] * in[b, e, i]. Threads run along i (coalesced
// reads of each expert's row and of the output), blocks along b; fp32 sums.
template <class T>
LORY_KERNEL void expert_combine_kernel(ExpertCombineArgs<T> p) {
  const int E = p.experts;
  for (int64_t b = blockIdx.y; b < p.rows; b += gridDim.y) {
    const T* in = p.in + b * E * p.cols;
    const float* w = p.weights + b * E;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.cols; i += int64_t(gridDim.x) * blockDim.x) {
      float acc = 0.f;
      for (int e = 0; e < E; ++e) acc += w[e] * to_float(in[e * p.cols + i]);
      p.out[b * p.out_stride + i] = from_float<T>(acc);
    }
  }
}

// ---- launchers ---------------------------------------------------------------------------

template <class T>
Status expert_combine_can_implement(const ExpertCombineArgs<T>& a) {
  static_assert(detail::is_gpu_storage<T>::value, "expert_combine: T must be float, __half or __nv_bfloat16");
  LORY_RETURN_IF_ERROR(validate(a));
  if (!detail::is_aligned(a.in, alignof(T)) || !detail::is_aligned(a.out, alignof(T)) ||
      !detail::is_aligned(a.weights, alignof(float)))
    return Status::kErrorMisalignedPointer;
  return Status::kSuccess;
}

// No workspace.
template <class T>
Status expert_combine(const ExpertCombineArgs<T>& a, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(expert_combine_can_implement(a));
  constexpr int kThreads = 256;
  const int64_t gx = ceil_div<int64_t>(a.cols, kThreads);
  const dim3 grid(static_cast<unsigned>(gx < 1024 ? gx : 1024), static_cast<unsigned>(a.rows < 65535 ? a.rows : 65535));
  detail::launch_kernel(expert_combine_kernel<T>, grid, dim3(kThreads), 0, stream, a);
  return detail::check_launch();
}

// The CUDA backend of run_prompt_cache / run_decode_step: the MoE plan's leaves
// plus expert_combine and the GPU-only limits (cuBLAS takes int sizes).
struct InferenceCudaBackend : MoeFfnCudaBackend {
  template <class T>
  static Status expert_combine(const ExpertCombineArgs<T>& a, void* ws, size_t& ws_bytes, Stream s) {
    if (!ws) {
      LORY_RETURN_IF_ERROR(expert_combine_can_implement(a));
      ws_bytes = 0;
      return Status::kSuccess;
    }
    return LORY_NS_QUALIFIER::expert_combine(a, s.stream);
  }
  template <class T>
  static Status can_implement_prompt(const PromptCacheArgs<T, float>& a) {
    static_assert(detail::is_gpu_storage<T>::value, "build_prompt_cache: T must be float, __half or __nv_bfloat16");
    if (!detail::is_aligned(a.probs, alignof(float)) || (a.bias && !detail::is_aligned(a.bias, alignof(float))))
      return Status::kErrorMisalignedPointer;
    return Status::kSuccess;  // the router and merge queries check the rest
  }
  template <class T>
  static Status can_implement_decode(const DecodeStepArgs<T, float>& a) {
    static_assert(detail::is_gpu_storage<T>::value, "decode_step: T must be float, __half or __nv_bfloat16");
    const FfnShape& s = a.shape;
    if (!detail::fits_int(a.batch) || !detail::fits_int(2 * s.f) || !detail::fits_int(s.d))
      return detail::fail(Status::kErrorInvalidSize, "batch", "B, 2 f or d past cuBLAS' int");
    const bool merged = resolve_decode_method(a) == DecodeMethod::kMerged;
    if (!merged && (!detail::fits_int(s.experts * s.f) || !detail::fits_int(s.experts * s.d)))
      return detail::fail(Status::kErrorInvalidSize, "shape", "E * f or E * d past cuBLAS' int (expert space)");
    if (!detail::is_aligned(a.x, alignof(T)) || !detail::is_aligned(a.y, alignof(T)))
      return Status::kErrorMisalignedPointer;
    if (merged && !detail::is_aligned(a.cache, alignof(T))) return Status::kErrorMisalignedPointer;
    if (!merged && (!detail::is_aligned(a.W_g, alignof(T)) || !detail::is_aligned(a.W_u, alignof(T)) ||
                    !detail::is_aligned(a.W_d, alignof(T)) || !detail::is_aligned(a.probs, alignof(float))))
      return Status::kErrorMisalignedPointer;
    return Status::kSuccess;
  }
};

template <class T>
Status build_prompt_cache_can_implement(const PromptCacheArgs<T, float>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  LORY_RETURN_IF_ERROR(InferenceCudaBackend::can_implement_prompt<T>(a));
  size_t scratch = 0;
  return detail::prompt_cache_scratch<InferenceCudaBackend, T>(a, scratch);
}

// Routing decisions p_b [B, E] and, when args.cache is set, the merged FFN of
// every sequence [B, P]. Workspace: hbar and router probabilities (fp32) plus
// the merge's scratch. No cuBLAS.
template <class T>
Status build_prompt_cache(const PromptCacheArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                          cudaStream_t stream) {
  return run_prompt_cache<InferenceCudaBackend, T>(a, workspace, workspace_bytes,
                                                   InferenceCudaBackend::Stream{stream, nullptr});
}

template <class T>
Status decode_step_can_implement(const DecodeStepArgs<T, float>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  LORY_RETURN_IF_ERROR(InferenceCudaBackend::can_implement_decode<T>(a));
  size_t scratch = 0;
  return detail::decode_scratch<InferenceCudaBackend, T>(a, resolve_decode_method(a), scratch);
}

// One decode step, x [B, d] -> y [B, d] (method: args.method, kAuto by the
// byte rule). Workspace: [B, 2f] + [B, f] activations, plus [B, E, max(f, d)]
// per-expert outputs in expert space. The handle must be bound to `stream`.
template <class T>
Status decode_step(const DecodeStepArgs<T, float>& a, void* workspace, size_t& workspace_bytes, cublasHandle_t cublas,
                   cudaStream_t stream) {
  return run_decode_step<InferenceCudaBackend, T>(a, workspace, workspace_bytes,
                                                  InferenceCudaBackend::Stream{stream, cublas});
}

LORY_NAMESPACE_END
