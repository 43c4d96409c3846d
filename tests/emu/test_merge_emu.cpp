// tests/gpu/test_merge.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_merge.cu"

#include <algorithm>
#include <vector>

namespace {

// While alive, every kernel reports code JIT-compiled from compute_75 PTX (no mma.sync).
struct Ptx75 {
  Ptx75() { lory_emu::set_kernel_ptx_version(75); }
  ~Ptx75() { lory_emu::set_kernel_ptx_version(0); }
};

// The CUDA-core forward's kernels of I/O mode io (weights in shared memory or not); every mode's
// when io is not given.
template <class T>
std::vector<const void*> forward_simt_kernels() {
  namespace ld = lory::detail;
  using ld::MergeIo;
  return {reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, MergeIo::kVec, true>),
          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, MergeIo::kVec, false>),
          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, MergeIo::kScalar, true>),
          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, MergeIo::kScalar, false>),
          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, MergeIo::kScalarRows, true>),
          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, MergeIo::kScalarRows, false>)};
}
template <class T>
std::vector<const void*> forward_simt_kernels(lory::detail::MergeIo io) {
  const auto all = forward_simt_kernels<T>();
  const size_t i = io == lory::detail::MergeIo::kVec ? 0 : io == lory::detail::MergeIo::kScalar ? 2 : 4;
  return {all[i], all[i + 1]};
}

}  // namespace

// On an sm_80+ device whose code for the merge kernels came from pre-sm_80 PTX, the tensor-core
// kernels' bodies are empty (LORY_MMA_AVAILABLE): kAuto must take the CUDA-core kernels and a
// forced tensor-core path must be refused before anything is written.
TEST_CASE("merge kernels without sm_80 code: kAuto runs the CUDA cores, forced tensor cores are refused",
          "[emu][merge]") {
  using T = __nv_bfloat16;
  namespace ld = lory::detail;
  // Which kernels ran: only CUDA-core ones (the forward's six instantiations; the backward's for
  // its experts per thread, then the ordered reduction).
  auto simt_only = [](const std::vector<const void*>& log, const std::vector<const void*>& simt) {
    int found = 0;
    for (const void* k : log) {
      if (std::find(simt.begin(), simt.end(), k) != simt.end()) ++found;
      else CHECK(k == reinterpret_cast<const void*>(ld::merge_backward_reduce_kernel<ld::kMergeThreads>));
    }
    CHECK(found > 0);
  };
  const Ptx75 ptx75;
  const FwdCase fc{70, 16, 2048, 0, 0, 0};  // a tensor-core shape for kAuto on an sm_80 build
  lory_emu::take_launch_log();
  run_forward<T>(fc, MergePath::kAuto);
  simt_only(lory_emu::take_launch_log(), forward_simt_kernels<T>());
  const BwdCase bc{45, 20, 1008, 0, 0};
  run_backward<T>(bc, BwdMode{}, MergePath::kAuto);
  using SimtCfg = ld::MergeBackwardSimtConfig<T>;
  REQUIRE(SimtCfg::experts_per_thread(bc.E, SimtCfg::col_vecs(bc.E)) == 4);
  simt_only(lory_emu::take_launch_log(),
            {reinterpret_cast<const void*>(ld::merge_backward_simt_kernel<T, ld::MergeIo::kVec, 4>)});

  auto rng = make_rng("ptx75");
  auto W = make_view<T>(fc.E, fc.P, 0, 0, rng, true);
  auto out = make_view<T>(fc.S, fc.P, 0, 0, rng, false);
  auto weights = random_simplex_rows(fc.S, fc.E, rng);
  DeviceBuffer<T> dW(W.data), dout(out.data);
  DeviceBuffer<float> dweights(weights);
  const lory::MergeForwardArgs<T, float> f = forward_args<T>(fc, dW.get(), fc.P, dweights.get(), dout.get(), fc.P);
  size_t bytes = 0;
  REQUIRE(lory::detail::merge_forward_on_path(f, nullptr, bytes, nullptr, MergePath::kTensorCore) == Status::kSuccess);
  auto ws = stale_workspace(bytes);
  CHECK(lory::detail::merge_forward_on_path(f, ws.get(), bytes, nullptr, MergePath::kTensorCore) ==
        Status::kErrorInvalidArgument);

  lory::MergeBackwardArgs<T, float> b;
  b.num_segments = fc.S;
  b.experts = fc.E;
  b.params = fc.P;
  b.G = dout.get();  // poison: never read
  b.grad_segment_stride = fc.P;
  b.W = dW.get();
  b.expert_stride = fc.P;
  b.weights = dweights.get();
  DeviceBuffer<T> ddW(W.data);
  b.dW = ddW.get();
  b.dW_expert_stride = fc.P;
  std::vector<float> de_init(size_t(fc.S) * fc.E, 0.5f);
  DeviceBuffer<float> dde(de_init);
  b.d_weights = dde.get();
  REQUIRE(lory::detail::merge_backward_on_path(b, nullptr, bytes, nullptr, MergePath::kTensorCore) == Status::kSuccess);
  auto bws = stale_workspace(bytes);
  CHECK(lory::detail::merge_backward_on_path(b, bws.get(), bytes, nullptr, MergePath::kTensorCore) ==
        Status::kErrorInvalidArgument);
  LORY_TEST_SYNC();
  const auto out_after = dout.download(out.data.size());
  CHECK(std::memcmp(out_after.data(), out.data.data(), out.data.size() * sizeof(T)) == 0);
  const auto dW_after = ddW.download(W.data.size());
  CHECK(std::memcmp(dW_after.data(), W.data.data(), W.data.size() * sizeof(T)) == 0);
  CHECK(dde.download(de_init.size()) == de_init);
}

