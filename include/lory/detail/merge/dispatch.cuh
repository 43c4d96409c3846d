// lory (private), merge layer "dispatch": the one place that decides, per call, what runs. The
// user's arguments become kernel parameters here (make_merge_*_params) and nowhere else. Backward:
// a route from the arguments alone (tensor cores or CUDA cores, vector I/O: route_merge_backward),
// the workspace layout it needs (merge_backward_workspace: the size query and the call agree), and,
// once the device is known, the plan that runs (plan_merge_backward: path, tiles, partial placement,
// the kernel's shape and shared memory), handed down to the launchers in launch.cuh.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge/device.cuh"
#include "lory/detail/merge/launch.cuh"
#include "lory/detail/merge/params.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/detail/merge/vec_io.cuh"
#include "lory/detail/merge/view.cuh"
#include "lory/detail/validate.hpp"
#include "lory/merge.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// ===========================================================================
// Forward
// ===========================================================================

// The kernels' views of a call's operands: P = rows * params elements per expert (segment), each
// operand's rows at its own pitch (detail/merge/view.cuh; a flat view costs nothing), and
// whether every operand takes 16-byte vector I/O (no vector may straddle a row).
template <class T>
struct MergeForwardViews {
  int64_t P;
  MergeRowView w, out;
  bool vec;  // 16-byte vector I/O on both operands
  MergeIo io;
  explicit MergeForwardViews(const MergeForwardArgs<T, float>& a)
      : P(a.rows * a.params),
        w(MergeRowView::make(a.rows, a.params, a.W_row_pitch)),
        out(MergeRowView::make(a.rows, a.params, a.Wbar_row_pitch)),
        vec(merge_view_vec_ok(a.W, a.expert_stride, w) && merge_view_vec_ok(a.Wbar, a.segment_stride, out)),
        io(merge_io(vec, w.flat && out.flat)) {}
};
template <class T>
struct MergeBackwardViews {
  int64_t P;
  MergeRowView g, w, dw;
  bool vec;  // 16-byte vector I/O on every operand the call uses
  explicit MergeBackwardViews(const MergeBackwardArgs<T, float>& a)
      : P(a.rows * a.params),
        g(MergeRowView::make(a.rows, a.params, a.G_row_pitch)),
        w(MergeRowView::make(a.rows, a.params, a.W_row_pitch)),
        dw(MergeRowView::make(a.rows, a.params, a.dW_row_pitch)),
        vec(merge_view_vec_ok(a.G, a.grad_segment_stride, g) &&
            (!a.d_weights || merge_view_vec_ok(a.W, a.expert_stride, w)) &&
            (!a.dW || merge_view_vec_ok(a.dW, a.dW_expert_stride, dw))) {}
};

// The forward's kernel parameters from the user's arguments and their views (the launcher adds the
// tiling).
template <class T>
MergeForwardParams<T> make_merge_forward_params(const MergeForwardArgs<T, float>& a, const MergeForwardViews<T>& views) {
  MergeForwardParams<T> prm{};
  prm.S = a.num_segments;
  prm.E = a.experts;
  prm.P = views.P;
  prm.w_view = views.w;
  prm.out_view = views.out;
  prm.W = a.W;
  prm.w_stride = a.expert_stride;
  prm.weights = a.weights;
  prm.out = a.Wbar;
  prm.out_stride = a.segment_stride;
  return prm;
}

