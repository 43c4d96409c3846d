// lory (private), merge layer "views": the merge kernels' 2-D views (lory/merge.hpp's `rows` and row pitches) -- how element j of
// an expert's (or segment's) flattened rows x cols view is addressed, and the 16-byte vector I/O
// over such a view.
//
// The kernels see every operand as P = rows * cols consecutive elements per expert (segment) and
// tile over P. Element j of operand X sits at X_base + (j / cols) * pitch + j % cols
// (MergeRowView::offset). A view is flat when rows == 1 or pitch == cols: then offset(j) == j. The
// divide by cols uses a precomputed magic number (MergeDivmod: one 64-bit multiply-high, two
// shifts; no division instruction), once per thread and tile on the vector path: all of a thread's
// vectors of a tile sit at one column, so the kernels compute the offset once and address every
// row from it. The GEMM method treats a call whose views are all flat as 1-D (merge_view_is_flat
// in lory/merge.hpp).
//
// Vectors: a 16-byte vector never straddles two rows when cols and every non-flat pitch are
// multiples of the vector (column offsets of vectors are multiples of it), so the vector path
// addresses a whole vector from its first element (merge_view_vec_ok); otherwise a scalar path
// moves the vector's elements one by one: at consecutive addresses where every view is flat
// (MergeIo::kScalar), else each at its own view offset (MergeIo::kScalarRows). The two scalar
// paths are separate kernels where it pays: in the CUDA-core forward, the row-gap addressing of
// its 64-accumulator stores cost 30 to 40 registers per thread, and the flat one needs none.
#pragma once
#include <cstdint>

#include "lory/config.hpp"
#include "lory/detail/cuda.cuh"
#include "lory/detail/merge_mma.cuh"
#include "lory/detail/validate.hpp"
#include "lory/dtype.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

// q = n / d and r = n % d for 0 <= n < 2^63 and a divisor d >= 1 fixed on the host: the
// round-up method of Granlund and Montgomery (as in Hacker's Delight, 10-8), exact for every
// 64-bit unsigned n: with l = ceil(log2 d), m = floor(2^64 (2^l - d) / d) + 1,
// t = mulhi(m, n), q = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0).
struct MergeDivmod {
  int64_t d = 1;
  uint64_t m = 1;
  int sh1 = 0, sh2 = 0;

  static MergeDivmod make(int64_t divisor) {
    MergeDivmod r;
    r.d = divisor < 1 ? 1 : divisor;
    int l = 0;
    while (l < 63 && (int64_t(1) << l) < r.d) ++l;
    // 2^64 (2^l - d) / d < 2^64 since 2^l - d < d: the quotient fits 64 bits.
    r.m = uint64_t(((unsigned __int128)((uint64_t(1) << l) - uint64_t(r.d)) << 64) / uint64_t(r.d)) + 1;
    r.sh1 = l < 1 ? l : 1;
    r.sh2 = l > 1 ? l - 1 : 0;
    return r;
  }
  LORY_HOST_DEVICE LORY_FORCEINLINE static uint64_t mulhi(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
    return __umul64hi(a, b);
#else
    return uint64_t(((unsigned __int128)a * b) >> 64);
#endif
  }
  LORY_HOST_DEVICE LORY_FORCEINLINE int64_t div(int64_t n) const {
    const uint64_t u = uint64_t(n), t = mulhi(m, u);
    return int64_t((t + ((u - t) >> sh1)) >> sh2);
  }
};

// One operand's view: cols elements per row, rows `pitch` elements apart (flat: pitch == cols).
struct MergeRowView {
  int64_t pitch = 1;
  bool flat = true;
  MergeDivmod cols;  // divides by the columns per row

  // rows x cols at `pitch` (ignored where rows == 1).
  static MergeRowView make(int64_t rows, int64_t cols, int64_t pitch) {
    MergeRowView v;
    v.flat = rows <= 1 || pitch == cols;
    v.pitch = v.flat ? cols : pitch;
    v.cols = MergeDivmod::make(cols);
    return v;
  }
  // Where element j of the flattened view sits, from the view's start: (j / cols) * pitch + j % cols
  // = j + (j / cols) * (pitch - cols), which is j on a flat view. No branch on `flat` here: with one,
  // ptxas split the kernels' tile loops and raised the CUDA-core forward's registers sharply, where
  // the divide costs a multiply-high per thread and tile (the kernels hoist the offset).
  LORY_HOST_DEVICE LORY_FORCEINLINE int64_t offset(int64_t j) const { return j + cols.div(j) * (pitch - cols.d); }
};

