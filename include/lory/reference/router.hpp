// lory CPU twin: the segment router, forward and backward (see lory/router.hpp
// for the exact semantics of the three routing modes). Accumulates in Acc
// (double by default, float to mimic the GPU's fp32) and uses the same
// host-and-device softmax the kernels use (lory/math.hpp).
#pragma once
#include <cstdint>
#include <vector>

#include "lory/dtype.hpp"
#include "lory/math.hpp"
#include "lory/router.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {
namespace detail {

// The tokens averaged by router row r: segment r (causal) or sequence r (prompt).
struct RouterSpan {
  int64_t begin, length;
};
inline RouterSpan router_span(const SegmentLayout& lay, RoutingMode mode, int64_t r) {
  if (mode == RoutingMode::kPromptLevel) return {r * lay.seq_len, lay.seq_len};
  return {lay.token_begin(r), lay.length(r)};
}

}  // namespace detail

template <class Acc = double, class T, class R>
Status router_forward(const RouterForwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const int E = a.experts;
  const int64_t S = a.layout.num_segments();
  if (a.mode == RoutingMode::kGivenWeights) {
    // Copied through a temporary so that weights may alias given_weights.
    for (int64_t i = 0; i < S * E; ++i) {
      const R v = a.given_weights[i];
      a.weights[i] = v;
    }
    return Status::kSuccess;
  }
  const int64_t d = a.d;
  const int64_t rows = router_rows(a);
  std::vector<Acc> mean(static_cast<size_t>(d)), logits(E), p(E);
  for (int64_t r = 0; r < rows; ++r) {
    const detail::RouterSpan span = detail::router_span(a.layout, a.mode, r);
    // Mean over the tokens actually present (the last segment may be short).
    for (int64_t j = 0; j < d; ++j) mean[j] = Acc(0);
    for (int64_t t = span.begin; t < span.begin + span.length; ++t)
      for (int64_t j = 0; j < d; ++j) mean[j] += load_as<Acc>(a.x[t * d + j]);
    const Acc inv = Acc(1) / static_cast<Acc>(span.length);
    for (int64_t j = 0; j < d; ++j) {
      mean[j] *= inv;
      a.hbar[r * d + j] = static_cast<R>(mean[j]);
    }
    for (int e = 0; e < E; ++e) {
      Acc z = a.bias ? static_cast<Acc>(a.bias[e]) : Acc(0);
      for (int64_t j = 0; j < d; ++j) z += load_as<Acc>(a.W_r[e * d + j]) * mean[j];
      logits[e] = z;
    }
    LORY_NS_QUALIFIER::softmax(logits.data(), p.data(), E);
    for (int e = 0; e < E; ++e) a.probs[r * E + e] = static_cast<R>(p[e]);
  }
  // Routing weights per segment.
  const int64_t N = a.layout.segments_per_sequence();
  for (int64_t s = 0; s < S; ++s) {
    int64_t src;  // router row whose probabilities segment s uses
    if (a.mode == RoutingMode::kPromptLevel) src = a.layout.sequence_of(s);
    else src = (s % N == 0) ? s : s - 1;  // segment 0 uses its own (stop-gradient) decision
    for (int e = 0; e < E; ++e) a.weights[s * E + e] = a.probs[src * E + e];
  }
  return Status::kSuccess;
}

template <class Acc = double, class T, class R>
Status router_backward(const RouterBackwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  if (a.mode == RoutingMode::kGivenWeights) return Status::kSuccess;  // the caller owns its router
  const int E = a.experts;
  const int64_t d = a.d;
  const int64_t N = a.layout.segments_per_sequence();
  const int64_t rows = a.mode == RoutingMode::kPromptLevel ? a.layout.batch : a.layout.num_segments();

  // dz = softmax_backward(p, dp) per router row.
  std::vector<Acc> dz(static_cast<size_t>(rows) * E), p(E), dp(E);
  for (int64_t r = 0; r < rows; ++r) {
    for (int e = 0; e < E; ++e) {
      p[e] = static_cast<Acc>(a.probs[r * E + e]);
      dp[e] = Acc(0);
    }
    if (a.mode == RoutingMode::kPromptLevel) {
      // p_b is used by every segment of sequence b.
      for (int64_t k = 0; k < N; ++k)
        for (int e = 0; e < E; ++e) dp[e] += static_cast<Acc>(a.d_weights[(r * N + k) * E + e]);
    } else if (r % N != N - 1) {
      // p_k feeds segment k+1 only; the last segment's p feeds nothing and
      // segment 0's own use is stop-gradient.
      for (int e = 0; e < E; ++e) dp[e] = static_cast<Acc>(a.d_weights[(r + 1) * E + e]);
    }
    // The cancellation-free form (dp shifted by the most probable expert's), as the GPU's; equal
    // dp (identical experts, docs/math.md) give dz = 0 exactly.
    LORY_NS_QUALIFIER::softmax_backward(p.data(), dp.data(), dz.data() + r * E, E);
  }

  if (a.dW_r) {
    for (int e = 0; e < E; ++e)
      for (int64_t j = 0; j < d; ++j) {
        T& out = a.dW_r[e * d + j];
        Acc acc = a.accumulate_dW_r ? load_as<Acc>(out) : Acc(0);
        for (int64_t r = 0; r < rows; ++r) acc += dz[r * E + e] * static_cast<Acc>(a.hbar[r * d + j]);
        out = store_as<T>(acc);
      }
  }
  if (a.d_bias) {
    for (int e = 0; e < E; ++e) {
      Acc acc = a.accumulate_d_bias ? static_cast<Acc>(a.d_bias[e]) : Acc(0);
      for (int64_t r = 0; r < rows; ++r) acc += dz[r * E + e];
      a.d_bias[e] = static_cast<R>(acc);
    }
  }
  if (a.dx) {
    std::vector<Acc> g(static_cast<size_t>(d));
    for (int64_t r = 0; r < rows; ++r) {
      const detail::RouterSpan span = detail::router_span(a.layout, a.mode, r);
      // g = (1/|span|) W_r^T dz_r, added into every token of the span.
      const Acc inv = Acc(1) / static_cast<Acc>(span.length);
      for (int64_t j = 0; j < d; ++j) {
        Acc acc = Acc(0);
        for (int e = 0; e < E; ++e) acc += load_as<Acc>(a.W_r[e * d + j]) * dz[r * E + e];
        g[j] = acc * inv;
      }
      for (int64_t t = span.begin; t < span.begin + span.length; ++t)
        for (int64_t j = 0; j < d; ++j) {
          T& out = a.dx[t * d + j];
          out = store_as<T>(load_as<Acc>(out) + g[j]);
        }
    }
  }
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