#if LORY_HAS_DEVICE_CODE
// The CUDA-core forward: the slice's weights in shared memory where a pass's rows fit, else read
// through L1; io: views.io (all three I/O modes are kernels of their own here).
template <class T, bool kWeightsSmem>
Status launch_merge_forward_simt_io(const MergeForwardParams<T>& prm, MergeIo io, int64_t tile_width, int64_t rows,
                                    int64_t max_rows, cudaStream_t stream) {
  using Cfg = MergeForwardSimtConfig<T>;
  const int E = prm.E, cg = prm.col_vecs;
  auto smem_of = [E, cg](int64_t r) { return Cfg::smem_bytes(E, cg, r, kWeightsSmem); };
  switch (io) {
    case MergeIo::kVec:
      return launch_merge_forward<T>(merge_forward_simt_kernel<T, MergeIo::kVec, kWeightsSmem>, prm, tile_width, rows,
                                     max_rows, smem_of, stream);
    case MergeIo::kScalar:
      return launch_merge_forward<T>(merge_forward_simt_kernel<T, MergeIo::kScalar, kWeightsSmem>, prm, tile_width,
                                     rows, max_rows, smem_of, stream);
    case MergeIo::kScalarRows:
      break;
  }
  return launch_merge_forward<T>(merge_forward_simt_kernel<T, MergeIo::kScalarRows, kWeightsSmem>, prm, tile_width,
                                 rows, max_rows, smem_of, stream);
}
template <class T>
Status launch_merge_forward_simt(MergeForwardParams<T> prm, MergeIo io, cudaStream_t stream) {
  using Cfg = MergeForwardSimtConfig<T>;
  prm.col_vecs = Cfg::col_vecs(prm.E);
  const int E = prm.E, cg = prm.col_vecs;
  const int64_t tile_width = int64_t(cg) * Cfg::kVec;
  const int64_t rows = Cfg::rows_per_pass(cg);
  if (Cfg::weights_in_smem(E, cg, kMergeForwardWeightsSmem))
    return launch_merge_forward_simt_io<T, true>(prm, io, tile_width, rows,
                                                 kMergeForwardWeightsSmem / Cfg::bytes_per_segment(E), stream);
  return launch_merge_forward_simt_io<T, false>(prm, io, tile_width, rows, INT64_MAX, stream);
}

// The forward on `path` (kAuto: tensor cores for 16-bit storage and 8 <= E <= 64 where the device
// runs them and the kernel fits, else CUDA cores). Tuning: the tensor-core kernel's knobs
// (MergeForwardTcDefault, or a variant: tests and bench/ab).
template <class T, class Tuning = MergeForwardTcDefault>
Status merge_forward_on_path(const MergeForwardArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                             cudaStream_t stream, MergePath path) {
  LORY_RETURN_IF_ERROR(merge_forward_can_implement(a));
  if (path == MergePath::kTensorCore && !merge_tc_supports<T>(a.experts)) return Status::kErrorInvalidArgument;
  // A dynamic-tile tuning's counters, wherever the tensor cores may run (an upper bound for kAuto).
  const size_t counter_bytes =
      path != MergePath::kSimt && merge_tc_supports<T>(a.experts)
          ? merge_forward_tc_counter_bytes<T, Tuning>(a.num_segments, a.experts, a.rows * a.params)
          : 0;
  bool size_query = false;
  LORY_RETURN_IF_ERROR(workspace_protocol(workspace, workspace_bytes, std::max(kMergeMinWorkspaceBytes, counter_bytes),
                                          size_query, counter_bytes ? alignof(unsigned long long) : 1));
  if (size_query) return Status::kSuccess;

  // The path, decided once: the device is asked (from the cache) only where tensor cores may run.
  MergeSmemLimits limits{};
  if (path == MergePath::kAuto || path == MergePath::kTensorCore) {
    bool mma = false;
    if constexpr (is_mma_b16<T>::value) {
      DeviceInfo dev;
      LORY_RETURN_IF_ERROR(current_device_info(dev));
      LORY_RETURN_IF_ERROR(device_runs_mma(
          dev, reinterpret_cast<const void*>(merge_forward_tc_kernel<T, MergeIo::kVec, 1, typename Tuning::template At<1>>),
          mma));
      if (mma) {
        limits = merge_smem_limits(dev);
        mma = merge_forward_tc_fits<T, Tuning>(a.experts, limits);
      }
    }
    if (path == MergePath::kTensorCore && !mma) return Status::kErrorInvalidArgument;
    // Tensor cores from E = 8 (K padded to 16 costs an mma no more at E = 8; docs/gpu-results.md
    // has the measurements against the CUDA-core kernel).
    if (path == MergePath::kAuto)
      path = (mma && merge_tc_supports<T>(a.experts) && a.experts >= 8) ? MergePath::kTensorCore : MergePath::kSimt;
  }
  const MergeForwardViews<T> views(a);
  MergeForwardParams<T> prm = make_merge_forward_params(a, views);
  if (path == MergePath::kTensorCore) {
    prm.col_vecs = 32;
    return views.vec ? merge_forward_tc<T, MergeIo::kVec, Tuning>(prm, workspace, limits, stream)
                     : merge_forward_tc<T, MergeIo::kScalarRows, Tuning>(prm, workspace, limits, stream);
  }
  return launch_merge_forward_simt(prm, views.io, stream);
}
#endif  // LORY_HAS_DEVICE_CODE

