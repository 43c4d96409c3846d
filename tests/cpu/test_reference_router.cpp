// CPU twin of the segment router: forward against a direct computation of the
// semantics in lory/router.hpp, backward against central finite differences.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/reference/router.hpp"

namespace {

using lory::RoutingMode;

struct RouterCase {
  int64_t B, L, T, d;
  int E;
  bool bias;
};

// Router inputs in double plus the forward's outputs.
struct RouterData {
  RouterCase c;
  RoutingMode mode;
  std::vector<double> x, W_r, bias, hbar, probs, weights;
  lory::SegmentLayout layout() const { return {c.B, c.L, c.T}; }
  int64_t S() const { return layout().num_segments(); }
  int64_t rows() const { return mode == RoutingMode::kPromptLevel ? c.B : S(); }

  lory::Status forward() {
    hbar.assign(rows() * c.d, 0.0);
    probs.assign(rows() * c.E, 0.0);
    weights.assign(S() * c.E, 0.0);
    lory::RouterForwardArgs<double, double> a;
    a.layout = layout();
    a.d = c.d;
    a.experts = c.E;
    a.mode = mode;
    a.x = x.data();
    a.W_r = W_r.data();
    a.bias = c.bias ? bias.data() : nullptr;
    a.hbar = hbar.data();
    a.probs = probs.data();
    a.weights = weights.data();
    return lory::reference::router_forward(a);
  }
};

RouterData make_router(const RouterCase& c, RoutingMode mode, std::mt19937_64& rng) {
  RouterData r{c, mode, {}, {}, {}, {}, {}, {}};
  r.x = lory_test::random_vector<double>(c.B * c.L * c.d, rng);
  r.W_r = lory_test::random_vector<double>(c.E * c.d, rng, -2, 2);
  r.bias = lory_test::random_vector<double>(c.E, rng);
  return r;
}

const RouterCase kCases[] = {
    {2, 11, 4, 5, 3, true},   // short last segment, B = 2
    {1, 4, 1, 3, 4, false},   // T = 1
    {2, 7, 3, 5, 1, true},    // E = 1
    {2, 5, 8, 4, 3, true},    // one segment per sequence (L <= T)
    {3, 9, 3, 6, 5, false},   // L a multiple of T
};

// Loss over the weights that carry gradient: sum over segments of <c_s, weights_s>,
// leaving out segment 0 of each sequence in causal mode (its use is stop-gradient).
double weights_loss(const RouterData& r, const std::vector<double>& cw) {
  const int64_t N = r.layout().segments_per_sequence();
  double L = 0;
  for (int64_t s = 0; s < r.S(); ++s) {
    if (r.mode == RoutingMode::kCausalSegment && s % N == 0) continue;
    for (int e = 0; e < r.c.E; ++e) L += cw[s * r.c.E + e] * r.weights[s * r.c.E + e];
  }
  return L;
}

// Compares an analytic gradient with a finite-difference one, norm-relative.
void require_grad_close(const std::vector<double>& got, const std::vector<double>& fd, const char* what) {
  double ref = 0;
  for (double v : fd) ref += v * v;
  INFO(what);
  if (ref == 0) {
    REQUIRE(lory_test::max_abs_error(got.data(), fd.data(), (int64_t)fd.size()) < 1e-12);
  } else {
    REQUIRE(lory_test::rel_error(got, fd) < 1e-6);
  }
}

}  // namespace

