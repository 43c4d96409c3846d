// The CUDA MoE FFN plan (router, merge and SwiGLU kernels + cuBLAS) against the
// plain double twin of the whole layer, per storage dtype and routing mode,
// with one chunk and with several, in slices of f, overwriting and accumulating.
#include <cublas_v2.h>

#include <cstdint>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/moe_ffn_fixture.hpp"
#include "common/test_util.hpp"
#include "lory/moe_ffn.cuh"

namespace {

using namespace lory_test;  // the MoE FFN fixture and the lory names it uses

// A problem's inputs in device memory, under the host names (for the fixture's argument filling).
template <class T>
struct DeviceInputs {
  DeviceBuffer<T> x, dy, W_r, W_g, W_u, W_d;
  DeviceBuffer<float> bias, given;
  explicit DeviceInputs(const LayerProblem<T>& H)
      : x(H.x), dy(H.dy), W_r(H.W_r), W_g(H.W_g), W_u(H.W_u), W_d(H.W_d), bias(H.bias), given(H.given) {}
};

// Every output in device memory, uploaded from (and downloaded to) host outputs.
template <class T>
struct DeviceOutputs {
  DeviceBuffer<T> y, dx, dW_r, dW_g, dW_u, dW_d;
  DeviceBuffer<float> hbar, probs, weights, d_bias, d_weights;
  explicit DeviceOutputs(const LayerOutputs<T, float>& h)
      : y(h.y), dx(h.dx), dW_r(h.dW_r), dW_g(h.dW_g), dW_u(h.dW_u), dW_d(h.dW_d), hbar(h.hbar), probs(h.probs),
        weights(h.weights), d_bias(h.d_bias), d_weights(h.d_weights) {}
  LayerOutputs<T, float> download() const {
    LayerOutputs<T, float> h;
    h.y = y.download();
    h.dx = dx.download();
    h.dW_r = dW_r.download();
    h.dW_g = dW_g.download();
    h.dW_u = dW_u.download();
    h.dW_d = dW_d.download();
    h.hbar = hbar.download();
    h.probs = probs.download();
    h.weights = weights.download();
    h.d_bias = d_bias.download();
    h.d_weights = d_weights.download();
    return h;
  }
};

// Forward + backward through the CUDA plan, outputs poisoned first (weight
// grads set to *init when accumulating, init not null), then compared.
template <class T>
void run_and_check(const LayerProblem<T>& H, const InitialGrads<T>* init, MoeFfnOptions opt, cudaStream_t stream,
                   cublasHandle_t handle) {
  const lory::MoeFfnCudaPlan<T> plan(H.lay, H.sh, H.mode, opt);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  INFO("chunk " << plan.chunk_segments() << " of " << H.lay.num_segments() << " segments, " << plan.num_slices()
                << " slices of " << plan.slice_width() << ", workspace "
                << plan.workspace_size() << " bytes, accumulate " << (init != nullptr));
  const auto ref = run_reference(H, init);
  const DeviceInputs<T> in(H);
  DeviceOutputs<T> out(new_outputs<T, float>(H, init));
  auto ws = lory_test::stale_workspace(plan.workspace_size());
  LORY_TEST_CUDA(cudaMemset(ws.get(), 0xff, plan.workspace_size()));  // NaN in every float dtype

  const auto f = forward_args(layer_params<T, float>(H.lay, H.sh, H.mode, in), in.x.get(), out);
  const lory::MoeFfnCudaBackend::Stream ctx{stream, handle};
  REQUIRE(plan.forward(f, ws.get(), plan.workspace_size(), ctx) == Status::kSuccess);
  LORY_TEST_CUDA(cudaMemsetAsync(ws.get(), 0xff, plan.workspace_size(), stream));  // no leftovers used
  const auto b = backward_args(f.p, in.x.get(), in.dy.get(), out, init != nullptr);
  REQUIRE(plan.backward(b, ws.get(), plan.workspace_size(), ctx) == Status::kSuccess);
  LORY_TEST_SYNC();
  check_against_reference(H, out.download(), ref, lory_test::tolerance<T>());
}

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
  int run = 0;
  for (const Shape& s : shapes)
    for (RoutingMode mode : kAllRoutingModes) {
      INFO("B=" << s.lay.batch << " L=" << s.lay.seq_len << " T=" << s.lay.segment_len << " d=" << s.sh.d
                << " f=" << s.sh.f << " E=" << s.sh.experts << " mode=" << lory::routing_mode_name(mode));
      const auto H = random_layer<T>(s.lay, s.sh, mode, true, rng);
      const InitialGrads<T> init = random_initial_grads(H, rng);
      // One chunk, overwriting.
      run_and_check<T>(H, nullptr, MoeFfnOptions{}, ctx.stream, ctx.handle);
      // Several chunks chosen by a workspace budget, accumulating.
      const lory::MoeFfnCudaPlan<T> probe(s.lay, s.sh, mode);
      MoeFfnOptions o;
      o.workspace_budget_bytes = probe.workspace_size_for_chunk(s.lay.num_segments() > 3 ? 3 : 1);
      run_and_check(H, &init, o, ctx.stream, ctx.handle);
      // Both of kAuto's above; each method by name too, in turn (one chunk, accumulating).
      MoeFfnOptions named;
      named.merge_backward = run++ % 2 ? lory::MergeBackwardMethod::kGemm : lory::MergeBackwardMethod::kFused;
      INFO("merge backward " << lory::merge_backward_method_name(named.merge_backward));
      run_and_check(H, &init, named, ctx.stream, ctx.handle);
      // Slices of f (2-D merge views of W_d's columns, fp32 y / dx rounded once): the narrowest
      // budget with every segment in one chunk, and a fixed width with a ragged last slice, each
      // with the other merge-backward method.
      MoeFfnOptions sliced;
      sliced.workspace_budget_bytes = probe.min_workspace_size_unchunked();
      sliced.merge_backward = named.merge_backward;
      run_and_check(H, &init, sliced, ctx.stream, ctx.handle);
      MoeFfnOptions fixed;
      fixed.slice_width = s.sh.f > 48 ? 48 : 16;
      fixed.merge_backward = run % 2 ? lory::MergeBackwardMethod::kFused : lory::MergeBackwardMethod::kGemm;
      run_and_check<T>(H, nullptr, fixed, ctx.stream, ctx.handle);
    }
}

}  // namespace

