// Shared test helpers: seeded random data, poison values, norm-relative errors
// and per-dtype tolerances. Host-only (compiles with g++ and nvcc).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lory/dtype.hpp"

namespace lory_test {

// True when the GPU tests run under the CPU emulator of the kernels (tests/emu/):
// shapes that only test scale, not logic, are smaller there.
#if defined(LORY_CUDA_EMULATION)
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

// One seed per process: LORY_TEST_SEED when set (to reproduce a failure),
// else fresh from std::random_device. Printed at start-up by the runners.
inline uint64_t test_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* s = std::getenv("LORY_TEST_SEED")) return std::strtoull(s, nullptr, 10);
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  return seed;
}
inline void announce_seed() {
  std::printf("lory test seed: %llu (set LORY_TEST_SEED to reproduce)\n",
              static_cast<unsigned long long>(test_seed()));
}

// A generator per test, derived from the process seed and a tag (test name),
// so each test's data is fresh per run yet reproducible from the seed.
inline std::mt19937_64 make_rng(const std::string& tag) {
  uint64_t h = 1469598103934665603ull;
  for (char c : tag) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return std::mt19937_64(test_seed() ^ h);
}

template <class T>
void fill_uniform(std::vector<T>& v, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> dist(lo, hi);
  for (auto& x : v) x = lory::from_double<T>(dist(rng));
}
template <class T>
std::vector<T> random_vector(size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::vector<T> v(n);
  fill_uniform(v, rng, lo, hi);
  return v;
}

// Random routing weights: each row of [rows, E] is a probability vector.
inline std::vector<float> random_simplex_rows(int64_t rows, int E, std::mt19937_64& rng) {
  std::vector<float> w(static_cast<size_t>(rows) * E);
  std::uniform_real_distribution<double> dist(0.05, 1.0);
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += (w[r * E + e] = static_cast<float>(dist(rng)));
    for (int e = 0; e < E; ++e) w[r * E + e] = static_cast<float>(w[r * E + e] / sum);
  }
  return w;
}

// Poison: a quiet NaN in every dtype; an element still NaN after a launch was never written.
template <class T> T poison_value() { return lory::from_double<T>(std::numeric_limits<double>::quiet_NaN()); }
template <class T> void poison(std::vector<T>& v) { for (auto& x : v) x = poison_value<T>(); }
template <class T> int64_t count_nan(const T* p, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += std::isnan(lory::to_double(p[i])) ? 1 : 0;
  return c;
}
template <class T> int64_t count_nan(const std::vector<T>& v) { return count_nan(v.data(), (int64_t)v.size()); }

// ||out - ref|| / ||scale|| in double; NaN or Inf anywhere gives +inf (never passes). The scale is
// ref itself (rel_error) or, where a sum can cancel to far below its terms, the sum of |terms|.
template <class T, class U, class S>
double scaled_error(const T* out, const U* ref, const S* scale, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double o = lory::to_double(out[i]), r = lory::to_double(ref[i]), s = lory::to_double(scale[i]);
    if (!std::isfinite(o) || !std::isfinite(r) || !std::isfinite(s)) return std::numeric_limits<double>::infinity();
    num += (o - r) * (o - r);
    den += s * s;
  }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}
template <class T, class U>
double rel_error(const T* out, const U* ref, int64_t n) {
  return scaled_error(out, ref, ref, n);
}
template <class T, class U>
double rel_error(const std::vector<T>& out, const std::vector<U>& ref) {
  if (out.size() != ref.size()) return std::numeric_limits<double>::infinity();
  return rel_error(out.data(), ref.data(), static_cast<int64_t>(out.size()));
}
template <class T, class U>
double max_abs_error(const T* out, const U* ref, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(lory::to_double(out[i]) - lory::to_double(ref[i]));
    if (!(d <= m)) m = d;  // NaN propagates
  }
  return m;
}

// Norm-relative error bound per storage dtype (outputs rounded to T, fp32 accumulation).
template <class T> constexpr double tolerance();
template <> constexpr double tolerance<double>() { return 1e-12; }
template <> constexpr double tolerance<float>() { return 1e-5; }
template <> constexpr double tolerance<lory::half_t>() { return 3e-3; }
template <> constexpr double tolerance<lory::bfloat16_t>() { return 1e-2; }

template <class T> std::vector<double> to_double_vector(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = lory::to_double(v[i]);
  return out;
}
// Element by element through double (exact for every storage dtype into a wider one).
template <class U, class V>
std::vector<U> convert_vector(const std::vector<V>& v) {
  std::vector<U> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = lory::from_double<U>(lory::to_double(v[i]));
  return out;
}

template <class T> std::vector<T> from_double_vector(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = lory::from_double<T>(v[i]);
  return out;
}

}  // namespace lory_test
