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

// Device code (kernels, their device functions and launchers) is compiled by
// nvcc, or by the host compiler under the test suite's CPU emulator of the
// kernels (tests/emu/cuda_emu.hpp defines LORY_CUDA_EMULATION).
#if defined(__CUDACC__) || defined(LORY_CUDA_EMULATION)
#define LORY_HAS_DEVICE_CODE 1
#else
#define LORY_HAS_DEVICE_CODE 0
#endif

// Kernels get hidden visibility so that a shared object embedding lory (a
// PyTorch extension, say) does not export or collide on kernel symbols.
#if defined(LORY_CUDA_EMULATION)
#define LORY_KERNEL
#elif defined(__CUDACC__)
#if defined(_WIN32)
#define LORY_KERNEL __global__
#else
#define LORY_KERNEL __global__ __attribute__((visibility("hidden")))
#endif
#endif

// CUB is always named through its own qualifier macro, so that lory follows
// whatever wrapping the including project chose for CUB (PyTorch wraps it).
#define LORY_CUB CUB_NS_QUALIFIER
