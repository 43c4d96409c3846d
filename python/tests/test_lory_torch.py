"""The lory PyTorch extension on the CPU: outputs and every gradient against the plain PyTorch
layer (reference.py) under autograd, gradcheck, opcheck, the inference ops and the module."""
import importlib
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import lory_torch
from lory_torch import reference as ref
from util import assert_close, make_layer, rand, reference_fn, run

MODES = ["causal", "prompt", "given"]
# (B, L, T, d, f, E): L not a multiple of T, L < T, one expert, d / f not multiples of 8,
# one segment per sequence, and an even shape.
SHAPES = [
    (2, 37, 8, 5, 7, 3),
    (3, 5, 8, 9, 3, 4),
    (1, 16, 16, 4, 6, 1),
    (2, 33, 4, 11, 13, 1),
    (2, 24, 8, 8, 16, 2),
]
TOL = {torch.float64: 1e-10, torch.float32: 3e-5}


def lory_fn(**kw):
    def fn(x, W_r, W_g, W_u, W_d, mode, T, gw):
        return lory_torch.moe_ffn(x, W_r, W_g, W_u, W_d, mode, T, gw, **kw)
    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_T{}_d{}_f{}_E{}".format(*s))
def test_layer_matches_reference(ext, gen, dtype, mode, shape):
    p = make_layer(gen, *shape, mode=mode, dtype=dtype)
    y, grads = run(lory_fn(), p)
    # The reference in float64 from the same (rounded) inputs.
    p64 = {k: (v.to(torch.float64) if torch.is_tensor(v) else v) for k, v in p.items()}
    y_ref, grads_ref = run(reference_fn, p64)
    assert y.dtype == dtype
    assert_close("y", y, y_ref, TOL[dtype])
    for name in grads_ref:
        assert grads[name].dtype == p[name].dtype
        assert_close("d" + name, grads[name], grads_ref[name], TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_saved_routing_tensors(ext, gen, mode):
    B, L, T, d, f, E = 2, 21, 8, 6, 5, 3
    p = make_layer(gen, B, L, T, d, f, E, mode=mode)
    y, hbar, probs, weights = torch.ops.lory.moe_ffn_forward(p["x"], p["W_r"], p["W_g"], p["W_u"], p["W_d"],
                                                            p["gw"], mode, T)
    N = 3
    assert weights.shape == (B, N, E)
    if mode == "given":
        assert hbar.shape == (0, d) and probs.shape == (0, E)
        assert torch.equal(weights, p["gw"])
        return
    assert_close("weights", weights, ref.routing_weights(p["x"], p["W_r"], mode, T), 1e-12)
    if mode == "causal":
        assert_close("hbar", hbar, ref.segment_means(p["x"], T).reshape(B * N, d), 1e-12)
        assert_close("probs[k]", probs.reshape(B, N, E)[:, :-1], weights[:, 1:], 1e-15)
    else:
        assert_close("hbar", hbar, p["x"].mean(dim=1), 1e-12)
        assert_close("probs", probs, weights[:, 0], 1e-15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_plan_matches_unchunked(ext, gen, mode, chunk):
    """The float32 CPU plan cut into chunks of segments gives the one-chunk result."""
    p = make_layer(gen, 2, 29, 4, 6, 9, 3, mode=mode, dtype=torch.float32)
    y0, g0 = run(lory_fn(), p)
    y1, g1 = run(lory_fn(max_chunk_segments=chunk), p)
    assert_close("y", y1, y0, 1e-6)
    for name in g0:
        assert_close("d" + name, g1[name], g0[name], 1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("budget", [60_000, 12_000], ids=["slices", "slices_and_chunks"])
def test_sliced_plan_matches_unsliced(ext, gen, mode, budget):
    """A budget below one chunk of all segments unsliced (about 181 kB here) splits f into slices
    (60 kB: all 8 segments, slices of 16 of f = 64) and, lower, the segments into chunks too
    (12 kB: one segment per chunk): the unlimited result to float32 summation order."""
    p = make_layer(gen, 2, 32, 8, 16, 64, 4, mode=mode, dtype=torch.float32)
    y0, g0 = run(lory_fn(), p)
    y1, g1 = run(lory_fn(workspace_budget_bytes=budget), p)
    assert_close("y", y1, y0, 1e-5)
    for name in g0:
        assert_close("d" + name, g1[name], g0[name], 1e-5)


@pytest.mark.parametrize("method", ["fused", "gemm"])
def test_merge_backward_method_is_the_gpus_choice(ext, gen, method):
    """merge_backward picks how CUDA runs the merge backward; the CPU ops have one way, so every
    method gives the "auto" result bit for bit, and the module carries the choice."""
    p = make_layer(gen, 2, 29, 4, 6, 9, 3, mode="causal", dtype=torch.float32)
    y0, g0 = run(lory_fn(), p)
    y1, g1 = run(lory_fn(merge_backward=method), p)
    assert torch.equal(y1, y0)
    for name in g0:
        assert torch.equal(g1[name], g0[name])
    m = lory_torch.LoryMoEFFN(6, 9, 3, segment_len=4, merge_backward=method)
    assert m.merge_backward == method


def test_workspace_budget_too_small_is_an_error(ext, gen):
    p = make_layer(gen, 1, 8, 4, 4, 4, 2, mode="causal", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="workspace too small"):
        lory_torch.moe_ffn(p["x"], p["W_r"], p["W_g"], p["W_u"], p["W_d"], "causal", 4, workspace_budget_bytes=64)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(ext, gen, mode):
    p = make_layer(gen, 2, 7, 3, 3, 4, 2, mode=mode)
    names = ["x", "W_g", "W_u", "W_d"] + (["gw"] if mode == "given" else ["W_r"])
    ins = [p[n].clone().requires_grad_(True) for n in names]

    def fn(*args):
        q = dict(zip(names, args))
        y = lory_torch.moe_ffn(q["x"], q.get("W_r"), q["W_g"], q["W_u"], q["W_d"], mode, 3, q.get("gw"))
        # Causal: the first segment's use of its own router output is stop-gradient by design, so
        # finite differences of its outputs differ from the gradient. Later segments carry the
        # router path (segment k uses p_{k-1}) and must match exactly.
        return y[:, 3:] if mode == "causal" else y

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7, rtol=1e-5)
    if mode == "causal":  # every output, w.r.t. the expert weights (routing does not depend on them)
        def experts_only(W_g, W_u, W_d):
            return lory_torch.moe_ffn(p["x"], p["W_r"], W_g, W_u, W_d, mode, 3)
        assert torch.autograd.gradcheck(experts_only, ins[1:4], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_causal_first_segment_is_stop_gradient(ext, gen):
    """Gradients of the first segment's outputs reach the router only through nothing: dW_r = 0."""
    p = make_layer(gen, 2, 12, 4, 5, 6, 3, mode="causal")
    W_r = p["W_r"].clone().requires_grad_(True)
    y = lory_torch.moe_ffn(p["x"], W_r, p["W_g"], p["W_u"], p["W_d"], "causal", 4)
    (g_first,) = torch.autograd.grad(y[:, :4].sum(), W_r)
    assert torch.count_nonzero(g_first).item() == 0
    (g_second,) = torch.autograd.grad(lory_torch.moe_ffn(p["x"], W_r, p["W_g"], p["W_u"], p["W_d"], "causal", 4)
                                      [:, 4:8].sum(), W_r)
    assert g_second.abs().max().item() > 0


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_forward(ext, gen, mode):
    p = make_layer(gen, 2, 9, 4, 5, 6, 3, mode=mode)
    args = (p["x"].requires_grad_(True), p["W_r"], p["W_g"].requires_grad_(True), p["W_u"], p["W_d"],
            p["gw"], mode, 4)
    torch.library.opcheck(torch.ops.lory.moe_ffn_forward.default, args)
    torch.library.opcheck(torch.ops.lory.moe_ffn_forward.default, args + (0, 0, "gemm"))


def test_opcheck_inference_ops(ext, gen):
    x, W_r = rand(gen, 3, 10, 6), rand(gen, 4, 6)
    W_g, W_u, W_d = rand(gen, 4, 5, 6), rand(gen, 4, 5, 6), rand(gen, 4, 6, 5)
    torch.library.opcheck(torch.ops.lory.prompt_route.default, (x, W_r))
    w = torch.softmax(rand(gen, 3, 4), dim=-1)
    torch.library.opcheck(torch.ops.lory.merge_experts.default, (W_g.requires_grad_(True), W_u, W_d, w))
    torch.library.opcheck(torch.ops.lory.decode_step.default, (x[:, 0], W_g[:3], W_u[:3], W_d[:3]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_inference_ops_match_reference(ext, gen, dtype):
    B, L, d, f, E = 3, 11, 7, 5, 4
    x, W_r = rand(gen, B, L, d, dtype=dtype), rand(gen, E, d, dtype=dtype)
    W_g, W_u, W_d = rand(gen, E, f, d, dtype=dtype), rand(gen, E, f, d, dtype=dtype), rand(gen, E, d, f, dtype=dtype)
    tol = TOL[dtype]
    w = lory_torch.prompt_route(x, W_r)
    assert w.shape == (B, E) and w.dtype == dtype
    assert_close("prompt_route", w, torch.softmax(x.double().mean(1) @ W_r.double().t(), -1), tol)
    cache = lory_torch.merge_experts(W_g, W_u, W_d, w)
    cache_ref = ref.prompt_cache(x.double(), W_r.double(), W_g.double(), W_u.double(), W_d.double())
    for name, got, want in zip(("Wg_bar", "Wu_bar", "Wd_bar"), cache, cache_ref):
        assert_close(name, got, want, tol)
    x_t = rand(gen, B, d, dtype=dtype)
    assert_close("decode_step", lory_torch.decode_step(x_t, *cache), ref.decode(x_t.double(), cache_ref), tol)


def test_decode_reproduces_prompt_routed_layer(ext, gen):
    """Prompt-level routing + merged cache + decode steps = the layer in "prompt" mode, token by token."""
    layer = lory_torch.LoryMoEFFN(6, 10, 3, routing="prompt", segment_len=4, dtype=torch.float64)
    x = rand(gen, 2, 9, 6)
    with torch.no_grad():
        y = layer(x)
    cache = layer.build_cache(x)
    for t in range(x.shape[1]):
        assert_close(f"token {t}", layer.decode(x[:, t], cache), y[:, t], 1e-12)


def test_merge_experts_autograd(ext, gen):
    W = [rand(gen, 3, 4, 5).requires_grad_(True), rand(gen, 3, 4, 5).requires_grad_(True),
         rand(gen, 3, 5, 4).requires_grad_(True)]
    w = torch.softmax(rand(gen, 2, 3), -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: lory_torch.merge_experts(*a), (*W, w))


def test_module_layout_and_init(ext):
    torch.manual_seed(1)
    d, f, E = 24, 40, 4
    layer = lory_torch.LoryMoEFFN(d, f, E, dtype=torch.float64)
    assert layer.W_r.shape == (E, d) and layer.W_g.shape == (E, f, d)
    assert layer.W_u.shape == (E, f, d) and layer.W_d.shape == (E, d, f)
    assert layer.segment_len == 256
    for W, fan_in in ((layer.W_r, d), (layer.W_g, d), (layer.W_u, d), (layer.W_d, f)):
        bound = 1.0 / math.sqrt(fan_in)
        assert W.abs().max().item() <= bound
        assert W.abs().max().item() > 0.8 * bound  # the whole range is used
        # Experts differ (identical experts would make the router gradient vanish).
        assert (W[0] - W[-1]).abs().max().item() > 0
    assert lory_torch.LoryMoEFFN(d, f, E, routing="given").W_r is None
    with pytest.raises(ValueError):
        lory_torch.LoryMoEFFN(d, f, E, routing="topk")


class _RMSNorm(torch.nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Block(torch.nn.Module):
    """A LLaMA-style pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, d, heads, ffn, dtype):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _RMSNorm(d, dtype), _RMSNorm(d, dtype)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False, dtype=dtype)
        self.proj = torch.nn.Linear(d, d, bias=False, dtype=dtype)
        self.ffn = ffn

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, d)
        h = x + self.proj(a)
        return h + self.ffn(self.norm2(h))


class _ReferenceFFN(torch.nn.Module):
    def __init__(self, lory_layer):
        super().__init__()
        self.inner = lory_layer

    def forward(self, x):
        m = self.inner
        return ref.lory_ffn(x, m.W_r, m.W_g, m.W_u, m.W_d, m.routing, m.segment_len)


def test_module_as_ffn_of_a_llama_block(ext, gen):
    torch.manual_seed(2)
    ffn = lory_torch.LoryMoEFFN(16, 28, 4, routing="causal", segment_len=8, dtype=torch.float64)
    block = _Block(16, 2, ffn, torch.float64)
    x = rand(gen, 2, 27, 16)
    loss = block(x).square().sum()
    grads = torch.autograd.grad(loss, list(block.parameters()))
    block.ffn = _ReferenceFFN(ffn)
    loss_ref = block(x).square().sum()
    grads_ref = torch.autograd.grad(loss_ref, list(block.parameters()))
    assert abs(loss.item() - loss_ref.item()) <= 1e-10 * abs(loss_ref.item())
    names = [n for n, _ in block.named_parameters()]
    for n, g, g_ref in zip(names, grads, grads_ref):
        assert_close(n, g, g_ref, 1e-10)


def test_errors(ext, gen):
    p = make_layer(gen, 2, 8, 4, 4, 6, 3, mode="causal")
    args = (p["W_g"], p["W_u"], p["W_d"])
    with pytest.raises(RuntimeError, match="float64 or float32"):
        lory_torch.moe_ffn(p["x"].half(), p["W_r"].half(), *(a.half() for a in args))
    with pytest.raises(RuntimeError, match="W_u has shape"):
        lory_torch.moe_ffn(p["x"], p["W_r"], p["W_g"], p["W_u"][:, :-1], p["W_d"])
    with pytest.raises(RuntimeError, match="dtype"):
        lory_torch.moe_ffn(p["x"], p["W_r"].float(), *args)
    with pytest.raises(RuntimeError, match="needs given_weights"):
        lory_torch.moe_ffn(p["x"], None, *args, mode="given")
    with pytest.raises(RuntimeError, match="needs the router weight"):
        lory_torch.moe_ffn(p["x"], None, *args, mode="causal")
    with pytest.raises(RuntimeError, match="given_weights has shape"):
        lory_torch.moe_ffn(p["x"], None, *args, mode="given", segment_len=4,
                           routing_weights=torch.full((2, 3, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        lory_torch.moe_ffn(p["x"], p["W_r"], *args, mode="topk")
    with pytest.raises(RuntimeError, match="routing mode"):
        torch.ops.lory.moe_ffn_forward(p["x"], p["W_r"], *args, None, "topk", 4)
    with pytest.raises(RuntimeError, match="segment_len"):
        lory_torch.moe_ffn(p["x"], p["W_r"], *args, segment_len=0)
    with pytest.raises(ValueError, match="merge_backward"):
        lory_torch.moe_ffn(p["x"], p["W_r"], *args, merge_backward="fast")
    with pytest.raises(ValueError, match="merge_backward"):
        lory_torch.LoryMoEFFN(4, 6, 3, merge_backward="fast")
    with pytest.raises(RuntimeError, match="merge_backward"):
        torch.ops.lory.moe_ffn_forward(p["x"], p["W_r"], *args, None, "causal", 4, 0, 0, "fast")


@pytest.mark.skipif(os.environ.get("LORY_TORCH_FROM_SOURCE", "") not in ("", "0"),
                    reason="testing the source tree (LORY_TORCH_FROM_SOURCE=1)")
def test_the_installed_package_is_tested(ext):
    """The tests import the installed package (its compiled lory_torch._C), not python/ in the clone."""
    repo_python = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
    pkg = os.path.realpath(os.path.dirname(lory_torch.__file__))
    assert not pkg.startswith(repo_python + os.sep), f"lory_torch imported from the source tree: {pkg}"
    assert "site-packages" in pkg or "dist-packages" in pkg, pkg
    importlib.import_module("lory_torch._C")  # the ahead-of-time build, no JIT
    assert lory_torch.__version__ == ".".join(
        re.search(rf"#define LORY_VERSION_{k}\s+(\d+)", _version_header()).group(1) for k in ("MAJOR", "MINOR", "PATCH"))


def _version_header():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "include", "lory", "version.hpp")) as f:
        return f.read()


# --------------------------------------------------------------------------- errors, double backward

def test_errors_name_the_argument_at_fault(ext, gen):
    """Sizes and dtype come from the expert weights, so a bad x is reported as x's problem."""
    p = make_layer(gen, 2, 8, 4, 6, 5, 3, mode="causal")
    W = (p["W_r"], p["W_g"], p["W_u"], p["W_d"])
    with pytest.raises(RuntimeError, match=r"^lory: x has dtype Float, expected Double \(from the dtype of W_g\)"):
        lory_torch.moe_ffn(p["x"].float(), *W, segment_len=4)
    with pytest.raises(RuntimeError, match=r"^lory: x must be \[B, L, d\] with d = 6 .*got \[2, 8, 7\]"):
        lory_torch.moe_ffn(rand(gen, 2, 8, 7), *W, segment_len=4)
    with pytest.raises(RuntimeError, match=r"^lory: x must be \[B, L, d\]"):
        lory_torch.moe_ffn(p["x"][0], *W, segment_len=4)
    with pytest.raises(RuntimeError, match=r"^lory: x must have B, L > 0"):
        lory_torch.moe_ffn(p["x"][:, :0], *W, segment_len=4)
    with pytest.raises(RuntimeError, match=r"^lory: W_r has shape \[3, 5\], expected \[3, 6\]"):
        lory_torch.moe_ffn(p["x"], p["W_r"][:, :5], *W[1:], segment_len=4)
    with pytest.raises(RuntimeError, match=r"^lory: W_d has dtype Float"):
        lory_torch.moe_ffn(p["x"], *W[:3], p["W_d"].float(), segment_len=4)
    with pytest.raises(RuntimeError, match=r"expert count \(W_g.size\(0\)\)"):
        lory_torch.moe_ffn(p["x"], p["W_r"][:0], p["W_g"][:0], p["W_u"][:0], p["W_d"][:0], segment_len=4)
    with pytest.raises(RuntimeError, match=r"^lory: x has dtype Double, expected Float \(from the dtype of W_r\)"):
        lory_torch.prompt_route(p["x"], p["W_r"].float())


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=0), "d_model must be an integer >= 1, got 0"),
    (dict(d_ff=0), "d_ff must be an integer >= 1, got 0"),
    (dict(num_experts=0), "num_experts must be an integer >= 1, got 0"),
    (dict(num_experts=257), "num_experts must be at most 256"),
    (dict(segment_len=0), "segment_len must be an integer >= 1, got 0"),
    (dict(segment_len=-4), "segment_len must be an integer >= 1, got -4"),
    (dict(d_model=8.0), "d_model must be an integer"),
    (dict(routing="top2"), "routing must be one of"),
    (dict(max_chunk_segments=-1), "max_chunk_segments must be an integer >= 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_module_refuses_bad_construction_arguments(kw, match):
    args = dict(d_model=8, d_ff=12, num_experts=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        lory_torch.LoryMoEFFN(**args)


@pytest.mark.parametrize("where", ["weights", "x"])
def test_meta_and_cpu_tensors_in_one_call_are_refused(ext, gen, where):
    """Meta outranks CPU in dispatch: without the check the fake kernel would answer with uninitialised
    tensors. The error names both devices."""
    layer = lory_torch.LoryMoEFFN(8, 12, 3, segment_len=4, device="meta" if where == "weights" else "cpu")
    x = rand(gen, 2, 9, 8, dtype=torch.float32).to("cpu" if where == "weights" else "meta")
    first = "on meta but x is on cpu" if where == "weights" else "on cpu but x is on meta"
    with pytest.raises(RuntimeError, match=r"lory::moe_ffn_forward: W_r is " + first):
        layer(x)
    W_d_elsewhere = rand(gen, 3, 8, 12, dtype=torch.float32).to("cpu" if where == "weights" else "meta")
    with pytest.raises(RuntimeError, match=r"merge_experts: W_d is on (cpu|meta) but W_g is on (meta|cpu)"):
        lory_torch.merge_experts(layer.W_g, layer.W_u, W_d_elsewhere, torch.full((2, 3), 1 / 3).to(layer.W_g.device))


def test_double_backward_raises(ext, gen):
    """First derivatives with create_graph=True are right; differentiating them again is refused."""
    p = make_layer(gen, 2, 9, 4, 5, 6, 3, mode="causal")
    x = p["x"].clone().requires_grad_(True)
    y = lory_torch.moe_ffn(x, p["W_r"], p["W_g"], p["W_u"], p["W_d"], "causal", 4)
    (gx,) = torch.autograd.grad(y, x, p["dy"], create_graph=True)
    x_ref = p["x"].clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(ref.lory_ffn(x_ref, p["W_r"], p["W_g"], p["W_u"], p["W_d"], "causal", 4), x_ref,
                                    p["dy"])
    assert_close("dx (create_graph)", gx, gx_ref, 1e-10)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        gx.square().sum().backward()


# --------------------------------------------------------------------------- fake kernels, torch.compile

@pytest.mark.parametrize("mode", MODES)
def test_opcheck_backward_and_strided_inputs(ext, gen, mode):
    p = make_layer(gen, 2, 9, 4, 5, 6, 3, mode=mode, dtype=torch.float32)
    x_strided = rand(gen, 9, 2, 5, dtype=torch.float32).transpose(0, 1)  # non-contiguous x
    fwd = (x_strided, p["W_r"], p["W_g"], p["W_u"], p["W_d"], p["gw"], mode, 4)
    torch.library.opcheck(torch.ops.lory.moe_ffn_forward.default, fwd)
    _, hbar, probs, weights = torch.ops.lory.moe_ffn_forward(*fwd)
    dy = rand(gen, 2, 9, 5, dtype=torch.float32)
    torch.library.opcheck(torch.ops.lory.moe_ffn_backward.default,
                          (dy, *fwd[:6], hbar, probs, weights, mode, 4))


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab, d, f, E, T):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.ffn1 = lory_torch.LoryMoEFFN(d, f, E, routing="causal", segment_len=T)
        self.ffn2 = lory_torch.LoryMoEFFN(d, f, E, routing="causal", segment_len=T)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.ffn1(F.layer_norm(h, h.shape[-1:]))
        h = h + self.ffn2(F.layer_norm(h, h.shape[-1:]))
        return self.out(h)


def test_torch_compile_fullgraph_trains_like_eager(ext, gen):
    """A model with two Lory layers compiles without graph breaks and trains: the loss falls and
    every step's loss matches eager mode's to float32 rounding."""
    torch._dynamo.reset()
    vocab, B, L = 32, 2, 24
    tokens = torch.randint(0, vocab, (B, L + 1), generator=gen)
    torch.manual_seed(3)
    eager = _TinyLM(vocab, 16, 24, 4, 8)
    compiled = _TinyLM(vocab, 16, 24, 4, 8)
    compiled.load_state_dict(eager.state_dict())
    step = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        fwd = torch.compile(model, fullgraph=True) if name == "compiled" else model
        losses = []
        for _ in range(5):
            loss = F.cross_entropy(fwd(tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        step[name] = losses
    assert step["eager"][-1] < 0.9 * step["eager"][0], step["eager"]
    for i, (le, lc) in enumerate(zip(step["eager"], step["compiled"])):
        assert abs(le - lc) <= 1e-5 * abs(le), f"step {i}: eager {le} vs compiled {lc}"