// ===========================================================================
// Backward
// ===========================================================================

// What the arguments alone decide, once per call: whether every tensor the fused kernel touches
// takes 16-byte vector I/O (base and stride of G, of W where d_weights is wanted, of dW where it
// is), and whether the tensor-core kernel is the candidate (kAuto or kTensorCore, 16-bit storage,
// E <= 64, vector I/O). At launch, a device or build without sm_80 runs CUDA cores instead.
// The operands' views (2-D views flattened to P = rows * params) travel with the route.
struct MergeBackwardRoute {
  bool vec = false;
  bool tensor_core = false;
  int64_t P = 0;
  MergeRowView g, w, dw;
};
template <class T>
MergeBackwardRoute route_merge_backward(const MergeBackwardArgs<T, float>& a, MergePath path) {
  const MergeBackwardViews<T> views(a);
  MergeBackwardRoute r;
  r.vec = views.vec;
  r.P = views.P;
  r.g = views.g;
  r.w = views.w;
  r.dw = views.dw;
  r.tensor_core = path != MergePath::kSimt && merge_tc_supports<T>(a.experts) && r.vec;
  return r;
}
// Path choice of the backward before the device is asked (route_merge_backward's tensor_core).
template <class T>
bool merge_backward_uses_tc(const MergeBackwardArgs<T, float>& a, MergePath path) {
  return route_merge_backward(a, path).tensor_core;
}

// The backward's workspace, from the arguments and the route alone (the size query does not ask the
// device): per-block d_weights partials at the start where reserved, then the split routing weights
// (tensor cores with dW). The partials are reserved in the deterministic mode, wherever the partial
// cannot stay on chip (merge_backward_partial_fits), and also where the on-chip partial might not
// fit the device of the call: the tensor-core kernel's on a 99 KiB device, the CUDA-core kernel's
// (which a tensor-core route falls back to on a device or build without sm_80) on a 48 KiB one. Those
// reservations hold the CUDA-core kernel's partials too (its tiles are at least as wide, so it has no
// more blocks).
struct MergeBackwardWorkspace {
  size_t partials_bytes = 0;
  size_t split_bytes = 0;
  size_t bytes = kMergeMinWorkspaceBytes;
};

// Tiles of the kernel on a path: 128-param tiles on tensor cores (a tuning with wider tiles has
// fewer: its launcher recounts), col_vecs 16-byte vectors on CUDA cores.
template <class T>
int64_t merge_backward_tiles(int64_t P, int E, bool tensor_core) {
  using Cfg = MergeBackwardSimtConfig<T>;
  const int64_t tile_width =
      tensor_core ? int64_t(MergeBackwardTcConfig<T, 1>::kTileN) : int64_t(Cfg::col_vecs(E)) * Cfg::kVec;
  return (P + tile_width - 1) / tile_width;
}
inline int merge_backward_max_blocks(int64_t tiles) {
  return static_cast<int>(std::min<int64_t>(tiles, kMergeBackwardMaxBlocks));
}

template <class T, class Tuning = MergeBackwardTcDefault>
Status merge_backward_workspace(const MergeBackwardArgs<T, float>& a, const MergeBackwardRoute& route,
                                MergeBackwardWorkspace& ws) {
  ws = MergeBackwardWorkspace{};
  const int64_t S = a.num_segments, SE = a.num_segments * a.experts;  // fits: validate() checked S * stride
  const int E = a.experts;
  const bool tc = route.tensor_core, want_de = a.d_weights != nullptr;
  const int max_blocks = merge_backward_max_blocks(merge_backward_tiles<T>(route.P, E, tc));
  const bool use_partials = want_de && (a.deterministic || !merge_backward_partial_fits(S, E, tc));
  auto tc_off_chip = [&] {
    const MergeSmemLimits& least = kMergeLeastSmemLimits;
    return merge_backward_tuned_shape<T, Tuning>(S, E, true, least).smem > least.per_block;
  };
  auto simt_off_chip = [&] {
    const MergeSmemLimits& least = kMergeLeastSimtSmemLimits;
    return MergeBackwardSimtConfig<T>::smem_bytes(S, E, MergeBackwardSimtConfig<T>::col_vecs(E), true, true) >
           least.per_block;
  };
  if (use_partials || (want_de && ((tc && tc_off_chip()) || simt_off_chip()))) {
    if (!mul_fits(SE, int64_t(max_blocks) * int64_t(sizeof(float)))) return Status::kErrorInvalidSize;
    ws.partials_bytes = align_up(size_t(SE) * max_blocks * sizeof(float));
  }
  if (tc && a.dW) ws.split_bytes = MergeBackwardSplitShape::of(S, E).bytes(sizeof(T));
  ws.bytes = std::max(ws.partials_bytes + ws.split_bytes, kMergeMinWorkspaceBytes);
  return Status::kSuccess;
}

