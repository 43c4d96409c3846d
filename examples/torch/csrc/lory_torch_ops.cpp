// lory PyTorch extension: op schemas (TORCH_LIBRARY(lory)), the CPU kernels
// and the device-independent decode step.
//
// CPU storage dtypes: float64 runs the double-precision CPU twin
// (reference::moe_ffn_forward/backward with Acc = R = double: the plan object
// fixes the routing dtype to float); float32 runs reference::MoeFfnCpuPlan,
// the same orchestration (chunking, GEMM batching, workspace) as the GPU plan.
// CUDA kernels are registered by lory_torch_cuda.cu when it is built.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "lory/merge.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/moe_ffn.hpp"
#include "lory/reference/moe_ffn_backend.hpp"
#include "lory/reference/router.hpp"
#include "lory/router.hpp"
#include "lory_torch_common.h"

namespace lory_torch {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_cpu_dtype(at::ScalarType t, const char* op) {
  TORCH_CHECK(t == at::kDouble || t == at::kFloat, "lory::", op,
              ": CPU tensors must be float64 or float32 (float16 / bfloat16 run on CUDA only), got ", t);
}

Tensor contiguous_or_undefined(const OptTensor& t) { return t.has_value() ? t->contiguous() : Tensor(); }

template <class P>
P* ptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<P>() : nullptr;
}

