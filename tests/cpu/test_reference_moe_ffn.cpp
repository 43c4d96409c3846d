// CPU twin of the whole Lory layer: every gradient against central finite
// differences for each routing mode, the causal rule token by token, and the
// layer's contract (accumulate, identical experts, NaN, prompt-level, given
// weights, fp32 / bf16 twins against the double twin).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"
#include "common/test_util.hpp"
#include "lory/reference/moe_ffn.hpp"

namespace {

using lory::RoutingMode;
using lory::Status;

struct LayerCase {
  int64_t B, L, T, d, f;
  int E;
  bool bias;
};

// One layer's parameters, inputs and forward / backward outputs in storage T, routing R.
template <class T, class R>
struct Layer {
  LayerCase c;
  RoutingMode mode;
  std::vector<T> x, W_r, W_g, W_u, W_d, y, dy, dx, dW_r, dW_g, dW_u, dW_d;
  std::vector<R> bias, given, hbar, probs, weights, d_bias, d_weights;

  lory::SegmentLayout layout() const { return {c.B, c.L, c.T}; }
  int64_t S() const { return layout().num_segments(); }
  int64_t rows() const { return mode == RoutingMode::kPromptLevel ? c.B : S(); }

  lory::MoeFfnParams<T, R> params() const {
    lory::MoeFfnParams<T, R> p = lory_test::layer_params<T, R>(layout(), {c.d, c.f, c.E}, mode, *this);
    if (!c.bias) p.bias = nullptr;  // the values stay: the gradient tests switch the bias on
    return p;
  }
  lory::MoeFfnForwardArgs<T, R> forward_args() {
    y.resize(x.size());
    hbar.resize(rows() * c.d);
    probs.resize(rows() * c.E);
    weights.resize(S() * c.E);
    return lory_test::forward_args(params(), x.data(), *this);
  }
  template <class Acc = double> Status forward() { return lory::reference::moe_ffn_forward<Acc>(forward_args()); }