TEST_CASE("CUDA MoE FFN plan matches the double twin: float", "[gpu][plan]") { check_dtype<float>("moe_gpu_f32"); }
TEST_CASE("CUDA MoE FFN plan matches the double twin: half", "[gpu][plan]") { check_dtype<__half>("moe_gpu_f16"); }
TEST_CASE("CUDA MoE FFN plan matches the double twin: bfloat16", "[gpu][plan]") {
  check_dtype<__nv_bfloat16>("moe_gpu_bf16");
}

TEST_CASE("CUDA MoE FFN plan refuses a cuBLAS handle bound to another stream", "[gpu][plan]") {
  auto rng = lory_test::make_rng("moe_gpu_other_stream");
  GpuContext ctx;
  const auto H = random_layer<float>({1, 16, 8}, {8, 8, 2}, RoutingMode::kGivenWeights, true, rng);
  const lory::MoeFfnCudaPlan<float> plan(H.lay, H.sh, H.mode);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  const DeviceInputs<float> in(H);
  DeviceOutputs<float> out(new_outputs<float, float>(H));
  auto ws = lory_test::stale_workspace(plan.workspace_size());
  const auto f = forward_args(layer_params<float, float>(H.lay, H.sh, H.mode, in), in.x.get(), out);
  const lory::MoeFfnCudaBackend::Stream other{nullptr, ctx.handle};  // the handle is bound to ctx.stream
  REQUIRE(plan.forward(f, ws.get(), plan.workspace_size(), other) == Status::kErrorInvalidArgument);
  LORY_TEST_SYNC();
}
