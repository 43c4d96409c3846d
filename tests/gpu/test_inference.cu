// The CUDA inference primitives against the double CPU twin, per storage dtype:
// build_prompt_cache (router + merges) and decode_step with both methods
// (cuBLAS GEMMs, SwiGLU, expert_combine), their agreement, kAuto, and decoding
// in place. Outputs are poisoned before every launch.
#include <cublas_v2.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/inference.cuh"
#include "lory/reference/inference.hpp"

namespace {

using lory::DecodeMethod;
using lory::FfnShape;
using lory::Status;
using lory_test::DeviceBuffer;
using lory_test::GpuContext;

struct Case {
  int64_t B, L;
  FfnShape sh;
};

template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  lory_test::poison(v);
  return v;
}

template <class A>
void check_close(const char* what, const std::vector<A>& got, const std::vector<double>& ref, double tol) {
  INFO(what);
  REQUIRE(got.size() == ref.size());
  REQUIRE(lory_test::count_nan(got) == 0);  // every element written
  const double err = lory_test::rel_error(got, ref);
  INFO("rel error " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

template <class T>
void check_case(const Case& c, std::mt19937_64& rng, GpuContext& ctx) {
  INFO("B " << c.B << " L " << c.L << " d " << c.sh.d << " f " << c.sh.f << " E " << c.sh.experts);
  const int64_t B = c.B, L = c.L, d = c.sh.d, f = c.sh.f, E = c.sh.experts, fd = f * d;
  const int64_t P = c.sh.params_per_expert();
  const double tol = lory_test::tolerance<T>();
  const double sg = 2.0 / std::sqrt(double(d)), sd = 2.0 / std::sqrt(double(f));
  const auto x = lory_test::random_vector<T>(B * L * d, rng);
  const auto tok = lory_test::random_vector<T>(B * d, rng);
  const auto W_r = lory_test::random_vector<T>(E * d, rng, -2, 2);
  const auto W_g = lory_test::random_vector<T>(E * fd, rng, -sg, sg);
  const auto W_u = lory_test::random_vector<T>(E * fd, rng, -sg, sg);
  const auto W_d = lory_test::random_vector<T>(E * fd, rng, -sd, sd);
  const auto bias = lory_test::random_vector<float>(E, rng, -0.5, 0.5);

  // The double twin on the very same values.
  using lory_test::to_double_vector;
  const auto xd = to_double_vector(x), tokd = to_double_vector(tok), W_rd = to_double_vector(W_r),
             W_gd = to_double_vector(W_g), W_ud = to_double_vector(W_u), W_dd = to_double_vector(W_d),
             biasd = to_double_vector(bias);
  std::vector<double> p_ref(B * E), cache_ref(B * P);
  lory::PromptCacheArgs<double, double> rp;
  rp.batch = B; rp.prompt_len = L; rp.shape = c.sh;
  rp.x = xd.data(); rp.W_r = W_rd.data(); rp.bias = biasd.data();
  rp.W_g = W_gd.data(); rp.W_u = W_ud.data(); rp.W_d = W_dd.data();
  rp.probs = p_ref.data(); rp.cache = cache_ref.data();
  REQUIRE(lory::reference::build_prompt_cache(rp) == Status::kSuccess);

  // Prompt cache on the GPU.
  DeviceBuffer<T> dx(x), dtok(tok), dW_r(W_r), dW_g(W_g), dW_u(W_u), dW_d(W_d);
  DeviceBuffer<float> dbias(bias), dprobs(poisoned<float>(B * E));
  DeviceBuffer<T> dcache(poisoned<T>(B * P));
  lory::PromptCacheArgs<T, float> pa;
  pa.batch = B; pa.prompt_len = L; pa.shape = c.sh;
  pa.x = dx.get(); pa.W_r = dW_r.get(); pa.bias = dbias.get();
  pa.W_g = dW_g.get(); pa.W_u = dW_u.get(); pa.W_d = dW_d.get();
  pa.probs = dprobs.get(); pa.cache = dcache.get();
  size_t bytes = 0;
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, ctx.stream) == Status::kSuccess);
  lory_test::DeviceBytes pws(bytes);
  REQUIRE(lory::build_prompt_cache(pa, pws.get(), bytes, ctx.stream) == Status::kSuccess);
  LORY_TEST_SYNC();
  const auto probs = dprobs.download(B * E);
  const auto cache = dcache.download(B * P);
  check_close("probs", probs, p_ref, 2e-5);
  check_close("cache", cache, cache_ref, tol);

  // Decode from the GPU's cache and probabilities; the twin on the same values.
  const auto cached = to_double_vector(cache), probsd = to_double_vector(probs);
  std::vector<double> y_ref(B * d);
  lory::DecodeStepArgs<double, double> rd;
  rd.batch = B; rd.shape = c.sh; rd.method = DecodeMethod::kMerged;
  rd.x = tokd.data(); rd.y = y_ref.data(); rd.cache = cached.data(); rd.probs = probsd.data();
  rd.W_g = W_gd.data(); rd.W_u = W_ud.data(); rd.W_d = W_dd.data();
  REQUIRE(lory::reference::decode_step(rd) == Status::kSuccess);

  lory::DecodeStepArgs<T, float> da;
  da.batch = B; da.shape = c.sh;
  da.x = dtok.get(); da.cache = dcache.get(); da.probs = dprobs.get();
  da.W_g = dW_g.get(); da.W_u = dW_u.get(); da.W_d = dW_d.get();
  std::vector<T> y_of[3];
  for (DecodeMethod method : {DecodeMethod::kMerged, DecodeMethod::kExpertSpace, DecodeMethod::kAuto}) {
    INFO(lory::decode_method_name(method));
    DeviceBuffer<T> dy(poisoned<T>(B * d));
    da.method = method;
    da.y = dy.get();
    size_t need = 0;
    REQUIRE(lory::decode_step(da, nullptr, need, ctx.handle, ctx.stream) == Status::kSuccess);
    auto ws = lory_test::stale_workspace(need);
    REQUIRE(lory::decode_step(da, ws.get(), need, ctx.handle, ctx.stream) == Status::kSuccess);
    LORY_TEST_SYNC();
    y_of[static_cast<int>(method) % 3] = dy.download(B * d);
    check_close("y", y_of[static_cast<int>(method) % 3], y_ref, method == DecodeMethod::kMerged ? tol : 2 * tol);
  }
  const std::vector<T>& merged = y_of[1];
  const std::vector<T>& experts = y_of[2];
  check_close("merged vs expert-space", merged, to_double_vector(experts), 3 * tol);
  // kAuto runs exactly the method the rule picks.
  const std::vector<T>& chosen =
      lory::choose_decode_method(B, c.sh, sizeof(T)) == DecodeMethod::kMerged ? merged : experts;
  REQUIRE(lory_test::max_abs_error(y_of[0].data(), chosen.data(), B * d) == 0.0);

  // In place (y aliases x), both methods.
  for (DecodeMethod method : {DecodeMethod::kMerged, DecodeMethod::kExpertSpace}) {
    INFO("in place, " << lory::decode_method_name(method));
    DeviceBuffer<T> xy(tok);
    da.method = method;
    da.x = xy.get();
    da.y = xy.get();
    size_t need = 0;
    REQUIRE(lory::decode_step(da, nullptr, need, ctx.handle, ctx.stream) == Status::kSuccess);
    auto ws = lory_test::stale_workspace(need);
    REQUIRE(lory::decode_step(da, ws.get(), need, ctx.handle, ctx.stream) == Status::kSuccess);
    LORY_TEST_SYNC();
    const auto y = xy.download(B * d);
    REQUIRE(lory_test::max_abs_error(y.data(), (method == DecodeMethod::kMerged ? merged : experts).data(), B * d) ==
            0.0);
  }
}

