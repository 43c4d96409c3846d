// lory: the segment router on the GPU, forward and backward.
// Arguments, the exact semantics of the three routing modes and validation:
// lory/router.hpp; CPU twin: lory/reference/router.hpp.
//
// Forward, two kernels:
//   1. router_token_sum_kernel: sums of x over each averaged span (a segment,
//      or a whole sequence for prompt-level routing) for a 32*V-column slab of
//      d per block. Reading x (B*L*d) is the whole cost, so the pass moves
//      16-byte vectors when x and its rows are aligned, and splits long spans
//      into chunks of kRouterChunkTokens tokens (partial sums in the workspace)
//      so that few, long spans still fill the GPU.
//   2. router_probs_kernel, a block per router row: mean (fixed-order sum of
//      the chunks), logits against W_r (a warp per expert), block softmax,
//      then the routing weights the mode prescribes.
// Backward, up to four kernels:
//   1. router_dz_kernel, a block per router row: dp for the mode, softmax
//      backward, and v = W_r^T dz / |span| (the router path's dx per token).
//   2. router_dw_partial_kernel + router_dw_finalize_kernel: dW_r = sum_r dz_r
//      hbar_r^T and d_bias = sum_r dz_r (an extra column with hbar = 1), summed
//      over row chunks into the workspace, then the chunks in a fixed order.
//   3. router_dx_add_kernel: dx_t += v_span(t), vectorised, memory-bound.
// Every reduction has a fixed order (no atomics): the results are bitwise
// reproducible, whatever RouterBackwardArgs::deterministic says.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#if defined(__CUDACC__)  // CUB's block primitives need nvcc (the emulator has a stand-in: LORY_BLOCK_REDUCE)
#include <cub/block/block_reduce.cuh>
#endif

#include "lory/detail/cuda.cuh"
#include "lory/detail/validate.hpp"
#include "lory/math.hpp"
#include "lory/router.hpp"
#include "lory/shapes.hpp"

LORY_NAMESPACE_BEGIN

// Tokens summed by one block of the forward mean pass (longer spans are split).
constexpr int64_t kRouterChunkTokens = 256;

namespace device {

// Router rows as the kernels see them: segment r (causal) or sequence r
// (prompt-level), with the segment length clamped to L and the reciprocal span
// lengths rounded once on the host. Token and row indices stay below 2^31 on
// the GPU (router_gpu_checks), so divisions are 32-bit: 64-bit ones are slow
// subroutine calls.
struct RouterRows {
  int64_t seq_len, segment_len, per_seq;  // L, min(T, L), N
  bool prompt;
  float inv_full, inv_last;  // 1 / |span| of a full span and of a sequence's last segment

  static RouterRows make(const SegmentLayout& lay, bool prompt) {
    RouterRows r;
    r.seq_len = lay.seq_len;
    r.segment_len = lay.segment_len < lay.seq_len ? lay.segment_len : lay.seq_len;
    r.per_seq = (r.seq_len + r.segment_len - 1) / r.segment_len;
    r.prompt = prompt;
    const int64_t full = prompt ? r.seq_len : r.segment_len;
    const int64_t last = prompt ? r.seq_len : r.seq_len - (r.per_seq - 1) * r.segment_len;
    r.inv_full = 1.f / static_cast<float>(full);
    r.inv_last = 1.f / static_cast<float>(last);
    return r;
  }
};

// The span of router row r; k is the segment's index in its sequence (0 for
// prompt-level rows).
struct RouterSpan {
  int64_t begin, length, k;
  float inv_length;
};
LORY_DEVICE LORY_FORCEINLINE RouterSpan router_span(const RouterRows& g, int64_t r) {
  if (g.prompt) return {r * g.seq_len, g.seq_len, 0, g.inv_full};
  const int64_t b = static_cast<uint32_t>(r) / static_cast<uint32_t>(g.per_seq), k = r - b * g.per_seq;
  const bool last = k == g.per_seq - 1;
  return {b * g.seq_len + k * g.segment_len, last ? g.seq_len - k * g.segment_len : g.segment_len, k,
          last ? g.inv_last : g.inv_full};
}

LORY_HOST_DEVICE LORY_FORCEINLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LORY_HOST_DEVICE LORY_FORCEINLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// max that propagates NaN from either side, like lory::softmax on the host.
struct NanMax {
  LORY_DEVICE LORY_FORCEINLINE float operator()(float a, float b) const {
    return (a > b || a != a) ? a : b;
  }
};

struct MaxOp {
  LORY_DEVICE LORY_FORCEINLINE float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  LORY_DEVICE LORY_FORCEINLINE float operator()(float a, float b) const { return fminf(a, b); }
};

// Block-cooperative column sums over a slab of tokens: a [kRows x 32] thread
// block, lane l owns the V columns [col0 + l*V, col0 + l*V + V) and thread row
// y the tokens y, y + kRows, ... The kRows partial sums are combined in a fixed
// order through the caller-owned TempStorage. V > 1 loads 16-byte vectors and
// needs x and every row 16-byte aligned (d a multiple of V).
template <class T, int V, int kRows>
struct BlockTokenSum {
  struct TempStorage {
    float partial[kRows][V][32];  // [row][element][lane]: conflict-free
  };

