// lory PyTorch extension: op schemas (TORCH_LIBRARY(lory)), the CPU kernels
// and the device-independent decode step.
//
// CPU storage dtypes: float64 runs the double-precision CPU twin
// (reference::moe_ffn_forward/backward with Acc = R = double: the plan object
// fixes the routing dtype to float); float32 runs the library's plan (the same
// orchestration, chunking, GEMM batching and workspace as the GPU plan) over
// the ATen backend of lory_torch_aten_backend.h, whose GEMMs are PyTorch's.
// CUDA kernels are registered by lory_torch_cuda.cu when it is built.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "lory/merge.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/moe_ffn.hpp"
#include "lory/reference/router.hpp"
#include "lory/router.hpp"
#include "lory_torch_aten_backend.h"
#include "lory_torch_common.h"

namespace lory_torch {
namespace {

using at::Tensor;
using CpuPlan = MoeFfnAtenPlan<float>;

void check_cpu_dtype(at::ScalarType t, const char* op) {
  TORCH_CHECK(t == at::kDouble || t == at::kFloat, "lory::", op,
              ": CPU tensors must be float64 or float32 (float16 / bfloat16 run on CUDA only), got ", t);
}

// The double twin, forward or backward by the arguments.
template <class Args>
lory::Status run_twin(const Args& a) {
  if constexpr (std::is_same_v<Args, lory::MoeFfnForwardArgs<double, double>>)
    return lory::reference::moe_ffn_forward<double>(a);
  else
    return lory::reference::moe_ffn_backward<double>(a);
}

// The CPU side of the layer ops (lory_torch_common.h): float64 through the
// double twin, float32 through the plan on the ATen backend.
struct CpuOps {
  struct Guard {
    explicit Guard(c10::Device) {}  // one CPU: nothing to select
  };
  static void check_storage(at::ScalarType t, const char* op) { check_cpu_dtype(t, op); }

  template <class Out>
  static void run(const LayerCall& c, const LayerTensors& in, const Out& out, const lory::MoeFfnOptions& opt,
                  const char* op) {
    if (c.storage == at::kDouble) {
      check_status(run_twin(layer_args<double, double>(c, in, out)), op, " (CPU twin, float64)");
    } else {
      const CpuPlan plan(c.layout, c.shape, c.mode, opt);
      run_plan(plan, layer_args<float, float>(c, in, out), in.x, CpuPlan::Stream{}, op, " (CPU plan, ATen backend)");
    }
  }
};

template <class T>
Tensor prompt_route_cpu_t(const Tensor& x, const Tensor& W_r) {
  const PromptRouteTensors out = new_prompt_route_outputs(x, W_r);
  // The CPU routing dtype is the storage dtype (float64 or float32).
  check_status(lory::reference::router_forward<double>(prompt_route_args<T, T>(x, W_r, out)),
               "prompt_route (CPU twin)");
  return out.weights;
}

Tensor prompt_route_cpu(const Tensor& x_in, const Tensor& W_r_in) {
  check_prompt_route(x_in, W_r_in);
  check_cpu_dtype(x_in.scalar_type(), "prompt_route");
  const Tensor x = x_in.contiguous(), W_r = W_r_in.contiguous();
  return x.scalar_type() == at::kDouble ? prompt_route_cpu_t<double>(x, W_r) : prompt_route_cpu_t<float>(x, W_r);
}

std::tuple<Tensor, Tensor, Tensor> merge_experts_cpu(const Tensor& W_g_in, const Tensor& W_u_in,
                                                     const Tensor& W_d_in, const Tensor& weights_in) {
  check_merge_experts(W_g_in, W_u_in, W_d_in, weights_in);
  check_cpu_dtype(W_g_in.scalar_type(), "merge_experts");
  const Tensor weights = weights_in.contiguous();
  const auto out = new_merged_outputs(W_g_in, weights);
  const Tensor W[3] = {W_g_in.contiguous(), W_u_in.contiguous(), W_d_in.contiguous()};
  for (int i = 0; i < 3; ++i) {
    check_status(W_g_in.scalar_type() == at::kDouble
                     ? aten_merge_forward(merge_args<double, double>(W[i], weights, out[i]))
                     : aten_merge_forward(merge_args<float, float>(W[i], weights, out[i])),
                 "merge_experts (CPU)");
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
      "str mode, int segment_len, int max_chunk_segments=0, int workspace_budget_bytes=0, "
      "str merge_backward=\"auto\") -> (Tensor y, Tensor hbar, Tensor probs, Tensor weights)");
  m.def(
      "moe_ffn_backward(Tensor dy, Tensor x, Tensor? W_r, Tensor W_g, Tensor W_u, Tensor W_d, "
      "Tensor? given_weights, Tensor hbar, Tensor probs, Tensor weights, str mode, int segment_len, "
      "int max_chunk_segments=0, int workspace_budget_bytes=0, str merge_backward=\"auto\") "
      "-> (Tensor dx, Tensor dW_r, Tensor dW_g, Tensor dW_u, Tensor dW_d, Tensor d_weights)");
  m.def("prompt_route(Tensor x, Tensor W_r) -> Tensor");
  m.def("merge_experts(Tensor W_g, Tensor W_u, Tensor W_d, Tensor weights) -> (Tensor, Tensor, Tensor)");
  m.def("decode_step(Tensor x, Tensor Wg_bar, Tensor Wu_bar, Tensor Wd_bar) -> Tensor");
}

TORCH_LIBRARY_IMPL(lory, CPU, m) {
  m.impl("moe_ffn_forward", &lory_torch::moe_ffn_forward_op<lory_torch::CpuOps>);
  m.impl("moe_ffn_backward", &lory_torch::moe_ffn_backward_op<lory_torch::CpuOps>);
  m.impl("prompt_route", &lory_torch::prompt_route_cpu);
  m.impl("merge_experts", &lory_torch::merge_experts_cpu);
}

TORCH_LIBRARY_IMPL(lory, CompositeImplicitAutograd, m) {
  m.impl("decode_step", &lory_torch::decode_step);
}
