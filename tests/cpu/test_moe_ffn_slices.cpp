// The plan's split over slices of f (docs/memory.md): a counting backend records, per element of
// each expert matrix, how often a merge read it, and the tests assert once per forward and twice per
// backward at every budget from min_workspace_size_unchunked() up (chunks x that below it); sliced
// results against the unsliced run within the fp32 summation-order bound, against the double twin,
// finite differences and the causal rule at small budgets; the merge twins' 2-D views.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"
#include "common/test_util.hpp"
#include "lory/math.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/moe_ffn_backend.hpp"

namespace {

using namespace lory_test;
using lory::MergeBackwardArgs;
using lory::MergeForwardArgs;
using CpuBackend = lory::reference::MoeFfnCpuBackend;

// Per element of W_g, W_u, W_d: how many merges read it (forward merge; merge backward's W for
// d_weights) and how many merge backwards wrote its gradient.
struct Counts {
  const void* W[3] = {};
  const void* dW[3] = {};
  size_t n = 0, elem = 0;  // elements per matrix (E f d) and their size
  std::vector<int> merge_reads[3], backward_reads[3], dW_writes[3];
  int64_t foreign = 0;  // views outside the registered matrices

  void reset() {
    for (int m = 0; m < 3; ++m) {
      merge_reads[m].assign(n, 0);
      backward_reads[m].assign(n, 0);
      dW_writes[m].assign(n, 0);
    }
    foreign = 0;
  }
  // Every element of E views of rows x params, pitch and stride apart, starting at p.
  void add(std::vector<int>* counts, const void* const* bases, const void* p, int E, int64_t stride, int64_t rows,
           int64_t params, int64_t pitch) {
    if (rows == 1) pitch = 0;
    for (int m = 0; m < 3; ++m) {
      const auto* b = static_cast<const unsigned char*>(bases[m]);
      const auto* q = static_cast<const unsigned char*>(p);
      if (q < b || q >= b + n * elem) continue;
      const int64_t off = (q - b) / static_cast<int64_t>(elem);
      for (int e = 0; e < E; ++e)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < params; ++j) {
            const int64_t i = off + e * stride + r * pitch + j;
            if (i < 0 || i >= static_cast<int64_t>(n)) ++foreign;
            else ++counts[m][i];
          }
      return;
    }
    ++foreign;
  }
};
Counts* g_counts = nullptr;

// The CPU backend, counting what its merges read and write (real calls only, not size queries).
struct CountingBackend : CpuBackend {
  template <class T>
  static Status merge_forward(const MergeForwardArgs<T, float>& a, void* ws, size_t& bytes, Stream s) {
    if (ws && g_counts)
      g_counts->add(g_counts->merge_reads, g_counts->W, a.W, a.experts, a.expert_stride, a.rows, a.params,
                    a.W_row_pitch);
    return CpuBackend::merge_forward<T>(a, ws, bytes, s);
  }
  template <class T>
  static Status merge_backward(const MergeBackwardArgs<T, float>& a, lory::MergeBackwardMethod m, void* ws,
                               size_t& bytes, Stream s) {
    if (ws && g_counts) {
      if (a.d_weights)
        g_counts->add(g_counts->backward_reads, g_counts->W, a.W, a.experts, a.expert_stride, a.rows, a.params,
                      a.W_row_pitch);
      if (a.dW)
        g_counts->add(g_counts->dW_writes, g_counts->dW, a.dW, a.experts, a.dW_expert_stride, a.rows, a.params,
                      a.dW_row_pitch);
    }
    return CpuBackend::merge_backward<T>(a, m, ws, bytes, s);
  }
};

// A backend as the CUDA one is until its merges take 2-D views: no kMergeViews2d member and a
// T-only GEMM. The plan must run it exactly as before slicing existed.
struct FlatOnlyBackend {
  using Stream = CpuBackend::Stream;
  template <class T> static Status can_implement(const SegmentLayout& l, const FfnShape& s) {
    return CpuBackend::can_implement<T>(l, s);
  }
  static Status check_stream(const Stream& s) { return CpuBackend::check_stream(s); }
  template <class T> static Status router_forward(const lory::RouterForwardArgs<T, float>& a, void* w, size_t& b, Stream s) {
    return CpuBackend::router_forward<T>(a, w, b, s);
  }
  template <class T> static Status router_backward(const lory::RouterBackwardArgs<T, float>& a, void* w, size_t& b, Stream s) {
    return CpuBackend::router_backward<T>(a, w, b, s);
  }
  template <class T> static Status merge_forward(const MergeForwardArgs<T, float>& a, void* w, size_t& b, Stream s) {
    if (a.rows != 1) return Status::kErrorInvalidArgument;  // a flat-only launcher
    return CpuBackend::merge_forward<T>(a, w, b, s);
  }
  template <class T> static Status merge_backward(const MergeBackwardArgs<T, float>& a, lory::MergeBackwardMethod m,
                                                  void* w, size_t& b, Stream s) {
    if (a.rows != 1) return Status::kErrorInvalidArgument;
    return CpuBackend::merge_backward<T>(a, m, w, b, s);
  }
  template <class T> static Status swiglu_forward(const lory::SwigluForwardArgs<T>& a, void* w, size_t& b, Stream s) {
    return CpuBackend::swiglu_forward<T>(a, w, b, s);
  }
  template <class T> static Status swiglu_backward(const lory::SwigluBackwardArgs<T>& a, void* w, size_t& b, Stream s) {
    return CpuBackend::swiglu_backward<T>(a, w, b, s);
  }
  template <class T> static Status gemm(const lory::StridedBatchedGemm<T>& g, Stream s) {
    return CpuBackend::gemm<T>(g, s);
  }
};
static_assert(lory::detail::backend_merge_views_2d<CpuBackend>::value, "the CPU backend slices");
static_assert(!lory::detail::backend_merge_views_2d<FlatOnlyBackend>::value, "a missing trait is false");

