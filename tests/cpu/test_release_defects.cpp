// Adversarial inputs a release must survive: sizes that overflow, segment
// arithmetic at the int64 edge, misaligned and aliased pointers, sharp and
// infinite router logits, the error detail naming the argument at fault, and
// the plan's workspace rules. Each case once passed silently (or crashed).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"
#include "common/router_grads.hpp"
#include "common/test_util.hpp"
#include "lory/inference.hpp"
#include "lory/math.hpp"
#include "lory/merge.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/inference.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/moe_ffn_backend.hpp"
#include "lory/reference/router.hpp"
#include "lory/swiglu.hpp"

namespace {

using namespace lory_test;
using lory::DecodeMethod;
using lory::ErrorDetail;
using lory::last_error_detail;
using CpuPlan = lory::reference::MoeFfnCpuPlan<float>;
using InfBackend = lory::reference::InferenceCpuBackend;

// The argument the last failure blamed, checked against the returned status.
std::string blamed(Status returned) {
  const ErrorDetail e = last_error_detail();
  if (e.status != returned) return "<detail of another status>";
  return e.argument;
}

// A float pointer one byte past an aligned one (never dereferenced by a correct library).
template <class P>
P* misalign(P* p) {
  return reinterpret_cast<P*>(reinterpret_cast<uintptr_t>(p) + 1);
}

}  // namespace

// ---- a. workspace sizes past size_t ---------------------------------------------------------

TEST_CASE("release a: plan workspace sizes past size_t are kErrorInvalidSize, never wrapped", "[cpu][release]") {
  // The shape: 2^30 sequences of 1024 tokens, d = 1024, f = 2^20, E = 1.
  const SegmentLayout lay{int64_t(1) << 30, 1024, 1024};
  const FfnShape sh{1024, int64_t(1) << 20, 1};
  {
    CpuPlan plan(lay, sh, RoutingMode::kCausalSegment);
    REQUIRE(plan.can_implement() == Status::kErrorInvalidSize);
    CHECK(blamed(Status::kErrorInvalidSize) == "workspace");
  }
  {
    MoeFfnOptions o;
    o.workspace_budget_bytes = size_t(1) << 20;
    CpuPlan plan(lay, sh, RoutingMode::kCausalSegment, o);
    // One segment per chunk already needs 36 GiB unsliced (S * E routing weights, f d merged
    // weights, T f activations), over 4 GiB at the narrowest slice (the S * E fp32 routing
    // gradients): too small a budget, reported with the true minimum, not a wrapped chunk.
    REQUIRE(plan.can_implement() == Status::kErrorWorkspaceTooSmall);
    CHECK(blamed(Status::kErrorWorkspaceTooSmall) == "options.workspace_budget_bytes");
    REQUIRE(plan.workspace_size_for_chunk(1) > (size_t(36) << 30));
    REQUIRE(plan.min_workspace_size() == plan.workspace_size_for(1, lory::detail::kSliceGranule));
    REQUIRE(plan.min_workspace_size() > (size_t(4) << 30));
    REQUIRE(plan.chunk_segments() <= lay.num_segments());
  }
  // Chunk 1 fits (about 20 GiB), chunk S wraps around: the budget search must treat a size past
  // size_t as "does not fit" and land on the largest chunk that does.
  const SegmentLayout big{int64_t(1) << 32, int64_t(1) << 20, int64_t(1) << 20};
  const FfnShape narrow{1, 1024, 1};
  {
    CpuPlan plan(big, narrow, RoutingMode::kCausalSegment);
    REQUIRE(plan.can_implement() == Status::kErrorInvalidSize);
  }
  {
    MoeFfnOptions o;
    o.workspace_budget_bytes = size_t(64) << 30;
    CpuPlan plan(big, narrow, RoutingMode::kCausalSegment, o);
    INFO(blamed(plan.can_implement()) << ": " << last_error_detail().reason);
    REQUIRE(plan.can_implement() == Status::kSuccess);
    const int64_t c = plan.chunk_segments();
    REQUIRE(c >= 1);
    REQUIRE(plan.workspace_size() <= o.workspace_budget_bytes);
    REQUIRE(plan.workspace_size() >= plan.min_workspace_size());
    REQUIRE(plan.workspace_size_for(c, plan.slice_width()) == plan.workspace_size());
    // No larger chunk fits, unsliced or at the narrowest slice.
    REQUIRE(plan.workspace_size_for_chunk(c + 1) > o.workspace_budget_bytes);
    REQUIRE(plan.workspace_size_for(c + 1, lory::detail::kSliceGranule) > o.workspace_budget_bytes);
    REQUIRE(plan.workspace_size_for_chunk(big.num_segments()) == 0);  // overflows: reported as 0
  }
}

