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
  if (workspace_bytes < needed) return Status::kErrorWorkspaceTooSmall;
  if (!is_aligned(workspace, align)) return Status::kErrorMisalignedPointer;
  return Status::kSuccess;
}

// Workspace carving: each piece 256-byte aligned, offsets from the workspace base.
inline constexpr size_t align_up(size_t n, size_t a = 256) { return (n + a - 1) / a * a; }

// The alignment a carved workspace's base needs: its pieces sit at 256-byte offsets from it, so
// a base off the 16-byte grid would misalign every one (16-byte vectors, fp32 and fp64 pieces).
constexpr uintptr_t kCarvedWorkspaceAlign = 16;

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