// Forward then backward through a plan (fresh, poisoned workspace for each), outputs poisoned.
// With counts: the forward's counts are checked by `after_forward`, then reset for the backward.
template <class T, class Backend, class AfterForward>
Status run(const LayerProblem<T>& P, const lory::MoeFfnPlan<T, Backend>& plan, LayerOutputs<T, float>& out,
           AfterForward&& after_forward, const InitialGrads<T>* init = nullptr) {
  LORY_RETURN_IF_ERROR(plan.can_implement());
  out = new_outputs<T, float>(P, init);
  std::vector<unsigned char> ws(plan.workspace_size(), 0xff);
  const auto f = forward_args(P.params(), P.x.data(), out);
  LORY_RETURN_IF_ERROR(plan.forward(f, ws.data(), ws.size(), {}));
  after_forward();
  std::fill(ws.begin(), ws.end(), static_cast<unsigned char>(0xff));
  return plan.backward(backward_args(f.p, P.x.data(), P.dy.data(), out, init != nullptr), ws.data(), ws.size(), {});
}
template <class T, class Backend>
Status run(const LayerProblem<T>& P, const lory::MoeFfnPlan<T, Backend>& plan, LayerOutputs<T, float>& out) {
  return run(P, plan, out, [] {});
}

template <class T, class Backend = CpuBackend>
lory::MoeFfnPlan<T, Backend> plan_with(const LayerProblem<T>& P, size_t budget, int64_t slice_width = 0,
                                       int64_t max_chunk = 0) {
  MoeFfnOptions o;
  o.workspace_budget_bytes = budget;
  o.slice_width = slice_width;
  o.max_chunk_segments = max_chunk;
  return lory::MoeFfnPlan<T, Backend>(P.lay, P.sh, P.mode, o);
}

// Budgets from unlimited down to the minimum: each width's exact size for all segments and one byte
// less, each chunk's at the narrowest width, the thresholds and the minimum itself.
template <class Plan>
std::vector<size_t> budgets_of(const Plan& unl) {
  const int64_t S = unl.layout().num_segments(), f = unl.shape().f;
  std::set<size_t> b = {0, unl.min_workspace_size(), unl.min_workspace_size_unchunked(),
                        unl.min_workspace_size_unchunked() - 1};
  std::vector<int64_t> widths = {f};
  for (int64_t w = lory::detail::kSliceGranule; w < f; w += lory::detail::kSliceGranule) widths.push_back(w);
  for (int64_t w : widths) {
    b.insert(unl.workspace_size_for(S, w));
    b.insert(unl.workspace_size_for(S, w) - 1);
  }
  const int64_t narrow = f > lory::detail::kSliceGranule ? lory::detail::kSliceGranule : f;
  for (int64_t c = 1; c < S; ++c) b.insert(unl.workspace_size_for(c, narrow));
  std::vector<size_t> out;
  for (size_t x : b)
    if (x == 0 || x >= unl.min_workspace_size()) out.push_back(x);
  return out;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void require_all(const std::vector<int>& v, int want, const char* what) {
  INFO(what << ": every element counted " << want << " time(s)");
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  REQUIRE(*lo == want);
  REQUIRE(*hi == want);
}

}  // namespace

TEST_CASE("plan slices: each expert weight is read once per forward and twice per backward at every budget",
          "[cpu][plan][slices]") {
  auto rng = make_rng("moe_slices_reads");
  // Odd d, f not a multiple of the slice width, f below one granule, E = 1, 3, 8.
  const FfnShape shapes[] = {{11, 40, 3}, {9, 50, 1}, {8, 33, 8}, {5, 12, 3}};
  // A ragged last segment; L < T; L % T == 0 with several sequences.
  const SegmentLayout layouts[] = {{2, 21, 8}, {3, 5, 8}, {3, 16, 8}};
  Counts counts;
  g_counts = &counts;
  for (const FfnShape& sh : shapes)
    for (const SegmentLayout& lay : layouts)
      for (RoutingMode mode : kAllRoutingModes) {
        const auto P = random_layer<float>(lay, sh, mode, mode == RoutingMode::kCausalSegment, rng);
        const int64_t S = lay.num_segments();
        const auto unl = plan_with<float, CountingBackend>(P, 0);
        REQUIRE(unl.can_implement() == Status::kSuccess);
        REQUIRE(unl.num_slices() == 1);
        REQUIRE(unl.chunk_segments() == S);
        LayerOutputs<float, float> ref;
        g_counts = nullptr;
        REQUIRE(run(P, unl, ref) == Status::kSuccess);
        g_counts = &counts;
        const auto twin = run_reference(P);
        for (size_t budget : budgets_of(unl)) {
          const auto plan = plan_with<float, CountingBackend>(P, budget);
          INFO("d=" << sh.d << " f=" << sh.f << " E=" << sh.experts << " B=" << lay.batch << " L=" << lay.seq_len
                    << " T=" << lay.segment_len << " mode=" << lory::routing_mode_name(mode) << " budget=" << budget
                    << " chunk=" << plan.chunk_segments() << " width=" << plan.slice_width()
                    << " slices=" << plan.num_slices());
          REQUIRE(plan.can_implement() == Status::kSuccess);
          if (budget) REQUIRE(plan.workspace_size() <= budget);
          REQUIRE(plan.workspace_size() == plan.workspace_size_for(plan.chunk_segments(), plan.slice_width()));
          const bool unchunked = budget == 0 || budget >= unl.min_workspace_size_unchunked();
          REQUIRE((plan.chunk_segments() == S) == unchunked);
          // A budget that holds the unsliced chunk of all segments runs unsliced (today's plan).
          if (budget == 0 || budget >= unl.workspace_size_for(S, sh.f)) REQUIRE(plan.num_slices() == 1);
          if (plan.num_slices() > 1) {
            REQUIRE(plan.slice_width() % lory::detail::kSliceGranule == 0);
            REQUIRE(plan.num_slices() == ceil_div(sh.f, plan.slice_width()));
            // Evened out: no narrower multiple of the granule gives as few slices.
            if (plan.slice_width() > lory::detail::kSliceGranule)
              REQUIRE(ceil_div(sh.f, plan.slice_width() - lory::detail::kSliceGranule) > plan.num_slices());
          }
          const int chunks = static_cast<int>(ceil_div(S, plan.chunk_segments()));

          counts.n = static_cast<size_t>(sh.experts * sh.f * sh.d);
          counts.elem = sizeof(float);
          counts.W[0] = P.W_g.data(); counts.W[1] = P.W_u.data(); counts.W[2] = P.W_d.data();
          counts.reset();
          LayerOutputs<float, float> got;
          bool forward_checked = false;
          const Status st = run(P, plan, got, [&] {
            for (int m = 0; m < 3; ++m) {
              require_all(counts.merge_reads[m], chunks, "forward merge reads");
              require_all(counts.backward_reads[m], 0, "forward merge-backward reads");
            }
            REQUIRE(counts.foreign == 0);
            forward_checked = true;
            counts.dW[0] = got.dW_g.data(); counts.dW[1] = got.dW_u.data(); counts.dW[2] = got.dW_d.data();
            counts.reset();
          });
          REQUIRE(st == Status::kSuccess);
          REQUIRE(forward_checked);
          for (int m = 0; m < 3; ++m) {
            // Backward: the recomputed merge once and the merge backward once, per chunk.
            require_all(counts.merge_reads[m], chunks, "backward recomputed-merge reads");
            require_all(counts.backward_reads[m], chunks, "backward merge-backward reads");
            require_all(counts.dW_writes[m], chunks, "backward dW writes");
          }
          REQUIRE(counts.foreign == 0);

          // Against the unsliced one-chunk run: expert gradients bit for bit when unchunked (each
          // is the same fp32 sum in the same order); y, dx, d_weights to fp32 summation order
          // (the elementwise bound is tested below; 1e-4 is far above it here and far below what a
          // misplaced slice gives), and the double twin.
          if (plan.chunk_segments() == S) {
            REQUIRE(got.dW_g == ref.dW_g);
            REQUIRE(got.dW_u == ref.dW_u);
            REQUIRE(got.dW_d == ref.dW_d);
          } else {
            CHECK(rel_error(got.dW_g, ref.dW_g) <= 1e-6);
            CHECK(rel_error(got.dW_u, ref.dW_u) <= 1e-6);
            CHECK(rel_error(got.dW_d, ref.dW_d) <= 1e-6);
          }
          REQUIRE(got.weights == ref.weights);
          CHECK(rel_error(got.y, ref.y) <= 1e-4);
          CHECK(rel_error(got.dx, ref.dx) <= 1e-4);
          CHECK(rel_error(got.d_weights, ref.d_weights) <= 1e-4);
          check_against_reference(P, got, twin, tolerance<float>());
        }
      }
  g_counts = nullptr;
}

