// CPU twin of SwiGLU (lory/reference/swiglu.hpp) against a float64 reference written out here,
// independently of lory/math.hpp: seeded random data with sharp sigmoids (|a| up to 1e4), odd
// shapes and strided views, every storage dtype with Acc = float (the GPU's arithmetic, what the
// MoE FFN's CPU backend runs) and Acc = double; poisoned row padding; NaN / Inf propagation; bad
// arguments touching no memory; the backward against finite differences of the forward.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/reference/moe_ffn_backend.hpp"
#include "lory/reference/swiglu.hpp"

namespace {

using lory::Status;

// ---- float64 reference ------------------------------------------------------------------------
// sigmoid through softplus, exp(-log1p(exp(-a))): finite and accurate for every finite a (0 and 1
// at a = -1e4 and 1e4); 1 - sigmoid(a) is taken as sigmoid(-a), with no cancellation.
double ref_sigmoid(double a) { return std::exp(-std::log1p(std::exp(-a))); }
double ref_m(double a, double u) { return a * ref_sigmoid(a) * u; }
double ref_du(double a, double dm) { return dm * a * ref_sigmoid(a); }
// d silu / da = s + a s (1 - s); the two terms give the scale of the rounding error (they cancel
// near a = -1.28, where the derivative is 0).
double ref_da(double a, double u, double dm) {
  const double s = ref_sigmoid(a);
  return dm * u * (s + a * s * ref_sigmoid(-a));
}
double ref_da_scale(double a, double u, double dm) {
  const double s = ref_sigmoid(a);
  return std::fabs(dm * u) * (s + std::fabs(a) * s * ref_sigmoid(-a));
}

// ---- per-dtype precision -----------------------------------------------------------------------
// eps: unit roundoff; tiny: the smallest positive (subnormal) value, the error floor of results
// that underflow.
template <class T> struct Prec;
template <> struct Prec<double> {
  static constexpr double eps = 0x1p-53, tiny = 0x1p-1074;
  static constexpr const char* name = "double";
};
template <> struct Prec<float> {
  static constexpr double eps = 0x1p-24, tiny = 0x1p-149;
  static constexpr const char* name = "float";
};
template <> struct Prec<lory::half_t> {
  static constexpr double eps = 0x1p-11, tiny = 0x1p-24;
  static constexpr const char* name = "half";
};
template <> struct Prec<lory::bfloat16_t> {
  static constexpr double eps = 0x1p-8, tiny = 0x1p-133;
  static constexpr const char* name = "bfloat16";
};

// One rounding to T (1.01: a double Acc reaches T through float) plus the Acc arithmetic of a few
// operations and exp (and, for Acc = float over double storage, the inputs' rounding to float).
template <class T, class Acc> double error_bound() { return 1.01 * Prec<T>::eps + 64 * Prec<Acc>::eps; }
template <class T, class Acc> double error_floor() { return Prec<T>::tiny + 16 * Prec<Acc>::tiny; }

// A [rows, cols] view with a row stride; the padding after each row's cols (the last row's too) is
// part of the buffer so that a write into it shows.
template <class T>
struct View {
  int64_t rows = 0, cols = 0, stride = 0;
  std::vector<T> buf;
  View(int64_t r, int64_t c, int64_t s) : rows(r), cols(c), stride(s), buf(static_cast<size_t>(r * s)) {}
  T* data() { return buf.data(); }
  const T* data() const { return buf.data(); }
  double at(int64_t r, int64_t c) const { return lory::to_double(buf[r * stride + c]); }
  bool padding(size_t i) const { return static_cast<int64_t>(i) % stride >= cols; }
};

// Sharp sigmoids: a quarter of the gate values from the far tails (and the fp32 rounding edge of
// sigmoid near |a| = 17), the rest uniform in [-8, 8].
template <class T>
void fill_gate(View<T>& v, std::mt19937_64& rng, bool sharp) {
  static const double kTails[] = {80, -80, 1e4, -1e4, 17, -17, 30, -30};
  std::uniform_real_distribution<double> mid(-8.0, 8.0);
  std::uniform_int_distribution<int> pick(0, 31);
  for (auto& x : v.buf) {
    const int k = pick(rng);
    x = lory::from_double<T>(sharp && k < 8 ? kTails[k] : mid(rng));
  }
}
template <class T>
void fill(View<T>& v, std::mt19937_64& rng) { lory_test::fill_uniform(v.buf, rng, -1.0, 1.0); }

// Compares the [rows, cols] part of out with ref element by element (|out - ref| <= bound * scale
// + floor) and as a whole (norm-relative to the scale), and the padding of out with its poisoned snapshot bit
// for bit. Returns the number of failures; the first is reported.
template <class T>
int64_t compare(const char* what, const View<T>& out, const std::vector<T>& before, const std::vector<double>& ref,
                const std::vector<double>& scale, double bound, const std::vector<double>& floor) {
  int64_t bad = 0;
  double err2 = 0, scale2 = 0, floor2 = 0;
  for (int64_t r = 0; r < out.rows; ++r)
    for (int64_t c = 0; c < out.cols; ++c) {
      const size_t k = static_cast<size_t>(r * out.cols + c);
      const double o = out.at(r, c), e = std::fabs(o - ref[k]);
      err2 += std::isfinite(e) ? e * e : std::numeric_limits<double>::infinity();
      scale2 += scale[k] * scale[k];
      floor2 += floor[k] * floor[k];
      if (!(e <= bound * scale[k] + floor[k])) {
        if (bad++ == 0) UNSCOPED_INFO(what << "[" << r << ", " << c << "] = " << o << ", reference " << ref[k]);
      }
    }
  for (size_t i = 0; i < out.buf.size(); ++i)
    if (out.padding(i) && std::memcmp(&out.buf[i], &before[i], sizeof(T)) != 0) {
      if (bad++ == 0) UNSCOPED_INFO(what << ": padding element " << i << " was written");
    }
  // Norm-wise: ||out - ref|| <= bound ||scale|| (+ the underflow floor, for references that are
  // all below T's range, as at a = -80 in half).
  const double err = std::sqrt(err2), allowed = bound * std::sqrt(scale2) + std::sqrt(floor2);
  if (!(err <= allowed)) {
    if (bad++ == 0) UNSCOPED_INFO(what << ": norm of the error " << err << " above " << allowed);
  }
  return bad;
}

struct Shape {
  int64_t rows, cols, pad_a, pad_u, pad_dm, pad_o1, pad_o2;  // strides = cols + pad
};
const Shape kShapes[] = {{1, 1, 0, 0, 0, 0, 0},  {7, 13, 0, 0, 0, 0, 0},   {7, 13, 3, 16, 1, 8, 5},
                         {1, 33, 0, 7, 2, 0, 1}, {64, 5, 0, 3, 0, 11, 0}, {3, 257, 3, 0, 43, 1, 2}};

template <class T, class Acc>
void forward_case(const Shape& s, bool sharp, std::mt19937_64& rng) {
  View<T> a(s.rows, s.cols, s.cols + s.pad_a), u(s.rows, s.cols, s.cols + s.pad_u),
      m(s.rows, s.cols, s.cols + s.pad_o1);
  fill_gate(a, rng, sharp);
  fill(u, rng);
  lory_test::poison(m.buf);
  const std::vector<T> m_before = m.buf, a_before = a.buf, u_before = u.buf;
  const lory::SwigluForwardArgs<T> args{s.rows, s.cols, a.data(), a.stride, u.data(), u.stride, m.data(), m.stride};
  REQUIRE(lory::reference::swiglu_forward<Acc>(args) == Status::kSuccess);
  std::vector<double> ref, scale;
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t c = 0; c < s.cols; ++c) {
      ref.push_back(ref_m(a.at(r, c), u.at(r, c)));
      scale.push_back(std::fabs(ref.back()));
    }
  const std::vector<double> floor(ref.size(), error_floor<T, Acc>());
  CHECK(compare("m", m, m_before, ref, scale, error_bound<T, Acc>(), floor) == 0);
  CHECK(std::memcmp(a.data(), a_before.data(), a.buf.size() * sizeof(T)) == 0);  // inputs read only
  CHECK(std::memcmp(u.data(), u_before.data(), u.buf.size() * sizeof(T)) == 0);
}

