// Merge launchers without a GPU: every validation error returns its Status
// before any memory is touched or any kernel launched, and the workspace size
// query works. Pointers are bogus non-null values that must never be
// dereferenced (validation has to fail first); no success path here may reach
// the CUDA runtime.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/catch.hpp"
#include "common/merge_variants.cuh"
#include "lory/merge.cuh"
#include "lory/merge_gemm.cuh"

namespace {

using lory::Status;

template <class T>
const T* bogus(uintptr_t addr) { return reinterpret_cast<const T*>(addr); }
template <class T>
T* bogus_mut(uintptr_t addr) { return reinterpret_cast<T*>(addr); }
void* bogus_ws() { return reinterpret_cast<void*>(uintptr_t(0x7000)); }

template <class T>
lory::MergeForwardArgs<T, float> good_forward() {
  lory::MergeForwardArgs<T, float> a;
  a.num_segments = 5;
  a.experts = 8;
  a.params = 1000;
  a.W = bogus<T>(uintptr_t(1) << 44);
  a.expert_stride = 1000;
  a.weights = bogus<float>(uintptr_t(2) << 44);
  a.Wbar = bogus_mut<T>(uintptr_t(3) << 44);
  a.segment_stride = 1000;
  return a;
}

template <class T>
lory::MergeBackwardArgs<T, float> good_backward() {
  lory::MergeBackwardArgs<T, float> a;
  a.num_segments = 5;
  a.experts = 8;
  a.params = 1000;
  a.G = bogus<T>(uintptr_t(1) << 44);
  a.grad_segment_stride = 1000;
  a.W = bogus<T>(uintptr_t(2) << 44);
  a.expert_stride = 1000;
  a.weights = bogus<float>(uintptr_t(3) << 44);
  a.dW = bogus_mut<T>(uintptr_t(4) << 44);
  a.dW_expert_stride = 1000;
  a.d_weights = bogus_mut<float>(uintptr_t(5) << 44);
  return a;
}

// Calls the launcher with a bogus, large workspace: only validation can answer.
template <class T>
Status fwd(const lory::MergeForwardArgs<T, float>& a) {
  size_t bytes = size_t(1) << 40;
  return lory::merge_forward(a, bogus_ws(), bytes, nullptr);
}
// Every method of lory::merge_backward (lory/merge_gemm.cuh) must refuse the same way, before it
// needs a cuBLAS handle (none is passed).
template <class T>
Status bwd(const lory::MergeBackwardArgs<T, float>& a) {
  size_t bytes = size_t(1) << 40;
  const Status st = lory::merge_backward(a, bogus_ws(), bytes, nullptr);
  for (auto m : {lory::MergeBackwardMethod::kAuto, lory::MergeBackwardMethod::kFused, lory::MergeBackwardMethod::kGemm}) {
    size_t b = size_t(1) << 40;
    INFO("method " << lory::merge_backward_method_name(m));
    CHECK(lory::merge_backward(a, m, bogus_ws(), b, nullptr, nullptr) == st);
  }
  return st;
}

}  // namespace

TEMPLATE_TEST_CASE("merge_forward rejects every invalid argument before launching", "[launch][merge]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  REQUIRE(lory::merge_forward_can_implement(good_forward<T>()) == Status::kSuccess);
  auto a = good_forward<T>();
  a.num_segments = 0;
  CHECK(fwd(a) == Status::kErrorInvalidSize);
  a = good_forward<T>();
  a.num_segments = -3;
  CHECK(fwd(a) == Status::kErrorInvalidSize);
  a = good_forward<T>();
  a.params = 0;
  CHECK(fwd(a) == Status::kErrorInvalidSize);
  a = good_forward<T>();
  a.params = -1;
  CHECK(fwd(a) == Status::kErrorInvalidSize);
  a = good_forward<T>();
  a.experts = 0;
  CHECK(fwd(a) == Status::kErrorUnsupportedExpertCount);
  a = good_forward<T>();
  a.experts = -2;
  CHECK(fwd(a) == Status::kErrorUnsupportedExpertCount);
  a = good_forward<T>();
  a.experts = lory::kMaxExperts + 1;
  CHECK(fwd(a) == Status::kErrorUnsupportedExpertCount);
  a = good_forward<T>();
  a.W = nullptr;
  CHECK(fwd(a) == Status::kErrorNullPointer);
  a = good_forward<T>();
  a.weights = nullptr;
  CHECK(fwd(a) == Status::kErrorNullPointer);
  a = good_forward<T>();
  a.Wbar = nullptr;
  CHECK(fwd(a) == Status::kErrorNullPointer);
  a = good_forward<T>();
  a.expert_stride = 999;
  CHECK(fwd(a) == Status::kErrorInvalidShape);
  a = good_forward<T>();
  a.segment_stride = 999;
  CHECK(fwd(a) == Status::kErrorInvalidShape);
  a = good_forward<T>();
  a.num_segments = INT64_MAX / 2;  // S * stride overflows
  CHECK(fwd(a) == Status::kErrorInvalidSize);
  a = good_forward<T>();
  a.weights = bogus<float>(0x2002);
  CHECK(fwd(a) == Status::kErrorMisalignedPointer);
  if (sizeof(T) > 1) {
    a = good_forward<T>();
    a.W = bogus<T>(0x1001);
    CHECK(fwd(a) == Status::kErrorMisalignedPointer);
    a = good_forward<T>();
    a.Wbar = bogus_mut<T>(0x3001);
    CHECK(fwd(a) == Status::kErrorMisalignedPointer);
  }
  a = good_forward<T>();
  a.Wbar = const_cast<T*>(a.W);  // in place over the experts: refused as by the CPU twin
  CHECK(fwd(a) == Status::kErrorInvalidArgument);
  CHECK(std::string(lory::last_error_detail().argument) == "Wbar");
}

