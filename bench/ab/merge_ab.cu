// A/B timing driver for the merge kernels: built once per source revision of include/ (see
// scripts/build_ab_drivers.sh) and run side by side in one GPU session, so a change that was only
// checked on the CPU (emulator, bank model, resource report) gets its speed measured against the
// revision before it in the same run. Uses only the public API (lory::merge_forward /
// lory::merge_backward), which every revision since the tensor-core kernels shares.
//
// Paper shape d = 1536, f = 4096 (P = 3 d f per expert), bf16, routing weights fp32. Prints one line
// per case: best of N launches (CUDA events on the default stream), GB/s of compulsory traffic,
// that as a percent of a device-to-device copy measured in the same process, and the percent of
// the read/write roofline (the traffic's reads at the read-only rate plus its writes at the
// write-only rate, both measured in the same process, over the time taken).
// Revisions with the tensor-core forward's tuning knobs (LORY_MERGE_FORWARD_TC_TUNING: defined by
// their merge.cuh, or by tests/common/merge_variants.cuh from the layered headers on) time each
// forward variant (lory::detail::for_each_merge_forward_tc_variant) after the default.
// Revisions with the tensor-core backward's tuning knobs (LORY_MERGE_BACKWARD_TC_TUNING)
// also time each variant (lory::detail::for_each_merge_backward_tc_variant) on every backward case,
// one line each, named at the end of the line; those with the wgmma variant (LORY_MERGE_BACKWARD_WGMMA,
// sm_90a) time it last, over every case, after all the others. Revisions with lory/merge_gemm.cuh
// also time the backward's cuBLAS GEMM method (MergeBackwardMethod::kGemm) on every backward case,
// named "gemm", right after the default.
//   usage: merge_ab [reps=5] [filter]   filter: run only the cases whose label contains it, e.g.
//          "backward E32 S128" (for Nsight Compute on one case: scripts/gpu_check_prebuilt.sh, LORY_AB_NCU;
//          "backward E32 S128 dw2x4+de32" picks one variant)
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../../tests/common/merge_variants.cuh"  // the variants and their feature macros (adds nothing for older revisions)
#include "../bandwidth_peaks.cuh"
#include "lory/merge.cuh"
#if __has_include("lory/merge_gemm.cuh")
#include "lory/merge_gemm.cuh"
#define LORY_AB_GEMM_METHOD 1  // revisions with the backward's cuBLAS GEMM method
#endif

