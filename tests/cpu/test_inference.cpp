// Inference primitives on the CPU: the twin (reference/inference.hpp) against a
// straightforward double computation and against the whole-layer twin with
// prompt-level routing; the shared orchestration (run_prompt_cache /
// run_decode_step, the code the GPU runs) on the CPU backend against the twin;
// the decode-method rule; validation errors. Odd shapes on purpose.
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"  // check_close_to_terms
#include "common/test_util.hpp"
#include "lory/inference.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/reference/inference.hpp"
#include "lory/reference/moe_ffn.hpp"

namespace {

using lory::DecodeMethod;
using lory::FfnShape;
using lory::Status;
using lory_test::rel_error;

struct Case {
  int64_t B, L;
  FfnShape sh;
};
// E = 1, d and f not multiples of 8, B = 1, L = 1, a paper-like ratio.
const Case kCases[] = {{3, 5, {13, 19, 4}}, {1, 1, {8, 8, 1}}, {2, 7, {9, 21, 1}}, {5, 3, {16, 40, 6}},
                       {1, 4, {11, 6, 3}}};

// A model and B prompts in storage dtype T (routing data in float).
template <class T>
struct Model {
  int64_t B, L;
  FfnShape sh;
  std::vector<T> x, W_r, W_g, W_u, W_d, tok;  // tok: one decode token per sequence [B, d]
  std::vector<float> bias;
  Model(const Case& c, std::mt19937_64& rng) : B(c.B), L(c.L), sh(c.sh) {
    const size_t E = sh.experts, fd = sh.f * sh.d;
    x = lory_test::random_vector<T>(B * L * sh.d, rng);
    tok = lory_test::random_vector<T>(B * sh.d, rng);
    W_r = lory_test::random_vector<T>(E * sh.d, rng, -2, 2);  // O(1) logits: routing matters
    const double sg = 2.0 / std::sqrt(double(sh.d)), sd = 2.0 / std::sqrt(double(sh.f));
    W_g = lory_test::random_vector<T>(E * fd, rng, -sg, sg);
    W_u = lory_test::random_vector<T>(E * fd, rng, -sg, sg);
    W_d = lory_test::random_vector<T>(E * fd, rng, -sd, sd);
    bias = lory_test::random_vector<float>(E, rng, -0.5, 0.5);
  }
  // The same model, values converted exactly to double (for the double twin).
  template <class U>
  explicit Model(const Model<U>& o)
      : B(o.B), L(o.L), sh(o.sh), x(conv(o.x)), W_r(conv(o.W_r)), W_g(conv(o.W_g)), W_u(conv(o.W_u)),
        W_d(conv(o.W_d)), tok(conv(o.tok)), bias(o.bias) {}
  template <class U>
  static std::vector<T> conv(const std::vector<U>& v) {
    return lory_test::from_double_vector<T>(lory_test::to_double_vector(v));
  }
  int64_t P() const { return sh.params_per_expert(); }
};

// ---- straightforward double computation --------------------------------------------------

template <class T>
std::vector<double> direct_probs(const Model<T>& M) {
  const int64_t d = M.sh.d, E = M.sh.experts;
  std::vector<double> p(M.B * E);
  for (int64_t b = 0; b < M.B; ++b) {
    std::vector<double> mean(d, 0.0), z(E);
    for (int64_t t = 0; t < M.L; ++t)
      for (int64_t j = 0; j < d; ++j) mean[j] += lory::to_double(M.x[(b * M.L + t) * d + j]) / double(M.L);
    double zmax = -1e300, den = 0;
    for (int64_t e = 0; e < E; ++e) {
      z[e] = M.bias[e];
      for (int64_t j = 0; j < d; ++j) z[e] += lory::to_double(M.W_r[e * d + j]) * mean[j];
      zmax = std::max(zmax, z[e]);
    }
    for (int64_t e = 0; e < E; ++e) den += std::exp(z[e] - zmax);
    for (int64_t e = 0; e < E; ++e) p[b * E + e] = std::exp(z[e] - zmax) / den;
  }
  return p;
}

// Merged FFN of every sequence, laid out as the cache: [Wbar_g | Wbar_u | Wbar_d] per row.
template <class T, class W>
std::vector<double> direct_cache(const Model<T>& M, const std::vector<W>& p) {
  const int64_t E = M.sh.experts, fd = M.sh.f * M.sh.d, P = M.P();
  std::vector<double> c(M.B * P, 0.0);
  const std::vector<T>* mats[3] = {&M.W_g, &M.W_u, &M.W_d};
  for (int64_t b = 0; b < M.B; ++b)
    for (int i = 0; i < 3; ++i)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t j = 0; j < fd; ++j)
          c[b * P + i * fd + j] += lory::to_double(p[b * E + e]) * lory::to_double((*mats[i])[e * fd + j]);
  return c;
}

