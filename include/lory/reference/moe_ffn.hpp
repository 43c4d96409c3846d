// lory CPU twin: the whole segment-level SwiGLU MoE FFN layer, forward and
// backward (contract in lory/moe_ffn.hpp, math in docs/math.md), composed from the
// router and merge twins and the host-and-device math the kernels use.
// Intermediates (merged weights, activations, gradients) stay in Acc; outputs
// are rounded to T once. The twin allocates its scratch; GPU code never does.
#pragma once
#include <cstdint>
#include <vector>

#include "lory/dtype.hpp"
#include "lory/math.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/router.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {
namespace detail {

// The three expert matrices of each expert side by side in Acc:
// row e = [W_g(e) | W_u(e) | W_d(e)], P = 3 d f values, so one merge call
// (one merge twin) serves all of them.
template <class Acc, class T, class R>
std::vector<Acc> stack_experts(const MoeFfnParams<T, R>& p) {
  const int64_t fd = p.shape.f * p.shape.d, P = p.shape.params_per_expert();
  std::vector<Acc> W(static_cast<size_t>(p.shape.experts * P));
  for (int64_t e = 0; e < p.shape.experts; ++e)
    for (int64_t j = 0; j < fd; ++j) {
      W[e * P + j] = load_as<Acc>(p.W_g[e * fd + j]);
      W[e * P + fd + j] = load_as<Acc>(p.W_u[e * fd + j]);
      W[e * P + 2 * fd + j] = load_as<Acc>(p.W_d[e * fd + j]);
    }
  return W;
}

// Merged weights of one segment: Wbar[P] = sum_e weights[e] * W[e].
template <class Acc, class R>
void merge_segment(const std::vector<Acc>& W, int E, int64_t P, const R* weights, Acc* Wbar) {
  MergeForwardArgs<Acc, R> m;
  m.num_segments = 1;
  m.experts = E;
  m.params = P;
  m.W = W.data();
  m.expert_stride = P;
  m.weights = weights;
  m.Wbar = Wbar;
  m.segment_stride = P;
  (void)merge_forward<Acc>(m);  // arguments valid by construction
}

// a = Wg x, u = Wu x for one token (Wg, Wu [f, d] row-major).
template <class Acc, class T>
void gate_up(const Acc* Wg, const Acc* Wu, const T* x, int64_t d, int64_t f, Acc* xa, Acc* a, Acc* u) {
  for (int64_t j = 0; j < d; ++j) xa[j] = load_as<Acc>(x[j]);
  for (int64_t i = 0; i < f; ++i) {
    Acc sa = Acc(0), su = Acc(0);
    for (int64_t j = 0; j < d; ++j) {
      sa += Wg[i * d + j] * xa[j];
      su += Wu[i * d + j] * xa[j];
    }
    a[i] = sa;
    u[i] = su;
  }
}

}  // namespace detail

template <class Acc = double, class T, class R>
Status moe_ffn_forward(const MoeFfnForwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const MoeFfnParams<T, R>& p = a.p;
  const int E = p.shape.experts;
  const int64_t d = p.shape.d, f = p.shape.f, fd = f * d, P = p.shape.params_per_expert();

  RouterForwardArgs<T, R> r;
  r.layout = p.layout;
  r.d = d;
  r.experts = E;
  r.mode = p.mode;
  r.x = a.x;
  r.W_r = p.W_r;
  r.bias = p.bias;
  r.given_weights = p.given_weights;
  r.hbar = a.hbar;
  r.probs = a.probs;
  r.weights = a.weights;
  LORY_RETURN_IF_ERROR(router_forward<Acc>(r));

  const std::vector<Acc> W = detail::stack_experts<Acc>(p);
  std::vector<Acc> Wbar(static_cast<size_t>(P)), xa(d), av(f), uv(f), m(f);
  for (int64_t s = 0; s < p.layout.num_segments(); ++s) {
    detail::merge_segment(W, E, P, a.weights + s * E, Wbar.data());
    const Acc *Wg = Wbar.data(), *Wu = Wg + fd, *Wd = Wg + 2 * fd;
    const int64_t t0 = p.layout.token_begin(s), t1 = t0 + p.layout.length(s);
    for (int64_t t = t0; t < t1; ++t) {
      detail::gate_up(Wg, Wu, a.x + t * d, d, f, xa.data(), av.data(), uv.data());
      for (int64_t i = 0; i < f; ++i) m[i] = LORY_NS_QUALIFIER::swiglu_forward(av[i], uv[i]);
      for (int64_t j = 0; j < d; ++j) {
        Acc acc = Acc(0);
        for (int64_t i = 0; i < f; ++i) acc += Wd[j * f + i] * m[i];
        a.y[t * d + j] = store_as<T>(acc);
      }
    }
  }
  return Status::kSuccess;
}

