// The Lory layer (router + merge + merged SwiGLU FFN, MoeFfnCudaPlan) against a
// dense SwiGLU FFN of the same d and f over the same tokens, both with cuBLAS
// bf16 GEMMs (fp32 accumulation) and the same SwiGLU kernels, in the same run:
//   lory_layer_{fwd,bwd,fwdbwd}/bf16/d1536_f4096/E32/B8_L4096_T256
//   dense_ffn_{fwd,bwd,fwdbwd}/bf16/d1536_f4096/E32/B8_L4096_T256   (same suffix: pair them)
//   lory_layer_bwd/.../B8_L4096_T256/{fused,gemm}   the backward with each merge-backward method
//                                                    (the rows above: MergeBackwardMethod::kAuto)
//   lory_layer_{fwd,bwd,fwdbwd}/.../B8_L4096_T256/budget{1,2}GiB
//                                                    the layer under a workspace budget (the rows
//                                                    without: unlimited, one chunk, one slice), for
//                                                    time against memory (docs/memory.md)
// The dense FFN does not depend on E; it is registered once per E so that
// every Lory row has its baseline under the same suffix.
// Counters: GB/s and TFLOP/s (executed FLOPs: Lory includes its merges and the
// backward's recomputation of the merge and of a, u; the dense FFN saves a, u,
// m in its forward instead), workspace_bytes (the plan's workspace; for the
// dense FFN the activations it keeps between passes plus its backward scratch).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "lory/moe_ffn.cuh"

