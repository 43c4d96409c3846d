// lory: the expert merge on the GPU, forward and backward (math in lory/merge.hpp,
// CPU twin in lory/reference/merge.hpp).
//
//   forward   Wbar[s, :] = sum_e weights[s, e] W[e, :]                  GEMM, K = E
//   backward  dW[e, :] (+)= sum_s weights[s, e] G[s, :]                  GEMM, K = S
//             d_weights[s, e] (+)= <G[s, :], W[e, :]>                    GEMM, K = P
//
// Both directions are memory-bound GEMMs with a tiny K on one side, so the
// design rule is "each big operand crosses HBM once":
// - forward: a block stages a P-tile of all E experts in shared memory, then
//   produces every segment's merged tile from it (S may be split across
//   blockIdx.y when there are too few P-tiles to fill the GPU; then W is read
//   once per slice). Two implementations of the tile product:
//     SIMT         fp32 FMAs on CUDA cores, any dtype, any E;
//     tensor core  mma.sync m16n8k16 (bf16 / fp16 storage, E <= 64):
//                  M = segments, N = params, K = experts padded to 16. The
//                  routing weights enter as hi + lo 16-bit operands (two mmas)
//                  so they keep ~16 bits; the output tile goes through shared
//                  memory so global stores are whole 16-byte vectors.
//   The launcher picks tensor cores for 16-bit storage and 8 <= E <= 64 on
//   sm_80+; otherwise SIMT. detail::merge_forward_on_path forces either, and
//   takes the tensor-core kernel's tuning (MergeForwardTcKnobs: tile width,
//   store policy, blocks per SM, static or dynamic tile order; variants for
//   the tests and the A/B driver). The default needs no workspace beyond the
//   16-byte minimum; a dynamic-tile variant keeps a counter per S slice there.
//   The fp16 tensor-core path needs |weights| < 65504 (routing probabilities are).
// - backward: one pass over G. A persistent grid (a few blocks per SM, each
//   looping over many P-tiles) stages a chunk of G rows per step and feeds
//   both products from it: dW accumulates in registers over all S, the
//   d_weights partial [S, E] accumulates on chip (shared memory when S*E is
//   small enough, else the block's own slice of the workspace) across the
//   block's P-tiles. Deterministic mode (default): partials land in the
//   workspace and a second kernel sums them in a fixed order, bitwise
//   reproducible. Fast mode: partials are atomically added into d_weights
//   (last bits may vary run to run); when the partial does not fit in shared
//   memory the fast mode falls back to the deterministic reduction.
//   Two implementations of the per-chunk products:
//     SIMT         fp32 FMAs on CUDA cores, any dtype, any E;
//     tensor core  mma.sync m16n8k16 (bf16 / fp16 storage, E <= 64, 16-byte
//                  aligned views): dW with M = experts, K = segments (weights
//                  as hi + lo operands, split and transposed once per launch
//                  into the workspace by a small kernel), d_weights with
//                  M = segments, K = params. Same partials layout and
//                  reduction as SIMT; the split weights follow the partials.
//   The launcher picks tensor cores where they apply on sm_80+, else SIMT;
//   detail::merge_backward_on_path forces either. A third implementation, for
//   Hopper only, is a variant that tests and the A/B driver select
//   (detail::MergeBackwardWgmma, docs/merge-backward-sm90.md): wgmma (sm_90a),
//   which reads each shared operand once per warpgroup; emulated only so far.
//   The SIMT kernel was measured on an H200 at 2-8% of copy bandwidth (its
//   d_weights dot products are compute-bound on CUDA cores); the tensor-core
//   kernel at 28-47% (E = 32 / E = 8), bound by shared-memory traffic and
//   instruction issue. Its GPU tests
//   passed on an H200 at commit 6a20a9a; the changes since (step counters,
//   three blocks per SM for E <= 16, the two-stage variant, the swizzled
//   on-chip partial with float2 updates, 16 x 16 d_weights units, the weights
//   split once per launch, two blocks per SM at E = 64, the per-thread issue
//   pointers) passed them under the CPU emulator (tests/emu/) only: see
//   docs/gpu-results.md for what ran where.
//
// lory/merge_gemm.cuh adds the backward as two cuBLAS GEMMs and MergeBackwardMethod::kAuto's
// choice between them and the fused kernel here (the layer plan's default).
//
// Paths: every pointer only needs its element alignment. 16-byte vector loads
// and stores are used when the base pointers are 16-byte aligned and the
// strides are multiples of 16 bytes; otherwise a scalar path runs (same
// kernel, template flag). A P-tail shorter than a vector is always scalar.
// All global offsets are 64-bit.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge_mma.cuh"
#include "lory/detail/validate.hpp"
#include "lory/detail/wgmma.cuh"
#include "lory/dtype.hpp"
#include "lory/merge.hpp"
#include "lory/status.hpp"

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
// Device helpers: one 16-byte vector of a row, with a zero-filled / masked tail.
// ---------------------------------------------------------------------------
#if LORY_HAS_DEVICE_CODE

template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> zero_vec16() {
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) r.v[i] = from_float<T>(0.f);
  return r;
}

// Elements [col, col + kSize) of a row; those at or past P read as zero.
template <class T, bool kVec>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_row_vec(const T* row, int64_t col, int64_t P) {
  constexpr int V = Vec16<T>::kSize;
  if (kVec && col + V <= P) return load_vec16(row + col);
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = (col + i < P) ? row[col + i] : from_float<T>(0.f);
  return r;
}

// The same into shared memory by cp.async (sm_80+; row 16-byte aligned): elements at or past P,
// and the whole vector when !row_valid (row is then only a valid address), are zero-filled.
template <class T>
LORY_DEVICE LORY_FORCEINLINE void cp_async_row_vec(T* smem_dst, const T* row, bool row_valid, int64_t col, int64_t P) {
  constexpr int V = Vec16<T>::kSize;
  const int bytes = (row_valid && col < P) ? int(sizeof(T)) * (P - col < V ? int(P - col) : V) : 0;
  cp_async_16(smem_dst, bytes ? row + col : row, bytes);
}

// Writes elements [col, min(col + kSize, P)) of a row; kStream: the vector store evict-first.
template <class T, bool kVec, bool kStream = false>
LORY_DEVICE LORY_FORCEINLINE void store_row_vec(T* row, int64_t col, int64_t P, const Vec16<T>& x) {
  constexpr int V = Vec16<T>::kSize;
  if (kVec && col + V <= P) {
    if constexpr (kStream) store_vec16_stream(row + col, x);
    else store_vec16(row + col, x);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (col + i < P) row[col + i] = x.v[i];
}

template <class T>
LORY_DEVICE LORY_FORCEINLINE void vec_to_float(const Vec16<T>& x, float (&f)[Vec16<T>::kSize]) {
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) f[i] = to_float(x.v[i]);
}
template <class T>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> float_to_vec(const float (&f)[Vec16<T>::kSize]) {
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < Vec16<T>::kSize; ++i) r.v[i] = from_float<T>(f[i]);
  return r;
}

#endif  // LORY_HAS_DEVICE_CODE

// ---------------------------------------------------------------------------
// Forward, SIMT: thread (c, g) owns one 16-byte column vector c of the tile and
// kSegs consecutive segments of group g; the expert vector read from shared
// memory is reused for all kSegs segments (64 fp32 accumulators).
// ---------------------------------------------------------------------------
template <class T>
struct MergeForwardParams {
  int64_t S;
  int E;
  int64_t P;
  const T* W;
  int64_t w_stride;
  const float* weights;
  T* out;
  int64_t out_stride;
  int col_vecs;            // 16-byte column vectors per tile (SIMT: cg; tensor core: fixed)
  int64_t tiles;           // ceil(P / tile width)
  int64_t segs_per_slice;  // S range of one blockIdx.y
  unsigned long long* tile_counters = nullptr;  // one per slice, zeroed (tensor cores, dynamic tiles)
};

template <class T>
struct MergeForwardSimtConfig {
  static constexpr int kVec = Vec16<T>::kSize;
  static constexpr int kSegs = 64 / kVec;  // segments per thread
  static constexpr int kPrefetch = 2;      // W-tile vectors per thread loaded ahead (registers)
  // Column vectors per tile: 32 (one warp across the tile) unless the E
  // expert rows would not fit in 64 KiB of shared memory.
  static int col_vecs(int E) {
    int cg = 32;
    while (cg > 1 && static_cast<int64_t>(E) * cg * 16 > 65536) cg /= 2;
    return cg;
  }
  LORY_HOST_DEVICE static int rows_per_pass(int cg) { return (kMergeThreads / cg) * kSegs; }
  // The slice's routing weights stay in shared memory, rows padded to E + 1
  // floats (odd: two segment groups in one warp read different banks).
  static int64_t bytes_per_segment(int E) { return int64_t(E + 1) * sizeof(float); }
  LORY_HOST_DEVICE static size_t w_tile_bytes(int E, int cg) { return static_cast<size_t>(E) * cg * 16; }
  static bool weights_in_smem(int E, int cg, int64_t budget) {
    return bytes_per_segment(E) * rows_per_pass(cg) <= budget;
  }
  static size_t smem_bytes(int E, int cg, int64_t slice_rows, bool weights_smem) {
    return w_tile_bytes(E, cg) + (weights_smem ? static_cast<size_t>(slice_rows * bytes_per_segment(E)) : 0);
  }
};

