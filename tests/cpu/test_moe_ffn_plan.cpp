// The MoE FFN plan's orchestration (chunking, routing bookkeeping, workspace
// layout, GEMM batching) driven by the CPU backend, against the plain double
// twin of the whole layer (reference::moe_ffn_forward / moe_ffn_backward).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/moe_ffn.hpp"
#include "lory/reference/moe_ffn_backend.hpp"

namespace {

using lory::FfnShape;
using lory::MoeFfnOptions;
using lory::RoutingMode;
using lory::SegmentLayout;
using lory::Status;

// Host inputs of one layer call, in storage dtype T (routing data in float).
template <class T>
struct LayerData {
  SegmentLayout lay;
  FfnShape sh;
  RoutingMode mode;
  std::vector<T> x, W_r, W_g, W_u, W_d, dy;
  std::vector<float> bias, given;  // bias empty: no bias

  LayerData(SegmentLayout l, FfnShape s, RoutingMode m, bool with_bias, std::mt19937_64& rng)
      : lay(l), sh(s), mode(m) {
    const size_t tokens = static_cast<size_t>(l.num_tokens()), fd = static_cast<size_t>(s.f * s.d);
    x = lory_test::random_vector<T>(tokens * s.d, rng);
    dy = lory_test::random_vector<T>(tokens * s.d, rng);
    // Distinct experts and a router with O(1) logits, so that routing matters.
    W_r = lory_test::random_vector<T>(static_cast<size_t>(s.experts * s.d), rng, -2.0, 2.0);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
    W_g = lory_test::random_vector<T>(s.experts * fd, rng, -2 * scale, 2 * scale);
    W_u = lory_test::random_vector<T>(s.experts * fd, rng, -2 * scale, 2 * scale);
    W_d = lory_test::random_vector<T>(s.experts * fd, rng, -scale, scale);
    if (with_bias) bias = lory_test::random_vector<float>(s.experts, rng, -0.5, 0.5);
    given = lory_test::random_simplex_rows(l.num_segments(), s.experts, rng);
  }
  int64_t router_rows() const { return mode == RoutingMode::kPromptLevel ? lay.batch : lay.num_segments(); }
};

// Every output of forward + backward.
template <class T, class R>
struct LayerOutputs {
  std::vector<T> y, dx, dW_r, dW_g, dW_u, dW_d;
  std::vector<R> hbar, probs, weights, d_bias, d_weights;

