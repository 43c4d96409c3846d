// lory: the whole segment-level SwiGLU MoE FFN layer (docs/math.md) -- arguments and
// validation, the contract shared by the CPU twin (reference/moe_ffn.hpp) and
// the GPU plan.
//
// Forward:  router (weights e [S, E] per segment, lory/router.hpp), merge of the
//           E experts per segment, then per token t of segment s
//             y_t = Wbar_d(s) (silu(Wbar_g(s) x_t) * (Wbar_u(s) x_t)).
// Backward: dL/dy -> dx (overwritten; router path included), weight gradients
//           (overwritten, or added when accumulate), optional dL/de.
// Layouts (row-major): x, y, dx [B*L, d]; W_r [E, d]; W_g, W_u [E, f, d];
// W_d [E, d, f]; hbar, probs, weights as the router's (router_rows() rows).
// T = storage dtype, R = routing dtype (float on the GPU).
#pragma once
#include <cstddef>  // size_t, used by lory/detail/validate.hpp
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

template <class T, class R = float>
struct MoeFfnParams {  // the layer's parameters and shapes
  SegmentLayout layout;
  FfnShape shape;
  RoutingMode mode = RoutingMode::kCausalSegment;
  const T* W_r = nullptr;            // [E, d]; unused for kGivenWeights
  const R* bias = nullptr;           // [E] router bias; nullable
  const R* given_weights = nullptr;  // [S, E], kGivenWeights only
  const T* W_g = nullptr;            // [E, f, d]
  const T* W_u = nullptr;            // [E, f, d]
  const T* W_d = nullptr;            // [E, d, f]
};

template <class T, class R = float>
struct MoeFfnForwardArgs {
  MoeFfnParams<T, R> p;
  const T* x = nullptr;  // [B*L, d]
  T* y = nullptr;        // [B*L, d]
  // Saved for the backward, sizes as the router's (hbar [rows, d], probs
  // [rows, E], rows = S causal / B prompt-level; unused for kGivenWeights).
  R* hbar = nullptr;
  R* probs = nullptr;
  R* weights = nullptr;  // [S, E] routing weights used by each segment
};

template <class T, class R = float>
struct MoeFfnBackwardArgs {
  MoeFfnParams<T, R> p;
  const T* x = nullptr;
  const T* dy = nullptr;  // dL/dy [B*L, d]
  const R* hbar = nullptr;     // from the forward
  const R* probs = nullptr;    // from the forward
  const R* weights = nullptr;  // from the forward
  T* dx = nullptr;        // [B*L, d], always overwritten
  T* dW_r = nullptr;      // [E, d]; unused for kGivenWeights
  R* d_bias = nullptr;    // [E]; nullable (skipped); unused for kGivenWeights
  T* dW_g = nullptr;      // [E, f, d]
  T* dW_u = nullptr;      // [E, f, d]
  T* dW_d = nullptr;      // [E, d, f]
  bool accumulate = false;  // weight grads (dW_*, d_bias) += instead of = ; dx is always overwritten
  R* d_weights = nullptr;   // [S, E] dL/de; nullable; useful for kGivenWeights callers
};

namespace detail {
// Checks common to the forward and the backward: shapes, sizes, the experts.
template <class T, class R>
Status validate_moe_params(const MoeFfnParams<T, R>& p) {
  LORY_RETURN_IF_ERROR(p.layout.validate());
  LORY_RETURN_IF_ERROR(p.shape.validate());
  switch (p.mode) {
    case RoutingMode::kGivenWeights:
      if (!p.given_weights) return Status::kErrorNullPointer;
      break;
    case RoutingMode::kCausalSegment:
    case RoutingMode::kPromptLevel:
      if (!p.W_r) return Status::kErrorNullPointer;
      break;
    default:
      return Status::kErrorInvalidArgument;
  }
  if (!p.W_g || !p.W_u || !p.W_d) return Status::kErrorNullPointer;
  // Every [tokens, max(d, f)] activation and the [E, 3 d f] experts must be addressable.
  const int64_t wide = p.shape.d > p.shape.f ? p.shape.d : p.shape.f;
  if (!mul_fits(p.layout.num_tokens(), wide)) return Status::kErrorInvalidSize;
  if (!mul_fits(p.shape.experts, p.shape.params_per_expert())) return Status::kErrorInvalidSize;
  if (!mul_fits(p.layout.num_segments(), p.shape.params_per_expert())) return Status::kErrorInvalidSize;
  return Status::kSuccess;
}
}  // namespace detail

template <class T, class R>
Status validate(const MoeFfnForwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(detail::validate_moe_params(a.p));
  if (!a.x || !a.y || !a.weights) return Status::kErrorNullPointer;
  if (a.p.mode != RoutingMode::kGivenWeights && (!a.hbar || !a.probs)) return Status::kErrorNullPointer;
  return Status::kSuccess;
}

template <class T, class R>
Status validate(const MoeFfnBackwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(detail::validate_moe_params(a.p));
  if (!a.x || !a.dy || !a.weights || !a.dx) return Status::kErrorNullPointer;
  if (!a.dW_g || !a.dW_u || !a.dW_d) return Status::kErrorNullPointer;
  if (a.p.mode != RoutingMode::kGivenWeights && (!a.hbar || !a.probs || !a.dW_r))
    return Status::kErrorNullPointer;
  return Status::kSuccess;
}

LORY_NAMESPACE_END