  LORY_DEVICE LORY_FORCEINLINE explicit BlockTokenSum(TempStorage& storage) : s_(storage) {}

  // Sums x[t * d + c] over t in [0, ntok) for the lane's columns; the result
  // is valid in thread row 0. Ends with a barrier: the storage may be reused.
  LORY_DEVICE LORY_FORCEINLINE void sum(const T* x, int64_t d, int64_t col0, int64_t ntok,
                                        float (&out)[V]) {
    const int lane = threadIdx.x, row = threadIdx.y;
    const int64_t col = col0 + static_cast<int64_t>(lane) * V;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    if (col < d) {
      const T* p = x + row * d + col;
      const int64_t step = kRows * d;
#pragma unroll 2
      for (int64_t t = row; t < ntok; t += kRows, p += step) {
        if constexpr (V > 1) {
          const detail::Vec16<T> v = detail::load_vec16_stream(p);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += to_float(v.v[i]);
        } else {
          acc[0] += to_float(*p);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) s_.partial[row][i][lane] = acc[i];
    __syncthreads();
    if (row == 0) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float r = s_.partial[0][i][lane];
#pragma unroll
        for (int k = 1; k < kRows; ++k) r += s_.partial[k][i][lane];
        out[i] = r;
      }
    }
    __syncthreads();
  }

 private:
  TempStorage& s_;
};

// Block-cooperative softmax and softmax backward over n <= kMaxExperts values
// held in shared memory (one router row). Fixed-order block reductions.
template <int kThreads>
struct BlockRowSoftmax {
  using Reduce = LORY_BLOCK_REDUCE(float, kThreads);  // cub::BlockReduce (lory/detail/emulation.hpp)
  struct TempStorage {
    typename Reduce::TempStorage reduce;
    float first, second;
  };

  LORY_DEVICE LORY_FORCEINLINE explicit BlockRowSoftmax(TempStorage& storage) : s_(storage) {}

  // v <- softmax(v), in place; max subtracted first, NaN propagates. Ends with a barrier.
  LORY_DEVICE LORY_FORCEINLINE void forward(float* v, int n) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += kThreads) m = NanMax{}(m, v[i]);
    m = Reduce(s_.reduce).Reduce(m, NanMax{});
    if (threadIdx.x == 0) s_.first = m;
    __syncthreads();
    m = s_.first;
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const float e = softmax_term(v[i], m);  // +Inf logits: the one-hot limit, as lory::softmax
      v[i] = e;
      sum += e;
    }
    sum = Reduce(s_.reduce).Sum(sum);
    if (threadIdx.x == 0) s_.second = sum;
    __syncthreads();
    const float inv = __fdividef(1.f, s_.second);  // sum in [1, n]: no slow path needed
    for (int i = threadIdx.x; i < n; i += kThreads) v[i] *= inv;
    __syncthreads();
  }

  // dz_i = p_i * (dp_i - <p, dp>) in lory::softmax_backward's cancellation-free form: dp shifted by
  // dp_m of the most probable expert m (the lowest index of the largest p). dz may alias dp.
  // p and dp in shared memory. Ends with a barrier.
  LORY_DEVICE LORY_FORCEINLINE void backward(const float* p, const float* dp, float* dz, int n) {
    float pm = -INFINITY;
    for (int i = threadIdx.x; i < n; i += kThreads) pm = fmaxf(pm, p[i]);
    pm = Reduce(s_.reduce).Reduce(pm, MaxOp{});
    if (threadIdx.x == 0) s_.first = pm;
    __syncthreads();
    pm = s_.first;
    float first = static_cast<float>(n);  // indices < 256 are exact in float
    for (int i = threadIdx.x; i < n; i += kThreads)
      if (p[i] == pm) first = fminf(first, static_cast<float>(i));
    first = Reduce(s_.reduce).Reduce(first, MinOp{});
    if (threadIdx.x == 0) s_.second = dp[first < static_cast<float>(n) ? static_cast<int>(first) : 0];
    __syncthreads();
    const float c = s_.second;
    float dot = 0.f;
    for (int i = threadIdx.x; i < n; i += kThreads) dot += p[i] * (dp[i] - c);
    dot = Reduce(s_.reduce).Sum(dot);
    if (threadIdx.x == 0) s_.first = dot;
    __syncthreads();
    dot = s_.first;
    for (int i = threadIdx.x; i < n; i += kThreads) dz[i] = p[i] * ((dp[i] - c) - dot);
    __syncthreads();
  }

 private:
  TempStorage& s_;
};

