// SwiGLU forward / backward over 32768 tokens x f = 4096 in bf16. Both are
// memory-bound: the byte counters are each kernel's own minimum traffic (the
// inputs read and the outputs written once), so pct_copy_bw is the figure of merit.
#include <cstdint>
#include <string>

#include "bench_common.cuh"
#include "lory/swiglu.cuh"

namespace {

using bf16 = __nv_bfloat16;
using lory_bench::device_alloc;
using lory_bench::device_random;
using lory_bench::GpuTimer;
using lory_bench::set_rate_counters;

constexpr int64_t kSwigluTokens = 32768, kSwigluF = 4096;

void bm_swiglu_forward(benchmark::State& state) {
  const int64_t n = kSwigluTokens * kSwigluF;
  bf16 *a = device_random<bf16>(n, 5), *u = device_random<bf16>(n, 6), *m = device_alloc<bf16>(n);
  const lory::SwigluForwardArgs<bf16> args{kSwigluTokens, kSwigluF, a, kSwigluF, u, kSwigluF, m, kSwigluF};
  GpuTimer timer;
  bool ok = true;
  timer.run(state, [&](cudaStream_t s) { ok &= lory::swiglu_forward(args, s) == lory::Status::kSuccess; });
  if (!ok) state.SkipWithError("swiglu_forward failed");
  set_rate_counters(state, lory_bench::Traffic{2.0 * n * sizeof(bf16), 1.0 * n * sizeof(bf16)}, 4.0 * n);
  cudaFree(a);
  cudaFree(u);
  cudaFree(m);
}

void bm_swiglu_backward(benchmark::State& state) {
  const int64_t n = kSwigluTokens * kSwigluF;
  bf16 *a = device_random<bf16>(n, 7), *u = device_random<bf16>(n, 8), *dm = device_random<bf16>(n, 9);
  bf16 *da = device_alloc<bf16>(n), *du = device_alloc<bf16>(n);
  const lory::SwigluBackwardArgs<bf16> args{kSwigluTokens, kSwigluF, a, kSwigluF, u, kSwigluF, dm, kSwigluF,
                                            da, kSwigluF, du, kSwigluF};
  GpuTimer timer;
  bool ok = true;
  timer.run(state, [&](cudaStream_t s) { ok &= lory::swiglu_backward(args, s) == lory::Status::kSuccess; });
  if (!ok) state.SkipWithError("swiglu_backward failed");
  set_rate_counters(state, lory_bench::Traffic{3.0 * n * sizeof(bf16), 2.0 * n * sizeof(bf16)}, 10.0 * n);
  cudaFree(a);
  cudaFree(u);
  cudaFree(dm);
  cudaFree(da);
  cudaFree(du);
}

const bool registered = [] {
  const std::string swiglu_shape = "/bf16/tokens" + std::to_string(kSwigluTokens) + "_f" + std::to_string(kSwigluF);
  benchmark::RegisterBenchmark(("swiglu_forward" + swiglu_shape).c_str(), bm_swiglu_forward)
      ->UseManualTime()
      ->MinTime(0.05)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark(("swiglu_backward" + swiglu_shape).c_str(), bm_swiglu_backward)
      ->UseManualTime()
      ->MinTime(0.05)
      ->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
