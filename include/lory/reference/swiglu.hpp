// lory CPU twin: SwiGLU forward and backward (arguments, aliasing rules and
// validation: lory/swiglu.hpp), computed element by element with the same
// host-and-device formulas the kernels use (lory/math.hpp).
//
//   - validate() first: on bad arguments the error is returned and no memory is
//     read or written.
//   - Each element is loaded into Acc, computed in Acc and stored to T once:
//     Acc = float is the GPU's arithmetic (the CPU backend of the MoE FFN plan
//     uses it); Acc = double is the reference the GPU tests compare against.
//   - Only the [rows, cols] elements of each output view are written; the
//     padding between rows (stride > cols) is left alone.
//   - In place (an output equal to an input, as validate() allows) works: each
//     element's inputs are read before its outputs are written.
#pragma once
#include <cstdint>

#include "lory/dtype.hpp"
#include "lory/math.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {

// The element formulas are lory::swiglu_forward / lory::swiglu_backward of lory/math.hpp, called
// qualified: unqualified, lookup inside this namespace would find the twins below instead.
template <class Acc = double, class T>
Status swiglu_forward(const SwigluForwardArgs<T>& p) {
  LORY_RETURN_IF_ERROR(validate(p));
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) {
      const Acc a = load_as<Acc>(p.a[r * p.a_stride + c]);
      const Acc u = load_as<Acc>(p.u[r * p.u_stride + c]);
      p.m[r * p.m_stride + c] = store_as<T>(LORY_NS_QUALIFIER::swiglu_forward(a, u));
    }
  return Status::kSuccess;
}

template <class Acc = double, class T>
Status swiglu_backward(const SwigluBackwardArgs<T>& p) {
  LORY_RETURN_IF_ERROR(validate(p));
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) {
      const Acc a = load_as<Acc>(p.a[r * p.a_stride + c]);
      const Acc u = load_as<Acc>(p.u[r * p.u_stride + c]);
      const Acc dm = load_as<Acc>(p.dm[r * p.dm_stride + c]);
      Acc da, du;
      LORY_NS_QUALIFIER::swiglu_backward(a, u, dm, da, du);
      p.da[r * p.da_stride + c] = store_as<T>(da);
      p.du[r * p.du_stride + c] = store_as<T>(du);
    }
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
