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
// and, for a backend whose merges take 2-D views (rows > 1, lory/merge.hpp), so that the plan may
// split the layer over slices of f:
//   static constexpr bool kMergeViews2d = true;  // missing or false: the plan never slices
//   template <class T> static Status gemm(const StridedBatchedGemm<T, float>&, Stream);  // fp32 C
//   template <class T> static Status round_to_storage(const RoundToStorageArgs<T>&, void* ws, size_t& ws_bytes, Stream);
// (one `template <class T, class TC = T> gemm(const StridedBatchedGemm<T, TC>&, Stream)` serves both
// GEMMs). Leaf operations follow the launcher protocol: ws == nullptr asks for the size.
//
// Work split (docs/memory.md). The workspace budget decides two numbers: the chunk C (consecutive
// segments processed together) and the slice width w (columns of the FFN's hidden dimension f per
// slice; the last slice may be narrower). SwiGLU is elementwise over f, so slice J of f needs rows J
// of the merged W_g and W_u ([f, d] per segment) and columns J of the merged W_d ([d, f]: a 2-D
// merge view); y and dx are sums over the slices, kept in an fp32 accumulator and rounded once to
// T. Unlimited budget, or one that holds a chunk of all segments unsliced: C = all, w = f (one
// slice, no accumulator: T outputs written directly). Otherwise the plan keeps C = all segments and
// slices f (w a multiple of kSliceGranule, as wide as the budget allows, then evened out over the
// same number of slices), so every expert weight is still read once per forward and twice per
// backward (the recomputed merge, the merge backward). Only a budget below one chunk of all
// segments at the narrowest width makes chunks of segments, and then each chunk reads every expert
// weight again. Per slice, in the loops below, the matrices are the slice's: Wbar_g, Wbar_u are
// [w, d], Wbar_d is [d, w], the activations [tokens, w], and y / dx go to the accumulator.
// The gate and up products are fused: Wbar_g and Wbar_u of a segment sit one above the other as
// one [2w, d] matrix [Wbar_g; Wbar_u], and a, u (da, du) side by side as one [tokens, 2w] matrix,
// so each slice reads x once and adds into dx once.
//
// Forward, per chunk of consecutive segments (after the router has written
// hbar / probs / weights into the caller's buffers):
//   Wbar_{g,u,d} = merge(W_{g,u,d}, weights)               -> workspace
//   [a | u] = x [Wbar_g; Wbar_u]^T, m = silu(a) * u, y = m Wbar_d^T   (per segment)
// Backward, per chunk: recompute Wbar, a, u, m, then
//   dm = dy Wbar_d;  G_d = dy^T m  (over Wbar_d, no longer needed)
//   da, du = swiglu_backward(a, u, dm)  ([da | du] over m and beside it)
//   dx = [da | du] [Wbar_g; Wbar_u];  [G_g; G_u] = [da | du]^T x  (over [Wbar_g; Wbar_u])
//   dW_{g,u,d} (+)= merge_backward(G), d_weights = sum over the three matrices
// and after the last chunk the router backward adds the router path into dx.
// Merged weights are never kept between passes (recomputing them costs E/T of
// the FFN's FLOPs; storing them costs S * P values).
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/merge.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/round_to_storage.hpp"
#include "lory/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN

struct MoeFfnOptions {
  size_t workspace_budget_bytes = 0;  // 0: no limit -> all segments in one chunk
  int64_t max_chunk_segments = 0;     // 0: as many as the budget allows
  // Columns of f per slice (the last slice may be narrower): 0 lets the budget decide (one slice
  // when it fits, else the widest multiple of 16 that keeps all segments in one chunk); n > 0
  // fixes the width to min(n, f) and the budget then picks the chunk. Slicing needs a backend with
  // 2-D merge views (kMergeViews2d); others run one slice whatever this says.
  int64_t slice_width = 0;
  // How the backward's merge backward runs on the GPU (lory/merge.hpp: the fused kernel, two cuBLAS
  // GEMMs, or kAuto's pick per shape); the CPU backend has one way and ignores it.
  MergeBackwardMethod merge_backward = MergeBackwardMethod::kAuto;
};

// C[b] = alpha * op(A[b]) op(B[b]) + beta * C[b] for b < batch, with ROW-MAJOR
// semantics: element (i, j) of a matrix X with leading dimension ldX is
// X[i * ldX + j]; op(A) is [m, k] (A itself [k, m] when trans_a), op(B) is
// [k, n] (B itself [n, k] when trans_b), C is [m, n]. Batch entry b starts at
// X + b * stride_X. Products accumulate in fp32; beta == 0 never reads C.
// TC is C's dtype: T (one rounding to T per output), or float (the plan's fp32 accumulators:
// C = alpha * AB + beta * C in fp32, no rounding to T).
template <class T, class TC = T>
struct StridedBatchedGemm {
  int64_t m = 0, n = 0, k = 0, batch = 0;
  bool trans_a = false, trans_b = false;
  float alpha = 1.f, beta = 0.f;
  const T* A = nullptr; int64_t lda = 0, stride_a = 0;
  const T* B = nullptr; int64_t ldb = 0, stride_b = 0;
  TC* C = nullptr;      int64_t ldc = 0, stride_c = 0;
};

