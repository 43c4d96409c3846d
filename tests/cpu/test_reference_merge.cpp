// CPU twin of the expert merge: forward against a direct sum, backward against
// central finite differences, on strided views with odd sizes.
#include <cmath>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/reference/merge.hpp"

namespace {

struct MergeCase {
  int64_t S;
  int E;
  int64_t P, pad_w, pad_s, pad_dw;  // strides = P + pad
};
const MergeCase kMergeCases[] = {{5, 3, 7, 0, 0, 0}, {1, 1, 13, 2, 3, 1}, {4, 6, 9, 5, 1, 2}, {3, 2, 1, 0, 0, 0}};

double merge_loss(const std::vector<double>& W, const std::vector<double>& w, const std::vector<double>& C,
                  const MergeCase& c) {
  std::vector<double> Wbar(c.S * (c.P + c.pad_s));
  lory::MergeForwardArgs<double, double> a;
  a.num_segments = c.S;
  a.experts = c.E;
  a.params = c.P;
  a.W = W.data();
  a.expert_stride = c.P + c.pad_w;
  a.weights = w.data();
  a.Wbar = Wbar.data();
  a.segment_stride = c.P + c.pad_s;
  REQUIRE(lory::reference::merge_forward(a) == lory::Status::kSuccess);
  double L = 0;
  for (int64_t s = 0; s < c.S; ++s)
    for (int64_t j = 0; j < c.P; ++j) L += C[s * c.P + j] * Wbar[s * (c.P + c.pad_s) + j];
  return L;
}

}  // namespace

TEST_CASE("merge forward is the weighted sum of the experts and leaves view padding alone", "[cpu][merge]") {
  auto rng = lory_test::make_rng("merge_forward");
  for (const MergeCase& c : kMergeCases) {
    const int64_t ws = c.P + c.pad_w, ss = c.P + c.pad_s;
    auto W = lory_test::random_vector<double>(c.E * ws, rng);
    auto w = lory_test::random_vector<double>(c.S * c.E, rng);
    std::vector<double> Wbar(c.S * ss);
    lory_test::poison(Wbar);
    lory::MergeForwardArgs<double, double> a;
    a.num_segments = c.S;
    a.experts = c.E;
    a.params = c.P;
    a.W = W.data();
    a.expert_stride = ws;
    a.weights = w.data();
    a.Wbar = Wbar.data();
    a.segment_stride = ss;
    REQUIRE(lory::reference::merge_forward(a) == lory::Status::kSuccess);
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t j = 0; j < ss; ++j) {
        if (j >= c.P) { REQUIRE(std::isnan(Wbar[s * ss + j])); continue; }
        double ref = 0;
        for (int e = 0; e < c.E; ++e) ref += w[s * c.E + e] * W[e * ws + j];
        REQUIRE(std::fabs(Wbar[s * ss + j] - ref) < 1e-14);
      }
  }
}

