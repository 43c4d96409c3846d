// round_to_storage (the layer plan's fp32 -> T rounding) against its CPU twin: bit for bit, since
// both round to nearest even once. Contiguous and strided views, odd lengths, misaligned bases
// (scalar path), values on rounding ties, past the dtype's range, subnormal and NaN; poisoned gaps
// between rows must stay untouched.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/reference/round_to_storage.hpp"
#include "lory/round_to_storage.cuh"

namespace {

struct RoundCase {
  int64_t rows, cols, src_stride, src_offset, dst_stride, dst_offset;
  const char* what;
};

std::vector<RoundCase> round_cases() {
  return {
      {1, 1, 1, 0, 1, 0, "one element"},
      {1, 100003, 100003, 0, 100003, 0, "long contiguous vector, odd length"},
      {37, 96, 96, 0, 96, 0, "contiguous rows (flattened)"},
      {33, 64, 128, 4, 80, 8, "strided rows, aligned (vector path)"},
      {29, 77, 81, 1, 79, 3, "odd strides and misaligned bases (scalar path)"},
      {5, 40, 40, 1, 40, 0, "contiguous source, misaligned"},
  };
}

// Random values plus the edge cases: exact ties between two storage values, values past the
// dtype's largest finite value, subnormals, zeros of both signs, infinities and NaN.
std::vector<float> source(size_t n, std::mt19937_64& rng) {
  std::vector<float> v = lory_test::random_vector<float>(n, rng, -4, 4);
  const float specials[] = {1.f + 1.f / 256,  1.f + 3.f / 256, -1.f - 1.f / 256, 1.f + 1.f / 2048, 1.f + 3.f / 2048,
                            70000.f,          -1e30f,          3.4e38f,          1e-40f,           -1e-42f,
                            0.f,              -0.f,            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (size_t i = 0; i < n; i += 7) v[i] = specials[(i / 7) % (sizeof(specials) / sizeof(float))];
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("round_to_storage matches the CPU twin bit for bit", "[gpu][round]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  for (const RoundCase& tc : round_cases()) {
    DYNAMIC_SECTION(tc.what) {
      auto rng = lory_test::make_rng(std::string("round/") + tc.what + lory::dtype_name(lory::dtype_of<T>::value));
      const size_t src_n = size_t(tc.src_offset + tc.rows * tc.src_stride);
      const size_t dst_n = size_t(tc.dst_offset + tc.rows * tc.dst_stride);
      const std::vector<float> src = source(src_n, rng);
      std::vector<T> dst(dst_n);
      lory_test::poison(dst);
      const std::vector<T> before = dst;

      std::vector<T> ref = dst;
      lory::RoundToStorageArgs<T> ref_args{tc.rows, tc.cols, src.data() + tc.src_offset, tc.src_stride,
                                           ref.data() + tc.dst_offset, tc.dst_stride};
      REQUIRE(lory::reference::round_to_storage(ref_args) == lory::Status::kSuccess);

      lory_test::DeviceBuffer<float> d_src(src);
      lory_test::DeviceBuffer<T> d_dst(dst);
      lory::RoundToStorageArgs<T> args{tc.rows, tc.cols, d_src.get() + tc.src_offset, tc.src_stride,
                                       d_dst.get() + tc.dst_offset, tc.dst_stride};
      REQUIRE(lory::round_to_storage(args, nullptr) == lory::Status::kSuccess);
      LORY_TEST_SYNC();
      const std::vector<T> got = d_dst.download(dst_n);

      int64_t wrong = 0, gaps_changed = 0, checked = 0;
      for (int64_t r = 0; r < tc.rows; ++r)
        for (int64_t c = 0; c < tc.dst_stride; ++c) {
          const size_t k = size_t(tc.dst_offset + r * tc.dst_stride + c);
          if (c < tc.cols) {
            ++checked;
            const double g = lory::to_double(got[k]), e = lory::to_double(ref[k]);
            // NaN has many encodings: compare it as a class, everything else bit for bit.
            wrong += (std::isnan(g) || std::isnan(e)) ? std::isnan(g) != std::isnan(e)
                                                      : std::memcmp(&got[k], &ref[k], sizeof(T)) != 0;
          } else {
            gaps_changed += std::memcmp(&got[k], &before[k], sizeof(T)) != 0;
          }
        }
      INFO(tc.what);
      REQUIRE(checked == tc.rows * tc.cols);
      REQUIRE(wrong == 0);
      REQUIRE(gaps_changed == 0);
      // The twin itself rounds to nearest even: the tie 1 + 2^-8 (between bfloat16's 1 and 1 + 2^-7)
      // goes to 1, 1 + 3 * 2^-8 to 1 + 2^-6.
      if (std::is_same<T, __nv_bfloat16>::value && tc.src_stride == tc.cols && tc.dst_stride == tc.cols &&
          tc.src_offset == 0 && tc.dst_offset == 0 && tc.rows * tc.cols > 8) {
        CHECK(lory::to_double(ref[0]) == 1.0);
        CHECK(lory::to_double(ref[7]) == 1.0 + 1.0 / 64);
      }
    }
  }
}
