// lory (private), merge layer "pipeline pieces" of both tensor-core backward kernels (mma.sync and wgmma):
// the routing weights split into hi + lo operands once per launch (MergeBackwardSplitShape,
// merge_backward_split_weights_kernel), the shared-memory regions (MergeBackwardSmem), the walk over
// steps (MergeBackwardStep), the cp.async copy side (MergeBackwardCopier), the d_weights partial
// (MergeBackwardPartial) and the dW epilogue (store_dw_from_stage).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lory/detail/merge/backward_partial.cuh"
#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge/vec_io.cuh"
#include "lory/detail/merge_mma.cuh"

LORY_NAMESPACE_BEGIN
namespace detail {

// Shape of the split routing weights (MergeBackwardParams::a_split); its bytes in the workspace
// include 16 so that the copy can start 16-byte
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

#if LORY_HAS_DEVICE_CODE
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


// The copy side of a tensor-core backward kernel's pipeline (the mma.sync and the wgmma layouts;
// Cfg says where each 16-byte vector goes). It walks the block's steps -- (tile, chunk) in order --
// ahead of the compute side: each issue() copies the next step into the next stage, the G chunk
// (zero-filled past S and past P) and, for dW, its split routing weights (zero past S and past E in
// the workspace copy). Every call commits one group, empty past the last step, so wait_group
// counts steps. fetch_w() loads a W tile's rows into registers (zero past E and past P) and
// store_w() puts them in shared memory, so a tile's W travels during the previous tile.
// Per thread, everything but the step's position is fixed: its G vectors are one column vector of
// rows g_row, g_row + kGPassRows, ... of a chunk; its split-weight vectors are fixed offsets from
// the chunk's first segment. So a call only advances pointers and compares (recomputing 64-bit
// addresses and tails per vector would cost more instructions than both products at E = 8).
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
    g_src = p.G + g_row * p.g_stride + p.g_view.offset(col < p.P ? col : 0);
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
  // A thread's W-tile vectors share one column (w_vec_col has a period dividing the block), so one
  // view offset.
  LORY_HOST_DEVICE static constexpr bool w_cols_shared() {
    for (int i = 0; i < kMergeThreads; ++i)
      if (Cfg::w_vec_col(i + kMergeThreads) != Cfg::w_vec_col(i)) return false;
    return true;
  }
  LORY_DEVICE LORY_FORCEINLINE void fetch_w(int64_t w_tile) {
    static_assert(w_cols_shared(), "one W-tile column per thread");
    const int64_t col = w_tile * Cfg::kTileN + Cfg::w_vec_col(threadIdx.x);
    const int64_t off = p.w_view.offset(col);
#pragma unroll
    for (int j = 0; j < Cfg::kWVecs; ++j) {
      const int e = Cfg::w_vec_row(threadIdx.x + j * kMergeThreads);
      w_pre[j] = e < p.E ? load_view_vec<T, MergeIo::kVec>(p.W + e * p.w_stride, p.w_view, off, col, p.P) : zero_vec16<T>();
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
  const int64_t off = p.dw_view.offset(col);
  if (p.accumulate_dW) {
    float old[V];
    vec_to_float(load_view_vec<T, MergeIo::kVec>(dst, p.dw_view, off, col, p.P), old);
#pragma unroll
    for (int v = 0; v < V; ++v) f[v] += old[v];
  }
  store_view_vec<T, MergeIo::kVec>(dst, p.dw_view, off, col, p.P, float_to_vec<T>(f));
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
