// Every validation error of every validate() in the library, and the CPU twins
// returning that error without touching their outputs (poisoned buffers stay
// poisoned bit for bit).
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/catch.hpp"
#include "common/test_util.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/moe_ffn.hpp"
#include "lory/reference/router.hpp"
#include "lory/shapes.hpp"
#include "lory/swiglu.hpp"

namespace {

using lory::RoutingMode;
using lory::Status;

constexpr int64_t kBig = INT64_MAX / 2 + 1;  // twice this overflows
const RoutingMode kBadMode = static_cast<RoutingMode>(7);

template <class Args>
struct Mutation {
  std::string name;
  std::function<void(Args&)> apply;
  Status want;
};

// Output buffers of a twin, poisoned; untouched() says whether they still hold the poison bit for bit.
struct Outputs {
  std::vector<std::vector<double>*> bufs;
  std::vector<std::vector<double>> snapshot;
  void poison_all() {
    snapshot.clear();
    for (auto* b : bufs) {
      lory_test::poison(*b);
      snapshot.push_back(*b);
    }
  }
  bool untouched() const {
    for (size_t i = 0; i < bufs.size(); ++i)
      if (std::memcmp(bufs[i]->data(), snapshot[i].data(), snapshot[i].size() * sizeof(double)) != 0) return false;
    return true;
  }
};

// Applies each mutation to a copy of the valid arguments: validate() must return
// the expected error, and so must the twin, leaving every output untouched.
template <class Args, class Twin>
void check_mutations(const Args& valid, const std::vector<Mutation<Args>>& muts, Outputs& out, Twin&& twin) {
  REQUIRE(validate(valid) == Status::kSuccess);
  for (const auto& m : muts) {
    INFO(m.name);
    Args a = valid;
    m.apply(a);
    REQUIRE(validate(a) == m.want);
    out.poison_all();
    REQUIRE(twin(a) == m.want);
    REQUIRE(out.untouched());
  }
  // And the valid arguments do run and write (so the checks above can fail).
  out.poison_all();
  REQUIRE(twin(valid) == Status::kSuccess);
  REQUIRE_FALSE(out.untouched());
}

}  // namespace

TEST_CASE("SegmentLayout and FfnShape reject bad sizes", "[cpu][validation]") {
  using L = lory::SegmentLayout;
  REQUIRE(L{2, 11, 4}.validate() == Status::kSuccess);
  REQUIRE(L{1, 1, 1}.validate() == Status::kSuccess);
  for (L bad : {L{0, 11, 4}, L{-1, 11, 4}, L{2, 0, 4}, L{2, -5, 4}, L{2, 11, 0}, L{2, 11, -1}, L{3, kBig, 4}})
    REQUIRE(bad.validate() == Status::kErrorInvalidSize);

  using F = lory::FfnShape;
  REQUIRE(F{5, 7, 1}.validate() == Status::kSuccess);
  REQUIRE(F{5, 7, lory::kMaxExperts}.validate() == Status::kSuccess);
  for (F bad : {F{0, 7, 3}, F{-1, 7, 3}, F{5, 0, 3}, F{5, -7, 3}, F{kBig, 4, 3}})
    REQUIRE(bad.validate() == Status::kErrorInvalidSize);
  for (F bad : {F{5, 7, 0}, F{5, 7, -2}, F{5, 7, lory::kMaxExperts + 1}})
    REQUIRE(bad.validate() == Status::kErrorUnsupportedExpertCount);
}

