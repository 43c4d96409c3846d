// lory: the expert merge and its backward pass -- arguments and validation,
// shared by the CUDA launchers (merge.cuh) and the CPU twin (reference/merge.hpp).
//
//   forward:   Wbar[s, j] = sum_e weights[s, e] * W[e, j]                (K = E)
//   backward:  dW[e, j]  (+)= sum_s weights[s, e] * G[s, j]              (K = S)
//              d_weights[s, e] (+)= sum_j G[s, j] * W[e, j]              (K = P)
//
// Matrices are strided 2-D views: each expert's (and each segment's) view is
// rows x params elements with a row pitch, element (e, r, j) of W being
// W[e * expert_stride + r * W_row_pitch + j]; P = rows * params values per
// view. rows == 1 (the default) is a flat view of `params` elements and every
// pitch is ignored. So one call merges a slice of a larger parameter tensor
// (one of the three FFN matrices, a tensor-parallel shard, a row block) or a
// column block in place: columns [j0, j0 + n) of W_d [E, d, f] are rows = d,
// params = n, W_row_pitch = f, expert_stride = d * f at W_d + j0. T is the storage
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
  int64_t params = 0;         // columns per row of the view (P / rows)
  const T* W = nullptr;       // [E, rows, params] view
  int64_t expert_stride = 0;  // >= the view's extent (rows - 1) * W_row_pitch + params
  const R* weights = nullptr; // [S, E], row stride E
  T* Wbar = nullptr;          // [S, rows, params] view (output)
  int64_t segment_stride = 0; // >= (rows - 1) * Wbar_row_pitch + params
  int64_t rows = 1;           // rows per view; 1: a flat view of `params` elements
  int64_t W_row_pitch = 0;    // elements between rows of W's view (>= params when rows > 1)
  int64_t Wbar_row_pitch = 0; // elements between rows of Wbar's view (>= params when rows > 1)
};

template <class T, class R = float>
struct MergeBackwardArgs {
  int64_t num_segments = 0;     // S
  int experts = 0;              // E
  int64_t params = 0;           // columns per row of the views (P / rows)
  const T* G = nullptr;         // [S, rows, params] gradient of the merged weights
  int64_t grad_segment_stride = 0;  // >= (rows - 1) * G_row_pitch + params
  const T* W = nullptr;         // [E, rows, params] expert weights (for d_weights)
  int64_t expert_stride = 0;    // >= (rows - 1) * W_row_pitch + params (when d_weights)
  const R* weights = nullptr;   // [S, E]
  T* dW = nullptr;              // [E, rows, params] (output); may be null to skip dW
  int64_t dW_expert_stride = 0; // >= (rows - 1) * dW_row_pitch + params (when dW)
  int64_t rows = 1;             // rows per view; 1: flat views of `params` elements
  int64_t G_row_pitch = 0;      // row pitches (elements), each >= params when rows > 1; ignored
  int64_t W_row_pitch = 0;      //   when rows == 1, and W's (dW's) only read when d_weights
  int64_t dW_row_pitch = 0;     //   (dW) is given
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

// One operand of a merge: `count` views (experts or segments) of rows x params elements, `pitch`
// apart row to row and `stride` apart view to view. Checks pitch >= params (rows > 1), the view's
// extent (rows - 1) * pitch + params in int64, stride >= extent and count * stride in int64; sets
// `extent` (params when rows == 1: the pitch is ignored). rows and params are already positive.
inline Status validate_merge_view(int64_t count, int64_t rows, int64_t params, int64_t pitch, int64_t stride,
                                  const char* pitch_name, const char* stride_name, int64_t& extent) {
  extent = params;
  if (rows > 1) {
    if (pitch < params) return fail(Status::kErrorInvalidShape, pitch_name, "below params (rows > 1)");
    if (!mul_fits(rows - 1, pitch) || (rows - 1) * pitch > INT64_MAX - params)
      return fail(Status::kErrorInvalidSize, pitch_name, "(rows - 1) * pitch + params overflows int64");
    extent = (rows - 1) * pitch + params;
  }
  if (stride < extent)
    return fail(Status::kErrorInvalidShape, stride_name, rows > 1 ? "below the view's extent (rows - 1) * pitch + params"
                                                                  : "below params");
  if (!mul_fits(count, stride)) return fail(Status::kErrorInvalidSize, stride_name, "count * stride overflows int64");
  return Status::kSuccess;
}

inline Status validate_merge_rows(int64_t rows) {
  return rows >= 1 ? Status::kSuccess : fail(Status::kErrorInvalidSize, "rows", "not positive");
}

// Whether a merge's views are flat: one row, or rows packed back to back in every operand the call
// reads or writes (each used pitch == params), so that flatten() describes the same elements with
// rows = 1. For launchers that take flat views only.
template <class T, class R>
bool merge_view_is_flat(const MergeForwardArgs<T, R>& a) {
  return a.rows == 1 || (a.W_row_pitch == a.params && a.Wbar_row_pitch == a.params);
}
template <class T, class R>
bool merge_view_is_flat(const MergeBackwardArgs<T, R>& a) {
  return a.rows == 1 || (a.G_row_pitch == a.params && (!a.d_weights || a.W_row_pitch == a.params) &&
                         (!a.dW || a.dW_row_pitch == a.params));
}

// A flat view as rows = 1 with params = rows * params (validated arguments, merge_view_is_flat: the
// product is the view's extent, which validation bounded). Other views come back unchanged.
template <class T, class R>
MergeForwardArgs<T, R> flatten(MergeForwardArgs<T, R> a) {
  if (a.rows == 1 || !merge_view_is_flat(a)) return a;
  a.params *= a.rows;
  a.rows = 1;
  a.W_row_pitch = a.Wbar_row_pitch = a.params;
  return a;
}
template <class T, class R>
MergeBackwardArgs<T, R> flatten(MergeBackwardArgs<T, R> a) {
  if (a.rows == 1 || !merge_view_is_flat(a)) return a;
  a.params *= a.rows;
  a.rows = 1;
  a.G_row_pitch = a.W_row_pitch = a.dW_row_pitch = a.params;
  return a;
}
}  // namespace detail

