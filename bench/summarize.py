#!/usr/bin/env python3
"""Markdown summary of a GPU check: the check's results and the benchmark table.

Usage:
    python3 bench/summarize.py [BENCH_JSON] [--checks FILE] [--title TEXT]

BENCH_JSON  Google Benchmark JSON (--benchmark_out_format=json). Missing, empty,
            cut short by a timeout, or without benchmarks: said so, never an error.
--checks    lines "key=value" written by scripts/gpu_check.sh (commit, date, GPU,
            tests, sanitizers, ...), shown in that order as the first table.

Per benchmark: time, achieved GB/s and TFLOP/s, their percent of the peaks
measured in the same run (counters pct_copy_bw / pct_bf16_gemm; context
peak_copy_GBps / peak_bf16_TFLOPs), the percent of the read/write roofline
where the benchmark splits its traffic (counter pct_rw_roof; context
peak_read_GBps / peak_write_GBps), and the speed-up over the in-run baseline:
  X/<rest>            pairs with  X_cublas/<rest>
  lory_layer*/<rest>  pairs with  dense_ffn*/<rest>, also with E<n> components
                      dropped from <rest> (a dense FFN has no expert count), and with a
                      trailing merge-backward method ("fused", "gemm") left out
speed-up = baseline time / our time; > 1 means ours is faster.

Standard library only: it runs on the GPU machine and in CI.
"""
import argparse
import json
import math
import os
import re
import sys

TIME_SCALE_TO_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


def load_json_tolerant(path):
    """Parses a benchmark JSON; a file cut short (the run was killed) is repaired
    by keeping every complete benchmark entry. Returns (data, note)."""
    if not path or not os.path.exists(path):
        return None, "no benchmark JSON"
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        return None, "benchmark JSON is empty"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError:
        pass
    # Google Benchmark writes one entry per run as it goes: keep the prefix up
    # to the last complete entry and close the array and the object.
    start = text.find('"benchmarks"')
    if start >= 0:
        for end in (m.end() for m in reversed(list(re.finditer(r"\n    }", text)))):
            if end <= start:
                break
            try:
                return json.loads(text[:end] + "\n  ]\n}\n"), "benchmark JSON was cut short; partial"
            except json.JSONDecodeError:
                continue
        try:
            return json.loads(text[: text.find("[", start) + 1] + "]}"), "benchmark JSON was cut short; partial"
        except (json.JSONDecodeError, ValueError):
            pass
    return None, "benchmark JSON is unreadable"


def fnum(x, digits=3):
    """Compact number: 3 significant digits, no exponent for ordinary sizes."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def select_runs(benchmarks):
    """One entry per benchmark: the median aggregate when repetitions were run,
    else the first iteration entry. Keeps the JSON's order."""
    by_name, order = {}, []
    for b in benchmarks:
        name = b.get("run_name") or b.get("name", "?")
        if name not in by_name:
            order.append(name)
            by_name[name] = None
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                by_name[name] = b
        elif by_name[name] is None:
            by_name[name] = b
    return [(n, by_name[n]) for n in order if by_name[n] is not None]


def time_us(b):
    t = as_float(b.get("real_time"))
    if t is None:
        return None
    return t * TIME_SCALE_TO_US.get(b.get("time_unit", "ns"), 1e-3)


def baseline_candidates(name):
    """Names of the in-run baseline a benchmark is compared with, best first."""
    parts = name.split("/")
    head, rest = parts[0], parts[1:]
    if head.endswith("_cublas") or head.startswith("dense_ffn"):
        return []  # a baseline itself
    out = ["/".join([head + "_cublas"] + rest)]
    if head.startswith("lory_layer"):
        dense = "dense_ffn" + head[len("lory_layer"):]
        out.append("/".join([dense] + rest))
        no_e = [p for p in rest if not re.fullmatch(r"E\d+", p)]
        out.append("/".join([dense] + no_e))
        # A layer row with a named merge-backward method (".../fused", ".../gemm") pairs with the
        # dense FFN of the same shape.
        bare = [p for p in rest if p not in ("fused", "gemm")]
        if bare != rest:
            out.append("/".join([dense] + bare))
    return out


def benchmark_table(data):
    lines = []
    ctx = data.get("context", {}) if isinstance(data, dict) else {}
    benches = data.get("benchmarks", []) if isinstance(data, dict) else []
    peak_bw = as_float(ctx.get("peak_copy_GBps"))
    peak_fl = as_float(ctx.get("peak_bf16_TFLOPs"))
    peak_rd, peak_wr = as_float(ctx.get("peak_read_GBps")), as_float(ctx.get("peak_write_GBps"))
    dev = ctx.get("device", "?")
    rw = f", read-only {fnum(peak_rd)} GB/s, write-only {fnum(peak_wr)} GB/s" if peak_rd and peak_wr else ""
    lines.append(
        f"Measured peaks on {dev}: copy {fnum(peak_bw)} GB/s{rw}, bf16 GEMM {fnum(peak_fl)} TFLOP/s "
        "(percentages below refer to these; % r/w roof: the time the benchmark's reads and writes take "
        "at the read-only and write-only rates, over its time)."
    )
    lines.append("")
    runs = select_runs(benches)
    if not runs:
        lines.append("No benchmarks in the JSON.")
        return lines
    times = {n: time_us(b) for n, b in runs if not b.get("error_occurred")}
    lines.append("| benchmark | time (us) | GB/s | % copy bw | % r/w roof | TFLOP/s | % bf16 GEMM | baseline | speed-up |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, b in runs:
        shown = re.sub(r"(/iterations:\d+)?/(manual_time|real_time)$", "", name)  # run settings, not shape
        if b.get("error_occurred"):
            msg = str(b.get("error_message", "error")).replace("|", "/")
            lines.append(f"| {shown} | ERROR: {msg} | | | | | | | |")
            continue
        t = times.get(name)
        gbs, tfs = as_float(b.get("GB/s")), as_float(b.get("TFLOP/s"))
        pbw, pfl = as_float(b.get("pct_copy_bw")), as_float(b.get("pct_bf16_gemm"))
        prw = as_float(b.get("pct_rw_roof"))
        base, ratio = "", "-"
        for cand in baseline_candidates(name):
            if cand in times and times[cand] and t:
                base = cand.split("/")[0]
                ratio = fnum(times[cand] / t) + "x"
                break
        tf_cell = fnum(tfs) if (b.get("flops") or 0) else "-"
        pf_cell = fnum(pfl) if (b.get("flops") or 0) else "-"
        lines.append(
            f"| {shown} | {fnum(t)} | {fnum(gbs)} | {fnum(pbw)} | {fnum(prw)} | {tf_cell} "
            f"| {pf_cell} | {base or '-'} | {ratio} |"
        )
    return lines


def read_checks(path):
    rows = []
    if not path or not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
                continue
            k, v = line.split("=", 1)
            rows.append((k.strip(), v.strip().replace("|", "/")))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", help="Google Benchmark JSON output")
    ap.add_argument("--checks", help="key=value file written by scripts/gpu_check.sh")
    ap.add_argument("--title", default="lory GPU check")
    args = ap.parse_args(argv)

    out = [f"### {args.title}", ""]
    checks = read_checks(args.checks)
    if checks:
        out += ["| check | result |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in checks]
        out.append("")
    data, note = load_json_tolerant(args.json)
    if data is None:
        out.append(f"Benchmarks: {note}.")
    else:
        if note:
            out.append(f"Note: {note}.")
            out.append("")
        out += benchmark_table(data)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
