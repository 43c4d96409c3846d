// Merge forward / backward with more than 2^31 elements: 64-bit offsets on the
// GPU (too big for the CPU emulator, so apart from tests/gpu/test_merge.cu).
#include <cublas_v2.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/merge.cuh"
#include "lory/merge_gemm.cuh"
#include "lory/reference/merge.hpp"

using lory::Status;
using lory::detail::MergePath;
using namespace lory_test;

// ---------------------------------------------------------------------------
// S * P > 2^31 (and E * stride > 2^32): 64-bit offsets. The data are periodic
// in the column (prime periods), generated on the device, so the twin runs on
// windows of columns and d_weights has a closed form over whole periods.
// ---------------------------------------------------------------------------
namespace {

template <class T>
__global__ void fill_periodic(T* dst, int64_t rows, int64_t cols, int64_t stride, const T* pattern, int period) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    dst[r * stride + c] = pattern[r * period + c % period];
  }
}

template <class T>
void fill_device_periodic(T* dst, int64_t rows, int64_t cols, int64_t stride, const std::vector<T>& pattern,
                          int period) {
  DeviceBuffer<T> pat(pattern);
  fill_periodic<<<4096, 256>>>(dst, rows, cols, stride, pat.get(), period);
  LORY_TEST_SYNC();
}

