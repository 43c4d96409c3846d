// The CUDA MoE FFN plan without a GPU: construction, validation and workspace
// queries only. Nothing here may touch the device (no handle, no allocation,
// no launch): every forward / backward call below must fail validation first.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"
#include "common/test_util.hpp"
#include "lory/moe_ffn.cuh"

namespace {

using namespace lory_test;  // the MoE FFN fixture and the lory names it uses

template <class T>
void check_workspace_queries(const SegmentLayout& lay, const FfnShape& sh, RoutingMode mode) {
  using Plan = lory::MoeFfnCudaPlan<T>;
  const Plan plan(lay, sh, mode);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  const int64_t S = lay.num_segments();
  REQUIRE(plan.chunk_segments() == S);
  REQUIRE(plan.workspace_size() == plan.workspace_size_for_chunk(S));
  // The smallest budget: one segment per chunk, unsliced or in the narrowest slices (16 columns).
  const int64_t narrow = sh.f < 16 ? sh.f : 16;
  REQUIRE(plan.min_workspace_size() == std::min(plan.workspace_size_for_chunk(1), plan.workspace_size_for(1, narrow)));
  REQUIRE(plan.min_workspace_size_unchunked() ==
          std::min(plan.workspace_size_for_chunk(S), plan.workspace_size_for(S, narrow)));
  // At least the chunk's merged weights and its five activation buffers.
  const int64_t tmax = lay.segment_len < lay.seq_len ? lay.segment_len : lay.seq_len;
  const size_t floor_bytes = (3 * S * sh.d * sh.f + 5 * S * tmax * sh.f) * sizeof(T);
  REQUIRE(plan.workspace_size() >= floor_bytes);
  for (int64_t c = 2; c <= S; ++c) REQUIRE(plan.workspace_size_for_chunk(c) >= plan.workspace_size_for_chunk(c - 1));

  // Unsliced (slice_width = f), a budget of half the segments' workspace gives half the segments.
  MoeFfnOptions o;
  o.slice_width = sh.f;
  o.workspace_budget_bytes = plan.workspace_size_for_chunk(S / 2 > 0 ? S / 2 : 1);
  const Plan half(lay, sh, mode, o);
  REQUIRE(half.can_implement() == Status::kSuccess);
  REQUIRE(half.chunk_segments() == (S / 2 > 0 ? S / 2 : 1));
  REQUIRE(half.workspace_size() <= o.workspace_budget_bytes);
  // Free to slice, the smallest budget that keeps every segment in one chunk does so, in slices.
  MoeFfnOptions s;
  s.workspace_budget_bytes = plan.min_workspace_size_unchunked();
  const Plan sliced(lay, sh, mode, s);
  REQUIRE(sliced.can_implement() == Status::kSuccess);
  REQUIRE(sliced.chunk_segments() == S);
  REQUIRE(sliced.workspace_size() <= s.workspace_budget_bytes);
  if (sh.f > 16) REQUIRE(sliced.num_slices() > 1);
  s.workspace_budget_bytes = plan.min_workspace_size() - 1;
  REQUIRE(Plan(lay, sh, mode, s).can_implement() == Status::kErrorWorkspaceTooSmall);
}

}  // namespace

TEST_CASE("CUDA MoE FFN plan: workspace queries without a GPU", "[launch][plan]") {
  for (RoutingMode mode : kAllRoutingModes) {
    check_workspace_queries<float>({2, 21, 8}, {11, 13, 3}, mode);
    check_workspace_queries<__half>({3, 5, 8}, {16, 24, 1}, mode);
    check_workspace_queries<__nv_bfloat16>({4, 64, 16}, {64, 96, 32}, mode);
  }
}