namespace {

// |terms| of the sums the slicing reorders, in double from the problem's inputs (kGivenWeights:
// no router path): My[t, i] = sum_j |m_tj Wbar_d[i, j]|, Mdx[t, i] = sum_j |da_tj Wbar_g[j, i]| +
// |du_tj Wbar_u[j, i]|, Mdw[s, e] = sum_p |dWbar_s[p] W_e[p]| over the three matrices.
template <class T>
void term_magnitudes(const LayerProblem<T>& P, std::vector<double>& My, std::vector<double>& Mdx,
                     std::vector<double>& Mdw) {
  const int64_t d = P.sh.d, f = P.sh.f, E = P.sh.experts, S = P.lay.num_segments(), fd = f * d;
  My.assign(P.lay.num_tokens() * d, 0.0);
  Mdx.assign(P.lay.num_tokens() * d, 0.0);
  Mdw.assign(S * E, 0.0);
  auto v = [](const std::vector<T>& x, int64_t i) { return lory::to_double(x[i]); };
  for (int64_t s = 0; s < S; ++s) {
    std::vector<double> Wg(fd, 0.0), Wu(fd, 0.0), Wd(fd, 0.0), Gg(fd, 0.0), Gu(fd, 0.0), Gd(fd, 0.0);
    for (int64_t e = 0; e < E; ++e) {
      const double w = P.given[s * E + e];
      for (int64_t p = 0; p < fd; ++p) {
        Wg[p] += w * v(P.W_g, e * fd + p);
        Wu[p] += w * v(P.W_u, e * fd + p);
        Wd[p] += w * v(P.W_d, e * fd + p);
      }
    }
    for (int64_t t = P.lay.token_begin(s); t < P.lay.token_begin(s) + P.lay.length(s); ++t) {
      for (int64_t j = 0; j < f; ++j) {
        double a = 0, u = 0, dm = 0;
        for (int64_t i = 0; i < d; ++i) {
          a += v(P.x, t * d + i) * Wg[j * d + i];
          u += v(P.x, t * d + i) * Wu[j * d + i];
          dm += v(P.dy, t * d + i) * Wd[i * f + j];
        }
        const double sig = 1.0 / (1.0 + std::exp(-a)), silu = a * sig;
        const double m = silu * u, du = dm * silu, da = dm * u * sig * (1.0 + a * (1.0 - sig));
        for (int64_t i = 0; i < d; ++i) {
          My[t * d + i] += std::fabs(m * Wd[i * f + j]);
          Mdx[t * d + i] += std::fabs(da * Wg[j * d + i]) + std::fabs(du * Wu[j * d + i]);
          Gg[j * d + i] += da * v(P.x, t * d + i);
          Gu[j * d + i] += du * v(P.x, t * d + i);
          Gd[i * f + j] += v(P.dy, t * d + i) * m;
        }
      }
    }
    for (int64_t e = 0; e < E; ++e)
      for (int64_t p = 0; p < fd; ++p)
        Mdw[s * E + e] += std::fabs(Gg[p] * v(P.W_g, e * fd + p)) + std::fabs(Gu[p] * v(P.W_u, e * fd + p)) +
                          std::fabs(Gd[p] * v(P.W_d, e * fd + p));
  }
}

// gamma_n = n u / (1 - n u): the bound on the relative error of an n-term fp32 sum in any order.
double gamma32(int64_t n) {
  const double u = std::ldexp(1.0, -24);
  return n * u / (1 - n * u);
}

// Sliced (got) against unsliced (ref), element by element: two fp32 sums of the same K terms in two
// orders differ by at most 2 gamma_{K + slices} M (M: the sum of |terms|; the slices add one
// accumulator addition each), times 1 + slack for the fp32 / T intermediates against the double
// ones M is computed from; rounding both to T once adds u_T (|got| + |ref|) (u_T = 0 for float:
// nothing is rounded after the sum). The unsliced dx is one GEMM over [da | du] too (the fused gate
// and up products), so it has no intermediate rounding to T for M to cover.
template <class T>
void require_within_order_bound(const char* name, const std::vector<T>& got, const std::vector<T>& ref,
                                const std::vector<double>& M, int64_t K, int64_t slices, double u_T, double slack) {
  INFO(name << " (K = " << K << ", slices = " << slices << ")");
  REQUIRE(got.size() == M.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = lory::to_double(got[i]), r = lory::to_double(ref[i]);
    const double bound =
        (2 * gamma32(K + slices) * M[i] + u_T * (std::fabs(g) + std::fabs(r))) * (1 + slack);
    INFO("element " << i << ": " << g << " vs " << r << ", bound " << bound);
    REQUIRE(std::fabs(g - r) <= bound);
  }
}

template <class T>
void check_order_bound(double u_T, double slack, const char* tag) {
  auto rng = make_rng(tag);
  const SegmentLayout lay{2, 21, 8};
  const FfnShape shapes[] = {{11, 70, 3}, {16, 100, 4}};
  for (const FfnShape& sh : shapes) {
    const auto P = random_layer<T>(lay, sh, RoutingMode::kGivenWeights, false, rng);
    std::vector<double> My, Mdx, Mdw;
    term_magnitudes(P, My, Mdx, Mdw);
    LayerOutputs<T, float> ref;
    REQUIRE(run(P, plan_with<T>(P, 0), ref) == Status::kSuccess);
    for (int64_t width : {int64_t(16), int64_t(32), int64_t(48), sh.f - 1}) {
      const auto plan = plan_with<T>(P, 0, width);
      INFO("d=" << sh.d << " f=" << sh.f << " width " << width);
      REQUIRE(plan.num_slices() == ceil_div(sh.f, width));
      LayerOutputs<T, float> got;
      REQUIRE(run(P, plan, got) == Status::kSuccess);
      const int64_t ns = plan.num_slices();
      require_within_order_bound("y", got.y, ref.y, My, sh.f, ns, u_T, slack);
      // dx: one fused GEMM (k = 2w) per slice, so one accumulator addition per slice.
      require_within_order_bound("dx", got.dx, ref.dx, Mdx, 2 * sh.f, ns, u_T, slack);
      require_within_order_bound("d_weights", got.d_weights, ref.d_weights, Mdw, 3 * sh.f * sh.d, 3 * ns, 0.0, slack);
      REQUIRE(got.dW_g == ref.dW_g);
      REQUIRE(got.dW_u == ref.dW_u);
      REQUIRE(got.dW_d == ref.dW_d);
    }
  }
}

}  // namespace

