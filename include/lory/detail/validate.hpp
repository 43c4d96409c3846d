// lory: small validation helpers shared by every primitive's argument checks.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN
namespace detail {

inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// a * b without signed overflow, for sizes that must be addressable.
inline bool mul_fits(int64_t a, int64_t b) { return a >= 0 && b >= 0 && (a == 0 || b <= INT64_MAX / a); }

// Workspace carving: each piece 256-byte aligned, offsets from the workspace base.
inline constexpr size_t align_up(size_t n, size_t a = 256) { return (n + a - 1) / a * a; }

struct WorkspaceCarver {
  unsigned char* base;
  size_t offset = 0;
  template <class T> T* take(size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + offset) : nullptr;
    offset += align_up(count * sizeof(T));
    return p;
  }
};

}  // namespace detail
LORY_NAMESPACE_END