// What runs, decided once at launch from the route, the device and its limits, and handed down.
struct MergeBackwardPlan {
  bool tensor_core = false;   // the path: Tuning's tensor-core kernel, or the CUDA-core kernel
  bool vec = false;           // 16-byte vector I/O (the route's)
  int col_vecs = 0;           // CUDA-core tiles: 16-byte column vectors
  int64_t tiles = 0;
  int max_blocks = 0;
  bool want_de = false;
  bool partial_in_smem = false;  // the block's [S, E] partial on chip (fits, and the device has the room)
  bool use_partials = false;     // per-block partials in the workspace + ordered reduction
  int ept = 0;                   // CUDA cores: experts per thread
  size_t smem = 0;               // CUDA cores: dynamic shared memory
  MergeBackwardTcShape shape{};  // tensor cores: stages, dynamic shared memory, tile width
};

// The partial stays on chip where S * E allows and the device has the shared memory for it; the
// fast mode then adds it atomically. Per-block partials in the workspace (and the ordered
// reduction) are used in the deterministic mode, and wherever the partial is not on chip.
template <class T, class Tuning = MergeBackwardTcDefault>
MergeBackwardPlan plan_merge_backward(const MergeBackwardArgs<T, float>& a, const MergeBackwardRoute& route,
                                      bool tensor_core, const MergeSmemLimits& limits) {
  using Cfg = MergeBackwardSimtConfig<T>;
  MergeBackwardPlan plan;
  const int64_t S = a.num_segments;
  const int E = a.experts;
  plan.tensor_core = tensor_core;
  plan.vec = route.vec;
  plan.col_vecs = Cfg::col_vecs(E);
  plan.tiles = merge_backward_tiles<T>(route.P, E, tensor_core);
  plan.max_blocks = merge_backward_max_blocks(plan.tiles);
  plan.want_de = a.d_weights != nullptr;
  plan.partial_in_smem = plan.want_de && merge_backward_partial_fits(S, E, tensor_core);
  if (tensor_core) {
    plan.shape = merge_backward_tuned_shape<T, Tuning>(S, E, plan.partial_in_smem, limits);
    if (plan.partial_in_smem && plan.shape.smem > limits.per_block) {
      plan.partial_in_smem = false;
      plan.shape = merge_backward_tuned_shape<T, Tuning>(S, E, false, limits);
    }
  } else {
    plan.ept = Cfg::experts_per_thread(E, plan.col_vecs);
    plan.smem = Cfg::smem_bytes(S, E, plan.col_vecs, plan.want_de, plan.partial_in_smem);
    if (plan.partial_in_smem && plan.smem > limits.per_block) {
      plan.partial_in_smem = false;
      plan.smem = Cfg::smem_bytes(S, E, plan.col_vecs, plan.want_de, false);
    }
  }
  plan.use_partials = plan.want_de && (a.deterministic || !plan.partial_in_smem);
  return plan;
}

// The backward's kernel parameters from the user's arguments and the plan (the tensor-core launch
// adds the split weights).
template <class T>
MergeBackwardParams<T> make_merge_backward_params(const MergeBackwardArgs<T, float>& a, const MergeBackwardRoute& route,
                                                  const MergeBackwardPlan& plan, void* workspace) {
  MergeBackwardParams<T> prm{};
  prm.S = a.num_segments;
  prm.E = a.experts;
  prm.P = route.P;
  prm.g_view = route.g;
  prm.w_view = route.w;
  prm.dw_view = route.dw;
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
  return prm;
}

