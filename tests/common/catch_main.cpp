// Test runner for host-only test executables: prints the random seed first.
#define CATCH_CONFIG_RUNNER
#include "common/catch.hpp"
#include "common/test_util.hpp"

#include <cstring>

int main(int argc, char* argv[]) {
  bool listing = false;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--list", 6) == 0) listing = true;
  if (!listing) lory_test::announce_seed();
  return Catch::Session().run(argc, argv);
}
