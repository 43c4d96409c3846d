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
// Sizes a layer of these shapes needs addressable: every [tokens, max(d, f)] activation, the
// [E, 3 d f] experts, the [S, 3 d f] merged weights and the [S, E] routing weights.
inline Status validate_moe_sizes(const SegmentLayout& lay, const FfnShape& sh) {
  const int64_t wide = sh.d > sh.f ? sh.d : sh.f;
  if (!mul_fits(lay.num_tokens(), wide))
    return fail(Status::kErrorInvalidSize, "shape", "B * L * max(d, f) overflows int64");
  if (!mul_fits(sh.experts, sh.params_per_expert()))
    return fail(Status::kErrorInvalidSize, "shape", "E * 3 d f overflows int64");
  if (!mul_fits(lay.num_segments(), sh.params_per_expert()))
    return fail(Status::kErrorInvalidSize, "layout", "S * 3 d f overflows int64");
  if (!mul_fits(lay.num_segments(), sh.experts))
    return fail(Status::kErrorInvalidSize, "layout", "S * E overflows int64");
  return Status::kSuccess;
}

// Checks common to the forward and the backward: shapes, sizes, the experts.
template <class T, class R>
Status validate_moe_params(const MoeFfnParams<T, R>& p) {
  LORY_RETURN_IF_ERROR(p.layout.validate());
  LORY_RETURN_IF_ERROR(p.shape.validate());
  switch (p.mode) {
    case RoutingMode::kGivenWeights:
      if (!p.given_weights) return fail(Status::kErrorNullPointer, "p.given_weights", "is null");
      break;
    case RoutingMode::kCausalSegment:
    case RoutingMode::kPromptLevel:
      if (!p.W_r) return fail(Status::kErrorNullPointer, "p.W_r", "is null");
      break;
    default:
      return fail(Status::kErrorInvalidArgument, "p.mode", "not a RoutingMode");
  }
  if (!p.W_g) return fail(Status::kErrorNullPointer, "p.W_g", "is null");
  if (!p.W_u) return fail(Status::kErrorNullPointer, "p.W_u", "is null");
  if (!p.W_d) return fail(Status::kErrorNullPointer, "p.W_d", "is null");
  LORY_RETURN_IF_ERROR(validate_moe_sizes(p.layout, p.shape));
  LORY_RETURN_IF_ERROR(check_aligned(p.W_r, "p.W_r"));
  LORY_RETURN_IF_ERROR(check_aligned(p.bias, "p.bias"));
  LORY_RETURN_IF_ERROR(check_aligned(p.given_weights, "p.given_weights"));
  LORY_RETURN_IF_ERROR(check_aligned(p.W_g, "p.W_g"));
  LORY_RETURN_IF_ERROR(check_aligned(p.W_u, "p.W_u"));
  return check_aligned(p.W_d, "p.W_d");
}

// The layer's read-only operands, for the aliasing checks (mode-dependent ones are empty when unused).
template <class T, class R>
struct MoeRanges {
  ByteRange W_r, bias, given, W_g, W_u, W_d, tokens_x, rows_d, rows_e, segs_e;
  MoeRanges(const MoeFfnParams<T, R>& p, const T* x, const R* hbar, const R* probs, const R* weights) {
    const int64_t E = p.shape.experts, d = p.shape.d, fd = p.shape.f * d, S = p.layout.num_segments();
    const bool routed = p.mode != RoutingMode::kGivenWeights;
    const int64_t rows = p.mode == RoutingMode::kPromptLevel ? p.layout.batch : S;
    W_r = routed ? array_range(p.W_r, E * d) : ByteRange{};
    bias = routed ? array_range(p.bias, E) : ByteRange{};
    given = routed ? ByteRange{} : array_range(p.given_weights, S * E);
    W_g = array_range(p.W_g, E * fd);
    W_u = array_range(p.W_u, E * fd);
    W_d = array_range(p.W_d, E * fd);
    tokens_x = array_range(x, p.layout.num_tokens() * d);
    rows_d = routed ? array_range(hbar, rows * d) : ByteRange{};
    rows_e = routed ? array_range(probs, rows * E) : ByteRange{};
    segs_e = array_range(weights, S * E);
  }
};
}  // namespace detail

