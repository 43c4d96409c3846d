// lory CPU twin of the inference primitives (contract in lory/inference.hpp):
//   reference::build_prompt_cache<Acc>(args)  routing decisions + merged-FFN cache
//   reference::decode_step<Acc>(args)         one decode step, merged or expert-space
// Plain loops accumulating in Acc (double by default, float to mimic the GPU);
// intermediates stay in Acc, outputs are rounded to T once. The twin allocates
// its scratch; GPU code never does.
//
// Also reference::InferenceCpuBackend: the CPU backend of the shared
// orchestration (run_prompt_cache / run_decode_step), so the CPU tests drive
// the GEMM layouts and workspace carving the GPU runs:
//   std::vector<unsigned char> ws(bytes);  // after a size query with nullptr
//   lory::run_decode_step<lory::reference::InferenceCpuBackend>(args, ws.data(), bytes, {});
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "lory/dtype.hpp"
#include "lory/inference.hpp"
#include "lory/math.hpp"
#include "lory/reference/moe_ffn_backend.hpp"
#include "lory/reference/router.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {

template <class Acc = double, class T, class R>
Status build_prompt_cache(const PromptCacheArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const int64_t B = a.batch, d = a.shape.d, E = a.shape.experts;
  std::vector<R> hbar(static_cast<size_t>(B * d)), probs(static_cast<size_t>(B * E));
  RouterForwardArgs<T, R> r;
  r.layout = SegmentLayout{B, a.prompt_len, a.prompt_len};  // one segment per sequence
  r.d = d;
  r.experts = static_cast<int>(E);
  r.mode = RoutingMode::kPromptLevel;
  r.x = a.x;
  r.W_r = a.W_r;
  r.bias = a.bias;
  r.hbar = hbar.data();
  r.probs = probs.data();
  r.weights = a.probs;
  LORY_RETURN_IF_ERROR(reference::router_forward<Acc>(r));
  if (!a.cache) return Status::kSuccess;
  const int64_t fd = a.shape.f * d, P = a.shape.params_per_expert();
  const T* W[3] = {a.W_g, a.W_u, a.W_d};
  for (int64_t b = 0; b < B; ++b)
    for (int i = 0; i < 3; ++i)
      for (int64_t j = 0; j < fd; ++j) {
        Acc acc = Acc(0);
        for (int64_t e = 0; e < E; ++e) acc += static_cast<Acc>(a.probs[b * E + e]) * load_as<Acc>(W[i][e * fd + j]);
        a.cache[b * P + i * fd + j] = store_as<T>(acc);
      }
  return Status::kSuccess;
}

template <class Acc = double, class T, class R>
Status decode_step(const DecodeStepArgs<T, R>& a) {
  LORY_RETURN_IF_ERROR(validate(a));
  const int64_t B = a.batch, d = a.shape.d, f = a.shape.f, E = a.shape.experts;
  const int64_t fd = f * d, P = a.shape.params_per_expert();
  const bool merged = resolve_decode_method(a) == DecodeMethod::kMerged;
  std::vector<Acc> x(static_cast<size_t>(d)), m(static_cast<size_t>(f)), y(static_cast<size_t>(d));
  for (int64_t b = 0; b < B; ++b) {
    // Read x_b whole first: y may alias x.
    for (int64_t j = 0; j < d; ++j) x[j] = load_as<Acc>(a.x[b * d + j]);
    // Sum over the "experts" of one matrix: the cached merged matrix of sequence
    // b (one term, weight 1), or the E experts weighted by p_b.
    const int64_t terms = merged ? 1 : E;
    auto weight = [&](int64_t e) { return merged ? Acc(1) : static_cast<Acc>(a.probs[b * E + e]); };
    auto matrix = [&](int which, int64_t e) -> const T* {  // which: 0 gate, 1 up, 2 down
      if (merged) return a.cache + b * P + which * fd;
      const T* W[3] = {a.W_g, a.W_u, a.W_d};
      return W[which] + e * fd;
    };
    for (int64_t i = 0; i < f; ++i) {
      Acc ga = Acc(0), ua = Acc(0);
      for (int64_t e = 0; e < terms; ++e) {
        const T* Wg = matrix(0, e) + i * d;
        const T* Wu = matrix(1, e) + i * d;
        Acc g = Acc(0), u = Acc(0);
        for (int64_t j = 0; j < d; ++j) {
          g += load_as<Acc>(Wg[j]) * x[j];
          u += load_as<Acc>(Wu[j]) * x[j];
        }
        ga += weight(e) * g;
        ua += weight(e) * u;
      }
      m[i] = LORY_NS_QUALIFIER::swiglu_forward(ga, ua);
    }
    for (int64_t j = 0; j < d; ++j) {
      Acc acc = Acc(0);
      for (int64_t e = 0; e < terms; ++e) {
        const T* Wd = matrix(2, e) + j * f;
        Acc s = Acc(0);
        for (int64_t i = 0; i < f; ++i) s += load_as<Acc>(Wd[i]) * m[i];
        acc += weight(e) * s;
      }
      y[j] = acc;
    }
    for (int64_t j = 0; j < d; ++j) a.y[b * d + j] = store_as<T>(y[j]);
  }
  return Status::kSuccess;
}

// The plan backend's CPU leaves plus the inference-only ones.
struct InferenceCpuBackend : MoeFfnCpuBackend {
  template <class T>
  static Status can_implement_prompt(const PromptCacheArgs<T, float>&) { return Status::kSuccess; }
  template <class T>
  static Status can_implement_decode(const DecodeStepArgs<T, float>&) { return Status::kSuccess; }

  // fp32 accumulation and one rounding to T per output, as the GPU kernel.
  template <class T>
  static Status expert_combine(const ExpertCombineArgs<T>& c, void* ws, size_t& ws_bytes, Stream) {
    LORY_RETURN_IF_ERROR(validate(c));
    if (!ws) {
      ws_bytes = 0;
      return Status::kSuccess;
    }
    for (int64_t b = 0; b < c.rows; ++b)
      for (int64_t i = 0; i < c.cols; ++i) {
        float acc = 0.f;
        for (int e = 0; e < c.experts; ++e)
          acc += c.weights[b * c.experts + e] * load_as<float>(c.in[(b * c.experts + e) * c.cols + i]);
        c.out[b * c.out_stride + i] = store_as<T>(acc);
      }
    return Status::kSuccess;
  }
};

}  // namespace reference
LORY_NAMESPACE_END