// The 2-D views' divide by the columns per row (detail::MergeDivmod: multiply-high and shifts)
// against the division it replaces, at the edges (divisors 1, powers of two and their neighbours,
// up to 2^62; numerators up to 2^63 - 1) and at random.
TEST_CASE("merge 2-D views: the magic-number divmod is exact", "[emu][merge][view2d]") {
  using lory::detail::MergeDivmod;
  auto rng = make_rng("merge-divmod");
  std::vector<int64_t> divisors = {1, 2, 3, 5, 7, 8, 9, 24, 33, 129, 1000, 4095, 4096, 4097, 6144, 1 << 20};
  for (int k = 1; k < 63; ++k)
    for (int64_t d : {(int64_t(1) << k) - 1, int64_t(1) << k, (int64_t(1) << k) + 1}) divisors.push_back(d);
  for (int i = 0; i < 200; ++i) divisors.push_back(int64_t(rng() >> (1 + rng() % 62)) + 1);
  int64_t wrong = 0;
  for (int64_t d : divisors) {
    const MergeDivmod m = MergeDivmod::make(d);
    std::vector<int64_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, INT64_MAX, INT64_MAX - 1, INT64_MAX / d * d,
                               INT64_MAX / d * d - 1};
    for (int i = 0; i < 200; ++i) ns.push_back(int64_t(rng() >> (1 + rng() % 63)));
    for (int64_t n : ns)
      if (n >= 0) wrong += m.div(n) != n / d;
  }
  CHECK(wrong == 0);
  // MergeRowView: element j of rows of 33 at a pitch of 40.
  const auto v = lory::detail::MergeRowView::make(5, 33, 40);
  CHECK(!v.flat);
  for (int64_t j = 0; j < 5 * 33; ++j) CHECK(v.offset(j) == (j / 33) * 40 + j % 33);
  CHECK(lory::detail::MergeRowView::make(5, 33, 33).flat);
  CHECK(lory::detail::MergeRowView::make(1, 33, 0).flat);
}

