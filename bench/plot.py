#!/usr/bin/env python3
"""Plots of a lory benchmark run (the JSON written by scripts/gpu_check.sh).

Usage:
    python3 bench/plot.py BENCH_JSON [--out DIR]     (DIR defaults to the JSON's folder)

Writes, when the JSON has the benchmarks for them:
  roofline.png        achieved TFLOP/s against arithmetic intensity, under the roofline
                      made of the peaks measured in the same run (copy bandwidth, bf16 GEMM)
  rates_vs_peak.png   per kernel and shape: achieved GB/s against the measured copy
                      bandwidth, or TFLOP/s against the measured GEMM rate when the
                      kernel sits nearer the compute roof
  speedup_vs_baseline.png   time ratio baseline / ours for every X vs X_cublas pair
  lory_vs_dense.png   time ratio lory_layer / dense_ffn against the expert count

Needs matplotlib; without it, says so and exits 0 (the project does not depend on it).
"""
import argparse
import os
import re
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import as_float, baseline_candidates, load_json_tolerant, select_runs, time_us  # noqa: E402


def short(name):
    return re.sub(r"(/iterations:\d+)?/(manual_time|real_time)$", "", name)


def kernel_of(name):
    return name.split("/")[0]


def collect(data):
    """[(name, entry)] without errored runs, plus the measured peaks."""
    ctx = data.get("context", {})
    peak_bw = as_float(ctx.get("peak_copy_GBps")) or 0.0
    peak_fl = as_float(ctx.get("peak_bf16_TFLOPs")) or 0.0
    runs = [(short(n), b) for n, b in select_runs(data.get("benchmarks", [])) if not b.get("error_occurred")]
    return runs, peak_bw, peak_fl, ctx.get("device", "GPU")


