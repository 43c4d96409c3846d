// lory CPU twin: the expert merge and its backward pass (see lory/merge.hpp).
// Accumulates in Acc (double by default, float to mimic the GPU's fp32).
#pragma once
#include <cstdint>

#include "lory/dtype.hpp"
#include "lory/merge.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {

template <class Acc = double, class T, class R>
Status merge_forward(const MergeForwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  for (int64_t s = 0; s < a.num_segments; ++s) {
    const R* w = a.weights + s * a.experts;
    T* out = a.Wbar + s * a.segment_stride;
    for (int64_t j = 0; j < a.params; ++j) {
      Acc acc = Acc(0);
      for (int e = 0; e < a.experts; ++e)
        acc += static_cast<Acc>(w[e]) * load_as<Acc>(a.W[e * a.expert_stride + j]);
      out[j] = store_as<T>(acc);
    }
  }
  return Status::kSuccess;
}

template <class Acc = double, class T, class R>
Status merge_backward(const MergeBackwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const int E = a.experts;
  if (a.dW) {
    for (int e = 0; e < E; ++e) {
      T* out = a.dW + e * a.dW_expert_stride;
      for (int64_t j = 0; j < a.params; ++j) {
        Acc acc = a.accumulate_dW ? load_as<Acc>(out[j]) : Acc(0);
        for (int64_t s = 0; s < a.num_segments; ++s)
          acc += static_cast<Acc>(a.weights[s * E + e]) * load_as<Acc>(a.G[s * a.grad_segment_stride + j]);
        out[j] = store_as<T>(acc);
      }
    }
  }
  if (a.d_weights) {
    for (int64_t s = 0; s < a.num_segments; ++s) {
      const T* g = a.G + s * a.grad_segment_stride;
      for (int e = 0; e < E; ++e) {
        const T* w = a.W + e * a.expert_stride;
        Acc acc = Acc(0);
        for (int64_t j = 0; j < a.params; ++j) acc += load_as<Acc>(g[j]) * load_as<Acc>(w[j]);
        R& out = a.d_weights[s * E + e];
        out = static_cast<R>(a.accumulate_d_weights ? static_cast<Acc>(out) + acc : acc);
      }
    }
  }
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