template <class T, class R>
lory::MoeFfnParams<T, R> make_params(const LayerCall& c, const Tensor& W_r, const Tensor& W_g, const Tensor& W_u,
                                     const Tensor& W_d, const Tensor& given) {
  lory::MoeFfnParams<T, R> p;
  p.layout = c.layout;
  p.shape = c.shape;
  p.mode = c.mode;
  p.W_r = ptr<T>(W_r);
  p.given_weights = ptr<R>(given);
  p.W_g = W_g.data_ptr<T>();
  p.W_u = W_u.data_ptr<T>();
  p.W_d = W_d.data_ptr<T>();
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_ffn_forward_cpu(const Tensor& x_in, const OptTensor& W_r_in,
                                                               const Tensor& W_g_in, const Tensor& W_u_in,
                                                               const Tensor& W_d_in, const OptTensor& given_in,
                                                               std::string mode, int64_t segment_len,
                                                               int64_t max_chunk_segments,
                                                               int64_t workspace_budget_bytes) {
  const LayerCall c = check_layer(x_in, W_r_in, W_g_in, W_u_in, W_d_in, given_in, mode, segment_len);
  check_cpu_dtype(c.storage, "moe_ffn_forward");
  const lory::MoeFfnOptions opt = plan_options(max_chunk_segments, workspace_budget_bytes);
  const Tensor x = x_in.contiguous(), W_g = W_g_in.contiguous(), W_u = W_u_in.contiguous(),
               W_d = W_d_in.contiguous();
  const bool given_mode = c.mode == lory::RoutingMode::kGivenWeights;
  const Tensor W_r = given_mode ? Tensor() : W_r_in->contiguous();
  const Tensor given = given_mode ? given_in->contiguous() : Tensor();
  const auto ropt = x.options().dtype(c.routing);
  Tensor y = new_output({c.B, c.L, c.d}, x.options());
  Tensor hbar = new_output({c.router_rows(), c.d}, ropt);
  Tensor probs = new_output({c.router_rows(), c.E}, ropt);
  Tensor weights = new_output({c.B, c.N, c.E}, ropt);

  if (c.storage == at::kDouble) {
    lory::MoeFfnForwardArgs<double, double> a;
    a.p = make_params<double, double>(c, W_r, W_g, W_u, W_d, given);
    a.x = x.data_ptr<double>();
    a.y = y.data_ptr<double>();
    a.hbar = ptr<double>(hbar);
    a.probs = ptr<double>(probs);
    a.weights = weights.data_ptr<double>();
    check_status(lory::reference::moe_ffn_forward<double>(a), "moe_ffn_forward (CPU twin, float64)");
  } else {
    lory::MoeFfnForwardArgs<float, float> a;
    a.p = make_params<float, float>(c, W_r, W_g, W_u, W_d, given);
    a.x = x.data_ptr<float>();
    a.y = y.data_ptr<float>();
    a.hbar = ptr<float>(hbar);
    a.probs = ptr<float>(probs);
    a.weights = weights.data_ptr<float>();
    const lory::reference::MoeFfnCpuPlan<float> plan(c.layout, c.shape, c.mode, opt);
    check_status(plan.can_implement(), "moe_ffn_forward (CPU plan) can_implement");
    Tensor ws = at::empty({static_cast<int64_t>(plan.workspace_size())}, x.options().dtype(at::kByte));
    check_status(plan.forward(a, ws.data_ptr(), plan.workspace_size(), {}), "moe_ffn_forward (CPU plan)");
  }
  return {y, hbar, probs, weights};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_ffn_backward_cpu(
    const Tensor& dy_in, const Tensor& x_in, const OptTensor& W_r_in, const Tensor& W_g_in, const Tensor& W_u_in,
    const Tensor& W_d_in, const OptTensor& given_in, const Tensor& hbar_in, const Tensor& probs_in,
    const Tensor& weights_in, std::string mode, int64_t segment_len, int64_t max_chunk_segments,
    int64_t workspace_budget_bytes) {
  const LayerCall c = check_layer(x_in, W_r_in, W_g_in, W_u_in, W_d_in, given_in, mode, segment_len);
  check_cpu_dtype(c.storage, "moe_ffn_backward");
  check_same(dy_in, x_in, c.storage, "dy");
  check_shape(dy_in, x_in.sizes(), "dy");
  check_saved(c, x_in, hbar_in, probs_in, weights_in);
  const lory::MoeFfnOptions opt = plan_options(max_chunk_segments, workspace_budget_bytes);
  const Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), W_g = W_g_in.contiguous(),
               W_u = W_u_in.contiguous(), W_d = W_d_in.contiguous(), weights = weights_in.contiguous();
  const bool given_mode = c.mode == lory::RoutingMode::kGivenWeights;
  const Tensor W_r = given_mode ? Tensor() : W_r_in->contiguous();
  const Tensor given = given_mode ? given_in->contiguous() : Tensor();
  const Tensor hbar = given_mode ? Tensor() : hbar_in.contiguous();
  const Tensor probs = given_mode ? Tensor() : probs_in.contiguous();
  Tensor dx = new_output({c.B, c.L, c.d}, x.options());
  Tensor dW_r = given_mode ? at::empty({0}, x.options()) : new_output({c.E, c.d}, x.options());
  Tensor dW_g = new_output({c.E, c.f, c.d}, x.options());
  Tensor dW_u = new_output({c.E, c.f, c.d}, x.options());
  Tensor dW_d = new_output({c.E, c.d, c.f}, x.options());
  Tensor d_weights = new_output({c.B, c.N, c.E}, x.options().dtype(c.routing));

  if (c.storage == at::kDouble) {
    lory::MoeFfnBackwardArgs<double, double> a;
    a.p = make_params<double, double>(c, W_r, W_g, W_u, W_d, given);
    a.x = x.data_ptr<double>();
    a.dy = dy.data_ptr<double>();
    a.hbar = ptr<double>(hbar);
    a.probs = ptr<double>(probs);
    a.weights = weights.data_ptr<double>();
    a.dx = dx.data_ptr<double>();
    a.dW_r = ptr<double>(dW_r);
    a.dW_g = dW_g.data_ptr<double>();
    a.dW_u = dW_u.data_ptr<double>();
    a.dW_d = dW_d.data_ptr<double>();
    a.d_weights = d_weights.data_ptr<double>();
    check_status(lory::reference::moe_ffn_backward<double>(a), "moe_ffn_backward (CPU twin, float64)");
  } else {
    lory::MoeFfnBackwardArgs<float, float> a;
    a.p = make_params<float, float>(c, W_r, W_g, W_u, W_d, given);
    a.x = x.data_ptr<float>();
    a.dy = dy.data_ptr<float>();
    a.hbar = ptr<float>(hbar);
    a.probs = ptr<float>(probs);
    a.weights = weights.data_ptr<float>();
    a.dx = dx.data_ptr<float>();
    a.dW_r = ptr<float>(dW_r);
    a.dW_g = dW_g.data_ptr<float>();
    a.dW_u = dW_u.data_ptr<float>();
    a.dW_d = dW_d.data_ptr<float>();
    a.d_weights = d_weights.data_ptr<float>();
    const lory::reference::MoeFfnCpuPlan<float> plan(c.layout, c.shape, c.mode, opt);
    check_status(plan.can_implement(), "moe_ffn_backward (CPU plan) can_implement");
    Tensor ws = at::empty({static_cast<int64_t>(plan.workspace_size())}, x.options().dtype(at::kByte));
    check_status(plan.backward(a, ws.data_ptr(), plan.workspace_size(), {}), "moe_ffn_backward (CPU plan)");
  }
  return {dx, dW_r, dW_g, dW_u, dW_d, d_weights};
}

template <class T>
Tensor prompt_route_cpu_t(const Tensor& x, const Tensor& W_r) {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), E = W_r.size(0);
  const auto ropt = x.options().dtype(routing_dtype(x.scalar_type()));
  Tensor hbar = at::empty({B, d}, ropt), probs = at::empty({B, E}, ropt);
  Tensor weights = new_output({B, E}, ropt);
  lory::RouterForwardArgs<T, T> r;  // the CPU routing dtype is the storage dtype (float64 or float32)
  r.layout = lory::SegmentLayout{B, L, L};  // one segment per sequence: weights [S = B, E]
  r.d = d;
  r.experts = static_cast<int>(E);
  r.mode = lory::RoutingMode::kPromptLevel;
  r.x = x.data_ptr<T>();
  r.W_r = W_r.data_ptr<T>();
  r.hbar = hbar.data_ptr<T>();
  r.probs = probs.data_ptr<T>();
  r.weights = weights.data_ptr<T>();
  check_status(lory::reference::router_forward<double>(r), "prompt_route (CPU twin)");
  return weights;
}

