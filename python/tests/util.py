"""Shared helpers of the extension tests."""
import torch

from lory_torch import reference as ref


def rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_layer(gen, B, L, T, d, f, E, mode, dtype=torch.float64):
    """Random inputs of one layer call (float64 masters; the caller casts). Distinct experts."""
    N = -(-L // T)
    x = rand(gen, B, L, d)
    W_r = None if mode == "given" else rand(gen, E, d, scale=1.0 / d ** 0.5)
    W_g = rand(gen, E, f, d, scale=1.0 / d ** 0.5)
    W_u = rand(gen, E, f, d, scale=1.0 / d ** 0.5)
    W_d = rand(gen, E, d, f, scale=1.0 / f ** 0.5)
    gw = torch.softmax(rand(gen, B, N, E, scale=2.0), dim=-1) if mode == "given" else None
    dy = rand(gen, B, L, d)
    cast = (lambda t: None if t is None else t.to(dtype))
    return dict(x=cast(x), W_r=cast(W_r), W_g=cast(W_g), W_u=cast(W_u), W_d=cast(W_d),
                gw=None if gw is None else gw.to(torch.float64 if dtype == torch.float64 else torch.float32),
                dy=cast(dy), T=T, mode=mode)


def grad_inputs(p):
    """The differentiable inputs of a layer call, in a fixed order, with their names."""
    names = ["x", "W_g", "W_u", "W_d"] + (["gw"] if p["mode"] == "given" else ["W_r"])
    return names, [p[n] for n in names]


def run(fn, p, device=None):
    """y and the gradients of sum(y * dy) w.r.t. grad_inputs(p), computed by fn on copies of p."""
    names, ins = grad_inputs(p)
    q = dict(p)
    leaves = []
    for n, t in zip(names, ins):
        leaf = t.detach().clone().to(device if device else t.device).requires_grad_(True)
        q[n] = leaf
        leaves.append(leaf)
    y = fn(q["x"], q["W_r"], q["W_g"], q["W_u"], q["W_d"], p["mode"], p["T"], q["gw"])
    grads = torch.autograd.grad(y, leaves, p["dy"].to(y.device, y.dtype))
    return y.detach(), dict(zip(names, [g.detach() for g in grads]))


def reference_fn(x, W_r, W_g, W_u, W_d, mode, T, gw):
    return ref.lory_ffn(x, W_r, W_g, W_u, W_d, mode, T, gw)


def rel_error(a, b):
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(name, got, want, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nans = torch.isnan(got).sum().item()
    assert nans == 0, f"{name}: {nans} NaN elements (unwritten or invalid)"
    err = rel_error(got, want)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
