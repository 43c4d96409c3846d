// lory (private), merge layer "policy": the merge's constants (threads per block, chunk sizes,
// workspace minimum, the shared-memory limits plans size for), the tensor-core kernels' tuning knobs
// and the default tunings lory::merge_forward / lory::merge_backward run. The other tunings (A/B
// variants) live with the tests and the timing driver (tests/common/merge_variants.cuh).
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {


// Which implementation of the tile product to run (tests force each one).
enum class MergePath : int { kAuto = 0, kSimt = 1, kTensorCore = 2 };

constexpr int kMergeThreads = 256;
// A launcher that needs no scratch still reports 16 bytes, never 0, so the
// two-phase "query, allocate, call" pattern always ends in a real launch.
constexpr size_t kMergeMinWorkspaceBytes = 16;
// Forward: P-tiles x S-slices aimed at (at least) this many blocks.
constexpr int64_t kMergeForwardTargetBlocks = 1024;
// Shared memory the slice's weights may take (the rest of the block's use is small).
constexpr int64_t kMergeForwardWeightsSmem = 48 * 1024;
// Backward: at most this many persistent blocks (bounds the partials' workspace).
constexpr int kMergeBackwardMaxBlocks = 512;
// Backward: segments staged per step, and the largest S*E partial kept in shared memory.
constexpr int kMergeBackwardChunk = 16;
constexpr int64_t kMergeBackwardSmemPartial = 16384;  // floats (64 KiB)
// Backward, tensor cores: segments per pipeline step (the K of its dW product): mma.sync and wgmma.
constexpr int kMergeBackwardTcChunk = 32;
constexpr int kMergeBackwardWgmmaChunk = 64;
// Backward, tensor cores: the dynamic shared memory a device gives one block (its opt-in maximum)
// and what an SM's blocks share (less 1 KiB per block for the runtime, rounded down: per_sm / B per
// block keeps B blocks on an SM). The launchers read the device's; the shape tests model an sm_90.
struct MergeSmemLimits {
  size_t per_block;
  size_t per_sm;
};
constexpr MergeSmemLimits kMergeSm90SmemLimits{227 * 1024, 224 * 1024};  // H100 / H200
// The least shared memory per block (and per SM, less the runtime's reserve as device_smem_limits
// counts it) of the devices the tensor-core kernels run on: sm_86, sm_89 and sm_120 have 99 KiB per
// block (sm_80 163 KiB, sm_90 227 KiB). Workspace queries size for it (they do not ask the device);
// launches fit their shared memory to the device's own limits.
constexpr MergeSmemLimits kMergeLeastSmemLimits{99 * 1024, 96 * 1024};
// The same for the CUDA-core kernels, which run on any device: 48 KiB per block.
constexpr MergeSmemLimits kMergeLeastSimtSmemLimits{48 * 1024, 48 * 1024};

// ---------------------------------------------------------------------------
// Tensor-core forward: tuning knobs, and the default tuning.
// ---------------------------------------------------------------------------
// Tuning knobs of the tensor-core forward (as the backward's, below: one kernel template, each
// variant a set of compile-time knobs, tested like the default and timed against it in one GPU run).
//   kWarpsN        warps across the tile's params, 64 each: 4 (256-param tiles, 2 warp rows of 16
//                  segments per pass) or 8 (512-param tiles, one warp row). Each block writes a
//                  run of 2 * 64 * kWarpsN contiguous bytes per segment row; its W tile takes
//                  twice the shared memory at 8.
//   kStreamStores  merged rows stored with st.global.cs (evict-first: the merged weights are not
//                  read again by this kernel) instead of the default write-back policy.
//   kMinBlocks     __launch_bounds__' blocks per SM (registers: 65536 / (256 * kMinBlocks) per
//                  thread); above two, the slice's routing weights get less shared memory (more
//                  slices, so W is read once per slice) so that the blocks fit an sm_90's.
//   kDynamicTiles  blocks take their next tile from a counter in the workspace instead of every
//                  gridDim.x-th: the tiles in flight stay consecutive and about in step, so the
//                  writes in flight cover long runs of each segment row (the static order drifts
//                  apart over a few hundred tiles per block).
template <int kWarpsN_, bool kStreamStores_, int kMinBlocks_, bool kDynamicTiles_ = false>
struct MergeForwardTcKnobs {
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr bool kStreamStores = kStreamStores_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr bool kDynamicTiles = kDynamicTiles_;
  static_assert(kWarpsN == 4 || kWarpsN == 8, "warps across the tile: 4 or 8");
  static_assert(kMinBlocks >= 1 && kMinBlocks <= 3, "blocks per SM");
};
// A tuning gives the knobs for each kKSteps (E up to 16 kKSteps). 512-param tiles stop at E = 32:
// at E = 64 two W buffers of 512 params alone take 133 KiB (an sm_80 gives a block 163 KiB).
// Blocks per SM: two up to E = 32, one above; kMinBlocksK1 at E <= 16.
template <int kWarpsN, bool kStreamStores, int kMinBlocksK1 = 2, bool kDynamicTiles = false>
struct MergeForwardTcTuning {
  template <int kKSteps>
  using At = MergeForwardTcKnobs<kKSteps <= 2 ? kWarpsN : 4, kStreamStores,
                                 kKSteps == 1 ? kMinBlocksK1 : kKSteps == 2 ? 2 : 1, kDynamicTiles>;
};
// What lory::merge_forward runs (docs/gpu-results.md has its measurements).
using MergeForwardTcDefault = MergeForwardTcTuning<4, false>;

// ---------------------------------------------------------------------------
// Tensor-core backward: tuning knobs, and the default tuning.
// ---------------------------------------------------------------------------
// Tuning knobs of the tensor-core backward (CUTLASS style: one kernel template, each variant a set
// of compile-time knobs). lory::merge_backward runs MergeBackwardTcDefault; the variants
// (tests/common/merge_variants.cuh) are tested like it (tests/gpu/test_merge.cu, also emulated) and
// timed against it in one GPU run (bench/ab/merge_ab.cu), so a layout question is answered by
// measurement.
//   kMinBlocks  __launch_bounds__' blocks per SM (registers: 65536 / (256 * kMinBlocks) per thread).
//   kFitBlocks  blocks per SM the pipeline depth aims at: four stages where kFitBlocks blocks fit in
//               shared memory with four, else two where they fit with two, else four.
//   kDwGroups   dW warp layout: 1 = 8 warps x 16 params, all experts; 2 = 2 expert groups x 4 warps
//               x 32 params (kKSteps even): a warp reads half the routing weights and twice the G
//               columns per step.
//   kDeN        experts per d_weights unit: 8 or 16 (16: a unit reads its G rows once per 16
//               experts, not per 8; 8: the product spreads over twice as many warps).
//   kDeM        segment m-tiles per d_weights unit: 1 or 2 (2: a unit reads its W fragments once per
//               32-segment chunk, not once per 16 segments; half as many units).
//   kTileN      params per tile: 128 or 256 (256: every warp reads the step's routing weights and
//               updates the partial once per 256 params, not per 128; the W tile and the G stages
//               take twice the shared memory, the dW accumulators twice the registers).
template <int kMinBlocks_, int kFitBlocks_, int kDwGroups_, int kDeN_, int kDeM_, int kTileN_ = 128>
struct MergeBackwardTcKnobs {
  static constexpr int kMinBlocks = kMinBlocks_, kFitBlocks = kFitBlocks_, kDwGroups = kDwGroups_;
  static constexpr int kDeN = kDeN_, kDeM = kDeM_, kTileN = kTileN_;
  static_assert(kTileN == 128 || kTileN == 256, "params per tile: 128 or 256");
  static_assert(kMinBlocks >= 1 && kMinBlocks <= 4 && kFitBlocks >= 1 && kFitBlocks <= 4, "blocks per SM");
  static_assert(kDwGroups == 1 || kDwGroups == 2, "dW expert groups: 1 or 2");
  static_assert(kDeN == 8 || kDeN == 16, "d_weights unit width: 8 or 16 experts");
  static_assert(kDeM == 1 || kDeM == 2, "d_weights unit height: 1 or 2 m-tiles");
};

// A tuning gives the knobs for each kKSteps (E up to 16 kKSteps). The knobs that do not apply at a
// kKSteps fall back to the default's there: two dW groups need an even kKSteps; 32-segment
// d_weights units stop at E = 32 (above, their extra accumulators spill on sm_80 within the 128
// registers of two blocks per SM); 256-param tiles apply from E = 17 to 32 only (above they spill
// the same way; up to E = 16 they cost the third block per SM) and fall back to 128 params where
// their shared memory would cost a block (E = 32, S = 512).
//   kFitK1, kDeNK1, kTileNK1: kFitBlocks, kDeN and kTileN at kKSteps = 1 (E <= 16, where three
//   blocks fit by registers); from kKSteps = 2 on, two blocks and 16-expert units.
template <int kFitK1, int kDwGroups, int kDeNK1, int kDeM, int kTileN = 128, int kTileNK1 = 128>
struct MergeBackwardTcTuning {
  template <int kKSteps>
  using At = MergeBackwardTcKnobs<kKSteps == 1 ? 3 : 2, kKSteps == 1 ? kFitK1 : 2, kKSteps % 2 == 0 ? kDwGroups : 1,
                                  kKSteps == 1 ? kDeNK1 : 16, kKSteps <= 2 ? kDeM : 1,
                                  kKSteps == 1 ? kTileNK1 : kKSteps == 2 ? kTileN : 128>;
};
// The same knobs with 128-param tiles: what a wider-tiled tuning runs where its shared memory would
// cost blocks per SM (merge_backward_tc_shape).
template <class Knobs>
using MergeBackwardTcNarrow = MergeBackwardTcKnobs<Knobs::kMinBlocks, Knobs::kFitBlocks, Knobs::kDwGroups, Knobs::kDeN,
                                                   Knobs::kDeM, 128>;
// What lory::merge_backward runs: three blocks per SM at E <= 16, 16-expert d_weights units from
// E = 17 (the shared-memory model in tests/emu/test_smem_banks.cpp; measurements in docs/gpu-results.md).
using MergeBackwardTcDefault = MergeBackwardTcTuning<2, 1, 8, 1>;

// A backward tuning that runs the wgmma kernel (merge_backward_wgmma_kernel, sm_90a) instead of a set
// of mma.sync knobs says so with `static constexpr bool kWgmma = true;` (MergeBackwardWgmma in
// tests/common/merge_variants.cuh); lory::merge_backward never does.
template <class Tuning, class = void>
struct is_wgmma_tuning : std::false_type {};
template <class Tuning>
struct is_wgmma_tuning<Tuning, std::void_t<decltype(Tuning::kWgmma)>> : std::bool_constant<Tuning::kWgmma> {};

}  // namespace detail
LORY_NAMESPACE_END