// y_b = Wbar_d (silu(Wbar_g x_b) * (Wbar_u x_b)) from a cache of merged weights.
template <class C, class X>
std::vector<double> direct_ffn(const std::vector<C>& cache, const std::vector<X>& x, int64_t B, const FfnShape& sh) {
  const int64_t d = sh.d, f = sh.f, fd = f * d, P = sh.params_per_expert();
  std::vector<double> y(B * d);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> m(f);
    for (int64_t i = 0; i < f; ++i) {
      double a = 0, u = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double xj = lory::to_double(x[b * d + j]);
        a += lory::to_double(cache[b * P + i * d + j]) * xj;
        u += lory::to_double(cache[b * P + fd + i * d + j]) * xj;
      }
      m[i] = a / (1.0 + std::exp(-a)) * u;
    }
    for (int64_t j = 0; j < d; ++j) {
      double s = 0;
      for (int64_t i = 0; i < f; ++i) s += lory::to_double(cache[b * P + 2 * fd + j * f + i]) * m[i];
      y[b * d + j] = s;
    }
  }
  return y;
}

// ---- argument builders -------------------------------------------------------------------

template <class T, class R>
lory::PromptCacheArgs<T, R> prompt_args(const Model<T>& M, const R* bias, R* probs, T* cache) {
  lory::PromptCacheArgs<T, R> a;
  a.batch = M.B;
  a.prompt_len = M.L;
  a.shape = M.sh;
  a.x = M.x.data();
  a.W_r = M.W_r.data();
  a.bias = bias;
  a.W_g = M.W_g.data();
  a.W_u = M.W_u.data();
  a.W_d = M.W_d.data();
  a.probs = probs;
  a.cache = cache;
  return a;
}

template <class T, class R>
lory::DecodeStepArgs<T, R> decode_args(const Model<T>& M, DecodeMethod method, const T* x, T* y, const T* cache,
                                       const R* probs) {
  lory::DecodeStepArgs<T, R> a;
  a.batch = M.B;
  a.shape = M.sh;
  a.method = method;
  a.x = x;
  a.y = y;
  a.cache = cache;
  a.probs = probs;
  a.W_g = M.W_g.data();
  a.W_u = M.W_u.data();
  a.W_d = M.W_d.data();
  return a;
}

template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  lory_test::poison(v);
  return v;
}

template <class A, class B>
void check_close(const char* what, const std::vector<A>& got, const std::vector<B>& ref, double tol) {
  INFO(what);
  REQUIRE(got.size() == ref.size());
  REQUIRE(lory_test::count_nan(got) == 0);  // every element written
  const double err = rel_error(got, ref);
  INFO("rel error " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

// The sum of |terms| of a decode step's down projection, Mag[b, j] = sum_e w_e sum_i |Wd_e[j, i] m_b[i]|
// (merged: the cached Wbar_d, one term of weight 1; m_b in double from the cache). With d and f this
// small, y can cancel to far below its terms, and rounding the activations m to T errs relative to the
// terms, not to y: the decode outputs are bounded relative to these.
template <class T>
std::vector<double> down_term_magnitudes(const Model<T>& M, DecodeMethod method, const std::vector<double>& cache,
                                         const std::vector<double>& probs) {
  const int64_t d = M.sh.d, f = M.sh.f, E = M.sh.experts, fd = f * d, P = M.P();
  std::vector<double> mag(M.B * d, 0.0);
  for (int64_t b = 0; b < M.B; ++b) {
    std::vector<double> m(f);
    for (int64_t i = 0; i < f; ++i) {
      double a = 0, u = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double xj = lory::to_double(M.tok[b * d + j]);
        a += cache[b * P + i * d + j] * xj;
        u += cache[b * P + fd + i * d + j] * xj;
      }
      m[i] = a / (1.0 + std::exp(-a)) * u;
    }
    for (int64_t j = 0; j < d; ++j)
      for (int64_t i = 0; i < f; ++i) {
        if (method == DecodeMethod::kMerged) {
          mag[b * d + j] += std::fabs(cache[b * P + 2 * fd + j * f + i] * m[i]);
          continue;
        }
        for (int64_t e = 0; e < E; ++e)
          mag[b * d + j] += probs[b * E + e] * std::fabs(lory::to_double(M.W_d[e * fd + j * f + i]) * m[i]);
      }
  }
  return mag;
}

std::string case_name(const Case& c) {
  return "B" + std::to_string(c.B) + " L" + std::to_string(c.L) + " d" + std::to_string(c.sh.d) + " f" +
         std::to_string(c.sh.f) + " E" + std::to_string(c.sh.experts);
}

}  // namespace