TEMPLATE_TEST_CASE("merge_forward workspace query and too-small workspace", "[launch][merge]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  auto a = good_forward<T>();
  size_t bytes = 0;
  REQUIRE(lory::merge_forward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == lory::detail::kMergeMinWorkspaceBytes);
  CHECK(bytes > 0);  // never 0: a real allocation always follows the query
  size_t small = bytes - 1;
  CHECK(lory::merge_forward(a, bogus_ws(), small, nullptr) == Status::kErrorWorkspaceTooSmall);
  // Invalid arguments win over the size query: nothing is reported for a call that cannot run.
  a.experts = 0;
  bytes = 123;
  CHECK(lory::merge_forward(a, nullptr, bytes, nullptr) == Status::kErrorUnsupportedExpertCount);
}

TEST_CASE("merge_forward: forcing tensor cores where they cannot run is an error", "[launch][merge]") {
  size_t bytes = 0;
  auto f = good_forward<float>();
  CHECK(lory::detail::merge_forward_on_path(f, nullptr, bytes, nullptr, lory::detail::MergePath::kTensorCore) ==
        Status::kErrorInvalidArgument);
  auto b = good_forward<__nv_bfloat16>();
  b.experts = 65;
  CHECK(lory::detail::merge_forward_on_path(b, nullptr, bytes, nullptr, lory::detail::MergePath::kTensorCore) ==
        Status::kErrorInvalidArgument);
  b.experts = 64;
  CHECK(lory::detail::merge_forward_on_path(b, nullptr, bytes, nullptr, lory::detail::MergePath::kTensorCore) ==
        Status::kSuccess);
}

// The dynamic-tile forward variants keep one counter per S slice in the workspace: the query asks
// for them (on the tensor-core path; the CUDA-core path needs none), and a workspace that is not
// 8-byte aligned is refused before anything runs.
TEST_CASE("merge_forward (dynamic tiles) workspace query and alignment", "[launch][merge]") {
  using Dyn = lory::detail::MergeForwardTcVariantDynamic;
  using lory::detail::MergePath;
  auto a = good_forward<__nv_bfloat16>();
  a.num_segments = 300;  // a single 256-param tile: S is cut into slices to fill the device
  a.params = 200;
  a.expert_stride = a.segment_stride = 200;
  int64_t segs = 0, slices = 0;
  using Cfg = lory::detail::MergeForwardTcConfig<__nv_bfloat16, 1, Dyn::At<1>>;
  // Counters for the slices a device with the least shared memory cuts (the most slices).
  lory::detail::merge_forward_slices(a.num_segments, 1, Cfg::kRowsPerPass, Cfg::max_rows(lory::detail::kMergeLeastSmemLimits),
                                     segs, slices);
  REQUIRE(slices > 2);
  size_t bytes = 0;
  REQUIRE(lory::detail::merge_forward_on_path<__nv_bfloat16, Dyn>(a, nullptr, bytes, nullptr, MergePath::kAuto) ==
          Status::kSuccess);
  CHECK(bytes == std::max<size_t>(lory::detail::kMergeMinWorkspaceBytes, size_t(slices) * 8));
  size_t simt = 0;
  REQUIRE(lory::detail::merge_forward_on_path<__nv_bfloat16, Dyn>(a, nullptr, simt, nullptr, MergePath::kSimt) ==
          Status::kSuccess);
  CHECK(simt == lory::detail::kMergeMinWorkspaceBytes);
  size_t small = bytes - 1;
  CHECK(lory::detail::merge_forward_on_path<__nv_bfloat16, Dyn>(a, bogus_ws(), small, nullptr, MergePath::kAuto) ==
        Status::kErrorWorkspaceTooSmall);
  size_t big = bytes + 64;
  void* odd = reinterpret_cast<void*>(uintptr_t(0x7004));
  CHECK(lory::detail::merge_forward_on_path<__nv_bfloat16, Dyn>(a, odd, big, nullptr, MergePath::kTensorCore) ==
        Status::kErrorMisalignedPointer);
}