  template <class Data>
  void size_for(const Data& D) {
    const size_t tokens = D.lay.num_tokens(), E = D.sh.experts, fd = D.sh.f * D.sh.d;
    y.resize(tokens * D.sh.d);
    dx.resize(tokens * D.sh.d);
    dW_r.resize(E * D.sh.d);
    dW_g.resize(E * fd);
    dW_u.resize(E * fd);
    dW_d.resize(E * fd);
    hbar.resize(D.router_rows() * D.sh.d);
    probs.resize(D.router_rows() * E);
    weights.resize(D.lay.num_segments() * E);
    d_bias.resize(E);
    d_weights.resize(D.lay.num_segments() * E);
  }
};

template <class T, class R, class Data>
void fill_params(lory::MoeFfnParams<T, R>& p, const Data& D, const std::vector<T>& W_r, const std::vector<T>& W_g,
                 const std::vector<T>& W_u, const std::vector<T>& W_d, const std::vector<R>& bias,
                 const std::vector<R>& given) {
  p.layout = D.lay;
  p.shape = D.sh;
  p.mode = D.mode;
  p.W_r = W_r.data();
  p.bias = bias.empty() ? nullptr : bias.data();
  p.given_weights = given.data();
  p.W_g = W_g.data();
  p.W_u = W_u.data();
  p.W_d = W_d.data();
}

// Initial values of the weight gradients when accumulating (random, never zero).
template <class T>
struct InitialGrads {
  std::vector<T> dW_r, dW_g, dW_u, dW_d;
  std::vector<float> d_bias;
};

// Runs forward then backward through a plan; outputs poisoned first (or set to
// the initial gradients when accumulating).
template <class T, class Backend>
Status run_plan(const LayerData<T>& D, MoeFfnOptions opt, bool accumulate, const InitialGrads<T>* init,
                LayerOutputs<T, float>& out, size_t* ws_used = nullptr) {
  lory::MoeFfnPlan<T, Backend> plan(D.lay, D.sh, D.mode, opt);
  LORY_RETURN_IF_ERROR(plan.can_implement());
  out.size_for(D);
  for (auto* v : {&out.y, &out.dx, &out.dW_r, &out.dW_g, &out.dW_u, &out.dW_d}) lory_test::poison(*v);
  for (auto* v : {&out.hbar, &out.probs, &out.weights, &out.d_bias, &out.d_weights}) lory_test::poison(*v);
  if (accumulate) {
    out.dW_r = init->dW_r;
    out.dW_g = init->dW_g;
    out.dW_u = init->dW_u;
    out.dW_d = init->dW_d;
    out.d_bias = init->d_bias;
  }
  std::vector<unsigned char> ws(plan.workspace_size());
  if (ws_used) *ws_used = ws.size();

  lory::MoeFfnForwardArgs<T, float> f;
  fill_params(f.p, D, D.W_r, D.W_g, D.W_u, D.W_d, D.bias, D.given);
  f.x = D.x.data();
  f.y = out.y.data();
  f.hbar = out.hbar.data();
  f.probs = out.probs.data();
  f.weights = out.weights.data();
  LORY_RETURN_IF_ERROR(plan.forward(f, ws.data(), ws.size(), {}));

  // A fresh (poisoned) workspace: the backward must not rely on the forward's leftovers.
  std::fill(ws.begin(), ws.end(), static_cast<unsigned char>(0xff));  // NaN in every float dtype
  lory::MoeFfnBackwardArgs<T, float> b;
  b.p = f.p;
  b.x = D.x.data();
  b.dy = D.dy.data();
  b.hbar = out.hbar.data();
  b.probs = out.probs.data();
  b.weights = out.weights.data();
  b.dx = out.dx.data();
  b.dW_r = out.dW_r.data();
  b.d_bias = D.bias.empty() ? nullptr : out.d_bias.data();
  b.dW_g = out.dW_g.data();
  b.dW_u = out.dW_u.data();
  b.dW_d = out.dW_d.data();
  b.accumulate = accumulate;
  b.d_weights = out.d_weights.data();
  return plan.backward(b, ws.data(), ws.size(), {});
}

// The double twin on the same inputs (converted exactly to double).
template <class T>
LayerOutputs<double, double> run_reference(const LayerData<T>& D, bool accumulate, const InitialGrads<T>* init) {
  using lory_test::to_double_vector;
  const auto x = to_double_vector(D.x), dy = to_double_vector(D.dy), W_r = to_double_vector(D.W_r),
             W_g = to_double_vector(D.W_g), W_u = to_double_vector(D.W_u), W_d = to_double_vector(D.W_d),
             bias = to_double_vector(D.bias), given = to_double_vector(D.given);
  LayerOutputs<double, double> out;
  out.size_for(D);
  if (accumulate) {
    out.dW_r = to_double_vector(init->dW_r);
    out.dW_g = to_double_vector(init->dW_g);
    out.dW_u = to_double_vector(init->dW_u);
    out.dW_d = to_double_vector(init->dW_d);
    out.d_bias = to_double_vector(init->d_bias);
  }
  lory::MoeFfnForwardArgs<double, double> f;
  fill_params(f.p, D, W_r, W_g, W_u, W_d, bias, given);
  f.x = x.data();
  f.y = out.y.data();
  f.hbar = out.hbar.data();
  f.probs = out.probs.data();
  f.weights = out.weights.data();
  REQUIRE(lory::reference::moe_ffn_forward(f) == Status::kSuccess);
  lory::MoeFfnBackwardArgs<double, double> b;
  b.p = f.p;
  b.x = x.data();
  b.dy = dy.data();
  b.hbar = out.hbar.data();
  b.probs = out.probs.data();
  b.weights = out.weights.data();
  b.dx = out.dx.data();
  b.dW_r = out.dW_r.data();
  b.d_bias = D.bias.empty() ? nullptr : out.d_bias.data();
  b.dW_g = out.dW_g.data();
  b.dW_u = out.dW_u.data();
  b.dW_d = out.dW_d.data();
  b.accumulate = accumulate;
  b.d_weights = out.d_weights.data();
  REQUIRE(lory::reference::moe_ffn_backward(b) == Status::kSuccess);
  return out;
}

template <class T>
LayerOutputs<double, double> run_reference(const LayerData<T>& D) {
  return run_reference(D, false, static_cast<const InitialGrads<T>*>(nullptr));
}

template <class T>
InitialGrads<T> random_initial_grads(const LayerData<T>& D, std::mt19937_64& rng) {
  InitialGrads<T> g;
  const size_t E = D.sh.experts, fd = D.sh.f * D.sh.d;
  g.dW_r = lory_test::random_vector<T>(E * D.sh.d, rng);
  g.dW_g = lory_test::random_vector<T>(E * fd, rng);
  g.dW_u = lory_test::random_vector<T>(E * fd, rng);
  g.dW_d = lory_test::random_vector<T>(E * fd, rng);
  g.d_bias = lory_test::random_vector<float>(E, rng);
  return g;
}

// Norm-relative error within tol, finite everywhere, every element written.
template <class A, class B>
void check_close(const char* name, const std::vector<A>& got, const std::vector<B>& ref, double tol) {
  INFO(name);
  REQUIRE(got.size() == ref.size());
  REQUIRE(lory_test::count_nan(got) == 0);
  const double err = lory_test::rel_error(got, ref);
  INFO("rel error " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

// Compares every output a mode produces. The router-path gradients (dW_r,
// d_bias) go through softmax backward, dz = p * (dp - <p, dp>), whose
// cancellation amplifies the rounding of dp, hence a looser bound.
template <class T>
void check_against_reference(const LayerData<T>& D, const LayerOutputs<T, float>& got,
                             const LayerOutputs<double, double>& ref, double tol) {
  check_close("y", got.y, ref.y, tol);
  check_close("weights", got.weights, ref.weights, tol);
  check_close("dx", got.dx, ref.dx, tol);
  check_close("dW_g", got.dW_g, ref.dW_g, tol);
  check_close("dW_u", got.dW_u, ref.dW_u, tol);
  check_close("dW_d", got.dW_d, ref.dW_d, tol);
  check_close("d_weights", got.d_weights, ref.d_weights, tol);
  if (D.mode != RoutingMode::kGivenWeights) {
    check_close("hbar", got.hbar, ref.hbar, tol);
    check_close("probs", got.probs, ref.probs, tol);
    check_close("dW_r", got.dW_r, ref.dW_r, 10 * tol);
    if (!D.bias.empty()) check_close("d_bias", got.d_bias, ref.d_bias, 10 * tol);
  }
}

// Layouts with deliberate corners: L % T == 0; a short last segment; L < T (one
// short segment per sequence); more sequences than full segments per sequence
// (the GEMM groups then run per in-sequence position); a single sequence.
const std::vector<SegmentLayout>& layouts() {
  static const std::vector<SegmentLayout> l = {
      {2, 24, 8}, {2, 21, 8}, {3, 5, 8}, {5, 19, 8}, {1, 13, 4}};
  return l;
}

const RoutingMode kModes[] = {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel, RoutingMode::kGivenWeights};

}  // namespace

TEST_CASE("CPU MoE FFN plan matches the double twin for every mode, layout and chunk size", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_modes");
  // d and f not multiples of 8; E = 1 and E = 3.
  const FfnShape shapes[] = {{11, 13, 3}, {9, 6, 1}};
  for (const FfnShape& sh : shapes)
    for (const SegmentLayout& lay : layouts())
      for (RoutingMode mode : kModes) {
        const LayerData<float> D(lay, sh, mode, mode == RoutingMode::kCausalSegment, rng);
        const int64_t S = lay.num_segments();
        for (bool accumulate : {false, true}) {
          const InitialGrads<float> init = random_initial_grads(D, rng);
          const auto ref = run_reference(D, accumulate, &init);
          std::vector<int64_t> chunks = {1, 2, 3, S - 1, S};
          for (int64_t c : chunks) {
            if (c < 1 || c > S) continue;
            INFO("B=" << lay.batch << " L=" << lay.seq_len << " T=" << lay.segment_len << " d=" << sh.d
                      << " f=" << sh.f << " E=" << sh.experts << " mode=" << lory::routing_mode_name(mode)
                      << " chunk=" << c << " accumulate=" << accumulate);
            MoeFfnOptions opt;
            opt.max_chunk_segments = c;
            LayerOutputs<float, float> got;
            REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, opt, accumulate, &init, got) ==
                    Status::kSuccess);
            check_against_reference(D, got, ref, lory_test::tolerance<float>());
          }
        }
      }
}

