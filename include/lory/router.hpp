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

template <class T, class R>
Status validate(const RouterForwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(a.layout.validate());
  if (a.experts <= 0 || a.experts > kMaxExperts) return Status::kErrorUnsupportedExpertCount;
  if (!a.weights) return Status::kErrorNullPointer;
  switch (a.mode) {
    case RoutingMode::kGivenWeights:
      if (!a.given_weights) return Status::kErrorNullPointer;
      return Status::kSuccess;
    case RoutingMode::kCausalSegment:
    case RoutingMode::kPromptLevel:
      if (a.d <= 0) return Status::kErrorInvalidSize;
      if (!a.x || !a.W_r || !a.hbar || !a.probs) return Status::kErrorNullPointer;
      if (!detail::mul_fits(a.layout.num_tokens(), a.d)) return Status::kErrorInvalidSize;
      return Status::kSuccess;
  }
  return Status::kErrorInvalidArgument;
}

template <class T, class R>
Status validate(const RouterBackwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(a.layout.validate());
  if (a.experts <= 0 || a.experts > kMaxExperts) return Status::kErrorUnsupportedExpertCount;
  switch (a.mode) {
    case RoutingMode::kGivenWeights:
      return Status::kSuccess;
    case RoutingMode::kCausalSegment:
    case RoutingMode::kPromptLevel:
      if (a.d <= 0) return Status::kErrorInvalidSize;
      if (!a.W_r || !a.hbar || !a.probs || !a.d_weights) return Status::kErrorNullPointer;
      if (!a.dW_r && !a.d_bias && !a.dx) return Status::kErrorNullPointer;  // nothing to compute
      if (!detail::mul_fits(a.layout.num_tokens(), a.d)) return Status::kErrorInvalidSize;
      return Status::kSuccess;
  }
  return Status::kErrorInvalidArgument;
}

LORY_NAMESPACE_END
