// GPU test helpers: device detection, checked CUDA calls, RAII device buffers.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/catch.hpp"
#include "lory/detail/wgmma.cuh"

namespace lory_test {

inline bool gpu_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// The current device runs the [sm90] tests (wgmma: compute capability 9.0; the CPU emulator too).
inline bool device_has_wgmma() {
  bool has = false;
  return lory::detail::device_has_wgmma(has) == lory::Status::kSuccess && has;
}

// A run of the whole suite (no test named) on a device without wgmma leaves the [sm90] tests out;
// named on their own (as CTest runs each test) they exit with 77 there (require_wgmma).
template <class Session>  // Catch::Session (declared in the runners only)
void leave_out_sm90_tests_unless_named(Session& session) {
  if (device_has_wgmma() || !session.configData().testsOrTags.empty()) return;
  std::printf("SKIPPED: the [sm90] tests (wgmma) need an sm_90 device; the others run\n");
  session.configData().testsOrTags.push_back("~[sm90]");
}

// Called first by an [sm90] test: elsewhere it exits with 77, which CTest reports as skipped (a run
// of the whole suite leaves these tests out on such a device: tests/common/gpu_main.cu).
inline void require_wgmma() {
  if (!device_has_wgmma()) {
    std::printf("SKIPPED: this test needs an sm_90 device (H100/H200): wgmma\n");
    std::exit(77);
  }
}

// Every CUDA call in a test goes through this: a failure fails the test with its message.
#define LORY_TEST_CUDA(expr)                                                        \
  do {                                                                              \
    const cudaError_t lory_err_ = (expr);                                           \
    INFO(#expr << " -> " << cudaGetErrorString(lory_err_));                          \
    REQUIRE(lory_err_ == cudaSuccess);                                              \
  } while (0)

// Synchronise and check both the sticky and the last error after a launch.
#define LORY_TEST_SYNC()                                  \
  do {                                                    \
    LORY_TEST_CUDA(cudaGetLastError());                   \
    LORY_TEST_CUDA(cudaDeviceSynchronize());              \
  } while (0)

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n) LORY_TEST_CUDA(cudaMalloc(&p_, n * sizeof(T) + 64));  // slack for misaligned views
  }
  explicit DeviceBuffer(const std::vector<T>& h) : DeviceBuffer(h.size()) { upload(h); }
  ~DeviceBuffer() { if (p_) cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() <= n_);
    LORY_TEST_CUDA(cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const { return download(n_); }
  std::vector<T> download(size_t n) const {
    std::vector<T> h(n);
    LORY_TEST_CUDA(cudaMemcpy(h.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// A byte buffer for caller-owned workspaces.
using DeviceBytes = DeviceBuffer<unsigned char>;

// A caller-owned workspace with stale contents (0x5a bytes, as a previous call might leave it): no
// launcher may rely on what a workspace holds.
inline DeviceBytes stale_workspace(size_t bytes) {
  DeviceBytes ws(bytes);
  if (bytes) LORY_TEST_CUDA(cudaMemset(ws.get(), 0x5a, bytes));
  return ws;
}

// A non-blocking stream and a cuBLAS handle bound to it, for the primitives that take both.
struct GpuContext {
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
  GpuContext() {
    LORY_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasSetStream(handle, stream) == CUBLAS_STATUS_SUCCESS);
  }
  ~GpuContext() {
    cublasDestroy(handle);
    cudaStreamDestroy(stream);
  }
};

}  // namespace lory_test