  lory::MoeFfnBackwardArgs<T, R> backward_args(bool accumulate = false) {
    dx.resize(x.size());
    dW_r.resize(W_r.size());
    dW_g.resize(W_g.size());
    dW_u.resize(W_u.size());
    dW_d.resize(W_d.size());
    d_bias.resize(c.E);
    d_weights.resize(S() * c.E);
    return lory_test::backward_args(params(), x.data(), dy.data(), *this, accumulate);
  }
  template <class Acc = double> Status backward(bool accumulate = false) {
    return lory::reference::moe_ffn_backward<Acc>(backward_args(accumulate));
  }
};

template <class T, class R>
Layer<T, R> convert(const Layer<double, double>& s) {
  Layer<T, R> o;
  o.c = s.c;
  o.mode = s.mode;
  auto cvt = [](const std::vector<double>& v) { return lory_test::from_double_vector<T>(v); };
  auto cvr = [](const std::vector<double>& v) { return std::vector<R>(v.begin(), v.end()); };
  o.x = cvt(s.x); o.W_r = cvt(s.W_r); o.W_g = cvt(s.W_g); o.W_u = cvt(s.W_u); o.W_d = cvt(s.W_d); o.dy = cvt(s.dy);
  o.bias = cvr(s.bias); o.given = cvr(s.given);
  return o;
}

Layer<double, double> make_layer(const LayerCase& c, RoutingMode mode, std::mt19937_64& rng) {
  Layer<double, double> l;
  l.c = c;
  l.mode = mode;
  const int64_t tok = c.B * c.L;
  l.x = lory_test::random_vector<double>(tok * c.d, rng);
  l.W_r = lory_test::random_vector<double>(c.E * c.d, rng, -2, 2);  // sharp enough to route differently
  l.bias = lory_test::random_vector<double>(c.E, rng);
  l.W_g = lory_test::random_vector<double>(c.E * c.f * c.d, rng, -0.7, 0.7);
  l.W_u = lory_test::random_vector<double>(c.E * c.f * c.d, rng, -0.7, 0.7);
  l.W_d = lory_test::random_vector<double>(c.E * c.d * c.f, rng, -0.7, 0.7);
  const auto g = lory_test::random_simplex_rows(l.S(), c.E, rng);
  l.given.assign(g.begin(), g.end());
  l.dy = lory_test::random_vector<double>(tok * c.d, rng);  // loss = <y, dy>
  return l;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

void require_grad_close(const std::vector<double>& got, const std::vector<double>& fd, const char* what) {
  INFO(what);
  REQUIRE(got.size() == fd.size());
  REQUIRE(lory_test::count_nan(got) == 0);
  if (dot(fd, fd) == 0) {
    REQUIRE(lory_test::max_abs_error(got.data(), fd.data(), (int64_t)fd.size()) < 1e-12);
  } else {
    REQUIRE(lory_test::rel_error(got, fd) < 1e-6);
  }
}

// Five-point central differences of loss() with respect to every element of
// param (truncation error O(h^4), so 1e-6 relative is far above the noise).
template <class Loss>
std::vector<double> fd_grad(std::vector<double>& param, Loss&& loss, double h) {
  std::vector<double> out(param.size());
  for (size_t i = 0; i < param.size(); ++i) {
    const double keep = param[i];
    double v[4];
    const double off[4] = {2 * h, h, -h, -2 * h};
    for (int k = 0; k < 4; ++k) {
      param[i] = keep + off[k];
      v[k] = loss();
    }
    param[i] = keep;
    out[i] = ((v[3] - v[0]) + 8 * (v[1] - v[2])) / (12 * h);  // exactly 0 for a constant loss
  }
  return out;
}

const LayerCase kCases[] = {
    {2, 11, 4, 5, 7, 3, true},   // L not a multiple of T (short last segment), B = 2, d, f odd
    {1, 4, 1, 3, 5, 4, false},   // T = 1
    {2, 7, 3, 5, 7, 1, true},    // E = 1
    {2, 5, 8, 4, 6, 3, true},    // one segment per sequence (L <= T)
    {1, 9, 3, 6, 9, 5, false},   // B = 1, L a multiple of T
};

}  // namespace

TEST_CASE("layer backward matches finite differences of every gradient, every routing mode", "[cpu][moe_ffn][grad]") {
  auto rng = lory_test::make_rng("moe_ffn_fd");
  const double h = 1e-3;
  for (const LayerCase& c : kCases)
    for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel, RoutingMode::kGivenWeights}) {
      INFO("B=" << c.B << " L=" << c.L << " T=" << c.T << " d=" << c.d << " f=" << c.f << " E=" << c.E
                << " mode=" << lory::routing_mode_name(mode));
      Layer<double, double> l = make_layer(c, mode, rng);
      REQUIRE(l.forward() == Status::kSuccess);
      const std::vector<double> w0 = l.weights;
      auto b = l.backward_args();
      lory_test::poison(l.dx); lory_test::poison(l.dW_r); lory_test::poison(l.d_bias);
      lory_test::poison(l.dW_g); lory_test::poison(l.dW_u); lory_test::poison(l.dW_d); lory_test::poison(l.d_weights);
      REQUIRE(lory::reference::moe_ffn_backward(b) == Status::kSuccess);

      // The loss as a function of all parameters. The routing weights come from
      // the router at the perturbed point, except that segment 0 of each sequence
      // keeps its unperturbed weights in causal mode (stop-gradient); the FFN
      // then runs with those weights given (checked equal to the layer below).
      const int64_t N = l.layout().segments_per_sequence();
      Layer<double, double> g = l;
      g.mode = RoutingMode::kGivenWeights;
      auto loss = [&]() {
        if (mode == RoutingMode::kGivenWeights) {
          g.given = l.given;
        } else {
          REQUIRE(l.forward() == Status::kSuccess);
          g.given = l.weights;
          if (mode == RoutingMode::kCausalSegment)
            for (int64_t s = 0; s < l.S(); s += N)
              std::copy(w0.begin() + s * c.E, w0.begin() + (s + 1) * c.E, g.given.begin() + s * c.E);
        }
        g.x = l.x; g.W_g = l.W_g; g.W_u = l.W_u; g.W_d = l.W_d;
        REQUIRE(g.forward() == Status::kSuccess);
        return dot(g.y, l.dy);
      };
      // The layer's own forward equals the given-weights forward with its weights, bit for bit.
      {
        REQUIRE(l.forward() == Status::kSuccess);
        const auto y_layer = l.y;
        loss();
        REQUIRE(g.y == y_layer);
      }
      auto fd_of = [&](std::vector<double>& param) { return fd_grad(param, loss, h); };
      require_grad_close(l.dx, fd_of(l.x), "dx");
      require_grad_close(l.dW_g, fd_of(l.W_g), "dW_g");
      require_grad_close(l.dW_u, fd_of(l.W_u), "dW_u");
      require_grad_close(l.dW_d, fd_of(l.W_d), "dW_d");
      if (mode != RoutingMode::kGivenWeights) {
        require_grad_close(l.dW_r, fd_of(l.W_r), "dW_r");
        if (!c.bias) std::fill(l.bias.begin(), l.bias.end(), 0.0);  // no bias = a zero bias
        l.c.bias = true;
        require_grad_close(l.d_bias, fd_of(l.bias), "d_bias");
        l.c.bias = c.bias;
      } else {
        REQUIRE(lory_test::count_nan(l.dW_r) == (int64_t)l.dW_r.size());  // unused: untouched
        REQUIRE(lory_test::count_nan(l.d_bias) == c.E);
      }
      // d_weights = dL/de: the derivative with respect to the weights given to the FFN.
      {
        auto loss_w = [&]() {
          REQUIRE(g.forward() == Status::kSuccess);
          return dot(g.y, l.dy);
        };
        g.given = w0;
        g.x = l.x; g.W_g = l.W_g; g.W_u = l.W_u; g.W_d = l.W_d;  // the unperturbed point
        auto fdw = fd_grad(g.given, loss_w, h);
        require_grad_close(l.d_weights, fdw, "d_weights");
      }
    }
}

