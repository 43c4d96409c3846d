// lory: the segment router -- arguments and validation shared by the CUDA
// launchers (router.cuh) and the CPU twin (reference/router.hpp).
//
// Forward (docs/math.md, "Routing"), per sequence b and segment k (0-based):
//   hbar_k = mean of the tokens of segment k (the last may be short)
//   p_k    = softmax(W_r hbar_k (+ bias))
//   kCausalSegment: weights(k) = p_{k-1} for k >= 1, weights(0) = stopgrad(p_0)
//   kPromptLevel:   one decision per sequence from the mean of all L tokens:
//                   hbar, probs are [B, .]; weights(k) = p_b for every k
//   kGivenWeights:  weights are the caller's given_weights [S, E]; no router
// Backward, given d_weights = dL/dweights [S, E]:
//   kCausalSegment: dp_k = d_weights(k+1) for k < N-1, 0 for k = N-1
//                   (segment 0's own use is stop-gradient);
//   kPromptLevel:   dp_b = sum_k d_weights(b, k);
//   then dz = p * (dp - <p, dp>), dW_r (+)= dz hbar^T, d_bias (+)= dz, and every
//   token of the averaged span gets dx_t += (1/|span|) W_r^T dz (added into dx).
//   kGivenWeights: nothing to do (the caller owns its router).
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

template <class T, class R = float>
struct RouterForwardArgs {
  SegmentLayout layout;                 // B, L, T
  int64_t d = 0;                        // model dim
  int experts = 0;                      // E
  RoutingMode mode = RoutingMode::kCausalSegment;
  const T* x = nullptr;                 // [B * L, d] tokens
  const T* W_r = nullptr;               // [E, d] router weight
  const R* bias = nullptr;              // [E] optional router bias
  const R* given_weights = nullptr;     // [S, E], kGivenWeights only
  R* hbar = nullptr;                    // out: [S, d] (causal) or [B, d] (prompt); saved for backward
  R* probs = nullptr;                   // out: [S, E] (causal) or [B, E] (prompt); saved for backward
  R* weights = nullptr;                 // out: [S, E] routing weights used by each segment
};

template <class T, class R = float>
struct RouterBackwardArgs {
  SegmentLayout layout;
  int64_t d = 0;
  int experts = 0;
  RoutingMode mode = RoutingMode::kCausalSegment;
  const T* W_r = nullptr;               // [E, d]
  const R* hbar = nullptr;              // as saved by the forward
  const R* probs = nullptr;             // as saved by the forward
  const R* d_weights = nullptr;         // [S, E] dL/dweights
  T* dW_r = nullptr;                    // out [E, d]; may be null to skip
  bool accumulate_dW_r = false;
  R* d_bias = nullptr;                  // out [E]; may be null
  bool accumulate_d_bias = false;
  T* dx = nullptr;                      // [B * L, d]: the router path is ADDED into dx; may be null
  bool deterministic = true;            // fixed-order reductions, bitwise reproducible
};

// Rows of hbar / probs for a mode: S for causal, B for prompt-level.
template <class T, class R>
int64_t router_rows(const RouterForwardArgs<T, R>& a) {
  return a.mode == RoutingMode::kPromptLevel ? a.layout.batch : a.layout.num_segments();
}

namespace detail {
// Sizes and pointers common to the router's forward and backward: B * L * d, S * E and B * E fit.
template <class Args>
Status validate_router_common(const Args& a) {
  LORY_RETURN_IF_ERROR(a.layout.validate());
  if (a.experts <= 0 || a.experts > kMaxExperts)
    return fail(Status::kErrorUnsupportedExpertCount, "experts", "outside [1, kMaxExperts]");
  if (!mul_fits(a.layout.num_segments(), a.experts))
    return fail(Status::kErrorInvalidSize, "experts", "S * E overflows int64");
  if (a.mode != RoutingMode::kCausalSegment && a.mode != RoutingMode::kPromptLevel &&
      a.mode != RoutingMode::kGivenWeights)
    return fail(Status::kErrorInvalidArgument, "mode", "not a RoutingMode");
  if (a.mode == RoutingMode::kGivenWeights) return Status::kSuccess;
  if (a.d <= 0) return fail(Status::kErrorInvalidSize, "d", "not positive");
  if (!mul_fits(a.layout.num_tokens(), a.d)) return fail(Status::kErrorInvalidSize, "d", "B * L * d overflows int64");
  return Status::kSuccess;
}
}  // namespace detail