TEST_CASE("release a: decode and prompt-cache size queries past size_t are kErrorInvalidSize", "[cpu][release]") {
  std::vector<float> x(4, 1.f), y(4), cache(4, 1.f);
  lory::DecodeStepArgs<float, float> a;
  a.batch = 1;
  a.shape = {1, int64_t(1) << 61, 1};
  a.method = DecodeMethod::kMerged;
  a.x = x.data();
  a.y = y.data();
  a.cache = cache.data();
  size_t bytes = 0;
  const Status st = lory::run_decode_step<InfBackend, float>(a, nullptr, bytes, {});
  REQUIRE(st == Status::kErrorInvalidSize);
  CHECK(bytes == 0);
  // The same with a shape-only cache (no operand extent to refuse): the workspace carving must.
  a.cache = lory::detail::shape_only_pointer<const float>();
  REQUIRE(lory::run_decode_step<InfBackend, float>(a, nullptr, bytes, {}) == Status::kErrorInvalidSize);
}

// ---- b. segment arithmetic at the edges --------------------------------------------------------

TEST_CASE("release b: segment counts never overflow and never divide by zero", "[cpu][release]") {
  const SegmentLayout near_max{1, INT64_MAX, 2};
  REQUIRE(near_max.segments_per_sequence() == (INT64_MAX - 1) / 2 + 1);
  REQUIRE(near_max.validate() == Status::kSuccess);
  const SegmentLayout long_segment{3, 5, INT64_MAX};
  REQUIRE(long_segment.segments_per_sequence() == 1);
  REQUIRE(long_segment.num_segments() == 3);
  REQUIRE(long_segment.length(2) == 5);
  // T = 0, L = 0, B = 0 and negative sizes: counts are 0, validate() refuses.
  for (const SegmentLayout bad : {SegmentLayout{2, 10, 0}, SegmentLayout{2, 0, 4}, SegmentLayout{0, 8, 4},
                                  SegmentLayout{2, -8, 4}, SegmentLayout{2, 8, -4}}) {
    REQUIRE(bad.num_segments() == 0);
    REQUIRE(bad.validate() == Status::kErrorInvalidSize);
  }
  // B * N past int64 (B * L fits only for valid layouts): 0, not a wrapped count.
  REQUIRE(SegmentLayout{INT64_MAX, 3, 1}.num_segments() == 0);
  REQUIRE(SegmentLayout{2, 10, 0}.validate() == Status::kErrorInvalidSize);
  REQUIRE(blamed(Status::kErrorInvalidSize) == "layout.segment_len");
  // Exact counts around multiples.
  for (int64_t L = 1; L <= 40; ++L)
    for (int64_t T = 1; T <= 12; ++T) REQUIRE(SegmentLayout{1, L, T}.segments_per_sequence() == (L + T - 1) / T);
}

// ---- c. S * E, B * E, B * f products ---------------------------------------------------------------

TEST_CASE("release c: S * E, B * E and B * E * max(d, f) past int64 are kErrorInvalidSize", "[cpu][release]") {
  std::vector<float> buf(16, 1.f), out1(16), out2(16), out3(16);
  const int64_t huge_b = int64_t(1) << 56;  // B * L * d fits, B * 256 does not
  {
    lory::RouterForwardArgs<float, float> r;
    r.layout = {huge_b, 1, 1};
    r.d = 1;
    r.experts = 256;
    r.x = buf.data(); r.W_r = buf.data(); r.hbar = out1.data(); r.probs = out2.data(); r.weights = out3.data();
    REQUIRE(lory::validate(r) == Status::kErrorInvalidSize);
  }
  {
    lory::MergeForwardArgs<float, float> m;
    m.num_segments = huge_b; m.experts = 256; m.params = 1;
    m.W = buf.data(); m.expert_stride = 1; m.weights = buf.data(); m.Wbar = out1.data(); m.segment_stride = 1;
    REQUIRE(lory::validate(m) == Status::kErrorInvalidSize);
  }
  {
    lory::PromptCacheArgs<float, float> p;
    p.batch = huge_b; p.prompt_len = 1; p.shape = {1, 1, 256};
    p.x = buf.data(); p.W_r = buf.data(); p.probs = out1.data();
    REQUIRE(lory::validate(p) == Status::kErrorInvalidSize);
    size_t bytes = 0;
    REQUIRE(lory::run_prompt_cache<InfBackend, float>(p, nullptr, bytes, {}) == Status::kErrorInvalidSize);
  }
  {
    lory::DecodeStepArgs<float, float> a;
    a.batch = huge_b; a.shape = {1, 1, 256}; a.method = DecodeMethod::kExpertSpace;
    a.x = buf.data(); a.y = out1.data(); a.probs = buf.data(); a.W_g = a.W_u = a.W_d = buf.data();
    REQUIRE(lory::validate(a) == Status::kErrorInvalidSize);
    REQUIRE(blamed(Status::kErrorInvalidSize) == "batch");
  }
  {
    CpuPlan plan({huge_b, 1, 1}, {1, 1, 256}, RoutingMode::kCausalSegment);
    REQUIRE(plan.can_implement() == Status::kErrorInvalidSize);
  }
}

