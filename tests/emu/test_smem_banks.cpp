// Shared-memory bank wavefronts of the tensor-core merge backward's main-loop accesses, counted
// from the same offset functions the kernel uses (MergeBackwardTcConfig, MergePartialLayout).
// The kernel at E = 32 is bound by shared-memory throughput (docs/gpu-results.md), so a layout
// change that adds a bank conflict is a slowdown no functional test sees; these tests fail on it.
//
// Model (sm_80 / sm_90): 32 banks of 4 bytes. A warp's 4-byte accesses are served together, 8-byte
// accesses per half-warp, 16-byte accesses (and ldmatrix's 8 row addresses per matrix) per
// quarter-warp; within one such phase, the wavefronts are the largest number of distinct 4-byte
// words that fall in one bank (lanes reading the same word share it).
#include "emu/cuda_emu.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <set>
#include <type_traits>
#include <vector>

#include "common/catch.hpp"
#include "common/merge_variants.cuh"
#include "lory/merge.cuh"

namespace {

namespace detail = lory::detail;

constexpr int kInactive = -1;

// addr: byte offset per lane (kInactive for a lane that does not access), width: bytes per lane.
int wavefronts(const std::array<int64_t, 32>& addr, int width) {
  const int phase = width <= 4 ? 32 : width == 8 ? 16 : 8;
  int total = 0;
  for (int p0 = 0; p0 < 32; p0 += phase) {
    std::array<std::set<int64_t>, 32> words;
    for (int lane = p0; lane < p0 + phase; ++lane) {
      if (addr[lane] == kInactive) continue;
      for (int b = 0; b < width; b += 4) {
        const int64_t word = (addr[lane] + b) / 4;
        words[word % 32].insert(word);
      }
    }
    size_t most = 0;
    for (const auto& w : words) most = std::max(most, w.size());
    total += static_cast<int>(most);
  }
  return total;
}

// The fewest wavefronts 32 lanes of `width` bytes can take (all active, no shared words).
constexpr int ideal(int width) { return 32 * width / 128; }

template <class F>
std::array<int64_t, 32> lanes(F&& byte_offset) {
  std::array<int64_t, 32> a{};
  for (int lane = 0; lane < 32; ++lane) a[lane] = byte_offset(lane);
  return a;
}

template <int kKSteps, class Knobs = typename detail::MergeBackwardTcDefault::template At<kKSteps>>
void check_backward_main_loop() {
  using Cfg = detail::MergeBackwardTcConfig<__nv_bfloat16, kKSteps, 4, Knobs>;
  constexpr int kElem = sizeof(__nv_bfloat16);
  CAPTURE(kKSteps, Cfg::kDwGroups, Cfg::kDeN, Cfg::kDeM);
  // cp.async of a G chunk's rows and stores of W-tile rows: 16 bytes per lane.
  for (int warp = 0; warp < Cfg::kWarps; ++warp)
    for (int j = 0; j < Cfg::kGVecs; ++j)
      CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::row_vec_offset(warp * 32 + lane + j * detail::kMergeThreads)) * kElem; }), 16) ==
            ideal(16));
  // The cp.async of a stage's split routing weights (hi and lo rows of 64 bytes): 16 bytes per lane.
  for (int j = 0; j < Cfg::kAVecs; ++j)
    for (int warp = 0; warp < Cfg::kWarps; ++warp) {
      if ((j * detail::kMergeThreads + warp * 32) >= 8 * Cfg::kEP) continue;
      CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::a_vec_offset(warp * 32 + lane + j * detail::kMergeThreads)) * kElem; }), 16) ==
            ideal(16));
    }
  // dW product: the transposed ldmatrix_x4 of G, and the ldmatrix_x4 of the hi and lo weights.
  for (int warp = 0; warp < Cfg::kWarps; ++warp)
    for (int ks = 0; ks < Cfg::kChunk / 16; ++ks)
      for (int np = 0; np < Cfg::kDwNp; ++np)
        CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::g_dw_offset(ks, warp, np, lane)) * kElem; }), 16) ==
              ideal(16));
  for (int ks = 0; ks < Cfg::kChunk / 16; ++ks)
    for (int mt = 0; mt < kKSteps; ++mt)
      for (int lo = 0; lo < 2; ++lo)
        CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::a_frag_offset(ks, mt, lane) + lo * Cfg::kALo) * kElem; }), 16) ==
              ideal(16));
  // d_weights product: ldmatrix_x4 of the W tile and of G.
  for (int kk = 0; kk < Cfg::kTileN / 16; ++kk) {
    for (int nt = 0; nt < Cfg::kEP / 8; ++nt)
      CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::w_de_offset(nt, kk, lane)) * kElem; }), 16) == ideal(16));
    for (int mt = 0; mt < Cfg::kChunk / 16; ++mt)
      CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::g_de_offset(mt, kk, lane)) * kElem; }), 16) == ideal(16));
  }
}

