// lory (private), merge layer "kernel": the backward on tensor cores (mma.sync m16n8k16, bf16 / fp16,
// E <= 64, 16-byte aligned views): its shape under a tuning's knobs (MergeBackwardTcConfig) and
// merge_backward_tc_kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/merge/backward_pipeline.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge_mma.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------
// Backward, tensor cores (bf16 / fp16 storage, E <= 64, 16-byte aligned views).
//
// Block tile: N = 128 params (kTileN; 256 in some variants) x all experts (K
// padded to EP = 16 * kKSteps). The block's steps -- (tile, chunk of 32
// segments) pairs over all its tiles -- run through a kStages-deep cp.async
// pipeline: each stage holds a chunk of G rows and the chunk's routing weights
// (hi and lo), and kStages - 1 steps are in flight while one is computed. Per step:
//   dW  [EP x N] += e^T [EP x 32] . G [32 x N]  (M = experts, N = params,
//       K = segments). By default warp w owns params 16w..16w+15 for all experts
//       (kDwGroups: or 32 params of half the experts); the fp32 accumulators stay
//       in registers over all of S and are written once per tile.
//       The routing weights enter as hi + lo 16-bit operands (two mmas): split
//       and transposed to e^T once per launch (merge_backward_split_weights_kernel),
//       so each warp loads its A fragments with ldmatrix (before: 8 scalar loads
//       and 4 conversions per fragment, in every warp).
//   de  [32 x EP] = G [32 x N] . W^T [N x EP]   (M = segments, N = experts,
//       K = params). Unit (kDeM m16 tiles x kDeN experts) u goes to warp u % 8,
//       which runs the whole K of the tile: every (segment, expert) of the partial
//       has one owner thread, so it is added without atomics and in a fixed order.
// The W tile of the block's next tile travels in registers during the current tile.
// Padding: segments past S and params past P are zero in G and in the weights,
// experts past E are zero in W and in the weights, so no 0 * garbage (NaN) is ever
// summed into a stored value.
// ---------------------------------------------------------------------------
template <class T, int kKSteps, int kStagesT = 4, class Knobs = typename MergeBackwardTcDefault::template At<kKSteps>>
struct MergeBackwardTcConfig {
  static constexpr int kTileN = Knobs::kTileN;
  static constexpr int kChunk = kMergeBackwardTcChunk;  // segments per step (K of the dW product)
  static constexpr int kStages = kStagesT;  // pipeline depth (steps resident in shared memory)
  static constexpr int kEP = 16 * kKSteps;
  static constexpr int kWarps = kMergeThreads / 32;
  // dW warp layout: kDwGroups expert groups x (kWarps / kDwGroups) param slices of kWarpN.
  static constexpr int kDwGroups = Knobs::kDwGroups;
  static_assert(kKSteps % kDwGroups == 0, "the dW expert groups split the m-tiles evenly");
  static constexpr int kDwMt = kKSteps / kDwGroups;           // expert m-tiles per warp
  static constexpr int kWarpN = kTileN * kDwGroups / kWarps;  // params per warp for dW: 16, 32 or 64
  static constexpr int kDwNp = kWarpN / 16;                   // 16-param column pairs per warp
  LORY_HOST_DEVICE static constexpr int dw_group(int warp) { return warp / (kWarps / kDwGroups); }
  LORY_HOST_DEVICE static constexpr int dw_col(int warp) { return (warp % (kWarps / kDwGroups)) * kWarpN; }
  // d_weights units: kDeM x 16 segments x kDeN experts over the whole tile (Knobs). Unit u is
  // m-tile group u % kDeMGroups, expert group u / kDeMGroups, and goes to warp u % kWarps.
  static constexpr int kDeHalves = Knobs::kDeN / 8;
  static constexpr int kDeN = Knobs::kDeN;
  static constexpr int kDeM = Knobs::kDeM;
  static constexpr int kDeMGroups = kChunk / 16 / kDeM;
  static constexpr int kDeUnits = kDeMGroups * ((kEP + kDeN - 1) / kDeN);
  static constexpr int kDeUnitsPerWarp = (kDeUnits + kWarps - 1) / kWarps;
  // Row strides padded by 16 bytes: the 8 rows of an ldmatrix fall in 8 different bank groups.
  static constexpr int kRow = kTileN + 8;       // W tile and G chunk rows
  // A stage's routing weights: e^T [kEP experts][kChunk segments] as the hi and the lo operand
  // (split once per launch by merge_backward_split_weights_kernel), rows of 80 bytes: the 8 rows of
  // an ldmatrix fall in 8 different bank groups. The lo block starts 64 bytes (mod 128) after the
  // hi block, so that a quarter-warp's cp.async of hi row r and lo row r hits 32 different banks.
  static constexpr int kARow = kChunk + 8;
  static constexpr int kALo = kEP * kARow + 32;  // elements from the hi block to the lo block
  static constexpr int kAVecCount = 8 * kEP;  // split-weight vectors per step (hi and lo)
  static constexpr int kAVecs = (kAVecCount + kMergeThreads - 1) / kMergeThreads;  // per thread
  static constexpr int kStageRow = 16 + 4;  // fp32 staging of a 16 x 16 dW block (one column pair at a time)
  static constexpr int kGVecs = kChunk * kTileN / 8 / kMergeThreads;  // G vectors per thread per step
  static constexpr int kWVecs = kEP * kTileN / 8 / kMergeThreads;     // W tile vectors per thread
  static constexpr size_t kWBytes = size_t(kEP) * kRow * sizeof(T);
  static constexpr size_t kGBytes = size_t(kChunk) * kRow * sizeof(T);          // per stage
  static constexpr size_t kABytes = size_t(kALo + kEP * kARow) * sizeof(T);     // per stage
  static constexpr size_t kStageBytes = size_t(kWarps) * 16 * kStageRow * sizeof(float);
  static constexpr size_t kFixedBytes = kWBytes + kStages * (kGBytes + kABytes) + kStageBytes;
  static size_t smem_bytes(int64_t S, int E, bool partial_in_smem) {
    return kFixedBytes + (partial_in_smem ? size_t(MergePartialLayout::make(E, true).size(S)) * sizeof(float) : 0);
  }
  // Shared-memory offsets (in elements) of the main loop's accesses, per lane. The kernel and
  // tests/emu/test_smem_banks.cpp (which counts their bank wavefronts) both use these.
  // Row vector i (16 bytes) of a G chunk or W tile: cp.async and W-tile stores.
  LORY_HOST_DEVICE static constexpr int row_vec_offset(int i) { return (i / (kTileN / 8)) * kRow + (i % (kTileN / 8)) * 8; }
  // Vector i (16 bytes, 8 segments) of a stage's split weights: expert row i / 8, the lo block
  // when (i / 4) % 2, segments 8 (i % 4) on. A quarter-warp copies hi row r and lo row r.
  LORY_HOST_DEVICE static constexpr int a_vec_row(int i) { return i / 8; }
  LORY_HOST_DEVICE static constexpr int a_vec_is_lo(int i) { return (i / 4) % 2; }
  LORY_HOST_DEVICE static constexpr int a_vec_seg(int i) { return (i % 4) * 8; }
  LORY_HOST_DEVICE static constexpr int a_vec_offset(int i) {
    return a_vec_row(i) * kARow + a_vec_is_lo(i) * kALo + a_vec_seg(i);
  }
  // dW, B operand: row address of lane's 8 params for the transposed ldmatrix_x4 of G (k-step ks,
  // the warp's 16-param column pair np).
  LORY_HOST_DEVICE static constexpr int g_dw_offset(int ks, int warp, int np, int lane) {
    return (ks * 16 + ((lane / 8) & 1) * 8 + lane % 8) * kRow + dw_col(warp) + np * 16 + (lane / 16) * 8;
  }
  // dW, A operand: row address for the ldmatrix_x4 of the hi weights (experts mt*16..,
  // segments ks*16..); the lo operand is kALo further.
  LORY_HOST_DEVICE static constexpr int a_frag_offset(int ks, int mt, int lane) {
    return (mt * 16 + lane % 16) * kARow + ks * 16 + (lane / 16) * 8;
  }
  // de, B operand: row address for the ldmatrix_x4 of the W tile (experts nt*8.., params kk*16..).
  LORY_HOST_DEVICE static constexpr int w_de_offset(int nt, int kk, int lane) {
    return (nt * 8 + lane % 8) * kRow + kk * 16 + (lane / 8) * 8;
  }
  // de, A operand: row address for the ldmatrix_x4 of G (segments mt*16.., params kk*16..).
  LORY_HOST_DEVICE static constexpr int g_de_offset(int mt, int kk, int lane) {
    return (mt * 16 + lane % 16) * kRow + kk * 16 + (lane / 16) * 8;
  }
  // Where the copy side (MergeBackwardCopier) puts each 16-byte vector of a step and of a W tile:
  // thread i copies G row g_vec_row(i) + j kGPassRows, params g_vec_col(i).., to g_vec_offset(i) +
  // j kGSmemStep (j < kGVecs); W tile vector i is expert row w_vec_row(i), params w_vec_col(i)..
  static constexpr int kGPassRows = kMergeThreads / (kTileN / 8);
  static constexpr int kGSmemStep = kGPassRows * kRow;
  LORY_HOST_DEVICE static constexpr int g_vec_row(int i) { return i / (kTileN / 8); }
  LORY_HOST_DEVICE static constexpr int g_vec_col(int i) { return (i % (kTileN / 8)) * 8; }
  LORY_HOST_DEVICE static constexpr int g_vec_offset(int i) { return row_vec_offset(i); }
  LORY_HOST_DEVICE static constexpr int w_vec_row(int i) { return i / (kTileN / 8); }
  LORY_HOST_DEVICE static constexpr int w_vec_col(int i) { return (i % (kTileN / 8)) * 8; }
  LORY_HOST_DEVICE static constexpr int w_vec_offset(int i) { return row_vec_offset(i); }
  static constexpr int kGStageElems = kChunk * kRow;
  static constexpr int kAStageElems = int(kABytes / sizeof(T));
  static_assert(kGVecs * kMergeThreads * 8 == kChunk * kTileN, "G chunk split evenly over the threads");
  static_assert(kWVecs * kMergeThreads * 8 == kEP * kTileN, "W tile split evenly over the threads");
  static_assert(kFixedBytes % 16 == 0 && kWBytes % 16 == 0 && kGBytes % 16 == 0 && kABytes % 16 == 0,
                "16-byte aligned shared-memory regions");
};

