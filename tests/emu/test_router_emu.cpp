// tests/gpu/test_router.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_router.cu"