TEST_CASE("router forward: segment means, softmax and the routing rule of each mode", "[cpu][router]") {
  auto rng = lory_test::make_rng("router_forward");
  for (const RouterCase& c : kCases)
    for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
      RouterData r = make_router(c, mode, rng);
      REQUIRE(r.forward() == lory::Status::kSuccess);
      const auto lay = r.layout();
      const int64_t N = lay.segments_per_sequence();
      INFO("B=" << c.B << " L=" << c.L << " T=" << c.T << " E=" << c.E << " mode=" << lory::routing_mode_name(mode));
      for (int64_t row = 0; row < r.rows(); ++row) {
        // The averaged span: tokens present in the segment, or the whole sequence.
        int64_t t0, n;
        if (mode == RoutingMode::kPromptLevel) { t0 = row * c.L; n = c.L; }
        else { t0 = (row / N) * c.L + (row % N) * c.T; n = std::min<int64_t>(c.T, c.L - (row % N) * c.T); }
        std::vector<double> mean(c.d, 0.0), z(c.E), p(c.E);
        for (int64_t t = t0; t < t0 + n; ++t)
          for (int64_t j = 0; j < c.d; ++j) mean[j] += r.x[t * c.d + j] / n;
        double den = 0;
        for (int e = 0; e < c.E; ++e) {
          z[e] = c.bias ? r.bias[e] : 0.0;
          for (int64_t j = 0; j < c.d; ++j) z[e] += r.W_r[e * c.d + j] * mean[j];
          den += std::exp(z[e]);
        }
        for (int64_t j = 0; j < c.d; ++j) REQUIRE(std::fabs(r.hbar[row * c.d + j] - mean[j]) < 1e-14);
        for (int e = 0; e < c.E; ++e) REQUIRE(std::fabs(r.probs[row * c.E + e] - std::exp(z[e]) / den) < 1e-14);
      }
      for (int64_t s = 0; s < r.S(); ++s) {
        const int64_t src = mode == RoutingMode::kPromptLevel ? s / N : (s % N == 0 ? s : s - 1);
        for (int e = 0; e < c.E; ++e) REQUIRE(r.weights[s * c.E + e] == r.probs[src * c.E + e]);
      }
    }
}

TEST_CASE("router forward: given weights are copied verbatim, hbar and probs untouched", "[cpu][router]") {
  auto rng = lory_test::make_rng("router_given");
  const lory::SegmentLayout lay{2, 9, 4};
  const int E = 5;
  const int64_t S = lay.num_segments();
  auto given = lory_test::random_vector<double>(S * E, rng, -3, 3);  // not even a simplex: verbatim
  std::vector<double> weights(S * E);
  lory_test::poison(weights);
  lory::RouterForwardArgs<double, double> a;
  a.layout = lay;
  a.experts = E;
  a.mode = RoutingMode::kGivenWeights;
  a.given_weights = given.data();
  a.weights = weights.data();
  REQUIRE(lory::reference::router_forward(a) == lory::Status::kSuccess);
  REQUIRE(weights == given);
}

TEST_CASE("router backward matches finite differences (dx added, dW_r, d_bias)", "[cpu][router][grad]") {
  auto rng = lory_test::make_rng("router_backward");
  const double h = 1e-6;
  for (const RouterCase& c : kCases)
    for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
      INFO("B=" << c.B << " L=" << c.L << " T=" << c.T << " E=" << c.E << " mode=" << lory::routing_mode_name(mode));
      RouterData r = make_router(c, mode, rng);
      REQUIRE(r.forward() == lory::Status::kSuccess);
      const auto cw = lory_test::random_vector<double>(r.S() * c.E, rng);
      // Analytic: dx starts random (the router path is added), dW_r / d_bias poisoned (overwritten).
      const auto dx0 = lory_test::random_vector<double>(r.x.size(), rng);
      std::vector<double> dx = dx0, dW(r.W_r.size()), db(c.E);
      lory_test::poison(dW);
      lory_test::poison(db);
      lory::RouterBackwardArgs<double, double> b;
      b.layout = r.layout();
      b.d = c.d;
      b.experts = c.E;
      b.mode = mode;
      b.W_r = r.W_r.data();
      b.hbar = r.hbar.data();
      b.probs = r.probs.data();
      b.d_weights = cw.data();
      b.dW_r = dW.data();
      b.d_bias = db.data();
      b.dx = dx.data();
      REQUIRE(lory::reference::router_backward(b) == lory::Status::kSuccess);
      for (size_t i = 0; i < dx.size(); ++i) dx[i] -= dx0[i];

      auto fd_of = [&](std::vector<double>& param) {
        std::vector<double> g(param.size());
        for (size_t i = 0; i < param.size(); ++i) {
          const double keep = param[i];
          param[i] = keep + h;
          REQUIRE(r.forward() == lory::Status::kSuccess);
          const double lp = weights_loss(r, cw);
          param[i] = keep - h;
          REQUIRE(r.forward() == lory::Status::kSuccess);
          const double lm = weights_loss(r, cw);
          param[i] = keep;
          g[i] = (lp - lm) / (2 * h);
        }
        return g;
      };
      require_grad_close(dx, fd_of(r.x), "dx");
      require_grad_close(dW, fd_of(r.W_r), "dW_r");
      // d_bias is the gradient of a bias whether or not one was passed: no bias = zero bias.
      if (!c.bias) std::fill(r.bias.begin(), r.bias.end(), 0.0);
      r.c.bias = true;
      auto fdb = fd_of(r.bias);
      require_grad_close(db, fdb, "d_bias");
      if (c.E == 1) {  // softmax over one expert is constant
        for (double v : dW) REQUIRE(v == 0.0);
      }
    }
}