TEST_CASE("CUDA MoE FFN plan: paper shapes fit a workspace budget", "[launch][plan]") {
  // 1.5B / 32 experts, B = 8 sequences of 4096 tokens, T = 256: S = 128 segments.
  const SegmentLayout lay{8, 4096, 256};
  const FfnShape sh{1536, 4096, 32};
  using Plan = lory::MoeFfnCudaPlan<__nv_bfloat16>;
  const Plan all(lay, sh, RoutingMode::kCausalSegment);
  REQUIRE(all.can_implement() == Status::kSuccess);
  REQUIRE(all.chunk_segments() == 128);
  REQUIRE(all.num_slices() == 1);
  // 1 and 2 GiB: every segment in one chunk (each expert weight read once per pass), f in slices.
  for (int gib : {1, 2}) {
    MoeFfnOptions o;
    o.workspace_budget_bytes = size_t(gib) << 30;
    const Plan bounded(lay, sh, RoutingMode::kCausalSegment, o);
    INFO(gib << " GiB: " << bounded.num_slices() << " slices of " << bounded.slice_width());
    REQUIRE(bounded.can_implement() == Status::kSuccess);
    REQUIRE(bounded.chunk_segments() == 128);
    REQUIRE(bounded.num_slices() == (gib == 1 ? 8 : 4));
    REQUIRE(bounded.workspace_size() <= o.workspace_budget_bytes);
    // Unsliced, the same budget buys only a chunk of the segments.
    o.slice_width = sh.f;
    const Plan chunked(lay, sh, RoutingMode::kCausalSegment, o);
    REQUIRE(chunked.can_implement() == Status::kSuccess);
    REQUIRE(chunked.chunk_segments() >= 1);
    REQUIRE(chunked.chunk_segments() < 128);
    REQUIRE(chunked.workspace_size() <= o.workspace_budget_bytes);
    REQUIRE(chunked.workspace_size_for_chunk(chunked.chunk_segments() + 1) > o.workspace_budget_bytes);
  }
}

TEST_CASE("CUDA MoE FFN plan rejects bad arguments before any launch", "[launch][plan]") {
  auto rng = lory_test::make_rng("moe_launch_errors");
  using Plan = lory::MoeFfnCudaPlan<__nv_bfloat16>;
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{16, 24, 4};
  REQUIRE(Plan(lay, {16, 24, 0}, RoutingMode::kCausalSegment).can_implement() ==
          Status::kErrorUnsupportedExpertCount);
  REQUIRE(Plan(lay, {16, 24, lory::kMaxExperts + 1}, RoutingMode::kCausalSegment).can_implement() ==
          Status::kErrorUnsupportedExpertCount);
  REQUIRE(Plan({2, 21, 0}, sh, RoutingMode::kCausalSegment).can_implement() == Status::kErrorInvalidSize);
  REQUIRE(Plan(lay, sh, static_cast<RoutingMode>(3)).can_implement() == Status::kErrorInvalidArgument);
  // cuBLAS takes int sizes: d past INT_MAX is refused up front.
  REQUIRE(Plan({1, 1, 1}, {int64_t(1) << 31, 1, 1}, RoutingMode::kGivenWeights).can_implement() ==
          Status::kErrorInvalidSize);

  // Host arrays stand in for device pointers: they are never dereferenced,
  // since every call below fails validation before touching memory.
  const Plan plan(lay, sh, RoutingMode::kCausalSegment);
  REQUIRE(plan.can_implement() == Status::kSuccess);
  const auto P = random_layer<__nv_bfloat16>(lay, sh, RoutingMode::kCausalSegment, false, rng);
  auto out = new_outputs<__nv_bfloat16, float>(P);
  const auto f = forward_args(P.params(), P.x.data(), out);
  std::vector<unsigned char> ws(plan.workspace_size());
  const lory::MoeFfnCudaBackend::Stream no_handle{};

  REQUIRE(plan.forward(f, ws.data(), ws.size(), no_handle) == Status::kErrorNullPointer);  // no cuBLAS handle
  auto g = f;
  g.y = nullptr;
  REQUIRE(plan.forward(g, ws.data(), ws.size(), no_handle) == Status::kErrorNullPointer);
  g = f;
  g.p.shape.f = 32;  // not the plan's shape
  REQUIRE(plan.forward(g, ws.data(), ws.size(), no_handle) == Status::kErrorInvalidShape);
  g = f;
  g.p.mode = RoutingMode::kPromptLevel;
  REQUIRE(plan.forward(g, ws.data(), ws.size(), no_handle) == Status::kErrorInvalidArgument);

  const auto b = backward_args(f.p, P.x.data(), P.dy.data(), out, false);
  REQUIRE(plan.backward(b, ws.data(), ws.size(), no_handle) == Status::kErrorNullPointer);
  auto c = b;
  c.dW_r = nullptr;  // the routed modes need it
  REQUIRE(plan.backward(c, ws.data(), ws.size(), no_handle) == Status::kErrorNullPointer);

  MoeFfnOptions tiny;
  tiny.workspace_budget_bytes = 1;
  REQUIRE(Plan(lay, sh, RoutingMode::kCausalSegment, tiny).forward(f, ws.data(), ws.size(), no_handle) ==
          Status::kErrorWorkspaceTooSmall);
}
