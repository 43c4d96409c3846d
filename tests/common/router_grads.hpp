// The router's forward then backward through the CPU twin at precision A (float: what the GPU
// computes; double: the reference), for the tests of sharp and infinite routing.
#pragma once
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/reference/router.hpp"

namespace lory_test {

template <class A>
struct RouterGrads {
  std::vector<A> probs, dW_r, d_bias;
};

// Causal routing with a bias; x [B*L, d], W [E, d], bias [E], d_weights [S, E] (converted to A).
template <class A>
RouterGrads<A> router_grads_twin(const lory::SegmentLayout& layout, int64_t d, int E, const std::vector<float>& x,
                                 const std::vector<float>& W, const std::vector<float>& bias,
                                 const std::vector<float>& d_weights) {
  const int64_t S = layout.num_segments();
  const auto xa = convert_vector<A>(x), Wa = convert_vector<A>(W), ba = convert_vector<A>(bias),
             dwa = convert_vector<A>(d_weights);
  RouterGrads<A> g;
  std::vector<A> hbar(S * d), weights(S * E);
  g.probs.resize(S * E);
  lory::RouterForwardArgs<A, A> f;
  f.layout = layout; f.d = d; f.experts = E;
  f.x = xa.data(); f.W_r = Wa.data(); f.bias = ba.data();
  f.hbar = hbar.data(); f.probs = g.probs.data(); f.weights = weights.data();
  REQUIRE(lory::reference::router_forward<A>(f) == lory::Status::kSuccess);
  g.dW_r.resize(E * d);
  g.d_bias.resize(E);
  lory::RouterBackwardArgs<A, A> b;
  b.layout = layout; b.d = d; b.experts = E;
  b.W_r = Wa.data(); b.hbar = hbar.data(); b.probs = g.probs.data(); b.d_weights = dwa.data();
  b.dW_r = g.dW_r.data(); b.d_bias = g.d_bias.data();
  REQUIRE(lory::reference::router_backward<A>(b) == lory::Status::kSuccess);
  return g;
}

// A router whose most probable expert (`dominant`) has 1 - p of about `gap` in every row: positive
// tokens and d_weights signed by expert (the dominant one's negative), so that the sums over rows
// and tokens do not cancel and any error seen is the softmax backward's own.
struct SharpRouterProblem {
  std::vector<float> x, W, bias, d_weights;
};
inline SharpRouterProblem sharp_router_problem(const lory::SegmentLayout& layout, int64_t d, int E, int dominant,
                                               double gap, std::mt19937_64& rng) {
  const int64_t S = layout.num_segments();
  SharpRouterProblem p;
  p.x = random_vector<float>(layout.num_tokens() * d, rng, 0.5, 1);
  p.W = random_vector<float>(E * d, rng, -0.1, 0.1);
  p.bias.assign(E, 0.f);
  p.bias[dominant] = static_cast<float>(std::log((E - 1) / gap));
  p.d_weights = random_vector<float>(S * E, rng, 0.5, 1);
  for (int64_t s = 0; s < S; ++s) p.d_weights[s * E + dominant] *= -1.f;
  return p;
}

}  // namespace lory_test
