// lory: the segment-level MoE FFN layer on the GPU -- the CUDA backend of the
// plan in lory/moe_ffn_plan.hpp (whose orchestration the CPU tests exercise
// with reference::MoeFfnCpuBackend). Leaf operations: the router, merge and
// SwiGLU launchers, and cuBLAS strided-batched GEMMs (fp32 accumulation,
// tensor cores for half / bfloat16).
//
//   cublasHandle_t h;  cublasCreate(&h);  cublasSetStream(h, stream);   // the caller's
//   lory::MoeFfnCudaPlan<__nv_bfloat16> plan(layout, shape, RoutingMode::kCausalSegment, {budget});
//   if (plan.can_implement() != lory::Status::kSuccess) ...
//   cudaMalloc(&ws, plan.workspace_size());                                // the caller's
//   plan.forward(fwd_args, ws, plan.workspace_size(), {stream, h});
//   plan.backward(bwd_args, ws, plan.workspace_size(), {stream, h});
//
// The handle stays the caller's: lory neither creates nor reconfigures it, so
// it must already be bound to the stream and in host pointer mode (checked).
// cuBLAS' own workspace is the caller's business too (cublasSetWorkspace).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/cublas.cuh"
#include "lory/detail/cuda.cuh"
#include "lory/merge.cuh"
#include "lory/merge_gemm.cuh"
#include "lory/moe_ffn.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/round_to_storage.cuh"
#include "lory/router.cuh"
#include "lory/status.hpp"
#include "lory/swiglu.cuh"

LORY_NAMESPACE_BEGIN

struct MoeFfnCudaBackend {
  // The execution context of one plan call: the caller's stream and cuBLAS handle.
  struct Stream {
    cudaStream_t stream = nullptr;
    cublasHandle_t cublas = nullptr;
  };
  // The merge launchers take 2-D views: the plan may slice f (lory/moe_ffn_plan.hpp).
  static constexpr bool kMergeViews2d = true;

  // Checked before anything is launched: a null handle, or one bound to another
  // stream or in device pointer mode, would fail (or race) only after the router ran.
  static Status check_stream(const Stream& s) { return detail::check_cublas_handle(s.cublas, s.stream); }

  // GPU-only shape limits: cuBLAS takes m, n, k, leading dimensions and the
  // batch count as int.
  template <class T>
  static Status can_implement(const SegmentLayout& lay, const FfnShape& sh) {
    static_assert(detail::is_gpu_storage<T>::value, "MoeFfnCudaPlan: T must be float, __half or __nv_bfloat16");
    if (!detail::fits_int(sh.d) || !detail::fits_int(sh.f))
      return detail::fail(Status::kErrorInvalidSize, "shape", "d or f past cuBLAS' int");
    if (!detail::fits_int(lay.segment_len) || !detail::fits_int(lay.num_segments()))
      return detail::fail(Status::kErrorInvalidSize, "layout", "T or S past cuBLAS' int");
    return Status::kSuccess;
  }