// The d_weights partial's float2 read-modify-write of one de unit (segments mt*16 + g + 8h of a
// chunk starting at s0, experts nt*8 + 2t and the next), worst case over the units of two chunks.
int worst_partial_update(int E, bool swizzle) {
  const auto layout = detail::MergePartialLayout::make(E, swizzle);
  int worst = 0;
  for (int64_t s0 = 0; s0 < 64; s0 += 32)
    for (int mt = 0; mt < 2; ++mt)
      for (int h = 0; h < 2; ++h)
        for (int nt = 0; nt * 8 < E; ++nt)
          worst = std::max(worst, wavefronts(lanes([&](int lane) {
                                               const int e = nt * 8 + 2 * (lane % 4);
                                               if (e + 1 >= E) return int64_t(kInactive);
                                               return layout.index(s0 + mt * 16 + lane / 4 + 8 * h, e) * 4;
                                             }),
                                             8));
  return worst;
}

// Shared-memory wavefronts of one main-loop step (a 32-segment chunk of a 128-param tile, E experts,
// dW and d_weights both wanted, on-chip partial), summed over the block's warps from the kernel's
// own offset functions and loop structure: the copies into the stage, the dW product's ldmatrix of
// G and of the split weights, the d_weights units' ldmatrix of G and W, and the partial's
// read-modify-write. (Per tile, not per step, and left out: the W tile's stores and the dW epilogue.)
struct StepWavefronts {
  int tile_n = 0;  // params per tile (the step's width)
  int copy = 0, dw_g = 0, dw_weights = 0, de_g = 0, de_w = 0, partial = 0;
  int total() const { return copy + dw_g + dw_weights + de_g + de_w + partial; }
  // Per 128 params of G (8 KiB at 32 segments), so that tile widths compare.
  int per_128() const { return total() * 128 / tile_n; }
};