def plot_roofline(plt, runs, peak_bw, peak_fl, device, path):
    pts = OrderedDict()
    for name, b in runs:
        by, fl, t = as_float(b.get("bytes")), as_float(b.get("flops")), time_us(b)
        if not by or not fl or not t:
            continue
        pts.setdefault(kernel_of(name), []).append((fl / by, fl / (t * 1e-6) * 1e-12))
    if not pts or not peak_bw or not peak_fl:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ais = [ai for v in pts.values() for ai, _ in v]
    lo, hi = min(ais + [peak_fl * 1e3 / peak_bw]) / 4, max(ais + [peak_fl * 1e3 / peak_bw]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    # GB/s * FLOP/B = GFLOP/s; / 1e3 -> TFLOP/s.
    ax.plot(xs, [min(peak_fl, x * peak_bw / 1e3) for x in xs], "k-", lw=1.5,
            label=f"measured roof: {peak_bw:.0f} GB/s, {peak_fl:.0f} TFLOP/s")
    for k, v in pts.items():
        ax.scatter([p[0] for p in v], [p[1] for p in v], label=k, s=28, alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of minimum traffic)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"lory kernels against the measured roofline ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_rates(plt, runs, peak_bw, peak_fl, device, path):
    groups = OrderedDict()
    for name, b in runs:
        gbs, tfs = as_float(b.get("GB/s")), as_float(b.get("TFLOP/s"))
        pbw, pfl = as_float(b.get("pct_copy_bw")) or 0.0, as_float(b.get("pct_bf16_gemm")) or 0.0
        if gbs is None and tfs is None:
            continue
        compute = bool(b.get("flops")) and pfl > pbw
        groups.setdefault(kernel_of(name), []).append(
            ("/".join(name.split("/")[1:]) or name, (gbs, tfs), compute))
    if not groups:
        return False
    n = len(groups)
    heights = [max(1.2, 0.28 * len(v) + 0.8) for v in groups.values()]
    fig, axes = plt.subplots(n, 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (k, v) in zip(axes[:, 0], groups.items()):
        compute = sum(c for _, _, c in v) * 2 > len(v)  # one roof per kernel: the majority's
        peak = peak_fl if compute else peak_bw
        unit = "TFLOP/s" if compute else "GB/s"
        vals = [pair[1 if compute else 0] for _, pair, _ in v]
        labels = [lab for lab, _, _ in v]
        ys = list(range(len(v)))
        ax.barh(ys, [x or 0 for x in vals], color="tab:green" if compute else "tab:blue")
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        if peak:
            ax.axvline(peak, color="k", ls="--", lw=1)
            for y, x in zip(ys, vals):
                if x:
                    ax.text(x, y, f" {x / peak * 100:.0f}%", va="center", fontsize=7)
            ax.set_xlim(0, max([peak] + [x or 0 for x in vals]) * 1.15)
        ax.set_title(f"{k}: {unit} (dashed: measured peak {peak:.0f})", fontsize=9)
    fig.suptitle(f"achieved rate against the measured peak ({device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_speedup(plt, runs, path):
    times = {n: time_us(b) for n, b in runs}
    pairs = []
    for name, _ in runs:
        if kernel_of(name).startswith("lory_layer"):
            continue  # drawn against the dense FFN in lory_vs_dense.png
        cand = baseline_candidates(name)[:1]
        if cand and cand[0] in times and times[cand[0]] and times[name]:
            pairs.append((name, times[cand[0]] / times[name]))
    if not pairs:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(pairs) + 1.4))
    ys = list(range(len(pairs)))
    ax.barh(ys, [r for _, r in pairs], color=["tab:green" if r >= 1 else "tab:red" for _, r in pairs])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([n for n, _ in pairs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("baseline time / lory time  (> 1: lory faster)")
    ax.set_title("speed-up over the in-run cuBLAS baseline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_lory_vs_dense(plt, runs, path):
    times = {n: time_us(b) for n, b in runs}
    lines = OrderedDict()
    for name, _ in runs:
        if not kernel_of(name).startswith("lory_layer"):
            continue
        m = re.search(r"/E(\d+)(/|$)", name)
        if not m:
            continue
        for cand in baseline_candidates(name)[1:]:
            if cand in times and times[cand] and times[name]:
                key = re.sub(r"/E\d+(?=/|$)", "", name)
                lines.setdefault(key, []).append((int(m.group(1)), times[name] / times[cand]))
                break
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    es = sorted({p[0] for v in lines.values() for p in v})
    ax.set_xticks(es)
    ax.set_xticklabels([str(e) for e in es])
    ax.set_xlabel("experts E")
    ax.set_ylabel("lory layer time / dense FFN time")
    ax.set_title("cost of a Lory MoE layer over a dense FFN of the same shape", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="Google Benchmark JSON")
    ap.add_argument("--out", help="folder for the PNGs (default: the JSON's folder)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed; no plots written (pip install matplotlib)")
        return 0
    data, note = load_json_tolerant(args.json)
    if data is None:
        print(f"plot.py: {note}: {args.json}; no plots written")
        return 0
    if note:
        print(f"plot.py: note: {note}")
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out, exist_ok=True)
    runs, peak_bw, peak_fl, device = collect(data)
    if not runs:
        print("plot.py: no benchmarks in the JSON; no plots written")
        return 0
    written = []
    for fname, fn in (
        ("roofline.png", lambda p: plot_roofline(plt, runs, peak_bw, peak_fl, device, p)),
        ("rates_vs_peak.png", lambda p: plot_rates(plt, runs, peak_bw, peak_fl, device, p)),
        ("speedup_vs_baseline.png", lambda p: plot_speedup(plt, runs, p)),
        ("lory_vs_dense.png", lambda p: plot_lory_vs_dense(plt, runs, p)),
    ):
        path = os.path.join(out, fname)
        if fn(path):
            written.append(path)
    print("plot.py: wrote " + (", ".join(written) if written else "nothing (no matching benchmarks)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
