#!/usr/bin/env python3
"""Reads the A/B section of a GPU check's summary (or bench.log) and prints, per merge case, the
newest revision's default and every variant as a speed-up over that default, fastest first, and
each older revision's default as a speed-up too; the line to act on when choosing defaults.

Usage: python3 scripts/ab_pick.py SUMMARY_OR_LOG

Input lines are what bench/ab/merge_ab.cu prints under '### NN_<rev>' headings, e.g.
  forward   E8  S512      5.815 ms     3376 GB/s  79.4% of copy  83.0% of r/w roof tile512
(the '% of r/w roof' field is absent in drivers from before it existed). Standard library only.
"""
import re
import sys
from collections import defaultdict

LINE = re.compile(
    r"^(?P<what>forward|backward|dW only|de only)\s+E(?P<E>\d+)\s+S(?P<S>\d+)\s+(?P<ms>[\d.]+) ms\s+"
    r"(?P<gbs>\d+) GB/s\s+(?P<copy>[\d.]+)% of copy(?:\s+(?P<roof>[\d.]+)% of r/w roof)?\s*(?P<variant>\S*)\s*$"
)


FAILED = re.compile(r"^(?P<what>forward|backward|dW only|de only)\s+E(?P<E>\d+)\s+S(?P<S>\d+)\s+failed\s*(?P<variant>\S*)\s*$")


def parse(lines):
    """{case: {(rev, variant): (ms, pct_copy, pct_roof), or None where it failed}} and the revisions
    in order."""
    rev, revs, cases = None, [], defaultdict(dict)
    for line in lines:
        if line.startswith("### "):  # a driver's section; anything else (an Nsight Compute run) is skipped
            m = re.match(r"^### (\d\d_\S+)\s*$", line)
            rev = m.group(1) if m else None
            if rev:
                revs.append(rev)
            continue
        m = FAILED.match(line.rstrip())
        if m and rev:
            cases[f"{m['what']} E{m['E']} S{m['S']}"][(rev, m["variant"] or "default")] = None
            continue
        m = LINE.match(line.rstrip())
        if m and rev:
            case = f"{m['what']} E{m['E']} S{m['S']}"
            roof = float(m["roof"]) if m["roof"] else None
            cases[case][(rev, m["variant"] or "default")] = (float(m["ms"]), float(m["copy"]), roof)
    return cases, revs


def report(cases, revs):
    out = []
    if not revs:
        return ["no A/B sections ('### NN_rev') found"]
    newest = revs[-1]
    for case, runs in cases.items():
        base = runs.get((newest, "default"))
        if not base:
            continue
        rows = sorted((kv for kv in runs.items() if kv[1]), key=lambda kv: kv[1][0])
        out.append(f"{case}: {newest} default {base[0]:.3f} ms ({base[1]:.1f}% of copy)")
        for (rev, variant), (ms, copy, roof) in rows:
            name = variant if rev == newest else f"{rev} {variant}"
            roof_s = f", {roof:.1f}% of r/w roof" if roof is not None else ""
            out.append(f"  {base[0] / ms:6.3f}x  {name:<28} {ms:9.3f} ms  {copy:5.1f}% of copy{roof_s}")
        for (rev, variant), r in runs.items():
            if r is None:
                out.append(f"  FAILED   {variant if rev == newest else f'{rev} {variant}'}")
    return out


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip())
        return 2
    with open(argv[1], encoding="utf-8", errors="replace") as f:
        cases, revs = parse(f.read().splitlines())
    print("\n".join(report(cases, revs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