TEST_CASE("router backward: accumulate adds into dW_r and d_bias; given weights does nothing", "[cpu][router]") {
  auto rng = lory_test::make_rng("router_accumulate");
  const RouterCase c{2, 10, 4, 6, 4, true};
  RouterData r = make_router(c, RoutingMode::kCausalSegment, rng);
  REQUIRE(r.forward() == lory::Status::kSuccess);
  const auto cw = lory_test::random_vector<double>(r.S() * c.E, rng);
  lory::RouterBackwardArgs<double, double> b;
  b.layout = r.layout();
  b.d = c.d;
  b.experts = c.E;
  b.mode = RoutingMode::kCausalSegment;
  b.W_r = r.W_r.data();
  b.hbar = r.hbar.data();
  b.probs = r.probs.data();
  b.d_weights = cw.data();
  std::vector<double> dW(r.W_r.size()), db(c.E);
  b.dW_r = dW.data();
  b.d_bias = db.data();
  REQUIRE(lory::reference::router_backward(b) == lory::Status::kSuccess);
  const auto dW_init = lory_test::random_vector<double>(dW.size(), rng);
  const auto db_init = lory_test::random_vector<double>(db.size(), rng);
  std::vector<double> dW2 = dW_init, db2 = db_init;
  b.dW_r = dW2.data();
  b.d_bias = db2.data();
  b.accumulate_dW_r = b.accumulate_d_bias = true;
  REQUIRE(lory::reference::router_backward(b) == lory::Status::kSuccess);
  for (size_t i = 0; i < dW.size(); ++i) REQUIRE(std::fabs(dW2[i] - (dW_init[i] + dW[i])) < 1e-13);
  for (size_t i = 0; i < db.size(); ++i) REQUIRE(std::fabs(db2[i] - (db_init[i] + db[i])) < 1e-13);

  // kGivenWeights: the caller owns its router, nothing is written.
  std::vector<double> dx(r.x.size());
  lory_test::poison(dx);
  lory_test::poison(dW2);
  b.mode = RoutingMode::kGivenWeights;
  b.dW_r = dW2.data();
  b.dx = dx.data();
  REQUIRE(lory::reference::router_backward(b) == lory::Status::kSuccess);
  REQUIRE(lory_test::count_nan(dx) == (int64_t)dx.size());
  REQUIRE(lory_test::count_nan(dW2) == (int64_t)dW2.size());
}

TEST_CASE("router backward: equal weight gradients give exactly zero router gradients", "[cpu][router]") {
  auto rng = lory_test::make_rng("router_equal_dp");
  const RouterCase c{2, 13, 4, 7, 6, true};
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
    RouterData r = make_router(c, mode, rng);
    REQUIRE(r.forward() == lory::Status::kSuccess);
    std::vector<double> cw(r.S() * c.E);
    for (int64_t s = 0; s < r.S(); ++s) {
      const double v = lory_test::random_vector<double>(1, rng)[0];
      for (int e = 0; e < c.E; ++e) cw[s * c.E + e] = v;  // identical across experts
    }
    std::vector<double> dW(r.W_r.size()), db(c.E), dx(r.x.size(), 0.0);
    lory::RouterBackwardArgs<double, double> b;
    b.layout = r.layout();
    b.d = c.d;
    b.experts = c.E;
    b.mode = mode;
    b.W_r = r.W_r.data();
    b.hbar = r.hbar.data();
    b.probs = r.probs.data();
    b.d_weights = cw.data();
    b.dW_r = dW.data();
    b.d_bias = db.data();
    b.dx = dx.data();
    REQUIRE(lory::reference::router_backward(b) == lory::Status::kSuccess);
    for (double v : dW) REQUIRE(v == 0.0);
    for (double v : db) REQUIRE(v == 0.0);
    for (double v : dx) REQUIRE(v == 0.0);
  }
}
