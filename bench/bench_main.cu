// Benchmark driver: measures the device's peaks first (device-to-device copy
// bandwidth; read-only and write-only bandwidth; bf16 cuBLAS GEMM rate on
// random data), records them in the JSON context, then runs every registered
// benchmark. Without a GPU it says the GPU benchmarks were skipped and exits 0.
#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "bandwidth_peaks.cuh"
#include "bench_common.cuh"

namespace lory_bench {

Peaks& peaks() {
  static Peaks p;
  return p;
}

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median seconds of launch() over 10 runs after 2 warm-ups, CUDA events on the default stream.
template <class F>
double median_seconds(F&& launch) {
  cudaEvent_t s, e;
  LORY_BENCH_CUDA(cudaEventCreate(&s));
  LORY_BENCH_CUDA(cudaEventCreate(&e));
  std::vector<double> t;
  for (int i = 0; i < 12; ++i) {
    LORY_BENCH_CUDA(cudaEventRecord(s));
    launch();
    LORY_BENCH_CUDA(cudaEventRecord(e));
    LORY_BENCH_CUDA(cudaEventSynchronize(e));
    float ms = 0;
    LORY_BENCH_CUDA(cudaEventElapsedTime(&ms, s, e));
    if (i >= 2) t.push_back(ms * 1e-3);
  }
  LORY_BENCH_CUDA(cudaGetLastError());
  cudaEventDestroy(s);
  cudaEventDestroy(e);
  return median(t);
}

double measure_bf16_gemm() {
  const int n = 8192;
  auto* A = random_device_buffer<__nv_bfloat16>(size_t(n) * n, 1);
  auto* B = random_device_buffer<__nv_bfloat16>(size_t(n) * n, 2);
  __nv_bfloat16* C = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&C, size_t(n) * n * sizeof(__nv_bfloat16)));
  const cublasHandle_t h = cublas_handle_on(nullptr);  // the default stream, as the events below
  const float alpha = 1, beta = 0;
  const double seconds = median_seconds([&] {
    if (cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A, CUDA_R_16BF, n, B, CUDA_R_16BF, n, &beta, C,
                     CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      std::abort();
  });
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
  return 2.0 * double(n) * n * n / seconds;
}

}  // namespace
}  // namespace lory_bench

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("SKIPPED: no CUDA device present; GPU benchmarks were not run\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  cudaDeviceProp prop{};
  LORY_BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  auto& p = lory_bench::peaks();
  lory_bench::BandwidthPeaks bw;
  if (!lory_bench::measure_bandwidth_peaks([](auto&& launch) { return lory_bench::median_seconds(launch); }, bw)) {
    std::fprintf(stderr, "measuring the bandwidth peaks failed\n");
    return 1;
  }
  p.copy_bytes_per_s = bw.copy;
  p.read_bytes_per_s = bw.read;
  p.write_bytes_per_s = bw.write;
  p.bf16_gemm_flops = lory_bench::measure_bf16_gemm();
  std::printf("device: %s, %d SMs; measured copy %.0f GB/s, read %.0f GB/s, write %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n",
              prop.name, prop.multiProcessorCount, p.copy_bytes_per_s * 1e-9, p.read_bytes_per_s * 1e-9,
              p.write_bytes_per_s * 1e-9, p.bf16_gemm_flops * 1e-12);
  benchmark::AddCustomContext("device", prop.name);
  benchmark::AddCustomContext("peak_copy_GBps", std::to_string(p.copy_bytes_per_s * 1e-9));
  benchmark::AddCustomContext("peak_read_GBps", std::to_string(p.read_bytes_per_s * 1e-9));
  benchmark::AddCustomContext("peak_write_GBps", std::to_string(p.write_bytes_per_s * 1e-9));
  benchmark::AddCustomContext("peak_bf16_TFLOPs", std::to_string(p.bf16_gemm_flops * 1e-12));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