#if LORY_HAS_DEVICE_CODE
template <class T, int kKSteps, int kStages, class Knobs>
// Knobs::kMinBlocks blocks per SM by registers: by default three (<= 80 registers) up to E = 16 and
// two (<= 128) above. E = 64 fits in 128 registers without spills because the weights are split once
// per launch.
LORY_KERNEL void __launch_bounds__(kMergeThreads, Knobs::kMinBlocks) merge_backward_tc_kernel(const MergeBackwardParams<T> p) {
#if LORY_MMA_AVAILABLE
  using Cfg = MergeBackwardTcConfig<T, kKSteps, kStages, Knobs>;
  constexpr int kChunk = Cfg::kChunk, kTileN = Cfg::kTileN;
  constexpr int kStageRow = Cfg::kStageRow;
  constexpr int V = Vec16<T>::kSize;  // 8
  LORY_DYNAMIC_SMEM(merge_smem);
  // W tile [kEP][kRow]; G chunks [kStages][kChunk][kRow]; split weights [kStages]: hi, lo
  // [kEP][kARow]; staging [16][kStageRow] per warp.
  const MergeBackwardSmem<T, Cfg> sm(merge_smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int E = p.E;
  const bool want_dw = p.dW != nullptr;
  const int64_t chunks = (p.S + kChunk - 1) / kChunk;
  const MergeBackwardPartial<T> partial(p, sm.partial, g);

  MergeBackwardCopier<T, Cfg> copier(p, sm.g, sm.a, chunks);
  if (p.want_de && blockIdx.x < p.tiles) copier.fetch_w(blockIdx.x);
#pragma unroll 1
  for (int k = 0; k < kStages - 1; ++k) copier.issue();

  constexpr int kDwMt = Cfg::kDwMt, kDwNt = 2 * Cfg::kDwNp;
  float acc[kDwMt][kDwNt][4] = {};  // dW: [expert m-tile of this warp][param n-tile of this warp][fragment], reset per tile
  const int dw_mt0 = Cfg::dw_group(warp) * kDwMt;  // the warp's first expert m-tile
  MergeBackwardStep step;  // the step being computed
#pragma unroll 1
  while (step.tile < p.tiles) {
    const int64_t tile_col = step.tile * kTileN;
    const int64_t s0 = step.chunk * kChunk;
    if (step.chunk == 0) {
#pragma unroll
      for (int ml = 0; ml < kDwMt; ++ml)
#pragma unroll
        for (int nt = 0; nt < kDwNt; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[ml][nt][i] = 0.f;
      if (p.want_de) {
        __syncthreads();  // the previous tile's readers of w_s are done
        copier.store_w(sm.w);
        if (step.tile + gridDim.x < p.tiles) copier.fetch_w(step.tile + gridDim.x);  // in flight for a whole tile
      }
    }
    cp_async_wait<kStages - 2>();  // this thread's copies of this step have landed
    __syncthreads();  // everyone's have (and w_s); every thread is done with the previous step's stage
    copier.issue();                // refills the stage the previous step used
    const T* gs = sm.g + step.stage * Cfg::kGStageElems;
    const T* as = sm.a + step.stage * Cfg::kAStageElems;

    if (want_dw) {
#pragma unroll
      for (int ks = 0; ks < kChunk / 16; ++ks) {
        // B = G chunk [K = segments][N = params], row-major: transposed ldmatrix.
        uint32_t b[kDwNt][2];
#pragma unroll
        for (int np = 0; np < Cfg::kDwNp; ++np) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, gs + Cfg::g_dw_offset(ks, warp, np, lane));
          b[2 * np][0] = r[0], b[2 * np][1] = r[1], b[2 * np + 1][0] = r[2], b[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int ml = 0; ml < kDwMt; ++ml) {
          // A = e^T [M = experts][K = segments], row-major, as hi and lo operands.
          uint32_t ah[4], al[4];
          ldmatrix_x4(ah, as + Cfg::a_frag_offset(ks, dw_mt0 + ml, lane));
          ldmatrix_x4(al, as + Cfg::a_frag_offset(ks, dw_mt0 + ml, lane) + Cfg::kALo);
#pragma unroll
          for (int nt = 0; nt < kDwNt; ++nt) {
            mma_16816<T>(acc[ml][nt], al, b[nt]);
            mma_16816<T>(acc[ml][nt], ah, b[nt]);
          }
        }
      }
    }
    if (p.want_de) {
#pragma unroll
      for (int j = 0; j < Cfg::kDeUnitsPerWarp; ++j) {
        constexpr int kHalves = Cfg::kDeHalves, kDeM = Cfg::kDeM;
        const int u = warp + j * Cfg::kWarps;
        const int mt0 = (u % Cfg::kDeMGroups) * kDeM, nu = u / Cfg::kDeMGroups;
        // Warp-uniform: skip units wholly past E or past the chunk's last segment, and a unit's
        // second n8 half when it is past E. (An m-tile of the unit past S reads zero rows of the
        // chunk; its results are not added.)
        if (u >= Cfg::kDeUnits || nu * Cfg::kDeN >= E || s0 + mt0 * 16 >= p.S) continue;
        const int halves = (E - nu * Cfg::kDeN + 7) / 8 < kHalves ? (E - nu * Cfg::kDeN + 7) / 8 : kHalves;
        float c[kDeM][kHalves][4] = {};
#pragma unroll
        for (int kk = 0; kk < kTileN / 16; kk += 2) {
          // A = G chunk [M = segments][K = params], row-major.
          uint32_t a[kDeM][2][4];
#pragma unroll
          for (int m = 0; m < kDeM; ++m) {
            ldmatrix_x4(a[m][0], gs + Cfg::g_de_offset(mt0 + m, kk, lane));
            ldmatrix_x4(a[m][1], gs + Cfg::g_de_offset(mt0 + m, kk + 1, lane));
          }
#pragma unroll
          for (int hn = 0; hn < kHalves; ++hn) {
            if (hn < halves) {
              // B = W^T [K = params][N = experts]: W [experts][params] row-major is the "col" layout.
              uint32_t rb[4];
              ldmatrix_x4(rb, sm.w + Cfg::w_de_offset(nu * kHalves + hn, kk, lane));
              const uint32_t b0[2] = {rb[0], rb[1]}, b1[2] = {rb[2], rb[3]};
#pragma unroll
              for (int m = 0; m < kDeM; ++m) {
                mma_16816<T>(c[m][hn], a[m][0], b0);
                mma_16816<T>(c[m][hn], a[m][1], b1);
              }
            }
          }
        }
        // c0, c1: (segment g, experts 2t, 2t+1); c2, c3: segment g + 8. One owner per element.
        // Rows s0 + mt*16 + 8h + g: the first three terms are a multiple of 8 (the partial's
        // row XOR is the thread's).
#pragma unroll
        for (int m = 0; m < kDeM; ++m) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t s = s0 + (mt0 + m) * 16 + g + 8 * h;
            if (s >= p.S) continue;
            float* row = partial.row(s);
#pragma unroll
            for (int hn = 0; hn < kHalves; ++hn) {
              if (hn < halves)
                partial.add_pair(row, (nu * kHalves + hn) * 8 + 2 * t, c[m][hn][2 * h], c[m][hn][2 * h + 1]);
            }
          }
        }
      }
    }

    if (want_dw && step.chunk == chunks - 1) {
      // Per expert m-tile and 16-param column pair: fp32 accumulators -> this warp's staging
      // block -> 16-byte rows (two lanes per expert row), adding the old dW in fp32 when accumulating.
      const int row = lane / 2, half = lane % 2;
#pragma unroll
      for (int ml = 0; ml < kDwMt; ++ml) {
#pragma unroll
        for (int np = 0; np < Cfg::kDwNp; ++np) {
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            const int nt = 2 * np + h2;
            *reinterpret_cast<float2*>(sm.stage + g * kStageRow + h2 * 8 + 2 * t) = make_float2(acc[ml][nt][0], acc[ml][nt][1]);
            *reinterpret_cast<float2*>(sm.stage + (g + 8) * kStageRow + h2 * 8 + 2 * t) =
                make_float2(acc[ml][nt][2], acc[ml][nt][3]);
          }
          __syncwarp();
          store_dw_from_stage(p, sm.stage + row * kStageRow + half * V, (dw_mt0 + ml) * 16 + row,
                              tile_col + Cfg::dw_col(warp) + np * 16 + half * V);
          __syncwarp();  // the staging block is rewritten next
        }
      }
    }
    step.next<kStages>(chunks);  // the next step, on the compute side
  }
  cp_async_wait<0>();  // only empty groups are left; no copy outlives the block
  partial.flush();
#endif
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
