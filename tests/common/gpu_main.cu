// Test runner for the GPU tests. Without a usable CUDA device every run exits
// with 77, which CTest (SKIP_RETURN_CODE 77) reports as *skipped*, never as
// passed. Listing the tests (used at build time for test discovery) works
// without a device.
#define CATCH_CONFIG_RUNNER
#include <cstdio>
#include <cstring>

#include "common/catch.hpp"
#include "common/gpu_util.cuh"
#include "common/test_util.hpp"

int main(int argc, char* argv[]) {
  bool listing = false;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--list", 6) == 0) listing = true;
  if (!listing && !lory_test::gpu_available()) {
    std::printf("SKIPPED: no CUDA device present; GPU tests were not run\n");
    return 77;
  }
  if (!listing) lory_test::announce_seed();
  Catch::Session session;
  const int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  if (!listing) lory_test::leave_out_sm90_tests_unless_named(session);
  return session.run();
}
