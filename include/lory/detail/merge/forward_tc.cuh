// lory (private), merge layer "kernel": the forward on tensor cores (mma.sync, bf16 / fp16, E <= 64): its
// shape under a tuning's knobs (MergeForwardTcConfig) and merge_forward_tc_kernel.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge/vec_io.cuh"
#include "lory/detail/merge_mma.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------
// Forward, tensor cores (bf16 / fp16 storage, E <= 64). Block tile: 256
// params x all experts; 8 warps = 4 (N, 64 params each) x 2 (M). The slice's
// routing weights (hi and lo) stay in shared memory; a warp keeps its B
// fragments (experts x 64 params) in registers for the whole tile and sweeps
// the slice's segments 16 at a time. With 16-byte aligned views the next
// tile's W arrives by cp.async into a second buffer while the current one is
// computed; the scalar path loads each tile when it starts.
// ---------------------------------------------------------------------------
template <class T, int kKSteps, class Knobs = typename MergeForwardTcDefault::template At<kKSteps>>
struct MergeForwardTcConfig {
  static constexpr int kWarpsN = Knobs::kWarpsN;
  static constexpr int kWarpsM = (kMergeThreads / 32) / kWarpsN;
  static constexpr int kWarpN = 64;
  static constexpr int kTileN = kWarpsN * kWarpN;
  static constexpr int kRowsPerPass = 16 * kWarpsM;  // warp rows x 16 segments
  static constexpr int kK = kKSteps * 16;
  // Row strides padded by 16 bytes: the 8 rows of an ldmatrix fall in 8 different bank groups.
  static constexpr int kWRow = kTileN + 8;
  static constexpr int kARow = kK + 8;
  static constexpr int kStageRow = kWarpN + 8;
  static constexpr size_t kWBytes = size_t(kK) * kWRow * sizeof(T);
  static constexpr size_t kStageBytes = size_t(16) * kStageRow * sizeof(T);
  static constexpr size_t kFixedBytes = 2 * kWBytes + (kMergeThreads / 32) * kStageBytes;  // two W buffers
  static int64_t bytes_per_segment() { return int64_t(2) * kARow * sizeof(T); }  // hi + lo
  static size_t smem_bytes(int64_t slice_rows) { return kFixedBytes + size_t(slice_rows * bytes_per_segment()); }
  // Shared memory the slice's routing weights may take: kMergeForwardWeightsSmem, less where more
  // than two blocks should share an sm_90's (1 KiB per block reserved by the runtime).
  static constexpr int64_t weights_budget() {
    return Knobs::kMinBlocks <= 2
               ? kMergeForwardWeightsSmem
               : std::min<int64_t>(kMergeForwardWeightsSmem,
                                   int64_t(kMergeSm90SmemLimits.per_sm / Knobs::kMinBlocks) - 1024 - int64_t(kFixedBytes));
  }
  // The most segments a slice may have (merge_forward_slices' max_rows) on a device with `limits`;
  // below kRowsPerPass the kernel does not fit there.
  static int64_t max_rows(const MergeSmemLimits& limits) {
    const int64_t fit = (int64_t(limits.per_block) - int64_t(kFixedBytes)) / bytes_per_segment();
    return std::max<int64_t>(0, std::min<int64_t>(weights_budget() / bytes_per_segment(), fit));
  }
};