// ---- d. misaligned data pointers: the same refusal on the CPU as on the GPU ---------------------

TEST_CASE("release d: every twin refuses misaligned data pointers before touching memory", "[cpu][release]") {
  std::vector<float> in(256, 0.5f), o1(256), o2(256), o3(256);
  poison(o1);
  poison(o2);
  poison(o3);
  auto untouched = [&] { return count_nan(o1) == 256 && count_nan(o2) == 256 && count_nan(o3) == 256; };

  lory::MergeForwardArgs<float, float> mf{2, 2, 4, in.data(), 4, in.data() + 64, o1.data(), 4};
  REQUIRE(lory::reference::merge_forward<double>(mf) == Status::kSuccess);
  poison(o1);
  for (int which = 0; which < 3; ++which) {
    auto m = mf;
    if (which == 0) m.W = misalign(m.W);
    if (which == 1) m.weights = misalign(m.weights);
    if (which == 2) m.Wbar = misalign(m.Wbar);
    REQUIRE(lory::reference::merge_forward<double>(m) == Status::kErrorMisalignedPointer);
    CHECK(blamed(Status::kErrorMisalignedPointer) == (which == 0 ? "W" : which == 1 ? "weights" : "Wbar"));
  }
  lory::MergeBackwardArgs<float, float> mb;
  mb.num_segments = 2; mb.experts = 2; mb.params = 4;
  mb.G = in.data(); mb.grad_segment_stride = 4; mb.W = in.data() + 8; mb.expert_stride = 4;
  mb.weights = in.data() + 64; mb.dW = o1.data(); mb.dW_expert_stride = 4; mb.d_weights = o2.data();
  REQUIRE(lory::validate(mb) == Status::kSuccess);
  mb.d_weights = misalign(mb.d_weights);
  REQUIRE(lory::reference::merge_backward<double>(mb) == Status::kErrorMisalignedPointer);
  REQUIRE(blamed(Status::kErrorMisalignedPointer) == "d_weights");

  lory::RouterForwardArgs<float, float> rf;
  rf.layout = {1, 4, 2}; rf.d = 3; rf.experts = 2;
  rf.x = in.data(); rf.W_r = in.data() + 32; rf.hbar = o1.data(); rf.probs = o2.data(); rf.weights = o3.data();
  REQUIRE(lory::validate(rf) == Status::kSuccess);
  auto r2 = rf;
  r2.x = misalign(r2.x);
  REQUIRE(lory::reference::router_forward<double>(r2) == Status::kErrorMisalignedPointer);
  REQUIRE(blamed(Status::kErrorMisalignedPointer) == "x");
  r2 = rf;
  r2.probs = misalign(r2.probs);
  REQUIRE(lory::reference::router_forward<double>(r2) == Status::kErrorMisalignedPointer);

  lory::SwigluForwardArgs<float> sf{2, 3, in.data(), 3, in.data() + 8, 3, o1.data(), 3};
  REQUIRE(lory::validate(sf) == Status::kSuccess);
  sf.u = misalign(sf.u);
  REQUIRE(lory::validate(sf) == Status::kErrorMisalignedPointer);
  REQUIRE(blamed(Status::kErrorMisalignedPointer) == "u");

  lory::DecodeStepArgs<float, float> dec;
  dec.batch = 1; dec.shape = {2, 2, 1}; dec.method = DecodeMethod::kMerged;
  dec.x = in.data(); dec.y = misalign(o1.data()); dec.cache = in.data() + 16;
  size_t bytes = 0;
  REQUIRE(lory::run_decode_step<InfBackend, float>(dec, nullptr, bytes, {}) == Status::kErrorMisalignedPointer);
  REQUIRE(blamed(Status::kErrorMisalignedPointer) == "y");
  REQUIRE(untouched());

  // The whole layer: a misaligned x is refused by the plan's forward before the router runs.
  auto rng = make_rng("release_d_plan");
  const auto D = random_layer<float>({1, 4, 2}, {3, 5, 2}, RoutingMode::kCausalSegment, true, rng);
  CpuPlan plan(D.lay, D.sh, D.mode);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  auto out = new_outputs<float, float>(D);
  std::vector<unsigned char> ws(plan.workspace_size());
  std::vector<float> xcopy(D.x.size() + 1);
  float* xm = misalign(xcopy.data());
  auto f = forward_args(D.params(), static_cast<const float*>(xm), out);
  REQUIRE(plan.forward(f, ws.data(), ws.size(), {}) == Status::kErrorMisalignedPointer);
  REQUIRE(blamed(Status::kErrorMisalignedPointer) == "x");
  REQUIRE(count_nan(out.y) == static_cast<int64_t>(out.y.size()));
  REQUIRE(count_nan(out.probs) == static_cast<int64_t>(out.probs.size()));
}

