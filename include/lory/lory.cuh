// lory: umbrella header for everything, CUDA kernels and launchers included (needs nvcc).
#pragma once
#include "lory/inference.cuh"
#include "lory/lory.hpp"
#include "lory/merge.cuh"
#include "lory/merge_gemm.cuh"
#include "lory/moe_ffn.cuh"
#include "lory/router.cuh"
#include "lory/swiglu.cuh"