TEST_CASE("CPU MoE FFN plan in bf16 and fp16 storage stays within the dtype's tolerance", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_low_precision");
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{16, 24, 4};
  for (RoutingMode mode : kModes) {
    INFO("mode=" << lory::routing_mode_name(mode));
    {
      const LayerData<__nv_bfloat16> D(lay, sh, mode, true, rng);
      LayerOutputs<__nv_bfloat16, float> got;
      MoeFfnOptions opt;
      opt.max_chunk_segments = 2;
      REQUIRE(run_plan<__nv_bfloat16, lory::reference::MoeFfnCpuBackend>(D, opt, false, nullptr, got) ==
              Status::kSuccess);
      check_against_reference(D, got, run_reference(D), lory_test::tolerance<__nv_bfloat16>());
    }
    {
      const LayerData<__half> D(lay, sh, mode, true, rng);
      LayerOutputs<__half, float> got;
      REQUIRE(run_plan<__half, lory::reference::MoeFfnCpuBackend>(D, {}, false, nullptr, got) == Status::kSuccess);
      check_against_reference(D, got, run_reference(D), lory_test::tolerance<__half>());
    }
  }
}

TEST_CASE("CPU MoE FFN plan: chunked and unchunked runs agree to rounding", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_chunks_agree");
  const LayerData<float> D({3, 21, 8}, {10, 14, 5}, RoutingMode::kCausalSegment, true, rng);
  LayerOutputs<float, float> whole, one, three;
  MoeFfnOptions o1, o3;
  o1.max_chunk_segments = 1;
  o3.max_chunk_segments = 3;
  REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, {}, false, nullptr, whole) == Status::kSuccess);
  REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, o1, false, nullptr, one) == Status::kSuccess);
  REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, o3, false, nullptr, three) == Status::kSuccess);
  for (const auto* o : {&one, &three}) {
    // Per-segment math does not depend on the chunking: the forward, the
    // per-segment d_weights and dx are bitwise identical on the CPU ...
    REQUIRE(o->y == whole.y);
    REQUIRE(o->d_weights == whole.d_weights);
    REQUIRE(o->dx == whole.dx);
    REQUIRE(o->dW_r == whole.dW_r);
    // ... while the expert gradients are rounded once per chunk.
    CHECK(lory_test::rel_error(o->dW_g, whole.dW_g) <= 1e-6);
    CHECK(lory_test::rel_error(o->dW_u, whole.dW_u) <= 1e-6);
    CHECK(lory_test::rel_error(o->dW_d, whole.dW_d) <= 1e-6);
  }
}

