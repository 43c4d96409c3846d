// lory (private), merge layer "kernel + launcher": the backward as two cuBLAS GEMMs (the GEMM method of
// lory/merge_gemm.cuh): merge_backward_gemm_round_weights_kernel (the fp32 routing weights rounded
// to the storage dtype, the GEMMs' common input type) and merge_backward_gemm.
//
// With row-major tensors seen as cuBLAS' column-major transposes:
//   dW^T [P, E]        = G^T [P, S] x weights [S, E]      (m = P, n = E, k = S; beta 1 to accumulate)
//   d_weights^T [E, S] = W [E, P] x G^T [P, S]            (m = E, n = S, k = P; fp32 output)
// For 16-bit storage the weights are first rounded to the storage dtype into the workspace (fp16
// needs |weights| < 65504, as the fused tensor-core kernels do).
// 2-D views (lory/merge.hpp's rows and row pitches): a call whose views are all flat (every pitch
// it uses equals params) runs the two GEMMs above over P = rows * params. Otherwise each product
// is one strided-batched GEMM over the rows (batch = rows, row r of every operand at r * pitch):
//   dW_r^T [params, E]   = G_r^T [params, S] x weights [S, E]          (weights' batch stride 0)
//   part_r^T [E, S]      = W_r [E, params] x G_r^T [params, S]         (fp32, into the workspace)
// and a fixed-order reduction adds the rows' d_weights partials (d_weights (+)= sum_r part_r, the
// fused kernel's merge_backward_reduce_kernel): reproducible as the flat method is, for
// rows * S * E * 4 more bytes of workspace (placed before the converted weights).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/cublas.cuh"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge/backward_partial.cuh"
#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge/view.cuh"
#include "lory/detail/validate.hpp"
#include "lory/dtype.hpp"
#include "lory/merge.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// kAuto runs the fused kernel up to this many experts on its tensor-core path, the GEMMs above
// (docs/gpu-results.md has the measurements that set it: the GEMMs well ahead from E = 16, the two
// within a few percent at E = 8, where the fused kernel also reads G only once).
constexpr int kMergeBackwardFusedMaxExperts = 8;

#if LORY_HAS_DEVICE_CODE
// out[i] = weights[i] rounded to T: the GEMM method's routing weights in the storage dtype.
template <class T>
LORY_KERNEL void __launch_bounds__(kMergeThreads)
    merge_backward_gemm_round_weights_kernel(const float* in, int64_t n, T* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(in[i]);
}
#endif  // LORY_HAS_DEVICE_CODE

// The GEMMs' rows: 1 where every view the call uses is flat (then P = rows * params), else rows
// (one batch per row).
template <class T>
int64_t merge_backward_gemm_rows(const MergeBackwardArgs<T, float>& a) {
  return merge_view_is_flat(a) ? 1 : a.rows;
}

// Workspace of the GEMM method: the rows' fp32 d_weights partials (non-flat views), then the
// weights in the storage dtype (none for fp32 storage).
template <class T>
size_t merge_backward_gemm_partials_bytes(const MergeBackwardArgs<T, float>& a) {
  const int64_t rows = merge_backward_gemm_rows(a);
  if (rows == 1 || !a.d_weights) return 0;
  return align_up(size_t(rows) * size_t(a.num_segments) * size_t(a.experts) * sizeof(float));
}
template <class T>
size_t merge_backward_gemm_workspace(const MergeBackwardArgs<T, float>& a) {
  const size_t converted = std::is_same<T, float>::value ? 0 : size_t(a.num_segments) * size_t(a.experts) * sizeof(T);
  const size_t total = merge_backward_gemm_partials_bytes(a) + converted;
  return total > kMergeMinWorkspaceBytes ? total : kMergeMinWorkspaceBytes;
}

// cuBLAS' int limits: every size and leading dimension of the two GEMMs (P <= each stride; with
// non-flat views the rows, a batch count, too), and the rows' partials addressable.
template <class T>
bool merge_backward_gemm_fits(const MergeBackwardArgs<T, float>& a) {
  const int64_t rows = merge_backward_gemm_rows(a);
  const int64_t n = rows == 1 && mul_fits(a.rows, a.params) ? a.rows * a.params : a.params;
  return fits_int(a.num_segments) && fits_int(n) && fits_int(rows) && fits_int(a.grad_segment_stride) &&
         (!a.dW || fits_int(a.dW_expert_stride)) && (!a.d_weights || fits_int(a.expert_stride)) &&
         (rows == 1 || mul_fits(rows, a.num_segments * int64_t(a.experts) * int64_t(sizeof(float))));
}

