// Decode step with prompt-level routing (lory/inference.cuh), bf16, the 1.5B
// paper shape with 32 experts, per batch size B = 1 .. 256 sequences:
//   decode_merged/bf16/d1536_f4096/E32/B<B>    each sequence's cached merged FFN (reads B * P)
//   decode_experts/bf16/d1536_f4096/E32/B<B>   expert space, no merged weights (reads E * P)
// Same suffix: pair them. Counters: bytes and FLOPs per step by
// decode_step_bytes / decode_step_flops (the figures the choice rule compares),
// chosen = 1 where choose_decode_method picks this method, workspace_bytes.
// The cache is random (its contents do not change the work), built once for
// the largest B (9.7 GB) and shared by every run.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cstdint>
#include <string>

#include "bench_common.cuh"
#include "lory/inference.cuh"

namespace {

using lory::DecodeMethod;
using T = __nv_bfloat16;
using lory_bench::device_random;
using lory_bench::GpuTimer;

constexpr int64_t kD = 1536, kF = 4096;
constexpr int kExperts = 32;
constexpr int64_t kMaxBatch = 256;



// Allocated once on first use, kept for the whole run.
struct Model {
  T *W_g = nullptr, *W_u = nullptr, *W_d = nullptr, *cache = nullptr, *x = nullptr, *y = nullptr;
  float* probs = nullptr;
  Model() {
    const lory::FfnShape sh{kD, kF, kExperts};
    const size_t fd = size_t(kD) * kF;
    W_g = device_random<T>(kExperts * fd, 1, 0.05f);
    W_u = device_random<T>(kExperts * fd, 2, 0.05f);
    W_d = device_random<T>(kExperts * fd, 3, 0.03f);
    cache = device_random<T>(static_cast<size_t>(lory::merged_cache_elements(kMaxBatch, sh)), 4, 0.05f);
    x = device_random<T>(kMaxBatch * kD, 5, 1.f);
    y = device_random<T>(kMaxBatch * kD, 6, 1.f);
    probs = lory_bench::random_routing_weights(kMaxBatch, kExperts, 7);
  }
};
Model& model() {
  static Model m;
  return m;
}

void bench_decode(benchmark::State& state, DecodeMethod method, int64_t B) {
  Model& M = model();
  const lory::FfnShape sh{kD, kF, kExperts};
  lory::DecodeStepArgs<T, float> a;
  a.batch = B;
  a.shape = sh;
  a.method = method;
  a.x = M.x;
  a.y = M.y;
  a.cache = M.cache;
  a.probs = M.probs;
  a.W_g = M.W_g;
  a.W_u = M.W_u;
  a.W_d = M.W_d;
  size_t bytes = 0;
  LORY_BENCH_OK(lory::decode_step(a, nullptr, bytes, nullptr, nullptr));
  void* ws = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&ws, bytes));

  GpuTimer timer;
  const cublasHandle_t handle = lory_bench::cublas_handle_on(timer.stream());
  timer.run(state, [&](cudaStream_t s) { LORY_BENCH_OK(lory::decode_step(a, ws, bytes, handle, s)); });
  LORY_BENCH_CUDA(cudaStreamSynchronize(timer.stream()));
  LORY_BENCH_CUDA(cudaFree(ws));

  lory_bench::set_rate_counters(state, lory::decode_step_bytes(method, B, sh, sizeof(T)),
                                lory::decode_step_flops(method, B, sh));
  state.counters["chosen"] = lory::choose_decode_method(B, sh, sizeof(T)) == method ? 1.0 : 0.0;
  state.counters["workspace_bytes"] = static_cast<double>(bytes);
}

const bool registered = [] {
  for (int64_t B : {int64_t(1), int64_t(4), int64_t(16), int64_t(64), kMaxBatch}) {
    const std::string suffix = "/bf16/d" + std::to_string(kD) + "_f" + std::to_string(kF) + "/E" +
                               std::to_string(kExperts) + "/B" + std::to_string(B);
    benchmark::RegisterBenchmark(("decode_merged" + suffix).c_str(),
                                 [B](benchmark::State& s) { bench_decode(s, DecodeMethod::kMerged, B); })
        ->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(20);
    benchmark::RegisterBenchmark(("decode_experts" + suffix).c_str(),
                                 [B](benchmark::State& s) { bench_decode(s, DecodeMethod::kExpertSpace, B); })
        ->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(20);
  }
  return true;
}();

}  // namespace
