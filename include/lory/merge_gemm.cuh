// lory: the general merge backward -- merge_backward(args, method, ...) -- with a choice of method:
// lory's fused one-pass kernel (lory/merge.cuh), two cuBLAS GEMMs (detail/merge/backward_gemm.cuh),
// or the rule kAuto follows between them. The math and the arguments are the merge backward's
// (lory/merge.hpp); the CPU twin is reference::merge_backward whichever method runs on the GPU.
// merge_backward(args, workspace, bytes, stream) in lory/merge.cuh is this call with kFused.
//
//   size_t bytes = 0;
//   lory::merge_backward(args, lory::MergeBackwardMethod::kAuto, nullptr, bytes, handle, stream);  // size
//   lory::merge_backward(args, lory::MergeBackwardMethod::kAuto, ws, bytes, handle, stream);
//
// The handle is the caller's, bound to `stream` and in host pointer mode (checked before any
// launch); a kFused call does not need one (it may be null).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "lory/config.hpp"
#include "lory/detail/merge/backward_gemm.cuh"
#include "lory/detail/merge/dispatch.cuh"
#include "lory/merge.cuh"
#include "lory/merge.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

#if LORY_HAS_DEVICE_CODE
namespace detail {
// kAuto's rule on a route already decided (route_merge_backward at kAuto).
template <class T>
MergeBackwardMethod resolve_merge_backward_method(const MergeBackwardArgs<T, float>& a, MergeBackwardMethod method,
                                                  const MergeBackwardRoute& route) {
  if (method != MergeBackwardMethod::kAuto) return method;
  const bool fused =
      !merge_backward_gemm_fits(a) || (route.tensor_core && a.experts <= kMergeBackwardFusedMaxExperts);
  return fused ? MergeBackwardMethod::kFused : MergeBackwardMethod::kGemm;
}
}  // namespace detail

// The method a call with `method` runs: kFused or kGemm as given; kAuto resolves to the fused
// kernel where it runs on tensor cores (16-bit storage, 16-byte aligned views) with E <= 8, or
// where the GEMMs' sizes do not fit cuBLAS' int limits; to the GEMMs otherwise
// (detail::kMergeBackwardFusedMaxExperts; off the tensor-core path the fused kernel runs on CUDA
// cores, far slower than the GEMMs). Depends on the arguments only, so a size query and the call it
// sizes agree (and not on the device: before sm_80, kAuto at E <= 8 runs the fused kernel on CUDA
// cores).
template <class T>
MergeBackwardMethod resolve_merge_backward_method(const MergeBackwardArgs<T, float>& a, MergeBackwardMethod method) {
  return detail::resolve_merge_backward_method(a, method, detail::route_merge_backward(a, detail::MergePath::kAuto));
}

// dW (+)= weights^T x G and d_weights (+)= G x W^T by `method` (see above). Workspace: the
// method's (the fused kernel's partials, or the converted weights; a null workspace asks).
// Errors as merge_backward's, plus: an invalid method (kErrorInvalidArgument); for the GEMMs a
// size or stride past INT_MAX (kErrorInvalidSize), a workspace not aligned to T
// (kErrorMisalignedPointer), a null handle, or one bound to another stream or in device pointer
// mode (kErrorNullPointer / kErrorInvalidArgument), all before any launch. A cuBLAS call that
// fails at run time gives kErrorCublas; if it is the d_weights GEMM, dW is already written.
template <class T>
Status merge_backward(const MergeBackwardArgs<T, float>& args, MergeBackwardMethod method, void* workspace,
                      size_t& workspace_bytes, cublasHandle_t cublas, cudaStream_t stream) {
  if (!is_valid(method)) return Status::kErrorInvalidArgument;
  // The route (tensor cores or not, vector I/O), decided once: kAuto's choice and the fused
  // kernel's launch both take it.
  const detail::MergeBackwardRoute route = detail::route_merge_backward(args, detail::MergePath::kAuto);
  if (detail::resolve_merge_backward_method(args, method, route) == MergeBackwardMethod::kFused) {
    LORY_RETURN_IF_ERROR(merge_backward_can_implement(args));
    return detail::merge_backward_fused(args, route, detail::MergePath::kAuto, workspace, workspace_bytes, stream);
  }
  return detail::merge_backward_gemm(args, workspace, workspace_bytes, cublas, stream);
}
#endif  // LORY_HAS_DEVICE_CODE

LORY_NAMESPACE_END
