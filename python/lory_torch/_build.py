"""How the extension is compiled, in one place for both builds: the ahead-of-time build of
`pip install` (setup.py at the repository root loads this file by path) and the development
JIT build of lory_torch.load() in a source tree. Needs only the standard library and torch.

Environment:
  LORY_TORCH_CPU_ONLY=1          C++ only (the CPU ops), even where CUDA is there;
  LORY_TORCH_FORCE_CUDA_BUILD=1  compile the CUDA sources even without a GPU;
  TORCH_CUDA_ARCH_LIST           GPU targets of a CUDA build; default "8.0;9.0a" (A100, H100/H200)
                                 when no GPU is visible to pick from.
"""
from __future__ import annotations

import glob
import os
import sysconfig

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"
CFLAGS = ["-O2", "-Wno-unused-parameter"]
CUDA_FLAGS = [
    "-O3", "--expt-relaxed-constexpr",
    # PyTorch's default nvcc flags hide the half / bfloat16 operators the library's kernels use.
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
]


def env_on(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def sources(csrc: str, with_cuda: bool) -> list[str]:
    """Every C++ source in csrc/ (ops register themselves with TORCH_LIBRARY / _FRAGMENT), plus
    the CUDA ones in a CUDA build; sorted, so builds are reproducible."""
    found = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(os.path.join(csrc, "*.cu")))
    return found


def cuda_fp16_include() -> list[str]:
    """lory/dtype.hpp includes cuda_fp16.h and cuda_bf16.h even on the host: find them in the
    CUDA toolkit or, failing that, in the nvidia-cuda-runtime wheel PyTorch depends on."""
    from torch.utils import cpp_extension

    roots = []
    if cpp_extension.CUDA_HOME:
        roots.append(os.path.join(cpp_extension.CUDA_HOME, "include"))
    site = sysconfig.get_paths()["purelib"]
    roots += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    roots += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "include")))
    for r in roots:
        if os.path.exists(os.path.join(r, "cuda_bf16.h")):
            return [r]
    raise RuntimeError("lory_torch: cuda_fp16.h / cuda_bf16.h not found (install the CUDA toolkit "
                       "or the nvidia-cuda-runtime wheel)")


def default_arch_list() -> None:
    """A compile-only CUDA build (no GPU to ask) targets A100 and H100/H200 unless told otherwise."""
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


def include_dirs(repo_include: str, csrc: str, with_cuda: bool) -> list[str]:
    return [repo_include, csrc] + ([] if with_cuda else cuda_fp16_include())


def libraries(with_cuda: bool) -> list[str]:
    return ["cublas"] if with_cuda else []
