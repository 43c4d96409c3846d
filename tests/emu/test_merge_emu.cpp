// tests/gpu/test_merge.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_merge.cu"
