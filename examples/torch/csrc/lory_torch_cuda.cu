// lory PyTorch extension: the CUDA kernels of the lory ops. The layer runs
// through lory::MoeFfnCudaPlan on the tensors' current stream, with PyTorch's
// cuBLAS handle (bound to that stream here, the usual PyTorch idiom) and a
// workspace from PyTorch's caching allocator; the inference ops call the
// router and merge launchers directly. Storage: float32, float16, bfloat16
// (routing tensors float32).
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <optional>
#include <string>
#include <tuple>

#include "lory/merge.cuh"
#include "lory/moe_ffn.cuh"
#include "lory/router.cuh"
#include "lory_torch_common.h"

namespace lory_torch {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ATen's scalar types -> the library's storage types (same bits).
template <class A> struct storage_of { using type = A; };
template <> struct storage_of<at::Half> { using type = __half; };
template <> struct storage_of<at::BFloat16> { using type = __nv_bfloat16; };

template <class T>
T* sptr(const Tensor& t) {  // storage pointer, null for an undefined or empty tensor
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}
float* fptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

// Calls fn.template operator()<T>() with T the library storage type of s.
template <class Fn>
void dispatch_storage(at::ScalarType s, const char* op, Fn&& fn) {
  switch (s) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); return;
    case at::kHalf: fn(static_cast<__half*>(nullptr)); return;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); return;
    default:
      TORCH_CHECK(false, "lory::", op, ": CUDA tensors must be float32, float16 or bfloat16, got ", s);
  }
}

// The current stream, with PyTorch's cuBLAS handle bound to it.
lory::MoeFfnCudaBackend::Stream current_stream() {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CHECK(cublasSetStream(handle, stream) == CUBLAS_STATUS_SUCCESS, "lory: cublasSetStream failed");
  return {stream, handle};
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

template <class T>
lory::MoeFfnParams<T, float> make_params(const LayerCall& c, const Tensor& W_r, const Tensor& W_g,
                                         const Tensor& W_u, const Tensor& W_d, const Tensor& given) {
  lory::MoeFfnParams<T, float> p;
  p.layout = c.layout;
  p.shape = c.shape;
  p.mode = c.mode;
  p.W_r = sptr<const T>(W_r);
  p.given_weights = fptr(given);
  p.W_g = sptr<const T>(W_g);
  p.W_u = sptr<const T>(W_u);
  p.W_d = sptr<const T>(W_d);
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_ffn_forward_cuda(const Tensor& x_in, const OptTensor& W_r_in,
                                                                const Tensor& W_g_in, const Tensor& W_u_in,
                                                                const Tensor& W_d_in, const OptTensor& given_in,
                                                                std::string mode, int64_t segment_len,
                                                                int64_t max_chunk_segments,
                                                                int64_t workspace_budget_bytes) {
  const LayerCall c = check_layer(x_in, W_r_in, W_g_in, W_u_in, W_d_in, given_in, mode, segment_len);
  const lory::MoeFfnOptions opt = plan_options(max_chunk_segments, workspace_budget_bytes);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), W_g = W_g_in.contiguous(), W_u = W_u_in.contiguous(),
               W_d = W_d_in.contiguous();
  const bool given_mode = c.mode == lory::RoutingMode::kGivenWeights;
  const Tensor W_r = given_mode ? Tensor() : W_r_in->contiguous();
  const Tensor given = given_mode ? given_in->contiguous() : Tensor();
  const auto ropt = x.options().dtype(at::kFloat);
  Tensor y = new_output({c.B, c.L, c.d}, x.options());
  Tensor hbar = new_output({c.router_rows(), c.d}, ropt);
  Tensor probs = new_output({c.router_rows(), c.E}, ropt);
  Tensor weights = new_output({c.B, c.N, c.E}, ropt);
  dispatch_storage(c.storage, "moe_ffn_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lory::MoeFfnForwardArgs<T, float> a;
    a.p = make_params<T>(c, W_r, W_g, W_u, W_d, given);
    a.x = sptr<const T>(x);
    a.y = sptr<T>(y);
    a.hbar = fptr(hbar);
    a.probs = fptr(probs);
    a.weights = fptr(weights);
    const lory::MoeFfnCudaPlan<T> plan(c.layout, c.shape, c.mode, opt);
    check_status(plan.can_implement(), "moe_ffn_forward (CUDA plan) can_implement");
    Tensor ws = workspace(plan.workspace_size(), x);
    check_status(plan.forward(a, ws.data_ptr(), plan.workspace_size(), current_stream()),
                 "moe_ffn_forward (CUDA plan)");
  });
  return {y, hbar, probs, weights};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> moe_ffn_backward_cuda(
    const Tensor& dy_in, const Tensor& x_in, const OptTensor& W_r_in, const Tensor& W_g_in, const Tensor& W_u_in,
    const Tensor& W_d_in, const OptTensor& given_in, const Tensor& hbar_in, const Tensor& probs_in,
    const Tensor& weights_in, std::string mode, int64_t segment_len, int64_t max_chunk_segments,
    int64_t workspace_budget_bytes) {
  const LayerCall c = check_layer(x_in, W_r_in, W_g_in, W_u_in, W_d_in, given_in, mode, segment_len);
  check_same(dy_in, x_in, c.storage, "dy");
  check_shape(dy_in, x_in.sizes(), "dy");
  check_saved(c, x_in, hbar_in, probs_in, weights_in);
  const lory::MoeFfnOptions opt = plan_options(max_chunk_segments, workspace_budget_bytes);
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  Tensor d_weights = new_output({c.B, c.N, c.E}, x.options().dtype(at::kFloat));
  dispatch_storage(c.storage, "moe_ffn_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lory::MoeFfnBackwardArgs<T, float> a;
    a.p = make_params<T>(c, W_r, W_g, W_u, W_d, given);
    a.x = sptr<const T>(x);
    a.dy = sptr<const T>(dy);
    a.hbar = fptr(hbar);
    a.probs = fptr(probs);
    a.weights = fptr(weights);
    a.dx = sptr<T>(dx);
    a.dW_r = sptr<T>(dW_r);
    a.dW_g = sptr<T>(dW_g);
    a.dW_u = sptr<T>(dW_u);
    a.dW_d = sptr<T>(dW_d);
    a.d_weights = fptr(d_weights);
    const lory::MoeFfnCudaPlan<T> plan(c.layout, c.shape, c.mode, opt);
    check_status(plan.can_implement(), "moe_ffn_backward (CUDA plan) can_implement");
    Tensor ws = workspace(plan.workspace_size(), x);
    check_status(plan.backward(a, ws.data_ptr(), plan.workspace_size(), current_stream()),
                 "moe_ffn_backward (CUDA plan)");
  });
  return {dx, dW_r, dW_g, dW_u, dW_d, d_weights};
}