// ---- e. aliasing: the allowed pairs work, the rest is refused ----------------------------------

TEST_CASE("release e: the plan runs y == x and dx == dy in place and refuses other aliasing", "[cpu][release]") {
  auto rng = make_rng("release_e_plan");
  for (RoutingMode mode : kAllRoutingModes) {
    INFO(lory::routing_mode_name(mode));
    const auto D = random_layer<float>({2, 7, 3}, {5, 6, 3}, mode, true, rng);
    MoeFfnOptions o;
    o.max_chunk_segments = 2;  // several chunks: in place must hold across them
    CpuPlan plan(D.lay, D.sh, D.mode, o);
    REQUIRE(plan.can_implement() == Status::kSuccess);
    std::vector<unsigned char> ws(plan.workspace_size());
    auto ref = new_outputs<float, float>(D);
    auto f = forward_args(D.params(), D.x.data(), ref);
    REQUIRE(plan.forward(f, ws.data(), ws.size(), {}) == Status::kSuccess);
    auto b = backward_args(f.p, D.x.data(), D.dy.data(), ref, false);
    REQUIRE(plan.backward(b, ws.data(), ws.size(), {}) == Status::kSuccess);

    // y == x: bitwise the out-of-place y.
    auto io = new_outputs<float, float>(D);
    std::vector<float> xy = D.x;
    auto fi = forward_args(D.params(), xy.data(), io);
    fi.y = xy.data();
    REQUIRE(plan.forward(fi, ws.data(), ws.size(), {}) == Status::kSuccess);
    REQUIRE(std::memcmp(xy.data(), ref.y.data(), xy.size() * sizeof(float)) == 0);

    // dx == dy: bitwise the out-of-place gradients.
    auto go = new_outputs<float, float>(D);
    go.hbar = ref.hbar; go.probs = ref.probs; go.weights = ref.weights;
    std::vector<float> dxy = D.dy;
    auto bi = backward_args(f.p, D.x.data(), dxy.data(), go, false);
    bi.dx = dxy.data();
    REQUIRE(plan.backward(bi, ws.data(), ws.size(), {}) == Status::kSuccess);
    REQUIRE(std::memcmp(dxy.data(), ref.dx.data(), dxy.size() * sizeof(float)) == 0);
    REQUIRE(std::memcmp(go.dW_g.data(), ref.dW_g.data(), go.dW_g.size() * sizeof(float)) == 0);

    // dx == x (the case: wrong dW_g / dW_u, wrong dx in causal mode) is refused untouched.
    auto bad = new_outputs<float, float>(D);
    bad.hbar = ref.hbar; bad.probs = ref.probs; bad.weights = ref.weights;
    std::vector<float> xx = D.x;
    auto bx = backward_args(f.p, xx.data(), D.dy.data(), bad, false);
    bx.dx = xx.data();
    REQUIRE(plan.backward(bx, ws.data(), ws.size(), {}) == Status::kErrorInvalidArgument);
    REQUIRE(blamed(Status::kErrorInvalidArgument) == "dx");
    REQUIRE(xx == D.x);
    REQUIRE(count_nan(bad.dW_g) == static_cast<int64_t>(bad.dW_g.size()));
    // A partial overlap of y with x (shifted by one token) is refused too.
    auto fs = forward_args(D.params(), xy.data(), io);
    std::vector<float> shifted(D.x.size() + D.sh.d);
    std::copy(D.x.begin(), D.x.end(), shifted.begin());
    fs.x = shifted.data();
    fs.y = shifted.data() + D.sh.d;
    REQUIRE(plan.forward(fs, ws.data(), ws.size(), {}) == Status::kErrorInvalidArgument);
    REQUIRE(blamed(Status::kErrorInvalidArgument) == "y");
    // A weight gradient over a weight.
    auto bw = backward_args(f.p, D.x.data(), D.dy.data(), bad, false);
    bw.dW_u = const_cast<float*>(bw.p.W_u);
    REQUIRE(plan.backward(bw, ws.data(), ws.size(), {}) == Status::kErrorInvalidArgument);
    REQUIRE(blamed(Status::kErrorInvalidArgument) == "dW_u");
  }
}