#if LORY_HAS_DEVICE_CODE
// kWeightsSmem: the slice's weights in shared memory (else read through L1,
// for large E where a pass's rows of weights would not fit).
template <class T, bool kVecIO, bool kWeightsSmem>
LORY_KERNEL void __launch_bounds__(kMergeThreads) merge_forward_simt_kernel(const MergeForwardParams<T> p) {
  using Cfg = MergeForwardSimtConfig<T>;
  constexpr int V = Cfg::kVec, kSegs = Cfg::kSegs, kPre = Cfg::kPrefetch;
  LORY_DYNAMIC_SMEM(merge_smem);
  const int cg = p.col_vecs, E = p.E, wrow = kWeightsSmem ? p.E + 1 : p.E;
  Vec16<T>* w_tile = reinterpret_cast<Vec16<T>*>(merge_smem);                     // [E][cg]
  float* w_all = reinterpret_cast<float*>(merge_smem + Cfg::w_tile_bytes(E, cg));  // [slice rows][E + 1]
  const int rows = Cfg::rows_per_pass(cg);
  const int c = threadIdx.x % cg, g = threadIdx.x / cg;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * p.segs_per_slice;
  const int64_t s_end = s_begin + p.segs_per_slice < p.S ? s_begin + p.segs_per_slice : p.S;
  const int64_t slice_rows = (s_end - s_begin + rows - 1) / rows * rows;

  // The slice's weights, once per block; rows past the slice are zero.
  for (int64_t i = threadIdx.x; kWeightsSmem && i < slice_rows * E; i += kMergeThreads) {
    const int64_t r = i / E;
    const int e = static_cast<int>(i % E);
    w_all[r * wrow + e] = s_begin + r < s_end ? p.weights[(s_begin + r) * E + e] : 0.f;
  }
  // The first kPre vectors of each thread's share of the next W tile travel in
  // registers while the current tile is computed.
  auto load_w = [&](int64_t tile, int i) {
    const int e = i / cg, cc = i % cg;
    return load_row_vec<T, kVecIO>(p.W + e * p.w_stride, tile * cg * V + cc * V, p.P);
  };
  const int tid = static_cast<int>(threadIdx.x);
  Vec16<T> pre[kPre];
#pragma unroll
  for (int j = 0; j < kPre; ++j)
    if (tid + j * kMergeThreads < E * cg && blockIdx.x < p.tiles) pre[j] = load_w(blockIdx.x, tid + j * kMergeThreads);

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    __syncthreads();  // the previous tile's readers are done with w_tile
#pragma unroll
    for (int j = 0; j < kPre; ++j)
      if (tid + j * kMergeThreads < E * cg) w_tile[tid + j * kMergeThreads] = pre[j];
    for (int i = tid + kPre * kMergeThreads; i < E * cg; i += kMergeThreads) w_tile[i] = load_w(tile, i);
    __syncthreads();
    const int64_t next = tile + gridDim.x;
    if (next < p.tiles) {
#pragma unroll
      for (int j = 0; j < kPre; ++j)
        if (tid + j * kMergeThreads < E * cg) pre[j] = load_w(next, tid + j * kMergeThreads);
    }
    const int64_t col = tile * cg * V + c * V;
    for (int64_t s0 = s_begin; s0 < s_end; s0 += rows) {
      // A segment group wholly past the slice has nothing to compute (a short slice,
      // e.g. S below one pass, would otherwise spend most FMAs on zero weights).
      if (s0 + g * kSegs >= s_end) continue;
      float acc[kSegs][V];
#pragma unroll
      for (int m = 0; m < kSegs; ++m)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[m][v] = 0.f;
      const int64_t seg0 = s0 + g * kSegs;
      const float* wseg = kWeightsSmem ? w_all + (seg0 - s_begin) * wrow : p.weights;
#pragma unroll 2
      for (int e = 0; e < E; ++e) {
        float wf[V];
        vec_to_float(w_tile[e * cg + c], wf);
#pragma unroll
        for (int m = 0; m < kSegs; ++m) {
          // Same address across the segment group: a broadcast. From global memory,
          // rows past the slice read its last row (their results are not stored).
          const float a = kWeightsSmem ? wseg[m * wrow + e]
                                       : __ldg(wseg + (seg0 + m < s_end ? seg0 + m : s_end - 1) * wrow + e);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[m][v] = fmaf(a, wf[v], acc[m][v]);
        }
      }
#pragma unroll
      for (int m = 0; m < kSegs; ++m) {
        const int64_t s = s0 + g * kSegs + m;
        if (s < s_end) store_row_vec<T, kVecIO>(p.out + s * p.out_stride, col, p.P, float_to_vec<T>(acc[m]));
      }
    }
  }
}
#endif  // LORY_HAS_DEVICE_CODE

// ---------------------------------------------------------------------------
// Forward, tensor cores (bf16 / fp16 storage, E <= 64). Block tile: 256
// params x all experts; 8 warps = 4 (N, 64 params each) x 2 (M). The slice's
// routing weights (hi and lo) stay in shared memory; a warp keeps its B
// fragments (experts x 64 params) in registers for the whole tile and sweeps
// the slice's segments 16 at a time. With 16-byte aligned views the next
// tile's W arrives by cp.async into a second buffer while the current one is
// computed (the first version prefetched through registers for E <= 16 only, and
// measured 57-66% of copy bandwidth at E = 32 on an H200; this one 73-79%); the
// scalar path loads each tile when it starts.
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
// What lory::merge_forward runs (73-79% of copy bandwidth on an H200 at the paper's shapes, 6a20a9a).
using MergeForwardTcDefault = MergeForwardTcTuning<4, false>;
// The variants, named for the timing driver and the tests; none has run on a GPU yet.
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
#define LORY_MERGE_FORWARD_TC_TUNING 1

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
template <class T, bool kVecIO, int kKSteps, class Knobs>
LORY_KERNEL void __launch_bounds__(kMergeThreads, Knobs::kMinBlocks) merge_forward_tc_kernel(const MergeForwardParams<T> p) {
#if LORY_MMA_AVAILABLE
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
  auto fill_w = [&](int64_t tile, T* dst) {
    for (int i = threadIdx.x; i < kK * kRowVecs; i += kMergeThreads) {
      const int k = i / kRowVecs, v = i % kRowVecs;
      const int64_t col = tile * Cfg::kTileN + v * V;
      T* d = dst + k * kWRow + v * V;
      if constexpr (kVecIO) {
        cp_async_row_vec(d, k < p.E ? p.W + k * p.w_stride : p.W, k < p.E, col, p.P);
      } else {
        *reinterpret_cast<Vec16<T>*>(d) =
            k < p.E ? load_row_vec<T, false>(p.W + k * p.w_stride, col, p.P) : zero_vec16<T>();
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
          store_row_vec<T, kVecIO, Knobs::kStreamStores>(p.out + s * p.out_stride,
                                                          tile_col + warp_n * Cfg::kWarpN + chunk * V, p.P, x);
        }
      }
      __syncwarp();  // the staging tile is rewritten by the next m-tile
    }
    if (Knobs::kDynamicTiles && threadIdx.x == 0) next_tile[(it + 1) % 2] = after_next;
  }
#endif
}
#endif  // LORY_HAS_DEVICE_CODE

// ---------------------------------------------------------------------------
// Backward, SIMT. Thread (c, r): column vector c of the tile; experts
// r, r + rows, ... (kEPT of them) for dW. Dot products for d_weights are
// spread over all threads, one (segment, expert) pair at a time.
// ---------------------------------------------------------------------------
template <class T>
struct MergeBackwardParams {
  int64_t S;
  int E;
  int64_t P;
  const T* G;
  int64_t g_stride;
  const T* W;  // null when d_weights is skipped
  int64_t w_stride;
  const float* weights;
  T* dW;  // null: skip dW
  int64_t dw_stride;
  bool accumulate_dW;
  bool want_de;           // compute the d_weights partials
  bool partial_in_smem;   // the block's [S, E] partial lives in shared memory
  float* partials;        // workspace [gridDim.x][S][E], or null (fast mode with a shared-memory partial)
  float* d_weights_atomic;  // fast mode: atomicAdd target, else null
  int col_vecs;
  int64_t tiles;
  // Tensor cores, with dW: the routing weights split into hi and lo operands and transposed,
  // [2][EP][a_stride] (hi, then lo; EP = E rounded up to 16, a_stride = S rounded up to 64, a
  // multiple of either kernel's chunk; zero past E and past S), made by
  // merge_backward_split_weights_kernel.
  const T* a_split;
  int64_t a_stride;
};

// Shape of that split copy; its bytes in the workspace include 16 so that it can start 16-byte
// aligned wherever the partials before it end.
struct MergeBackwardSplitShape {
  int ep = 0;
  int64_t s_pad = 0;
  static MergeBackwardSplitShape of(int64_t S, int E) {
    static_assert(kMergeBackwardWgmmaChunk % kMergeBackwardTcChunk == 0, "one padding for both kernels");
    return {(E + 15) / 16 * 16, (S + kMergeBackwardWgmmaChunk - 1) / kMergeBackwardWgmmaChunk * kMergeBackwardWgmmaChunk};
  }
  size_t bytes(size_t elem) const { return size_t(2) * size_t(ep) * size_t(s_pad) * elem + 16; }
};

template <class T>
struct MergeBackwardSimtConfig {
  static constexpr int kVec = Vec16<T>::kSize;
  static constexpr int kChunk = kMergeBackwardChunk;
  // Column vectors per tile: 32 unless the E expert rows would pass 32 KiB.
  static int col_vecs(int E) {
    int cg = 32;
    while (cg > 1 && static_cast<int64_t>(E) * cg * 16 > 32768) cg /= 2;
    return cg;
  }
  static int experts_per_thread(int E, int cg) {
    const int rows = kMergeThreads / cg;
    const int ept = (E + rows - 1) / rows;
    return ept <= 1 ? 1 : ept <= 2 ? 2 : ept <= 4 ? 4 : 8;
  }
  // Shared memory: W tile [E][cg+1], G chunk [kChunk][cg+1] (16-byte vectors, one
  // pad vector per row against bank conflicts), weights chunk [kChunk][E], partial [S][E].
  LORY_HOST_DEVICE static size_t w_tile_bytes(int E, int cg, bool want_de) { return want_de ? size_t(E) * (cg + 1) * 16 : 0; }
  LORY_HOST_DEVICE static size_t g_tile_bytes(int cg) { return size_t(kChunk) * (cg + 1) * 16; }
  LORY_HOST_DEVICE static size_t w_chunk_bytes(int E) { return align_up(size_t(kChunk) * E * sizeof(float), 16); }
  static size_t smem_bytes(int64_t S, int E, int cg, bool want_de, bool partial_in_smem) {
    return w_tile_bytes(E, cg, want_de) + g_tile_bytes(cg) + w_chunk_bytes(E) +
           (partial_in_smem ? size_t(S) * E * sizeof(float) : 0);
  }
};

