// The MoE FFN plan's orchestration (chunking, routing bookkeeping, workspace
// layout, GEMM batching) driven by the CPU backend, against the plain double
// twin of the whole layer (reference::moe_ffn_forward / moe_ffn_backward).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"
#include "common/test_util.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/moe_ffn_backend.hpp"

namespace {

using namespace lory_test;  // the MoE FFN fixture and the lory names it uses

// Runs forward then backward through a plan; outputs poisoned first (the weight
// gradients set to *init instead when accumulating, init not null).
template <class T, class Backend>
Status run_plan(const LayerProblem<T>& P, MoeFfnOptions opt, const InitialGrads<T>* init,
                LayerOutputs<T, float>& out) {
  lory::MoeFfnPlan<T, Backend> plan(P.lay, P.sh, P.mode, opt);
  LORY_RETURN_IF_ERROR(plan.can_implement());
  out = new_outputs<T, float>(P, init);
  std::vector<unsigned char> ws(plan.workspace_size());
  const auto f = forward_args(P.params(), P.x.data(), out);
  LORY_RETURN_IF_ERROR(plan.forward(f, ws.data(), ws.size(), {}));
  // A fresh (poisoned) workspace: the backward must not rely on the forward's leftovers.
  std::fill(ws.begin(), ws.end(), static_cast<unsigned char>(0xff));  // NaN in every float dtype
  return plan.backward(backward_args(f.p, P.x.data(), P.dy.data(), out, init != nullptr), ws.data(), ws.size(), {});
}

// Layouts with deliberate corners: L % T == 0; a short last segment; L < T (one
// short segment per sequence); more sequences than full segments per sequence
// (the GEMM groups then run per in-sequence position); a single sequence.
const std::vector<SegmentLayout>& layouts() {
  static const std::vector<SegmentLayout> l = {
      {2, 24, 8}, {2, 21, 8}, {3, 5, 8}, {5, 19, 8}, {1, 13, 4}};
  return l;
}

}  // namespace

TEST_CASE("CPU MoE FFN plan matches the double twin for every mode, layout and chunk size", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_modes");
  // d and f not multiples of 8; E = 1 and E = 3.
  const FfnShape shapes[] = {{11, 13, 3}, {9, 6, 1}};
  for (const FfnShape& sh : shapes)
    for (const SegmentLayout& lay : layouts())
      for (RoutingMode mode : kAllRoutingModes) {
        const auto D = random_layer<float>(lay, sh, mode, mode == RoutingMode::kCausalSegment, rng);
        const int64_t S = lay.num_segments();
        for (bool accumulate : {false, true}) {
          const InitialGrads<float> init = random_initial_grads(D, rng);
          const InitialGrads<float>* start = accumulate ? &init : nullptr;
          const auto ref = run_reference(D, start);
          std::vector<int64_t> chunks = {1, 2, 3, S - 1, S};
          for (int64_t c : chunks) {
            if (c < 1 || c > S) continue;
            INFO("B=" << lay.batch << " L=" << lay.seq_len << " T=" << lay.segment_len << " d=" << sh.d
                      << " f=" << sh.f << " E=" << sh.experts << " mode=" << lory::routing_mode_name(mode)
                      << " chunk=" << c << " accumulate=" << accumulate);
            MoeFfnOptions opt;
            opt.max_chunk_segments = c;
            LayerOutputs<float, float> got;
            REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, opt, start, got) ==
                    Status::kSuccess);
            check_against_reference(D, got, ref, lory_test::tolerance<float>());
          }
        }
      }
}

TEST_CASE("CPU MoE FFN plan in bf16 and fp16 storage stays within the dtype's tolerance", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_low_precision");
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{16, 24, 4};
  for (RoutingMode mode : kAllRoutingModes) {
    INFO("mode=" << lory::routing_mode_name(mode));
    {
      const auto D = random_layer<__nv_bfloat16>(lay, sh, mode, true, rng);
      LayerOutputs<__nv_bfloat16, float> got;
      MoeFfnOptions opt;
      opt.max_chunk_segments = 2;
      REQUIRE(run_plan<__nv_bfloat16, lory::reference::MoeFfnCpuBackend>(D, opt, nullptr, got) ==
              Status::kSuccess);
      check_against_reference(D, got, run_reference(D), lory_test::tolerance<__nv_bfloat16>());
    }
    {
      const auto D = random_layer<__half>(lay, sh, mode, true, rng);
      LayerOutputs<__half, float> got;
      REQUIRE(run_plan<__half, lory::reference::MoeFfnCpuBackend>(D, {}, nullptr, got) == Status::kSuccess);
      check_against_reference(D, got, run_reference(D), lory_test::tolerance<__half>());
    }
  }
}

