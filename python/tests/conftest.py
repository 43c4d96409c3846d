"""pytest setup for the lory PyTorch extension tests: output poisoning, seeds, and which lory_torch
is tested: the INSTALLED package by default (`pip install --no-build-isolation .`; run pytest from a
directory where python/ is not on sys.path, as scripts/test_torch.sh does), or with
LORY_TORCH_FROM_SOURCE=1 the source tree's python/lory_torch (JIT build, for development)."""
import os
import random
import sys
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FROM_SOURCE = os.environ.get("LORY_TORCH_FROM_SOURCE", "") not in ("", "0")
if FROM_SOURCE:
    sys.path.insert(0, os.path.dirname(HERE))  # python/: the lory_torch package (in-tree)
# Every op output is filled with NaN before the library writes it (see csrc/lory_torch_common.h),
# so an element the library never wrote fails the NaN checks.
os.environ.setdefault("LORY_TORCH_POISON", "1")

import torch  # noqa: E402

import lory_torch  # noqa: E402

_SEED = int(os.environ.get("LORY_TEST_SEED", random.SystemRandom().randrange(1 << 31)))


def pytest_report_header(config):
    return [f"lory test seed: {_SEED} (set LORY_TEST_SEED to reproduce)",
            f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"]


@pytest.fixture(scope="session")
def ext():
    """Builds / loads the extension once; returns "cpu" or "cuda" (which build was loaded)."""
    return lory_torch.load()


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the session seed and the test's name (fresh data each run,
    reproducible with LORY_TEST_SEED)."""
    g = torch.Generator()
    g.manual_seed(_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g
