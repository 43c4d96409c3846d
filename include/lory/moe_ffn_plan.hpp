// lory: the segment-level MoE FFN layer (training forward and backward) as a
// plan object, CUTLASS style: can_implement() -> workspace_size() ->
// forward()/backward(). The orchestration here (routing bookkeeping, chunking,
// workspace layout, GEMM batching) is written once and shared by every
// backend; only the leaf operations differ:
//   reference::MoeFfnCpuBackend (reference/moe_ffn_backend.hpp): CPU twins,
//     so the CPU tests run the very code that drives the GPU;
//   MoeFfnCudaBackend (moe_ffn.cuh): the CUDA launchers and cuBLAS.
//
// A Backend is a struct of static leaf operations:
//   using Stream = ...;  // cudaStream_t + cuBLAS handle on the GPU; a dummy on the CPU
//   template <class T> static Status router_forward (const RouterForwardArgs<T, float>&,  void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status router_backward(const RouterBackwardArgs<T, float>&, void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status merge_forward  (const MergeForwardArgs<T, float>&,   void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status merge_backward (const MergeBackwardArgs<T, float>&,  MergeBackwardMethod,
//                                                    void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status swiglu_forward (const SwigluForwardArgs<T>&,         void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status swiglu_backward(const SwigluBackwardArgs<T>&,        void* ws, size_t& ws_bytes, Stream);
//   template <class T> static Status gemm(const StridedBatchedGemm<T>&, Stream);
//   template <class T> static Status can_implement(const SegmentLayout&, const FfnShape&);  // backend limits
//   static Status check_stream(const Stream&);  // before any launch of a forward / backward
// Leaf operations follow the launcher protocol: ws == nullptr asks for the size.
//
// Forward, per chunk of consecutive segments (after the router has written
// hbar / probs / weights into the caller's buffers):
//   Wbar_{g,u,d} = merge(W_{g,u,d}, weights)               -> workspace
//   a = x Wbar_g^T, u = x Wbar_u^T, m = silu(a) * u, y = m Wbar_d^T   (per segment)
// Backward, per chunk: recompute Wbar, a, u, m, then
//   dm = dy Wbar_d;  G_d = dy^T m  (over Wbar_d, no longer needed)
//   da, du = swiglu_backward(a, u, dm)
//   dx = da Wbar_g + du Wbar_u;  G_g = da^T x, G_u = du^T x  (over Wbar_g, Wbar_u)
//   dW_{g,u,d} (+)= merge_backward(G), d_weights = sum over the three matrices
// and after the last chunk the router backward adds the router path into dx.
// Merged weights are never kept between passes (recomputing them costs E/T of
// the FFN's FLOPs; storing them costs S * P values).
#pragma once
#include <cstddef>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/merge.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN

struct MoeFfnOptions {
  size_t workspace_budget_bytes = 0;  // 0: no limit -> all segments in one chunk
  int64_t max_chunk_segments = 0;     // 0: as many as the budget allows
  // How the backward's merge backward runs on the GPU (lory/merge.hpp: the fused kernel, two cuBLAS
  // GEMMs, or kAuto's pick per shape); the CPU backend has one way and ignores it.
  MergeBackwardMethod merge_backward = MergeBackwardMethod::kAuto;
};

// C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b] for b < batch, with ROW-MAJOR
// semantics: element (i, j) of a matrix X with leading dimension ldX is
// X[i * ldX + j]; op(A) is [m, k] (A itself [k, m] when trans_a), op(B) is
// [k, n] (B itself [n, k] when trans_b), C is [m, n]. Batch entry b starts at
// X + b * stride_X. Products accumulate in fp32; beta == 0 never reads C.
template <class T>
struct StridedBatchedGemm {
  int64_t m = 0, n = 0, k = 0, batch = 0;
  bool trans_a = false, trans_b = false;
  float alpha = 1.f, beta = 0.f;
  const T* A = nullptr; int64_t lda = 0, stride_a = 0;
  const T* B = nullptr; int64_t ldb = 0, stride_b = 0;
  T* C = nullptr;       int64_t ldc = 0, stride_c = 0;
};