template <class T, class Acc>
void backward_case(const Shape& s, bool sharp, std::mt19937_64& rng) {
  View<T> a(s.rows, s.cols, s.cols + s.pad_a), u(s.rows, s.cols, s.cols + s.pad_u),
      dm(s.rows, s.cols, s.cols + s.pad_dm), da(s.rows, s.cols, s.cols + s.pad_o1),
      du(s.rows, s.cols, s.cols + s.pad_o2);
  fill_gate(a, rng, sharp);
  fill(u, rng);
  fill(dm, rng);
  lory_test::poison(da.buf);
  lory_test::poison(du.buf);
  const std::vector<T> da_before = da.buf, du_before = du.buf, dm_before = dm.buf;
  const lory::SwigluBackwardArgs<T> args{s.rows,    s.cols,    a.data(),  a.stride,  u.data(),  u.stride,
                                         dm.data(), dm.stride, da.data(), da.stride, du.data(), du.stride};
  REQUIRE(lory::reference::swiglu_backward<Acc>(args) == Status::kSuccess);
  // da = dm u s (1 + a (1 - s)): at a = -80, dm u s can underflow to an Acc subnormal before the
  // last factor scales its rounding by up to 1 + |a|, so da's floor grows with |a|.
  std::vector<double> ref_a, scale_a, floor_a, ref_u, scale_u;
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t c = 0; c < s.cols; ++c) {
      const double av = a.at(r, c), uv = u.at(r, c), g = dm.at(r, c);
      ref_a.push_back(ref_da(av, uv, g));
      scale_a.push_back(ref_da_scale(av, uv, g));
      floor_a.push_back(error_floor<T, Acc>() + 16 * Prec<Acc>::tiny * std::fabs(av));
      ref_u.push_back(ref_du(av, g));
      scale_u.push_back(std::fabs(ref_u.back()));
    }
  const double bound = error_bound<T, Acc>();
  CHECK(compare("da", da, da_before, ref_a, scale_a, bound, floor_a) == 0);
  const std::vector<double> floor_u(ref_u.size(), error_floor<T, Acc>());
  CHECK(compare("du", du, du_before, ref_u, scale_u, bound, floor_u) == 0);
  CHECK(std::memcmp(dm.data(), dm_before.data(), dm.buf.size() * sizeof(T)) == 0);
}