TEST_CASE("merge forward validation", "[cpu][validation][merge]") {
  const int64_t S = 3, P = 5;
  const int E = 2;
  std::vector<double> W(E * 7, 1.0), w(S * E, 0.5), Wbar(S * 6);
  lory::MergeForwardArgs<double, double> v{S, E, P, W.data(), 7, w.data(), Wbar.data(), 6};
  using A = decltype(v);
  std::vector<Mutation<A>> muts = {
      {"S = 0", [](A& a) { a.num_segments = 0; }, Status::kErrorInvalidSize},
      {"S < 0", [](A& a) { a.num_segments = -1; }, Status::kErrorInvalidSize},
      {"P = 0", [](A& a) { a.params = 0; }, Status::kErrorInvalidSize},
      {"P < 0", [](A& a) { a.params = -4; }, Status::kErrorInvalidSize},
      {"E = 0", [](A& a) { a.experts = 0; }, Status::kErrorUnsupportedExpertCount},
      {"E > max", [](A& a) { a.experts = lory::kMaxExperts + 1; }, Status::kErrorUnsupportedExpertCount},
      {"W null", [](A& a) { a.W = nullptr; }, Status::kErrorNullPointer},
      {"weights null", [](A& a) { a.weights = nullptr; }, Status::kErrorNullPointer},
      {"Wbar null", [](A& a) { a.Wbar = nullptr; }, Status::kErrorNullPointer},
      {"expert stride < P", [](A& a) { a.expert_stride = P - 1; }, Status::kErrorInvalidShape},
      {"segment stride < P", [](A& a) { a.segment_stride = P - 1; }, Status::kErrorInvalidShape},
      {"E * stride overflows", [](A& a) { a.expert_stride = kBig; }, Status::kErrorInvalidSize},
      {"S * stride overflows", [](A& a) { a.segment_stride = kBig; }, Status::kErrorInvalidSize},
  };
  Outputs out{{&Wbar}, {}};
  check_mutations(v, muts, out, [](const A& a) { return lory::reference::merge_forward(a); });
}

TEST_CASE("merge backward validation", "[cpu][validation][merge]") {
  const int64_t S = 3, P = 5;
  const int E = 2;
  std::vector<double> G(S * 6, 0.25), W(E * 7, 1.0), w(S * E, 0.5), dW(E * 8), dw(S * E);
  lory::MergeBackwardArgs<double, double> v;
  v.num_segments = S; v.experts = E; v.params = P;
  v.G = G.data(); v.grad_segment_stride = 6;
  v.W = W.data(); v.expert_stride = 7;
  v.weights = w.data();
  v.dW = dW.data(); v.dW_expert_stride = 8;
  v.d_weights = dw.data();
  using A = decltype(v);
  std::vector<Mutation<A>> muts = {
      {"S = 0", [](A& a) { a.num_segments = 0; }, Status::kErrorInvalidSize},
      {"P < 0", [](A& a) { a.params = -1; }, Status::kErrorInvalidSize},
      {"E = 0", [](A& a) { a.experts = 0; }, Status::kErrorUnsupportedExpertCount},
      {"E > max", [](A& a) { a.experts = lory::kMaxExperts + 1; }, Status::kErrorUnsupportedExpertCount},
      {"G null", [](A& a) { a.G = nullptr; }, Status::kErrorNullPointer},
      {"weights null", [](A& a) { a.weights = nullptr; }, Status::kErrorNullPointer},
      {"no output", [](A& a) { a.dW = nullptr; a.d_weights = nullptr; }, Status::kErrorNullPointer},
      {"d_weights without W", [](A& a) { a.W = nullptr; }, Status::kErrorNullPointer},
      {"grad stride < P", [](A& a) { a.grad_segment_stride = P - 1; }, Status::kErrorInvalidShape},
      {"expert stride < P", [](A& a) { a.expert_stride = 0; }, Status::kErrorInvalidShape},
      {"dW stride < P", [](A& a) { a.dW_expert_stride = 2; }, Status::kErrorInvalidShape},
      {"S * grad stride overflows", [](A& a) { a.grad_segment_stride = kBig; }, Status::kErrorInvalidSize},
      {"E * expert stride overflows", [](A& a) { a.expert_stride = kBig; }, Status::kErrorInvalidSize},
      {"E * dW stride overflows", [](A& a) { a.dW_expert_stride = kBig; }, Status::kErrorInvalidSize},
  };
  Outputs out{{&dW, &dw}, {}};
  check_mutations(v, muts, out, [](const A& a) { return lory::reference::merge_backward(a); });
  // Either output alone is enough.
  A only_dw = v;
  only_dw.d_weights = nullptr;
  only_dw.W = nullptr;
  REQUIRE(validate(only_dw) == Status::kSuccess);
  A only_de = v;
  only_de.dW = nullptr;
  REQUIRE(validate(only_de) == Status::kSuccess);
}

