// lory demo: one Lory layer (segment-level SwiGLU MoE FFN with causal segment
// routing, arXiv 2405.03133) forward and backward on the CPU twin, at a small
// paper-like shape. Prints the routing weights each segment uses, output and
// gradient norms, and the wall time of each pass.
//
//   lory_demo [--seed N]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "lory/moe_ffn.hpp"
#include "lory/reference/moe_ffn.hpp"

namespace {

double norm(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return std::sqrt(s);
}

std::vector<float> uniform(size_t n, float bound, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  unsigned long long seed = 2405031330ull;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--seed N]\n", argv[0]);
      return 2;
    }
  }

  // B sequences of L tokens, segments of T tokens, model dim d, FFN dim f, E experts.
  const lory::SegmentLayout layout{2, 1024, 256};
  const lory::FfnShape shape{128, 352, 8};
  const int64_t d = shape.d, f = shape.f, tokens = layout.num_tokens(), S = layout.num_segments();
  const int E = shape.experts;
  std::mt19937_64 rng(seed);

  // Tokens: a random "topic" per segment plus noise, so that segment means
  // differ and the router has something to route on.
  std::vector<float> x(tokens * d);
  {
    const auto noise = uniform(x.size(), 1.0f, rng);
    for (int64_t s = 0; s < S; ++s) {
      const auto topic = uniform(d, 1.0f, rng);
      for (int64_t t = layout.token_begin(s); t < layout.token_begin(s) + layout.length(s); ++t)
        for (int64_t j = 0; j < d; ++j) x[t * d + j] = topic[j] + noise[t * d + j];
    }
  }
  const auto W_r = uniform(E * d, 3.0f / std::sqrt(float(d)), rng);
  const auto W_g = uniform(E * f * d, 1.0f / std::sqrt(float(d)), rng);
  const auto W_u = uniform(E * f * d, 1.0f / std::sqrt(float(d)), rng);
  const auto W_d = uniform(E * d * f, 1.0f / std::sqrt(float(f)), rng);
  const auto dy = uniform(tokens * d, 1.0f, rng);  // dL/dy of the loss L = <y, dy>

  lory::MoeFfnParams<float, float> p;
  p.layout = layout;
  p.shape = shape;
  p.mode = lory::RoutingMode::kCausalSegment;
  p.W_r = W_r.data();
  p.W_g = W_g.data();
  p.W_u = W_u.data();
  p.W_d = W_d.data();

  std::vector<float> y(tokens * d), hbar(S * d), probs(S * E), weights(S * E);
  lory::MoeFfnForwardArgs<float, float> fwd;
  fwd.p = p;
  fwd.x = x.data();
  fwd.y = y.data();
  fwd.hbar = hbar.data();
  fwd.probs = probs.data();
  fwd.weights = weights.data();

  std::vector<float> dx(x.size()), dW_r(W_r.size()), dW_g(W_g.size()), dW_u(W_u.size()), dW_d(W_d.size());
  lory::MoeFfnBackwardArgs<float, float> bwd;
  bwd.p = p;
  bwd.x = x.data();
  bwd.dy = dy.data();
  bwd.hbar = hbar.data();
  bwd.probs = probs.data();
  bwd.weights = weights.data();
  bwd.dx = dx.data();
  bwd.dW_r = dW_r.data();
  bwd.dW_g = dW_g.data();
  bwd.dW_u = dW_u.data();
  bwd.dW_d = dW_d.data();

  std::printf("lory demo: one Lory layer on the CPU twin (fp32), seed %llu\n", seed);
  std::printf("  B=%lld L=%lld T=%lld (N=%lld segments per sequence)  d=%lld f=%lld E=%d  routing: %s\n",
              (long long)layout.batch, (long long)layout.seq_len, (long long)layout.segment_len,
              (long long)layout.segments_per_sequence(), (long long)d, (long long)f, E,
              lory::routing_mode_name(p.mode));

  auto t0 = std::chrono::steady_clock::now();
  lory::Status st = lory::reference::moe_ffn_forward<float>(fwd);
  const double t_fwd = seconds_since(t0);
  if (st != lory::Status::kSuccess) {
    std::fprintf(stderr, "forward failed: %s\n", lory::status_string(st));
    return 1;
  }
  t0 = std::chrono::steady_clock::now();
  st = lory::reference::moe_ffn_backward<float>(bwd);
  const double t_bwd = seconds_since(t0);
  if (st != lory::Status::kSuccess) {
    std::fprintf(stderr, "backward failed: %s\n", lory::status_string(st));
    return 1;
  }

  // Routing weights per segment: segment k uses the router's decision on
  // segment k-1; segment 0 its own (stop-gradient).
  std::printf("\nrouting weights e(k) used by each segment (rows) over the experts (columns):\n");
  std::printf("  seq seg  src |");
  for (int e = 0; e < E; ++e) std::printf("  e%-4d", e);
  std::printf("\n");
  for (int64_t s = 0; s < S; ++s) {
    const int64_t k = layout.index_in_sequence(s);
    std::printf("  %3lld %3lld  %-4s|", (long long)layout.sequence_of(s), (long long)k,
                k == 0 ? "own" : "k-1");
    for (int e = 0; e < E; ++e) std::printf("  %.3f", weights[s * E + e]);
    std::printf("\n");
  }

  double loss = 0;
  for (size_t i = 0; i < y.size(); ++i) loss += double(y[i]) * dy[i];
  std::printf("\nloss <y, dy> = %.6f\n", loss);
  std::printf("norms: |x| %.4f  |y| %.4f  |dx| %.4f  |dW_r| %.4f  |dW_g| %.4f  |dW_u| %.4f  |dW_d| %.4f\n",
              norm(x), norm(y), norm(dx), norm(dW_r), norm(dW_g), norm(dW_u), norm(dW_d));
  const double flops = 2.0 * tokens * shape.params_per_expert();  // the dense FFN's forward FLOPs
  std::printf("wall time: forward %.3f s, backward %.3f s  (dense-FFN forward = %.2f GFLOP)\n", t_fwd, t_bwd,
              flops * 1e-9);
  return 0;
}
