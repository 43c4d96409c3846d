// lory: status codes returned by every validation routine and launcher.
#pragma once
#include "lory/config.hpp"

LORY_NAMESPACE_BEGIN

// Every public entry point returns a Status. Validation errors are reported
// before any memory is touched or any kernel launched.
enum class Status : int {
  kSuccess = 0,
  kErrorNullPointer,          // a required pointer is null
  kErrorInvalidSize,          // a size is zero, negative or overflows
  kErrorInvalidShape,         // sizes that do not fit together
  kErrorUnsupportedDType,     // dtype outside {float, half, bfloat16} (or double on the CPU)
  kErrorUnsupportedExpertCount,  // E outside [1, kMaxExperts]
  kErrorMisalignedPointer,    // a pointer the kernel needs aligned is not
  kErrorWorkspaceTooSmall,    // caller's workspace smaller than the query said
  kErrorInvalidArgument,      // any other argument out of range (mode, stride, flag)
  kErrorCudaLaunch,           // a kernel launch or CUDA runtime call failed
  kErrorCublas,               // a cuBLAS call failed
  kErrorNoDevice,             // a GPU path was asked for without a GPU
};

LORY_HOST_DEVICE inline const char* status_string(Status s) {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kErrorNullPointer: return "null pointer";
    case Status::kErrorInvalidSize: return "invalid size (zero, negative or overflowing)";
    case Status::kErrorInvalidShape: return "inconsistent shapes";
    case Status::kErrorUnsupportedDType: return "unsupported dtype";
    case Status::kErrorUnsupportedExpertCount: return "unsupported expert count";
    case Status::kErrorMisalignedPointer: return "misaligned pointer";
    case Status::kErrorWorkspaceTooSmall: return "workspace too small";
    case Status::kErrorInvalidArgument: return "invalid argument";
    case Status::kErrorCudaLaunch: return "CUDA launch or runtime error";
    case Status::kErrorCublas: return "cuBLAS error";
    case Status::kErrorNoDevice: return "no CUDA device";
  }
  return "unknown status";
}

// Which argument a failed call blames. Every check that fails records one on the calling thread
// (cuBLAS-style "last error", but with the argument's name), so a caller can say more than the
// Status does:
//
//   const lory::Status st = plan.forward(args, ws, bytes, stream);
//   if (st != lory::Status::kSuccess) {
//     const lory::ErrorDetail e = lory::last_error_detail();
//     // e.g. "misaligned pointer: x (not aligned to its element type)"
//     std::fprintf(stderr, "%s: %s (%s)\n", lory::status_string(st), e.argument, e.reason);
//   }
//
// `argument` is the field name of the argument struct (dotted for nested ones, "layout.segment_len"),
// or the name of a call parameter ("workspace", "workspace_bytes"); `reason` is one short clause.
// Both point to string literals (never freed). The record is per thread, costs one store on the
// failure path and nothing on success; every validation clears it when it starts, so after a failed
// call it describes that call's failure (its `status` equals the returned Status). Failures not tied
// to one argument (a CUDA launch, cuBLAS) leave `argument` empty.
struct ErrorDetail {
  Status status = Status::kSuccess;
  const char* argument = "";
  const char* reason = "";
};

namespace detail {
inline ErrorDetail& error_detail_slot() {
  static thread_local ErrorDetail slot;
  return slot;
}
// Records the failure and returns its status: `return detail::fail(Status::kErrorNullPointer, "x", "is null");`
inline Status fail(Status s, const char* argument, const char* reason = "") {
  ErrorDetail& d = error_detail_slot();
  d.status = s;
  d.argument = argument;
  d.reason = reason;
  return s;
}
inline void clear_error_detail() { error_detail_slot() = ErrorDetail{}; }
}  // namespace detail

// The argument at fault in the last failed lory call on this thread (see ErrorDetail).
inline ErrorDetail last_error_detail() { return detail::error_detail_slot(); }

// Largest expert count any primitive accepts (the routing weights of one
// segment live in registers / shared memory).
constexpr int kMaxExperts = 256;

LORY_NAMESPACE_END

// Propagate a non-success Status to the caller.
#define LORY_RETURN_IF_ERROR(expr)                                  \
  do {                                                              \
    const LORY_NS_QUALIFIER::Status lory_status_ = (expr);          \
    if (lory_status_ != LORY_NS_QUALIFIER::Status::kSuccess) return lory_status_; \
  } while (0)
