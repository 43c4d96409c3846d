"""Tensor parallelism for the Lory layer: each rank of a process group holds a slice of the FFN
dimension f of every expert.

Data parallel training (DistributedDataParallel) and fully sharded data parallel training
(torch.distributed.fsdp.fully_shard) need nothing from this module: LoryMoEFFN is an ordinary
nn.Module with four parameters. See docs/torch-distributed.md for all three.

Why a slice of f works: the merge is elementwise over the parameters, so slicing f before or after
merging is the same; the gate and up rows, the SwiGLU and the down columns of a slice touch only
that slice, so each rank computes a partial output and y is the sum of the partials (one
all-reduce). Routing needs x and W_r only, both replicated, so every rank computes the same
routing weights. In the backward every rank gets its slice's share of the routing-weight
gradient dL/de; the softmax backward and the router GEMMs are linear in dL/de (the
probabilities are fixed by the forward), so each rank's dW_r and its router share of dx are
partial sums as well, and summing dx and dW_r over the ranks gives exactly the one-process
gradients. Both sums happen in the backward of `copy_to_group` below, applied to x, W_r and
(routing="given") the routing weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import LoryMoEFFN, moe_ffn


class _CopyToGroup(torch.autograd.Function):
    """Identity in the forward; the backward sums the gradient over the group. For a tensor that
    is replicated on every rank and used by each rank for its share of the work."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # the incoming buffer may be shared
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Sums the ranks' partial tensors in the forward; the backward is the identity, because the
    sum is replicated and every rank goes on with the same gradient."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_group(t: Optional[torch.Tensor], group=None) -> Optional[torch.Tensor]:
    """t unchanged; its gradient summed over `group` (None passes through)."""
    return None if t is None else _CopyToGroup.apply(t, group)


def reduce_from_group(t: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of t over `group`, replicated; the gradient passes through unchanged."""
    return _ReduceFromGroup.apply(t, group)


def f_slice(d_ff: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of f: contiguous, sizes differing by at most one (the
    first d_ff % world_size ranks hold one more), like torch.tensor_split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if d_ff < world_size:
        raise ValueError(f"d_ff ({d_ff}) must be at least the group size ({world_size}): "
                         "every rank needs a non-empty slice of f")
    base, extra = divmod(d_ff, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class TensorParallelLoryMoEFFN(LoryMoEFFN):
    """LoryMoEFFN with the FFN dimension f split over a process group.

    Rank r holds rows [f_start, f_stop) of W_g and W_u ([E, f_r, d]) and the same columns of W_d
    ([E, d, f_r]); the router W_r [E, d] is replicated; d_ff is the full f. The input x (and,
    with routing="given", the routing weights) must be the same on every rank, and the output is
    the same on every rank. After backward, x.grad, W_r.grad and the routing weights' gradient
    are the full (summed) gradients on every rank, and each rank's expert gradients are those of
    its slice: no further gradient synchronisation is needed within the group.

    Communication per call: the forward all-reduces y ([B, L, d]); the backward all-reduces dx
    ([B, L, d]) and dW_r ([E, d]) (routing="given": the routing weights' gradient, [B, N, E]).

    Build it from a full layer with from_module() (every rank passes the same module), or
    directly: each rank then initialises its slice with the full layer's bounds (fan-in d for
    W_g / W_u, the full d_ff for W_d) and W_r is broadcast from the group's first rank.
    build_cache() / decode() work as in LoryMoEFFN: each rank caches the merged slices, and
    decode() sums the partial outputs.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, routing: str = "causal",
                 segment_len: int = 256, group=None, device=None, dtype=None, max_chunk_segments: int = 0,
                 workspace_budget_bytes: int = 0, merge_backward: str = "auto"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TensorParallelLoryMoEFFN needs an initialised torch.distributed process group")
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        f_start, f_stop = f_slice(d_ff, rank, world_size)
        # LoryMoEFFN sizes the expert tensors by its d_ff: give it this rank's slice, then record
        # the full d_ff (W_d's init bound, extra_repr) and initialise again with it.
        super().__init__(d_model, f_stop - f_start, num_experts, routing, segment_len, device=device, dtype=dtype,
                         max_chunk_segments=max_chunk_segments, workspace_budget_bytes=workspace_budget_bytes,
                         merge_backward=merge_backward)
        self.d_ff = d_ff
        self.group, self.rank, self.world_size = group, rank, world_size
        self.f_start, self.f_stop = f_start, f_stop
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.W_r is not None and hasattr(self, "group"):  # LoryMoEFFN.__init__ calls this before the group is set
            dist.broadcast(self.W_r.data, src=dist.get_global_rank(self.group or dist.group.WORLD, 0),
                           group=self.group)

    @classmethod
    def from_module(cls, module: LoryMoEFFN, group=None) -> "TensorParallelLoryMoEFFN":
        """This rank's share of a full LoryMoEFFN (copies; the module is left as it is). Every rank
        must pass the same weights (for example, the same seed before building the model)."""
        if not isinstance(module, LoryMoEFFN) or isinstance(module, TensorParallelLoryMoEFFN):
            raise TypeError(f"module must be a (full) lory_torch.LoryMoEFFN, got {type(module).__name__}")
        W = module.W_g
        tp = cls(module.d_model, module.d_ff, module.num_experts, module.routing, module.segment_len, group,
                 device=W.device, dtype=W.dtype, max_chunk_segments=module.max_chunk_segments,
                 workspace_budget_bytes=module.workspace_budget_bytes, merge_backward=module.merge_backward)
        s = slice(tp.f_start, tp.f_stop)
        with torch.no_grad():
            if module.W_r is not None:
                tp.W_r.copy_(module.W_r)
            tp.W_g.copy_(module.W_g[:, s, :])
            tp.W_u.copy_(module.W_u[:, s, :])
            tp.W_d.copy_(module.W_d[:, :, s])
        return tp

    def extra_repr(self) -> str:
        return super().extra_repr() + f", f slice [{self.f_start}, {self.f_stop}) of {self.world_size} ranks"

    def forward(self, x: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (routing_weights is not None) != (self.routing == "given"):
            raise ValueError("routing_weights are passed exactly when routing == 'given'")
        g = self.group
        y_partial = moe_ffn(copy_to_group(x, g), copy_to_group(self.W_r, g), self.W_g, self.W_u, self.W_d,
                            self.routing, self.segment_len, copy_to_group(routing_weights, g),
                            self.max_chunk_segments, self.workspace_budget_bytes, self.merge_backward)
        return reduce_from_group(y_partial, g)

    @torch.no_grad()
    def decode(self, x_t: torch.Tensor, cache) -> torch.Tensor:
        return reduce_from_group(super().decode(x_t, cache), self.group)
