// Inference launchers without a GPU: workspace queries and every validation
// error are answered before any CUDA or cuBLAS call. The pointers are bogus
// and never dereferenced; the cuBLAS handle is null (a real run refuses it
// after the workspace checks, before any launch).
#include <cstdint>

#include "common/catch.hpp"
#include "lory/inference.cuh"

namespace {

using lory::DecodeMethod;
using lory::FfnShape;
using lory::Status;

template <class P>
P* bogus(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

template <class T>
lory::PromptCacheArgs<T, float> valid_prompt(int64_t B, int64_t L, FfnShape sh) {
  lory::PromptCacheArgs<T, float> a;
  a.batch = B;
  a.prompt_len = L;
  a.shape = sh;
  a.x = bogus<const T>(uintptr_t(1) << 44);
  a.W_r = bogus<const T>(uintptr_t(2) << 44);
  a.bias = bogus<const float>(uintptr_t(3) << 44);
  a.W_g = bogus<const T>(uintptr_t(4) << 44);
  a.W_u = bogus<const T>(uintptr_t(5) << 44);
  a.W_d = bogus<const T>(uintptr_t(6) << 44);
  a.probs = bogus<float>(uintptr_t(7) << 44);
  a.cache = bogus<T>(uintptr_t(8) << 44);
  return a;
}

template <class T>
lory::DecodeStepArgs<T, float> valid_decode(int64_t B, FfnShape sh, DecodeMethod method) {
  lory::DecodeStepArgs<T, float> a;
  a.batch = B;
  a.shape = sh;
  a.method = method;
  a.x = bogus<const T>(uintptr_t(1) << 44);
  a.y = bogus<T>(uintptr_t(2) << 44);
  a.cache = bogus<const T>(uintptr_t(3) << 44);
  a.probs = bogus<const float>(uintptr_t(4) << 44);
  a.W_g = bogus<const T>(uintptr_t(5) << 44);
  a.W_u = bogus<const T>(uintptr_t(6) << 44);
  a.W_d = bogus<const T>(uintptr_t(7) << 44);
  return a;
}

template <class T>
void check_queries(int64_t B, int64_t L, FfnShape sh) {
  INFO("B " << B << " L " << L << " d " << sh.d << " f " << sh.f << " E " << sh.experts << " elem " << sizeof(T));
  const auto pa = valid_prompt<T>(B, L, sh);
  REQUIRE(lory::build_prompt_cache_can_implement(pa) == Status::kSuccess);
  size_t bytes = 0;
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kSuccess);
  REQUIRE(bytes >= (B * sh.d + B * sh.experts) * sizeof(float) + 256);  // hbar, probabilities, scratch
  size_t route_only = 0;
  auto ro = pa;
  ro.cache = nullptr;
  ro.W_g = ro.W_u = ro.W_d = nullptr;
  REQUIRE(lory::build_prompt_cache(ro, nullptr, route_only, nullptr) == Status::kSuccess);
  REQUIRE(route_only <= bytes);
  size_t small = bytes - 1;  // too small: refused before anything runs
  REQUIRE(lory::build_prompt_cache(pa, bogus<void>(0x900000), small, nullptr) == Status::kErrorWorkspaceTooSmall);

  size_t merged = 0, experts = 0;
  const auto dm = valid_decode<T>(B, sh, DecodeMethod::kMerged);
  const auto de = valid_decode<T>(B, sh, DecodeMethod::kExpertSpace);
  REQUIRE(lory::decode_step_can_implement(dm) == Status::kSuccess);
  REQUIRE(lory::decode_step_can_implement(de) == Status::kSuccess);
  REQUIRE(lory::decode_step(dm, nullptr, merged, nullptr, nullptr) == Status::kSuccess);
  REQUIRE(lory::decode_step(de, nullptr, experts, nullptr, nullptr) == Status::kSuccess);
  REQUIRE(merged >= 3 * B * sh.f * sizeof(T));
  const int64_t wide = sh.d > sh.f ? sh.d : sh.f;
  REQUIRE(experts >= merged + B * sh.experts * wide * sizeof(T));
  // kAuto asks for the workspace of the method the rule picks.
  size_t automatic = 0;
  REQUIRE(lory::decode_step(valid_decode<T>(B, sh, DecodeMethod::kAuto), nullptr, automatic, nullptr, nullptr) ==
          Status::kSuccess);
  REQUIRE(automatic == (lory::choose_decode_method(B, sh, sizeof(T)) == DecodeMethod::kMerged ? merged : experts));
  // Too small a workspace, then a null cuBLAS handle: both refused before any launch.
  size_t too_small = merged - 1;
  REQUIRE(lory::decode_step(dm, bogus<void>(0x900000), too_small, nullptr, nullptr) ==
          Status::kErrorWorkspaceTooSmall);
  REQUIRE(lory::decode_step(dm, bogus<void>(0x900000), merged, nullptr, nullptr) == Status::kErrorNullPointer);
}

}  // namespace