TEST_CASE("release e: merge, router and SwiGLU refuse outputs over their inputs", "[cpu][release]") {
  std::vector<double> W(2 * 6, 0.25), w(3 * 2, 0.5), Wbar(3 * 6);
  lory::MergeForwardArgs<double, double> m{3, 2, 6, W.data(), 6, w.data(), Wbar.data(), 6};
  REQUIRE(lory::reference::merge_forward<double>(m) == Status::kSuccess);
  auto mi = m;
  mi.Wbar = W.data();  // the case: the second segment read a half-written W
  mi.num_segments = 2;
  REQUIRE(lory::reference::merge_forward<double>(mi) == Status::kErrorInvalidArgument);
  REQUIRE(blamed(Status::kErrorInvalidArgument) == "Wbar");
  REQUIRE(W == std::vector<double>(12, 0.25));

  std::vector<float> a(12, 0.3f), u(12, 0.7f), mout(12);
  lory::SwigluForwardArgs<float> sf{3, 4, a.data(), 4, u.data(), 4, a.data(), 4};  // in place over a: allowed
  REQUIRE(lory::validate(sf) == Status::kSuccess);
  sf.m = a.data() + 1;  // shifted: refused
  sf.rows = 2;
  REQUIRE(lory::validate(sf) == Status::kErrorInvalidArgument);
  lory::SwigluBackwardArgs<float> sb{3, 4, a.data(), 4, u.data(), 4, mout.data(), 4, a.data(), 4, a.data(), 4};
  REQUIRE(lory::validate(sb) == Status::kErrorInvalidArgument);  // da and du the same buffer
  REQUIRE(blamed(Status::kErrorInvalidArgument) == "du");

  lory::RouterBackwardArgs<float, float> rb;
  std::vector<float> Wr(2 * 3, 0.1f), hb(2 * 3, 0.2f), pr(2 * 2, 0.5f), dw(2 * 2, 1.f), dWr(6), dx(4 * 3);
  rb.layout = {1, 4, 2}; rb.d = 3; rb.experts = 2;
  rb.W_r = Wr.data(); rb.hbar = hb.data(); rb.probs = pr.data(); rb.d_weights = dw.data();
  rb.dW_r = dWr.data(); rb.dx = dx.data();
  REQUIRE(lory::validate(rb) == Status::kSuccess);
  rb.dW_r = Wr.data();
  REQUIRE(lory::reference::router_backward<double>(rb) == Status::kErrorInvalidArgument);
  REQUIRE(blamed(Status::kErrorInvalidArgument) == "dW_r");
}

// ---- f. softmax backward without cancellation --------------------------------------------------

TEST_CASE("release f: router gradients of sharp routing match float64 to 1e-5 in fp32", "[cpu][release][router]") {
  auto rng = make_rng("release_f_sharp");
  const SegmentLayout lay{2, 6, 2};
  const int64_t d = 5;
  for (int E : {2, 3, 8})
    for (int dominant : {0, E - 1})
      for (double gap = 1e-4; gap >= 1e-11; gap /= 10) {
        INFO("E " << E << " dominant " << dominant << " 1 - max p ~ " << gap);
        const SharpRouterProblem p = sharp_router_problem(lay, d, E, dominant, gap, rng);
        const auto f32 = router_grads_twin<float>(lay, d, E, p.x, p.W, p.bias, p.d_weights);
        const auto f64 = router_grads_twin<double>(lay, d, E, p.x, p.W, p.bias, p.d_weights);
        CHECK(rel_error(f32.dW_r, f64.dW_r) <= 1e-5);
        CHECK(rel_error(f32.d_bias, f64.d_bias) <= 1e-5);
        // The bias gradient sums to zero over the experts (sum p = 1).
        double sum = 0, norm = 0;
        for (float v : f32.d_bias) {
          sum += v;
          norm += std::fabs(v);
        }
        CHECK(std::fabs(sum) <= 1e-5 * norm);
      }
}