// Deterministic warp sum (butterfly): every lane gets the same value.
LORY_DEVICE LORY_FORCEINLINE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace device

namespace detail {
constexpr int kRouterSumRows = 8;      // token rows of the mean pass's [8 x 32] block
constexpr int kRouterThreads = 256;    // per-row kernels
constexpr int kRouterDwThreads = 128;  // columns per dW_r partial block
constexpr int kRouterDwExperts = 8;    // experts per dW_r partial thread (registers)
constexpr int64_t kRouterDwMaxChunks = 64;

struct RouterForwardPlan {
  bool prompt;
  int64_t rows, chunks;  // router rows, token chunks per row
  size_t partial_bytes;  // [rows * chunks, d] fp32 when chunks > 1
  size_t bytes;
};

template <class T>
RouterForwardPlan plan_router_forward(const RouterForwardArgs<T, float>& a) {
  RouterForwardPlan p{};
  p.prompt = a.mode == RoutingMode::kPromptLevel;
  p.rows = router_rows(a);
  const int64_t span = p.prompt ? a.layout.seq_len : std::min(a.layout.seq_len, a.layout.segment_len);
  p.chunks = ceil_div(span, kRouterChunkTokens);
  WorkspaceCarver c{nullptr};
  if (a.mode != RoutingMode::kGivenWeights && p.chunks > 1)
    c.take<float>(p.rows, p.chunks, a.d);
  p.bytes = c.offset;
  return p;
}

struct RouterBackwardPlan {
  bool prompt;
  int64_t rows;
  int64_t dw_chunks, dw_rows_per_chunk;  // row chunks of the dW_r / d_bias reduction
  int64_t col_begin, col_end;            // columns of [dW_r | d_bias] computed
  size_t bytes;
};

template <class T>
RouterBackwardPlan plan_router_backward(const RouterBackwardArgs<T, float>& a) {
  RouterBackwardPlan p{};
  p.prompt = a.mode == RoutingMode::kPromptLevel;
  p.rows = p.prompt ? a.layout.batch : a.layout.num_segments();
  p.dw_chunks = std::min(ceil_div<int64_t>(p.rows, 16), kRouterDwMaxChunks);
  p.dw_rows_per_chunk = ceil_div(p.rows, p.dw_chunks);
  p.col_begin = a.dW_r ? 0 : a.d;
  p.col_end = a.d_bias ? a.d + 1 : a.d;
  if (a.mode == RoutingMode::kGivenWeights) return p;  // nothing to do, no workspace
  WorkspaceCarver c{nullptr};
  c.take<float>(p.rows, a.experts);         // dz
  if (a.dx) c.take<float>(p.rows, a.d);     // v
  if (a.dW_r || a.d_bias)
    c.take<float>(p.dw_chunks, a.experts, a.d + 1);  // partials
  p.bytes = c.offset;
  return p;
}

inline unsigned grid_cap(int64_t n, int64_t cap = INT_MAX) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(n, cap)));
}
}  // namespace detail

// ---- forward kernels --------------------------------------------------------------------

