// A CPU emulator of the CUDA execution model, for the library's kernels.
//
// This machine and CI have no GPU, so the kernels' own code (indexing, tiling,
// barriers, tensor-core fragment layouts, tails, padding) would otherwise run
// only when a GPU is lent. Under this emulator the host compiler builds the
// device code (LORY_CUDA_EMULATION) and every CUDA thread of a block runs as a
// cooperative fiber on one OS thread:
//   - __syncthreads / __syncwarp are real barriers (a kernel that misses one
//     reads stale shared memory; a deadlock, e.g. a barrier some threads never
//     reach, aborts with a message);
//   - warp collectives (ldmatrix, mma.sync m16n8k16, shuffles) gather all 32
//     lanes and compute what the PTX ISA says each lane receives;
//   - cp.async copies land in shared memory only at the issuing thread's
//     wait_group, so a read that is not ordered after it sees stale data;
//   - dynamic shared memory is poisoned (all bits set: NaN in every float
//     type) at block start, and ldmatrix checks its addresses against it;
//   - launch limits are checked (threads per block, dynamic shared memory
//     against the kernel's attribute and the device's opt-in maximum); the
//     device is an sm_80 (A100), an sm_90 (H100: wgmma, 227 KiB per block)
//     with LORY_EMU_ARCH=sm90, or an sm_86 (99 KiB per block, as sm_89 and
//     sm_120) with LORY_EMU_ARCH=sm86;
//   - statically sized __shared__ variables (LORY_BLOCK_SHARED) are per block
//     and poisoned too; cub::BlockReduce, which needs nvcc, has a stand-in
//     with its contract (result in thread 0 only);
//   - the CUDA runtime calls the tests and launchers make (cudaMalloc, copies,
//     memsets, device attributes, occupancy) are defined in cuda_emu.cpp over
//     host memory (cudaMalloc'd memory poisoned like shared memory), on a small
//     emulated device (2 SMs unless LORY_EMU_SMS says),
//     and the cuBLAS calls in cublas_emu.cpp (column-major GEMMs, fp32 compute).
// Threads run in index order between barriers; LORY_EMU_ORDER=reverse runs them
// backwards, so a missing barrier shows in one order or the other. On x86-64 a
// fiber switch is a few instructions (no system call); elsewhere ucontext.
//
// What it does not model: timing, the memory model across blocks (blocks run
// one after another), register or L1 limits, floating-point contraction. A
// kernel that passes here may still fail on hardware; one that fails here is
// wrong. It is a test facility only: include this header first, compile with
// the host compiler, and link neither the CUDA runtime nor cuBLAS.
#pragma once
#if defined(__CUDACC__)
#error "tests/emu/cuda_emu.hpp emulates CUDA for the host compiler; do not compile it with nvcc"
#endif
#define LORY_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>
#include <tuple>
#include <type_traits>

#define __launch_bounds__(...)

namespace lory_emu {

// The executing thread's coordinates (valid inside a kernel only).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_smem();
void syncthreads();
void syncwarp();

// A warp-wide collective: every lane of the caller's warp deposits `in` and
// `out`; when the last lane arrives, combine(ins, outs) runs once over the 32
// lanes (lane order), then every lane continues with its `out` filled.
using Combine = void (*)(const void* const* ins, void* const* outs);
void warp_collective(const void* in, void* out, Combine combine);

// cp.async: queued per thread (the destination must lie in dynamic shared memory, both addresses
// aligned to `bytes`); commit closes the thread's open group; wait(n) performs every copy of the
// thread's committed groups but the newest n (src_bytes read, the rest of `bytes` zero-filled).
// Copies still queued when a thread exits are performed then.
void cp_async(void* smem_dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);

// A warpgroup-wide collective (4 consecutive warps, 128 threads, all live): like warp_collective,
// combine(ins, outs) runs once over the 128 threads in order.
void warpgroup_collective(const void* in, void* out, Combine combine);

// wgmma.mma_async m64nNk16 (K-major operands, no swizzling; lory/detail/wgmma.cuh): every thread
// of the warpgroup issues it with its accumulators d (N / 2 floats); A comes from the descriptor
// desc_a, or from the four registers a_regs when not null. The product is computed at issue; it
// reaches d at the wgmma_wait that covers its commit group, and d holds NaN until then. An issue
// that accumulates into a d with a pending result chains onto that result, as on hardware.
void wgmma_issue(float* d, int n, bool bf16, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, bool accumulate);
void wgmma_commit();
void wgmma_wait(int n);
// Byte offset of p in the block's dynamic shared memory (what a shared-memory address is there).
uint32_t smem_offset(const void* p);

// The PTX architecture cudaFuncGetAttributes reports for every kernel (its ptxVersion, e.g. 75 for
// code JIT-compiled from compute_75 PTX); 0, the default, reports the emulated device's own.
void set_kernel_ptx_version(int version);
// The kernels launched (their addresses, in order) since the last call; clears the log.
std::vector<const void*> take_launch_log();

// Aborts the test run with a message (a kernel broke a rule of the model).
[[noreturn]] void fail(const char* what);
// Checks that [p, p + bytes) lies in the current block's dynamic shared memory.
void check_smem(const void* p, size_t bytes, const char* what);

// A block's statically sized __shared__ variable (LORY_BLOCK_SHARED): one per
// key and block, poisoned (all bits set) when the block starts.
void* block_shared_bytes(const void* key, size_t bytes);
template <class T>
T& block_shared(const void* key) {
  return *static_cast<T*>(block_shared_bytes(key, sizeof(T)));
}

// Stand-in for cub::BlockReduce (whose block primitives need nvcc): the same
// contract -- the result is valid in thread 0 only (other threads get NaN
// here), and the caller syncs before reusing the storage. Fixed order.
template <class T, int kThreads>
struct BlockReduce {
  struct TempStorage {
    T v[kThreads];
  };
  explicit BlockReduce(TempStorage& s) : s_(s) {}
  template <class Op>
  T Reduce(T x, Op op) {
    const int tid = static_cast<int>(thread_idx().x);
    s_.v[tid] = x;
    syncthreads();
    if (tid != 0) return T(NAN);
    T r = s_.v[0];
    for (int i = 1; i < kThreads; ++i) r = op(r, s_.v[i]);
    return r;
  }
  T Sum(T x) {
    return Reduce(x, [](T a, T b) { return a + b; });
  }