TEST_CASE("release f: the issue's float-plan reproduction gives dW_r summing to zero", "[cpu][release][plan]") {
  auto rng = make_rng("release_f_plan");
  auto D = random_layer<float>({1, 2, 1}, {1, 1, 2}, RoutingMode::kCausalSegment, true, rng);
  D.W_r = {-11.75f, 12.25f};  // expert 1 dominates: 1 - p rounds to 0 in fp32
  D.x = {1.0625f, 0.9375f};
  D.bias = {0.125f, -0.25f};
  CpuPlan plan(D.lay, D.sh, D.mode);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  auto out = new_outputs<float, float>(D);
  std::vector<unsigned char> ws(plan.workspace_size());
  auto f = forward_args(D.params(), D.x.data(), out);
  REQUIRE(plan.forward(f, ws.data(), ws.size(), {}) == Status::kSuccess);
  REQUIRE(plan.backward(backward_args(f.p, D.x.data(), D.dy.data(), out, false), ws.data(), ws.size(), {}) ==
          Status::kSuccess);
  const auto ref = run_reference(D);
  INFO("dW_r = [" << out.dW_r[0] << ", " << out.dW_r[1] << "], float64 [" << ref.dW_r[0] << ", " << ref.dW_r[1]
                  << "]");
  REQUIRE(ref.dW_r[0] != 0.0);
  // The bound from the arithmetic: router row 0 feeds segment 1, so dW_r[e] = dz_e hbar_0 with
  // dz_1 = -dz_0 = p_0 p_1 (dw_1 - dw_0) (E = 2, the form shifted by the most probable expert), dw the
  // d_weights of segment 1. fp32 rounds each dw relative to its own size, and the difference can cancel
  // far below it (about one seed in 300 failed a bound relative to dW_r itself), so the bound is
  // 1e-5 p_0 p_1 (|dw_0| + |dw_1|) |hbar_0|. The old form's dz_1 = 0 fails it unless dw_0 and dw_1
  // agree to 5 digits.
  const double scale = ref.probs[0] * ref.probs[1] * (std::fabs(ref.d_weights[2]) + std::fabs(ref.d_weights[3])) *
                       std::fabs(ref.hbar[0]);
  INFO("scale " << scale);
  REQUIRE(scale > 0.0);
  for (int e = 0; e < 2; ++e) CHECK(std::fabs(double(out.dW_r[e]) - ref.dW_r[e]) <= 1e-5 * scale);
  CHECK(std::fabs(double(out.dW_r[0]) + out.dW_r[1]) <= 1e-5 * std::fabs(double(out.dW_r[0])));
}

TEST_CASE("release f: softmax_backward shifts by the most probable expert", "[cpu][release][math]") {
  // p = [eps, 1 - eps] in fp32 with 1 - eps rounding to 1: the old form gave dz_1 = 0.
  const float eps = 1e-9f;
  const float p[2] = {eps, 1.f};
  const float dp[2] = {1.f, -1.f};
  float dz[2];
  lory::softmax_backward(p, dp, dz, 2);
  CHECK(dz[0] == Approx(2 * eps).epsilon(1e-6));
  CHECK(dz[1] == Approx(-2 * eps).epsilon(1e-6));
  // Equal dp (identical experts) give exactly zero.
  const float q[3] = {0.2f, 0.5f, 0.3f}, same[3] = {0.7f, 0.7f, 0.7f};
  float z[3];
  lory::softmax_backward(q, same, z, 3);
  CHECK((z[0] == 0.f && z[1] == 0.f && z[2] == 0.f));
}

// ---- g. infinite logits ------------------------------------------------------------------------

