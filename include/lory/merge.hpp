// lory: the expert merge and its backward pass -- arguments and validation,
// shared by the CUDA launchers (merge.cuh) and the CPU twin (reference/merge.hpp).
//
//   forward:   Wbar[s, j] = sum_e weights[s, e] * W[e, j]                (K = E)
//   backward:  dW[e, j]  (+)= sum_s weights[s, e] * G[s, j]              (K = S)
//              d_weights[s, e] (+)= sum_j G[s, j] * W[e, j]              (K = P)
//
// Matrices are strided views: element (e, j) of W is W[e * expert_stride + j],
// so one call can merge a slice of a larger parameter tensor (one of the three
// FFN matrices, a tensor-parallel shard, a column block). T is the storage
// dtype (float, __half, __nv_bfloat16 on the GPU; double too on the CPU); R is
// the routing dtype (float on the GPU; float or double on the CPU).
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

template <class T, class R = float>
struct MergeForwardArgs {
  int64_t num_segments = 0;   // S
  int experts = 0;            // E
  int64_t params = 0;         // P: elements per expert in this view
  const T* W = nullptr;       // [E, P] view
  int64_t expert_stride = 0;  // >= P
  const R* weights = nullptr; // [S, E], row stride E
  T* Wbar = nullptr;          // [S, P] view (output)
  int64_t segment_stride = 0; // >= P
};

template <class T, class R = float>
struct MergeBackwardArgs {
  int64_t num_segments = 0;     // S
  int experts = 0;              // E
  int64_t params = 0;           // P
  const T* G = nullptr;         // [S, P] gradient of the merged weights
  int64_t grad_segment_stride = 0;
  const T* W = nullptr;         // [E, P] expert weights (for d_weights)
  int64_t expert_stride = 0;
  const R* weights = nullptr;   // [S, E]
  T* dW = nullptr;              // [E, P] (output); may be null to skip dW
  int64_t dW_expert_stride = 0;
  bool accumulate_dW = false;   // dW += ... instead of dW = ...
  R* d_weights = nullptr;       // [S, E] (output); may be null to skip it
  bool accumulate_d_weights = false;  // add into d_weights (sum over several matrices)
  // Deterministic mode: bitwise identical results run to run (fixed-order
  // reductions, no floating-point atomics). The fast mode may reduce
  // d_weights with atomics, so its last bits can vary between runs. This is
  // the fused kernel's contract; the cuBLAS GEMM method (MergeBackwardMethod,
  // which kAuto picks above E = 8) is reproducible under cuBLAS' conditions.
  bool deterministic = true;
};

// How the GPU computes the merge backward (lory/merge_gemm.cuh; the CPU twin has one way).
//   kFused  lory's one-pass kernel (merge.cuh): reads G once and feeds both products from it.
//   kGemm   two cuBLAS GEMMs, dW = weights^T G and d_weights = G W^T: reads G twice, and the
//           routing weights enter dW rounded to the storage dtype (a bf16 weight keeps 8 bits;
//           the fused tensor-core kernel keeps about 16 through a hi + lo split). The GEMMs run
//           under the caller's handle: its math mode applies (a TF32 mode makes fp32 storage
//           TF32 GEMMs, as it does the plan's FFN GEMMs), and they are bitwise reproducible
//           under cuBLAS' own conditions: the same toolkit and device, and one stream at a time
//           on the handle's workspace (cuBLAS' docs: a workspace per stream via
//           cublasSetWorkspace, as PyTorch's handles have, or CUBLAS_WORKSPACE_CONFIG).
//           `deterministic` does not change what the GEMMs do; kFused in its deterministic
//           mode is reproducible on its own.
//   kAuto   the one measured faster at the shape (resolve_merge_backward_method).
enum class MergeBackwardMethod : int { kAuto = 0, kFused = 1, kGemm = 2 };

inline const char* merge_backward_method_name(MergeBackwardMethod m) {
  switch (m) {
    case MergeBackwardMethod::kAuto: return "auto";
    case MergeBackwardMethod::kFused: return "fused";
    case MergeBackwardMethod::kGemm: return "gemm";
  }
  return "invalid";
}

inline bool is_valid(MergeBackwardMethod m) {
  return m == MergeBackwardMethod::kAuto || m == MergeBackwardMethod::kFused || m == MergeBackwardMethod::kGemm;
}