TEST_CASE("inference launchers: workspace queries without a GPU", "[launch][inference]") {
  check_queries<float>(3, 5, {13, 19, 4});
  check_queries<__half>(1, 1, {8, 8, 1});
  check_queries<__nv_bfloat16>(4, 100, {64, 96, 32});
  check_queries<__nv_bfloat16>(256, 3000, {1536, 4096, 32});  // a long prompt: the router's partial sums
}

TEST_CASE("inference launchers reject bad arguments before any launch", "[launch][inference]") {
  using T = __nv_bfloat16;
  const FfnShape sh{64, 96, 8};
  size_t bytes = 777;
  auto pa = valid_prompt<T>(2, 9, sh);
  pa.batch = 0;
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorInvalidSize);
  pa = valid_prompt<T>(2, 9, sh);
  pa.shape.experts = lory::kMaxExperts + 1;
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorUnsupportedExpertCount);
  pa = valid_prompt<T>(2, 9, sh);
  pa.x = nullptr;
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorNullPointer);
  pa = valid_prompt<T>(2, 9, sh);
  pa.W_u = nullptr;
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorNullPointer);
  pa = valid_prompt<T>(2, 9, sh);
  pa.cache = bogus<T>(0x800001);  // not element-aligned
  REQUIRE(lory::build_prompt_cache_can_implement(pa) == Status::kErrorMisalignedPointer);
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorMisalignedPointer);
  pa = valid_prompt<T>(2, 9, sh);
  pa.probs = bogus<float>(0x700002);
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorMisalignedPointer);
  pa = valid_prompt<T>(int64_t(1) << 16, int64_t(1) << 16, sh);  // 2^32 prompt tokens: past the router's int limit
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kErrorInvalidSize);
  REQUIRE(bytes == 777);  // failed queries leave the size alone

  auto da = valid_decode<T>(4, sh, DecodeMethod::kExpertSpace);
  da.batch = -1;
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorInvalidSize);
  da = valid_decode<T>(4, sh, static_cast<DecodeMethod>(7));
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorInvalidArgument);
  da = valid_decode<T>(4, sh, DecodeMethod::kExpertSpace);
  da.probs = nullptr;
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorNullPointer);
  da = valid_decode<T>(4, sh, DecodeMethod::kMerged);
  da.cache = nullptr;
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorNullPointer);
  da = valid_decode<T>(4, sh, DecodeMethod::kMerged);
  da.x = bogus<const T>(0x100001);
  REQUIRE(lory::decode_step_can_implement(da) == Status::kErrorMisalignedPointer);
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorMisalignedPointer);
  da = valid_decode<T>(4, sh, DecodeMethod::kExpertSpace);
  da.W_d = bogus<const T>(0x700001);
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorMisalignedPointer);
  // cuBLAS takes int sizes: E * f past INT_MAX is refused for expert space only.
  da = valid_decode<T>(2, {8, int64_t(1) << 24, 256}, DecodeMethod::kExpertSpace);
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kErrorInvalidSize);
  REQUIRE(bytes == 777);
  da.method = DecodeMethod::kMerged;
  REQUIRE(lory::decode_step(da, nullptr, bytes, nullptr, nullptr) == Status::kSuccess);
  // A workspace off the 16-byte grid, big enough: refused before the handle is looked at.
  REQUIRE(lory::decode_step(da, bogus<void>(0x900008), bytes, nullptr, nullptr) == Status::kErrorMisalignedPointer);
  pa = valid_prompt<T>(2, 9, sh);
  REQUIRE(lory::build_prompt_cache(pa, nullptr, bytes, nullptr) == Status::kSuccess);
  REQUIRE(lory::build_prompt_cache(pa, bogus<void>(0x900008), bytes, nullptr) == Status::kErrorMisalignedPointer);

  lory::ExpertCombineArgs<T> ca;
  ca.rows = 2; ca.experts = 3; ca.cols = 5;
  ca.in = bogus<const T>(0x100000); ca.weights = bogus<const float>(0x200000); ca.out = bogus<T>(0x300000);
  ca.out_stride = 5;
  REQUIRE(lory::expert_combine_can_implement(ca) == Status::kSuccess);
  ca.out_stride = 4;
  REQUIRE(lory::expert_combine(ca, nullptr) == Status::kErrorInvalidShape);
  ca.out_stride = 5;
  ca.out = bogus<T>(0x300001);
  REQUIRE(lory::expert_combine(ca, nullptr) == Status::kErrorMisalignedPointer);
}
