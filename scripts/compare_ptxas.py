#!/usr/bin/env python3
"""Compares the ptxas resource reports (-Xptxas -v, as scripts/check_kernel_resources.sh reads them)
of two build logs, kernel by kernel: for every entry function (mangled name) and architecture, the
registers, barriers, shared and constant memory ("Used ..." line), the stack frame and spills, and
the warpgroup.arrive insertions ptxas reports. A refactoring that must not change the generated
code shows the same report for every kernel. Exits 1 on any difference, or on a kernel that only
one log has (after renames); prints a summary either way.

  usage: scripts/compare_ptxas.py BEFORE_LOG AFTER_LOG [--rename OLD=NEW ...]
  OLD, NEW: unmangled identifiers; a kernel renamed between the builds (its mangled name in the
  AFTER log has NEW where BEFORE had OLD) is compared under its BEFORE name.
"""
import argparse
import collections
import re
import subprocess
import sys

# Kernels renamed on purpose (BEFORE=AFTER): the merge backward's GEMM-method weight rounding kernel.
DEFAULT_RENAMES = ["merge_weights_to_storage_kernel=merge_backward_gemm_round_weights_kernel"]


def anon(name):
    """nvcc names an anonymous namespace _GLOBAL__N__<hashes and the file's name>, the hashes following
    the source path, which differs between two checkouts: each such (length-prefixed) identifier
    becomes the namespace ANON_<file>, hash-free."""
    out, i = [], 0
    for m in re.finditer(r"(\d+)_GLOBAL__N__", name):
        if m.start() < i:
            continue
        n = int(m.group(1))
        ident = name[m.start(1) + len(m.group(1)):m.start(1) + len(m.group(1)) + n]
        f = re.match(r"_GLOBAL__N__[0-9a-f]{8}_\d+_(\w+?_cu)", ident)
        new = "ANON_" + (f.group(1) if f else "")
        out.append(name[i:m.start()] + f"{len(new)}{new}")
        i = m.start(1) + len(m.group(1)) + n
    return "".join(out) + name[i:]


def parse(path):
    """{(mangled, arch): set of report tuples} for every entry function compiled in the log."""
    reports = collections.defaultdict(set)
    cur = None  # (mangled, arch) of the entry being reported
    fields = {}

    def close():
        if cur is not None:
            reports[cur].add((fields.get("used", "?"), fields.get("stack", "?"), fields.get("arrive", 0)))

    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            close()
            cur, fields = (anon(m.group(1)), m.group(2)), {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+ bytes stack frame, \d+ bytes spill stores, \d+ bytes spill loads)", line)
        if m and "stack" not in fields:
            fields["stack"] = m.group(1)
            continue
        m = re.search(r"ptxas info\s*: (Used \d+ registers.*)$", line)
        if m:
            fields["used"] = m.group(1).strip()
            continue
        if "warpgroup.arrive is injected" in line:
            fields["arrive"] = fields.get("arrive", 0) + 1
            continue
        if re.search(r"ptxas info\s*: Compile time", line):
            close()
            cur, fields = None, {}
    close()
    return reports


def renamed(name, renames):
    for old, new in renames:
        name = name.replace(f"{len(new)}{new}", f"{len(old)}{old}")
    return name


def demangle(name):
    try:
        out = subprocess.run(["c++filt"], input=name, capture_output=True, text=True).stdout.strip()
        return out[:200] or name
    except OSError:
        return name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    args = ap.parse_args()
    renames = [tuple(r.split("=", 1)) for r in DEFAULT_RENAMES + args.rename]
    before = parse(args.before)
    after = {}
    applied = collections.Counter()
    for (name, arch), reps in parse(args.after).items():
        new_name = renamed(name, renames)
        if new_name != name:
            applied[arch] += 1
        after.setdefault((new_name, arch), set()).update(reps)
    if not before or not after:
        print(f"compare_ptxas: FAILED: no ptxas report in {'the BEFORE' if not before else 'the AFTER'} log")
        return 1
    archs = sorted({a for _, a in before} | {a for _, a in after})
    bad = 0
    for arch in archs:
        b = {k: v for k, v in before.items() if k[1] == arch}
        a = {k: v for k, v in after.items() if k[1] == arch}
        same = sum(1 for k in b if k in a and a[k] == b[k])
        diff = [k for k in b if k in a and a[k] != b[k]]
        only_b = sorted(k for k in b if k not in a)
        only_a = sorted(k for k in a if k not in b)
        print(f"compare_ptxas: {arch}: {len(b)} kernels before, {len(a)} after; {same} identical, "
              f"{len(diff)} different, {len(only_b)} only before, {len(only_a)} only after"
              f"{f', {applied[arch]} compared under a renamed name' if applied[arch] else ''}")
        for k in diff:
            print(f"  DIFFERENT {demangle(k[0])}\n    before: {sorted(b[k])}\n    after:  {sorted(a[k])}")
        for k in only_b:
            print(f"  ONLY BEFORE {demangle(k[0])}")
        for k in only_a:
            print(f"  ONLY AFTER  {demangle(k[0])}")
        bad += len(diff) + len(only_b) + len(only_a)
    if bad:
        print(f"compare_ptxas: FAILED: {bad} kernel(s) differ or are on one side only")
        return 1
    print("compare_ptxas: passed (every kernel's registers, barriers, shared/constant memory, stack and spills identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