// The leaf the MoE FFN's CPU backend runs: Acc = float, size query first.
template <class T>
void backend_matches_twin(std::mt19937_64& rng) {
  using Backend = lory::reference::MoeFfnCpuBackend;
  View<T> a(5, 9, 12), u(5, 9, 9), m(5, 9, 10), m_twin(5, 9, 10), dm(5, 9, 9), da(5, 9, 11), du(5, 9, 9),
      da_twin(5, 9, 11), du_twin(5, 9, 9);
  fill_gate(a, rng, true);
  fill(u, rng);
  fill(dm, rng);
  for (auto* v : {&m, &m_twin, &da, &du, &da_twin, &du_twin}) lory_test::poison(v->buf);
  lory::SwigluForwardArgs<T> f{5, 9, a.data(), a.stride, u.data(), u.stride, m.data(), m.stride};
  size_t ws_bytes = 123;
  REQUIRE(Backend::swiglu_forward(f, nullptr, ws_bytes, {}) == Status::kSuccess);  // size query
  CHECK(ws_bytes == 0);
  CHECK(lory_test::count_nan(m.buf) == static_cast<int64_t>(m.buf.size()));  // wrote nothing
  unsigned char ws = 0;
  REQUIRE(Backend::swiglu_forward(f, &ws, ws_bytes, {}) == Status::kSuccess);
  f.m = m_twin.data();
  REQUIRE(lory::reference::swiglu_forward<float>(f) == Status::kSuccess);
  CHECK(std::memcmp(m.data(), m_twin.data(), m.buf.size() * sizeof(T)) == 0);

  lory::SwigluBackwardArgs<T> b{5, 9, a.data(), a.stride, u.data(), u.stride, dm.data(), dm.stride,
                                da.data(), da.stride, du.data(), du.stride};
  ws_bytes = 123;
  REQUIRE(Backend::swiglu_backward(b, nullptr, ws_bytes, {}) == Status::kSuccess);
  CHECK(ws_bytes == 0);
  CHECK(lory_test::count_nan(da.buf) + lory_test::count_nan(du.buf) ==
        static_cast<int64_t>(da.buf.size() + du.buf.size()));
  REQUIRE(Backend::swiglu_backward(b, &ws, ws_bytes, {}) == Status::kSuccess);
  b.da = da_twin.data();
  b.du = du_twin.data();
  REQUIRE(lory::reference::swiglu_backward<float>(b) == Status::kSuccess);
  CHECK(std::memcmp(da.data(), da_twin.data(), da.buf.size() * sizeof(T)) == 0);
  CHECK(std::memcmp(du.data(), du_twin.data(), du.buf.size() * sizeof(T)) == 0);
}

}  // namespace

