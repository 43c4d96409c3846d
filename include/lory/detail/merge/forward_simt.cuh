// lory (private), merge layer "kernel": the forward on CUDA cores (any dtype, any E): its shared-memory
// shape (MergeForwardSimtConfig) and merge_forward_simt_kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge/vec_io.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------
// Forward, SIMT: thread (c, g) owns one 16-byte column vector c of the tile and
// kSegs consecutive segments of group g; the expert vector read from shared
// memory is reused for all kSegs segments (64 fp32 accumulators).
// ---------------------------------------------------------------------------
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
template <class T, MergeIo kIo, bool kWeightsSmem>
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
  // Vector i of a W tile is at column vector i % cg == c of expert i / cg (cg divides the block):
  // all of a thread's vectors of a tile share the view offset w_off(tile).
  auto w_off = [&](int64_t tile) { return merge_view_offset<kIo>(p.w_view, tile * cg * V + c * V); };
  auto load_w = [&](int64_t tile, int64_t off, int i) {
    const int e = i / cg;
    return load_view_vec<T, kIo>(p.W + e * p.w_stride, p.w_view, off, tile * cg * V + c * V, p.P);
  };
  const int tid = static_cast<int>(threadIdx.x);
  Vec16<T> pre[kPre];
  if (blockIdx.x < p.tiles) {
    const int64_t off = w_off(blockIdx.x);
#pragma unroll
    for (int j = 0; j < kPre; ++j)
      if (tid + j * kMergeThreads < E * cg) pre[j] = load_w(blockIdx.x, off, tid + j * kMergeThreads);
  }

  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    __syncthreads();  // the previous tile's readers are done with w_tile
#pragma unroll
    for (int j = 0; j < kPre; ++j)
      if (tid + j * kMergeThreads < E * cg) w_tile[tid + j * kMergeThreads] = pre[j];
    if (tid + kPre * kMergeThreads < E * cg) {
      const int64_t off = w_off(tile);
      for (int i = tid + kPre * kMergeThreads; i < E * cg; i += kMergeThreads) w_tile[i] = load_w(tile, off, i);
    }
    __syncthreads();
    const int64_t next = tile + gridDim.x;
    if (next < p.tiles) {
      const int64_t off = w_off(next);
#pragma unroll
      for (int j = 0; j < kPre; ++j)
        if (tid + j * kMergeThreads < E * cg) pre[j] = load_w(next, off, tid + j * kMergeThreads);
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
      const int64_t out_off = merge_view_offset<kIo>(p.out_view, col);  // here, not per tile: fewer registers over the FMAs
#pragma unroll
      for (int m = 0; m < kSegs; ++m) {
        const int64_t s = s0 + g * kSegs + m;
        if (s < s_end) store_view_vec<T, kIo>(p.out + s * p.out_stride, p.out_view, out_off, col, p.P, float_to_vec<T>(acc[m]));
      }
    }
  }
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
