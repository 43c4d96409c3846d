// lory: rounding an fp32 matrix once to the storage dtype -- arguments and validation, shared by
// the CUDA launcher (lory/round_to_storage.cuh) and the CPU twin (lory/reference/round_to_storage.hpp).
// The layer plan accumulates y and dx in fp32 across slices of f and rounds them with this once.
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/validate.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

// dst [rows, cols] (T) = src [rows, cols] (fp32), each value rounded once to T as store_as does
// (round to nearest even). Row strides in elements; src and dst may not overlap.
template <class T>
struct RoundToStorageArgs {
  int64_t rows = 0, cols = 0;
  const float* src = nullptr; int64_t src_stride = 0;
  T* dst = nullptr;           int64_t dst_stride = 0;
};

template <class T>
Status validate(const RoundToStorageArgs<T>& a) {
  detail::clear_error_detail();
  using detail::fail;
  if (a.rows <= 0 || a.cols <= 0) return fail(Status::kErrorInvalidSize, "rows or cols", "not positive");
  if (!a.src) return fail(Status::kErrorNullPointer, "src", "is null");
  if (!a.dst) return fail(Status::kErrorNullPointer, "dst", "is null");
  if (a.src_stride < a.cols) return fail(Status::kErrorInvalidShape, "src_stride", "below cols");
  if (a.dst_stride < a.cols) return fail(Status::kErrorInvalidShape, "dst_stride", "below cols");
  if (!detail::mul_fits(a.rows, a.src_stride)) return fail(Status::kErrorInvalidSize, "src_stride", "rows * stride overflows int64");
  if (!detail::mul_fits(a.rows, a.dst_stride)) return fail(Status::kErrorInvalidSize, "dst_stride", "rows * stride overflows int64");
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.src, "src"));
  LORY_RETURN_IF_ERROR(detail::check_aligned(a.dst, "dst"));
  const detail::Operand outputs[] = {{"dst", detail::view_range(a.dst, a.rows, a.cols, a.dst_stride)}};
  const detail::Operand inputs[] = {{"src", detail::view_range(a.src, a.rows, a.cols, a.src_stride)}};
  return detail::check_aliasing(outputs, inputs);
}

LORY_NAMESPACE_END