// out[(r * chunks + c), :] = sum of x over chunk c of router row r's span
// (zero for a chunk past the end of a short span). grid.x: (row, chunk),
// grid.y: 32*V-column slabs of d; both grid-strided.
template <class T, int V>
LORY_KERNEL void __launch_bounds__(32 * detail::kRouterSumRows)
    router_token_sum_kernel(const T* __restrict__ x, int64_t d, device::RouterRows geo,
                            int64_t rows, int64_t chunks, float* __restrict__ out) {
  using Sum = device::BlockTokenSum<T, V, detail::kRouterSumRows>;
  LORY_BLOCK_SHARED(typename Sum::TempStorage, storage);
  const int64_t width = 32 * V;
  const int64_t slabs = ceil_div(d, width);
  for (int64_t rc = blockIdx.x; rc < rows * chunks; rc += gridDim.x) {
    const int64_t r = static_cast<uint32_t>(rc) / static_cast<uint32_t>(chunks), c = rc - r * chunks;
    const device::RouterSpan span = device::router_span(geo, r);
    const int64_t t0 = c * kRouterChunkTokens;
    const int64_t ntok = device::max64(0, device::min64(span.length - t0, kRouterChunkTokens));
    const T* xs = x + (span.begin + device::min64(t0, span.length)) * d;
    for (int64_t slab = blockIdx.y; slab < slabs; slab += gridDim.y) {
      float acc[V] = {};  // set in thread row 0 by sum()
      Sum(storage).sum(xs, d, slab * width, ntok, acc);
      if (threadIdx.y == 0) {
        const int64_t col = slab * width + static_cast<int64_t>(threadIdx.x) * V;
        float* o = out + rc * d + col;
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (col + i < d) o[i] = acc[i];
      }
    }
  }
}

// A block per router row r: hbar = (sum of the chunk sums) / |span|, logits =
// W_r hbar (+ bias), probs = softmax(logits), and the routing weights rows
// that take their values from row r. `sums` may be hbar itself (one chunk).
// V > 1: 16-byte loads of W_r and hbar (both aligned, d a multiple of V); the
// per-expert dot products are latency-bound, so fewer, wider loads matter.
template <class T, int V>
LORY_KERNEL void __launch_bounds__(detail::kRouterThreads)
    router_probs_kernel(const float* sums, int64_t chunks, const T* __restrict__ W_r,
                        const float* __restrict__ bias, int64_t d, int E, device::RouterRows geo,
                        int64_t rows, float* hbar, float* __restrict__ probs,
                        float* __restrict__ weights) {
  constexpr int kThreads = detail::kRouterThreads;
  using Softmax = device::BlockRowSoftmax<kThreads>;
  LORY_BLOCK_SHARED(typename Softmax::TempStorage, storage);
  LORY_BLOCK_SHARED(float[kMaxExperts], row_probs);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t N = geo.per_seq;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const device::RouterSpan span = device::router_span(geo, r);
    const float inv_len = span.inv_length;
    float* h = hbar + r * d;
    for (int64_t c = threadIdx.x; c < d; c += kThreads) {
      const float* s = sums + r * chunks * d + c;
      float acc = s[0];
#pragma unroll 1
      for (int64_t k = 1; k < chunks; ++k) acc += s[k * d];
      h[c] = acc * inv_len;
    }
    __syncthreads();  // hbar row written by the block, read below by other threads
    for (int e = warp; e < E; e += kThreads / 32) {
      const T* w = W_r + static_cast<int64_t>(e) * d;
      float acc = 0.f;
      if constexpr (V > 1) {
#pragma unroll 1
        for (int64_t c = static_cast<int64_t>(lane) * V; c < d; c += 32 * V) {
          const detail::Vec16<T> wv = detail::load_vec16(w + c);
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            const float4 hv = reinterpret_cast<const float4*>(h + c)[q];
            acc += to_float(wv.v[4 * q]) * hv.x + to_float(wv.v[4 * q + 1]) * hv.y +
                   to_float(wv.v[4 * q + 2]) * hv.z + to_float(wv.v[4 * q + 3]) * hv.w;
          }
        }
      } else {
        for (int64_t c = lane; c < d; c += 32) acc += to_float(w[c]) * h[c];
      }
      acc = device::warp_sum(acc);
      if (lane == 0) row_probs[e] = acc + (bias ? bias[e] : 0.f);
    }
    __syncthreads();
    Softmax(storage).forward(row_probs, E);
    for (int e = threadIdx.x; e < E; e += kThreads) probs[r * E + e] = row_probs[e];
    if (geo.prompt) {
      // p_b is the routing weight of every segment of sequence b.
#pragma unroll 1
      for (int64_t k = 0; k < N; ++k)
        for (int e = threadIdx.x; e < E; e += kThreads) weights[(r * N + k) * E + e] = row_probs[e];
    } else {
      // Segment k+1 uses p_k; segment 0 also uses its own p_0 (stop-gradient).
      const int64_t k = span.k;
      for (int e = threadIdx.x; e < E; e += kThreads) {
        if (k == 0) weights[r * E + e] = row_probs[e];
        if (k + 1 < N) weights[(r + 1) * E + e] = row_probs[e];
      }
    }
    __syncthreads();  // row_probs is rewritten by the next row
  }
}

