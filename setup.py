"""Builds the lory_torch package (python/lory_torch) with its compiled extension lory_torch._C,
ahead of time, against the torch installed in the running interpreter:

    pip install --no-build-isolation .        # from a clone of the repository

--no-build-isolation: the extension must be compiled against the very torch it will run with
(C++ ABI), and pip's default isolated build would first download a second torch (~3 GB with its
CUDA libraries) into a throwaway environment.

CUDA: built when the CUDA toolkit (nvcc) is found and torch is a CUDA build; C++ only otherwise.
LORY_TORCH_CPU_ONLY=1 forces C++ only; LORY_TORCH_FORCE_CUDA_BUILD=1 insists on CUDA (fails
without nvcc). TORCH_CUDA_ARCH_LIST picks the GPU targets (default "8.0;9.0a" where no GPU is
visible). LORY_TORCH_BUILD_DIR moves the build folder (default build-python/).
"""
import importlib.util
import os
import re

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("python", "lory_torch", "csrc")


def _version() -> str:
    """The C++ library's version (include/lory/version.hpp): one number for both packages."""
    with open(os.path.join(ROOT, "include", "lory", "version.hpp")) as f:
        text = f.read()
    parts = [re.search(rf"#define LORY_VERSION_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise RuntimeError("setup.py: LORY_VERSION_MAJOR/MINOR/PATCH not found in include/lory/version.hpp")
    return ".".join(m.group(1) for m in parts)


def _build_module():
    """python/lory_torch/_build.py, loaded by path (importing lory_torch itself is not needed)."""
    spec = importlib.util.spec_from_file_location("_lory_torch_build", os.path.join(ROOT, "python", "lory_torch",
                                                                                     "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    import torch
    from torch.utils import cpp_extension

    b = _build_module()
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if b.env_on("LORY_TORCH_CPU_ONLY"):
        with_cuda = False
    elif b.env_on("LORY_TORCH_FORCE_CUDA_BUILD"):
        if not nvcc or torch.version.cuda is None:
            raise RuntimeError("LORY_TORCH_FORCE_CUDA_BUILD=1 needs nvcc (CUDA_HOME) and a CUDA build of torch")
        with_cuda = True
    else:
        with_cuda = bool(nvcc) and torch.version.cuda is not None
    print(f"lory_torch: building the extension {'with CUDA' if with_cuda else 'C++ only (CPU ops)'}", flush=True)
    if with_cuda:
        b.default_arch_list()
    kw = dict(
        name="lory_torch._C",
        # setuptools wants paths relative to this file.
        sources=[os.path.relpath(s, ROOT) for s in b.sources(os.path.join(ROOT, CSRC), with_cuda)],
        include_dirs=b.include_dirs(os.path.join(ROOT, "include"), os.path.join(ROOT, CSRC), with_cuda),
        libraries=b.libraries(with_cuda),
        extra_compile_args={"cxx": b.CFLAGS, "nvcc": b.CUDA_FLAGS} if with_cuda else {"cxx": b.CFLAGS},
    )
    return [cpp_extension.CUDAExtension(**kw) if with_cuda else cpp_extension.CppExtension(**kw)]


def _cmdclass():
    from torch.utils import cpp_extension

    return {"build_ext": cpp_extension.BuildExtension}


build_base = os.path.join(os.environ["LORY_TORCH_BUILD_DIR"], "setuptools") if os.environ.get(
    "LORY_TORCH_BUILD_DIR") else "build-python"

setup(
    version=_version(),
    package_dir={"": "python"},
    packages=find_packages("python", include=["lory_torch", "lory_torch.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    options={"build": {"build_base": build_base}},
    zip_safe=False,
)
