// Shared fixture of the MoE FFN layer tests (CPU plan, CUDA plan, launch-time
// validation, CPU twin): a random layer problem from a seeded generator, the
// filling of MoeFfnParams / MoeFfnForwardArgs / MoeFfnBackwardArgs from named
// buffers (host vectors or device buffers alike), the run of the double twin,
// and the comparison of every output against it. Host-only (g++ and nvcc).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/moe_ffn_plan.hpp"  // MoeFfnOptions
#include "lory/reference/moe_ffn.hpp"
#include "lory/reference/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"

namespace lory_test {

using lory::FfnShape;
using lory::MoeFfnOptions;
using lory::RoutingMode;
using lory::SegmentLayout;
using lory::Status;

constexpr RoutingMode kAllRoutingModes[] = {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel,
                                            RoutingMode::kGivenWeights};

// First element of a buffer, null when it is empty: a std::vector (.data())
// or a device buffer (.get()), so that one filling serves host and device.
template <class V>
auto data_or_null(V& v) -> decltype(v.data()) {
  return v.empty() ? nullptr : v.data();
}
template <class B>
auto data_or_null(B& b) -> decltype(b.get()) {
  return b.get();
}

// The layer's parameters from any struct with members W_r, bias, given, W_g,
// W_u, W_d (an empty bias or W_r gives a null pointer).
template <class T, class R, class In>
lory::MoeFfnParams<T, R> layer_params(SegmentLayout lay, FfnShape sh, RoutingMode mode, const In& in) {
  lory::MoeFfnParams<T, R> p;
  p.layout = lay;
  p.shape = sh;
  p.mode = mode;
  p.W_r = data_or_null(in.W_r);
  p.bias = data_or_null(in.bias);
  p.given_weights = data_or_null(in.given);
  p.W_g = data_or_null(in.W_g);
  p.W_u = data_or_null(in.W_u);
  p.W_d = data_or_null(in.W_d);
  return p;
}

// Forward / backward arguments writing to the same-named members of out
// (y, hbar, probs, weights; dx, dW_r, d_bias, dW_g, dW_u, dW_d, d_weights).
template <class T, class R, class Out>
lory::MoeFfnForwardArgs<T, R> forward_args(const lory::MoeFfnParams<T, R>& p, const T* x, Out& out) {
  lory::MoeFfnForwardArgs<T, R> f;
  f.p = p;
  f.x = x;
  f.y = data_or_null(out.y);
  f.hbar = data_or_null(out.hbar);
  f.probs = data_or_null(out.probs);
  f.weights = data_or_null(out.weights);
  return f;
}
template <class T, class R, class Out>
lory::MoeFfnBackwardArgs<T, R> backward_args(const lory::MoeFfnParams<T, R>& p, const T* x, const T* dy, Out& out,
                                             bool accumulate) {
  lory::MoeFfnBackwardArgs<T, R> b;
  b.p = p;
  b.x = x;
  b.dy = dy;
  b.hbar = data_or_null(out.hbar);
  b.probs = data_or_null(out.probs);
  b.weights = data_or_null(out.weights);
  b.dx = data_or_null(out.dx);
  b.dW_r = data_or_null(out.dW_r);
  b.d_bias = data_or_null(out.d_bias);
  b.dW_g = data_or_null(out.dW_g);
  b.dW_u = data_or_null(out.dW_u);
  b.dW_d = data_or_null(out.dW_d);
  b.accumulate = accumulate;
  b.d_weights = data_or_null(out.d_weights);
  return b;
}

// Host inputs of one layer call in storage T, routing data in R.
template <class T, class R = float>
struct LayerProblem {
  SegmentLayout lay;
  FfnShape sh;
  RoutingMode mode = RoutingMode::kCausalSegment;
  std::vector<T> x, dy, W_r, W_g, W_u, W_d;
  std::vector<R> bias, given;  // bias empty: no bias

