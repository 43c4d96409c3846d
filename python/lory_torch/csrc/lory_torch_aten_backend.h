// lory PyTorch extension: a CPU backend of the layer plan (lory/moe_ffn_plan.hpp)
// whose heavy leaves run through ATen, so the CPU ops get PyTorch's threaded
// BLAS instead of the library's plain-loop twins:
//   gemm            at::bmm / at::baddbmm on views of the plan's buffers (C is float: T is)
//   merge_forward   Wbar [S, P] = weights [S, E] @ W [E, P]         (one at::mm; 2-D views:
//                   one at::bmm over the rows)
//   merge_backward  dW [E, P] (+)= weights^T @ G,  d_weights [S, E] (+)= G @ W^T (2-D views:
//                   at::bmm over the rows for dW, d_weights summed row by row)
//   swiglu          at::silu / at::silu_backward
//   round_to_storage  a copy (float32 storage: nothing to round)
// The merges take 2-D views (kMergeViews2d), so the plan may slice f under a tight budget.
// The router leaves stay the library's twins (O(tokens * d), never the bottleneck).
// Every leaf validates its arguments with the library's validate() first, as the
// CPU twins do; the plan has already run its own checks.
//
// Storage is float32 only (the plan fixes the routing dtype to float, and the
// float64 ops run the double twin instead). Products accumulate in float32, as
// the twins' contract says.
#pragma once
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lory/merge.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/router.hpp"
#include "lory/router.hpp"
#include "lory/status.hpp"
#include "lory/swiglu.hpp"

