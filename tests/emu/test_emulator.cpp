// Tests of the CPU emulator itself: it must catch what it claims to catch
// (a missing barrier, uninitialised shared memory, an oversized launch) and
// compute the warp collectives the kernels rely on correctly.
#include "emu/cuda_emu.hpp"

#include <cublas_v2.h>

#include <cmath>
#include <vector>

#include "common/catch.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge_mma.cuh"

namespace {

namespace detail = lory::detail;

constexpr int kThreads = 64;

// Thread i writes slot i, then reads slot (i + shift) % n written by another thread.
template <bool kBarrier>
void neighbour_kernel(float* out, int shift) {
  LORY_DYNAMIC_SMEM(smem);
  float* slot = reinterpret_cast<float*>(smem);
  const int i = static_cast<int>(threadIdx.x);
  slot[i] = float(i);
  if (kBarrier) __syncthreads();
  out[i] = slot[(i + shift) % kThreads];
}

template <bool kBarrier>
int stale_reads(int shift) {
  std::vector<float> out(kThreads, -1.f);
  detail::launch_kernel(neighbour_kernel<kBarrier>, dim3(1), dim3(kThreads), kThreads * sizeof(float), nullptr,
                        out.data(), shift);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  int stale = 0;
  for (int i = 0; i < kThreads; ++i)
    if (!(out[i] == float((i + shift) % kThreads))) ++stale;  // NaN poison or a wrong value
  return stale;
}

TEST_CASE("emulator: a missing __syncthreads reads poisoned shared memory", "[emu]") {
  // Threads run in index order (reverse with LORY_EMU_ORDER=reverse): reading a later
  // thread's slot (shift 1) is stale in index order, an earlier one's (shift n - 1) in reverse.
  CHECK(stale_reads<true>(1) == 0);
  CHECK(stale_reads<true>(kThreads - 1) == 0);
  CHECK(stale_reads<false>(1) + stale_reads<false>(kThreads - 1) > 0);
}

// C (16x8) = A (16x16) B (16x8) through ldmatrix (A row-major; B stored k-major, read
// transposed) and one mma, against a scalar product.
// cp.async: thread i copies element i of src into shared memory (16-byte copies of 4 floats,
// the second half of each zero-filled: src-size 8), then reads its neighbour's copy. kMode 0: no
// wait; 1: wait_group 1 with one group in flight (the copy is still pending); 2: wait_group 0
// and a barrier (correct).
template <int kMode>
void cp_async_kernel(const float* src, float* out) {
  LORY_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  const int i = static_cast<int>(threadIdx.x);
  detail::cp_async_16(s + 4 * i, src + 4 * i, 8);
  detail::cp_async_commit();
  if (kMode == 1) detail::cp_async_wait<1>();
  if (kMode == 2) detail::cp_async_wait<0>();
  __syncthreads();
  const int j = (i + 1) % kThreads;
  for (int k = 0; k < 4; ++k) out[4 * i + k] = s[4 * j + k];
  __syncthreads();  // no thread exits (which completes its copies) before every read is done
}

template <int kMode>
int cp_async_wrong() {
  std::vector<float> src(4 * kThreads), out(4 * kThreads, -1.f);
  for (int i = 0; i < 4 * kThreads; ++i) src[i] = float(i + 1);
  detail::launch_kernel(cp_async_kernel<kMode>, dim3(1), dim3(kThreads), 4 * kThreads * sizeof(float), nullptr,
                        src.data(), out.data());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  int wrong = 0;
  for (int i = 0; i < kThreads; ++i) {
    const int j = (i + 1) % kThreads;
    for (int k = 0; k < 4; ++k)
      if (!(out[4 * i + k] == (k < 2 ? src[4 * j + k] : 0.f))) ++wrong;
  }
  return wrong;
}

template <class T>
void mma_kernel(const float* a, const float* b, float* c) {
  LORY_DYNAMIC_SMEM(smem);
  T* as = reinterpret_cast<T*>(smem);  // [16][16]
  T* bs = as + 256;                    // [16 (k)][8 (n)], rows padded to 8 elements = 16 bytes
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) as[i] = lory::from_float<T>(a[i]);
  for (int i = lane; i < 128; i += 32) bs[i] = lory::from_float<T>(b[i]);
  __syncwarp();
  uint32_t af[4], bf[4];
  detail::ldmatrix_x4(af, as + (lane % 16) * 16 + (lane / 16) * 8);
  detail::ldmatrix_x4_trans(bf, bs + (lane % 16) * 8);  // matrices 0, 1: k 0-7, 8-15 (x4: 2, 3 repeat them)
  const uint32_t b2[2] = {bf[0], bf[1]};
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  detail::mma_16816<T>(d, af, b2);
  const int g = lane / 4, t = lane % 4;
  c[g * 8 + 2 * t] = d[0];
  c[g * 8 + 2 * t + 1] = d[1];
  c[(g + 8) * 8 + 2 * t] = d[2];
  c[(g + 8) * 8 + 2 * t + 1] = d[3];
}