#if LORY_HAS_DEVICE_CODE
// The fused backward with its route decided (route_merge_backward); `path` only says whether
// tensor cores were demanded. Tuning: the tensor-core kernel's knobs (MergeBackwardTcDefault, or a
// variant for tests and timing).
template <class T, class Tuning = MergeBackwardTcDefault>
Status merge_backward_fused(const MergeBackwardArgs<T, float>& a, const MergeBackwardRoute& route, MergePath path,
                            void* workspace, size_t& workspace_bytes, cudaStream_t stream) {
  MergeBackwardWorkspace ws;
  LORY_RETURN_IF_ERROR((merge_backward_workspace<T, Tuning>(a, route, ws)));
  bool size_query = false;
  // Per-block partials in the workspace: the tensor-core kernels update them as float pairs.
  LORY_RETURN_IF_ERROR(
      workspace_protocol(workspace, workspace_bytes, ws.bytes, size_query, ws.partials_bytes ? alignof(float2) : 1));
  if (size_query) return Status::kSuccess;

  // The device, asked once (cached): whether the tensor-core kernels run here (kAuto before sm_80,
  // or without sm_80 code, runs CUDA cores: the workspace reserved for them), and its limits.
  DeviceInfo dev;
  LORY_RETURN_IF_ERROR(current_device_info(dev));
  bool tc = route.tensor_core;
  if (tc) {
    bool mma = false;
    if constexpr (is_mma_b16<T>::value)
      LORY_RETURN_IF_ERROR(device_runs_mma(
          dev, reinterpret_cast<const void*>(merge_backward_tc_kernel<T, 1, 2, MergeBackwardTcDefault::At<1>>), mma));
    if (!mma) {
      if (path == MergePath::kTensorCore) return Status::kErrorInvalidArgument;
      tc = false;
    }
  }
  const MergeBackwardPlan plan = plan_merge_backward<T, Tuning>(a, route, tc, merge_smem_limits(dev));
  // Reserved by the query for every device the kernels run on; checked before anything is written.
  if ((plan.use_partials && !ws.partials_bytes) || ws.partials_bytes + (tc ? ws.split_bytes : 0) > workspace_bytes)
    return fail(Status::kErrorWorkspaceTooSmall, "workspace_bytes", "below what this device's kernel needs");

  if constexpr (is_wgmma_tuning<Tuning>::value && is_mma_b16<T>::value) {
    // Refused before anything is written (the split weights, the fast mode's zeroing).
    if (tc) LORY_RETURN_IF_ERROR(check_wgmma_kernel(reinterpret_cast<const void*>(merge_backward_wgmma_kernel<T, 1, 2>)));
  }

  MergeBackwardParams<T> prm = make_merge_backward_params(a, route, plan, workspace);
  if (prm.d_weights_atomic && !a.accumulate_d_weights &&
      cudaMemsetAsync(a.d_weights, 0, size_t(a.num_segments) * a.experts * sizeof(float), stream) != cudaSuccess)
    return Status::kErrorCudaLaunch;

  int blocks = 0;
  if (tc && prm.dW) {
    const auto split = MergeBackwardSplitShape::of(a.num_segments, a.experts);
    const uintptr_t at = reinterpret_cast<uintptr_t>(workspace) + ws.partials_bytes;
    T* a_split = reinterpret_cast<T*>((at + 15) / 16 * 16);
    const int64_t grid = std::min<int64_t>((int64_t(split.ep) * split.s_pad + kMergeThreads - 1) / kMergeThreads, 1024);
    launch_kernel(merge_backward_split_weights_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kMergeThreads), 0,
                  stream, a.weights, a.num_segments, a.experts, split.ep, split.s_pad, a_split);
    LORY_RETURN_IF_ERROR(check_launch());
    prm.a_split = a_split;
    prm.a_stride = split.s_pad;
  }
  const Status st = tc ? merge_backward_tc<T, Tuning>(prm, plan.max_blocks, plan.shape, blocks, stream)
                       : launch_merge_backward_simt<T>(prm, plan.vec, plan.ept, plan.max_blocks, plan.smem, blocks, stream);
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

// The fused backward on `path` (kAuto, or forced to CUDA cores / tensor cores: the tests).
template <class T, class Tuning = MergeBackwardTcDefault>
Status merge_backward_on_path(const MergeBackwardArgs<T, float>& a, void* workspace, size_t& workspace_bytes,
                              cudaStream_t stream, MergePath path) {
  LORY_RETURN_IF_ERROR(merge_backward_can_implement(a));
  if (path == MergePath::kTensorCore && !merge_tc_supports<T>(a.experts)) return Status::kErrorInvalidArgument;
  return merge_backward_fused<T, Tuning>(a, route_merge_backward(a, path), path, workspace, workspace_bytes, stream);
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