// validate() is what both the SwiGLU twin and its launchers share; the twin's own refusals
// (touching no memory) are in test_reference_swiglu.cpp.
TEST_CASE("SwiGLU forward and backward validation", "[cpu][validation][swiglu]") {
  // Outputs in their own buffer (out, of 64): an output may only coincide with an input exactly.
  std::vector<float> buf(64, 1.0f), out(64, 1.0f);
  lory::SwigluForwardArgs<float> f{3, 4, buf.data(), 8, buf.data() + 4, 8, out.data(), 5};
  REQUIRE(validate(f) == Status::kSuccess);
  using F = decltype(f);
  std::vector<Mutation<F>> fm = {
      {"rows = 0", [](F& a) { a.rows = 0; }, Status::kErrorInvalidSize},
      {"cols < 0", [](F& a) { a.cols = -1; }, Status::kErrorInvalidSize},
      {"a null", [](F& a) { a.a = nullptr; }, Status::kErrorNullPointer},
      {"u null", [](F& a) { a.u = nullptr; }, Status::kErrorNullPointer},
      {"m null", [](F& a) { a.m = nullptr; }, Status::kErrorNullPointer},
      {"a stride < cols", [](F& a) { a.a_stride = 3; }, Status::kErrorInvalidShape},
      {"u stride < cols", [](F& a) { a.u_stride = 0; }, Status::kErrorInvalidShape},
      {"m stride < cols", [](F& a) { a.m_stride = 2; }, Status::kErrorInvalidShape},
      {"rows * stride overflows", [](F& a) { a.rows = kBig; }, Status::kErrorInvalidSize},
  };
  for (const auto& m : fm) {
    INFO(m.name);
    F a = f;
    m.apply(a);
    REQUIRE(validate(a) == m.want);
  }
  lory::SwigluBackwardArgs<float> b{3, 4, buf.data(), 4, buf.data(), 4, buf.data(), 4,
                                    buf.data(), 4, out.data(), 4};  // da in place over a
  REQUIRE(validate(b) == Status::kSuccess);
  using B = decltype(b);
  std::vector<Mutation<B>> bm = {
      {"rows < 0", [](B& a) { a.rows = -3; }, Status::kErrorInvalidSize},
      {"cols = 0", [](B& a) { a.cols = 0; }, Status::kErrorInvalidSize},
      {"a null", [](B& a) { a.a = nullptr; }, Status::kErrorNullPointer},
      {"u null", [](B& a) { a.u = nullptr; }, Status::kErrorNullPointer},
      {"dm null", [](B& a) { a.dm = nullptr; }, Status::kErrorNullPointer},
      {"da null", [](B& a) { a.da = nullptr; }, Status::kErrorNullPointer},
      {"du null", [](B& a) { a.du = nullptr; }, Status::kErrorNullPointer},
      {"a stride < cols", [](B& a) { a.a_stride = 1; }, Status::kErrorInvalidShape},
      {"u stride < cols", [](B& a) { a.u_stride = 1; }, Status::kErrorInvalidShape},
      {"dm stride < cols", [](B& a) { a.dm_stride = 1; }, Status::kErrorInvalidShape},
      {"da stride < cols", [](B& a) { a.da_stride = 1; }, Status::kErrorInvalidShape},
      {"du stride < cols", [](B& a) { a.du_stride = 1; }, Status::kErrorInvalidShape},
      {"rows * stride overflows", [](B& a) { a.du_stride = kBig; a.rows = 3; }, Status::kErrorInvalidSize},
  };
  for (const auto& m : bm) {
    INFO(m.name);
    B a = b;
    m.apply(a);
    REQUIRE(validate(a) == m.want);
  }
}