namespace {
using bf16 = __nv_bfloat16;

__global__ void fill(bf16* p, size_t n, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(scale * (float((i * 2654435761u) % 1000) / 1000.f - 0.5f));
}

#define AB_CHECK(x)                                                                \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

template <class F>
float best_ms(int reps, F&& launch) {
  cudaEvent_t a, b;
  AB_CHECK(cudaEventCreate(&a));
  AB_CHECK(cudaEventCreate(&b));
  float best = 1e30f;
  for (int r = 0; r < reps + 1; ++r) {  // the first launch warms up
    AB_CHECK(cudaEventRecord(a));
    if (!launch()) return -1.f;
    AB_CHECK(cudaEventRecord(b));
    AB_CHECK(cudaEventSynchronize(b));
    float ms = 0.f;
    AB_CHECK(cudaEventElapsedTime(&ms, a, b));
    if (r > 0 && ms < best) best = ms;
  }
  AB_CHECK(cudaEventDestroy(a));
  AB_CHECK(cudaEventDestroy(b));
  return best;
}
}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  const std::string filter = argc > 2 ? argv[2] : "";
  auto label = [](const char* what, int E, int64_t S) {
    return std::string(what) + " E" + std::to_string(E) + " S" + std::to_string(S);
  };
  auto wanted = [&](const std::string& l) { return filter.empty() || l.find(filter) != std::string::npos; };
  const int64_t P = 3LL * 1536 * 4096;
  const int64_t Smax = 512, Emax = 64;
  bf16 *G = nullptr, *W = nullptr, *dW = nullptr;
  float *w = nullptr, *dw = nullptr;
  void* ws = nullptr;
  const size_t ws_cap = size_t(1) << 30;
  AB_CHECK(cudaMalloc(&G, Smax * P * sizeof(bf16)));
  AB_CHECK(cudaMalloc(&W, Emax * P * sizeof(bf16)));
  AB_CHECK(cudaMalloc(&dW, Emax * P * sizeof(bf16)));
  AB_CHECK(cudaMalloc(&w, Smax * Emax * sizeof(float)));
  AB_CHECK(cudaMalloc(&dw, Smax * Emax * sizeof(float)));
  AB_CHECK(cudaMalloc(&ws, ws_cap));
  fill<<<1024, 256>>>(G, Smax * P, 1.f);
  fill<<<1024, 256>>>(W, Emax * P, 1.f);
  AB_CHECK(cudaGetLastError());
  std::vector<float> hw(Smax * Emax);
  for (size_t i = 0; i < hw.size(); ++i) hw[i] = float((i * 7919) % 97 + 1) / 3000.f;
  AB_CHECK(cudaMemcpy(w, hw.data(), hw.size() * sizeof(float), cudaMemcpyHostToDevice));

  // Copy, read-only and write-only bandwidth (bench/bandwidth_peaks.cuh), timed like the kernels.
  lory_bench::BandwidthPeaks peaks;
  const bool have_peaks = lory_bench::measure_bandwidth_peaks(
      [&](auto&& launch) {
        return 1e-3 * best_ms(reps, [&] {
                 launch();
                 return true;
               });
      },
      peaks);
  if (!have_peaks) {
    std::printf("measuring the bandwidth peaks failed\n");
    return 1;
  }
  const double copy_gbs = peaks.copy * 1e-9;
  cudaDeviceProp prop{};
  AB_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, copy %.0f GB/s, read-only %.0f GB/s, write-only %.0f GB/s, d1536 f4096 bf16, best of %d\n",
              prop.name, copy_gbs, peaks.read * 1e-9, peaks.write * 1e-9, reps);

  // GB/s of the compulsory traffic (read + written), its percent of the copy rate, and "roof": the
  // time that traffic takes at the read-only and write-only rates over the time taken, in percent.
  auto report = [&](const char* what, int E, int64_t S, float ms, double read, double written,
                    const char* variant = "") {
    if (ms < 0.f) {
      std::printf("%-9s E%-2d S%-4lld failed %s\n", what, E, static_cast<long long>(S), variant);
      return;
    }
    const double gbs = (read + written) / ms / 1e6;
    const double roof_ms = 1e3 * (read / peaks.read + written / peaks.write);
    std::printf("%-9s E%-2d S%-4lld %9.3f ms %8.0f GB/s %5.1f%% of copy %5.1f%% of r/w roof %s\n", what, E,
                static_cast<long long>(S), ms, gbs, 100.0 * gbs / copy_gbs, 100.0 * roof_ms / ms, variant);
  };
  // One timing of the default or a variant on a case: run(workspace, bytes) is a launcher call.
  auto time_one = [&](const char* what, int E, int64_t S, double read, double written, const char* variant,
                      auto&& run) {
    size_t bytes = 0;
    if (run(nullptr, bytes) != lory::Status::kSuccess || bytes > ws_cap) {
      report(what, E, S, -1.f, 0, 0, variant);
      return;
    }
    const float ms = best_ms(reps, [&] { return run(ws, bytes) == lory::Status::kSuccess; });
    report(what, E, S, ms, read, written, variant);
  };

  for (int64_t S : {int64_t(128), int64_t(512)})
    for (int E : {8, 16, 32, 64}) {
      const std::string base = label("forward", E, S);
      lory::MergeForwardArgs<bf16, float> f;
      f.num_segments = S, f.experts = E, f.params = P, f.W = W, f.expert_stride = P, f.weights = w, f.Wbar = G,
      f.segment_stride = P;
      const double read = double(E) * P * sizeof(bf16), written = double(S) * P * sizeof(bf16);
      auto time_fwd = [&](const char* variant, auto&& run) { time_one("forward", E, S, read, written, variant, run); };
      if (wanted(base)) time_fwd("", [&](void* w_, size_t& n_) { return lory::merge_forward(f, w_, n_, nullptr); });
#ifdef LORY_MERGE_FORWARD_TC_TUNING
      // Revisions with the forward's tuning knobs: each variant on the same case ("forward E8 S512 cs").
      lory::detail::for_each_merge_forward_tc_variant([&](auto tag) {
        using V = typename decltype(tag)::type;
        if (!wanted(base + " " + V::kName)) return;
        time_fwd(V::kName, [&](void* w_, size_t& n_) {
          return lory::detail::merge_forward_on_path<bf16, V>(f, w_, n_, nullptr, lory::detail::MergePath::kAuto);
        });
      });
#endif
    }
  fill<<<1024, 256>>>(G, Smax * P, 1.f);

  struct Case {
    int E;
    int64_t S;
    bool dW, de;
    const char* what;
  };
  const Case cases[] = {{8, 128, true, true, "backward"},   {16, 128, true, true, "backward"},
                        {32, 128, true, true, "backward"},  {64, 128, true, true, "backward"},
                        {8, 512, true, true, "backward"},   {16, 512, true, true, "backward"},
                        {32, 512, true, true, "backward"},  {32, 128, true, false, "dW only"},
                        {32, 128, false, true, "de only"}};
