// lory (private), merge layer "launch": host code that runs one kernel of a path on a shape it is
// given -- the forward's S slices and persistent grid, the tensor-core backward's pipeline shapes
// (merge_backward_tc_shape, merge_backward_wgmma_shape: stages, shared memory, tile width), and the
// persistent-grid launchers of the backward kernels. What to run is decided in dispatch.cuh.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge/backward_simt.cuh"
#include "lory/detail/merge/backward_tc.cuh"
#include "lory/detail/merge/backward_wgmma.cuh"
#include "lory/detail/merge/device.cuh"
#include "lory/detail/merge/forward_simt.cuh"
#include "lory/detail/merge/forward_tc.cuh"
#include "lory/detail/merge/policy.cuh"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// Whether the tensor-core kernels take this storage type and E (by the arguments alone).
template <class T>
constexpr bool merge_tc_supports(int E) {
  return is_mma_b16<T>::value && E >= 1 && E <= 64;
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
template <class T, MergeIo kIo, class Tuning, int K>
Status merge_forward_tc_at(const MergeForwardParams<T>& prm, void* workspace, const MergeSmemLimits& limits,
                           cudaStream_t stream) {
  using Knobs = typename Tuning::template At<K>;
  using Cfg = MergeForwardTcConfig<T, K, Knobs>;
  return launch_merge_forward<T>(merge_forward_tc_kernel<T, kIo, K, Knobs>, prm, Cfg::kTileN, Cfg::kRowsPerPass,
                                 Cfg::max_rows(limits), [](int64_t rows) { return Cfg::smem_bytes(rows); }, stream,
                                 Knobs::kDynamicTiles ? workspace : nullptr);
}

template <class T, MergeIo kIo, class Tuning>
Status merge_forward_tc(const MergeForwardParams<T>& prm, void* workspace, const MergeSmemLimits& limits,
                        cudaStream_t stream) {
  if constexpr (is_mma_b16<T>::value) {
    return with_ksteps(prm.E, Status::kErrorInvalidArgument, [&](auto k) {
      return merge_forward_tc_at<T, kIo, Tuning, decltype(k)::value>(prm, workspace, limits, stream);
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

// ---------------------------------------------------------------------------
// Backward: the tensor-core kernels' pipeline shapes.
// ---------------------------------------------------------------------------
// Four pipeline stages, or two where four would leave room for fewer blocks per SM than the knobs
// aim at (Knobs::kFitBlocks; by default two: e.g. S = 512, E = 32; S = 128, E = 64, whose on-chip
// partials are large): two blocks per SM with two steps in flight each beat one with four
// (docs/gpu-results.md).
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

// The shape Tuning's tensor-core backward kernel launches with at this E under `limits` (the
// mma.sync knobs' or the wgmma kernel's); stages 0 for an E or a type no tensor-core kernel takes.
template <class T, class Tuning>
MergeBackwardTcShape merge_backward_tuned_shape(int64_t S, int E, bool partial_in_smem, const MergeSmemLimits& limits) {
  if constexpr (is_mma_b16<T>::value) {
    return with_ksteps(E, MergeBackwardTcShape{0, SIZE_MAX, 0}, [&](auto k) -> MergeBackwardTcShape {
      constexpr int K = decltype(k)::value;
      if constexpr (is_wgmma_tuning<Tuning>::value)
        return merge_backward_wgmma_shape<T, K>(S, E, partial_in_smem, limits);
      else
        return merge_backward_tc_shape<T, K, typename Tuning::template At<K>>(S, E, partial_in_smem, limits);
    });
  }
  return {0, SIZE_MAX, 0};
}

#if LORY_HAS_DEVICE_CODE
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

template <class T, MergeIo kIo, int kEPT>
Status launch_merge_backward_simt(const MergeBackwardParams<T>& prm, int max_blocks, size_t smem, int& blocks,
                                  cudaStream_t stream) {
  return launch_merge_backward_persistent(merge_backward_simt_kernel<T, kIo, kEPT>, prm, max_blocks, smem, blocks,
                                          stream);
}

// The CUDA-core backward with kEPT = experts_per_thread (1, 2, 4 or 8) and vector I/O or not (the
// scalar path addresses every view by its offsets: flat views cost it no registers there).
template <class T>
Status launch_merge_backward_simt(const MergeBackwardParams<T>& prm, bool vec, int ept, int max_blocks, size_t smem,
                                  int& blocks, cudaStream_t stream) {
  auto run = [&](auto k) {
    constexpr int kEPT = decltype(k)::value;
    return vec ? launch_merge_backward_simt<T, MergeIo::kVec, kEPT>(prm, max_blocks, smem, blocks, stream)
               : launch_merge_backward_simt<T, MergeIo::kScalarRows, kEPT>(prm, max_blocks, smem, blocks, stream);
  };
  switch (ept) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    default: return Status::kErrorInvalidArgument;
  }
}

// The mma.sync backward at `shape` (the plan's, merge_backward_tc_shape). The plan counted 128-param
// tiles (its workspace holds the partials of that many blocks at most); a tuning with wider tiles
// has fewer, and no more blocks than tiles.
template <class T, int kKSteps, class Knobs>
Status launch_merge_backward_tc(MergeBackwardParams<T> prm, int max_blocks, const MergeBackwardTcShape& shape,
                                int& blocks, cudaStream_t stream) {
  if constexpr (Knobs::kTileN != 128) {
    if (shape.tile_n == 128)
      return launch_merge_backward_tc<T, kKSteps, MergeBackwardTcNarrow<Knobs>>(prm, max_blocks, shape, blocks, stream);
  }
  prm.tiles = (prm.P + Knobs::kTileN - 1) / Knobs::kTileN;
  max_blocks = static_cast<int>(std::min<int64_t>(max_blocks, prm.tiles));
  return shape.stages == 2 ? launch_merge_backward_persistent(merge_backward_tc_kernel<T, kKSteps, 2, Knobs>, prm,
                                                              max_blocks, shape.smem, blocks, stream)
                           : launch_merge_backward_persistent(merge_backward_tc_kernel<T, kKSteps, 4, Knobs>, prm,
                                                              max_blocks, shape.smem, blocks, stream);
}

// The wgmma kernel at `shape` (the plan's, merge_backward_wgmma_shape).
template <class T, int kKSteps>
void (*merge_backward_wgmma_kernel_at(int stages))(MergeBackwardParams<T>) {
  return stages == 4   ? merge_backward_wgmma_kernel<T, kKSteps, 4>
         : stages == 3 ? merge_backward_wgmma_kernel<T, kKSteps, 3>
                       : merge_backward_wgmma_kernel<T, kKSteps, 2>;
}
template <class T, int kKSteps>
Status launch_merge_backward_wgmma(const MergeBackwardParams<T>& prm, int max_blocks, const MergeBackwardTcShape& shape,
                                   int& blocks, cudaStream_t stream) {
  void (*kernel)(MergeBackwardParams<T>) = merge_backward_wgmma_kernel_at<T, kKSteps>(shape.stages);
  LORY_RETURN_IF_ERROR(check_wgmma_kernel(reinterpret_cast<const void*>(kernel)));
  return launch_merge_backward_persistent(kernel, prm, max_blocks, shape.smem, blocks, stream);
}

// Tuning's tensor-core backward kernel (a set of mma.sync knobs per kKSteps, or the wgmma kernel) at
// kKSteps = ceil(E / 16), with the shape the plan gave it.
template <class T, class Tuning>
Status merge_backward_tc(const MergeBackwardParams<T>& prm, int max_blocks, const MergeBackwardTcShape& shape,
                         int& blocks, cudaStream_t stream) {
  if constexpr (is_mma_b16<T>::value) {
    return with_ksteps(prm.E, Status::kErrorInvalidArgument, [&](auto k) {
      constexpr int K = decltype(k)::value;
      if constexpr (is_wgmma_tuning<Tuning>::value)
        return launch_merge_backward_wgmma<T, K>(prm, max_blocks, shape, blocks, stream);
      else
        return launch_merge_backward_tc<T, K, typename Tuning::template At<K>>(prm, max_blocks, shape, blocks, stream);
    });
  } else {
    return Status::kErrorInvalidArgument;
  }
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