// Aliasing: weights may be given_weights itself (kGivenWeights copies through); no other output may
// share memory with an input or another output.
template <class T, class R>
Status validate(const RouterForwardArgs<T, R>& a) {
  detail::clear_error_detail();
  LORY_RETURN_IF_ERROR(detail::validate_router_common(a));
  using detail::fail;
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  const int64_t S = a.layout.num_segments(), E = a.experts;
  if (a.mode == RoutingMode::kGivenWeights) {
    if (!a.given_weights) return fail(Status::kErrorNullPointer, "given_weights", "is null");
    LORY_RETURN_IF_ERROR(detail::check_aligned(a.given_weights, "given_weights"));
    const detail::Operand outputs[] = {{"weights", detail::array_range(a.weights, S * E), "given_weights"}};
    const detail::Operand inputs[] = {{"given_weights", detail::array_range(a.given_weights, S * E)}};
    return detail::check_aliasing(outputs, inputs);
  }
  if (!a.x) return fail(Status::kErrorNullPointer, "x", "is null");
  if (!a.W_r) return fail(Status::kErrorNullPointer, "W_r", "is null");
  if (!a.hbar) return fail(Status::kErrorNullPointer, "hbar", "is null");
  if (!a.probs) return fail(Status::kErrorNullPointer, "probs", "is null");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.x, "x"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_r, "W_r"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.bias, "bias"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.hbar, "hbar"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.probs, "probs"));
  const int64_t rows = router_rows(a), d = a.d;
  const detail::Operand outputs[] = {{"hbar", detail::array_range(a.hbar, rows * d)},
      {"probs", detail::array_range(a.probs, rows * E)},
      {"weights", detail::array_range(a.weights, S * E)}};
  const detail::Operand inputs[] = {{"x", detail::array_range(a.x, a.layout.num_tokens() * d)},
      {"W_r", detail::array_range(a.W_r, E * d)},
      {"bias", detail::array_range(a.bias, E)}};
  return detail::check_aliasing(outputs, inputs);
}

// Aliasing: no output (dW_r, d_bias, dx) may share memory with an input or another output.
template <class T, class R>
Status validate(const RouterBackwardArgs<T, R>& a) {
  detail::clear_error_detail();
  LORY_RETURN_IF_ERROR(detail::validate_router_common(a));
  using detail::fail;
  if (a.mode == RoutingMode::kGivenWeights) return Status::kSuccess;
  if (!a.W_r) return fail(Status::kErrorNullPointer, "W_r", "is null");
  if (!a.hbar) return fail(Status::kErrorNullPointer, "hbar", "is null");
  if (!a.probs) return fail(Status::kErrorNullPointer, "probs", "is null");
  if (!a.d_weights) return fail(Status::kErrorNullPointer, "d_weights", "is null");
  if (!a.dW_r && !a.d_bias && !a.dx) return fail(Status::kErrorNullPointer, "dW_r", "dW_r, d_bias and dx all null: nothing to compute");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.W_r, "W_r"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.hbar, "hbar"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.probs, "probs"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.d_weights, "d_weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW_r, "dW_r"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.d_bias, "d_bias"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dx, "dx"));
  const int64_t S = a.layout.num_segments(), E = a.experts, d = a.d;
  const int64_t rows = a.mode == RoutingMode::kPromptLevel ? a.layout.batch : S;
  const detail::Operand outputs[] = {{"dW_r", detail::array_range(a.dW_r, E * d)},
      {"d_bias", detail::array_range(a.d_bias, E)},
      {"dx", detail::array_range(a.dx, a.layout.num_tokens() * d)}};
  const detail::Operand inputs[] = {{"W_r", detail::array_range(a.W_r, E * d)},
      {"hbar", detail::array_range(a.hbar, rows * d)},
      {"probs", detail::array_range(a.probs, rows * E)},
      {"d_weights", detail::array_range(a.d_weights, S * E)}};
  return detail::check_aliasing(outputs, inputs);
}

LORY_NAMESPACE_END