// Bad 2-D arguments with real (emulated) buffers: the status, and not one byte written.
TEST_CASE("merge 2-D views: bad rows and pitches write nothing", "[emu][merge][view2d]") {
  using T = __nv_bfloat16;
  auto rng = make_rng("view2d-refused");
  const View2DCase c{9, 8, 4, 72, 8, 16, 24, 0};
  BwdProblem<T> prob(c, BwdMode{}, rng);
  auto W = make_view2d<T>(c.E, c.rows, c.cols, c.cols + c.w_pad, kView2DGap, 0, rng, true);
  auto out = make_view2d<T>(c.S, c.rows, c.cols, c.cols + c.g_pad, kView2DGap, 0, rng, false);
  DeviceBuffer<T> dW(W.data), dout(out.data);
  lory::MergeForwardArgs<T, float> f = forward_args<T>(FwdCase{c.S, c.E, c.cols, 0, 0, 0}, dW.get(), W.stride,
                                                       prob.dweights.get(), dout.get(), out.stride);
  f.rows = c.rows;
  f.W_row_pitch = W.pitch;
  f.Wbar_row_pitch = out.pitch;
  lory::MergeBackwardArgs<T, float> b = prob.a;
  size_t fbytes = 0, bbytes = 0;
  REQUIRE(lory::merge_forward(f, nullptr, fbytes, nullptr) == Status::kSuccess);
  REQUIRE(lory::merge_backward(b, nullptr, bbytes, nullptr) == Status::kSuccess);
  std::vector<unsigned char> poison(std::max(fbytes, bbytes), 0xA5);
  DeviceBuffer<unsigned char> ws(poison);
  struct FwdBad {
    lory::MergeForwardArgs<T, float> a;
    Status want;
  };
  std::vector<FwdBad> fwd_bad;
  auto fa = f;
  fa.W_row_pitch = c.cols - 1;
  fwd_bad.push_back({fa, Status::kErrorInvalidShape});
  fa = f;
  fa.Wbar_row_pitch = c.cols - 8;
  fwd_bad.push_back({fa, Status::kErrorInvalidShape});
  fa = f;
  fa.rows = INT64_MAX / 4;
  fwd_bad.push_back({fa, Status::kErrorInvalidSize});
  fa = f;
  fa.segment_stride = (c.rows - 1) * out.pitch + c.cols - 1;  // one element short of the view
  fwd_bad.push_back({fa, Status::kErrorInvalidShape});
  for (const auto& k : fwd_bad) {
    size_t n = fbytes;
    CHECK(lory::merge_forward(k.a, ws.get(), n, nullptr) == k.want);
  }
  std::vector<lory::MergeBackwardArgs<T, float>> bwd_bad(4, b);
  bwd_bad[0].G_row_pitch = c.cols - 1;
  bwd_bad[1].dW_row_pitch = 0;
  bwd_bad[2].W_row_pitch = INT64_MAX / 2;
  bwd_bad[3].dW_expert_stride = (c.rows - 1) * prob.dW.pitch + c.cols - 1;
  const Status bwd_want[] = {Status::kErrorInvalidShape, Status::kErrorInvalidShape, Status::kErrorInvalidSize,
                             Status::kErrorInvalidShape};
  for (size_t i = 0; i < bwd_bad.size(); ++i) {
    size_t n = bbytes;
    CHECK(lory::merge_backward(bwd_bad[i], ws.get(), n, nullptr) == bwd_want[i]);
  }
  LORY_TEST_SYNC();
  const auto out_after = dout.download(out.data.size());
  CHECK(std::memcmp(out_after.data(), out.data.data(), out.data.size() * sizeof(T)) == 0);
  const auto dW_after = prob.ddW.download(prob.dW.data.size());
  CHECK(std::memcmp(dW_after.data(), prob.dW.data.data(), dW_after.size() * sizeof(T)) == 0);
  CHECK(count_nan(prob.dde.download(prob.de.size())) == static_cast<int64_t>(prob.de.size()));
  CHECK(ws.download(poison.size()) == poison);
}

// The CUDA-core forward runs the kernel of the call's I/O mode, decided once from the views: whole
// 16-byte vectors; element by element at consecutive addresses (every view flat: the misaligned
// case keeps its 1-D addressing and registers); or element by element at each one's 2-D view offset.
// Each against the double reference, poison between rows and views kept.
TEMPLATE_TEST_CASE("merge_forward (CUDA cores) runs the kernel of its I/O mode", "[emu][merge][view2d]", float,
                   __nv_bfloat16) {
  using T = TestType;
  using lory::detail::MergeIo;
  constexpr int64_t V = lory::detail::Vec16<T>::kSize;
  struct Case {
    View2DCase c;
    MergeIo io;
  };
  const Case cases[] = {
      {{5, 3, 4, 2 * V, 0, 0, 0, 0}, MergeIo::kVec},            // flat, aligned
      {{5, 3, 4, 2 * V, V, 2 * V, 0, 0}, MergeIo::kVec},        // 2-D, pitches multiples of the vector
      {{5, 3, 4, 2 * V, 0, 0, 0, 1}, MergeIo::kScalar},         // flat, misaligned
      {{5, 3, 1, 2 * V + 1, 3, 1, 0, 0}, MergeIo::kScalar},     // one row: flat whatever the pitch
      {{5, 3, 4, 2 * V, 3, 0, 0, 0}, MergeIo::kScalarRows},     // W 2-D at an odd pitch
      {{5, 3, 4, 2 * V + 1, 0, 2, 0, 0}, MergeIo::kScalarRows}, // Wbar 2-D, odd columns
      {{5, 3, 4, 2 * V, V, V, 0, 1}, MergeIo::kScalarRows},     // 2-D, misaligned
  };
  for (const Case& k : cases) {
    INFO(k.c.name());
    lory_emu::take_launch_log();
    run_forward_2d<T>(k.c, MergePath::kSimt);
    const auto log = lory_emu::take_launch_log();
    const auto want = forward_simt_kernels<T>(k.io);
    REQUIRE(log.size() == 1);
    CHECK(std::find(want.begin(), want.end(), log[0]) != want.end());
  }
}