TEST_CASE("inference twin: prompt cache equals the direct double computation", "[inference][reference]") {
  auto rng = lory_test::make_rng("inference-prompt-twin");
  for (const Case& c : kCases) {
    INFO(case_name(c));
    const Model<double> M(c, rng);
    const std::vector<double> bias(M.bias.begin(), M.bias.end());
    auto probs = poisoned<double>(M.B * c.sh.experts);
    auto cache = poisoned<double>(M.B * M.P());
    REQUIRE(lory::reference::build_prompt_cache(prompt_args(M, bias.data(), probs.data(), cache.data())) ==
            Status::kSuccess);
    const auto p_ref = direct_probs(M);
    check_close("probs", probs, p_ref, 1e-12);
    check_close("cache", cache, direct_cache(M, p_ref), 1e-12);
    // Route only (no cache): the same probabilities.
    auto probs2 = poisoned<double>(M.B * c.sh.experts);
    REQUIRE(lory::reference::build_prompt_cache(prompt_args<double, double>(M, bias.data(), probs2.data(), nullptr)) ==
            Status::kSuccess);
    check_close("probs, route only", probs2, p_ref, 1e-12);
  }
}

TEST_CASE("inference twin: both decode methods equal the direct double computation", "[inference][reference]") {
  auto rng = lory_test::make_rng("inference-decode-twin");
  for (const Case& c : kCases) {
    INFO(case_name(c));
    const Model<double> M(c, rng);
    const auto p = direct_probs(M);
    const auto cache = direct_cache(M, p);
    const auto y_ref = direct_ffn(cache, M.tok, M.B, c.sh);
    for (DecodeMethod method : {DecodeMethod::kMerged, DecodeMethod::kExpertSpace}) {
      INFO(lory::decode_method_name(method));
      auto y = poisoned<double>(M.B * c.sh.d);
      REQUIRE(lory::reference::decode_step(decode_args(M, method, M.tok.data(), y.data(), cache.data(), p.data())) ==
              Status::kSuccess);
      check_close("y", y, y_ref, 1e-12);
    }
    // In place: y aliases x.
    auto xy = M.tok;
    REQUIRE(lory::reference::decode_step(
                decode_args(M, DecodeMethod::kExpertSpace, xy.data(), xy.data(), cache.data(), p.data())) ==
            Status::kSuccess);
    check_close("y in place", xy, y_ref, 1e-12);
  }
}