TEST_CASE("causal rule: a token's output depends only on itself and the previous segment", "[cpu][moe_ffn][causal]") {
  auto rng = lory_test::make_rng("moe_ffn_causal");
  const LayerCase c{2, 13, 4, 5, 7, 4, true};  // N = 4, last segment of length 1
  Layer<double, double> l = make_layer(c, RoutingMode::kCausalSegment, rng);
  REQUIRE(l.forward() == Status::kSuccess);
  const auto y0 = l.y;
  const auto lay = l.layout();
  const int64_t tok = c.B * c.L, d = c.d;
  for (int64_t tp = 0; tp < tok; ++tp) {  // the perturbed token
    Layer<double, double> p = l;
    for (int64_t j = 0; j < d; ++j) p.x[tp * d + j] += 0.5;
    REQUIRE(p.forward() == Status::kSuccess);
    const int64_t sp = lay.segment_of_token(tp);
    for (int64_t t = 0; t < tok; ++t) {
      const int64_t s = lay.segment_of_token(t);
      const bool first = lay.index_in_sequence(s) == 0;
      const bool allowed = t == tp || (first ? sp == s : sp == s - 1);
      const bool same = std::memcmp(&p.y[t * d], &y0[t * d], d * sizeof(double)) == 0;
      INFO("perturbed token " << tp << ", output token " << t);
      if (!allowed) REQUIRE(same);
      else REQUIRE_FALSE(same);  // and the dependence is real, so this test can fail
    }
  }
}

TEST_CASE("accumulate adds into the weight gradients; dx is overwritten", "[cpu][moe_ffn]") {
  auto rng = lory_test::make_rng("moe_ffn_accumulate");
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel, RoutingMode::kGivenWeights}) {
    Layer<double, double> l = make_layer({2, 10, 3, 6, 5, 3, true}, mode, rng);
    REQUIRE(l.forward() == Status::kSuccess);
    REQUIRE(l.backward() == Status::kSuccess);
    const Layer<double, double> over = l;
    const auto iW_r = lory_test::random_vector<double>(l.dW_r.size(), rng);
    const auto iW_g = lory_test::random_vector<double>(l.dW_g.size(), rng);
    const auto iW_u = lory_test::random_vector<double>(l.dW_u.size(), rng);
    const auto iW_d = lory_test::random_vector<double>(l.dW_d.size(), rng);
    const auto ib = lory_test::random_vector<double>(l.d_bias.size(), rng);
    l.dW_r = iW_r; l.dW_g = iW_g; l.dW_u = iW_u; l.dW_d = iW_d; l.d_bias = ib;
    l.dx = lory_test::random_vector<double>(l.dx.size(), rng);
    auto b = l.backward_args(true);
    REQUIRE(lory::reference::moe_ffn_backward(b) == Status::kSuccess);
    INFO(lory::routing_mode_name(mode));
    REQUIRE(l.dx == over.dx);
    auto check = [](const std::vector<double>& got, const std::vector<double>& init, const std::vector<double>& o) {
      for (size_t i = 0; i < got.size(); ++i) REQUIRE(std::fabs(got[i] - (init[i] + o[i])) <= 1e-13);
    };
    check(l.dW_g, iW_g, over.dW_g);
    check(l.dW_u, iW_u, over.dW_u);
    check(l.dW_d, iW_d, over.dW_d);
    if (mode != RoutingMode::kGivenWeights) {
      check(l.dW_r, iW_r, over.dW_r);
      check(l.d_bias, ib, over.d_bias);
    } else {
      REQUIRE(l.dW_r == iW_r);  // no router: untouched
      REQUIRE(l.d_bias == ib);
    }
    REQUIRE(l.d_weights == over.d_weights);  // d_weights is always overwritten
  }
}