#if LORY_HAS_DEVICE_CODE
// kIo: MergeIo::kVec (cp.async double buffer) or MergeIo::kScalarRows (one buffer, loaded element
// by element at each one's view offset).
template <class T, MergeIo kIo, int kKSteps, class Knobs>
LORY_KERNEL void __launch_bounds__(kMergeThreads, Knobs::kMinBlocks) merge_forward_tc_kernel(const MergeForwardParams<T> p) {
#if LORY_MMA_AVAILABLE
  static_assert(kIo != MergeIo::kScalar, "the tensor-core forward's scalar path is kScalarRows");
  constexpr bool kVecIO = kIo == MergeIo::kVec;
  using Cfg = MergeForwardTcConfig<T, kKSteps, Knobs>;
  constexpr int kK = Cfg::kK, kWRow = Cfg::kWRow, kARow = Cfg::kARow, kStageRow = Cfg::kStageRow;
  constexpr int V = Vec16<T>::kSize;  // 8
  constexpr int kRowVecs = Cfg::kTileN / V;
  LORY_DYNAMIC_SMEM(merge_smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_n = warp % Cfg::kWarpsN, warp_m = warp / Cfg::kWarpsN;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * p.segs_per_slice;
  const int64_t s_end = s_begin + p.segs_per_slice < p.S ? s_begin + p.segs_per_slice : p.S;
  const int64_t slice_rows = (s_end - s_begin + 15) / 16 * 16;  // the last pass may leave warp rows idle
  T* const w_buf = reinterpret_cast<T*>(merge_smem);                                        // [2][kK][kWRow]
  T* stage = reinterpret_cast<T*>(merge_smem + 2 * Cfg::kWBytes + warp * Cfg::kStageBytes); // [16][kStageRow]
  T* a_hi = reinterpret_cast<T*>(merge_smem + Cfg::kFixedBytes);                            // [slice rows][kARow]
  T* a_lo = a_hi + slice_rows * kARow;                                                      // [slice rows][kARow]
  const int g = lane / 4, t = lane % 4;

  // The slice's weights as hi + lo, once per block; rows past the slice and experts past E are zero.
  for (int64_t i = threadIdx.x; i < slice_rows * kK; i += kMergeThreads) {
    const int64_t r = i / kK;
    const int k = static_cast<int>(i % kK);
    const float w = (s_begin + r < s_end && k < p.E) ? p.weights[(s_begin + r) * p.E + k] : 0.f;
    split_hi_lo(w, a_hi[r * kARow + k], a_lo[r * kARow + k]);
  }
  // A W tile into a buffer. Expert rows k >= E are zero: they meet zero weights, and 0 * garbage
  // could be NaN. Vector path: cp.async (zero-filled past E and past P), one commit group.
  static_assert(kMergeThreads % kRowVecs == 0, "a thread's W-tile vectors share one column");
  auto fill_w = [&](int64_t tile, T* dst) {
    const int64_t col = tile * Cfg::kTileN + (threadIdx.x % kRowVecs) * V;
    const int64_t off = p.w_view.offset(col);
    for (int i = threadIdx.x; i < kK * kRowVecs; i += kMergeThreads) {
      const int k = i / kRowVecs, v = i % kRowVecs;
      T* d = dst + k * kWRow + v * V;
      if constexpr (kVecIO) {
        cp_async_view_vec(d, k < p.E ? p.W + k * p.w_stride : p.W, off, k < p.E, col, p.P);
      } else {
        *reinterpret_cast<Vec16<T>*>(d) =
            k < p.E ? load_view_vec<T, kIo>(p.W + k * p.w_stride, p.w_view, off, col, p.P) : zero_vec16<T>();
      }
    }
    if constexpr (kVecIO) cp_async_commit();
  };
  if (kVecIO && blockIdx.x < p.tiles) fill_w(blockIdx.x, w_buf);

  // The block's tiles: blockIdx.x, then every gridDim.x-th; or, with dynamic tiles, blockIdx.x, then
  // whichever comes next from the slice's counter (p.tile_counters, zeroed by the launcher), so that
  // the tiles in flight are always about gridDim.x consecutive ones, started about together. Thread
  // 0 takes the one after next a tile ahead, through a two-slot shared array (slot it % 2 is written
  // in iteration it - 1 and read in iteration it, each after the barrier that ends the other's use).
  // It issues the atomic at the top of an iteration and stores its result at the end, so that warp 0
  // does not wait out the atomic's round trip before its own copies and MMAs.
  LORY_BLOCK_SHARED(int64_t[2], next_tile);
  auto take_tile = [&] {
    return int64_t(gridDim.x) + static_cast<int64_t>(atomicAdd(p.tile_counters + blockIdx.y, 1ull));
  };
  if (Knobs::kDynamicTiles && threadIdx.x == 0) next_tile[0] = take_tile();
  int buf = 0;
  int64_t next = 0;
  for (int64_t tile = blockIdx.x, it = 0; tile < p.tiles; tile = next, ++it, buf ^= 1) {
    const int64_t tile_col = tile * Cfg::kTileN;
    T* const w_s = w_buf + (kVecIO ? buf : 0) * (kK * kWRow);
    if constexpr (kVecIO) cp_async_wait<0>();
    // This tile's W (vector path; and, the first time, the weights) is in place for everyone, and
    // every warp has its B fragments of the previous tile: the other buffer is free for the next
    // tile's W (vector path), or this one for this tile's (scalar path).
    __syncthreads();
    next = Knobs::kDynamicTiles ? next_tile[it % 2] : tile + gridDim.x;
    int64_t after_next = 0;  // thread 0's, with dynamic tiles: stored to its slot at the end of the body
    if (Knobs::kDynamicTiles && threadIdx.x == 0) after_next = take_tile();
    if constexpr (kVecIO) {
      if (next < p.tiles) fill_w(next, w_buf + (buf ^ 1) * (kK * kWRow));
    } else {
      fill_w(tile, w_s);
      __syncthreads();
    }
    uint32_t b[kKSteps][8][2];
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        const int q = lane / 8;
        const int k = ks * 16 + (q & 1) * 8 + lane % 8;
        const int n = warp_n * Cfg::kWarpN + (np * 2 + (q >> 1)) * 8;
        uint32_t r[4];
        ldmatrix_x4_trans(r, w_s + k * kWRow + n);
        b[ks][2 * np][0] = r[0];
        b[ks][2 * np][1] = r[1];
        b[ks][2 * np + 1][0] = r[2];
        b[ks][2 * np + 1][1] = r[3];
      }

    const int64_t out_col = tile_col + warp_n * Cfg::kWarpN + (lane % 8) * V;  // this lane's stores
    const int64_t out_off = p.out_view.offset(out_col);
#pragma unroll 1
    for (int64_t r0 = warp_m * 16; r0 < slice_rows; r0 += Cfg::kRowsPerPass) {
      float acc[8][4];
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nb][i] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        uint32_t ah[4], al[4];
        const int64_t r = r0 + lane % 16;
        const int k = ks * 16 + (lane / 16) * 8;
        ldmatrix_x4(ah, a_hi + r * kARow + k);
        ldmatrix_x4(al, a_lo + r * kARow + k);
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
          mma_16816<T>(acc[nb], al, b[ks][nb]);
          mma_16816<T>(acc[nb], ah, b[ks][nb]);
        }
      }
      // Accumulators -> T -> this warp's staging tile, then whole 16-byte rows out.
#pragma unroll
      for (int nb = 0; nb < 8; ++nb) {
        *reinterpret_cast<uint32_t*>(stage + g * kStageRow + nb * 8 + 2 * t) = pack2<T>(acc[nb][0], acc[nb][1]);
        *reinterpret_cast<uint32_t*>(stage + (g + 8) * kStageRow + nb * 8 + 2 * t) = pack2<T>(acc[nb][2], acc[nb][3]);
      }
      __syncwarp();
#pragma unroll
      for (int it = 0; it < 4; ++it) {
        const int row = it * 4 + lane / 8, chunk = lane % 8;
        const int64_t s = s_begin + r0 + row;
        if (s < s_end) {
          const Vec16<T> x = *reinterpret_cast<const Vec16<T>*>(stage + row * kStageRow + chunk * V);
          store_view_vec<T, kIo, Knobs::kStreamStores>(p.out + s * p.out_stride, p.out_view, out_off, out_col, p.P, x);
        }
      }
      __syncwarp();  // the staging tile is rewritten by the next m-tile
    }
    if (Knobs::kDynamicTiles && threadIdx.x == 0) next_tile[(it + 1) % 2] = after_next;
  }
#endif
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
