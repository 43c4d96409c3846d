// lory: shapes of a Lory layer, segment bookkeeping and their validation.
//
// Tokens are laid out [B, L, d] row-major. Each sequence of L tokens is cut
// into N = ceil(L / T) segments; the last one may be shorter. Segments are
// numbered s = b * N + k (k 0-based, as in docs/math.md; the paper counts from 1).
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

enum class RoutingMode : int {
  kCausalSegment = 0,  // e(k) = p(k-1); e(0) = stopgrad(p(0))        (training)
  kPromptLevel = 1,    // one decision per sequence from the mean of all L tokens
  kGivenWeights = 2,   // the caller passes e [S, E]; no router
};

LORY_HOST_DEVICE inline const char* routing_mode_name(RoutingMode m) {
  switch (m) {
    case RoutingMode::kCausalSegment: return "causal-segment";
    case RoutingMode::kPromptLevel: return "prompt-level";
    case RoutingMode::kGivenWeights: return "given-weights";
  }
  return "unknown";
}

// How B sequences of L tokens are cut into segments of T tokens.
struct SegmentLayout {
  int64_t batch = 0;       // B
  int64_t seq_len = 0;     // L
  int64_t segment_len = 0; // T

  // ceil(L / T) without forming L + T - 1 (it overflows for L or T near INT64_MAX). Both counts are 0
  // for a layout with a non-positive size, and num_segments() is 0 where B * N would overflow, so
  // they are safe to call for sizing buffers before validate().
  LORY_HOST_DEVICE int64_t segments_per_sequence() const {
    return seq_len <= 0 || segment_len <= 0 ? 0 : (seq_len - 1) / segment_len + 1;
  }
  LORY_HOST_DEVICE int64_t num_segments() const {
    const int64_t n = segments_per_sequence();
    return batch <= 0 || n == 0 || batch > INT64_MAX / n ? 0 : batch * n;
  }
  LORY_HOST_DEVICE int64_t num_tokens() const { return batch * seq_len; }
  // Segment s covers tokens [token_begin(s), token_begin(s) + length(s)) of the flattened [B*L] tokens.
  LORY_HOST_DEVICE int64_t token_begin(int64_t s) const {
    const int64_t n = segments_per_sequence();
    return (s / n) * seq_len + (s % n) * segment_len;
  }
  LORY_HOST_DEVICE int64_t length(int64_t s) const {
    const int64_t k = s % segments_per_sequence();
    const int64_t rest = seq_len - k * segment_len;
    return rest < segment_len ? rest : segment_len;
  }
  // Position of segment s inside its sequence (0-based).
  LORY_HOST_DEVICE int64_t index_in_sequence(int64_t s) const { return s % segments_per_sequence(); }
  LORY_HOST_DEVICE int64_t sequence_of(int64_t s) const { return s / segments_per_sequence(); }
  // Segment that holds flattened token t.
  LORY_HOST_DEVICE int64_t segment_of_token(int64_t t) const {
    return (t / seq_len) * segments_per_sequence() + (t % seq_len) / segment_len;
  }

  Status validate() const {
    if (batch <= 0) return detail::fail(Status::kErrorInvalidSize, "layout.batch", "not positive");
    if (seq_len <= 0) return detail::fail(Status::kErrorInvalidSize, "layout.seq_len", "not positive");
    if (segment_len <= 0) return detail::fail(Status::kErrorInvalidSize, "layout.segment_len", "not positive");
    // B * L * (any dim) must stay addressable in 64 bits; guard the product B * L here.
    if (seq_len > (INT64_MAX / batch))
      return detail::fail(Status::kErrorInvalidSize, "layout.seq_len", "B * L overflows int64");
    return Status::kSuccess;
  }
};

// Model dimensions of one Lory FFN layer.
struct FfnShape {
  int64_t d = 0;  // model dim
  int64_t f = 0;  // FFN dim
  int experts = 0;  // E

  // Parameters per expert and per matrix.
  LORY_HOST_DEVICE int64_t gate_params() const { return f * d; }   // W_g [f, d], also W_u
  LORY_HOST_DEVICE int64_t down_params() const { return d * f; }   // W_d [d, f]
  LORY_HOST_DEVICE int64_t params_per_expert() const { return 3 * d * f; }  // P

  Status validate() const {
    if (d <= 0) return detail::fail(Status::kErrorInvalidSize, "shape.d", "not positive");
    if (f <= 0) return detail::fail(Status::kErrorInvalidSize, "shape.f", "not positive");
    if (experts <= 0 || experts > kMaxExperts)
      return detail::fail(Status::kErrorUnsupportedExpertCount, "shape.experts", "outside [1, kMaxExperts]");
    if (d > INT64_MAX / 3 / f) return detail::fail(Status::kErrorInvalidSize, "shape.f", "3 d f overflows int64");
    return Status::kSuccess;
  }
};

LORY_NAMESPACE_END
