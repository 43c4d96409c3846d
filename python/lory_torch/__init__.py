"""PyTorch integration of lory: the Lory MoE FFN layer as custom ops with autograd.

Installed (`pip install --no-build-isolation .` from a clone, see python/README.md), the compiled
extension is the module lory_torch._C, built ahead of time against the installed torch; importing
lory_torch imports it, which registers the ops. Nothing is compiled at run time.

In a source tree without an installed build (development), load() compiles the same sources just
in time with torch.utils.cpp_extension.load against <repo>/include (see _build.py for the
LORY_TORCH_CPU_ONLY / LORY_TORCH_FORCE_CUDA_BUILD switches; LORY_TORCH_BUILD_DIR: build folder).
LORY_TORCH_PREBUILT=/path/lory_torch_cuda.so loads a CUDA build made ahead of time for this exact
torch version instead (scripts/build_torch_prebuilt.sh; used on short GPU leases).

Ops (namespace torch.ops.lory):
  moe_ffn_forward(x, W_r, W_g, W_u, W_d, given_weights, mode, segment_len,
                  max_chunk_segments=0, workspace_budget_bytes=0, merge_backward="auto")
                  -> (y, hbar, probs, weights)     (merge_backward: for the backward, see moe_ffn)
  moe_ffn_backward(dy, x, W_r, W_g, W_u, W_d, given_weights, hbar, probs, weights, mode,
                   segment_len, ...) -> (dx, dW_r, dW_g, dW_u, dW_d, d_weights)
  prompt_route(x, W_r) -> weights [B, E]              (inference: one decision per sequence)
  merge_experts(W_g, W_u, W_d, weights) -> Wbar_g, Wbar_u, Wbar_d   (the merged-FFN cache)
  decode_step(x [B, d], Wbar_g, Wbar_u, Wbar_d) -> y [B, d]   (ATen composite for now)

Layouts follow PyTorch's Linear convention: W_r [E, d], W_g, W_u [E, f, d], W_d [E, d, f];
x [B, L, d]; routing weights [B, N, E] with N = ceil(L / segment_len). Routing tensors are
float64 for float64 storage and float32 otherwise.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import Optional

import torch
from torch import nn

from . import _build

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.abspath(os.path.join(_HERE, "..", ".."))  # python/lory_torch -> repository root
MODES = ("causal", "prompt", "given")
MERGE_BACKWARD_METHODS = ("auto", "fused", "gemm")
MAX_EXPERTS = 256  # lory::kMaxExperts

__version__ = "0.0.0+unknown"
try:
    from importlib.metadata import PackageNotFoundError, version as _dist_version

    __version__ = _dist_version("lory-torch")
except Exception:  # a source tree without an installed distribution
    pass

_loaded: Optional[str] = None  # "cpu" or "cuda" once the extension is loaded


def cuda_build_wanted() -> bool:
    """Whether the development JIT build of load() compiles the CUDA sources."""
    if _build.env_on("LORY_TORCH_CPU_ONLY"):
        return False
    if _build.env_on("LORY_TORCH_FORCE_CUDA_BUILD") or os.environ.get("LORY_TORCH_PREBUILT"):
        return True
    return torch.cuda.is_available()


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("lory::moe_ffn_forward", "CUDA")


def _installed_extension() -> bool:
    return importlib.util.find_spec(__name__ + "._C") is not None


def load(verbose: bool = False) -> str:
    """Loads the extension (once) and registers the fake kernels and autograd formulas; returns
    "cuda" or "cpu" (whether the CUDA ops are there). Order: LORY_TORCH_PREBUILT, the installed
    lory_torch._C, and only in a source tree the development JIT build."""
    global _loaded
    if _loaded is not None:
        return _loaded
    prebuilt = os.environ.get("LORY_TORCH_PREBUILT")
    if prebuilt and not _build.env_on("LORY_TORCH_CPU_ONLY"):
        torch.ops.load_library(prebuilt)
    elif _installed_extension():
        try:
            importlib.import_module(__name__ + "._C")
        except ImportError as e:
            raise ImportError(f"lory_torch: the compiled extension lory_torch._C did not load ({e}). It must be "
                              f"built against the torch in use ({torch.__version__}): reinstall lory-torch with "
                              "`pip install --no-build-isolation .` from the repository") from e
    elif os.path.isdir(os.path.join(_REPO, "include", "lory")):
        _jit_build(verbose)
    else:
        raise ImportError("lory_torch: the compiled extension lory_torch._C is missing; install the package with "
                          "`pip install --no-build-isolation .` from the repository")
    _register_python_parts()
    _loaded = "cuda" if _has_cuda_kernels() else "cpu"
    return _loaded


def _jit_build(verbose: bool) -> None:
    """Development only: compiles csrc/ just in time (torch's extension cache keeps the build)."""
    from torch.utils import cpp_extension

    with_cuda = cuda_build_wanted()
    csrc = os.path.join(_HERE, "csrc")
    if with_cuda:
        _build.default_arch_list()
    build_dir = os.environ.get("LORY_TORCH_BUILD_DIR")
    if build_dir:
        build_dir = os.path.join(build_dir, "cuda" if with_cuda else "cpu")
        os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="lory_torch_cuda" if with_cuda else "lory_torch_cpu",
        sources=_build.sources(csrc, with_cuda),
        extra_include_paths=_build.include_dirs(os.path.join(_REPO, "include"), csrc, with_cuda),
        extra_cflags=_build.CFLAGS,
        extra_cuda_cflags=_build.CUDA_FLAGS,
        extra_ldflags=["-l" + lib for lib in _build.libraries(with_cuda)],
        with_cuda=with_cuda,
        is_python_module=False,
        build_directory=build_dir,
        verbose=verbose,
    )