template <int kKSteps, class Knobs>
StepWavefronts step_wavefronts(int E) {
  using Cfg = detail::MergeBackwardTcConfig<__nv_bfloat16, kKSteps, 4, Knobs>;
  constexpr int kElem = sizeof(__nv_bfloat16);
  constexpr int kThreads = detail::kMergeThreads;
  StepWavefronts w;
  w.tile_n = Cfg::kTileN;
  for (int warp = 0; warp < Cfg::kWarps; ++warp) {
    for (int j = 0; j < Cfg::kGVecs; ++j)
      w.copy += wavefronts(lanes([&](int lane) { return int64_t(Cfg::row_vec_offset(warp * 32 + lane + j * kThreads)) * kElem; }), 16);
    for (int j = 0; j < Cfg::kAVecs; ++j)
      w.copy += wavefronts(lanes([&](int lane) {
                             const int i = warp * 32 + lane + j * kThreads;
                             return i < 8 * Cfg::kEP ? int64_t(Cfg::a_vec_offset(i)) * kElem : int64_t(kInactive);
                           }),
                           16);
    for (int ks = 0; ks < Cfg::kChunk / 16; ++ks) {
      for (int np = 0; np < Cfg::kDwNp; ++np)
        w.dw_g += wavefronts(lanes([&](int lane) { return int64_t(Cfg::g_dw_offset(ks, warp, np, lane)) * kElem; }), 16);
      for (int ml = 0; ml < Cfg::kDwMt; ++ml)
        for (int lo = 0; lo < 2; ++lo)
          w.dw_weights += wavefronts(lanes([&](int lane) {
                                       return int64_t(Cfg::a_frag_offset(ks, Cfg::dw_group(warp) * Cfg::kDwMt + ml, lane) +
                                                      lo * Cfg::kALo) * kElem;
                                     }),
                                     16);
    }
  }
  const auto layout = detail::MergePartialLayout::make(E, true);
  for (int u = 0; u < Cfg::kDeUnits; ++u) {
    const int mt0 = (u % Cfg::kDeMGroups) * Cfg::kDeM, nu = u / Cfg::kDeMGroups;
    if (nu * Cfg::kDeN >= E) continue;
    const int halves = std::min((E - nu * Cfg::kDeN + 7) / 8, Cfg::kDeHalves);
    for (int kk = 0; kk < Cfg::kTileN / 16; ++kk) {
      for (int m = 0; m < Cfg::kDeM; ++m)
        w.de_g += wavefronts(lanes([&](int lane) { return int64_t(Cfg::g_de_offset(mt0 + m, kk, lane)) * kElem; }), 16);
      // One ldmatrix_x4 of W per half covers two k16 steps.
      if (kk % 2 == 0)
        for (int hn = 0; hn < halves; ++hn)
          w.de_w += wavefronts(lanes([&](int lane) { return int64_t(Cfg::w_de_offset(nu * Cfg::kDeHalves + hn, kk, lane)) * kElem; }), 16);
    }
    for (int m = 0; m < Cfg::kDeM; ++m)
      for (int h = 0; h < 2; ++h)
        for (int hn = 0; hn < halves; ++hn)
          w.partial += 2 * wavefronts(lanes([&](int lane) {
                                        const int e = (nu * Cfg::kDeHalves + hn) * 8 + 2 * (lane % 4);
                                        if (e + 1 >= E) return int64_t(kInactive);
                                        return layout.index((mt0 + m) * 16 + lane / 4 + 8 * h, e) * 4;
                                      }),
                                      8);
  }
  return w;
}

template <class Tuning, int kKSteps>
int step_total(int E) {
  return step_wavefronts<kKSteps, typename Tuning::template At<kKSteps>>(E).per_128();
}

}  // namespace

TEST_CASE("smem banks: the merge backward's main-loop accesses take the fewest wavefronts", "[banks][merge]") {
  check_backward_main_loop<1>();
  check_backward_main_loop<2>();
  check_backward_main_loop<3>();
  check_backward_main_loop<4>();
  detail::for_each_merge_backward_tc_variant([](auto tag) {
    using V = typename decltype(tag)::type;
    CAPTURE(V::kName);
    check_backward_main_loop<1, typename V::template At<1>>();
    check_backward_main_loop<2, typename V::template At<2>>();
    check_backward_main_loop<3, typename V::template At<3>>();
    check_backward_main_loop<4, typename V::template At<4>>();
  });
}

TEST_CASE("smem model: wavefronts per step of the tensor-core backward and its variants", "[banks][merge]") {
  using Default = detail::MergeBackwardTcDefault;
  const auto d32 = step_wavefronts<2, Default::At<2>>(32);
  std::printf("smem model, wavefronts per step (32 segments x tile params; copy + dW G + dW weights + de G + de W + "
              "partial = total; per 128 params)\n");
  auto row = [](const char* name, int E, const StepWavefronts& w) {
    std::printf("  %-14s E = %2d, tile %3d: %3d + %3d + %3d + %3d + %3d + %3d = %4d; %4d\n", name, E, w.tile_n, w.copy,
                w.dw_g, w.dw_weights, w.de_g, w.de_w, w.partial, w.total(), w.per_128());
  };
  auto rows = [&](const char* name, auto tag) {
    using V = typename decltype(tag)::type;
    row(name, 8, step_wavefronts<1, typename V::template At<1>>(8));
    row(name, 16, step_wavefronts<1, typename V::template At<1>>(16));
    row(name, 32, step_wavefronts<2, typename V::template At<2>>(32));
    row(name, 64, step_wavefronts<4, typename V::template At<4>>(64));
  };
  rows("default", detail::TypeTag<Default>{});
  detail::for_each_merge_backward_tc_variant([&](auto tag) { rows(decltype(tag)::type::kName, tag); });
  // The default at E = 32, term by term (docs/gpu-results.md quotes these).
  CHECK(d32.copy == 96);
  CHECK(d32.dw_g == 64);
  CHECK(d32.dw_weights == 256);
  CHECK(d32.de_g + d32.de_w == 256);
  CHECK(d32.partial == 64);
  // Each variant that targets the shared-memory traffic at E = 32 and 64 takes less than the default.
  CHECK(step_total<detail::MergeBackwardTcVariantDw2x4, 2>(32) < d32.total());
  CHECK(step_total<detail::MergeBackwardTcVariantDe32, 2>(32) < d32.total());
  CHECK(step_total<detail::MergeBackwardTcVariantDw2x4De32, 2>(32) < step_total<detail::MergeBackwardTcVariantDw2x4, 2>(32));
  CHECK(step_total<detail::MergeBackwardTcVariantDw2x4, 4>(64) < step_total<Default, 4>(64));
  CHECK(step_total<detail::MergeBackwardTcVariantTile256, 2>(32) < d32.total());
  CHECK(step_total<detail::MergeBackwardTcVariantTile256, 2>(32) < step_total<detail::MergeBackwardTcVariantDw2x4De32, 2>(32));
  CHECK(step_total<detail::MergeBackwardTcVariantK1Tile256, 1>(8) < step_total<Default, 1>(8));
  CHECK(step_total<detail::MergeBackwardTcVariantK1Tile256, 1>(16) < step_total<Default, 1>(16));
}

