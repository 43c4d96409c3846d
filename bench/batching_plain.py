#!/usr/bin/env python3
"""The similarity order written plainly in Python, against lory's C++ on the same graph.

The same rules as lory::batching::similarity_order (docs/batching.md) in lists and loops: degrees
counted edge by edge, starts sorted by (degree, id), each step a scan of the current row for the
unvisited neighbour of highest similarity (ties to the lower id), a jump to the next start when
stuck. The graph is bench/batching_graph.hpp's random kNN graph, written to raw files by
lory_batching_order; the C++ order is computed from the same files (memory-mapped). The two orders
must be identical; the script prints both times and their ratio.

  python3 bench/batching_plain.py --n 1000000 --k 10 --driver build-cpu/bench/lory_batching_order
"""
import argparse
import array
import os
import subprocess
import sys
import tempfile
import time


def plain_order(n, k, ids, sims, first_unvisited=False):
    degree = [0] * n
    for r in range(n):
        for j in range(k):
            t = ids[r * k + j]
            if t < 0:
                break
            degree[r] += 1
            degree[t] += 1
    if first_unvisited:
        starts = list(range(n))
    else:
        starts = sorted(range(n), key=lambda d: (degree[d], d))
    visited = [False] * n
    order = []
    cursor = 0
    cur = -1
    while True:
        best = -1
        best_sim = None
        if cur >= 0:
            for j in range(k):
                t = ids[cur * k + j]
                if t < 0:
                    break
                if visited[t]:
                    continue
                s = sims[cur * k + j]
                if best < 0 or s > best_sim or (s == best_sim and t < best):
                    best, best_sim = t, s
        if best < 0:
            while cursor < n and visited[starts[cursor]]:
                cursor += 1
            if cursor == n:
                break
            best = starts[cursor]
        visited[best] = True
        order.append(best)
        cur = best
        if len(order) % 200000 == 0:
            print(f"  plain python: {len(order)} / {n} docs placed", file=sys.stderr, flush=True)
    return order


def read_array(path, typecode):
    a = array.array(typecode)
    with open(path, "rb") as f:
        a.frombytes(f.read())
    if sys.byteorder != "little":
        a.byteswap()
    return a


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=2405)
    p.add_argument("--first-unvisited", action="store_true", help="the released code's start rule")
    p.add_argument("--driver", default="build-cpu/bench/lory_batching_order")
    p.add_argument("--repeats", type=int, default=3, help="C++ runs; the best is reported")
    p.add_argument("--workdir", default=None, help="where the graph files go (default: a temporary directory)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        prefix = os.path.join(tmp, "graph")
        print(f"generating the graph: N = {args.n}, k = {args.k}", file=sys.stderr, flush=True)
        subprocess.run([args.driver, "generate", str(args.n), str(args.k), str(args.seed), prefix], check=True)
        ids = read_array(prefix + ".ids", "q").tolist()
        sims = read_array(prefix + ".sims", "f").tolist()

        t0, c0 = time.perf_counter(), time.process_time()
        order_py = plain_order(args.n, args.k, ids, sims, args.first_unvisited)
        t_py, c_py = time.perf_counter() - t0, time.process_time() - c0

        out = os.path.join(tmp, "order.i64")
        cmd = [args.driver, "order", prefix, str(args.n), str(args.k), out]
        if args.first_unvisited:
            cmd.append("first-unvisited")
        # The best of `--repeats` runs (the first maps the files' pages).
        t_cpp = c_cpp = t_cpp_process = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            wall, cpu = map(float, subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split())
            t_cpp_process = min(t_cpp_process, time.perf_counter() - t0)
            t_cpp, c_cpp = min(t_cpp, wall), min(c_cpp, cpu)
        order_cpp = read_array(out, "q").tolist()

    same = order_py == order_cpp
    print(f"N = {args.n}, k = {args.k}, start = {'first unvisited' if args.first_unvisited else 'minimum degree'}")
    print("                          wall-clock            CPU time (this process)")
    print(f"plain Python:            {t_py:9.3f} s            {c_py:9.3f} s")
    print(f"lory C++ (the call):     {t_cpp:9.3f} s ({t_py / t_cpp:6.1f}x)  {c_cpp:9.3f} s ({c_py / c_cpp:6.1f}x)")
    print(f"lory C++ (the process):  {t_cpp_process:9.3f} s ({t_py / t_cpp_process:6.1f}x)  (mapping the files and writing the order included)")
    print(f"orders identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
