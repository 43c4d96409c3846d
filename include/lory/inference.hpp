// lory: inference with prompt-level routing (docs/math.md, "Inference:
// prompt-level routing") -- arguments, validation, the decode-method choice rule, and the
// host-side orchestration shared by the CUDA path (inference.cuh) and the CPU
// backend (reference/inference.hpp), so the CPU tests run the very GEMM
// layouts and workspace carving the GPU runs.
//
// 1. build_prompt_cache: one routing decision per sequence from the mean of its
//    prompt, p_b = softmax(W_r mean(prompt_b) (+ bias)), written to probs [B, E];
//    optionally the merged FFN of every sequence into a caller-owned cache
//    [B, P] (P = 3 f d), per sequence [Wbar_g (f x d) | Wbar_u (f x d) | Wbar_d (d x f)]
//    (Wbar = sum_e p_b,e W_e). Every prompt has the same length L (the router's
//    prompt-level mode averages all L tokens of a sequence). Ragged prompts:
//    one call per sequence with batch = 1 and probs / cache offset to row b
//    (the cache is per-sequence contiguous, so the rows never interleave).
// 2. decode_step: B sequences, one token each, x [B, d] -> y [B, d], with
//      kMerged:      each sequence's cached merged FFN (batched GEMV, batch B);
//                    reads B * P weights per step;
//      kExpertSpace: no merged weights, by linearity
//                      a = sum_e p_e (W_g,e x), u = sum_e p_e (W_u,e x),
//                      m = silu(a) * u, y = sum_e p_e (W_d,e m);
//                    reads E * P weights per step for the whole batch (E x the FLOPs);
//      kAuto:        whichever moves fewer bytes (choose_decode_method).
//    Both are exact; they differ by rounding only.
// T = storage dtype (float / __half / __nv_bfloat16 on the GPU; double too on
// the CPU), R = routing dtype (float on the GPU).
#pragma once
#include <cstddef>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/merge.hpp"
#include "lory/moe_ffn_plan.hpp"  // StridedBatchedGemm, detail::shape_only_pointer
#include "lory/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN

enum class DecodeMethod : int {
  kAuto = 0,         // the one that moves fewer bytes (needs both inputs present, else the present one)
  kMerged = 1,       // per-sequence merged FFN from the cache
  kExpertSpace = 2,  // the E experts, combined with each sequence's routing weights
};

inline const char* decode_method_name(DecodeMethod m) {
  switch (m) {
    case DecodeMethod::kAuto: return "auto";
    case DecodeMethod::kMerged: return "merged";
    case DecodeMethod::kExpertSpace: return "expert-space";
  }
  return "unknown";
}

// Elements of the merged-FFN cache and where each matrix sits in a sequence's row.
inline int64_t merged_cache_elements(int64_t batch, const FfnShape& s) { return batch * s.params_per_expert(); }
inline int64_t merged_cache_gate_offset(const FfnShape&) { return 0; }
inline int64_t merged_cache_up_offset(const FfnShape& s) { return s.f * s.d; }
inline int64_t merged_cache_down_offset(const FfnShape& s) { return 2 * s.f * s.d; }

template <class T, class R = float>
struct PromptCacheArgs {
  int64_t batch = 0;       // B sequences
  int64_t prompt_len = 0;  // L tokens per prompt (common to every sequence)
  FfnShape shape;          // d, f, E
  const T* x = nullptr;    // [B * L, d] prompt tokens
  const T* W_r = nullptr;  // [E, d] router weight
  const R* bias = nullptr; // [E] router bias; nullable
  const T* W_g = nullptr;  // [E, f, d]; needed when cache != null
  const T* W_u = nullptr;  // [E, f, d]
  const T* W_d = nullptr;  // [E, d, f]
  R* probs = nullptr;      // out [B, E]: p_b, the routing weights of sequence b
  T* cache = nullptr;      // out [B, P] merged FFN per sequence; nullable (route only)
};