TEST_CASE("plan slices: y, dx, d_weights differ from the unsliced run by at most the fp32 summation-order bound",
          "[cpu][plan][slices]") {
  SECTION("fp32 storage") { check_order_bound<float>(0.0, 0.01, "moe_slices_bound_f32"); }
  SECTION("bf16 storage") { check_order_bound<__nv_bfloat16>(std::ldexp(1.0, -8), 0.05, "moe_slices_bound_bf16"); }
}

TEST_CASE("plan slices: bf16 and fp16 at small budgets against the double twin", "[cpu][plan][slices]") {
  auto rng = make_rng("moe_slices_low_precision");
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{16, 56, 4};
  for (RoutingMode mode : kAllRoutingModes) {
    const auto Pb = random_layer<__nv_bfloat16>(lay, sh, mode, true, rng);
    const auto Ph = random_layer<__half>(lay, sh, mode, true, rng);
    const auto ub = plan_with(Pb, 0);
    const auto uh = plan_with(Ph, 0);
    for (size_t budget : {ub.min_workspace_size_unchunked(), ub.min_workspace_size()}) {
      INFO("mode=" << lory::routing_mode_name(mode) << " budget=" << budget);
      const auto pb = plan_with(Pb, budget);
      REQUIRE(pb.num_slices() > 1);
      LayerOutputs<__nv_bfloat16, float> gb;
      REQUIRE(run(Pb, pb, gb) == Status::kSuccess);
      check_against_reference(Pb, gb, run_reference(Pb), tolerance<__nv_bfloat16>());
    }
    const auto ph = plan_with(Ph, uh.min_workspace_size_unchunked());
    REQUIRE(ph.num_slices() > 1);
    LayerOutputs<__half, float> gh;
    REQUIRE(run(Ph, ph, gh) == Status::kSuccess);
    check_against_reference(Ph, gh, run_reference(Ph), tolerance<__half>());
  }
}

TEST_CASE("plan slices: accumulate adds into the expert gradients once per element", "[cpu][plan][slices]") {
  auto rng = make_rng("moe_slices_accumulate");
  const auto P = random_layer<float>({2, 21, 8}, {11, 40, 3}, RoutingMode::kCausalSegment, true, rng);
  const InitialGrads<float> init = random_initial_grads(P, rng);
  const auto twin = run_reference(P, &init);
  const auto unl = plan_with(P, 0);
  for (size_t budget : {size_t(0), unl.min_workspace_size_unchunked(), unl.min_workspace_size()}) {
    INFO("budget " << budget);
    LayerOutputs<float, float> got;
    REQUIRE(run(P, plan_with(P, budget), got, [] {}, &init) == Status::kSuccess);
    check_against_reference(P, got, twin, tolerance<float>());
  }
}

