// Router kernels against the CPU twin (Acc = double on the same rounded
// inputs), every routing mode x storage dtype: hbar, probs and weights
// (forward); dW_r (overwrite / accumulate), d_bias and dx (added into a random
// initial dx) for the backward. Odd shapes on purpose, poisoned outputs and
// workspace, bitwise determinism over two runs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/router_grads.hpp"
#include "common/test_util.hpp"
#include "lory/reference/router.hpp"
#include "lory/router.cuh"

namespace {

using lory::RoutingMode;
using lory_test::DeviceBuffer;
using lory_test::DeviceBytes;

struct RouterShape {
  int64_t B, L, T, d;
  int E;
  bool bias;
  int64_t misalign;  // element offset of x / W_r / dx from their allocations
  const char* what;
};

std::vector<RouterShape> router_shapes() {
  return {
      {2, 37, 8, 67, 5, true, 0, "L not a multiple of T, odd d"},
      {1, 5, 1, 16, 3, false, 0, "T = 1"},
      {3, 40, 64, 24, 1, true, 0, "one segment per sequence, E = 1"},
      {2, 100, 32, 136, 64, true, 0, "E = 64"},
      {2, 600, 256, 64, 8, false, 0, "full-width segments; prompt spans split into chunks"},
      {2, 700, 300, 48, 4, true, 0, "segments longer than a chunk"},
      {3, 50, 16, 40, 6, true, 1, "misaligned base pointers"},
      {2, 512, 128, 264, 16, true, 0, "vectorised, d not a multiple of the block slab"},
  };
}

const RoutingMode kModes[] = {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel,
                              RoutingMode::kGivenWeights};

// Routing outputs come from fp32 accumulation.
constexpr double kRoutingTol = 1e-5;

template <class T>
std::string case_name(const RouterShape& s, RoutingMode m) {
  return std::string(lory::routing_mode_name(m)) + "/" + lory::dtype_name(lory::dtype_of<T>::value) +
         "/" + s.what;
}

double rms(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return v.empty() ? 0 : std::sqrt(s / v.size());
}

// Random values of a given RMS (never all zeros: scale 0 falls back to 1).
template <class T>
std::vector<T> random_with_rms(size_t n, double target, std::mt19937_64& rng) {
  const double a = (target > 0 ? target : 1.0) * std::sqrt(3.0);
  return lory_test::random_vector<T>(n, rng, -a, a);
}

template <class T, class U>
void require_close(const std::vector<T>& got, const std::vector<U>& ref, double tol, const char* name) {
  INFO(name << ": " << lory_test::count_nan(got) << " NaN of " << got.size());
  REQUIRE(lory_test::count_nan(got) == 0);
  const double err = lory_test::rel_error(got, ref);
  INFO(name << ": rel error " << err << " tolerance " << tol);
  REQUIRE(err <= tol);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Workspace buffer for a query result, poisoned with NaN bytes (a kernel that
// reads workspace it never wrote produces NaN).
struct Workspace {
  DeviceBytes buf;
  size_t bytes;
  explicit Workspace(size_t n) : buf(n > 0 ? n : 1), bytes(n) {
    LORY_TEST_CUDA(cudaMemset(buf.get(), 0xff, n > 0 ? n : 1));
  }
};

template <class T>
void run_forward_case(const RouterShape& sh, RoutingMode mode) {
  const std::string name = case_name<T>(sh, mode);
  INFO(name);
  auto rng = lory_test::make_rng("router_fwd/" + name);
  lory::SegmentLayout layout{sh.B, sh.L, sh.T};
  const int64_t S = layout.num_segments(), tokens = layout.num_tokens(), d = sh.d;
  const int E = sh.E;
  const int64_t rows = mode == RoutingMode::kPromptLevel ? sh.B : S;

  // x = noise + a per-column offset, so that the means (and the logits) are O(1).
  auto col = lory_test::random_vector<double>(d, rng, -1, 1);
  auto noise = lory_test::random_vector<double>(tokens * d, rng, -1, 1);
  std::vector<T> x(tokens * d + sh.misalign);
  for (int64_t i = 0; i < tokens * d; ++i) x[sh.misalign + i] = lory::from_double<T>(noise[i] + col[i % d]);
  const double w_scale = 2.0 / std::sqrt(static_cast<double>(d));
  std::vector<T> W(E * d + sh.misalign);
  {
    auto w = lory_test::random_vector<T>(E * d, rng, -w_scale, w_scale);
    std::copy(w.begin(), w.end(), W.begin() + sh.misalign);
  }
  auto bias = lory_test::random_vector<float>(E, rng, -0.5, 0.5);
  auto given = lory_test::random_simplex_rows(S, E, rng);

  // CPU twin.
  std::vector<float> hbar_ref(rows * d), probs_ref(rows * E), weights_ref(S * E);
  lory::RouterForwardArgs<T, float> ref;
  ref.layout = layout;
  ref.d = d;
  ref.experts = E;
  ref.mode = mode;
  ref.x = x.data() + sh.misalign;
  ref.W_r = W.data() + sh.misalign;
  ref.bias = sh.bias ? bias.data() : nullptr;
  ref.given_weights = given.data();
  ref.hbar = hbar_ref.data();
  ref.probs = probs_ref.data();
  ref.weights = weights_ref.data();
  REQUIRE(lory::reference::router_forward<double>(ref) == lory::Status::kSuccess);

  // GPU.
  DeviceBuffer<T> d_x(x), d_W(W);
  DeviceBuffer<float> d_bias(bias), d_given(given), d_hbar(rows * d), d_probs(rows * E), d_weights(S * E);
  lory::RouterForwardArgs<T, float> args = ref;
  args.x = d_x.get() + sh.misalign;
  args.W_r = d_W.get() + sh.misalign;
  args.bias = sh.bias ? d_bias.get() : nullptr;
  args.given_weights = d_given.get();
  args.hbar = d_hbar.get();
  args.probs = d_probs.get();
  args.weights = d_weights.get();
  REQUIRE(lory::router_forward_can_implement(args) == lory::Status::kSuccess);
  size_t ws_bytes = 12345;
  REQUIRE(lory::router_forward(args, nullptr, ws_bytes, nullptr) == lory::Status::kSuccess);
  REQUIRE(ws_bytes != 12345);
  Workspace ws(ws_bytes);

  auto run = [&] {
    std::vector<float> p_h(rows * d), p_p(rows * E), p_w(S * E);
    lory_test::poison(p_h);
    lory_test::poison(p_p);
    lory_test::poison(p_w);
    d_hbar.upload(p_h);
    d_probs.upload(p_p);
    d_weights.upload(p_w);
    size_t bytes = ws.bytes;
    REQUIRE(lory::router_forward(args, ws.buf.get(), bytes, nullptr) == lory::Status::kSuccess);
    LORY_TEST_SYNC();
  };
  run();
  const auto weights = d_weights.download(S * E);
  require_close(weights, weights_ref, kRoutingTol, "weights");
  if (mode == RoutingMode::kGivenWeights) {
    REQUIRE(same_bits(weights, given));  // a copy, bit for bit
    return;
  }
  const auto hbar = d_hbar.download(rows * d), probs = d_probs.download(rows * E);
  require_close(hbar, hbar_ref, kRoutingTol, "hbar");
  require_close(probs, probs_ref, kRoutingTol, "probs");

  run();
  REQUIRE(same_bits(hbar, d_hbar.download(rows * d)));
  REQUIRE(same_bits(probs, d_probs.download(rows * E)));
  REQUIRE(same_bits(weights, d_weights.download(S * E)));
}

// Which outputs a backward run asks for.
struct Outputs {
  bool dW_r, d_bias, dx, accumulate;
  const char* what;
};

template <class T>
void run_backward_case(const RouterShape& sh, RoutingMode mode, const Outputs& out) {
  const std::string name = case_name<T>(sh, mode) + "/" + out.what;
  INFO(name);
  auto rng = lory_test::make_rng("router_bwd/" + name);
  lory::SegmentLayout layout{sh.B, sh.L, sh.T};
  const int64_t S = layout.num_segments(), tokens = layout.num_tokens(), d = sh.d;
  const int E = sh.E;
  const int64_t rows = mode == RoutingMode::kPromptLevel ? sh.B : S;

  std::vector<T> W(E * d + sh.misalign);
  {
    auto w = lory_test::random_vector<T>(E * d, rng, -1, 1);
    std::copy(w.begin(), w.end(), W.begin() + sh.misalign);
  }
  // Distinct experts' gradients: every d_weights entry differs.
  auto hbar = lory_test::random_vector<float>(rows * d, rng, -1, 1);
  auto probs = lory_test::random_simplex_rows(rows, E, rng);
  auto d_weights = lory_test::random_vector<float>(S * E, rng, -1, 1);

  lory::RouterBackwardArgs<T, float> ref;
  ref.layout = layout;
  ref.d = d;
  ref.experts = E;
  ref.mode = mode;
  ref.W_r = W.data() + sh.misalign;
  ref.hbar = hbar.data();
  ref.probs = probs.data();
  ref.d_weights = d_weights.data();
  ref.accumulate_dW_r = ref.accumulate_d_bias = out.accumulate;

  // The increments alone (from zero) fix the scale of the initial values, so
  // that a missing or misplaced increment cannot hide below the rounding of dx.
  std::vector<T> dW_inc(E * d, lory::from_double<T>(0.0)), dx_inc(tokens * d + sh.misalign, lory::from_double<T>(0.0));
  std::vector<float> db_inc(E, 0.f);
  {
    auto probe = ref;
    probe.accumulate_dW_r = probe.accumulate_d_bias = false;
    probe.dW_r = dW_inc.data();
    probe.d_bias = db_inc.data();
    probe.dx = dx_inc.data() + sh.misalign;
    REQUIRE(lory::reference::router_backward<double>(probe) == lory::Status::kSuccess);
  }
  std::vector<double> dx_inc_d(tokens * d);
  for (int64_t i = 0; i < tokens * d; ++i) dx_inc_d[i] = lory::to_double(dx_inc[sh.misalign + i]);
  auto dx0 = random_with_rms<T>(tokens * d + sh.misalign, rms(dx_inc_d), rng);
  auto dW0 = random_with_rms<T>(E * d, rms(lory_test::to_double_vector(dW_inc)), rng);
  auto db0 = random_with_rms<float>(E, rms(lory_test::to_double_vector(db_inc)), rng);
  if (!out.accumulate) {  // overwrite must never read the old values
    lory_test::poison(dW0);
    lory_test::poison(db0);
  }

  std::vector<T> dW_ref = dW0, dx_ref = dx0;
  std::vector<float> db_ref = db0;
  ref.dW_r = out.dW_r ? dW_ref.data() : nullptr;
  ref.d_bias = out.d_bias ? db_ref.data() : nullptr;
  ref.dx = out.dx ? dx_ref.data() + sh.misalign : nullptr;
  REQUIRE(lory::reference::router_backward<double>(ref) == lory::Status::kSuccess);

  DeviceBuffer<T> g_W(W), g_dW(dW0), g_dx(dx0);
  DeviceBuffer<float> g_hbar(hbar), g_probs(probs), g_dweights(d_weights), g_db(db0);
  lory::RouterBackwardArgs<T, float> args = ref;
  args.W_r = g_W.get() + sh.misalign;
  args.hbar = g_hbar.get();
  args.probs = g_probs.get();
  args.d_weights = g_dweights.get();
  args.dW_r = out.dW_r ? g_dW.get() : nullptr;
  args.d_bias = out.d_bias ? g_db.get() : nullptr;
  args.dx = out.dx ? g_dx.get() + sh.misalign : nullptr;
  REQUIRE(lory::router_backward_can_implement(args) == lory::Status::kSuccess);
  size_t ws_bytes = 12345;
  REQUIRE(lory::router_backward(args, nullptr, ws_bytes, nullptr) == lory::Status::kSuccess);
  REQUIRE(ws_bytes != 12345);
  Workspace ws(ws_bytes);

  auto run = [&] {
    g_dW.upload(dW0);
    g_db.upload(db0);
    g_dx.upload(dx0);
    size_t bytes = ws.bytes;
    REQUIRE(lory::router_backward(args, ws.buf.get(), bytes, nullptr) == lory::Status::kSuccess);
    LORY_TEST_SYNC();
  };
  run();
  const auto dW = g_dW.download(dW0.size()), dx = g_dx.download(dx0.size());
  const auto db = g_db.download(db0.size());
  if (mode == RoutingMode::kGivenWeights) {  // nothing to do: every output untouched
    REQUIRE(same_bits(dW, dW0));
    REQUIRE(same_bits(db, db0));
    REQUIRE(same_bits(dx, dx0));
    return;
  }
  if (out.dW_r) require_close(dW, dW_ref, lory_test::tolerance<T>(), "dW_r");
  else REQUIRE(same_bits(dW, dW0));
  if (out.d_bias) require_close(db, db_ref, kRoutingTol, "d_bias");
  else REQUIRE(same_bits(db, db0));
  if (out.dx) require_close(dx, dx_ref, lory_test::tolerance<T>(), "dx");
  else REQUIRE(same_bits(dx, dx0));

  run();
  REQUIRE(same_bits(dW, g_dW.download(dW0.size())));
  REQUIRE(same_bits(db, g_db.download(db0.size())));
  REQUIRE(same_bits(dx, g_dx.download(dx0.size())));
}

}  // namespace

TEMPLATE_TEST_CASE("router_forward matches the CPU twin in every mode", "[gpu][router]", float, __half,
                   __nv_bfloat16) {
  for (const RouterShape& sh : router_shapes())
    for (RoutingMode mode : kModes) run_forward_case<TestType>(sh, mode);
}

TEMPLATE_TEST_CASE("router_backward matches the CPU twin in every mode", "[gpu][router]", float, __half,
                   __nv_bfloat16) {
  const Outputs variants[] = {
      {true, true, true, false, "all outputs, overwrite"},
      {true, true, true, true, "all outputs, accumulate"},
      {false, false, true, false, "dx only"},
      {true, false, false, true, "dW_r only, accumulate"},
      {false, true, false, false, "d_bias only"},
  };
  for (const RouterShape& sh : router_shapes())
    for (RoutingMode mode : kModes)
      for (const Outputs& out : variants) run_backward_case<TestType>(sh, mode, out);
}

TEST_CASE("router_forward given weights may alias the output", "[gpu][router]") {
  auto rng = lory_test::make_rng("router_alias");
  lory::SegmentLayout layout{2, 9, 4};
  auto w = lory_test::random_simplex_rows(layout.num_segments(), 3, rng);
  DeviceBuffer<float> g(w);
  lory::RouterForwardArgs<__nv_bfloat16, float> args;
  args.layout = layout;
  args.experts = 3;
  args.mode = RoutingMode::kGivenWeights;
  args.given_weights = g.get();
  args.weights = g.get();
  size_t bytes = 0;
  REQUIRE(lory::router_forward(args, nullptr, bytes, nullptr) == lory::Status::kSuccess);
  REQUIRE(bytes == 0);
  auto ws = lory_test::stale_workspace(1);
  REQUIRE(lory::router_forward(args, ws.get(), bytes, nullptr) == lory::Status::kSuccess);
  LORY_TEST_SYNC();
  REQUIRE(same_bits(g.download(w.size()), w));
}

namespace {

// Forward then backward on the device (fp32 storage), causal routing with a bias.
lory_test::RouterGrads<float> router_grads_on_device(const lory::SegmentLayout& layout, int64_t d, int E,
                                                      const std::vector<float>& x, const std::vector<float>& W,
                                                      const std::vector<float>& bias,
                                                      const std::vector<float>& d_weights) {
  const int64_t S = layout.num_segments();
  DeviceBuffer<float> g_x(x), g_W(W), g_bias(bias), g_dw(d_weights), g_hbar(S * d), g_probs(S * E),
      g_weights(S * E), g_dW(E * d), g_db(E);
  lory::RouterForwardArgs<float, float> f;
  f.layout = layout; f.d = d; f.experts = E;
  f.x = g_x.get(); f.W_r = g_W.get(); f.bias = g_bias.get();
  f.hbar = g_hbar.get(); f.probs = g_probs.get(); f.weights = g_weights.get();
  size_t bytes = 0;
  REQUIRE(lory::router_forward(f, nullptr, bytes, nullptr) == lory::Status::kSuccess);
  Workspace fws(bytes);
  REQUIRE(lory::router_forward(f, fws.buf.get(), bytes, nullptr) == lory::Status::kSuccess);
  lory::RouterBackwardArgs<float, float> b;
  b.layout = layout; b.d = d; b.experts = E;
  b.W_r = g_W.get(); b.hbar = g_hbar.get(); b.probs = g_probs.get(); b.d_weights = g_dw.get();
  b.dW_r = g_dW.get(); b.d_bias = g_db.get();
  REQUIRE(lory::router_backward(b, nullptr, bytes, nullptr) == lory::Status::kSuccess);
  Workspace bws(bytes);
  REQUIRE(lory::router_backward(b, bws.buf.get(), bytes, nullptr) == lory::Status::kSuccess);
  LORY_TEST_SYNC();
  return {g_probs.download(S * E), g_dW.download(E * d), g_db.download(E)};
}

}  // namespace

// 1 - max p from 1e-4 down to 1e-11: p * (dp - <p, dp>) cancels in fp32 once the most probable
// expert's p rounds to 1; BlockRowSoftmax::backward shifts dp by that expert's dp as the twin does.
TEST_CASE("router_backward of sharp routing matches float64 to 1e-5", "[gpu][router]") {
  auto rng = lory_test::make_rng("router_sharp");
  const lory::SegmentLayout layout{2, 6, 2};
  const int64_t d = 5;
  for (int E : {2, 5, 40})
    for (int dominant : {0, E / 2, E - 1})
      for (double gap = 1e-4; gap >= 1e-11; gap /= 10) {
        INFO("E " << E << " dominant " << dominant << " 1 - max p ~ " << gap);
        const auto p = lory_test::sharp_router_problem(layout, d, E, dominant, gap, rng);
        const auto gpu = router_grads_on_device(layout, d, E, p.x, p.W, p.bias, p.d_weights);
        const auto ref = lory_test::router_grads_twin<double>(layout, d, E, p.x, p.W, p.bias, p.d_weights);
        CHECK(lory_test::rel_error(gpu.dW_r, ref.dW_r) <= 1e-5);
        CHECK(lory_test::rel_error(gpu.d_bias, ref.d_bias) <= 1e-5);
      }
}

// A +Inf logit: the one-hot limit forward (not NaN), a zero gradient backward.
TEST_CASE("router with a +Inf logit routes one-hot and has a zero gradient", "[gpu][router]") {
  auto rng = lory_test::make_rng("router_inf");
  const lory::SegmentLayout layout{2, 7, 3};
  const int64_t d = 4, S = layout.num_segments();
  const int E = 5;
  const auto g = router_grads_on_device(layout, d, E, lory_test::random_vector<float>(layout.num_tokens() * d, rng),
                                        lory_test::random_vector<float>(E * d, rng), {0.f, 0.25f, INFINITY, -1.f, 0.5f},
                                        lory_test::random_vector<float>(S * E, rng));
  for (int64_t s = 0; s < S; ++s)
    for (int e = 0; e < E; ++e) REQUIRE(g.probs[s * E + e] == (e == 2 ? 1.f : 0.f));
  for (float v : g.dW_r) REQUIRE(v == 0.f);
  for (float v : g.d_bias) REQUIRE(v == 0.f);
}