namespace {
// The wgmma backward (MergeBackwardWgmmaConfig): its regions are core matrices laid out so that
// 16-byte vector i sits at element 8 i, which core_elem must agree with; its own shared-memory
// accesses (the wgmmas read through the async proxy, outside this model) take the fewest wavefronts.
template <int kKSteps>
void check_wgmma_backward() {
  using Cfg = detail::MergeBackwardWgmmaConfig<__nv_bfloat16, kKSteps, 4>;
  constexpr int kElem = sizeof(__nv_bfloat16);
  CAPTURE(kKSteps);
  // Vector i of the G chunk, the W tile and each split-weight block: element 8 i.
  for (int i = 0; i < Cfg::kChunk * Cfg::kTileN / 8; ++i)
    REQUIRE(Cfg::core_elem(Cfg::g_vec_row(i), Cfg::g_vec_col(i), Cfg::kTileN) == 8 * i);
  for (int i = 0; i < Cfg::kEP * Cfg::kTileN / 8; ++i)
    REQUIRE(Cfg::core_elem(Cfg::w_vec_row(i), Cfg::w_vec_col(i), Cfg::kTileN) == 8 * i);
  for (int i = 0; i < Cfg::kAVecCount; ++i)
    REQUIRE(Cfg::a_vec_is_lo(i) * Cfg::kEP * Cfg::kChunk + Cfg::core_elem(Cfg::a_vec_row(i), Cfg::a_vec_seg(i), Cfg::kChunk) ==
            8 * i);
  // A thread's G vectors: one column, rows kGPassRows apart, kGSmemStep elements apart.
  for (int tid = 0; tid < detail::kMergeThreads; ++tid)
    for (int j = 0; j < Cfg::kGVecs; ++j) {
      const int i = tid + j * detail::kMergeThreads;
      REQUIRE(Cfg::g_vec_row(i) == Cfg::g_vec_row(tid) + j * Cfg::kGPassRows);
      REQUIRE(Cfg::g_vec_col(i) == Cfg::g_vec_col(tid));
      REQUIRE(Cfg::g_vec_offset(i) == Cfg::g_vec_offset(tid) + j * Cfg::kGSmemStep);
    }
  // cp.async and W-tile stores: 16 bytes per lane at element 8 i.
  CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::g_vec_offset(lane)) * kElem; }), 16) == ideal(16));
  // dW's A: the transposed ldmatrix_x4 of G, each matrix one core matrix.
  for (int wg = 0; wg < 2; ++wg)
    for (int wq = 0; wq < 4; ++wq)
      for (int ks = 0; ks < Cfg::kChunk / 16; ++ks)
        CHECK(wavefronts(lanes([&](int lane) { return int64_t(Cfg::g_dw_offset(ks, wg, wq, lane)) * kElem; }), 16) ==
              ideal(16));
  // The dW epilogue's staging: scalar stores of (expert 8 jj + 2 t + q, param g + 8 h), then each lane
  // reads 8 floats of one expert row.
  for (int jj = 0; jj < 2; ++jj)
    for (int h = 0; h < 2; ++h)
      for (int q = 0; q < 2; ++q)
        CHECK(wavefronts(lanes([&](int lane) {
                           return int64_t((8 * jj + 2 * (lane % 4) + q) * Cfg::kStageRow + lane / 4 + 8 * h) * 4;
                         }),
                         4) == ideal(4));
}
}  // namespace