Tensor prompt_route_cpu(const Tensor& x_in, const Tensor& W_r_in) {
  check_prompt_route(x_in, W_r_in);
  check_cpu_dtype(x_in.scalar_type(), "prompt_route");
  const Tensor x = x_in.contiguous(), W_r = W_r_in.contiguous();
  return x.scalar_type() == at::kDouble ? prompt_route_cpu_t<double>(x, W_r) : prompt_route_cpu_t<float>(x, W_r);
}

template <class T>
void merge_cpu_t(const Tensor& W, const Tensor& weights, Tensor& Wbar) {
  const int64_t P = W.numel() / W.size(0);
  lory::MergeForwardArgs<T, T> m;
  m.num_segments = weights.size(0);
  m.experts = static_cast<int>(W.size(0));
  m.params = P;
  m.W = W.data_ptr<T>();
  m.expert_stride = P;
  m.weights = weights.data_ptr<T>();
  m.Wbar = Wbar.data_ptr<T>();
  m.segment_stride = P;
  check_status(lory::reference::merge_forward<double>(m), "merge_experts (CPU twin)");
}

std::tuple<Tensor, Tensor, Tensor> merge_experts_cpu(const Tensor& W_g_in, const Tensor& W_u_in,
                                                     const Tensor& W_d_in, const Tensor& weights_in) {
  check_merge_experts(W_g_in, W_u_in, W_d_in, weights_in);
  check_cpu_dtype(W_g_in.scalar_type(), "merge_experts");
  const Tensor weights = weights_in.contiguous();
  const int64_t B = weights.size(0), f = W_g_in.size(1), d = W_g_in.size(2);
  Tensor out[3] = {new_output({B, f, d}, W_g_in.options()), new_output({B, f, d}, W_g_in.options()),
                   new_output({B, d, f}, W_g_in.options())};
  const Tensor W[3] = {W_g_in.contiguous(), W_u_in.contiguous(), W_d_in.contiguous()};
  for (int i = 0; i < 3; ++i) {
    if (W_g_in.scalar_type() == at::kDouble) merge_cpu_t<double>(W[i], weights, out[i]);
    else merge_cpu_t<float>(W[i], weights, out[i]);
  }
  return {out[0], out[1], out[2]};
}