template <class Acc = double, class T, class R>
Status moe_ffn_backward(const MoeFfnBackwardArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const MoeFfnParams<T, R>& p = a.p;
  const int E = p.shape.experts;
  const int64_t d = p.shape.d, f = p.shape.f, fd = f * d, P = p.shape.params_per_expert();
  const int64_t S = p.layout.num_segments(), tokens = p.layout.num_tokens();

  const std::vector<Acc> W = detail::stack_experts<Acc>(p);
  std::vector<Acc> Wbar(static_cast<size_t>(P)), G(static_cast<size_t>(P));
  std::vector<Acc> dW(static_cast<size_t>(E * P));       // merge backward, all segments
  std::vector<R> de(static_cast<size_t>(S * E));         // dL/de per segment
  std::vector<Acc> dx(static_cast<size_t>(tokens * d));  // FFN path, then the router path added
  std::vector<Acc> xa(d), g(d), av(f), uv(f), m(f), dm(f), da(f), du(f);

  for (int64_t s = 0; s < S; ++s) {
    detail::merge_segment(W, E, P, a.weights + s * E, Wbar.data());  // recomputed, never stored
    const Acc *Wg = Wbar.data(), *Wu = Wg + fd, *Wd = Wg + 2 * fd;
    Acc *Gg = G.data(), *Gu = Gg + fd, *Gd = Gg + 2 * fd;
    for (auto& v : G) v = Acc(0);
    const int64_t t0 = p.layout.token_begin(s), t1 = t0 + p.layout.length(s);
    for (int64_t t = t0; t < t1; ++t) {
      detail::gate_up(Wg, Wu, a.x + t * d, d, f, xa.data(), av.data(), uv.data());
      for (int64_t i = 0; i < f; ++i) m[i] = LORY_NS_QUALIFIER::swiglu_forward(av[i], uv[i]);
      for (int64_t j = 0; j < d; ++j) g[j] = load_as<Acc>(a.dy[t * d + j]);
      // dm = Wbar_d^T g; G_d += g m^T
      for (int64_t i = 0; i < f; ++i) dm[i] = Acc(0);
      for (int64_t j = 0; j < d; ++j)
        for (int64_t i = 0; i < f; ++i) {
          dm[i] += Wd[j * f + i] * g[j];
          Gd[j * f + i] += g[j] * m[i];
        }
      for (int64_t i = 0; i < f; ++i) LORY_NS_QUALIFIER::swiglu_backward(av[i], uv[i], dm[i], da[i], du[i]);
      // dx_t = Wbar_g^T da + Wbar_u^T du; G_g += da x^T; G_u += du x^T
      Acc* dxt = dx.data() + t * d;
      for (int64_t j = 0; j < d; ++j) dxt[j] = Acc(0);
      for (int64_t i = 0; i < f; ++i)
        for (int64_t j = 0; j < d; ++j) {
          dxt[j] += Wg[i * d + j] * da[i] + Wu[i * d + j] * du[i];
          Gg[i * d + j] += da[i] * xa[j];
          Gu[i * d + j] += du[i] * xa[j];
        }
    }
    // Merge backward for this segment: dW_i += e_i(s) G(s); de_i(s) = <W_i, G(s)>.
    MergeBackwardArgs<Acc, R> mb;
    mb.num_segments = 1;
    mb.experts = E;
    mb.params = P;
    mb.G = G.data();
    mb.grad_segment_stride = P;
    mb.W = W.data();
    mb.expert_stride = P;
    mb.weights = a.weights + s * E;
    mb.dW = dW.data();
    mb.dW_expert_stride = P;
    mb.accumulate_dW = s > 0;
    mb.d_weights = de.data() + s * E;
    LORY_RETURN_IF_ERROR(merge_backward<Acc>(mb));
  }

  // Router path (adds into dx, writes dW_r and d_bias) for the routed modes.
  if (p.mode != RoutingMode::kGivenWeights) {
    std::vector<Acc> Wr(static_cast<size_t>(E * d)), dWr(static_cast<size_t>(E * d));
    for (int64_t i = 0; i < E * d; ++i) Wr[i] = load_as<Acc>(p.W_r[i]);
    RouterBackwardArgs<Acc, R> rb;
    rb.layout = p.layout;
    rb.d = d;
    rb.experts = E;
    rb.mode = p.mode;
    rb.W_r = Wr.data();
    rb.hbar = a.hbar;
    rb.probs = a.probs;
    rb.d_weights = de.data();
    rb.dW_r = dWr.data();
    rb.d_bias = a.d_bias;
    rb.accumulate_d_bias = a.accumulate;
    rb.dx = dx.data();
    LORY_RETURN_IF_ERROR(router_backward<Acc>(rb));
    for (int64_t i = 0; i < E * d; ++i)
      a.dW_r[i] = store_as<T>(a.accumulate ? load_as<Acc>(a.dW_r[i]) + dWr[i] : dWr[i]);
  }

  for (int64_t i = 0; i < tokens * d; ++i) a.dx[i] = store_as<T>(dx[i]);
  T* outs[3] = {a.dW_g, a.dW_u, a.dW_d};
  for (int mat = 0; mat < 3; ++mat)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < fd; ++j) {
        T& out = outs[mat][e * fd + j];
        const Acc v = dW[e * P + mat * fd + j];
        out = store_as<T>(a.accumulate ? load_as<Acc>(out) + v : v);
      }
  if (a.d_weights)
    for (int64_t i = 0; i < S * E; ++i) a.d_weights[i] = de[i];
  return Status::kSuccess;
}

}  // namespace reference
LORY_NAMESPACE_END
