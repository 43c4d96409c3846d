// Router forward / backward at the paper's shapes (L = 4096, T = 256, d = 1024
// and 1536, E = 8 / 16 / 32, B = 8 and 32), in bf16. Both are memory-bound: the
// byte counters are each kernel's own minimum traffic (x read once for the
// forward; dx read and written once for the backward), so pct_copy_bw is the
// figure of merit. SwiGLU's benchmarks: bench_swiglu.cu.
#include <cstdint>
#include <string>

#include "bench_common.cuh"
#include "lory/router.cuh"

namespace {

using bf16 = __nv_bfloat16;
using lory_bench::device_alloc;
using lory_bench::device_random;
using lory_bench::GpuTimer;
using lory_bench::set_rate_counters;

constexpr int64_t kSeqLen = 4096, kSegmentLen = 256;

// Inputs and outputs of one router configuration; hbar / probs are filled by
// a forward run so that the backward sees realistic values.
struct RouterProblem {
  lory::SegmentLayout layout;
  int64_t d;
  int E;
  bf16 *x, *W_r, *dx;
  float *hbar, *probs, *weights, *d_weights;

  RouterProblem(int64_t d_, int E_, int64_t B) : layout{B, kSeqLen, kSegmentLen}, d(d_), E(E_) {
    const int64_t S = layout.num_segments(), tokens = layout.num_tokens();
    x = device_random<bf16>(tokens * d, 1);
    W_r = device_random<bf16>(E * d, 2);
    dx = nullptr;
    hbar = device_alloc<float>(S * d);
    probs = device_alloc<float>(S * E);
    weights = device_alloc<float>(S * E);
    d_weights = lory_bench::random_routing_weights(S, E, 3);
  }
  ~RouterProblem() {
    cudaFree(x);
    cudaFree(W_r);
    cudaFree(dx);
    cudaFree(hbar);
    cudaFree(probs);
    cudaFree(weights);
    cudaFree(d_weights);
  }
  lory::RouterForwardArgs<bf16, float> forward_args() const {
    lory::RouterForwardArgs<bf16, float> a;
    a.layout = layout;
    a.d = d;
    a.experts = E;
    a.mode = lory::RoutingMode::kCausalSegment;
    a.x = x;
    a.W_r = W_r;
    a.hbar = hbar;
    a.probs = probs;
    a.weights = weights;
    return a;
  }
};

void* workspace_for(size_t bytes) {
  void* p = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  return p;
}

void bm_router_forward(benchmark::State& state, int64_t d, int E, int64_t B) {
  RouterProblem p(d, E, B);
  const auto args = p.forward_args();
  size_t ws_bytes = 0;
  if (lory::router_forward(args, nullptr, ws_bytes, nullptr) != lory::Status::kSuccess) {
    state.SkipWithError("router_forward rejected the arguments");
    return;
  }
  void* ws = workspace_for(ws_bytes);
  GpuTimer timer;
  bool ok = true;
  timer.run(state, [&](cudaStream_t s) {
    size_t b = ws_bytes;
    ok &= lory::router_forward(args, ws, b, s) == lory::Status::kSuccess;
  });
  if (!ok) state.SkipWithError("router_forward failed");
  const double tokens = static_cast<double>(p.layout.num_tokens()), S = static_cast<double>(p.layout.num_segments());
  // x read once; W_r read once; hbar, probs, weights written once.
  const lory_bench::Traffic bytes{tokens * d * sizeof(bf16) + double(E) * d * sizeof(bf16), S * d * 4 + 2 * S * E * 4};
  const double flops = tokens * d + 2.0 * S * E * d;  // the sums, the logits
  set_rate_counters(state, bytes, flops);
  cudaFree(ws);
}

void bm_router_backward(benchmark::State& state, int64_t d, int E, int64_t B) {
  RouterProblem p(d, E, B);
  const int64_t tokens = p.layout.num_tokens(), S = p.layout.num_segments();
  {  // hbar, probs from a real forward
    const auto fa = p.forward_args();
    size_t fb = 0;
    LORY_BENCH_CUDA(lory::router_forward(fa, nullptr, fb, nullptr) == lory::Status::kSuccess ? cudaSuccess
                                                                                          : cudaErrorUnknown);
    void* fws = workspace_for(fb);
    LORY_BENCH_CUDA(lory::router_forward(fa, fws, fb, nullptr) == lory::Status::kSuccess ? cudaSuccess
                                                                                       : cudaErrorUnknown);
    LORY_BENCH_CUDA(cudaDeviceSynchronize());
    cudaFree(fws);
  }
  cudaFree(p.x);  // the backward does not read x: make room for dx
  p.x = nullptr;
  p.dx = device_random<bf16>(tokens * d, 4);
  bf16* dW_r = device_alloc<bf16>(int64_t(E) * d);
  float* d_bias = device_alloc<float>(E);

  lory::RouterBackwardArgs<bf16, float> args;
  args.layout = p.layout;
  args.d = d;
  args.experts = E;
  args.mode = lory::RoutingMode::kCausalSegment;
  args.W_r = p.W_r;
  args.hbar = p.hbar;
  args.probs = p.probs;
  args.d_weights = p.d_weights;
  args.dW_r = dW_r;
  args.d_bias = d_bias;
  args.dx = p.dx;
  size_t ws_bytes = 0;
  if (lory::router_backward(args, nullptr, ws_bytes, nullptr) != lory::Status::kSuccess) {
    state.SkipWithError("router_backward rejected the arguments");
    return;
  }
  void* ws = workspace_for(ws_bytes);
  GpuTimer timer;
  bool ok = true;
  timer.run(state, [&](cudaStream_t s) {
    size_t b = ws_bytes;
    ok &= lory::router_backward(args, ws, b, s) == lory::Status::kSuccess;
  });
  if (!ok) state.SkipWithError("router_backward failed");
  // dx read and written once; hbar, probs, d_weights, W_r read once; dW_r written once.
  const lory_bench::Traffic bytes{double(tokens) * d * sizeof(bf16) + double(S) * d * 4 + 2.0 * S * E * 4 +
                                      double(E) * d * sizeof(bf16),
                                  double(tokens) * d * sizeof(bf16) + double(E) * d * sizeof(bf16)};
  const double flops = double(tokens) * d + 4.0 * S * E * d;  // dx adds; W_r^T dz and dz hbar^T
  set_rate_counters(state, bytes, flops);
  cudaFree(ws);
  cudaFree(dW_r);
  cudaFree(d_bias);
}

const bool registered = [] {
  for (int64_t d : {1024, 1536})
    for (int E : {8, 16, 32})
      for (int64_t B : {8, 32}) {
        const std::string shape = "/bf16/d" + std::to_string(d) + "/E" + std::to_string(E) + "/B" +
                                  std::to_string(B) + "_L4096_T256";
        benchmark::RegisterBenchmark(("router_forward" + shape).c_str(), bm_router_forward, d, E, B)
            ->UseManualTime()
            ->MinTime(0.05)
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("router_backward" + shape).c_str(), bm_router_backward, d, E, B)
            ->UseManualTime()
            ->MinTime(0.05)
            ->Unit(benchmark::kMicrosecond);
      }
  return true;
}();

}  // namespace
