// lory: umbrella header for the host-side API (math, shapes, arguments, CPU twins).
// The CUDA kernels and launchers are in lory/lory.cuh (needs nvcc).
#pragma once
#include "lory/config.hpp"
#include "lory/dtype.hpp"
#include "lory/math.hpp"
#include "lory/merge.hpp"
#include "lory/moe_ffn.hpp"
#include "lory/moe_ffn_plan.hpp"
#include "lory/reference/merge.hpp"
#include "lory/reference/moe_ffn.hpp"
#include "lory/reference/moe_ffn_backend.hpp"
#include "lory/reference/router.hpp"
#include "lory/reference/swiglu.hpp"
#include "lory/router.hpp"
#include "lory/shapes.hpp"
#include "lory/status.hpp"
#include "lory/swiglu.hpp"