template <class T>
void check_mma() {
  std::vector<float> a(256), b(128), c(128, NAN);
  for (int i = 0; i < 256; ++i) a[i] = float((i * 7) % 13 - 6) / 4.f;  // exact in fp16 and bf16
  for (int i = 0; i < 128; ++i) b[i] = float((i * 5) % 11 - 5) / 2.f;
  detail::launch_kernel(mma_kernel<T>, dim3(1), dim3(32), 384 * sizeof(T), nullptr, a.data(), b.data(), c.data());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double want = 0;
      for (int k = 0; k < 16; ++k) want += double(a[m * 16 + k]) * b[k * 8 + n];
      INFO("C[" << m << "][" << n << "]");
      CHECK(c[m * 8 + n] == float(want));
    }
}

TEST_CASE("emulator: ldmatrix + mma.sync m16n8k16 give the matrix product", "[emu]") {
  check_mma<__nv_bfloat16>();
  check_mma<__half>();
}

void shfl_kernel(float* out) {
  float v = float(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

TEST_CASE("emulator: cp.async lands only at the issuing thread's wait_group", "[emu]") {
  CHECK(cp_async_wrong<0>() == 4 * kThreads);  // never waited: every read sees poison
  CHECK(cp_async_wrong<1>() == 4 * kThreads);  // the one group may still be in flight
  CHECK(cp_async_wrong<2>() == 0);             // waited and synchronised: the data, zero-filled past src-size
}

TEST_CASE("emulator: a butterfly of __shfl_xor_sync sums the warp", "[emu]") {
  std::vector<float> out(64, 0.f);
  detail::launch_kernel(shfl_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  for (int i = 0; i < 64; ++i) CHECK(out[i] == float(i < 32 ? 496 : 32 * 32 + 496));
}

void noop_kernel(int) {}

TEST_CASE("emulator: launch limits and poisoned allocations", "[emu]") {
  detail::launch_kernel(noop_kernel, dim3(1), dim3(2048), 0, nullptr, 0);  // > 1024 threads
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  detail::launch_kernel(noop_kernel, dim3(1), dim3(32), 64 * 1024, nullptr, 0);  // > 48 KB without the attribute
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(&noop_kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             64 * 1024) == cudaSuccess);
  detail::launch_kernel(noop_kernel, dim3(1), dim3(32), 64 * 1024, nullptr, 0);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(&noop_kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             200 * 1024) != cudaSuccess);  // past sm_80's 163 KB
  (void)cudaGetLastError();
  float* p = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&p), 4 * sizeof(float)) == cudaSuccess);
  for (int i = 0; i < 4; ++i) CHECK(std::isnan(p[i]));
  cudaFree(p);
}

}  // namespace

// The emulated cuBLAS takes only the type combinations the real one does (A and B of one type, C of
// that type or fp32), so a call the real library would refuse fails here too.
TEST_CASE("emulator: cublasGemmEx refuses type combinations cuBLAS does not take", "[emu]") {
  cublasHandle_t h = nullptr;
  REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
  const float one = 1.f, zero = 0.f;
  float a32[4] = {1, 2, 3, 4}, c32[4] = {};
  __nv_bfloat16 a16[4], c16[4];
  for (int i = 0; i < 4; ++i) a16[i] = __float2bfloat16_rn(a32[i]);
  auto gemm = [&](const void* A, cudaDataType_t ta, const void* B, cudaDataType_t tb, void* C, cudaDataType_t tc) {
    return cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, A, ta, 2, B, tb, 2, &zero, C, tc, 2,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  CHECK(gemm(a16, CUDA_R_16BF, a16, CUDA_R_16BF, c16, CUDA_R_16BF) == CUBLAS_STATUS_SUCCESS);
  CHECK(gemm(a16, CUDA_R_16BF, a16, CUDA_R_16BF, c32, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  // [1 3; 2 4]^2 column-major = [7 15; 10 22]
  CHECK(c32[0] == 7.f);
  CHECK(c32[3] == 22.f);
  CHECK(gemm(a32, CUDA_R_32F, a32, CUDA_R_32F, c32, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  CHECK(gemm(a16, CUDA_R_16BF, a32, CUDA_R_32F, c32, CUDA_R_32F) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(a32, CUDA_R_32F, a32, CUDA_R_32F, c16, CUDA_R_16BF) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(a16, CUDA_R_16BF, a16, CUDA_R_16BF, c16, CUDA_R_16F) == CUBLAS_STATUS_NOT_SUPPORTED);
  cublasDestroy(h);
}
