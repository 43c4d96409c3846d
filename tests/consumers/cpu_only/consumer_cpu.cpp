// A CPU-only consumer of lory (no CUDA toolkit): one Lory layer's forward and backward through the
// plan's CPU backend, checked against the CPU twin of the whole layer, and a merge in lory's own
// bf16 storage type.
#include <cmath>
#include <cstdio>
#include <vector>

#include "lory/lory.hpp"

#if defined(__CUDA_FP16_H__) || defined(__CUDA_BF16_H__) || defined(__CUDA_RUNTIME_H__)
#error "a CPU-only consumer included a CUDA header"
#endif

namespace {

// Small deterministic values in [-scale, scale) (no zeros of note; a fixed LCG keeps the consumer
// free of <random> distributions whose output differs between standard libraries).
std::vector<float> values(size_t n, unsigned seed, float scale) {
  std::vector<float> v(n);
  unsigned s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) / 8388608.f - 1.f);
  }
  return v;
}

double rel_error(const std::vector<float>& got, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = static_cast<double>(got[i]) - ref[i];
    num += e * e;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);  // NaN if anything is NaN
}

}  // namespace

int main() {
  const lory::SegmentLayout lay{2, 11, 4};  // B = 2 sequences of L = 11 tokens, T = 4 (short last segment)
  const lory::FfnShape sh{8, 12, 3};        // d, f, E
  const int64_t tokens = lay.num_tokens(), S = lay.num_segments(), fd = sh.f * sh.d;
  const auto x = values(tokens * sh.d, 1, 1.f), dy = values(tokens * sh.d, 2, 1.f);
  const auto W_r = values(sh.experts * sh.d, 3, 2.f), W_g = values(sh.experts * fd, 4, 0.7f),
             W_u = values(sh.experts * fd, 5, 0.7f), W_d = values(sh.experts * fd, 6, 0.35f);

  lory::MoeFfnParams<float> p;
  p.layout = lay; p.shape = sh; p.mode = lory::RoutingMode::kCausalSegment;
  p.W_r = W_r.data(); p.W_g = W_g.data(); p.W_u = W_u.data(); p.W_d = W_d.data();

  // Plan (CPU backend) and twin each get their own outputs.
  struct Out {
    std::vector<float> y, hbar, probs, weights, dx, dW_r, dW_g, dW_u, dW_d;
  };
  const auto outputs = [&] {
    Out o;
    o.y.resize(tokens * sh.d); o.hbar.resize(S * sh.d); o.probs.resize(S * sh.experts);
    o.weights.resize(S * sh.experts); o.dx.resize(tokens * sh.d); o.dW_r.resize(sh.experts * sh.d);
    o.dW_g.resize(sh.experts * fd); o.dW_u.resize(sh.experts * fd); o.dW_d.resize(sh.experts * fd);
    return o;
  };
  const auto args = [&](Out& o, lory::MoeFfnForwardArgs<float>& f, lory::MoeFfnBackwardArgs<float>& b) {
    f.p = p; f.x = x.data(); f.y = o.y.data(); f.hbar = o.hbar.data(); f.probs = o.probs.data();
    f.weights = o.weights.data();
    b.p = p; b.x = x.data(); b.dy = dy.data(); b.hbar = o.hbar.data(); b.probs = o.probs.data();
    b.weights = o.weights.data(); b.dx = o.dx.data(); b.dW_r = o.dW_r.data(); b.dW_g = o.dW_g.data();
    b.dW_u = o.dW_u.data(); b.dW_d = o.dW_d.data();
  };

  Out plan_out = outputs(), twin_out = outputs();
  lory::MoeFfnForwardArgs<float> f;
  lory::MoeFfnBackwardArgs<float> b;
  lory::MoeFfnOptions opt;
  opt.max_chunk_segments = 2;  // several chunks
  lory::reference::MoeFfnCpuPlan<float> plan(lay, sh, p.mode, opt);
  lory::Status st = plan.can_implement();
  std::vector<unsigned char> ws(plan.workspace_size());
  args(plan_out, f, b);
  if (st == lory::Status::kSuccess) st = plan.forward(f, ws.data(), ws.size(), {});
  if (st == lory::Status::kSuccess) st = plan.backward(b, ws.data(), ws.size(), {});
  args(twin_out, f, b);
  if (st == lory::Status::kSuccess) st = lory::reference::moe_ffn_forward(f);
  if (st == lory::Status::kSuccess) st = lory::reference::moe_ffn_backward(b);
  if (st != lory::Status::kSuccess) {
    std::printf("lory cpu-only consumer: FAILED (%s)\n", lory::status_string(st));
    return 1;
  }
  const double err_y = rel_error(plan_out.y, twin_out.y), err_dx = rel_error(plan_out.dx, twin_out.dx),
               err_dW_r = rel_error(plan_out.dW_r, twin_out.dW_r), err_dW_d = rel_error(plan_out.dW_d, twin_out.dW_d);
  bool ok = err_y < 1e-5 && err_dx < 1e-5 && err_dW_r < 1e-4 && err_dW_d < 1e-5;

  // A merge in lory's own bf16 storage: 0.25 * 1 + 0.75 * 3 = 2.5 exactly, and a value that
  // rounds (1 + 2^-8 is a tie: bf16 keeps 7 bits, so it rounds to even, 1).
  const lory::bfloat16_t W16[2] = {lory::bfloat16_t(1.f), lory::bfloat16_t(3.f)};
  const float w16[2] = {0.25f, 0.75f};
  lory::bfloat16_t Wbar16[1];
  lory::MergeForwardArgs<lory::bfloat16_t> m;
  m.num_segments = 1; m.experts = 2; m.params = 1; m.W = W16; m.expert_stride = 1; m.weights = w16;
  m.Wbar = Wbar16; m.segment_stride = 1;
  ok = ok && lory::reference::merge_forward(m) == lory::Status::kSuccess && lory::to_float(Wbar16[0]) == 2.5f &&
       lory::to_float(lory::bfloat16_t(1.f + 1.f / 256)) == 1.f;

  // Similarity batching: a 4-document kNN graph, one neighbour each: 0->1, 1->0, 2->1, 3->2.
  // Degrees (in + out) 2, 3, 2, 1: the walk starts at doc 3, then follows 2, 1, 0.
  const int64_t knn_ids[4] = {1, 0, 1, 2};
  const float knn_sims[4] = {0.9f, 0.9f, 0.8f, 0.7f};
  int64_t order[4] = {-1, -1, -1, -1}, placed = 0;
  lory::batching::OrderArgs oa;
  oa.graph.num_docs = 4; oa.graph.k = 1; oa.graph.ids64 = knn_ids; oa.graph.sims = knn_sims;
  oa.order_out = order; oa.num_out = &placed;
  size_t order_bytes = 0;
  ok = ok && lory::batching::similarity_order(oa, nullptr, order_bytes) == lory::Status::kSuccess;
  std::vector<unsigned char> order_ws(order_bytes);
  ok = ok && lory::batching::similarity_order(oa, order_ws.data(), order_bytes) == lory::Status::kSuccess &&
       placed == 4 && order[0] == 3 && order[1] == 2 && order[2] == 1 && order[3] == 0;

  std::printf("lory %d.%d.%d cpu-only consumer (LORY_HOST_ONLY=%d): %s (plan vs twin: y %.1e, dx %.1e, "
              "dW_r %.1e, dW_d %.1e; bf16 merge %g; batching order %lld %lld %lld %lld)\n",
              LORY_VERSION_MAJOR, LORY_VERSION_MINOR, LORY_VERSION_PATCH, LORY_HOST_ONLY, ok ? "ok" : "FAILED",
              err_y, err_dx, err_dW_r, err_dW_d, lory::to_float(Wbar16[0]), static_cast<long long>(order[0]),
              static_cast<long long>(order[1]), static_cast<long long>(order[2]), static_cast<long long>(order[3]));
  return ok ? 0 : 1;
}
