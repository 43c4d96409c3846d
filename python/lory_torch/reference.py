"""The Lory segment-level MoE FFN written plainly in PyTorch, straight from the math in docs/math.md
(Zhong et al., arXiv 2405.03133, Sec. 3.1). It is the yardstick for the extension's tests and
the baseline of bench/compare_torch.py: autograd provides every gradient.

Shapes: x [B, L, d]; W_r [E, d]; W_g, W_u [E, f, d]; W_d [E, d, f]; routing weights [B, N, E]
with N = ceil(L / T). The last segment of a sequence may be shorter than T.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def segment_means(x: torch.Tensor, segment_len: int) -> torch.Tensor:
    """hbar [B, N, d]: the mean of each segment's tokens (a short last segment averages fewer)."""
    return torch.stack([seg.mean(dim=1) for seg in x.split(segment_len, dim=1)], dim=1)


def routing_weights(x: torch.Tensor, W_r: torch.Tensor, mode: str, segment_len: int) -> torch.Tensor:
    """e [B, N, E]: the expert weights each segment merges with."""
    B, L, _ = x.shape
    N = -(-L // segment_len)
    if mode == "causal":
        p = torch.softmax(segment_means(x, segment_len) @ W_r.t(), dim=-1)  # p_k, [B, N, E]
        # Segment k uses p_{k-1}; the first segment uses its own p_1 without gradient.
        return torch.cat([p[:, :1].detach(), p[:, :-1]], dim=1)
    if mode == "prompt":
        p = torch.softmax(x.mean(dim=1) @ W_r.t(), dim=-1)  # one decision per sequence, [B, E]
        return p[:, None, :].expand(B, N, p.shape[-1])
    raise ValueError(f"mode {mode!r} has no router")


def merged_swiglu(x_seg: torch.Tensor, e: torch.Tensor, W_g, W_u, W_d) -> torch.Tensor:
    """x_seg [B, t, d] through the FFN merged with weights e [B, E]."""
    Wg = torch.einsum("be,efd->bfd", e, W_g)
    Wu = torch.einsum("be,efd->bfd", e, W_u)
    Wd = torch.einsum("be,edf->bdf", e, W_d)
    a = torch.bmm(x_seg, Wg.transpose(1, 2))
    u = torch.bmm(x_seg, Wu.transpose(1, 2))
    return torch.bmm(F.silu(a) * u, Wd.transpose(1, 2))


def lory_ffn(x: torch.Tensor, W_r: Optional[torch.Tensor], W_g: torch.Tensor, W_u: torch.Tensor,
             W_d: torch.Tensor, mode: str = "causal", segment_len: int = 256,
             given_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [B, L, d]. Routing weights are computed (and merged) in the weights' dtype."""
    e = given_weights if mode == "given" else routing_weights(x, W_r, mode, segment_len)
    e = e.to(W_g.dtype)
    ys = [merged_swiglu(seg, e[:, k], W_g, W_u, W_d) for k, seg in enumerate(x.split(segment_len, dim=1))]
    return torch.cat(ys, dim=1)


def prompt_cache(prompt: torch.Tensor, W_r, W_g, W_u, W_d):
    """Inference: one routing decision per sequence, merged FFN cached per sequence."""
    e = torch.softmax(prompt.mean(dim=1) @ W_r.t(), dim=-1).to(W_g.dtype)
    return (torch.einsum("be,efd->bfd", e, W_g), torch.einsum("be,efd->bfd", e, W_u),
            torch.einsum("be,edf->bdf", e, W_d))


def decode(x_t: torch.Tensor, cache) -> torch.Tensor:
    """One token per sequence, x_t [B, d], through its cached merged FFN."""
    Wg, Wu, Wd = cache
    a = torch.bmm(Wg, x_t[:, :, None])
    u = torch.bmm(Wu, x_t[:, :, None])
    return torch.bmm(Wd, F.silu(a) * u)[:, :, 0]
