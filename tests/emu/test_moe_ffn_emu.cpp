// tests/gpu/test_moe_ffn.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_moe_ffn.cu"