TEMPLATE_TEST_CASE("merge_backward rejects every invalid argument before launching", "[launch][merge]", float,
                   __half, __nv_bfloat16) {
  using T = TestType;
  REQUIRE(lory::merge_backward_can_implement(good_backward<T>()) == Status::kSuccess);
  auto a = good_backward<T>();
  a.num_segments = 0;
  CHECK(bwd(a) == Status::kErrorInvalidSize);
  a = good_backward<T>();
  a.params = -5;
  CHECK(bwd(a) == Status::kErrorInvalidSize);
  a = good_backward<T>();
  a.experts = 0;
  CHECK(bwd(a) == Status::kErrorUnsupportedExpertCount);
  a = good_backward<T>();
  a.experts = lory::kMaxExperts + 1;
  CHECK(bwd(a) == Status::kErrorUnsupportedExpertCount);
  a = good_backward<T>();
  a.G = nullptr;
  CHECK(bwd(a) == Status::kErrorNullPointer);
  a = good_backward<T>();
  a.weights = nullptr;
  CHECK(bwd(a) == Status::kErrorNullPointer);
  a = good_backward<T>();
  a.dW = nullptr;
  a.d_weights = nullptr;
  CHECK(bwd(a) == Status::kErrorNullPointer);
  a = good_backward<T>();
  a.W = nullptr;  // needed for d_weights
  CHECK(bwd(a) == Status::kErrorNullPointer);
  a = good_backward<T>();
  a.grad_segment_stride = 999;
  CHECK(bwd(a) == Status::kErrorInvalidShape);
  a = good_backward<T>();
  a.expert_stride = 999;
  CHECK(bwd(a) == Status::kErrorInvalidShape);
  a = good_backward<T>();
  a.dW_expert_stride = 999;
  CHECK(bwd(a) == Status::kErrorInvalidShape);
  a = good_backward<T>();
  a.num_segments = INT64_MAX / 2;
  CHECK(bwd(a) == Status::kErrorInvalidSize);
  a = good_backward<T>();
  a.d_weights = bogus_mut<float>(0x5002);
  CHECK(bwd(a) == Status::kErrorMisalignedPointer);
  a = good_backward<T>();
  a.dW = const_cast<T*>(a.G);  // an output over an input: refused as by the CPU twin
  CHECK(bwd(a) == Status::kErrorInvalidArgument);
  a = good_backward<T>();
  a.weights = bogus<float>(0x3001);
  CHECK(bwd(a) == Status::kErrorMisalignedPointer);
  if (sizeof(T) > 1) {
    a = good_backward<T>();
    a.G = bogus<T>(0x1001);
    CHECK(bwd(a) == Status::kErrorMisalignedPointer);
    a = good_backward<T>();
    a.dW = bogus_mut<T>(0x4001);
    CHECK(bwd(a) == Status::kErrorMisalignedPointer);
  }
  // Skipped outputs need neither their pointer nor their stride.
  a = good_backward<T>();
  a.dW = nullptr;
  a.dW_expert_stride = 0;
  CHECK(lory::merge_backward_can_implement(a) == Status::kSuccess);
  a = good_backward<T>();
  a.d_weights = nullptr;
  a.W = nullptr;
  a.expert_stride = 0;
  CHECK(lory::merge_backward_can_implement(a) == Status::kSuccess);
}

