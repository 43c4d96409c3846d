"""Distributed training with the Lory layer on the CPU (gloo, two processes on 127.0.0.1): DDP,
FSDP2 (fully_shard) and tensor parallelism over f (lory_torch.parallel) against one process.

Tolerances: every comparison is float32 against float32 (or float64 against float64) computed in
a different order. Data parallelism regroups sums over the batch (each rank's partial gradient,
then the all-reduce) and tensor parallelism regroups sums over f (two partial outputs, then the
all-reduce), so results agree to rounding, not bitwise. The shapes are tiny (sums of at most a
few dozen terms): measured errors are mostly ~1e-6 in float32 after three steps, and ~2e-15 in
float64. The router's update is the worst case: its gradient sums terms of both signs over the
experts (it sums to zero over them), so its rounding relative to its own norm is larger; one seed
in a few dozen gave 1.3e-5 on FSDP2's router update. We compare parameter updates (final - initial),
not the parameters themselves, so a small wrong gradient cannot hide under the initial values, and
allow TOL32 = 5e-5 and TOL64 = 1e-12: a missing gradient sum or average, a router gradient taken from
one rank's share only, or a wrong slice gives errors from 4e-4 (after training) to 1.
"""
import zlib

import pytest
import torch
import torch.distributed as dist

import dist_util as du
from lory_torch.parallel import f_slice
from util import assert_close

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with the gloo backend is not available in this torch build"),
]

TOL32 = 5e-5
TOL64 = 1e-12


def _seed(session_seed: int, key: str) -> int:
    """A seed per scenario: fresh each session, reproducible with LORY_TEST_SEED."""
    return (session_seed ^ zlib.crc32(key.encode())) & ((1 << 30) - 1)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _assert_same_training(got, losses, init, final, tol):
    assert len(got["losses"]) == len(losses)
    for i, (a, b) in enumerate(zip(got["losses"], losses)):
        assert _rel(a, b) <= tol, f"loss of step {i}: {a!r} vs one process {b!r}"
    assert got["params"].keys() == final.keys()
    for name, want in final.items():
        # The update (final - initial): the part that distributed training computed.
        assert_close(f"update of {name}", got["params"][name] - init[name], want - init[name], tol)


# (dtype, routing, f, B) of the tensor-parallel layer checks: every routing mode in float64 (exact up
# to rounding), float32 with an even and an uneven split of f.
TP_CASES = [
    (torch.float64, "causal", 10, 3),
    (torch.float64, "prompt", 10, 2),
    (torch.float64, "given", 7, 2),
    (torch.float32, "causal", 10, 3),
    (torch.float32, "causal", 7, 2),
]


@pytest.fixture(scope="module")
def world(ext, session_seed, tmp_path_factory):
    """Every multi-process scenario, run once in one pair of processes: {key: (args, [rank results])}."""
    plan = [
        ("ddp", "ddp", (_seed(session_seed, "ddp"), "sgd")),
        # The optimizer runs on each rank's shards (DTensors): SGD's momentum and Adam's moments
        # are sharded too.
        ("fsdp-sgd-experts", "fsdp", (_seed(session_seed, "fsdp-sgd-experts"), "sgd", 0)),
        ("fsdp-adam-f", "fsdp", (_seed(session_seed, "fsdp-adam-f"), "adam", 1)),
        ("tp_layer", "tp_layer", ([(dtype, routing, f, _seed(session_seed, f"tp_layer{i}"), B)
                                   for i, (dtype, routing, f, B) in enumerate(TP_CASES)],)),
        ("tp_train", "tp_train", (_seed(session_seed, "tp_train"), "adam")),
    ]
    out = tmp_path_factory.mktemp("ranks")
    ranks = du.spawn("plan", (plan,), str(out))
    return {key: (args, [r[key] for r in ranks]) for key, _, args in plan}


def test_ddp_matches_one_process(world):
    (seed, opt_name), ranks = world["ddp"]
    losses, init, final = du.train_single(seed, opt_name)
    for r in ranks:
        _assert_same_training(r, losses, init, final, TOL32)


@pytest.mark.parametrize("key", ["fsdp-sgd-experts", "fsdp-adam-f"])
def test_fsdp2_matches_one_process(world, key):
    (seed, opt_name, expert_dim), ranks = world[key]
    losses, init, final = du.train_single(seed, opt_name)
    # Dim 0: E = 3 experts become 2 + 1 (FSDP2 pads the second rank's shard); dim 1: f = 10 -> 5 + 5.
    want = [(2, du.F_DIM, du.D), (1, du.F_DIM, du.D)] if expert_dim == 0 else [(du.E, 5, du.D)] * 2
    assert [r["local_expert_shape"] for r in ranks] == want
    assert all(r["resharded_after_forward"] for r in ranks)
    for r in ranks:
        _assert_same_training(r, losses, init, final, TOL32)