// Aliasing: y may be x itself (in place: each chunk's tokens are read before its y is written);
// weights may be p.given_weights itself (kGivenWeights). Nothing else may share memory.
template <class T, class R>
Status validate(const MoeFfnForwardArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_moe_params(a.p));
  if (!a.x) return fail(Status::kErrorNullPointer, "x", "is null");
  if (!a.y) return fail(Status::kErrorNullPointer, "y", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (a.p.mode != RoutingMode::kGivenWeights) {
    if (!a.hbar) return fail(Status::kErrorNullPointer, "hbar", "is null");
    if (!a.probs) return fail(Status::kErrorNullPointer, "probs", "is null");
  }
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.x, "x"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.y, "y"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.hbar, "hbar"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.probs, "probs"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  const detail::MoeRanges<T, R> r(a.p, a.x, a.hbar, a.probs, a.weights);
  const detail::Operand outputs[] = {{"y", detail::array_range(a.y, a.p.layout.num_tokens() * a.p.shape.d), "x"},
      {"hbar", r.rows_d},
      {"probs", r.rows_e},
      {"weights", r.segs_e, "p.given_weights"}};
  const detail::Operand inputs[] = {{"x", r.tokens_x}, {"p.W_r", r.W_r}, {"p.bias", r.bias},
      {"p.given_weights", r.given}, {"p.W_g", r.W_g}, {"p.W_u", r.W_u}, {"p.W_d", r.W_d}};
  return detail::check_aliasing(outputs, inputs);
}

// Aliasing: dx may be dy itself (in place: each chunk's dy is read before its dx is written).
// Nothing else may share memory: in particular dx may not be x (the weight gradients read x after
// dx is written).
template <class T, class R>
Status validate(const MoeFfnBackwardArgs<T, R>& a) {
  detail::clear_error_detail();
  using detail::fail;
  LORY_RETURN_IF_ERROR(detail::validate_moe_params(a.p));
  if (!a.x) return fail(Status::kErrorNullPointer, "x", "is null");
  if (!a.dy) return fail(Status::kErrorNullPointer, "dy", "is null");
  if (!a.weights) return fail(Status::kErrorNullPointer, "weights", "is null");
  if (!a.dx) return fail(Status::kErrorNullPointer, "dx", "is null");
  if (!a.dW_g) return fail(Status::kErrorNullPointer, "dW_g", "is null");
  if (!a.dW_u) return fail(Status::kErrorNullPointer, "dW_u", "is null");
  if (!a.dW_d) return fail(Status::kErrorNullPointer, "dW_d", "is null");
  if (a.p.mode != RoutingMode::kGivenWeights) {
    if (!a.hbar) return fail(Status::kErrorNullPointer, "hbar", "is null");
    if (!a.probs) return fail(Status::kErrorNullPointer, "probs", "is null");
    if (!a.dW_r) return fail(Status::kErrorNullPointer, "dW_r", "is null");
  }
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.x, "x"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dy, "dy"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.hbar, "hbar"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.probs, "probs"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.weights, "weights"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dx, "dx"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW_r, "dW_r"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.d_bias, "d_bias"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW_g, "dW_g"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW_u, "dW_u"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dW_d, "dW_d"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.d_weights, "d_weights"));
  const detail::MoeRanges<T, R> r(a.p, a.x, a.hbar, a.probs, a.weights);
  const int64_t E = a.p.shape.experts, d = a.p.shape.d, fd = a.p.shape.f * d;
  const bool routed = a.p.mode != RoutingMode::kGivenWeights;
  const detail::Operand outputs[] = {{"dx", detail::array_range(a.dx, a.p.layout.num_tokens() * d), "dy"},
      {"dW_r", routed ? detail::array_range(a.dW_r, E * d) : detail::ByteRange{}},
      {"d_bias", routed ? detail::array_range(a.d_bias, E) : detail::ByteRange{}},
      {"dW_g", detail::array_range(a.dW_g, E * fd)},
      {"dW_u", detail::array_range(a.dW_u, E * fd)},
      {"dW_d", detail::array_range(a.dW_d, E * fd)},
      {"d_weights", detail::array_range(a.d_weights, a.p.layout.num_segments() * E)}};
  const detail::Operand inputs[] = {{"x", r.tokens_x}, {"dy", detail::array_range(a.dy, a.p.layout.num_tokens() * d)},
      {"hbar", r.rows_d}, {"probs", r.rows_e}, {"weights", r.segs_e},
      {"p.W_r", r.W_r}, {"p.bias", r.bias}, {"p.given_weights", r.given},
      {"p.W_g", r.W_g}, {"p.W_u", r.W_u}, {"p.W_d", r.W_d}};
  return detail::check_aliasing(outputs, inputs);
}

LORY_NAMESPACE_END
