// tests/gpu/test_round_to_storage.cu under the CPU emulator of the kernels.
#include "emu/cuda_emu.hpp"
#include "gpu/test_round_to_storage.cu"
