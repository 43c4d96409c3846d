// lory training demo: one Lory layer (segment-level SwiGLU MoE FFN with causal
// segment routing, arXiv 2405.03133) trained end to end through the library's
// forward and backward, next to a dense FFN of the same active size trained
// the same way. The point: the experts specialise by domain with no auxiliary
// (load-balancing) loss at all -- the router learns only from the regression
// loss through the merge (dL/de = <W_i, G>, docs/math.md, "Merge backward").
//
// Data: K domains, each with its own input distribution x ~ N(mu_k, I) (so a
// segment's mean tells the domain) and its own target function, a random
// teacher y* = W2 tanh(W1 x). Every sequence stays within one domain, as
// Lory's similarity-based batching arranges. Fresh sequences every step.
// Loss: mean squared error over all tokens and outputs; optimiser: Adam on
// W_r, W_g, W_u, W_d (the dense model is the same plan with E = 1, whose only
// routing weight is 1).
//
// Runs the CPU backend (reference::MoeFfnCpuPlan<float>) or the CUDA backend
// (MoeFfnCudaPlan<float> with a cuBLAS handle); the demo owns every buffer.
//
//   lory_train_demo [--device cpu|gpu|auto] [--steps N] [--seed N] [--experts E]
//                   [--lr X] [--router-lr X] [--log-every N]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <vector>

#include "lory/moe_ffn.cuh"
#include "lory/reference/moe_ffn_backend.hpp"

namespace {

using lory::Status;

// ---- error handling: the demo may exit, the library never does ----------------------
[[noreturn]] void fail(const char* what, const char* why) {
  std::fprintf(stderr, "lory_train_demo: %s failed: %s\n", what, why);
  std::exit(1);
}
void check(Status st, const char* what) {
  if (st != Status::kSuccess) fail(what, lory::status_string(st));
}
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(what, cudaGetErrorString(e));
}
void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail(what, "cuBLAS error");
}
#define DEMO_CUDA(expr) check_cuda((expr), #expr)
#define DEMO_CUBLAS(expr) check_cublas((expr), #expr)

// ---- element formulas shared by the CPU and GPU contexts ------------------------------
struct AdamStep {
  float lr = 0.f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float bias1 = 1.f, bias2 = 1.f;  // 1 - beta^t (bias corrections of step t)
};

__host__ __device__ inline void adam_element(float& p, float g, float& m, float& v, const AdamStep& s) {
  m = s.beta1 * m + (1.f - s.beta1) * g;
  v = s.beta2 * v + (1.f - s.beta2) * g * g;
  const float m_hat = m / s.bias1, v_hat = v / s.bias2;
  p -= s.lr * m_hat / (sqrtf(v_hat) + s.eps);
}

// Squared error of one output, and dL/dy of L = (1/n) sum (y - y*)^2 (scale = 2/n).
__host__ __device__ inline float squared_error(float y, float target, float scale, float& dy) {
  const float r = y - target;
  dy = scale * r;
  return r * r;
}

constexpr int kThreads = 256;
constexpr int kLossBlocks = 64;  // fixed grid: per-block partials summed on the host in a fixed order

__global__ void adam_kernel(float* p, const float* g, float* m, float* v, int64_t n, AdamStep s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    adam_element(p[i], g[i], m[i], v[i], s);
}

__global__ void mse_kernel(const float* y, const float* target, float* dy, int64_t n, float scale, float* partials) {
  __shared__ float sum[kThreads];
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float g;
    acc += squared_error(y[i], target[i], scale, g);
    dy[i] = g;
  }
  sum[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) sum[threadIdx.x] += sum[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = sum[0];
}

// ---- execution contexts: where the buffers live and who runs the plan -----------------
// Both offer the same small interface, so the training loop is written once.
struct CpuContext {
  using Plan = lory::reference::MoeFfnCpuPlan<float>;
  static const char* name() { return "cpu (reference::MoeFfnCpuPlan<float>)"; }

  float* alloc(size_t n) {
    storage_.emplace_back(n, 0.f);
    return storage_.back().data();
  }
  void upload(float* dst, const float* src, size_t n) { std::memcpy(dst, src, n * sizeof(float)); }
  void download(float* dst, const float* src, size_t n) { std::memcpy(dst, src, n * sizeof(float)); }
  Plan::Stream stream() const { return {}; }