namespace detail {
// S, E, P positive (E within kMaxExperts) and the [S, E] routing weights addressable.
inline Status validate_merge_extent(int64_t num_segments, int experts, int64_t params) {
  if (num_segments <= 0) return fail(Status::kErrorInvalidSize, "num_segments", "not positive");
  if (params <= 0) return fail(Status::kErrorInvalidSize, "params", "not positive");
  if (experts <= 0 || experts > kMaxExperts)
    return fail(Status::kErrorUnsupportedExpertCount, "experts", "outside [1, kMaxExperts]");
  if (!mul_fits(num_segments, experts)) return fail(Status::kErrorInvalidSize, "num_segments", "S * E overflows int64");
  return Status::kSuccess;
}
}  // namespace detail

// Shape and pointer checks shared by the CPU twin and the GPU launchers.
// Aliasing: Wbar may not share memory with W or weights (every segment reads all of W).
template <class T, class R>
Status validate(const MergeForwardArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_merge_extent(a.num_segments, a.experts, a.params));
  if (!a.W) return fail(Status::kErrorNullPointer, "W", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (!a.Wbar) return fail(Status::kErrorNullPointer, "Wbar", "is null");
  if (a.expert_stride < a.params) return fail(Status::kErrorInvalidShape, "expert_stride", "below params");
  if (a.segment_stride < a.params) return fail(Status::kErrorInvalidShape, "segment_stride", "below params");
  if (!detail::mul_fits(a.experts, a.expert_stride))
    return fail(Status::kErrorInvalidSize, "expert_stride", "E * expert_stride overflows int64");
  if (!detail::mul_fits(a.num_segments, a.segment_stride))
    return fail(Status::kErrorInvalidSize, "segment_stride", "S * segment_stride overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W, "W"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.Wbar, "Wbar"));
  const detail::Operand outputs[] = {{"Wbar", detail::view_range(a.Wbar, a.num_segments, a.params, a.segment_stride)}};
  const detail::Operand inputs[] = {{"W", detail::view_range(a.W, a.experts, a.params, a.expert_stride)},
      {"weights", detail::array_range(a.weights, a.num_segments * a.experts)}};
  return detail::check_aliasing(outputs, inputs);
}

// Aliasing: no output (dW, d_weights) may share memory with an input (G, W, weights) or the other.
template <class T, class R>
Status validate(const MergeBackwardArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_merge_extent(a.num_segments, a.experts, a.params));
  if (!a.G) return fail(Status::kErrorNullPointer, "G", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (!a.dW && !a.d_weights)
    return fail(Status::kErrorNullPointer, "dW", "dW and d_weights both null: nothing to compute");
  if (a.d_weights && !a.W) return fail(Status::kErrorNullPointer, "W", "is null (d_weights needs it)");
  if (a.grad_segment_stride < a.params) return fail(Status::kErrorInvalidShape, "grad_segment_stride", "below params");
  if (a.d_weights && a.expert_stride < a.params)
    return fail(Status::kErrorInvalidShape, "expert_stride", "below params");
  if (a.dW && a.dW_expert_stride < a.params)
    return fail(Status::kErrorInvalidShape, "dW_expert_stride", "below params");
  if (!detail::mul_fits(a.num_segments, a.grad_segment_stride))
    return fail(Status::kErrorInvalidSize, "grad_segment_stride", "S * grad_segment_stride overflows int64");
  if (!detail::mul_fits(a.experts, a.expert_stride))
    return fail(Status::kErrorInvalidSize, "expert_stride", "E * expert_stride overflows int64");
  if (!detail::mul_fits(a.experts, a.dW_expert_stride))
    return fail(Status::kErrorInvalidSize, "dW_expert_stride", "E * dW_expert_stride overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.G, "G"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW, "dW"));
  if (a.d_weights) LORY_RETURN_IF_ERROR(detail::check_aligned(a.W, "W"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.d_weights, "d_weights"));
  const int64_t SE = a.num_segments * a.experts;
  const detail::ByteRange dW = a.dW ? detail::view_range(a.dW, a.experts, a.params, a.dW_expert_stride) : detail::ByteRange{};
  const detail::Operand outputs[] = {{"dW", dW},
      {"d_weights", detail::array_range(a.d_weights, SE)}};
  const detail::Operand inputs[] = {{"G", detail::view_range(a.G, a.num_segments, a.params, a.grad_segment_stride)},
      {"W", a.d_weights ? detail::view_range(a.W, a.experts, a.params, a.expert_stride) : detail::ByteRange{}},
      {"weights", detail::array_range(a.weights, SE)}};
  return detail::check_aliasing(outputs, inputs);
}

LORY_NAMESPACE_END