# --------------------------------------------------------------------------- fake kernels, autograd

def _routing_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _router_rows(mode: str, B: int, N: int) -> int:
    return {"causal": B * N, "prompt": B, "given": 0}[mode]


def _check_devices(op: str, first: str, tensors: dict) -> None:
    """Every tensor of a call on one device. Checked in the fake kernels too: a call mixing the meta
    device with another would otherwise be dispatched to its fake kernel (Meta outranks CPU and
    CUDA) and return uninitialised tensors instead of an error."""
    ref = tensors[first]
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"lory::{op}: {name} is on {t.device} but {first} is on {ref.device} "
                               "(every tensor of a call on one device)")


def _register_python_parts() -> None:
    lib = "lory::"

    @torch.library.register_fake(lib + "moe_ffn_forward")
    def _fwd_fake(x, W_r, W_g, W_u, W_d, given_weights, mode, segment_len, max_chunk_segments=0,
                  workspace_budget_bytes=0, merge_backward="auto"):
        _check_devices("moe_ffn_forward", "x", dict(x=x, W_r=W_r, W_g=W_g, W_u=W_u, W_d=W_d,
                                                    given_weights=given_weights))
        B, L, d = x.shape
        E = W_g.shape[0]
        N = (L + segment_len - 1) // segment_len
        rows = _router_rows(mode, B, N)
        r = _routing_dtype(x.dtype)
        return (x.new_empty((B, L, d)), x.new_empty((rows, d), dtype=r), x.new_empty((rows, E), dtype=r),
                x.new_empty((B, N, E), dtype=r))

    @torch.library.register_fake(lib + "moe_ffn_backward")
    def _bwd_fake(dy, x, W_r, W_g, W_u, W_d, given_weights, hbar, probs, weights, mode, segment_len,
                  max_chunk_segments=0, workspace_budget_bytes=0, merge_backward="auto"):
        _check_devices("moe_ffn_backward", "x", dict(dy=dy, x=x, W_r=W_r, W_g=W_g, W_u=W_u, W_d=W_d,
                                                     given_weights=given_weights, hbar=hbar, probs=probs,
                                                     weights=weights))
        # The real kernels return contiguous tensors whatever the inputs' strides.
        dW_r = x.new_empty((0,)) if mode == "given" else W_r.new_empty(W_r.shape)
        return (x.new_empty(x.shape), dW_r, W_g.new_empty(W_g.shape), W_u.new_empty(W_u.shape),
                W_d.new_empty(W_d.shape), weights.new_empty(weights.shape))

    @torch.library.register_fake(lib + "prompt_route")
    def _route_fake(x, W_r):
        _check_devices("prompt_route", "x", dict(x=x, W_r=W_r))
        return x.new_empty((x.shape[0], W_r.shape[0]), dtype=_routing_dtype(x.dtype))

    @torch.library.register_fake(lib + "merge_experts")
    def _merge_fake(W_g, W_u, W_d, weights):
        _check_devices("merge_experts", "W_g", dict(W_g=W_g, W_u=W_u, W_d=W_d, weights=weights))
        B = weights.shape[0]
        _, f, d = W_g.shape
        return W_g.new_empty((B, f, d)), W_g.new_empty((B, f, d)), W_g.new_empty((B, d, f))

    def _setup(ctx, inputs, output):
        x, W_r, W_g, W_u, W_d, given_weights, mode, segment_len, max_chunk, budget, method = _full_inputs(inputs)
        _, hbar, probs, weights = output
        ctx.save_for_backward(x, W_r, W_g, W_u, W_d, given_weights, hbar, probs, weights)
        ctx.lory_args = (mode, segment_len, max_chunk, budget, method)
        # hbar / probs / weights are saved state, not differentiable outputs.
        ctx.mark_non_differentiable(hbar, probs, weights)

    def _backward(ctx, dy, _dhbar, _dprobs, _dweights):
        x, W_r, W_g, W_u, W_d, given_weights, hbar, probs, weights = ctx.saved_tensors
        mode, segment_len, max_chunk, budget, method = ctx.lory_args
        dx, dW_r, dW_g, dW_u, dW_d, d_weights = torch.ops.lory.moe_ffn_backward(
            dy.contiguous(), x, W_r, W_g, W_u, W_d, given_weights, hbar, probs, weights, mode, segment_len,
            max_chunk, budget, method)
        return (dx, None if mode == "given" else dW_r, dW_g, dW_u, dW_d,
                d_weights if mode == "given" else None, None, None, None, None, None)

    torch.library.register_autograd(lib + "moe_ffn_forward", _backward, setup_context=_setup)

    # Second derivatives are not implemented: the backward op gets an autograd formula that says
    # so, instead of PyTorch's default for an op without one (a warning, then zero gradients).
    def _no_double_backward(ctx, *grads):
        raise RuntimeError("lory: double backward (differentiating the gradients of moe_ffn / LoryMoEFFN, "
                           "e.g. create_graph=True then backward again) is not supported")

    torch.library.register_autograd(lib + "moe_ffn_backward", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)

    def _merge_setup(ctx, inputs, output):
        W_g, W_u, W_d, weights = inputs
        ctx.save_for_backward(W_g, W_u, W_d, weights)

    def _merge_backward(ctx, gg, gu, gd):
        # The merge is linear: dW_i = sum_b w_bi G_b, dw_bi = <W_i, G_b> (ATen; rarely on a hot path).
        W_g, W_u, W_d, weights = ctx.saved_tensors
        w = weights.to(W_g.dtype)
        grads, dw = [], torch.zeros_like(weights)
        for W, G in ((W_g, gg), (W_u, gu), (W_d, gd)):
            grads.append(torch.einsum("be,bij->eij", w, G))
            dw = dw + torch.einsum("eij,bij->be", W, G).to(weights.dtype)
        return grads[0], grads[1], grads[2], dw

    torch.library.register_autograd(lib + "merge_experts", _merge_backward, setup_context=_merge_setup)