TEST_CASE("router forward validation", "[cpu][validation][router]") {
  const lory::SegmentLayout lay{2, 7, 3};
  const int64_t d = 4, S = lay.num_segments();
  const int E = 3;
  std::vector<double> x(lay.num_tokens() * d, 0.1), Wr(E * d, 0.2), given(S * E, 0.3);
  std::vector<double> hbar(S * d), probs(S * E), weights(S * E);
  lory::RouterForwardArgs<double, double> v;
  v.layout = lay; v.d = d; v.experts = E; v.mode = RoutingMode::kCausalSegment;
  v.x = x.data(); v.W_r = Wr.data(); v.given_weights = given.data();
  v.hbar = hbar.data(); v.probs = probs.data(); v.weights = weights.data();
  using A = decltype(v);
  std::vector<Mutation<A>> muts = {
      {"B = 0", [](A& a) { a.layout.batch = 0; }, Status::kErrorInvalidSize},
      {"L < 0", [](A& a) { a.layout.seq_len = -7; }, Status::kErrorInvalidSize},
      {"T = 0", [](A& a) { a.layout.segment_len = 0; }, Status::kErrorInvalidSize},
      {"E = 0", [](A& a) { a.experts = 0; }, Status::kErrorUnsupportedExpertCount},
      {"E > max", [](A& a) { a.experts = lory::kMaxExperts + 1; }, Status::kErrorUnsupportedExpertCount},
      {"weights null", [](A& a) { a.weights = nullptr; }, Status::kErrorNullPointer},
      {"d = 0", [](A& a) { a.d = 0; }, Status::kErrorInvalidSize},
      {"d < 0", [](A& a) { a.d = -4; }, Status::kErrorInvalidSize},
      {"x null", [](A& a) { a.x = nullptr; }, Status::kErrorNullPointer},
      {"W_r null", [](A& a) { a.W_r = nullptr; }, Status::kErrorNullPointer},
      {"hbar null", [](A& a) { a.hbar = nullptr; }, Status::kErrorNullPointer},
      {"probs null", [](A& a) { a.probs = nullptr; }, Status::kErrorNullPointer},
      {"prompt: probs null", [](A& a) { a.mode = RoutingMode::kPromptLevel; a.probs = nullptr; }, Status::kErrorNullPointer},
      {"tokens * d overflows", [](A& a) { a.d = kBig; }, Status::kErrorInvalidSize},
      {"given: given_weights null", [](A& a) { a.mode = RoutingMode::kGivenWeights; a.given_weights = nullptr; },
       Status::kErrorNullPointer},
      {"unknown mode", [](A& a) { a.mode = kBadMode; }, Status::kErrorInvalidArgument},
  };
  Outputs out{{&hbar, &probs, &weights}, {}};
  check_mutations(v, muts, out, [](const A& a) { return lory::reference::router_forward(a); });
  // Given weights need no router at all.
  A g = v;
  g.mode = RoutingMode::kGivenWeights;
  g.x = nullptr; g.W_r = nullptr; g.hbar = nullptr; g.probs = nullptr; g.d = 0;
  REQUIRE(validate(g) == Status::kSuccess);
}

TEST_CASE("router backward validation", "[cpu][validation][router]") {
  const lory::SegmentLayout lay{2, 7, 3};
  const int64_t d = 4, S = lay.num_segments();
  const int E = 3;
  std::vector<double> Wr(E * d, 0.2), hbar(S * d, 0.1), probs(S * E, 1.0 / 3), dwts(S * E, 0.7);
  dwts[4] = -0.2;  // unequal, so the valid call writes nonzero gradients
  std::vector<double> dWr(E * d), db(E), dx(lay.num_tokens() * d);
  lory::RouterBackwardArgs<double, double> v;
  v.layout = lay; v.d = d; v.experts = E; v.mode = RoutingMode::kCausalSegment;
  v.W_r = Wr.data(); v.hbar = hbar.data(); v.probs = probs.data(); v.d_weights = dwts.data();
  v.dW_r = dWr.data(); v.d_bias = db.data(); v.dx = dx.data();
  using A = decltype(v);
  std::vector<Mutation<A>> muts = {
      {"B < 0", [](A& a) { a.layout.batch = -2; }, Status::kErrorInvalidSize},
      {"L = 0", [](A& a) { a.layout.seq_len = 0; }, Status::kErrorInvalidSize},
      {"T = 0", [](A& a) { a.layout.segment_len = 0; }, Status::kErrorInvalidSize},
      {"E = 0", [](A& a) { a.experts = 0; }, Status::kErrorUnsupportedExpertCount},
      {"E > max", [](A& a) { a.experts = 1000; }, Status::kErrorUnsupportedExpertCount},
      {"d = 0", [](A& a) { a.d = 0; }, Status::kErrorInvalidSize},
      {"W_r null", [](A& a) { a.W_r = nullptr; }, Status::kErrorNullPointer},
      {"hbar null", [](A& a) { a.hbar = nullptr; }, Status::kErrorNullPointer},
      {"probs null", [](A& a) { a.probs = nullptr; }, Status::kErrorNullPointer},
      {"d_weights null", [](A& a) { a.d_weights = nullptr; }, Status::kErrorNullPointer},
      {"no output", [](A& a) { a.dW_r = nullptr; a.d_bias = nullptr; a.dx = nullptr; }, Status::kErrorNullPointer},
      {"prompt: W_r null", [](A& a) { a.mode = RoutingMode::kPromptLevel; a.W_r = nullptr; }, Status::kErrorNullPointer},
      {"tokens * d overflows", [](A& a) { a.d = kBig; }, Status::kErrorInvalidSize},
      {"unknown mode", [](A& a) { a.mode = kBadMode; }, Status::kErrorInvalidArgument},
  };
  Outputs out{{&dWr, &db, &dx}, {}};
  check_mutations(v, muts, out, [](const A& a) { return lory::reference::router_backward(a); });
}