// ---- backward kernels -------------------------------------------------------------------

// A block per router row r: dp for the mode, dz = softmax_backward(p, dp) into
// dz_out [rows, E], and, when v is non-null, v_r = W_r^T dz_r / |span|
// (a thread per V columns; V > 1 needs W_r rows 16-byte aligned).
template <class T, int V>
LORY_KERNEL void __launch_bounds__(detail::kRouterThreads)
    router_dz_kernel(const float* __restrict__ probs, const float* __restrict__ d_weights,
                     const T* __restrict__ W_r, int64_t d, int E, device::RouterRows geo,
                     int64_t rows, float* __restrict__ dz_out, float* __restrict__ v) {
  constexpr int kThreads = detail::kRouterThreads;
  using Softmax = device::BlockRowSoftmax<kThreads>;
  LORY_BLOCK_SHARED(typename Softmax::TempStorage, storage);
  LORY_BLOCK_SHARED(float[kMaxExperts], p);
  LORY_BLOCK_SHARED(float[kMaxExperts], dz);
  const int64_t N = geo.per_seq;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    // The causal last segment's p feeds nothing: dp = 0 there.
    const device::RouterSpan span = device::router_span(geo, r);
    const bool feeds = geo.prompt || span.k + 1 < N;
    for (int e = threadIdx.x; e < E; e += kThreads) {
      p[e] = probs[r * E + e];
      float g = 0.f;
      if (geo.prompt) {
        for (int64_t k = 0; k < N; ++k) g += d_weights[(r * N + k) * E + e];
      } else if (feeds) {
        g = d_weights[(r + 1) * E + e];
      }
      dz[e] = g;
    }
    __syncthreads();
    Softmax(storage).backward(p, dz, dz, E);
    for (int e = threadIdx.x; e < E; e += kThreads) dz_out[r * E + e] = dz[e];
    if (v && feeds) {
      const float inv_len = span.inv_length;
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < d; c += kThreads * V) {
        float acc[V];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll 4
        for (int e = 0; e < E; ++e) {
          const T* w = W_r + static_cast<int64_t>(e) * d + c;
          if constexpr (V > 1) {
            const detail::Vec16<T> wv = detail::load_vec16(w);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] += to_float(wv.v[i]) * dz[e];
          } else {
            acc[0] += to_float(w[0]) * dz[e];
          }
        }
        float* out = v + r * d + c;  // workspace: 16-byte aligned rows when V > 1
#pragma unroll
        for (int q = 0; q < (V + 3) / 4; ++q) {
          if constexpr (V > 1) {
            reinterpret_cast<float4*>(out)[q] = make_float4(acc[4 * q] * inv_len, acc[4 * q + 1] * inv_len,
                                                            acc[4 * q + 2] * inv_len, acc[4 * q + 3] * inv_len);
          } else {
            out[0] = acc[0] * inv_len;
          }
        }
      }
    }
    __syncthreads();  // p, dz are rewritten by the next row
  }
}

// partial[chunk, e, c] = sum over the chunk's rows of dz[r, e] * h[r, c], with
// h[r, d] = 1 (the d_bias column). grid = (column blocks from col_begin,
// expert groups of G, row chunks). A template (like every kernel here) so the
// header can be included by many translation units.
template <int G>
LORY_KERNEL void __launch_bounds__(detail::kRouterDwThreads)
    router_dw_partial_kernel(const float* __restrict__ dz, const float* __restrict__ hbar, int64_t d,
                             int E, int64_t rows, int64_t rows_per_chunk, int64_t col_begin,
                             int64_t col_end, float* __restrict__ partial) {
  const int64_t c = col_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int e0 = blockIdx.y * G;
  const int64_t chunk = blockIdx.z;
  if (c >= col_end) return;
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = device::min64(rows, r_begin + rows_per_chunk);
  float acc[G];
#pragma unroll
  for (int j = 0; j < G; ++j) acc[j] = 0.f;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float h = c < d ? hbar[r * d + c] : 1.f;
    const float* z = dz + r * E + e0;
#pragma unroll
    for (int j = 0; j < G; ++j)
      if (e0 + j < E) acc[j] += z[j] * h;
  }
  float* out = partial + (chunk * E + e0) * (d + 1) + c;