TEST_CASE("CPU MoE FFN plan: chunked and unchunked runs agree to rounding", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_chunks_agree");
  const auto D = random_layer<float>({3, 21, 8}, {10, 14, 5}, RoutingMode::kCausalSegment, true, rng);
  LayerOutputs<float, float> whole, one, three;
  MoeFfnOptions o1, o3;
  o1.max_chunk_segments = 1;
  o3.max_chunk_segments = 3;
  REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, {}, nullptr, whole) == Status::kSuccess);
  REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, o1, nullptr, one) == Status::kSuccess);
  REQUIRE(run_plan<float, lory::reference::MoeFfnCpuBackend>(D, o3, nullptr, three) == Status::kSuccess);
  for (const auto* o : {&one, &three}) {
    // Per-segment math does not depend on the chunking: the forward, the
    // per-segment d_weights and dx are bitwise identical on the CPU ...
    REQUIRE(o->y == whole.y);
    REQUIRE(o->d_weights == whole.d_weights);
    REQUIRE(o->dx == whole.dx);
    REQUIRE(o->dW_r == whole.dW_r);
    // ... while the expert gradients are rounded once per chunk.
    CHECK(lory_test::rel_error(o->dW_g, whole.dW_g) <= 1e-6);
    CHECK(lory_test::rel_error(o->dW_u, whole.dW_u) <= 1e-6);
    CHECK(lory_test::rel_error(o->dW_d, whole.dW_d) <= 1e-6);
  }
}

TEST_CASE("CPU MoE FFN plan: workspace budget picks the chunk and rejects too small a budget", "[cpu][plan]") {
  const SegmentLayout lay{3, 21, 8};
  const FfnShape sh{10, 14, 5};
  using Plan = lory::reference::MoeFfnCpuPlan<float>;
  const Plan unlimited(lay, sh, RoutingMode::kCausalSegment);
  REQUIRE(unlimited.can_implement() == Status::kSuccess);
  const int64_t S = lay.num_segments();
  REQUIRE(unlimited.chunk_segments() == S);
  REQUIRE(unlimited.workspace_size() == unlimited.workspace_size_for_chunk(S));
  REQUIRE(unlimited.min_workspace_size() == unlimited.workspace_size_for_chunk(1));

  // Monotone in the chunk size, and it really grows with it.
  for (int64_t c = 2; c <= S; ++c)
    REQUIRE(unlimited.workspace_size_for_chunk(c) >= unlimited.workspace_size_for_chunk(c - 1));
  REQUIRE(unlimited.workspace_size_for_chunk(S) > unlimited.workspace_size_for_chunk(1));
  // The merged weights of a chunk alone: 3 * C * d * f values.
  REQUIRE(unlimited.workspace_size_for_chunk(S) >= size_t(3 * S * sh.d * sh.f * sizeof(float)));

  // A budget of exactly size(c) gives chunk c; one byte less gives less.
  for (int64_t c : {int64_t(1), int64_t(2), S / 2, S}) {
    MoeFfnOptions o;
    o.workspace_budget_bytes = unlimited.workspace_size_for_chunk(c);
    const Plan p(lay, sh, RoutingMode::kCausalSegment, o);
    REQUIRE(p.can_implement() == Status::kSuccess);
    REQUIRE(p.chunk_segments() == c);
    REQUIRE(p.workspace_size() <= o.workspace_budget_bytes);
    o.workspace_budget_bytes -= 1;
    const Plan q(lay, sh, RoutingMode::kCausalSegment, o);
    if (c == 1) {
      REQUIRE(q.can_implement() == Status::kErrorWorkspaceTooSmall);
    } else {
      REQUIRE(q.can_implement() == Status::kSuccess);
      REQUIRE(q.chunk_segments() < c);
    }
  }
  // max_chunk_segments caps the chunk below what the budget allows.
  MoeFfnOptions o;
  o.workspace_budget_bytes = unlimited.workspace_size();
  o.max_chunk_segments = 4;
  REQUIRE(Plan(lay, sh, RoutingMode::kCausalSegment, o).chunk_segments() == 4);
}

