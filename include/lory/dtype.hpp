// lory: storage dtypes and conversions that work on the host and the device.
//
// Storage may be double (CPU twin only), float, half_t or bfloat16_t; all
// arithmetic is done in float (GPU) or in a caller-chosen accumulator (CPU).
//
// half_t and bfloat16_t are CUDA's __half and __nv_bfloat16 whenever CUDA's
// fp16/bf16 headers are reachable (always under nvcc). Without them (a plain
// C++ compiler, no CUDA install), or when the including code defines
// LORY_HOST_ONLY=1 (the lory::lory_cpu CMake target does), they are lory's
// own 16-bit storage types below, which convert with the same
// round-to-nearest-even rule, so the CPU twins give the same bits either way.
// Every translation unit of one program should see the same choice.
#pragma once
#include <cstdint>
#include <cstring>

#if !defined(LORY_HOST_ONLY)
#if defined(__CUDACC__)
#define LORY_HOST_ONLY 0
#elif defined(__has_include)
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#define LORY_HOST_ONLY 0
#else
#define LORY_HOST_ONLY 1
#endif
#else
#define LORY_HOST_ONLY 0
#endif
#endif

#if LORY_HOST_ONLY && defined(__CUDACC__)
#error "LORY_HOST_ONLY is for host compilers: device code needs CUDA's __half and __nv_bfloat16"
#endif

#if !LORY_HOST_ONLY
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "lory/config.hpp"
#include "lory/status.hpp"

LORY_NAMESPACE_BEGIN

namespace detail {
// IEEE binary16 / bfloat16 bit patterns to and from float, rounding to nearest even. These follow
// CUDA's host conversions bit for bit, NaN included (any NaN becomes 0x7fff, and a half NaN
// becomes the float 0x7fffffff), so the host-only types round exactly as __half and
// __nv_bfloat16 do; tests/cpu compares them over every 16-bit pattern and the rounding ties.
inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// Adds one to r when the dropped bits (rem, out of 2^shift) pass the halfway point, or sit on it
// and r is odd.
inline std::uint32_t round_nearest_even(std::uint32_t r, std::uint32_t rem, unsigned shift) {
  const std::uint32_t half = std::uint32_t(1) << (shift - 1);
  return r + ((rem > half || (rem == half && (r & 1u))) ? 1u : 0u);
}

inline std::uint16_t float_to_bfloat16_bits(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  return static_cast<std::uint16_t>(round_nearest_even(x >> 16, x & 0xffffu, 16));
}
inline float bfloat16_bits_to_float(std::uint16_t h) { return bits_float(std::uint32_t(h) << 16); }

inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25: zero (2^-25 ties to 0)
  const std::uint32_t exponent = a >> 23;               // biased by 127; half's bias is 15
  const std::uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
  if (exponent >= 113) {                                // a normal half: drop 13 bits; a carry
    const std::uint32_t r = ((exponent - 112) << 10) | ((mantissa & 0x7fffffu) >> 13);
    return static_cast<std::uint16_t>(sign | round_nearest_even(r, mantissa & 0x1fffu, 13));
  }
  const unsigned shift = 126u - exponent;               // a subnormal half: units of 2^-24
  const std::uint32_t r = mantissa >> shift;            // (a carry into bit 10 gives the least normal)
  return static_cast<std::uint16_t>(sign | round_nearest_even(r, mantissa & ((1u << shift) - 1u), shift));
}
inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(mantissa ? 0x7fffffffu : (sign | 0x7f800000u));
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    exponent = 113;                                     // normalise the subnormal
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    return bits_float(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
}  // namespace detail

#if LORY_HOST_ONLY
// 16-bit storage types for a build without CUDA's headers: the bits and explicit conversions.
struct half_t {
  std::uint16_t bits;
  half_t() = default;
  explicit half_t(float f) : bits(detail::float_to_half_bits(f)) {}
  explicit operator float() const { return detail::half_bits_to_float(bits); }
};
struct bfloat16_t {
  std::uint16_t bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float f) : bits(detail::float_to_bfloat16_bits(f)) {}
  explicit operator float() const { return detail::bfloat16_bits_to_float(bits); }
};
#else
using half_t = __half;
using bfloat16_t = __nv_bfloat16;
#endif

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
template <> struct dtype_of<half_t> { static constexpr DType value = DType::kFloat16; };
template <> struct dtype_of<bfloat16_t> { static constexpr DType value = DType::kBFloat16; };

// Conversions to and from float, rounding to nearest even. CUDA's fp16/bf16 headers provide host
// implementations of these intrinsics, so the CPU twin rounds exactly as the GPU does; the
// host-only types use detail::float_to_half_bits and friends, which round the same way.
template <class T> LORY_HOST_DEVICE LORY_FORCEINLINE float to_float(T v) { return static_cast<float>(v); }
template <class T> LORY_HOST_DEVICE LORY_FORCEINLINE T from_float(float v) { return static_cast<T>(v); }
#if LORY_HOST_ONLY
template <> inline float to_float<half_t>(half_t v) { return detail::half_bits_to_float(v.bits); }
template <> inline float to_float<bfloat16_t>(bfloat16_t v) { return detail::bfloat16_bits_to_float(v.bits); }
template <> inline half_t from_float<half_t>(float v) { return half_t(v); }
template <> inline bfloat16_t from_float<bfloat16_t>(float v) { return bfloat16_t(v); }
#else
template <> LORY_HOST_DEVICE LORY_FORCEINLINE float to_float<__half>(__half v) { return __half2float(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> LORY_HOST_DEVICE LORY_FORCEINLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
#endif

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
    case LORY_NS_QUALIFIER::DType::kFloat16: { using TYPE = LORY_NS_QUALIFIER::half_t; __VA_ARGS__ } break;       \
    case LORY_NS_QUALIFIER::DType::kBFloat16: { using TYPE = LORY_NS_QUALIFIER::bfloat16_t; __VA_ARGS__ } break; \
    default: return LORY_NS_QUALIFIER::Status::kErrorUnsupportedDType;          \
  }

// The same for the CPU twin, which also accepts double storage.
#define LORY_DISPATCH_CPU_DTYPE(dtype, TYPE, ...)                               \
  switch (dtype) {                                                              \
    case LORY_NS_QUALIFIER::DType::kFloat64: { using TYPE = double; __VA_ARGS__ } break;       \
    case LORY_NS_QUALIFIER::DType::kFloat32: { using TYPE = float; __VA_ARGS__ } break;        \
    case LORY_NS_QUALIFIER::DType::kFloat16: { using TYPE = LORY_NS_QUALIFIER::half_t; __VA_ARGS__ } break;       \
    case LORY_NS_QUALIFIER::DType::kBFloat16: { using TYPE = LORY_NS_QUALIFIER::bfloat16_t; __VA_ARGS__ } break; \
    default: return LORY_NS_QUALIFIER::Status::kErrorUnsupportedDType;          \
  }