TEMPLATE_TEST_CASE("SwiGLU twin forward matches a float64 reference on strided views, padding untouched",
                   "[cpu][swiglu]", double, float, lory::half_t, lory::bfloat16_t) {
  auto rng = lory_test::make_rng(std::string("swiglu_twin_forward_") + Prec<TestType>::name);
  for (const Shape& s : kShapes)
    for (bool sharp : {false, true}) {
      INFO(Prec<TestType>::name << " rows=" << s.rows << " cols=" << s.cols << (sharp ? " sharp" : " moderate"));
      {
        INFO("Acc = float");
        forward_case<TestType, float>(s, sharp, rng);
      }
      {
        INFO("Acc = double");
        forward_case<TestType, double>(s, sharp, rng);
      }
    }
}

TEMPLATE_TEST_CASE("SwiGLU twin backward matches a float64 reference on strided views, padding untouched",
                   "[cpu][swiglu]", double, float, lory::half_t, lory::bfloat16_t) {
  auto rng = lory_test::make_rng(std::string("swiglu_twin_backward_") + Prec<TestType>::name);
  for (const Shape& s : kShapes)
    for (bool sharp : {false, true}) {
      INFO(Prec<TestType>::name << " rows=" << s.rows << " cols=" << s.cols << (sharp ? " sharp" : " moderate"));
      {
        INFO("Acc = float");
        backward_case<TestType, float>(s, sharp, rng);
      }
      {
        INFO("Acc = double");
        backward_case<TestType, double>(s, sharp, rng);
      }
    }
}

TEMPLATE_TEST_CASE("the MoE FFN's CPU backend runs the SwiGLU twin in fp32", "[cpu][swiglu][moe_ffn]", float,
                   lory::half_t, lory::bfloat16_t) {
  auto rng = lory_test::make_rng(std::string("swiglu_backend_") + Prec<TestType>::name);
  backend_matches_twin<TestType>(rng);
}