  template <class T>
  static Status router_forward(const RouterForwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream s) {
    return LORY_NS_QUALIFIER::router_forward(a, ws, ws_bytes, s.stream);
  }
  template <class T>
  static Status router_backward(const RouterBackwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream s) {
    return LORY_NS_QUALIFIER::router_backward(a, ws, ws_bytes, s.stream);
  }
  template <class T>
  static Status merge_forward(const MergeForwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream s) {
    return LORY_NS_QUALIFIER::merge_forward(a, ws, ws_bytes, s.stream);
  }
  template <class T>
  static Status merge_backward(const MergeBackwardArgs<T, float>& a, MergeBackwardMethod method, void* ws,
                               size_t& ws_bytes, Stream s) {
    return LORY_NS_QUALIFIER::merge_backward(a, method, ws, ws_bytes, s.cublas, s.stream);
  }
  // The SwiGLU and rounding launchers take no workspace: a size query validates and answers 0.
  template <class T>
  static Status swiglu_forward(const SwigluForwardArgs<T>& a, void* ws, size_t& ws_bytes, Stream s) {
    return without_workspace(ws, ws_bytes, [&] { return swiglu_forward_can_implement(a); },
                             [&] { return LORY_NS_QUALIFIER::swiglu_forward(a, s.stream); });
  }
  template <class T>
  static Status swiglu_backward(const SwigluBackwardArgs<T>& a, void* ws, size_t& ws_bytes, Stream s) {
    return without_workspace(ws, ws_bytes, [&] { return swiglu_backward_can_implement(a); },
                             [&] { return LORY_NS_QUALIFIER::swiglu_backward(a, s.stream); });
  }
  // y and dx rounded once from the plan's fp32 accumulators.
  template <class T>
  static Status round_to_storage(const RoundToStorageArgs<T>& a, void* ws, size_t& ws_bytes, Stream s) {
    return without_workspace(ws, ws_bytes, [&] { return round_to_storage_can_implement(a); },
                             [&] { return LORY_NS_QUALIFIER::round_to_storage(a, s.stream); });
  }

  // One cuBLAS call for the whole batch. cuBLAS is column-major: a row-major
  // [r, c] matrix is its column-major transpose, so row-major C = op(A) op(B)
  // is column-major C^T = op(B)^T op(A)^T -- the operands swap places and keep
  // their transpose flags.
  // TC = float: C is one of the plan's fp32 accumulators (cuBLAS' mixed-type GemmEx: T inputs,
  // fp32 output, fp32 compute).
  template <class T, class TC = T>
  static Status gemm(const StridedBatchedGemm<T, TC>& g, Stream s) {
    static_assert(std::is_same<TC, T>::value || std::is_same<TC, float>::value, "C is T or float");
    static_assert(detail::is_gpu_storage<T>::value, "MoeFfnCudaBackend::gemm: T must be float, __half or __nv_bfloat16");
    LORY_RETURN_IF_ERROR(validate(g));
    if (!s.cublas) return detail::fail(Status::kErrorNullPointer, "cublas", "null cuBLAS handle");
    if (!detail::fits_int(g.m) || !detail::fits_int(g.n) || !detail::fits_int(g.k) || !detail::fits_int(g.batch) ||
        !detail::fits_int(g.lda) || !detail::fits_int(g.ldb) || !detail::fits_int(g.ldc))
      return Status::kErrorInvalidSize;
    constexpr cudaDataType_t type = detail::cublas_dtype<T>::value;
    constexpr cudaDataType_t c_type = detail::cublas_dtype<TC>::value;
    const cublasStatus_t st = cublasGemmStridedBatchedEx(
        s.cublas, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
        static_cast<int>(g.n), static_cast<int>(g.m), static_cast<int>(g.k), &g.alpha,
        g.B, type, static_cast<int>(g.ldb), static_cast<long long>(g.stride_b),
        g.A, type, static_cast<int>(g.lda), static_cast<long long>(g.stride_a), &g.beta,
        g.C, c_type, static_cast<int>(g.ldc), static_cast<long long>(g.stride_c), static_cast<int>(g.batch),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return st == CUBLAS_STATUS_SUCCESS ? Status::kSuccess : Status::kErrorCublas;
  }
 private:
  template <class Check, class Launch>
  static Status without_workspace(void* ws, size_t& ws_bytes, Check&& check, Launch&& launch) {
    if (ws) return launch();
    LORY_RETURN_IF_ERROR(check());
    ws_bytes = 0;
    return Status::kSuccess;
  }
};

// The layer's GPU plan: MoeFfnCudaPlan<T>(layout, shape, mode, options).
template <class T>
using MoeFfnCudaPlan = MoeFfnPlan<T, MoeFfnCudaBackend>;

LORY_NAMESPACE_END