TEST_CASE("CPU MoE FFN plan: workspace budget picks the chunk and rejects too small a budget", "[cpu][plan]") {
  const SegmentLayout lay{3, 21, 8};
  const FfnShape sh{10, 14, 5};
  using Plan = lory::reference::MoeFfnCpuPlan<float>;
  const Plan unlimited(lay, sh, RoutingMode::kCausalSegment);
  REQUIRE(unlimited.can_implement() == Status::kSuccess);
  const int64_t S = lay.num_segments();
  REQUIRE(unlimited.chunk_segments() == S);
  REQUIRE(unlimited.workspace_size() == unlimited.workspace_size_for_chunk(S));
  REQUIRE(unlimited.min_workspace_size() == unlimited.workspace_size_for_chunk(1));

  // Monotone in the chunk size, and it really grows with it.
  for (int64_t c = 2; c <= S; ++c)
    REQUIRE(unlimited.workspace_size_for_chunk(c) >= unlimited.workspace_size_for_chunk(c - 1));
  REQUIRE(unlimited.workspace_size_for_chunk(S) > unlimited.workspace_size_for_chunk(1));
  // The merged weights of a chunk alone: 3 * C * d * f values.
  REQUIRE(unlimited.workspace_size_for_chunk(S) >= size_t(3 * S * sh.d * sh.f * sizeof(float)));

  // A budget of exactly size(c) gives chunk c; one byte less gives less.
  for (int64_t c : {int64_t(1), int64_t(2), S / 2, S}) {
    MoeFfnOptions o;
    o.workspace_budget_bytes = unlimited.workspace_size_for_chunk(c);
    const Plan p(lay, sh, RoutingMode::kCausalSegment, o);
    REQUIRE(p.can_implement() == Status::kSuccess);
    REQUIRE(p.chunk_segments() == c);
    REQUIRE(p.workspace_size() <= o.workspace_budget_bytes);
    o.workspace_budget_bytes -= 1;
    const Plan q(lay, sh, RoutingMode::kCausalSegment, o);
    if (c == 1) {
      REQUIRE(q.can_implement() == Status::kErrorWorkspaceTooSmall);
    } else {
      REQUIRE(q.can_implement() == Status::kSuccess);
      REQUIRE(q.chunk_segments() < c);
    }
  }
  // max_chunk_segments caps the chunk below what the budget allows.
  MoeFfnOptions o;
  o.workspace_budget_bytes = unlimited.workspace_size();
  o.max_chunk_segments = 4;
  REQUIRE(Plan(lay, sh, RoutingMode::kCausalSegment, o).chunk_segments() == 4);
}