TEST_CASE("SwiGLU twin on the gate and up halves of one fused buffer, and in place", "[cpu][swiglu]") {
  auto rng = lory_test::make_rng("swiglu_twin_fused");
  const int64_t rows = 6, f = 11;
  // [rows, 2f]: a = the first f columns, u = the last f (both with stride 2f).
  auto fused = lory_test::random_vector<float>(rows * 2 * f, rng, -6.0, 6.0);
  std::vector<float> m(rows * f), da(rows * f), du(rows * f);
  auto dm = lory_test::random_vector<float>(rows * f, rng);
  lory::SwigluForwardArgs<float> fw{rows, f, fused.data(), 2 * f, fused.data() + f, 2 * f, m.data(), f};
  REQUIRE(lory::reference::swiglu_forward<float>(fw) == Status::kSuccess);
  lory::SwigluBackwardArgs<float> bw{rows, f,         fused.data(), 2 * f, fused.data() + f, 2 * f,
                                     dm.data(), f, da.data(), f,     du.data(),        f};
  REQUIRE(lory::reference::swiglu_backward<float>(bw) == Status::kSuccess);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < f; ++c) {
      const double a = fused[r * 2 * f + c], u = fused[r * 2 * f + f + c], g = dm[r * f + c];
      CHECK(std::fabs(m[r * f + c] - ref_m(a, u)) <= (error_bound<float, float>()) * std::fabs(ref_m(a, u)) + 1e-37);
      CHECK(std::fabs(du[r * f + c] - ref_du(a, g)) <= error_bound<float, float>() * std::fabs(ref_du(a, g)) + 1e-37);
      CHECK(std::fabs(da[r * f + c] - ref_da(a, u, g)) <= error_bound<float, float>() * ref_da_scale(a, u, g) + 1e-37);
    }

  // In place: m over u (forward); da over a and du over dm (backward). Same bits as out of place.
  // (Not within the fused buffer: validate() compares the views' address spans, and the two
  // halves' spans interleave.)
  auto a_sep = fused, u_sep = fused;
  lory::SwigluForwardArgs<float> fi{rows, f, a_sep.data(), 2 * f, u_sep.data() + f, 2 * f, u_sep.data() + f, 2 * f};
  REQUIRE(lory::reference::swiglu_forward<float>(fi) == Status::kSuccess);
  CHECK(std::memcmp(a_sep.data(), fused.data(), fused.size() * sizeof(float)) == 0);  // a untouched
  for (int64_t r = 0; r < rows; ++r)
    CHECK(std::memcmp(&u_sep[r * 2 * f + f], &m[r * f], f * sizeof(float)) == 0);
  auto a_io = fused;
  auto dm_io = dm;
  lory::SwigluBackwardArgs<float> bi{rows, f,           a_io.data(), 2 * f, fused.data() + f, 2 * f,
                                     dm_io.data(), f, a_io.data(), 2 * f, dm_io.data(),     f};
  REQUIRE(lory::reference::swiglu_backward<float>(bi) == Status::kSuccess);
  CHECK(std::memcmp(dm_io.data(), du.data(), du.size() * sizeof(float)) == 0);
  for (int64_t r = 0; r < rows; ++r) CHECK(std::memcmp(&a_io[r * 2 * f], &da[r * f], f * sizeof(float)) == 0);

  // Outputs side by side: [da | du] as one [rows, 2f] matrix (the layer plan's fused backward
  // layout). Allowed: the two views share no element; same bits as separate buffers, and the
  // buffer's tail past the last row's du stays poisoned.
  std::vector<float> dadu(rows * 2 * f + 3, std::numeric_limits<float>::quiet_NaN());
  lory::SwigluBackwardArgs<float> bs{rows, f,           fused.data(), 2 * f, fused.data() + f, 2 * f,
                                     dm.data(), f, dadu.data(), 2 * f, dadu.data() + f,  2 * f};
  REQUIRE(lory::reference::swiglu_backward<float>(bs) == Status::kSuccess);
  for (int64_t r = 0; r < rows; ++r) {
    CHECK(std::memcmp(&dadu[r * 2 * f], &da[r * f], f * sizeof(float)) == 0);
    CHECK(std::memcmp(&dadu[r * 2 * f + f], &du[r * f], f * sizeof(float)) == 0);
  }
  for (size_t i = rows * 2 * f; i < dadu.size(); ++i) CHECK(std::isnan(dadu[i]));
  // du first, da second: side by side too.
  bs.da = dadu.data() + f;
  bs.du = dadu.data();
  CHECK(lory::validate(bs) == Status::kSuccess);
  // Refused: one shared column (du one column left), a row stride that folds du onto da, and
  // different strides.
  bs.da = dadu.data();
  bs.du = dadu.data() + f - 1;
  CHECK(lory::validate(bs) == Status::kErrorInvalidArgument);
  CHECK(std::string(lory::last_error_detail().argument) == "du");
  bs.du = dadu.data() + f;
  bs.da_stride = bs.du_stride = 2 * f - 1;
  CHECK(lory::validate(bs) == Status::kErrorInvalidArgument);
  bs.da_stride = 2 * f;
  bs.du_stride = 2 * f + 1;
  bs.rows = rows - 1;
  CHECK(lory::validate(bs) == Status::kErrorInvalidArgument);
}

TEST_CASE("SwiGLU twin backward matches central finite differences of the twin forward (float64)",
          "[cpu][swiglu][grad]") {
  auto rng = lory_test::make_rng("swiglu_twin_fd");
  const int64_t rows = 7, cols = 13, sa = 16, su = 13, sm = 15;
  View<double> a(rows, cols, sa), u(rows, cols, su), C(rows, cols, cols);
  fill_gate(a, rng, true);
  fill(u, rng);
  fill(C, rng);
  // L(a, u) = sum C .* swiglu(a, u), through the twin's forward.
  auto loss = [&](const View<double>& av, const View<double>& uv) {
    View<double> m(rows, cols, sm);
    const lory::SwigluForwardArgs<double> f{rows, cols, av.data(), sa, uv.data(), su, m.data(), sm};
    REQUIRE(lory::reference::swiglu_forward(f) == Status::kSuccess);
    double L = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) L += C.at(r, c) * m.at(r, c);
    return L;
  };
  View<double> da(rows, cols, cols + 2), du(rows, cols, cols + 1);
  const lory::SwigluBackwardArgs<double> b{rows,     cols,      a.data(),  sa,        u.data(),  su,
                                           C.data(), C.stride, da.data(), da.stride, du.data(), du.stride};
  REQUIRE(lory::reference::swiglu_backward(b) == Status::kSuccess);
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t ka = static_cast<size_t>(r * sa + c), ku = static_cast<size_t>(r * su + c);
      // Steps large enough that the loss's rounding (|L| reaches 1e4 with the tail gates) stays
      // far below the bound; the truncation error is ~h^2 silu''' / 6.
      const double ha = 1e-4 * std::fmax(1.0, std::fabs(a.buf[ka])), hu = 1e-3;
      View<double> ap = a, am = a, up = u, um = u;
      ap.buf[ka] += ha;
      am.buf[ka] -= ha;
      up.buf[ku] += hu;
      um.buf[ku] -= hu;
      const double fd_a = (loss(ap, u) - loss(am, u)) / (2 * ha);
      const double fd_u = (loss(a, up) - loss(a, um)) / (2 * hu);
      const double ga = da.at(r, c), gu = du.at(r, c);
      if (!(std::fabs(fd_a - ga) <= 1e-6 * (1 + std::fabs(ga)))) {
        if (bad++ == 0) UNSCOPED_INFO("da[" << r << ", " << c << "] = " << ga << ", finite difference " << fd_a);
      }
      if (!(std::fabs(fd_u - gu) <= 1e-6 * (1 + std::fabs(gu)))) {
        if (bad++ == 0) UNSCOPED_INFO("du[" << r << ", " << c << "] = " << gu << ", finite difference " << fd_u);
      }
    }
  CHECK(bad == 0);
}