TEST_CASE("release g: +Inf logits give the one-hot limit, NaN propagates, all -Inf is uniform", "[cpu][release][math]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  float p[3];
  const float one[3] = {1.f, inf, 2.f};
  lory::softmax(one, p, 3);
  CHECK((p[0] == 0.f && p[1] == 1.f && p[2] == 0.f));
  const float two[3] = {inf, -3.f, inf};
  lory::softmax(two, p, 3);
  CHECK((p[0] == 0.5f && p[1] == 0.f && p[2] == 0.5f));
  const float none[3] = {-inf, -inf, -inf};
  lory::softmax(none, p, 3);
  CHECK((p[0] == Approx(1 / 3.0) && p[1] == Approx(1 / 3.0) && p[2] == Approx(1 / 3.0)));
  const float withnan[3] = {inf, nan, 1.f};
  lory::softmax(withnan, p, 3);
  CHECK((std::isnan(p[0]) && std::isnan(p[1]) && std::isnan(p[2])));

  // Through the router: a +Inf bias routes every segment to that expert; the backward is finite
  // (the one-hot limit has zero gradient).
  const SegmentLayout lay{1, 6, 2};
  const int64_t d = 3, S = lay.num_segments();
  const int E = 3;
  auto rng = make_rng("release_g");
  const auto g = router_grads_twin<float>(lay, d, E, random_vector<float>(lay.num_tokens() * d, rng),
                                          random_vector<float>(E * d, rng), {0.f, inf, 0.5f},
                                          random_vector<float>(S * E, rng));
  for (int64_t s = 0; s < S; ++s) {
    CHECK(g.probs[s * E + 0] == 0.f);
    CHECK(g.probs[s * E + 1] == 1.f);
    CHECK(g.probs[s * E + 2] == 0.f);
  }
  for (float v : g.dW_r) CHECK(v == 0.f);
  for (float v : g.d_bias) CHECK(v == 0.f);
}

// ---- h. which argument is at fault -------------------------------------------------------------

TEST_CASE("release h: every failure names the argument at fault", "[cpu][release][validation]") {
  CpuPlan bad_plan({2, 8, 0}, {4, 4, 2}, RoutingMode::kCausalSegment);
  REQUIRE(bad_plan.can_implement() == Status::kErrorInvalidSize);
  REQUIRE(blamed(Status::kErrorInvalidSize) == "layout.segment_len");
  CHECK(std::string(last_error_detail().reason) == "not positive");
  lory::detail::clear_error_detail();
  REQUIRE(bad_plan.can_implement() == Status::kErrorInvalidSize);  // recorded again for a later call
  REQUIRE(blamed(Status::kErrorInvalidSize) == "layout.segment_len");
  REQUIRE(CpuPlan({2, 8, 4}, {4, 4, 300}, RoutingMode::kCausalSegment).can_implement() ==
          Status::kErrorUnsupportedExpertCount);
  REQUIRE(blamed(Status::kErrorUnsupportedExpertCount) == "shape.experts");

  auto rng = make_rng("release_h");
  const auto D = random_layer<float>({2, 8, 4}, {4, 6, 2}, RoutingMode::kCausalSegment, false, rng);
  CpuPlan plan(D.lay, D.sh, D.mode);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  std::vector<unsigned char> ws(plan.workspace_size());
  auto out = new_outputs<float, float>(D);
  auto f = forward_args(D.params(), D.x.data(), out);
  const struct {
    const char* name;
    void (*apply)(lory::MoeFfnForwardArgs<float, float>&);
    Status want;
  } cases[] = {
      {"x", [](lory::MoeFfnForwardArgs<float, float>& a) { a.x = nullptr; }, Status::kErrorNullPointer},
      {"y", [](lory::MoeFfnForwardArgs<float, float>& a) { a.y = nullptr; }, Status::kErrorNullPointer},
      {"probs", [](lory::MoeFfnForwardArgs<float, float>& a) { a.probs = nullptr; }, Status::kErrorNullPointer},
      {"p.W_d", [](lory::MoeFfnForwardArgs<float, float>& a) { a.p.W_d = nullptr; }, Status::kErrorNullPointer},
      {"p.layout", [](lory::MoeFfnForwardArgs<float, float>& a) { a.p.layout.segment_len = 2; },
       Status::kErrorInvalidShape},
      {"p.shape", [](lory::MoeFfnForwardArgs<float, float>& a) { a.p.shape.f = 5; }, Status::kErrorInvalidShape},
      {"p.mode", [](lory::MoeFfnForwardArgs<float, float>& a) { a.p.mode = RoutingMode::kPromptLevel; },
       Status::kErrorInvalidArgument},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto a = f;
    c.apply(a);
    REQUIRE(plan.forward(a, ws.data(), ws.size(), {}) == c.want);
    CHECK(blamed(c.want) == c.name);
  }
  REQUIRE(plan.forward(f, ws.data(), ws.size() - 1, {}) == Status::kErrorWorkspaceTooSmall);
  CHECK(blamed(Status::kErrorWorkspaceTooSmall) == "workspace_bytes");
  // A later success does not matter; a later failure replaces the record.
  std::vector<double> W(4), w(2), Wb(4);
  lory::MergeForwardArgs<double, double> m{1, 2, 2, W.data(), 2, w.data(), Wb.data(), 1};
  REQUIRE(lory::validate(m) == Status::kErrorInvalidShape);
  CHECK(blamed(Status::kErrorInvalidShape) == "segment_stride");
  m.segment_stride = 2;
  m.weights = nullptr;
  REQUIRE(lory::reference::merge_forward<double>(m) == Status::kErrorNullPointer);
  CHECK(blamed(Status::kErrorNullPointer) == "weights");
  REQUIRE(lory::validate(lory::SwigluForwardArgs<float>{2, 3, nullptr, 3, nullptr, 3, nullptr, 3}) ==
          Status::kErrorNullPointer);
  CHECK(blamed(Status::kErrorNullPointer) == "a");
  lory::DecodeStepArgs<float, float> dec;
  dec.batch = 1; dec.shape = {2, 2, 1}; dec.method = DecodeMethod::kMerged;
  std::vector<float> xb(2), yb(2);
  dec.x = xb.data(); dec.y = yb.data();
  size_t bytes = 0;
  REQUIRE(lory::run_decode_step<InfBackend, float>(dec, nullptr, bytes, {}) == Status::kErrorNullPointer);
  CHECK(blamed(Status::kErrorNullPointer) == "cache");
}