template <class T>
void check_dtype(const char* tag) {
  auto rng = lory_test::make_rng(tag);
  GpuContext ctx;
  // Odd d and f, E = 1, B = 1, L = 1, a long prompt (router partial sums),
  // B below and above E (kAuto takes both branches).
  const Case cases[] = {{3, 5, {13, 19, 4}}, {1, 1, {8, 8, 1}},     {2, 7, {9, 21, 1}},
                        {5, 600, {64, 96, 8}}, {40, 9, {40, 24, 6}}, {4, 3, {136, 200, 33}}};
  for (const Case& c : cases) check_case<T>(c, rng, ctx);
}

}  // namespace

TEST_CASE("CUDA inference matches the double twin: float", "[gpu][inference]") { check_dtype<float>("inf_gpu_f32"); }
TEST_CASE("CUDA inference matches the double twin: half", "[gpu][inference]") { check_dtype<__half>("inf_gpu_f16"); }
TEST_CASE("CUDA inference matches the double twin: bfloat16", "[gpu][inference]") {
  check_dtype<__nv_bfloat16>("inf_gpu_bf16");
}

TEST_CASE("CUDA decode_step refuses a cuBLAS handle bound to another stream", "[gpu][inference]") {
  GpuContext ctx;
  DeviceBuffer<float> x(8), y(8), cache(3 * 8 * 8);
  lory::DecodeStepArgs<float, float> a;
  a.batch = 1;
  a.shape = {8, 8, 2};
  a.method = DecodeMethod::kMerged;
  a.x = x.get();
  a.y = y.get();
  a.cache = cache.get();
  size_t need = 0;
  REQUIRE(lory::decode_step(a, nullptr, need, ctx.handle, ctx.stream) == Status::kSuccess);
  auto ws = lory_test::stale_workspace(need);
  REQUIRE(lory::decode_step(a, ws.get(), need, ctx.handle, nullptr) == Status::kErrorInvalidArgument);
  LORY_TEST_SYNC();
}