TEST_CASE("SwiGLU twin propagates NaN and Inf element by element", "[cpu][swiglu]") {
  const double kNaN = std::numeric_limits<double>::quiet_NaN(), kInf = std::numeric_limits<double>::infinity();
  // Three columns per row: the special value sits in column 0; columns 1 and 2 stay finite.
  struct Special {
    const char* name;
    double a, u, dm;
    int m, da, du;  // what each output must be: 1 NaN, 2 +Inf, -2 -Inf, 0 the finite reference
  };
  const Special sp[] = {
      {"a NaN", kNaN, 0.5, 0.25, 1, 1, 1},
      {"u NaN", 1.5, kNaN, 0.25, 1, 1, 0},  // du = dm * silu(a) does not read u
      {"dm NaN", 1.5, 0.5, kNaN, 0, 1, 1},  // the forward does not read dm
      {"u +Inf", 2.0, kInf, 0.25, 2, 2, 0},
      {"u -Inf", 2.0, -kInf, 0.25, -2, -2, 0},
      {"dm +Inf", 2.0, 0.5, kInf, 0, 2, 2},
      {"dm -Inf, a < 0", -2.0, 0.5, -kInf, 0, 2, 2},    // silu(-2) < 0 and silu'(-2) < 0: both +Inf
      {"a +Inf", kInf, 0.5, 0.25, 2, 1, 2},              // silu(+Inf) = +Inf; silu' is Inf * 0 = NaN
  };
  const int64_t rows = sizeof(sp) / sizeof(sp[0]), cols = 3;
  for (bool acc_double : {false, true}) {
    INFO((acc_double ? "Acc = double" : "Acc = float"));
    std::vector<float> a(rows * cols), u(rows * cols), dm(rows * cols), m(rows * cols), da(rows * cols),
        du(rows * cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        a[r * cols + c] = c == 0 ? float(sp[r].a) : 0.75f * float(c) - 1.f;
        u[r * cols + c] = c == 0 ? float(sp[r].u) : 0.3f + 0.1f * float(c);
        dm[r * cols + c] = c == 0 ? float(sp[r].dm) : -0.6f;
      }
    const lory::SwigluForwardArgs<float> f{rows, cols, a.data(), cols, u.data(), cols, m.data(), cols};
    const lory::SwigluBackwardArgs<float> b{rows, cols, a.data(), cols, u.data(), cols, dm.data(), cols,
                                            da.data(), cols, du.data(), cols};
    if (acc_double) {
      REQUIRE(lory::reference::swiglu_forward<double>(f) == Status::kSuccess);
      REQUIRE(lory::reference::swiglu_backward<double>(b) == Status::kSuccess);
    } else {
      REQUIRE(lory::reference::swiglu_forward<float>(f) == Status::kSuccess);
      REQUIRE(lory::reference::swiglu_backward<float>(b) == Status::kSuccess);
    }
    auto expect = [](const char* what, float got, int code, double ref, double scale) {
      INFO(what << " = " << got << ", reference " << ref);
      if (code == 1) {
        CHECK(std::isnan(got));
      } else if (code == 2 || code == -2) {
        CHECK(std::isinf(got));
        CHECK((got > 0) == (code > 0));
      } else {
        CHECK(std::fabs(got - ref) <= error_bound<float, float>() * scale + 1e-37);
      }
    };
    for (int64_t r = 0; r < rows; ++r) {
      INFO(sp[r].name);
      for (int64_t c = 0; c < cols; ++c) {
        const size_t k = static_cast<size_t>(r * cols + c);
        const double av = a[k], uv = u[k], g = dm[k];
        const Special none{"", 0, 0, 0, 0, 0, 0};
        const Special& e = c == 0 ? sp[r] : none;  // the finite neighbours are never contaminated
        expect("m", m[k], e.m, ref_m(av, uv), std::fabs(ref_m(av, uv)));
        expect("da", da[k], e.da, ref_da(av, uv, g), ref_da_scale(av, uv, g));
        expect("du", du[k], e.du, ref_du(av, g), std::fabs(ref_du(av, g)));
      }
    }
  }
}