Tensor prompt_route_cuda(const Tensor& x_in, const Tensor& W_r_in) {
  check_prompt_route(x_in, W_r_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), W_r = W_r_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), E = W_r.size(0);
  const auto ropt = x.options().dtype(at::kFloat);
  Tensor hbar = at::empty({B, d}, ropt), probs = at::empty({B, E}, ropt);
  Tensor weights = new_output({B, E}, ropt);
  dispatch_storage(x.scalar_type(), "prompt_route", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lory::RouterForwardArgs<T, float> r;
    r.layout = lory::SegmentLayout{B, L, L};  // one segment per sequence: weights [S = B, E]
    r.d = d;
    r.experts = static_cast<int>(E);
    r.mode = lory::RoutingMode::kPromptLevel;
    r.x = sptr<const T>(x);
    r.W_r = sptr<const T>(W_r);
    r.hbar = fptr(hbar);
    r.probs = fptr(probs);
    r.weights = fptr(weights);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    size_t bytes = 0;
    check_status(lory::router_forward(r, nullptr, bytes, stream), "prompt_route workspace query");
    Tensor ws = workspace(bytes, x);
    bytes = static_cast<size_t>(ws.numel());
    check_status(lory::router_forward(r, ws.data_ptr(), bytes, stream), "prompt_route");
  });
  return weights;
}

std::tuple<Tensor, Tensor, Tensor> merge_experts_cuda(const Tensor& W_g_in, const Tensor& W_u_in,
                                                      const Tensor& W_d_in, const Tensor& weights_in) {
  check_merge_experts(W_g_in, W_u_in, W_d_in, weights_in);
  const c10::cuda::CUDAGuard guard(W_g_in.device());
  const Tensor weights = weights_in.contiguous();
  const int64_t B = weights.size(0), E = W_g_in.size(0), f = W_g_in.size(1), d = W_g_in.size(2);
  Tensor out[3] = {new_output({B, f, d}, W_g_in.options()), new_output({B, f, d}, W_g_in.options()),
                   new_output({B, d, f}, W_g_in.options())};
  const Tensor W[3] = {W_g_in.contiguous(), W_u_in.contiguous(), W_d_in.contiguous()};
  dispatch_storage(W_g_in.scalar_type(), "merge_experts", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    for (int i = 0; i < 3; ++i) {
      lory::MergeForwardArgs<T, float> m;
      m.num_segments = B;
      m.experts = static_cast<int>(E);
      m.params = f * d;
      m.W = sptr<const T>(W[i]);
      m.expert_stride = f * d;
      m.weights = fptr(weights);
      m.Wbar = sptr<T>(out[i]);
      m.segment_stride = f * d;
      size_t bytes = 0;
      check_status(lory::merge_forward(m, nullptr, bytes, stream), "merge_experts workspace query");
      Tensor ws = workspace(bytes, W[i]);
      bytes = static_cast<size_t>(ws.numel());
      check_status(lory::merge_forward(m, ws.data_ptr(), bytes, stream), "merge_experts");
    }
  });
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace lory_torch

TORCH_LIBRARY_IMPL(lory, CUDA, m) {
  m.impl("moe_ffn_forward", &lory_torch::moe_ffn_forward_cuda);
  m.impl("moe_ffn_backward", &lory_torch::moe_ffn_backward_cuda);
  m.impl("prompt_route", &lory_torch::prompt_route_cuda);
  m.impl("merge_experts", &lory_torch::merge_experts_cuda);
}