template <class T, class TC>
Status validate(const StridedBatchedGemm<T, TC>& g) {
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

// Whether a backend's merges take 2-D views (Backend::kMergeViews2d; a backend without the member
// counts as false), and so whether the plan may slice f.
template <class B, class = void>
struct backend_merge_views_2d : std::false_type {};
template <class B>
struct backend_merge_views_2d<B, std::void_t<decltype(B::kMergeViews2d)>>
    : std::integral_constant<bool, static_cast<bool>(B::kMergeViews2d)> {};

// Budget-chosen slice widths are multiples of this many columns: 16-byte vectors in every storage
// dtype and whole 16-wide MMA tiles (k = 16) in the slice's GEMMs.
constexpr int64_t kSliceGranule = 16;

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
//   wbar_gu   [C, 2w, d] T                 per segment [Wbar_g; Wbar_u]: rows [0, w) merged W_g
//                                          (slice rows), rows [w, 2w) merged W_u; [G_g; G_u] in
//                                          the backward
//   wbar_d    [C, d, w] T                  merged W_d (slice columns); G_d in the backward
//   act_au    [C * Tmax, 2w] T             [a | u]: a = x Wbar_g^T in columns [0, w), u = x Wbar_u^T
//                                          in [w, 2w)
//   act_mdu   [C * Tmax, 2w] T             forward: m in columns [0, w); backward: [da | du]
//                                          (du beside m, da over m once m is dead)
//   act_dm    [C * Tmax, w] T              dm, backward only
//   acc       [C * Tmax, d] fp32           y (forward), dx (backward) summed over the slices;
//                                          only when sliced (w < f)
// with C = chunk segments, w = slice width (f: one slice) and Tmax = min(T, L)
// tokens per segment; a narrower last slice packs its pieces at its own width.
// With w = f this is the unsliced layout, byte for byte. The total is the exact
// end of the last piece (no tail padding): it grows with every added segment
// (and, sliced, with the width), so a budget of workspace_size_for(c, w) gives
// exactly chunk c at that width. A size past size_t sets `status` to
// kErrorInvalidSize.
template <class T>
struct MoeFfnWorkspace {
  float* d_weights = nullptr;
  T* wbar_gu = nullptr;
  T* wbar_d = nullptr;
  T* act_au = nullptr;
  T* act_mdu = nullptr;
  T* act_dm = nullptr;
  float* acc = nullptr;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  size_t total_bytes = 0;
  Status status = Status::kSuccess;

  // width: the slice width w in [1, f] (validated by the caller).
  static MoeFfnWorkspace carve(void* base, const SegmentLayout& lay, const FfnShape& sh, int64_t chunk,
                               int64_t width, size_t scratch_bytes) {
    MoeFfnWorkspace w;
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t wd = width * sh.d;  // validated: 3 f d fits
    const int64_t tmax = lay.segment_len < lay.seq_len ? lay.segment_len : lay.seq_len;
    w.d_weights = c.take<float>(lay.num_segments(), sh.experts);
    w.scratch_bytes = align_up(scratch_bytes < 256 ? 256 : scratch_bytes);
    w.scratch = c.take_bytes(w.scratch_bytes);
    w.wbar_gu = c.take<T>(chunk, 2 * wd);
    w.wbar_d = c.take<T>(chunk, wd);
    w.act_au = c.take<T>(chunk, tmax, 2 * width);
    w.act_mdu = c.take<T>(chunk, tmax, 2 * width);
    w.act_dm = c.take<T>(chunk, tmax, width);
    if (width < sh.f) w.acc = c.take<float>(chunk, tmax, sh.d);
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
template <class P>
bool is_shape_only(const P* p) {
  return reinterpret_cast<uintptr_t>(p) == kShapeOnlyAddress;
}

}  // namespace detail

template <class T, class Backend>
class MoeFfnPlan {
 public:
  using Stream = typename Backend::Stream;
  using Workspace = detail::MoeFfnWorkspace<T>;
  // Whether this backend's merges take 2-D views, so that the plan may slice f.
  static constexpr bool kSlicesF = detail::backend_merge_views_2d<Backend>::value;

  MoeFfnPlan(SegmentLayout layout, FfnShape shape, RoutingMode mode, MoeFfnOptions options = {})
      : layout_(layout), shape_(shape), mode_(mode), options_(options) {
    status_ = init();
    init_detail_ = status_ == Status::kSuccess ? ErrorDetail{} : last_error_detail();
  }

  // Whether this plan can run: valid shapes, mode and options, and a budget at
  // least min_workspace_size(). Checked again by forward() and backward().
  Status can_implement() const { return plan_status(); }

  // Workspace bytes for chunk_segments() segments per chunk and slices of slice_width() columns.
  size_t workspace_size() const { return workspace_bytes_; }
  // Smallest workspace any plan of these shapes can run with (one segment per chunk, at the
  // narrowest slice width the plan would use, or unsliced where that is smaller).
  size_t min_workspace_size() const { return min_workspace_bytes_; }
  // Smallest budget that keeps the chunk at its cap (all segments unless options.max_chunk_segments
  // is smaller): from this budget up, each expert weight is read once per forward and twice per
  // backward (docs/memory.md); below it, once (twice) per chunk.
  size_t min_workspace_size_unchunked() const { return unchunked_workspace_bytes_; }
  int64_t chunk_segments() const { return chunk_; }
  // Columns of f per slice (f: one slice) and the number of slices, ceil(f / slice_width()).
  int64_t slice_width() const { return width_; }
  int64_t num_slices() const { return width_ > 0 ? (shape_.f + width_ - 1) / width_ : 0; }
  // Workspace bytes for a given chunk size, unsliced (monotone in chunk); 0 if the shapes are invalid.
  size_t workspace_size_for_chunk(int64_t chunk) const { return workspace_size_for(chunk, shape_.f); }
  // Workspace bytes for a chunk size and a slice width in [1, f] (monotone in the chunk, and in the
  // width below f); 0 if invalid.
  size_t workspace_size_for(int64_t chunk, int64_t slice_width) const {
    size_t bytes = 0;
    return size_for(chunk, slice_width, bytes) == Status::kSuccess ? bytes : 0;
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
    const Workspace w = Workspace::carve(workspace, layout_, shape_, chunk_, width_, scratch_bytes_);
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

    // 2. Per chunk and slice: merge, then the merged SwiGLU FFN; y = sum over the slices.
    const int64_t S = layout_.num_segments();
    const bool sliced = num_slices() > 1;
    for (int64_t s0 = 0; s0 < S; s0 += chunk_) {
      const int64_t s1 = s0 + chunk_ < S ? s0 + chunk_ : S;
      for (int64_t i = 0; i < num_slices(); ++i) {
        const Slice J = slice(i);
        LORY_RETURN_IF_ERROR(merge_chunk(a.p, a.weights, s0, s1, J, w, stream));
        LORY_RETURN_IF_ERROR(gate_up_chunk(a.x, s0, s1, J, w, stream));
        LORY_RETURN_IF_ERROR(swiglu_chunk(s0, s1, J, w, stream));
        const Status st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
          // y (+)= m Wbar_d^T: [rows, w] x [d, w]^T
          if (!sliced)
            return gemm(g, s0, J, false, true, g.rows, shape_.d, J.width, w.act_mdu, Op::kActPair, w.wbar_d,
                        Op::kWeights, a.y, Op::kTokens, 0.f, stream);
          return gemm(g, s0, J, false, true, g.rows, shape_.d, J.width, w.act_mdu, Op::kActPair, w.wbar_d,
                      Op::kWeights, w.acc, Op::kAcc, i == 0 ? 0.f : 1.f, stream);
        });
        LORY_RETURN_IF_ERROR(st);
      }
      if (sliced) LORY_RETURN_IF_ERROR(round_chunk(w.acc, a.y, s0, s1, w, stream));
    }
    return Status::kSuccess;
  }

  Status backward(const MoeFfnBackwardArgs<T, float>& a, void* workspace, size_t workspace_bytes, Stream stream) const {
    LORY_RETURN_IF_ERROR(plan_status());
    LORY_RETURN_IF_ERROR(check_matches(a.p));  // first: the extents validate() checks come from a.p
    LORY_RETURN_IF_ERROR(validate(a));
    LORY_RETURN_IF_ERROR(check_call(workspace, workspace_bytes, stream));
    const Workspace w = Workspace::carve(workspace, layout_, shape_, chunk_, width_, scratch_bytes_);
    const int E = shape_.experts;
    const int64_t d = shape_.d;
    float* d_weights = a.d_weights ? a.d_weights : w.d_weights;

    const int64_t S = layout_.num_segments();
    const bool sliced = num_slices() > 1;
    for (int64_t s0 = 0; s0 < S; s0 += chunk_) {
      const int64_t s1 = s0 + chunk_ < S ? s0 + chunk_ : S;
      for (int64_t i = 0; i < num_slices(); ++i) {
        const Slice J = slice(i);
        const int64_t jw = J.width;
        // Recompute the merge and the activations (never stored between passes).
        LORY_RETURN_IF_ERROR(merge_chunk(a.p, a.weights, s0, s1, J, w, stream));
        LORY_RETURN_IF_ERROR(gate_up_chunk(a.x, s0, s1, J, w, stream));
        LORY_RETURN_IF_ERROR(swiglu_chunk(s0, s1, J, w, stream));
        // dm = dy Wbar_d for every group first: G_d then overwrites Wbar_d.
        Status st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
          return gemm(g, s0, J, false, false, g.rows, jw, d, a.dy, Op::kTokens, w.wbar_d, Op::kWeights,
                      w.act_dm, Op::kAct, 0.f, stream);
        });
        LORY_RETURN_IF_ERROR(st);
        // G_d = dy^T m: [d, rows] x [rows, w], K = tokens of the segment.
        st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
          return gemm(g, s0, J, true, false, d, jw, g.rows, a.dy, Op::kTokens, w.act_mdu, Op::kActPair,
                      w.wbar_d, Op::kWeights, 0.f, stream);
        });
        LORY_RETURN_IF_ERROR(st);
        // [da | du] into act_mdu: da over m (dead once G_d exists), du beside it.
        {
          SwigluBackwardArgs<T> sb;
          sb.rows = chunk_tokens(s0, s1);
          sb.cols = jw;
          sb.a = w.act_au; sb.a_stride = 2 * jw;
          sb.u = w.act_au + jw; sb.u_stride = 2 * jw;
          sb.dm = w.act_dm; sb.dm_stride = jw;
          sb.da = w.act_mdu; sb.da_stride = 2 * jw;
          sb.du = w.act_mdu + jw; sb.du_stride = 2 * jw;
          LORY_RETURN_IF_ERROR(leaf(Backend::template swiglu_backward<T>, sb, w, stream));
        }
        // dx (+)= [da | du] [Wbar_g; Wbar_u]: [rows, 2w] x [2w, d], one sum over 2w terms, for every
        // group first: [G_g; G_u] then overwrites [Wbar_g; Wbar_u].
        st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
          if (!sliced)
            return gemm(g, s0, J, false, false, g.rows, d, 2 * jw, w.act_mdu, Op::kActPair, w.wbar_gu,
                        Op::kWeightsPair, a.dx, Op::kTokens, 0.f, stream);
          return gemm(g, s0, J, false, false, g.rows, d, 2 * jw, w.act_mdu, Op::kActPair, w.wbar_gu,
                      Op::kWeightsPair, w.acc, Op::kAcc, i == 0 ? 0.f : 1.f, stream);
        });
        LORY_RETURN_IF_ERROR(st);
        // [G_g; G_u] = [da | du]^T x: [2w, rows] x [rows, d].
        st = for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
          return gemm(g, s0, J, true, false, 2 * jw, d, g.rows, w.act_mdu, Op::kActPair, a.x, Op::kTokens,
                      w.wbar_gu, Op::kWeightsPair, 0.f, stream);
        });
        LORY_RETURN_IF_ERROR(st);
        // Merge backward: the slice's expert grads (overwrite on the first chunk unless
        // accumulating; slices are disjoint) and d_weights for the chunk's rows, summed in fp32
        // over the matrices and the slices.
        const T* G[3] = {w.wbar_gu, w.wbar_gu + jw * d, w.wbar_d};
        const T* W[3] = {a.p.W_g, a.p.W_u, a.p.W_d};
        T* dW[3] = {a.dW_g, a.dW_u, a.dW_d};
        for (int m = 0; m < 3; ++m) {
          MergeBackwardArgs<T, float> mb = merge_backward_args(m, J, s1 - s0, G[m], W[m], a.weights + s0 * E,
                                                               dW[m], d_weights + s0 * E);
          mb.accumulate_dW = a.accumulate || s0 > 0;
          mb.accumulate_d_weights = m > 0 || i > 0;
          LORY_RETURN_IF_ERROR(leaf(merge_backward_leaf(options_.merge_backward), mb, w, stream));
        }
      }
      if (sliced) LORY_RETURN_IF_ERROR(round_chunk(w.acc, a.dx, s0, s1, w, stream));
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
  // offset and batch stride for a segment group. The pairs are the side-by-side buffers of the
  // fused gate and up products: kActPair act_au / act_mdu ([tokens, 2w]; an operand may start at
  // column w and use w of the 2w columns), kWeightsPair wbar_gu ([2w, d] per segment).
  enum class Op { kTokens, kAct, kActPair, kWeights, kWeightsPair, kAcc };

  // Columns [j0, j0 + width) of f.
  struct Slice {
    int64_t j0 = 0, width = 0;
  };
  Slice slice(int64_t i) const {
    Slice J;
    J.j0 = i * width_;
    J.width = shape_.f - J.j0 < width_ ? shape_.f - J.j0 : width_;
    return J;
  }

  Status init() {
    detail::clear_error_detail();
    LORY_RETURN_IF_ERROR(layout_.validate());
    LORY_RETURN_IF_ERROR(shape_.validate());
    if (mode_ != RoutingMode::kCausalSegment && mode_ != RoutingMode::kPromptLevel &&
        mode_ != RoutingMode::kGivenWeights)
      return detail::fail(Status::kErrorInvalidArgument, "mode", "not a RoutingMode");
    if (options_.max_chunk_segments < 0)
      return detail::fail(Status::kErrorInvalidArgument, "options.max_chunk_segments", "negative");
    if (options_.slice_width < 0)
      return detail::fail(Status::kErrorInvalidArgument, "options.slice_width", "negative");
    if (!is_valid(options_.merge_backward))
      return detail::fail(Status::kErrorInvalidArgument, "options.merge_backward", "not a MergeBackwardMethod");
    LORY_RETURN_IF_ERROR(detail::validate_moe_sizes(layout_, shape_));
    LORY_RETURN_IF_ERROR(Backend::template can_implement<T>(layout_, shape_));

    const int64_t S = layout_.num_segments(), f = shape_.f;
    const int64_t cap = options_.max_chunk_segments > 0 && options_.max_chunk_segments < S ? options_.max_chunk_segments : S;
    // The widest slice the plan may take (f: unsliced) and the narrowest.
    int64_t wide = f, narrow = f;
    if (kSlicesF && options_.slice_width > 0) wide = narrow = options_.slice_width < f ? options_.slice_width : f;
    else if (kSlicesF && f > detail::kSliceGranule) narrow = detail::kSliceGranule;
    // Whether chunk c runs at width w within the budget (a size past size_t fits no budget).
    const size_t budget = options_.workspace_budget_bytes;
    Status probe = Status::kSuccess;
    auto fits = [&](int64_t c, int64_t w) {
      size_t bytes = 0;
      const Status st = size_for(c, w, bytes);
      if (st != Status::kSuccess && st != Status::kErrorInvalidSize) probe = st;
      return st == Status::kSuccess && bytes <= budget;
    };
    auto min_size = [&](int64_t c, size_t& bytes) {
      size_t at_wide = 0, at_narrow = 0;
      LORY_RETURN_IF_ERROR(size_for(c, wide, at_wide));
      LORY_RETURN_IF_ERROR(size_for(c, narrow, at_narrow));
      bytes = at_wide < at_narrow ? at_wide : at_narrow;
      return Status::kSuccess;
    };
    LORY_RETURN_IF_ERROR(min_size(1, min_workspace_bytes_));
    {
      // May overflow for a huge layout: then no budget keeps every segment in one chunk.
      const Status st = min_size(cap, unchunked_workspace_bytes_);
      if (st == Status::kErrorInvalidSize) unchunked_workspace_bytes_ = SIZE_MAX;
      else LORY_RETURN_IF_ERROR(st);
      detail::clear_error_detail();
    }
    chunk_ = 1;
    width_ = wide;
    if (budget == 0) {
      chunk_ = cap;
    } else {
      if (budget < min_workspace_bytes_) {
        workspace_bytes_ = min_workspace_bytes_;
        return detail::fail(Status::kErrorWorkspaceTooSmall, "options.workspace_budget_bytes",
                            "below min_workspace_size()");
      }
      // 1. The largest chunk that fits at some width (each size grows with the chunk).
      int64_t lo = 1, hi = cap;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (fits(mid, wide) || fits(mid, narrow)) lo = mid;
        else hi = mid - 1;
      }
      chunk_ = lo;
      // 2. At that chunk the widest slice that fits: f (or the fixed width) when it does, else the
      // widest multiple of the granule below f ...
      if (!fits(chunk_, wide)) {
        int64_t klo = 1, khi = (f - 1) / detail::kSliceGranule;
        while (klo < khi) {
          const int64_t mid = klo + (khi - klo + 1) / 2;
          if (fits(chunk_, mid * detail::kSliceGranule)) klo = mid;
          else khi = mid - 1;
        }
        // ... evened out: the narrowest multiple of the granule with as few slices.
        const int64_t slices = (f + klo * detail::kSliceGranule - 1) / (klo * detail::kSliceGranule);
        const int64_t even = (f + slices - 1) / slices;
        width_ = (even + detail::kSliceGranule - 1) / detail::kSliceGranule * detail::kSliceGranule;
      }
      LORY_RETURN_IF_ERROR(probe);
      detail::clear_error_detail();  // an overflowing probe above is not the plan's failure
    }
    LORY_RETURN_IF_ERROR(scratch_for(chunk_, width_, scratch_bytes_));
    const Workspace w = Workspace::carve(nullptr, layout_, shape_, chunk_, width_, scratch_bytes_);
    LORY_RETURN_IF_ERROR(w.status);
    workspace_bytes_ = w.total_bytes;
    return Status::kSuccess;
  }

  Status size_for(int64_t chunk, int64_t width, size_t& bytes) const {
    if (chunk <= 0 || chunk > layout_.num_segments())
      return detail::fail(Status::kErrorInvalidArgument, "chunk", "outside [1, num_segments()]");
    if (width <= 0 || width > shape_.f)
      return detail::fail(Status::kErrorInvalidArgument, "slice_width", "outside [1, f]");
    if (width < shape_.f && !kSlicesF)
      return detail::fail(Status::kErrorInvalidArgument, "slice_width", "below f: the backend takes no 2-D merge views");
    size_t scratch = 0;
    LORY_RETURN_IF_ERROR(scratch_for(chunk, width, scratch));
    const Workspace w = Workspace::carve(nullptr, layout_, shape_, chunk, width, scratch);
    LORY_RETURN_IF_ERROR(w.status);
    bytes = w.total_bytes;
    return Status::kSuccess;
  }

  // The largest workspace any leaf operation asks for with this chunk size and slice width
  // (queried with shape-only arguments; see detail::shape_only_pointer).
  Status scratch_for(int64_t chunk, int64_t width, size_t& need) const {
    using detail::shape_only_pointer;
    need = 0;
    const Stream stream{};
    const int E = shape_.experts;
    const int64_t S = layout_.num_segments(), d = shape_.d, f = shape_.f;
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
    // Merges run on full chunks and on the last, possibly smaller, one; on full slices and on the
    // last, possibly narrower, one; each matrix's view.
    const int64_t counts[2] = {chunk, S % chunk};
    const Slice slices[2] = {Slice{0, width}, Slice{0, f % width}};
    for (int64_t count : counts) {
      if (count == 0) continue;
      for (const Slice& J : slices) {
        if (J.width == 0) continue;
        for (int m = 0; m < 3; ++m) {
          const MergeForwardArgs<T, float> mf = merge_forward_args(m, J, count, shape_only_pointer<const T>(),
                                                                   shape_only_pointer<const float>(),
                                                                   shape_only_pointer<T>());
          LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template merge_forward<T>(mf, nullptr, b, stream); }));
          const MergeBackwardArgs<T, float> mb = merge_backward_args(
              m, J, count, shape_only_pointer<const T>(), shape_only_pointer<const T>(),
              shape_only_pointer<const float>(), shape_only_pointer<T>(), shape_only_pointer<float>());
          // kAuto resolves per call (the alignment of the caller's W decides too): room for either
          // method it may pick. It never picks one that cannot run these shapes (the GEMMs past
          // cuBLAS' int limits), so that one's refusal is not the plan's.
          const MergeBackwardMethod chosen = options_.merge_backward;
          for (const MergeBackwardMethod meth : {MergeBackwardMethod::kFused, MergeBackwardMethod::kGemm}) {
            if (chosen != MergeBackwardMethod::kAuto && chosen != meth) continue;
            const Status st = take([&](size_t& b) { return merge_backward_leaf(meth)(mb, nullptr, b, stream); });
            if (st != Status::kSuccess && (chosen != MergeBackwardMethod::kAuto || meth == MergeBackwardMethod::kFused))
              return st;
          }
        }
      }
    }
    const int64_t tmax = layout_.segment_len < layout_.seq_len ? layout_.segment_len : layout_.seq_len;
    SwigluForwardArgs<T> sf;
    sf.rows = chunk * tmax; sf.cols = width;
    sf.a = shape_only_pointer<const T>(); sf.a_stride = 2 * width;
    sf.u = shape_only_pointer<const T>(); sf.u_stride = 2 * width;
    sf.m = shape_only_pointer<T>(); sf.m_stride = 2 * width;
    LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template swiglu_forward<T>(sf, nullptr, b, stream); }));
    SwigluBackwardArgs<T> sb;
    sb.rows = chunk * tmax; sb.cols = width;
    sb.a = shape_only_pointer<const T>(); sb.a_stride = 2 * width;
    sb.u = shape_only_pointer<const T>(); sb.u_stride = 2 * width;
    sb.dm = shape_only_pointer<const T>(); sb.dm_stride = width;
    sb.da = shape_only_pointer<T>(); sb.da_stride = 2 * width;
    sb.du = shape_only_pointer<T>(); sb.du_stride = 2 * width;
    LORY_RETURN_IF_ERROR(take([&](size_t& b) { return Backend::template swiglu_backward<T>(sb, nullptr, b, stream); }));
    if (width < f) {
      RoundToStorageArgs<T> ra;
      ra.rows = chunk * tmax; ra.cols = d;
      ra.src = shape_only_pointer<const float>(); ra.src_stride = d;
      ra.dst = shape_only_pointer<T>(); ra.dst_stride = d;
      LORY_RETURN_IF_ERROR(take([&](size_t& b) { return round_leaf(ra, nullptr, b, stream); }));
    }
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
  // family: kTokens rows of the caller's [B*L, .] tensors, kAct / kActPair rows
  // of the chunk's activations of slice J (which start at token_begin(s0); w or
  // 2w columns per row), kWeights / kWeightsPair the chunk's merged weights /
  // gradients of slice J (w d or 2 w d per segment), kAcc rows of the fp32
  // accumulator ([tokens of the chunk, d]). C is T, or float for the accumulator.
  template <class TC>
  Status gemm(const detail::MoeSegmentGroup& g, int64_t s0, const Slice& J, bool trans_a, bool trans_b, int64_t m,
              int64_t n, int64_t k, const T* A, Op fa, const T* B, Op fb, TC* C, Op fc, float beta,
              Stream stream) const {
    StridedBatchedGemm<T, TC> gm;
    gm.m = m; gm.n = n; gm.k = k; gm.batch = g.count;
    gm.trans_a = trans_a; gm.trans_b = trans_b;
    gm.alpha = 1.f; gm.beta = beta;
    int64_t off = 0, stride = 0, cols = 0;
    locate(g, s0, J, fa, off, stride, cols);
    gm.A = A + off; gm.stride_a = stride;
    gm.lda = is_weights(fa) ? (trans_a ? m : k) : cols;
    locate(g, s0, J, fb, off, stride, cols);
    gm.B = B + off; gm.stride_b = stride;
    gm.ldb = is_weights(fb) ? (trans_b ? k : n) : cols;
    locate(g, s0, J, fc, off, stride, cols);
    gm.C = C + off; gm.stride_c = stride;
    gm.ldc = is_weights(fc) ? n : cols;
    if constexpr (std::is_same<TC, T>::value || kSlicesF) {
      return Backend::template gemm<T>(gm, stream);
    } else {
      // Unreachable: without 2-D merge views the plan runs one slice and has no accumulator.
      return detail::fail(Status::kErrorInvalidArgument, "C", "an fp32 GEMM output needs a slicing backend");
    }
  }

  // The backend's fp32 -> T rounding, as a leaf operation (slicing backends only).
  static Status round_leaf(const RoundToStorageArgs<T>& ra, void* ws, size_t& bytes, Stream stream) {
    if constexpr (kSlicesF) {
      return Backend::template round_to_storage<T>(ra, ws, bytes, stream);
    } else {
      // Unreachable: without 2-D merge views the plan runs one slice and has no accumulator.
      return detail::fail(Status::kErrorInvalidArgument, "dst", "rounding an accumulator needs a slicing backend");
    }
  }

  // dst rows of chunk [s0, s1) (the caller's [B*L, d] y or dx) = the accumulator, rounded once.
  Status round_chunk(const float* acc, T* dst, int64_t s0, int64_t s1, const Workspace& w, Stream stream) const {
    RoundToStorageArgs<T> ra;
    ra.rows = chunk_tokens(s0, s1);
    ra.cols = shape_.d;
    ra.src = acc; ra.src_stride = shape_.d;
    ra.dst = dst + layout_.token_begin(s0) * shape_.d; ra.dst_stride = shape_.d;
    return leaf(round_leaf, ra, w, stream);
  }

  static bool is_weights(Op family) { return family == Op::kWeights || family == Op::kWeightsPair; }

  // Offset of the group's first batch entry, batch stride and row width (for token-major operands:
  // d for the caller's tensors and the accumulator, w for activations, 2w for the pairs).
  void locate(const detail::MoeSegmentGroup& g, int64_t s0, const Slice& J, Op family, int64_t& off, int64_t& stride,
              int64_t& cols) const {
    const int64_t d = shape_.d;
    const bool pair = family == Op::kActPair || family == Op::kWeightsPair;
    const int64_t jw = pair ? 2 * J.width : J.width;
    const int64_t rel = layout_.token_begin(g.first) - layout_.token_begin(s0);  // chunk-relative token
    switch (family) {
      case Op::kTokens:
        cols = d;
        off = layout_.token_begin(g.first) * d;
        stride = g.token_stride * d;
        return;
      case Op::kAct:
      case Op::kActPair:
        cols = jw;
        off = rel * jw;
        stride = g.token_stride * jw;
        return;
      case Op::kAcc:
        cols = d;
        off = rel * d;
        stride = g.token_stride * d;
        return;
      case Op::kWeights:
      case Op::kWeightsPair:
        cols = 0;
        off = (g.first - s0) * jw * d;
        stride = g.segment_step * jw * d;
        return;
    }
  }

  // Slice J of expert matrix m (0: W_g, 1: W_u, both [f, d]; 2: W_d, [d, f]) as a merge view:
  // rows J of W_g / W_u are one flat run of w d elements at row j0; columns J of W_d are d rows of
  // w elements, f apart. The merged slice is packed: [w, d] or [d, w] per segment; W_g's and
  // W_u's slices sit in wbar_gu, 2 w d apart per segment, W_d's in wbar_d, w d apart
  // (segment_stride_of). Flat views (one slice: w = f) come back as rows = 1, the unsliced call.
  void view_of(int m, const Slice& J, int64_t& rows, int64_t& params, int64_t& pitch, int64_t& offset) const {
    const int64_t d = shape_.d;
    if (m < 2) {
      rows = 1; params = J.width * d; pitch = params; offset = J.j0 * d;
    } else {
      rows = d; params = J.width; pitch = shape_.f; offset = J.j0;
    }
  }
  int64_t segment_stride_of(int m, const Slice& J) const { return (m < 2 ? 2 : 1) * J.width * shape_.d; }
  MergeForwardArgs<T, float> merge_forward_args(int m, const Slice& J, int64_t count, const T* W,
                                                const float* weights, T* Wbar) const {
    MergeForwardArgs<T, float> mf;
    int64_t offset = 0;
    view_of(m, J, mf.rows, mf.params, mf.W_row_pitch, offset);
    mf.num_segments = count;
    mf.experts = shape_.experts;
    mf.W = detail::is_shape_only(W) ? W : W + offset;
    mf.expert_stride = shape_.f * shape_.d;
    mf.weights = weights;
    mf.Wbar = Wbar;
    mf.Wbar_row_pitch = mf.params;
    mf.segment_stride = segment_stride_of(m, J);
    return detail::flatten(mf);
  }
  MergeBackwardArgs<T, float> merge_backward_args(int m, const Slice& J, int64_t count, const T* G, const T* W,
                                                  const float* weights, T* dW, float* d_weights) const {
    MergeBackwardArgs<T, float> mb;
    int64_t offset = 0;
    view_of(m, J, mb.rows, mb.params, mb.W_row_pitch, offset);
    mb.num_segments = count;
    mb.experts = shape_.experts;
    mb.G = G;
    mb.G_row_pitch = mb.params;
    mb.grad_segment_stride = segment_stride_of(m, J);
    mb.W = detail::is_shape_only(W) ? W : W + offset;
    mb.expert_stride = shape_.f * shape_.d;
    mb.weights = weights;
    mb.dW = dW ? (detail::is_shape_only(dW) ? dW : dW + offset) : nullptr;
    mb.dW_row_pitch = mb.W_row_pitch;
    mb.dW_expert_stride = shape_.f * shape_.d;
    mb.d_weights = d_weights;
    mb.deterministic = true;
    return detail::flatten(mb);
  }

  Status merge_chunk(const MoeFfnParams<T, float>& p, const float* weights, int64_t s0, int64_t s1, const Slice& J,
                     const Workspace& w, Stream stream) const {
    const T* W[3] = {p.W_g, p.W_u, p.W_d};
    T* Wbar[3] = {w.wbar_gu, w.wbar_gu + J.width * shape_.d, w.wbar_d};
    for (int m = 0; m < 3; ++m) {
      const MergeForwardArgs<T, float> mf =
          merge_forward_args(m, J, s1 - s0, W[m], weights + s0 * shape_.experts, Wbar[m]);
      LORY_RETURN_IF_ERROR(leaf(Backend::template merge_forward<T>, mf, w, stream));
    }
    return Status::kSuccess;
  }

  // [a | u] = x [Wbar_g; Wbar_u]^T: [rows, d] x [2w, d]^T per segment, one GEMM.
  Status gate_up_chunk(const T* x, int64_t s0, int64_t s1, const Slice& J, const Workspace& w, Stream stream) const {
    return for_each_group(s0, s1, [&](const detail::MoeSegmentGroup& g) {
      return gemm(g, s0, J, false, true, g.rows, 2 * J.width, shape_.d, x, Op::kTokens, w.wbar_gu, Op::kWeightsPair,
                  w.act_au, Op::kActPair, 0.f, stream);
    });
  }

  // m = silu(a) * u over every token of the chunk at once.
  Status swiglu_chunk(int64_t s0, int64_t s1, const Slice& J, const Workspace& w, Stream stream) const {
    SwigluForwardArgs<T> sf;
    sf.rows = chunk_tokens(s0, s1);
    sf.cols = J.width;
    sf.a = w.act_au; sf.a_stride = 2 * J.width;
    sf.u = w.act_au + J.width; sf.u_stride = 2 * J.width;
    sf.m = w.act_mdu; sf.m_stride = 2 * J.width;
    return leaf(Backend::template swiglu_forward<T>, sf, w, stream);
  }

  SegmentLayout layout_;
  FfnShape shape_;
  RoutingMode mode_;
  MoeFfnOptions options_;
  Status status_ = Status::kErrorInvalidArgument;
  ErrorDetail init_detail_;
  int64_t chunk_ = 0;
  int64_t width_ = 0;
  size_t scratch_bytes_ = 0;
  size_t workspace_bytes_ = 0;
  size_t min_workspace_bytes_ = 0;
  size_t unchunked_workspace_bytes_ = 0;
};

LORY_NAMESPACE_END
