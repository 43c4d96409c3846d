// SwiGLU kernels against the CPU twin (double math on the same rounded
// inputs): contiguous and strided views (the fused [tokens, 2f] layout), odd
// lengths, misaligned base pointers (scalar path), poisoned outputs, and
// bitwise determinism.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"
#include "lory/reference/swiglu.hpp"
#include "lory/swiglu.cuh"

namespace {

using lory_test::DeviceBuffer;

// A [rows, cols] view inside a buffer: row stride and element offset of the base.
struct View {
  int64_t stride, offset;
  size_t extent(int64_t rows) const { return static_cast<size_t>(offset + (rows - 1) * stride + stride); }
};

struct SwigluCase {
  int64_t rows, cols;
  View a, u, out;  // out: m (forward), dm / da / du (backward)
  const char* what;
};

std::vector<SwigluCase> swiglu_cases() {
  std::vector<SwigluCase> cases = {
      {1, 1, {1, 0}, {1, 0}, {1, 0}, "one element"},
      {1, 1000003, {1000003, 0}, {1000003, 0}, {1000003, 0}, "long contiguous vector, odd length"},
      {37, 77, {77, 0}, {77, 0}, {77, 0}, "contiguous rows, odd width (flattened)"},
      {33, 64, {128, 0}, {128, 64}, {64, 0}, "fused gate|up layout, stride 2f"},
      {29, 72, {150, 3}, {150, 75}, {75, 1}, "odd strides and misaligned bases (scalar path)"},
      {5, 8200, {8200, 1}, {8200, 1}, {8200, 1}, "contiguous but misaligned"},
  };
  // 65535 blocks of 256 threads: a scale test, too slow for the CPU emulator.
  if (!lory_test::kEmulated) cases.push_back({70000, 5, {5, 0}, {7, 1}, {6, 0}, "more rows than grid.y"});
  return cases;
}

template <class T>
std::vector<T> random_view(const View& v, int64_t rows, std::mt19937_64& rng, double lo, double hi) {
  return lory_test::random_vector<T>(v.extent(rows), rng, lo, hi);
}

// Every element of the view [rows, cols] compared; the gaps between rows must stay untouched.
template <class T>
void check_view(const std::vector<T>& got, const std::vector<T>& ref, const std::vector<T>& before,
                const View& v, int64_t rows, int64_t cols, const char* name) {
  std::vector<double> g, r;
  g.reserve(rows * cols);
  r.reserve(rows * cols);
  int64_t untouched_changed = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < v.stride; ++c) {
      const size_t k = static_cast<size_t>(v.offset + i * v.stride + c);
      if (c < cols) {
        g.push_back(lory::to_double(got[k]));
        r.push_back(lory::to_double(ref[k]));
      } else {
        untouched_changed += std::memcmp(&got[k], &before[k], sizeof(T)) != 0;
      }
    }
  INFO(name);
  REQUIRE(lory_test::count_nan(g) == 0);
  REQUIRE(untouched_changed == 0);
  const double err = lory_test::rel_error(g, r);
  INFO("rel error " << err << " tolerance " << lory_test::tolerance<T>());
  REQUIRE(err <= lory_test::tolerance<T>());
  // max-abs too: a few wild elements can hide in a norm over a million.
  double scale = 1;
  for (double x : r) scale = std::max(scale, std::fabs(x));
  REQUIRE(lory_test::max_abs_error(g.data(), r.data(), (int64_t)g.size()) <= 4 * lory_test::tolerance<T>() * scale);
}

}  // namespace