// Layout of a d_weights partial [S][E] in shared memory. The tensor-core backward's updates are
// float2 (an expert pair), and a half-warp updates 4 consecutive segments (from a multiple of 4) x
// 4 pairs of one group of 8 experts. Plain rows of 32 (16) floats would put those 4 segments on the
// same 8 banks (2 x 2 of them): an 8-way (2-way) conflict. So its partial is swizzled: rows padded
// to a multiple of 8 floats (E > 8), and element (s, e) at s * stride + (e ^ 8 f(s)) with
// f(s) = s % 4 when stride % 32 == 0, (s / 2) % 2 when stride % 16 == 0, else 0 (rows of 8 or 24
// floats mod 32 already fall on different banks). XOR by 8 f(s) stays inside an aligned group of
// 32 (16) floats, so inside the row. tests/emu/test_smem_banks.cpp counts the wavefronts of this and
// of the kernel's other shared-memory accesses.
struct MergePartialLayout {
  int E = 0, stride = 0, shift = 0, mask = 0;
  LORY_HOST_DEVICE static int swizzled_stride(int E) { return E > 8 ? (E + 7) / 8 * 8 : E; }
  LORY_HOST_DEVICE static MergePartialLayout make(int E, bool swizzle) {
    MergePartialLayout l;
    l.E = E;
    l.stride = swizzle ? swizzled_stride(E) : E;
    if (swizzle && l.stride % 32 == 0) l.mask = 3;
    else if (swizzle && l.stride % 16 == 0) l.shift = 1, l.mask = 1;
    return l;
  }
  LORY_HOST_DEVICE bool plain() const { return stride == E && mask == 0; }
  LORY_HOST_DEVICE int64_t size(int64_t S) const { return S * stride; }
  // The XOR of row s depends on s % 8 only, so a row index split as (multiple of 8) + r
  // takes xor_of(r): the kernel computes it once per thread.
  LORY_HOST_DEVICE int xor_of(int s_mod8) const { return ((s_mod8 >> shift) & mask) << 3; }
  LORY_HOST_DEVICE int64_t index(int64_t s, int e) const { return s * stride + (e ^ xor_of(int(s & 7))); }
};

// Whether a backward kernel keeps its d_weights partial on chip (the tensor-core kernel's has
// padded rows, MergePartialLayout).
inline bool merge_backward_partial_fits(int64_t S, int E, bool tensor_core) {
  return MergePartialLayout::make(E, tensor_core).size(S) <= kMergeBackwardSmemPartial;
}

#if LORY_HAS_DEVICE_CODE
// The end of either backward kernel: a d_weights partial [S, E] kept in shared
// memory goes to the fast mode's atomic target, or to the block's slice of the
// workspace for the ordered reduction. (A partial in the workspace is already there.)
template <class T>
LORY_DEVICE LORY_FORCEINLINE void flush_backward_partial(const MergeBackwardParams<T>& p, const float* part,
                                                         int64_t SE, const MergePartialLayout& layout) {
  if (!p.want_de || !p.partial_in_smem) return;
  __syncthreads();
  // An on-chip partial has at most kMergeBackwardSmemPartial elements: 32-bit index math.
  auto at = [&](int64_t i) {
    if (layout.plain()) return part[i];
    const int s = static_cast<int>(i) / p.E;
    return part[layout.index(s, static_cast<int>(i) - s * p.E)];
  };
  if (p.d_weights_atomic) {
    for (int64_t i = threadIdx.x; i < SE; i += kMergeThreads) atomicAdd(p.d_weights_atomic + i, at(i));
  } else {
    float* dst = p.partials + blockIdx.x * SE;
    for (int64_t i = threadIdx.x; i < SE; i += kMergeThreads) dst[i] = at(i);
  }
}

template <class T, bool kVecIO, int kEPT>
LORY_KERNEL void __launch_bounds__(kMergeThreads, 1) merge_backward_simt_kernel(const MergeBackwardParams<T> p) {
  using Cfg = MergeBackwardSimtConfig<T>;
  constexpr int V = Cfg::kVec, kChunk = Cfg::kChunk;
  LORY_DYNAMIC_SMEM(merge_smem);
  const int cg = p.col_vecs, row_vecs = cg + 1;
  const int E = p.E;
  const int64_t SE = p.S * E;
  unsigned char* sp = merge_smem;
  Vec16<T>* w_tile = reinterpret_cast<Vec16<T>*>(sp);  // [E][row_vecs]
  sp += Cfg::w_tile_bytes(E, cg, p.want_de);
  Vec16<T>* g_tile = reinterpret_cast<Vec16<T>*>(sp);  // [kChunk][row_vecs]
  sp += Cfg::g_tile_bytes(cg);
  float* w_chunk = reinterpret_cast<float*>(sp);  // [kChunk][E]
  sp += Cfg::w_chunk_bytes(E);
  float* part = !p.want_de ? nullptr : p.partial_in_smem ? reinterpret_cast<float*>(sp) : p.partials + blockIdx.x * SE;

  const int rows = kMergeThreads / cg;
  const int c = threadIdx.x % cg, r0 = threadIdx.x / cg;
  const bool want_dw = p.dW != nullptr;

  if (p.want_de) {
    for (int64_t i = threadIdx.x; i < SE; i += kMergeThreads) part[i] = 0.f;
  }
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t tile_col = tile * cg * V;
    const int64_t col = tile_col + c * V;
    __syncthreads();  // w_tile free; partial zeroing visible
    if (p.want_de) {
      for (int i = threadIdx.x; i < E * cg; i += kMergeThreads) {
        const int e = i / cg, cc = i % cg;
        w_tile[e * row_vecs + cc] = load_row_vec<T, kVecIO>(p.W + e * p.w_stride, tile_col + cc * V, p.P);
      }
    }
    float acc[kEPT][V];
#pragma unroll
    for (int k = 0; k < kEPT; ++k)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[k][v] = 0.f;

    for (int64_t s0 = 0; s0 < p.S; s0 += kChunk) {
      const int sc = p.S - s0 < kChunk ? static_cast<int>(p.S - s0) : kChunk;
      __syncthreads();  // g_tile and w_chunk free
      for (int i = threadIdx.x; i < sc * cg; i += kMergeThreads) {
        const int r = i / cg, cc = i % cg;
        g_tile[r * row_vecs + cc] = load_row_vec<T, kVecIO>(p.G + (s0 + r) * p.g_stride, tile_col + cc * V, p.P);
      }
      if (want_dw) {
        for (int i = threadIdx.x; i < sc * E; i += kMergeThreads) w_chunk[i] = p.weights[s0 * E + i];
      }
      __syncthreads();
      if (want_dw) {
        for (int r = 0; r < sc; ++r) {
          float gf[V];
          vec_to_float(g_tile[r * row_vecs + c], gf);
#pragma unroll
          for (int k = 0; k < kEPT; ++k) {
            const int e = r0 + k * rows;
            const float a = e < E ? w_chunk[r * E + e] : 0.f;
#pragma unroll
            for (int v = 0; v < V; ++v) acc[k][v] = fmaf(a, gf[v], acc[k][v]);
          }
        }
      }
      if (p.want_de) {
        // One thread per (segment, expert) pair; the same pairs every tile, so
        // the partial needs no atomics (barriers separate the steps).
        for (int i = threadIdx.x; i < sc * E; i += kMergeThreads) {
          const int r = i / E, e = i % E;
          const Vec16<T>* gr = g_tile + r * row_vecs;
          const Vec16<T>* wr = w_tile + e * row_vecs;
          float dot0 = 0.f, dot1 = 0.f;  // two chains for latency
          for (int cc = 0; cc < cg; ++cc) {
            float gf[V], wf[V];
            vec_to_float(gr[cc], gf);
            vec_to_float(wr[cc], wf);
#pragma unroll
            for (int v = 0; v < V; v += 2) {
              dot0 = fmaf(gf[v], wf[v], dot0);
              dot1 = fmaf(gf[v + 1], wf[v + 1], dot1);
            }
          }
          part[(s0 + r) * E + e] += dot0 + dot1;
        }
      }
    }
    if (want_dw) {
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int e = r0 + k * rows;
        if (e < E) {
          T* dst = p.dW + e * p.dw_stride;
          if (p.accumulate_dW) {
            float old[V];
            vec_to_float(load_row_vec<T, kVecIO>(dst, col, p.P), old);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[k][v] += old[v];
          }
          store_row_vec<T, kVecIO>(dst, col, p.P, float_to_vec<T>(acc[k]));
        }
      }
    }
  }
  flush_backward_partial(p, part, SE, MergePartialLayout::make(p.E, false));
}

// The tensor-core backward's routing weights as operands, once per launch: hi[e][s] and lo[e][s]
// (e < ep, s < s_pad; zero past E and past S) with hi + lo = weights[s][e] to about 16 bits.
template <class T>
LORY_KERNEL void __launch_bounds__(kMergeThreads)
    merge_backward_split_weights_kernel(const float* weights, int64_t S, int E, int ep, int64_t s_pad, T* hi) {
  T* lo = hi + int64_t(ep) * s_pad;
  for (int64_t i = blockIdx.x * int64_t(kMergeThreads) + threadIdx.x; i < int64_t(ep) * s_pad;
       i += int64_t(gridDim.x) * kMergeThreads) {
    const int e = static_cast<int>(i / s_pad);
    const int64_t s = i - e * s_pad;
    split_hi_lo(e < E && s < S ? weights[s * E + e] : 0.f, hi[i], lo[i]);
  }
}

