// lory: small validation helpers shared by every primitive's argument checks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "lory/config.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// a * b without signed overflow, for sizes that must be addressable.
inline bool mul_fits(int64_t a, int64_t b) { return a >= 0 && b >= 0 && (a == 0 || b <= INT64_MAX / a); }

// The same alignment rule on every side of the API (GPU launchers and CPU twins): a data pointer
// must be aligned to its element type. A null pointer passes (nullness is checked separately).
template <class P>
inline bool type_aligned(const P* p) {
  return is_aligned(p, alignof(P));
}
template <class P>
inline Status check_aligned(const P* p, const char* name) {
  return type_aligned(p) ? Status::kSuccess
                         : fail(Status::kErrorMisalignedPointer, name, "not aligned to its element type");
}

// The bytes a [rows, cols] view with a row stride (in elements) spans, as a half-open address range.
// Only for views whose sizes validation has already bounded (the product cannot overflow).
struct ByteRange {
  uintptr_t begin = 0, end = 0;  // empty when begin == end (a null pointer)
  bool too_big = false;          // past the end of the address space: no such buffer can exist
};
// The address the library's own size queries fill shape-only argument structs with (never
// dereferenced, never a real buffer: page 1); such operands take part in no aliasing check.
constexpr uintptr_t kShapeOnlyAddress = 4096;

template <class P>
inline ByteRange view_range(const P* p, int64_t rows, int64_t cols, int64_t stride) {
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  if (!p || b == kShapeOnlyAddress || rows <= 0 || cols <= 0) return {};
  // Elements fit in int64 (validated); bytes past the address space saturate.
  const uintptr_t elems = static_cast<uintptr_t>(rows - 1) * static_cast<uintptr_t>(stride) + static_cast<uintptr_t>(cols);
  const uintptr_t room = (UINTPTR_MAX - b) / sizeof(P);
  if (elems > room) return {b, UINTPTR_MAX, true};
  return {b, b + elems * sizeof(P), false};
}
template <class P>
inline ByteRange array_range(const P* p, int64_t n) { return view_range(p, 1, n, n); }
inline bool overlaps(ByteRange a, ByteRange b) {
  return a.begin != a.end && b.begin != b.end && a.begin < b.end && b.begin < a.end;
}
// Whether two [rows, cols] views of P with the same row stride sit side by side in every row (the
// column blocks of one wider matrix, as [da | du] of a [rows, 2 cols] one): their spans overlap but
// no element is shared. Their starts must lie a whole number of elements apart.
template <class P>
inline bool views_side_by_side(const P* p, const P* q, int64_t cols, int64_t stride) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(q);
  const uintptr_t delta = a < b ? b - a : a - b;
  if (cols <= 0 || stride <= 0 || delta % sizeof(P) != 0) return false;
  const uintptr_t col = (delta / sizeof(P)) % static_cast<uintptr_t>(stride);
  const uintptr_t c = static_cast<uintptr_t>(cols);
  return col >= c && col + c <= static_cast<uintptr_t>(stride);
}
// An output may not share memory with an input (or another output) unless the call documents that
// pair as allowed in place; `same_ok` allows exactly the same range (the documented in-place use).
inline Status check_no_alias(ByteRange out, const char* out_name, ByteRange in, bool same_ok = false) {
  if (out.too_big || in.too_big)
    return fail(Status::kErrorInvalidSize, out_name, "it or an operand runs past the address space");
  if (!overlaps(out, in)) return Status::kSuccess;
  if (same_ok && out.begin == in.begin && out.end == in.end) return Status::kSuccess;
  return fail(Status::kErrorInvalidArgument, out_name, "overlaps an input or another output (see the aliasing rules)");
}

