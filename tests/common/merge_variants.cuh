// The merge's tuning variants (A/B candidates): the tensor-core forward's and backward's sets of
// knobs besides the defaults lory runs (lory/detail/merge/policy.cuh), the wgmma backward as a
// tuning, and for_each_merge_*_variant to visit them. Test and timing code, not library code: the
// tests (tests/gpu/test_merge.cu, tests/launch, tests/emu/test_smem_banks.cpp) check every variant
// like the default, and bench/ab/merge_ab.cu times them against it in one GPU run.
//
// They stay in lory::detail, and the feature macros below keep their names, so that
// scripts/build_ab_drivers.sh can build bench/ab/merge_ab.cu against older include/ revisions,
// whose lory/merge.cuh defined all of this itself (and the macros with it); such a revision has no
// lory/detail/merge/policy.cuh, so this header then adds nothing.
#pragma once
#include "lory/merge.cuh"

#if __has_include("lory/detail/merge/policy.cuh")
#include <type_traits>

LORY_NAMESPACE_BEGIN
namespace detail {

// The forward variants, named for the timing driver and the tests (docs/gpu-results.md says which ran).
struct MergeForwardTcVariantTile512 : MergeForwardTcTuning<8, false> {
  static constexpr const char* kName = "tile512";  // 1 KiB runs per segment row, not 512 bytes
};
struct MergeForwardTcVariantStream : MergeForwardTcTuning<4, true> {
  static constexpr const char* kName = "cs";  // evict-first stores
};
struct MergeForwardTcVariantTile512Stream : MergeForwardTcTuning<8, true> {
  static constexpr const char* kName = "tile512+cs";
};
struct MergeForwardTcVariantK1Blocks3 : MergeForwardTcTuning<4, false, 3> {
  static constexpr const char* kName = "k1-3blocks";  // E <= 16: 24 warps per SM, not 16
};
struct MergeForwardTcVariantDynamic : MergeForwardTcTuning<4, false, 2, true> {
  static constexpr const char* kName = "dyn";  // tiles taken from a counter
};
struct MergeForwardTcVariantTile512Dynamic : MergeForwardTcTuning<8, false, 2, true> {
  static constexpr const char* kName = "tile512+dyn";
};

// The backward variants, each with a name for the timing driver and the tests
// (docs/gpu-results.md says which ran).
struct MergeBackwardTcVariantK1Fit3 : MergeBackwardTcTuning<3, 1, 8, 1> {
  static constexpr const char* kName = "k1-fit3";  // E <= 16: two stages where four leave two blocks
};
struct MergeBackwardTcVariantK1De16 : MergeBackwardTcTuning<2, 1, 16, 1> {
  static constexpr const char* kName = "k1-de16";  // E <= 16: 16-expert d_weights units
};
struct MergeBackwardTcVariantDw2x4 : MergeBackwardTcTuning<2, 2, 8, 1> {
  static constexpr const char* kName = "dw2x4";  // dW warps 2 expert groups x 4 param slices
};
struct MergeBackwardTcVariantDe32 : MergeBackwardTcTuning<2, 1, 8, 2> {
  static constexpr const char* kName = "de32";  // d_weights units of 32 segments
};
struct MergeBackwardTcVariantDw2x4De32 : MergeBackwardTcTuning<2, 2, 8, 2> {
  static constexpr const char* kName = "dw2x4+de32";
};
struct MergeBackwardTcVariantTile256 : MergeBackwardTcTuning<2, 1, 8, 1, 256> {
  // 256-param tiles (E = 17..32). With dw2x4 the model gives the same traffic (its warps already
  // span 32 params); with de32 it spills on sm_80.
  static constexpr const char* kName = "tile256";
};
struct MergeBackwardTcVariantK1Tile256 : MergeBackwardTcTuning<3, 1, 8, 1, 128, 256> {
  // E <= 16: 256-param tiles, two stages so that three blocks stay on an SM. Each block reads its G
  // rows in runs of 512 bytes, not 256, and every warp reads the step's routing weights once per
  // 256 params.
  static constexpr const char* kName = "k1-tile256";
};
// The wgmma kernel (merge_backward_wgmma_kernel, sm_90a) as a tuning: its own kernel, not a set of
// mma.sync knobs (kWgmma: detail::is_wgmma_tuning). Not in for_each_merge_backward_tc_variant, which
// runs on any sm_80+ device.
struct MergeBackwardWgmma {
  static constexpr bool kWgmma = true;
  static constexpr const char* kName = "wgmma";
};
template <class X>
struct TypeTag {
  using type = X;
};
// Calls f(TypeTag<V>{}) for every variant V, in a fixed order.
template <class F>
void for_each_merge_forward_tc_variant(F&& f) {
  f(TypeTag<MergeForwardTcVariantTile512>{});
  f(TypeTag<MergeForwardTcVariantStream>{});
  f(TypeTag<MergeForwardTcVariantTile512Stream>{});
  f(TypeTag<MergeForwardTcVariantK1Blocks3>{});
  f(TypeTag<MergeForwardTcVariantDynamic>{});
  f(TypeTag<MergeForwardTcVariantTile512Dynamic>{});
}
template <class F>
void for_each_merge_backward_tc_variant(F&& f) {
  f(TypeTag<MergeBackwardTcVariantK1Fit3>{});
  f(TypeTag<MergeBackwardTcVariantK1De16>{});
  f(TypeTag<MergeBackwardTcVariantDw2x4>{});
  f(TypeTag<MergeBackwardTcVariantDe32>{});
  f(TypeTag<MergeBackwardTcVariantDw2x4De32>{});
  f(TypeTag<MergeBackwardTcVariantTile256>{});
  f(TypeTag<MergeBackwardTcVariantK1Tile256>{});
}

}  // namespace detail
LORY_NAMESPACE_END

// Feature macros for bench/ab/merge_ab.cu: the forward and backward variants, and the wgmma tuning.
#define LORY_MERGE_FORWARD_TC_TUNING 1
#define LORY_MERGE_BACKWARD_TC_TUNING 1
#define LORY_MERGE_BACKWARD_WGMMA 1
#endif