// d_weights[i] (+)= sum over blocks b of partials[b][i], always in the order b = 0, 1, ...
// (A template, so that a header-defined kernel is not a duplicate symbol across translation units.)
template <int kThreads>
LORY_KERNEL void __launch_bounds__(kThreads)
    merge_backward_reduce_kernel(const float* partials, int blocks, int64_t n, float* d_weights, bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t(kMergeThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kMergeThreads) {
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += partials[b * n + i];
    d_weights[i] = accumulate ? d_weights[i] + sum : sum;
  }
}
#endif  // LORY_HAS_DEVICE_CODE

// ---------------------------------------------------------------------------
// Backward, tensor cores (bf16 / fp16 storage, E <= 64, 16-byte aligned views).
//
// Block tile: N = 128 params (kTileN; 256 in some variants) x all experts (K
// padded to EP = 16 * kKSteps). The block's steps -- (tile, chunk of 32
// segments) pairs over all its tiles -- run through a kStages-deep cp.async
// pipeline: each stage holds a chunk of G rows and the chunk's routing weights
// (hi and lo), and kStages - 1 steps are in flight while one is computed (the
// version that staged one chunk through registers kept ~8 KB in flight per block
// and measured 19-29% of copy bandwidth on an H200). Per step:
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
// Tuning knobs of the tensor-core backward (CUTLASS style: one kernel template, each variant a set
// of compile-time knobs). lory::merge_backward runs MergeBackwardTcDefault; the variants that
// for_each_merge_backward_tc_variant lists are tested like it (tests/gpu/test_merge.cu, also
// emulated) and timed against it in one GPU run (bench/ab/merge_ab.cu), so a layout question is
// answered by measurement.
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
// What lory::merge_backward runs. Measured on an H200 (bf16, paper shapes, at e089aee): three
// blocks per SM instead of two made E = 8 1.2x faster; 16-expert units from E = 17 are a
// shared-memory model result (tests/emu/test_smem_banks.cpp), not yet timed.
using MergeBackwardTcDefault = MergeBackwardTcTuning<2, 1, 8, 1>;
// The variants, each with a name for the timing driver and the tests. None is faster than the
// default on a GPU yet: none has run on one (docs/gpu-results.md, "Pending").
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
// mma.sync knobs. Not in for_each_merge_backward_tc_variant, which runs on any sm_80+ device.
struct MergeBackwardWgmma {
  static constexpr const char* kName = "wgmma";
};
template <class Tuning>
struct is_wgmma_tuning : std::false_type {};
template <>
struct is_wgmma_tuning<MergeBackwardWgmma> : std::true_type {};
// Feature macros: this merge.cuh has the tuning knobs, and the wgmma tuning (bench/ab/merge_ab.cu
// builds against older ones).
#define LORY_MERGE_BACKWARD_TC_TUNING 1
#define LORY_MERGE_BACKWARD_WGMMA 1
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
// The copy side of a tensor-core backward kernel's pipeline (the mma.sync and the wgmma layouts;
// Cfg says where each 16-byte vector goes). It walks the block's steps -- (tile, chunk) in order --
// ahead of the compute side: each issue() copies the next step into the next stage, the G chunk
// (zero-filled past S and past P) and, for dW, its split routing weights (zero past S and past E in
// the workspace copy). Every call commits one group, empty past the last step, so wait_group
// counts steps. fetch_w() loads a W tile's rows into registers (zero past E and past P) and
// store_w() puts them in shared memory, so a tile's W travels during the previous tile.
// Per thread, everything but the step's position is fixed: its G vectors are one column vector of
// rows g_row, g_row + kGPassRows, ... of a chunk; its split-weight vectors are fixed offsets from
// the chunk's first segment. So a call only advances pointers and compares (the version that
// recomputed 64-bit addresses and tails per vector spent ~120 instructions per thread per step
// here, more than both products at E = 8).
// Both tensor-core kernels' dynamic shared memory, in this order: the W tile, kStages G chunks,
// kStages blocks of split weights, a dW staging block per warp, then the d_weights partial when it
// is on chip (Cfg's sizes).
template <class T, class Cfg>
struct MergeBackwardSmem {
  T* w;
  T* g;
  T* a;
  float* stage;  // this warp's
  unsigned char* partial;
  LORY_DEVICE explicit MergeBackwardSmem(unsigned char* smem)
      : w(reinterpret_cast<T*>(smem)),
        g(reinterpret_cast<T*>(smem + Cfg::kWBytes)),
        a(reinterpret_cast<T*>(smem + Cfg::kWBytes + Cfg::kStages * Cfg::kGBytes)),
        stage(reinterpret_cast<float*>(smem + Cfg::kWBytes + Cfg::kStages * (Cfg::kGBytes + Cfg::kABytes)) +
              (threadIdx.x / 32) * 16 * Cfg::kStageRow),
        partial(smem + Cfg::kFixedBytes) {}
};

// A position in a persistent block's walk over its steps: (tile, chunk) in order, tiles gridDim.x
// apart, and the pipeline stage the step uses. next() moves on and says whether a tile started.
struct MergeBackwardStep {
  int64_t tile = blockIdx.x, chunk = 0;
  int stage = 0;
  template <int kStages>
  LORY_DEVICE LORY_FORCEINLINE bool next(int64_t chunks) {
    stage = stage + 1 == kStages ? 0 : stage + 1;
    if (++chunk < chunks) return false;
    chunk = 0;
    tile += gridDim.x;
    return true;
  }
};

template <class T, class Cfg>
struct MergeBackwardCopier {
  static constexpr int V = Vec16<T>::kSize;
  const MergeBackwardParams<T>& p;
  T* const g_st;
  T* const a_st;
  const int64_t chunks;
  const int g_row, g_col, g_off;
  const int64_t g_pass, g_chunk;  // G strides between a thread's vectors and between chunks
  const T* g_src = nullptr;  // row g_row of the issue chunk, at this thread's column
  int g_bytes = 0;           // bytes of this thread's column vector in the issue tile (zero past P)
  const T* a_src[Cfg::kAVecs];  // split-weight vector j of the chunk at segment 0, or null
  int a_off[Cfg::kAVecs];
  MergeBackwardStep at;  // the next step to copy
  Vec16<T> w_pre[Cfg::kWVecs];

  LORY_DEVICE MergeBackwardCopier(const MergeBackwardParams<T>& prm, T* g_stages, T* a_stages, int64_t n_chunks)
      : p(prm), g_st(g_stages), a_st(a_stages), chunks(n_chunks), g_row(Cfg::g_vec_row(threadIdx.x)),
        g_col(Cfg::g_vec_col(threadIdx.x)), g_off(Cfg::g_vec_offset(threadIdx.x)),
        g_pass(Cfg::kGPassRows * prm.g_stride), g_chunk(Cfg::kChunk * prm.g_stride) {
#pragma unroll
    for (int j = 0; j < Cfg::kAVecs; ++j) {
      const int i = threadIdx.x + j * kMergeThreads;
      const bool used = p.dW != nullptr && i < Cfg::kAVecCount;
      a_src[j] = used ? p.a_split + (Cfg::a_vec_is_lo(i) * Cfg::kEP + Cfg::a_vec_row(i)) * p.a_stride + Cfg::a_vec_seg(i)
                      : nullptr;
      a_off[j] = Cfg::a_vec_offset(used ? i : 0);
    }
    if (at.tile < p.tiles) start_tile();
  }
  LORY_DEVICE LORY_FORCEINLINE void start_tile() {
    const int64_t col = at.tile * Cfg::kTileN + g_col;
    g_bytes = col < p.P ? int(sizeof(T)) * (p.P - col < V ? int(p.P - col) : V) : 0;
    g_src = p.G + g_row * p.g_stride + (col < p.P ? col : 0);
  }
  LORY_DEVICE LORY_FORCEINLINE void issue() {
    if (at.tile < p.tiles) {
      const int64_t s0 = at.chunk * Cfg::kChunk;
      T* gs = g_st + at.stage * Cfg::kGStageElems + g_off;
#pragma unroll
      for (int j = 0; j < Cfg::kGVecs; ++j) {
        const int bytes = s0 + g_row + j * Cfg::kGPassRows < p.S ? g_bytes : 0;
        cp_async_16(gs + j * Cfg::kGSmemStep, bytes ? g_src + j * g_pass : p.G, bytes);
      }
      T* as = a_st + at.stage * Cfg::kAStageElems;
#pragma unroll
      for (int j = 0; j < Cfg::kAVecs; ++j)
        if (a_src[j]) cp_async_16(as + a_off[j], a_src[j] + s0, 16);
      g_src += g_chunk;
      if (at.template next<Cfg::kStages>(chunks) && at.tile < p.tiles) start_tile();
    }
    cp_async_commit();
  }
  LORY_DEVICE LORY_FORCEINLINE void fetch_w(int64_t w_tile) {
#pragma unroll
    for (int j = 0; j < Cfg::kWVecs; ++j) {
      const int i = threadIdx.x + j * kMergeThreads;
      const int e = Cfg::w_vec_row(i);
      w_pre[j] = e < p.E ? load_row_vec<T, true>(p.W + e * p.w_stride, w_tile * Cfg::kTileN + Cfg::w_vec_col(i), p.P)
                         : zero_vec16<T>();
    }
  }
  LORY_DEVICE LORY_FORCEINLINE void store_w(T* w_s) const {
#pragma unroll
    for (int j = 0; j < Cfg::kWVecs; ++j)
      *reinterpret_cast<Vec16<T>*>(w_s + Cfg::w_vec_offset(threadIdx.x + j * kMergeThreads)) = w_pre[j];
  }
};