TEST_CASE("CPU MoE FFN plan reports bad arguments before touching memory", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_errors");
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{10, 14, 3};
  using Plan = lory::reference::MoeFfnCpuPlan<float>;
  REQUIRE(Plan(lay, {10, 14, 0}, RoutingMode::kCausalSegment).can_implement() ==
          Status::kErrorUnsupportedExpertCount);
  REQUIRE(Plan({0, 21, 8}, sh, RoutingMode::kCausalSegment).can_implement() == Status::kErrorInvalidSize);
  REQUIRE(Plan(lay, sh, static_cast<RoutingMode>(7)).can_implement() == Status::kErrorInvalidArgument);
  MoeFfnOptions neg;
  neg.max_chunk_segments = -1;
  REQUIRE(Plan(lay, sh, RoutingMode::kCausalSegment, neg).can_implement() == Status::kErrorInvalidArgument);

  const LayerData<float> D(lay, sh, RoutingMode::kCausalSegment, false, rng);
  LayerOutputs<float, float> out;
  out.size_for(D);
  lory_test::poison(out.y);
  const Plan plan(lay, sh, RoutingMode::kCausalSegment);
  std::vector<unsigned char> ws(plan.workspace_size());
  lory::MoeFfnForwardArgs<float, float> f;
  fill_params(f.p, D, D.W_r, D.W_g, D.W_u, D.W_d, D.bias, D.given);
  f.x = D.x.data();
  f.y = out.y.data();
  f.hbar = out.hbar.data();
  f.probs = out.probs.data();
  f.weights = out.weights.data();
  REQUIRE(plan.forward(f, nullptr, ws.size(), {}) == Status::kErrorNullPointer);
  REQUIRE(plan.forward(f, ws.data(), ws.size() - 1, {}) == Status::kErrorWorkspaceTooSmall);
  auto g = f;
  g.p.layout.seq_len = 24;  // does not match the plan
  REQUIRE(plan.forward(g, ws.data(), ws.size(), {}) == Status::kErrorInvalidShape);
  g = f;
  g.p.mode = RoutingMode::kPromptLevel;
  REQUIRE(plan.forward(g, ws.data(), ws.size(), {}) == Status::kErrorInvalidArgument);
  g = f;
  g.x = nullptr;
  REQUIRE(plan.forward(g, ws.data(), ws.size(), {}) == Status::kErrorNullPointer);
  // Nothing was written by the failed calls.
  REQUIRE(lory_test::count_nan(out.y) == static_cast<int64_t>(out.y.size()));
  // A too-small budget fails the same way in forward and backward.
  MoeFfnOptions tiny;
  tiny.workspace_budget_bytes = plan.min_workspace_size() - 1;
  const Plan small(lay, sh, RoutingMode::kCausalSegment, tiny);
  REQUIRE(small.forward(f, ws.data(), ws.size(), {}) == Status::kErrorWorkspaceTooSmall);
  REQUIRE(plan.forward(f, ws.data(), ws.size(), {}) == Status::kSuccess);
  REQUIRE(lory_test::count_nan(out.y) == 0);
}

