// A tiny consumer of lory: merges two experts on the CPU twin and checks the result.
#include <cmath>
#include <cstdio>

#include "lory/lory.hpp"

int main() {
  const float W[2 * 3] = {1, 2, 3, 10, 20, 30};  // E = 2 experts, P = 3
  const float w[2] = {0.25f, 0.75f};             // one segment
  float Wbar[3] = {};
  lory::MergeForwardArgs<float> a;
  a.num_segments = 1; a.experts = 2; a.params = 3;
  a.W = W; a.expert_stride = 3; a.weights = w; a.Wbar = Wbar; a.segment_stride = 3;
  const lory::Status s = lory::reference::merge_forward(a);
  const bool ok = s == lory::Status::kSuccess && std::fabs(Wbar[2] - 23.25f) < 1e-6f;
  std::printf("lory %d.%d.%d consumer: %s (Wbar = %g %g %g)\n", LORY_VERSION_MAJOR, LORY_VERSION_MINOR,
              LORY_VERSION_PATCH, ok ? "ok" : "FAILED", Wbar[0], Wbar[1], Wbar[2]);
  return ok ? 0 : 1;
}