template <class T, class R = float>
struct DecodeStepArgs {
  int64_t batch = 0;  // B sequences, one token each
  FfnShape shape;
  DecodeMethod method = DecodeMethod::kAuto;
  const T* x = nullptr;      // [B, d]
  T* y = nullptr;            // [B, d]; may alias x (x is consumed before y is written)
  const T* cache = nullptr;  // kMerged: [B, P] from build_prompt_cache
  const R* probs = nullptr;  // kExpertSpace: [B, E] routing weights
  const T* W_g = nullptr;    // kExpertSpace: [E, f, d]
  const T* W_u = nullptr;    // kExpertSpace: [E, f, d]
  const T* W_d = nullptr;    // kExpertSpace: [E, d, f]
};

// out[b, i] = sum_e weights[b, e] * in[b, e, i]: the per-sequence combination
// of the E experts' outputs in the expert-space decode (in is [rows, E, cols]
// contiguous; out rows have their own stride). fp32 accumulation.
template <class T>
struct ExpertCombineArgs {
  int64_t rows = 0;  // B
  int experts = 0;   // E
  int64_t cols = 0;  // n
  const T* in = nullptr;           // [rows, E, cols]
  const float* weights = nullptr;  // [rows, E]
  T* out = nullptr;                // [rows, cols] view
  int64_t out_stride = 0;          // >= cols
};

// ---- the choice rule ---------------------------------------------------------------------

// Minimum bytes one decode step moves with a method (weights read once; every
// intermediate written once and read once). Common to both: x, y and the
// [B, 2f] gate/up and [B, f] activations. Merged: + the B cached merged FFNs
// (B * P). Expert-space: + the E experts (E * P) + the per-expert outputs
// [B, E, f] twice (gate, up) and [B, E, d], each written and read, + the routing
// weights (read three times). Building the cache (B * P written once per
// sequence, amortised over the generated tokens) is not a per-step cost.
inline double decode_step_bytes(DecodeMethod m, int64_t batch, const FfnShape& s, size_t elem_bytes) {
  const double B = static_cast<double>(batch), E = s.experts, d = static_cast<double>(s.d),
               f = static_cast<double>(s.f), P = static_cast<double>(s.params_per_expert()),
               el = static_cast<double>(elem_bytes);
  const double common = B * (2 * d + 6 * f) * el;
  if (m == DecodeMethod::kMerged) return common + B * P * el;
  return common + E * P * el + 2 * B * E * (2 * f + d) * el + 3 * B * E * 4.0;
}

// FLOPs of one decode step (multiply-adds x 2; SwiGLU and the combination not counted).
inline double decode_step_flops(DecodeMethod m, int64_t batch, const FfnShape& s) {
  const double dense = 2.0 * static_cast<double>(batch) * static_cast<double>(s.params_per_expert());
  return m == DecodeMethod::kMerged ? dense : dense * s.experts;
}

// kMerged when it moves no more bytes than kExpertSpace (a tie goes to merged:
// it does E times fewer FLOPs). Roughly: merged for B <= E, expert-space above.
inline DecodeMethod choose_decode_method(int64_t batch, const FfnShape& s, size_t elem_bytes) {
  return decode_step_bytes(DecodeMethod::kMerged, batch, s, elem_bytes) <=
                 decode_step_bytes(DecodeMethod::kExpertSpace, batch, s, elem_bytes)
             ? DecodeMethod::kMerged
             : DecodeMethod::kExpertSpace;
}

// The method a call runs: the forced one, else the rule when both inputs are
// present, else the one whose inputs are present (validate() reports a lack).
template <class T, class R>
DecodeMethod resolve_decode_method(const DecodeStepArgs<T, R>& a) {
  if (a.method != DecodeMethod::kAuto) return a.method;
  const bool merged_ok = a.cache != nullptr;
  const bool experts_ok = a.probs && a.W_g && a.W_u && a.W_d;
  if (merged_ok && experts_ok) return choose_decode_method(a.batch, a.shape, sizeof(T));
  return experts_ok ? DecodeMethod::kExpertSpace : DecodeMethod::kMerged;
}

// ---- validation --------------------------------------------------------------------------