namespace {
// The CPU backend with a GEMM call counter: shows how many GEMM launches the
// orchestration issues (the CUDA backend issues one cuBLAS call per GEMM here).
struct CountingBackend : lory::reference::MoeFfnCpuBackend {
  static int& gemm_calls() {
    static int n = 0;
    return n;
  }
  template <class T>
  static Status gemm(const lory::StridedBatchedGemm<T>& g, Stream s) {
    ++gemm_calls();
    return lory::reference::MoeFfnCpuBackend::gemm(g, s);
  }
};
}  // namespace

TEST_CASE("CPU MoE FFN plan batches each GEMM over a chunk's segments", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_gemm_count");
  struct Expect {
    SegmentLayout lay;
    int64_t chunk;
    int groups_per_chunk;  // strided-batched launches per matrix product and chunk
  };
  // L % T == 0: one group; a short last segment: the full ones per sequence
  // (or per position) plus one for the short ones.
  const Expect cases[] = {{{4, 32, 8}, 0, 1}, {{4, 32, 8}, 4, 1}, {{2, 21, 8}, 0, 3}, {{6, 19, 8}, 0, 3}};
  for (const Expect& c : cases) {
    const LayerData<float> D(c.lay, {8, 8, 2}, RoutingMode::kCausalSegment, false, rng);
    MoeFfnOptions o;
    o.max_chunk_segments = c.chunk;
    LayerOutputs<float, float> got;
    CountingBackend::gemm_calls() = 0;
    REQUIRE(run_plan<float, CountingBackend>(D, o, false, nullptr, got) == Status::kSuccess);
    const int64_t S = c.lay.num_segments();
    const int64_t chunks = c.chunk ? (S + c.chunk - 1) / c.chunk : 1;
    // forward: a, u, y; backward: a, u, dm, G_d, dx (2), G_g, G_u
    INFO("B=" << c.lay.batch << " L=" << c.lay.seq_len << " chunk=" << c.chunk);
    REQUIRE(CountingBackend::gemm_calls() == 11 * c.groups_per_chunk * chunks);
    check_against_reference(D, got, run_reference(D), lory_test::tolerance<float>());
  }
}