TEST_CASE("inference twin: decode matches the whole-layer twin with prompt-level routing", "[inference][reference]") {
  // One segment per sequence (T = L): the layer applies each sequence's merged
  // FFN to every prompt token, so decoding any prompt token with the cache built
  // from that prompt must reproduce the layer's output for it.
  auto rng = lory_test::make_rng("inference-vs-layer");
  for (const Case& c : kCases) {
    INFO(case_name(c));
    const Model<double> M(c, rng);
    const std::vector<double> bias(M.bias.begin(), M.bias.end());
    const int64_t d = c.sh.d, E = c.sh.experts;
    std::vector<double> y_layer(M.B * M.L * d), hbar(M.B * d), lprobs(M.B * E), weights(M.B * E);
    lory::MoeFfnForwardArgs<double, double> f;
    f.p.layout = {M.B, M.L, M.L};
    f.p.shape = c.sh;
    f.p.mode = lory::RoutingMode::kPromptLevel;
    f.p.W_r = M.W_r.data();
    f.p.bias = bias.data();
    f.p.W_g = M.W_g.data();
    f.p.W_u = M.W_u.data();
    f.p.W_d = M.W_d.data();
    f.x = M.x.data();
    f.y = y_layer.data();
    f.hbar = hbar.data();
    f.probs = lprobs.data();
    f.weights = weights.data();
    REQUIRE(lory::reference::moe_ffn_forward(f) == Status::kSuccess);

    auto probs = poisoned<double>(M.B * E);
    auto cache = poisoned<double>(M.B * M.P());
    REQUIRE(lory::reference::build_prompt_cache(prompt_args(M, bias.data(), probs.data(), cache.data())) ==
            Status::kSuccess);
    check_close("probs vs layer weights", probs, weights, 1e-12);
    for (int64_t t : {int64_t(0), M.L - 1}) {  // first and last prompt token
      INFO("token " << t);
      std::vector<double> x(M.B * d), y_ref(M.B * d);
      for (int64_t b = 0; b < M.B; ++b)
        for (int64_t j = 0; j < d; ++j) {
          x[b * d + j] = M.x[(b * M.L + t) * d + j];
          y_ref[b * d + j] = y_layer[(b * M.L + t) * d + j];
        }
      for (DecodeMethod method : {DecodeMethod::kMerged, DecodeMethod::kExpertSpace}) {
        auto y = poisoned<double>(M.B * d);
        REQUIRE(lory::reference::decode_step(decode_args(M, method, x.data(), y.data(), cache.data(), probs.data())) ==
                Status::kSuccess);
        check_close(lory::decode_method_name(method), y, y_ref, 1e-12);
      }
    }
  }
}

namespace {

// The orchestration the GPU runs, on the CPU backend, against the double twin.
template <class T>
void check_orchestration(const Case& c, std::mt19937_64& rng) {
  using Backend = lory::reference::InferenceCpuBackend;
  INFO(case_name(c));
  const Model<T> M(c, rng);
  const int64_t d = c.sh.d, E = c.sh.experts;
  const double tol = lory_test::tolerance<T>();

  // Prompt cache: size query, too small a workspace, then the run.
  auto probs = poisoned<float>(M.B * E);
  auto cache = poisoned<T>(M.B * M.P());
  const auto pa = prompt_args(M, M.bias.data(), probs.data(), cache.data());
  size_t bytes = 0;
  REQUIRE(lory::run_prompt_cache<Backend, T>(pa, nullptr, bytes, {}) == Status::kSuccess);
  REQUIRE(bytes >= (M.B * d + M.B * E) * sizeof(float));
  std::vector<unsigned char> ws(bytes);
  size_t small = bytes - 1;
  REQUIRE(lory::run_prompt_cache<Backend, T>(pa, ws.data(), small, {}) == Status::kErrorWorkspaceTooSmall);
  REQUIRE(lory_test::count_nan(probs) == M.B * E);  // nothing written before the check
  REQUIRE(lory::run_prompt_cache<Backend, T>(pa, ws.data(), bytes, {}) == Status::kSuccess);
  const Model<double> Md(M);  // the twin in double on the very same values
  const std::vector<double> bias_d(M.bias.begin(), M.bias.end());
  std::vector<double> p_ref(M.B * E), cache_ref(M.B * M.P());
  REQUIRE(lory::reference::build_prompt_cache(prompt_args(Md, bias_d.data(), p_ref.data(), cache_ref.data())) ==
          Status::kSuccess);
  check_close("probs", probs, p_ref, 1e-5);
  check_close("cache", cache, cache_ref, tol);

  // Decode, both methods, from the orchestrated cache and probabilities.
  const auto cache_d = lory_test::to_double_vector(cache), probs_d = lory_test::to_double_vector(probs);
  std::vector<double> y_ref(M.B * d);
  REQUIRE(lory::reference::decode_step(
              decode_args(Md, DecodeMethod::kMerged, Md.tok.data(), y_ref.data(), cache_d.data(), probs_d.data())) ==
          Status::kSuccess);
  std::vector<std::vector<T>> ys;
  size_t merged_bytes = 0, expert_bytes = 0;
  for (DecodeMethod method : {DecodeMethod::kMerged, DecodeMethod::kExpertSpace}) {
    INFO(lory::decode_method_name(method));
    auto y = poisoned<T>(M.B * d);
    const auto da = decode_args(M, method, M.tok.data(), y.data(), cache.data(), probs.data());
    size_t need = 0;
    REQUIRE(lory::run_decode_step<Backend, T>(da, nullptr, need, {}) == Status::kSuccess);
    (method == DecodeMethod::kMerged ? merged_bytes : expert_bytes) = need;
    std::vector<unsigned char> dws(need);
    size_t too_small = need - 1;
    REQUIRE(lory::run_decode_step<Backend, T>(da, dws.data(), too_small, {}) == Status::kErrorWorkspaceTooSmall);
    REQUIRE(lory_test::count_nan(y) == M.B * d);
    REQUIRE(lory::run_decode_step<Backend, T>(da, dws.data(), need, {}) == Status::kSuccess);
    // Expert space rounds to T twice more than the merged path (the per-expert
    // outputs before each combination), and tiny d, f leave few terms to average
    // rounding out: a 2x bound for it.
    lory_test::check_close_to_terms("y vs twin", y, y_ref, down_term_magnitudes(M, method, cache_d, probs_d),
                         method == DecodeMethod::kMerged ? tol : 2 * tol);
    ys.push_back(y);
  }
  // The two methods agree to rounding (each against the other's output); expert space's terms
  // bound the merged path's (|sum_e p_e Wd_e| <= sum_e p_e |Wd_e|).
  lory_test::check_close_to_terms("merged vs expert-space", ys[0], lory_test::to_double_vector(ys[1]),
                       down_term_magnitudes(M, DecodeMethod::kExpertSpace, cache_d, probs_d), 3 * tol);
  // Expert space keeps the [B, E, max(f, d)] per-expert outputs on top.
  REQUIRE(expert_bytes >= merged_bytes + M.B * E * std::max(c.sh.f, d) * sizeof(T));
}

}  // namespace