// Aliasing: the outputs (probs, cache) may not share memory with an input or with each other.
template <class T, class R>
Status validate(const PromptCacheArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  if (a.batch <= 0) return fail(Status::kErrorInvalidSize, "batch", "not positive");
  if (a.prompt_len <= 0) return fail(Status::kErrorInvalidSize, "prompt_len", "not positive");
  LORY_RETURN_IF_ERROR(a.shape.validate());
  if (!a.x) return fail(Status::kErrorNullPointer, "x", "is null");
  if (!a.W_r) return fail(Status::kErrorNullPointer, "W_r", "is null");
  if (!a.probs) return fail(Status::kErrorNullPointer, "probs", "is null");
  if (a.cache) {
    if (!a.W_g) return fail(Status::kErrorNullPointer, "W_g", "is null (cache needs it)");
    if (!a.W_u) return fail(Status::kErrorNullPointer, "W_u", "is null (cache needs it)");
    if (!a.W_d) return fail(Status::kErrorNullPointer, "W_d", "is null (cache needs it)");
  }
  if (!detail::mul_fits(a.batch, a.prompt_len) || !detail::mul_fits(a.batch * a.prompt_len, a.shape.d))
    return fail(Status::kErrorInvalidSize, "prompt_len", "B * L * d overflows int64");
  if (!detail::mul_fits(a.batch, a.shape.params_per_expert()))
    return fail(Status::kErrorInvalidSize, "batch", "B * 3 d f overflows int64");
  if (!detail::mul_fits(a.shape.experts, a.shape.params_per_expert()))
    return fail(Status::kErrorInvalidSize, "shape", "E * 3 d f overflows int64");
  if (!detail::mul_fits(a.batch, a.shape.experts))
    return fail(Status::kErrorInvalidSize, "batch", "B * E overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.x, "x"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_r, "W_r"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.bias, "bias"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.probs, "probs"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.cache, "cache"));
  if (a.cache) {
    LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_g, "W_g"));
    LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_u, "W_u"));
    LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_d, "W_d"));
  }
  const int64_t B = a.batch, d = a.shape.d, E = a.shape.experts, P = a.shape.params_per_expert(), fd = a.shape.f * d;
  const bool merged = a.cache != nullptr;
  const detail::Operand outputs[] = {{"probs", detail::array_range(a.probs, B * E)},
                                     {"cache", detail::array_range(a.cache, B * P)}};
  const detail::Operand inputs[] = {{"x", detail::array_range(a.x, B * a.prompt_len * d)},
      {"W_r", detail::array_range(a.W_r, E * d)},
      {"bias", detail::array_range(a.bias, E)},
      {"W_g", merged ? detail::array_range(a.W_g, E * fd) : detail::ByteRange{}},
      {"W_u", merged ? detail::array_range(a.W_u, E * fd) : detail::ByteRange{}},
      {"W_d", merged ? detail::array_range(a.W_d, E * fd) : detail::ByteRange{}}};
  return detail::check_aliasing(outputs, inputs);
}