// Host copy of columns [c0, c0 + n) of every row of a device view.
template <class T>
std::vector<T> download_window(const T* dev, int64_t rows, int64_t stride, int64_t c0, int64_t n) {
  std::vector<T> h(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    LORY_TEST_CUDA(cudaMemcpy(h.data() + r * n, dev + r * stride + c0, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

template <class T>
std::vector<T> periodic_window(const std::vector<T>& pattern, int period, int64_t rows, int64_t c0, int64_t n) {
  std::vector<T> h(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) h[r * n + j] = pattern[r * period + (c0 + j) % period];
  return h;
}

}  // namespace

TEST_CASE("merge forward and backward with more than 2^31 elements", "[gpu][merge][large]") {
  using T = __nv_bfloat16;
  const int64_t S = 2, P = 1100000001, stride = 1100000008;  // S * stride > 2^31, 3 * stride > 2^32
  const int E = 3;
  const int pw = 997, pg = 1009;
  auto rng = make_rng("merge_large");
  auto wpat = random_vector<T>(static_cast<size_t>(E) * pw, rng);
  auto gpat = random_vector<T>(static_cast<size_t>(S) * pg, rng);
  auto weights = random_simplex_rows(S, E, rng);
  DeviceBuffer<float> dweights(weights);
  DeviceBuffer<T> W(static_cast<size_t>(E * stride)), out(static_cast<size_t>(S * stride));
  fill_device_periodic(W.get(), E, P, stride, wpat, pw);
  // Windows: the start, across the 2^31 element offset of row 1, and the tail.
  const int64_t n = 2048, j31 = (int64_t(1) << 31) - stride - n / 2;
  const std::vector<int64_t> windows = {0, j31, P - n};

  for (MergePath path : {MergePath::kSimt, MergePath::kTensorCore}) {
    INFO("forward path " << static_cast<int>(path));
    LORY_TEST_CUDA(cudaMemset(out.get(), 0xff, S * stride * sizeof(T)));  // NaN poison
    lory::MergeForwardArgs<T, float> a;
    a.num_segments = S;
    a.experts = E;
    a.params = P;
    a.W = W.get();
    a.expert_stride = stride;
    a.weights = dweights.get();
    a.Wbar = out.get();
    a.segment_stride = stride;
    size_t bytes = 0;
    REQUIRE(lory::detail::merge_forward_on_path(a, nullptr, bytes, nullptr, path) == Status::kSuccess);
    auto ws = stale_workspace(bytes);
    REQUIRE(lory::detail::merge_forward_on_path(a, ws.get(), bytes, nullptr, path) == Status::kSuccess);
    LORY_TEST_SYNC();
    for (int64_t c0 : windows) {
      auto got = download_window(out.get(), S, stride, c0, n);
      auto Wwin = periodic_window(wpat, pw, E, c0, n);
      std::vector<T> want(got.size());
      lory::MergeForwardArgs<T, float> h = a;
      h.params = n;
      h.W = Wwin.data();
      h.expert_stride = n;
      h.weights = weights.data();
      h.Wbar = want.data();
      h.segment_stride = n;
      REQUIRE(lory::reference::merge_forward<double>(h) == Status::kSuccess);
      INFO("window at column " << c0);
      CHECK(count_nan(got) == 0);
      CHECK(rel_error(got, want) <= tolerance<T>());
    }
    // The stride gap after row 0 is never written.
    auto gap = download_window(out.get(), 1, stride, P, stride - P);
    CHECK(count_nan(gap) == stride - P);
  }

  // Backward: the forward's output buffer now holds G. The fused kernel on both paths (E = 3,
  // aligned views), then the cuBLAS GEMM method (lory/merge_gemm.cuh: int sizes, operands past
  // 2^31 elements).
  DeviceBuffer<T>& G = out;
  fill_device_periodic(G.get(), S, P, stride, gpat, pg);
  DeviceBuffer<T> dW(static_cast<size_t>(E * stride));
  DeviceBuffer<float> de(static_cast<size_t>(S * E));
  cublasHandle_t handle = nullptr;  // on the default stream
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  for (int run = 0; run < 3; ++run) {
    const bool gemm = run == 2;
    const MergePath path = run == 0 ? MergePath::kSimt : MergePath::kTensorCore;
    INFO("backward " << (gemm ? std::string("GEMM method") : "path " + std::to_string(static_cast<int>(path))));
    LORY_TEST_CUDA(cudaMemset(dW.get(), 0xff, E * stride * sizeof(T)));
    LORY_TEST_CUDA(cudaMemset(de.get(), 0xff, S * E * sizeof(float)));
    lory::MergeBackwardArgs<T, float> b;
    b.num_segments = S;
    b.experts = E;
    b.params = P;
    b.G = G.get();
    b.grad_segment_stride = stride;
    b.W = W.get();
    b.expert_stride = stride;
    b.weights = dweights.get();
    b.dW = dW.get();
    b.dW_expert_stride = stride;
    b.d_weights = de.get();
    CHECK(lory::detail::merge_backward_uses_tc(b, path) == (path == MergePath::kTensorCore));
    auto launch = [&](void* w, size_t& bytes) {
      return gemm ? lory::merge_backward(b, lory::MergeBackwardMethod::kGemm, w, bytes, handle, nullptr)
                  : lory::detail::merge_backward_on_path(b, w, bytes, nullptr, path);
    };
    size_t bytes = 0;
    REQUIRE(launch(nullptr, bytes) == Status::kSuccess);
    auto ws = stale_workspace(bytes);
    REQUIRE(launch(ws.get(), bytes) == Status::kSuccess);
    LORY_TEST_SYNC();
    for (int64_t c0 : windows) {
      auto got = download_window(dW.get(), E, stride, c0, n);
      auto Gwin = periodic_window(gpat, pg, S, c0, n);
      std::vector<T> want(got.size());
      lory::MergeBackwardArgs<T, float> h;
      h.num_segments = S;
      h.experts = E;
      h.params = n;
      h.G = Gwin.data();
      h.grad_segment_stride = n;
      h.weights = weights.data();
      h.dW = want.data();
      h.dW_expert_stride = n;
      REQUIRE(lory::reference::merge_backward<double>(h) == Status::kSuccess);
      INFO("dW window at column " << c0);
      CHECK(count_nan(got) == 0);
      CHECK(rel_error(got, want) <= tolerance<T>());
    }
    // d_weights[s][e] = sum_j gpat[s][j % pg] * wpat[e][j % pw]: whole periods of pg * pw, then the rest.
    const int64_t L = int64_t(pg) * pw, full = P / L, rest = P % L;
    std::vector<double> want_de(S * E);
    for (int64_t s = 0; s < S; ++s)
      for (int e = 0; e < E; ++e) {
        double cycle = 0, tail = 0;
        for (int64_t j = 0; j < L; ++j) {
          const double prod = lory::to_double(gpat[s * pg + j % pg]) * lory::to_double(wpat[e * pw + j % pw]);
          cycle += prod;
          if (j < rest) tail += prod;
        }
        want_de[s * E + e] = cycle * full + tail;
      }
    auto got_de = de.download();
    INFO("d_weights over 1.1e9 columns");
    CHECK(count_nan(got_de) == 0);
    CHECK(rel_error(got_de, want_de) <= 1e-3);
  }
  cublasDestroy(handle);
}
