// lory: host-and-device math shared by the kernels and the CPU twin.
//
// Every function here is templated on the arithmetic type (float on the GPU,
// float or double in the CPU twin) so that the CPU tests run the very formulas
// the kernels run.
#pragma once
#include <cmath>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/dtype.hpp"

LORY_NAMESPACE_BEGIN

template <class A> LORY_HOST_DEVICE LORY_FORCEINLINE A math_exp(A x) { return std::exp(x); }
#if defined(__CUDA_ARCH__)
template <> LORY_DEVICE LORY_FORCEINLINE float math_exp<float>(float x) { return __expf(x); }
#endif

// sigmoid(a) = 1 / (1 + exp(-a)), evaluated without overflow for large |a|.
template <class A> LORY_HOST_DEVICE LORY_FORCEINLINE A sigmoid(A a) {
  if (a >= A(0)) return A(1) / (A(1) + math_exp(-a));
  const A z = math_exp(a);
  return z / (A(1) + z);
}

// silu(a) = a * sigmoid(a)
template <class A> LORY_HOST_DEVICE LORY_FORCEINLINE A silu(A a) { return a * sigmoid(a); }

// d silu / da = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
template <class A> LORY_HOST_DEVICE LORY_FORCEINLINE A silu_grad(A a) {
  const A s = sigmoid(a);
  return s * (A(1) + a * (A(1) - s));
}

// SwiGLU forward for one element: m = silu(a) * u.
template <class A> LORY_HOST_DEVICE LORY_FORCEINLINE A swiglu_forward(A a, A u) { return silu(a) * u; }

// SwiGLU backward for one element, given dm = dL/dm:
//   du = dm * silu(a),  da = dm * u * silu'(a).
template <class A>
LORY_HOST_DEVICE LORY_FORCEINLINE void swiglu_backward(A a, A u, A dm, A& da, A& du) {
  const A s = sigmoid(a);
  du = dm * a * s;
  da = dm * u * s * (A(1) + a * (A(1) - s));
}

// Numerically stable softmax over n values (max m subtracted first). Special values:
//   - NaN in the logits propagates to every probability; it never crashes or hangs.
//   - +Inf logits take the limit: the +Inf entries share the mass equally (one-hot for a single
//     one), every finite entry gets 0. exp(v - m) would be exp(Inf - Inf) = NaN there, so an entry
//     equal to the max contributes exp(0) = 1 directly, which changes nothing for finite logits.
//   - all logits -Inf: they are all equal, so the probabilities are uniform (also the limit).
// softmax_term is the per-entry rule shared with the GPU's BlockRowSoftmax.
template <class A>
LORY_HOST_DEVICE LORY_FORCEINLINE A softmax_term(A v, A m) {
  return v == m ? A(1) : math_exp(v - m);
}

template <class A>
LORY_HOST_DEVICE inline void softmax(const A* logits, A* probs, int n) {
  A m = logits[0];
  for (int i = 1; i < n; ++i) m = (logits[i] > m || logits[i] != logits[i]) ? logits[i] : m;
  A sum = A(0);
  for (int i = 0; i < n; ++i) {
    probs[i] = softmax_term(logits[i], m);
    sum += probs[i];
  }
  const A inv = A(1) / sum;
  for (int i = 0; i < n; ++i) probs[i] *= inv;
}

// Softmax backward, dz_i = p_i * (dp_i - <p, dp>), in a form that does not cancel. The formula is
// invariant to adding a constant c to dp (sum p = 1); with c = dp_m of the most probable expert m,
//   dz_i = p_i * ((dp_i - c) - sum_j p_j (dp_j - c)),
// the m term of the sum is exactly 0, so dz_m = -p_m * sum_{j != m} p_j (dp_j - c) is formed from
// the small probabilities themselves instead of from 1 - p_m, which fp32 rounds to 0 once p_m is
// within 6e-8 of 1 (dz would then stop summing to zero over the experts). Equal dp (identical
// experts) give dz = 0 exactly. The first index of the largest p is m (ties: the lowest index), the
// GPU's BlockRowSoftmax::backward uses the same rule. dz may alias dp.
template <class A>
LORY_HOST_DEVICE inline int softmax_argmax(const A* p, int n) {
  int m = 0;
  for (int i = 1; i < n; ++i) m = p[i] > p[m] ? i : m;
  return m;
}

template <class A>
LORY_HOST_DEVICE inline void softmax_backward(const A* p, const A* dp, A* dz, int n) {
  const A c = dp[softmax_argmax(p, n)];
  A dot = A(0);
  for (int i = 0; i < n; ++i) dot += p[i] * (dp[i] - c);
  for (int i = 0; i < n; ++i) dz[i] = p[i] * ((dp[i] - c) - dot);
}

// Weighted merge of one parameter element over E experts:
//   wbar = sum_e weights[e] * W[e * expert_stride]
// accumulated in Acc (float on the GPU). T is the storage dtype.
template <class Acc, class T, class WeightT>
LORY_HOST_DEVICE LORY_FORCEINLINE Acc merge_element(const T* W, int64_t expert_stride,
                                                    const WeightT* weights, int E) {
  Acc acc = Acc(0);
  for (int e = 0; e < E; ++e)
    acc += static_cast<Acc>(weights[e]) * load_as<Acc>(W[static_cast<int64_t>(e) * expert_stride]);
  return acc;
}

// Integer helpers used for tiling and segment bookkeeping.
template <class I> LORY_HOST_DEVICE constexpr I ceil_div(I a, I b) { return (a + b - 1) / b; }

LORY_NAMESPACE_END
