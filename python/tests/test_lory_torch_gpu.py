"""The lory PyTorch extension on CUDA (float32 / float16 / bfloat16 storage): outputs and every
gradient against the plain PyTorch layer run in float64 on the CPU from the same rounded inputs.
Skipped (reported as skipped) without a CUDA device or with a CPU-only build."""
import pytest
import torch

import lory_torch
from lory_torch import reference as ref
from util import assert_close, make_layer, rand, reference_fn, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(lory_torch.load() != "cuda", reason="CPU-only build of the extension (no CUDA ops)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["f32", "f16", "bf16"]
# Norm-relative bounds: fp32 storage (TF32 off), fp16 / bf16 storage with fp32 accumulation.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MODES = ["causal", "prompt", "given"]
# (B, L, T, d, f, E): a short last segment, d / f not multiples of 8, one expert, many experts.
SHAPES = [
    (2, 300, 128, 64, 160, 8),
    (3, 77, 32, 37, 53, 5),
    (1, 64, 64, 48, 40, 1),
    (2, 512, 256, 128, 256, 32),
]


def lory_fn(x, W_r, W_g, W_u, W_d, mode, T, gw):
    return lory_torch.moe_ffn(x, W_r, W_g, W_u, W_d, mode, T, gw)


def to64(p):
    return {k: (v.to(torch.float64) if torch.is_tensor(v) else v) for k, v in p.items()}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_T{}_d{}_f{}_E{}".format(*s))
def test_layer_matches_reference_gpu(ext, gen, dtype, mode, shape):
    p = make_layer(gen, *shape, mode=mode, dtype=dtype)
    y, grads = run(lory_fn, p, device="cuda")
    torch.cuda.synchronize()
    y_ref, grads_ref = run(reference_fn, to64(p))
    assert y.is_cuda and y.dtype == dtype
    assert_close("y", y, y_ref, TOL[dtype])
    for name in grads_ref:
        assert grads[name].dtype == p[name].dtype
        assert_close("d" + name, grads[name], grads_ref[name], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("method", ["fused", "gemm"])
@pytest.mark.parametrize("E", [4, 32])
def test_merge_backward_methods_gpu(ext, gen, dtype, method, E):
    """Each merge-backward method by name (the tests above run "auto": the fused kernel at E <= 8
    with 16-bit storage, the cuBLAS GEMMs otherwise) against the reference."""
    p = make_layer(gen, 2, 512, 256, 64, 96, E, mode="causal", dtype=dtype)
    y, grads = run(lambda *a: lory_torch.moe_ffn(*a, merge_backward=method), p, device="cuda")
    torch.cuda.synchronize()
    y_ref, grads_ref = run(reference_fn, to64(p))
    assert_close("y", y, y_ref, TOL[dtype])
    for name in grads_ref:
        assert_close("d" + name, grads[name], grads_ref[name], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_chunked_and_side_stream_gpu(ext, gen, dtype):
    """A small workspace budget (many chunks) on a side stream gives the same result."""
    p = make_layer(gen, 2, 200, 64, 40, 72, 6, mode="causal", dtype=dtype)
    y0, g0 = run(lory_fn, p, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y1, g1 = run(lambda *a: lory_torch.moe_ffn(*a, max_chunk_segments=1), p, device="cuda")
    s.synchronize()
    assert_close("y", y1, y0, TOL[dtype] / 4)
    for name in g0:
        assert_close("d" + name, g1[name], g0[name], TOL[dtype] / 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_inference_ops_gpu(ext, gen, dtype):
    B, L, d, f, E = 3, 50, 40, 24, 8
    x, W_r = rand(gen, B, L, d, dtype=dtype), rand(gen, E, d, dtype=dtype, scale=0.3)
    W_g, W_u, W_d = (rand(gen, E, f, d, dtype=dtype, scale=0.2), rand(gen, E, f, d, dtype=dtype, scale=0.2),
                     rand(gen, E, d, f, dtype=dtype, scale=0.2))
    dev = [t.cuda() for t in (x, W_r, W_g, W_u, W_d)]
    w = lory_torch.prompt_route(dev[0], dev[1])
    assert w.dtype == torch.float32 and w.is_cuda
    w_ref = torch.softmax(x.double().mean(1) @ W_r.double().t(), -1)
    assert_close("prompt_route", w, w_ref, 1e-5)
    cache = lory_torch.merge_experts(dev[2], dev[3], dev[4], w)
    cache_ref = ref.prompt_cache(x.double(), W_r.double(), W_g.double(), W_u.double(), W_d.double())
    for name, got, want in zip(("Wg_bar", "Wu_bar", "Wd_bar"), cache, cache_ref):
        assert_close(name, got, want, TOL[dtype])
    x_t = rand(gen, B, d, dtype=dtype)
    assert_close("decode_step", lory_torch.decode_step(x_t.cuda(), *cache), ref.decode(x_t.double(), cache_ref),
                 TOL[dtype] * 2)


def test_module_gpu_bf16(ext):
    torch.manual_seed(3)
    layer = lory_torch.LoryMoEFFN(64, 96, 4, segment_len=32, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 100, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().mean().backward()
    for t in (y, x.grad, layer.W_r.grad, layer.W_g.grad, layer.W_u.grad, layer.W_d.grad):
        assert torch.isfinite(t.float()).all()


def test_opcheck_forward_gpu(ext, gen):
    p = make_layer(gen, 2, 40, 16, 24, 32, 4, mode="causal", dtype=torch.float32)
    args = (p["x"].cuda().requires_grad_(True), p["W_r"].cuda(), p["W_g"].cuda().requires_grad_(True),
            p["W_u"].cuda(), p["W_d"].cuda(), None, "causal", 16)
    torch.library.opcheck(torch.ops.lory.moe_ffn_forward.default, args)
