// Benchmark harness shared by every bench/*.cu file.
//
// - Manual time from CUDA events recorded on the benchmark's own stream.
// - L2 flushed before every timed iteration (a write over a buffer twice the L2).
// - Peaks measured once per run, before any benchmark (bench_main.cu): the
//   device-to-device copy bandwidth, the read-only and the write-only bandwidth
//   (streaming kernels over 2 GiB), and a large bf16 cuBLAS GEMM rate. Every
//   percent counter refers to these measured numbers, not to a datasheet.
#pragma once
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "lory/dtype.hpp"
#include "lory/status.hpp"

namespace lory_bench {

#define LORY_BENCH_CUDA(expr)                                                         \
  do {                                                                                \
    const cudaError_t e_ = (expr);                                                    \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s -> %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

// Status checks in benchmarks: a failing library call aborts the run with its message.
#define LORY_BENCH_OK(expr)                                                                         \
  do {                                                                                              \
    const LORY_NS_QUALIFIER::Status s_ = (expr);                                                    \
    if (s_ != LORY_NS_QUALIFIER::Status::kSuccess) {                                                \
      std::fprintf(stderr, "%s:%d %s -> %s\n", __FILE__, __LINE__, #expr, LORY_NS_QUALIFIER::status_string(s_)); \
      std::abort();                                                                                 \
    }                                                                                               \
  } while (0)

// Uniform values in [-scale, scale) from a counter hash (splitmix64) of the index, filled on the
// device: gigabytes of non-zero data without a host RNG dominating the run.
template <class T>
__global__ void fill_uniform_kernel(T* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    p[i] = lory::from_float<T>((static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f) * scale);
  }
}
template <class T>
void fill_uniform_device(T* p, size_t n, uint64_t seed, float scale = 1.f) {
  fill_uniform_kernel<T><<<2048, 256>>>(p, n, seed, scale);
  LORY_BENCH_CUDA(cudaGetLastError());
  LORY_BENCH_CUDA(cudaDeviceSynchronize());
}
// cudaMalloc of n elements, left uninitialised (outputs).
template <class T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&p, n * sizeof(T)));
  return p;
}
// cudaMalloc + fill_uniform_device.
template <class T>
T* device_random(size_t n, uint64_t seed, float scale = 1.f) {
  T* p = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&p, n * sizeof(T)));
  fill_uniform_device(p, n, seed, scale);
  return p;
}

// One cuBLAS handle for the whole run (created on first use), bound to the given stream: the
// in-run baselines and the primitives that take a handle use it on each benchmark's own stream.
inline cublasHandle_t cublas_handle_on(cudaStream_t stream) {
  static cublasHandle_t h = [] {
    cublasHandle_t c = nullptr;
    if (cublasCreate(&c) != CUBLAS_STATUS_SUCCESS) std::abort();
    return c;
  }();
  if (cublasSetStream(h, stream) != CUBLAS_STATUS_SUCCESS) std::abort();
  return h;
}

struct Peaks {
  double copy_bytes_per_s = 0;   // bytes read + written per second, device-to-device copy
  double read_bytes_per_s = 0;   // a kernel that only reads (16-byte loads, 2 GiB)
  double write_bytes_per_s = 0;  // only writes: the faster of a 16-byte store kernel and cudaMemsetAsync
  double bf16_gemm_flops = 0;    // FLOP/s of an 8192^3 bf16 cuBLAS GEMM on random data
};
Peaks& peaks();  // defined in bench_main.cu

// A stream and a pair of events per benchmark; an L2-sized scratch for flushing.
class GpuTimer {
 public:
  GpuTimer() {
    LORY_BENCH_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LORY_BENCH_CUDA(cudaEventCreate(&start_));
    LORY_BENCH_CUDA(cudaEventCreate(&stop_));
    int dev = 0, l2 = 0;
    LORY_BENCH_CUDA(cudaGetDevice(&dev));
    LORY_BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    flush_bytes_ = 2 * static_cast<size_t>(l2 > 0 ? l2 : (64 << 20));
    LORY_BENCH_CUDA(cudaMalloc(&flush_, flush_bytes_));
  }
  ~GpuTimer() {
    cudaFree(flush_);
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
    cudaStreamDestroy(stream_);
  }
  cudaStream_t stream() const { return stream_; }
  void flush_l2() { LORY_BENCH_CUDA(cudaMemsetAsync(flush_, 0x5a, flush_bytes_, stream_)); }

