// The CUDA MoE FFN plan (router, merge and SwiGLU kernels + cuBLAS) against the
// plain double twin of the whole layer, per storage dtype and routing mode,
// with one chunk and with several, overwriting and accumulating.
#include <cublas_v2.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/moe_ffn.cuh"
#include "lory/reference/moe_ffn.hpp"

namespace {

using lory::FfnShape;
using lory::MoeFfnOptions;
using lory::RoutingMode;
using lory::SegmentLayout;
using lory::Status;
using lory_test::DeviceBuffer;

// Host inputs of one layer call, in storage dtype T (routing data in float).
template <class T>
struct HostLayer {
  SegmentLayout lay;
  FfnShape sh;
  RoutingMode mode;
  std::vector<T> x, dy, W_r, W_g, W_u, W_d, dW_r0, dW_g0, dW_u0, dW_d0;  // *0: initial grads
  std::vector<float> bias, given, d_bias0;

  HostLayer(SegmentLayout l, FfnShape s, RoutingMode m, std::mt19937_64& rng) : lay(l), sh(s), mode(m) {
    const size_t tokens = l.num_tokens(), E = s.experts, fd = s.f * s.d;
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
    x = lory_test::random_vector<T>(tokens * s.d, rng);
    dy = lory_test::random_vector<T>(tokens * s.d, rng);
    W_r = lory_test::random_vector<T>(E * s.d, rng, -2.0, 2.0);  // O(1) logits: routing matters
    W_g = lory_test::random_vector<T>(E * fd, rng, -2 * scale, 2 * scale);
    W_u = lory_test::random_vector<T>(E * fd, rng, -2 * scale, 2 * scale);
    W_d = lory_test::random_vector<T>(E * fd, rng, -scale, scale);
    dW_r0 = lory_test::random_vector<T>(E * s.d, rng);
    dW_g0 = lory_test::random_vector<T>(E * fd, rng);
    dW_u0 = lory_test::random_vector<T>(E * fd, rng);
    dW_d0 = lory_test::random_vector<T>(E * fd, rng);
    bias = lory_test::random_vector<float>(E, rng, -0.5, 0.5);
    d_bias0 = lory_test::random_vector<float>(E, rng);
    given = lory_test::random_simplex_rows(l.num_segments(), s.experts, rng);
  }
  int64_t router_rows() const { return mode == RoutingMode::kPromptLevel ? lay.batch : lay.num_segments(); }
};

struct Reference {
  std::vector<double> y, hbar, probs, weights, dx, dW_r, dW_g, dW_u, dW_d, d_bias, d_weights;
};

template <class T>
Reference run_reference(const HostLayer<T>& H, bool accumulate) {
  using lory_test::to_double_vector;
  const auto x = to_double_vector(H.x), dy = to_double_vector(H.dy), W_r = to_double_vector(H.W_r),
             W_g = to_double_vector(H.W_g), W_u = to_double_vector(H.W_u), W_d = to_double_vector(H.W_d),
             bias = to_double_vector(H.bias), given = to_double_vector(H.given);
  const size_t tokens = H.lay.num_tokens(), E = H.sh.experts, S = H.lay.num_segments();
  Reference r;
  r.y.resize(tokens * H.sh.d);
  r.dx.resize(tokens * H.sh.d);
  r.hbar.resize(H.router_rows() * H.sh.d);
  r.probs.resize(H.router_rows() * E);
  r.weights.resize(S * E);
  r.d_weights.resize(S * E);
  r.dW_r = accumulate ? to_double_vector(H.dW_r0) : std::vector<double>(E * H.sh.d);
  r.dW_g = accumulate ? to_double_vector(H.dW_g0) : std::vector<double>(H.W_g.size());
  r.dW_u = accumulate ? to_double_vector(H.dW_u0) : std::vector<double>(H.W_u.size());
  r.dW_d = accumulate ? to_double_vector(H.dW_d0) : std::vector<double>(H.W_d.size());
  r.d_bias = accumulate ? to_double_vector(H.d_bias0) : std::vector<double>(E);

  lory::MoeFfnForwardArgs<double, double> f;
  f.p.layout = H.lay;
  f.p.shape = H.sh;
  f.p.mode = H.mode;
  f.p.W_r = W_r.data();
  f.p.bias = bias.data();
  f.p.given_weights = given.data();
  f.p.W_g = W_g.data();
  f.p.W_u = W_u.data();
  f.p.W_d = W_d.data();
  f.x = x.data();
  f.y = r.y.data();
  f.hbar = r.hbar.data();
  f.probs = r.probs.data();
  f.weights = r.weights.data();
  REQUIRE(lory::reference::moe_ffn_forward(f) == Status::kSuccess);
  lory::MoeFfnBackwardArgs<double, double> b;
  b.p = f.p;
  b.x = x.data();
  b.dy = dy.data();
  b.hbar = r.hbar.data();
  b.probs = r.probs.data();
  b.weights = r.weights.data();
  b.dx = r.dx.data();
  b.dW_r = r.dW_r.data();
  b.d_bias = r.d_bias.data();
  b.dW_g = r.dW_g.data();
  b.dW_u = r.dW_u.data();
  b.dW_d = r.dW_d.data();
  b.accumulate = accumulate;
  b.d_weights = r.d_weights.data();
  REQUIRE(lory::reference::moe_ffn_backward(b) == Status::kSuccess);
  return r;
}

template <class A>
void check_close(const char* name, const std::vector<A>& got, const std::vector<double>& ref, double tol) {
  INFO(name);
  REQUIRE(got.size() == ref.size());
  REQUIRE(lory_test::count_nan(got) == 0);  // every element written, nothing NaN
  const double err = lory_test::rel_error(got, ref);
  INFO("rel error " << err << " (tolerance " << tol << ")");
  CHECK(err <= tol);
}

template <class T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  lory_test::poison(v);
  return v;
}