TEST_CASE("smem banks: the wgmma backward's layout and its own accesses", "[banks][merge]") {
  check_wgmma_backward<1>();
  check_wgmma_backward<2>();
  check_wgmma_backward<3>();
  check_wgmma_backward<4>();
}

TEST_CASE("smem banks: the on-chip d_weights partial's updates", "[banks][merge]") {
  // Swizzled, every even E takes the fewest wavefronts (2 per float2 access).
  for (int E = 2; E <= 64; E += 2) {
    CAPTURE(E);
    CHECK(worst_partial_update(E, true) == ideal(8));
  }
  // Plain rows of 32 floats conflict 4-way per half-warp (8 wavefronts), rows of 16 floats 2-way,
  // and rows off a multiple of 8 (30, 34) up to 4-way: the cases the layout exists for.
  CHECK(worst_partial_update(32, false) == 8);
  CHECK(worst_partial_update(64, false) == 8);
  CHECK(worst_partial_update(16, false) == 4);
  CHECK(worst_partial_update(30, false) == 8);
  CHECK(worst_partial_update(34, false) == 8);
}

TEST_CASE("smem banks: the swizzled partial is a permutation within each padded row", "[banks][merge]") {
  for (int E = 1; E <= 64; ++E) {
    CAPTURE(E);
    const auto layout = detail::MergePartialLayout::make(E, true);
    CHECK(layout.stride >= E);
    CHECK(layout.stride < E + 8);
    CHECK(layout.size(3) == 3 * int64_t(layout.stride));
    bool inside = true;
    for (int64_t s = 0; s < 8; ++s) {
      std::set<int64_t> seen;
      for (int e = 0; e < E; ++e) {
        const int64_t i = layout.index(s, e);
        inside = inside && i >= s * layout.stride && i < (s + 1) * layout.stride;
        seen.insert(i);
      }
      CHECK(seen.size() == static_cast<size_t>(E));
    }
    CHECK(inside);
    // The plain layout is the identity.
    const auto plain = detail::MergePartialLayout::make(E, false);
    CHECK(plain.plain());
    CHECK(plain.index(5, E - 1) == 5 * int64_t(E) + E - 1);
  }
}

namespace {
// Blocks of the tensor-core backward that fit on one sm_90 SM by shared memory (228 KiB, 1 KiB
// reserved per block) with the stage count the launcher picks for (S, E).
template <int kKSteps, class Tuning = detail::MergeBackwardTcDefault>
int blocks_per_sm(int64_t S, int E) {
  const bool on_chip = detail::merge_backward_partial_fits(S, E, true);
  const size_t smem =
      detail::merge_backward_tc_shape<__nv_bfloat16, kKSteps, typename Tuning::template At<kKSteps>>(S, E, on_chip).smem;
  return static_cast<int>((228 * 1024) / (smem + 1024));
}
}  // namespace

