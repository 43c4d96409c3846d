// lory PyTorch extension: argument checks and helpers shared by the CPU ops
// (lory_torch_ops.cpp) and the CUDA ops (lory_torch_cuda.cu).
//
// Tensor layouts seen from Python (row-major, contiguous after the checks):
//   x, y, dx [B, L, d]; W_r [E, d]; W_g, W_u [E, f, d]; W_d [E, d, f];
//   weights, given_weights, d_weights [B, N, E] (N = ceil(L / T));
//   hbar [rows, d], probs [rows, E] with rows = B*N (causal), B (prompt), 0 (given).
// Routing tensors are float64 for float64 storage and float32 otherwise.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "lory/moe_ffn.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"

namespace lory_torch {

inline lory::RoutingMode parse_mode(const std::string& mode) {
  if (mode == "causal") return lory::RoutingMode::kCausalSegment;
  if (mode == "prompt") return lory::RoutingMode::kPromptLevel;
  if (mode == "given") return lory::RoutingMode::kGivenWeights;
  TORCH_CHECK(false, "lory: routing mode must be \"causal\", \"prompt\" or \"given\", got \"", mode, "\"");
}

inline void check_status(lory::Status s, const char* what) {
  TORCH_CHECK(s == lory::Status::kSuccess, "lory: ", what, " failed: ", lory::status_string(s));
}

inline at::ScalarType routing_dtype(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// LORY_TORCH_POISON=1 fills every output with NaN before the library writes
// it, so that the tests can see an element the library never wrote.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("LORY_TORCH_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(sizes, opt);
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Shapes of one layer call, checked against every tensor.
struct LayerCall {
  lory::SegmentLayout layout;
  lory::FfnShape shape;
  lory::RoutingMode mode = lory::RoutingMode::kCausalSegment;
  int64_t B = 0, L = 0, d = 0, f = 0, N = 0;
  int E = 0;
  at::ScalarType storage = at::kFloat;
  at::ScalarType routing = at::kFloat;
  int64_t router_rows() const {
    if (mode == lory::RoutingMode::kCausalSegment) return B * N;
    if (mode == lory::RoutingMode::kPromptLevel) return B;
    return 0;
  }
};

inline void check_same(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "lory: ", name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.scalar_type() == dtype, "lory: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "lory: ", name, " has shape ", t.sizes(), ", expected ", want);
}

inline LayerCall check_layer(const at::Tensor& x, const std::optional<at::Tensor>& W_r, const at::Tensor& W_g,
                             const at::Tensor& W_u, const at::Tensor& W_d,
                             const std::optional<at::Tensor>& given_weights, const std::string& mode,
                             int64_t segment_len) {
  LayerCall c;
  c.mode = parse_mode(mode);
  TORCH_CHECK(x.dim() == 3, "lory: x must be [B, L, d], got ", x.sizes());
  TORCH_CHECK(W_g.dim() == 3, "lory: W_g must be [E, f, d], got ", W_g.sizes());
  TORCH_CHECK(segment_len > 0, "lory: segment_len must be positive, got ", segment_len);
  c.B = x.size(0);
  c.L = x.size(1);
  c.d = x.size(2);
  c.f = W_g.size(1);
  TORCH_CHECK(W_g.size(0) >= 1 && W_g.size(0) <= lory::kMaxExperts, "lory: the expert count must be in [1, ",
              lory::kMaxExperts, "], got ", W_g.size(0));
  c.E = static_cast<int>(W_g.size(0));
  TORCH_CHECK(c.B > 0 && c.L > 0 && c.d > 0 && c.f > 0, "lory: empty tensors are not supported");
  c.storage = x.scalar_type();
  c.routing = routing_dtype(c.storage);
  c.N = (c.L + segment_len - 1) / segment_len;
  c.layout = lory::SegmentLayout{c.B, c.L, segment_len};
  c.shape = lory::FfnShape{c.d, c.f, c.E};

  check_same(W_g, x, c.storage, "W_g");
  check_same(W_u, x, c.storage, "W_u");
  check_same(W_d, x, c.storage, "W_d");
  check_shape(W_g, {c.E, c.f, c.d}, "W_g");
  check_shape(W_u, {c.E, c.f, c.d}, "W_u");
  check_shape(W_d, {c.E, c.d, c.f}, "W_d");
  if (c.mode == lory::RoutingMode::kGivenWeights) {
    TORCH_CHECK(given_weights.has_value(), "lory: routing mode \"given\" needs given_weights [B, N, E]");
    check_same(*given_weights, x, c.routing, "given_weights");
    check_shape(*given_weights, {c.B, c.N, c.E}, "given_weights");
  } else {
    TORCH_CHECK(W_r.has_value(), "lory: routing mode \"", mode, "\" needs the router weight W_r [E, d]");
    check_same(*W_r, x, c.storage, "W_r");
    check_shape(*W_r, {c.E, c.d}, "W_r");
  }
  return c;
}

// The saved routing tensors of a forward, checked when they come back.
inline void check_saved(const LayerCall& c, const at::Tensor& x, const at::Tensor& hbar, const at::Tensor& probs,
                        const at::Tensor& weights) {
  check_same(weights, x, c.routing, "weights");
  check_shape(weights, {c.B, c.N, c.E}, "weights");
  if (c.mode != lory::RoutingMode::kGivenWeights) {
    check_same(hbar, x, c.routing, "hbar");
    check_same(probs, x, c.routing, "probs");
    check_shape(hbar, {c.router_rows(), c.d}, "hbar");
    check_shape(probs, {c.router_rows(), c.E}, "probs");
  }
}

inline lory::MoeFfnOptions plan_options(int64_t max_chunk_segments, int64_t workspace_budget_bytes) {
  TORCH_CHECK(max_chunk_segments >= 0 && workspace_budget_bytes >= 0,
              "lory: max_chunk_segments and workspace_budget_bytes must be >= 0");
  lory::MoeFfnOptions o;
  o.max_chunk_segments = max_chunk_segments;
  o.workspace_budget_bytes = static_cast<size_t>(workspace_budget_bytes);
  return o;
}

// Shapes of the inference ops.
inline void check_prompt_route(const at::Tensor& x, const at::Tensor& W_r) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0,
              "lory: prompt_route needs x [B, L, d], got ", x.sizes());
  TORCH_CHECK(W_r.dim() == 2 && W_r.size(1) == x.size(2) && W_r.size(0) >= 1 && W_r.size(0) <= lory::kMaxExperts,
              "lory: prompt_route needs W_r [E, d] with d = ", x.size(2), " and 1 <= E <= ", lory::kMaxExperts,
              ", got ", W_r.sizes());
  check_same(W_r, x, x.scalar_type(), "W_r");
}

inline void check_merge_experts(const at::Tensor& W_g, const at::Tensor& W_u, const at::Tensor& W_d,
                                const at::Tensor& weights) {
  TORCH_CHECK(W_g.dim() == 3 && W_g.numel() > 0, "lory: W_g must be [E, f, d], got ", W_g.sizes());
  const int64_t E = W_g.size(0), f = W_g.size(1), d = W_g.size(2);
  TORCH_CHECK(E <= lory::kMaxExperts, "lory: at most ", lory::kMaxExperts, " experts");
  check_same(W_u, W_g, W_g.scalar_type(), "W_u");
  check_same(W_d, W_g, W_g.scalar_type(), "W_d");
  check_shape(W_u, {E, f, d}, "W_u");
  check_shape(W_d, {E, d, f}, "W_d");
  check_same(weights, W_g, routing_dtype(W_g.scalar_type()), "weights");
  TORCH_CHECK(weights.dim() == 2 && weights.size(1) == E && weights.size(0) > 0,
              "lory: merge_experts needs weights [B, E] with E = ", E, ", got ", weights.sizes());
}

}  // namespace lory_torch