// Aliasing: y may be x itself (x is consumed before y is written); no other sharing.
template <class T, class R>
Status validate(const DecodeStepArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  if (a.batch <= 0) return fail(Status::kErrorInvalidSize, "batch", "not positive");
  LORY_RETURN_IF_ERROR(a.shape.validate());
  if (a.method != DecodeMethod::kAuto && a.method != DecodeMethod::kMerged &&
      a.method != DecodeMethod::kExpertSpace)
    return fail(Status::kErrorInvalidArgument, "method", "not a DecodeMethod");
  if (!a.x) return fail(Status::kErrorNullPointer, "x", "is null");
  if (!a.y) return fail(Status::kErrorNullPointer, "y", "is null");
  const int64_t B = a.batch, d = a.shape.d, E = a.shape.experts, P = a.shape.params_per_expert();
  const int64_t wide = a.shape.d > a.shape.f ? a.shape.d : a.shape.f;
  if (!detail::mul_fits(B, 2 * wide))
    return fail(Status::kErrorInvalidSize, "batch", "B * 2 max(d, f) overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.x, "x"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.y, "y"));
  const detail::ByteRange ry = detail::array_range(a.y, B * d), rx = detail::array_range(a.x, B * d);
  if (resolve_decode_method(a) == DecodeMethod::kMerged) {
    if (!a.cache) return fail(Status::kErrorNullPointer, "cache", "is null (merged decode needs it)");
    if (!detail::mul_fits(B, P)) return fail(Status::kErrorInvalidSize, "batch", "B * 3 d f overflows int64");
    LORY_RETURN_IF_ERROR(detail::check_aligned(a.cache, "cache"));
    const detail::Operand outputs[] = {{"y", ry, "x"}};
    const detail::Operand inputs[] = {{"x", rx}, {"cache", detail::array_range(a.cache, B * P)}};
    return detail::check_aliasing(outputs, inputs);
  }
  if (!a.probs) return fail(Status::kErrorNullPointer, "probs", "is null (expert-space decode needs it)");
  if (!a.W_g) return fail(Status::kErrorNullPointer, "W_g", "is null (expert-space decode needs it)");
  if (!a.W_u) return fail(Status::kErrorNullPointer, "W_u", "is null (expert-space decode needs it)");
  if (!a.W_d) return fail(Status::kErrorNullPointer, "W_d", "is null (expert-space decode needs it)");
  if (!detail::mul_fits(E, P)) return fail(Status::kErrorInvalidSize, "shape", "E * 3 d f overflows int64");
  if (!detail::mul_fits(B, E) || !detail::mul_fits(B * E, wide))
    return fail(Status::kErrorInvalidSize, "batch", "B * E * max(d, f) overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.probs, "probs"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_g, "W_g"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_u, "W_u"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_d, "W_d"));
  const int64_t fd = a.shape.f * d;
  const detail::Operand outputs[] = {{"y", ry, "x"}};
  const detail::Operand inputs[] = {{"x", rx}, {"probs", detail::array_range(a.probs, B * E)},
      {"W_g", detail::array_range(a.W_g, E * fd)},
      {"W_u", detail::array_range(a.W_u, E * fd)},
      {"W_d", detail::array_range(a.W_d, E * fd)}};
  return detail::check_aliasing(outputs, inputs);
}

template <class T>
Status validate(const ExpertCombineArgs<T>& a) {
  detail::clear_error_detail();
  using detail::fail;
  if (a.rows <= 0) return fail(Status::kErrorInvalidSize, "rows", "not positive");
  if (a.cols <= 0) return fail(Status::kErrorInvalidSize, "cols", "not positive");
  if (a.experts <= 0 || a.experts > kMaxExperts)
    return fail(Status::kErrorUnsupportedExpertCount, "experts", "outside [1, kMaxExperts]");
  if (!a.in) return fail(Status::kErrorNullPointer, "in", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (!a.out) return fail(Status::kErrorNullPointer, "out", "is null");
  if (a.out_stride < a.cols) return fail(Status::kErrorInvalidShape, "out_stride", "below cols");
  if (!detail::mul_fits(a.rows, a.experts) || !detail::mul_fits(a.rows * a.experts, a.cols))
    return fail(Status::kErrorInvalidSize, "cols", "rows * E * cols overflows int64");
  if (!detail::mul_fits(a.rows, a.out_stride))
    return fail(Status::kErrorInvalidSize, "out_stride", "rows * out_stride overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.in, "in"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.out, "out"));
  const detail::Operand outputs[] = {{"out", detail::view_range(a.out, a.rows, a.cols, a.out_stride)}};
  const detail::Operand inputs[] = {{"in", detail::array_range(a.in, a.rows * a.experts * a.cols)},
      {"weights", detail::array_range(a.weights, a.rows * a.experts)}};
  return detail::check_aliasing(outputs, inputs);
}

// ---- orchestration (written once; Backend = InferenceCudaBackend or reference::InferenceCpuBackend) ----
//
// A Backend here is a MoE FFN plan backend (lory/moe_ffn_plan.hpp) plus
//   template <class T> static Status expert_combine(const ExpertCombineArgs<T>&, void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status can_implement_prompt(const PromptCacheArgs<T, float>&);
//   template <class T> static Status can_implement_decode(const DecodeStepArgs<T, float>&);
// Workspaces (detail::WorkspaceCarver, 256-byte aligned pieces):
//   prompt cache: hbar [B, d] fp32, router probabilities [B, E] fp32, leaf scratch
//   decode, merged:       au [B, 2f] T (a | u per row), m [B, f] T, leaf scratch
//   decode, expert-space: + H [B, E, max(f, d)] T (per-expert outputs)
// The leaf scratch is at least 256 bytes, so a leaf never mistakes a real call
// for a size query.

namespace detail {

struct PromptCacheWorkspace {
  float* hbar = nullptr;
  float* router_probs = nullptr;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  size_t total_bytes = 0;
  Status status = Status::kSuccess;  // kErrorInvalidSize when the size overflows size_t
  static PromptCacheWorkspace carve(void* base, int64_t B, const FfnShape& s, size_t scratch_bytes) {
    PromptCacheWorkspace w;
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    w.hbar = c.take<float>(B, s.d);
    w.router_probs = c.take<float>(B, s.experts);
    w.scratch_bytes = align_up(scratch_bytes < 256 ? 256 : scratch_bytes);
    w.scratch = c.take_bytes(w.scratch_bytes);
    w.status = c.total(w.total_bytes);
    return w;
  }
};

template <class T>
struct DecodeWorkspace {
  T* au = nullptr;
  T* m = nullptr;
  T* H = nullptr;  // expert-space only
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  size_t total_bytes = 0;
  Status status = Status::kSuccess;  // kErrorInvalidSize when the size overflows size_t
  static DecodeWorkspace carve(void* base, int64_t B, const FfnShape& s, DecodeMethod method, size_t scratch_bytes) {
    DecodeWorkspace w;
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t wide = s.d > s.f ? s.d : s.f;
    w.au = c.take<T>(B, 2, s.f);
    w.m = c.take<T>(B, s.f);
    if (method == DecodeMethod::kExpertSpace) w.H = c.take<T>(B, s.experts, wide);
    w.scratch_bytes = align_up(scratch_bytes < 256 ? 256 : scratch_bytes);
    w.scratch = c.take_bytes(w.scratch_bytes);
    w.status = c.total(w.total_bytes);
    return w;
  }
};

// The leaf arguments of a prompt-cache build, given the workspace's hbar and
// router probabilities (shape-only pointers for a size query).
template <class T>
RouterForwardArgs<T, float> prompt_router_args(const PromptCacheArgs<T, float>& a, float* hbar, float* probs) {
  RouterForwardArgs<T, float> r;
  r.layout = SegmentLayout{a.batch, a.prompt_len, a.prompt_len};  // one segment per sequence
  r.d = a.shape.d;
  r.experts = a.shape.experts;
  r.mode = RoutingMode::kPromptLevel;
  r.x = a.x;
  r.W_r = a.W_r;
  r.bias = a.bias;
  r.hbar = hbar;
  r.probs = probs;
  r.weights = a.probs;  // one segment per sequence: the weights are p_b
  return r;
}

template <class T>
MergeForwardArgs<T, float> prompt_merge_args(const PromptCacheArgs<T, float>& a, int matrix) {
  const int64_t fd = a.shape.f * a.shape.d;
  const T* W[3] = {a.W_g, a.W_u, a.W_d};
  MergeForwardArgs<T, float> m;
  m.num_segments = a.batch;
  m.experts = a.shape.experts;
  m.params = fd;
  m.W = W[matrix];
  m.expert_stride = fd;
  m.weights = a.probs;
  m.Wbar = a.cache + matrix * fd;
  m.segment_stride = a.shape.params_per_expert();
  return m;
}

// Largest workspace any leaf asks for (each query validates the leaf's arguments).
template <class Backend, class T>
Status prompt_cache_scratch(const PromptCacheArgs<T, float>& a, size_t& need) {
  const typename Backend::Stream stream{};
  need = 0;
  size_t bytes = 0;
  const RouterForwardArgs<T, float> r =
      prompt_router_args(a, shape_only_pointer<float>(), shape_only_pointer<float>());
  LORY_RETURN_IF_ERROR(Backend::template router_forward<T>(r, nullptr, bytes, stream));
  need = bytes > need ? bytes : need;
  if (a.cache) {
    for (int i = 0; i < 3; ++i) {
      LORY_RETURN_IF_ERROR(Backend::template merge_forward<T>(prompt_merge_args(a, i), nullptr, bytes, stream));
      need = bytes > need ? bytes : need;
    }
  }
  return Status::kSuccess;
}

template <class T>
SwigluForwardArgs<T> decode_swiglu_args(int64_t B, const FfnShape& s, const T* au, T* m) {
  SwigluForwardArgs<T> sw;
  sw.rows = B;
  sw.cols = s.f;
  sw.a = au; sw.a_stride = 2 * s.f;
  sw.u = au + s.f; sw.u_stride = 2 * s.f;
  sw.m = m; sw.m_stride = s.f;
  return sw;
}

template <class T>
ExpertCombineArgs<T> decode_combine_args(int64_t B, const FfnShape& s, int64_t cols, const T* H,
                                         const float* probs, T* out, int64_t out_stride) {
  ExpertCombineArgs<T> c;
  c.rows = B;
  c.experts = s.experts;
  c.cols = cols;
  c.in = H;
  c.weights = probs;
  c.out = out;
  c.out_stride = out_stride;
  return c;
}

template <class Backend, class T>
Status decode_scratch(const DecodeStepArgs<T, float>& a, DecodeMethod method, size_t& need) {
  const typename Backend::Stream stream{};
  const FfnShape& s = a.shape;
  need = 0;
  size_t bytes = 0;
  LORY_RETURN_IF_ERROR(Backend::template swiglu_forward<T>(
      decode_swiglu_args<T>(a.batch, s, shape_only_pointer<const T>(), shape_only_pointer<T>()), nullptr, bytes,
      stream));
  need = bytes > need ? bytes : need;
  if (method == DecodeMethod::kExpertSpace) {
    const int64_t cols[2] = {s.f, s.d};
    for (int64_t n : cols) {
      LORY_RETURN_IF_ERROR(Backend::template expert_combine<T>(
          decode_combine_args<T>(a.batch, s, n, shape_only_pointer<const T>(), a.probs, shape_only_pointer<T>(), n),
          nullptr, bytes, stream));
      need = bytes > need ? bytes : need;
    }
  }
  return Status::kSuccess;
}

// Row-major C = A op(B) with one strided batch (see StridedBatchedGemm).
template <class T>
StridedBatchedGemm<T> decode_gemm(int64_t m, int64_t n, int64_t k, int64_t batch, const T* A, int64_t lda,
                                  int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b, T* C, int64_t ldc,
                                  int64_t stride_c) {
  StridedBatchedGemm<T> g;
  g.m = m; g.n = n; g.k = k; g.batch = batch;
  g.trans_a = false; g.trans_b = true;  // every weight is stored [out, in]
  g.alpha = 1.f; g.beta = 0.f;
  g.A = A; g.lda = lda; g.stride_a = stride_a;
  g.B = B; g.ldb = ldb; g.stride_b = stride_b;
  g.C = C; g.ldc = ldc; g.stride_c = stride_c;
  return g;
}

}  // namespace detail

// Routing decisions (and the merged-FFN cache) for B prompts. Stream: the
// backend's execution context (for the CUDA backend no cuBLAS handle is needed).
template <class Backend, class T>
Status run_prompt_cache(const PromptCacheArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                        typename Backend::Stream stream) {
  LORY_RETURN_IF_ERROR(validate(a));
  LORY_RETURN_IF_ERROR(Backend::template can_implement_prompt<T>(a));
  size_t scratch = 0;
  LORY_RETURN_IF_ERROR((detail::prompt_cache_scratch<Backend, T>(a, scratch)));
  const detail::PromptCacheWorkspace sized = detail::PromptCacheWorkspace::carve(nullptr, a.batch, a.shape, scratch);
  LORY_RETURN_IF_ERROR(sized.status);
  const size_t needed = sized.total_bytes;
  bool size_query = false;
  LORY_RETURN_IF_ERROR(
      detail::workspace_protocol(workspace, workspace_bytes, needed, size_query, detail::kCarvedWorkspaceAlign));
  if (size_query) return Status::kSuccess;
  const detail::PromptCacheWorkspace w = detail::PromptCacheWorkspace::carve(workspace, a.batch, a.shape, scratch);
  size_t leaf_bytes = w.scratch_bytes;
  LORY_RETURN_IF_ERROR(Backend::template router_forward<T>(detail::prompt_router_args(a, w.hbar, w.router_probs),
                                                           w.scratch, leaf_bytes, stream));
  if (a.cache) {
    // One merge per matrix over all B sequences; each writes its third of every cache row.
    for (int i = 0; i < 3; ++i) {
      leaf_bytes = w.scratch_bytes;
      LORY_RETURN_IF_ERROR(
          Backend::template merge_forward<T>(detail::prompt_merge_args(a, i), w.scratch, leaf_bytes, stream));
    }
  }
  return Status::kSuccess;
}

// One decode step for B sequences (method resolved by resolve_decode_method).
template <class Backend, class T>
Status run_decode_step(const DecodeStepArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                       typename Backend::Stream stream) {
  LORY_RETURN_IF_ERROR(validate(a));
  LORY_RETURN_IF_ERROR(Backend::template can_implement_decode<T>(a));
  const DecodeMethod method = resolve_decode_method(a);
  using Workspace = detail::DecodeWorkspace<T>;
  // The activations' size first: the scratch queries offset shape-only pointers by these extents.
  LORY_RETURN_IF_ERROR(Workspace::carve(nullptr, a.batch, a.shape, method, 0).status);
  size_t scratch = 0;
  LORY_RETURN_IF_ERROR((detail::decode_scratch<Backend, T>(a, method, scratch)));
  const Workspace sized = Workspace::carve(nullptr, a.batch, a.shape, method, scratch);
  LORY_RETURN_IF_ERROR(sized.status);
  const size_t needed = sized.total_bytes;
  bool size_query = false;
  LORY_RETURN_IF_ERROR(
      detail::workspace_protocol(workspace, workspace_bytes, needed, size_query, detail::kCarvedWorkspaceAlign));
  if (size_query) return Status::kSuccess;
  LORY_RETURN_IF_ERROR(Backend::check_stream(stream));
  const Workspace w = Workspace::carve(workspace, a.batch, a.shape, method, scratch);
  const int64_t B = a.batch, d = a.shape.d, f = a.shape.f, E = a.shape.experts;
  const int64_t P = a.shape.params_per_expert();
  size_t leaf_bytes = w.scratch_bytes;
  auto swiglu = [&] {
    leaf_bytes = w.scratch_bytes;
    return Backend::template swiglu_forward<T>(detail::decode_swiglu_args<T>(B, a.shape, w.au, w.m), w.scratch,
                                               leaf_bytes, stream);
  };

  if (method == DecodeMethod::kMerged) {
    // [a | u]_b = x_b [Wbar_g; Wbar_u]_b^T: the gate and up matrices sit back to
    // back in a cache row, one [2f, d] matrix, so one batched GEMV serves both.
    LORY_RETURN_IF_ERROR(Backend::template gemm<T>(
        detail::decode_gemm<T>(1, 2 * f, d, B, a.x, d, d, a.cache + merged_cache_gate_offset(a.shape), d, P, w.au,
                               2 * f, 2 * f),
        stream));
    LORY_RETURN_IF_ERROR(swiglu());
    // y_b = m_b Wbar_d(b)^T
    return Backend::template gemm<T>(
        detail::decode_gemm<T>(1, d, f, B, w.m, f, f, a.cache + merged_cache_down_offset(a.shape), f, P, a.y, d, d),
        stream);
  }

  // Expert-space. The E experts of a matrix stacked are one [E * rows, cols]
  // matrix, so a single GEMM gives every expert's output for every sequence,
  // H [B, E, n]; expert_combine then weighs them with each sequence's p.
  const T* W_gu[2] = {a.W_g, a.W_u};
  for (int i = 0; i < 2; ++i) {
    LORY_RETURN_IF_ERROR(Backend::template gemm<T>(
        detail::decode_gemm<T>(B, E * f, d, 1, a.x, d, 0, W_gu[i], d, 0, w.H, E * f, 0), stream));
    leaf_bytes = w.scratch_bytes;
    LORY_RETURN_IF_ERROR(Backend::template expert_combine<T>(
        detail::decode_combine_args<T>(B, a.shape, f, w.H, a.probs, w.au + i * f, 2 * f), w.scratch, leaf_bytes,
        stream));
  }
  LORY_RETURN_IF_ERROR(swiglu());
  LORY_RETURN_IF_ERROR(Backend::template gemm<T>(
      detail::decode_gemm<T>(B, E * d, f, 1, w.m, f, 0, a.W_d, f, 0, w.H, E * d, 0), stream));
  leaf_bytes = w.scratch_bytes;
  return Backend::template expert_combine<T>(detail::decode_combine_args<T>(B, a.shape, d, w.H, a.probs, a.y, d),
                                             w.scratch, leaf_bytes, stream);
}

LORY_NAMESPACE_END