// The block's d_weights partial [S, E] in both tensor-core kernels: on chip at `smem` (rows
// swizzled, MergePartialLayout) or the block's slice of the workspace, zeroed at construction (its
// first reader is behind a barrier); nothing when d_weights is skipped. A thread updates only rows
// r with r % 8 == g (its fragment row), so its row XOR is fixed; an expert pair (e, e + 1) is one
// 8-byte access when E is even.
template <class T>
struct MergeBackwardPartial {
  const MergeBackwardParams<T>& p;
  const MergePartialLayout layout;
  float* const part;
  const int x;
  const bool even_e;
  LORY_DEVICE MergeBackwardPartial(const MergeBackwardParams<T>& prm, unsigned char* smem, int g)
      : p(prm),
        layout(MergePartialLayout::make(prm.E, prm.partial_in_smem)),
        part(!prm.want_de ? nullptr
             : prm.partial_in_smem ? reinterpret_cast<float*>(smem)
                                   : prm.partials + blockIdx.x * (prm.S * prm.E)),
        x(layout.xor_of(g)),
        even_e(prm.E % 2 == 0) {
    if (part)
      for (int64_t i = threadIdx.x; i < layout.size(p.S); i += kMergeThreads) part[i] = 0.f;
  }
  LORY_DEVICE LORY_FORCEINLINE float* row(int64_t s) const { return part + s * layout.stride; }
  // Adds (v0, v1) to experts e and e + 1 of `row` (those below E).
  LORY_DEVICE LORY_FORCEINLINE void add_pair(float* r, int e, float v0, float v1) const {
    if (even_e && e + 1 < p.E) {
      float2* q = reinterpret_cast<float2*>(r + (e ^ x));
      float2 v = *q;
      v.x += v0;
      v.y += v1;
      *q = v;
    } else {
      if (e < p.E) r[e ^ x] += v0;
      if (e + 1 < p.E) r[(e + 1) ^ x] += v1;
    }
  }
  LORY_DEVICE LORY_FORCEINLINE void flush() const { flush_backward_partial(p, part, p.S * p.E, layout); }
};

// dW[e, col .. col + 8) (+)= src[0 .. 8): a lane's 8 fp32 sums of one expert row from its warp's
// staging block, added to the old values in fp32 when accumulating; nothing past E or past P (both
// tensor-core kernels' epilogue; 16-byte aligned views).
template <class T>
LORY_DEVICE LORY_FORCEINLINE void store_dw_from_stage(const MergeBackwardParams<T>& p, const float* src, int e,
                                                      int64_t col) {
  constexpr int V = Vec16<T>::kSize;
  if (e >= p.E || col >= p.P) return;
  float f[V];
#pragma unroll
  for (int v = 0; v < V; ++v) f[v] = src[v];
  T* dst = p.dW + e * p.dw_stride;
  if (p.accumulate_dW) {
    float old[V];
    vec_to_float(load_row_vec<T, true>(dst, col, p.P), old);
#pragma unroll
    for (int v = 0; v < V; ++v) f[v] += old[v];
  }
  store_row_vec<T, true>(dst, col, p.P, float_to_vec<T>(f));
}
#endif  // LORY_HAS_DEVICE_CODE

#if LORY_HAS_DEVICE_CODE
template <class T, int kKSteps, int kStages, class Knobs>
// Knobs::kMinBlocks blocks per SM by registers: by default three (<= 80 registers) up to E = 16 and
// two (<= 128) above. E = 64 fits in 128 registers without spills since the weights are split once
// per launch (it needed ~230, one block per SM, before); that has not run on a GPU yet.
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

// ---------------------------------------------------------------------------
// Host side: plans (shared by the size query and the launch), then launchers.
// ---------------------------------------------------------------------------
template <class T>
inline bool merge_vec_io(const T* a, int64_t a_stride, const T* b, int64_t b_stride) {
  constexpr int64_t V = Vec16<T>::kSize;
  return is_aligned(a, 16) && is_aligned(b, 16) && a_stride % V == 0 && b_stride % V == 0;
}

// The current device's shared-memory limits.
inline Status device_smem_limits(MergeSmemLimits& limits) {
  int dev = 0, per_block = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return Status::kErrorNoDevice;
  if (cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
    return Status::kErrorCudaLaunch;
  limits.per_block = size_t(per_block);
  limits.per_sm = size_t(per_sm) > 4096 ? size_t(per_sm) - 4096 : 0;
  return Status::kSuccess;
}

inline Status device_compute_major(int& major) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return Status::kErrorNoDevice;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return Status::kErrorCudaLaunch;
  return Status::kSuccess;
}

template <class T>
constexpr bool merge_tc_supports(int E) {
  return is_mma_b16<T>::value && E >= 1 && E <= 64;
}

// Whether `kernel`, a tensor-core (mma.sync) kernel, can run here: an sm_80 or newer device, and
// the kernel compiled for sm_80 or newer. Code JIT-compiled for this device from older PTX (a
// build with compute_75 PTX only, say) has those kernels' bodies empty (LORY_MMA_AVAILABLE), so
// they would do nothing and report success. The kernels of one translation unit are built for the
// same architectures, so one stands for all.
inline Status device_runs_mma(const void* kernel, bool& runs) {
  runs = false;
  int major = 0;
  LORY_RETURN_IF_ERROR(device_compute_major(major));
  if (major < 8) return Status::kSuccess;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return Status::kErrorCudaLaunch;
  runs = attr.ptxVersion >= 80;
  return Status::kSuccess;
}

// Calls f(std::integral_constant<int, K>{}) with K = ceil(E / 16), the tensor-core kernels' kKSteps
// (E in 1..64), and returns its result; `otherwise` for any other E.
template <class R, class F>
R with_ksteps(int E, R otherwise, F&& f) {
  switch ((E + 15) / 16) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return otherwise;
  }
}

// S slices: when the slice's weights would not fit in shared memory, or when the
// P-tiles alone cannot fill the GPU. A slice is whole passes; W is read once per slice.
inline void merge_forward_slices(int64_t S, int64_t tiles, int64_t rows_per_pass, int64_t max_rows,
                                 int64_t& segs_per_slice, int64_t& slices) {
  const int64_t passes = (S + rows_per_pass - 1) / rows_per_pass;
  const int64_t max_passes = std::max<int64_t>(1, max_rows / rows_per_pass);
  int64_t want = tiles >= kMergeForwardTargetBlocks ? 1 : (kMergeForwardTargetBlocks + tiles - 1) / tiles;
  want = std::max<int64_t>(want, (passes + max_passes - 1) / max_passes);
  want = std::min<int64_t>(std::min<int64_t>(want, passes), 65535);
  segs_per_slice = (passes + want - 1) / want * rows_per_pass;
  slices = (S + segs_per_slice - 1) / segs_per_slice;
}

#if LORY_HAS_DEVICE_CODE
// smem_of(slice_rows) gives the kernel's dynamic shared memory for a slice.
// counters: where the tile counters of a dynamic-tile kernel go (one per slice, zeroed here on the
// stream), else null.
template <class T, class Kernel, class SmemOf>
Status launch_merge_forward(Kernel kernel, MergeForwardParams<T> prm, int64_t tile_width, int64_t rows_per_pass,
                            int64_t max_rows, SmemOf smem_of, cudaStream_t stream, void* counters = nullptr) {
  prm.tiles = (prm.P + tile_width - 1) / tile_width;
  int64_t slices = 1;
  merge_forward_slices(prm.S, prm.tiles, rows_per_pass, max_rows, prm.segs_per_slice, slices);
  const size_t smem = smem_of(prm.segs_per_slice);
  int64_t on_device = 0;
  LORY_RETURN_IF_ERROR(max_resident_blocks(kernel, kMergeThreads, smem, on_device));
  if (counters) {
    prm.tile_counters = static_cast<unsigned long long*>(counters);
    if (cudaMemsetAsync(counters, 0, size_t(slices) * sizeof(unsigned long long), stream) != cudaSuccess)
      return Status::kErrorCudaLaunch;
  }
  // Persistent over P-tiles: each block loads its slice's weights once and loops over tiles.
  const int64_t resident = std::max<int64_t>(1, on_device / slices);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(prm.tiles, resident)), static_cast<unsigned>(slices));
  launch_kernel(kernel, grid, dim3(kMergeThreads), smem, stream, prm);
  return check_launch();
}

// The tensor-core forward at kKSteps = ceil(E / 16), with Tuning's knobs for it; workspace holds
// the tile counters of a dynamic-tile tuning.
// limits: the device's (merge_forward_tc_fits has checked that the kernel fits there).
template <class T, bool kVecIO, class Tuning, int K>
Status merge_forward_tc_at(const MergeForwardParams<T>& prm, void* workspace, const MergeSmemLimits& limits,
                           cudaStream_t stream) {
  using Knobs = typename Tuning::template At<K>;
  using Cfg = MergeForwardTcConfig<T, K, Knobs>;
  return launch_merge_forward<T>(merge_forward_tc_kernel<T, kVecIO, K, Knobs>, prm, Cfg::kTileN, Cfg::kRowsPerPass,
                                 Cfg::max_rows(limits), [](int64_t rows) { return Cfg::smem_bytes(rows); }, stream,
                                 Knobs::kDynamicTiles ? workspace : nullptr);
}

template <class T, bool kVecIO, class Tuning>
Status merge_forward_tc(const MergeForwardParams<T>& prm, void* workspace, const MergeSmemLimits& limits,
                        cudaStream_t stream) {
  if constexpr (is_mma_b16<T>::value) {
    return with_ksteps(prm.E, Status::kErrorInvalidArgument, [&](auto k) {
      return merge_forward_tc_at<T, kVecIO, Tuning, decltype(k)::value>(prm, workspace, limits, stream);
    });
  } else {
    return Status::kErrorInvalidArgument;
  }
}
#endif  // LORY_HAS_DEVICE_CODE