namespace {
// A small valid layer with every buffer allocated (double storage and routing).
struct LayerBuffers {
  lory::SegmentLayout lay{2, 7, 3};
  int64_t d = 4, f = 5;
  int E = 3;
  int64_t S = lay.num_segments(), tok = lay.num_tokens();
  std::vector<double> x = std::vector<double>(tok * d, 0.3), Wr = std::vector<double>(E * d, 0.2),
                      bias = std::vector<double>(E, 0.1), given = std::vector<double>(S * E, 0.4),
                      Wg = std::vector<double>(E * f * d, 0.1), Wu = std::vector<double>(E * f * d, -0.2),
                      Wd = std::vector<double>(E * d * f, 0.3), dy = std::vector<double>(tok * d, 1.0);
  std::vector<double> y = std::vector<double>(tok * d), hbar = std::vector<double>(S * d),
                      probs = std::vector<double>(S * E), weights = std::vector<double>(S * E);
  std::vector<double> dx = y, dWr = Wr, db = bias, dWg = Wg, dWu = Wu, dWd = Wd, dwts = weights;
  lory::MoeFfnParams<double, double> params() {
    lory::MoeFfnParams<double, double> p;
    p.layout = lay; p.shape = {d, f, E}; p.mode = RoutingMode::kCausalSegment;
    p.W_r = Wr.data(); p.bias = bias.data(); p.given_weights = given.data();
    p.W_g = Wg.data(); p.W_u = Wu.data(); p.W_d = Wd.data();
    return p;
  }
};

template <class A>
std::vector<Mutation<A>> param_mutations() {
  return {
      {"B = 0", [](A& a) { a.p.layout.batch = 0; }, Status::kErrorInvalidSize},
      {"L < 0", [](A& a) { a.p.layout.seq_len = -1; }, Status::kErrorInvalidSize},
      {"T = 0", [](A& a) { a.p.layout.segment_len = 0; }, Status::kErrorInvalidSize},
      {"B * L overflows", [](A& a) { a.p.layout.seq_len = kBig; }, Status::kErrorInvalidSize},
      {"d = 0", [](A& a) { a.p.shape.d = 0; }, Status::kErrorInvalidSize},
      {"f < 0", [](A& a) { a.p.shape.f = -5; }, Status::kErrorInvalidSize},
      {"E = 0", [](A& a) { a.p.shape.experts = 0; }, Status::kErrorUnsupportedExpertCount},
      {"E > max", [](A& a) { a.p.shape.experts = lory::kMaxExperts + 1; }, Status::kErrorUnsupportedExpertCount},
      {"unknown mode", [](A& a) { a.p.mode = kBadMode; }, Status::kErrorInvalidArgument},
      {"W_r null (causal)", [](A& a) { a.p.W_r = nullptr; }, Status::kErrorNullPointer},
      {"W_r null (prompt)", [](A& a) { a.p.mode = RoutingMode::kPromptLevel; a.p.W_r = nullptr; }, Status::kErrorNullPointer},
      {"given_weights null (given)", [](A& a) { a.p.mode = RoutingMode::kGivenWeights; a.p.given_weights = nullptr; },
       Status::kErrorNullPointer},
      {"W_g null", [](A& a) { a.p.W_g = nullptr; }, Status::kErrorNullPointer},
      {"W_u null", [](A& a) { a.p.W_u = nullptr; }, Status::kErrorNullPointer},
      {"W_d null", [](A& a) { a.p.W_d = nullptr; }, Status::kErrorNullPointer},
      {"tokens * d overflows", [](A& a) { a.p.layout.batch = int64_t(1) << 20; a.p.layout.seq_len = int64_t(1) << 20;
                                           a.p.shape.d = int64_t(1) << 24; a.p.shape.f = 1; }, Status::kErrorInvalidSize},
      {"E * 3df overflows", [](A& a) { a.p.shape.d = int64_t(1) << 30; a.p.shape.f = int64_t(1) << 30;
                                        a.p.shape.experts = 8; }, Status::kErrorInvalidSize},
  };
}
}  // namespace