  // Mean squared error of y against target; writes dL/dy.
  double mse(const float* y, const float* target, float* dy, int64_t n) {
    const float scale = 2.f / float(n);
    double acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += squared_error(y[i], target[i], scale, dy[i]);
    return acc / double(n);
  }
  void adam(float* p, const float* g, float* m, float* v, int64_t n, const AdamStep& s) {
    for (int64_t i = 0; i < n; ++i) adam_element(p[i], g[i], m[i], v[i], s);
  }

 private:
  std::deque<std::vector<float>> storage_;  // deque: earlier buffers never move
};

struct GpuContext {
  using Plan = lory::MoeFfnCudaPlan<float>;
  static const char* name() { return "gpu (MoeFfnCudaPlan<float> + cuBLAS)"; }

  GpuContext() {
    DEMO_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    DEMO_CUBLAS(cublasCreate(&cublas_));
    // The plan checks the handle: bound to our stream, host pointer mode.
    DEMO_CUBLAS(cublasSetStream(cublas_, stream_));
    DEMO_CUBLAS(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
    partials_ = alloc(kLossBlocks);
  }
  ~GpuContext() {
    for (void* p : allocations_) cudaFree(p);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }
  GpuContext(const GpuContext&) = delete;
  GpuContext& operator=(const GpuContext&) = delete;

  float* alloc(size_t n) {
    void* p = nullptr;
    DEMO_CUDA(cudaMalloc(&p, n * sizeof(float)));
    allocations_.push_back(p);
    DEMO_CUDA(cudaMemsetAsync(p, 0, n * sizeof(float), stream_));
    return static_cast<float*>(p);
  }
  // Synchronous copies: the host buffers are reused right after.
  void upload(float* dst, const float* src, size_t n) {
    DEMO_CUDA(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    DEMO_CUDA(cudaStreamSynchronize(stream_));
  }
  void download(float* dst, const float* src, size_t n) {
    DEMO_CUDA(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    DEMO_CUDA(cudaStreamSynchronize(stream_));
  }
  Plan::Stream stream() const { return {stream_, cublas_}; }

  double mse(const float* y, const float* target, float* dy, int64_t n) {
    mse_kernel<<<kLossBlocks, kThreads, 0, stream_>>>(y, target, dy, n, 2.f / float(n), partials_);
    DEMO_CUDA(cudaGetLastError());
    float host[kLossBlocks];
    download(host, partials_, kLossBlocks);
    double acc = 0;
    for (float p : host) acc += p;
    return acc / double(n);
  }
  void adam(float* p, const float* g, float* m, float* v, int64_t n, const AdamStep& s) {
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
    adam_kernel<<<int(blocks), kThreads, 0, stream_>>>(p, g, m, v, n, s);
    DEMO_CUDA(cudaGetLastError());
  }

 private:
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::vector<void*> allocations_;
  float* partials_ = nullptr;
};

// ---- the experiment ----------------------------------------------------------------
struct Config {
  unsigned long long seed = 2405031330ull;
  int steps = 120;
  int log_every = 20;
  int domains = 4;             // K
  int experts = 4;             // E of the Lory layer
  int64_t batch = 8;           // sequences per step (batch / K per domain)
  int64_t seq_len = 256;       // L
  int64_t segment_len = 32;    // T -> N = 8 segments per sequence
  int64_t d = 32, f = 64;      // model and FFN dims (f is also the dense FFN's)
  int teacher_hidden = 32;     // h of each domain's teacher
  float domain_shift = 1.0f;   // per-coordinate std of the domain means mu_k
  float lr = 3e-3f;            // Adam, expert (and dense FFN) weights
  float router_lr = 1e-2f;     // Adam, router W_r
  int eval_batches = 4;        // held-out batches for the routing table and final losses
};

// One domain: input mean and teacher.
struct Domain {
  std::vector<float> mu;      // [d]
  std::vector<float> W1, b1;  // [h, d], [h]
  std::vector<float> W2;      // [d, h]
};

std::vector<float> normal(size_t n, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}
std::vector<float> uniform(size_t n, float bound, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

void teacher(const Domain& D, int64_t d, int h, const float* x, float* y) {
  std::vector<float> hid(h);
  for (int j = 0; j < h; ++j) {
    float a = D.b1[j];
    for (int64_t i = 0; i < d; ++i) a += D.W1[j * d + i] * x[i];
    hid[j] = std::tanh(a);
  }
  for (int64_t i = 0; i < d; ++i) {
    float a = 0.f;
    for (int j = 0; j < h; ++j) a += D.W2[i * h + j] * hid[j];
    y[i] = a;
  }
}

std::vector<Domain> make_domains(const Config& c, std::mt19937_64& rng) {
  std::vector<Domain> out(c.domains);
  const int h = c.teacher_hidden;
  // Pre-activations W1 x of unit variance (x has per-coordinate second moment 1 + shift^2).
  const float w1_std = 1.f / std::sqrt(float(c.d) * (1.f + c.domain_shift * c.domain_shift));
  for (auto& D : out) {
    D.mu = normal(c.d, c.domain_shift, rng);
    D.W1 = normal(size_t(h) * c.d, w1_std, rng);
    D.b1 = normal(h, 0.5f, rng);
    D.W2 = normal(size_t(c.d) * h, 1.f / std::sqrt(float(h)), rng);
    // Scale W2 so that E[|y*|^2] / d = 1: a model that predicts 0 scores MSE 1.
    std::normal_distribution<float> unit(0.f, 1.f);
    std::vector<float> x(c.d), y(c.d);
    double sq = 0;
    const int samples = 2000;
    for (int s = 0; s < samples; ++s) {
      for (int64_t i = 0; i < c.d; ++i) x[i] = D.mu[i] + unit(rng);
      teacher(D, c.d, h, x.data(), y.data());
      for (float v : y) sq += double(v) * v;
    }
    const float scale = float(1.0 / std::sqrt(sq / (double(samples) * c.d)));
    for (auto& w : D.W2) w *= scale;
  }
  return out;
}

// A batch: B sequences, sequence b from domain b % K (balanced), tokens x ~ N(mu_k, I).
struct Batch {
  std::vector<float> x, target;  // [B*L, d]
  std::vector<int> domain;       // [B]
};

void make_batch(const Config& c, const std::vector<Domain>& domains, std::mt19937_64& rng, Batch& out) {
  const int64_t tokens = c.batch * c.seq_len, d = c.d;
  out.x.resize(tokens * d);
  out.target.resize(tokens * d);
  out.domain.resize(c.batch);
  std::normal_distribution<float> unit(0.f, 1.f);
  for (int64_t b = 0; b < c.batch; ++b) {
    const int k = int(b % c.domains);
    out.domain[b] = k;
    for (int64_t t = b * c.seq_len; t < (b + 1) * c.seq_len; ++t) {
      float* x = out.x.data() + t * d;
      for (int64_t i = 0; i < d; ++i) x[i] = domains[k].mu[i] + unit(rng);
      teacher(domains[k], d, c.teacher_hidden, x, out.target.data() + t * d);
    }
  }
}

// One trainable layer (Lory with E experts, or dense with E = 1) in Ctx's memory.
template <class Ctx>
struct Model {
  using Plan = typename Ctx::Plan;
  static constexpr int kTensors = 4;  // W_r, W_g, W_u, W_d

  Plan plan;
  int experts;
  float* param[kTensors] = {};
  float* grad[kTensors] = {};
  float* adam_m[kTensors] = {};
  float* adam_v[kTensors] = {};
  int64_t size[kTensors] = {};
  float *y = nullptr, *dy = nullptr, *dx = nullptr, *hbar = nullptr, *probs = nullptr, *weights = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  Model(Ctx& ctx, const Config& c, int E, std::mt19937_64& rng)
      : plan(lory::SegmentLayout{c.batch, c.seq_len, c.segment_len}, lory::FfnShape{c.d, c.f, E},
             lory::RoutingMode::kCausalSegment),
        experts(E) {
    check(plan.can_implement(), "plan.can_implement");
    const int64_t d = c.d, f = c.f, S = plan.layout().num_segments(), tokens = plan.layout().num_tokens();
    size[0] = E * d;
    size[1] = size[2] = size[3] = E * f * d;
    // Every expert drawn independently (never copies: identical experts give dL/de_i all equal,
    // and the router would get no signal). A small router: routing starts near uniform.
    const std::vector<float> init[kTensors] = {
        uniform(size[0], 0.1f / std::sqrt(float(d)), rng), uniform(size[1], 1.f / std::sqrt(float(d)), rng),
        uniform(size[2], 1.f / std::sqrt(float(d)), rng), uniform(size[3], 1.f / std::sqrt(float(f)), rng)};
    for (int i = 0; i < kTensors; ++i) {
      param[i] = ctx.alloc(size[i]);
      ctx.upload(param[i], init[i].data(), size[i]);
      grad[i] = ctx.alloc(size[i]);
      adam_m[i] = ctx.alloc(size[i]);  // zeroed
      adam_v[i] = ctx.alloc(size[i]);
    }
    y = ctx.alloc(tokens * d);
    dy = ctx.alloc(tokens * d);
    dx = ctx.alloc(tokens * d);
    hbar = ctx.alloc(S * d);
    probs = ctx.alloc(S * E);
    weights = ctx.alloc(S * E);
    workspace_bytes = plan.workspace_size();
    workspace = ctx.alloc((workspace_bytes + sizeof(float) - 1) / sizeof(float));
  }

  lory::MoeFfnParams<float, float> params() const {
    lory::MoeFfnParams<float, float> p;
    p.layout = plan.layout();
    p.shape = plan.shape();
    p.mode = plan.mode();
    p.W_r = param[0];
    p.W_g = param[1];
    p.W_u = param[2];
    p.W_d = param[3];
    return p;
  }

  void forward(Ctx& ctx, const float* x) {
    lory::MoeFfnForwardArgs<float, float> a;
    a.p = params();
    a.x = x;
    a.y = y;
    a.hbar = hbar;
    a.probs = probs;
    a.weights = weights;
    check(plan.forward(a, workspace, workspace_bytes, ctx.stream()), "plan.forward");
  }

  // One training step on the batch already in x / target: returns the loss before the update.
  double train_step(Ctx& ctx, const float* x, const float* target, const Config& c, int t) {
    forward(ctx, x);
    const double loss = ctx.mse(y, target, dy, plan.layout().num_tokens() * c.d);
    lory::MoeFfnBackwardArgs<float, float> b;
    b.p = params();
    b.x = x;
    b.dy = dy;
    b.hbar = hbar;
    b.probs = probs;
    b.weights = weights;
    b.dx = dx;  // the layer's input gradient: computed (the library always writes it), unused here
    b.dW_r = grad[0];
    b.dW_g = grad[1];
    b.dW_u = grad[2];
    b.dW_d = grad[3];
    check(plan.backward(b, workspace, workspace_bytes, ctx.stream()), "plan.backward");
    AdamStep s;
    s.bias1 = 1.f - std::pow(s.beta1, float(t));
    s.bias2 = 1.f - std::pow(s.beta2, float(t));
    // With E = 1 the router's only output is 1: W_r gets no gradient and is left alone.
    for (int i = experts > 1 ? 0 : 1; i < kTensors; ++i) {
      s.lr = i == 0 ? c.router_lr : c.lr;
      ctx.adam(param[i], grad[i], adam_m[i], adam_v[i], size[i], s);
    }
    return loss;
  }
};

// Held-out evaluation: per-domain MSE and the domain-by-expert table of mean
// routing weights (over every segment of each domain's sequences).
struct Eval {
  std::vector<double> mse;     // [K]
  std::vector<double> table;   // [K, E]
  double total = 0;
};

template <class Ctx>
Eval evaluate(Ctx& ctx, Model<Ctx>& m, const Config& c, const std::vector<Batch>& batches, float* x_dev) {
  const int K = c.domains, E = m.experts;
  const lory::SegmentLayout lay = m.plan.layout();
  const int64_t N = lay.segments_per_sequence(), S = lay.num_segments(), d = c.d;
  Eval ev;
  ev.mse.assign(K, 0.0);
  ev.table.assign(size_t(K) * E, 0.0);
  std::vector<double> values(K, 0.0), segments(K, 0.0);
  std::vector<float> y(lay.num_tokens() * d), w(S * E);
  for (const Batch& batch : batches) {
    ctx.upload(x_dev, batch.x.data(), batch.x.size());
    m.forward(ctx, x_dev);
    ctx.download(y.data(), m.y, y.size());
    ctx.download(w.data(), m.weights, w.size());
    for (int64_t b = 0; b < c.batch; ++b) {
      const int k = batch.domain[b];
      for (int64_t i = b * c.seq_len * d; i < (b + 1) * c.seq_len * d; ++i) {
        const double r = double(y[i]) - batch.target[i];
        ev.mse[k] += r * r;
      }
      values[k] += double(c.seq_len * d);
      for (int64_t s = b * N; s < (b + 1) * N; ++s) {
        for (int e = 0; e < E; ++e) ev.table[size_t(k) * E + e] += w[s * E + e];
        segments[k] += 1;
      }
    }
  }
  double sum = 0, count = 0;
  for (int k = 0; k < K; ++k) {
    sum += ev.mse[k];
    count += values[k];
    ev.mse[k] /= values[k];
    for (int e = 0; e < E; ++e) ev.table[size_t(k) * E + e] /= segments[k];
  }
  ev.total = sum / count;
  return ev;
}

void print_table(const Eval& ev, int K, int E) {
  std::printf("    domain |");
  for (int e = 0; e < E; ++e) std::printf("  exp%-2d", e);
  std::printf(" | top expert\n");
  for (int k = 0; k < K; ++k) {
    std::printf("    %6d |", k);
    int best = 0;
    for (int e = 0; e < E; ++e) {
      const double v = ev.table[size_t(k) * E + e];
      std::printf("  %.3f", v);
      if (v > ev.table[size_t(k) * E + best]) best = e;
    }
    std::printf(" | %d (%.2f)\n", best, ev.table[size_t(k) * E + best]);
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class Ctx>
int run(const Config& c) {
  const auto t_start = std::chrono::steady_clock::now();
  Ctx ctx;
  std::mt19937_64 rng(c.seed);
  const std::vector<Domain> domains = make_domains(c, rng);
  std::mt19937_64 init_rng(c.seed + 1), data_rng(c.seed + 2), eval_rng(c.seed + 3);
  Model<Ctx> lory_model(ctx, c, c.experts, init_rng);
  Model<Ctx> dense_model(ctx, c, 1, init_rng);

  const lory::SegmentLayout lay = lory_model.plan.layout();
  const int64_t n_expert = 3 * c.d * c.f;
  std::printf("lory train demo: Lory MoE FFN vs dense FFN, no auxiliary loss; device %s, seed %llu\n", Ctx::name(),
              c.seed);
  std::printf("  data : K=%d domains (x ~ N(mu_k, I), |mu_k| ~ %.1f*sqrt(d); teacher y* = W2 tanh(W1 x + b1), h=%d),\n"
              "         one domain per sequence, fresh batches of B=%lld sequences x L=%lld tokens\n",
              c.domains, c.domain_shift, c.teacher_hidden, (long long)c.batch, (long long)c.seq_len);
  std::printf("  layer: d=%lld f=%lld SwiGLU, causal segment routing, T=%lld (N=%lld segments per sequence)\n",
              (long long)c.d, (long long)c.f, (long long)c.segment_len, (long long)lay.segments_per_sequence());
  std::printf("  Lory : E=%d experts, %lld parameters (%lld per expert + router); active per segment: %lld\n",
              c.experts, (long long)(c.experts * n_expert + c.experts * c.d), (long long)n_expert,
              (long long)n_expert);
  std::printf("  dense: the same plan with E=1, %lld parameters\n", (long long)n_expert);
  std::printf("  Adam lr %.0e (experts / dense), %.0e (router), MSE loss (targets scaled to E[y*^2]=1)\n\n", c.lr,
              c.router_lr);

  std::vector<Batch> eval_set(c.eval_batches);
  for (auto& b : eval_set) make_batch(c, domains, eval_rng, b);
  float* x_dev = ctx.alloc(size_t(lay.num_tokens() * c.d));
  float* target_dev = ctx.alloc(size_t(lay.num_tokens() * c.d));
  const Eval before = evaluate(ctx, lory_model, c, eval_set, x_dev);

  std::printf("  step   Lory loss   dense loss\n");
  Batch batch;
  double t_lory = 0, t_dense = 0, last_lory = 0, last_dense = 0;
  for (int step = 1; step <= c.steps; ++step) {
    make_batch(c, domains, data_rng, batch);
    ctx.upload(x_dev, batch.x.data(), batch.x.size());
    ctx.upload(target_dev, batch.target.data(), batch.target.size());
    auto t0 = std::chrono::steady_clock::now();
    last_lory = lory_model.train_step(ctx, x_dev, target_dev, c, step);
    t_lory += seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    last_dense = dense_model.train_step(ctx, x_dev, target_dev, c, step);
    t_dense += seconds_since(t0);
    if (step == 1 || step % c.log_every == 0 || step == c.steps)
      std::printf("  %4d   %9.4f   %10.4f\n", step, last_lory, last_dense);
  }

  const Eval after = evaluate(ctx, lory_model, c, eval_set, x_dev);
  const Eval dense = evaluate(ctx, dense_model, c, eval_set, x_dev);
  const int K = c.domains, E = c.experts;
  std::printf("\nmean routing weight per domain (rows) and expert (columns), held-out set of %lld sequences:\n",
              (long long)(c.eval_batches * c.batch));
  std::printf("  before training:\n");
  print_table(before, K, E);
  std::printf("  after %d steps:\n", c.steps);
  print_table(after, K, E);

  std::printf("\nheld-out MSE (a model predicting 0 scores 1):\n");
  std::printf("    domain |   Lory E=%-2d   dense E=1\n", E);
  for (int k = 0; k < K; ++k) std::printf("    %6d |   %9.4f   %9.4f\n", k, after.mse[k], dense.mse[k]);
  std::printf("       all |   %9.4f   %9.4f   (before training: Lory %.4f)\n", after.total, dense.total,
              before.total);
  std::printf("final training loss: Lory %.4f, dense %.4f\n", last_lory, last_dense);
  std::printf("wall time %.2f s (training: Lory %.2f s, dense %.2f s for %d steps)\n", seconds_since(t_start), t_lory,
              t_dense, c.steps);
  return 0;
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--device cpu|gpu|auto] [--steps N] [--seed N] [--experts E] [--lr X] [--router-lr X] "
               "[--log-every N]\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  std::string device = "auto";
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--device") == 0 && has_value) device = argv[++i];
    else if (std::strcmp(argv[i], "--steps") == 0 && has_value) c.steps = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--seed") == 0 && has_value) c.seed = std::strtoull(argv[++i], nullptr, 10);
    else if (std::strcmp(argv[i], "--experts") == 0 && has_value) c.experts = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--lr") == 0 && has_value) c.lr = float(std::atof(argv[++i]));
    else if (std::strcmp(argv[i], "--router-lr") == 0 && has_value) c.router_lr = float(std::atof(argv[++i]));
    else if (std::strcmp(argv[i], "--log-every") == 0 && has_value) c.log_every = std::atoi(argv[++i]);
    else return usage(argv[0]);
  }
  if (c.steps < 1 || c.log_every < 1 || c.experts < 1 || c.experts > lory::kMaxExperts || c.lr <= 0.f ||
      c.router_lr <= 0.f)
    return usage(argv[0]);

  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess) {
    gpus = 0;
    (void)cudaGetLastError();  // no driver or no device: clear the (non-sticky) error, use the CPU
  }
  if (device == "auto") device = gpus > 0 ? "gpu" : "cpu";
  if (device == "gpu") {
    if (gpus == 0) fail("--device gpu", "no CUDA device found");
    return run<GpuContext>(c);
  }
  if (device == "cpu") return run<CpuContext>(c);
  return usage(argv[0]);
}