TEST_CASE("smem capacity: the tensor-core backward keeps its blocks per SM at the paper's shapes",
          "[banks][merge]") {
  // Registers allow three blocks per SM for E <= 16 and two above (__launch_bounds__); shared
  // memory must not take that away where it was planned (a layout change that adds a few KiB can
  // silently halve the blocks of a shape; this fails instead).
  CHECK(blocks_per_sm<1>(128, 8) >= 3);
  CHECK(blocks_per_sm<1>(512, 8) >= 3);
  CHECK(blocks_per_sm<1>(128, 16) >= 3);
  CHECK(blocks_per_sm<1>(512, 16) >= 2);  // four stages, two blocks
  CHECK(blocks_per_sm<2>(128, 32) >= 2);
  CHECK(blocks_per_sm<2>(512, 32) >= 2);  // two stages
  CHECK(blocks_per_sm<4>(128, 64) >= 2);  // two stages
  CHECK(blocks_per_sm<4>(512, 64) >= 2);  // partial in the workspace, four stages
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 2>(512, 32, true).stages == 2);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 2>(128, 32, true).stages == 4);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 4>(128, 64, true).stages == 2);
  // The k1-fit3 variant keeps three blocks at E = 16, S = 512 with two stages.
  using Fit3 = detail::MergeBackwardTcVariantK1Fit3;
  CHECK(blocks_per_sm<1, Fit3>(512, 16) >= 3);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 1, Fit3::At<1>>(512, 16, true).stages == 2);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 1, Fit3::At<1>>(128, 8, true).stages == 4);
  // The 256-param tiles at E = 32: S = 128 keeps them (two stages), S = 512 falls back to 128.
  using Wide = detail::MergeBackwardTcVariantTile256::At<2>;
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 2, Wide>(128, 32, true).tile_n == 256);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 2, Wide>(128, 32, true).stages == 2);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 2, Wide>(512, 32, true).tile_n == 128);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 2, Wide>(512, 32, false).tile_n == 256);
  // The 256-param tiles at E <= 16 keep three blocks per SM with two stages; at E = 16, S = 512 the
  // 32 KiB on-chip partial leaves no room for them, and they fall back to 128 params.
  using K1Wide = detail::MergeBackwardTcVariantK1Tile256;
  for (int E : {8, 16})
    for (int64_t S : {128, 512}) {
      CAPTURE(E, S);
      CHECK(blocks_per_sm<1, K1Wide>(S, E) >= 3);
      const auto shape = detail::merge_backward_tc_shape<__nv_bfloat16, 1, K1Wide::At<1>>(S, E, true);
      CHECK(shape.tile_n == (E == 16 && S == 512 ? 128 : 256));
      CHECK(shape.stages == 2);
    }
  // The wgmma kernel: two blocks per SM at the paper's shapes up to E = 32, but for S = 512 at E = 32,
  // where the 64 KiB on-chip partial leaves room for one (with four stages).
  auto wgmma_blocks = [](auto ksteps, int64_t S, int E) {
    constexpr int kKSteps = decltype(ksteps)::value;
    const auto shape = detail::merge_backward_wgmma_shape<__nv_bfloat16, kKSteps>(
        S, E, detail::merge_backward_partial_fits(S, E, true));
    return static_cast<int>((228 * 1024) / (shape.smem + 1024));
  };
  using K1 = std::integral_constant<int, 1>;
  using K2 = std::integral_constant<int, 2>;
  CHECK(wgmma_blocks(K1{}, 128, 8) >= 2);
  CHECK(wgmma_blocks(K1{}, 512, 8) >= 2);
  CHECK(wgmma_blocks(K1{}, 128, 16) >= 2);
  CHECK(wgmma_blocks(K1{}, 512, 16) >= 2);
  CHECK(wgmma_blocks(K2{}, 128, 32) >= 2);
  CHECK(wgmma_blocks(K2{}, 512, 32) == 1);
  CHECK(detail::merge_backward_wgmma_shape<__nv_bfloat16, 2>(512, 32, true).stages == 4);
  CHECK(detail::merge_backward_wgmma_shape<__nv_bfloat16, 2>(128, 32, true).stages == 3);
  // Every variant keeps the default's blocks per SM at the paper's shapes.
  detail::for_each_merge_backward_tc_variant([](auto tag) {
    using V = typename decltype(tag)::type;
    CAPTURE(V::kName);
    CHECK(blocks_per_sm<2, V>(128, 32) >= 2);
    CHECK(blocks_per_sm<2, V>(512, 32) >= 2);
    CHECK(blocks_per_sm<4, V>(128, 64) >= 2);
    CHECK(blocks_per_sm<1, V>(128, 8) >= 3);
  });
}

