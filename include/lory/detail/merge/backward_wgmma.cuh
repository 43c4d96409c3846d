// lory (private), merge layer "kernel": the backward on Hopper warpgroup MMA (wgmma, sm_90a only):
// MergeBackwardWgmmaConfig and merge_backward_wgmma_kernel. Reached through a tuning that asks for
// it (merge_tuning_uses_wgmma); lory::merge_backward does not run it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/merge/backward_pipeline.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/wgmma.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------
// Backward, Hopper warpgroup MMA (sm_90a only; bf16 / fp16, E <= 64, 16-byte aligned views): the
// layout of docs/merge-backward-sm90.md, a variant (MergeBackwardWgmma) beside the mma.sync kernel.
// wgmma reads a shared-memory operand once per warpgroup, where mma.sync makes every warp load its
// own copy of it; that re-reading is what bounds the mma.sync kernel (by the model in
// tests/emu/test_smem_banks.cpp).
//
// Block: two warpgroups; tile: 128 params; step: 64 segments (kMergeBackwardWgmmaChunk), staged by
// the same cp.async pipeline as the mma.sync kernel (MergeBackwardCopier) into the canonical
// no-swizzle K-major layout: 8 x 8 core matrices of 128 contiguous bytes, so a quarter-warp's eight
// 16-byte copies fill one core matrix (vector i of a region at element 8 i). Per step:
//   dW^T [params x EP] += G^T [params x 64 segs] . e [64 segs x EP]: M = params (warpgroup w owns
//       64 w .. 64 w + 63), N = experts, K = segments. A = G^T from registers, each warp's 16
//       params by ldmatrix.trans of the G chunk's core matrices; B = the split routing weights
//       (hi, then lo into the same accumulators), rows of segments, K-major as copied. The fp32
//       accumulators (EP / 2 per thread) stay in registers over all of S.
//   de [64 segs x EP] = G [64 segs x 128 params] . W^T [128 params x EP]: M = segments, N =
//       experts, K = the tile's params, both operands from shared memory. Warpgroup w takes
//       experts w EP / 2 .. (w + 1) EP / 2 - 1 (G is read twice, but no branch on the warpgroup
//       sits between the wgmmas: ptxas serializes wgmmas behind one, warning C7520), so every
//       (segment, expert) of the partial has one owner per step and is added in a fixed order,
//       without atomics.
// Its GPU test is tagged [sm90]; it has run under the CPU emulator only (tests/emu), whose wgmma is
// written from the same reading of the PTX ISA as this kernel (docs/merge-backward-sm90.md).
// ---------------------------------------------------------------------------
template <class T, int kKSteps, int kStagesT>
struct MergeBackwardWgmmaConfig {
  static constexpr int kTileN = 128;
  static constexpr int kChunk = kMergeBackwardWgmmaChunk;  // segments per step: M of de, K of dW
  static constexpr int kStages = kStagesT;
  static constexpr int kEP = 16 * kKSteps;
  static constexpr int kWarps = kMergeThreads / 32;
  static constexpr int kStageRow = 16 + 4;  // fp32 staging of a 16 x 16 dW block (rows: experts)
  // A region of rows x cols elements as core matrices, row groups of cols / 8 of them one after
  // another: element (r, c) at core_elem(r, c, cols); 16-byte vector i at element 8 i holds row
  // core_row(i, cols), elements core_col(i, cols) .. + 7.
  LORY_HOST_DEVICE static constexpr int core_elem(int r, int c, int cols) {
    return ((r / 8) * (cols / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8;
  }
  LORY_HOST_DEVICE static constexpr int core_row(int i, int cols) { return i / 8 / (cols / 8) * 8 + i % 8; }
  LORY_HOST_DEVICE static constexpr int core_col(int i, int cols) { return i / 8 % (cols / 8) * 8; }
  // Descriptor byte steps: between K-adjacent core matrices, and between row groups of the G chunk
  // and W tile (K = params) and of the split weights (K = segments).
  static constexpr uint32_t kLbo = 128;
  static constexpr uint32_t kSboTile = kTileN / 8 * 128;
  static constexpr uint32_t kSboSplit = kChunk / 8 * 128;
  // Regions: W tile [kEP][kTileN]; per stage a G chunk [kChunk][kTileN] and the split weights, hi
  // [kEP][kChunk] then lo; per warp a dW staging block; then the partial when it is on chip.
  static constexpr int kGStageElems = kChunk * kTileN;
  static constexpr int kAStageElems = 2 * kEP * kChunk;
  static constexpr size_t kWBytes = size_t(kEP) * kTileN * sizeof(T);
  static constexpr size_t kGBytes = size_t(kGStageElems) * sizeof(T);
  static constexpr size_t kABytes = size_t(kAStageElems) * sizeof(T);
  static constexpr size_t kStageBytes = size_t(kWarps) * 16 * kStageRow * sizeof(float);
  static constexpr size_t kFixedBytes = kWBytes + kStages * (kGBytes + kABytes) + kStageBytes;
  static size_t smem_bytes(int64_t S, int E, bool partial_in_smem) {
    return kFixedBytes + (partial_in_smem ? size_t(MergePartialLayout::make(E, true).size(S)) * sizeof(float) : 0);
  }
  // MergeBackwardCopier's placement of each 16-byte vector (see there).
  static constexpr int kGVecs = kChunk * kTileN / 8 / kMergeThreads;
  static constexpr int kGPassRows = kMergeThreads * 8 / kTileN;
  static constexpr int kGSmemStep = kMergeThreads * 8;
  LORY_HOST_DEVICE static constexpr int g_vec_row(int i) { return core_row(i, kTileN); }
  LORY_HOST_DEVICE static constexpr int g_vec_col(int i) { return core_col(i, kTileN); }
  LORY_HOST_DEVICE static constexpr int g_vec_offset(int i) { return 8 * i; }
  static constexpr int kWVecs = kEP * kTileN / 8 / kMergeThreads;
  LORY_HOST_DEVICE static constexpr int w_vec_row(int i) { return core_row(i, kTileN); }
  LORY_HOST_DEVICE static constexpr int w_vec_col(int i) { return core_col(i, kTileN); }
  LORY_HOST_DEVICE static constexpr int w_vec_offset(int i) { return 8 * i; }
  // Split weights: vectors [0, 8 kEP) the hi block, then the lo block.
  static constexpr int kAVecCount = 2 * kEP * kChunk / 8;
  static constexpr int kAVecs = kAVecCount / kMergeThreads;
  LORY_HOST_DEVICE static constexpr int a_vec_is_lo(int i) { return i / (kAVecCount / 2); }
  LORY_HOST_DEVICE static constexpr int a_vec_row(int i) { return core_row(i % (kAVecCount / 2), kChunk); }
  LORY_HOST_DEVICE static constexpr int a_vec_seg(int i) { return core_col(i % (kAVecCount / 2), kChunk); }
  LORY_HOST_DEVICE static constexpr int a_vec_offset(int i) { return 8 * i; }
  // dW's A: the row address lane gives ldmatrix_x4_trans for k-step ks (16 segments) of warp wq of
  // warpgroup wg (16 params): matrices (segments +0, params +0), (+0, +8), (+8, +0), (+8, +8) are
  // the m64k16 A fragment's a0..a3 (row = param, k = segment), each one core matrix.
  LORY_HOST_DEVICE static constexpr int g_dw_offset(int ks, int wg, int wq, int lane) {
    return core_elem(ks * 16 + (lane / 16) * 8 + lane % 8, wg * 64 + wq * 16 + (lane / 8) % 2 * 8, kTileN);
  }
  static_assert(kGVecs * kMergeThreads * 8 == kChunk * kTileN && kGPassRows * kGVecs == kChunk,
                "G chunk split evenly over the threads, one column vector each");
  static_assert(kWVecs * kMergeThreads * 8 == kEP * kTileN, "W tile split evenly over the threads");
  static_assert(kAVecs * kMergeThreads == kAVecCount, "split weights split evenly over the threads");
  static_assert(kMergeThreads == 2 * 128 && kTileN == 2 * 64 && kChunk == 64, "two warpgroups of m64 each");
  static_assert(kFixedBytes % 128 == 0 && kWBytes % 128 == 0 && kGBytes % 128 == 0 && kABytes % 128 == 0,
                "core-matrix regions 128-byte aligned");
};

#if LORY_HAS_DEVICE_CODE
// Blocks per SM by registers: two up to E = 32 (<= 128 registers), one above (the accumulators and the
// W tile in flight spill within 128).
template <class T, int kKSteps, int kStages>
LORY_KERNEL void __launch_bounds__(kMergeThreads, kKSteps <= 2 ? 2 : 1)
    merge_backward_wgmma_kernel(const MergeBackwardParams<T> p) {
#if LORY_WGMMA_AVAILABLE
  using Cfg = MergeBackwardWgmmaConfig<T, kKSteps, kStages>;
  constexpr int kEP = Cfg::kEP, kChunk = Cfg::kChunk, kTileN = Cfg::kTileN, kStageRow = Cfg::kStageRow;
  constexpr int kDeN = kEP / 2;  // experts per warpgroup in the d_weights product
  constexpr int V = Vec16<T>::kSize;  // 8
  LORY_DYNAMIC_SMEM(merge_smem);
  const MergeBackwardSmem<T, Cfg> sm(merge_smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wg = warp / 4, wq = warp % 4;  // warpgroup, warp in it
  const int g = lane / 4, t = lane % 4;
  const bool want_dw = p.dW != nullptr;
  const int64_t chunks = (p.S + kChunk - 1) / kChunk;
  const MergeBackwardPartial<T> partial(p, sm.partial, g);  // rows s0 + 16 wq + g (+ 8), s0 a multiple of 64

  MergeBackwardCopier<T, Cfg> copier(p, sm.g, sm.a, chunks);
  if (p.want_de && blockIdx.x < p.tiles) copier.fetch_w(blockIdx.x);
#pragma unroll 1
  for (int k = 0; k < kStages - 1; ++k) copier.issue();

  // Accumulator fragments (wgmma.cuh): acc[4 j + 2 h + q] is (param 16 wq + g + 8 h of this
  // warpgroup's 64, expert 8 j + 2 t + q); de[4 j + 2 h + q] is (segment 16 wq + g + 8 h of the
  // step, expert wg kDeN + 8 j + 2 t + q).
  float acc[kEP / 2] = {};
  float de[kDeN / 2] = {};
  MergeBackwardStep step;  // the step being computed
#pragma unroll 1
  while (step.tile < p.tiles) {
    const int64_t tile_col = step.tile * kTileN;
    const int64_t s0 = step.chunk * kChunk;
    if (step.chunk == 0 && p.want_de) {
      __syncthreads();  // the previous tile's wgmmas on w_s are done (each step waits for its own)
      copier.store_w(sm.w);
      if (step.tile + gridDim.x < p.tiles) copier.fetch_w(step.tile + gridDim.x);  // in flight for a whole tile
    }
    cp_async_wait<kStages - 2>();  // this thread's copies of this step have landed
    wgmma_fence_operands();        // ... and, with its W-tile stores, are visible to wgmma
    __syncthreads();               // everyone's are; every wgmma of the previous step is done
    copier.issue();                // refills the stage the previous step used
    const T* gs = sm.g + step.stage * Cfg::kGStageElems;
    const T* as = sm.a + step.stage * Cfg::kAStageElems;

    uint32_t a[kChunk / 16][4];
    if (want_dw) {
#pragma unroll
      for (int ks = 0; ks < kChunk / 16; ++ks) ldmatrix_x4_trans(a[ks], gs + Cfg::g_dw_offset(ks, wg, wq, lane));
    }
    wgmma_pin(acc);
    wgmma_pin(de);
    wgmma_fence();  // the A fragments (and the accumulators) are written before the wgmmas read them
    if (want_dw) {
#pragma unroll
      for (int ks = 0; ks < kChunk / 16; ++ks) {
        // Core-matrix column 2 ks of the hi and lo blocks: segments 16 ks .. 16 ks + 15.
        const uint64_t hi = wgmma_desc(as + ks * 128, Cfg::kLbo, Cfg::kSboSplit);
        const uint64_t lo = wgmma_desc(as + kEP * kChunk + ks * 128, Cfg::kLbo, Cfg::kSboSplit);
        wgmma_rs<T, kEP>(acc, a[ks], lo, step.chunk > 0 || ks > 0);  // a new tile starts from zero
        wgmma_rs<T, kEP>(acc, a[ks], hi, true);
      }
    }
    if (p.want_de) {
      // This warpgroup's experts: rows wg kDeN.. of the W tile, whole row groups of core matrices.
      const T* w_rows = sm.w + Cfg::core_elem(wg * kDeN, 0, kTileN);
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk)
        wgmma_ss<T, kDeN>(de, wgmma_desc(gs + kk * 128, Cfg::kLbo, Cfg::kSboTile),
                          wgmma_desc(w_rows + kk * 128, Cfg::kLbo, Cfg::kSboTile), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_pin(acc);  // nothing reads the accumulators before the wait
    wgmma_pin(de);

    if (p.want_de) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t s = s0 + wq * 16 + g + 8 * h;
        if (s >= p.S) continue;
        float* row = partial.row(s);
#pragma unroll
        for (int j = 0; j < kDeN / 8; ++j)
          partial.add_pair(row, wg * kDeN + 8 * j + 2 * t, de[4 * j + 2 * h], de[4 * j + 2 * h + 1]);
      }
    }
    if (want_dw && step.chunk == chunks - 1) {
      // Per 16 experts: this warp's 16 params x 16 experts -> its staging block, transposed to
      // rows of experts -> 16-byte rows (two lanes per expert row).
      const int row = lane / 2, half = lane % 2;
      const int64_t col = tile_col + wg * 64 + wq * 16 + half * V;
#pragma unroll
      for (int jb = 0; jb < kEP / 16; ++jb) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int q = 0; q < 2; ++q)
              sm.stage[(8 * jj + 2 * t + q) * kStageRow + g + 8 * h] = acc[4 * (2 * jb + jj) + 2 * h + q];
        __syncwarp();
        store_dw_from_stage(p, sm.stage + row * kStageRow + half * V, jb * 16 + row, col);
        __syncwarp();  // the staging block is rewritten next
      }
    }
    step.next<kStages>(chunks);  // the next step, on the compute side
  }
  cp_async_wait<0>();  // only empty groups are left; no copy outlives the block
  partial.flush();
#else
  // Built without sm_90a (no wgmma): a static shared-memory marker the launcher reads
  // (cudaFuncGetAttributes) to refuse to run this empty body.
  __shared__ int lory_no_wgmma;
  if (threadIdx.x == 0) *static_cast<volatile int*>(&lory_no_wgmma) = p.E;
#endif
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