template <class T>
Status validate(const StridedBatchedGemm<T>& g) {
  detail::clear_error_detail();
  using detail::fail;
  if (g.m <= 0 || g.n <= 0 || g.k <= 0 || g.batch <= 0)
    return fail(Status::kErrorInvalidSize, "m, n, k or batch", "not positive");
  if (!g.A) return fail(Status::kErrorNullPointer, "A", "is null");
  if (!g.B) return fail(Status::kErrorNullPointer, "B", "is null");
  if (!g.C) return fail(Status::kErrorNullPointer, "C", "is null");
  if (g.lda < (g.trans_a ? g.m : g.k)) return fail(Status::kErrorInvalidShape, "lda", "below the row width");
  if (g.ldb < (g.trans_b ? g.k : g.n)) return fail(Status::kErrorInvalidShape, "ldb", "below the row width");
  if (g.ldc < g.n) return fail(Status::kErrorInvalidShape, "ldc", "below n");
  if (g.stride_a < 0 || g.stride_b < 0 || g.stride_c < 0)
    return fail(Status::kErrorInvalidShape, "stride_a, stride_b or stride_c", "negative");
  LORY_RETURN_IF_ERROR(detail::check_aligned(g.A, "A"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(g.B, "B"));
  return detail::check_aligned(g.C, "C");
}

namespace detail {

// A set of segments with the same length whose tokens (and merged weights)
// sit at a constant stride: one strided-batched GEMM per matrix serves it.
struct MoeSegmentGroup {
  int64_t first = 0;         // first segment
  int64_t count = 0;         // segments in the group (the GEMM batch)
  int64_t segment_step = 1;  // segment index distance between batch entries
  int64_t rows = 0;          // tokens per segment (the GEMM's m or k)
  int64_t token_stride = 0;  // token distance between batch entries
};

// The workspace of one plan, carved with detail::WorkspaceCarver (every piece
// 256-byte aligned, in this order):
//   d_weights [S, E] fp32                  dL/de when the caller passes no buffer
//   scratch   leaf operations' own workspace (>= 256 bytes, so never null)
//   wbar_g    [C, f, d] T                  merged W_g; G_g in the backward
//   wbar_u    [C, f, d] T                  merged W_u; G_u in the backward
//   wbar_d    [C, d, f] T                  merged W_d; G_d in the backward
//   act_a, act_u [C * Tmax, f] T           a = x Wbar_g^T, u = x Wbar_u^T
//   act_m     [C * Tmax, f] T              m (forward); da (backward)
//   act_dm, act_du [C * Tmax, f] T         backward only
// with C = chunk segments and Tmax = min(T, L) tokens per segment. The total is
// the exact end of act_du (no tail padding): it grows with every added segment,
// so a budget of workspace_size_for_chunk(c) gives exactly chunk c. A size past
// size_t sets `status` to kErrorInvalidSize.
template <class T>
struct MoeFfnWorkspace {
  float* d_weights = nullptr;
  T* wbar_g = nullptr;
  T* wbar_u = nullptr;
  T* wbar_d = nullptr;
  T* act_a = nullptr;
  T* act_u = nullptr;
  T* act_m = nullptr;
  T* act_dm = nullptr;
  T* act_du = nullptr;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  size_t total_bytes = 0;
  Status status = Status::kSuccess;

  static MoeFfnWorkspace carve(void* base, const SegmentLayout& lay, const FfnShape& sh, int64_t chunk,
                               size_t scratch_bytes) {
    MoeFfnWorkspace w;
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t fd = sh.f * sh.d;  // validated: 3 f d fits
    const int64_t tmax = lay.segment_len < lay.seq_len ? lay.segment_len : lay.seq_len;
    w.d_weights = c.take<float>(lay.num_segments(), sh.experts);
    w.scratch_bytes = align_up(scratch_bytes < 256 ? 256 : scratch_bytes);
    w.scratch = c.take_bytes(w.scratch_bytes);
    w.wbar_g = c.take<T>(chunk, fd);
    w.wbar_u = c.take<T>(chunk, fd);
    w.wbar_d = c.take<T>(chunk, fd);
    w.act_a = c.take<T>(chunk, tmax, sh.f);
    w.act_u = c.take<T>(chunk, tmax, sh.f);
    w.act_m = c.take<T>(chunk, tmax, sh.f);
    w.act_dm = c.take<T>(chunk, tmax, sh.f);
    w.act_du = c.take<T>(chunk, tmax, sh.f);
    w.status = c.total(w.total_bytes, /*exact_end=*/true);
    return w;
  }
};

// A non-null, 4 KiB-aligned address that is never dereferenced: it fills the
// pointers of shape-only argument structs used to ask a leaf operation for its
// workspace size (validation runs before the query and rejects null pointers).
template <class P>
P* shape_only_pointer() {
  return reinterpret_cast<P*>(kShapeOnlyAddress);
}

}  // namespace detail

template <class T, class Backend>
class MoeFfnPlan {
 public:
  using Stream = typename Backend::Stream;
  using Workspace = detail::MoeFfnWorkspace<T>;

  MoeFfnPlan(SegmentLayout layout, FfnShape shape, RoutingMode mode, MoeFfnOptions options = {})
      : layout_(layout), shape_(shape), mode_(mode), options_(options) {
    status_ = init();
    init_detail_ = status_ == Status::kSuccess ? ErrorDetail{} : last_error_detail();
  }

  // Whether this plan can run: valid shapes, mode and options, and a budget at
  // least min_workspace_size(). Checked again by forward() and backward().
  Status can_implement() const { return plan_status(); }

  // Workspace bytes for chunk_segments() segments per chunk (forward and backward).
  size_t workspace_size() const { return workspace_bytes_; }
  // Smallest workspace any plan of these shapes can run with (one segment per chunk).
  size_t min_workspace_size() const { return min_workspace_bytes_; }
  int64_t chunk_segments() const { return chunk_; }
  // Workspace bytes for a given chunk size (monotone in chunk); 0 if the shapes are invalid.
  size_t workspace_size_for_chunk(int64_t chunk) const {
    size_t bytes = 0;
    return size_for_chunk(chunk, bytes) == Status::kSuccess ? bytes : 0;
  }

  const SegmentLayout& layout() const { return layout_; }
  const FfnShape& shape() const { return shape_; }
  RoutingMode mode() const { return mode_; }

  // workspace: workspace_bytes >= workspace_size(), 16-byte aligned. Unlike a launcher's, the plan's
  // workspace argument is not a size query (workspace_size() is, and workspace_bytes is taken by
  // value): a null workspace is kErrorNullPointer naming "workspace". Aliasing (moe_ffn.hpp): y may
  // be x, dx may be dy; nothing else may share memory.
  Status forward(const MoeFfnForwardArgs<T, float>& a, void* workspace, size_t workspace_bytes, Stream stream) const {
    LORY_RETURN_IF_ERROR(plan_status());
    LORY_RETURN_IF_ERROR(check_matches(a.p));  // first: the extents validate() checks come from a.p
    LORY_RETURN_IF_ERROR(validate(a));
    LORY_RETURN_IF_ERROR(check_call(workspace, workspace_bytes, stream));
    const Workspace w = Workspace::carve(workspace, layout_, shape_, chunk_, scratch_bytes_);
    const int E = shape_.experts;

    // 1. Router: hbar, probs, weights into the caller's buffers (saved for the backward).
    RouterForwardArgs<T, float> r;
    r.layout = layout_;
    r.d = shape_.d;
    r.experts = E;
    r.mode = mode_;
    r.x = a.x;
    r.W_r = a.p.W_r;
    r.bias = a.p.bias;
    r.given_weights = a.p.given_weights;
    r.hbar = a.hbar;
    r.probs = a.probs;
    r.weights = a.weights;
    LORY_RETURN_IF_ERROR(leaf(Backend::template router_forward<T>, r, w, stream));

    // 2. Per chunk: merge, then the merged SwiGLU FFN.
    const int64_t S = layout_.num_segments();
    for (int64_t s0 = 0; s0 < S; s0 += chunk_) {
      const int64_t s1 = s0 + chunk_ < S ? s0 + chunk_ : S;
      LORY_RETURN_IF_ERROR(merge_chunk(a.p, a.weights, s0, s1, w, stream));
      LORY_RETURN_IF_ERROR(gate_up_chunk(a.x, s0, s1, w, stream));
      LORY_RETURN_IF_ERROR(swiglu_chunk(s0, s1, w, stream));
      const Status st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
        // y = m Wbar_d^T: [rows, f] x [d, f]^T
        return gemm(g, s0, false, true, g.rows, shape_.d, shape_.f,
                    w.act_m, Op::kAct, w.wbar_d, Op::kWeights, a.y, Op::kTokens, 0.f, stream);
      });
      LORY_RETURN_IF_ERROR(st);
    }
    return Status::kSuccess;
  }

  Status backward(const MoeFfnBackwardArgs<T, float>& a, void* workspace, size_t workspace_bytes, Stream stream) const {
    LORY_RETURN_IF_ERROR(plan_status());
    LORY_RETURN_IF_ERROR(check_matches(a.p));  // first: the extents validate() checks come from a.p
    LORY_RETURN_IF_ERROR(validate(a));
    LORY_RETURN_IF_ERROR(check_call(workspace, workspace_bytes, stream));
    const Workspace w = Workspace::carve(workspace, layout_, shape_, chunk_, scratch_bytes_);
    const int E = shape_.experts;
    const int64_t d = shape_.d, f = shape_.f, fd = f * d;
    float* d_weights = a.d_weights ? a.d_weights : w.d_weights;

    const int64_t S = layout_.num_segments();
    for (int64_t s0 = 0; s0 < S; s0 += chunk_) {
      const int64_t s1 = s0 + chunk_ < S ? s0 + chunk_ : S;
      // Recompute the merge and the activations (never stored between passes).
      LORY_RETURN_IF_ERROR(merge_chunk(a.p, a.weights, s0, s1, w, stream));
      LORY_RETURN_IF_ERROR(gate_up_chunk(a.x, s0, s1, w, stream));
      LORY_RETURN_IF_ERROR(swiglu_chunk(s0, s1, w, stream));
      // dm = dy Wbar_d for every group first: G_d then overwrites Wbar_d.
      Status st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
        return gemm(g, s0, false, false, g.rows, f, d, a.dy, Op::kTokens, w.wbar_d, Op::kWeights,
                    w.act_dm, Op::kAct, 0.f, stream);
      });
      LORY_RETURN_IF_ERROR(st);
      // G_d = dy^T m: [d, rows] x [rows, f], K = tokens of the segment.
      st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
        return gemm(g, s0, true, false, d, f, g.rows, a.dy, Op::kTokens, w.act_m, Op::kAct,
                    w.wbar_d, Op::kWeights, 0.f, stream);
      });
      LORY_RETURN_IF_ERROR(st);
      // da (into act_m: m is dead once G_d exists), du.
      {
        SwigluBackwardArgs<T> sb;
        sb.rows = chunk_tokens(s0, s1);
        sb.cols = f;
        sb.a = w.act_a; sb.a_stride = f;
        sb.u = w.act_u; sb.u_stride = f;
        sb.dm = w.act_dm; sb.dm_stride = f;
        sb.da = w.act_m; sb.da_stride = f;
        sb.du = w.act_du; sb.du_stride = f;
        LORY_RETURN_IF_ERROR(leaf(Backend::template swiglu_backward<T>, sb, w, stream));
      }
      T* const da = w.act_m;
      // dx = da Wbar_g + du Wbar_u for every group first: G_g, G_u then overwrite Wbar_g, Wbar_u.
      st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
        LORY_RETURN_IF_ERROR(gemm(g, s0, false, false, g.rows, d, f, da, Op::kAct, w.wbar_g, Op::kWeights,
                                  a.dx, Op::kTokens, 0.f, stream));
        return gemm(g, s0, false, false, g.rows, d, f, w.act_du, Op::kAct, w.wbar_u, Op::kWeights,
                    a.dx, Op::kTokens, 1.f, stream);
      });
      LORY_RETURN_IF_ERROR(st);
      // G_g = da^T x, G_u = du^T x: [f, rows] x [rows, d].
      st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
        LORY_RETURN_IF_ERROR(gemm(g, s0, true, false, f, d, g.rows, da, Op::kAct, a.x, Op::kTokens,
                                  w.wbar_g, Op::kWeights, 0.f, stream));
        return gemm(g, s0, true, false, f, d, g.rows, w.act_du, Op::kAct, a.x, Op::kTokens,
                    w.wbar_u, Op::kWeights, 0.f, stream);
      });
      LORY_RETURN_IF_ERROR(st);
      // Merge backward: expert grads (overwrite on the first chunk unless
      // accumulating) and d_weights for the chunk's rows, summed over the matrices.
      const T* G[3] = {w.wbar_g, w.wbar_u, w.wbar_d};
      const T* W[3] = {a.p.W_g, a.p.W_u, a.p.W_d};
      T* dW[3] = {a.dW_g, a.dW_u, a.dW_d};
      for (int i = 0; i < 3; ++i) {
        MergeBackwardArgs<T, float> mb;
        mb.num_segments = s1 - s0;
        mb.experts = E;
        mb.params = fd;
        mb.G = G[i];
        mb.grad_segment_stride = fd;
        mb.W = W[i];
        mb.expert_stride = fd;
        mb.weights = a.weights + s0 * E;
        mb.dW = dW[i];
        mb.dW_expert_stride = fd;
        mb.accumulate_dW = a.accumulate || s0 > 0;
        mb.d_weights = d_weights + s0 * E;
        mb.accumulate_d_weights = i > 0;
        mb.deterministic = true;
        LORY_RETURN_IF_ERROR(leaf(merge_backward_leaf(options_.merge_backward), mb, w, stream));
      }
    }

    // Router path (needs d_weights of every segment): adds into dx, writes dW_r / d_bias.
    if (mode_ != RoutingMode::kGivenWeights) {
      RouterBackwardArgs<T, float> r;
      r.layout = layout_;
      r.d = d;
      r.experts = E;
      r.mode = mode_;
      r.W_r = a.p.W_r;
      r.hbar = a.hbar;
      r.probs = a.probs;
      r.d_weights = d_weights;
      r.dW_r = a.dW_r;
      r.accumulate_dW_r = a.accumulate;
      r.d_bias = a.d_bias;
      r.accumulate_d_bias = a.accumulate;
      r.dx = a.dx;
      r.deterministic = true;
      LORY_RETURN_IF_ERROR(leaf(Backend::template router_backward<T>, r, w, stream));
    }
    return Status::kSuccess;
  }

 private:
  // Which buffer family a GEMM operand belongs to: it decides the operand's
  // offset and batch stride for a segment group.
  enum class Op { kTokens, kAct, kWeights };

  Status init() {
    detail::clear_error_detail();
    LORY_RETURN_IF_ERROR(layout_.validate());
    LORY_RETURN_IF_ERROR(shape_.validate());
    if (mode_ != RoutingMode::kCausalSegment && mode_ != RoutingMode::kPromptLevel &&
        mode_ != RoutingMode::kGivenWeights)
      return detail::fail(Status::kErrorInvalidArgument, "mode", "not a RoutingMode");
    if (options_.max_chunk_segments < 0)
      return detail::fail(Status::kErrorInvalidArgument, "options.max_chunk_segments", "negative");
    if (!is_valid(options_.merge_backward))
      return detail::fail(Status::kErrorInvalidArgument, "options.merge_backward", "not a MergeBackwardMethod");
    LORY_RETURN_IF_ERROR(detail::validate_moe_sizes(layout_, shape_));
    LORY_RETURN_IF_ERROR(Backend::template can_implement<T>(layout_, shape_));

    const int64_t S = layout_.num_segments();
    int64_t cap = options_.max_chunk_segments > 0 && options_.max_chunk_segments < S ? options_.max_chunk_segments : S;
    LORY_RETURN_IF_ERROR(size_for_chunk(1, min_workspace_bytes_));
    chunk_ = 1;
    const size_t budget = options_.workspace_budget_bytes;
    if (budget == 0) {
      chunk_ = cap;
    } else {
      if (budget < min_workspace_bytes_) {
        workspace_bytes_ = min_workspace_bytes_;
        return detail::fail(Status::kErrorWorkspaceTooSmall, "options.workspace_budget_bytes",
                            "below min_workspace_size()");
      }
      // Largest chunk whose workspace fits the budget (the size grows with the chunk; a size past
      // size_t fits no budget).
      int64_t lo = 1, hi = cap;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        size_t bytes = 0;
        const Status st = size_for_chunk(mid, bytes);
        if (st != Status::kSuccess && st != Status::kErrorInvalidSize) return st;
        if (st == Status::kSuccess && bytes <= budget) lo = mid;
        else hi = mid - 1;
      }
      chunk_ = lo;
      detail::clear_error_detail();  // an overflowing probe above is not the plan's failure
    }
    LORY_RETURN_IF_ERROR(scratch_for_chunk(chunk_, scratch_bytes_));
    const Workspace w = Workspace::carve(nullptr, layout_, shape_, chunk_, scratch_bytes_);
    LORY_RETURN_IF_ERROR(w.status);
    workspace_bytes_ = w.total_bytes;
    return Status::kSuccess;
  }

  Status size_for_chunk(int64_t chunk, size_t& bytes) const {
    if (chunk <= 0 || chunk > layout_.num_segments())
      return detail::fail(Status::kErrorInvalidArgument, "chunk", "outside [1, num_segments()]");
    size_t scratch = 0;
    LORY_RETURN_IF_ERROR(scratch_for_chunk(chunk, scratch));
    const Workspace w = Workspace::carve(nullptr, layout_, shape_, chunk, scratch);
    LORY_RETURN_IF_ERROR(w.status);
    bytes = w.total_bytes;
    return Status::kSuccess;
  }

  // The largest workspace any leaf operation asks for with this chunk size
  // (queried with shape-only arguments; see detail::shape_only_pointer).
  Status scratch_for_chunk(int64_t chunk, size_t& need) const {
    using detail::shape_only_pointer;
    need = 0;
    const Stream stream{};
    const int E = shape_.experts;
    const int64_t S = layout_.num_segments(), d = shape_.d, f = shape_.f, fd = f * d;
    // Each query writes its size into a fresh local, folded into need.
    auto take = [&](auto&& query) {
      size_t bytes = 0;
      const Status st = query(bytes);
      if (bytes > need) need = bytes;
      return st;
    };
    {
      RouterForwardArgs<T, float> r;
      r.layout = layout_; r.d = d; r.experts = E; r.mode = mode_;
      r.x = shape_only_pointer<const T>(); r.W_r = shape_only_pointer<const T>();
      r.given_weights = shape_only_pointer<const float>();
      r.hbar = shape_only_pointer<float>(); r.probs = shape_only_pointer<float>();
      r.weights = shape_only_pointer<float>();
      LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template router_forward<T>(r, nullptr, b, stream); }));
    }
    if (mode_ != RoutingMode::kGivenWeights) {
      RouterBackwardArgs<T, float> r;
      r.layout = layout_; r.d = d; r.experts = E; r.mode = mode_;
      r.W_r = shape_only_pointer<const T>(); r.hbar = shape_only_pointer<const float>();
      r.probs = shape_only_pointer<const float>(); r.d_weights = shape_only_pointer<const float>();
      r.dW_r = shape_only_pointer<T>(); r.d_bias = shape_only_pointer<float>(); r.dx = shape_only_pointer<T>();
      LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template router_backward<T>(r, nullptr, b, stream); }));
    }
    // Merges run on full chunks and on the last, possibly smaller, one.
    const int64_t counts[2] = {chunk, S % chunk};
    for (int64_t count : counts) {
      if (count == 0) continue;
      MergeForwardArgs<T, float> mf;
      mf.num_segments = count; mf.experts = E; mf.params = fd;
      mf.W = shape_only_pointer<const T>(); mf.expert_stride = fd;
      mf.weights = shape_only_pointer<const float>();
      mf.Wbar = shape_only_pointer<T>(); mf.segment_stride = fd;
      LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template merge_forward<T>(mf, nullptr, b, stream); }));
      MergeBackwardArgs<T, float> mb;
      mb.num_segments = count; mb.experts = E; mb.params = fd;
      mb.G = shape_only_pointer<const T>(); mb.grad_segment_stride = fd;
      mb.W = shape_only_pointer<const T>(); mb.expert_stride = fd;
      mb.weights = shape_only_pointer<const float>();
      mb.dW = shape_only_pointer<T>(); mb.dW_expert_stride = fd;
      mb.d_weights = shape_only_pointer<float>();
      mb.deterministic = true;
      // kAuto resolves per call (the alignment of the caller's W decides too): room for either
      // method it may pick. It never picks one that cannot run these shapes (the GEMMs past
      // cuBLAS' int limits), so that one's refusal is not the plan's.
      const MergeBackwardMethod chosen = options_.merge_backward;
      for (const MergeBackwardMethod m : {MergeBackwardMethod::kFused, MergeBackwardMethod::kGemm}) {
        if (chosen != MergeBackwardMethod::kAuto && chosen != m) continue;
        const Status st = take([&](size_t& b) { return merge_backward_leaf(m)(mb, nullptr, b, stream); });
        if (st != Status::kSuccess && (chosen != MergeBackwardMethod::kAuto || m == MergeBackwardMethod::kFused))
          return st;
      }
    }
    const int64_t tmax = layout_.segment_len < layout_.seq_len ? layout_.segment_len : layout_.seq_len;
    SwigluForwardArgs<T> sf;
    sf.rows = chunk * tmax; sf.cols = f;
    sf.a = shape_only_pointer<const T>(); sf.a_stride = f;
    sf.u = shape_only_pointer<const T>(); sf.u_stride = f;
    sf.m = shape_only_pointer<T>(); sf.m_stride = f;
    LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template swiglu_forward<T>(sf, nullptr, b, stream); }));
    SwigluBackwardArgs<T> sb;
    sb.rows = chunk * tmax; sb.cols = f;
    sb.a = shape_only_pointer<const T>(); sb.a_stride = f;
    sb.u = shape_only_pointer<const T>(); sb.u_stride = f;
    sb.dm = shape_only_pointer<const T>(); sb.dm_stride = f;
    sb.da = shape_only_pointer<T>(); sb.da_stride = f;
    sb.du = shape_only_pointer<T>(); sb.du_stride = f;
    LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template swiglu_backward<T>(sb, nullptr, b, stream); }));
    return Status::kSuccess;
  }

  // Checks shared by forward() and backward() once their arguments are valid: the stream suits the
  // backend, the workspace is there, large enough and 16-byte aligned.
  // The plan's workspace is not a size query: workspace_size() answers that, so a null workspace is
  // kErrorNullPointer ("workspace").
  Status check_call(void* workspace, size_t workspace_bytes, Stream stream) const {
    LORY_RETURN_IF_ERROR(Backend::check_stream(stream));
    if (!workspace)
      return detail::fail(Status::kErrorNullPointer, "workspace", "null (the plan's size query is workspace_size())");
    if (workspace_bytes < workspace_bytes_)
      return detail::fail(Status::kErrorWorkspaceTooSmall, "workspace_bytes", "below workspace_size()");
    // A misaligned base would otherwise be refused only mid-call, by a leaf.
    if (!detail::is_aligned(workspace, detail::kCarvedWorkspaceAlign))
      return detail::fail(Status::kErrorMisalignedPointer, "workspace", "base not 16-byte aligned");
    return Status::kSuccess;
  }

  Status check_matches(const MoeFfnParams<T, float>& p) const {
    if (p.layout.batch != layout_.batch || p.layout.seq_len != layout_.seq_len ||
        p.layout.segment_len != layout_.segment_len)
      return detail::fail(Status::kErrorInvalidShape, "p.layout", "differs from the plan's");
    if (p.shape.d != shape_.d || p.shape.f != shape_.f || p.shape.experts != shape_.experts)
      return detail::fail(Status::kErrorInvalidShape, "p.shape", "differs from the plan's");
    if (p.mode != mode_) return detail::fail(Status::kErrorInvalidArgument, "p.mode", "differs from the plan's");
    return Status::kSuccess;
  }

  // The construction's failure, recorded again for the caller of a later call.
  Status plan_status() const {
    if (status_ != Status::kSuccess) detail::error_detail_slot() = init_detail_;
    return status_;
  }

  // A leaf operation with the plan's scratch as its workspace. The scratch is
  // never null, so a leaf never mistakes a real call for a size query.
  template <class Fn, class Args>
  static Status leaf(Fn fn, const Args& args, const Workspace& w, Stream stream) {
    size_t bytes = w.scratch_bytes;
    return fn(args, w.scratch, bytes, stream);
  }

  // The backend's merge backward by `method`, as a leaf operation.
  static auto merge_backward_leaf(MergeBackwardMethod method) {
    return [method](const MergeBackwardArgs<T, float>& mb, void* ws, size_t& bytes, Stream s) {
      return Backend::template merge_backward<T>(mb, method, ws, bytes, s);
    };
  }

  // Tokens covered by segments [s0, s1): a contiguous range starting at token_begin(s0).
  int64_t chunk_tokens(int64_t s0, int64_t s1) const {
    return layout_.token_begin(s1 - 1) + layout_.length(s1 - 1) - layout_.token_begin(s0);
  }

  // Segments [s0, s1) as a few groups of equal length and constant stride.
  // L % T == 0: one group. Otherwise the full-length segments form either one
  // group per sequence or one group per in-sequence position (whichever needs
  // fewer GEMM launches), and the short last segments one more group.
  template <class Fn>
  Status for_each_group(int64_t s0, int64_t s1, Fn&& fn) const {
    const int64_t Tl = layout_.segment_len, L = layout_.seq_len, N = layout_.segments_per_sequence();
    if (L % Tl == 0) return fn(detail::MoeSegmentGroup{s0, s1 - s0, 1, Tl, Tl});
    if (N > 1) {
      const int64_t b0 = s0 / N, b1 = (s1 - 1) / N;
      if (b1 - b0 + 1 <= N - 1) {
        for (int64_t b = b0; b <= b1; ++b) {
          const int64_t lo = b * N > s0 ? b * N : s0;
          const int64_t hi = b * N + N - 1 < s1 ? b * N + N - 1 : s1;
          if (lo < hi) LORY_RETURN_IF_ERROR(fn(detail::MoeSegmentGroup{lo, hi - lo, 1, Tl, Tl}));
        }
      } else {
        for (int64_t k = 0; k < N - 1; ++k) {
          const int64_t bf = s0 <= k ? 0 : (s0 - k + N - 1) / N;
          if (s1 - 1 < k) continue;
          const int64_t bl = (s1 - 1 - k) / N;
          if (bf <= bl) LORY_RETURN_IF_ERROR(fn(detail::MoeSegmentGroup{bf * N + k, bl - bf + 1, N, Tl, L}));
        }
      }
    }
    // Short last segments (every segment when L < T), one per sequence, L tokens apart.
    if (s1 >= N) {
      const int64_t bf = s0 / N, bl = (s1 - N) / N;
      if (bf <= bl) {
        LORY_RETURN_IF_ERROR(fn(detail::MoeSegmentGroup{bf * N + N - 1, bl - bf + 1, N, L - (N - 1) * Tl, L}));
      }
    }
    return Status::kSuccess;
  }

  // One strided-batched GEMM over a segment group. Operands are located by
  // family: kTokens rows of the caller's [B*L, .] tensors, kAct rows of the
  // chunk's activations (which start at token_begin(s0)), kWeights the chunk's
  // merged weights / gradients ([C, P/3] per matrix).
  Status gemm(const detail::MoeSegmentGroup& g, int64_t s0, bool trans_a, bool trans_b, int64_t m, int64_t n,
              int64_t k, const T* A, Op fa, const T* B, Op fb, T* C, Op fc, float beta, Stream stream) const {
    StridedBatchedGemm<T> gm;
    gm.m = m; gm.n = n; gm.k = k; gm.batch = g.count;
    gm.trans_a = trans_a; gm.trans_b = trans_b;
    gm.alpha = 1.f; gm.beta = beta;
    int64_t off = 0, stride = 0, cols = 0;
    locate(g, s0, fa, off, stride, cols);
    gm.A = A + off; gm.stride_a = stride;
    gm.lda = fa == Op::kWeights ? (trans_a ? m : k) : cols;
    locate(g, s0, fb, off, stride, cols);
    gm.B = B + off; gm.stride_b = stride;
    gm.ldb = fb == Op::kWeights ? (trans_b ? k : n) : cols;
    locate(g, s0, fc, off, stride, cols);
    gm.C = C + off; gm.stride_c = stride;
    gm.ldc = fc == Op::kWeights ? n : cols;
    return Backend::template gemm<T>(gm, stream);
  }

  // Offset of the group's first batch entry, batch stride and row width (for
  // token-major operands: d for the caller's tensors, f for activations).
  void locate(const detail::MoeSegmentGroup& g, int64_t s0, Op family, int64_t& off, int64_t& stride,
              int64_t& cols) const {
    const int64_t d = shape_.d, f = shape_.f;
    switch (family) {
      case Op::kTokens:
        cols = d;
        off = layout_.token_begin(g.first) * d;
        stride = g.token_stride * d;
        return;
      case Op::kAct:
        cols = f;
        off = (layout_.token_begin(g.first) - layout_.token_begin(s0)) * f;
        stride = g.token_stride * f;
        return;
      case Op::kWeights:
        cols = 0;
        off = (g.first - s0) * f * d;
        stride = g.segment_step * f * d;
        return;
    }
  }

  Status merge_chunk(const MoeFfnParams<T, float>& p, const float* weights, int64_t s0, int64_t s1,
                     const Workspace& w, Stream stream) const {
    const int64_t fd = shape_.f * shape_.d;
    const T* W[3] = {p.W_g, p.W_u, p.W_d};
    T* Wbar[3] = {w.wbar_g, w.wbar_u, w.wbar_d};
    for (int i = 0; i < 3; ++i) {
      MergeForwardArgs<T, float> mf;
      mf.num_segments = s1 - s0;
      mf.experts = shape_.experts;
      mf.params = fd;
      mf.W = W[i];
      mf.expert_stride = fd;
      mf.weights = weights + s0 * shape_.experts;
      mf.Wbar = Wbar[i];
      mf.segment_stride = fd;
      LORY_RETURN_IF_ERROR(leaf(Backend::template merge_forward<T>, mf, w, stream));
    }
    return Status::kSuccess;
  }

  // a = x Wbar_g^T, u = x Wbar_u^T: [rows, d] x [f, d]^T per segment.
  Status gate_up_chunk(const T* x, int64_t s0, int64_t s1, const Workspace& w, Stream stream) const {
    return for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
      LORY_RETURN_IF_ERROR(gemm(g, s0, false, true, g.rows, shape_.f, shape_.d, x, Op::kTokens, w.wbar_g,
                                Op::kWeights, w.act_a, Op::kAct, 0.f, stream));
      return gemm(g, s0, false, true, g.rows, shape_.f, shape_.d, x, Op::kTokens, w.wbar_u, Op::kWeights,
                  w.act_u, Op::kAct, 0.f, stream);
    });
  }

  // m = silu(a) * u over every token of the chunk at once.
  Status swiglu_chunk(int64_t s0, int64_t s1, const Workspace& w, Stream stream) const {
    SwigluForwardArgs<T> sf;
    sf.rows = chunk_tokens(s0, s1);
    sf.cols = shape_.f;
    sf.a = w.act_a; sf.a_stride = shape_.f;
    sf.u = w.act_u; sf.u_stride = shape_.f;
    sf.m = w.act_m; sf.m_stride = shape_.f;
    return leaf(Backend::template swiglu_forward<T>, sf, w, stream);
  }

  SegmentLayout layout_;
  FfnShape shape_;
  RoutingMode mode_;
  MoeFfnOptions options_;
  Status status_ = Status::kErrorInvalidArgument;
  ErrorDetail init_detail_;
  int64_t chunk_ = 0;
  size_t scratch_bytes_ = 0;
  size_t workspace_bytes_ = 0;
  size_t min_workspace_bytes_ = 0;
};

LORY_NAMESPACE_END