def _full_inputs(inputs):
    """inputs of moe_ffn_forward with the schema's defaults filled in."""
    inputs = tuple(inputs)
    defaults = (0, 0, "auto")
    return inputs + defaults[len(inputs) - 8:]


# --------------------------------------------------------------------------- functional API

def moe_ffn(x: torch.Tensor, W_r: Optional[torch.Tensor], W_g: torch.Tensor, W_u: torch.Tensor,
            W_d: torch.Tensor, mode: str = "causal", segment_len: int = 256,
            routing_weights: Optional[torch.Tensor] = None, max_chunk_segments: int = 0,
            workspace_budget_bytes: int = 0, merge_backward: str = "auto") -> torch.Tensor:
    """The Lory layer on x [B, L, d] (differentiable w.r.t. x, the weights and, in "given" mode,
    routing_weights [B, N, E]).

    merge_backward: how the backward's merge backward runs on CUDA (lory::MergeBackwardMethod):
    "fused" (lory's one-pass kernel; the routing weights keep ~16 bits in dW), "gemm" (two cuBLAS
    GEMMs; the routing weights enter dW rounded to the storage dtype) or "auto" (the one measured
    faster at the shape). The CPU ops have one way and ignore it."""
    load()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if merge_backward not in MERGE_BACKWARD_METHODS:
        raise ValueError(f"merge_backward must be one of {MERGE_BACKWARD_METHODS}, got {merge_backward!r}")
    y, _, _, _ = torch.ops.lory.moe_ffn_forward(x, W_r, W_g, W_u, W_d, routing_weights, mode, segment_len,
                                                max_chunk_segments, workspace_budget_bytes, merge_backward)
    return y