TEST_CASE("identical experts give exactly zero router gradients (docs/math.md, Router backward)", "[cpu][moe_ffn]") {
  auto rng = lory_test::make_rng("moe_ffn_identical");
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
    const LayerCase c{2, 11, 4, 5, 7, 4, true};
    Layer<double, double> l = make_layer(c, mode, rng);
    const int64_t fd = c.f * c.d;
    for (int e = 1; e < c.E; ++e) {  // copy expert 0 into every expert
      std::copy(l.W_g.begin(), l.W_g.begin() + fd, l.W_g.begin() + e * fd);
      std::copy(l.W_u.begin(), l.W_u.begin() + fd, l.W_u.begin() + e * fd);
      std::copy(l.W_d.begin(), l.W_d.begin() + fd, l.W_d.begin() + e * fd);
    }
    REQUIRE(l.forward() == Status::kSuccess);
    REQUIRE(l.backward() == Status::kSuccess);
    for (double v : l.dW_r) REQUIRE(v == 0.0);
    for (double v : l.d_bias) REQUIRE(v == 0.0);
    for (int64_t s = 0; s < l.S(); ++s)
      for (int e = 1; e < c.E; ++e) REQUIRE(l.d_weights[s * c.E + e] == l.d_weights[s * c.E]);
    // Distinct experts break the symmetry: the same data with expert 1 changed routes a gradient.
    l.W_g[fd] += 0.25;
    REQUIRE(l.forward() == Status::kSuccess);
    REQUIRE(l.backward() == Status::kSuccess);
    REQUIRE(dot(l.dW_r, l.dW_r) > 0);
  }
}

TEST_CASE("NaN in x propagates to y without a crash", "[cpu][moe_ffn]") {
  auto rng = lory_test::make_rng("moe_ffn_nan");
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel, RoutingMode::kGivenWeights}) {
    Layer<double, double> l = make_layer({2, 9, 4, 5, 7, 3, true}, mode, rng);
    const int64_t bad = 5;  // segment 1 of sequence 0
    l.x[bad * l.c.d + 2] = std::numeric_limits<double>::quiet_NaN();
    REQUIRE(l.forward() == Status::kSuccess);
    for (int64_t j = 0; j < l.c.d; ++j) REQUIRE(std::isnan(l.y[bad * l.c.d + j]));
    // Sequence 1 never sees sequence 0's tokens.
    REQUIRE(lory_test::count_nan(l.y.data() + l.c.L * l.c.d, l.c.L * l.c.d) == 0);
    REQUIRE(l.backward() == Status::kSuccess);
    REQUIRE(lory_test::count_nan(l.dx) > 0);
  }
}

TEST_CASE("prompt-level routing gives one decision to every segment of a sequence", "[cpu][moe_ffn]") {
  auto rng = lory_test::make_rng("moe_ffn_prompt");
  const LayerCase c{3, 10, 3, 6, 5, 4, true};
  Layer<double, double> l = make_layer(c, RoutingMode::kPromptLevel, rng);
  REQUIRE(l.forward() == Status::kSuccess);
  const int64_t N = l.layout().segments_per_sequence();
  for (int64_t b = 0; b < c.B; ++b) {
    // p_b = softmax(W_r mean(all L tokens) + bias), computed here directly.
    std::vector<double> z(c.E), mean(c.d, 0.0);
    for (int64_t t = b * c.L; t < (b + 1) * c.L; ++t)
      for (int64_t j = 0; j < c.d; ++j) mean[j] += l.x[t * c.d + j] / c.L;
    double den = 0;
    for (int e = 0; e < c.E; ++e) {
      z[e] = l.bias[e];
      for (int64_t j = 0; j < c.d; ++j) z[e] += l.W_r[e * c.d + j] * mean[j];
      den += std::exp(z[e]);
    }
    for (int64_t k = 0; k < N; ++k)
      for (int e = 0; e < c.E; ++e) {
        REQUIRE(l.weights[(b * N + k) * c.E + e] == l.weights[b * N * c.E + e]);
        REQUIRE(std::fabs(l.weights[(b * N + k) * c.E + e] - std::exp(z[e]) / den) < 1e-14);
      }
  }
}