  // Times fn(stream) once per benchmark iteration, after an L2 flush and a warm-up call.
  template <class Fn>
  void run(benchmark::State& state, Fn&& fn) {
    fn(stream_);  // warm-up (module load, first-touch)
    LORY_BENCH_CUDA(cudaStreamSynchronize(stream_));
    LORY_BENCH_CUDA(cudaGetLastError());
    for (auto _ : state) {
      flush_l2();
      LORY_BENCH_CUDA(cudaEventRecord(start_, stream_));
      fn(stream_);
      LORY_BENCH_CUDA(cudaEventRecord(stop_, stream_));
      LORY_BENCH_CUDA(cudaEventSynchronize(stop_));
      float ms = 0;
      LORY_BENCH_CUDA(cudaEventElapsedTime(&ms, start_, stop_));
      state.SetIterationTime(ms * 1e-3);
    }
    LORY_BENCH_CUDA(cudaGetLastError());
  }

 private:
  cudaStream_t stream_{};
  cudaEvent_t start_{}, stop_{};
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
};

// A benchmark's compulsory traffic: each input read once, each output written once.
struct Traffic {
  double read = 0, written = 0;
  double total() const { return read + written; }
};

// Counters every benchmark reports: bytes moved (its own minimum: each input
// read once, each output written once) and FLOPs, as rates and as percent of
// the measured peaks. Set after the timing loop. With the traffic split into
// reads and writes, also pct_rw_roof: the time the traffic needs at the
// measured read-only and write-only rates (reads / read peak + writes / write
// peak) over the time taken, in percent. A write-heavy kernel (the merge
// forward writes S/E times what it reads) is bounded by the write rate, which
// the copy figure, an even mix, does not show.
inline void set_rate_counters(benchmark::State& state, double bytes_per_iter, double flops_per_iter) {
  using benchmark::Counter;
  state.counters["GB/s"] = Counter(bytes_per_iter * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["TFLOP/s"] = Counter(flops_per_iter * 1e-12, Counter::kIsIterationInvariantRate);
  state.counters["bytes"] = bytes_per_iter;
  state.counters["flops"] = flops_per_iter;
  if (peaks().copy_bytes_per_s > 0)
    state.counters["pct_copy_bw"] = Counter(bytes_per_iter / peaks().copy_bytes_per_s * 100.0,
                                            Counter::kIsIterationInvariantRate);
  if (peaks().bf16_gemm_flops > 0)
    state.counters["pct_bf16_gemm"] = Counter(flops_per_iter / peaks().bf16_gemm_flops * 100.0,
                                              Counter::kIsIterationInvariantRate);
}
inline void set_rate_counters(benchmark::State& state, Traffic t, double flops_per_iter) {
  set_rate_counters(state, t.total(), flops_per_iter);
  state.counters["bytes_read"] = t.read;
  state.counters["bytes_written"] = t.written;
  if (peaks().read_bytes_per_s > 0 && peaks().write_bytes_per_s > 0)
    state.counters["pct_rw_roof"] =
        benchmark::Counter((t.read / peaks().read_bytes_per_s + t.written / peaks().write_bytes_per_s) * 100.0,
                           benchmark::Counter::kIsIterationInvariantRate);
}

// Device buffer filled with random values in [-1, 1] (never zeros: zeros run faster).
template <class T>
T* random_device_buffer(size_t n, uint64_t seed) {
  std::vector<T> h(n);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (auto& v : h) v = lory::from_float<T>(dist(rng));
  T* d = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&d, n * sizeof(T)));
  LORY_BENCH_CUDA(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Random probability rows [rows, E] in float (routing weights).
inline float* random_routing_weights(int64_t rows, int E, uint64_t seed) {
  std::vector<float> h(static_cast<size_t>(rows) * E);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(0.05f, 1.f);
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0;
    for (int e = 0; e < E; ++e) s += (h[r * E + e] = dist(rng));
    for (int e = 0; e < E; ++e) h[r * E + e] /= s;
  }
  float* d = nullptr;
  LORY_BENCH_CUDA(cudaMalloc(&d, h.size() * sizeof(float)));
  LORY_BENCH_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

// The paper's FFN shapes (docs/math.md, "Cost"): d, f.
struct PaperShape { int64_t d, f; const char* name; };
inline const std::vector<PaperShape>& paper_shapes() {
  static const std::vector<PaperShape> s = {{1024, 2816, "0.3B"}, {1536, 4096, "1.5B"}};
  return s;
}

}  // namespace lory_bench