def test_tensor_parallel_layer_matches_one_process(world):
    (cases,), ranks = world["tp_layer"]
    for i, (dtype, routing, f, seed, B) in enumerate(cases):
        torch.manual_seed(seed)
        full = du.lory_torch.LoryMoEFFN(du.D, f, du.E, routing=routing, segment_len=du.T, dtype=dtype)
        x, dy, gw = du.layer_inputs(seed, B, dtype, routing)
        x.requires_grad_(True)
        if gw is not None:
            gw.requires_grad_(True)
        y = full(x, gw)
        y.backward(dy)
        want = {"x": x.grad, "W_g": full.W_g.grad, "W_u": full.W_u.grad, "W_d": full.W_d.grad}
        if gw is not None:
            want["gw"] = gw.grad
        else:
            want["W_r"] = full.W_r.grad
            assert want["W_r"].norm() > 0  # distinct experts: the router gradient is not zero
        tol = TOL64 if dtype == torch.float64 else TOL32
        case = f"{dtype} {routing} f={f}"
        assert [r[i]["f_slice"] for r in ranks] == [f_slice(f, k, du.WORLD) for k in range(du.WORLD)]
        decoded = None if gw is not None else full.decode(x[:, -1].detach(), full.build_cache(x[:, :-1].detach()))
        for r in ranks:  # every rank holds the full output and the full replicated gradients
            assert_close(f"{case}: y", r[i]["y"], y.detach(), tol)
            if decoded is not None:
                assert_close(f"{case}: decode", r[i]["decoded"], decoded, tol)
            assert r[i]["grads"].keys() == want.keys()
            for name, g in want.items():
                assert_close(f"{case}: d{name}", r[i]["grads"][name], g, tol)


def test_tensor_parallel_training_matches_one_process(world):
    (seed, opt_name), ranks = world["tp_train"]
    losses, init, final = du.train_single(seed, opt_name)
    for r in ranks:
        _assert_same_training(r, losses, init, final, TOL32)
    # Replicated parameters see identical gradients on every rank (the all-reduce hands every
    # rank the same sum), so they stay bitwise equal without any further synchronisation.
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name} differs between the ranks"


def test_f_slice_covers_f():
    for f in (2, 7, 10, 64):
        for world in (1, 2, 3):
            if f < world:
                continue
            bounds = [f_slice(f, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == f
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="d_ff"):
        f_slice(1, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        f_slice(8, 2, 2)


def test_tensor_parallel_needs_a_process_group(ext):
    from lory_torch.parallel import TensorParallelLoryMoEFFN

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        TensorParallelLoryMoEFFN(8, 16, 2)


def test_tensor_parallel_group_of_one_is_the_full_layer(ext, gen):
    """In this process, a gloo group of one rank: the layer holds all of f and must reproduce
    LoryMoEFFN bitwise (an all-reduce over one rank changes nothing); bad arguments are named."""
    from lory_torch.parallel import TensorParallelLoryMoEFFN

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{du.free_port()}", rank=0, world_size=1)
    try:
        seed = int(torch.randint(0, 1 << 30, (1,), generator=gen))
        torch.manual_seed(seed)
        full = du.lory_torch.LoryMoEFFN(du.D, du.F_DIM, du.E, routing="causal", segment_len=du.T)
        tp = TensorParallelLoryMoEFFN.from_module(full)
        assert (tp.f_start, tp.f_stop) == (0, du.F_DIM)
        x, dy, _ = du.layer_inputs(seed, 2, torch.float32, "causal")
        outs = []
        for layer in (full, tp):
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(dy)
            outs.append([layer(x).detach(), xi.grad] + [getattr(layer, n).grad for n in ("W_r", "W_g", "W_u", "W_d")])
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        with pytest.raises(TypeError, match="LoryMoEFFN"):
            TensorParallelLoryMoEFFN.from_module(torch.nn.Linear(4, 4))
        with pytest.raises(TypeError, match="full"):
            TensorParallelLoryMoEFFN.from_module(tp)
        with pytest.raises(ValueError, match="routing"):
            TensorParallelLoryMoEFFN(du.D, du.F_DIM, du.E, routing="topk")
        with pytest.raises(ValueError, match="routing_weights"):
            tp(x, torch.ones(2, 3, du.E))
    finally:
        dist.destroy_process_group()
