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
