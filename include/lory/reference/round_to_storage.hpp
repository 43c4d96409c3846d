// lory CPU twin: dst = src rounded once to the storage dtype (see lory/round_to_storage.hpp).
#pragma once
#include "lory/dtype.hpp"
#include "lory/round_to_storage.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {

template <class T>
Status round_to_storage(const RoundToStorageArgs<T>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t c = 0; c < a.cols; ++c) a.dst[r * a.dst_stride + c] = store_as<T>(a.src[r * a.src_stride + c]);
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