// One token per sequence through its cached merged FFN, composed from ATen ops
// (batched GEMVs over the merged weights), so it runs on every device and
// autograd and tracing see plain ATen ops.
Tensor decode_step(const Tensor& x, const Tensor& Wg_bar, const Tensor& Wu_bar, const Tensor& Wd_bar) {
  TORCH_CHECK(x.dim() == 2, "lory::decode_step: x must be [B, d], got ", x.sizes());
  TORCH_CHECK(Wg_bar.dim() == 3 && Wg_bar.size(0) == x.size(0) && Wg_bar.size(2) == x.size(1),
              "lory::decode_step: Wg_bar must be [B, f, d] matching x ", x.sizes(), ", got ", Wg_bar.sizes());
  TORCH_CHECK(Wu_bar.sizes() == Wg_bar.sizes(), "lory::decode_step: Wu_bar must match Wg_bar, got ", Wu_bar.sizes());
  TORCH_CHECK(Wd_bar.dim() == 3 && Wd_bar.size(0) == x.size(0) && Wd_bar.size(1) == x.size(1) &&
                  Wd_bar.size(2) == Wg_bar.size(1),
              "lory::decode_step: Wd_bar must be [B, d, f], got ", Wd_bar.sizes());
  const Tensor xc = x.unsqueeze(-1);  // [B, d, 1]
  const Tensor a = at::bmm(Wg_bar, xc), u = at::bmm(Wu_bar, xc);
  return at::bmm(Wd_bar, at::silu(a) * u).squeeze(-1);
}

}  // namespace
}  // namespace lory_torch

TORCH_LIBRARY(lory, m) {
  m.def(
      "moe_ffn_forward(Tensor x, Tensor? W_r, Tensor W_g, Tensor W_u, Tensor W_d, Tensor? given_weights, "
      "str mode, int segment_len, int max_chunk_segments=0, int workspace_budget_bytes=0) "
      "-> (Tensor y, Tensor hbar, Tensor probs, Tensor weights)");
  m.def(
      "moe_ffn_backward(Tensor dy, Tensor x, Tensor? W_r, Tensor W_g, Tensor W_u, Tensor W_d, "
      "Tensor? given_weights, Tensor hbar, Tensor probs, Tensor weights, str mode, int segment_len, "
      "int max_chunk_segments=0, int workspace_budget_bytes=0) "
      "-> (Tensor dx, Tensor dW_r, Tensor dW_g, Tensor dW_u, Tensor dW_d, Tensor d_weights)");
  m.def("prompt_route(Tensor x, Tensor W_r) -> Tensor");
  m.def("merge_experts(Tensor W_g, Tensor W_u, Tensor W_d, Tensor weights) -> (Tensor, Tensor, Tensor)");
  m.def("decode_step(Tensor x, Tensor Wg_bar, Tensor Wu_bar, Tensor Wd_bar) -> Tensor");
}

TORCH_LIBRARY_IMPL(lory, CPU, m) {
  m.impl("moe_ffn_forward", &lory_torch::moe_ffn_forward_cpu);
  m.impl("moe_ffn_backward", &lory_torch::moe_ffn_backward_cpu);
  m.impl("prompt_route", &lory_torch::prompt_route_cpu);
  m.impl("merge_experts", &lory_torch::merge_experts_cpu);
}

TORCH_LIBRARY_IMPL(lory, CompositeImplicitAutograd, m) {
  m.impl("decode_step", &lory_torch::decode_step);
}
