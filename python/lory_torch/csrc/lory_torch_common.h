// lory PyTorch extension: argument checks, output allocation and the filling of
// the library's argument structs, shared by the CPU ops (lory_torch_ops.cpp)
// and the CUDA ops (lory_torch_cuda.cu), which differ only in what they run.
//
// Tensor layouts seen from Python (row-major, contiguous after the checks):
//   x, y, dx [B, L, d]; W_r [E, d]; W_g, W_u [E, f, d]; W_d [E, d, f];
//   weights, given_weights, d_weights [B, N, E] (N = ceil(L / T));
//   hbar [rows, d], probs [rows, E] with rows = B*N (causal), B (prompt), 0 (given).
// Routing tensors are float64 for float64 storage and float32 otherwise.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "lory/merge.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"

namespace lory_torch {

inline lory::RoutingMode parse_mode(const std::string& mode) {
  if (mode == "causal") return lory::RoutingMode::kCausalSegment;
  if (mode == "prompt") return lory::RoutingMode::kPromptLevel;
  if (mode == "given") return lory::RoutingMode::kGivenWeights;
  TORCH_CHECK(false, "lory: routing mode must be \"causal\", \"prompt\" or \"given\", got \"", mode, "\"");
}

template <class... What>
void check_status(lory::Status s, const What&... what) {
  TORCH_CHECK(s == lory::Status::kSuccess, "lory: ", what..., " failed: ", lory::status_string(s));
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

// t must sit on ref's device with the given dtype; ref_name names what set the expectation.
inline void check_same(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype, const char* name,
                       const char* ref_name = "x") {
  TORCH_CHECK(t.device() == ref.device(), "lory: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), " (every tensor of a call on one device)");
  TORCH_CHECK(t.scalar_type() == dtype, "lory: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype,
              " (from the dtype of ", ref_name, ")");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "lory: ", name, " has shape ", t.sizes(), ", expected ", want);
}

// The layer's sizes and storage dtype come from the expert weights (W_g [E, f, d]) and the
// token counts from x, so each mismatch is reported against the argument at fault: a wrong
// dtype or last dimension of x is x's problem, not the weights'.
inline LayerCall check_layer(const at::Tensor& x, const std::optional<at::Tensor>& W_r, const at::Tensor& W_g,
                             const at::Tensor& W_u, const at::Tensor& W_d,
                             const std::optional<at::Tensor>& given_weights, const std::string& mode,
                             int64_t segment_len) {
  LayerCall c;
  c.mode = parse_mode(mode);
  TORCH_CHECK(W_g.dim() == 3, "lory: W_g must be [E, f, d], got ", W_g.sizes());
  TORCH_CHECK(segment_len > 0, "lory: segment_len must be positive, got ", segment_len);
  TORCH_CHECK(W_g.size(0) >= 1 && W_g.size(0) <= lory::kMaxExperts, "lory: the expert count (W_g.size(0)) must be in [1, ",
              lory::kMaxExperts, "], got ", W_g.size(0));
  TORCH_CHECK(W_g.size(1) > 0 && W_g.size(2) > 0, "lory: W_g must be [E, f, d] with f, d > 0, got ", W_g.sizes());
  c.E = static_cast<int>(W_g.size(0));
  c.f = W_g.size(1);
  c.d = W_g.size(2);
  c.storage = W_g.scalar_type();
  c.routing = routing_dtype(c.storage);
  check_same(x, W_g, c.storage, "x", "W_g");
  TORCH_CHECK(x.dim() == 3 && x.size(2) == c.d, "lory: x must be [B, L, d] with d = ", c.d,
              " (d_model, the last dimension of W_g [E, f, d]), got ", x.sizes());
  c.B = x.size(0);
  c.L = x.size(1);
  TORCH_CHECK(c.B > 0 && c.L > 0, "lory: x must have B, L > 0 (empty tensors are not supported), got ", x.sizes());
  c.N = (c.L + segment_len - 1) / segment_len;
  c.layout = lory::SegmentLayout{c.B, c.L, segment_len};
  c.shape = lory::FfnShape{c.d, c.f, c.E};

  check_same(W_u, x, c.storage, "W_u");
  check_same(W_d, x, c.storage, "W_d");
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

// merge_backward: "auto", "fused" or "gemm" (lory::MergeBackwardMethod; the CPU ops ignore it).
inline lory::MoeFfnOptions plan_options(int64_t max_chunk_segments, int64_t workspace_budget_bytes,
                                        const std::string& merge_backward) {
  TORCH_CHECK(max_chunk_segments >= 0 && workspace_budget_bytes >= 0,
              "lory: max_chunk_segments and workspace_budget_bytes must be >= 0");
  lory::MoeFfnOptions o;
  o.max_chunk_segments = max_chunk_segments;
  o.workspace_budget_bytes = static_cast<size_t>(workspace_budget_bytes);
  bool known = false;
  for (auto m : {lory::MergeBackwardMethod::kAuto, lory::MergeBackwardMethod::kFused, lory::MergeBackwardMethod::kGemm})
    if (merge_backward == lory::merge_backward_method_name(m)) {
      o.merge_backward = m;
      known = true;
    }
  TORCH_CHECK(known, "lory: merge_backward must be \"auto\", \"fused\" or \"gemm\", got \"", merge_backward, "\"");
  return o;
}

// Data of a tensor as the library's element type P (ATen's and the library's
// types have the same bits: at::Half / __half, at::BFloat16 / __nv_bfloat16),
// null for an undefined or empty tensor. The dtype was checked with the shapes.
template <class P>
P* data_or_null(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_INTERNAL_ASSERT(t.element_size() == static_cast<int64_t>(sizeof(P)), "lory: element size mismatch");
  return static_cast<P*>(t.data_ptr());
}

// A byte workspace on the device of `like` (never empty, so never a null pointer).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// The layer's tensors, contiguous; those the routing mode does not use stay
// undefined (null pointers for the library).
struct LayerTensors {
  at::Tensor x, W_r, W_g, W_u, W_d, given;  // both passes
  at::Tensor dy, hbar, probs, weights;      // backward only
};

inline LayerTensors contiguous_inputs(const LayerCall& c, const at::Tensor& x, const std::optional<at::Tensor>& W_r,
                                      const at::Tensor& W_g, const at::Tensor& W_u, const at::Tensor& W_d,
                                      const std::optional<at::Tensor>& given) {
  const bool given_mode = c.mode == lory::RoutingMode::kGivenWeights;
  LayerTensors t;
  t.x = x.contiguous();
  t.W_g = W_g.contiguous();
  t.W_u = W_u.contiguous();
  t.W_d = W_d.contiguous();
  if (given_mode) t.given = given->contiguous();
  else t.W_r = W_r->contiguous();
  return t;
}

inline LayerTensors contiguous_backward_inputs(const LayerCall& c, const at::Tensor& dy, const at::Tensor& x,
                                               const std::optional<at::Tensor>& W_r, const at::Tensor& W_g,
                                               const at::Tensor& W_u, const at::Tensor& W_d,
                                               const std::optional<at::Tensor>& given, const at::Tensor& hbar,
                                               const at::Tensor& probs, const at::Tensor& weights) {
  LayerTensors t = contiguous_inputs(c, x, W_r, W_g, W_u, W_d, given);
  t.dy = dy.contiguous();
  t.weights = weights.contiguous();
  if (c.mode != lory::RoutingMode::kGivenWeights) {
    t.hbar = hbar.contiguous();
    t.probs = probs.contiguous();
  }
  return t;
}

// The backward's own checks: dy like x, the saved routing tensors as the forward made them.
inline void check_backward_inputs(const LayerCall& c, const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& hbar, const at::Tensor& probs, const at::Tensor& weights) {
  check_same(dy, x, c.storage, "dy");
  check_shape(dy, x.sizes(), "dy");
  check_saved(c, x, hbar, probs, weights);
}

struct ForwardOutputs {
  at::Tensor y, hbar, probs, weights;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const { return {y, hbar, probs, weights}; }
};

inline ForwardOutputs new_forward_outputs(const LayerCall& c, const at::Tensor& x) {
  const auto ropt = x.options().dtype(c.routing);
  return {new_output({c.B, c.L, c.d}, x.options()), new_output({c.router_rows(), c.d}, ropt),
          new_output({c.router_rows(), c.E}, ropt), new_output({c.B, c.N, c.E}, ropt)};
}

struct BackwardOutputs {
  at::Tensor dx, dW_r, dW_g, dW_u, dW_d, d_weights;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {dx, dW_r, dW_g, dW_u, dW_d, d_weights};
  }
};

// dW_r is empty in given mode (no router).
inline BackwardOutputs new_backward_outputs(const LayerCall& c, const at::Tensor& x) {
  const bool given_mode = c.mode == lory::RoutingMode::kGivenWeights;
  BackwardOutputs o;
  o.dx = new_output({c.B, c.L, c.d}, x.options());
  o.dW_r = given_mode ? at::empty({0}, x.options()) : new_output({c.E, c.d}, x.options());
  o.dW_g = new_output({c.E, c.f, c.d}, x.options());
  o.dW_u = new_output({c.E, c.f, c.d}, x.options());
  o.dW_d = new_output({c.E, c.d, c.f}, x.options());
  o.d_weights = new_output({c.B, c.N, c.E}, x.options().dtype(c.routing));
  return o;
}

// The library's arguments over those tensors: T = storage, R = routing type.
template <class T, class R>
lory::MoeFfnParams<T, R> layer_params(const LayerCall& c, const LayerTensors& in) {
  lory::MoeFfnParams<T, R> p;
  p.layout = c.layout;
  p.shape = c.shape;
  p.mode = c.mode;
  p.W_r = data_or_null<const T>(in.W_r);
  p.given_weights = data_or_null<const R>(in.given);
  p.W_g = data_or_null<const T>(in.W_g);
  p.W_u = data_or_null<const T>(in.W_u);
  p.W_d = data_or_null<const T>(in.W_d);
  return p;
}

// layer_args: the forward's or the backward's arguments, chosen by the outputs.
template <class T, class R>
lory::MoeFfnForwardArgs<T, R> layer_args(const LayerCall& c, const LayerTensors& in, const ForwardOutputs& out) {
  lory::MoeFfnForwardArgs<T, R> a;
  a.p = layer_params<T, R>(c, in);
  a.x = data_or_null<const T>(in.x);
  a.y = data_or_null<T>(out.y);
  a.hbar = data_or_null<R>(out.hbar);
  a.probs = data_or_null<R>(out.probs);
  a.weights = data_or_null<R>(out.weights);
  return a;
}

template <class T, class R>
lory::MoeFfnBackwardArgs<T, R> layer_args(const LayerCall& c, const LayerTensors& in, const BackwardOutputs& out) {
  lory::MoeFfnBackwardArgs<T, R> a;
  a.p = layer_params<T, R>(c, in);
  a.x = data_or_null<const T>(in.x);
  a.dy = data_or_null<const T>(in.dy);
  a.hbar = data_or_null<const R>(in.hbar);
  a.probs = data_or_null<const R>(in.probs);
  a.weights = data_or_null<const R>(in.weights);
  a.dx = data_or_null<T>(out.dx);
  a.dW_r = data_or_null<T>(out.dW_r);
  a.dW_g = data_or_null<T>(out.dW_g);
  a.dW_u = data_or_null<T>(out.dW_u);
  a.dW_d = data_or_null<T>(out.dW_d);
  a.d_weights = data_or_null<R>(out.d_weights);
  return a;
}

// A plan's forward or backward (chosen by the arguments) with its workspace
// allocated on the device of `like`; `what` names the call in errors.
template <class T, class Backend>
lory::Status plan_call(const lory::MoeFfnPlan<T, Backend>& plan, const lory::MoeFfnForwardArgs<T, float>& a,
                       void* ws, size_t bytes, typename Backend::Stream stream) {
  return plan.forward(a, ws, bytes, stream);
}
template <class T, class Backend>
lory::Status plan_call(const lory::MoeFfnPlan<T, Backend>& plan, const lory::MoeFfnBackwardArgs<T, float>& a,
                       void* ws, size_t bytes, typename Backend::Stream stream) {
  return plan.backward(a, ws, bytes, stream);
}
template <class Plan, class Args, class Stream, class... What>
void run_plan(const Plan& plan, const Args& a, const at::Tensor& like, const Stream& stream, const What&... what) {
  check_status(plan.can_implement(), what..., " can_implement");
  at::Tensor ws = workspace(plan.workspace_size(), like);
  check_status(plan_call(plan, a, ws.data_ptr(), plan.workspace_size(), stream), what...);
}

// The layer ops, written once for both devices. Device supplies what differs:
//   static void check_storage(at::ScalarType, const char* op);  // storage dtypes it runs
//   struct Guard { explicit Guard(c10::Device); };              // makes the tensors' device current
//   template <class Out>  // ForwardOutputs: the forward; BackwardOutputs: the backward
//   static void run(const LayerCall&, const LayerTensors&, const Out&, const lory::MoeFfnOptions&, const char* op);
template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_forward_op(
    const at::Tensor& x, const std::optional<at::Tensor>& W_r, const at::Tensor& W_g, const at::Tensor& W_u,
    const at::Tensor& W_d, const std::optional<at::Tensor>& given, std::string mode, int64_t segment_len,
    int64_t max_chunk_segments, int64_t workspace_budget_bytes, std::string merge_backward) {
  const LayerCall c = check_layer(x, W_r, W_g, W_u, W_d, given, mode, segment_len);
  Device::check_storage(c.storage, "moe_ffn_forward");
  // merge_backward is the backward's; checked here too, so a bad value fails before the forward runs.
  const lory::MoeFfnOptions opt = plan_options(max_chunk_segments, workspace_budget_bytes, merge_backward);
  const typename Device::Guard guard(x.device());
  const LayerTensors in = contiguous_inputs(c, x, W_r, W_g, W_u, W_d, given);
  const ForwardOutputs out = new_forward_outputs(c, in.x);
  Device::run(c, in, out, opt, "moe_ffn_forward");
  return out.as_tuple();
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_op(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& W_r, const at::Tensor& W_g,
    const at::Tensor& W_u, const at::Tensor& W_d, const std::optional<at::Tensor>& given, const at::Tensor& hbar,
    const at::Tensor& probs, const at::Tensor& weights, std::string mode, int64_t segment_len,
    int64_t max_chunk_segments, int64_t workspace_budget_bytes, std::string merge_backward) {
  const LayerCall c = check_layer(x, W_r, W_g, W_u, W_d, given, mode, segment_len);
  Device::check_storage(c.storage, "moe_ffn_backward");
  check_backward_inputs(c, dy, x, hbar, probs, weights);
  const lory::MoeFfnOptions opt = plan_options(max_chunk_segments, workspace_budget_bytes, merge_backward);
  const typename Device::Guard guard(x.device());
  const LayerTensors in = contiguous_backward_inputs(c, dy, x, W_r, W_g, W_u, W_d, given, hbar, probs, weights);
  const BackwardOutputs out = new_backward_outputs(c, in.x);
  Device::run(c, in, out, opt, "moe_ffn_backward");
  return out.as_tuple();
}

// Shapes of the inference ops.
inline void check_prompt_route(const at::Tensor& x, const at::Tensor& W_r) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0,
              "lory: prompt_route needs x [B, L, d], got ", x.sizes());
  TORCH_CHECK(W_r.dim() == 2 && W_r.size(1) == x.size(2) && W_r.size(0) >= 1 && W_r.size(0) <= lory::kMaxExperts,
              "lory: prompt_route needs W_r [E, d] with d = ", x.size(2), " and 1 <= E <= ", lory::kMaxExperts,
              ", got ", W_r.sizes());
  check_same(x, W_r, W_r.scalar_type(), "x", "W_r");
}

inline void check_merge_experts(const at::Tensor& W_g, const at::Tensor& W_u, const at::Tensor& W_d,
                                const at::Tensor& weights) {
  TORCH_CHECK(W_g.dim() == 3 && W_g.numel() > 0, "lory: W_g must be [E, f, d], got ", W_g.sizes());
  const int64_t E = W_g.size(0), f = W_g.size(1), d = W_g.size(2);
  TORCH_CHECK(E <= lory::kMaxExperts, "lory: at most ", lory::kMaxExperts, " experts");
  check_same(W_u, W_g, W_g.scalar_type(), "W_u", "W_g");
  check_same(W_d, W_g, W_g.scalar_type(), "W_d", "W_g");
  check_shape(W_u, {E, f, d}, "W_u");
  check_shape(W_d, {E, d, f}, "W_d");
  check_same(weights, W_g, routing_dtype(W_g.scalar_type()), "weights", "W_g");
  TORCH_CHECK(weights.dim() == 2 && weights.size(1) == E && weights.size(0) > 0,
              "lory: merge_experts needs weights [B, E] with E = ", E, ", got ", weights.sizes());
}

// prompt_route: one routing decision per sequence (the router over one
// segment of length L). hbar and probs are scratch; weights [B, E] is returned.
struct PromptRouteTensors {
  at::Tensor hbar, probs, weights;
};

inline PromptRouteTensors new_prompt_route_outputs(const at::Tensor& x, const at::Tensor& W_r) {
  const int64_t B = x.size(0), d = x.size(2), E = W_r.size(0);
  const auto ropt = x.options().dtype(routing_dtype(x.scalar_type()));
  return {at::empty({B, d}, ropt), at::empty({B, E}, ropt), new_output({B, E}, ropt)};
}

template <class T, class R>
lory::RouterForwardArgs<T, R> prompt_route_args(const at::Tensor& x, const at::Tensor& W_r,
                                                const PromptRouteTensors& out) {
  lory::RouterForwardArgs<T, R> r;
  r.layout = lory::SegmentLayout{x.size(0), x.size(1), x.size(1)};  // one segment per sequence: weights [S = B, E]
  r.d = x.size(2);
  r.experts = static_cast<int>(W_r.size(0));
  r.mode = lory::RoutingMode::kPromptLevel;
  r.x = data_or_null<const T>(x);
  r.W_r = data_or_null<const T>(W_r);
  r.hbar = data_or_null<R>(out.hbar);
  r.probs = data_or_null<R>(out.probs);
  r.weights = data_or_null<R>(out.weights);
  return r;
}

// merge_experts: the merged W_g, W_u, W_d of each of the B rows of weights.
inline std::array<at::Tensor, 3> new_merged_outputs(const at::Tensor& W_g, const at::Tensor& weights) {
  const int64_t B = weights.size(0), f = W_g.size(1), d = W_g.size(2);
  return {new_output({B, f, d}, W_g.options()), new_output({B, f, d}, W_g.options()),
          new_output({B, d, f}, W_g.options())};
}

// Wbar [B, P] = weights [B, E] @ W [E, P], W and weights contiguous.
template <class T, class R>
lory::MergeForwardArgs<T, R> merge_args(const at::Tensor& W, const at::Tensor& weights, const at::Tensor& Wbar) {
  const int64_t P = W.numel() / W.size(0);
  lory::MergeForwardArgs<T, R> m;
  m.num_segments = weights.size(0);
  m.experts = static_cast<int>(W.size(0));
  m.params = P;
  m.W = data_or_null<const T>(W);
  m.expert_stride = P;
  m.weights = data_or_null<const R>(weights);
  m.Wbar = data_or_null<T>(Wbar);
  m.segment_stride = P;
  return m;
}

}  // namespace lory_torch
