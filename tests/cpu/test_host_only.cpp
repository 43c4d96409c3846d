// Built with LORY_HOST_ONLY=1 (tests/CMakeLists.txt), as a CPU-only consumer builds: lory's own
// half_t / bfloat16_t instead of CUDA's types, and no CUDA header included by lory.
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/catch.hpp"
#include "common/moe_ffn_fixture.hpp"
#include "common/test_util.hpp"
#include "lory/lory.hpp"

#if !LORY_HOST_ONLY
#error "this translation unit must be compiled with LORY_HOST_ONLY=1"
#endif
#if defined(__CUDA_FP16_H__) || defined(__CUDA_BF16_H__)
#error "a host-only build of lory included CUDA's fp16/bf16 headers"
#endif

namespace {

using namespace lory_test;
static_assert(sizeof(lory::half_t) == 2 && sizeof(lory::bfloat16_t) == 2, "16-bit storage");
static_assert(std::is_trivially_copyable<lory::half_t>::value && std::is_trivially_copyable<lory::bfloat16_t>::value,
              "storage types must be copyable as bytes");
static_assert(lory::dtype_of<lory::half_t>::value == lory::DType::kFloat16, "dtype tag");
static_assert(lory::dtype_of<lory::bfloat16_t>::value == lory::DType::kBFloat16, "dtype tag");

template <class T> float round_trip(float f) { return lory::to_float(lory::from_float<T>(f)); }

}  // namespace

TEST_CASE("host-only half_t / bfloat16_t round to nearest even", "[cpu][dtype][host_only]") {
  using lory::bfloat16_t;
  using lory::half_t;
  REQUIRE(round_trip<bfloat16_t>(1.0f + 1.0f / 256) == 1.0f);                  // tie, down to even
  REQUIRE(round_trip<bfloat16_t>(1.0f + 3.0f / 256) == 1.0f + 4.0f / 256);     // tie, up to even
  REQUIRE(round_trip<bfloat16_t>(1.0f + 1.0f / 256 + 1.0f / 65536) == 1.0f + 2.0f / 256);
  REQUIRE(round_trip<half_t>(1.0f + 1.0f / 2048) == 1.0f);                     // tie, down to even
  REQUIRE(round_trip<half_t>(65504.f) == 65504.f);                              // largest half
  REQUIRE(round_trip<half_t>(65519.f) == 65504.f);
  REQUIRE(std::isinf(round_trip<half_t>(65520.f)));                             // tie to even: inf
  REQUIRE(round_trip<half_t>(std::ldexp(1.f, -24)) == std::ldexp(1.f, -24));    // least subnormal
  REQUIRE(round_trip<half_t>(std::ldexp(1.f, -25)) == 0.f);                     // tie, down to 0
  REQUIRE(round_trip<half_t>(std::ldexp(1.5f, -25)) == std::ldexp(1.f, -24));
  REQUIRE(std::signbit(round_trip<half_t>(-0.f)));
  REQUIRE(std::isnan(round_trip<half_t>(std::numeric_limits<float>::quiet_NaN())));
  REQUIRE(std::isnan(round_trip<bfloat16_t>(-std::numeric_limits<float>::quiet_NaN())));
  REQUIRE(std::isinf(round_trip<bfloat16_t>(std::numeric_limits<float>::infinity())));
  REQUIRE(static_cast<float>(half_t(0.1f)) == round_trip<half_t>(0.1f));      // explicit conversions
}

TEST_CASE("host-only build: the CPU plan in bf16 and fp16 storage stays within the dtype's tolerance",
          "[cpu][plan][host_only]") {
  auto rng = lory_test::make_rng("host_only_plan");
  const SegmentLayout lay{2, 21, 8};
  const FfnShape sh{16, 24, 4};
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto D = random_layer<T>(lay, sh, RoutingMode::kCausalSegment, true, rng);
    lory::reference::MoeFfnCpuPlan<T> plan(D.lay, D.sh, D.mode, {});
    REQUIRE(plan.can_implement() == Status::kSuccess);
    auto got = new_outputs<T, float>(D);
    std::vector<unsigned char> ws(plan.workspace_size());
    const auto f = forward_args(D.params(), D.x.data(), got);
    REQUIRE(plan.forward(f, ws.data(), ws.size(), {}) == Status::kSuccess);
    REQUIRE(plan.backward(backward_args(f.p, D.x.data(), D.dy.data(), got, false), ws.data(), ws.size(), {}) ==
            Status::kSuccess);
    check_against_reference(D, got, run_reference(D), lory_test::tolerance<T>());
  };
  run(lory::bfloat16_t{});
  run(lory::half_t{});
}