// Forward + backward through the CUDA plan, outputs poisoned first (weight
// grads set to their initial values when accumulating), then compared.
template <class T>
void run_and_check(const HostLayer<T>& H, const Reference& ref, MoeFfnOptions opt, bool accumulate,
                   cudaStream_t stream, cublasHandle_t handle) {
  const lory::MoeFfnCudaPlan<T> plan(H.lay, H.sh, H.mode, opt);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  INFO("chunk " << plan.chunk_segments() << " of " << H.lay.num_segments() << " segments, workspace "
                << plan.workspace_size() << " bytes, accumulate " << accumulate);
  const size_t tokens = H.lay.num_tokens(), E = H.sh.experts, S = H.lay.num_segments(), d = H.sh.d;
  DeviceBuffer<T> x(H.x), dy(H.dy), W_r(H.W_r), W_g(H.W_g), W_u(H.W_u), W_d(H.W_d);
  DeviceBuffer<float> bias(H.bias), given(H.given);
  DeviceBuffer<T> y(poisoned<T>(tokens * d)), dx(poisoned<T>(tokens * d));
  DeviceBuffer<float> hbar(poisoned<float>(H.router_rows() * d)), probs(poisoned<float>(H.router_rows() * E)),
      weights(poisoned<float>(S * E)), d_weights(poisoned<float>(S * E));
  DeviceBuffer<T> dW_r(accumulate ? H.dW_r0 : poisoned<T>(H.dW_r0.size()));
  DeviceBuffer<T> dW_g(accumulate ? H.dW_g0 : poisoned<T>(H.dW_g0.size()));
  DeviceBuffer<T> dW_u(accumulate ? H.dW_u0 : poisoned<T>(H.dW_u0.size()));
  DeviceBuffer<T> dW_d(accumulate ? H.dW_d0 : poisoned<T>(H.dW_d0.size()));
  DeviceBuffer<float> d_bias(accumulate ? H.d_bias0 : poisoned<float>(E));
  lory_test::DeviceBytes ws(plan.workspace_size());
  LORY_TEST_CUDA(cudaMemset(ws.get(), 0xff, plan.workspace_size()));  // NaN in every float dtype

  lory::MoeFfnForwardArgs<T, float> f;
  f.p.layout = H.lay;
  f.p.shape = H.sh;
  f.p.mode = H.mode;
  f.p.W_r = W_r.get();
  f.p.bias = bias.get();
  f.p.given_weights = given.get();
  f.p.W_g = W_g.get();
  f.p.W_u = W_u.get();
  f.p.W_d = W_d.get();
  f.x = x.get();
  f.y = y.get();
  f.hbar = hbar.get();
  f.probs = probs.get();
  f.weights = weights.get();
  const lory::MoeFfnCudaBackend::Stream ctx{stream, handle};
  REQUIRE(plan.forward(f, ws.get(), plan.workspace_size(), ctx) == Status::kSuccess);
  LORY_TEST_CUDA(cudaMemsetAsync(ws.get(), 0xff, plan.workspace_size(), stream));  // no leftovers used
  lory::MoeFfnBackwardArgs<T, float> b;
  b.p = f.p;
  b.x = x.get();
  b.dy = dy.get();
  b.hbar = hbar.get();
  b.probs = probs.get();
  b.weights = weights.get();
  b.dx = dx.get();
  b.dW_r = dW_r.get();
  b.d_bias = d_bias.get();
  b.dW_g = dW_g.get();
  b.dW_u = dW_u.get();
  b.dW_d = dW_d.get();
  b.accumulate = accumulate;
  b.d_weights = d_weights.get();
  REQUIRE(plan.backward(b, ws.get(), plan.workspace_size(), ctx) == Status::kSuccess);
  LORY_TEST_SYNC();

  const double tol = lory_test::tolerance<T>();
  check_close("y", y.download(tokens * d), ref.y, tol);
  check_close("weights", weights.download(S * E), ref.weights, tol);
  check_close("dx", dx.download(tokens * d), ref.dx, tol);
  check_close("dW_g", dW_g.download(H.W_g.size()), ref.dW_g, tol);
  check_close("dW_u", dW_u.download(H.W_u.size()), ref.dW_u, tol);
  check_close("dW_d", dW_d.download(H.W_d.size()), ref.dW_d, tol);
  check_close("d_weights", d_weights.download(S * E), ref.d_weights, tol);
  if (H.mode != RoutingMode::kGivenWeights) {
    check_close("hbar", hbar.download(H.router_rows() * d), ref.hbar, tol);
    check_close("probs", probs.download(H.router_rows() * E), ref.probs, tol);
    // Through softmax backward, whose cancellation amplifies the rounding of d_weights.
    check_close("dW_r", dW_r.download(E * d), ref.dW_r, 10 * tol);
    check_close("d_bias", d_bias.download(E), ref.d_bias, 10 * tol);
  }
}

