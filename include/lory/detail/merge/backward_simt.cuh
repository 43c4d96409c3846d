// lory (private), merge layer "kernel": the backward on CUDA cores (any dtype, any E): its shared-memory
// shape (MergeBackwardSimtConfig) and merge_backward_simt_kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/merge/backward_partial.cuh"
#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge/vec_io.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------
// Backward, SIMT. Thread (c, r): column vector c of the tile; experts
// r, r + rows, ... (kEPT of them) for dW. Dot products for d_weights are
// spread over all threads, one (segment, expert) pair at a time.
// ---------------------------------------------------------------------------
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

#if LORY_HAS_DEVICE_CODE
template <class T, MergeIo kIo, int kEPT>
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
    const int64_t col = tile_col + c * V;  // every global vector of this thread (cg divides the block)
    __syncthreads();  // w_tile free; partial zeroing visible
    if (p.want_de) {
      const int64_t off = p.w_view.offset(col);
      for (int i = threadIdx.x; i < E * cg; i += kMergeThreads) {
        const int e = i / cg;
        w_tile[e * row_vecs + c] = load_view_vec<T, kIo>(p.W + e * p.w_stride, p.w_view, off, col, p.P);
      }
    }
    const int64_t g_off = p.g_view.offset(col);
    float acc[kEPT][V];
#pragma unroll
    for (int k = 0; k < kEPT; ++k)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[k][v] = 0.f;

    for (int64_t s0 = 0; s0 < p.S; s0 += kChunk) {
      const int sc = p.S - s0 < kChunk ? static_cast<int>(p.S - s0) : kChunk;
      __syncthreads();  // g_tile and w_chunk free
      for (int i = threadIdx.x; i < sc * cg; i += kMergeThreads) {
        const int r = i / cg;
        g_tile[r * row_vecs + c] = load_view_vec<T, kIo>(p.G + (s0 + r) * p.g_stride, p.g_view, g_off, col, p.P);
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
      const int64_t dw_off = p.dw_view.offset(col);
#pragma unroll
      for (int k = 0; k < kEPT; ++k) {
        const int e = r0 + k * rows;
        if (e < E) {
          T* dst = p.dW + e * p.dw_stride;
          if (p.accumulate_dW) {
            float old[V];
            vec_to_float(load_view_vec<T, kIo>(dst, p.dw_view, dw_off, col, p.P), old);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[k][v] += old[v];
          }
          store_view_vec<T, kIo>(dst, p.dw_view, dw_off, col, p.P, float_to_vec<T>(acc[k]));
        }
      }
    }
  }
  flush_backward_partial(p, part, SE, MergePartialLayout::make(p.E, false));
}

// The tensor-core backward's routing weights as operands, once per launch: hi[e][s] and lo[e][s]
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
