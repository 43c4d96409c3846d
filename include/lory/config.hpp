// lory: configuration macros shared by every header.
//
// Versioned namespace: everything lives in lory::v0 (inline), so two copies of
// different versions can sit in one process. A consumer that vendors the
// library may wrap it further by defining LORY_WRAPPED_NAMESPACE before the
// first include: the library then lives in ::LORY_WRAPPED_NAMESPACE::lory.
#pragma once

#include "lory/version.hpp"

#if defined(LORY_WRAPPED_NAMESPACE)
#define LORY_NAMESPACE_BEGIN \
  namespace LORY_WRAPPED_NAMESPACE { namespace lory { inline namespace v0 {
#define LORY_NAMESPACE_END \
  } } }
#define LORY_NS_QUALIFIER ::LORY_WRAPPED_NAMESPACE::lory
#else
#define LORY_NAMESPACE_BEGIN namespace lory { inline namespace v0 {
#define LORY_NAMESPACE_END } }
#define LORY_NS_QUALIFIER ::lory
#endif

// Host-and-device qualifiers: the same math compiles with g++ (CPU twin, CPU
// tests) and with nvcc (kernels).
#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#define LORY_HOST_DEVICE __host__ __device__
#define LORY_DEVICE __device__
#define LORY_FORCEINLINE __forceinline__
#else
#define LORY_HOST_DEVICE
#define LORY_DEVICE
#define LORY_FORCEINLINE inline
#endif

// CUB is always named through its own qualifier macro, so that lory follows
// whatever wrapping the including project chose for CUB (PyTorch wraps it).
#define LORY_CUB CUB_NS_QUALIFIER

// LORY_HAS_DEVICE_CODE, LORY_KERNEL and the other macros that differ under the test suite's CPU
// emulator of the kernels (tests/emu/cuda_emu.hpp): all in one header.
#include "lory/detail/emulation.hpp"