TEST_CASE("SwiGLU twin rejects bad arguments, names them and touches no memory", "[cpu][swiglu][validation]") {
  // Every operand inside one arena, so that the whole of it can be compared bit for bit.
  std::vector<float> arena(1024);
  auto rng = lory_test::make_rng("swiglu_twin_bad");
  lory_test::fill_uniform(arena, rng);
  float* const A = arena.data();
  float* const a = A, *const u = A + 128, *const dm = A + 256, *const o1 = A + 512, *const o2 = A + 768;
  for (int64_t i = 512; i < 1024; ++i) arena[i] = lory_test::poison_value<float>();
  float* const misaligned = reinterpret_cast<float*>(reinterpret_cast<char*>(u) + 2);

  struct Fwd {
    const char* name;
    void (*apply)(lory::SwigluForwardArgs<float>&, float*, float*);
    Status want;
    const char* argument;
  };
  const lory::SwigluForwardArgs<float> fv{3, 4, a, 6, u, 5, o1, 7};
  const Fwd fm[] = {
      {"rows = 0", [](auto& p, float*, float*) { p.rows = 0; }, Status::kErrorInvalidSize, "rows"},
      {"rows < 0", [](auto& p, float*, float*) { p.rows = -3; }, Status::kErrorInvalidSize, "rows"},
      {"cols = 0", [](auto& p, float*, float*) { p.cols = 0; }, Status::kErrorInvalidSize, "cols"},
      {"a null", [](auto& p, float*, float*) { p.a = nullptr; }, Status::kErrorNullPointer, "a"},
      {"u null", [](auto& p, float*, float*) { p.u = nullptr; }, Status::kErrorNullPointer, "u"},
      {"m null", [](auto& p, float*, float*) { p.m = nullptr; }, Status::kErrorNullPointer, "m"},
      {"a stride < cols", [](auto& p, float*, float*) { p.a_stride = 3; }, Status::kErrorInvalidShape, "a_stride"},
      {"u stride < cols", [](auto& p, float*, float*) { p.u_stride = 0; }, Status::kErrorInvalidShape, "u_stride"},
      {"m stride < cols", [](auto& p, float*, float*) { p.m_stride = -1; }, Status::kErrorInvalidShape, "m_stride"},
      {"rows * stride overflows", [](auto& p, float*, float*) { p.rows = INT64_MAX / 2 + 1; },
       Status::kErrorInvalidSize, "a_stride"},
      {"u misaligned", [](auto& p, float*, float* mis) { p.u = mis; }, Status::kErrorMisalignedPointer, "u"},
      {"m one element into a", [](auto& p, float* base, float*) { p.m = base + 1; p.m_stride = 6; },
       Status::kErrorInvalidArgument, "m"},
      {"m on a with another stride", [](auto& p, float* base, float*) { p.m = base; p.m_stride = 5; },
       Status::kErrorInvalidArgument, "m"},
      {"m over the end of u", [](auto& p, float* base, float*) { p.m = base + 128 + 12; },
       Status::kErrorInvalidArgument, "m"},
  };
  auto check_untouched = [&](const std::vector<float>& snap) {
    CHECK(std::memcmp(arena.data(), snap.data(), arena.size() * sizeof(float)) == 0);
  };
  for (const Fwd& mu : fm) {
    INFO("forward: " << mu.name);
    auto p = fv;
    mu.apply(p, A, misaligned);
    const std::vector<float> snap = arena;
    CHECK(lory::reference::swiglu_forward<float>(p) == mu.want);
    CHECK(std::string(lory::last_error_detail().argument) == mu.argument);
    CHECK(lory::reference::swiglu_forward<double>(p) == mu.want);
    check_untouched(snap);
  }

  struct Bwd {
    const char* name;
    void (*apply)(lory::SwigluBackwardArgs<float>&, float*, float*);
    Status want;
    const char* argument;
  };
  const lory::SwigluBackwardArgs<float> bv{3, 4, a, 4, u, 6, dm, 5, o1, 8, o2, 4};
  const Bwd bm[] = {
      {"rows < 0", [](auto& p, float*, float*) { p.rows = -1; }, Status::kErrorInvalidSize, "rows"},
      {"cols < 0", [](auto& p, float*, float*) { p.cols = -4; }, Status::kErrorInvalidSize, "cols"},
      {"a null", [](auto& p, float*, float*) { p.a = nullptr; }, Status::kErrorNullPointer, "a"},
      {"u null", [](auto& p, float*, float*) { p.u = nullptr; }, Status::kErrorNullPointer, "u"},
      {"dm null", [](auto& p, float*, float*) { p.dm = nullptr; }, Status::kErrorNullPointer, "dm"},
      {"da null", [](auto& p, float*, float*) { p.da = nullptr; }, Status::kErrorNullPointer, "da"},
      {"du null", [](auto& p, float*, float*) { p.du = nullptr; }, Status::kErrorNullPointer, "du"},
      {"a stride < cols", [](auto& p, float*, float*) { p.a_stride = 1; }, Status::kErrorInvalidShape, "a_stride"},
      {"dm stride < cols", [](auto& p, float*, float*) { p.dm_stride = 3; }, Status::kErrorInvalidShape,
       "dm_stride"},
      {"da stride < cols", [](auto& p, float*, float*) { p.da_stride = 2; }, Status::kErrorInvalidShape,
       "da_stride"},
      {"du stride < cols", [](auto& p, float*, float*) { p.du_stride = 0; }, Status::kErrorInvalidShape,
       "du_stride"},
      {"rows * stride overflows", [](auto& p, float*, float*) { p.du_stride = INT64_MAX / 2 + 1; },
       Status::kErrorInvalidSize, "du_stride"},
      {"u misaligned", [](auto& p, float*, float* mis) { p.u = mis; }, Status::kErrorMisalignedPointer, "u"},
      {"du == da", [](auto& p, float*, float*) { p.du = p.da; p.du_stride = p.da_stride; },
       Status::kErrorInvalidArgument, "du"},
      {"da one element into dm", [](auto& p, float* base, float*) { p.da = base + 257; p.da_stride = 5; },
       Status::kErrorInvalidArgument, "da"},
      {"du on u with another stride", [](auto& p, float* base, float*) { p.du = base + 128; p.du_stride = 4; },
       Status::kErrorInvalidArgument, "du"},
  };
  for (const Bwd& mu : bm) {
    INFO("backward: " << mu.name);
    auto p = bv;
    mu.apply(p, A, misaligned);
    const std::vector<float> snap = arena;
    CHECK(lory::reference::swiglu_backward<float>(p) == mu.want);
    CHECK(std::string(lory::last_error_detail().argument) == mu.argument);
    CHECK(lory::reference::swiglu_backward<double>(p) == mu.want);
    check_untouched(snap);
  }

  // The valid arguments do run and write (so the checks above can fail), and exact in-place
  // aliasing (m = u, da = a, du = dm: same pointer and stride) is accepted.
  std::vector<float> snap = arena;
  REQUIRE(lory::reference::swiglu_forward<float>(fv) == Status::kSuccess);
  CHECK(std::memcmp(arena.data(), snap.data(), arena.size() * sizeof(float)) != 0);
  snap = arena;
  REQUIRE(lory::reference::swiglu_backward<float>(bv) == Status::kSuccess);
  CHECK(std::memcmp(arena.data(), snap.data(), arena.size() * sizeof(float)) != 0);
  auto fi = fv;
  fi.m = u;
  fi.m_stride = fi.u_stride;
  CHECK(lory::reference::swiglu_forward<float>(fi) == Status::kSuccess);
  auto bi = bv;
  bi.da = a;
  bi.da_stride = bi.a_stride;
  bi.du = dm;
  bi.du_stride = bi.dm_stride;
  CHECK(lory::reference::swiglu_backward<float>(bi) == Status::kSuccess);
}