TEST_CASE("layer forward validation", "[cpu][validation][moe_ffn]") {
  LayerBuffers L;
  lory::MoeFfnForwardArgs<double, double> v;
  v.p = L.params();
  v.x = L.x.data(); v.y = L.y.data(); v.hbar = L.hbar.data(); v.probs = L.probs.data(); v.weights = L.weights.data();
  using A = decltype(v);
  auto muts = param_mutations<A>();
  muts.push_back({"x null", [](A& a) { a.x = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"y null", [](A& a) { a.y = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"weights null", [](A& a) { a.weights = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"hbar null", [](A& a) { a.hbar = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"probs null (prompt)", [](A& a) { a.p.mode = RoutingMode::kPromptLevel; a.probs = nullptr; },
                  Status::kErrorNullPointer});
  Outputs out{{&L.y, &L.hbar, &L.probs, &L.weights}, {}};
  check_mutations(v, muts, out, [](const A& a) { return lory::reference::moe_ffn_forward(a); });
  // Given weights: no router, no hbar / probs needed; bias is optional everywhere.
  A g = v;
  g.p.mode = RoutingMode::kGivenWeights;
  g.p.W_r = nullptr; g.p.bias = nullptr; g.hbar = nullptr; g.probs = nullptr;
  REQUIRE(validate(g) == Status::kSuccess);
  REQUIRE(lory::reference::moe_ffn_forward(g) == Status::kSuccess);
}

TEST_CASE("layer backward validation", "[cpu][validation][moe_ffn]") {
  LayerBuffers L;
  lory::MoeFfnBackwardArgs<double, double> v;
  v.p = L.params();
  v.x = L.x.data(); v.dy = L.dy.data();
  v.hbar = L.hbar.data(); v.probs = L.probs.data(); v.weights = L.weights.data();
  {  // the saved tensors come from a real forward
    lory::MoeFfnForwardArgs<double, double> f;
    f.p = v.p; f.x = L.x.data(); f.y = L.y.data(); f.hbar = L.hbar.data(); f.probs = L.probs.data();
    f.weights = L.weights.data();
    REQUIRE(lory::reference::moe_ffn_forward(f) == Status::kSuccess);
  }
  v.dx = L.dx.data(); v.dW_r = L.dWr.data(); v.d_bias = L.db.data();
  v.dW_g = L.dWg.data(); v.dW_u = L.dWu.data(); v.dW_d = L.dWd.data(); v.d_weights = L.dwts.data();
  using A = decltype(v);
  auto muts = param_mutations<A>();
  muts.push_back({"x null", [](A& a) { a.x = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"dy null", [](A& a) { a.dy = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"weights null", [](A& a) { a.weights = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"dx null", [](A& a) { a.dx = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"dW_g null", [](A& a) { a.dW_g = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"dW_u null", [](A& a) { a.dW_u = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"dW_d null", [](A& a) { a.dW_d = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"hbar null", [](A& a) { a.hbar = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"probs null", [](A& a) { a.probs = nullptr; }, Status::kErrorNullPointer});
  muts.push_back({"dW_r null", [](A& a) { a.dW_r = nullptr; }, Status::kErrorNullPointer});
  Outputs out{{&L.dx, &L.dWr, &L.db, &L.dWg, &L.dWu, &L.dWd, &L.dwts}, {}};
  check_mutations(v, muts, out, [](const A& a) { return lory::reference::moe_ffn_backward(a); });
  // Nullable: d_bias and d_weights; given weights need no router outputs.
  A n = v;
  n.d_bias = nullptr; n.d_weights = nullptr;
  REQUIRE(validate(n) == Status::kSuccess);
  A g = v;
  g.p.mode = RoutingMode::kGivenWeights;
  g.p.W_r = nullptr; g.hbar = nullptr; g.probs = nullptr; g.dW_r = nullptr; g.d_bias = nullptr;
  REQUIRE(validate(g) == Status::kSuccess);
}