TEST_CASE("CPU MoE FFN plan reports bad arguments before touching memory", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_errors");
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{10, 14, 3};
  using Plan = lory::reference::MoeFfnCpuPlan<float>;
  REQUIRE(Plan(lay, {10, 14, 0}, RoutingMode::kCausalSegment).can_implement() ==
          Status::kErrorUnsupportedExpertCount);
  REQUIRE(Plan({0, 21, 8}, sh, RoutingMode::kCausalSegment).can_implement() == Status::kErrorInvalidSize);
  REQUIRE(Plan(lay, sh, static_cast<RoutingMode>(7)).can_implement() == Status::kErrorInvalidArgument);
  MoeFfnOptions neg;
  neg.max_chunk_segments = -1;
  REQUIRE(Plan(lay, sh, RoutingMode::kCausalSegment, neg).can_implement() == Status::kErrorInvalidArgument);
  MoeFfnOptions bad_method;
  bad_method.merge_backward = static_cast<lory::MergeBackwardMethod>(5);
  REQUIRE(Plan(lay, sh, RoutingMode::kCausalSegment, bad_method).can_implement() == Status::kErrorInvalidArgument);

  const auto D = random_layer<float>(lay, sh, RoutingMode::kCausalSegment, false, rng);
  auto out = new_outputs<float, float>(D);  // poisoned
  const Plan plan(lay, sh, RoutingMode::kCausalSegment);
  std::vector<unsigned char> ws(plan.workspace_size());
  const auto f = forward_args(D.params(), D.x.data(), out);
  REQUIRE(plan.forward(f, nullptr, ws.size(), {}) == Status::kErrorNullPointer);
  REQUIRE(plan.forward(f, ws.data(), ws.size() - 1, {}) == Status::kErrorWorkspaceTooSmall);
  auto g = f;
  g.p.layout.seq_len = 24;  // does not match the plan
  REQUIRE(plan.forward(g, ws.data(), ws.size(), {}) == Status::kErrorInvalidShape);
  g = f;
  g.p.mode = RoutingMode::kPromptLevel;
  REQUIRE(plan.forward(g, ws.data(), ws.size(), {}) == Status::kErrorInvalidArgument);
  g = f;
  g.x = nullptr;
  REQUIRE(plan.forward(g, ws.data(), ws.size(), {}) == Status::kErrorNullPointer);
  // A workspace off the 16-byte grid (operator new's storage is on it; 8 bytes in is not).
  std::vector<unsigned char> wide(ws.size() + 16);
  REQUIRE(reinterpret_cast<uintptr_t>(wide.data()) % 16 == 0);
  REQUIRE(plan.forward(f, wide.data() + 8, ws.size(), {}) == Status::kErrorMisalignedPointer);
  const auto b = backward_args(f.p, D.x.data(), D.dy.data(), out, false);
  REQUIRE(plan.backward(b, wide.data() + 8, ws.size(), {}) == Status::kErrorMisalignedPointer);
  // Nothing was written by the failed calls.
  REQUIRE(lory_test::count_nan(out.y) == static_cast<int64_t>(out.y.size()));
  // A too-small budget fails the same way in forward and backward.
  MoeFfnOptions tiny;
  tiny.workspace_budget_bytes = plan.min_workspace_size() - 1;
  const Plan small(lay, sh, RoutingMode::kCausalSegment, tiny);
  REQUIRE(small.forward(f, ws.data(), ws.size(), {}) == Status::kErrorWorkspaceTooSmall);
  REQUIRE(plan.forward(f, ws.data(), ws.size(), {}) == Status::kSuccess);
  REQUIRE(lory_test::count_nan(out.y) == 0);
}

namespace {
// The CPU backend with a GEMM call counter: shows how many GEMM launches the
// orchestration issues (the CUDA backend issues one cuBLAS call per GEMM here).
struct CountingBackend : lory::reference::MoeFfnCpuBackend {
  static int& gemm_calls() {
    static int n = 0;
    return n;
  }
  template <class T>
  static Status gemm(const lory::StridedBatchedGemm<T>& g, Stream s) {
    ++gemm_calls();
    return lory::reference::MoeFfnCpuBackend::gemm(g, s);
  }
};
}  // namespace

TEST_CASE("CPU MoE FFN plan batches each GEMM over a chunk's segments", "[cpu][plan]") {
  auto rng = lory_test::make_rng("moe_plan_gemm_count");
  struct Expect {
    SegmentLayout lay;
    int64_t chunk;
    int groups_per_chunk;  // strided-batched launches per matrix product and chunk
  };
  // L % T == 0: one group; a short last segment: the full ones per sequence
  // (or per position) plus one for the short ones.
  const Expect cases[] = {{{4, 32, 8}, 0, 1}, {{4, 32, 8}, 4, 1}, {{2, 21, 8}, 0, 3}, {{6, 19, 8}, 0, 3}};
  for (const Expect& c : cases) {
    const auto D = random_layer<float>(c.lay, {8, 8, 2}, RoutingMode::kCausalSegment, false, rng);
    MoeFfnOptions o;
    o.max_chunk_segments = c.chunk;
    LayerOutputs<float, float> got;
    CountingBackend::gemm_calls() = 0;
    REQUIRE(run_plan<float, CountingBackend>(D, o, nullptr, got) == Status::kSuccess);
    const int64_t S = c.lay.num_segments();
    const int64_t chunks = c.chunk ? (S + c.chunk - 1) / c.chunk : 1;
    // forward: [a | u], y; backward: [a | u], dm, G_d, dx, [G_g; G_u] (the gate and up products
    // are fused: one GEMM each for the pair, where there were two)
    INFO("B=" << c.lay.batch << " L=" << c.lay.seq_len << " chunk=" << c.chunk);
    REQUIRE(CountingBackend::gemm_calls() == 7 * c.groups_per_chunk * chunks);
    check_against_reference(D, got, run_reference(D), lory_test::tolerance<float>());
  }
}