TEST_CASE("inference orchestration on the CPU backend matches the twin", "[inference][plan]") {
  auto rng = lory_test::make_rng("inference-orchestration");
  for (const Case& c : kCases) {
    check_orchestration<float>(c, rng);
    check_orchestration<__half>(c, rng);
    check_orchestration<__nv_bfloat16>(c, rng);
  }
}

TEST_CASE("inference: the decode-method rule picks the one that moves fewer bytes", "[inference][rule]") {
  const FfnShape paper{1536, 4096, 32};
  const size_t bf16 = 2;
  using lory::choose_decode_method;
  using lory::decode_step_bytes;
  // By the formula, for every batch size.
  for (int64_t B = 1; B <= 1024; ++B) {
    const double mb = decode_step_bytes(DecodeMethod::kMerged, B, paper, bf16);
    const double eb = decode_step_bytes(DecodeMethod::kExpertSpace, B, paper, bf16);
    REQUIRE(choose_decode_method(B, paper, bf16) == (mb <= eb ? DecodeMethod::kMerged : DecodeMethod::kExpertSpace));
  }
  // Merged up to about B = E, expert space beyond, one crossover.
  REQUIRE(choose_decode_method(1, paper, bf16) == DecodeMethod::kMerged);
  REQUIRE(choose_decode_method(32, paper, bf16) == DecodeMethod::kMerged);
  REQUIRE(choose_decode_method(64, paper, bf16) == DecodeMethod::kExpertSpace);
  REQUIRE(choose_decode_method(256, paper, bf16) == DecodeMethod::kExpertSpace);
  int crossings = 0;
  for (int64_t B = 2; B <= 1024; ++B)
    crossings += choose_decode_method(B, paper, bf16) != choose_decode_method(B - 1, paper, bf16);
  REQUIRE(crossings == 1);
  // The weight terms dominate: B * P against E * P.
  REQUIRE(decode_step_bytes(DecodeMethod::kMerged, 1, paper, bf16) >= 3.0 * 1536 * 4096 * bf16);
  REQUIRE(decode_step_bytes(DecodeMethod::kExpertSpace, 1, paper, bf16) >= 32 * 3.0 * 1536 * 4096 * bf16);
  // One expert: the cache is the expert itself; from B = 2 expert space reads less.
  const FfnShape one{1536, 4096, 1};
  REQUIRE(choose_decode_method(1, one, bf16) == DecodeMethod::kMerged);
  REQUIRE(choose_decode_method(2, one, bf16) == DecodeMethod::kExpertSpace);
  // FLOPs: expert space does E times the work.
  REQUIRE(lory::decode_step_flops(DecodeMethod::kExpertSpace, 4, paper) ==
          32 * lory::decode_step_flops(DecodeMethod::kMerged, 4, paper));

  // resolve_decode_method: forced methods win; kAuto uses the rule when both
  // inputs are present, else the present one.
  std::vector<float> dummy(8);
  lory::DecodeStepArgs<float, float> a;
  a.batch = 4;
  a.shape = {64, 64, 2};  // big enough for the weights to dominate the bytes
  a.x = dummy.data();
  a.y = dummy.data();
  a.cache = dummy.data();
  REQUIRE(lory::resolve_decode_method(a) == DecodeMethod::kMerged);  // experts absent
  a.cache = nullptr;
  a.probs = a.W_g = a.W_u = a.W_d = dummy.data();
  REQUIRE(lory::resolve_decode_method(a) == DecodeMethod::kExpertSpace);  // cache absent
  a.cache = dummy.data();
  REQUIRE(lory::resolve_decode_method(a) == choose_decode_method(4, a.shape, sizeof(float)));
  REQUIRE(lory::resolve_decode_method(a) == DecodeMethod::kExpertSpace);  // B = 4 > E = 2
  a.batch = 2;
  REQUIRE(lory::resolve_decode_method(a) == DecodeMethod::kMerged);
  a.method = DecodeMethod::kExpertSpace;
  REQUIRE(lory::resolve_decode_method(a) == DecodeMethod::kExpertSpace);
  a.method = DecodeMethod::kMerged;
  a.batch = 100;
  REQUIRE(lory::resolve_decode_method(a) == DecodeMethod::kMerged);
}