TEST_CASE("plan slices: directional finite differences at small budgets", "[cpu][plan][slices][grad]") {
  // Double storage (the leaves still sum in fp32): the loss <y, dy> and the gradients through the
  // sliced (and chunked) plan, against central differences along a random direction per input.
  auto rng = make_rng("moe_slices_fd");
  const SegmentLayout lay{2, 13, 4};
  const FfnShape sh{6, 40, 3};
  for (RoutingMode mode : {RoutingMode::kPromptLevel, RoutingMode::kGivenWeights}) {
    auto P = random_layer<double>(lay, sh, mode, true, rng);
    const auto unl = plan_with(P, 0);
    for (size_t budget : {unl.min_workspace_size_unchunked(), unl.min_workspace_size()}) {
      const auto plan = plan_with(P, budget);
      INFO("mode=" << lory::routing_mode_name(mode) << " chunk=" << plan.chunk_segments()
                   << " slices=" << plan.num_slices());
      REQUIRE(plan.num_slices() > 1);
      LayerOutputs<double, float> g;
      REQUIRE(run(P, plan, g) == Status::kSuccess);
      auto loss = [&]() {
        LayerOutputs<double, float> o = new_outputs<double, float>(P);
        std::vector<unsigned char> ws(plan.workspace_size());
        REQUIRE(plan.forward(forward_args(P.params(), P.x.data(), o), ws.data(), ws.size(), {}) == Status::kSuccess);
        double L = 0;
        for (size_t i = 0; i < o.y.size(); ++i) L += o.y[i] * P.dy[i];
        return L;
      };
      auto directional = [&](std::vector<double>& param, const std::vector<double>& grad, const char* name) {
        const std::vector<double> dir = random_vector<double>(param.size(), rng);
        const std::vector<double> p0 = param;
        // The leaves sum in fp32, so the loss carries a relative rounding of about 1e-7 that the
        // difference divides by 2h; the router's gradient is small against the loss, and at h = 1e-3
        // that rounding reached the bound (over 300 seeds, |an - fd| / scale for dW_r peaked at 1.6e-3
        // with h = 1e-3 and at 2.2e-4 with h = 1e-2, where the truncation error of the other
        // gradients stays below 4e-5).
        const double h = 1e-2;
        for (size_t i = 0; i < param.size(); ++i) param[i] = p0[i] + h * dir[i];
        const double Lp = loss();
        for (size_t i = 0; i < param.size(); ++i) param[i] = p0[i] - h * dir[i];
        const double Lm = loss();
        param = p0;
        double an = 0, scale = 0;
        for (size_t i = 0; i < param.size(); ++i) {
          an += grad[i] * dir[i];
          scale += std::fabs(grad[i] * dir[i]);
        }
        const double fd = (Lp - Lm) / (2 * h);
        INFO(name << ": analytic " << an << ", finite difference " << fd << ", scale " << scale);
        CHECK(std::fabs(an - fd) <= 1e-3 * scale);
      };
      directional(P.x, g.dx, "dx");
      directional(P.W_g, g.dW_g, "dW_g");
      directional(P.W_u, g.dW_u, "dW_u");
      directional(P.W_d, g.dW_d, "dW_d");
      if (mode != RoutingMode::kGivenWeights) directional(P.W_r, g.dW_r, "dW_r");
    }
  }
}

TEST_CASE("plan slices: causal rule at small budgets", "[cpu][plan][slices][causal]") {
  auto rng = make_rng("moe_slices_causal");
  const SegmentLayout lay{2, 13, 4};  // N = 4, last segment of length 1
  const FfnShape sh{5, 40, 4};
  const auto P0 = random_layer<float>(lay, sh, RoutingMode::kCausalSegment, true, rng);
  const auto unl = plan_with(P0, 0);
  for (size_t budget : {unl.min_workspace_size_unchunked(), unl.min_workspace_size()}) {
    const auto plan = plan_with(P0, budget);
    INFO("chunk=" << plan.chunk_segments() << " slices=" << plan.num_slices());
    REQUIRE(plan.num_slices() > 1);
    LayerOutputs<float, float> base;
    REQUIRE(run(P0, plan, base) == Status::kSuccess);
    const int64_t tok = lay.num_tokens(), d = sh.d;
    for (int64_t tp = 0; tp < tok; ++tp) {
      auto P = P0;
      for (int64_t j = 0; j < d; ++j) P.x[tp * d + j] += 0.5f;
      LayerOutputs<float, float> o = new_outputs<float, float>(P);
      std::vector<unsigned char> ws(plan.workspace_size());
      REQUIRE(plan.forward(forward_args(P.params(), P.x.data(), o), ws.data(), ws.size(), {}) == Status::kSuccess);
      const int64_t sp = lay.segment_of_token(tp);
      for (int64_t t = 0; t < tok; ++t) {
        const int64_t s = lay.segment_of_token(t);
        const bool first = lay.index_in_sequence(s) == 0;
        const bool allowed = t == tp || (first ? sp == s : sp == s - 1);
        const bool same = std::memcmp(&o.y[t * d], &base.y[t * d], d * sizeof(float)) == 0;
        INFO("perturbed token " << tp << ", output token " << t);
        if (!allowed) REQUIRE(same);
        else REQUIRE_FALSE(same);
      }
    }
  }
}

