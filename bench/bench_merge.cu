// Merge forward / backward at the paper's shapes (docs/math.md), bf16 storage, and
// the same merges done by cuBLAS in the same run as the baseline:
//   merge_forward/...          lory::merge_forward
//   merge_forward_cublas/...   [S x E] x [E x P] with cublasGemmEx (bf16, fp32 compute)
//   merge_backward/...         lory::merge_backward (dW and d_weights, deterministic): tensor cores
//   merge_backward_simt/...    the same, CUDA-core kernel forced (the default before the tensor-core one)
//   merge_backward_cublas/...  two GEMMs: dW = weights^T G, d_weights = G W^T (lory's kGemm method)
// Names share the suffix /bf16/d<d>_f<f>/E<E>/S<S> so a script can pair them.
// P = 3 d f (the three FFN matrices merged as one [E, P] tensor); S = 16 segments x 8 or 32 sequences.
// Bytes are each kernel's minimum: forward (E P + S P) * 2, backward (S P + 2 E P) * 2 + S E * 4.
#include <cublas_v2.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "lory/merge.cuh"
#include "lory/merge_gemm.cuh"

namespace lory_bench {
namespace {

using bf16 = __nv_bfloat16;

__global__ void float_to_bf16(const float* in, bf16* out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// One set of buffers, sized for the largest shape and shared by every benchmark.
struct Buffers {
  bf16* big = nullptr;  // [S, P]: merged weights (forward) or their gradient G (backward)
  bf16* W = nullptr;    // [E, P]
  bf16* dW = nullptr;   // [E, P]
  float* d_weights = nullptr;
  size_t big_n = 0, w_n = 0, dW_n = 0, de_n = 0;
  void ensure(size_t big_need, size_t w_need, size_t de_need) {
    auto grow = [](bf16*& p, size_t& have, size_t need, uint64_t seed) {
      if (need <= have) return;
      if (p) LORY_BENCH_CUDA(cudaFree(p));
      LORY_BENCH_CUDA(cudaMalloc(&p, need * sizeof(bf16)));
      fill_uniform_device(p, need, seed);
      have = need;
    };
    grow(big, big_n, big_need, 11);
    grow(W, w_n, w_need, 12);
    grow(dW, dW_n, w_need, 13);
    if (de_need > de_n) {
      if (d_weights) LORY_BENCH_CUDA(cudaFree(d_weights));
      LORY_BENCH_CUDA(cudaMalloc(&d_weights, de_need * sizeof(float)));
      de_n = de_need;
    }
    LORY_BENCH_CUDA(cudaDeviceSynchronize());
  }
};
Buffers& buffers() {
  static Buffers b;
  return b;
}

struct Shape {
  int64_t d, f;
  int E;
  int64_t S;
  int64_t P() const { return 3 * d * f; }
  std::string suffix() const {
    return "/bf16/d" + std::to_string(d) + "_f" + std::to_string(f) + "/E" + std::to_string(E) + "/S" +
           std::to_string(S);
  }
};

// Routing weights in fp32 (lory) and their bf16 copy for cuBLAS, made outside the timing.
struct Routing {
  float* f32 = nullptr;
  bf16* b16 = nullptr;
  Routing(int64_t S, int E) {
    f32 = random_routing_weights(S, E, 7);
    LORY_BENCH_CUDA(cudaMalloc(&b16, S * E * sizeof(bf16)));
    float_to_bf16<<<64, 256>>>(f32, b16, size_t(S) * E);
    LORY_BENCH_CUDA(cudaDeviceSynchronize());
  }
  ~Routing() {
    cudaFree(f32);
    cudaFree(b16);
  }
};

struct Workspace {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Workspace(size_t n) : bytes(n) { LORY_BENCH_CUDA(cudaMalloc(&p, n)); }
  ~Workspace() { cudaFree(p); }
};

// Forward: W read, Wbar written. Backward: G, W and the routing weights read, dW written.
lory_bench::Traffic forward_bytes(const Shape& s) {
  return {double(s.E * s.P()) * sizeof(bf16), double(s.S * s.P()) * sizeof(bf16)};
}
lory_bench::Traffic backward_bytes(const Shape& s) {
  return {double(s.S * s.P() + s.E * s.P()) * sizeof(bf16) + double(s.S * s.E) * sizeof(float),
          double(s.E * s.P()) * sizeof(bf16)};
}

// offset: 0, or 1 for W and Wbar one element past 16-byte alignment with strides of P + 1 (the
// scalar I/O path, against the aligned row of the same shape).
void bench_forward_at(benchmark::State& state, Shape s, int64_t offset) {
  auto& B = buffers();
  const int64_t stride = s.P() + offset;
  B.ensure(size_t(offset + s.S * stride), size_t(offset + s.E * stride), size_t(s.S * s.E));
  Routing r(s.S, s.E);
  lory::MergeForwardArgs<bf16, float> a;
  a.num_segments = s.S;
  a.experts = s.E;
  a.params = s.P();
  a.W = B.W + offset;
  a.expert_stride = stride;
  a.weights = r.f32;
  a.Wbar = B.big + offset;
  a.segment_stride = stride;
  size_t bytes = 0;
  if (lory::merge_forward(a, nullptr, bytes, nullptr) != lory::Status::kSuccess) {
    state.SkipWithError("merge_forward size query failed");
    return;
  }
  Workspace ws(bytes);
  GpuTimer timer;
  lory::Status st = lory::Status::kSuccess;
  timer.run(state, [&](cudaStream_t stream) {
    const lory::Status x = lory::merge_forward(a, ws.p, ws.bytes, stream);
    if (x != lory::Status::kSuccess) st = x;
  });
  if (st != lory::Status::kSuccess) state.SkipWithError(lory::status_string(st));
  set_rate_counters(state, forward_bytes(s), 2.0 * s.S * s.E * s.P());
}
void bench_forward(benchmark::State& state, Shape s) { bench_forward_at(state, s, 0); }
void bench_forward_unaligned(benchmark::State& state, Shape s) { bench_forward_at(state, s, 1); }

void bench_forward_cublas(benchmark::State& state, Shape s) {
  auto& B = buffers();
  B.ensure(size_t(s.S * s.P()), size_t(s.E * s.P()), size_t(s.S * s.E));
  Routing r(s.S, s.E);
  GpuTimer timer;
  const cublasHandle_t h = cublas_handle_on(timer.stream());
  const float alpha = 1.f, beta = 0.f;
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  // Row-major Wbar[S, P] = w[S, E] W[E, P]  <=>  column-major Wbar^T[P, S] = W^T[P, E] w^T[E, S].
  timer.run(state, [&](cudaStream_t) {
    const cublasStatus_t x = cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, int(s.P()), int(s.S), s.E, &alpha, B.W,
                                          CUDA_R_16BF, int(s.P()), r.b16, CUDA_R_16BF, s.E, &beta, B.big,
                                          CUDA_R_16BF, int(s.P()), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (x != CUBLAS_STATUS_SUCCESS) st = x;
  });
  if (st != CUBLAS_STATUS_SUCCESS) state.SkipWithError("cublasGemmEx failed");
  set_rate_counters(state, forward_bytes(s), 2.0 * s.S * s.E * s.P());
}

// Times launch(args, workspace, bytes, stream) (a null workspace asks for the size) on shape s;
// returns the arguments it ran with.
template <class Launch>
lory::MergeBackwardArgs<bf16, float> bench_backward_with(benchmark::State& state, Shape s, Launch&& launch) {
  auto& B = buffers();
  B.ensure(size_t(s.S * s.P()), size_t(s.E * s.P()), size_t(s.S * s.E));
  Routing r(s.S, s.E);
  lory::MergeBackwardArgs<bf16, float> a;
  a.num_segments = s.S;
  a.experts = s.E;
  a.params = s.P();
  a.G = B.big;
  a.grad_segment_stride = s.P();
  a.W = B.W;
  a.expert_stride = s.P();
  a.weights = r.f32;
  a.dW = B.dW;
  a.dW_expert_stride = s.P();
  a.d_weights = B.d_weights;
  size_t bytes = 0;
  if (launch(a, nullptr, bytes, nullptr) != lory::Status::kSuccess) {
    state.SkipWithError("merge_backward size query failed");
    return a;
  }
  Workspace ws(bytes);
  GpuTimer timer;
  lory::Status st = lory::Status::kSuccess;
  timer.run(state, [&](cudaStream_t stream) {
    const lory::Status x = launch(a, ws.p, ws.bytes, stream);
    if (x != lory::Status::kSuccess) st = x;
  });
  if (st != lory::Status::kSuccess) state.SkipWithError(lory::status_string(st));
  set_rate_counters(state, backward_bytes(s), 4.0 * s.S * s.E * s.P());
  return a;
}

void bench_backward_on_path(benchmark::State& state, Shape s, lory::detail::MergePath path) {
  const auto a = bench_backward_with(state, s, [&](const auto& x, void* ws, size_t& bytes, cudaStream_t stream) {
    return lory::detail::merge_backward_on_path(x, ws, bytes, stream, path);
  });
  state.counters["tensor_cores"] = lory::detail::merge_backward_uses_tc(a, path) ? 1 : 0;  // the kernel that ran (sm_80+)
}

void bench_backward(benchmark::State& state, Shape s) {
  bench_backward_on_path(state, s, lory::detail::MergePath::kAuto);  // what lory::merge_backward runs
}
void bench_backward_simt(benchmark::State& state, Shape s) {
  bench_backward_on_path(state, s, lory::detail::MergePath::kSimt);
}

// The baseline: lory's GEMM method (lory/merge_gemm.cuh), dW = weights^T G and d_weights = G W^T
// as two cublasGemmEx calls, plus the routing weights rounded to bf16 by a small kernel.
void bench_backward_cublas(benchmark::State& state, Shape s) {
  bench_backward_with(state, s, [&](const auto& x, void* ws, size_t& bytes, cudaStream_t stream) {
    const cublasHandle_t h = ws ? cublas_handle_on(stream) : nullptr;  // a size query needs none
    return lory::merge_backward(x, lory::MergeBackwardMethod::kGemm, ws, bytes, h, stream);
  });
}

// Registered at start-up: every paper shape x E in {8, 16, 32} x S in {128, 512}; the forward
// over misaligned operands at E = 32, S = 512.
const bool registered = [] {
  for (const auto& ps : paper_shapes())
    for (int E : {8, 16, 32})
      for (int64_t seqs : {8, 32}) {
        const Shape s{ps.d, ps.f, E, 16 * seqs};
        benchmark::RegisterBenchmark(("merge_forward" + s.suffix()).c_str(), bench_forward, s)
            ->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
        if (seqs == 32 && E == 32)
          benchmark::RegisterBenchmark(("merge_forward_unaligned" + s.suffix()).c_str(), bench_forward_unaligned, s)
              ->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("merge_forward_cublas" + s.suffix()).c_str(), bench_forward_cublas, s)
            ->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("merge_backward" + s.suffix()).c_str(), bench_backward, s)
            ->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("merge_backward_simt" + s.suffix()).c_str(), bench_backward_simt, s)
            ->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("merge_backward_cublas" + s.suffix()).c_str(), bench_backward_cublas, s)
            ->Iterations(5)->UseManualTime()->Unit(benchmark::kMillisecond);
      }
  return true;
}();

}  // namespace
}  // namespace lory_bench
