// lory: SwiGLU activation m = silu(a) * u and its backward pass -- arguments
// and validation shared by the CUDA launchers (swiglu.cuh) and the CPU twin.
//
// Operands are [rows, cols] views with their own row strides, so the gate and
// up halves of one fused [tokens, 2f] GEMM output can be passed directly
// (a = out, u = out + f, both with stride 2f). Contiguous vectors: rows = 1.
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

template <class T>
struct SwigluForwardArgs {
  int64_t rows = 0, cols = 0;
  const T* a = nullptr; int64_t a_stride = 0;  // gate pre-activation
  const T* u = nullptr; int64_t u_stride = 0;  // up projection
  T* m = nullptr;       int64_t m_stride = 0;  // output silu(a) * u
};

template <class T>
struct SwigluBackwardArgs {
  int64_t rows = 0, cols = 0;
  const T* a = nullptr;  int64_t a_stride = 0;
  const T* u = nullptr;  int64_t u_stride = 0;
  const T* dm = nullptr; int64_t dm_stride = 0;  // dL/dm
  T* da = nullptr;       int64_t da_stride = 0;  // output dL/da
  T* du = nullptr;       int64_t du_stride = 0;  // output dL/du
};

namespace detail {
inline Status validate_view(int64_t rows, int64_t cols, int64_t stride) {
  if (stride < cols) return Status::kErrorInvalidShape;
  if (!mul_fits(rows, stride)) return Status::kErrorInvalidSize;
  return Status::kSuccess;
}
}  // namespace detail

template <class T>
Status validate(const SwigluForwardArgs<T>& a) {
  if (a.rows <= 0 || a.cols <= 0) return Status::kErrorInvalidSize;
  if (!a.a || !a.u || !a.m) return Status::kErrorNullPointer;
  LORY_RETURN_IF_ERROR(detail::validate_view(a.rows, a.cols, a.a_stride));
  LORY_RETURN_IF_ERROR(detail::validate_view(a.rows, a.cols, a.u_stride));
  return detail::validate_view(a.rows, a.cols, a.m_stride);
}

template <class T>
Status validate(const SwigluBackwardArgs<T>& a) {
  if (a.rows <= 0 || a.cols <= 0) return Status::kErrorInvalidSize;
  if (!a.a || !a.u || !a.dm || !a.da || !a.du) return Status::kErrorNullPointer;
  LORY_RETURN_IF_ERROR(detail::validate_view(a.rows, a.cols, a.a_stride));
  LORY_RETURN_IF_ERROR(detail::validate_view(a.rows, a.cols, a.u_stride));
  LORY_RETURN_IF_ERROR(detail::validate_view(a.rows, a.cols, a.dm_stride));
  LORY_RETURN_IF_ERROR(detail::validate_view(a.rows, a.cols, a.da_stride));
  return detail::validate_view(a.rows, a.cols, a.du_stride);
}

LORY_NAMESPACE_END
