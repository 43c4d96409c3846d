// Router launchers without a GPU: every validation error is returned before
// any CUDA call (the pointers below are bogus and never dereferenced), and the
// workspace queries answer without touching the device.
#include <cstdint>
#include <string>

#include "common/catch.hpp"
#include "lory/router.cuh"

namespace {

using lory::RoutingMode;
using lory::Status;
using T = __nv_bfloat16;

template <class P>
P* bogus(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

lory::RouterForwardArgs<T, float> valid_forward(RoutingMode mode) {
  lory::RouterForwardArgs<T, float> a;
  a.layout = {3, 100, 32};
  a.d = 64;
  a.experts = 8;
  a.mode = mode;
  a.x = bogus<const T>(uintptr_t(1) << 44);
  a.W_r = bogus<const T>(uintptr_t(2) << 44);
  a.bias = nullptr;
  a.given_weights = bogus<const float>(uintptr_t(3) << 44);
  a.hbar = bogus<float>(uintptr_t(4) << 44);
  a.probs = bogus<float>(uintptr_t(5) << 44);
  a.weights = bogus<float>(uintptr_t(6) << 44);
  return a;
}

lory::RouterBackwardArgs<T, float> valid_backward(RoutingMode mode) {
  lory::RouterBackwardArgs<T, float> a;
  a.layout = {3, 100, 32};
  a.d = 64;
  a.experts = 8;
  a.mode = mode;
  a.W_r = bogus<const T>(uintptr_t(1) << 44);
  a.hbar = bogus<const float>(uintptr_t(2) << 44);
  a.probs = bogus<const float>(uintptr_t(3) << 44);
  a.d_weights = bogus<const float>(uintptr_t(4) << 44);
  a.dW_r = bogus<T>(uintptr_t(5) << 44);
  a.d_bias = bogus<float>(uintptr_t(6) << 44);
  a.dx = bogus<T>(uintptr_t(7) << 44);
  return a;
}

// The launcher with a non-null (bogus) workspace: it must fail validation before using it.
template <class Args>
Status forward_status(const Args& a) {
  size_t bytes = size_t(1) << 40;
  return lory::router_forward(a, bogus<void>(0x80000), bytes, nullptr);
}
template <class Args>
Status backward_status(const Args& a) {
  size_t bytes = size_t(1) << 40;
  return lory::router_backward(a, bogus<void>(0x80000), bytes, nullptr);
}

}  // namespace

TEST_CASE("router_forward rejects bad arguments before any CUDA call", "[launch][router]") {
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
    const auto ok = valid_forward(mode);
    REQUIRE(lory::router_forward_can_implement(ok) == Status::kSuccess);
    auto a = ok;
    a.layout.batch = 0;
    CHECK(forward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.layout.seq_len = -3;
    CHECK(forward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.layout.segment_len = 0;
    CHECK(forward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.d = 0;
    CHECK(forward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.experts = 0;
    CHECK(forward_status(a) == Status::kErrorUnsupportedExpertCount);
    a = ok;
    a.experts = lory::kMaxExperts + 1;
    CHECK(forward_status(a) == Status::kErrorUnsupportedExpertCount);
    a = ok;
    a.x = nullptr;
    CHECK(forward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.W_r = nullptr;
    CHECK(forward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.hbar = nullptr;
    CHECK(forward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.probs = nullptr;
    CHECK(forward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.weights = nullptr;
    CHECK(forward_status(a) == Status::kErrorNullPointer);
    a = ok;  // B * L * d overflows 64 bits
    a.layout = {1, int64_t(1) << 40, 256};
    a.d = int64_t(1) << 30;
    CHECK(forward_status(a) == Status::kErrorInvalidSize);
    a = ok;  // GPU limit: token indices below 2^31
    a.layout = {int64_t(1) << 16, int64_t(1) << 15, 256};
    CHECK(lory::router_forward_can_implement(a) == Status::kErrorInvalidSize);
    CHECK(forward_status(a) == Status::kErrorInvalidSize);
    a = ok;  // GPU limit: d below 2^31
    a.layout = {1, 1, 1};
    a.d = int64_t(1) << 31;
    CHECK(lory::router_forward_can_implement(a) == Status::kErrorInvalidSize);
    a = ok;
    a.mode = static_cast<RoutingMode>(7);
    CHECK(forward_status(a) == Status::kErrorInvalidArgument);
  }
  auto g = valid_forward(RoutingMode::kGivenWeights);
  g.x = nullptr;  // not needed with given weights
  g.W_r = nullptr;
  g.hbar = nullptr;
  g.probs = nullptr;
  g.d = 0;
  CHECK(lory::router_forward_can_implement(g) == Status::kSuccess);
  g.given_weights = nullptr;
  CHECK(forward_status(g) == Status::kErrorNullPointer);
}

TEST_CASE("router_forward workspace queries", "[launch][router]") {
  // Segments no longer than a chunk of kRouterChunkTokens tokens need no workspace.
  auto a = valid_forward(RoutingMode::kCausalSegment);
  size_t bytes = 999;
  REQUIRE(lory::router_forward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == 0);
  a.mode = RoutingMode::kGivenWeights;
  bytes = 999;
  REQUIRE(lory::router_forward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == 0);

  // Long spans (prompt-level over L = 1000, or segments of 600 tokens) keep
  // per-chunk partial sums: at least rows * chunks * d floats.
  a.mode = RoutingMode::kPromptLevel;
  a.layout = {3, 1000, 32};
  bytes = 0;
  REQUIRE(lory::router_forward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  const int64_t chunks = (1000 + lory::kRouterChunkTokens - 1) / lory::kRouterChunkTokens;
  CHECK(bytes >= size_t(3 * chunks * 64 * sizeof(float)));
  size_t again = 0;
  REQUIRE(lory::router_forward(a, nullptr, again, nullptr) == Status::kSuccess);
  CHECK(again == bytes);  // a pure function of the arguments

  size_t small = bytes - 1;
  CHECK(lory::router_forward(a, bogus<void>(0x80000), small, nullptr) == Status::kErrorWorkspaceTooSmall);

  a.mode = RoutingMode::kCausalSegment;
  a.layout = {2, 1300, 600};
  bytes = 0;
  REQUIRE(lory::router_forward(a, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes >= size_t(2 * 3 * 3 * 64 * sizeof(float)));  // 3 segments x 3 chunks each
  small = 0;
  CHECK(lory::router_forward(a, bogus<void>(0x80000), small, nullptr) == Status::kErrorWorkspaceTooSmall);
  // The partial sums are fp32: a workspace off float's alignment is refused before any launch.
  CHECK(lory::router_forward(a, bogus<void>(0x80002), bytes, nullptr) == Status::kErrorMisalignedPointer);
}

TEST_CASE("router_backward rejects bad arguments before any CUDA call", "[launch][router]") {
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
    const auto ok = valid_backward(mode);
    REQUIRE(lory::router_backward_can_implement(ok) == Status::kSuccess);
    auto a = ok;
    a.layout.batch = -1;
    CHECK(backward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.layout.segment_len = 0;
    CHECK(backward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.d = -5;
    CHECK(backward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.experts = 0;
    CHECK(backward_status(a) == Status::kErrorUnsupportedExpertCount);
    a = ok;
    a.experts = 1000;
    CHECK(backward_status(a) == Status::kErrorUnsupportedExpertCount);
    a = ok;
    a.W_r = nullptr;
    CHECK(backward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.hbar = nullptr;
    CHECK(backward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.probs = nullptr;
    CHECK(backward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.d_weights = nullptr;
    CHECK(backward_status(a) == Status::kErrorNullPointer);
    a = ok;  // nothing to compute
    a.dW_r = nullptr;
    a.d_bias = nullptr;
    a.dx = nullptr;
    CHECK(backward_status(a) == Status::kErrorNullPointer);
    a = ok;
    a.layout = {int64_t(1) << 20, int64_t(1) << 40, 1};
    CHECK(backward_status(a) == Status::kErrorInvalidSize);
    a = ok;  // GPU limit: token indices below 2^31
    a.layout = {2, int64_t(1) << 30, 4096};
    a.d = 1;
    CHECK(lory::router_backward_can_implement(a) == Status::kErrorInvalidSize);
    CHECK(backward_status(a) == Status::kErrorInvalidSize);
    a = ok;
    a.mode = static_cast<RoutingMode>(-1);
    CHECK(backward_status(a) == Status::kErrorInvalidArgument);
  }
}

TEST_CASE("router_backward workspace queries", "[launch][router]") {
  const int64_t E = 8, d = 64;
  for (RoutingMode mode : {RoutingMode::kCausalSegment, RoutingMode::kPromptLevel}) {
    auto a = valid_backward(mode);
    const int64_t rows = mode == RoutingMode::kPromptLevel ? a.layout.batch : a.layout.num_segments();
    size_t all = 0;
    REQUIRE(lory::router_backward(a, nullptr, all, nullptr) == Status::kSuccess);
    // dz [rows, E], v [rows, d] and the dW_r / d_bias partials [chunks >= 1, E, d + 1], all fp32.
    CHECK(all >= size_t((rows * E + rows * d + E * (d + 1)) * sizeof(float)));

    auto no_dx = a;
    no_dx.dx = nullptr;
    size_t bytes_no_dx = 0;
    REQUIRE(lory::router_backward(no_dx, nullptr, bytes_no_dx, nullptr) == Status::kSuccess);
    CHECK(bytes_no_dx < all);

    auto dx_only = a;
    dx_only.dW_r = nullptr;
    dx_only.d_bias = nullptr;
    size_t bytes_dx_only = 0;
    REQUIRE(lory::router_backward(dx_only, nullptr, bytes_dx_only, nullptr) == Status::kSuccess);
    CHECK(bytes_dx_only < all);
    CHECK(bytes_dx_only >= size_t((rows * E + rows * d) * sizeof(float)));

    size_t small = all - 1;
    CHECK(lory::router_backward(a, bogus<void>(0x80000), small, nullptr) == Status::kErrorWorkspaceTooSmall);
    CHECK(lory::router_backward(a, bogus<void>(0x80002), all, nullptr) == Status::kErrorMisalignedPointer);
    small = 0;
    CHECK(lory::router_backward(dx_only, bogus<void>(0x80000), small, nullptr) ==
          Status::kErrorWorkspaceTooSmall);
  }
  // Given weights: the caller owns its router; nothing to do, no workspace.
  auto g = valid_backward(RoutingMode::kGivenWeights);
  size_t bytes = 999;
  REQUIRE(lory::router_backward(g, nullptr, bytes, nullptr) == Status::kSuccess);
  CHECK(bytes == 0);
}

// The launchers share the CPU twin's validation: a misaligned fp32 buffer and an output over an
// input get the same answer on both sides, with the argument named.
TEST_CASE("router launchers refuse misaligned and aliased buffers as the CPU twin does", "[launch][router]") {
  auto a = valid_forward(RoutingMode::kCausalSegment);
  a.hbar = bogus<float>((uintptr_t(4) << 44) + 2);
  CHECK(lory::router_forward_can_implement(a) == Status::kErrorMisalignedPointer);
  CHECK(forward_status(a) == Status::kErrorMisalignedPointer);
  CHECK(std::string(lory::last_error_detail().argument) == "hbar");
  a = valid_forward(RoutingMode::kCausalSegment);
  a.probs = reinterpret_cast<float*>(const_cast<T*>(a.W_r));  // probs over the router weight
  CHECK(forward_status(a) == Status::kErrorInvalidArgument);
  CHECK(std::string(lory::last_error_detail().argument) == "probs");
  auto b = valid_backward(RoutingMode::kPromptLevel);
  b.dW_r = const_cast<T*>(b.W_r);
  CHECK(backward_status(b) == Status::kErrorInvalidArgument);
  CHECK(std::string(lory::last_error_detail().argument) == "dW_r");
}