TEST_CASE("inference: validation errors", "[inference][validation]") {
  // Inputs may share memory; outputs have their own (the aliasing rules).
  std::vector<float> buf(4096, 1.f), out_probs(64), out_cache(4096), xy(64);
  float* p = buf.data();
  lory::PromptCacheArgs<float, float> pa;
  pa.batch = 2;
  pa.prompt_len = 3;
  pa.shape = {8, 12, 4};
  pa.x = pa.W_r = pa.W_g = pa.W_u = pa.W_d = p;
  pa.probs = out_probs.data();
  pa.cache = out_cache.data();
  REQUIRE(lory::validate(pa) == Status::kSuccess);
  auto bad = pa; bad.batch = 0;
  REQUIRE(lory::validate(bad) == Status::kErrorInvalidSize);
  bad = pa; bad.prompt_len = -1;
  REQUIRE(lory::validate(bad) == Status::kErrorInvalidSize);
  bad = pa; bad.shape.f = 0;
  REQUIRE(lory::validate(bad) == Status::kErrorInvalidSize);
  bad = pa; bad.shape.experts = 0;
  REQUIRE(lory::validate(bad) == Status::kErrorUnsupportedExpertCount);
  bad = pa; bad.shape.experts = lory::kMaxExperts + 1;
  REQUIRE(lory::validate(bad) == Status::kErrorUnsupportedExpertCount);
  bad = pa; bad.x = nullptr;
  REQUIRE(lory::validate(bad) == Status::kErrorNullPointer);
  bad = pa; bad.W_r = nullptr;
  REQUIRE(lory::validate(bad) == Status::kErrorNullPointer);
  bad = pa; bad.probs = nullptr;
  REQUIRE(lory::validate(bad) == Status::kErrorNullPointer);
  bad = pa; bad.W_d = nullptr;
  REQUIRE(lory::validate(bad) == Status::kErrorNullPointer);
  bad.cache = nullptr;  // route only: the experts are not needed
  REQUIRE(lory::validate(bad) == Status::kSuccess);
  bad = pa; bad.batch = int64_t(1) << 40; bad.prompt_len = int64_t(1) << 30;
  REQUIRE(lory::validate(bad) == Status::kErrorInvalidSize);
  bad = pa; bad.batch = int64_t(1) << 40; bad.shape = {1 << 14, 1 << 14, 4};
  REQUIRE(lory::validate(bad) == Status::kErrorInvalidSize);  // B * P overflows

  lory::DecodeStepArgs<float, float> da;
  da.batch = 3;
  da.shape = {8, 12, 4};
  da.cache = da.probs = da.W_g = da.W_u = da.W_d = p;
  da.x = da.y = xy.data();  // y in place over x
  for (DecodeMethod m : {DecodeMethod::kAuto, DecodeMethod::kMerged, DecodeMethod::kExpertSpace}) {
    da.method = m;
    REQUIRE(lory::validate(da) == Status::kSuccess);
  }
  auto bd = da; bd.batch = 0;
  REQUIRE(lory::validate(bd) == Status::kErrorInvalidSize);
  bd = da; bd.shape.d = -2;
  REQUIRE(lory::validate(bd) == Status::kErrorInvalidSize);
  bd = da; bd.shape.experts = 0;
  REQUIRE(lory::validate(bd) == Status::kErrorUnsupportedExpertCount);
  bd = da; bd.method = static_cast<DecodeMethod>(3);
  REQUIRE(lory::validate(bd) == Status::kErrorInvalidArgument);
  bd = da; bd.x = nullptr;
  REQUIRE(lory::validate(bd) == Status::kErrorNullPointer);
  bd = da; bd.y = nullptr;
  REQUIRE(lory::validate(bd) == Status::kErrorNullPointer);
  bd = da; bd.method = DecodeMethod::kMerged; bd.cache = nullptr;
  REQUIRE(lory::validate(bd) == Status::kErrorNullPointer);
  bd.probs = nullptr;  // irrelevant to the merged method
  bd.cache = p;
  REQUIRE(lory::validate(bd) == Status::kSuccess);
  for (int which = 0; which < 4; ++which) {
    bd = da;
    bd.method = DecodeMethod::kExpertSpace;
    const float** field[4] = {&bd.probs, &bd.W_g, &bd.W_u, &bd.W_d};
    *field[which] = nullptr;
    REQUIRE(lory::validate(bd) == Status::kErrorNullPointer);
    bd.method = DecodeMethod::kAuto;  // falls back to the cache
    REQUIRE(lory::validate(bd) == Status::kSuccess);
    REQUIRE(lory::resolve_decode_method(bd) == DecodeMethod::kMerged);
  }
  bd = da; bd.cache = nullptr; bd.probs = nullptr;  // kAuto with neither
  REQUIRE(lory::validate(bd) == Status::kErrorNullPointer);
  bd = da; bd.method = DecodeMethod::kMerged; bd.batch = int64_t(1) << 50; bd.shape = {1 << 10, 1 << 10, 4};
  REQUIRE(lory::validate(bd) == Status::kErrorInvalidSize);

  lory::ExpertCombineArgs<float> ca;
  ca.rows = 2; ca.experts = 3; ca.cols = 5; ca.in = p; ca.weights = p; ca.out = xy.data(); ca.out_stride = 5;
  REQUIRE(lory::validate(ca) == Status::kSuccess);
  auto bc = ca; bc.out_stride = 4;
  REQUIRE(lory::validate(bc) == Status::kErrorInvalidShape);
  bc = ca; bc.experts = 0;
  REQUIRE(lory::validate(bc) == Status::kErrorUnsupportedExpertCount);
  bc = ca; bc.weights = nullptr;
  REQUIRE(lory::validate(bc) == Status::kErrorNullPointer);
  bc = ca; bc.cols = 0;
  REQUIRE(lory::validate(bc) == Status::kErrorInvalidSize);

  // The twins and the orchestration refuse bad arguments before writing.
  std::vector<float> out(64);
  lory_test::poison(out);
  bd = da; bd.y = out.data(); bd.x = nullptr;
  REQUIRE(lory::reference::decode_step(bd) == Status::kErrorNullPointer);
  size_t bytes = 123;
  REQUIRE(lory::run_decode_step<lory::reference::InferenceCpuBackend, float>(bd, nullptr, bytes, {}) ==
          Status::kErrorNullPointer);
  REQUIRE(bytes == 123);
  bad = pa; bad.probs = out.data(); bad.batch = 0;
  REQUIRE(lory::reference::build_prompt_cache(bad) == Status::kErrorInvalidSize);
  REQUIRE(lory::run_prompt_cache<lory::reference::InferenceCpuBackend, float>(bad, nullptr, bytes, {}) ==
          Status::kErrorInvalidSize);
  REQUIRE(lory_test::count_nan(out) == 64);
}