namespace lory_bench {
namespace {

using lory::Status;
using T = __nv_bfloat16;

#define LORY_COMMA ,

constexpr int64_t kBatch = 8, kSeqLen = 4096, kSegLen = 256;


// A device buffer that only grows; kept across benchmarks (one allocation per
// role for the whole run) and filled with random values when (re)allocated
// (scale 0: left as is, for scratch that is written before it is read).
template <class V>
struct Grow {
  V* p = nullptr;
  size_t n = 0;
  V* get(size_t want, uint64_t seed, float scale = 1.f) {
    if (want > n) {
      if (p) LORY_BENCH_CUDA(cudaFree(p));
      LORY_BENCH_CUDA(cudaMalloc(&p, want * sizeof(V)));
      n = want;
      if (scale != 0.f) {
        fill_uniform_device<V>(p, n, seed, scale);
      }
    }
    return p;
  }
};

struct Buffers {
  Grow<T> x, dy, y, dx, W_r, dW_r, W_g, W_u, W_d, dW_g, dW_u, dW_d, act_a, act_u, act_m, act_dm, act_da, act_du;
  Grow<float> hbar, probs, weights, d_bias;
  Grow<unsigned char> workspace;
};
Buffers& buffers() {
  static Buffers b;
  return b;
}

enum class Pass { kFwd, kBwd, kFwdBwd };
const char* pass_name(Pass p) { return p == Pass::kFwd ? "fwd" : p == Pass::kBwd ? "bwd" : "fwdbwd"; }

struct Config {
  int64_t d, f;
  int E;
  int64_t tokens() const { return kBatch * kSeqLen; }
  int64_t segments() const { return kBatch * ((kSeqLen + kSegLen - 1) / kSegLen); }
  double ffn_flops() const { return 2.0 * tokens() * 3.0 * d * f; }                 // F: dense forward
  double merge_flops() const { return 2.0 * segments() * E * 3.0 * d * f; }         // one merge pass
  double expert_bytes() const { return 3.0 * E * d * f * sizeof(T); }
  double token_bytes() const { return double(tokens()) * d * sizeof(T); }            // one [tokens, d] tensor
};

// Where the Lory layer's time goes: the CUDA backend with CUDA events around
// every leaf operation (run once, after the timed loop; each leaf is
// synchronised, so only the per-leaf sums are meaningful, not their total).
struct LeafTimes {
  double router = 0, merge_fwd = 0, merge_bwd = 0, swiglu = 0, gemm = 0, round = 0;
};
LeafTimes& leaf_times() {
  static LeafTimes t;
  return t;
}
struct TimedBackend : lory::MoeFfnCudaBackend {
  using Base = lory::MoeFfnCudaBackend;
  template <class Fn>
  static Status timed(double& ms_sum, cudaStream_t stream, Fn&& fn) {
    cudaEvent_t start, stop;
    LORY_BENCH_CUDA(cudaEventCreate(&start));
    LORY_BENCH_CUDA(cudaEventCreate(&stop));
    LORY_BENCH_CUDA(cudaEventRecord(start, stream));
    const Status st = fn();
    LORY_BENCH_CUDA(cudaEventRecord(stop, stream));
    LORY_BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    LORY_BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    ms_sum += ms;
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return st;
  }
#define LORY_TIMED_LEAF(NAME, ARGS, FIELD)                                                        \
  template <class V>                                                                              \
  static Status NAME(const ARGS& a, void* ws, size_t& bytes, Stream s) {                          \
    if (!ws) return Base::NAME(a, ws, bytes, s);                                                  \
    return timed(leaf_times().FIELD, s.stream, [&] { return Base::NAME(a, ws, bytes, s); });      \
  }
  LORY_TIMED_LEAF(router_forward, lory::RouterForwardArgs<V LORY_COMMA float>, router)
  LORY_TIMED_LEAF(router_backward, lory::RouterBackwardArgs<V LORY_COMMA float>, router)
  LORY_TIMED_LEAF(merge_forward, lory::MergeForwardArgs<V LORY_COMMA float>, merge_fwd)
  LORY_TIMED_LEAF(swiglu_forward, lory::SwigluForwardArgs<V>, swiglu)
  LORY_TIMED_LEAF(swiglu_backward, lory::SwigluBackwardArgs<V>, swiglu)
#undef LORY_TIMED_LEAF
  template <class V>
  static Status merge_backward(const lory::MergeBackwardArgs<V, float>& a, lory::MergeBackwardMethod m, void* ws,
                               size_t& bytes, Stream s) {
    if (!ws) return Base::merge_backward(a, m, ws, bytes, s);
    return timed(leaf_times().merge_bwd, s.stream, [&] { return Base::merge_backward(a, m, ws, bytes, s); });
  }
  template <class V, class VC = V>
  static Status gemm(const lory::StridedBatchedGemm<V, VC>& g, Stream s) {
    return timed(leaf_times().gemm, s.stream, [&] { return Base::gemm(g, s); });
  }
  template <class V>
  static Status round_to_storage(const lory::RoundToStorageArgs<V>& a, void* ws, size_t& bytes, Stream s) {
    if (!ws) return Base::round_to_storage(a, ws, bytes, s);
    return timed(leaf_times().round, s.stream, [&] { return Base::round_to_storage(a, ws, bytes, s); });
  }
};

void bench_lory(benchmark::State& state, Pass pass, Config c,
                lory::MergeBackwardMethod method = lory::MergeBackwardMethod::kAuto, size_t budget_bytes = 0) {
  Buffers& B = buffers();
  const lory::SegmentLayout lay{kBatch, kSeqLen, kSegLen};
  const lory::FfnShape sh{c.d, c.f, c.E};
  lory::MoeFfnOptions opt;
  opt.merge_backward = method;
  opt.workspace_budget_bytes = budget_bytes;
  const lory::MoeFfnCudaPlan<T> plan(lay, sh, lory::RoutingMode::kCausalSegment, opt);
  LORY_BENCH_OK(plan.can_implement());
  const size_t tokens = c.tokens(), E = c.E, S = c.segments(), fd = c.f * c.d;
  const float wscale = 1.f / std::sqrt(static_cast<float>(c.d));

  lory::MoeFfnForwardArgs<T, float> f;
  f.p.layout = lay;
  f.p.shape = sh;
  f.p.mode = lory::RoutingMode::kCausalSegment;
  f.p.W_r = B.W_r.get(E * c.d, 11);
  f.p.W_g = B.W_g.get(E * fd, 12, wscale);
  f.p.W_u = B.W_u.get(E * fd, 13, wscale);
  f.p.W_d = B.W_d.get(E * fd, 14, wscale);
  f.x = B.x.get(tokens * c.d, 15);
  f.y = B.y.get(tokens * c.d, 16);
  f.hbar = B.hbar.get(S * c.d, 17);
  f.probs = B.probs.get(S * E, 18);
  f.weights = B.weights.get(S * E, 19);
  lory::MoeFfnBackwardArgs<T, float> b;
  b.p = f.p;
  b.x = f.x;
  b.dy = B.dy.get(tokens * c.d, 20);
  b.hbar = f.hbar;
  b.probs = f.probs;
  b.weights = f.weights;
  b.dx = B.dx.get(tokens * c.d, 21);
  b.dW_r = B.dW_r.get(E * c.d, 22);
  b.d_bias = B.d_bias.get(E, 23);
  b.dW_g = B.dW_g.get(E * fd, 24);
  b.dW_u = B.dW_u.get(E * fd, 25);
  b.dW_d = B.dW_d.get(E * fd, 26);
  void* ws = B.workspace.get(plan.workspace_size(), 27, 0.f);

  GpuTimer timer;
  const lory::MoeFfnCudaBackend::Stream ctx{timer.stream(), cublas_handle_on(timer.stream())};
  if (pass == Pass::kBwd) LORY_BENCH_OK(plan.forward(f, ws, plan.workspace_size(), ctx));  // routing for the backward
  timer.run(state, [&](cudaStream_t) {
    if (pass != Pass::kBwd) LORY_BENCH_OK(plan.forward(f, ws, plan.workspace_size(), ctx));
    if (pass != Pass::kFwd) LORY_BENCH_OK(plan.backward(b, ws, plan.workspace_size(), ctx));
  });

  const double fwd_flops = c.ffn_flops() + c.merge_flops();
  // merge recompute + a, u recompute + 2F + merge backward (dW and d_weights)
  const double bwd_flops = c.merge_flops() + c.ffn_flops() * 2.0 / 3.0 + 2.0 * c.ffn_flops() + 2.0 * c.merge_flops();
  const double fwd_bytes = c.expert_bytes() + 2 * c.token_bytes();        // experts, x, y
  const double bwd_bytes = 2 * c.expert_bytes() + 3 * c.token_bytes();    // experts, dW; x, dy, dx
  const double flops = (pass != Pass::kBwd ? fwd_flops : 0) + (pass != Pass::kFwd ? bwd_flops : 0);
  const double bytes = (pass != Pass::kBwd ? fwd_bytes : 0) + (pass != Pass::kFwd ? bwd_bytes : 0);
  set_rate_counters(state, bytes, flops);
  state.counters["workspace_bytes"] = static_cast<double>(plan.workspace_size());
  state.counters["chunk_segments"] = static_cast<double>(plan.chunk_segments());
  state.counters["slices"] = static_cast<double>(plan.num_slices());
  state.counters["slice_width"] = static_cast<double>(plan.slice_width());

  // One more pass with every leaf timed: milliseconds per kind of leaf.
  const lory::MoeFfnPlan<T, TimedBackend> timed_plan(lay, sh, lory::RoutingMode::kCausalSegment, opt);
  LORY_BENCH_OK(timed_plan.can_implement());
  void* tws = B.workspace.get(timed_plan.workspace_size(), 27, 0.f);
  leaf_times() = LeafTimes{};
  if (pass != Pass::kBwd) LORY_BENCH_OK(timed_plan.forward(f, tws, timed_plan.workspace_size(), ctx));
  if (pass != Pass::kFwd) LORY_BENCH_OK(timed_plan.backward(b, tws, timed_plan.workspace_size(), ctx));
  const LeafTimes& t = leaf_times();
  state.counters["ms_router"] = t.router;
  state.counters["ms_merge_fwd"] = t.merge_fwd;
  state.counters["ms_merge_bwd"] = t.merge_bwd;
  state.counters["ms_swiglu"] = t.swiglu;
  state.counters["ms_gemm"] = t.gemm;
  state.counters["ms_round"] = t.round;
}

// The dense SwiGLU FFN: a = x W_g^T, u = x W_u^T, m = silu(a) * u, y = m W_d^T,
// and its backward from the saved a, u, m -- the same GEMM and SwiGLU
// building blocks the Lory plan runs, on one [tokens, d] batch.
void bench_dense(benchmark::State& state, Pass pass, Config c) {
  Buffers& B = buffers();
  const int64_t tokens = c.tokens(), d = c.d, fdim = c.f, fd = c.f * c.d;
  const float wscale = 1.f / std::sqrt(static_cast<float>(c.d));
  const T* x = B.x.get(tokens * d, 15);
  const T* dy = B.dy.get(tokens * d, 20);
  T* y = B.y.get(tokens * d, 16);
  T* dx = B.dx.get(tokens * d, 21);
  const T* Wg = B.W_g.get(c.E * fd, 12, wscale);  // expert 0 serves as the dense FFN
  const T* Wu = B.W_u.get(c.E * fd, 13, wscale);
  const T* Wd = B.W_d.get(c.E * fd, 14, wscale);
  T* dWg = B.dW_g.get(c.E * fd, 24);
  T* dWu = B.dW_u.get(c.E * fd, 25);
  T* dWd = B.dW_d.get(c.E * fd, 26);
  T* a = B.act_a.get(tokens * fdim, 30);
  T* u = B.act_u.get(tokens * fdim, 31);
  T* m = B.act_m.get(tokens * fdim, 32);
  T* dm = B.act_dm.get(tokens * fdim, 33);
  T* da = B.act_da.get(tokens * fdim, 34);
  T* du = B.act_du.get(tokens * fdim, 35);

  GpuTimer timer;
  const lory::MoeFfnCudaBackend::Stream ctx{timer.stream(), cublas_handle_on(timer.stream())};
  auto gemm = [&](bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bm,
                  int64_t ldb, T* C, float beta) {
    lory::StridedBatchedGemm<T> g;
    g.m = M; g.n = N; g.k = K; g.batch = 1;
    g.trans_a = ta; g.trans_b = tb; g.beta = beta;
    g.A = A; g.lda = lda; g.B = Bm; g.ldb = ldb; g.C = C; g.ldc = N;
    LORY_BENCH_OK(lory::MoeFfnCudaBackend::gemm(g, ctx));
  };
  auto forward = [&] {
    gemm(false, true, tokens, fdim, d, x, d, Wg, d, a, 0.f);
    gemm(false, true, tokens, fdim, d, x, d, Wu, d, u, 0.f);
    lory::SwigluForwardArgs<T> s{tokens, fdim, a, fdim, u, fdim, m, fdim};
    LORY_BENCH_OK(lory::swiglu_forward(s, ctx.stream));
    gemm(false, true, tokens, d, fdim, m, fdim, Wd, fdim, y, 0.f);
  };
  auto backward = [&] {
    gemm(false, false, tokens, fdim, d, dy, d, Wd, fdim, dm, 0.f);   // dm = dy W_d
    gemm(true, false, d, fdim, tokens, dy, d, m, fdim, dWd, 0.f);    // dW_d = dy^T m
    lory::SwigluBackwardArgs<T> s{tokens, fdim, a, fdim, u, fdim, dm, fdim, da, fdim, du, fdim};
    LORY_BENCH_OK(lory::swiglu_backward(s, ctx.stream));
    gemm(false, false, tokens, d, fdim, da, fdim, Wg, d, dx, 0.f);   // dx = da W_g + du W_u
    gemm(false, false, tokens, d, fdim, du, fdim, Wu, d, dx, 1.f);
    gemm(true, false, fdim, d, tokens, da, fdim, x, d, dWg, 0.f);    // dW_g = da^T x
    gemm(true, false, fdim, d, tokens, du, fdim, x, d, dWu, 0.f);    // dW_u = du^T x
  };
  if (pass == Pass::kBwd) forward();
  timer.run(state, [&](cudaStream_t) {
    if (pass != Pass::kBwd) forward();
    if (pass != Pass::kFwd) backward();
  });

  const double w_bytes = 3.0 * fd * sizeof(T), act_bytes = 3.0 * tokens * fdim * sizeof(T);
  const double fwd_bytes = w_bytes + 2 * c.token_bytes() + act_bytes;       // W, x, y, saved a u m
  const double bwd_bytes = 2 * w_bytes + 3 * c.token_bytes() + act_bytes;   // W, dW; x, dy, dx; a u m
  const double flops = (pass != Pass::kBwd ? c.ffn_flops() : 0) + (pass != Pass::kFwd ? 2 * c.ffn_flops() : 0);
  const double bytes = (pass != Pass::kBwd ? fwd_bytes : 0) + (pass != Pass::kFwd ? bwd_bytes : 0);
  set_rate_counters(state, bytes, flops);
  // Saved a, u, m plus the backward's dm, da, du.
  state.counters["workspace_bytes"] = (pass == Pass::kFwd ? 1.0 : 2.0) * act_bytes;
}

// Registration: both paper FFN shapes, E = 8 / 16 / 32, three passes.
const bool registered = [] {
  const Config configs[] = {{1536, 4096, 8}, {1536, 4096, 16}, {1536, 4096, 32},
                            {1024, 2816, 8}, {1024, 2816, 16}, {1024, 2816, 32}};
  for (const Config& c : configs)
    for (Pass pass : {Pass::kFwd, Pass::kBwd, Pass::kFwdBwd}) {
      const std::string suffix = std::string(pass_name(pass)) + "/bf16/d" + std::to_string(c.d) + "_f" +
                                 std::to_string(c.f) + "/E" + std::to_string(c.E) + "/B" + std::to_string(kBatch) +
                                 "_L" + std::to_string(kSeqLen) + "_T" + std::to_string(kSegLen);
      benchmark::RegisterBenchmark(("lory_layer_" + suffix).c_str(),
                                   [pass, c](benchmark::State& s) { bench_lory(s, pass, c); })
          ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
      benchmark::RegisterBenchmark(("dense_ffn_" + suffix).c_str(),
                                   [pass, c](benchmark::State& s) { bench_dense(s, pass, c); })
          ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
      // The backward with each merge-backward method named (the rows above take kAuto's pick).
      // Time against the workspace budget at the paper's shape (the rows above: unlimited).
      if (c.d == 1536)
        for (int gib : {1, 2})
          benchmark::RegisterBenchmark(("lory_layer_" + suffix + "/budget" + std::to_string(gib) + "GiB").c_str(),
                                       [pass, c, gib](benchmark::State& s) {
                                         bench_lory(s, pass, c, lory::MergeBackwardMethod::kAuto, size_t(gib) << 30);
                                       })
              ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
      if (pass == Pass::kBwd)
        for (auto m : {lory::MergeBackwardMethod::kFused, lory::MergeBackwardMethod::kGemm})
          benchmark::RegisterBenchmark(("lory_layer_" + suffix + "/" + lory::merge_backward_method_name(m)).c_str(),
                                       [pass, c, m](benchmark::State& s) { bench_lory(s, pass, c, m); })
              ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
    }
  return true;
}();

}  // namespace
}  // namespace lory_bench