#pragma unroll
  for (int j = 0; j < G; ++j)
    if (e0 + j < E) out[static_cast<int64_t>(j) * (d + 1)] = acc[j];
}

// dW_r[e, c] (+)= sum over chunks of partial[chunk, e, c] in chunk order;
// column d of the partials is d_bias. grid.y: experts; grid.x: columns, strided.
template <class T>
LORY_KERNEL void __launch_bounds__(detail::kRouterThreads)
    router_dw_finalize_kernel(const float* __restrict__ partial, int64_t chunks, int64_t d, int E,
                              int64_t col_begin, int64_t col_end, T* dW_r, bool accumulate_dW_r,
                              float* d_bias, bool accumulate_d_bias) {
  const int64_t plane = static_cast<int64_t>(E) * (d + 1);
  const int64_t e = blockIdx.y;
  for (int64_t c = col_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       c < col_end; c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* s = partial + e * (d + 1) + c;
    float acc = s[0];
    for (int64_t k = 1; k < chunks; ++k) acc += s[k * plane];
    if (c < d) {
      T& out = dW_r[e * d + c];
      out = from_float<T>(accumulate_dW_r ? to_float(out) + acc : acc);
    } else {
      float& out = d_bias[e];
      out = accumulate_d_bias ? out + acc : acc;
    }
  }
}

// dx[t, :] += v[span(t), :] for every token whose span feeds the router (the
// causal last segment gets exactly zero and is skipped). A [by x bx] block: bx
// lanes over the V-element vectors of a row, by tokens; grid-strided over tokens.
template <class T, int V>
LORY_KERNEL void __launch_bounds__(detail::kRouterThreads)
    router_dx_add_kernel(T* dx, const float* __restrict__ v, int64_t d, device::RouterRows geo,
                         int64_t tokens) {
  const int64_t N = geo.per_seq;
  const int64_t nvec = d / V;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = static_cast<uint32_t>(t) / static_cast<uint32_t>(geo.seq_len);
    const int64_t k = static_cast<uint32_t>(t - b * geo.seq_len) /
                      static_cast<uint32_t>(geo.segment_len);
    if (!geo.prompt && k == N - 1) continue;  // dz = 0 there
    const int64_t r = geo.prompt ? b : b * N + k;
    T* row = dx + t * d;
    const float* vr = v + r * d;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      if constexpr (V > 1) {
        detail::Vec16<T> x = detail::load_vec16(row + j * V);
        float add[V];
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const float4 f = reinterpret_cast<const float4*>(vr + j * V)[q];
          add[4 * q] = f.x; add[4 * q + 1] = f.y; add[4 * q + 2] = f.z; add[4 * q + 3] = f.w;
        }
#pragma unroll
        for (int i = 0; i < V; ++i) x.v[i] = from_float<T>(to_float(x.v[i]) + add[i]);
        detail::store_vec16(row + j * V, x);
      } else {
        row[j] = from_float<T>(to_float(row[j]) + vr[j]);
      }
    }
  }
}

// ---- launchers --------------------------------------------------------------------------

