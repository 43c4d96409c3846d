#!/usr/bin/env python3
"""lory's PyTorch extension vs the plain PyTorch Lory layer (python/lory_torch/reference.py), bf16
on CUDA, in one run: forward and forward+backward times (CUDA events, median) and peak memory
(torch.cuda.max_memory_allocated above the inputs and parameters), printed as a markdown table.
With --device cpu: float32 on the CPU, forward and forward+backward wall times (median of
interleaved runs) of both layers and their ratio, at the shapes of --cpu-shapes.

    python3 bench/compare_torch.py                       # paper shapes, B=8, L=4096
    python3 bench/compare_torch.py --batch 2 --seq-len 1024 --iters 5   # a quick look
    python3 bench/compare_torch.py --lory-budget-mb 1024,0               # one lory row per budget

lory's workspace budget trades memory for time: a smaller budget processes the segments in more
chunks, and every chunk reads all experts' weights again (merge, recomputed merge, merge backward).

    python3 bench/compare_torch.py --device cpu --threads 2               # CPU, two shapes

Uses the installed lory_torch (pip install --no-build-isolation .), else the source tree's.
Exits 0 with "skipped: no CUDA" on a machine without a GPU (CUDA mode).
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import lory_torch  # noqa: F401  the installed package
except ImportError:
    sys.path.insert(0, os.path.join(HERE, "..", "python"))  # a source tree: JIT build

SHAPES = [(1536, 4096, 32), (1024, 2816, 32)]  # (d, f, E): the paper's 1.5B / 0.3B models, 32 experts
# (d, f, E, B, L, T): a small layer, and a small LM's.
CPU_SHAPES = [(256, 688, 8, 4, 1024, 128), (128, 344, 4, 8, 512, 64)]


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def peak_extra_bytes(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                    help="comma-separated dxfxE, default %(default)s")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--lory-budget-mb", default="1024,2048,0",
                    help="comma-separated workspace budgets of lory's layer in MiB (0: one chunk of all "
                         "segments), default %(default)s")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0: torch's default)")
    ap.add_argument("--cpu-shapes", default=",".join("x".join(map(str, s)) for s in CPU_SHAPES),
                    help="CPU: comma-separated dxfxExBxLxT, default %(default)s")
    args = ap.parse_args()
    if args.device == "cpu":
        return main_cpu(args)
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0

    import lory_torch
    from lory_torch import reference as ref

    lory_torch.load()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev, dt = "cuda", torch.bfloat16
    B, L, T = args.batch, args.seq_len, args.segment_len
    budgets = [int(b) for b in args.lory_budget_mb.split(",")]
    print(f"# lory vs plain PyTorch, bf16, B={B}, L={L}, T={T}, causal routing, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lory workspace budgets {budgets} MiB\n")
    rows = []
    for spec in args.shapes.split(","):
        d, f, E = map(int, spec.split("x"))
        torch.manual_seed(0)
        layer = lory_torch.LoryMoEFFN(d, f, E, routing="causal", segment_len=T, device=dev, dtype=dt)
        x = torch.randn(B, L, d, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(B, L, d, device=dev, dtype=dt)
        def lory_with(mb):
            def run():
                layer.workspace_budget_bytes = mb << 20
                return layer(x)
            return run
        impls = {(f"lory {mb} MiB" if mb else "lory one chunk"): lory_with(mb) for mb in budgets}
        impls["torch"] = lambda: ref.lory_ffn(x, layer.W_r, layer.W_g, layer.W_u, layer.W_d, "causal", T)
        with torch.no_grad():
            y_l, y_t = impls[next(iter(impls))](), impls["torch"]()
            err = ((y_l.float() - y_t.float()).norm() / y_t.float().norm()).item()
            del y_l, y_t
        res = {}
        for name, fwd in impls.items():
            def fwd_bwd(fwd=fwd):
                torch.autograd.backward(fwd(), dy)
            def fwd_only(fwd=fwd):
                fwd()
            for p in (x, *layer.parameters()):
                p.grad = None
            res[name] = (time_ms(fwd_only, args.warmup, args.iters), time_ms(fwd_bwd, args.warmup, args.iters),
                         peak_extra_bytes(fwd_bwd) / 2**30)
            for p in (x, *layer.parameters()):
                p.grad = None
            torch.cuda.empty_cache()
        rows.append((d, f, E, res, err))
        del layer, x, dy
        torch.cuda.empty_cache()

    print("| d | f | E | impl | fwd ms | fwd+bwd ms | peak extra GiB |")
    print("|---|---|---|---|---|---|---|")
    for d, f, E, res, _ in rows:
        for name, (fw, fb, mem) in res.items():
            print(f"| {d} | {f} | {E} | {name} | {fw:.2f} | {fb:.2f} | {mem:.2f} |")
    print("\n| d | f | E | lory | fwd speedup (torch/lory) | fwd+bwd speedup | peak memory ratio (torch/lory) | y rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for d, f, E, res, err in rows:
        tf, tb, tm = res["torch"]
        for name, (lf, lb, lm) in res.items():
            if name == "torch":
                continue
            print(f"| {d} | {f} | {E} | {name} | {tf / lf:.2f}x | {tb / lb:.2f}x | {tm / max(lm, 1e-9):.2f}x | {err:.1e} |")
    return 0


def main_cpu(args):
    import platform

    import lory_torch
    from lory_torch import reference as ref

    lory_torch.load()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# lory vs plain PyTorch on the CPU, float32, causal routing, {cpu}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| d | f | E | B | L | T | lory fwd ms | torch fwd ms | lory fwd+bwd ms | torch fwd+bwd ms "
          "| fwd+bwd ratio (lory/torch) | y rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.cpu_shapes.split(","):
        d, f, E, B, L, T = map(int, spec.split("x"))
        torch.manual_seed(0)
        layer = lory_torch.LoryMoEFFN(d, f, E, routing="causal", segment_len=T)
        x = torch.randn(B, L, d, requires_grad=True)
        dy = torch.randn(B, L, d)
        impls = {"lory": lambda: layer(x),
                 "torch": lambda: ref.lory_ffn(x, layer.W_r, layer.W_g, layer.W_u, layer.W_d, "causal", T)}
        with torch.no_grad():
            y_l, y_t = impls["lory"](), impls["torch"]()
            err = ((y_l - y_t).norm() / y_t.norm()).item()
        times = {(name, kind): [] for name in impls for kind in ("fwd", "fwd+bwd")}
        for it in range(args.warmup + args.iters):
            for name, fwd in impls.items():  # interleaved: both see the same machine state
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fwd()
                    t1 = time.perf_counter()
                for p in (x, *layer.parameters()):
                    p.grad = None
                t2 = time.perf_counter()
                torch.autograd.backward(fwd(), dy)
                t3 = time.perf_counter()
                if it >= args.warmup:
                    times[name, "fwd"].append((t1 - t0) * 1e3)
                    times[name, "fwd+bwd"].append((t3 - t2) * 1e3)
            print(f"  [{spec}] run {it + 1}/{args.warmup + args.iters}", file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {d} | {f} | {E} | {B} | {L} | {T} | {med['lory', 'fwd']:.1f} | {med['torch', 'fwd']:.1f} "
              f"| {med['lory', 'fwd+bwd']:.1f} | {med['torch', 'fwd+bwd']:.1f} "
              f"| {med['lory', 'fwd+bwd'] / med['torch', 'fwd+bwd']:.2f}x | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