// Workspace of the tensor-core forward's tile counters under Tuning (0 for static tiles): one
// counter per S slice, as launch_merge_forward cuts them. Host-only arithmetic.
template <class T, class Tuning, int K>
size_t merge_forward_tc_counter_bytes_at(int64_t S, int64_t P) {
  using Knobs = typename Tuning::template At<K>;
  using Cfg = MergeForwardTcConfig<T, K, Knobs>;
  if (!Knobs::kDynamicTiles) return 0;
  // Slices are cut at most this short on any device the kernel runs on (it has at least these limits).
  int64_t segs = 0, slices = 0;
  merge_forward_slices(S, (P + Cfg::kTileN - 1) / Cfg::kTileN, Cfg::kRowsPerPass, Cfg::max_rows(kMergeLeastSmemLimits),
                       segs, slices);
  return size_t(slices) * sizeof(unsigned long long);
}
template <class T, class Tuning>
size_t merge_forward_tc_counter_bytes(int64_t S, int E, int64_t P) {
  return with_ksteps(E, size_t(0),
                     [&](auto k) { return merge_forward_tc_counter_bytes_at<T, Tuning, decltype(k)::value>(S, P); });
}

// Whether Tuning's tensor-core forward at this E fits in a block's shared memory under `limits`
// (at least one pass of segments beside the W tiles). Every tuning here fits a 99 KiB device (512-
// param tiles stop at E = 32); a device with less takes the CUDA-core kernel under kAuto.
template <class T, class Tuning>
bool merge_forward_tc_fits(int E, const MergeSmemLimits& limits) {
  return with_ksteps(E, false, [&](auto k) {
    using Cfg = MergeForwardTcConfig<T, decltype(k)::value, typename Tuning::template At<decltype(k)::value>>;
    return Cfg::max_rows(limits) >= Cfg::kRowsPerPass;
  });
}

}  // namespace detail

// ===========================================================================
// Launchers
// ===========================================================================

template <class T>
Status merge_forward_can_implement(const MergeForwardArgs<T, float>& a) {
  static_assert(detail::is_gpu_storage<T>::value, "merge_forward: T must be float, __half or __nv_bfloat16");
  LORY_RETURN_IF_ERROR(validate(a));
  if (!detail::is_aligned(a.W, alignof(T)) || !detail::is_aligned(a.Wbar, alignof(T)) ||
      !detail::is_aligned(a.weights, alignof(float)))
    return Status::kErrorMisalignedPointer;
  return Status::kSuccess;
}

template <class T>
Status merge_backward_can_implement(const MergeBackwardArgs<T, float>& a) {
  static_assert(detail::is_gpu_storage<T>::value, "merge_backward: T must be float, __half or __nv_bfloat16");
  LORY_RETURN_IF_ERROR(validate(a));
  if (!detail::is_aligned(a.G, alignof(T)) || !detail::is_aligned(a.weights, alignof(float)) ||
      (a.dW && !detail::is_aligned(a.dW, alignof(T))) || (a.d_weights && !detail::is_aligned(a.W, alignof(T))) ||
      (a.d_weights && !detail::is_aligned(a.d_weights, alignof(float))))
    return Status::kErrorMisalignedPointer;
  return Status::kSuccess;
}

