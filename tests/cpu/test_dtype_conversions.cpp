// lory's own fp16 / bf16 conversions (the storage types of a build without CUDA's headers) against
// CUDA's host conversions, bit for bit: every 16-bit pattern to float, and float to 16 bits over
// every rounding boundary (each pattern's neighbours at, just below and just above the halfway
// point, in every binade, both signs) plus random floats.
#include <cstdint>
#include <random>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/dtype.hpp"

namespace {

std::uint16_t cuda_half_bits(float f) {
  const __half_raw r = __float2half_rn(f);
  return r.x;
}
std::uint16_t cuda_bf16_bits(float f) {
  const __nv_bfloat16_raw r = __float2bfloat16_rn(f);
  return r.x;
}
float cuda_half_to_float(std::uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
float cuda_bf16_to_float(std::uint16_t h) {
  __nv_bfloat16_raw r;
  r.x = h;
  return __bfloat162float(__nv_bfloat16(r));
}

// Float bit patterns around every rounding boundary of a format that keeps `kept` mantissa bits:
// for each upper pattern (sign, exponent, kept bits), the dropped bits at 0, 1, half - 1, half,
// half + 1 and all ones. In the half format's subnormal range the boundary sits higher; the
// random sample and the 16-bit round trips cover it.
template <class F>
void for_each_boundary(int dropped_bits, F&& f) {
  const std::uint32_t half = std::uint32_t(1) << (dropped_bits - 1), all = (half << 1) - 1;
  const std::uint32_t lows[] = {0, 1, half - 1, half, half + 1, all};
  for (std::uint32_t upper = 0; upper < (std::uint32_t(1) << (32 - dropped_bits)); ++upper)
    for (std::uint32_t low : lows) f(lory::detail::bits_float((upper << dropped_bits) | low));
}

}  // namespace

TEST_CASE("host fp16/bf16 to float matches CUDA's for every 16-bit pattern", "[cpu][dtype]") {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const auto b = static_cast<std::uint16_t>(h);
    INFO("bits=0x" << std::hex << h);
    REQUIRE(lory::detail::float_bits(lory::detail::half_bits_to_float(b)) ==
            lory::detail::float_bits(cuda_half_to_float(b)));
    REQUIRE(lory::detail::float_bits(lory::detail::bfloat16_bits_to_float(b)) ==
            lory::detail::float_bits(cuda_bf16_to_float(b)));
    // Round trip: every non-NaN pattern comes back unchanged.
    if (!std::isnan(cuda_half_to_float(b))) REQUIRE(lory::detail::float_to_half_bits(cuda_half_to_float(b)) == b);
    if (!std::isnan(cuda_bf16_to_float(b)))
      REQUIRE(lory::detail::float_to_bfloat16_bits(cuda_bf16_to_float(b)) == b);
  }
}

TEST_CASE("host float to bf16 rounds as CUDA's at every rounding boundary", "[cpu][dtype]") {
  std::int64_t mismatches = 0, checked = 0;
  for_each_boundary(16, [&](float f) {
    ++checked;
    mismatches += lory::detail::float_to_bfloat16_bits(f) != cuda_bf16_bits(f);
  });
  REQUIRE(checked == 6 * 65536);
  REQUIRE(mismatches == 0);
}

TEST_CASE("host float to fp16 rounds as CUDA's at every rounding boundary and on random floats", "[cpu][dtype]") {
  std::int64_t mismatches = 0;
  // 13 dropped bits for normal halves: 2^19 upper patterns x 6.
  for_each_boundary(13, [&](float f) { mismatches += lory::detail::float_to_half_bits(f) != cuda_half_bits(f); });
  REQUIRE(mismatches == 0);
  // Subnormal halves round at a higher bit: the midpoints between neighbouring 16-bit values,
  // and one float step to either side, for every pattern.
  for (std::uint32_t h = 0; h < 0x7c00u; ++h) {
    const double lo = cuda_half_to_float(static_cast<std::uint16_t>(h));
    const double hi = cuda_half_to_float(static_cast<std::uint16_t>(h + 1));
    const float mid = static_cast<float>((lo + hi) / 2);  // exact: a half midpoint fits a float
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e30f)})
      for (float s : {f, -f}) {
        mismatches += lory::detail::float_to_half_bits(s) != cuda_half_bits(s);
        mismatches += lory::detail::float_to_bfloat16_bits(s) != cuda_bf16_bits(s);
      }
  }
  REQUIRE(mismatches == 0);
  auto rng = lory_test::make_rng("dtype_random_floats");
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    const float f = lory::detail::bits_float(any(rng));
    mismatches += lory::detail::float_to_half_bits(f) != cuda_half_bits(f);
    mismatches += lory::detail::float_to_bfloat16_bits(f) != cuda_bf16_bits(f);
  }
  REQUIRE(mismatches == 0);
}