// ---- i. the plan's workspace rule --------------------------------------------------------------

TEST_CASE("release i: a null plan workspace is an error that points at workspace_size()", "[cpu][release][plan]") {
  auto rng = make_rng("release_i");
  const auto D = random_layer<float>({1, 6, 3}, {3, 4, 2}, RoutingMode::kCausalSegment, false, rng);
  CpuPlan plan(D.lay, D.sh, D.mode);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  auto out = new_outputs<float, float>(D);
  auto f = forward_args(D.params(), D.x.data(), out);
  REQUIRE(plan.forward(f, nullptr, plan.workspace_size(), {}) == Status::kErrorNullPointer);
  REQUIRE(blamed(Status::kErrorNullPointer) == "workspace");
  CHECK(std::string(last_error_detail().reason).find("workspace_size()") != std::string::npos);
  REQUIRE(count_nan(out.probs) == static_cast<int64_t>(out.probs.size()));
}

// ---- j. the budget and workspace_size_for_chunk agree ------------------------------------------

TEST_CASE("release j: a budget of workspace_size_for_chunk(c) gives exactly chunk c", "[cpu][release][plan]") {
  // Tiny per-segment pieces, where 256-byte padding used to hide the growth between chunks.
  const struct {
    SegmentLayout lay;
    FfnShape sh;
  } shapes[] = {{{1, 12, 1}, {1, 1, 1}}, {{2, 9, 2}, {2, 3, 2}}, {{3, 16, 4}, {8, 8, 4}}, {{1, 40, 8}, {16, 24, 3}}};
  for (const auto& s : shapes) {
    for (RoutingMode mode : kAllRoutingModes) {
      CpuPlan unlimited(s.lay, s.sh, mode);
      REQUIRE(unlimited.can_implement() == Status::kSuccess);
      const int64_t S = s.lay.num_segments();
      for (int64_t c = 1; c <= S; ++c) {
        INFO("S " << S << " c " << c);
        if (c > 1) REQUIRE(unlimited.workspace_size_for_chunk(c) > unlimited.workspace_size_for_chunk(c - 1));
        MoeFfnOptions o;
        o.workspace_budget_bytes = unlimited.workspace_size_for_chunk(c);
        o.slice_width = s.sh.f;  // unsliced: a free width could take more segments in narrower slices
        CpuPlan p(s.lay, s.sh, mode, o);
        REQUIRE(p.can_implement() == Status::kSuccess);
        REQUIRE(p.chunk_segments() == c);
        REQUIRE(p.workspace_size() == o.workspace_budget_bytes);
      }
    }
  }
}
