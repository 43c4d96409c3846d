// SwiGLU launchers without a GPU: every validation error is returned before
// any CUDA call (the pointers below are bogus and never dereferenced).
#include <cstdint>

#include "common/catch.hpp"
#include "lory/swiglu.cuh"

namespace {

using lory::Status;

template <class P>
P* bogus(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

template <class T>
lory::SwigluForwardArgs<T> valid_forward() {
  // The fused layout: gate and up halves of one [rows, 2f] buffer.
  return {33, 100, bogus<const T>(0x10000), 200, bogus<const T>(0x10000 + 100 * sizeof(T)), 200,
          bogus<T>(0x20000), 100};
}

template <class T>
lory::SwigluBackwardArgs<T> valid_backward() {
  return {33, 100, bogus<const T>(0x10000), 100, bogus<const T>(0x20000), 100, bogus<const T>(0x30000), 100,
          bogus<T>(0x40000), 100, bogus<T>(0x50000), 100};
}

}  // namespace

TEMPLATE_TEST_CASE("swiglu_forward rejects bad arguments before any CUDA call", "[launch][swiglu]", float,
                   __half, __nv_bfloat16) {
  using T = TestType;
  const auto ok = valid_forward<T>();
  REQUIRE(lory::swiglu_forward_can_implement(ok) == Status::kSuccess);
  auto a = ok;
  a.rows = 0;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorInvalidSize);
  a = ok;
  a.cols = -1;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorInvalidSize);
  a = ok;
  a.a = nullptr;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.u = nullptr;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.m = nullptr;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.a_stride = 99;  // rows would overlap
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorInvalidShape);
  a = ok;
  a.u_stride = 0;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorInvalidShape);
  a = ok;
  a.m_stride = 50;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorInvalidShape);
  a = ok;  // rows * stride overflows 64 bits
  a.rows = int64_t(1) << 40;
  a.m_stride = int64_t(1) << 40;
  CHECK(lory::swiglu_forward(a, nullptr) == Status::kErrorInvalidSize);
}

TEMPLATE_TEST_CASE("swiglu_backward rejects bad arguments before any CUDA call", "[launch][swiglu]", float,
                   __half, __nv_bfloat16) {
  using T = TestType;
  const auto ok = valid_backward<T>();
  REQUIRE(lory::swiglu_backward_can_implement(ok) == Status::kSuccess);
  auto a = ok;
  a.rows = -2;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorInvalidSize);
  a = ok;
  a.cols = 0;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorInvalidSize);
  a = ok;
  a.a = nullptr;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.u = nullptr;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.dm = nullptr;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.da = nullptr;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorNullPointer);
  a = ok;
  a.du = nullptr;
  CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorNullPointer);
  for (int which = 0; which < 5; ++which) {
    a = ok;
    int64_t* strides[] = {&a.a_stride, &a.u_stride, &a.dm_stride, &a.da_stride, &a.du_stride};
    *strides[which] = 7;
    CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorInvalidShape);
    *strides[which] = int64_t(1) << 50;  // rows * stride overflows
    a.rows = int64_t(1) << 20;
    CHECK(lory::swiglu_backward(a, nullptr) == Status::kErrorInvalidSize);
  }
}
