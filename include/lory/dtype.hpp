// lory: storage dtypes and conversions that work on the host and the device.
//
// Storage may be double (CPU twin only), float, __half or __nv_bfloat16; all
// arithmetic is done in float (GPU) or in a caller-chosen accumulator (CPU).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lory/config.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

LORY_HOST_DEVICE inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat64: return "float64";
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

LORY_HOST_DEVICE inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  return 0;
}

template <class T> struct dtype_of;
template <> struct dtype_of<double> { static constexpr DType value = DType::kFloat64; };
template <> struct dtype_of<float> { static constexpr DType value = DType::kFloat32; };
template <> struct dtype_of<__half> { static constexpr DType value = DType::kFloat16; };
template <> struct dtype_of<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };

// Conversions to and from float. The CUDA fp16/bf16 headers provide host
// implementations of these intrinsics, so the CPU twin rounds exactly as the
// GPU does (round-to-nearest-even).
template <class T> LORY_HOST_DEVICE LORY_FORCEINLINE float to_float(T v) { return static_cast<float>(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE float to_float<__half>(__half v) { return __half2float(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> LORY_HOST_DEVICE LORY_FORCEINLINE T from_float(float v) { return static_cast<T>(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Conversions through double for the CPU twin's double-accumulation mode.
template <class T> inline double to_double(T v) { return static_cast<double>(to_float(v)); }
template <> inline double to_double<double>(double v) { return v; }
template <class T> inline T from_double(double v) { return from_float<T>(static_cast<float>(v)); }
template <> inline double from_double<double>(double v) { return v; }

// Generic conversion into an accumulator type (float or double).
template <class Acc, class T> LORY_HOST_DEVICE LORY_FORCEINLINE Acc load_as(T v) {
  return static_cast<Acc>(to_float(v));
}
template <> inline double load_as<double, double>(double v) { return v; }
template <class T, class Acc> LORY_HOST_DEVICE LORY_FORCEINLINE T store_as(Acc v) {
  return from_float<T>(static_cast<float>(v));
}
template <> inline double store_as<double, double>(double v) { return v; }

LORY_NAMESPACE_END

// Runtime-to-compile-time dtype dispatch for the GPU storage dtypes. The
// default branch is an explicit error, never a silent fallthrough:
//   LORY_DISPATCH_GPU_DTYPE(dtype, T, { return launch<T>(...); });
#define LORY_DISPATCH_GPU_DTYPE(dtype, TYPE, ...)                               \
  switch (dtype) {                                                              \
    case LORY_NS_QUALIFIER::DType::kFloat32: { using TYPE = float; __VA_ARGS__ } break;        \
    case LORY_NS_QUALIFIER::DType::kFloat16: { using TYPE = __half; __VA_ARGS__ } break;       \
    case LORY_NS_QUALIFIER::DType::kBFloat16: { using TYPE = __nv_bfloat16; __VA_ARGS__ } break; \
    default: return LORY_NS_QUALIFIER::Status::kErrorUnsupportedDType;          \
  }

// The same for the CPU twin, which also accepts double storage.
#define LORY_DISPATCH_CPU_DTYPE(dtype, TYPE, ...)                               \
  switch (dtype) {                                                              \
    case LORY_NS_QUALIFIER::DType::kFloat64: { using TYPE = double; __VA_ARGS__ } break;       \
    case LORY_NS_QUALIFIER::DType::kFloat32: { using TYPE = float; __VA_ARGS__ } break;        \
    case LORY_NS_QUALIFIER::DType::kFloat16: { using TYPE = __half; __VA_ARGS__ } break;       \
    case LORY_NS_QUALIFIER::DType::kBFloat16: { using TYPE = __nv_bfloat16; __VA_ARGS__ } break; \
    default: return LORY_NS_QUALIFIER::Status::kErrorUnsupportedDType;          \
  }