TEST_CASE("given weights are used verbatim", "[cpu][moe_ffn]") {
  auto rng = lory_test::make_rng("moe_ffn_given");
  const LayerCase c{2, 7, 3, 4, 6, 3, false};
  Layer<double, double> l = make_layer(c, RoutingMode::kGivenWeights, rng);
  l.given = lory_test::random_vector<double>(l.given.size(), rng, -2, 2);  // any numbers, not a simplex
  l.W_r.clear();  // no router needed
  REQUIRE(l.forward() == Status::kSuccess);
  REQUIRE(l.weights == l.given);
  // y for token t = the SwiGLU FFN with Wbar = sum_e given[s, e] W_e, computed directly.
  const auto lay = l.layout();
  for (int64_t t = 0; t < c.B * c.L; ++t) {
    const double* w = &l.given[lay.segment_of_token(t) * c.E];
    std::vector<double> m(c.f);
    for (int64_t i = 0; i < c.f; ++i) {
      double a = 0, u = 0;
      for (int64_t j = 0; j < c.d; ++j)
        for (int e = 0; e < c.E; ++e) {
          a += w[e] * l.W_g[(e * c.f + i) * c.d + j] * l.x[t * c.d + j];
          u += w[e] * l.W_u[(e * c.f + i) * c.d + j] * l.x[t * c.d + j];
        }
      m[i] = a / (1 + std::exp(-a)) * u;
    }
    for (int64_t j = 0; j < c.d; ++j) {
      double y = 0;
      for (int64_t i = 0; i < c.f; ++i)
        for (int e = 0; e < c.E; ++e) y += w[e] * l.W_d[(e * c.d + j) * c.f + i] * m[i];
      REQUIRE(std::fabs(l.y[t * c.d + j] - y) < 1e-12 * (1 + std::fabs(y)));
    }
  }
}

TEST_CASE("fp32 and bf16 twins agree with the double twin", "[cpu][moe_ffn][dtype]") {
  auto rng = lory_test::make_rng("moe_ffn_dtypes");
  const LayerCase c{2, 37, 8, 24, 40, 4, true};
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel, RoutingMode::kGivenWeights}) {
    const Layer<double, double> base = make_layer(c, mode, rng);
    auto run = [&](auto tag, double tol, double router_tol) {
      using T = decltype(tag);
      Layer<T, float> lt = convert<T, float>(base);
      // The double twin sees the inputs rounded to T, so only arithmetic error is measured.
      Layer<double, double> ld = base;
      ld.x = lory_test::to_double_vector(lt.x); ld.W_r = lory_test::to_double_vector(lt.W_r);
      ld.W_g = lory_test::to_double_vector(lt.W_g); ld.W_u = lory_test::to_double_vector(lt.W_u);
      ld.W_d = lory_test::to_double_vector(lt.W_d); ld.dy = lory_test::to_double_vector(lt.dy);
      ld.bias.assign(lt.bias.begin(), lt.bias.end());
      ld.given.assign(lt.given.begin(), lt.given.end());
      REQUIRE(lt.template forward<float>() == Status::kSuccess);
      REQUIRE(lt.template backward<float>() == Status::kSuccess);
      REQUIRE(ld.forward() == Status::kSuccess);
      REQUIRE(ld.backward() == Status::kSuccess);
      INFO(lory::routing_mode_name(mode) << " " << lory::dtype_name(lory::dtype_of<T>::value));
      CHECK(lory_test::rel_error(lt.weights, ld.weights) < tol);
      CHECK(lory_test::rel_error(lt.y, ld.y) < tol);
      CHECK(lory_test::rel_error(lt.dx, ld.dx) < tol);
      CHECK(lory_test::rel_error(lt.dW_g, ld.dW_g) < tol);
      CHECK(lory_test::rel_error(lt.dW_u, ld.dW_u) < tol);
      CHECK(lory_test::rel_error(lt.dW_d, ld.dW_d) < tol);
      CHECK(lory_test::rel_error(lt.d_weights, ld.d_weights) < tol);
      if (mode != RoutingMode::kGivenWeights) {
        CHECK(lory_test::rel_error(lt.dW_r, ld.dW_r) < router_tol);
        CHECK(lory_test::rel_error(lt.d_bias, ld.d_bias) < router_tol);
      }
    };
    // The router gradients are sums over segments of dz = p * (de - <p, de>), whose
    // terms cancel: with de accumulated in fp32 over P = 3 d f products their
    // norm-relative error reaches ~7e-6 in fp32 (measured over many seeds), so
    // they get 3x headroom above tolerance<float>(); everything else gets 1e-5.
    run(float{}, 1e-5, 3e-5);
    run(__nv_bfloat16{}, 1e-2, 1e-2);
  }
}
