// tests/gpu/test_wgmma.cu under the CPU emulator (its wgmma follows lory/detail/wgmma.cuh's reading
// of the PTX ISA; only an sm_90 GPU run of the same test confirms that reading).
#include "emu/cuda_emu.hpp"
#include "gpu/test_wgmma.cu"
