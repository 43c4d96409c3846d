// Device bandwidth peaks measured in the same process as the benchmarks (bench/bench_main.cu and
// the A/B driver bench/ab/merge_ab.cu share it): a device-to-device copy (reads + writes), a kernel
// that only reads and one that only writes, all over 2 GiB buffers (far past the L2). CUDA only;
// no Google Benchmark.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace lory_bench {

struct BandwidthPeaks {
  double copy = 0;   // bytes read + written per second, cudaMemcpyAsync device to device
  double read = 0;   // bytes per second, read_peak_kernel
  double write = 0;  // bytes per second, the faster of write_peak_kernel and cudaMemsetAsync
};

// 16-byte accesses, four independent ones in flight per thread per iteration, a grid of a few
// blocks per SM striding over the buffer.
constexpr int kPeakUnroll = 4;
__global__ void read_peak_kernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i + (kPeakUnroll - 1) * stride < n; i += kPeakUnroll * stride) {
    uint4 v[kPeakUnroll];
#pragma unroll
    for (int u = 0; u < kPeakUnroll; ++u) v[u] = p[i + u * stride];
#pragma unroll
    for (int u = 0; u < kPeakUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) acc ^= p[i].x ^ p[i].y ^ p[i].z ^ p[i].w;
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads; a store that practically never happens
}
__global__ void write_peak_kernel(uint4* p, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const unsigned x = static_cast<unsigned>(i) * 2654435761u;
    p[i] = make_uint4(x, x ^ 0x5bd1e995u, x + 0x68e31da4u, ~x);
  }
}

// seconds(launch): the caller's timing of launch() on the default stream (its own warm-up and
// statistic). Returns false, measuring nothing, if the 4 GiB of buffers cannot be allocated.
template <class Seconds>
bool measure_bandwidth_peaks(Seconds&& seconds, BandwidthPeaks& peaks) {
  const size_t bytes = size_t(2) << 30;
  void *a = nullptr, *b = nullptr;
  unsigned* sink = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess ||
      cudaMalloc(&sink, sizeof(unsigned)) != cudaSuccess || cudaMemset(a, 0x3c, bytes) != cudaSuccess) {
    cudaFree(a);
    cudaFree(b);
    cudaFree(sink);
    return false;
  }
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const unsigned grid = static_cast<unsigned>(std::max(sms, 1)) * 8;
  const size_t n16 = bytes / sizeof(uint4);
  peaks.copy = 2.0 * bytes / seconds([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice); });
  peaks.read = bytes / seconds([&] { read_peak_kernel<<<grid, 256>>>(static_cast<const uint4*>(a), n16, sink); });
  const double store_s = seconds([&] { write_peak_kernel<<<grid, 256>>>(static_cast<uint4*>(b), n16); });
  const double memset_s = seconds([&] { cudaMemsetAsync(b, 0x5a, bytes); });
  peaks.write = bytes / std::min(store_s, memset_s);
  cudaFree(a);
  cudaFree(b);
  cudaFree(sink);
  return cudaGetLastError() == cudaSuccess;
}

}  // namespace lory_bench