def prompt_route(x: torch.Tensor, W_r: torch.Tensor) -> torch.Tensor:
    load()
    return torch.ops.lory.prompt_route(x, W_r)


def merge_experts(W_g, W_u, W_d, weights):
    load()
    return torch.ops.lory.merge_experts(W_g, W_u, W_d, weights)


def decode_step(x, Wg_bar, Wu_bar, Wd_bar):
    load()
    return torch.ops.lory.decode_step(x, Wg_bar, Wu_bar, Wd_bar)


# --------------------------------------------------------------------------- module

class LoryMoEFFN(nn.Module):
    """Segment-level SwiGLU mixture of experts (Lory), a drop-in FFN on [B, L, d] input.

    routing: "causal" (training: segment k uses the previous segment's router output, the first
    segment its own with a stop-gradient), "prompt" (one decision per sequence from the mean of
    all its tokens) or "given" (forward(x, routing_weights) with routing weights [B, N, E]).
    Experts are initialised independently, like nn.Linear (kaiming-uniform bounds 1/sqrt(fan_in)).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, routing: str = "causal",
                 segment_len: int = 256, device=None, dtype=None, max_chunk_segments: int = 0,
                 workspace_budget_bytes: int = 0, merge_backward: str = "auto"):
        super().__init__()
        for name, v, lo in (("d_model", d_model, 1), ("d_ff", d_ff, 1), ("num_experts", num_experts, 1),
                            ("segment_len", segment_len, 1), ("max_chunk_segments", max_chunk_segments, 0),
                            ("workspace_budget_bytes", workspace_budget_bytes, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"LoryMoEFFN: {name} must be an integer >= {lo}, got {v!r}")
        if num_experts > MAX_EXPERTS:
            raise ValueError(f"LoryMoEFFN: num_experts must be at most {MAX_EXPERTS}, got {num_experts}")
        if routing not in MODES:
            raise ValueError(f"LoryMoEFFN: routing must be one of {MODES}, got {routing!r}")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.routing, self.segment_len = routing, segment_len
        if merge_backward not in MERGE_BACKWARD_METHODS:
            raise ValueError(f"LoryMoEFFN: merge_backward must be one of {MERGE_BACKWARD_METHODS}, "
                             f"got {merge_backward!r}")
        self.max_chunk_segments, self.workspace_budget_bytes = max_chunk_segments, workspace_budget_bytes
        self.merge_backward = merge_backward
        self.W_r = None if routing == "given" else nn.Parameter(torch.empty(num_experts, d_model, **kw))
        self.W_g = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw))
        self.W_u = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw))
        self.W_d = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per expert.
        for W, fan_in in ((self.W_r, self.d_model), (self.W_g, self.d_model), (self.W_u, self.d_model),
                          (self.W_d, self.d_ff)):
            if W is not None:
                bound = 1.0 / math.sqrt(fan_in)
                W.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"routing={self.routing!r}, segment_len={self.segment_len}")

    def forward(self, x: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (routing_weights is not None) != (self.routing == "given"):
            raise ValueError("routing_weights are passed exactly when routing == 'given'")
        return moe_ffn(x, self.W_r, self.W_g, self.W_u, self.W_d, self.routing, self.segment_len,
                       routing_weights, self.max_chunk_segments, self.workspace_budget_bytes, self.merge_backward)

    # Inference with prompt-level routing: route once on the prompt, cache the merged FFN per
    # sequence, then decode one token per sequence at the cost of a dense FFN.
    @torch.no_grad()
    def build_cache(self, prompt: torch.Tensor):
        if self.W_r is None:
            raise ValueError("build_cache needs a router (routing != 'given')")
        return merge_experts(self.W_g, self.W_u, self.W_d, prompt_route(prompt, self.W_r))

    @torch.no_grad()
    def decode(self, x_t: torch.Tensor, cache) -> torch.Tensor:
        return decode_step(x_t, *cache)


# An installed package registers its ops on import (no build, nothing to wait for).
if _installed_extension() and not os.environ.get("LORY_TORCH_PREBUILT"):
    load()