namespace {
// Every (S, E) with E in kKSteps' range: the shapes the launchers pick fit one block of the device.
template <int kKSteps, class Tuning = detail::MergeBackwardTcDefault>
void check_shapes_fit(const detail::MergeSmemLimits& limits, bool wgmma) {
  for (int E = 16 * (kKSteps - 1) + 1; E <= 16 * kKSteps; ++E)
    for (int64_t S : {1, 33, 64, 128, 200, 256, 400, 512, 600, 4096}) {
      CAPTURE(E, S, limits.per_block);
      const bool on_chip = detail::merge_backward_partial_fits(S, E, true);
      const auto tc = detail::merge_backward_tc_shape<__nv_bfloat16, kKSteps, typename Tuning::template At<kKSteps>>(
          S, E, on_chip, limits);
      CHECK(tc.smem <= limits.per_block);
      if (wgmma) CHECK(detail::merge_backward_wgmma_shape<__nv_bfloat16, kKSteps>(S, E, on_chip, limits).smem <= limits.per_block);
    }
}
template <class Tuning = detail::MergeBackwardTcDefault>
void check_all_shapes_fit(const detail::MergeSmemLimits& limits, bool wgmma) {
  check_shapes_fit<1, Tuning>(limits, wgmma);
  check_shapes_fit<2, Tuning>(limits, wgmma);
  check_shapes_fit<3, Tuning>(limits, wgmma);
  check_shapes_fit<4, Tuning>(limits, wgmma);
}
}  // namespace

// The shapes are chosen against the device's limits: an sm_80 gives a block 163 KiB, an sm_90
// 227 KiB. (Before, they were chosen against an sm_90's only, and E = 64 with a 64 KiB partial on
// chip asked an sm_80 for 167 KiB: the launch failed.)
TEST_CASE("smem capacity: every shape the launchers pick fits one block of an sm_80 and of an sm_90",
          "[banks][merge]") {
  const detail::MergeSmemLimits sm80{166912, 167936 - 4096};
  check_all_shapes_fit(sm80, false);
  check_all_shapes_fit(detail::kMergeSm90SmemLimits, true);
  detail::for_each_merge_backward_tc_variant([&](auto tag) {
    using V = typename decltype(tag)::type;
    CAPTURE(V::kName);
    check_all_shapes_fit<V>(sm80, false);
    check_all_shapes_fit<V>(detail::kMergeSm90SmemLimits, false);
  });
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 4>(256, 64, true, sm80).stages == 2);
  CHECK(detail::merge_backward_tc_shape<__nv_bfloat16, 4>(256, 64, true).stages == 4);
}

namespace {
// Blocks of the tensor-core forward an sm_90 holds at (S, E), by shared memory: the slice the
// launcher picks (merge_forward_slices with the tuning's weights budget) for P-tiles enough to fill
// the device, as at the paper's shapes.
template <int kKSteps, class Tuning>
int forward_blocks_per_sm(int64_t S) {
  using Cfg = detail::MergeForwardTcConfig<__nv_bfloat16, kKSteps, typename Tuning::template At<kKSteps>>;
  int64_t segs = 0, slices = 0;
  detail::merge_forward_slices(S, 1 << 16, Cfg::kRowsPerPass, Cfg::max_rows(detail::kMergeSm90SmemLimits), segs, slices);
  return static_cast<int>(detail::kMergeSm90SmemLimits.per_sm / (Cfg::smem_bytes(segs) + 1024));
}
}  // namespace

TEST_CASE("smem capacity: the tensor-core forward keeps its blocks per SM at the paper's shapes", "[banks][merge]") {
  // Registers allow two blocks per SM up to E = 32 (__launch_bounds__): shared memory must not
  // take one away; the k1-3blocks variant is there for a third at E <= 16.
  using Default = detail::MergeForwardTcDefault;
  for (int64_t S : {128, 512}) {
    CAPTURE(S);
    CHECK(forward_blocks_per_sm<1, Default>(S) >= 2);
    CHECK(forward_blocks_per_sm<2, Default>(S) >= 2);
    CHECK(forward_blocks_per_sm<1, detail::MergeForwardTcVariantK1Blocks3>(S) >= 3);
    CHECK(forward_blocks_per_sm<1, detail::MergeForwardTcVariantTile512>(S) >= 2);
    CHECK(forward_blocks_per_sm<2, detail::MergeForwardTcVariantTile512>(S) >= (S == 128 ? 2 : 1));
  }
}
