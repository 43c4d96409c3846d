#!/usr/bin/env bash
# Reads a build log that holds ptxas' resource report (-Xptxas -v, on by default for lory's own
# targets) and fails on any kernel or device function with a register spill or a local-memory stack
# frame, for every architecture compiled (sm_80 and sm_90a in CI). Prints a per-arch summary.
#   usage: scripts/check_kernel_resources.sh build/build.log
set -euo pipefail
log=${1:?usage: check_kernel_resources.sh BUILD_LOG}
[ -f "$log" ] || { echo "resource check: no build log at $log"; exit 1; }
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
python3 - "$log" <<'PY'
import re, sys, subprocess, collections
log = open(sys.argv[1], errors="replace").read().splitlines()
arch = None; func = None
entries = collections.Counter(); bad = []; maxreg = collections.Counter()
for line in log:
    m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
    if m:
        func, arch = m.group(1), m.group(2); entries[arch] += 1; continue
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        func = m.group(1); continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and any(int(g) for g in m.groups()):
        bad.append((arch, func, line.strip()))
    m = re.search(r"Used (\d+) registers", line)
    if m and arch:
        maxreg[arch] = max(maxreg[arch], int(m.group(1)))
def dm(name):
    try: return subprocess.run(["c++filt"], input=name, capture_output=True, text=True).stdout.strip()[:160]
    except Exception: return name
for a in sorted(entries):
    print(f"resource check: {a}: {entries[a]} kernels compiled, max {maxreg[a]} registers")
if not entries:
    print("resource check: FAILED: the log holds no ptxas report (was the build clean, with LORY_PTXAS_REPORT=ON?)")
    sys.exit(1)
if bad:
    seen = set()
    for a, f, l in bad:
        if (a, f) in seen: continue
        seen.add((a, f)); print(f"resource check: SPILL/STACK [{a}] {dm(f or '?')}: {l}")
    print(f"resource check: FAILED: {len(seen)} function(s) with spills or a stack frame")
    sys.exit(1)
print("resource check: passed (no spills, no stack frames)")
PY
