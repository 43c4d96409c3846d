// Host-and-device math run on the CPU: the same functions the kernels call.
#include <cmath>
#include <limits>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/math.hpp"

TEST_CASE("softmax sums to one, is shift-invariant and stable for large logits", "[math]") {
  auto rng = lory_test::make_rng("softmax");
  for (int n : {1, 2, 7, 32, 64}) {
    auto z = lory_test::random_vector<double>(n, rng, -5, 5);
    std::vector<double> p(n), q(n), zs(n);
    lory::softmax(z.data(), p.data(), n);
    for (int i = 0; i < n; ++i) zs[i] = z[i] + 1000.0;  // would overflow a naive exp
    lory::softmax(zs.data(), q.data(), n);
    double sum = 0;
    for (int i = 0; i < n; ++i) {
      sum += p[i];
      REQUIRE(std::isfinite(q[i]));
      REQUIRE(std::fabs(p[i] - q[i]) < 1e-12);
      // against the textbook formula
      double den = 0;
      for (int j = 0; j < n; ++j) den += std::exp(z[j]);
      REQUIRE(std::fabs(p[i] - std::exp(z[i]) / den) < 1e-12);
    }
    REQUIRE(std::fabs(sum - 1.0) < 1e-12);
  }
}

TEST_CASE("softmax propagates NaN instead of hiding it", "[math]") {
  std::vector<float> z = {0.5f, std::numeric_limits<float>::quiet_NaN(), -1.f}, p(3);
  lory::softmax(z.data(), p.data(), 3);
  for (float v : p) REQUIRE(std::isnan(v));
}

TEST_CASE("softmax backward matches finite differences of softmax", "[math][grad]") {
  auto rng = lory_test::make_rng("softmax_bwd");
  const int n = 5;
  auto z = lory_test::random_vector<double>(n, rng, -2, 2);
  auto dp = lory_test::random_vector<double>(n, rng);
  std::vector<double> p(n), dz(n);
  lory::softmax(z.data(), p.data(), n);
  lory::softmax_backward(p.data(), dp.data(), dz.data(), n);
  const double h = 1e-6;
  for (int i = 0; i < n; ++i) {
    auto zp = z, zm = z;
    zp[i] += h; zm[i] -= h;
    std::vector<double> pp(n), pm(n);
    lory::softmax(zp.data(), pp.data(), n);
    lory::softmax(zm.data(), pm.data(), n);
    double fd = 0;
    for (int j = 0; j < n; ++j) fd += dp[j] * (pp[j] - pm[j]) / (2 * h);
    REQUIRE(std::fabs(fd - dz[i]) <= 1e-8 * (1 + std::fabs(fd)));
  }
}

TEST_CASE("silu, SwiGLU forward and backward match finite differences", "[math][grad]") {
  auto rng = lory_test::make_rng("swiglu");
  auto a = lory_test::random_vector<double>(64, rng, -8, 8);
  auto u = lory_test::random_vector<double>(64, rng, -3, 3);
  auto dm = lory_test::random_vector<double>(64, rng);
  const double h = 1e-6;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE(std::fabs(lory::silu(a[i]) - a[i] / (1 + std::exp(-a[i]))) < 1e-14 * (1 + std::fabs(a[i])));
    const double fd_silu = (lory::silu(a[i] + h) - lory::silu(a[i] - h)) / (2 * h);
    REQUIRE(std::fabs(fd_silu - lory::silu_grad(a[i])) < 1e-8);
    double da = 0, du = 0;
    lory::swiglu_backward(a[i], u[i], dm[i], da, du);
    const double fd_a = dm[i] * (lory::swiglu_forward(a[i] + h, u[i]) - lory::swiglu_forward(a[i] - h, u[i])) / (2 * h);
    const double fd_u = dm[i] * (lory::swiglu_forward(a[i], u[i] + h) - lory::swiglu_forward(a[i], u[i] - h)) / (2 * h);
    REQUIRE(std::fabs(fd_a - da) < 1e-7 * (1 + std::fabs(fd_a)));
    REQUIRE(std::fabs(fd_u - du) < 1e-7 * (1 + std::fabs(fd_u)));
  }
  // extreme arguments stay finite
  REQUIRE(std::isfinite(lory::silu(-1000.0f)));
  REQUIRE(std::isfinite(lory::silu_grad(1000.0f)));
}

TEST_CASE("merge_element is the weighted sum over experts in the accumulator type", "[math]") {
  auto rng = lory_test::make_rng("merge_element");
  const int E = 7;
  const int64_t stride = 13;
  auto W = lory_test::random_vector<__nv_bfloat16>(E * stride, rng);
  auto w = lory_test::random_simplex_rows(1, E, rng);
  for (int64_t j = 0; j < stride; ++j) {
    double ref = 0;
    for (int e = 0; e < E; ++e) ref += (double)w[e] * lory::to_double(W[e * stride + j]);
    const float got = lory::merge_element<float>(W.data() + j, stride, w.data(), E);
    REQUIRE(std::fabs(got - ref) < 1e-6);
  }
}

TEST_CASE("conversions round to nearest even on the host like the device", "[math][dtype]") {
  REQUIRE(lory::to_float(lory::from_float<__nv_bfloat16>(1.0f + 1.0f / 256)) == 1.0f);  // tie -> even
  REQUIRE(lory::to_float(lory::from_float<__half>(65504.f)) == 65504.f);
  REQUIRE(std::isinf(lory::to_float(lory::from_float<__half>(1e6f))));
  REQUIRE(lory::dtype_size(lory::DType::kBFloat16) == 2);
}
