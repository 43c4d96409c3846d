// lory CPU backend of the MoE FFN plan (lory/moe_ffn_plan.hpp): the leaf
// operations as CPU twins accumulating in float (the GPU's fp32), so that the
// CPU tests drive the plan's orchestration exactly as the GPU runs it.
//
//   reference::MoeFfnCpuPlan<T> plan(layout, shape, mode, options);
//   std::vector<unsigned char> ws(plan.workspace_size());
//   plan.forward(args, ws.data(), ws.size(), {});
#pragma once
#include <cstddef>
#include <cstdint>

#include "lory/dtype.hpp"
#include "lory/merge.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/round_to_storage.hpp"
#include "lory/reference/router.hpp"
#include "lory/reference/swiglu.hpp"
#include "lory/router.hpp"
#include "lory/swiglu.hpp"

LORY_NAMESPACE_BEGIN
namespace reference {

struct MoeFfnCpuBackend {
  struct Stream {};  // the CPU runs everything in order; nothing to name
  // The merge twins take 2-D views: the plan may slice f (lory/moe_ffn_plan.hpp).
  static constexpr bool kMergeViews2d = true;

  template <class T>
  static Status can_implement(const SegmentLayout&, const FfnShape&) { return Status::kSuccess; }
  static Status check_stream(const Stream&) { return Status::kSuccess; }

  // The CPU twins need no workspace: a null workspace is a size query (0 bytes)
  // after validation, as the GPU launchers do it.
  template <class T>
  static Status router_forward(const RouterForwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::router_forward<float>(a); });
  }
  template <class T>
  static Status router_backward(const RouterBackwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::router_backward<float>(a); });
  }
  template <class T>
  static Status merge_forward(const MergeForwardArgs<T, float>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::merge_forward<float>(a); });
  }
  // One way on the CPU whatever the method (the GPU's choice of kernels).
  template <class T>
  static Status merge_backward(const MergeBackwardArgs<T, float>& a, MergeBackwardMethod, void* ws, size_t& ws_bytes,
                               Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::merge_backward<float>(a); });
  }
  template <class T>
  static Status swiglu_forward(const SwigluForwardArgs<T>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::swiglu_forward<float>(a); });
  }
  template <class T>
  static Status swiglu_backward(const SwigluBackwardArgs<T>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::swiglu_backward<float>(a); });
  }

  // Plain loop GEMM with the row-major semantics of StridedBatchedGemm, fp32
  // accumulation, one rounding to TC per output (as cuBLAS with CUBLAS_COMPUTE_32F);
  // TC = float keeps the fp32 sum (the plan's accumulators).
  template <class T, class TC = T>
  static Status gemm(const StridedBatchedGemm<T, TC>& g, Stream) {
    LORY_RETURN_IF_ERROR(validate(g));
    for (int64_t b = 0; b < g.batch; ++b) {
      const T* A = g.A + b * g.stride_a;
      const T* B = g.B + b * g.stride_b;
      TC* C = g.C + b * g.stride_c;
      for (int64_t i = 0; i < g.m; ++i)
        for (int64_t j = 0; j < g.n; ++j) {
          float acc = 0.f;
          for (int64_t p = 0; p < g.k; ++p) {
            const T av = g.trans_a ? A[p * g.lda + i] : A[i * g.lda + p];
            const T bv = g.trans_b ? B[j * g.ldb + p] : B[p * g.ldb + j];
            acc += load_as<float>(av) * load_as<float>(bv);
          }
          TC& out = C[i * g.ldc + j];
          // beta == 0 never reads C (it may hold garbage or NaN).
          const float prior = g.beta == 0.f ? 0.f : g.beta * load_as<float>(out);
          out = store_as<TC>(g.alpha * acc + prior);
        }
    }
    return Status::kSuccess;
  }

  // dst = src rounded once to T (the twin: store_as, round to nearest even).
  template <class T>
  static Status round_to_storage(const RoundToStorageArgs<T>& a, void* ws, size_t& ws_bytes, Stream) {
    return run(a, ws, ws_bytes, [&] { return reference::round_to_storage(a); });
  }

 private:
  template <class Args, class Fn>
  static Status run(const Args& a, void* ws, size_t& ws_bytes, Fn&& fn) {
    LORY_RETURN_IF_ERROR(validate(a));
    if (ws == nullptr) {
      ws_bytes = 0;
      return Status::kSuccess;
    }
    return fn();
  }
};

template <class T>
using MoeFfnCpuPlan = MoeFfnPlan<T, MoeFfnCpuBackend>;

}  // namespace reference
LORY_NAMESPACE_END