TEST_CASE("plan slices: the split rule, sizes and a backend without 2-D merge views", "[cpu][plan][slices]") {
  auto rng = make_rng("moe_slices_sizes");
  const SegmentLayout lay{3, 21, 8};
  const FfnShape sh{10, 70, 5};
  const auto P = random_layer<float>(lay, sh, RoutingMode::kCausalSegment, true, rng);
  const int64_t S = lay.num_segments();
  const auto unl = plan_with(P, 0);
  REQUIRE(unl.workspace_size() == unl.workspace_size_for_chunk(S));
  REQUIRE(unl.workspace_size_for(S, sh.f) == unl.workspace_size_for_chunk(S));
  // Sliced sizes: the unsliced pieces at width w plus the [C * Tmax, d] fp32 accumulator.
  const int64_t tmax = 8;
  for (int64_t w : {16, 32, 48, 64}) {
    const size_t base = unl.workspace_size_for(S, w);
    REQUIRE(base >= size_t(3 * S * w * sh.d + 5 * S * tmax * w) * sizeof(float) + size_t(S * tmax * sh.d) * sizeof(float));
    REQUIRE(unl.workspace_size_for(S, w + 16 <= 64 ? w + 16 : 64) >= base);
  }
  // The minimum: one segment at the narrowest width (smaller than unsliced here).
  REQUIRE(unl.min_workspace_size() == std::min(unl.workspace_size_for(1, 16), unl.workspace_size_for(1, sh.f)));
  REQUIRE(unl.min_workspace_size_unchunked() == std::min(unl.workspace_size_for(S, 16), unl.workspace_size_for(S, sh.f)));
  REQUIRE(unl.min_workspace_size_unchunked() < unl.workspace_size_for_chunk(S));
  // Below the minimum: refused, naming the option.
  {
    const auto p = plan_with(P, unl.min_workspace_size() - 1);
    REQUIRE(p.can_implement() == Status::kErrorWorkspaceTooSmall);
    REQUIRE(std::string(lory::last_error_detail().argument) == "options.workspace_budget_bytes");
  }
  // A fixed slice width; the budget then picks the chunk.
  {
    const auto p = plan_with(P, 0, 20);
    REQUIRE(p.slice_width() == 20);
    REQUIRE(p.num_slices() == 4);
    REQUIRE(p.chunk_segments() == S);
    const auto q = plan_with(P, unl.workspace_size_for(2, 20), 20);
    REQUIRE(q.slice_width() == 20);
    REQUIRE(q.chunk_segments() == 2);
    REQUIRE(plan_with(P, 0, 1000).num_slices() == 1);
    // A budget of exactly workspace_size_for(c, w) gives chunk c at a fixed width w.
    for (int64_t c = 1; c <= S; ++c)
      for (int64_t w : {int64_t(16), int64_t(23), sh.f}) {
        INFO("c " << c << " w " << w);
        const auto r = plan_with(P, unl.workspace_size_for(c, w), w);
        REQUIRE(r.chunk_segments() == c);
        REQUIRE(r.workspace_size() == unl.workspace_size_for(c, w));
        if (c > 1) REQUIRE(unl.workspace_size_for(c, w) > unl.workspace_size_for(c - 1, w));
      }
    REQUIRE(plan_with(P, 0, -1).can_implement() == Status::kErrorInvalidArgument);
  }
  // A max chunk caps the chunk; unchunked then means "at the cap".
  {
    const auto p = plan_with(P, 0, 0, 2);
    REQUIRE(p.chunk_segments() == 2);
    const auto q = plan_with(P, p.min_workspace_size_unchunked(), 0, 2);
    REQUIRE(q.chunk_segments() == 2);
    REQUIRE(q.num_slices() > 1);
  }
  // A backend without kMergeViews2d: today's chunk-only plan, byte for byte the same sizes, and it
  // runs (its merges refuse 2-D views, so a slice would fail the run).
  {
    using Flat = lory::MoeFfnPlan<float, FlatOnlyBackend>;
    const Flat fu(lay, sh, RoutingMode::kCausalSegment);
    REQUIRE(fu.workspace_size() == unl.workspace_size());
    REQUIRE(fu.min_workspace_size() == unl.workspace_size_for_chunk(1));
    REQUIRE(fu.workspace_size_for(S, 16) == 0);  // no sliced layout without the trait
    for (int64_t c = 1; c <= S; ++c) {
      MoeFfnOptions o;
      o.workspace_budget_bytes = unl.workspace_size_for_chunk(c);
      o.slice_width = 16;  // ignored without 2-D views
      const Flat p(lay, sh, RoutingMode::kCausalSegment, o);
      REQUIRE(p.can_implement() == Status::kSuccess);
      REQUIRE(p.chunk_segments() == c);
      REQUIRE(p.num_slices() == 1);
      REQUIRE(p.workspace_size() == unl.workspace_size_for_chunk(c));
      LayerOutputs<float, float> a, b;
      REQUIRE(run(P, p, a) == Status::kSuccess);
      MoeFfnOptions oc;
      oc.max_chunk_segments = c;
      REQUIRE(run(P, lory::reference::MoeFfnCpuPlan<float>(lay, sh, RoutingMode::kCausalSegment, oc), b) ==
              Status::kSuccess);
      REQUIRE(a.y == b.y);
      REQUIRE(a.dx == b.dx);
      REQUIRE(a.dW_d == b.dW_d);
      REQUIRE(a.d_weights == b.d_weights);
    }
  }
}

TEST_CASE("round_to_storage validates and rounds once", "[cpu][plan][slices]") {
  std::vector<float> src = {1.f + std::ldexp(1.f, -9), -3.25f, 1e-3f, 7.f, 0.f, 2.f};
  std::vector<__nv_bfloat16> dst(8);
  poison(dst);
  lory::RoundToStorageArgs<__nv_bfloat16> a;
  a.rows = 2; a.cols = 2; a.src = src.data(); a.src_stride = 3; a.dst = dst.data(); a.dst_stride = 4;
  size_t bytes = 0;
  REQUIRE(CpuBackend::round_to_storage(a, dst.data() + 7, bytes, {}) == Status::kSuccess);
  REQUIRE(lory::to_double(dst[0]) == 1.0);  // 1 + 2^-9 rounds to even
  REQUIRE(lory::to_double(dst[1]) == -3.25);
  REQUIRE(lory::to_double(dst[4]) == 7.0);
  REQUIRE(lory::to_double(dst[5]) == 0.0);
  REQUIRE(count_nan(dst) == 4);  // padding untouched
  auto bad = a;
  bad.src_stride = 1;
  REQUIRE(CpuBackend::round_to_storage(bad, dst.data(), bytes, {}) == Status::kErrorInvalidShape);
  REQUIRE(std::string(lory::last_error_detail().argument) == "src_stride");
  bad = a;
  bad.rows = int64_t(1) << 62;
  REQUIRE(CpuBackend::round_to_storage(bad, dst.data(), bytes, {}) == Status::kErrorInvalidSize);
  lory::RoundToStorageArgs<float> alias;
  alias.rows = 2; alias.cols = 2; alias.src = src.data(); alias.src_stride = 3;
  alias.dst = src.data() + 1; alias.dst_stride = 3;
  REQUIRE(CpuBackend::round_to_storage(alias, src.data(), bytes, {}) == Status::kErrorInvalidArgument);
  REQUIRE(std::string(lory::last_error_detail().argument) == "dst");
}