namespace lory_torch {

// A CPU tensor over memory the caller owns (no copy, no ownership).
template <class P>
at::Tensor view(P* data, at::IntArrayRef sizes, at::IntArrayRef strides) {
  using E = std::remove_const_t<P>;
  static_assert(std::is_same_v<E, float> || std::is_same_v<E, double>, "lory_torch: float32 / float64 views only");
  const auto dtype = std::is_same_v<E, float> ? at::kFloat : at::kDouble;
  return at::from_blob(const_cast<E*>(data), sizes, strides, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// Wbar [S, P] = weights [S, E] @ W [E, P], for the plan's leaf and for
// merge_experts. Storage and routing types agree (float/float or double/double).
template <class T, class R>
lory::Status aten_merge_forward(const lory::MergeForwardArgs<T, R>& a) {
  static_assert(std::is_same_v<T, R>, "lory_torch: the ATen merge needs one dtype for W and the weights");
  LORY_RETURN_IF_ERROR(lory::validate(a));
  const int64_t S = a.num_segments, E = a.experts, P = a.params, rows = a.rows;
  if (rows == 1) {
    at::Tensor Wbar = view(a.Wbar, {S, P}, {a.segment_stride, 1});
    at::mm_out(Wbar, view(a.weights, {S, E}, {E, 1}), view(a.W, {E, P}, {a.expert_stride, 1}));
    return lory::Status::kSuccess;
  }
  // Row r of every view at once: Wbar[:, r, :] = weights @ W[:, r, :].
  at::Tensor Wbar = view(a.Wbar, {rows, S, P}, {a.Wbar_row_pitch, a.segment_stride, 1});
  at::bmm_out(Wbar, view(a.weights, {S, E}, {E, 1}).expand({rows, S, E}),
              view(a.W, {rows, E, P}, {a.W_row_pitch, a.expert_stride, 1}));
  return lory::Status::kSuccess;
}

struct AtenCpuBackend {
  struct Stream {};  // ATen's CPU ops run in order on the calling thread (plus its pool)
  static constexpr bool kMergeViews2d = true;  // the merges below take 2-D views

  template <class T>
  static lory::Status can_implement(const lory::SegmentLayout&, const lory::FfnShape&) {
    return std::is_same_v<T, float> ? lory::Status::kSuccess : lory::Status::kErrorUnsupportedDType;
  }
  static lory::Status check_stream(const Stream&) { return lory::Status::kSuccess; }

  template <class T>
  static lory::Status router_forward(const lory::RouterForwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return lory::reference::router_forward<float>(a); });
  }
  template <class T>
  static lory::Status router_backward(const lory::RouterBackwardArgs<T, float>& a, void* ws, size_t& ws_bytes,
                                      Stream) {
    return run(a, ws, ws_bytes, [&] { return lory::reference::router_backward<float>(a); });
  }

  template <class T>
  static lory::Status merge_forward(const lory::MergeForwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return aten_merge_forward(a); });
  }

  // One way on the CPU whatever the method (the method picks GPU kernels).
  template <class T>
  static lory::Status merge_backward(const lory::MergeBackwardArgs<T, float>& a, lory::MergeBackwardMethod, void* ws,
                                     size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] {
      const int64_t S = a.num_segments, E = a.experts, P = a.params, rows = a.rows;
      const at::Tensor w = view(a.weights, {S, E}, {E, 1});
      if (rows > 1) {
        // 2-D views, row r of every view at once: dW[:, r, :] (+)= weights^T @ G[:, r, :];
        // d_weights (+)= sum over r of G[:, r, :] @ W[:, r, :]^T.
        const at::Tensor G = view(a.G, {rows, S, P}, {a.G_row_pitch, a.grad_segment_stride, 1});
        if (a.dW) {
          at::Tensor dW = view(a.dW, {rows, E, P}, {a.dW_row_pitch, a.dW_expert_stride, 1});
          const at::Tensor wt = w.t().expand({rows, E, S});
          if (a.accumulate_dW) dW.baddbmm_(wt, G);
          else at::bmm_out(dW, wt, G);
        }
        if (a.d_weights) {
          at::Tensor dw = view(a.d_weights, {S, E}, {E, 1});
          const at::Tensor W = view(a.W, {rows, E, P}, {a.W_row_pitch, a.expert_stride, 1});
          for (int64_t r = 0; r < rows; ++r) {
            if (r == 0 && !a.accumulate_d_weights) at::mm_out(dw, G[r], W[r].t());
            else dw.addmm_(G[r], W[r].t());
          }
        }
        return lory::Status::kSuccess;
      }
      const at::Tensor G = view(a.G, {S, P}, {a.grad_segment_stride, 1});
      if (a.dW) {
        at::Tensor dW = view(a.dW, {E, P}, {a.dW_expert_stride, 1});
        if (a.accumulate_dW) dW.addmm_(w.t(), G);
        else at::mm_out(dW, w.t(), G);
      }
      if (a.d_weights) {
        at::Tensor dw = view(a.d_weights, {S, E}, {E, 1});
        const at::Tensor W = view(a.W, {E, P}, {a.expert_stride, 1});
        if (a.accumulate_d_weights) dw.addmm_(G, W.t());
        else at::mm_out(dw, G, W.t());
      }
      return lory::Status::kSuccess;
    });
  }

  template <class T>
  static lory::Status swiglu_forward(const lory::SwigluForwardArgs<T>& p, void* ws, size_t& ws_bytes, Stream) {
    return run(p, ws, ws_bytes, [&] {
      const int64_t r = p.rows, c = p.cols;
      at::Tensor m = view(p.m, {r, c}, {p.m_stride, 1});
      at::mul_out(m, at::silu(view(p.a, {r, c}, {p.a_stride, 1})), view(p.u, {r, c}, {p.u_stride, 1}));
      return lory::Status::kSuccess;
    });
  }
  // du = dm * silu(a), da = dm * u * silu'(a) (at::silu_backward is grad * silu'(a)).
  template <class T>
  static lory::Status swiglu_backward(const lory::SwigluBackwardArgs<T>& p, void* ws, size_t& ws_bytes, Stream) {
    return run(p, ws, ws_bytes, [&] {
      const int64_t r = p.rows, c = p.cols;
      const at::Tensor a = view(p.a, {r, c}, {p.a_stride, 1});
      const at::Tensor u = view(p.u, {r, c}, {p.u_stride, 1});
      const at::Tensor dm = view(p.dm, {r, c}, {p.dm_stride, 1});
      at::Tensor da = view(p.da, {r, c}, {p.da_stride, 1}), du = view(p.du, {r, c}, {p.du_stride, 1});
      at::silu_backward_out(da, dm * u, a);
      at::mul_out(du, dm, at::silu(a));
      return lory::Status::kSuccess;
    });
  }

  // dst = src (float32 storage: the plan's fp32 accumulators need no rounding).
  template <class T>
  static lory::Status round_to_storage(const lory::RoundToStorageArgs<T>& a, void* ws, size_t& ws_bytes, Stream) {
    static_assert(std::is_same_v<T, float>, "lory_torch: the ATen backend runs float32 storage");
    return run(a, ws, ws_bytes, [&] {
      view(a.dst, {a.rows, a.cols}, {a.dst_stride, 1}).copy_(view(a.src, {a.rows, a.cols}, {a.src_stride, 1}));
      return lory::Status::kSuccess;
    });
  }

  // StridedBatchedGemm's row-major semantics on ATen views: op(A) [m, k], op(B) [k, n], C [m, n]
  // per batch entry; beta == 0 never reads C (ATen ignores `self` when beta is 0).
  template <class T>
  static lory::Status gemm(const lory::StridedBatchedGemm<T>& g, Stream) {
    static_assert(std::is_same_v<T, float>, "lory_torch: the ATen backend runs float32 storage");
    LORY_RETURN_IF_ERROR(lory::validate(g));
    const at::Tensor A = g.trans_a ? view(g.A, {g.batch, g.k, g.m}, {g.stride_a, g.lda, 1}).transpose(1, 2)
                                   : view(g.A, {g.batch, g.m, g.k}, {g.stride_a, g.lda, 1});
    const at::Tensor B = g.trans_b ? view(g.B, {g.batch, g.n, g.k}, {g.stride_b, g.ldb, 1}).transpose(1, 2)
                                   : view(g.B, {g.batch, g.k, g.n}, {g.stride_b, g.ldb, 1});
    at::Tensor C = view(g.C, {g.batch, g.m, g.n}, {g.stride_c, g.ldc, 1});
    if (g.beta == 0.f && g.alpha == 1.f) at::bmm_out(C, A, B);
    else C.baddbmm_(A, B, g.beta, g.alpha);
    return lory::Status::kSuccess;
  }

 private:
  // Validation first; a null workspace is a size query (these leaves need none).
  template <class Args, class Fn>
  static lory::Status run(const Args& a, void* ws, size_t& ws_bytes, Fn&& fn) {
    LORY_RETURN_IF_ERROR(lory::validate(a));
    if (ws == nullptr) {
      ws_bytes = 0;
      return lory::Status::kSuccess;
    }
    return fn();
  }
};

template <class T>
using MoeFfnAtenPlan = lory::MoeFfnPlan<T, AtenCpuBackend>;

}  // namespace lory_torch
