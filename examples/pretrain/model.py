"""A small decoder-only transformer whose FFN is Lory's segment-level MoE (lory_torch.LoryMoEFFN)
or, for the dense baseline, a SwiGLU FFN of the same active size (one expert's worth).

Pre-norm blocks (RMSNorm), rotary position embeddings, causal attention through
scaled_dot_product_attention, tied input / output embeddings. `generate` is the inference path:
prompt-level routing (one routing decision per sequence and MoE layer from the prompt, the experts
merged once), then token-by-token decoding with a KV cache in which every MoE layer costs a dense
FFN (LoryMoEFFN.build_cache / decode).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import lory_torch


@dataclass
class ModelConfig:
    vocab_size: int = 258
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 344            # SwiGLU hidden size of the dense FFN and of every expert
    num_experts: int = 0       # 0: dense model
    moe_every: int = 1         # MoE FFN in every `moe_every`-th layer (1: all, 2: every other)
    segment_len: int = 64      # Lory's T
    max_len: int = 512         # training context L

    def to_dict(self) -> dict:
        return asdict(self)


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate = nn.Linear(d, f, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LoryFFN(nn.Module):
    """LoryMoEFFN plus what this example measures: with `record` set, forward keeps the routing
    weights each segment used ([B, N, E], from the layer's op) in `last_weights`."""

    def __init__(self, d: int, f: int, num_experts: int, segment_len: int):
        super().__init__()
        self.moe = lory_torch.LoryMoEFFN(d, f, num_experts, routing="causal", segment_len=segment_len)
        self.record = False
        self.last_weights = None

    def forward(self, x):
        m = self.moe
        if self.record and m.routing == "causal":
            with torch.no_grad():
                y, _, _, w = torch.ops.lory.moe_ffn_forward(x, m.W_r, m.W_g, m.W_u, m.W_d, None, "causal",
                                                            m.segment_len)
            self.last_weights = w
            return y
        return m(x)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _rope(x, cos, sin):
    # x [B, H, L, Dh]; rotate pairs (first half, second half)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ffn = LoryFFN(d, cfg.d_ff, cfg.num_experts, cfg.segment_len) if moe else SwiGLU(d, cfg.d_ff)

    def _attn(self, x, cos, sin, kv=None):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if kv is not None:  # decoding: append to the cache
            if kv[0] is not None:
                k, v = torch.cat([kv[0], k], 2), torch.cat([kv[1], v], 2)
            kv[0], kv[1] = k, v
        o = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        return self.proj(o.transpose(1, 2).reshape(B, L, d))

    def forward(self, x, cos, sin):
        x = x + self._attn(self.norm1(x), cos, sin)
        return x + self.ffn(self.norm2(x))


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        moe = cfg.num_experts > 0
        self.blocks = nn.ModuleList(Block(cfg, moe and (i % cfg.moe_every == cfg.moe_every - 1))
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.apply(self._init)
        # Experts start like the dense FFN (each expert drawn independently), so the runs differ in
        # the FFN's structure only, not in the scale of its initial weights.
        for f in self.lory_layers():
            for W in (f.moe.W_r, f.moe.W_g, f.moe.W_u, f.moe.W_d):
                nn.init.normal_(W, std=0.02)
        # GPT-2's scaled init of the residual projections (attention's, the FFN's down projection).
        for n, p in self.named_parameters():
            if n.endswith(("proj.weight", "down.weight", "moe.W_d")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        dh = cfg.d_model // cfg.n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, dh // 2, dtype=torch.float32) / (dh // 2)))
        ang = torch.outer(torch.arange(4 * cfg.max_len, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def lory_layers(self) -> list[LoryFFN]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, LoryFFN)]

    def forward(self, idx):
        L = idx.shape[1]
        cos, sin = self.cos[:L], self.sin[:L]
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, cos, sin)
        return F.linear(self.norm(x), self.emb.weight)

    def param_counts(self) -> tuple[int, int]:
        """(total parameters, parameters active per token: one expert's worth per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for f in self.lory_layers():
            E = f.moe.num_experts
            inactive += (E - 1) * (f.moe.W_g[0].numel() + f.moe.W_u[0].numel() + f.moe.W_d[0].numel())
        return total, total - inactive

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, temperature: float = 0.7, top_k: int = 20,
                 generator=None, stop_id=None) -> torch.Tensor:
        """prompt [B, P] -> [B, n_new] sampled tokens. MoE layers route once per sequence on the
        prompt (prompt-level routing) and decode with the merged FFN they cached."""
        B, P = prompt.shape
        kvs = [[None, None] for _ in self.blocks]
        caches = [None] * len(self.blocks)
        x = self.emb(prompt)
        cos, sin = self.cos[:P], self.sin[:P]
        for i, b in enumerate(self.blocks):
            x = x + b._attn(b.norm1(x), cos, sin, kvs[i])
            h = b.norm2(x)
            if isinstance(b.ffn, LoryFFN):
                m = b.ffn.moe
                caches[i] = m.build_cache(h)      # prompt_route + merge_experts, kept for decoding
                # The prompt's own outputs: the same single routing decision per sequence.
                x = x + lory_torch.moe_ffn(h, m.W_r, m.W_g, m.W_u, m.W_d, mode="prompt", segment_len=m.segment_len)
            else:
                x = x + b.ffn(h)
        out = []
        logits = F.linear(self.norm(x[:, -1]), self.emb.weight)
        pos = P
        for _ in range(n_new):
            logits = logits / max(temperature, 1e-6)
            if top_k:
                v, _ = torch.topk(logits, top_k)
                logits = logits.masked_fill(logits < v[:, -1:], -math.inf)
            tok = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)  # [B, 1]
            out.append(tok)
            x = self.emb(tok)
            cos, sin = self.cos[pos:pos + 1], self.sin[pos:pos + 1]
            for i, b in enumerate(self.blocks):
                x = x + b._attn(b.norm1(x), cos, sin, kvs[i])
                h = b.norm2(x)
                if caches[i] is not None:
                    x = x + b.ffn.moe.decode(h[:, 0], caches[i]).unsqueeze(1)
                else:
                    x = x + b.ffn(h)
            logits = F.linear(self.norm(x[:, -1]), self.emb.weight)
            pos += 1
        return torch.cat(out, 1)
