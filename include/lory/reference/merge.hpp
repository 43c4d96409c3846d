// lory CPU twin: the expert merge and its backward pass (see lory/merge.hpp),
// on the same 2-D views (rows x params per expert / segment, row pitches).
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
  const int64_t w_pitch = a.rows > 1 ? a.W_row_pitch : 0, wbar_pitch = a.rows > 1 ? a.Wbar_row_pitch : 0;
  for (int64_t s = 0; s < a.num_segments; ++s) {
    const R* w = a.weights + s * a.experts;
    for (int64_t r = 0; r < a.rows; ++r) {
      T* out = a.Wbar + s * a.segment_stride + r * wbar_pitch;
      const T* in = a.W + r * w_pitch;
      for (int64_t j = 0; j < a.params; ++j) {
        Acc acc = Acc(0);
        for (int e = 0; e < a.experts; ++e)
          acc += static_cast<Acc>(w[e]) * load_as<Acc>(in[e * a.expert_stride + j]);
        out[j] = store_as<T>(acc);
      }
    }
  }
  return Status::kSuccess;
}

template <class Acc = double, class T, class R>
Status merge_backward(const MergeBackwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const int E = a.experts;
  const bool many = a.rows > 1;
  const int64_t g_pitch = many ? a.G_row_pitch : 0, w_pitch = many ? a.W_row_pitch : 0,
                dw_pitch = many ? a.dW_row_pitch : 0;
  if (a.dW) {
    for (int e = 0; e < E; ++e)
      for (int64_t r = 0; r < a.rows; ++r) {
        T* out = a.dW + e * a.dW_expert_stride + r * dw_pitch;
        const T* g = a.G + r * g_pitch;
        for (int64_t j = 0; j < a.params; ++j) {
          Acc acc = a.accumulate_dW ? load_as<Acc>(out[j]) : Acc(0);
          for (int64_t s = 0; s < a.num_segments; ++s)
            acc += static_cast<Acc>(a.weights[s * E + e]) * load_as<Acc>(g[s * a.grad_segment_stride + j]);
          out[j] = store_as<T>(acc);
        }
      }
  }
  if (a.d_weights) {
    for (int64_t s = 0; s < a.num_segments; ++s)
      for (int e = 0; e < E; ++e) {
        Acc acc = Acc(0);
        for (int64_t r = 0; r < a.rows; ++r) {
          const T* g = a.G + s * a.grad_segment_stride + r * g_pitch;
          const T* w = a.W + e * a.expert_stride + r * w_pitch;
          for (int64_t j = 0; j < a.params; ++j) acc += load_as<Acc>(g[j]) * load_as<Acc>(w[j]);
        }
        R& out = a.d_weights[s * E + e];
        out = static_cast<R>(a.accumulate_d_weights ? static_cast<Acc>(out) + acc : acc);
      }
  }
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
