// tests/gpu/test_swiglu.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_swiglu.cu"