TEMPLATE_TEST_CASE("swiglu_forward matches the CPU twin", "[gpu][swiglu]", float, __half, __nv_bfloat16) {
  using T = TestType;
  for (const SwigluCase& tc : swiglu_cases()) {
    DYNAMIC_SECTION(tc.what) {
      auto rng = lory_test::make_rng(std::string("swiglu_fwd/") + tc.what + lory::dtype_name(lory::dtype_of<T>::value));
      auto a = random_view<T>(tc.a, tc.rows, rng, -6, 6);
      auto u = random_view<T>(tc.u, tc.rows, rng, -2, 2);
      std::vector<T> m(tc.out.extent(tc.rows));
      lory_test::poison(m);
      const std::vector<T> m_before = m;

      lory::SwigluForwardArgs<T> ref_args{tc.rows, tc.cols, a.data() + tc.a.offset, tc.a.stride,
                                          u.data() + tc.u.offset, tc.u.stride};
      std::vector<T> m_ref = m;
      ref_args.m = m_ref.data() + tc.out.offset;
      ref_args.m_stride = tc.out.stride;
      REQUIRE(lory::reference::swiglu_forward<double>(ref_args) == lory::Status::kSuccess);

      DeviceBuffer<T> da(a), du(u), dm(m);
      lory::SwigluForwardArgs<T> args{tc.rows, tc.cols, da.get() + tc.a.offset, tc.a.stride,
                                      du.get() + tc.u.offset, tc.u.stride, dm.get() + tc.out.offset,
                                      tc.out.stride};
      REQUIRE(lory::swiglu_forward(args, nullptr) == lory::Status::kSuccess);
      LORY_TEST_SYNC();
      const auto got = dm.download(m.size());
      check_view(got, m_ref, m_before, tc.out, tc.rows, tc.cols, "m");

      // Bitwise determinism: a second run over a freshly poisoned output.
      dm.upload(m_before);
      REQUIRE(lory::swiglu_forward(args, nullptr) == lory::Status::kSuccess);
      LORY_TEST_SYNC();
      const auto again = dm.download(m.size());
      REQUIRE(std::memcmp(got.data(), again.data(), got.size() * sizeof(T)) == 0);
    }
  }
}

TEMPLATE_TEST_CASE("swiglu_backward matches the CPU twin", "[gpu][swiglu]", float, __half, __nv_bfloat16) {
  using T = TestType;
  for (const SwigluCase& tc : swiglu_cases()) {
    DYNAMIC_SECTION(tc.what) {
      auto rng = lory_test::make_rng(std::string("swiglu_bwd/") + tc.what + lory::dtype_name(lory::dtype_of<T>::value));
      auto a = random_view<T>(tc.a, tc.rows, rng, -6, 6);
      auto u = random_view<T>(tc.u, tc.rows, rng, -2, 2);
      auto g = random_view<T>(tc.out, tc.rows, rng, -1, 1);  // dm shares the output view's layout
      std::vector<T> ga(tc.out.extent(tc.rows)), gu(tc.out.extent(tc.rows));
      lory_test::poison(ga);
      lory_test::poison(gu);
      const std::vector<T> poisoned = ga;

      std::vector<T> ga_ref = ga, gu_ref = gu;
      lory::SwigluBackwardArgs<T> ref_args{tc.rows, tc.cols, a.data() + tc.a.offset, tc.a.stride,
                                           u.data() + tc.u.offset, tc.u.stride,
                                           g.data() + tc.out.offset, tc.out.stride,
                                           ga_ref.data() + tc.out.offset, tc.out.stride,
                                           gu_ref.data() + tc.out.offset, tc.out.stride};
      REQUIRE(lory::reference::swiglu_backward<double>(ref_args) == lory::Status::kSuccess);

      DeviceBuffer<T> d_a(a), d_u(u), d_g(g), d_ga(ga), d_gu(gu);
      lory::SwigluBackwardArgs<T> args{tc.rows, tc.cols, d_a.get() + tc.a.offset, tc.a.stride,
                                       d_u.get() + tc.u.offset, tc.u.stride,
                                       d_g.get() + tc.out.offset, tc.out.stride,
                                       d_ga.get() + tc.out.offset, tc.out.stride,
                                       d_gu.get() + tc.out.offset, tc.out.stride};
      REQUIRE(lory::swiglu_backward(args, nullptr) == lory::Status::kSuccess);
      LORY_TEST_SYNC();
      const auto got_a = d_ga.download(ga.size()), got_u = d_gu.download(gu.size());
      check_view(got_a, ga_ref, poisoned, tc.out, tc.rows, tc.cols, "da");
      check_view(got_u, gu_ref, poisoned, tc.out, tc.rows, tc.cols, "du");

      d_ga.upload(poisoned);
      d_gu.upload(poisoned);
      REQUIRE(lory::swiglu_backward(args, nullptr) == lory::Status::kSuccess);
      LORY_TEST_SYNC();
      REQUIRE(std::memcmp(got_a.data(), d_ga.download(ga.size()).data(), ga.size() * sizeof(T)) == 0);
      REQUIRE(std::memcmp(got_u.data(), d_gu.download(gu.size()).data(), gu.size() * sizeof(T)) == 0);
    }
  }
}