#ifdef LORY_AB_GEMM_METHOD
  cublasHandle_t cublas = nullptr;  // on the default stream, as the timings
  if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) {
    std::printf("cublasCreate failed\n");
    return 1;
  }
#endif
  // wgmma_pass: the wgmma variant (sm_90a) alone, over every case after all the others, so that a
  // fault in it (its first runs on a GPU) cannot cost the other timings.
  auto run_cases = [&](bool wgmma_pass) {
  for (const Case& c : cases) {
    // The default runs when the filter matches the case's label, a variant when it matches the label
    // followed by the variant's name ("backward E32 S128 dw2x4+de32" runs that variant alone).
    const std::string base = label(c.what, c.E, c.S);
    bool any = !wgmma_pass && wanted(base);
#ifdef LORY_MERGE_BACKWARD_TC_TUNING
    lory::detail::for_each_merge_backward_tc_variant([&](auto tag) {
      any = any || (!wgmma_pass && wanted(base + " " + decltype(tag)::type::kName));
    });
#endif
#ifdef LORY_MERGE_BACKWARD_WGMMA
    any = any || (wgmma_pass && wanted(base + " " + lory::detail::MergeBackwardWgmma::kName));
#endif
#ifdef LORY_AB_GEMM_METHOD
    any = any || (!wgmma_pass && wanted(base + " gemm"));
#endif
    if (!any) continue;
    lory::MergeBackwardArgs<bf16, float> b;
    b.num_segments = c.S, b.experts = c.E, b.params = P, b.G = G, b.grad_segment_stride = P, b.W = W,
    b.expert_stride = P, b.weights = w, b.dW = c.dW ? dW : nullptr, b.dW_expert_stride = P,
    b.d_weights = c.de ? dw : nullptr;
    const double read = (double(c.S) + (c.de ? c.E : 0)) * P * sizeof(bf16);
    const double written = (c.dW ? c.E : 0) * double(P) * sizeof(bf16);
    auto time_bwd = [&](const char* variant, auto&& run) { time_one(c.what, c.E, c.S, read, written, variant, run); };
#ifdef LORY_MERGE_BACKWARD_WGMMA
    if (wgmma_pass) {
      using V = lory::detail::MergeBackwardWgmma;
      time_bwd(V::kName, [&](void* w_, size_t& n_) {
        return lory::detail::merge_backward_on_path<bf16, V>(b, w_, n_, nullptr, lory::detail::MergePath::kAuto);
      });
      continue;
    }
#endif
    if (wanted(base)) time_bwd("", [&](void* w_, size_t& n_) { return lory::merge_backward(b, w_, n_, nullptr); });
#ifdef LORY_AB_GEMM_METHOD
    if (wanted(base + " gemm"))
      time_bwd("gemm", [&](void* w_, size_t& n_) {
        return lory::merge_backward(b, lory::MergeBackwardMethod::kGemm, w_, n_, cublas, nullptr);
      });
#endif
#ifdef LORY_MERGE_BACKWARD_TC_TUNING
    // Revisions with tuning knobs: every variant of the tensor-core kernel on the same case, named
    // after its label ("backward E32 S128 dw2x4"; a filter of the bare label matches them all).
    lory::detail::for_each_merge_backward_tc_variant([&](auto tag) {
      using V = typename decltype(tag)::type;
      if (!wanted(base + " " + V::kName)) return;
      time_bwd(V::kName, [&](void* w_, size_t& n_) {
        return lory::detail::merge_backward_on_path<bf16, V>(b, w_, n_, nullptr, lory::detail::MergePath::kAuto);
      });
    });
#endif
  }
  };
  run_cases(false);
  run_cases(true);
  const cudaError_t last = cudaDeviceSynchronize();
  std::printf("last error: %s\n", cudaGetErrorString(last));
  return last == cudaSuccess ? 0 : 1;
}