 private:
  TempStorage& s_;
};

// Runs body() once per thread of every block (blocks in order x, y, z).
void run_grid(const void* func, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, const A&... args) {
  const std::tuple<std::decay_t<P>...> params(args...);  // copied once, as a launch does
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, params); });
}

// ---- tensor-core and ldmatrix semantics (PTX ISA, m16n8k16 and m8n8.x4) ----
inline float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16 v;
    std::memcpy(static_cast<void*>(&v), &bits, 2);
    return __bfloat162float(v);
  }
  __half v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  return __half2float(v);
}

struct LdmatrixIn {
  const void* row;
};
struct Regs4 {
  uint32_t r[4];
};
// Matrix q's rows come from lanes 8q..8q+7. Lane l receives, in register q, the
// elements (row l/4, cols 2(l%4) and 2(l%4)+1) of matrix q, or with .trans the
// elements (rows 2(l%4) and 2(l%4)+1, col l/4); the first element in the low half.
template <bool kTrans>
void ldmatrix_x4_combine(const void* const* ins, void* const* outs) {
  const uint16_t* rows[32];
  for (int l = 0; l < 32; ++l) {
    const void* p = static_cast<const LdmatrixIn*>(ins[l])->row;
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
    check_smem(p, 16, "ldmatrix row");
    rows[l] = static_cast<const uint16_t*>(p);
  }
  for (int l = 0; l < 32; ++l) {
    Regs4& o = *static_cast<Regs4*>(outs[l]);
    for (int q = 0; q < 4; ++q) {
      uint16_t lo, hi;
      if (kTrans) {
        lo = rows[8 * q + 2 * (l % 4)][l / 4];
        hi = rows[8 * q + 2 * (l % 4) + 1][l / 4];
      } else {
        lo = rows[8 * q + l / 4][2 * (l % 4)];
        hi = rows[8 * q + l / 4][2 * (l % 4) + 1];
      }
      o.r[q] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};
struct MmaOut {
  float d[4];
};
// D (16x8) = A (16x16, row) x B (16x8, col) + C. With g = lane / 4, t = lane % 4:
//   A: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B: b0 (k = 2t..2t+1, n = g)  b1 (k = 2t+8..2t+9, n = g)
//   C, D: c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// Products of 16-bit values are exact in fp32; the sum is taken in double and
// added to C in fp32 (hardware's internal order differs in the last bits).
template <bool kBf16>
void mma_16816_combine(const void* const* ins, void* const* outs) {
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return b16_to_float(static_cast<uint16_t>(r & 0xffffu), kBf16); };
  auto hi = [](uint32_t r) { return b16_to_float(static_cast<uint16_t>(r >> 16), kBf16); };
  for (int l = 0; l < 32; ++l) {
    const MmaIn& x = *static_cast<const MmaIn*>(ins[l]);
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {      // a0/a1: cols 2t.., a2/a3: cols 2t+8..
      for (int v = 0; v < 2; ++v) {    // row g, g + 8
        const uint32_t r = x.a[2 * h + v];
        A[g + 8 * v][2 * t + 8 * h] = lo(r);
        A[g + 8 * v][2 * t + 8 * h + 1] = hi(r);
      }
      B[2 * t + 8 * h][g] = lo(x.b[h]);
      B[2 * t + 8 * h + 1][g] = hi(x.b[h]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const MmaIn& x = *static_cast<const MmaIn*>(ins[l]);
    MmaOut& o = *static_cast<MmaOut*>(outs[l]);
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
      double s = 0;
      for (int k = 0; k < 16; ++k) s += double(A[row][k]) * double(B[k][col]);
      o.d[i] = x.c[i] + static_cast<float>(s);
    }
  }
}

template <class T>
struct ShflIn {
  T v;
  int src;
};
template <class T>
void shfl_combine(const void* const* ins, void* const* outs) {
  for (int l = 0; l < 32; ++l) {
    const int src = static_cast<const ShflIn<T>*>(ins[l])->src;
    *static_cast<T*>(outs[l]) = static_cast<const ShflIn<T>*>(ins[src & 31])->v;
  }
}

}  // namespace lory_emu

// ---- the CUDA built-ins the kernels use ----
#define threadIdx (::lory_emu::thread_idx())
#define blockIdx (::lory_emu::block_idx())
#define blockDim (::lory_emu::block_dim())
#define gridDim (::lory_emu::grid_dim())

inline void __syncthreads() { lory_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { lory_emu::syncwarp(); }
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
inline float __fdividef(float a, float b) { return a / b; }
inline float atomicAdd(float* p, float v) {  // one OS thread runs every fiber: a plain add is atomic
  const float old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  lory_emu::ShflIn<T> in{v, (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1))};
  T out{};
  lory_emu::warp_collective(&in, &out, &lory_emu::shfl_combine<T>);
  return out;
}