namespace detail {

// Four pipeline stages, or two where four would leave room for fewer blocks per SM than the knobs
// aim at (Knobs::kFitBlocks; by default two: e.g. S = 512, E = 32; S = 128, E = 64, whose on-chip
// partials are large): measured on an H200, one block with four stages was 9% slower at S = 512,
// E = 32 than the earlier kernel's two blocks with two chunks in flight.
// (tests/emu/test_smem_banks.cpp checks the blocks per SM this gives.)
// Knobs with tiles wider than 128 params fall back to 128 where even two stages would not fit.
struct MergeBackwardTcShape {
  int stages;
  size_t smem;  // dynamic shared memory per block
  int tile_n;   // params per tile
};
// Where even one block cannot hold four stages (an sm_80 at E = 64 with a 64 KiB partial on chip),
// two.
template <class T, int kKSteps, class Knobs = typename MergeBackwardTcDefault::template At<kKSteps>>
MergeBackwardTcShape merge_backward_tc_shape(int64_t S, int E, bool partial_in_smem,
                                             const MergeSmemLimits& limits = kMergeSm90SmemLimits) {
  const size_t limit = std::min(limits.per_sm / Knobs::kFitBlocks, limits.per_block);
  const size_t deep = MergeBackwardTcConfig<T, kKSteps, 4, Knobs>::smem_bytes(S, E, partial_in_smem);
  const size_t shallow = MergeBackwardTcConfig<T, kKSteps, 2, Knobs>::smem_bytes(S, E, partial_in_smem);
  if constexpr (Knobs::kTileN != 128) {
    if (shallow > limit)
      return merge_backward_tc_shape<T, kKSteps, MergeBackwardTcNarrow<Knobs>>(S, E, partial_in_smem, limits);
  }
  if ((deep > limit && shallow <= limit) || deep > limits.per_block) return {2, shallow, Knobs::kTileN};
  return {4, deep, Knobs::kTileN};
}

// The wgmma kernel's shape: the deepest pipeline (4, 3 or 2 stages) that keeps two blocks on an SM,
// else the deepest for one (always one above E = 32).
template <class T, int kKSteps>
MergeBackwardTcShape merge_backward_wgmma_shape(int64_t S, int E, bool partial_in_smem,
                                                const MergeSmemLimits& limits = kMergeSm90SmemLimits) {
  const size_t bytes[3] = {MergeBackwardWgmmaConfig<T, kKSteps, 4>::smem_bytes(S, E, partial_in_smem),
                           MergeBackwardWgmmaConfig<T, kKSteps, 3>::smem_bytes(S, E, partial_in_smem),
                           MergeBackwardWgmmaConfig<T, kKSteps, 2>::smem_bytes(S, E, partial_in_smem)};
  for (size_t blocks : {2, 1})
    for (int i = 0; i < 3; ++i)
      if (blocks == 1 || kKSteps <= 2)  // above E = 32 registers allow one block (the kernel's bounds)
      if (bytes[i] <= limits.per_sm / blocks && bytes[i] <= limits.per_block) return {4 - i, bytes[i], 128};
  return {2, bytes[2], 128};  // fits nowhere: the launch reports it
}

// The dynamic shared memory the fused backward launches with under `limits`: Tuning's kernel at
// this E (tensor cores) or the CUDA-core kernel, with or without the d_weights partial on chip.
template <class T, class Tuning>
size_t merge_backward_launch_smem(int64_t S, int E, bool tensor_core, int col_vecs, bool want_de,
                                  bool partial_in_smem, const MergeSmemLimits& limits) {
  if (!tensor_core) return MergeBackwardSimtConfig<T>::smem_bytes(S, E, col_vecs, want_de, partial_in_smem);
  if constexpr (is_mma_b16<T>::value) {
    return with_ksteps(E, SIZE_MAX, [&](auto k) -> size_t {
      constexpr int K = decltype(k)::value;
      if constexpr (is_wgmma_tuning<Tuning>::value)
        return merge_backward_wgmma_shape<T, K>(S, E, partial_in_smem, limits).smem;
      else
        return merge_backward_tc_shape<T, K, typename Tuning::template At<K>>(S, E, partial_in_smem, limits).smem;
    });
  }
  return SIZE_MAX;
}

// Workspace plan of the backward, computed without touching the device.
struct MergeBackwardPlan {
  int col_vecs = 0;
  int64_t tiles = 0;
  bool want_de = false;
  bool partial_in_smem = false;
  bool use_partials = false;  // per-block partials in the workspace + ordered reduction
  size_t partials_bytes = 0;  // at the start of the workspace, where reserved
  size_t split_bytes = 0;     // then the split routing weights (tensor cores with dW)
  int max_blocks = 0;
  size_t workspace_bytes = kMergeMinWorkspaceBytes;
};


// tensor_core: plan for merge_backward_tc_kernel (P-tiles of 128 params) instead of the SIMT kernel.
// The d_weights partial stays on chip where S * E allows (merge_backward_partial_fits) and the
// device has the shared memory for it (checked at launch, merge_backward_on_path); the fast mode
// then adds it atomically. Per-block partials in the workspace (and the ordered reduction) are used
// in the deterministic mode, and wherever the partial is not on chip. The workspace query reserves
// them also where the partial might not fit on the device of the call: the tensor-core kernel's on
// a 99 KiB device, the CUDA-core kernel's (which a tensor-core plan falls back to on a device or
// build without sm_80) on a 48 KiB one. Those reservations hold the CUDA-core plan's partials too
// (its tiles are at least as wide, so it has no more blocks).
template <class T, class Tuning = MergeBackwardTcDefault>
Status plan_merge_backward(const MergeBackwardArgs<T, float>& a, bool tensor_core, MergeBackwardPlan& plan) {
  plan = MergeBackwardPlan{};
  using Cfg = MergeBackwardSimtConfig<T>;
  plan.col_vecs = Cfg::col_vecs(a.experts);
  const int64_t tile_width = tensor_core ? int64_t(MergeBackwardTcConfig<T, 1>::kTileN) : int64_t(plan.col_vecs) * Cfg::kVec;
  plan.tiles = (a.params + tile_width - 1) / tile_width;
  plan.want_de = a.d_weights != nullptr;
  const int64_t SE = a.num_segments * a.experts;  // fits: validate() checked S * stride
  plan.partial_in_smem = plan.want_de && merge_backward_partial_fits(a.num_segments, a.experts, tensor_core);
  plan.use_partials = plan.want_de && (a.deterministic || !plan.partial_in_smem);
  plan.max_blocks = static_cast<int>(std::min<int64_t>(plan.tiles, kMergeBackwardMaxBlocks));
  auto off_chip = [&](bool tc, const MergeSmemLimits& least) {
    return merge_backward_launch_smem<T, Tuning>(a.num_segments, a.experts, tc, plan.col_vecs, true, true, least) >
           least.per_block;
  };
  const bool reserve = plan.use_partials || (plan.want_de && ((tensor_core && off_chip(true, kMergeLeastSmemLimits)) ||
                                                               off_chip(false, kMergeLeastSimtSmemLimits)));
  if (reserve) {
    if (!mul_fits(SE, int64_t(plan.max_blocks) * int64_t(sizeof(float)))) return Status::kErrorInvalidSize;
    plan.partials_bytes = align_up(size_t(SE) * plan.max_blocks * sizeof(float));
  }
  if (tensor_core && a.dW) plan.split_bytes = MergeBackwardSplitShape::of(a.num_segments, a.experts).bytes(sizeof(T));
  plan.workspace_bytes = std::max(plan.partials_bytes + plan.split_bytes, kMergeMinWorkspaceBytes);
  return Status::kSuccess;
}

#if LORY_HAS_DEVICE_CODE
// Tuning: the tensor-core kernel's knobs (MergeForwardTcDefault, or a variant: tests and bench/ab).
template <class T, class Tuning = MergeForwardTcDefault>
Status merge_forward_on_path(const MergeForwardArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                             cudaStream_t stream, MergePath path) {
  LORY_RETURN_IF_ERROR(merge_forward_can_implement(a));
  if (path == MergePath::kTensorCore && !merge_tc_supports<T>(a.experts)) return Status::kErrorInvalidArgument;
  // A dynamic-tile tuning's counters, wherever the tensor cores may run (an upper bound for kAuto).
  const size_t counter_bytes =
      path != MergePath::kSimt && merge_tc_supports<T>(a.experts)
          ? merge_forward_tc_counter_bytes<T, Tuning>(a.num_segments, a.experts, a.params)
          : 0;
  bool size_query = false;
  LORY_RETURN_IF_ERROR(workspace_protocol(workspace, workspace_bytes, std::max(kMergeMinWorkspaceBytes, counter_bytes),
                                          size_query, counter_bytes ? alignof(unsigned long long) : 1));
  if (size_query) return Status::kSuccess;

  MergeSmemLimits limits{};
  if (path == MergePath::kAuto || path == MergePath::kTensorCore) {
    bool mma = false;
    if constexpr (is_mma_b16<T>::value) {
      LORY_RETURN_IF_ERROR(device_runs_mma(
          reinterpret_cast<const void*>(merge_forward_tc_kernel<T, true, 1, typename Tuning::template At<1>>), mma));
      if (mma) {
        LORY_RETURN_IF_ERROR(device_smem_limits(limits));
        mma = merge_forward_tc_fits<T, Tuning>(a.experts, limits);
      }
    }
    if (path == MergePath::kTensorCore && !mma) return Status::kErrorInvalidArgument;
    // Tensor cores from E = 8 (K padded to 16): measured on an H200 (bf16, paper shapes), the
    // tensor-core kernel at E = 16 reached ~72% of copy bandwidth against ~50% for the CUDA-core
    // kernel at E = 8, and an mma with K padded to 16 costs the same at E = 8.
    if (path == MergePath::kAuto)
      path = (mma && merge_tc_supports<T>(a.experts) && a.experts >= 8) ? MergePath::kTensorCore : MergePath::kSimt;
  }
  MergeForwardParams<T> prm{};
  prm.S = a.num_segments;
  prm.E = a.experts;
  prm.P = a.params;
  prm.W = a.W;
  prm.w_stride = a.expert_stride;
  prm.weights = a.weights;
  prm.out = a.Wbar;
  prm.out_stride = a.segment_stride;
  const bool vec = merge_vec_io(a.W, a.expert_stride, a.Wbar, a.segment_stride);
  if (path == MergePath::kTensorCore) {
    prm.col_vecs = 32;
    return vec ? merge_forward_tc<T, true, Tuning>(prm, workspace, limits, stream)
               : merge_forward_tc<T, false, Tuning>(prm, workspace, limits, stream);
  }
  using Cfg = MergeForwardSimtConfig<T>;
  prm.col_vecs = Cfg::col_vecs(a.experts);
  const int E = a.experts, cg = prm.col_vecs;
  const int64_t tile_width = int64_t(cg) * Cfg::kVec;
  const int64_t rows = Cfg::rows_per_pass(cg);
  if (Cfg::weights_in_smem(E, cg, kMergeForwardWeightsSmem)) {
    auto smem_of = [E, cg](int64_t r) { return Cfg::smem_bytes(E, cg, r, true); };
    const int64_t max_rows = kMergeForwardWeightsSmem / Cfg::bytes_per_segment(E);
    return vec ? launch_merge_forward<T>(merge_forward_simt_kernel<T, true, true>, prm, tile_width, rows, max_rows,
                                         smem_of, stream)
               : launch_merge_forward<T>(merge_forward_simt_kernel<T, false, true>, prm, tile_width, rows, max_rows,
                                         smem_of, stream);
  }
  auto smem_of = [E, cg](int64_t r) { return Cfg::smem_bytes(E, cg, r, false); };
  return vec ? launch_merge_forward<T>(merge_forward_simt_kernel<T, true, false>, prm, tile_width, rows, INT64_MAX,
                                       smem_of, stream)
             : launch_merge_forward<T>(merge_forward_simt_kernel<T, false, false>, prm, tile_width, rows, INT64_MAX,
                                       smem_of, stream);
}

// Launches one of the backward kernels on a persistent grid: as many blocks as fit on the device
// at once (at most max_blocks), a fixed function of the device, so the deterministic reduction
// adds the per-block partials in the same order every run. blocks receives the grid size.
template <class Params>
Status launch_merge_backward_persistent(void (*kernel)(Params), const Params& prm, int max_blocks, size_t smem,
                                        int& blocks, cudaStream_t stream) {
  int64_t on_device = 0;
  LORY_RETURN_IF_ERROR(max_resident_blocks(kernel, kMergeThreads, smem, on_device));
  blocks = static_cast<int>(std::min<int64_t>(max_blocks, on_device));
  launch_kernel(kernel, dim3(blocks), dim3(kMergeThreads), smem, stream, prm);
  return check_launch();
}

template <class T, bool kVecIO, int kEPT>
Status launch_merge_backward_simt(const MergeBackwardParams<T>& prm, int max_blocks, size_t smem, int& blocks,
                                  cudaStream_t stream) {
  return launch_merge_backward_persistent(merge_backward_simt_kernel<T, kVecIO, kEPT>, prm, max_blocks, smem, blocks,
                                          stream);
}


// The plan counted 128-param tiles (its workspace holds the partials of that many blocks at most);
// a tuning with wider tiles has fewer, and no more blocks than tiles.
template <class T, int kKSteps, class Knobs>
Status launch_merge_backward_tc(MergeBackwardParams<T> prm, int max_blocks, bool partial_in_smem,
                                const MergeSmemLimits& limits, int& blocks, cudaStream_t stream) {
  const auto shape = merge_backward_tc_shape<T, kKSteps, Knobs>(prm.S, prm.E, partial_in_smem, limits);
  if constexpr (Knobs::kTileN != 128) {
    if (shape.tile_n == 128)
      return launch_merge_backward_tc<T, kKSteps, MergeBackwardTcNarrow<Knobs>>(prm, max_blocks, partial_in_smem, limits,
                                                                                blocks, stream);
  }
  prm.tiles = (prm.P + Knobs::kTileN - 1) / Knobs::kTileN;
  max_blocks = static_cast<int>(std::min<int64_t>(max_blocks, prm.tiles));
  return shape.stages == 2 ? launch_merge_backward_persistent(merge_backward_tc_kernel<T, kKSteps, 2, Knobs>, prm,
                                                              max_blocks, shape.smem, blocks, stream)
                           : launch_merge_backward_persistent(merge_backward_tc_kernel<T, kKSteps, 4, Knobs>, prm,
                                                              max_blocks, shape.smem, blocks, stream);
}

// The wgmma kernel runs where the device is sm_90 (compute capability 9.0, what sm_90a code needs)
// and the kernel was compiled for sm_90a: a build without it has an empty body that a static
// shared-memory marker gives away.
inline Status check_wgmma_kernel(const void* kernel) {
  bool has = false;
  LORY_RETURN_IF_ERROR(device_has_wgmma(has));
  if (!has) return Status::kErrorInvalidArgument;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return Status::kErrorCudaLaunch;
  if (attr.sharedSizeBytes != 0) return Status::kErrorInvalidArgument;
  return Status::kSuccess;
}

template <class T, int kKSteps>
Status launch_merge_backward_wgmma(const MergeBackwardParams<T>& prm, int max_blocks, bool partial_in_smem,
                                   const MergeSmemLimits& limits, int& blocks, cudaStream_t stream) {
  const auto shape = merge_backward_wgmma_shape<T, kKSteps>(prm.S, prm.E, partial_in_smem, limits);
  void (*kernel)(MergeBackwardParams<T>) = shape.stages == 4   ? merge_backward_wgmma_kernel<T, kKSteps, 4>
                                           : shape.stages == 3 ? merge_backward_wgmma_kernel<T, kKSteps, 3>
                                                               : merge_backward_wgmma_kernel<T, kKSteps, 2>;
  LORY_RETURN_IF_ERROR(check_wgmma_kernel(reinterpret_cast<const void*>(kernel)));
  return launch_merge_backward_persistent(kernel, prm, max_blocks, shape.smem, blocks, stream);
}

// Tuning: a set of mma.sync knobs per kKSteps, or MergeBackwardWgmma. limits: the device's, as the
// launcher placed the partial by them.
template <class T, int kKSteps, class Tuning>
Status launch_merge_backward_tuned(const MergeBackwardParams<T>& prm, int max_blocks, bool partial_in_smem,
                                   const MergeSmemLimits& limits, int& blocks, cudaStream_t stream) {
  if constexpr (is_wgmma_tuning<Tuning>::value)
    return launch_merge_backward_wgmma<T, kKSteps>(prm, max_blocks, partial_in_smem, limits, blocks, stream);
  else
    return launch_merge_backward_tc<T, kKSteps, typename Tuning::template At<kKSteps>>(prm, max_blocks, partial_in_smem,
                                                                                       limits, blocks, stream);
}

template <class T, class Tuning>
Status merge_backward_tc(const MergeBackwardParams<T>& prm, int max_blocks, bool partial_in_smem,
                         const MergeSmemLimits& limits, int& blocks, cudaStream_t stream) {
  if constexpr (is_mma_b16<T>::value) {
    return with_ksteps(prm.E, Status::kErrorInvalidArgument, [&](auto k) {
      return launch_merge_backward_tuned<T, decltype(k)::value, Tuning>(prm, max_blocks, partial_in_smem, limits, blocks,
                                                                        stream);
    });
  } else {
    return Status::kErrorInvalidArgument;
  }
}

// Path choice of the backward, before the device is asked: tensor cores (kAuto
// or kTensorCore) for 16-bit storage, E <= 64 and 16-byte aligned views (base
// and stride of every tensor it reads or writes); else CUDA cores. At launch,
// kAuto on a device older than sm_80 runs on CUDA cores too.
template <class T>
bool merge_backward_uses_tc(const MergeBackwardArgs<T, float>& a, MergePath path) {
  if (path == MergePath::kSimt || !merge_tc_supports<T>(a.experts)) return false;
  return merge_vec_io(a.G, a.grad_segment_stride, a.G, a.grad_segment_stride) &&
         (!a.d_weights || merge_vec_io(a.W, a.expert_stride, a.W, a.expert_stride)) &&
         (!a.dW || merge_vec_io(a.dW, a.dW_expert_stride, a.dW, a.dW_expert_stride));
}

// Tuning: the tensor-core kernel's knobs (MergeBackwardTcDefault, or a variant for tests and timing).
template <class T, class Tuning = MergeBackwardTcDefault>
Status merge_backward_on_path(const MergeBackwardArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                              cudaStream_t stream, MergePath path) {
  LORY_RETURN_IF_ERROR(merge_backward_can_implement(a));
  if (path == MergePath::kTensorCore && !merge_tc_supports<T>(a.experts)) return Status::kErrorInvalidArgument;
  bool tc = merge_backward_uses_tc(a, path);
  MergeBackwardPlan plan;
  LORY_RETURN_IF_ERROR((plan_merge_backward<T, Tuning>(a, tc, plan)));
  bool size_query = false;
  // Per-block partials in the workspace: the tensor-core kernels update them as float pairs.
  LORY_RETURN_IF_ERROR(workspace_protocol(workspace, workspace_bytes, plan.workspace_bytes, size_query,
                                          plan.partials_bytes ? alignof(float2) : 1));
  if (size_query) return Status::kSuccess;
  if (tc) {
    bool mma = false;
    if constexpr (is_mma_b16<T>::value)
      LORY_RETURN_IF_ERROR(device_runs_mma(
          reinterpret_cast<const void*>(merge_backward_tc_kernel<T, 1, 2, MergeBackwardTcDefault::At<1>>), mma));
    if (!mma) {
      if (path == MergePath::kTensorCore) return Status::kErrorInvalidArgument;
      // kAuto before sm_80 (or without sm_80 code): CUDA cores. Its plan needs no more workspace
      // than the one queried (plan_merge_backward reserves for it).
      tc = false;
      LORY_RETURN_IF_ERROR((plan_merge_backward<T, Tuning>(a, tc, plan)));
    }
  }
  // The device's shared memory, asked once: the partial stays on chip where it fits, else it goes
  // to the workspace; the tensor-core launch picks its shape by the same limits.
  MergeSmemLimits limits{};
  LORY_RETURN_IF_ERROR(device_smem_limits(limits));
  if (plan.partial_in_smem && merge_backward_launch_smem<T, Tuning>(a.num_segments, a.experts, tc, plan.col_vecs,
                                                                    plan.want_de, true, limits) > limits.per_block) {
    plan.partial_in_smem = false;
    plan.use_partials = true;
  }
  // Reserved by the query for every device the kernels run on; checked before anything is written.
  if ((plan.use_partials && !plan.partials_bytes) || plan.partials_bytes + plan.split_bytes > workspace_bytes)
    return fail(Status::kErrorWorkspaceTooSmall, "workspace_bytes", "below what this device's kernel needs");

  if constexpr (is_wgmma_tuning<Tuning>::value && is_mma_b16<T>::value) {
    // Refused before anything is written (the split weights, the fast mode's zeroing).
    if (tc) LORY_RETURN_IF_ERROR(check_wgmma_kernel(reinterpret_cast<const void*>(merge_backward_wgmma_kernel<T, 1, 2>)));
  }

  using Cfg = MergeBackwardSimtConfig<T>;
  MergeBackwardParams<T> prm{};
  prm.S = a.num_segments;
  prm.E = a.experts;
  prm.P = a.params;
  prm.G = a.G;
  prm.g_stride = a.grad_segment_stride;
  prm.W = plan.want_de ? a.W : nullptr;
  prm.w_stride = a.expert_stride;
  prm.weights = a.weights;
  prm.dW = a.dW;
  prm.dw_stride = a.dW_expert_stride;
  prm.accumulate_dW = a.accumulate_dW;
  prm.want_de = plan.want_de;
  prm.partial_in_smem = plan.partial_in_smem;
  prm.partials = plan.use_partials ? static_cast<float*>(workspace) : nullptr;
  prm.d_weights_atomic = (plan.want_de && !plan.use_partials) ? a.d_weights : nullptr;
  prm.col_vecs = plan.col_vecs;
  prm.tiles = plan.tiles;

  if (prm.d_weights_atomic && !a.accumulate_d_weights &&
      cudaMemsetAsync(a.d_weights, 0, size_t(a.num_segments) * a.experts * sizeof(float), stream) != cudaSuccess)
    return Status::kErrorCudaLaunch;

  // Vector I/O needs every tensor the kernel touches aligned (unused ones pass trivially).
  const bool vec = merge_vec_io(a.G, a.grad_segment_stride, a.G, a.grad_segment_stride) &&
                   (!prm.W || merge_vec_io(prm.W, prm.w_stride, prm.W, prm.w_stride)) &&
                   (!prm.dW || merge_vec_io(prm.dW, prm.dw_stride, prm.dW, prm.dw_stride));
  const size_t smem = Cfg::smem_bytes(a.num_segments, a.experts, plan.col_vecs, plan.want_de, plan.partial_in_smem);
  const int ept = tc ? 0 : Cfg::experts_per_thread(a.experts, plan.col_vecs);
  int blocks = 0;
  Status st = Status::kErrorInvalidArgument;
  if (tc && prm.dW) {
    const auto shape = MergeBackwardSplitShape::of(a.num_segments, a.experts);
    const uintptr_t at = reinterpret_cast<uintptr_t>(workspace) + plan.partials_bytes;
    T* split = reinterpret_cast<T*>((at + 15) / 16 * 16);
    const int64_t grid = std::min<int64_t>((int64_t(shape.ep) * shape.s_pad + kMergeThreads - 1) / kMergeThreads, 1024);
    launch_kernel(merge_backward_split_weights_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kMergeThreads), 0,
                  stream, a.weights, a.num_segments, a.experts, shape.ep, shape.s_pad, split);
    LORY_RETURN_IF_ERROR(check_launch());
    prm.a_split = split;
    prm.a_stride = shape.s_pad;
  }
  if (tc) st = merge_backward_tc<T, Tuning>(prm, plan.max_blocks, plan.partial_in_smem, limits, blocks, stream);
#define LORY_MERGE_BWD_CASE(EPT)                                                                    \
  case EPT:                                                                                          \
    st = vec ? launch_merge_backward_simt<T, true, EPT>(prm, plan.max_blocks, smem, blocks, stream)  \
             : launch_merge_backward_simt<T, false, EPT>(prm, plan.max_blocks, smem, blocks, stream); \
    break;
  switch (ept) {
    LORY_MERGE_BWD_CASE(1)
    LORY_MERGE_BWD_CASE(2)
    LORY_MERGE_BWD_CASE(4)
    LORY_MERGE_BWD_CASE(8)
    default: break;
  }
#undef LORY_MERGE_BWD_CASE
  LORY_RETURN_IF_ERROR(st);
  if (plan.use_partials) {
    const int64_t n = a.num_segments * a.experts;
    const int64_t grid = std::min<int64_t>((n + kMergeThreads - 1) / kMergeThreads, 4096);
    launch_kernel(merge_backward_reduce_kernel<kMergeThreads>, dim3(static_cast<unsigned>(grid)), dim3(kMergeThreads), 0,
                  stream, static_cast<const float*>(prm.partials), blocks, n, a.d_weights, a.accumulate_d_weights);
    LORY_RETURN_IF_ERROR(check_launch());
  }
  return Status::kSuccess;
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail

#if LORY_HAS_DEVICE_CODE
// Wbar = weights x W for every segment. Workspace: none needed (the query reports 16 bytes).
template <class T>
Status merge_forward(const MergeForwardArgs<T, float>& args, void* workspace, size_t& workspace_bytes,
                     cudaStream_t stream) {
  return detail::merge_forward_on_path(args, workspace, workspace_bytes, stream, detail::MergePath::kAuto);
}

// dW (+)= weights^T x G and d_weights (+)= G x W^T in one pass over G. Workspace:
// per-block d_weights partials (deterministic mode; in the fast mode too where S * E is
// large, or where the on-chip partial would not fit a 99 KiB-per-block device: the query
// does not ask the device), else 16 bytes (plus the split routing weights on tensor
// cores). Tensor cores for 16-bit storage, E <= 64 and 16-byte aligned views on sm_80+
// (kernels compiled for sm_80+); else CUDA cores. Shared memory is fitted to the device.
template <class T>
Status merge_backward(const MergeBackwardArgs<T, float>& args, void* workspace, size_t& workspace_bytes,
                      cudaStream_t stream) {
  return detail::merge_backward_on_path(args, workspace, workspace_bytes, stream, detail::MergePath::kAuto);
}
#endif  // LORY_HAS_DEVICE_CODE

LORY_NAMESPACE_END
