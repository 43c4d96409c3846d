// Test runner for the GPU tests under the CPU emulator of the kernels
// (cuda_emu.hpp): the same test cases as lory_gpu_tests, run on this machine.
#define CATCH_CONFIG_RUNNER
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "emu/cuda_emu.hpp"
#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"

int main(int argc, char* argv[]) {
  bool listing = false;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--list", 6) == 0) listing = true;
  const char* order = std::getenv("LORY_EMU_ORDER");
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (!listing) {
    std::printf("CPU emulation of the CUDA kernels on an emulated sm_%d0 (threads in %s order); not a GPU run\n",
                major, order && std::string(order) == "reverse" ? "reverse" : "index");
    lory_test::announce_seed();
  }
  Catch::Session session;
  const int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  if (!listing) lory_test::leave_out_sm90_tests_unless_named(session);
  return session.run();
}