struct GpuContext {
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
  GpuContext() {
    LORY_TEST_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasSetStream(handle, stream) == CUBLAS_STATUS_SUCCESS);
  }
  ~GpuContext() {
    cublasDestroy(handle);
    cudaStreamDestroy(stream);
  }
};

template <class T>
void check_dtype(const char* tag) {
  auto rng = lory_test::make_rng(tag);
  GpuContext ctx;
  struct Shape {
    SegmentLayout lay;
    FfnShape sh;
  };
  // A short last segment with E = 16 (tensor-core merge); L % T == 0 with d, f
  // not multiples of 8 (unaligned rows: scalar kernel paths); one expert and
  // L < T (every segment short).
  const Shape shapes[] = {{{2, 300, 64}, {136, 200, 16}}, {{3, 128, 32}, {100, 150, 8}}, {{2, 40, 64}, {72, 40, 1}}};
  for (const Shape& s : shapes)
    for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel, RoutingMode::kGivenWeights}) {
      INFO("B=" << s.lay.batch << " L=" << s.lay.seq_len << " T=" << s.lay.segment_len << " d=" << s.sh.d
                << " f=" << s.sh.f << " E=" << s.sh.experts << " mode=" << lory::routing_mode_name(mode));
      const HostLayer<T> H(s.lay, s.sh, mode, rng);
      // One chunk, overwriting.
      run_and_check(H, run_reference(H, false), MoeFfnOptions{}, false, ctx.stream, ctx.handle);
      // Several chunks chosen by a workspace budget, accumulating.
      const lory::MoeFfnCudaPlan<T> probe(s.lay, s.sh, mode);
      MoeFfnOptions o;
      o.workspace_budget_bytes = probe.workspace_size_for_chunk(s.lay.num_segments() > 3 ? 3 : 1);
      run_and_check(H, run_reference(H, true), o, true, ctx.stream, ctx.handle);
    }
}

}  // namespace

TEST_CASE("CUDA MoE FFN plan matches the double twin: float", "[gpu][plan]") { check_dtype<float>("moe_gpu_f32"); }
TEST_CASE("CUDA MoE FFN plan matches the double twin: half", "[gpu][plan]") { check_dtype<__half>("moe_gpu_f16"); }
TEST_CASE("CUDA MoE FFN plan matches the double twin: bfloat16", "[gpu][plan]") {
  check_dtype<__nv_bfloat16>("moe_gpu_bf16");
}

TEST_CASE("CUDA MoE FFN plan refuses a cuBLAS handle bound to another stream", "[gpu][plan]") {
  GpuContext ctx;
  const SegmentLayout lay{1, 16, 8};
  const FfnShape sh{8, 8, 2};
  const lory::MoeFfnCudaPlan<float> plan(lay, sh, RoutingMode::kGivenWeights);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  DeviceBuffer<float> x(lay.num_tokens() * sh.d), y(lay.num_tokens() * sh.d), W(sh.experts * sh.d * sh.f),
      w(lay.num_segments() * sh.experts);
  lory_test::DeviceBytes ws(plan.workspace_size());
  lory::MoeFfnForwardArgs<float, float> f;
  f.p.layout = lay;
  f.p.shape = sh;
  f.p.mode = RoutingMode::kGivenWeights;
  f.p.given_weights = w.get();
  f.p.W_g = f.p.W_u = f.p.W_d = W.get();
  f.x = x.get();
  f.y = y.get();
  f.weights = w.get();
  const lory::MoeFfnCudaBackend::Stream other{nullptr, ctx.handle};  // the handle is bound to ctx.stream
  REQUIRE(plan.forward(f, ws.get(), plan.workspace_size(), other) == Status::kErrorInvalidArgument);
  LORY_TEST_SYNC();
}