// One operand of a call for the aliasing check: its name, its bytes, and the one input (by name) it
// may coincide with exactly, where the call documents that in-place use.
struct Operand {
  const char* name;
  ByteRange range;
  const char* in_place_with = nullptr;
};
// Every output must be disjoint from every input and from the other outputs, except an exact
// coincidence with its documented in-place partner. Names the output at fault.
// (Arrays, not initializer lists: nvcc's host-code pass mangles a braced list as a second argument.)
template <size_t NO, size_t NI>
inline Status check_aliasing(const Operand (&outputs)[NO], const Operand (&inputs)[NI]) {
  for (const Operand& o : outputs)
    if (o.range.too_big) return fail(Status::kErrorInvalidSize, o.name, "its extent runs past the address space");
  for (const Operand& i : inputs)
    if (i.range.too_big) return fail(Status::kErrorInvalidSize, i.name, "its extent runs past the address space");
  for (size_t o = 0; o < NO; ++o) {
    for (const Operand& in : inputs) {
      const bool same_ok = outputs[o].in_place_with && std::strcmp(outputs[o].in_place_with, in.name) == 0;
      LORY_RETURN_IF_ERROR(check_no_alias(outputs[o].range, outputs[o].name, in.range, same_ok));
    }
    for (size_t p = 0; p < o; ++p) LORY_RETURN_IF_ERROR(check_no_alias(outputs[o].range, outputs[o].name, outputs[p].range));
  }
  return Status::kSuccess;
}

// Two-phase workspace protocol shared by every launcher and plan: a null workspace asks for the
// size (written to workspace_bytes); otherwise the size is checked, then the base's alignment
// (`align` bytes: what the call's pieces need, 1 when it uses none), before anything is touched.
inline Status workspace_protocol(void* workspace, size_t& workspace_bytes, size_t needed, bool& size_query,
                                 uintptr_t align = 1) {
  size_query = (workspace == nullptr);
  if (size_query) {
    workspace_bytes = needed;
    return Status::kSuccess;
  }
  if (workspace_bytes < needed) return fail(Status::kErrorWorkspaceTooSmall, "workspace_bytes", "below the size query's answer");
  if (!is_aligned(workspace, align)) return fail(Status::kErrorMisalignedPointer, "workspace", "base misaligned");
  return Status::kSuccess;
}

// Workspace carving: each piece 256-byte aligned, offsets from the workspace base.
inline constexpr size_t align_up(size_t n, size_t a = 256) { return (n + a - 1) / a * a; }

// The alignment a carved workspace's base needs: its pieces sit at 256-byte offsets from it, so
// a base off the 16-byte grid would misalign every one (16-byte vectors, fp32 and fp64 pieces).
constexpr uintptr_t kCarvedWorkspaceAlign = 16;

// Pieces are laid out in order, each at a 256-byte offset. Sizes are computed in checked arithmetic:
// a piece or total past SIZE_MAX (or a count past INT64_MAX) sets `overflow`, and the caller reports
// kErrorInvalidSize instead of a wrapped-around size. end() is the exact end of the last piece (not
// padded), so a total grows with every piece's count.
struct WorkspaceCarver {
  unsigned char* base;
  size_t offset = 0;  // where the next piece starts (256-byte aligned)
  size_t last_end = 0;  // end of the last piece taken
  bool overflow = false;

  // A piece of a * b * c elements of T.
  template <class T> T* take(int64_t a, int64_t b = 1, int64_t c = 1) {
    size_t bytes = 0;
    if (!mul_fits(a, b) || !mul_fits(a * b, c) || static_cast<uint64_t>(a * b * c) > SIZE_MAX / sizeof(T)) {
      overflow = true;
    } else {
      bytes = static_cast<size_t>(a * b * c) * sizeof(T);
    }
    if (overflow || offset > SIZE_MAX - 512 || bytes > SIZE_MAX - 512 - offset) {
      overflow = true;
      return nullptr;
    }
    T* p = base ? reinterpret_cast<T*>(base + offset) : nullptr;
    last_end = offset + bytes;
    offset = align_up(last_end);
    return p;
  }
  // A piece of n bytes (a leaf operation's scratch).
  void* take_bytes(size_t n) {
    return n > static_cast<size_t>(INT64_MAX) ? (overflow = true, nullptr)
                                                : take<unsigned char>(static_cast<int64_t>(n));
  }
  // Bytes the pieces span: the padded offset, or the exact end with `exact_end`.
  Status total(size_t& bytes, bool exact_end = false) const {
    if (overflow) return fail(Status::kErrorInvalidSize, "workspace", "its size overflows size_t");
    bytes = exact_end ? last_end : offset;
    return Status::kSuccess;
  }
};

}  // namespace detail
LORY_NAMESPACE_END
