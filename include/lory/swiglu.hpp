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
inline Status validate_view(int64_t rows, int64_t cols, int64_t stride, const char* stride_name) {
  if (stride < cols) return fail(Status::kErrorInvalidShape, stride_name, "below cols");
  if (!mul_fits(rows, stride)) return fail(Status::kErrorInvalidSize, stride_name, "rows * stride overflows int64");
  return Status::kSuccess;
}
template <class T>
inline Status validate_operand(const T* p, const char* name, int64_t rows, int64_t cols, int64_t stride,
                               const char* stride_name) {
  if (!p) return fail(Status::kErrorNullPointer, name, "is null");
  LORY_RETURN_IF_ERROR(validate_view(rows, cols, stride, stride_name));
  return check_aligned(p, name);
}
inline Status validate_extent(int64_t rows, int64_t cols) {
  if (rows <= 0) return fail(Status::kErrorInvalidSize, "rows", "not positive");
  if (cols <= 0) return fail(Status::kErrorInvalidSize, "cols", "not positive");
  return Status::kSuccess;
}
}  // namespace detail

// Aliasing: elementwise, so m may be a or u itself (same pointer and stride: in place); no other
// overlap is allowed.
template <class T>
Status validate(const SwigluForwardArgs<T>& a) {
  detail::clear_error_detail();
  LORY_RETURN_IF_ERROR(detail::validate_extent(a.rows, a.cols));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.a, "a", a.rows, a.cols, a.a_stride, "a_stride"));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.u, "u", a.rows, a.cols, a.u_stride, "u_stride"));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.m, "m", a.rows, a.cols, a.m_stride, "m_stride"));
  const detail::ByteRange rm = detail::view_range(a.m, a.rows, a.cols, a.m_stride);
  LORY_RETURN_IF_ERROR(detail::check_no_alias(rm, "m", detail::view_range(a.a, a.rows, a.cols, a.a_stride),
                                              a.m == a.a && a.m_stride == a.a_stride));
  return detail::check_no_alias(rm, "m", detail::view_range(a.u, a.rows, a.cols, a.u_stride),
                                a.m == a.u && a.m_stride == a.u_stride);
}

// Aliasing: da may be a, u or dm itself, and du likewise (same pointer and stride: in place);
// da and du must not overlap each other, except side by side with one row stride (the column blocks
// [da | du] of one [rows, 2 cols] matrix: no element shared), and no other overlap is allowed.
template <class T>
Status validate(const SwigluBackwardArgs<T>& a) {
  detail::clear_error_detail();
  LORY_RETURN_IF_ERROR(detail::validate_extent(a.rows, a.cols));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.a, "a", a.rows, a.cols, a.a_stride, "a_stride"));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.u, "u", a.rows, a.cols, a.u_stride, "u_stride"));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.dm, "dm", a.rows, a.cols, a.dm_stride, "dm_stride"));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.da, "da", a.rows, a.cols, a.da_stride, "da_stride"));
  LORY_RETURN_IF_ERROR(detail::validate_operand(a.du, "du", a.rows, a.cols, a.du_stride, "du_stride"));
  struct View { const char* name; const T* p; int64_t stride; };
  const View ins[3] = {{"a", a.a, a.a_stride}, {"u", a.u, a.u_stride}, {"dm", a.dm, a.dm_stride}};
  const View outs[2] = {{"da", a.da, a.da_stride}, {"du", a.du, a.du_stride}};
  for (const View& o : outs) {
    const detail::ByteRange ro = detail::view_range(o.p, a.rows, a.cols, o.stride);
    for (const View& i : ins) {
      const bool same = o.p == i.p && o.stride == i.stride;
      LORY_RETURN_IF_ERROR(detail::check_no_alias(ro, o.name, detail::view_range(i.p, a.rows, a.cols, i.stride), same));
    }
  }
  if (a.da_stride == a.du_stride && detail::views_side_by_side(a.da, a.du, a.cols, a.da_stride))
    return Status::kSuccess;
  return detail::check_no_alias(detail::view_range(a.du, a.rows, a.cols, a.du_stride), "du",
                                detail::view_range(a.da, a.rows, a.cols, a.da_stride));
}

LORY_NAMESPACE_END
