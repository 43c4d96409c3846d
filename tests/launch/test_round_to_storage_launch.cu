// round_to_storage's launcher without a GPU: every validation error is returned before any CUDA call
// (the pointers below are bogus and never dereferenced) and names the argument.
#include <cstdint>
#include <string>

#include "common/catch.hpp"
#include "lory/round_to_storage.cuh"

namespace {

template <class P>
P* bogus(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

template <class T>
lory::RoundToStorageArgs<T> valid() {
  return {33, 100, bogus<const float>(0x10000), 104, bogus<T>(0x80000), 100};
}

template <class T>
void expect(const lory::RoundToStorageArgs<T>& a, lory::Status want, const char* argument) {
  CHECK(lory::round_to_storage(a, nullptr) == want);
  CHECK(std::string(lory::last_error_detail().argument) == argument);
}

}  // namespace

TEMPLATE_TEST_CASE("round_to_storage rejects bad arguments before any CUDA call", "[launch][round]", float, __half,
                   __nv_bfloat16) {
  using T = TestType;
  using lory::Status;
  const auto ok = valid<T>();
  REQUIRE(lory::round_to_storage_can_implement(ok) == Status::kSuccess);
  auto a = ok;
  a.rows = 0;
  expect(a, Status::kErrorInvalidSize, "rows or cols");
  a = ok;
  a.cols = -1;
  expect(a, Status::kErrorInvalidSize, "rows or cols");
  a = ok;
  a.src = nullptr;
  expect(a, Status::kErrorNullPointer, "src");
  a = ok;
  a.dst = nullptr;
  expect(a, Status::kErrorNullPointer, "dst");
  a = ok;
  a.src_stride = 99;
  expect(a, Status::kErrorInvalidShape, "src_stride");
  a = ok;
  a.dst_stride = 99;
  expect(a, Status::kErrorInvalidShape, "dst_stride");
  a = ok;
  a.rows = int64_t(1) << 60;
  expect(a, Status::kErrorInvalidSize, "src_stride");
  a = ok;
  a.src = bogus<const float>(0x10002);  // not float-aligned
  expect(a, Status::kErrorMisalignedPointer, "src");
  a = ok;
  a.dst = reinterpret_cast<T*>(const_cast<float*>(ok.src) + 10);  // dst overlaps src
  expect(a, Status::kErrorInvalidArgument, "dst");
}
