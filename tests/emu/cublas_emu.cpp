// The cuBLAS calls the library and tests make, for the CPU emulator of the
// kernels (cuda_emu.hpp): handles, stream and pointer-mode bookkeeping, and
// GEMMs written from cuBLAS' documented column-major contract,
//   C_i = alpha op(A_i) op(B_i) + beta C_i,  op(X) = X or X^T,
//   X[r, c] at X + r + c * ld,  batch i at X + i * stride,
// with fp32 compute (products summed in double, rounded once to the C type).
// Only CUBLAS_COMPUTE_32F, host pointer mode and the type combinations cuBLAS
// takes are modelled; anything else returns CUBLAS_STATUS_NOT_SUPPORTED, so an
// unmodelled call fails loudly.
#include "emu/cuda_emu.hpp"

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Handle {
  cudaStream_t stream = nullptr;
  cublasPointerMode_t mode = CUBLAS_POINTER_MODE_HOST;
};

double load(const void* p, cudaDataType_t t, long long i) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_16F: return __half2float(static_cast<const __half*>(p)[i]);
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return NAN;
  }
}

void store(void* p, cudaDataType_t t, long long i, float v) {
  switch (t) {
    case CUDA_R_32F: static_cast<float*>(p)[i] = v; break;
    case CUDA_R_16F: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: break;
  }
}

// f(handle state), or NOT_INITIALIZED for a null handle.
template <class F>
cublasStatus_t with_handle(cublasHandle_t handle, F f) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  f(*reinterpret_cast<Handle*>(handle));
  return CUBLAS_STATUS_SUCCESS;
}

bool supported(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF; }

// The type combinations cuBLAS' GemmEx takes with CUBLAS_COMPUTE_32F among these types: A and B
// of one type, C of that type or fp32 (cuBLAS docs, cublasGemmEx: "16F, 16F, 16F/32F", "16BF,
// 16BF, 16BF/32F", "32F, 32F, 32F"). Anything else is refused, as the real library would.
bool supported(cudaDataType_t a, cudaDataType_t b, cudaDataType_t c) {
  return supported(a) && a == b && (c == a || c == CUDA_R_32F);
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  *handle = reinterpret_cast<cublasHandle_t>(new Handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  delete reinterpret_cast<Handle*>(handle);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  return with_handle(handle, [&](Handle& h) { h.stream = stream; });
}
cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t* stream) {
  return with_handle(handle, [&](Handle& h) { *stream = h.stream; });
}
cublasStatus_t cublasSetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode) {
  return with_handle(handle, [&](Handle& h) { h.mode = mode; });
}
cublasStatus_t cublasGetPointerMode(cublasHandle_t handle, cublasPointerMode_t* mode) {
  return with_handle(handle, [&](Handle& h) { *mode = h.mode; });
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void*, size_t) {
  return handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* A,
                                          cudaDataType_t Atype, int lda, long long strideA, const void* B,
                                          cudaDataType_t Btype, int ldb, long long strideB, const void* beta, void* C,
                                          cudaDataType_t Ctype, int ldc, long long strideC, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (reinterpret_cast<Handle*>(handle)->mode != CUBLAS_POINTER_MODE_HOST || compute != CUBLAS_COMPUTE_32F ||
      !supported(Atype, Btype, Ctype) || transa == CUBLAS_OP_C || transb == CUBLAS_OP_C)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool ta = transa == CUBLAS_OP_T, tb = transb == CUBLAS_OP_T;
  if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) ||
      ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  std::vector<double> opA(size_t(m) * k), opB(size_t(k) * n);  // op(A) row-major [m][k], op(B)^T [n][k]
  for (long long i = 0; i < batch; ++i) {
    for (int r = 0; r < m; ++r)
      for (int l = 0; l < k; ++l)
        opA[size_t(r) * k + l] = load(A, Atype, i * strideA + (ta ? l + (long long)r * lda : r + (long long)l * lda));
    for (int c = 0; c < n; ++c)
      for (int l = 0; l < k; ++l)
        opB[size_t(c) * k + l] = load(B, Btype, i * strideB + (tb ? c + (long long)l * ldb : l + (long long)c * ldb));
    for (int c = 0; c < n; ++c)
      for (int r = 0; r < m; ++r) {
        const double* x = opA.data() + size_t(r) * k;
        const double* y = opB.data() + size_t(c) * k;
        double s = 0;
        for (int l = 0; l < k; ++l) s += x[l] * y[l];
        const long long ci = i * strideC + r + (long long)c * ldc;
        // beta == 0: C is not read (it may hold NaN), as in cuBLAS.
        const double old = b == 0.f ? 0.0 : double(b) * load(C, Ctype, ci);
        store(C, Ctype, ci, static_cast<float>(double(a) * s + old));
      }
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  return cublasGemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta,
                                    C, Ctype, ldc, 0, 1, compute, algo);
}

}  // extern "C"