TEST_CASE("merge backward matches finite differences of the merge (dW and d_weights)", "[cpu][merge][grad]") {
  auto rng = lory_test::make_rng("merge_backward");
  const double h = 1e-6;
  for (const MergeCase& c : kMergeCases) {
    INFO("S=" << c.S << " E=" << c.E << " P=" << c.P);
    const int64_t ws = c.P + c.pad_w, gs = c.P + c.pad_s, ds = c.P + c.pad_dw;
    auto W = lory_test::random_vector<double>(c.E * ws, rng);
    auto w = lory_test::random_vector<double>(c.S * c.E, rng);
    auto C = lory_test::random_vector<double>(c.S * c.P, rng);  // dL/dWbar, dense
    std::vector<double> G(c.S * gs);
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t j = 0; j < c.P; ++j) G[s * gs + j] = C[s * c.P + j];
    std::vector<double> dW(c.E * ds), dw(c.S * c.E);
    lory_test::poison(dW);
    lory_test::poison(dw);
    lory::MergeBackwardArgs<double, double> b;
    b.num_segments = c.S;
    b.experts = c.E;
    b.params = c.P;
    b.G = G.data();
    b.grad_segment_stride = gs;
    b.W = W.data();
    b.expert_stride = ws;
    b.weights = w.data();
    b.dW = dW.data();
    b.dW_expert_stride = ds;
    b.d_weights = dw.data();
    REQUIRE(lory::reference::merge_backward(b) == lory::Status::kSuccess);
    for (int e = 0; e < c.E; ++e)
      for (int64_t j = 0; j < ds; ++j) {
        if (j >= c.P) { REQUIRE(std::isnan(dW[e * ds + j])); continue; }  // padding untouched
        const double keep = W[e * ws + j];
        W[e * ws + j] = keep + h;
        const double lp = merge_loss(W, w, C, c);
        W[e * ws + j] = keep - h;
        const double lm = merge_loss(W, w, C, c);
        W[e * ws + j] = keep;
        const double fd = (lp - lm) / (2 * h);
        REQUIRE(std::fabs(dW[e * ds + j] - fd) < 1e-7 * (1 + std::fabs(fd)));
      }
    for (size_t i = 0; i < w.size(); ++i) {
      const double keep = w[i];
      w[i] = keep + h;
      const double lp = merge_loss(W, w, C, c);
      w[i] = keep - h;
      const double lm = merge_loss(W, w, C, c);
      w[i] = keep;
      const double fd = (lp - lm) / (2 * h);
      REQUIRE(std::fabs(dw[i] - fd) < 1e-7 * (1 + std::fabs(fd)));
    }

    // Accumulate: initial + the overwrite result.
    auto dW0 = lory_test::random_vector<double>(dW.size(), rng);
    auto dw0 = lory_test::random_vector<double>(dw.size(), rng);
    std::vector<double> dW2 = dW0, dw2 = dw0;
    b.dW = dW2.data();
    b.d_weights = dw2.data();
    b.accumulate_dW = b.accumulate_d_weights = true;
    REQUIRE(lory::reference::merge_backward(b) == lory::Status::kSuccess);
    for (int e = 0; e < c.E; ++e)
      for (int64_t j = 0; j < c.P; ++j)
        REQUIRE(std::fabs(dW2[e * ds + j] - (dW0[e * ds + j] + dW[e * ds + j])) < 1e-13);
    for (size_t i = 0; i < dw.size(); ++i) REQUIRE(std::fabs(dw2[i] - (dw0[i] + dw[i])) < 1e-13);
  }
}

TEST_CASE("merge twin in fp32 and bf16 storage agrees with the double twin", "[cpu][merge][dtype]") {
  auto rng = lory_test::make_rng("merge_dtypes");
  const int64_t S = 7, P = 101;
  const int E = 9;
  const auto Wd = lory_test::random_vector<double>(E * P, rng);
  const auto w = lory_test::random_simplex_rows(S, E, rng);
  auto run = [&](auto tag, auto acc_tag) {
    using T = decltype(tag);
    using Acc = decltype(acc_tag);
    const auto W = lory_test::from_double_vector<T>(Wd);
    std::vector<double> Wr = lory_test::to_double_vector(W);  // the double twin sees the rounded inputs
    std::vector<T> out(S * P);
    std::vector<double> ref(S * P);
    lory::MergeForwardArgs<T, float> a{S, E, P, W.data(), P, w.data(), out.data(), P};
    lory::MergeForwardArgs<double, float> r{S, E, P, Wr.data(), P, w.data(), ref.data(), P};
    REQUIRE(lory::reference::merge_forward<Acc>(a) == lory::Status::kSuccess);
    REQUIRE(lory::reference::merge_forward<double>(r) == lory::Status::kSuccess);
    return lory_test::rel_error(out, ref);
  };
  REQUIRE(run(float{}, float{}) < lory_test::tolerance<float>());
  REQUIRE(run(__nv_bfloat16{}, float{}) < lory_test::tolerance<__nv_bfloat16>());
}
