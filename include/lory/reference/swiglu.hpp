// lory CPU twin: SwiGLU forward and backward (see lory/swiglu.hpp), computed
// with the same host-and-device formulas the kernels use (lory/math.hpp).
#pragma once
#include "lory/dtype.hpp"
#include "lory/math.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {

template <class Acc = double, class T>
Status swiglu_forward(const SwigluForwardArgs<T>& p) {
  LORY_RETURN_IF_ERROR(validate(p));
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c)
      p.m[r * p.m_stride + c] = store_as<T>(
          LORY_NS_QUALIFIER::swiglu_forward(load_as<Acc>(p.a[r * p.a_stride + c]), load_as<Acc>(p.u[r * p.u_stride + c])));
  return Status::kSuccess;
}

template <class Acc = double, class T>
Status swiglu_backward(const SwigluBackwardArgs<T>& p) {
  LORY_RETURN_IF_ERROR(validate(p));
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) {
      Acc da, du;
      LORY_NS_QUALIFIER::swiglu_backward(load_as<Acc>(p.a[r * p.a_stride + c]), load_as<Acc>(p.u[r * p.u_stride + c]),
                      load_as<Acc>(p.dm[r * p.dm_stride + c]), da, du);
      p.da[r * p.da_stride + c] = store_as<T>(da);
      p.du[r * p.du_stride + c] = store_as<T>(du);
    }
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