// How a merge kernel moves an operand's 16-byte vectors (decided once per call, merge_io):
//   kVec        whole vectors (merge_view_vec_ok holds for every operand of the call);
//   kScalar     element by element, every view flat (offset(j) == j);
//   kScalarRows element by element, each at its view offset (any views).
enum class MergeIo { kScalar, kScalarRows, kVec };
inline MergeIo merge_io(bool vec, bool flat) {
  return vec ? MergeIo::kVec : flat ? MergeIo::kScalar : MergeIo::kScalarRows;
}
// v.offset(j), which is j on the flat views of kScalar.
template <MergeIo kIo>
LORY_HOST_DEVICE LORY_FORCEINLINE int64_t merge_view_offset(const MergeRowView& v, int64_t j) {
  return kIo == MergeIo::kScalar ? j : v.offset(j);
}

// Whether an operand at `base` with expert (segment) stride `stride` allows 16-byte vectors:
// base and stride 16-byte aligned, and (non-flat) cols and pitch multiples of the vector.
template <class T>
inline bool merge_view_vec_ok(const T* base, int64_t stride, const MergeRowView& v) {
  constexpr int64_t V = Vec16<T>::kSize;
  return is_aligned(base, 16) && stride % V == 0 && (v.flat || (v.cols.d % V == 0 && v.pitch % V == 0));
}

#if LORY_HAS_DEVICE_CODE
// Elements [col, col + kSize) of the flattened view at `base`; those at or past P read as zero. col
// is a multiple of the vector and off == v.offset(col) (a kernel computes it once for all the
// vectors of a thread at the same column). kVec: no vector straddles a row, so a whole vector sits
// at off (a tail only where the view is flat).
template <class T, MergeIo kIo>
LORY_DEVICE LORY_FORCEINLINE Vec16<T> load_view_vec(const T* base, const MergeRowView& v, int64_t off, int64_t col,
                                                    int64_t P) {
  constexpr int V = Vec16<T>::kSize;
  if (kIo == MergeIo::kVec && col + V <= P) return load_vec16(base + off);
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < V; ++i)
    r.v[i] = (col + i < P) ? base[kIo == MergeIo::kScalarRows ? v.offset(col + i) : off + i] : from_float<T>(0.f);
  return r;
}

// Writes elements [col, min(col + kSize, P)) of the flattened view at `base` (off, kIo: as
// load_view_vec's); kStream: the vector store evict-first.
template <class T, MergeIo kIo, bool kStream = false>
LORY_DEVICE LORY_FORCEINLINE void store_view_vec(T* base, const MergeRowView& v, int64_t off, int64_t col, int64_t P,
                                                 const Vec16<T>& x) {
  constexpr int V = Vec16<T>::kSize;
  if (kIo == MergeIo::kVec && col + V <= P) {
    if constexpr (kStream) store_vec16_stream(base + off, x);
    else store_vec16(base + off, x);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (col + i < P) base[kIo == MergeIo::kScalarRows ? v.offset(col + i) : off + i] = x.v[i];
}

// The same into shared memory by cp.async (sm_80+; merge_view_vec_ok holds; off == v.offset(col)):
// elements at or past P, and the whole vector when !valid (base is then only a valid address), are
// zero-filled.
template <class T>
LORY_DEVICE LORY_FORCEINLINE void cp_async_view_vec(T* smem_dst, const T* base, int64_t off, bool valid, int64_t col,
                                                    int64_t P) {
  constexpr int V = Vec16<T>::kSize;
  const int bytes = (valid && col < P) ? int(sizeof(T)) * (P - col < V ? int(P - col) : V) : 0;
  cp_async_16(smem_dst, bytes ? base + off : base, bytes);
}
#endif  // LORY_HAS_DEVICE_CODE

}  // namespace detail
LORY_NAMESPACE_END