template <class T>
Status merge_backward_gemm_can_implement(const MergeBackwardArgs<T, float>& a) {
  LORY_RETURN_IF_ERROR(merge_backward_can_implement(a));
  return merge_backward_gemm_fits(a) ? Status::kSuccess : Status::kErrorInvalidSize;
}

#if LORY_HAS_DEVICE_CODE
template <class T>
Status merge_backward_gemm(const MergeBackwardArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                           cublasHandle_t cublas, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(merge_backward_gemm_can_implement(a));
  bool size_query = false;
  // The weights rounded to T and the rows' fp32 partials are the workspace's only uses: their
  // alignment, no more (a workspace that suits the fused kernel's fp32 partials suits this too).
  const bool rounds = !std::is_same<T, float>::value && a.dW;
  const size_t partials_bytes = merge_backward_gemm_partials_bytes(a);
  LORY_RETURN_IF_ERROR(workspace_protocol(workspace, workspace_bytes, merge_backward_gemm_workspace(a), size_query,
                                          partials_bytes ? alignof(float) : rounds ? alignof(T) : 1));
  if (size_query) return Status::kSuccess;
  LORY_RETURN_IF_ERROR(check_cublas_handle(cublas, stream));

  constexpr cudaDataType_t type = cublas_dtype<T>::value;
  const int64_t rows = merge_backward_gemm_rows(a);
  const int S = static_cast<int>(a.num_segments), E = a.experts;
  const int P = static_cast<int>(rows == 1 ? a.rows * a.params : a.params);  // per GEMM (per row when batched)
  const float one = 1.f, zero = 0.f;
  if (a.dW) {
    const void* weights = a.weights;  // fp32 storage: the caller's weights as they are
    if constexpr (!std::is_same<T, float>::value) {
      const int64_t n = a.num_segments * a.experts;
      T* converted = reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + partials_bytes);
      const int64_t grid = std::min<int64_t>((n + kMergeThreads - 1) / kMergeThreads, 1024);
      launch_kernel(merge_backward_gemm_round_weights_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kMergeThreads), 0,
                    stream, a.weights, n, converted);
      LORY_RETURN_IF_ERROR(check_launch());
      weights = converted;
    }
    if (rows > 1) {
      if (cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_N, CUBLAS_OP_T, P, E, S, &one, a.G, type,
                                     static_cast<int>(a.grad_segment_stride), a.G_row_pitch, weights, type, E, 0,
                                     a.accumulate_dW ? &one : &zero, a.dW, type, static_cast<int>(a.dW_expert_stride),
                                     a.dW_row_pitch, static_cast<int>(rows), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
        return Status::kErrorCublas;
    } else if (cublasGemmEx(cublas, CUBLAS_OP_N, CUBLAS_OP_T, P, E, S, &one, a.G, type, static_cast<int>(a.grad_segment_stride),
                     weights, type, E, a.accumulate_dW ? &one : &zero, a.dW, type,
                     static_cast<int>(a.dW_expert_stride), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return Status::kErrorCublas;
  }
  if (a.d_weights && rows > 1) {
    float* partials = static_cast<float*>(workspace);
    const int64_t n = a.num_segments * a.experts;
    if (cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, E, S, P, &one, a.W, type,
                                   static_cast<int>(a.expert_stride), a.W_row_pitch, a.G, type,
                                   static_cast<int>(a.grad_segment_stride), a.G_row_pitch, &zero, partials, CUDA_R_32F,
                                   E, n, static_cast<int>(rows), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return Status::kErrorCublas;
    const int64_t grid = std::min<int64_t>((n + kMergeThreads - 1) / kMergeThreads, 4096);
    launch_kernel(merge_backward_reduce_kernel<kMergeThreads>, dim3(static_cast<unsigned>(grid)), dim3(kMergeThreads), 0,
                  stream, static_cast<const float*>(partials), static_cast<int>(rows), n, a.d_weights,
                  a.accumulate_d_weights);
    LORY_RETURN_IF_ERROR(check_launch());
  } else if (a.d_weights) {
    if (cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, E, S, P, &one, a.W, type, static_cast<int>(a.expert_stride), a.G,
                     type, static_cast<int>(a.grad_segment_stride), a.accumulate_d_weights ? &one : &zero, a.d_weights,
                     CUDA_R_32F, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return Status::kErrorCublas;
  }
  return Status::kSuccess;
}

#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