  int64_t router_rows() const { return mode == RoutingMode::kPromptLevel ? lay.batch : lay.num_segments(); }
  lory::MoeFfnParams<T, R> params() const { return layer_params<T, R>(lay, sh, mode, *this); }
};

// Fresh random data: distinct experts and a router with O(1) logits, so that
// routing matters; weights scaled by 1/sqrt(d) to keep activations O(1).
template <class T>
LayerProblem<T> random_layer(SegmentLayout lay, FfnShape sh, RoutingMode mode, bool with_bias,
                             std::mt19937_64& rng) {
  LayerProblem<T> P;
  P.lay = lay;
  P.sh = sh;
  P.mode = mode;
  const size_t tokens = static_cast<size_t>(lay.num_tokens()), E = static_cast<size_t>(sh.experts),
               fd = static_cast<size_t>(sh.f * sh.d);
  const double scale = 1.0 / std::sqrt(static_cast<double>(sh.d));
  P.x = random_vector<T>(tokens * sh.d, rng);
  P.dy = random_vector<T>(tokens * sh.d, rng);
  P.W_r = random_vector<T>(E * sh.d, rng, -2.0, 2.0);
  P.W_g = random_vector<T>(E * fd, rng, -2 * scale, 2 * scale);
  P.W_u = random_vector<T>(E * fd, rng, -2 * scale, 2 * scale);
  P.W_d = random_vector<T>(E * fd, rng, -scale, scale);
  if (with_bias) P.bias = random_vector<float>(E, rng, -0.5, 0.5);
  P.given = random_simplex_rows(lay.num_segments(), sh.experts, rng);
  return P;
}

// The same problem converted (exactly) to other dtypes, e.g. double for the twin.
template <class U, class RU, class T, class R>
LayerProblem<U, RU> convert_layer(const LayerProblem<T, R>& P) {
  LayerProblem<U, RU> o;
  o.lay = P.lay;
  o.sh = P.sh;
  o.mode = P.mode;
  o.x = convert_vector<U>(P.x);
  o.dy = convert_vector<U>(P.dy);
  o.W_r = convert_vector<U>(P.W_r);
  o.W_g = convert_vector<U>(P.W_g);
  o.W_u = convert_vector<U>(P.W_u);
  o.W_d = convert_vector<U>(P.W_d);
  o.bias = convert_vector<RU>(P.bias);
  o.given = convert_vector<RU>(P.given);
  return o;
}

// Initial values of the weight gradients when accumulating (random, never zero).
template <class T>
struct InitialGrads {
  std::vector<T> dW_r, dW_g, dW_u, dW_d;
  std::vector<float> d_bias;
};

template <class T>
InitialGrads<T> random_initial_grads(const LayerProblem<T>& P, std::mt19937_64& rng) {
  InitialGrads<T> g;
  const size_t E = static_cast<size_t>(P.sh.experts), fd = static_cast<size_t>(P.sh.f * P.sh.d);
  g.dW_r = random_vector<T>(E * P.sh.d, rng);
  g.dW_g = random_vector<T>(E * fd, rng);
  g.dW_u = random_vector<T>(E * fd, rng);
  g.dW_d = random_vector<T>(E * fd, rng);
  g.d_bias = random_vector<float>(E, rng);
  return g;
}

// Every output of forward + backward, on the host.
template <class T, class R>
struct LayerOutputs {
  std::vector<T> y, dx, dW_r, dW_g, dW_u, dW_d;
  std::vector<R> hbar, probs, weights, d_bias, d_weights;
};

// Outputs sized for P and poisoned (an element never written stays NaN), the
// weight gradients set to *init instead when accumulating (init not null).
// Without a bias there is no d_bias (empty: a null pointer).
template <class T, class R, class PT, class PR, class G = PT>
LayerOutputs<T, R> new_outputs(const LayerProblem<PT, PR>& P, const InitialGrads<G>* init = nullptr) {
  const size_t tokens = static_cast<size_t>(P.lay.num_tokens()), E = static_cast<size_t>(P.sh.experts),
               fd = static_cast<size_t>(P.sh.f * P.sh.d), S = static_cast<size_t>(P.lay.num_segments()),
               rows = static_cast<size_t>(P.router_rows()), d = static_cast<size_t>(P.sh.d);
  LayerOutputs<T, R> o;
  o.y.resize(tokens * d);
  o.dx.resize(tokens * d);
  o.dW_r.resize(E * d);
  o.dW_g.resize(E * fd);
  o.dW_u.resize(E * fd);
  o.dW_d.resize(E * fd);
  o.hbar.resize(rows * d);
  o.probs.resize(rows * E);
  o.weights.resize(S * E);
  o.d_bias.resize(P.bias.empty() ? 0 : E);
  o.d_weights.resize(S * E);
  for (auto* v : {&o.y, &o.dx, &o.dW_r, &o.dW_g, &o.dW_u, &o.dW_d}) poison(*v);
  for (auto* v : {&o.hbar, &o.probs, &o.weights, &o.d_bias, &o.d_weights}) poison(*v);
  if (init) {
    o.dW_r = convert_vector<T>(init->dW_r);
    o.dW_g = convert_vector<T>(init->dW_g);
    o.dW_u = convert_vector<T>(init->dW_u);
    o.dW_d = convert_vector<T>(init->dW_d);
    if (!P.bias.empty()) o.d_bias = convert_vector<R>(init->d_bias);
  }
  return o;
}

// The double twin on the same inputs (converted exactly to double), forward
// then backward, accumulating onto *init when init is not null.
template <class T>
LayerOutputs<double, double> run_reference(const LayerProblem<T>& P, const InitialGrads<T>* init = nullptr) {
  const LayerProblem<double, double> D = convert_layer<double, double>(P);
  LayerOutputs<double, double> out = new_outputs<double, double>(D, init);
  const auto f = forward_args(D.params(), D.x.data(), out);
  REQUIRE(lory::reference::moe_ffn_forward(f) == Status::kSuccess);
  REQUIRE(lory::reference::moe_ffn_backward(backward_args(f.p, D.x.data(), D.dy.data(), out, init != nullptr)) ==
          Status::kSuccess);
  return out;
}

// Norm-relative error within tol, finite everywhere, every element written.
template <class A, class B>
void check_close(const char* name, const std::vector<A>& got, const std::vector<B>& ref, double tol) {
  INFO(name);
  REQUIRE(got.size() == ref.size());
  REQUIRE(count_nan(got) == 0);
  const double err = rel_error(got, ref);
  INFO("rel error " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

// ||got - ref|| <= tol ||mag||: norm-relative to the magnitudes of the terms ref sums.
template <class A>
void check_close_to_terms(const char* name, const std::vector<A>& got, const std::vector<double>& ref,
                          const std::vector<double>& mag, double tol) {
  INFO(name);
  REQUIRE(got.size() == ref.size());
  REQUIRE(mag.size() == ref.size());
  REQUIRE(count_nan(got) == 0);
  const double err = scaled_error(got.data(), ref.data(), mag.data(), static_cast<int64_t>(got.size()));
  INFO("error relative to the terms " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

// The router-path gradients dW_r and d_bias are sums over the segments of terms whose signs vary
// (softmax backward, dz = p * (dp - <p, dp>), one dp per segment), so they can cancel far below their
// terms. Their magnitudes here: the twin's router backward once per segment on that segment's row of
// d_weights alone (it is linear in d_weights), |each result| summed, plus |what the reference
// accumulated onto| (ref minus the fresh sum).
template <class T>
void router_term_magnitudes(const LayerProblem<T>& P, const LayerOutputs<double, double>& ref,
                            std::vector<double>& m_dWr, std::vector<double>& m_dbias) {
  const int64_t S = P.lay.num_segments(), E = P.sh.experts, d = P.sh.d;
  const std::vector<double> Wr = to_double_vector(P.W_r);
  std::vector<double> row(static_cast<size_t>(S * E)), dWr(static_cast<size_t>(E * d)), db(static_cast<size_t>(E));
  std::vector<double> sum_dWr(dWr.size(), 0.0), sum_db(db.size(), 0.0);
  m_dWr.assign(dWr.size(), 0.0);
  m_dbias.assign(P.bias.empty() ? 0 : db.size(), 0.0);
  lory::RouterBackwardArgs<double, double> rb;
  rb.layout = P.lay;
  rb.d = d;
  rb.experts = static_cast<int>(E);
  rb.mode = P.mode;
  rb.W_r = Wr.data();
  rb.hbar = ref.hbar.data();
  rb.probs = ref.probs.data();
  rb.d_weights = row.data();
  rb.dW_r = dWr.data();
  rb.d_bias = db.data();
  for (int64_t s = 0; s < S; ++s) {
    std::fill(row.begin(), row.end(), 0.0);
    std::copy(ref.d_weights.begin() + s * E, ref.d_weights.begin() + (s + 1) * E, row.begin() + s * E);
    REQUIRE(lory::reference::router_backward<double>(rb) == lory::Status::kSuccess);
    for (size_t i = 0; i < dWr.size(); ++i) m_dWr[i] += std::fabs(dWr[i]), sum_dWr[i] += dWr[i];
    for (size_t i = 0; i < m_dbias.size(); ++i) m_dbias[i] += std::fabs(db[i]), sum_db[i] += db[i];
  }
  for (size_t i = 0; i < m_dWr.size(); ++i) m_dWr[i] += std::fabs(ref.dW_r[i] - sum_dWr[i]);
  for (size_t i = 0; i < m_dbias.size(); ++i) m_dbias[i] += std::fabs(ref.d_bias[i] - sum_db[i]);
}

// Compares every output a mode produces. Three are sums whose terms cancel, so
// the rounding of their inputs is amplified relative to the result, hence a
// looser bound: d_weights[s, e] = <dWbar_s, W_e> over the P = 3 d f params (with
// T-precision dWbar; few entries when S * E is small, e.g. E = 1, so one small
// value moves the norm), and the router-path gradients (dW_r, d_bias) through
// softmax backward, dz = p * (dp - <p, dp>), which are also bounded relative to
// their per-segment terms (router_term_magnitudes).
template <class T, class R>
void check_against_reference(const LayerProblem<T>& P, const LayerOutputs<T, R>& got,
                             const LayerOutputs<double, double>& ref, double tol) {
  check_close("y", got.y, ref.y, tol);
  check_close("weights", got.weights, ref.weights, tol);
  check_close("dx", got.dx, ref.dx, tol);
  check_close("dW_g", got.dW_g, ref.dW_g, tol);
  check_close("dW_u", got.dW_u, ref.dW_u, tol);
  check_close("dW_d", got.dW_d, ref.dW_d, tol);
  check_close("d_weights", got.d_weights, ref.d_weights, 10 * tol);
  if (P.mode != RoutingMode::kGivenWeights) {
    check_close("hbar", got.hbar, ref.hbar, tol);
    check_close("probs", got.probs, ref.probs, tol);
    std::vector<double> m_dWr, m_dbias;
    router_term_magnitudes(P, ref, m_dWr, m_dbias);
    check_close_to_terms("dW_r", got.dW_r, ref.dW_r, m_dWr, 10 * tol);
    if (!P.bias.empty()) check_close_to_terms("d_bias", got.d_bias, ref.d_bias, m_dbias, 10 * tol);
  }
}

}  // namespace lory_test
