// lory PyTorch extension: the CUDA kernels of the lory ops. The layer runs
// through lory::MoeFfnCudaPlan on the tensors' current stream, with PyTorch's
// cuBLAS handle (as PyTorch hands it out: bound to that stream) and a
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
#include <type_traits>

#include "lory/merge.cuh"
#include "lory/moe_ffn.cuh"
#include "lory/router.cuh"
#include "lory_torch_common.h"

namespace lory_torch {
namespace {

using at::Tensor;

void check_cuda_dtype(at::ScalarType t, const char* op) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "lory::", op,
              ": CUDA tensors must be float32, float16 or bfloat16, got ", t);
}

// Calls fn(static_cast<T*>(nullptr)) with T the library storage type of s.
template <class Fn>
void dispatch_storage(at::ScalarType s, const char* op, Fn&& fn) {
  switch (s) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); return;
    case at::kHalf: fn(static_cast<__half*>(nullptr)); return;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); return;
    default: check_cuda_dtype(s, op);  // throws
  }
}

// The current stream and PyTorch's cuBLAS handle. getCurrentCUDABlasHandle() has bound the handle
// to the current stream and given it PyTorch's per-stream workspace (from the caching allocator);
// calling cublasSetStream again here would reset that workspace to cuBLAS' default pool. The plan
// checks that the handle is bound to the stream.
lory::MoeFfnCudaBackend::Stream current_stream() {
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  return {at::cuda::getCurrentCUDAStream().stream(), handle};
}

// A launcher's two-phase workspace protocol: size query, then the run.
template <class Launch>
void run_launcher(Launch&& launch, const Tensor& like, const char* what) {
  size_t bytes = 0;
  check_status(launch(nullptr, bytes), what, " workspace query");
  Tensor ws = workspace(bytes, like);
  bytes = static_cast<size_t>(ws.numel());
  check_status(launch(ws.data_ptr(), bytes), what);
}

// The CUDA side of the layer ops (lory_torch_common.h): lory::MoeFfnCudaPlan
// on the current stream.
struct CudaOps {
  using Guard = c10::cuda::CUDAGuard;
  static void check_storage(at::ScalarType t, const char* op) { check_cuda_dtype(t, op); }

  template <class Out>
  static void run(const LayerCall& c, const LayerTensors& in, const Out& out, const lory::MoeFfnOptions& opt,
                  const char* op) {
    dispatch_storage(c.storage, op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const lory::MoeFfnCudaPlan<T> plan(c.layout, c.shape, c.mode, opt);
      run_plan(plan, layer_args<T, float>(c, in, out), in.x, current_stream(), op, " (CUDA plan)");
    });
  }
};

Tensor prompt_route_cuda(const Tensor& x_in, const Tensor& W_r_in) {
  check_prompt_route(x_in, W_r_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), W_r = W_r_in.contiguous();
  const PromptRouteTensors out = new_prompt_route_outputs(x, W_r);
  dispatch_storage(x.scalar_type(), "prompt_route", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const lory::RouterForwardArgs<T, float> r = prompt_route_args<T, float>(x, W_r, out);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    run_launcher([&](void* ws, size_t& bytes) { return lory::router_forward(r, ws, bytes, stream); }, x,
                 "prompt_route");
  });
  return out.weights;
}

std::tuple<Tensor, Tensor, Tensor> merge_experts_cuda(const Tensor& W_g_in, const Tensor& W_u_in,
                                                      const Tensor& W_d_in, const Tensor& weights_in) {
  check_merge_experts(W_g_in, W_u_in, W_d_in, weights_in);
  const c10::cuda::CUDAGuard guard(W_g_in.device());
  const Tensor weights = weights_in.contiguous();
  const auto out = new_merged_outputs(W_g_in, weights);
  const Tensor W[3] = {W_g_in.contiguous(), W_u_in.contiguous(), W_d_in.contiguous()};
  dispatch_storage(W_g_in.scalar_type(), "merge_experts", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    for (int i = 0; i < 3; ++i) {
      const lory::MergeForwardArgs<T, float> m = merge_args<T, float>(W[i], weights, out[i]);
      run_launcher([&](void* ws, size_t& bytes) { return lory::merge_forward(m, ws, bytes, stream); }, W[i],
                   "merge_experts");
    }
  });
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace lory_torch

TORCH_LIBRARY_IMPL(lory, CUDA, m) {
  m.impl("moe_ffn_forward", &lory_torch::moe_ffn_forward_op<lory_torch::CudaOps>);
  m.impl("moe_ffn_backward", &lory_torch::moe_ffn_backward_op<lory_torch::CudaOps>);
  m.impl("prompt_route", &lory_torch::prompt_route_cuda);
  m.impl("merge_experts", &lory_torch::merge_experts_cuda);
}
