// tests/gpu/test_inference.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_inference.cu"
