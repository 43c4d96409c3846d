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
//   store policy, blocks per SM, static or dynamic tile order; the variants are
//   in tests/common/merge_variants.cuh). The default needs no workspace beyond the
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
//   Hopper only, is a tuning that tests and the A/B driver select
//   (MergeBackwardWgmma in tests/common/merge_variants.cuh,
//   docs/merge-backward-sm90.md): wgmma (sm_90a), which reads each shared
//   operand once per warpgroup. docs/gpu-results.md says what ran where.
//
// Two backward entry points: merge_backward(args, method, workspace, bytes, cublas, stream) in
// lory/merge_gemm.cuh is the general one (MergeBackwardMethod: the fused kernel here, two cuBLAS
// GEMMs, or kAuto's choice between them; the layer plan's default). merge_backward(args, workspace,
// bytes, stream) below is that call with MergeBackwardMethod::kFused: the fused kernel, no cuBLAS.
//
// Paths: every pointer only needs its element alignment. 16-byte vector loads
// and stores are used when the base pointers are 16-byte aligned and the
// strides are multiples of 16 bytes; otherwise a scalar path runs (same
// kernel, template flag). A P-tail shorter than a vector is always scalar.
// All global offsets are 64-bit.
//
// 2-D views (lory/merge.hpp's rows and row pitches): the kernels work on P = rows * params
// elements per expert (segment) -- tiles, slices, workspace and shared memory count over it -- and
// address element j of operand X at X + (j / params) * pitch + j % params (MergeRowView in
// detail/merge/view.cuh: a magic-number divide once per thread and tile, skipped on a flat view).
// Vectors need params and every non-flat pitch to be multiples of the vector as well, so that none
// straddles a row; else the scalar path runs (and the backward's tensor cores, which need vectors,
// give way to the CUDA cores as for a misaligned view).
//
// The layers (include/lory/detail/merge/; each file's first lines say what it holds):
//   policy.cuh          constants, shared-memory limits, tuning knobs, the default tunings
//   params.cuh          the kernels' parameter structs; merge_*_can_implement
//   view.cuh            2-D views: element addressing, 16-byte vector I/O with tails
//   vec_io.cuh          device helpers: zero vectors, conversions to and from fp32
//   forward_simt.cuh, forward_tc.cuh                        forward kernels (CUDA cores, mma.sync)
//   backward_simt.cuh, backward_tc.cuh, backward_wgmma.cuh  backward kernels (CUDA cores, mma.sync, wgmma)
//   backward_partial.cuh, backward_pipeline.cuh             the backward kernels' shared pieces
//   device.cuh          what the merge asks of the device (cached per device)
//   launch.cuh          per-path launchers, the tensor-core backward's shapes
//   dispatch.cuh        the one decision per call (route, workspace, plan), args -> params
//   backward_gemm.cuh   the backward as two cuBLAS GEMMs (lory/merge_gemm.cuh's method)
#pragma once
#include <cuda_runtime.h>

#include "lory/config.hpp"
#include "lory/detail/merge/dispatch.cuh"
#include "lory/detail/merge/params.cuh"
#include "lory/merge.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

#if LORY_HAS_DEVICE_CODE
// Wbar = weights x W for every segment. Workspace: none needed (the query reports 16 bytes).
template <class T>
Status merge_forward(const MergeForwardArgs<T, float>& args, void* workspace, size_t& workspace_bytes,
                     cudaStream_t stream) {
  return detail::merge_forward_on_path(args, workspace, workspace_bytes, stream, detail::MergePath::kAuto);
}

// dW (+)= weights^T x G and d_weights (+)= G x W^T in one pass over G, by the fused kernel: the
// general merge_backward (lory/merge_gemm.cuh) with MergeBackwardMethod::kFused. Workspace:
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