namespace detail {
template <class T>
Status router_gpu_checks(int64_t d, int64_t num_tokens) {
  static_assert(is_gpu_storage<T>::value, "lory GPU kernels take float, __half or __nv_bfloat16");
  // Column counts ride in grid dimensions; token and row indices are divided
  // in 32 bits (64-bit divisions are slow subroutine calls on the GPU).
  if (d >= (int64_t(1) << 31) - 1) return fail(Status::kErrorInvalidSize, "d", "past the GPU kernels' 2^31 - 1");
  if (num_tokens >= (int64_t(1) << 31))
    return fail(Status::kErrorInvalidSize, "layout", "B * L past the GPU kernels' 2^31 tokens");
  return Status::kSuccess;
}

template <class T>
bool rows_are_vec16(const T* p, int64_t d) {
  return is_aligned16(p) && (d * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}
}  // namespace detail

template <class T>
Status router_forward_can_implement(const RouterForwardArgs<T, float>& args) {
  LORY_RETURN_IF_ERROR(validate(args));
  return detail::router_gpu_checks<T>(args.mode == RoutingMode::kGivenWeights ? 1 : args.d,
                                     args.layout.num_tokens());
}

// Segment means, router probabilities and routing weights (see router.hpp).
// Workspace: [rows * chunks, d] fp32 partial sums when a span is longer than
// kRouterChunkTokens tokens; none otherwise.
template <class T>
Status router_forward(const RouterForwardArgs<T, float>& args, void* workspace,
                      size_t& workspace_bytes, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(router_forward_can_implement(args));
  const detail::RouterForwardPlan plan = detail::plan_router_forward(args);
  bool size_query = false;
  // fp32 partial sums in the workspace when a span needs them.
  LORY_RETURN_IF_ERROR(detail::workspace_protocol(workspace, workspace_bytes, plan.bytes, size_query,
                                                  plan.chunks > 1 ? alignof(float) : 1));
  if (size_query) return Status::kSuccess;

  const int E = args.experts;
  if (args.mode == RoutingMode::kGivenWeights) {
    if (args.weights == args.given_weights) return Status::kSuccess;
    const size_t bytes = static_cast<size_t>(args.layout.num_segments()) * E * sizeof(float);
    if (cudaMemcpyAsync(args.weights, args.given_weights, bytes, cudaMemcpyDeviceToDevice, stream) !=
        cudaSuccess)
      return Status::kErrorCudaLaunch;
    return detail::check_launch();
  }

  const int64_t d = args.d;
  const device::RouterRows geo = device::RouterRows::make(args.layout, plan.prompt);
  detail::WorkspaceCarver carve{static_cast<unsigned char*>(workspace)};
  float* sums = plan.chunks > 1 ? carve.take<float>(plan.rows, plan.chunks, d)
                                : args.hbar;
  constexpr int V = detail::Vec16<T>::kSize;
  const dim3 block(32, detail::kRouterSumRows);
  const unsigned gx = detail::grid_cap(plan.rows * plan.chunks);
  if (detail::rows_are_vec16(args.x, d)) {
    const dim3 grid(gx, detail::grid_cap(ceil_div<int64_t>(d, 32 * V), 65535));
    detail::launch_kernel(router_token_sum_kernel<T, V>, grid, block, 0, stream, args.x, d, geo, plan.rows, plan.chunks,
                          sums);
  } else {
    const dim3 grid(gx, detail::grid_cap(ceil_div<int64_t>(d, 32), 65535));
    detail::launch_kernel(router_token_sum_kernel<T, 1>, grid, block, 0, stream, args.x, d, geo, plan.rows, plan.chunks,
                          sums);
  }
  LORY_RETURN_IF_ERROR(detail::check_launch());
  const dim3 pgrid(detail::grid_cap(plan.rows));
  if (detail::rows_are_vec16(args.W_r, d) && detail::is_aligned16(args.hbar))
    detail::launch_kernel(router_probs_kernel<T, V>, pgrid, detail::kRouterThreads, 0, stream,
        sums, plan.chunks, args.W_r, args.bias, d, E, geo, plan.rows, args.hbar, args.probs, args.weights);
  else
    detail::launch_kernel(router_probs_kernel<T, 1>, pgrid, detail::kRouterThreads, 0, stream,
        sums, plan.chunks, args.W_r, args.bias, d, E, geo, plan.rows, args.hbar, args.probs, args.weights);
  return detail::check_launch();
}

template <class T>
Status router_backward_can_implement(const RouterBackwardArgs<T, float>& args) {
  LORY_RETURN_IF_ERROR(validate(args));
  return detail::router_gpu_checks<T>(args.mode == RoutingMode::kGivenWeights ? 1 : args.d,
                                     args.layout.num_tokens());
}

// dW_r, d_bias and the router path's dx contribution (see router.hpp).
// Workspace: dz [rows, E], v [rows, d] when dx is wanted, and the dW_r /
// d_bias chunk partials [chunks, E, d + 1] when either is wanted (all fp32).
template <class T>
Status router_backward(const RouterBackwardArgs<T, float>& args, void* workspace,
                       size_t& workspace_bytes, cudaStream_t stream) {
  LORY_RETURN_IF_ERROR(router_backward_can_implement(args));
  const detail::RouterBackwardPlan plan = detail::plan_router_backward(args);
  bool size_query = false;
  // fp32 pieces in the workspace, except with given weights (no router path to differentiate).
  LORY_RETURN_IF_ERROR(detail::workspace_protocol(workspace, workspace_bytes, plan.bytes, size_query,
                                                  args.mode == RoutingMode::kGivenWeights ? 1 : alignof(float)));
  if (size_query || args.mode == RoutingMode::kGivenWeights) return Status::kSuccess;

  const int E = args.experts;
  const int64_t d = args.d;
  const device::RouterRows geo = device::RouterRows::make(args.layout, plan.prompt);
  detail::WorkspaceCarver carve{static_cast<unsigned char*>(workspace)};
  float* dz = carve.take<float>(plan.rows, E);
  float* v = args.dx ? carve.take<float>(plan.rows, d) : nullptr;
  float* partial = (args.dW_r || args.d_bias)
                       ? carve.take<float>(plan.dw_chunks, E, d + 1)
                       : nullptr;

  constexpr int V = detail::Vec16<T>::kSize;
  const dim3 zgrid(detail::grid_cap(plan.rows));
  if (detail::rows_are_vec16(args.W_r, d))
    detail::launch_kernel(router_dz_kernel<T, V>, zgrid, detail::kRouterThreads, 0, stream,
        args.probs, args.d_weights, args.W_r, d, E, geo, plan.rows, dz, v);
  else
    detail::launch_kernel(router_dz_kernel<T, 1>, zgrid, detail::kRouterThreads, 0, stream,
        args.probs, args.d_weights, args.W_r, d, E, geo, plan.rows, dz, v);
  LORY_RETURN_IF_ERROR(detail::check_launch());

  if (partial) {
    const int64_t cols = plan.col_end - plan.col_begin;
    const dim3 grid(detail::grid_cap(ceil_div<int64_t>(cols, detail::kRouterDwThreads)),
                    static_cast<unsigned>(ceil_div(E, detail::kRouterDwExperts)),
                    static_cast<unsigned>(plan.dw_chunks));
    detail::launch_kernel(router_dw_partial_kernel<detail::kRouterDwExperts>, grid, detail::kRouterDwThreads, 0,
                          stream, dz, args.hbar, d, E, plan.rows, plan.dw_rows_per_chunk, plan.col_begin,
                          plan.col_end, partial);
    LORY_RETURN_IF_ERROR(detail::check_launch());
    const dim3 fgrid(detail::grid_cap(ceil_div<int64_t>(cols, detail::kRouterThreads), 4096),
                     static_cast<unsigned>(E));
    detail::launch_kernel(router_dw_finalize_kernel<T>, fgrid, detail::kRouterThreads, 0, stream, partial,
                          plan.dw_chunks, d, E, plan.col_begin, plan.col_end, args.dW_r, args.accumulate_dW_r,
                          args.d_bias, args.accumulate_d_bias);
    LORY_RETURN_IF_ERROR(detail::check_launch());
  }

  if (args.dx) {
    const bool vec = detail::rows_are_vec16(args.dx, d);
    const int64_t nvec = vec ? d / V : d;
    // Lanes over a row's vectors (a multiple of 32, at most the block), tokens over the rest.
    const int bx = static_cast<int>(std::min<int64_t>(detail::kRouterThreads, ceil_div<int64_t>(nvec, 32) * 32));
    const int by = detail::kRouterThreads / bx;
    const dim3 block(bx, by);
    const unsigned grid = detail::grid_cap(ceil_div<int64_t>(args.layout.num_tokens(), by), int64_t(1) << 20);
    if (vec)
      detail::launch_kernel(router_dx_add_kernel<T, V>, grid, block, 0, stream, args.dx, v, d, geo,
                            args.layout.num_tokens());
    else
      detail::launch_kernel(router_dx_add_kernel<T, 1>, grid, block, 0, stream, args.dx, v, d, geo,
                            args.layout.num_tokens());
    LORY_RETURN_IF_ERROR(detail::check_launch());
  }
  return Status::kSuccess;
}

LORY_NAMESPACE_END
