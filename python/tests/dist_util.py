"""Helpers of the distributed tests: a tiny language model with a Lory FFN, seeded data, the
one-process baseline, and the per-rank bodies run by spawned processes (gloo, loopback only)."""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import lory_torch

# Tiny shapes (CI on two shared cores): L is not a multiple of T, E = 3 does not divide by two
# ranks (FSDP2 pads the expert dimension), f = 10 splits evenly, f = 7 would not (TP tests both).
VOCAB, D, F_DIM, E, T, L = 23, 8, 10, 3, 4, 10
GLOBAL_BATCH, STEPS = 4, 3
WORLD = 2


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    raise ValueError(f"unknown optimizer {name!r}")


class Block(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.ffn = ffn

    def forward(self, h):
        return h + self.ffn(self.norm(h))


class TinyLM(nn.Module):
    """embedding -> pre-norm residual block with a causal-routed Lory FFN -> norm -> head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.block = Block(lory_torch.LoryMoEFFN(D, F_DIM, E, routing="causal", segment_len=T))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        with torch.no_grad():  # LayerNorm starts at (1, 0): make its parameters matter as well
            for n in (self.block.norm, self.norm):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.2, 0.2)

    def forward(self, tokens):
        return self.head(self.norm(self.block(self.emb(tokens))))


def make_model(seed: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def make_batches(seed: int, batch: int = GLOBAL_BATCH):
    """STEPS batches of token ids [batch, L + 1] (inputs are [:, :-1], targets [:, 1:])."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, VOCAB, (batch, L + 1), generator=g) for _ in range(STEPS)]


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train(model, seed: int, opt_name: str, rank: int = 0, shards: int = 1):
    """STEPS optimizer steps on this rank's share (rows rank / shards) of each batch; returns the
    loss of every step averaged over the shards (the full batch's loss: equal token counts)."""
    opt = make_optimizer(opt_name, model.parameters())
    per = GLOBAL_BATCH // shards
    losses = []
    for tokens in make_batches(seed):
        opt.zero_grad()
        loss = lm_loss(model, tokens[rank * per:(rank + 1) * per])
        loss.backward()
        opt.step()
        losses.append(_global_mean(loss.item()) if shards > 1 else loss.item())
    return losses


def train_single(seed: int, opt_name: str = "sgd"):
    """The baseline: one process, the full batch. Returns (losses, initial params, final params)."""
    model = make_model(seed)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = train(model, seed, opt_name)
    return losses, init, {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- process launching

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, body_name: str, args: tuple, out_dir: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        lory_torch.load()  # built by the parent already: this only loads the cached library
        # A rank stuck in a collective fails after a minute instead of hanging the test run.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        result = BODIES[body_name](rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(body_name: str, args: tuple, out_dir: str, world: int = WORLD):
    """Runs BODIES[body_name](rank, world, *args) on `world` fresh processes; returns their results."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_entry, args=(world, free_port(), body_name, args, out_dir), nprocs=world, join=True)
    except Exception as e:
        errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
        raise AssertionError(f"a rank failed: {e}\n" + "\n".join(errs)) from None
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


# --------------------------------------------------------------------------- per-rank bodies

def _global_mean(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def ddp_body(rank, world, seed, opt_name):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(seed))
    # Equal token counts per rank: DDP's gradient average is the full batch's mean gradient.
    losses = train(model, seed, opt_name, rank, world)
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.module.named_parameters()}}


def fsdp_body(rank, world, seed, opt_name, expert_dim):
    """expert_dim: the dimension fully_shard splits the [E, ., .] expert tensors along (0: the
    default, experts; 1: f for W_g / W_u, d for W_d)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = make_model(seed)
    mesh = init_device_mesh("cpu", (world,))
    placement = (lambda p: Shard(expert_dim) if p.dim() == 3 else None)
    # One unit per transformer block: all experts of the block are gathered together.
    fully_shard(model.block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh)  # the root: embedding, final norm, head
    local_expert_shape = tuple(model.block.ffn.W_g.to_local().shape)
    # Between the block's forward and its backward the experts are sharded again: the backward
    # all-gathers them a second time (the op saved the unsharded tensors, whose storage FSDP2
    # frees and refills). Gradients of this probe step are discarded.
    loss = lm_loss(model, make_batches(seed)[0][rank:rank + 1])
    w = model.block.ffn.W_g
    resharded = hasattr(w, "to_local") and tuple(w.to_local().shape) == local_expert_shape
    loss.backward()
    model.zero_grad(set_to_none=True)
    losses = train(model, seed, opt_name, rank, world)
    params = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
    return {"losses": losses, "params": params, "local_expert_shape": local_expert_shape,
            "resharded_after_forward": resharded}


def tp_layer_body(rank, world, cases):
    """For each case (dtype, routing, f, seed, B): the TP layer's output and gradients, with the
    expert gradients gathered back to full [E, f, d] / [E, d, f] tensors."""
    import torch.distributed as dist

    from lory_torch.parallel import TensorParallelLoryMoEFFN

    out = []
    for dtype, routing, f, seed, B in cases:
        torch.manual_seed(seed)
        full = lory_torch.LoryMoEFFN(D, f, E, routing=routing, segment_len=T, dtype=dtype)
        tp = TensorParallelLoryMoEFFN.from_module(full, group=None)
        x, dy, gw = layer_inputs(seed, B, dtype, routing)
        x.requires_grad_(True)
        if gw is not None:
            gw.requires_grad_(True)
        y = tp(x, gw)
        y.backward(dy)
        grads = {"x": x.grad, "W_g": _gather_f(tp.W_g.grad, 1), "W_u": _gather_f(tp.W_u.grad, 1),
                 "W_d": _gather_f(tp.W_d.grad, 2)}
        if gw is not None:
            grads["gw"] = gw.grad
        else:
            grads["W_r"] = tp.W_r.grad
        res = {"y": y.detach(), "grads": grads, "f_slice": (tp.f_start, tp.f_stop)}
        if routing != "given":  # inference: each rank caches its merged slices, decode sums them
            res["decoded"] = tp.decode(x[:, -1].detach(), tp.build_cache(x[:, :-1].detach()))
        out.append(res)
    dist.barrier()
    return out


def tp_train_body(rank, world, seed, opt_name):
    """TinyLM with its Lory FFN split over f; every rank trains on the full batch."""
    import torch.distributed as dist

    from lory_torch.parallel import TensorParallelLoryMoEFFN

    model = make_model(seed)
    model.block.ffn = TensorParallelLoryMoEFFN.from_module(model.block.ffn)
    losses = train(model, seed, opt_name)  # every rank: the full batch
    params = {}
    for k, v in model.named_parameters():
        v = v.detach()
        if k.endswith((".W_g", ".W_u")):
            v = _gather_f(v, 1)
        elif k.endswith(".W_d"):
            v = _gather_f(v, 2)
        params[k] = v.clone()
    dist.barrier()
    return {"losses": losses, "params": params}


def layer_inputs(seed: int, B: int, dtype, routing: str):
    """x [B, L, d], dy [B, L, d] and, for routing="given", routing weights [B, N, E]."""
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(B, L, D, generator=g, dtype=torch.float64).to(dtype)
    gw = None
    if routing == "given":
        N = -(-L // T)
        gw = torch.softmax(2 * torch.randn(B, N, E, generator=g, dtype=torch.float64), -1)
        gw = gw.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return x, dy, gw


def _gather_f(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenates the ranks' slices of f (sizes may differ by one) along dim."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach().clone())  # tiny tensors; gloo's all_gather wants equal sizes
    return torch.cat(parts, dim)


def plan_body(rank, world, plan):
    """Runs several bodies in one pair of processes (starting processes costs more than the
    tests): plan is a list of (key, body name, args); returns {key: result}."""
    return {key: BODIES[name](rank, world, *args) for key, name, args in plan}


BODIES = {"ddp": ddp_body, "fsdp": fsdp_body, "tp_layer": tp_layer_body, "tp_train": tp_train_body,
          "plan": plan_body}