// Shape and pointer checks shared by the CPU twin and the GPU launchers.
// Aliasing: Wbar may not share memory with W or weights (every segment reads all of W). The
// aliasing ranges span each operand's views from first to last element (padding between rows
// included), so interleaved views of one buffer count as overlapping.
template <class T, class R>
Status validate(const MergeForwardArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_merge_extent(a.num_segments, a.experts, a.params));
  LORY_RETURN_IF_ERROR(detail::validate_merge_rows(a.rows));
  if (!a.W) return fail(Status::kErrorNullPointer, "W", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (!a.Wbar) return fail(Status::kErrorNullPointer, "Wbar", "is null");
  int64_t w_extent = 0, wbar_extent = 0;
  LORY_RETURN_IF_ERROR(detail::validate_merge_view(a.experts, a.rows, a.params, a.W_row_pitch, a.expert_stride,
                                                   "W_row_pitch", "expert_stride", w_extent));
  LORY_RETURN_IF_ERROR(detail::validate_merge_view(a.num_segments, a.rows, a.params, a.Wbar_row_pitch,
                                                   a.segment_stride, "Wbar_row_pitch", "segment_stride", wbar_extent));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W, "W"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.Wbar, "Wbar"));
  const detail::Operand outputs[] = {
      {"Wbar", detail::view_range(a.Wbar, a.num_segments, wbar_extent, a.segment_stride)}};
  const detail::Operand inputs[] = {{"W", detail::view_range(a.W, a.experts, w_extent, a.expert_stride)},
      {"weights", detail::array_range(a.weights, a.num_segments * a.experts)}};
  return detail::check_aliasing(outputs, inputs);
}

// Aliasing: no output (dW, d_weights) may share memory with an input (G, W, weights) or the other
// (ranges as for the forward).
template <class T, class R>
Status validate(const MergeBackwardArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_merge_extent(a.num_segments, a.experts, a.params));
  LORY_RETURN_IF_ERROR(detail::validate_merge_rows(a.rows));
  if (!a.G) return fail(Status::kErrorNullPointer, "G", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (!a.dW && !a.d_weights)
    return fail(Status::kErrorNullPointer, "dW", "dW and d_weights both null: nothing to compute");
  if (a.d_weights && !a.W) return fail(Status::kErrorNullPointer, "W", "is null (d_weights needs it)");
  int64_t g_extent = 0, w_extent = 0, dw_extent = 0;
  LORY_RETURN_IF_ERROR(detail::validate_merge_view(a.num_segments, a.rows, a.params, a.G_row_pitch,
                                                   a.grad_segment_stride, "G_row_pitch", "grad_segment_stride",
                                                   g_extent));
  if (a.d_weights)
    LORY_RETURN_IF_ERROR(detail::validate_merge_view(a.experts, a.rows, a.params, a.W_row_pitch, a.expert_stride,
                                                     "W_row_pitch", "expert_stride", w_extent));
  else if (!detail::mul_fits(a.experts, a.expert_stride))
    return fail(Status::kErrorInvalidSize, "expert_stride", "E * expert_stride overflows int64");
  if (a.dW)
    LORY_RETURN_IF_ERROR(detail::validate_merge_view(a.experts, a.rows, a.params, a.dW_row_pitch, a.dW_expert_stride,
                                                     "dW_row_pitch", "dW_expert_stride", dw_extent));
  else if (!detail::mul_fits(a.experts, a.dW_expert_stride))
    return fail(Status::kErrorInvalidSize, "dW_expert_stride", "E * dW_expert_stride overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.G, "G"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW, "dW"));
  if (a.d_weights) LORY_RETURN_IF_ERROR(detail::check_aligned(a.W, "W"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.d_weights, "d_weights"));
  const int64_t SE = a.num_segments * a.experts;
  const detail::ByteRange dW = a.dW ? detail::view_range(a.dW, a.experts, dw_extent, a.dW_expert_stride) : detail::ByteRange{};
  const detail::Operand outputs[] = {{"dW", dW},
      {"d_weights", detail::array_range(a.d_weights, SE)}};
  const detail::Operand inputs[] = {{"G", detail::view_range(a.G, a.num_segments, g_extent, a.grad_segment_stride)},
      {"W", a.d_weights ? detail::view_range(a.W, a.experts, w_extent, a.expert_stride) : detail::ByteRange{}},
      {"weights", detail::array_range(a.weights, SE)}};
  return detail::check_aliasing(outputs, inputs);
}

LORY_NAMESPACE_END