// ---- merge twins on 2-D views -------------------------------------------------------------------

namespace {
struct ViewCase {
  int64_t S;
  int E;
  int64_t rows, params, w_pitch, wbar_pitch, w_stride, s_stride;
};
const ViewCase kViewCases[] = {
    {3, 4, 5, 3, 7, 4, 5 * 7, 5 * 4 + 2},   // a column block of a [5, 7] matrix per expert
    {1, 1, 4, 6, 6, 9, 24, 4 * 9},          // packed W rows, padded Wbar rows
    {4, 3, 1, 13, 0, 0, 15, 13},            // rows = 1: pitches ignored (0)
    {2, 8, 7, 1, 11, 3, 80, 21},            // one column
};
}  // namespace

TEST_CASE("merge twins on 2-D views: against float64, padding untouched", "[cpu][merge][slices]") {
  auto rng = make_rng("merge_views_2d");
  for (const ViewCase& c : kViewCases) {
    INFO("S=" << c.S << " E=" << c.E << " rows=" << c.rows << " params=" << c.params);
    const int64_t wp = c.rows > 1 ? c.w_pitch : 0, bp = c.rows > 1 ? c.wbar_pitch : 0;
    const auto W = random_vector<float>(c.E * c.w_stride, rng);
    const auto weights = random_vector<float>(c.S * c.E, rng);
    std::vector<float> Wbar(c.S * c.s_stride);
    poison(Wbar);
    MergeForwardArgs<float, float> f;
    f.num_segments = c.S; f.experts = c.E; f.params = c.params; f.rows = c.rows;
    f.W = W.data(); f.expert_stride = c.w_stride; f.W_row_pitch = c.w_pitch;
    f.weights = weights.data();
    f.Wbar = Wbar.data(); f.segment_stride = c.s_stride; f.Wbar_row_pitch = c.wbar_pitch;
    REQUIRE(lory::reference::merge_forward<float>(f) == Status::kSuccess);
    std::vector<char> written(Wbar.size(), 0);
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.params; ++j) {
          double want = 0;
          for (int e = 0; e < c.E; ++e) want += double(weights[s * c.E + e]) * W[e * c.w_stride + r * wp + j];
          const int64_t i = s * c.s_stride + r * bp + j;
          written[i] = 1;
          REQUIRE(std::fabs(Wbar[i] - want) <= 1e-6 * (1 + std::fabs(want)));
        }
    for (size_t i = 0; i < Wbar.size(); ++i)
      if (!written[i]) REQUIRE(std::isnan(Wbar[i]));

    // Backward on the same views: G laid out as Wbar, dW as W (padding poisoned).
    const auto G = random_vector<float>(c.S * c.s_stride, rng);
    std::vector<float> dW(c.E * c.w_stride), dwts(c.S * c.E);
    poison(dW);
    poison(dwts);
    MergeBackwardArgs<float, float> b;
    b.num_segments = c.S; b.experts = c.E; b.params = c.params; b.rows = c.rows;
    b.G = G.data(); b.grad_segment_stride = c.s_stride; b.G_row_pitch = c.wbar_pitch;
    b.W = W.data(); b.expert_stride = c.w_stride; b.W_row_pitch = c.w_pitch;
    b.weights = weights.data();
    b.dW = dW.data(); b.dW_expert_stride = c.w_stride; b.dW_row_pitch = c.w_pitch;
    b.d_weights = dwts.data();
    REQUIRE(lory::reference::merge_backward<float>(b) == Status::kSuccess);
    std::vector<char> dw_written(dW.size(), 0);
    for (int e = 0; e < c.E; ++e)
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.params; ++j) {
          double want = 0;
          for (int64_t s = 0; s < c.S; ++s) want += double(weights[s * c.E + e]) * G[s * c.s_stride + r * bp + j];
          const int64_t i = e * c.w_stride + r * wp + j;
          dw_written[i] = 1;
          REQUIRE(std::fabs(dW[i] - want) <= 1e-6 * (1 + std::fabs(want)));
        }
    for (size_t i = 0; i < dW.size(); ++i)
      if (!dw_written[i]) REQUIRE(std::isnan(dW[i]));
    for (int64_t s = 0; s < c.S; ++s)
      for (int e = 0; e < c.E; ++e) {
        double want = 0;
        for (int64_t r = 0; r < c.rows; ++r)
          for (int64_t j = 0; j < c.params; ++j)
            want += double(G[s * c.s_stride + r * bp + j]) * W[e * c.w_stride + r * wp + j];
        REQUIRE(std::fabs(dwts[s * c.E + e] - want) <= 1e-5 * (1 + std::fabs(want)));
      }
    // A flat 2-D view flattens to rows = 1 with the same result.
    if (c.rows > 1) {
      auto g = f;
      g.W_row_pitch = g.Wbar_row_pitch = g.params;
      REQUIRE(lory::detail::merge_view_is_flat(g));
      if (c.w_pitch != c.params) REQUIRE_FALSE(lory::detail::merge_view_is_flat(f));
      const auto h = lory::detail::flatten(g);
      REQUIRE(h.rows == 1);
      REQUIRE(h.params == c.rows * c.params);
    }
  }
}