TEMPLATE_TEST_CASE("merge_backward workspace query", "[launch][merge]", float, __half, __nv_bfloat16) {
  using T = TestType;
  constexpr int64_t V = 16 / sizeof(T);
  auto a = good_backward<T>();
  a.params = a.grad_segment_stride = a.expert_stride = a.dW_expert_stride = 1000003;
  // Deterministic: one [S, E] fp32 partial per persistent block (at most 512 blocks, one per P-tile).
  const int64_t tiles = (a.params + 32 * V - 1) / (32 * V);
  const size_t partials = size_t(std::min<int64_t>(tiles, 512)) * a.num_segments * a.experts * sizeof(float);
  size_t bytes = 0;
  REQUIRE(lory::merge_backward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == lory::detail::align_up(partials));
  size_t small = bytes - 1;
  CHECK(lory::merge_backward(a, bogus_ws(), small, nullptr) == Status::kErrorWorkspaceTooSmall);
  // The partials are updated as float pairs: a workspace off the 8-byte grid is refused.
  size_t enough = bytes;
  CHECK(lory::merge_backward(a, static_cast<unsigned char*>(bogus_ws()) + 4, enough, nullptr) ==
        Status::kErrorMisalignedPointer);

  // A small P: one partial per P-tile.
  auto s = a;
  s.params = 3;
  REQUIRE(lory::merge_backward(s, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == lory::detail::align_up(size_t(s.num_segments) * s.experts * sizeof(float)));

  // Fast mode with a small S*E: the partial stays on chip and is added atomically.
  a.deterministic = false;
  REQUIRE(lory::merge_backward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == lory::detail::kMergeMinWorkspaceBytes);
  // Fast mode with S*E past the on-chip partial: per-block partials again.
  auto big = a;
  big.num_segments = 1000;
  big.experts = 64;
  REQUIRE(lory::merge_backward(big, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == lory::detail::align_up(size_t(std::min<int64_t>(tiles, 512)) * 1000 * 64 * sizeof(float)));
  // dW only: nothing to reduce. The tensor-core kernel (16-bit storage, aligned views) still
  // takes the routing weights split into hi and lo operands from the workspace.
  auto dw_only = good_backward<T>();
  dw_only.d_weights = nullptr;
  REQUIRE(lory::merge_backward(dw_only, nullptr, bytes, nullptr) == Status::kSuccess);
  const bool tc = lory::detail::merge_backward_uses_tc(dw_only, lory::detail::MergePath::kAuto);
  CHECK(tc == !std::is_same<T, float>::value);
  CHECK(bytes == (tc ? lory::detail::MergeBackwardSplitShape::of(dw_only.num_segments, dw_only.experts).bytes(sizeof(T))
                     : lory::detail::kMergeMinWorkspaceBytes));
}

TEST_CASE("merge_backward: forcing tensor cores where they cannot run is an error", "[launch][merge]") {
  using lory::detail::MergePath;
  size_t bytes = 0;
  auto f = good_backward<float>();  // fp32 storage: CUDA cores only
  CHECK(lory::detail::merge_backward_on_path(f, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
        Status::kErrorInvalidArgument);
  auto b = good_backward<__nv_bfloat16>();
  b.experts = 65;  // past the tensor-core kernel's 64
  CHECK(lory::detail::merge_backward_on_path(b, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
        Status::kErrorInvalidArgument);
  // Validation still comes first.
  b = good_backward<__nv_bfloat16>();
  b.G = nullptr;
  CHECK(lory::detail::merge_backward_on_path(b, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
        Status::kErrorNullPointer);
}

TEMPLATE_TEST_CASE("merge_backward tensor-core path: choice and workspace query", "[launch][merge]", __half,
                   __nv_bfloat16) {
  using T = TestType;
  using lory::detail::MergePath;
  auto a = good_backward<T>();  // 16-byte aligned bases
  a.params = 100003;
  a.grad_segment_stride = a.expert_stride = a.dW_expert_stride = 100008;  // multiples of 8 elements
  // The default (kAuto) is the tensor-core kernel wherever it applies.
  CHECK(lory::detail::merge_backward_uses_tc(a, MergePath::kAuto));
  CHECK_FALSE(lory::detail::merge_backward_uses_tc(a, MergePath::kSimt));
  REQUIRE(lory::detail::merge_backward_uses_tc(a, MergePath::kTensorCore));
  // Beyond E = 64 only the CUDA-core kernel exists.
  auto wide = a;
  wide.experts = 65;
  CHECK_FALSE(lory::detail::merge_backward_uses_tc(wide, MergePath::kAuto));
  // Deterministic: one [S, E] partial per persistent block, one block per 128-param tile at most,
  // then the routing weights split into hi and lo operands, [2][16][64] (E padded to 16, S to 64,
  // the wgmma kernel's step) + 16 bytes.
  const int64_t tiles = (a.params + 127) / 128;
  const size_t split = lory::detail::MergeBackwardSplitShape::of(5, 8).bytes(sizeof(T));
  CHECK(split == 2 * 16 * 64 * sizeof(T) + 16);
  size_t bytes = 0;
  REQUIRE(lory::detail::merge_backward_on_path(a, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
          Status::kSuccess);
  CHECK(bytes == lory::detail::align_up(size_t(std::min<int64_t>(tiles, 512)) * 5 * 8 * sizeof(float)) + split);
  size_t small = bytes - 1;
  CHECK(lory::detail::merge_backward_on_path(a, bogus_ws(), small, nullptr, MergePath::kTensorCore) ==
        Status::kErrorWorkspaceTooSmall);
  // Few params: one partial per tile.
  auto s = a;
  s.params = 200;  // two tiles
  REQUIRE(lory::detail::merge_backward_on_path(s, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
          Status::kSuccess);
  CHECK(bytes == lory::detail::align_up(size_t(2) * 5 * 8 * sizeof(float)) + split);
  // Fast mode with a small S*E, and dW only: no partials.
  auto fast = a;
  fast.deterministic = false;
  REQUIRE(lory::detail::merge_backward_on_path(fast, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
          Status::kSuccess);
  CHECK(bytes == split);
  auto dw_only = a;
  dw_only.d_weights = nullptr;
  CHECK(lory::detail::merge_backward_uses_tc(dw_only, MergePath::kTensorCore));
  REQUIRE(lory::detail::merge_backward_on_path(dw_only, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
          Status::kSuccess);
  CHECK(bytes == split);
  // d_weights only: no dW product, no split weights.
  auto de_only = fast;
  de_only.dW = nullptr;
  REQUIRE(lory::detail::merge_backward_on_path(de_only, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
          Status::kSuccess);
  CHECK(bytes == lory::detail::kMergeMinWorkspaceBytes);
  // Every view has to be 16-byte aligned (base and stride), else the CUDA-core kernel runs.
  for (int which = 0; which < 4; ++which) {
    auto m = a;
    if (which == 0) m.grad_segment_stride += 1;
    if (which == 1) m.expert_stride += 4;
    if (which == 2) m.dW = bogus_mut<T>(0x4002);
    if (which == 3) m.W = bogus<T>(0x2008);
    INFO("misaligned view " << which);
    CHECK_FALSE(lory::detail::merge_backward_uses_tc(m, MergePath::kTensorCore));
    CHECK_FALSE(lory::detail::merge_backward_uses_tc(m, MergePath::kAuto));
    size_t forced = 0, simt = 0;
    REQUIRE(lory::detail::merge_backward_on_path(m, nullptr, forced, nullptr, MergePath::kTensorCore) ==
            Status::kSuccess);
    REQUIRE(lory::detail::merge_backward_on_path(m, nullptr, simt, nullptr, MergePath::kSimt) == Status::kSuccess);
    CHECK(forced == simt);
  }
  // W is not read without d_weights, so its alignment does not matter then.
  auto dw_misaligned_w = dw_only;
  dw_misaligned_w.W = bogus<T>(0x2002);
  CHECK(lory::detail::merge_backward_uses_tc(dw_misaligned_w, MergePath::kTensorCore));
}

// The workspace query does not ask the device, so it sizes for the one with the least shared
// memory per block the tensor-core kernels run on (99 KiB: sm_86, sm_89, sm_120). The fast mode's
// on-chip partial does not fit beside the pipeline there at E = 8, S = 2048 (64 KiB + 36 KiB): the
// query reserves the per-block partials the launch then uses on such a device.
TEMPLATE_TEST_CASE("merge_backward workspace query reserves partials for a 99 KiB device", "[launch][merge]", __half,
                   __nv_bfloat16) {
  using T = TestType;
  using lory::detail::MergePath;
  auto a = good_backward<T>();
  a.params = a.grad_segment_stride = a.expert_stride = a.dW_expert_stride = 100008;
  a.deterministic = false;
  const int64_t tiles = (a.params + 127) / 128;
  for (int64_t S : {int64_t(1024), int64_t(2048)}) {
    a.num_segments = S;
    INFO("S = " << S);
    const size_t split = lory::detail::MergeBackwardSplitShape::of(S, a.experts).bytes(sizeof(T));
    const size_t partials = lory::detail::align_up(size_t(std::min<int64_t>(tiles, 512)) * S * a.experts * sizeof(float));
    size_t bytes = 0;
    REQUIRE(lory::detail::merge_backward_on_path(a, nullptr, bytes, nullptr, MergePath::kTensorCore) ==
            Status::kSuccess);
    CHECK(lory::detail::merge_backward_partial_fits(S, a.experts, true));  // on chip where the device allows
    CHECK(bytes == (S == 2048 ? partials + split : split));
  }
}

// The CUDA-core kernel runs on any device, so its query sizes for 48 KiB per block: at E = 16 the
// fast mode's on-chip partial fits beside the tiles up to about 470 segments.
TEST_CASE("merge_backward (CUDA cores) workspace query reserves partials for a 48 KiB device", "[launch][merge]") {
  using T = float;
  auto a = good_backward<T>();
  a.params = a.grad_segment_stride = a.expert_stride = a.dW_expert_stride = 100000;
  a.experts = 16;
  a.deterministic = false;
  using Cfg = lory::detail::MergeBackwardSimtConfig<T>;
  const int64_t tile = int64_t(Cfg::col_vecs(a.experts)) * Cfg::kVec;
  const int64_t blocks = std::min<int64_t>((a.params + tile - 1) / tile, 512);
  for (int64_t S : {int64_t(100), int64_t(800)}) {
    a.num_segments = S;
    INFO("S = " << S);
    size_t bytes = 0;
    REQUIRE(lory::merge_backward(a, nullptr, bytes, nullptr) == Status::kSuccess);
    CHECK(bytes == (S == 800 ? lory::detail::align_up(size_t(blocks) * S * a.experts * sizeof(float))
                             : lory::detail::kMergeMinWorkspaceBytes));
  }
}

// The tensor-core forward fits a 99 KiB device (sm_86, sm_89, sm_120) at every E, by default and in
// every variant: the launch cuts the slices of routing weights to the device's shared memory.
TEST_CASE("merge_forward tensor-core shared memory fits the device with the least", "[launch][merge]") {
  using T = __nv_bfloat16;
  namespace ld = lory::detail;
  const auto& least = ld::kMergeLeastSmemLimits;
  auto check = [&](auto tag) {
    using Tuning = typename decltype(tag)::type;
    auto at = [&](auto k) {
      constexpr int K = decltype(k)::value;
      using Cfg = ld::MergeForwardTcConfig<T, K, typename Tuning::template At<K>>;
      INFO("K = " << K);
      CHECK(Cfg::max_rows(least) >= Cfg::kRowsPerPass);
      CHECK(Cfg::smem_bytes(Cfg::max_rows(least)) <= least.per_block);
      // The default's fixed part alone takes 84 KiB at E = 64: slices are cut shorter than on an sm_90.
      if (K == 4 && std::is_same<Tuning, ld::MergeForwardTcDefault>::value)
        CHECK(Cfg::max_rows(least) < Cfg::max_rows(ld::kMergeSm90SmemLimits));
    };
    at(std::integral_constant<int, 1>{});
    at(std::integral_constant<int, 2>{});
    at(std::integral_constant<int, 3>{});
    at(std::integral_constant<int, 4>{});
    for (int E = 1; E <= 64; ++E) CHECK(ld::merge_forward_tc_fits<T, Tuning>(E, least));
  };
  check(ld::TypeTag<ld::MergeForwardTcDefault>{});
  ld::for_each_merge_forward_tc_variant(check);
}

// The method kAuto runs (lory/merge_gemm.cuh): the fused tensor-core kernel at E <= 8 with aligned
// 16-bit views, the two cuBLAS GEMMs otherwise, and the fused kernel wherever the GEMMs' sizes pass
// cuBLAS' int limits. Explicit methods stay as given.
TEMPLATE_TEST_CASE("merge_backward method: kAuto's choice", "[launch][merge]", float, __half, __nv_bfloat16) {
  using T = TestType;
  using lory::MergeBackwardMethod;
  const bool b16 = !std::is_same<T, float>::value;
  auto pick = [](const lory::MergeBackwardArgs<T, float>& a) {
    return lory::resolve_merge_backward_method(a, MergeBackwardMethod::kAuto);
  };
  auto a = good_backward<T>();  // E = 8, aligned views (stride 1000: a multiple of 16 bytes)
  CHECK(pick(a) == (b16 ? MergeBackwardMethod::kFused : MergeBackwardMethod::kGemm));
  a.experts = 1;
  CHECK(pick(a) == (b16 ? MergeBackwardMethod::kFused : MergeBackwardMethod::kGemm));
  a.experts = 9;
  CHECK(pick(a) == MergeBackwardMethod::kGemm);
  a.experts = 64;
  CHECK(pick(a) == MergeBackwardMethod::kGemm);
  a = good_backward<T>();
  a.G = bogus<T>(0x1000 + sizeof(T));  // off the 16-byte grid: the fused kernel would run on CUDA cores
  CHECK(pick(a) == MergeBackwardMethod::kGemm);
  a = good_backward<T>();
  a.experts = 32;
  a.grad_segment_stride = int64_t(INT_MAX) + 9;  // past cuBLAS' int: the fused kernel
  CHECK(pick(a) == MergeBackwardMethod::kFused);
  for (auto m : {MergeBackwardMethod::kFused, MergeBackwardMethod::kGemm})
    CHECK(lory::resolve_merge_backward_method(good_backward<T>(), m) == m);
}

TEMPLATE_TEST_CASE("merge_backward method: GEMM workspace query and refusals", "[launch][merge]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  using lory::MergeBackwardMethod;
  constexpr bool b16 = !std::is_same<T, float>::value;
  auto a = good_backward<T>();
  a.experts = 32;
  size_t bytes = 0;
  // The weights rounded to the storage dtype (fp32 storage takes them as they are).
  REQUIRE(lory::merge_backward(a, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  CHECK(bytes == (b16 ? size_t(5) * 32 * sizeof(T) : lory::detail::kMergeMinWorkspaceBytes));
  size_t auto_bytes = 0;
  REQUIRE(lory::merge_backward(a, MergeBackwardMethod::kAuto, nullptr, auto_bytes, nullptr, nullptr) ==
          Status::kSuccess);
  CHECK(auto_bytes == bytes);  // E = 32: kAuto is the GEMMs
  auto tiny = a;
  tiny.num_segments = 1;
  tiny.experts = 1;
  REQUIRE(lory::merge_backward(tiny, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  CHECK(bytes == lory::detail::kMergeMinWorkspaceBytes);
  // kFused through this entry point is lory::merge_backward's own query.
  size_t fused = 0, plain = 0;
  REQUIRE(lory::merge_backward(a, MergeBackwardMethod::kFused, nullptr, fused, nullptr, nullptr) == Status::kSuccess);
  REQUIRE(lory::merge_backward(a, nullptr, plain, nullptr) == Status::kSuccess);
  CHECK(fused == plain);

  // Refusals before the handle is looked at (none is passed; the workspace is bogus).
  auto call = [&](const lory::MergeBackwardArgs<T, float>& x, MergeBackwardMethod m, void* ws, size_t n) {
    return lory::merge_backward(x, m, ws, n, nullptr, nullptr);
  };
  REQUIRE(lory::merge_backward(a, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  CHECK(call(a, MergeBackwardMethod::kGemm, bogus_ws(), bytes - 1) == Status::kErrorWorkspaceTooSmall);
  // The workspace holds the weights rounded to T: T's alignment (fp32 storage uses none; the handle
  // is what is missing then).
  CHECK(call(a, MergeBackwardMethod::kGemm, static_cast<char*>(bogus_ws()) + 1, bytes) ==
        (b16 ? Status::kErrorMisalignedPointer : Status::kErrorNullPointer));
  CHECK(call(a, MergeBackwardMethod::kGemm, static_cast<char*>(bogus_ws()) + 2, bytes) == Status::kErrorNullPointer);
  CHECK(call(a, MergeBackwardMethod::kGemm, bogus_ws(), bytes) == Status::kErrorNullPointer);  // the handle
  CHECK(call(a, static_cast<MergeBackwardMethod>(3), bogus_ws(), bytes) == Status::kErrorInvalidArgument);
  CHECK(call(a, static_cast<MergeBackwardMethod>(-1), nullptr, bytes) == Status::kErrorInvalidArgument);
  // Sizes past cuBLAS' int: a leading dimension, the number of segments.
  auto wide = a;
  wide.grad_segment_stride = int64_t(INT_MAX) + 9;
  CHECK(call(wide, MergeBackwardMethod::kGemm, nullptr, bytes) == Status::kErrorInvalidSize);
  wide = a;
  wide.dW_expert_stride = int64_t(INT_MAX) + 9;
  CHECK(call(wide, MergeBackwardMethod::kGemm, nullptr, bytes) == Status::kErrorInvalidSize);
  wide.dW = nullptr;  // a skipped output's stride does not count
  CHECK(call(wide, MergeBackwardMethod::kGemm, nullptr, bytes) == Status::kSuccess);
  wide = a;
  wide.expert_stride = int64_t(INT_MAX) + 9;
  CHECK(call(wide, MergeBackwardMethod::kGemm, nullptr, bytes) == Status::kErrorInvalidSize);
}

// 2-D views (rows x params at a row pitch per operand): a pitch below params, rows not positive,
// rows * pitch past int64 and an expert (segment) stride below the view's extent are refused,
// naming the argument, before anything is touched (the pointers are bogus).
TEMPLATE_TEST_CASE("merge 2-D views: bad rows and pitches are refused before launching", "[launch][merge][view2d]",
                   float, __half, __nv_bfloat16) {
  using T = TestType;
  // d = 6 rows of a 1000-column slice of a [6, 4096] matrix per expert.
  auto f = good_forward<T>();
  f.rows = 6;
  f.W_row_pitch = f.Wbar_row_pitch = 4096;
  f.expert_stride = f.segment_stride = 6 * 4096;
  REQUIRE(lory::merge_forward_can_implement(f) == Status::kSuccess);
  auto b = good_backward<T>();
  b.rows = 6;
  b.G_row_pitch = b.W_row_pitch = b.dW_row_pitch = 4096;
  b.grad_segment_stride = b.expert_stride = b.dW_expert_stride = 6 * 4096;
  REQUIRE(lory::merge_backward_can_implement(b) == Status::kSuccess);
  auto arg = [] { return std::string(lory::last_error_detail().argument); };

  auto x = f;
  x.W_row_pitch = 999;
  CHECK(fwd(x) == Status::kErrorInvalidShape);
  CHECK(arg() == "W_row_pitch");
  x = f;
  x.Wbar_row_pitch = 0;
  CHECK(fwd(x) == Status::kErrorInvalidShape);
  CHECK(arg() == "Wbar_row_pitch");
  x = f;
  x.rows = 0;
  CHECK(fwd(x) == Status::kErrorInvalidSize);
  CHECK(arg() == "rows");
  x = f;
  x.rows = INT64_MAX / 2;  // rows * pitch overflows
  CHECK(fwd(x) == Status::kErrorInvalidSize);
  CHECK(arg() == "W_row_pitch");
  x = f;
  x.expert_stride = 5 * 4096 + 999;  // one element short of the view
  CHECK(fwd(x) == Status::kErrorInvalidShape);
  CHECK(arg() == "expert_stride");
  x = f;
  x.segment_stride = 5 * 4096 + 999;
  CHECK(fwd(x) == Status::kErrorInvalidShape);
  CHECK(arg() == "segment_stride");
  x = f;
  x.rows = 1;  // one row: the pitches are not used
  x.W_row_pitch = x.Wbar_row_pitch = 0;
  CHECK(lory::merge_forward_can_implement(x) == Status::kSuccess);

  for (const char* which : {"G_row_pitch", "W_row_pitch", "dW_row_pitch"}) {
    INFO(which);
    auto y = b;
    int64_t& pitch = std::string(which) == "G_row_pitch" ? y.G_row_pitch
                     : std::string(which) == "W_row_pitch" ? y.W_row_pitch
                                                           : y.dW_row_pitch;
    pitch = 999;
    CHECK(bwd(y) == Status::kErrorInvalidShape);
    CHECK(arg() == which);
    pitch = INT64_MAX / 4;  // (rows - 1) * pitch overflows
    CHECK(bwd(y) == Status::kErrorInvalidSize);
    CHECK(arg() == which);
  }
  auto y = b;
  y.rows = -1;
  CHECK(bwd(y) == Status::kErrorInvalidSize);
  y = b;
  y.grad_segment_stride = 5 * 4096 + 999;
  CHECK(bwd(y) == Status::kErrorInvalidShape);
  CHECK(arg() == "grad_segment_stride");
  y = b;
  y.dW_expert_stride = 5 * 4096 + 999;
  CHECK(bwd(y) == Status::kErrorInvalidShape);
  CHECK(arg() == "dW_expert_stride");
  // A skipped output's view does not count.
  y = b;
  y.dW = nullptr;
  y.dW_row_pitch = 3;
  CHECK(lory::merge_backward_can_implement(y) == Status::kSuccess);
  y = b;
  y.d_weights = nullptr;
  y.W_row_pitch = 3;
  CHECK(lory::merge_backward_can_implement(y) == Status::kSuccess);
  // Views that overlap through their rows: W's rows reach into Wbar's.
  x = f;
  x.Wbar = const_cast<T*>(x.W) + 5 * 4096 + 500;
  CHECK(fwd(x) == Status::kErrorInvalidArgument);
  CHECK(arg() == "Wbar");
}

// The workspace queries count over the flattened views: P = rows * params.
TEMPLATE_TEST_CASE("merge 2-D views: workspace queries over rows * params", "[launch][merge][view2d]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  using lory::MergeBackwardMethod;
  auto b = good_backward<T>();
  b.params = 100;
  b.rows = 10007;
  b.G_row_pitch = b.W_row_pitch = b.dW_row_pitch = 4096;
  b.grad_segment_stride = b.expert_stride = b.dW_expert_stride = b.rows * 4096;
  auto flat = good_backward<T>();
  flat.params = flat.grad_segment_stride = flat.expert_stride = flat.dW_expert_stride = b.rows * b.params;
  size_t bytes = 0, flat_bytes = 0;
  REQUIRE(lory::merge_backward(b, nullptr, bytes, nullptr) == Status::kSuccess);
  REQUIRE(lory::merge_backward(flat, nullptr, flat_bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == flat_bytes);  // the same tiles, so the same partials
  CHECK(bytes > lory::detail::align_up(size_t(b.num_segments) * b.experts * sizeof(float)));

  // The GEMM method: non-flat views add the rows' fp32 d_weights partials, placed first.
  REQUIRE(lory::merge_backward(b, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  const size_t partials = lory::detail::align_up(size_t(b.rows) * b.num_segments * b.experts * sizeof(float));
  const size_t converted = std::is_same<T, float>::value ? 0 : size_t(b.num_segments) * b.experts * sizeof(T);
  CHECK(bytes == partials + converted);
  auto no_de = b;
  no_de.d_weights = nullptr;
  REQUIRE(lory::merge_backward(no_de, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) ==
          Status::kSuccess);
  CHECK(bytes == std::max(converted, lory::detail::kMergeMinWorkspaceBytes));
  // A flat 2-D view (every pitch == params) is one GEMM per product: no partials.
  auto f2 = b;
  f2.G_row_pitch = f2.W_row_pitch = f2.dW_row_pitch = b.params;
  REQUIRE(lory::merge_backward(f2, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  CHECK(bytes == std::max(converted, lory::detail::kMergeMinWorkspaceBytes));
  // Rows past cuBLAS' int (a batch count) or a flattened P past it: the GEMMs cannot take the call,
  // and kAuto gives it to the fused kernel.
  auto many = f2;
  many.rows = int64_t(INT_MAX) / 50;  // rows * params past INT_MAX
  many.grad_segment_stride = many.expert_stride = many.dW_expert_stride = many.rows * many.params;
  CHECK(lory::merge_backward(many, MergeBackwardMethod::kGemm, nullptr, bytes, nullptr, nullptr) ==
        Status::kErrorInvalidSize);
  CHECK(lory::resolve_merge_backward_method(many, MergeBackwardMethod::kAuto) == MergeBackwardMethod::kFused);

  // The forward's dynamic-tile counters count tiles over rows * params too.
  if constexpr (!std::is_same<T, float>::value) {
    auto f = good_forward<T>();
    f.num_segments = 30000;
    f.experts = 16;
    f.params = 512;
    f.rows = 3;
    f.W_row_pitch = f.Wbar_row_pitch = 640;
    f.expert_stride = f.segment_stride = 3 * 640;
    auto g = f;  // the same P as one flat row
    g.rows = 1;
    g.params = g.expert_stride = g.segment_stride = 3 * 512;
    auto h = g;  // one row of the view only
    h.params = 512;
    using Dyn = lory::detail::MergeForwardTcVariantDynamic;
    constexpr auto tc = lory::detail::MergePath::kTensorCore;
    size_t fb = 0, gb = 0, hb = 0;
    REQUIRE(lory::detail::merge_forward_on_path<T, Dyn>(f, nullptr, fb, nullptr, tc) == Status::kSuccess);
    REQUIRE(lory::detail::merge_forward_on_path<T, Dyn>(g, nullptr, gb, nullptr, tc) == Status::kSuccess);
    REQUIRE(lory::detail::merge_forward_on_path<T, Dyn>(h, nullptr, hb, nullptr, tc) == Status::kSuccess);
    CHECK(fb == gb);
    CHECK(fb != hb);
  }
}
