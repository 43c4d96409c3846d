// Test runner for the GPU tests under the CPU emulator of the kernels
// (cuda_emu.hpp): the same test cases as lory_gpu_tests, run on this machine.
#define CATCH_CONFIG_RUNNER
#include <cstdio>
#include <cstdlib>

#include "emu/cuda_emu.hpp"
#include "common/catch.hpp"
#include "common/test_util.hpp"

int main(int argc, char* argv[]) {
  const char* order = std::getenv("LORY_EMU_ORDER");
  std::printf("CPU emulation of the CUDA kernels (threads in %s order); not a GPU run\n",
              order && std::string(order) == "reverse" ? "reverse" : "index");
  lory_test::announce_seed();
  return Catch::Session().run(argc, argv);
}
