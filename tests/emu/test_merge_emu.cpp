// tests/gpu/test_merge.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_merge.cu"

#include <algorithm>
#include <initializer_list>

namespace {

// While alive, every kernel reports code JIT-compiled from compute_75 PTX (no mma.sync).
struct Ptx75 {
  Ptx75() { lory_emu::set_kernel_ptx_version(75); }
  ~Ptx75() { lory_emu::set_kernel_ptx_version(0); }
};

}  // namespace

// On an sm_80+ device whose code for the merge kernels came from pre-sm_80 PTX, the tensor-core
// kernels' bodies are empty (LORY_MMA_AVAILABLE): kAuto must take the CUDA-core kernels and a
// forced tensor-core path must be refused before anything is written.
TEST_CASE("merge kernels without sm_80 code: kAuto runs the CUDA cores, forced tensor cores are refused",
          "[emu][merge]") {
  using T = __nv_bfloat16;
  namespace ld = lory::detail;
  // Which kernels ran: only CUDA-core ones (the forward's four instantiations; the backward's for
  // its experts per thread, then the ordered reduction).
  auto simt_only = [](const std::vector<const void*>& log, std::initializer_list<const void*> simt) {
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
  simt_only(lory_emu::take_launch_log(), {reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, true, true>),
                                          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, true, false>),
                                          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, false, true>),
                                          reinterpret_cast<const void*>(ld::merge_forward_simt_kernel<T, false, false>)});
  const BwdCase bc{45, 20, 1008, 0, 0};
  run_backward<T>(bc, BwdMode{}, MergePath::kAuto);
  using SimtCfg = ld::MergeBackwardSimtConfig<T>;
  REQUIRE(SimtCfg::experts_per_thread(bc.E, SimtCfg::col_vecs(bc.E)) == 4);
  simt_only(lory_emu::take_launch_log(), {reinterpret_cast<const void*>(ld::merge_backward_simt_kernel<T, true, 4>)});

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