TEST_CASE("merge twins on 2-D views: bad pitches, strides and overflow are refused, nothing written",
          "[cpu][merge][slices][validation]") {
  const int64_t S = 2, E = 3, rows = 4, P = 5, pitch = 8;
  std::vector<float> W(E * rows * pitch, 1.f), weights(S * E, 0.5f), Wbar(S * rows * pitch), G(S * rows * pitch, 1.f),
      dW(E * rows * pitch), dwts(S * E);
  MergeForwardArgs<float, float> f;
  f.num_segments = S; f.experts = int(E); f.params = P; f.rows = rows;
  f.W = W.data(); f.expert_stride = rows * pitch; f.W_row_pitch = pitch;
  f.weights = weights.data();
  f.Wbar = Wbar.data(); f.segment_stride = rows * pitch; f.Wbar_row_pitch = pitch;
  struct FwdCase {
    const char* what;
    void (*edit)(MergeForwardArgs<float, float>&);
    Status want;
    const char* arg;
  };
  const FwdCase fcases[] = {
      {"rows 0", [](MergeForwardArgs<float, float>& a) { a.rows = 0; }, Status::kErrorInvalidSize, "rows"},
      {"W pitch < params", [](MergeForwardArgs<float, float>& a) { a.W_row_pitch = 4; }, Status::kErrorInvalidShape, "W_row_pitch"},
      {"Wbar pitch < params", [](MergeForwardArgs<float, float>& a) { a.Wbar_row_pitch = 0; }, Status::kErrorInvalidShape, "Wbar_row_pitch"},
      {"expert stride < extent", [](MergeForwardArgs<float, float>& a) { a.expert_stride = 3 * 8 + 4; }, Status::kErrorInvalidShape, "expert_stride"},
      {"segment stride < extent", [](MergeForwardArgs<float, float>& a) { a.segment_stride = 3 * 8 + 4; }, Status::kErrorInvalidShape, "segment_stride"},
      {"pitch overflows", [](MergeForwardArgs<float, float>& a) { a.W_row_pitch = INT64_MAX / 2; }, Status::kErrorInvalidSize, "W_row_pitch"},
      {"rows overflow", [](MergeForwardArgs<float, float>& a) { a.rows = INT64_MAX / 4; }, Status::kErrorInvalidSize, "W_row_pitch"},
      {"E * stride overflows", [](MergeForwardArgs<float, float>& a) { a.expert_stride = INT64_MAX / 2; }, Status::kErrorInvalidSize, "expert_stride"},
      {"views overlap", [](MergeForwardArgs<float, float>& a) { a.Wbar = const_cast<float*>(a.W) + 3; }, Status::kErrorInvalidArgument, "Wbar"},
  };
  for (const FwdCase& c : fcases) {
    INFO(c.what);
    auto a = f;
    c.edit(a);
    poison(Wbar);
    const auto W0 = W;
    REQUIRE(lory::reference::merge_forward<float>(a) == c.want);
    REQUIRE(std::string(lory::last_error_detail().argument) == c.arg);
    REQUIRE(count_nan(Wbar) == static_cast<int64_t>(Wbar.size()));
    REQUIRE(W == W0);
  }
  REQUIRE(lory::reference::merge_forward<float>(f) == Status::kSuccess);  // the base case is valid

  MergeBackwardArgs<float, float> b;
  b.num_segments = S; b.experts = int(E); b.params = P; b.rows = rows;
  b.G = G.data(); b.grad_segment_stride = rows * pitch; b.G_row_pitch = pitch;
  b.W = W.data(); b.expert_stride = rows * pitch; b.W_row_pitch = pitch;
  b.weights = weights.data();
  b.dW = dW.data(); b.dW_expert_stride = rows * pitch; b.dW_row_pitch = pitch;
  b.d_weights = dwts.data();
  struct BwdCase {
    const char* what;
    void (*edit)(MergeBackwardArgs<float, float>&);
    Status want;
    const char* arg;
  };
  const BwdCase bcases[] = {
      {"G pitch < params", [](MergeBackwardArgs<float, float>& a) { a.G_row_pitch = 2; }, Status::kErrorInvalidShape, "G_row_pitch"},
      {"W pitch < params", [](MergeBackwardArgs<float, float>& a) { a.W_row_pitch = 2; }, Status::kErrorInvalidShape, "W_row_pitch"},
      {"dW pitch < params", [](MergeBackwardArgs<float, float>& a) { a.dW_row_pitch = 2; }, Status::kErrorInvalidShape, "dW_row_pitch"},
      {"grad stride < extent", [](MergeBackwardArgs<float, float>& a) { a.grad_segment_stride = 28; }, Status::kErrorInvalidShape, "grad_segment_stride"},
      {"dW stride < extent", [](MergeBackwardArgs<float, float>& a) { a.dW_expert_stride = 28; }, Status::kErrorInvalidShape, "dW_expert_stride"},
      {"dW pitch overflows", [](MergeBackwardArgs<float, float>& a) { a.dW_row_pitch = INT64_MAX / 2; }, Status::kErrorInvalidSize, "dW_row_pitch"},
      {"dW over W's padding", [](MergeBackwardArgs<float, float>& a) { a.dW = const_cast<float*>(a.W) + 5; }, Status::kErrorInvalidArgument, "dW"},
  };
  for (const BwdCase& c : bcases) {
    INFO(c.what);
    auto a = b;
    c.edit(a);
    poison(dW);
    poison(dwts);
    REQUIRE(lory::reference::merge_backward<float>(a) == c.want);
    REQUIRE(std::string(lory::last_error_detail().argument) == c.arg);
    REQUIRE(count_nan(dW) == static_cast<int64_t>(dW.size()));
    REQUIRE(count_nan(dwts) == static_cast<int64_t>(dwts.size()));
  }
  // W's pitch is not checked when d_weights is not asked for (W is not read).
  auto a = b;
  a.d_weights = nullptr;
  a.W_row_pitch = 0;
  REQUIRE(lory::reference::merge_backward<float>(a) == Status::kSuccess);
  REQUIRE(lory::reference::merge_backward<float>(b) == Status::kSuccess);
}
